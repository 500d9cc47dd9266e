"""Analytic FLOPs of an encoder-decoder under plans, per instance and per candidate.

Counted: every matrix product the runtime executes (2 FLOPs per multiply-add) -- attention projections,
attention scores and weighted values (over the actual key lengths), feed-forward layers, the LM head --
which is what ``torch.utils.flop_counter.FlopCounterMode`` counts. Not counted: embedding lookups (a
gather, no arithmetic), LayerNorm, softmax, activations and residual adds (element-wise, well under 1%
of the total at any real width). The policy's own cost is added by the caller (:func:`mlp_flops`).

Lengths are the instance's own: the first encoder layer sees the full source, later layers and the
cross-attention memory the source left after token dropping; the decoder runs ``steps`` positions with a
KV cache (step ``t`` attends over ``t + 1`` keys) for each of ``beams`` rows; cross-attention keys and
values are projected once per instance, not per beam (the runtime shares them across beams).

The cost of a plan is ``fixed + (bits * per_candidate).sum(1)``; the full model's is the same with every
bit on and the full source length, so skipping one candidate lowers the count by exactly its share.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlskip.space import SkipSpace


@dataclass(frozen=True)
class Dims:
    """Widths of an encoder-decoder transformer."""

    d_model: int
    enc_ffn: int
    dec_ffn: int
    vocab: int
    encoder_layers: int
    decoder_layers: int


def _self_attn(s: torch.Tensor, d: int) -> torch.Tensor:
    """Bidirectional self-attention over ``s`` tokens: q,k,v,o projections + scores + values."""
    return 8 * s * d * d + 4 * s * s * d


def _ffn(n: torch.Tensor, d: int, f: int) -> torch.Tensor:
    return 4 * n * d * f


def encoder_decoder_flops(
    dims: Dims,
    space: SkipSpace,
    src_full: torch.Tensor,
    src_kept: torch.Tensor,
    steps: torch.Tensor,
    beams: int = 1,
    teacher_forced: bool = False,
    lm_head: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-instance FLOPs split into the part no plan can skip and one column per skippable candidate.

    Args:
        dims: model widths.
        space: the SkipSpace (fixes the bit order).
        src_full: ``[batch]`` source length before token dropping (the first layer runs on it).
        src_kept: ``[batch]`` source length after token dropping.
        steps: ``[batch]`` decoder positions: generated steps, or the target length when teacher-forced.
        beams: rows per instance during generation.
        teacher_forced: one parallel decoder pass over ``steps`` positions (no cache, no beams).
        lm_head: include the LM head (False for classification heads).

    Returns:
        ``(fixed [batch], per_candidate [batch, n_bits])`` as float64 tensors.
    """
    d = dims.d_model
    sf, sk, n = (x.to(torch.float64) for x in (src_full, src_kept, steps))
    k = 1 if teacher_forced else beams
    fixed = _self_attn(sf, d) + _ffn(sf, d, dims.enc_ffn)  # the first encoder layer, fixed on
    if lm_head:
        fixed = fixed + k * n * 2 * d * dims.vocab
    if teacher_forced:
        dec_self = 8 * n * d * d + 4 * n * n * d
        dec_cross = 4 * sk * d * d + 4 * n * d * d + 4 * n * sk * d
    else:
        dec_self = k * (8 * n * d * d + 2 * d * n * (n + 1))  # sum over t of 4 * (t + 1) * d
        dec_cross = 4 * sk * d * d + k * n * (4 * d * d + 4 * sk * d)
    dec_ffn = k * _ffn(n, d, dims.dec_ffn)
    per_kind = {
        "enc_attn": _self_attn(sk, d),
        "enc_ffn": _ffn(sk, d, dims.enc_ffn),
        "dec_self_attn": dec_self,
        "dec_cross_attn": dec_cross,
        "dec_ffn": dec_ffn,
    }
    cols = [per_kind[c.kind] for c in space.skippable]
    return fixed, torch.stack(cols, dim=1)


def plan_flops(fixed: torch.Tensor, per_candidate: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """FLOPs executed under ``bits`` ``[batch, n_bits]``."""
    return fixed + (per_candidate * bits.to(per_candidate.dtype)).sum(1)


def mlp_flops(module: torch.nn.Module, rows: int = 1, tokens_per_row: int = 1) -> float:
    """FLOPs of running every ``nn.Linear`` in ``module`` once per token (a policy's cost)."""
    macs = sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, torch.nn.Linear))
    return float(2 * macs * rows * tokens_per_row)
