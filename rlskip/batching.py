"""Plan-aware batching: decide every instance's plan first, then batch together the instances whose plans agree.

A decoding step at batch 16 is bound by reading the weights, so a sub-layer that *any* row of a batch keeps
costs nearly its full time: a batch of 16 instances with 16 different plans saves little of the FLOPs its
plans skip. Plans are cheap to decide (observe + policy) before anything is executed, and a trained policy
uses few distinct plans, so a *pool* of decided instances (several batches' worth) can be re-cut into batches
that agree. The rule (:func:`plan_batches`):

1. instances whose bits for the sub-layers that run at every decoding step are identical form a group
   (:func:`grouping_bits`: an encoder-decoder model's decoder bits, a single stack's every bit), ordered by the
   number of input tokens each keeps (:func:`kept_lengths`), shortest first. Their encoder bits and token
   keep-masks may differ: an encoder sub-layer runs once per batch, on the rows that keep it, while a decoding
   step pays for every sub-layer any of its rows keeps, at every step; dropped tokens leave each row's tensors,
   whatever the other rows keep;
2. each group fills as many whole batches of ``max_batch`` rows as it can, largest group first;
3. the instances left over (each group's remainder) are chained by the similarity of those bits (greedy
   nearest neighbour in Hamming distance, starting from the largest remainder), ordered by kept length (equal
   lengths keep the chain's order) and cut into batches of ``max_batch``; the runtime executes a mixed batch
   exactly (row gather/scatter).

Plans are never merged: every instance is executed under its own plan, so plan-aware and FIFO batching give
the same outputs (each instance's, as it gets alone; the runtime contract), its executed FLOPs are counted as
executed, and results come back in the pool's order. The number of batches is ``ceil(n / max_batch)`` either
way. ``plan_aware=False`` gives FIFO batches (consecutive chunks), for comparison.

The length order (steps 1 and 3) is for the padding a batch pays: its rows are padded to the longest input it holds,
and a generated batch decodes until its longest output is done (input and output lengths often go together).
It helps the full model as much: a pool of all-ones plans is one group, cut into batches of similar length.
Comparisons of a policy's batches with the full model's therefore give the full model the same rule
(``rlskip.evaluate``'s batched latency, ``bench/serve.py``).

The pool is observed once; its batches take the observation's rows (:meth:`Observation.rows`) and drop the
padding columns none of their rows uses (:func:`take`), so a batch of short inputs does not pay for the
pool's longest.
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import torch

from rlskip.execute import Executed, Executor
from rlskip.plan import Plan
from rlskip.runtime.base import Observation

# Batches' worth of instances decided together by plan-aware batching in offline jobs (inference on a list,
# evaluation's latency): a larger pool finds more agreeing instances and holds more observations in memory.
POOL_BATCHES = 8


def fifo_batches(n: int, max_batch: int) -> list[list[int]]:
    """Consecutive chunks of ``max_batch`` instances."""
    _check(max_batch)
    return [list(range(i, min(i + max_batch, n))) for i in range(0, n, max_batch)]


def grouping_bits(plan: Plan) -> torch.Tensor:
    """The columns of ``plan``'s bits that plan-aware batching groups instances by (step 1 of the rule in the
    module docstring): those of the sub-layers that run at every decoding step (:attr:`SkipSpace.step_bits`)."""
    return plan.bits[:, plan.space.step_bits]


def plan_batches(
    bits: torch.Tensor, max_batch: int, plan_aware: bool = True, lengths: Sequence[int] | torch.Tensor | None = None
) -> list[list[int]]:
    """Batches (lists of pool indices) for instances with ``bits [n, k]`` (the columns to group by:
    :func:`grouping_bits`), by the rule in the module docstring; FIFO chunks when ``plan_aware`` is False.
    ``lengths``: each instance's input length (tokens it keeps); when given, each group is ordered by it
    before it is cut, so that a batch holds instances of similar length."""
    n = bits.shape[0]
    if not plan_aware:
        return fifo_batches(n, max_batch)
    _check(max_batch)
    if lengths is not None and len(lengths) != n:
        raise ValueError(f"lengths has {len(lengths)} entries for {n} instances")
    size = None if lengths is None else torch.as_tensor(lengths).tolist()
    groups: dict[bytes, list[int]] = {}
    rows = bits.to(torch.bool).cpu()
    keys = [bytes(r) for r in rows.to(torch.uint8).numpy()]
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    # largest group first; ties by arrival (dicts keep first-seen order and sorted() is stable)
    ordered = sorted(groups.values(), key=len, reverse=True)
    if size is not None:  # within a group, shortest first; equal lengths in arrival order (a stable sort)
        ordered = [sorted(members, key=size.__getitem__) for members in ordered]
    batches, rest = [], []
    for members in ordered:
        whole = len(members) - len(members) % max_batch
        batches += [members[i : i + max_batch] for i in range(0, whole, max_batch)]
        if whole < len(members):
            rest.append(members[whole:])
    chain = _similarity_chain(sorted(rest, key=len, reverse=True), rows)
    flat = [i for members in chain for i in members]
    if size is not None:  # mixed batches hold several plans anyway: by length, equal lengths in chain order
        flat.sort(key=size.__getitem__)
    return batches + [flat[i : i + max_batch] for i in range(0, len(flat), max_batch)]


def _similarity_chain(groups: list[list[int]], rows: torch.Tensor) -> list[list[int]]:
    """``groups`` (largest first) reordered so that each follows the remaining one nearest to it in Hamming
    distance between their plans (ties: the larger, then the earlier), starting from the largest."""
    if len(groups) <= 2:
        return groups
    plans = torch.stack([rows[g[0]] for g in groups]).to(torch.int16)
    dist = (plans[:, None, :] != plans[None, :, :]).sum(-1).tolist()
    left = list(range(1, len(groups)))
    chain = [0]
    while left:
        nxt = min(left, key=lambda j: (dist[chain[-1]][j], -len(groups[j]), j))
        chain.append(nxt)
        left.remove(nxt)
    return [groups[j] for j in chain]


def _check(max_batch: int) -> None:
    if not isinstance(max_batch, int) or max_batch < 1:
        raise ValueError(f"max_batch must be a positive integer, got {max_batch!r}")


def take(obs: Observation, plan: Plan, index: Sequence[int]) -> tuple[Observation, Plan]:
    """The observation and plans of the instances ``index`` (in that order), cut to the input columns they use.

    Inputs are right-padded (:meth:`rlskip.encoding.Encoder.batch`), so the columns past the longest of these
    rows are padding for all of them: they leave every ``[batch, len, ...]`` tensor of the observation (its
    ``state`` included) and the token keep-masks.
    """
    sub, sub_plan = obs.rows(list(index)), plan.rows(list(index))
    width = obs.input_ids.shape[1]
    mask = sub.attention_mask
    used = int(mask.any(0).nonzero().max()) + 1
    if used == width:
        return sub, sub_plan

    def cut(t: torch.Tensor) -> torch.Tensor:
        return t[:, :used] if t.dim() >= 2 and t.shape[1] == width else t

    trimmed = Observation(
        cut(sub.hidden), cut(sub.attention_mask), cut(sub.input_ids), cut(sub.always_keep), cut(sub.positions),
        state={k: cut(v) for k, v in sub.state.items()},
    )
    tk = None if sub_plan.token_keep is None else sub_plan.token_keep[:, :used]
    return trimmed, Plan(sub_plan.space, sub_plan.bits, tk)


def execute(
    ex: Executor, obs: Observation, plan: Plan, cost: torch.Tensor, batches: list[list[int]], **gen_kwargs: Any
) -> Iterator[tuple[list[int], Executed]]:
    """Run the pool's ``batches`` one after another; yields ``(pool indices, outputs)`` per batch, in the
    batch's row order. ``cost`` is each instance's decision FLOPs."""
    cost = torch.as_tensor(cost, dtype=torch.float64)
    for index in batches:
        sub, sub_plan = take(obs, plan, index)
        yield index, ex.run(sub, sub_plan, cost[index], **gen_kwargs)


def merge(n: int, parts: Sequence[tuple[list[int], Executed]], plan: Plan | None = None) -> Executed:
    """The outputs of a pool of ``n`` instances in pool order, from its batches' ``(indices, outputs)``;
    ``plan``: the pool's plans, recorded as the executed plan."""
    order = torch.tensor([i for index, _ in parts for i in index], dtype=torch.long)
    if sorted(order.tolist()) != list(range(n)):
        raise ValueError(f"the batches cover {order.numel()} instances, not each of the pool's {n} once")
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(n)
    outs = [out for _, out in parts]
    predictions = [p for out in outs for p in out.predictions]

    def cat(name: str) -> torch.Tensor | None:
        vals = [getattr(out, name) for out in outs]
        return None if any(v is None for v in vals) else torch.cat([v.cpu() for v in vals])[inverse]

    return Executed(
        [predictions[i] for i in inverse.tolist()], cat("flops"), cat("full_flops"), cat("input_kept"),
        cat("margins"), plan, cat("steps"),
    )


def concat_plans(plans: Sequence[Plan]) -> Plan:
    """Several pools' plans (from one plan source: all with token keep-masks or none) one after another. The
    masks of narrower pools are right-padded with True (padding positions, which the runtime removes whatever a
    mask says there)."""
    masks = [p.token_keep for p in plans]
    if masks[0] is None:
        return Plan(plans[0].space, torch.cat([p.bits for p in plans]))
    width = max(m.shape[1] for m in masks)
    padded = [torch.nn.functional.pad(m, (0, width - m.shape[1]), value=True) for m in masks]
    return Plan(plans[0].space, torch.cat([p.bits for p in plans]), torch.cat(padded))


def kept_lengths(obs: Observation, plan: Plan) -> torch.Tensor:
    """Per instance, the input tokens its plan keeps (all of its tokens when the plan drops none): the length
    its rows are packed to after the first layer, and the one :func:`plan_batches` orders a group by."""
    keep = obs.keep_mask(plan.token_keep)
    return (obs.lengths if keep is None else keep.sum(1)).cpu()


def pool_batches(obs: Observation, plan: Plan, max_batch: int, plan_aware: bool = True) -> list[list[int]]:
    """A decided pool cut into batches of at most ``max_batch``: :func:`plan_batches` on the pool's
    :func:`grouping_bits` and :func:`kept_lengths` (FIFO chunks when ``plan_aware`` is False)."""
    return plan_batches(grouping_bits(plan), max_batch, plan_aware, kept_lengths(obs, plan))


def run_pool(
    ex: Executor, obs: Observation, plan: Plan, cost: torch.Tensor, max_batch: int, plan_aware: bool = True,
    **gen_kwargs: Any,
) -> Executed:
    """Execute a decided pool in batches of at most ``max_batch`` (plan-aware or FIFO); outputs in pool order."""
    batches = pool_batches(obs, plan, max_batch, plan_aware)
    return merge(obs.batch_size, list(execute(ex, obs, plan, cost, batches, **gen_kwargs)), plan)
