"""Methods: ways of running a batch -- the learned policy and the baselines it is compared against.

One small interface: a *method* is a callable ``method(executor, obs) -> Executed`` (:mod:`rlskip.execute`).
Most methods decide a plan per instance and let the executor run it; they are built from a *plan source*,
``source(obs) -> (Plan, decision FLOPs [batch])``, with :func:`planned`:

- :func:`full_model`: the unmodified model;
- :func:`static_plan`: one fixed plan for every instance (the best static plan found by search, LayerDrop's
  every-other-layer pruning :func:`every_other_layer_bits`, or truncation after layer ``k``
  :func:`truncation_bits`, the early-exit reference of encoders);
- :func:`random_plans`: each candidate kept independently with a given probability;
- :func:`lead_tokens`: every candidate kept, and of each input's droppable tokens only the first fraction (the
  lead of a document: the static reference for a policy that drops input tokens);
- :func:`policy_plans`: a learned policy's deterministic decisions.

:class:`EarlyExit` is CALM-style confident early exit per generated token (Schuster et al., 2022): it
executes the full model's decoder stack one layer at a time through the family's ``exit_stack``, so it lives
here, not inside a runtime.
"""

from __future__ import annotations

from typing import Callable

import torch

from rlskip.execute import Executed, Executor
from rlskip.plan import Plan
from rlskip.policy import observation_inputs
from rlskip.runtime.base import Observation
from rlskip.runtime.search import greedy_search
from rlskip.space import SkipSpace

PlanSource = Callable[[Observation], tuple[Plan, torch.Tensor]]
Method = Callable[[Executor, Observation], Executed]


def _free(obs: Observation) -> torch.Tensor:
    return torch.zeros(obs.batch_size, dtype=torch.float64)


def planned(source: PlanSource) -> Method:
    """The method that decides with ``source`` and executes the plans; ``method.source`` is ``source``, so
    plan-aware batching (:mod:`rlskip.batching`) can decide a pool of instances before batching them."""

    def method(ex: Executor, obs: Observation) -> Executed:
        plan, cost = source(obs)
        return ex.run(obs, plan, cost)

    method.source = source
    return method


# ---- plan sources ---------------------------------------------------------------------------------------
def full_model(space: SkipSpace) -> PlanSource:
    return lambda obs: (Plan.all_ones(space, obs.batch_size), _free(obs))


def static_plan(space: SkipSpace, bits: torch.Tensor) -> PlanSource:
    """The same plan for every instance."""
    return lambda obs: (Plan(space, bits.view(1, -1).expand(obs.batch_size, -1).clone()), _free(obs))


def random_plans(space: SkipSpace, keep_prob: float, seed: int = 0) -> PlanSource:
    """Each instance keeps each skippable candidate with probability ``keep_prob`` (independently)."""
    gen = torch.Generator().manual_seed(seed)
    return lambda obs: (Plan(space, torch.rand(obs.batch_size, space.n_bits, generator=gen) < keep_prob), _free(obs))


def lead_tokens(space: SkipSpace, fraction: float) -> PlanSource:
    """Every candidate kept; of each instance's droppable tokens (real, not always kept) the first
    ``ceil(fraction * n)`` survive the first layer, the rest are dropped."""
    if not space.token_dropping:
        raise ValueError(f"lead_tokens needs a space with token dropping, got a {space.describe()}")
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"lead_tokens fraction must lie in [0, 1], got {fraction}")

    def source(obs: Observation):
        droppable = obs.attention_mask & ~obs.always_keep
        rank = droppable.long().cumsum(1)
        n = torch.ceil(droppable.sum(1, keepdim=True).to(torch.float64) * fraction).long()
        keep = obs.attention_mask & (~droppable | (rank <= n))
        return Plan(space, torch.ones(obs.batch_size, space.n_bits, dtype=torch.bool), keep.cpu()), _free(obs)

    return source


def policy_plans(policy, space: SkipSpace, threshold: float = 0.5, budget: float | None = None) -> PlanSource:
    """Deterministic decisions of a learned policy (keep where sigmoid(logit) >= threshold); its cost included."""

    def source(obs: Observation):
        b = None if budget is None else torch.full((obs.batch_size,), float(budget))
        with torch.no_grad():
            bits, token_keep = policy.decide(**observation_inputs(obs), budget=b, threshold=threshold)
        cost = policy.flops(obs.lengths)
        return Plan(space, bits.cpu(), token_keep.cpu() if token_keep is not None and space.token_dropping else None), cost

    return source


def budget_grid(low: float, high: float, step: float = 0.05) -> list[float]:
    """The budgets a budget-conditioned policy is calibrated at: ``low`` to ``high`` in steps of ``step``."""
    n = int(round((high - low) / step))
    return sorted({round(low + i * step, 4) for i in range(n + 1)} | {round(high, 4)})


def budget_plans(policy, space: SkipSpace, thresholds: dict[float, float], budget: float) -> PlanSource:
    """A budget-conditioned policy's plans at ``budget``, nested across budgets so that a lower budget never keeps
    a unit a higher one drops: the budget is rounded down to the calibration grid (``thresholds``: grid budget ->
    calibrated threshold), and the plan keeps a unit only where the policy keeps it at that grid budget and at
    every grid budget above it. Every policy evaluation is counted in the decision's FLOPs. A budget outside
    the grid's range is refused."""
    grid = sorted(thresholds)
    if not grid[0] <= budget <= grid[-1] + 1e-9:
        raise ValueError(f"budget {budget} is outside the range this policy was calibrated for, [{grid[0]}, {grid[-1]}]")
    used = [g for g in grid if g >= max(x for x in grid if x <= budget + 1e-9)]
    sources = [policy_plans(policy, space, thresholds[g], g) for g in used]

    def source(obs: Observation):
        plans = [s(obs) for s in sources]
        bits = torch.stack([p.bits for p, _ in plans]).all(0)
        tokens = [p.token_keep for p, _ in plans]
        keep = None if tokens[0] is None else torch.stack(tokens).all(0)
        return Plan(space, bits, keep), sum(cost for _, cost in plans)

    return source


def every_other_layer_bits(space: SkipSpace) -> torch.Tensor:
    """LayerDrop-style pruning: every sub-layer of layers 1, 3, 5, ... of each stack is skipped."""
    return torch.tensor([c.layer % 2 == 0 for c in space.skippable], dtype=torch.bool)


def truncation_bits(space: SkipSpace, k: int) -> torch.Tensor:
    """Truncation after layer ``k`` of a single stack: every sub-layer of layers ``k + 1, ...`` is skipped."""
    if any(c.kind not in ("attn", "ffn") for c in space.candidates):
        raise ValueError(f"truncation after a layer applies to single-stack models, not a {space.describe()}")
    return torch.tensor([c.layer <= k for c in space.skippable], dtype=torch.bool)


# ---- confident early exit -------------------------------------------------------------------------------
class _EarlyExitDecoder:
    """A :class:`rlskip.runtime.search.SkipDecoder` whose tokens leave the stack once confident.

    After each layer but the last, the LM head reads the token's intermediate state; when the softmax's top-1
    minus top-2 probability reaches ``threshold``, the token skips its remaining layers and is predicted from
    those logits. The exited state is copied forward (CALM's state propagation): each skipped layer's
    self-attention keys/values for that position are projected from it, so later tokens that run the layer
    attend over every position. ``call_flops`` records what every call spent per row.
    """

    def __init__(self, stack, threshold: float) -> None:
        self.stack, self.threshold = stack, float(threshold)
        self.call_flops: list[torch.Tensor] = []

    def prefill(self) -> torch.Tensor:
        logits = self.stack.prefill_logits()  # a decoder-only prompt runs through every layer, uncounted here
        if logits is not None:
            self.call_flops.append(None)  # the prefill is in the stack's fixed FLOPs
            return logits
        return self.step(self.stack.start)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        s = self.stack
        h = s.embed(tokens)
        n = h.shape[0]
        active = torch.ones(n, dtype=torch.bool, device=h.device)
        logits = h.new_empty(n, s.vocab)
        spent = torch.zeros(n, dtype=torch.float64)
        last = s.n_layers - 1
        for i in range(s.n_layers):
            done = (~active).nonzero().flatten()
            if done.numel():
                s.fill(i, h[done], done)
                spent[done.cpu()] += s.kv_flops
            rows = active.nonzero().flatten()
            if rows.numel() == 0:
                continue
            x = s.layer(i, h[rows], rows)
            h[rows] = x
            spent[rows.cpu()] += s.layer_flops(rows) + s.head_flops
            lg = s.logits(x)
            if i == last:
                logits[rows] = lg
                break
            top2 = torch.softmax(lg.float(), dim=-1).topk(2, dim=-1).values
            exit_now = (top2[:, 0] - top2[:, 1]) >= self.threshold
            if bool(exit_now.any()):
                logits[rows[exit_now]] = lg[exit_now]
                active[rows[exit_now]] = False
        s.advance()
        self.call_flops.append(spent)
        return logits

    def reorder(self, beam_idx: torch.Tensor) -> None:
        raise ValueError("early exit decodes greedily (num_beams=1)")

    def flops(self, steps: torch.Tensor) -> torch.Tensor:
        """FLOPs of each row's own decoding calls (a finished row's padding steps excluded)."""
        total = torch.zeros(steps.shape[0], dtype=torch.float64)
        for c, spent in enumerate(self.call_flops):
            if spent is not None:
                total += spent * (c < steps.cpu()).to(torch.float64)
        return total


class EarlyExit:
    """CALM-style confident early exit at ``threshold`` (greedy decoding, full encoder or prompt, no plan).

    ``threshold > 1`` never exits and gives the full model's tokens. FLOPs are counted honestly per token:
    every layer run, every LM-head evaluation (intermediate ones included, so never exiting costs more than
    the full model) and the key/value projections of the skipped layers; the encoder (or prompt) and any
    cross-attention memory projections are the full model's.
    """

    def __init__(self, threshold: float) -> None:
        self.threshold = float(threshold)

    def __call__(self, ex: Executor, obs: Observation) -> Executed:
        rt = ex.runtime
        if ex.task_kind != "generation":
            raise ValueError("early exit applies to generation tasks; for an encoder use truncation_bits")
        prompt = rt.prompt(obs)
        s = rt.search_settings(obs, prompt, **ex.gen_kwargs)
        if s.num_beams != 1 or s.do_sample:
            raise ValueError(f"early exit decodes greedily (num_beams=1, no sampling), got num_beams={s.num_beams}")
        with torch.inference_mode():
            stack = rt.exit_stack(obs, s.max_length)
            dec = _EarlyExitDecoder(stack, self.threshold)
            seqs, steps, _ = greedy_search(dec, prompt, s)
        flops = stack.fixed_flops + dec.flops(steps)
        _, full = rt.flops(Plan.all_ones(rt.space, obs.batch_size), obs.lengths.cpu(), steps=steps.cpu())
        texts = ex.encoder.decode(seqs[:, s.prompt_len :])
        return Executed(texts, flops, full, obs.lengths.cpu(), None, None, steps.cpu())
