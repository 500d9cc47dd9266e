"""Skip-aware runtime for decoder-only models with the Llama layout (``LlamaForCausalLM``, ``Qwen2ForCausalLM``,
``MistralForCausalLM``): pre-RMSNorm, rotary positions, grouped-query attention, gated (SwiGLU) feed-forward.
Kind ``causal``.

Everything the forward pass needs is in this file. It reads the Hugging Face modules' own parameters and calls
their own norms, gated MLPs and rotary embedding (so RoPE scaling, Qwen2's q/k/v biases and tied embeddings are
the model's). What differs from the Hugging Face forward:

- **Skipping.** Pre-LN: a sub-layer is ``x + f(norm(x))``; a skipped one is the identity on the residual stream,
  its norm included.
- **Rows.** Each sub-layer runs only on the rows whose plan executes it (:mod:`rlskip.runtime.rows`).
- **Token dropping.** After the first layer, dropped prompt tokens leave the tensors; kept ones keep their
  original rotary positions, so every later layer's KV cache is shorter. The first layer's keys and values of
  the whole prompt (computed before the plan was known, kept in ``Observation.state``) stay its cache.
- **Padding.** Inputs may be left- or right-padded; positions count real tokens (``cumsum(mask) - 1``, as
  ``generate()`` does). Inside, rows are right-packed and a key mask marks each row's valid cache columns.
- **Sliding window** (Mistral; Qwen2 with ``use_sliding_window``): a query at position ``p`` sees keys at
  original positions above ``p - window``. A decoding step attends over the cache columns that can hold such
  keys -- for one instance its last ``min(keys, window)``, as Hugging Face's sliding cache keeps -- masked by
  position.

:class:`LlamaDecoder` feeds the shared search (:mod:`rlskip.runtime.search`);
:class:`rlskip.runtime.llama_exit.LlamaExitStack` exposes the stack one layer at a time for confident early
exit (:mod:`rlskip.methods`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from rlskip import flops as fl
from rlskip.plan import Plan
from rlskip.runtime import register_runtime
from rlskip.runtime.base import ClassifyOutput, ModelDims, Observation, Runtime
from rlskip.runtime.cache import CachedDecoder, KVCache
from rlskip.runtime.rows import on_rows, pack_tokens, pick, repeat_rows, row_sets, split_heads as _heads
from rlskip.space import SkipSpace

# model types whose modeling files compute exactly what this runtime does (others reuse the module names but
# add embedding scales, norm offsets, q/k norms or fused projections)
MODEL_TYPES = ("llama", "qwen2", "mistral")


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of ``x [rows, heads, len, head_dim]`` (``cos``/``sin``: ``[rows, len, head_dim]``),
    computed as Hugging Face's ``apply_rotary_pos_emb``."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def _prompt_mask(mask: torch.Tensor, pos: torch.Tensor, window: int | None) -> torch.Tensor | None:
    """SDPA mask ``[rows, 1, len, len]``: each token attends to the real tokens at its position or before (and
    within ``window``); padding queries attend to everything, so no row is empty. None when a plain causal mask
    is the same (no padding, no position gap as wide as the window)."""
    if bool(mask.all()) and (window is None or int(pos.max()) < window):
        return None
    q, k = pos[:, :, None], pos[:, None, :]
    allowed = (k <= q) & mask[:, None, :]
    if window is not None:
        allowed &= q - k < window
    return (allowed | ~mask[:, :, None])[:, None]


@register_runtime
class LlamaRuntime(Runtime):
    """Execute a Llama-layout causal LM under per-instance plans.

    Args:
        model: a ``LlamaForCausalLM``, ``Qwen2ForCausalLM`` or ``MistralForCausalLM``. The runtime keeps a
            reference; weights are used in place, never copied.
    """

    family = "llama"
    kind = "causal"

    @classmethod
    def accepts(cls, model) -> bool:
        core, cfg = getattr(model, "model", None), getattr(model, "config", None)
        if getattr(cfg, "model_type", None) not in MODEL_TYPES or not hasattr(model, "lm_head"):
            return False
        if not all(hasattr(core, a) for a in ("embed_tokens", "layers", "norm", "rotary_emb")) or len(core.layers) == 0:
            return False
        layer = core.layers[0]
        parts = ("self_attn", "mlp", "input_layernorm", "post_attention_layernorm")
        projections = ("q_proj", "k_proj", "v_proj", "o_proj")
        return all(hasattr(layer, a) for a in parts) and all(hasattr(layer.self_attn, p) for p in projections)

    def __init__(self, model: nn.Module) -> None:
        if not self.accepts(model):
            raise ValueError(
                f"unsupported model for the Llama runtime: {type(model).__name__}; expected a causal LM of model type "
                f"{' / '.join(MODEL_TYPES)}"
            )
        self.model = model
        cfg = self.config = model.config
        self.core, self.layers = model.model, model.model.layers
        n = len(self.layers)
        self.space = SkipSpace.single_stack("llama", n, token_dropping=True)
        self.dims = ModelDims(cfg.hidden_size, cfg.vocab_size, cfg.max_position_embeddings)
        self.head = "lm"
        self.attn = fl.AttentionShape(
            cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, self.layers[0].self_attn.head_dim
        )
        self.windows = [self._window(layer.self_attn) for layer in self.layers]
        bit = self.space.bit
        self._bits = [(-1, -1)] + [(bit(f"{i}.attn"), bit(f"{i}.ffn")) for i in range(1, n)]  # layer 0 has none
        gen = model.generation_config
        given = [getattr(c, f"{t}_token_id", None) for c in (cfg, gen) for t in ("bos", "eos", "pad")]
        given = [x if isinstance(x, (list, tuple)) else [x] for x in given if x is not None]  # EOS may be a list
        self.special_ids = sorted({int(i) for x in given for i in x})

    def _window(self, attn: nn.Module) -> int | None:
        """A layer's sliding window: Qwen2 sets one per layer, Mistral's config one for all; Llama has none."""
        if hasattr(attn, "sliding_window"):
            w = attn.sliding_window
        else:
            w = getattr(self.config, "sliding_window", None) if self.config.model_type == "mistral" else None
        return None if w is None else int(w)

    # ------------------------------------------------------------------------------------------------
    # sub-layers: each takes the residual stream and returns it updated (pre-LN)
    def _q(self, attn: nn.Module, h: torch.Tensor, cos, sin) -> torch.Tensor:
        return _rotate(_heads(F.linear(h, attn.q_proj.weight, attn.q_proj.bias), self.attn.heads), cos, sin)

    def _kv(self, attn: nn.Module, h: torch.Tensor, cos, sin) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotated keys and values ``[rows, kv_heads, len, head_dim]`` of normed states ``h``."""
        k = _heads(F.linear(h, attn.k_proj.weight, attn.k_proj.bias), self.attn.kv_heads)
        v = _heads(F.linear(h, attn.v_proj.weight, attn.v_proj.bias), self.attn.kv_heads)
        return _rotate(k, cos, sin), v

    def _prompt_attn(self, i: int, x, cos, sin, mask, pos) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Layer ``i``'s attention sub-layer over prompt tokens: ``(keys, values, updated x)``."""
        layer = self.layers[i]
        attn, h = layer.self_attn, layer.input_layernorm(x)
        q, (k, v) = self._q(attn, h, cos, sin), self._kv(attn, h, cos, sin)
        am = _prompt_mask(mask, pos, self.windows[i])
        p = attn.attention_dropout if self.model.training else 0.0
        o = F.scaled_dot_product_attention(
            q, k, v, attn_mask=am, dropout_p=p, is_causal=am is None, scale=attn.scaling, enable_gqa=True
        )
        b, nh, s, hd = o.shape
        return k, v, x + F.linear(o.transpose(1, 2).reshape(b, s, nh * hd), attn.o_proj.weight, attn.o_proj.bias)

    def _attend_one(self, attn: nn.Module, q, keys, values, mask) -> torch.Tensor:
        """Attention output ``[rows, 1, d]`` of one query token per row over cached keys. Each key/value head's
        group of query heads is folded into the query length, so the cache is read once, not once per head."""
        n, nh, _, hd = q.shape
        kvh = keys.shape[1]
        q = q.reshape(n, kvh, nh // kvh, hd)
        o = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=attn.scaling)
        return F.linear(o.reshape(n, 1, nh * hd), attn.o_proj.weight, attn.o_proj.bias)

    def _ffn(self, i: int, x: torch.Tensor) -> torch.Tensor:
        layer = self.layers[i]
        return x + layer.mlp(layer.post_attention_layernorm(x))

    def _lm_logits(self, h: torch.Tensor) -> torch.Tensor:
        head = self.model.lm_head
        return F.linear(self.core.norm(h), head.weight, head.bias)

    # ------------------------------------------------------------------------------------------------
    def observe(self, input_ids: torch.Tensor, attention_mask=None, protected=None) -> Observation:
        """Embeddings and the fixed-on first layer over the prompt. Special tokens, ``protected`` ones and the last
        real token are never dropped; the first layer's keys and values go to ``state`` for decoding."""
        mask = self.check_inputs(input_ids, attention_mask)
        pos = (mask.long().cumsum(1) - 1).masked_fill(~mask, 0)
        h = self.core.embed_tokens(input_ids)
        cos, sin = self.core.rotary_emb(h, pos)
        k, v, h = self._prompt_attn(0, h, cos, sin, mask, pos)
        h = self._ffn(0, h)
        special = torch.isin(input_ids, torch.tensor(self.special_ids, dtype=torch.long, device=input_ids.device))
        width = torch.arange(input_ids.shape[1], device=input_ids.device)
        last = width[None, :] == (mask.long() * width).argmax(1, keepdim=True)
        keep = self.always_keep(mask, special, protected, last)
        state = {"keys": k.transpose(1, 2), "values": v.transpose(1, 2)}  # [batch, len, kv_heads, head_dim]
        return Observation(h, mask, input_ids, keep, pos, state=state)

    def _pack(self, obs: Observation, plan: Plan):
        """The first layer's output right-packed to the tokens the plan keeps: ``(keep, mask, hidden, positions)``,
        ``keep`` over the input's columns, the rest packed."""
        keep = self.keep_mask(obs, plan)
        keep = obs.attention_mask if keep is None else keep
        mask, (h, pos) = pack_tokens(keep, obs.hidden, obs.positions)
        return keep, mask, h, pos

    def _stack(self, h, mask, pos, bits: torch.Tensor, store: Callable | None = None) -> torch.Tensor:
        """Layers 1.. over right-packed prompt tokens under per-row ``bits``; ``store(i, rows, keys, values)``
        receives the keys and values of each executed attention (``rows``: instances that ran it, None for all)."""
        rows = row_sets(bits.to(h.device))
        cos, sin = self.core.rotary_emb(h, pos)
        for i in range(1, len(self.layers)):
            ba, bf = self._bits[i]

            def attn(x, i=i, r=rows[ba]):
                k, v, y = self._prompt_attn(i, x, pick(cos, r), pick(sin, r), pick(mask, r), pick(pos, r))
                if store is not None:
                    store(i, r, k, v)
                return y

            h = on_rows(h, rows[ba], attn)
            h = on_rows(h, rows[bf], lambda x, i=i: self._ffn(i, x))
        return h

    def forward(
        self,
        obs: Observation,
        plan: Plan,
        labels: torch.Tensor | None = None,
        decoder_input_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Teacher-forced forward over the observed sequence (prompt and target concatenated) under the plan:
        ``(logits [b, len, vocab], loss or None)``. Logits are aligned with the input; dropped and padding positions
        have none (zeros) and predict nothing in the loss. ``labels`` align with the input (-100: ignored) and are
        shifted inside, as Hugging Face's causal LM loss does."""
        self.check_plan(obs, plan)
        if decoder_input_ids is not None:
            raise ValueError(
                "a decoder-only model takes no decoder_input_ids: observe prompt + target and pass aligned labels"
            )
        if labels is not None and labels.shape != obs.input_ids.shape:
            want = list(obs.input_ids.shape)
            raise ValueError(f"labels have shape {list(labels.shape)}, expected the observed input's {want}")
        keep, mask, h, pos = self._pack(obs, plan)
        tok_logits = self._lm_logits(self._stack(h, mask, pos, plan.bits)[mask])  # [kept tokens, vocab]
        logits = tok_logits.new_zeros(*keep.shape, tok_logits.shape[-1])
        logits[keep] = tok_logits
        loss = None
        if labels is not None:
            loss = F.cross_entropy(tok_logits.float(), self.logit_targets(labels)[keep], ignore_index=-100)
        return logits, loss

    def logit_targets(self, labels: torch.Tensor) -> torch.Tensor:
        """Labels align with the input; each position predicts the next one's token."""
        return F.pad(labels[:, 1:], (0, 1), value=-100)

    def classify(self, obs: Observation, plan: Plan, labels: torch.Tensor | None = None) -> ClassifyOutput:
        raise ValueError("a causal LM has no classification head: classify by scoring label words on generation logits")

    def _cached(self, steps: torch.Tensor, past: torch.Tensor, window: int | None):
        """FLOPs of ``steps`` cached decoding steps after ``past`` prompt keys; a step sees at most ``window`` keys."""
        if window is None:
            return fl.cached_self_attention(self.attn, steps, past)
        growing = torch.minimum((window - past).clamp_min(0), steps)
        full = steps - growing
        return fl.cached_self_attention(self.attn, growing, past) + fl.attention(self.attn, full, window, full)

    def flops_table(self, lengths, kept, steps, beams: int = 1):
        """The first layer over the ``lengths``-token prompt is fixed. Generation (``steps`` new tokens per instance):
        every later layer runs over the ``kept`` prompt once per instance, then ``steps - 1`` cached steps over
        ``beams`` rows (the last new token is never fed back); the LM head reads the last prompt token once and
        each fed token. ``steps=None``: one teacher-forced :meth:`forward` over the kept tokens, LM head on each."""
        c, a = self.config, self.attn
        d, ff, vocab = c.hidden_size, c.intermediate_size, c.vocab_size
        full, kept = fl.lengths(lengths, kept)
        fixed = fl.attention(a, full, full) + fl.mlp(full, d, ff, gated=True)
        if steps is None:
            fixed = fixed + fl.lm_head(kept, d, vocab)
            attn = [fl.attention(a, kept, kept)] * len(self.layers)
            ffn = fl.mlp(kept, d, ff, gated=True)
        else:
            (fed,) = fl.lengths(torch.as_tensor(steps) - 1)
            fed = fed.clamp_min(0)
            fixed = fixed + beams * (self._cached(fed, full, self.windows[0]) + fl.mlp(fed, d, ff, gated=True))
            fixed = fixed + fl.lm_head(1, d, vocab) + beams * fl.lm_head(fed, d, vocab)
            attn = [fl.attention(a, kept, kept) + beams * self._cached(fed, kept, w) for w in self.windows]
            ffn = fl.mlp(kept, d, ff, gated=True) + beams * fl.mlp(fed, d, ff, gated=True)
        cols = [attn[cand.layer] if cand.kind == "attn" else ffn for cand in self.space.skippable]
        return fixed, torch.stack(cols, dim=1)

    # ------------------------------------------------------------------------------------------------
    def decoder(self, obs: Observation, plan: Plan, beams: int, capacity: int):
        """A :class:`LlamaDecoder` over ``batch * beams`` rows and ``[batch]`` the prompt tokens it kept."""
        dec = LlamaDecoder(self, obs, plan, beams, capacity)
        return dec, dec.kept

    def exit_stack(self, obs: Observation, capacity: int):
        """The full model one layer at a time, for :class:`rlskip.methods.EarlyExit`."""
        from rlskip.runtime.llama_exit import LlamaExitStack

        if len(set(self.windows)) > 1:
            raise ValueError("early exit needs the same attention window in every layer; this model mixes windows")
        return LlamaExitStack(self, obs, capacity)

    def sublayer_influence(self, obs: Observation) -> torch.Tensor:
        """ShortGPT's block influence of every skippable sub-layer, ``[batch, n_bits]``: one minus the cosine
        similarity of the residual stream before and after it, averaged over each instance's real prompt tokens,
        with every sub-layer running. Low influence: the sub-layer changes the stream little."""
        h, mask, pos = obs.hidden, obs.attention_mask, obs.positions
        cos, sin = self.core.rotary_emb(h, pos)
        out = h.new_zeros(obs.batch_size, self.space.n_bits)
        m = mask.to(h.dtype)

        def influence(before, after):
            return ((1 - F.cosine_similarity(before, after, dim=-1)) * m).sum(1) / m.sum(1)

        with torch.no_grad():
            for i in range(1, len(self.layers)):
                ba, bf = self._bits[i]
                y = self._prompt_attn(i, h, cos, sin, mask, pos)[2]
                out[:, ba], h = influence(h, y), y
                y = self._ffn(i, h)
                out[:, bf], h = influence(h, y), y
        return out


class LlamaDecoder(CachedDecoder):
    """Incremental decoding for :mod:`rlskip.runtime.search` over ``batch * beams`` rows (beams adjacent).

    :meth:`prefill` runs layers 1.. over each instance's kept prompt once and copies keys, values and logits to
    its beams. Each layer's :class:`KVCache` holds only the rows that execute its attention; the first layer's
    holds the whole prompt. A new token of row ``r`` at step ``t`` sits at position ``prompt length + t``.
    """

    def __init__(self, rt: LlamaRuntime, obs: Observation, plan: Plan, beams: int, capacity: int) -> None:
        self.rt, self.beams, self.capacity, self.t = rt, beams, capacity, 0
        self.bits = plan.bits.to(obs.hidden.device)
        self.rows = row_sets(repeat_rows(self.bits, beams))
        self.n_rows = obs.batch_size * beams
        keep, self.mask, self.h, self.pos = rt._pack(obs, plan)
        self.kept = keep.sum(1)
        self.start = repeat_rows(obs.lengths, beams)  # position of each row's first new token
        n = len(rt.layers)
        self.caches: list[KVCache | None] = [None] * n
        self.windows: list[tuple | None] = [None] * n  # per windowed cache: (key positions, fewest prompt keys, width)
        m0, (k0, v0, p0) = pack_tokens(obs.attention_mask, obs.state["keys"], obs.state["values"], obs.positions)
        self._store(0, k0.transpose(1, 2), v0.transpose(1, 2), m0, p0)

    def _store(self, i: int, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor) -> None:
        """Cache layer ``i``'s prompt keys/values (of the instances that ran it) for their beams."""
        rows, b = (None if i == 0 else self.rows[self.rt._bits[i][0]]), self.beams
        cache = self.caches[i] = KVCache(rows, self.n_rows, k.shape[1], k.shape[3], self.capacity, k)
        cache.prefill(repeat_rows(k, b), repeat_rows(v, b), repeat_rows(mask, b))
        if self.rt.windows[i] is not None:
            width = k.shape[2]
            new = pick(self.start, rows)[:, None] + torch.arange(self.capacity - width, device=k.device)
            self.windows[i] = (torch.cat((repeat_rows(pos, b), new), 1), int(mask.sum(1).min()), width)

    def prefill(self) -> torch.Tensor:
        rt, mask, pos = self.rt, self.mask, self.pos
        def store(i: int, rows: torch.Tensor | None, k: torch.Tensor, v: torch.Tensor) -> None:
            self._store(i, k, v, pick(mask, rows), pick(pos, rows))

        h = rt._stack(self.h, mask, pos, self.bits, store=store)
        last = h[torch.arange(h.shape[0], device=h.device), mask.sum(1) - 1]  # the last real token is always kept
        self.h = None
        return repeat_rows(rt._lm_logits(last), self.beams)

    def attend(self, i: int, x, cos, sin, qpos, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Layer ``i``'s attention sub-layer for one new token per row of ``x`` (the cache's ``rows``, None: all
        of them, at positions ``qpos``): cache its key/value, attend over the cache."""
        rt, layer, cache = self.rt, self.rt.layers[i], self.caches[i]
        attn, h = layer.self_attn, layer.input_layernorm(x)
        cache.write(*rt._kv(attn, h, cos, sin), rows)
        keys, values, mask = cache.view(rows)
        if self.windows[i] is not None:
            kpos, fewest, width = self.windows[i]
            w, t = rt.windows[i], self.t
            lo = max(0, fewest + t + 1 - w) if w > t + 1 else width + t + 1 - w  # first column any row may need
            kp = kpos[:, lo : keys.shape[2]] if rows is None else kpos[rows, lo : keys.shape[2]]
            inside = (kp > (qpos - w)[:, None])[:, None, None]
            keys, values, mask = keys[:, :, lo:], values[:, :, lo:], inside if mask is None else mask[..., lo:] & inside
        return x + rt._attend_one(attn, rt._q(attn, h, cos, sin), keys, values, mask)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        rt = self.rt
        x = rt.core.embed_tokens(tokens)[:, None]
        qpos = self.start + self.t
        cos, sin = rt.core.rotary_emb(x, qpos[:, None])
        for i in range(len(rt.layers)):
            ra, rf = (None, None) if i == 0 else (self.rows[j] for j in rt._bits[i])
            x = on_rows(x, ra, lambda y, i=i, r=ra: self.attend(i, y, pick(cos, r), pick(sin, r), pick(qpos, r)))
            x = on_rows(x, rf, lambda y, i=i: rt._ffn(i, y))
        self.advance()
        return rt._lm_logits(x[:, 0])
