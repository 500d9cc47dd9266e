"""A measured time model: the reward's compute term as predicted wall-clock instead of FLOPs (``env.cost=time``),
or as the larger of the two (``env.cost=max``, applied by :class:`rlskip.envs.rollout.SkipRollout`).

FLOPs are a poor proxy for time when a model's parts run at different efficiencies. On the embedded default
(a small BART, 16-token sources, batch 16) an encoder sub-layer runs once over every token as one large matrix
product, while a decoder sub-layer runs once per new token on 16 rows, bound by per-operation overhead and
weight reads: skipping the encoder's feed-forward layers removes several times more of the FLOPs than of the
time. A policy rewarded for FLOPs learns to skip what is cheap in time.

:class:`TimeModel` prices each FLOP by the kind of candidate it belongs to (``enc_ffn``, ``dec_self_attn``,
``attn``, ...) and the part no plan skips (layer 0, embeddings, the LM head, the decoding loop) by its own
rate, so a plan's predicted time is ``rate_fixed * fixed + sum_k rate_k * flops_k`` over the family's FLOPs
table (:mod:`rlskip.flops`; the policy's own FLOPs are priced as fixed). :func:`measure_time_model` fits
the rates on the machine that trains, from shared plans that skip one kind at a time, every configuration
decoding the same number of tokens; ratios, not absolute rates, matter. One rate per kind covers both the
pass over the input and the decoding steps, so where those run at different efficiencies (a long prompt's
prefill against weight-bound decoding) the rate is their average over the measured batch's mix, and the
model holds for the batch size it was measured at.
"""

from __future__ import annotations

import functools
import math
import statistics
import time
from dataclasses import dataclass, field

import torch

from rlskip.flops import plan_flops
from rlskip.plan import Plan

@dataclass(frozen=True)
class TimeModel:
    """Relative seconds per FLOP: ``fixed`` for the part no plan skips, ``kinds[k]`` for candidates of kind ``k``.

    ``fit`` records how the measurement went (the median times, rows, new tokens, repeats, and the all-ones
    plan's predicted over measured time)."""

    fixed: float
    kinds: dict[str, float]
    fit: dict = field(default_factory=dict, compare=False)

    def rates(self, space) -> torch.Tensor:
        """``[n_bits]`` rate of each skippable candidate of ``space``."""
        missing = sorted({c.kind for c in space.skippable} - set(self.kinds))
        if missing:
            raise ValueError(f"the time model has no rate for candidate kind(s) {missing}; it was measured on another backbone")
        return torch.tensor([self.kinds[c.kind] for c in space.skippable], dtype=torch.float64)

    def ratio(
        self, runtime, bits: torch.Tensor, lengths, kept, steps, beams: int = 1, decision_flops=0.0,
    ) -> torch.Tensor:
        """``[batch]`` predicted time of ``bits`` over the full model's on the same lengths (the decision's own
        FLOPs priced at the fixed rate)."""
        rates = self.rates(runtime.space)
        (fixed, per), (ffixed, fper) = runtime.flops_tables(bits.shape[0], _cpu(lengths), _cpu(kept), _cpu(steps), beams)
        decision = torch.as_tensor(decision_flops, dtype=torch.float64)
        executed = self.fixed * (fixed + decision) + plan_flops(torch.zeros_like(fixed), per * rates, bits)
        return executed / (self.fixed * ffixed + (fper * rates).sum(1))

    def to_dict(self) -> dict:
        return {"fixed": self.fixed, "kinds": dict(self.kinds), "fit": self.fit}

    @classmethod
    def from_dict(cls, d: dict) -> "TimeModel":
        try:
            return cls(float(d["fixed"]), {str(k): float(v) for k, v in d["kinds"].items()}, dict(d.get("fit", {})))
        except (KeyError, TypeError, AttributeError, ValueError) as e:
            raise ValueError(f"not a time model (expected fixed, kinds): {e}") from None


def _cpu(t):
    """A length tensor on the CPU, where FLOPs are counted (an observation's may sit on a GPU)."""
    return None if t is None else torch.as_tensor(t).cpu()


def measure_time_model(
    ex, obs, new_tokens: int | None, repeats: int = 5, floor: float = 0.05, min_seconds: float = 0.2
) -> TimeModel:
    """Fit a :class:`TimeModel` for ``ex`` (an :class:`rlskip.execute.Executor`) on one observed batch.

    Times one shared plan per configuration: all sub-layers kept, each kind of candidate skipped whole, and
    every candidate skipped; round-robin over ``repeats`` (the median of each, warm-up excluded), each timing
    at least ``min_seconds`` of repeated calls. Generation decodes exactly ``new_tokens`` tokens in every
    configuration (``min_new_tokens``), so a plan that ends early cannot look cheap. The rate of a kind is the
    time its skipping saved over the FLOPs it saved; the fixed rate, the all-skipped plan's time over its
    FLOPs. A rate below ``floor`` times the all-ones plan's average (noise: a kind too fast to see) is raised
    to it, so no candidate is ever free.
    """
    rt, space = ex.runtime, ex.space
    b = obs.batch_size
    gen = {} if new_tokens is None else {"min_new_tokens": int(new_tokens), "max_new_tokens": int(new_tokens)}
    ones = torch.ones(b, space.n_bits, dtype=torch.bool)
    configs = {"all": ones}
    for kind in sorted({c.kind for c in space.skippable}):
        bits = ones.clone()
        bits[:, space.bits_of_kind(kind)] = False
        configs[kind] = bits
    configs["none"] = torch.zeros_like(ones)

    def run(bits: torch.Tensor, calls: int = 1) -> float:
        plan = Plan(space, bits)
        t0 = time.perf_counter()
        for _ in range(calls):
            ex.run(obs, plan, **gen)
        return (time.perf_counter() - t0) / calls

    # warm-up; then each timing repeats a call enough times to last min_seconds (a small model's call is
    # milliseconds, where the machine's jitter would decide the fit)
    calls = max(1, math.ceil(min_seconds / max(run(ones), 1e-6)))
    run = functools.partial(run, calls=calls)
    times: dict[str, list[float]] = {k: [] for k in configs}
    for r in range(repeats):
        for k in (list(configs) if r % 2 == 0 else list(configs)[::-1]):
            times[k].append(run(configs[k]))
    t = {k: statistics.median(v) for k, v in times.items()}
    lengths = obs.lengths.cpu()
    steps = None if new_tokens is None else torch.full((b,), int(new_tokens))
    beams = int(ex.gen_kwargs.get("num_beams", 1) or 1)
    fixed, per = rt.flops_table(lengths.double(), lengths.double(), steps, beams)
    f_fixed, f_per = float(fixed.sum()), per.sum(0)
    total = f_fixed + float(f_per.sum())
    mean_rate = t["all"] / total
    kinds = {}
    for kind in configs:
        if kind in ("all", "none"):
            continue
        saved = float(f_per[space.bits_of_kind(kind)].sum())
        kinds[kind] = max(floor * mean_rate, (t["all"] - t[kind]) / saved) if saved > 0 else mean_rate
    fixed_rate = max(floor * mean_rate, t["none"] / f_fixed)
    predicted = fixed_rate * f_fixed + sum(kinds[c.kind] * float(f_per[i]) for i, c in enumerate(space.skippable))
    # relative rates: the all-ones plan's average FLOP costs 1
    fit = {
        "seconds": {k: round(v, 5) for k, v in t.items()}, "rows": b, "new_tokens": new_tokens, "repeats": repeats,
        "calls_per_timing": calls,
        "predicted_over_measured_all_ones": round(predicted / t["all"], 4),
    }
    return TimeModel(fixed_rate / mean_rate, {k: v / mean_rate for k, v in kinds.items()}, fit)
