"""Calibrating the decision threshold of a policy on held-out instances, with a confidence bound on the drop.

Training optimises sampled plans; deployment keeps a unit where ``sigmoid(logit) >= threshold``. On calibration
instances (held out of training and of the evaluation set), :func:`calibrate_threshold` picks the cheapest
threshold whose quality drop, taken at a one-sided upper confidence bound (:func:`drop_upper_bound`), satisfies
the run's constraint. A higher threshold keeps a subset of what a lower one keeps, so the drop grows with the
threshold up to sampling noise, and the threshold is found by bisection over a grid (a few runs of the
calibration set instead of one per grid point).

Many thresholds give the very same plans (a trained policy's logits are saturated), so the instances are
observed once and each instance is executed once per distinct plan it gets (:class:`PlanRunner`), split over the
ranks of a data-parallel job.
"""

from __future__ import annotations

import hashlib
import math
from typing import Sequence

import numpy as np
import torch

from rlskip.constraints import Budget
from rlskip.distributed import current, gather
from rlskip.evaluation import EvalData, MethodResult, score_outputs
from rlskip.execute import Executor
from rlskip.methods import PlanSource, budget_plans, full_model, policy_plans
from rlskip.plan import Plan

# keep thresholds calibration chooses from: 0.5 and then 1.4x apart down to 1e-9, mirrored above 0.5 up to
# 1 - 1e-9, and logits -2 to 2 in steps of 0.1 between. A policy trained long enough has saturated logits: its
# cheapest safe threshold can lie far below 0.001, and the plans it makes for a low requested budget may need a
# threshold far above 0.999 to skip enough. One trained briefly has logits near 0, where the plans change most
# between neighbouring thresholds.
_LOW = {float(f"{0.5 / 1.4**k:.3g}") for k in range(60)}
_NEAR = {float(f"{1.0 / (1.0 + math.exp(-k / 10)):.4g}") for k in range(-20, 21)}
THRESHOLDS = tuple(sorted(_LOW | {1.0 - x for x in _LOW if x < 0.5} | _NEAR))


def drop_upper_bound(quality_full: Sequence[float], quality: Sequence[float], confidence: float) -> float:
    """One-sided upper confidence bound on the mean per-instance quality drop ``quality_full - quality``.

    **0/1 quality** (exact match, accuracy): a drop is a failure (1), a fix (-1) or neither. The failures' count
    ``k`` over ``n`` instances is bounded by the Clopper-Pearson bound ``Beta(confidence; k + 1, n - k)``, and that
    bound is the mean drop plus its margin over the failure rate, so instances the policy gets right where the
    full model fails still count for it. Unlike a normal approximation, it stays honest when failures are rare:
    1 failure in 512 instances bounds the rate at 0.76% at confidence 0.9, not 0.45%. But it takes the fixes'
    rate as known, which it is not: a policy that flips many labels both ways (60 failures and 70 fixes in 917)
    nets a drop whose spread comes from both counts. The returned bound is therefore the larger of that one and
    the paired ``t`` bound below on the same per-instance drops (-1, 0, 1), which counts both.

    **Graded quality** (ROUGE, F1): drops of either sign on many instances, of which a count says nothing; the
    bound is Student's one-sided ``t`` bound on the mean of the paired drops, ``mean + t(confidence, n - 1) *
    sd / sqrt(n)``.
    """
    from scipy.stats import beta, t

    if not 0.5 <= confidence < 1.0:
        raise ValueError(f"calibration confidence must be in [0.5, 1), got {confidence}")
    q_full = torch.tensor(quality_full, dtype=torch.float64)
    q = torch.tensor(quality, dtype=torch.float64)
    d = q_full - q
    n = d.numel()
    if n == 0:
        raise ValueError("calibration needs at least one instance")
    paired = float(d.mean() + t.ppf(confidence, n - 1) * d.std(unbiased=True) / n**0.5) if n > 1 else None
    binary = bool(((q_full == 0) | (q_full == 1)).all() and ((q == 0) | (q == 1)).all())
    if not binary:
        return paired if paired is not None else float(d.mean()) + (1.0 if confidence > 0.5 else 0.0)
    pos = d.clamp(0.0, 1.0)
    k = float(pos.sum())
    upper = 1.0 if k >= n else float(beta.ppf(confidence, k + 1.0, n - k))
    clopper = float(d.mean()) + upper - float(pos.mean())
    # one instance has no spread to estimate: Clopper-Pearson's bound alone; a 0/1 drop is at most 1
    return clopper if paired is None else min(1.0, max(clopper, paired))


class PlanRunner:
    """Runs plan sources over fixed instances: observed once, each distinct set of plans scored once, and each
    instance executed once per distinct plan of its own: a source whose plans differ from an earlier one's in a
    few rows runs only those rows (the runtime gives a row in any batch what it gives it alone). In a
    data-parallel job each rank runs every ``world``-th batch and the outputs are gathered."""

    def __init__(self, ex: Executor, task, data: EvalData, batch_size: int = 64) -> None:
        self.ex, self.task, self.examples, self.dist = ex, task, data.examples, current()
        batches = list(data.batches(batch_size))
        self.mine = list(range(self.dist.rank, len(batches), self.dist.world))
        self.batches = [ex.observe(batches[i][1]) for i in self.mine]
        self._done: dict[str, MethodResult] = {}
        self._rows: dict[tuple[int, int, bytes], tuple] = {}  # (batch, row, its plan and cost) -> (prediction, FLOPs ratio)

    def _run_batch(self, i: int, obs, plan: Plan, cost: torch.Tensor) -> tuple[list, list[float]]:
        """One batch's predictions and FLOPs ratios, executing only the rows whose plan was not run before."""
        keep = plan.token_keep
        keys = [
            plan.bits[r].numpy().tobytes() + (b"-" if keep is None else keep[r].numpy().tobytes()) + cost[r].numpy().tobytes()
            for r in range(plan.bits.shape[0])
        ]
        todo = [r for r, k in enumerate(keys) if (i, r, k) not in self._rows]
        if todo:
            whole = len(todo) == len(keys)
            out = self.ex.run(obs if whole else obs.rows(todo), plan if whole else plan.rows(todo), cost if whole else cost[todo])
            for r, pred, ratio in zip(todo, out.predictions, out.flops_ratio.tolist()):
                self._rows[(i, r, keys[r])] = (pred, ratio)
        rows = [self._rows[(i, r, k)] for r, k in enumerate(keys)]
        return [p for p, _ in rows], [f for _, f in rows]

    def __call__(self, source: PlanSource) -> MethodResult:
        decided = [source(obs) for obs in self.batches]
        key = hashlib.sha256()
        for plan, cost in decided:
            key.update(plan.bits.numpy().tobytes())
            key.update(b"-" if plan.token_keep is None else plan.token_keep.numpy().tobytes())
            key.update(cost.numpy().tobytes())
        key = gather(key.hexdigest(), self.dist)  # each rank's plans: the set is run once when all are known
        key = "/".join(key)
        if key not in self._done:
            outs = {}
            for i, obs, (plan, cost) in zip(self.mine, self.batches, decided):
                outs[i] = self._run_batch(i, obs, plan, torch.as_tensor(cost, dtype=torch.float64).reshape(-1).expand(plan.bits.shape[0]))
            merged = {i: o for part in gather(outs, self.dist) for i, o in part.items()}
            preds = [p for i in sorted(merged) for p in merged[i][0]]
            ratios = [r for i in sorted(merged) for r in merged[i][1]]
            self._done[key] = score_outputs(self.task, self.examples, preds, ratios)
        return self._done[key]


def calibrate_threshold(
    ex: Executor, task, data: EvalData, policy, constraint, thresholds: Sequence[float] = THRESHOLDS,
    budget: float | None = None, confidence: float = 0.95,
) -> tuple[float, list[dict]]:
    """The decision threshold at which the policy's deterministic plans satisfy the run's constraint.

    Lower thresholds keep more. Returns the cheapest threshold whose outcome satisfies ``constraint`` with the
    quality drop taken at its one-sided upper confidence bound (:func:`drop_upper_bound` at ``confidence``): a
    threshold that only just passes on the calibration sample would fail on new data about half the time. For
    a budget constraint, the most conservative threshold within the budget. If none qualifies, the safest
    threshold (for quality the lowest, for a budget the highest). Found by bisection over the sorted
    ``thresholds``, taking the outcome as monotone in the threshold (plans are nested). A budget-conditioned
    policy is calibrated at ``budget``. Returns ``(threshold, table)``: one row per threshold tried, highest
    first.
    """
    run = PlanRunner(ex, task, data)
    full = run(full_model(ex.space))
    table = []

    def ok(t: float) -> bool:
        r = run(policy_plans(policy, ex.space, t, budget))
        drop_ucb = drop_upper_bound(full.per_item, r.per_item, confidence)
        # the handlers judge quality through the drop quality_full - quality: hand them a pair in [0, 1]
        # whose drop is the bound (|bound| <= 1)
        q, qf = max(0.0, -drop_ucb), max(0.0, drop_ucb)
        passed = bool(constraint.satisfied(np.array([q]), np.array([qf]), np.array([r.flops_ratio]))[0])
        table.append({
            "threshold": t, "quality": r.quality, "quality_full": full.quality, "drop_upper_bound": drop_ucb,
            "flops_ratio": r.flops_ratio, "satisfied": passed,
        })
        return passed

    # from the safe end: for quality the lowest threshold (keeps the most), for a budget the highest (keeps the
    # least); if even that fails, it is returned
    order = sorted(thresholds, reverse=isinstance(constraint, Budget))
    last = _last_passing(len(order), lambda i: ok(order[i]))
    return order[0 if last is None else last], _by_threshold(table)


def _last_passing(n: int, passes) -> int | None:
    """Bisection over indices ``0 .. n - 1`` ordered from the safe end: the last index for which ``passes``
    holds, taking it as true up to some index and false after; None when index 0 already fails."""
    if not passes(0):
        return None
    lo, hi = 0, n - 1  # index lo passes; find the last that does
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if passes(mid) else (lo, mid - 1)
    return lo


def _by_threshold(table: list[dict]) -> list[dict]:
    return sorted(table, key=lambda row: row["threshold"], reverse=True)


def flops_upper_bound(ratios: Sequence[float], confidence: float) -> float:
    """One-sided upper confidence bound (Student's ``t``) on the mean FLOPs ratio of per-instance ``ratios``."""
    from scipy.stats import t

    r = torch.tensor(ratios, dtype=torch.float64)
    if r.numel() < 2:
        return float(r.mean())
    return float(r.mean() + t.ppf(confidence, r.numel() - 1) * r.std(unbiased=True) / r.numel() ** 0.5)


def calibrate_budgets(
    ex: Executor, task, data: EvalData, policy, budgets: Sequence[float], thresholds: Sequence[float] = THRESHOLDS,
    confidence: float = 0.95,
) -> tuple[dict[float, float], list[dict]]:
    """Thresholds of a budget-conditioned policy, one per budget of the grid ``budgets``: at each, the most
    conservative threshold (keeping the most) whose plans' mean FLOPs ratio stays at or under the budget at the
    one-sided upper confidence bound (:func:`flops_upper_bound`), found by bisection (a higher threshold keeps
    less). Plans are nested as :func:`rlskip.methods.budget_plans` runs them, so the grid is calibrated from the
    highest budget down. A budget of 1 admits the full model (with the policy's own small cost on top). Returns
    ``({budget: threshold}, table)``; a budget no threshold meets gets the strictest."""
    run = PlanRunner(ex, task, data)
    full = run(full_model(ex.space))
    order = sorted(thresholds, reverse=True)  # from the safe end: the highest threshold keeps the least
    chosen: dict[float, float] = {}
    table = []
    for b in sorted(budgets, reverse=True):

        def outcome(i: int, b=b) -> tuple[bool, float, MethodResult]:  # PlanRunner runs a set of plans once
            r = run(budget_plans(policy, ex.space, {**chosen, b: order[i]}, b))
            bound = flops_upper_bound(r.per_item_flops_ratio, confidence)
            return bound <= b, bound, r

        if b >= 1.0:  # a budget of 1 admits the full model (the lowest threshold), with the decision's cost
            i, ok = len(order) - 1, True
        else:  # the lowest threshold whose plans meet the budget; the strictest when none does
            last = _last_passing(len(order), lambda i: outcome(i)[0])
            i, ok = (0, False) if last is None else (last, True)
        _, bound, r = outcome(i)
        chosen[b] = order[i]
        table.append({
            "budget": b, "threshold": order[i], "quality": r.quality, "quality_full": full.quality,
            "flops_ratio": r.flops_ratio, "flops_upper_bound": bound, "satisfied": ok,
        })
    return chosen, sorted(table, key=lambda row: row["budget"])
