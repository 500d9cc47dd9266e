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
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from rlskip.batching import POOL_BATCHES, run_pool
from rlskip.distributed import current, gather
from rlskip.execute import Executor
from rlskip.methods import Method, full_model, lead_tokens, planned, static_plan
from rlskip.metrics import get_metric
from rlskip.plan import Plan


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
    input_kept_ratio: float | None = None  # mean share of input tokens left after token dropping (run_method)


def run_method(ex: Executor, task, data: EvalData, method: Method, batch_size: int = 64) -> MethodResult:
    """Run ``method`` over ``data`` in batches and score it with the task's metric. In a data-parallel job each
    rank runs every ``world``-th batch and the outputs are gathered, so every rank gets the whole result."""
    d = current()
    outs = {}
    for i, (_, rows) in enumerate(data.batches(batch_size)):
        if i % d.world == d.rank:
            obs = ex.observe(rows)
            out = method(ex, obs)
            kept = (out.input_kept.cpu().double() / obs.lengths.cpu().double()).tolist()
            outs[i] = (out.predictions, out.flops_ratio.tolist(), kept)
    merged = {i: o for part in gather(outs, d) for i, o in part.items()}
    preds = [p for i in sorted(merged) for p in merged[i][0]]
    ratios = [r for i in sorted(merged) for r in merged[i][1]]
    kept = [k for i in sorted(merged) for k in merged[i][2]]
    result = score_outputs(task, data.examples, preds, ratios)
    result.input_kept_ratio = sum(kept) / max(len(kept), 1)
    return result


def score_outputs(task, examples: Sequence, preds: list, ratios: list[float]) -> MethodResult:
    """A method's result from its predictions and per-instance FLOPs ratios on ``examples``."""
    scores = task.score(preds, list(examples))
    groups: dict[str, list[float]] = defaultdict(list)
    for example, s in zip(examples, scores):
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


def influence_static_path(ex: Executor, data: EvalData, min_flops_ratio: float = 0.0, batch_size: int = 16) -> list[dict]:
    """ShortGPT-style static pruning: drop sub-layers in order of their block influence on ``data`` (lowest
    first). One pass measures the influence and one runs the full model for its output lengths; each plan's FLOPs
    ratio on the path is analytic at those lengths (``quality`` None: only the plans finally chosen are run).
    For models where the greedy search's quadratic number of evaluations is out of reach."""
    space, rt = ex.space, ex.runtime
    influence, lengths, steps = [], [], []
    for _, rows in data.batches(batch_size):
        obs = ex.observe(rows)
        with torch.inference_mode():
            influence.append(rt.sublayer_influence(obs).sum(0))
        out = planned(full_model(space))(ex, obs)
        lengths.append(obs.lengths.cpu())
        steps.append(out.steps)
    order = torch.stack(influence).sum(0).argsort().tolist()
    lengths, steps = torch.cat(lengths), None if steps[0] is None else torch.cat(steps)
    bits = torch.ones(space.n_bits, dtype=torch.bool)
    path = [{"bits": bits.clone(), "flops_ratio": 1.0, "quality": None}]
    for j in order:
        if path[-1]["flops_ratio"] <= min_flops_ratio:
            break
        bits[j] = False
        executed, full = rt.flops(Plan(space, bits.expand(len(lengths), -1).clone()), lengths, steps=steps)
        path.append({"bits": bits.clone(), "flops_ratio": float((executed / full).mean()), "quality": None})
    return path


def static_at(path: list[dict], flops_ratio: float) -> tuple[dict, dict]:
    """From a greedy path, the first static plan at or under ``flops_ratio`` and the one step before it (at
    least as costly): the static plans on both sides of a method's FLOPs."""
    i = next((k for k, p in enumerate(path) if p["flops_ratio"] <= flops_ratio), len(path) - 1)
    return path[i], path[max(i - 1, 0)]


def latency_ratio(
    ex: Executor, data: EvalData, method: Method, batch_size: int, repeats: int = 3, plan_aware: bool = False
) -> float:
    """Measured wall-clock of ``method`` over the full model on the same instances (observation and decisions
    included). Warm-up excluded.

    Both run in consecutive batches of ``batch_size`` (FIFO), unless ``plan_aware``: then a planned method's
    instances (:func:`rlskip.methods.planned`) are observed and decided in pools of
    :data:`rlskip.batching.POOL_BATCHES` batches and executed in plan-aware batches of at most ``batch_size``
    (:mod:`rlskip.batching`), as inference does, and the full model's pools are cut by the same rule (one plan:
    batches of similar lengths), so the ratio holds what the plans save and not what the length order saves;
    a method without plans (early exit) runs FIFO against the full model's FIFO.

    The two alternate pool by pool (which goes first alternates with the repeats), and each pool's time is the
    median over ``repeats``; the ratio is of the sums. A slow spell of the machine (other processes, clock
    changes) that lasts a second then hits both sides of one pool rather than one side of a whole pass.
    """
    full = planned(full_model(ex.space))
    source = getattr(method, "source", None) if plan_aware else None
    pool = batch_size * POOL_BATCHES
    pools = [rows for _, rows in data.batches(pool)]

    def fifo(m: Method, rows: list) -> None:
        for i in range(0, len(rows), batch_size):
            m(ex, ex.observe(rows[i : i + batch_size]))

    def pooled(rows: list, plans) -> None:
        obs = ex.observe(rows)
        plan, cost = plans(obs)
        run_pool(ex, obs, plan, cost, batch_size, plan_aware=True)

    def reference(rows: list) -> None:
        if source is not None:
            pooled(rows, full.source)
        else:
            fifo(full, rows)

    def timed(fn, *args) -> float:
        t0 = time.perf_counter()
        fn(*args)
        return time.perf_counter() - t0

    def run(rows: list) -> None:
        if source is not None:
            pooled(rows, source)
        else:
            fifo(method, rows)

    reference(pools[0])  # warm-up, both sides
    run(pools[0])
    t_full: list[list[float]] = [[] for _ in pools]
    t_method: list[list[float]] = [[] for _ in pools]
    for r in range(repeats):
        for i, rows in enumerate(pools):
            if r % 2:
                t_method[i].append(timed(run, rows))
                t_full[i].append(timed(reference, rows))
            else:
                t_full[i].append(timed(reference, rows))
                t_method[i].append(timed(run, rows))
    return sum(map(statistics.median, t_method)) / sum(map(statistics.median, t_full))


def calibrate_keep_prob(ratio_at, target: float, floor: float, tol: float = 0.01) -> float:
    """Keep probability (or fraction) whose measured mean FLOPs ratio ``ratio_at(p)`` is ``target``: the linear
    guess between the ``floor`` (p = 0) and the full model (p = 1), then up to two secant steps on the bracketing
    points."""
    lo, hi = (0.0, floor), (1.0, 1.0)
    p = min(1.0, max(0.0, (target - floor) / max(1e-9, 1.0 - floor)))
    for _ in range(2):
        r = ratio_at(p)
        if abs(r - target) <= tol:
            break
        if r > target:
            hi = (p, r)
        else:
            lo = (p, r)
        if hi[1] - lo[1] <= 1e-9:
            break
        p = lo[0] + (target - lo[1]) * (hi[0] - lo[0]) / (hi[1] - lo[1])
        p = min(1.0, max(0.0, p))
    return p


def lead_fraction(ex: Executor, task, data: EvalData, flops_ratio: float) -> float:
    """The fraction of droppable tokens :func:`rlskip.methods.lead_tokens` keeps so that its FLOPs ratio on
    ``data`` matches ``flops_ratio`` (:func:`calibrate_keep_prob`)."""
    def ratio_at(q: float) -> float:
        return run_method(ex, task, data, planned(lead_tokens(ex.space, q))).flops_ratio

    return calibrate_keep_prob(ratio_at, flops_ratio, ratio_at(0.0))


def fidelity(task, predictions: list, full_predictions: list) -> float:
    """Agreement with the full model's own outputs: the task's metric with those outputs as the references
    (ROUGE-L for a ROUGE-scored task; label agreement, exact match or SQuAD F1 otherwise)."""
    base = "rougeL" if task.metric.startswith("rouge") else task.metric
    scores = get_metric(base)(predictions, full_predictions)
    return sum(scores) / max(len(scores), 1)


def reported_metrics(task, data: "EvalData", result: MethodResult) -> dict[str, float]:
    """Every metric the task reports (e.g. ROUGE-1/2/L/Lsum, SQuAD EM and F1), as means over ``data``."""
    return {name: sum(v) / max(len(v), 1) for name, v in task.score_all(result.predictions, list(data.examples)).items()}


# ---- the summary of a training run ---------------------------------------------------------------------
def modal_plan(ex: Executor, data: EvalData, source, batch_size: int = 64) -> tuple[torch.Tensor, float] | None:
    """The sub-layer plan ``source`` decides most often on ``data`` and the share of instances that get it: is
    the per-input choice worth more than deploying its most common plan to everyone? None when some plan drops
    input tokens (the plans are then not one static plan)."""
    counts: Counter = Counter()
    n = 0
    for _, rows in data.batches(batch_size):
        obs = ex.observe(rows)
        plan, _ = source(obs)
        keep = obs.keep_mask(plan.token_keep)
        if keep is not None and not torch.equal(keep, obs.attention_mask.to(keep.dtype)):
            return None
        counts.update(tuple(r) for r in plan.bits.tolist())
        n += plan.bits.shape[0]
    if n == 0:
        return None
    bits, count = counts.most_common(1)[0]
    return torch.tensor(bits, dtype=torch.bool), count / n


def static_search_path(ex: Executor, task, data: EvalData, min_flops_ratio: float, how: str = "greedy") -> list[dict]:
    """The static pruning path the config's ``eval.static_search`` names: ``greedy`` (:func:`greedy_static_search`)
    or ``influence`` (:func:`influence_static_path`)."""
    if how == "influence":
        return influence_static_path(ex, data, min_flops_ratio=min_flops_ratio)
    return greedy_static_search(ex, task, data, min_flops_ratio=min_flops_ratio)


def final_evaluation(
    ex: Executor, task, eval_data: EvalData, search_data: EvalData, policy_method: Method, latency_instances: int,
    latency_batch: int, static_search: str = "greedy",
) -> dict:
    """The policy against the full model on held-out data, the best static plans found on ``search_data`` at
    and just above the policy's FLOPs, and the measured latency ratio: batched with plan-aware batching
    (``latency_ratio``) and FIFO batches (``latency_ratio_fifo``), and at batch 1; the policy's and the static
    plan's fidelity to the full model's own outputs, and every metric the task reports for the three.

    Also the policy's most frequent plan on ``search_data`` given to every held-out instance (``modal_plan_*``,
    :func:`modal_plan`; not when the policy drops tokens): what the per-input choice adds over one static plan.
    The static search is greedy and can miss that plan.

    When the policy drops input tokens, also the lead of each input at equal FLOPs (``lead_*``: every sub-layer
    kept, the first fraction of the droppable tokens, the fraction matched to the policy's FLOPs on
    ``search_data``)."""
    full = run_method(ex, task, eval_data, planned(full_model(ex.space)))
    pol = run_method(ex, task, eval_data, policy_method)
    path = static_search_path(ex, task, search_data, pol.flops_ratio, static_search)
    equal, above = static_at(path, pol.flops_ratio)
    static = run_method(ex, task, eval_data, planned(static_plan(ex.space, equal["bits"])))
    static_above = run_method(ex, task, eval_data, planned(static_plan(ex.space, above["bits"])))
    lat = eval_data.head(latency_instances)
    main = current().main  # latency is measured by one process (rank 0), with the others idle

    def measured(*args, **kwargs) -> float | None:
        return latency_ratio(*args, **kwargs) if main else None

    modal = {}
    found = modal_plan(ex, search_data, policy_method.source) if hasattr(policy_method, "source") else None
    if found is not None:
        bits, share = found
        r = run_method(ex, task, eval_data, planned(static_plan(ex.space, bits)))
        modal = {
            "modal_plan_quality": r.quality, "modal_plan_flops_ratio": r.flops_ratio, "modal_plan_share": share,
            "modal_plan_skipped": ex.space.skipped_names(bits),
        }
    lead = {}
    if ex.space.token_dropping and pol.input_kept_ratio is not None and pol.input_kept_ratio < 1.0:
        q = lead_fraction(ex, task, search_data, pol.flops_ratio)
        r = run_method(ex, task, eval_data, planned(lead_tokens(ex.space, q)))
        lead = {
            "lead_quality_at_equal_flops": r.quality, "lead_flops_ratio": r.flops_ratio, "lead_fraction": q,
            "lead_fidelity": fidelity(task, r.predictions, full.predictions),
        }
    return {
        "task": task.name, "metric": task.metric, "n_eval": len(eval_data),
        "quality_full": full.quality, "quality": pol.quality, "flops_ratio": pol.flops_ratio,
        "latency_ratio": measured(ex, lat, policy_method, latency_batch, plan_aware=True),
        "latency_ratio_fifo": measured(ex, lat, policy_method, latency_batch),
        "latency_ratio_b1": measured(ex, lat.head(max(8, latency_instances // 4)), policy_method, 1),
        "static_quality_at_equal_flops": static.quality, "static_flops_ratio": static.flops_ratio,
        "static_quality_next_above": static_above.quality, "static_flops_ratio_next_above": static_above.flops_ratio,
        "static_skipped": ex.space.skipped_names(equal["bits"]),
        "quality_by_group": {"full": full.by_group, "policy": pol.by_group, "static": static.by_group},
        "fidelity": fidelity(task, pol.predictions, full.predictions),
        "static_fidelity": fidelity(task, static.predictions, full.predictions),
        "metrics": {name: reported_metrics(task, eval_data, r) for name, r in (("full", full), ("policy", pol), ("static", static))},
        "input_kept_ratio": pol.input_kept_ratio,
        **modal,
        **lead,
    }
