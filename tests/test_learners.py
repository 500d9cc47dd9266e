"""Learners and constraint handlers on a controlled toy environment: each improves its objective."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from stable_baselines3.common.env_checker import check_env  # noqa: F401  (the toy env is an SB3 VecEnv)
from stable_baselines3.common.logger import configure

from rlskip.policy import SkipPolicy
from rlskip.agents.reinforce import Reinforce
from rlskip.config import PPOConfig, ReinforceConfig
from rlskip.constraints import make_constraint

from toy_env import D, ToyVecEnv, is_easy

CONSTRAINTS = {
    "lexicographic": dict(max_quality_drop=0.01),
    # the multiplier starts above the toy's exchange rate: from 1.0, cutting a needed unit pays until dual ascent
    # catches up, and 125 iterations ended anywhere between -0.2 and +0.1 of the objective (6 seeds)
    "lagrangian": dict(max_quality_drop=0.05, lam_init=2.0, lr=0.5),
    "fixed": dict(lam=0.5),
    "budget": dict(budget=0.6),
}


def _objective(name: str, stats: dict) -> float:
    """What each handler optimises, as a number to compare before/after."""
    q, c = stats["quality"], stats["cost"]
    return {"lexicographic": q - 0.1 * c, "lagrangian": q - 0.1 * c, "fixed": q - 0.5 * c, "budget": q * (c <= 0.6 + 1e-9)}[name]


# the native learner's variants: a learned value baseline with normalised advantages; the same with raw
# advantages and the entropy bonus (the embedded default's agent); and leave-one-out over 4 plans per
# instance, raw (without the bonus, a bit that every plan of a group keeps gives no advantage to learn from)
BASELINES = {
    "value": dict(group_size=1, normalize_advantage=True, entropy_coef=0.0),
    "value_raw": dict(group_size=1, normalize_advantage=False, entropy_coef=0.01),
    "group": dict(group_size=4, normalize_advantage=False, entropy_coef=0.01),
    "self_critical": dict(group_size=4, normalize_advantage=False, entropy_coef=0.01, self_critical=True),
}


def _native(constraint, tmp_path, seed=0, baseline="value"):
    b = BASELINES[baseline]
    torch.manual_seed(seed)
    env = ToyVecEnv(64, seed=seed, group_size=b["group_size"])
    policy = SkipPolicy(D, env.space.n_bits, hidden=64, token_head=False)
    config = ReinforceConfig(
        lr=3e-3, entropy_coef=b["entropy_coef"], normalize_advantage=b["normalize_advantage"], self_critical=b.get("self_critical", False)
    )
    return Reinforce(env, policy, constraint, configure(str(tmp_path), ["csv"]), config, seed=seed)


@pytest.mark.parametrize("baseline", sorted(BASELINES))
@pytest.mark.parametrize("name", sorted(CONSTRAINTS))
def test_native_learner_improves_each_constraint_objective(name, baseline, tmp_path):
    """Averaged over two seeds, so one short run's wander does not decide it."""
    before, after = [], []
    for seed in (0, 1):
        learner = _native(make_constraint(name, **CONSTRAINTS[name]), tmp_path, seed=seed, baseline=baseline)
        assert (learner.value is None) == (BASELINES[baseline]["group_size"] > 1)
        first = [learner.train_iteration() for _ in range(5)]
        for _ in range(120):
            learner.train_iteration()
        last = [learner.train_iteration() for _ in range(5)]
        before.append(np.mean([_objective(name, s) for s in first]))
        after.append(np.mean([_objective(name, s) for s in last]))
    assert np.mean(after) > np.mean(before) + 0.05, (name, before, after)


def _deterministic(learner, n_batches=4):
    """Quality and cost of the policy's deterministic decisions on fresh toy instances."""
    env = learner.env
    q, c = [], []
    for _ in range(n_batches):
        obs = env.reset()
        bits, _ = learner.policy.decide(torch.as_tensor(obs["pooled"]))
        easy = is_easy(obs["pooled"])
        b = bits.numpy()
        q.append(np.where(easy, b[:, 0], b[:, :3].all(1)).mean())
        c.append((0.2 + 0.8 * b.mean(1)).mean())
    return float(np.mean(q)), float(np.mean(c))


@pytest.mark.parametrize("baseline", sorted(BASELINES))
def test_lexicographic_keeps_quality_while_cutting_cost(baseline, tmp_path):
    # penalty 1: the bare ordering. (At the default 50 the policy reaches the toy's optimum cost, 0.52, sooner,
    # and its deterministic decisions then err on 1-2% of instances next to the easy/hard boundary.)
    learner = _native(make_constraint("lexicographic", max_quality_drop=0.01, penalty=1.0), tmp_path, baseline=baseline)
    q0, c0 = _deterministic(learner)
    assert q0 == 1.0  # nearly everything kept at initialisation
    checkpoints = []
    for i in range(1, 401):
        learner.train_iteration()
        if i >= 320 and i % 20 == 0:
            checkpoints.append(_deterministic(learner))
    # compute went down ...
    assert max(c for _, c in checkpoints) < c0 - 0.2
    # ... without the decisions ever trading quality below the constraint once it was satisfied
    assert min(q for q, _ in checkpoints) >= 0.99
    if baseline != "value":
        # raw advantages at penalty 1 are slower to find the per-instance rule on this toy (leave-one-out by
        # ~1000 iterations; the value baseline not within 1600): only the ordering is checked for them
        return
    # and decisions are per instance: easy instances drop candidates 1 and 2, hard ones keep them
    obs = learner.env.reset()
    pooled = torch.as_tensor(obs["pooled"])
    bits, _ = learner.policy.decide(pooled)
    easy = is_easy(pooled)
    assert bits[~easy][:, :3].all()
    assert (~bits[easy][:, 1:3]).float().mean() > 0.8


def test_ppo_learner_improves_lexicographic_objective(tmp_path):
    from rlskip.agents.ppo import PPOLearner

    env = ToyVecEnv(32, seed=1)
    agent = PPOConfig(lr=3e-3, entropy_coef=0.0, hidden=32, length_input=False, normalize_advantage=True)
    learner = PPOLearner(env, make_constraint("lexicographic", max_quality_drop=0.01), configure(str(tmp_path), ["csv"]), agent, seed=1)
    first = [learner.train_iteration() for _ in range(2)]
    for _ in range(40):
        learner.train_iteration()
    last = [learner.train_iteration() for _ in range(3)]
    before = np.mean([_objective("lexicographic", s) for s in first])
    after = np.mean([_objective("lexicographic", s) for s in last])
    assert after > before + 0.05, (before, after)
    # SB3's own zip loads with PPO.load and acts like the live policy
    from stable_baselines3 import PPO

    files = learner.save(tmp_path)
    loaded = PPO.load(tmp_path / files["ppo"], device="cpu")
    obs = env.reset()
    a1, _ = learner.model.predict(obs, deterministic=True)
    a2, _ = loaded.predict(obs, deterministic=True)
    assert np.array_equal(a1, a2)


def test_self_critical_plays_the_greedy_plan_in_each_groups_first_slot(tmp_path):
    learner = _native(make_constraint("lexicographic", max_quality_drop=0.01), tmp_path, baseline="self_critical")
    for _ in range(30):  # away from the all-keep initialisation, so sampled plans differ from the greedy one
        learner.train_iteration()
    obs, env, actions = learner._obs, learner.env, []
    step = env.step
    env.step = lambda action: (actions.append(action.copy()), step(action))[1]
    with torch.no_grad():
        greedy, _ = learner.policy.decide(torch.as_tensor(obs["pooled"]))
    learner.train_iteration()
    played = actions[0][:, : env.space.n_bits].astype(bool)
    assert np.array_equal(played[::4], greedy[::4].numpy())
    assert not np.array_equal(played, greedy.numpy())  # the other slots sample


def test_lr_decay_holds_then_falls_linearly_to_zero(tmp_path):
    env = ToyVecEnv(8, seed=0)
    policy = SkipPolicy(D, env.space.n_bits, hidden=16, token_head=False)
    constraint = make_constraint("lexicographic", max_quality_drop=0.01)
    learner = Reinforce(env, policy, constraint, configure(str(tmp_path), ["csv"]), ReinforceConfig(lr=1e-2, iterations=10, lr_decay=0.5))
    assert [round(learner.learning_rate(i), 6) for i in range(10)] == [0.01] * 6 + [0.008, 0.006, 0.004, 0.002]
    learner.train_iteration()
    assert learner.optimizer.param_groups[0]["lr"] == 0.01
    constant = Reinforce(env, policy, constraint, configure(str(tmp_path), ["csv"]), ReinforceConfig(lr=1e-2, iterations=10))
    assert {constant.learning_rate(i) for i in range(10)} == {0.01}
