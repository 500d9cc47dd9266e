"""Evaluating methods on task data: quality, FLOPs ratio, measured latency, static search, calibration.

Every method (:mod:`rlskip.methods`) runs on the same examples through the same executor
(:mod:`rlskip.execute`) with the same generation settings, so the numbers compare like with like. A *task*
is anything with ``kind`` and ``score(predictions, examples) -> [quality in [0, 1]]`` (the tasks of
:mod:`rlskip.envs.tasks`). Used by training (calibration and the final summary) and by
``python -m rlskip.evaluate``.
"""

from __future__ import annotations

import statistics
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from rlskip.constraints import Budget
from rlskip.execute import Executor
from rlskip.methods import Method, full_model, planned, policy_plans, static_plan


@dataclass
class EvalData:
    """Examples and their input ids, encoded once (:meth:`rlskip.encoding.Encoder.inputs`)."""

    examples: list
    rows: list[list[int]]

    @classmethod
    def encode(cls, ex: Executor, examples: Sequence[Any]) -> "EvalData":
        return cls(list(examples), ex.encoder.inputs(list(examples))[0])

    def __len__(self) -> int:
        return len(self.examples)

    def head(self, n: int) -> "EvalData":
        return EvalData(self.examples[:n], self.rows[:n])

    def batches(self, size: int):
        for i in range(0, len(self.rows), size):
            yield self.examples[i : i + size], self.rows[i : i + size]


@dataclass
class MethodResult:
    """Quality and cost of one method on a set of examples."""

    quality: float
    flops_ratio: float
    per_item: list[float] = field(default_factory=list)
    per_item_flops_ratio: list[float] = field(default_factory=list)
    predictions: list = field(default_factory=list)
    by_group: dict[str, float] = field(default_factory=dict)


def run_method(ex: Executor, task, data: EvalData, method: Method, batch_size: int = 64) -> MethodResult:
    """Run ``method`` over ``data`` in batches and score it with the task's metric."""
    preds, ratios = [], []
    for _, rows in data.batches(batch_size):
        out = method(ex, ex.observe(rows))
        preds += out.predictions
        ratios += out.flops_ratio.tolist()
    scores = task.score(preds, data.examples)
    groups: dict[str, list[float]] = defaultdict(list)
    for example, s in zip(data.examples, scores):
        if getattr(example, "group", None) is not None:
            groups[example.group].append(s)
    return MethodResult(
        quality=float(sum(scores) / len(scores)),
        flops_ratio=float(sum(ratios) / len(ratios)),
        per_item=list(scores),
        per_item_flops_ratio=ratios,
        predictions=preds,
        by_group={g: sum(v) / len(v) for g, v in sorted(groups.items())},
    )


def greedy_static_search(ex: Executor, task, data: EvalData, min_flops_ratio: float = 0.0) -> list[dict]:
    """The best static plans found greedily: drop, one at a time, the candidate whose removal costs the least
    quality on ``data`` (ties: the larger FLOPs saving). Returns the path, one entry per plan, from the full
    model down to ``min_flops_ratio``: ``{"bits", "flops_ratio", "quality"}``.
    """
    space = ex.space
    bits = torch.ones(space.n_bits, dtype=torch.bool)
    res = run_method(ex, task, data, planned(static_plan(space, bits)))
    path = [{"bits": bits.clone(), "flops_ratio": res.flops_ratio, "quality": res.quality}]
    while bits.any() and path[-1]["flops_ratio"] > min_flops_ratio:
        best = None
        for j in bits.nonzero().flatten().tolist():
            trial = bits.clone()
            trial[j] = False
            r = run_method(ex, task, data, planned(static_plan(space, trial)))
            key = (r.quality, -r.flops_ratio)
            if best is None or key > best[0]:
                best = (key, trial, r)
        _, bits, r = best
        path.append({"bits": bits.clone(), "flops_ratio": r.flops_ratio, "quality": r.quality})
    return path


def static_at(path: list[dict], flops_ratio: float) -> tuple[dict, dict]:
    """From a greedy path, the first static plan at or under ``flops_ratio`` and the one step before it (at
    least as costly): the static plans on both sides of a method's FLOPs."""
    i = next((k for k, p in enumerate(path) if p["flops_ratio"] <= flops_ratio), len(path) - 1)
    return path[i], path[max(i - 1, 0)]


def latency_ratio(ex: Executor, data: EvalData, method: Method, batch_size: int, repeats: int = 3) -> float:
    """Measured wall-clock of ``method`` over the full model on the same batches (observation and decisions
    included). Warm-up excluded; repeats alternate between the two so machine drift hits both alike; medians.
    """
    full = planned(full_model(ex.space))
    batches = [rows for _, rows in data.batches(batch_size)]

    def timed(m: Method) -> float:
        t0 = time.perf_counter()
        for rows in batches:
            m(ex, ex.observe(rows))
        return time.perf_counter() - t0

    timed(full), timed(method)  # warm-up
    t_full, t_method = [], []
    for _ in range(repeats):
        t_full.append(timed(full))
        t_method.append(timed(method))
    return statistics.median(t_method) / statistics.median(t_full)


# ---- threshold calibration ---------------------------------------------------------------------------
# keep thresholds tried by calibration: 0.5 and then 1.4x apart down to 1e-9. A policy trained long enough
# has saturated logits, and its cheapest safe threshold can lie far below 0.001; the sigmoid of any logit the
# policy produces in practice lies above the bottom, which keeps nearly everything.
THRESHOLDS = tuple(float(f"{0.5 / 1.4**k:.3g}") for k in range(60))


def drop_upper_bound(quality_full: Sequence[float], quality: Sequence[float], confidence: float) -> float:
    """One-sided upper confidence bound on the mean per-instance quality drop ``quality_full - quality``.

    Qualities lie in [0, 1], so the positive parts of the drops lie in [0, 1]; their sum ``k`` over ``n``
    instances is bounded like a count of failures, by the Clopper-Pearson bound ``Beta(confidence; k + 1,
    n - k)`` (exact for 0/1 outcomes such as exact match or accuracy; for graded quality such as ROUGE it
    treats the summed drops as a count, and Bernoulli outcomes are the most spread out [0, 1] values of a
    given mean). The returned bound is the mean drop plus that bound's margin over the mean positive part,
    so instances the policy gets right where the full model fails still count for it. Unlike a normal
    approximation, it stays honest when failures are rare: 1 failure in 512 instances bounds the rate at
    0.76% at confidence 0.9, not 0.45%.
    """
    from scipy.stats import beta

    if not 0.5 <= confidence < 1.0:
        raise ValueError(f"calibration confidence must be in [0.5, 1), got {confidence}")
    d = torch.tensor(quality_full, dtype=torch.float64) - torch.tensor(quality, dtype=torch.float64)
    n = d.numel()
    if n == 0:
        raise ValueError("calibration needs at least one instance")
    pos = d.clamp(0.0, 1.0)
    k = float(pos.sum())
    upper = 1.0 if k >= n else float(beta.ppf(confidence, k + 1.0, n - k))
    return float(d.mean()) + upper - float(pos.mean())


def calibrate_threshold(
    ex: Executor, task, data: EvalData, policy, constraint, thresholds: Sequence[float] = THRESHOLDS,
    budget: float | None = None, confidence: float = 0.95,
) -> tuple[float, list[dict]]:
    """The decision threshold at which the policy's deterministic plans satisfy the run's constraint.

    Training optimises sampled plans; deployment uses ``keep where sigmoid(logit) >= threshold``. Lower
    thresholds keep more. On calibration examples (held out from training, and not the evaluation set) this
    returns the cheapest threshold whose outcome satisfies ``constraint`` with the quality drop taken at its
    one-sided upper confidence bound (:func:`drop_upper_bound` at ``confidence``): a threshold that only just
    passes on the calibration sample would fail on new data about half the time. For a budget constraint, the
    most conservative threshold within the budget. If none qualifies, the most conservative threshold. A
    budget-conditioned policy is calibrated at ``budget``. Returns ``(threshold, table)``.
    """
    full = run_method(ex, task, data, planned(full_model(ex.space)))
    order = sorted(thresholds, reverse=not isinstance(constraint, Budget))  # search direction: see docstring
    table = []
    for t in order:
        r = run_method(ex, task, data, planned(policy_plans(policy, ex.space, t, budget)))
        drop_ucb = drop_upper_bound(full.per_item, r.per_item, confidence)
        # the handlers judge quality through the drop quality_full - quality: hand them a pair in [0, 1]
        # whose drop is the bound (|bound| <= 1)
        q, qf = max(0.0, -drop_ucb), max(0.0, drop_ucb)
        ok = bool(constraint.satisfied(np.array([q]), np.array([qf]), np.array([r.flops_ratio]))[0])
        table.append({
            "threshold": t, "quality": r.quality, "quality_full": full.quality, "drop_upper_bound": drop_ucb,
            "flops_ratio": r.flops_ratio, "satisfied": ok,
        })
        if ok:
            return t, table
    return min(thresholds), table


# ---- the summary of a training run ---------------------------------------------------------------------
def final_evaluation(
    ex: Executor, task, eval_data: EvalData, search_data: EvalData, policy_method: Method, latency_instances: int,
    latency_batch: int,
) -> dict:
    """The policy against the full model on held-out data, the best static plans found on ``search_data`` at
    and just above the policy's FLOPs, and the measured latency ratio (batched and at batch 1)."""
    full = run_method(ex, task, eval_data, planned(full_model(ex.space)))
    pol = run_method(ex, task, eval_data, policy_method)
    path = greedy_static_search(ex, task, search_data, min_flops_ratio=pol.flops_ratio)
    equal, above = static_at(path, pol.flops_ratio)
    static = run_method(ex, task, eval_data, planned(static_plan(ex.space, equal["bits"])))
    static_above = run_method(ex, task, eval_data, planned(static_plan(ex.space, above["bits"])))
    lat = eval_data.head(latency_instances)
    return {
        "task": task.name, "metric": task.metric, "n_eval": len(eval_data),
        "quality_full": full.quality, "quality": pol.quality, "flops_ratio": pol.flops_ratio,
        "latency_ratio": latency_ratio(ex, lat, policy_method, latency_batch),
        "latency_ratio_b1": latency_ratio(ex, lat.head(max(8, latency_instances // 4)), policy_method, 1),
        "static_quality_at_equal_flops": static.quality, "static_flops_ratio": static.flops_ratio,
        "static_quality_next_above": static_above.quality, "static_flops_ratio_next_above": static_above.flops_ratio,
        "static_skipped": [ex.space.name(j) for j in (~equal["bits"]).nonzero().flatten().tolist()],
        "quality_by_group": {"full": full.by_group, "policy": pol.by_group, "static": static.by_group},
    }
