"""The measured time model (env.cost=time): predicted time ratios against the FLOPs path, the fit, the reward
it feeds, and a training run that prices plans with it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from rlskip.constraints import Lexicographic
from rlskip.cost import TimeModel, measure_time_model
from rlskip.envs import SkipVecEnv
from rlskip.envs.tasks import get_task
from rlskip.envs.tasks.synthetic import synthetic_tokenizer
from rlskip.plan import Plan

from test_envs import MAX_NEW, MAX_SRC, model  # noqa: F401  (the environments' tiny BART fixture)


@pytest.fixture(scope="module")
def env(model):
    task = get_task("synthetic", n_train=40, n_eval=10)
    return SkipVecEnv(
        model, synthetic_tokenizer(), task, task.load("train"), num_envs=8, max_source_tokens=MAX_SRC,
        max_new_tokens=MAX_NEW, seed=3, constraint=Lexicographic(max_quality_drop=0.01, penalty=50.0),
    )


def _unit(space) -> TimeModel:
    return TimeModel(1.0, {c.kind: 1.0 for c in space.skippable})


def test_unit_rates_give_the_flops_ratio(env):
    """Every FLOP priced the same: the predicted time ratio is the runtime's own FLOPs ratio, token dropping,
    per-instance lengths and decoded steps included."""
    ex, rt = env.rollout.executor, env.rollout.runtime
    obs = ex.observe(env.rollout.source_ids[:8])
    g = torch.Generator().manual_seed(1)
    bits = torch.rand(8, rt.space.n_bits, generator=g) < 0.6
    keep = torch.rand(obs.input_ids.shape, generator=g) < 0.7
    out = ex.run(obs, Plan(rt.space, bits, keep), 1000.0)
    tm = _unit(rt.space)
    ratio = tm.ratio(rt, bits, obs.lengths, out.input_kept, out.steps, 1, 1000.0)
    torch.testing.assert_close(ratio, out.flops_ratio, rtol=1e-12, atol=0)
    assert (ratio < 1).all()
    ones = torch.ones_like(bits)
    assert torch.equal(tm.ratio(rt, ones, obs.lengths, None, out.steps), torch.ones(8, dtype=torch.float64))


def test_rates_price_each_kind(env):
    """A free kind costs nothing when skipped; with every candidate skipped only the fixed part is left."""
    rt = env.rollout.runtime
    space = rt.space
    kinds = {c.kind: 1.0 for c in space.skippable}
    tm = TimeModel(2.0, {**kinds, "enc_ffn": 0.0})
    lengths, steps = torch.tensor([10.0, 20.0]), torch.tensor([3, 5])
    bits = torch.ones(2, space.n_bits, dtype=torch.bool)
    bits[:, space.bits_of_kind("enc_ffn")] = False
    assert torch.equal(tm.ratio(rt, bits, lengths, None, steps), torch.ones(2, dtype=torch.float64))
    fixed, per = rt.flops_table(lengths.double(), lengths.double(), steps)
    rates = torch.tensor([tm.kinds[c.kind] for c in space.skippable], dtype=torch.float64)
    expected = 2 * fixed / (2 * fixed + (per * rates).sum(1))
    torch.testing.assert_close(tm.ratio(rt, torch.zeros_like(bits), lengths, None, steps), expected)
    with pytest.raises(ValueError, match="no rate for candidate kind"):
        TimeModel(1.0, {}).rates(space)


def test_measure_fits_every_kind_and_round_trips(env):
    ex = env.rollout.executor
    obs = ex.observe(env.rollout.source_ids[:8])
    tm = measure_time_model(ex, obs, MAX_NEW, repeats=3)
    space = env.rollout.space
    assert set(tm.kinds) == {c.kind for c in space.skippable}
    assert tm.fixed >= 0.05 and all(v >= 0.05 for v in tm.kinds.values())
    assert 0.2 < tm.fit["predicted_over_measured_all_ones"] < 5
    assert set(tm.fit["seconds"]) == {"all", "none", *tm.kinds}
    back = TimeModel.from_dict(json.loads(json.dumps(tm.to_dict())))
    assert back == tm and back.fit == tm.fit
    with pytest.raises(ValueError, match="not a time model"):
        TimeModel.from_dict({"kinds": {}})


def test_the_reward_sees_the_predicted_time(model, env):
    """With a time model the reward's cost is the predicted time ratio; infos keep the FLOPs ratio, which is
    what the same actions give without one."""
    space = env.rollout.space
    task = env.rollout.task
    plain = SkipVecEnv(
        model, synthetic_tokenizer(), task, env.rollout.examples, num_envs=8, max_source_tokens=MAX_SRC,
        max_new_tokens=MAX_NEW, seed=3, constraint=env.constraint,
    )
    tm = TimeModel(1.0, {**{c.kind: 1.0 for c in space.skippable}, "dec_ffn": 3.0, "enc_attn": 0.0})
    env.rollout.time_model = tm
    try:
        rng = np.random.default_rng(0)
        env.reset()
        plain.reset()
        actions = (rng.random((8, env.action_space.n)) < 0.6).astype(np.int8)
        _, r, _, infos = env.step(actions)
        _, r0, _, infos0 = plain.step(actions)
    finally:
        env.rollout.time_model = None
    flops = np.array([i["flops_ratio"] for i in infos])
    cost = np.array([i["cost"] for i in infos])
    assert [i["time_ratio"] for i in infos] == cost.tolist()
    np.testing.assert_allclose(flops, [i["cost"] for i in infos0], rtol=1e-12)
    assert "time_ratio" not in infos0[0] and [i["flops_ratio"] for i in infos0] == [i["cost"] for i in infos0]
    assert np.abs(cost - flops).max() > 0.01  # the rates moved the cost
    q, qf = np.array([i["quality"] for i in infos]), np.array([i["quality_full"] for i in infos])
    np.testing.assert_allclose(r, env.constraint.reward(q, qf, cost), rtol=1e-6)  # the vec env returns float32


def test_cost_max_prices_a_plan_by_the_larger_of_its_time_and_its_flops(env):
    """``env.cost=max``: the reward's cost is the larger of the predicted time ratio and the FLOPs ratio, row by
    row; infos still report each of the two."""
    space = env.rollout.space
    # FFNs cost three times their FLOPs, encoder attention nothing: some plans' time is above their FLOPs, some below
    tm = TimeModel(1.0, {**{c.kind: 1.0 for c in space.skippable}, "dec_ffn": 3.0, "enc_attn": 0.0})
    env.rollout.time_model, env.rollout.cost_max = tm, True
    try:
        rng = np.random.default_rng(1)
        env.reset()
        _, r, _, infos = env.step((rng.random((8, env.action_space.n)) < 0.5).astype(np.int8))
    finally:
        env.rollout.time_model, env.rollout.cost_max = None, False
    flops, time_, cost = (np.array([i[k] for i in infos]) for k in ("flops_ratio", "time_ratio", "cost"))
    np.testing.assert_array_equal(cost, np.maximum(flops, time_))
    assert (time_ > flops + 0.01).any() and (flops > time_ + 0.01).any()  # both sides of the max occur
    q, qf = np.array([i["quality"] for i in infos]), np.array([i["quality_full"] for i in infos])
    np.testing.assert_allclose(r, env.constraint.reward(q, qf, cost), rtol=1e-6)


def test_a_run_prices_plans_with_its_measured_time_model(tmp_path):
    """``env.cost=time``: the model is measured once, saved beside the run and in its summary, and the learner
    logs the predicted time ratio beside the FLOPs ratio."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from rlskip.train import main
    from test_train import TINY

    run = tmp_path / "run"
    assert main(TINY + ["env.cost=time", "agent.policies=1", f"run_dir={run}"]) == 0
    saved = json.loads((run / "time_model.json").read_text())
    summary = json.loads((run / "summary.json").read_text())
    assert summary["time_model"] == saved
    assert set(saved["kinds"]) == {"enc_attn", "enc_ffn", "dec_self_attn", "dec_cross_attn", "dec_ffn"}
    assert saved["fit"]["new_tokens"] == 30 and saved["fit"]["rows"] == 4  # eval.latency_batch rows, env.max_new_tokens
    ea = EventAccumulator(str(run / "tb"), size_guidance={"images": 0, "tensors": 0}).Reload()
    flops, time_ = ([e.value for e in ea.Scalars(tag)] for tag in ("cost/flops_ratio", "cost/time_ratio"))
    assert len(flops) == len(time_) == 4 and flops != time_


def test_a_resumed_run_reads_its_time_model_back(tmp_path):
    """Resuming prices plans as the run did before: the saved model, not a new measurement."""
    from rlskip.distributed import Dist
    from rlskip.train import time_model_for

    tm = TimeModel(1.5, {"attn": 0.5, "ffn": 0.9}, {"rows": 16})
    (tmp_path / "time_model.json").write_text(json.dumps(tm.to_dict()))
    back = time_model_for(None, tmp_path, None, None, Dist())  # nothing to measure with: it must not try
    assert back == tm and back.fit == {"rows": 16}
    (tmp_path / "time_model.json").write_text('{"fixed": 1.5')  # cut short
    with pytest.raises(ValueError, match=r"time_model.json cannot be read back \(.*\); restore it or start a new run"):
        time_model_for(None, tmp_path, None, None, Dist())
    assert (tmp_path / "time_model.json").read_text() == '{"fixed": 1.5'  # left as it was


@pytest.mark.parametrize("case_id", ["llama-tiny", "t5-v1_1-tiny", "bert-tiny"])
def test_unit_rates_give_the_flops_ratio_in_every_family(case_id):
    """The time model reads each family's FLOPs table the way the runtime does: with every rate equal, its
    ratio is the runtime's FLOPs ratio (decoder-only with token dropping, encoder-decoder, classifier)."""
    import families
    import families.bert  # noqa: F401  (registers its cases)
    import families.llama  # noqa: F401
    import families.t5  # noqa: F401
    from rlskip.runtime import get_runtime

    case = families.CASES[case_id]
    rt = get_runtime(case.model)
    g = torch.Generator().manual_seed(2)
    bits = torch.rand(6, rt.space.n_bits, generator=g) < 0.5
    lengths = torch.tensor([5, 9, 12, 7, 16, 3])
    kept = torch.minimum(lengths, torch.tensor([4, 9, 6, 7, 10, 3]))
    steps = None if case.head == "classifier" else torch.tensor([1, 4, 9, 2, 6, 3])
    executed, full = rt.flops(Plan(rt.space, bits), lengths, kept, steps)
    ratio = _unit(rt.space).ratio(rt, bits, lengths, kept, steps)
    torch.testing.assert_close(ratio, executed / full, rtol=1e-12, atol=0)
