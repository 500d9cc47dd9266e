"""What the encoder-decoder families (:mod:`rlskip.runtime.bart`, :mod:`rlskip.runtime.t5`) share when they decode:
the teacher-forced forward, the per-layer caches of the incremental decoder and the FLOPs book-keeping of the
early-exit stack.

A family subclasses :class:`CrossDecoder` (its ``step``) and :class:`CrossExitStack` (its ``embed``, ``layer``,
``fill`` and ``logits``). It hands them its decoder layers, how to reach a layer's cross-attention module, and
its decoder attention shape; the family's runtime provides ``_kv(attention_module, x)`` (keys and values split
into heads) and ``_dec_bits`` (per decoder layer, the plan bits of its self-attention, cross-attention and FFN),
and for :func:`teacher_forced` its ``_encode``, ``_decode_parallel``, ``_lm_logits`` and ``_shift_right``.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from rlskip import flops as fl
from rlskip.plan import Plan
from rlskip.runtime.base import Observation, Runtime
from rlskip.runtime.cache import CachedDecoder, KVCache
from rlskip.runtime.rows import key_mask, pick, repeat_rows, row_sets


def teacher_forced(rt: Runtime, obs: Observation, plan: Plan, labels: torch.Tensor | None, decoder_input_ids: torch.Tensor | None):
    """The encoder, then one causal decoder pass under the plan: ``(logits [b, t, vocab], loss or None)``; without
    ``decoder_input_ids`` the labels are shifted right (the family's ``_shift_right``)."""
    if decoder_input_ids is None:
        if labels is None:
            raise ValueError("forward() needs labels or decoder_input_ids")
        decoder_input_ids = rt._shift_right(labels)
    memory, mem_mask = rt._encode(obs, plan)
    logits = rt._lm_logits(rt._decode_parallel(decoder_input_ids, memory, mem_mask, plan))
    loss = None
    if labels is not None:
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
    return logits, loss


class CrossDecoder(CachedDecoder):
    """Incremental decoder for :mod:`rlskip.runtime.search`: one position per call, per-row KV caches.

    Rows are ``batch * beams`` (beams of an instance adjacent). For each decoder layer the self-attention
    cache holds only the rows that execute it, and the cross-attention keys/values are projected once per
    instance for the rows that execute it, then shared by its beams. ``self.rows[j]`` lists the rows executing
    candidate ``j`` (None: all); ``self.caches[i]`` and ``self.cross[i]`` (keys, values, key mask) are None for a
    layer no row runs. A subclass's ``step`` ends with :meth:`advance`.
    """

    def __init__(
        self, rt: Runtime, layers: Sequence[nn.Module], cross_attention: Callable[[nn.Module], nn.Module],
        attn: fl.AttentionShape, memory: torch.Tensor, mem_mask: torch.Tensor, bits: torch.Tensor, beams: int,
        capacity: int, start: torch.Tensor,
    ) -> None:
        self.rt, self.start, self.t = rt, start, 0
        row_bits = repeat_rows(bits.to(memory.device), beams)
        n_rows = row_bits.shape[0]
        self.rows = row_sets(row_bits)
        inst_rows = row_sets(bits.to(memory.device))
        self.caches: list[KVCache | None] = []
        self.cross: list[tuple | None] = []
        for layer, (bs, bc, _) in zip(layers, rt._dec_bits):
            r = self.rows[bs]
            self.caches.append(None if r is not None and r.numel() == 0 else KVCache(r, n_rows, attn.heads, attn.head_dim, capacity, memory))
            r = inst_rows[bc]
            if r is not None and r.numel() == 0:
                self.cross.append(None)
                continue
            k, v = rt._kv(cross_attention(layer), pick(memory, r))
            self.cross.append((repeat_rows(k, beams), repeat_rows(v, beams), repeat_rows(key_mask(pick(mem_mask, r)), beams)))

    def prefill(self) -> torch.Tensor:
        """An encoder-decoder's prompt is its start token: the first step."""
        return self.step(self.start)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class CrossExitStack:
    """The full decoder one layer at a time (all rows, one cache per layer), for confident early exit
    (:class:`rlskip.methods.EarlyExit`).

    ``layer(i, x, rows)`` runs decoder layer ``i`` at the current position for the given rows (their states
    ``x``) and caches their self-attention keys/values; ``fill(i, x, rows)`` only caches keys/values projected
    from ``x`` (rows that exited earlier and copy their state forward); ``logits(x)`` reads a state as the last
    layer's output would be read. Those four are the family's; this class holds the caches, the
    cross-attention memory and the FLOPs the method charges.
    """

    def __init__(
        self, rt: Runtime, layers: Sequence[nn.Module], cross_attention: Callable[[nn.Module], nn.Module],
        attn: fl.AttentionShape, mlp_flops_one_token: torch.Tensor | float, obs: Observation, memory: torch.Tensor,
        mem_mask: torch.Tensor, capacity: int,
    ) -> None:
        self.rt, self.t, self.vocab, self.attn = rt, 0, rt.dims.vocab, attn
        self.n_layers = len(layers)
        rows = memory.shape[0]
        self.caches = [KVCache(None, rows, attn.heads, attn.head_dim, capacity, memory) for _ in layers]
        self.cross = [(*rt._kv(cross_attention(layer), memory), key_mask(mem_mask)) for layer in layers]
        self.start = rt.prompt(obs)[:, 0]
        self.mem_len = mem_mask.sum(1).cpu().to(torch.float64)
        c = rt.config
        # FLOPs outside the decoding steps: the encoder and every layer's cross-attention memory projection
        fixed, per = rt.flops_table(obs.lengths, obs.lengths, torch.zeros(rows), 1)
        enc = [j for j, cand in enumerate(rt.space.skippable) if cand.kind in ("enc_attn", "enc_ffn")]
        self.fixed_flops = fixed + per[:, enc].sum(1) + self.n_layers * fl.kv_projection(attn, self.mem_len)
        self.kv_flops = float(fl.kv_projection(attn, 1))
        self.head_flops = float(fl.lm_head(1, c.d_model, c.vocab_size))
        self._layer_base = fl.attention(attn, 1, 0, 1) + mlp_flops_one_token + fl.attention(attn, 1, 0, 0)

    def prefill_logits(self) -> None:
        """An encoder-decoder has no prompt to run: decoding starts by stepping ``start``."""
        return None

    def layer_flops(self, rows: torch.Tensor) -> torch.Tensor:
        """FLOPs of one full decoder layer at the current position for each of ``rows``."""
        inner = self.attn.heads * self.attn.head_dim
        return self._layer_base + 4 * inner * ((self.t + 1) + self.mem_len[rows.cpu()])

    def advance(self) -> None:
        for cache in self.caches:
            cache.advance()
        self.t += 1
