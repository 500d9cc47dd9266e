"""SkipEnv and SkipVecEnv on the synthetic task: API checkers, observation layout, action semantics, the
full-model cache, batching against one-at-a-time stepping, reward handlers and the data order."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env as gym_check_env
from stable_baselines3.common.env_checker import check_env as sb3_check_env
from stable_baselines3.common.vec_env import DummyVecEnv
from transformers import BartForConditionalGeneration

from rlskip.constraints import Fixed
from rlskip.envs import SkipEnv, SkipVecEnv
from rlskip.envs.tasks import get_task
from rlskip.envs.tasks.synthetic import small_bart_config, synthetic_tokenizer

MAX_SRC, MAX_NEW = 32, 8
# What the checkers may say about these spaces, by design: hidden states are unbounded, and the token
# states are a matrix for the policy's token head (SB3 suggests flattening it).
EXPECTED_WARNINGS = ("infinity", "unconventional shape")


@pytest.fixture(scope="module")
def tokenizer():
    return synthetic_tokenizer()


@pytest.fixture(scope="module")
def model():
    """A tiny random BART whose outputs depend on the source and end at varied lengths."""
    torch.manual_seed(0)
    cfg = small_bart_config(
        d_model=32, encoder_ffn_dim=64, decoder_ffn_dim=64, encoder_layers=3, decoder_layers=2, init_std=0.15,
        tie_word_embeddings=False,
    )
    m = BartForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        m.final_logits_bias[0, cfg.eos_token_id] = 1.0
    return m


@pytest.fixture(scope="module")
def task():
    return get_task("synthetic", n_train=40, n_eval=10)


@pytest.fixture(scope="module")
def examples(task):
    return task.load("train")


def make_env(model, tokenizer, task, examples, **kw) -> SkipEnv:
    return SkipEnv(model, tokenizer, task, examples, max_source_tokens=MAX_SRC, max_new_tokens=MAX_NEW, **kw)


def make_vec(model, tokenizer, task, examples, num_envs=4, **kw) -> SkipVecEnv:
    return SkipVecEnv(
        model, tokenizer, task, examples, num_envs=num_envs, max_source_tokens=MAX_SRC, max_new_tokens=MAX_NEW, **kw
    )


def random_actions(env, n, seed) -> np.ndarray:
    env.action_space.seed(seed)
    return np.stack([env.action_space.sample() for _ in range(n)])


def test_gymnasium_and_sb3_check_env_pass(model, tokenizer, task, examples):
    env = make_env(model, tokenizer, task, examples, budget=(0.3, 0.9), budget_in_obs=True, seed=0)
    env.precompute_full()  # both of the checkers' steps of an instance then run the same rows (see test_envs_real_data)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gym_check_env(env, skip_render_check=True)
        sb3_check_env(env)
    unexpected = [str(w.message) for w in caught if not any(e in str(w.message) for e in EXPECTED_WARNINGS)]
    assert not unexpected


def test_observation_layout(model, tokenizer, task, examples):
    env = make_env(model, tokenizer, task, examples, budget_in_obs=True, budget=0.7, seed=1)
    d = model.config.d_model
    obs, info = env.reset()
    assert set(obs) == {"pooled", "tokens", "token_mask", "budget"}
    assert obs["pooled"].shape == (d,) and obs["tokens"].shape == (MAX_SRC, d) and obs["token_mask"].shape == (MAX_SRC,)
    assert all(v.dtype == np.float32 for v in obs.values()) and obs in env.observation_space
    n = len(tokenizer(examples[info["index"]].source)["input_ids"])
    assert obs["token_mask"].tolist() == [1.0] * n + [0.0] * (MAX_SRC - n)
    assert not obs["tokens"][n:].any() and obs["tokens"][:n].any(axis=1).all()
    np.testing.assert_allclose(obs["pooled"], obs["tokens"][:n].mean(0), rtol=1e-5, atol=1e-6)
    assert obs["budget"].tolist() == [pytest.approx(0.7)] and info["budget"] == pytest.approx(0.7)
    obs, info = env.reset(options={"index": 3, "budget": 0.25})
    assert info == {"index": 3, "budget": 0.25} and obs["budget"][0] == pytest.approx(0.25)
    assert "budget" not in make_env(model, tokenizer, task, examples, seed=1).reset()[0]


def test_padding_bits_are_ignored_and_special_tokens_kept(model, tokenizer, task, examples):
    env = make_env(model, tokenizer, task, examples, seed=2)
    n_bits = env.space.n_bits
    obs, info = env.reset(options={"index": 5})
    n = int(obs["token_mask"].sum())
    assert n < MAX_SRC
    action = random_actions(env, 1, seed=0)[0]
    other = action.copy()
    other[n_bits + n :] = 1 - other[n_bits + n :]  # flip every padding-position bit
    env.reset(options={"index": 5})
    _, r1, *_, i1 = env.step(action)
    env.reset(options={"index": 5})
    _, r2, *_, i2 = env.step(other)
    assert r1 == r2
    assert {k: v for k, v in i1.items() if k != "plan_bits"} == {k: v for k, v in i2.items() if k != "plan_bits"}
    # dropping every token still keeps <s> and </s>
    no_tokens = np.ones(env.rollout.n_actions, dtype=np.int8)
    no_tokens[n_bits:] = 0
    env.reset(options={"index": 5})
    assert env.step(no_tokens)[4]["tokens_kept"] == 2


def test_all_ones_action_reproduces_the_full_model(model, tokenizer, task, examples):
    env = make_env(model, tokenizer, task, examples, seed=3, fidelity="exact_match")
    env.reset()
    _, reward, terminated, truncated, info = env.step(np.ones(env.rollout.n_actions, dtype=np.int8))
    assert terminated and not truncated
    assert info["text"] == info["text_full"] and info["cost"] == pytest.approx(1.0)
    assert info["quality"] == info["quality_full"] == 1.0
    assert info["tokens_kept"] == len(env.rollout.source_ids[info["index"]])
    assert reward == pytest.approx(1.0 - 0.5 * 1.0)


def test_full_model_output_is_computed_once_per_instance(model, tokenizer, task, examples, monkeypatch):
    env = make_env(model, tokenizer, task, examples, seed=4)
    runtime = env.rollout.runtime
    rows_per_call: list[int] = []
    generate = runtime.generate

    def counting_generate(obs, plan, **kw):
        rows_per_call.append(plan.batch_size)
        return generate(obs, plan, **kw)

    monkeypatch.setattr(runtime, "generate", counting_generate)
    actions = random_actions(env, 3, seed=1)
    for action in actions:
        env.reset(options={"index": 7})
        info = env.step(action)[4]
    # first step: the plan's row plus the all-ones row in the same call; later steps: the plan alone
    assert rows_per_call == [2, 1, 1]
    assert set(env.full_outputs) == {7} and env.full_outputs[7].text == info["text_full"]
    env.full_outputs.clear()  # what a learner does after tuning the generator
    env.reset(options={"index": 7})
    env.step(actions[0])
    assert rows_per_call[-1] == 2


def test_vec_env_equals_dummy_vec_env_of_skip_envs(model, tokenizer, task, examples, monkeypatch):
    n = 4
    vec = make_vec(model, tokenizer, task, examples, num_envs=n, seed=5, budget=(0.2, 1.0), budget_in_obs=True)
    single = DummyVecEnv([lambda: make_env(model, tokenizer, task, examples, budget_in_obs=True)] * n)
    calls = []
    generate = vec.rollout.runtime.generate
    monkeypatch.setattr(vec.rollout.runtime, "generate", lambda obs, plan, **kw: calls.append(1) or generate(obs, plan, **kw))
    vec_obs = vec.reset()
    for round_ in range(2):
        single.set_options(vec.reset_infos)  # the same instances and budgets, by index
        single_obs = single.reset()
        lengths = {len(vec.rollout.source_ids[i]) for i in vec.current_indices()}
        assert len(lengths) > 1, "the batch should mix source lengths"
        for key in vec_obs:
            np.testing.assert_allclose(vec_obs[key], single_obs[key], atol=1e-5, err_msg=key)
        actions = random_actions(vec, n, seed=10 + round_)
        calls.clear()
        next_obs, rewards, dones, infos = vec.step(actions)
        assert len(calls) == 1, "one batched runtime call per step"
        _, single_rewards, single_dones, single_infos = single.step(actions)
        assert dones.all() and single_dones.all()
        np.testing.assert_allclose(rewards, single_rewards, atol=1e-6)
        for a, b in zip(infos, single_infos):
            assert a["index"] == b["index"] and a["text"] == b["text"] and a["text_full"] == b["text_full"]
            assert a["tokens_kept"] == b["tokens_kept"] and (a["plan_bits"] == b["plan_bits"]).all()
            for key in ("quality", "quality_full", "cost", "reward", "budget"):
                assert a[key] == pytest.approx(b[key], abs=1e-9), key
            for key, value in a["terminal_observation"].items():
                np.testing.assert_allclose(value, b["terminal_observation"][key], atol=1e-5)
        vec_obs = next_obs  # the auto-reset instances are the next round's


def test_execute_then_advance_is_one_step(model, tokenizer, task, examples):
    """The two halves a learner calls itself (other work between them) give what ``step`` gives."""
    whole, halves = (make_vec(model, tokenizer, task, examples, num_envs=4, seed=7) for _ in range(2))
    obs_w, obs_h = whole.reset(), halves.reset()
    for round_ in range(2):
        actions = random_actions(whole, 4, seed=20 + round_)
        obs_w, rewards_w, _, infos_w = whole.step(actions)
        rewards_h, infos_h = halves.execute(actions)
        with pytest.raises(RuntimeError, match="call advance"):
            halves.execute(actions)  # the same instances twice
        obs_h = halves.advance()
        np.testing.assert_array_equal(rewards_w, rewards_h)
        assert [i["text"] for i in infos_w] == [i["text"] for i in infos_h]
        assert whole.current_indices() == halves.current_indices()
        for key in obs_w:
            np.testing.assert_array_equal(obs_w[key], obs_h[key])


def test_swapping_the_constraint_changes_reward_only(model, tokenizer, task, examples):
    class Doubled:
        lam = 0.0

        def reward(self, quality, quality_full, cost):
            return 2.0 * quality - cost

    vec = make_vec(model, tokenizer, task, examples, num_envs=3, seed=6)
    actions = random_actions(vec, 3, seed=2)

    def step_instances_0_1_2():
        vec.set_options([{"index": i} for i in (0, 1, 2)])
        vec.reset()
        return vec.step(actions)

    results = [step_instances_0_1_2()]  # the default handler
    vec.set_attr("constraint", Doubled())
    results.append(step_instances_0_1_2())
    vec.constraint = Fixed(lam=3.0)
    results.append(step_instances_0_1_2())
    (_, r0, _, i0), (_, r1, _, i1), (_, r2, _, i2) = results
    for a, b, c in zip(i0, i1, i2):
        assert a["quality"] == b["quality"] == c["quality"] and a["cost"] == b["cost"] == c["cost"]
    q, cost = np.array([i["quality"] for i in i0]), np.array([i["cost"] for i in i0])
    np.testing.assert_allclose(r0, q - 0.5 * cost, rtol=1e-6)
    np.testing.assert_allclose(r1, 2.0 * q - cost, rtol=1e-6)
    np.testing.assert_allclose(r2, q - 3.0 * cost, rtol=1e-6)
    assert vec.get_attr("constraint", indices=[0, 2])[0].lam == 3.0
    with pytest.raises(ValueError, match="reward"):
        vec.constraint = object()


def test_seeded_data_order_is_reproducible_and_resumable(model, tokenizer, task, examples):
    def order(env, steps, state=None):
        if state is None:
            env.reset()
        else:
            env.set_state(state)  # restores the instances in the slots: step() follows directly
        seen = []
        for _ in range(steps):
            seen.append(env.current_indices())
            env.step(np.ones((env.num_envs, env.rollout.n_actions), dtype=np.int8))
        return seen

    a = order(make_vec(model, tokenizer, task, examples, num_envs=5, seed=11), 8)
    assert a == order(make_vec(model, tokenizer, task, examples, num_envs=5, seed=11), 8)
    assert a[:2] != order(make_vec(model, tokenizer, task, examples, num_envs=5, seed=12), 2)
    flat = [i for step in a for i in step]
    assert sorted(flat) == list(range(40)), "an epoch covers the data once"
    # resume: the state after 3 steps continues exactly where the first run went on
    vec = make_vec(model, tokenizer, task, examples, num_envs=5, seed=11)
    order(vec, 3)
    state = json.loads(json.dumps(vec.get_state()))  # survives a checkpoint file
    assert state["seed"] == 11 and state["episodes"] == 20 and [s["index"] for s in state["slots"]] == a[3]
    assert order(make_vec(model, tokenizer, task, examples, num_envs=5, seed=99), 5, state) == a[3:]
    # SkipEnv draws the same stream, one instance per episode
    env = make_env(model, tokenizer, task, examples, seed=11)
    assert [env.reset()[1]["index"] for _ in range(10)] == flat[:10]
    vec.seed(11)
    vec.reset()
    assert vec.current_indices() == a[0]
    env.reset()
    held = env.get_state()
    resumed = make_env(model, tokenizer, task, examples)
    obs = resumed.set_state(held)
    assert resumed.step(np.ones(resumed.rollout.n_actions, dtype=np.int8))[4]["index"] == flat[10]
    np.testing.assert_array_equal(obs["pooled"], env.step(np.ones(env.rollout.n_actions, dtype=np.int8))[0]["pooled"])


def test_grouped_slots_repeat_each_drawn_instance(model, tokenizer, task, examples):
    ungrouped = make_vec(model, tokenizer, task, examples, num_envs=3, seed=5)
    ungrouped.reset()
    stream = [ungrouped.current_indices()]
    ungrouped.step(np.ones((3, ungrouped.rollout.n_actions), dtype=np.int8))
    stream.append(ungrouped.current_indices())
    vec = make_vec(model, tokenizer, task, examples, num_envs=6, seed=5, group_size=2)
    obs = vec.reset()
    # the same stream as ungrouped slots, each instance in two consecutive slots, observed identically
    assert vec.current_indices() == [i for i in stream[0] for _ in range(2)]
    np.testing.assert_array_equal(obs["pooled"][0::2], obs["pooled"][1::2])
    actions = random_actions(vec, 6, seed=3)
    _, rewards, _, infos = vec.step(actions)
    assert vec.current_indices() == [i for i in stream[1] for _ in range(2)]
    assert vec.get_state()["episodes"] == 6
    # each slot ran its own plan: a slot's outcome depends only on its instance and its action
    single = make_env(model, tokenizer, task, examples)
    for j in range(6):
        single.reset(options={"index": infos[j]["index"]})
        _, r, _, _, info = single.step(actions[j])
        assert info["text"] == infos[j]["text"] and r == pytest.approx(rewards[j], abs=1e-6)
    with pytest.raises(ValueError, match="group_size must be a positive divisor of num_envs=6, got 4"):
        make_vec(model, tokenizer, task, examples, num_envs=6, group_size=4)


def test_bad_inputs_fail_with_clear_errors(model, tokenizer, task, examples):
    env = make_env(model, tokenizer, task, examples, seed=0)
    with pytest.raises(RuntimeError, match="reset"):
        env.step(np.ones(env.rollout.n_actions, dtype=np.int8))
    env.reset()
    with pytest.raises(ValueError, match=f"{env.rollout.n_actions} entries"):
        env.step(np.ones(env.rollout.n_actions + 1, dtype=np.int8))
    with pytest.raises(ValueError, match="0 .skip. or 1 .keep."):
        env.step(np.full(env.rollout.n_actions, 2, dtype=np.int8))
    with pytest.raises(ValueError, match="instance index in 0..39"):
        env.reset(options={"index": 40})
    with pytest.raises(ValueError, match="budget"):
        env.reset(options={"budget": 1.5})
    with pytest.raises(ValueError, match="max_source_tokens must be in 1..64"):
        SkipEnv(model, tokenizer, task, examples, max_source_tokens=65)
    # a generator classifies by scoring label words; this tokenizer cannot tell them apart
    with pytest.raises(ValueError, match=r"label words \['negative', 'positive'\] do not start with distinct tokens"):
        SkipEnv(model, tokenizer, get_task("glue", config="sst2"), examples)
    from transformers import BartForSequenceClassification

    classifier = BartForSequenceClassification(model.config)
    with pytest.raises(ValueError, match="a generation task needs a generator, but the backbone is a sequence classifier"):
        SkipEnv(classifier, tokenizer, task, examples)
    with pytest.raises(ValueError, match="unknown metric"):
        SkipEnv(model, tokenizer, task, examples, fidelity="bleu")
    with pytest.raises(ValueError, match="contradicts"):
        SkipEnv(model, tokenizer, task, examples, max_new_tokens=8, gen_kwargs={"max_new_tokens": 4})
    with pytest.raises(ValueError, match="no examples"):
        SkipEnv(model, tokenizer, task, [])


def test_ppo_runs_on_the_vec_env(model, tokenizer, task, examples, tmp_path):
    from stable_baselines3 import PPO
    from stable_baselines3.common.logger import configure

    vec = make_vec(model, tokenizer, task, examples, num_envs=4, seed=7)
    agent = PPO("MultiInputPolicy", vec, n_steps=2, batch_size=8, n_epochs=1, seed=0, device="cpu")
    logger = configure(str(tmp_path), ["csv"])  # SB3's default logger would leave a folder in /tmp
    agent.set_logger(logger)
    try:
        agent.learn(total_timesteps=8)
    finally:
        logger.close()  # its progress.csv, not left to the garbage collector
    assert agent.num_timesteps == 8 and vec.get_state()["episodes"] >= 8


def test_policy_decides_at_inference_as_it_saw_in_training(model, tokenizer, task, examples):
    """The environment's observation and the inference path (``observation_inputs`` on a fresh ``observe``)
    give a length-reading policy the same logits, so what it learned is what it deploys."""
    from rlskip.policy import SkipPolicy, observation_inputs
    from rlskip.runtime import get_runtime

    env = make_env(model, tokenizer, task, examples, seed=1)
    torch.manual_seed(0)
    policy = SkipPolicy(model.config.d_model, env.space.n_bits, token_head=True, length_input=True, init_keep_logit=0.0)
    torch.nn.init.normal_(policy.bit_out.weight)
    rt = get_runtime(model)
    for index in (0, 3):
        obs, _ = env.reset(options={"index": index})
        trained = policy(
            torch.as_tensor(obs["pooled"])[None], torch.as_tensor(obs["tokens"])[None], torch.as_tensor(obs["token_mask"] > 0.5)[None]
        )
        enc = tokenizer([examples[index].source], return_tensors="pt")
        with torch.no_grad():
            deployed = policy(**observation_inputs(rt.observe(enc["input_ids"], enc["attention_mask"].bool())))
        n = int(obs["token_mask"].sum())
        torch.testing.assert_close(deployed[0], trained[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(deployed[1][:, :n], trained[1][:, :n], rtol=1e-4, atol=1e-5)


def test_margin_shapes_the_reward_only(model, tokenizer, task, examples):
    """With ``margin = m`` the reward sees quality x min(1, g / min(m, g_full)); infos keep the quality as scored."""
    from rlskip.constraints import Lexicographic

    lex = Lexicographic(max_quality_drop=0.01, penalty=50.0)
    kw = dict(num_envs=8, max_source_tokens=MAX_SRC, max_new_tokens=MAX_NEW, fidelity="exact_match", seed=4, constraint=lex)
    plain = SkipVecEnv(model, tokenizer, task, examples, **kw)
    shaped = SkipVecEnv(model, tokenizer, task, examples, margin=100.0, **kw)
    rng = np.random.default_rng(0)
    changed = 0
    for _ in range(4):
        plain.reset()
        shaped.reset()
        actions = (rng.random((8, plain.action_space.n)) < 0.95).astype(np.int8)
        _, r0, _, i0 = plain.step(actions)
        _, r1, _, i1 = shaped.step(actions)
        q = np.array([i["quality"] for i in i1])
        assert q.tolist() == [i["quality"] for i in i0]
        g = np.array([i["margin"] for i in i1])
        assert g.tolist() == [i["margin"] for i in i0] and np.isfinite(g).all() and (g >= 0).all()
        g_full = np.array([shaped.full_outputs[i["index"]].margin for i in i1])
        qf = np.array([i["quality_full"] for i in i1])
        cost = np.array([i["cost"] for i in i1])
        np.testing.assert_allclose(r0, lex.reward(q, qf, cost), rtol=1e-6)
        np.testing.assert_allclose(r1, lex.reward(q * np.minimum(1.0, g / np.minimum(100.0, g_full)), qf, cost), rtol=1e-6)
        changed += int((r1 < r0 - 1e-6).sum())
        assert (r1 <= r0 + 1e-6).all()  # shaping only ever takes quality away
    assert changed > 0, "some correct outputs should have been decoded with less than the margin to spare"
    # the full model's own margin is cached with its output, and its outputs keep all of their quality
    assert all(np.isfinite(f.margin) for f in shaped.full_outputs.values())


def test_margin_errors(model, tokenizer, task, examples):
    with pytest.raises(ValueError, match="margin must be a finite number >= 0"):
        make_env(model, tokenizer, task, examples, margin=-1.0)
    with pytest.raises(ValueError, match="needs num_beams=1"):
        make_env(model, tokenizer, task, examples, margin=1.0, gen_kwargs={"num_beams": 2})
