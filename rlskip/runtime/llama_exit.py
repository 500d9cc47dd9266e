"""The Llama-layout stack one layer at a time, for confident early exit (:class:`rlskip.methods.EarlyExit`)."""

from __future__ import annotations

import torch

from rlskip import flops as fl
from rlskip.plan import Plan
from rlskip.runtime.base import Observation
from rlskip.runtime.llama import LlamaDecoder, LlamaRuntime


class LlamaExitStack:
    """The full model one layer at a time (every row, one cache per layer), for confident early exit.

    :meth:`prefill_logits` runs the prompt through every layer (its cost is in ``fixed_flops``); then
    ``layer(i, x, rows)`` runs layer ``i`` at the current position for the given rows and caches their keys and
    values; ``fill(i, x, rows)`` only caches keys/values projected from ``x`` (rows that exited earlier);
    ``logits(x)`` is the final norm and the LM head.
    """

    def __init__(self, rt: LlamaRuntime, obs: Observation, capacity: int) -> None:
        b = obs.batch_size
        self.rt, self.dec = rt, LlamaDecoder(rt, obs, Plan.all_ones(rt.space, b), 1, capacity)
        self.n_layers, self.vocab, self.start = len(rt.layers), rt.dims.vocab, None
        fixed, per = rt.flops_table(obs.lengths, obs.lengths, torch.ones(b), 1)  # one new token: the prompt pass
        self.fixed_flops = fixed + per.sum(1)
        c = rt.config
        self.kv_flops = float(fl.kv_projection(rt.attn, 1))
        self.head_flops = float(fl.lm_head(1, c.hidden_size, c.vocab_size))
        self._mlp_flops = float(fl.mlp(1, c.hidden_size, c.intermediate_size, gated=True))
        (self.lengths,) = fl.lengths(obs.lengths)

    def prefill_logits(self) -> torch.Tensor:
        return self.dec.prefill()

    def layer_flops(self, rows: torch.Tensor) -> torch.Tensor:
        """FLOPs of one full layer at the current position for each of ``rows``."""
        keys = self.lengths[rows.cpu()] + self.dec.t + 1
        w = self.rt.windows[0]
        keys = keys if w is None else keys.clamp(max=w)
        return fl.attention(self.rt.attn, 1, keys, 1) + self._mlp_flops

    def _rope(self, x: torch.Tensor, rows: torch.Tensor):
        qpos = self.dec.start[rows] + self.dec.t
        return (qpos, *self.rt.core.rotary_emb(x, qpos[:, None]))

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.rt.core.embed_tokens(tokens)[:, None]

    def layer(self, i: int, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        qpos, cos, sin = self._rope(x, rows)
        return self.rt._ffn(i, self.dec.attend(i, x, cos, sin, qpos, rows))

    def fill(self, i: int, x: torch.Tensor, rows: torch.Tensor) -> None:
        _, cos, sin = self._rope(x, rows)
        layer = self.rt.layers[i]
        self.dec.caches[i].write(*self.rt._kv(layer.self_attn, layer.input_layernorm(x), cos, sin), rows)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.rt._lm_logits(x[:, 0])

    def advance(self) -> None:
        self.dec.advance()
