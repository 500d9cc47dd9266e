"""Threshold calibration: the confidence bound on the quality drop, the held-out calibration slice."""

from __future__ import annotations

import pytest
from scipy.stats import binomtest

from rlskip import evaluation
from rlskip.config import compose
from rlskip.constraints import Lexicographic
from rlskip.evaluation import MethodResult, calibrate_threshold, drop_upper_bound
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


def test_graded_quality_and_bad_confidence():
    b = drop_upper_bound([0.5, 0.4, 0.6], [0.5, 0.3, 0.6], 0.9)
    assert 0.1 / 3 < b < 1.0
    for bad in (0.4, 1.0):
        with pytest.raises(ValueError, match=r"confidence must be in \[0.5, 1\)"):
            drop_upper_bound([1.0], [1.0], bad)
    with pytest.raises(ValueError, match="at least one instance"):
        drop_upper_bound([], [], 0.9)


def test_calibration_picks_the_cheapest_threshold_whose_bound_holds(monkeypatch):
    """Failures per threshold on 512 instances: 0.5 -> 8, 0.2 -> 2, 0.1 -> 1, 0.05 -> 0. The mean drop is
    within 1% from 0.5 on, but only at 0.1 does the 90% bound fall below 1%."""
    n, fails = 512, {0.5: 8, 0.2: 2, 0.1: 1, 0.05: 0}
    flops = {0.5: 0.4, 0.2: 0.45, 0.1: 0.5, 0.05: 0.6}

    def result(k, f):
        per = [0.0] * k + [1.0] * (n - k)
        return MethodResult(quality=sum(per) / n, flops_ratio=f, per_item=per, per_item_flops_ratio=[f] * n, predictions=[])

    monkeypatch.setattr(evaluation, "planned", lambda source: source)
    monkeypatch.setattr(evaluation, "full_model", lambda space: "full")
    monkeypatch.setattr(evaluation, "policy_plans", lambda policy, space, t, budget=None: t)
    monkeypatch.setattr(
        evaluation, "run_method", lambda ex, task, data, method: result(0, 1.0) if method == "full" else result(fails[method], flops[method])
    )

    class Ex:
        space = None

    t, table = calibrate_threshold(Ex(), None, None, None, Lexicographic(0.01), thresholds=tuple(fails))
    assert t == 0.1
    assert [row["satisfied"] for row in table] == [False, False, True]
    assert all(row["quality_full"] - row["quality"] <= 0.01 + 1e-12 for row in table[1:])  # the mean alone would pass 0.2
    # at confidence 0.5 (about the point estimate) the cheaper threshold passes
    t, _ = calibrate_threshold(Ex(), None, None, None, Lexicographic(0.01), thresholds=tuple(fails), confidence=0.5)
    assert t == 0.2


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
