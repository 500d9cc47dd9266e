"""Analytic FLOPs: primitives every model family builds its per-candidate table from.

Counted: every matrix product a runtime executes (2 FLOPs per multiply-add) -- attention projections with
separate query and key/value head counts (grouped-query attention), attention scores and weighted values
over the actual key lengths, plain and gated feed-forward layers, the LM head -- which is what
``torch.utils.flop_counter.FlopCounterMode`` counts. Not counted: embedding lookups (a gather, no
arithmetic), norms, softmax, activations, rotary embeddings and residual adds (element-wise: at any real
width well under 1% of the total, and FlopCounterMode does not count them either). The policy's own cost
is added by the caller (:func:`mlp_flops`).

Every argument that is a length may be a tensor ``[batch]`` of per-instance lengths (float64), so one call
gives the cost of every instance of a batch.

A family's table (``Runtime.flops_table``) is ``(fixed [batch], per_candidate [batch, n_bits])``: the part no
plan can skip and one column per skippable candidate, so the cost of a plan is
``fixed + (bits * per_candidate).sum(1)`` (:func:`plan_flops`) and skipping one candidate lowers the count
by exactly its share.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

Length = torch.Tensor | float | int


@dataclass(frozen=True)
class AttentionShape:
    """Widths of one attention block: model width, query heads, key/value heads, head width."""

    d_model: int
    heads: int
    kv_heads: int
    head_dim: int

    @classmethod
    def mha(cls, d_model: int, heads: int) -> "AttentionShape":
        """Plain multi-head attention (as many key/value heads as query heads, ``d_model / heads`` wide)."""
        return cls(d_model, heads, heads, d_model // heads)


def linear(n: Length, d_in: int, d_out: int) -> Length:
    """A ``d_in -> d_out`` projection applied to ``n`` tokens."""
    return n * (2 * d_in * d_out)  # one operation on a length tensor, not three


def attention(a: AttentionShape, n_q: Length, n_kv: Length, n_kv_proj: Length | None = None) -> Length:
    """``n_q`` query tokens attending over ``n_kv`` keys: q/o projections of the queries, k/v projections of
    ``n_kv_proj`` new tokens (default ``n_kv``; 0 when the keys come from a cache), scores and values."""
    n_kv_proj = n_kv if n_kv_proj is None else n_kv_proj
    inner, kv_inner = a.heads * a.head_dim, a.kv_heads * a.head_dim
    # q and o projections of the queries, k and v of the new tokens; constants are multiplied together before
    # they meet a length, which may be a tensor
    proj = n_q * (2 * linear(1, a.d_model, inner)) + n_kv_proj * (2 * linear(1, a.d_model, kv_inner))
    return proj + n_q * n_kv * (4 * inner)


def kv_projection(a: AttentionShape, n: Length) -> Length:
    """Key and value projections of ``n`` tokens (a cross-attention memory, or a cache entry)."""
    return n * (2 * linear(1, a.d_model, a.kv_heads * a.head_dim))


def cached_self_attention(a: AttentionShape, steps: Length, past: Length = 0) -> Length:
    """``steps`` decoding steps, one token each, over a cache holding ``past`` keys before the first:
    step ``t`` (0-based) projects its token and attends over ``past + t + 1`` keys."""
    inner = a.heads * a.head_dim
    per_token = attention(a, 1, 0, 1)  # projections only
    # sum over t of 4 * (past + t + 1) * inner
    keys = steps * past + steps * (steps + 1) / 2
    return steps * per_token + 4 * keys * inner


def mlp(n: Length, d_model: int, d_ff: int, gated: bool = False) -> Length:
    """A feed-forward block on ``n`` tokens: ``d -> f -> d``, with a second ``d -> f`` input for gated units."""
    return n * ((3 if gated else 2) * linear(1, d_model, d_ff))


def lm_head(n: Length, d_model: int, vocab: int) -> Length:
    """The output projection of ``n`` tokens onto the vocabulary."""
    return linear(n, d_model, vocab)


def lengths(*xs) -> tuple[torch.Tensor, ...]:
    """Per-instance lengths as float64 CPU tensors (the dtype every table is built in)."""
    return tuple(torch.as_tensor(x).to("cpu", torch.float64) for x in xs)


def plan_flops(fixed: torch.Tensor, per_candidate: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """FLOPs executed under ``bits`` ``[batch, n_bits]``."""
    return fixed + (per_candidate * bits.to("cpu", per_candidate.dtype)).sum(1)


def mlp_flops(module: torch.nn.Module, rows: int = 1, tokens_per_row: int = 1) -> float:
    """FLOPs of running every ``nn.Linear`` in ``module`` once per token (a policy's cost)."""
    macs = sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, torch.nn.Linear))
    return float(2 * macs * rows * tokens_per_row)
