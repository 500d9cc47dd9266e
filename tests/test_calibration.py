"""Threshold calibration: the confidence bound on the quality drop, the held-out calibration slice."""

from __future__ import annotations

import pytest
from scipy.stats import binomtest

from rlskip import calibration
from rlskip.calibration import calibrate_threshold, drop_upper_bound
from rlskip.config import compose
from rlskip.constraints import Lexicographic
from rlskip.evaluation import MethodResult
from rlskip.envs.data import split_calibration


@pytest.mark.parametrize("k, n", [(0, 512), (1, 512), (3, 1024), (10, 200)])
@pytest.mark.parametrize("confidence", [0.8, 0.9, 0.95])
def test_binary_drops_give_the_clopper_pearson_bound(k, n, confidence):
    """0/1 outcomes (exact match): the bound is scipy's exact one-sided interval for k failures in n."""
    full = [1.0] * n
    quality = [0.0] * k + [1.0] * (n - k)
    two_sided = binomtest(k, n).proportion_ci(confidence_level=2 * confidence - 1, method="exact")
    assert drop_upper_bound(full, quality, confidence) == pytest.approx(two_sided.high, rel=1e-6)


def test_bound_is_above_the_mean_and_shrinks_with_more_data():
    for n in (100, 1000):
        full, quality = [1.0] * n, [0.0] * (n // 100) + [1.0] * (n - n // 100)  # 1% wrong
        assert drop_upper_bound(full, quality, 0.9) > 0.01
    small = drop_upper_bound([1.0] * 100, [0.0] + [1.0] * 99, 0.9)
    large = drop_upper_bound([1.0] * 1000, [0.0] * 10 + [1.0] * 990, 0.9)
    assert large < small
    # a single failure in 512 is not evidence of a rate below 1%... 2 failures are evidence of more than 1%
    assert drop_upper_bound([1.0] * 512, [0.0] + [1.0] * 511, 0.9) < 0.01 < drop_upper_bound([1.0] * 512, [0.0] * 2 + [1.0] * 510, 0.9)


def test_instances_the_policy_fixes_count_for_it():
    base = drop_upper_bound([1.0] * 100, [0.0] + [1.0] * 99, 0.9)
    fixed = drop_upper_bound([1.0] * 99 + [0.0], [0.0] + [1.0] * 99, 0.9)  # one instance only the policy gets right
    assert fixed == pytest.approx(base - 0.01)


def test_many_flips_both_ways_take_the_paired_t_bound():
    """60 failures and 70 fixes in 917: the net drop's spread comes from both counts, not the failures alone."""
    from scipy.stats import ttest_1samp

    n, fails, fixes = 917, 60, 70
    full = [1.0] * fails + [0.0] * fixes + [1.0] * (n - fails - fixes)
    pol = [0.0] * fails + [1.0] * fixes + [1.0] * (n - fails - fixes)
    b = drop_upper_bound(full, pol, 0.95)
    drops = [f - p for f, p in zip(full, pol)]
    assert ttest_1samp(drops, b, alternative="less").pvalue == pytest.approx(0.05, rel=1e-6)
    failures_only = drop_upper_bound([1.0] * n, [0.0] * fails + [1.0] * (n - fails), 0.95) - fixes / n
    assert b > failures_only + 0.003  # the old bound, fixes taken as known: about half a point tighter


def test_graded_quality_gets_the_paired_t_bound_and_bad_confidence_is_refused():
    from scipy.stats import ttest_1samp

    rng = __import__("random").Random(0)
    full = [rng.uniform(0.1, 0.5) for _ in range(200)]
    pol = [f - rng.gauss(0.004, 0.05) for f in full]
    b = drop_upper_bound(full, pol, 0.95)
    drops = [f - p for f, p in zip(full, pol)]
    mean = sum(drops) / len(drops)
    # scipy's one-sided test: at the bound, "mean drop < bound" is rejected at exactly 5%
    assert ttest_1samp(drops, b, alternative="less").pvalue == pytest.approx(0.05, rel=1e-6)
    assert mean < b < mean + 0.02 and drop_upper_bound(full, pol, 0.5) == pytest.approx(mean)
    for bad in (0.4, 1.0):
        with pytest.raises(ValueError, match=r"confidence must be in \[0.5, 1\)"):
            drop_upper_bound([1.0], [1.0], bad)
    with pytest.raises(ValueError, match="at least one instance"):
        drop_upper_bound([], [], 0.9)


def _fake_runs(monkeypatch, outcome):
    """Calibration without a model: ``outcome(threshold)`` -> MethodResult; returns the thresholds run, in order."""
    ran = []
    monkeypatch.setattr(calibration, "full_model", lambda space: "full")
    monkeypatch.setattr(calibration, "policy_plans", lambda policy, space, t, budget=None: t)

    class Runner:
        def __init__(self, ex, task, data):
            pass

        def __call__(self, source):
            if source != "full":
                ran.append(source)
            return outcome(source)

    monkeypatch.setattr(calibration, "PlanRunner", Runner)
    return ran


class _Ex:
    space = None


def _result(k, f, n=512):
    per = [0.0] * k + [1.0] * (n - k)
    return MethodResult(quality=sum(per) / n, flops_ratio=f, per_item=per, per_item_flops_ratio=[f] * n, predictions=[])


def test_calibration_picks_the_cheapest_threshold_whose_bound_holds(monkeypatch):
    """Failures per threshold on 512 instances: 0.5 -> 8, 0.2 -> 2, 0.1 -> 1, 0.05 -> 0. The mean drop is
    within 1% from 0.5 on, but only at 0.1 does the 90% bound fall below 1%."""
    fails = {0.5: 8, 0.2: 2, 0.1: 1, 0.05: 0}
    flops = {0.5: 0.4, 0.2: 0.45, 0.1: 0.5, 0.05: 0.6}
    _fake_runs(monkeypatch, lambda s: _result(0, 1.0) if s == "full" else _result(fails[s], flops[s]))
    t, table = calibrate_threshold(_Ex(), None, None, None, Lexicographic(0.01), thresholds=tuple(fails))
    assert t == 0.1
    assert {row["threshold"]: row["satisfied"] for row in table} == {0.2: False, 0.1: True, 0.05: True}
    assert [row["threshold"] for row in table] == sorted((row["threshold"] for row in table), reverse=True)
    assert table[0]["quality_full"] - table[0]["quality"] <= 0.01  # the mean alone would pass 0.2
    # at confidence 0.5 (about the point estimate) the cheaper threshold passes
    t, _ = calibrate_threshold(_Ex(), None, None, None, Lexicographic(0.01), thresholds=tuple(fails), confidence=0.5)
    assert t == 0.2


@pytest.mark.parametrize("boundary", [0, 1, 17, 59, 70, 80, 100, 130, -2, -1])
def test_calibration_bisects_the_grid_in_a_few_runs(monkeypatch, boundary):
    """On the default grid (from about 1e-9 to 1 - 1e-9, logit steps of 0.1 near 0.5) the search finds the
    last passing threshold, whatever its place, in at most 9 runs of the calibration set; when even the safest
    fails it returns the safest."""
    grid = calibration.THRESHOLDS
    assert 1 - 1e-8 < max(grid) < 1 and 0 < min(grid) < 1e-8 and len(grid) < 256
    near = [g for g in grid if 0.4 <= g <= 0.6]
    assert len(near) >= 8 and max(b - a for a, b in zip(near, near[1:])) < 0.03
    ran = _fake_runs(monkeypatch, lambda s: _result(0, 1.0) if s == "full" else _result(0 if s <= grid[boundary] else 20, s))
    t, table = calibrate_threshold(_Ex(), None, None, None, Lexicographic(0.01))
    assert t == grid[boundary] and len(ran) <= 9 and len(set(ran)) == len(ran)
    ran = _fake_runs(monkeypatch, lambda s: _result(0, 1.0) if s == "full" else _result(20, s))
    assert calibrate_threshold(_Ex(), None, None, None, Lexicographic(0.01))[0] == min(grid) and len(ran) == 1


def test_budget_calibration_bisects_for_the_most_conservative_threshold_within_budget(monkeypatch):
    """A fixed budget: FLOPs fall as the threshold rises; the answer is the lowest threshold within budget."""
    from rlskip.constraints import Budget

    grid = calibration.THRESHOLDS
    ratio = {t: 1.0 - i / len(grid) for i, t in enumerate(grid)}  # 1.0 at the bottom, falling
    ran = _fake_runs(monkeypatch, lambda s: _result(0, 1.0) if s == "full" else _result(0, ratio[s]))
    t, _ = calibrate_threshold(_Ex(), None, None, None, Budget(0.6))
    assert t == min(g for g in grid if ratio[g] <= 0.6) and len(ran) <= 9
    t, _ = calibrate_threshold(_Ex(), None, None, None, Budget(0.001))  # no threshold fits: the strictest
    assert t == max(grid)


def test_calibration_instances_are_held_out_of_training():
    data = list(range(100))
    train, calib = split_calibration(data, 10)
    assert calib == list(range(90, 100)) and train == list(range(90))
    train, calib = split_calibration(data[:20], 10)  # at most a quarter
    assert len(calib) == 5 and not set(train) & set(calib)
    with pytest.raises(ValueError, match="calibration needs held-out training instances"):
        split_calibration(data[:3], 10)


def test_calibration_confidence_is_validated_at_compose():
    with pytest.raises(ValueError, match=r"eval.calibration_confidence=1.0, expected a value in \[0.5, 1\)"):
        compose(["eval.calibration_confidence=1.0"])


def test_plan_runner_observes_once_and_runs_each_distinct_set_of_plans_once(tiny_bart, bart_tokenizer):
    from rlskip.calibration import PlanRunner
    from rlskip.encoding import Encoder
    from rlskip.evaluation import EvalData
    from rlskip.execute import Executor
    from rlskip.methods import full_model, static_plan
    from rlskip.runtime import get_runtime

    import torch

    class Task:
        def score(self, preds, examples):
            return [float(len(p) > 0) for p in preds]

    ex = Executor(get_runtime(tiny_bart), Encoder(bart_tokenizer, 32), "generation", {"max_new_tokens": 4})
    runs = []
    run_once = ex.run
    ex.run = lambda *a, **k: runs.append(1) or run_once(*a, **k)
    data = EvalData.encode(ex, ["a first input", "and a second one", "third"])
    runner = PlanRunner(ex, Task(), data, batch_size=2)
    full = runner(full_model(ex.space))
    assert runner(full_model(ex.space)) is full and len(runs) == 2  # two batches, executed once
    skip = torch.ones(ex.space.n_bits, dtype=torch.bool)
    skip[0] = False
    other = runner(static_plan(ex.space, skip))
    assert len(runs) == 4 and other.flops_ratio < full.flops_ratio
    # a source whose plans differ from the full model's in one row runs that row alone, and scores as a fresh run
    from rlskip.plan import Plan

    rows_run = []
    counted = ex.run
    ex.run = lambda obs, plan, *a, **k: rows_run.append(plan.bits.shape[0]) or counted(obs, plan, *a, **k)

    def one_row_skips(obs):
        bits = torch.ones(obs.batch_size, ex.space.n_bits, dtype=torch.bool)
        if obs.batch_size == 2:
            bits[1, 1] = False  # a plan no source has run yet
        return Plan(ex.space, bits), torch.zeros(obs.batch_size, dtype=torch.float64)

    mixed = runner(one_row_skips)
    assert rows_run == [1]  # only that row: the other rows' plans (all ones) ran before
    fresh = PlanRunner(ex, Task(), data, batch_size=2)(one_row_skips)
    assert mixed.per_item == fresh.per_item and mixed.per_item_flops_ratio == fresh.per_item_flops_ratio


def test_modal_plan_is_the_most_frequent_plan_and_its_share(tiny_bart, bart_tokenizer):
    from rlskip.encoding import Encoder
    from rlskip.evaluation import EvalData, modal_plan
    from rlskip.execute import Executor
    from rlskip.plan import Plan
    from rlskip.runtime import get_runtime

    import torch

    ex = Executor(get_runtime(tiny_bart), Encoder(bart_tokenizer, 32), "generation", {"max_new_tokens": 4})
    data = EvalData.encode(ex, ["one", "two inputs", "three", "four", "the fifth input"])
    n = ex.space.n_bits
    a, b = torch.ones(n, dtype=torch.bool), torch.ones(n, dtype=torch.bool)
    a[0], b[1] = False, False
    seen = []

    def source(obs):  # plan b for every third instance overall, plan a for the others
        rows = torch.arange(len(seen), len(seen) + obs.batch_size)
        seen.extend(rows.tolist())
        bits = torch.where((rows % 3 == 2)[:, None], b, a)
        return Plan(ex.space, bits), torch.zeros(obs.batch_size)

    bits, share = modal_plan(ex, data, source, batch_size=2)  # batches of 2, 2 and 1: a modal count over all of them
    assert torch.equal(bits, a) and share == pytest.approx(4 / 5) and len(seen) == 5

    def drops_a_token(obs):
        keep = obs.attention_mask.clone()
        keep[0, 1] = False  # a real token of the first instance (BOS is at 0)
        return Plan(ex.space, torch.ones(obs.batch_size, n, dtype=torch.bool), keep), torch.zeros(obs.batch_size)

    assert modal_plan(ex, data, drops_a_token) is None
    keep_all = lambda obs: (Plan(ex.space, torch.ones(obs.batch_size, n, dtype=torch.bool), obs.attention_mask.clone()), torch.zeros(obs.batch_size))  # noqa: E731
    bits, share = modal_plan(ex, data, keep_all)  # a keep-mask that keeps every token is still one static plan
    assert bool(bits.all()) and share == 1.0
