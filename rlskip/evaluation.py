"""Evaluating plan sources on task data: quality, FLOPs ratio and measured latency, on one runtime.

A *plan source* maps an observation to plans (and the FLOPs spent deciding them): the full model, a
fixed (static) plan, random plans, or a learned policy. Every method is run on the same examples, the same
runtime and the same generation settings, so the numbers compare like with like. Used by training (final
summary) and by ``python -m rlskip.evaluate``.
"""

from __future__ import annotations

import math
import statistics
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from rlskip.plan import Plan
from rlskip.runtime.base import Observation, Runtime

PlanSource = Callable[[Observation], tuple[Plan, torch.Tensor]]


def encode_batch(tokenizer, examples: Sequence, max_source_tokens: int, pair_truncation: str = "longest_first"):
    """Right-padded ``(input_ids, attention_mask)`` for a batch of examples."""
    from rlskip.envs.tasks.encoding import encode_examples

    rows, _ = encode_examples(tokenizer, list(examples), max_source_tokens, pair_truncation)
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
    lengths = torch.tensor([len(r) for r in rows])
    return ids, torch.arange(width)[None, :] < lengths[:, None]


# ---- plan sources ---------------------------------------------------------------------------------------
def full_model(space) -> PlanSource:
    return lambda obs: (Plan.all_ones(space, obs.batch_size), torch.zeros(obs.batch_size, dtype=torch.float64))


def static_plan(space, bits: torch.Tensor) -> PlanSource:
    """The same plan for every instance."""
    return lambda obs: (Plan(space, bits.view(1, -1).expand(obs.batch_size, -1).clone()), torch.zeros(obs.batch_size, dtype=torch.float64))


def random_plans(space, keep_prob: float, seed: int = 0) -> PlanSource:
    """Each instance keeps each skippable candidate with probability ``keep_prob`` (independently)."""
    gen = torch.Generator().manual_seed(seed)
    return lambda obs: (
        Plan(space, torch.rand(obs.batch_size, space.n_bits, generator=gen) < keep_prob),
        torch.zeros(obs.batch_size, dtype=torch.float64),
    )


def policy_plans(policy, space, threshold: float = 0.5, budget: float | None = None) -> PlanSource:
    """Deterministic decisions of a learned policy (keep where sigmoid(logit) >= threshold); its cost included."""

    from rlskip.agents.policy import observation_inputs

    def source(obs: Observation):
        b = None if budget is None else torch.full((obs.batch_size,), float(budget))
        with torch.no_grad():
            bits, token_keep = policy.decide(**observation_inputs(obs), budget=b, threshold=threshold)
        cost = torch.tensor([policy.flops(int(n)) for n in obs.lengths], dtype=torch.float64)
        return Plan(space, bits, token_keep if space.token_dropping else None), cost

    return source


# ---- running a method ------------------------------------------------------------------------------------
@dataclass
class MethodResult:
    """Quality and cost of one method on a set of examples."""

    quality: float
    flops_ratio: float
    per_item: list[float] = field(default_factory=list)
    per_item_flops_ratio: list[float] = field(default_factory=list)
    predictions: list = field(default_factory=list)
    by_group: dict[str, float] = field(default_factory=dict)

    def summary(self) -> dict:
        return {"quality": self.quality, "flops_ratio": self.flops_ratio, "by_group": self.by_group}


def _run_batch(rt: Runtime, task, tokenizer, examples, source: PlanSource, gen_kwargs: dict, max_source_tokens: int):
    ids, mask = encode_batch(tokenizer, examples, max_source_tokens, getattr(task, "pair_truncation", "longest_first"))
    with torch.no_grad():
        obs = rt.observe(ids, mask)
        plan, extra = source(obs)
        if task.kind == "classification":
            logits, _, flops, full = rt.classify(obs, plan)
            preds = logits.argmax(-1).tolist()
        else:
            out = rt.generate(obs, plan, **gen_kwargs)
            flops, full = out.flops, out.full_flops
            preds = [t.strip() for t in tokenizer.batch_decode(out.sequences, skip_special_tokens=True)]
    return preds, ((flops + extra) / full).tolist()


def run_method(
    rt: Runtime, task, tokenizer, examples: Sequence, source: PlanSource, gen_kwargs: dict, max_source_tokens: int, batch_size: int = 64
) -> MethodResult:
    """Run one plan source over ``examples`` in batches and score it with the task's metric."""
    preds, ratios = [], []
    for i in range(0, len(examples), batch_size):
        p, r = _run_batch(rt, task, tokenizer, examples[i : i + batch_size], source, gen_kwargs, max_source_tokens)
        preds += p
        ratios += r
    scores = task.score(preds, list(examples))
    groups: dict[str, list[float]] = defaultdict(list)
    for ex, s in zip(examples, scores):
        if ex.group is not None:
            groups[ex.group].append(s)
    return MethodResult(
        quality=float(sum(scores) / len(scores)),
        flops_ratio=float(sum(ratios) / len(ratios)),
        per_item=list(scores),
        per_item_flops_ratio=ratios,
        predictions=preds,
        by_group={g: sum(v) / len(v) for g, v in sorted(groups.items())},
    )


def greedy_static_search(
    rt: Runtime, task, tokenizer, examples: Sequence, gen_kwargs: dict, max_source_tokens: int, min_flops_ratio: float = 0.0
) -> list[dict]:
    """The best static plans found greedily: drop, one at a time, the candidate whose removal costs the least
    quality on ``examples`` (ties: the larger FLOPs saving). Returns the path, one entry per plan, from the full
    model down to ``min_flops_ratio``: ``{"bits", "flops_ratio", "quality"}``.
    """
    space = rt.space
    bits = torch.ones(space.n_bits, dtype=torch.bool)
    res = run_method(rt, task, tokenizer, examples, static_plan(space, bits), gen_kwargs, max_source_tokens)
    path = [{"bits": bits.clone(), "flops_ratio": res.flops_ratio, "quality": res.quality}]
    while bits.any() and path[-1]["flops_ratio"] > min_flops_ratio:
        best = None
        for j in bits.nonzero().flatten().tolist():
            trial = bits.clone()
            trial[j] = False
            r = run_method(rt, task, tokenizer, examples, static_plan(space, trial), gen_kwargs, max_source_tokens)
            key = (r.quality, -r.flops_ratio)
            if best is None or key > best[0]:
                best = (key, trial, r)
        _, bits, r = best
        path.append({"bits": bits.clone(), "flops_ratio": r.flops_ratio, "quality": r.quality})
    return path


def latency_ratio(
    rt: Runtime, task, tokenizer, examples: Sequence, source: PlanSource, gen_kwargs: dict, max_source_tokens: int,
    batch_size: int, repeats: int = 3,
) -> float:
    """Measured wall-clock of ``source`` over the full model on the same batches (decisions included).

    Warm-up excluded; repeats alternate between the two so machine drift hits both alike; medians.
    """
    full = full_model(rt.space)
    batches = [examples[i : i + batch_size] for i in range(0, len(examples), batch_size)]

    def timed(src) -> float:
        t0 = time.perf_counter()
        for b in batches:
            _run_batch(rt, task, tokenizer, b, src, gen_kwargs, max_source_tokens)
        return time.perf_counter() - t0

    timed(full), timed(source)  # warm-up
    t_full, t_src = [], []
    for _ in range(repeats):
        t_full.append(timed(full))
        t_src.append(timed(source))
    return statistics.median(t_src) / statistics.median(t_full)


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
    rt: Runtime, task, tokenizer, examples: Sequence, policy, constraint, gen_kwargs: dict, max_source_tokens: int,
    thresholds: Sequence[float] = THRESHOLDS, budget: float | None = None, confidence: float = 0.95,
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
    import numpy as np

    from rlskip.constraints import Budget

    full = run_method(rt, task, tokenizer, examples, full_model(rt.space), gen_kwargs, max_source_tokens)
    order = sorted(thresholds, reverse=not isinstance(constraint, Budget))  # search direction: see docstring
    table = []
    for t in order:
        r = run_method(rt, task, tokenizer, examples, policy_plans(policy, rt.space, t, budget), gen_kwargs, max_source_tokens)
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
