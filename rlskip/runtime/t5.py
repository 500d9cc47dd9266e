"""Skip-aware runtime for T5 encoder-decoders (``T5ForConditionalGeneration``: T5 v1.0 with ReLU feed-forward
layers, v1.1 / FLAN-T5 with gated-GELU ones). Kind ``seq2seq``.

Everything the forward pass needs is in this file, reading the Hugging Face module's own parameters (no
copies); it follows :mod:`rlskip.runtime.bart`. What differs from BART, and from the Hugging Face forward:

- **Pre-LN skipping.** T5 normalises a sub-layer's input (``x + sublayer(RMSNorm(x))``), so a skipped
  sub-layer, its norm included, is the identity on the residual stream. Each stack ends with its own final norm.
- **Relative position bias.** Attention scores get a learned bias per head and relative-position bucket, read
  from the table of each stack's first layer (``relative_attention_bias``) and shared by all its layers. It is
  computed here from that table whatever the plan skips (the first layer's attention included), and from each
  token's *original* position: dropped tokens leave the tensors, the others keep their distances. Decoder
  self-attention uses causal buckets; cross-attention has no bias. Scores are not scaled (T5 folds
  ``1/sqrt(d_kv)`` into its initialisation).
- **Output scaling.** With tied embeddings (``config.scale_decoder_outputs``) the decoder's output is scaled by
  ``d_model ** -0.5`` before the LM head.
- **Rows, token dropping, decoding, early exit** as in BART: each sub-layer runs only on the rows whose plan
  executes it; dropped tokens are re-packed out after the first encoder layer (EOS always kept);
  :class:`_T5Decoder` feeds the shared search with row-compact KV caches and cross-attention keys/values
  projected once per instance; :class:`_T5ExitStack` serves :class:`rlskip.methods.EarlyExit` (both built on
  :mod:`rlskip.runtime.seq2seq`, which BART shares).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rlskip import flops as fl
from rlskip.plan import Plan
from rlskip.runtime import register_runtime
from rlskip.runtime.base import ClassifyOutput, ModelDims, Observation, Runtime
from rlskip.runtime.cache import KVCache
from rlskip.runtime.rows import key_mask, on_rows, pack_tokens, pick, repeat_rows, row_sets, merge_heads as _merge, split_heads as _heads
from rlskip.runtime.seq2seq import CrossDecoder, CrossExitStack, teacher_forced
from rlskip.space import SkipSpace


def _pick_shared(x: torch.Tensor | None, rows: torch.Tensor | None) -> torch.Tensor | None:
    """``x[rows]``, or ``x`` itself when it is shared by every row (batch dimension 1) or None."""
    return x if x is None or x.shape[0] == 1 else pick(x, rows)


def _biased(bias: torch.Tensor, allowed: torch.Tensor | None) -> torch.Tensor:
    """The additive mask SDPA reads: the position bias where ``allowed`` (bool, broadcastable), the dtype's
    minimum elsewhere -- Hugging Face's ``create_position_bias_mask``."""
    return bias if allowed is None else torch.where(allowed, bias, torch.finfo(bias.dtype).min)


@register_runtime
class T5Runtime(Runtime):
    """Execute a ``T5ForConditionalGeneration`` under per-instance plans (weights used in place, never copied)."""

    family = "t5"
    kind = "seq2seq"

    @classmethod
    def accepts(cls, model) -> bool:
        return (
            getattr(getattr(model, "config", None), "model_type", None) == "t5"
            and hasattr(model, "lm_head")
            and hasattr(getattr(model, "encoder", None), "block")
            and hasattr(getattr(model, "decoder", None), "block")
        )

    def __init__(self, model: nn.Module) -> None:
        if not self.accepts(model):
            raise ValueError(f"unsupported model for the T5 runtime: {type(model).__name__}; expected T5ForConditionalGeneration")
        self.model = model
        cfg = self.config = model.config
        self.encoder, self.decoder_stack = model.encoder, model.decoder
        self.space = SkipSpace.encoder_decoder("t5", len(self.encoder.block), len(self.decoder_stack.block))
        self.dims = ModelDims(cfg.d_model, cfg.vocab_size, None)  # relative positions: no absolute limit
        self.head = "lm"
        self.attn = fl.AttentionShape(cfg.d_model, cfg.num_heads, cfg.num_heads, cfg.d_kv)
        self.out_scale = cfg.d_model**-0.5 if cfg.scale_decoder_outputs else None
        bit = self.space.bit
        self._enc_bits = [(bit(f"enc.{i}.attn"), bit(f"enc.{i}.ffn")) for i in range(1, len(self.encoder.block))]
        self._dec_bits = [
            (bit(f"dec.{i}.self_attn"), bit(f"dec.{i}.cross_attn"), bit(f"dec.{i}.ffn"))
            for i in range(len(self.decoder_stack.block))
        ]
        eos = cfg.eos_token_id if isinstance(cfg.eos_token_id, list) else [cfg.eos_token_id]
        self.special_ids = sorted({i for i in (*eos, cfg.pad_token_id) if i is not None})

    # ------------------------------------------------------------------------------------------------
    # position bias, from each stack's first-layer table
    def _position_bias(self, stack: nn.Module, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        """``[b, heads, q, k]`` bias of queries at positions ``q_pos [b, q]`` over keys at ``k_pos [b, k]``
        (bidirectional buckets in the encoder, causal ones in the decoder)."""
        attn = stack.block[0].layer[0].SelfAttention
        bucket = attn._relative_position_bucket(
            k_pos[:, None, :] - q_pos[:, :, None], bidirectional=not stack.is_decoder,
            num_buckets=attn.relative_attention_num_buckets, max_distance=attn.relative_attention_max_distance,
        )
        return attn.relative_attention_bias(bucket).permute(0, 3, 1, 2)

    def _encoder_mask(self, positions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The encoder's additive attention mask ``[b or 1, heads, s, s]``: bias from the tokens' original
        positions over real keys, computed once for every layer (once for the batch when rows share positions)."""
        if bool((positions == positions[:1]).all()):
            positions = positions[:1]
        return _biased(self._position_bias(self.encoder, positions, positions), key_mask(mask))

    def _decoder_bias(self, capacity: int, device: torch.device) -> torch.Tensor:
        """``[1, heads, 1, capacity]`` decoder self-attention bias of a key ``d`` positions before its query
        (index ``d``); :meth:`_step_bias` reads one step's row from it."""
        return self._position_bias(
            self.decoder_stack, torch.zeros(1, 1, dtype=torch.long, device=device), -torch.arange(capacity, device=device)[None]
        )

    @staticmethod
    def _step_bias(table: torch.Tensor, t: int) -> torch.Tensor:
        """``[1, heads, 1, t + 1]`` the bias of the query at position ``t`` over keys ``0 .. t``."""
        return table[..., : t + 1].flip(-1)

    # ------------------------------------------------------------------------------------------------
    # sub-layers: each takes the residual stream and returns it updated (pre-LN)
    def _dropout(self, x: torch.Tensor) -> torch.Tensor:
        p = self.config.dropout_rate
        return F.dropout(x, p=p, training=self.model.training) if p > 0 else x

    def _kv(self, attn: nn.Module, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _heads(F.linear(y, attn.k.weight), attn.n_heads), _heads(F.linear(y, attn.v.weight), attn.n_heads)

    def _attend(self, attn: nn.Module, y: torch.Tensor, k, v, mask) -> torch.Tensor:
        """Attention of the normalised queries ``y`` over given keys/values: the sub-layer's output before the residual."""
        q = _heads(F.linear(y, attn.q.weight), attn.n_heads)
        p = attn.dropout if self.model.training else 0.0
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, scale=1.0)
        return F.linear(_merge(o), attn.o.weight)

    def _self_attn(self, block: nn.Module, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        sub = block.layer[0]
        y = sub.layer_norm(x)
        return x + self._dropout(self._attend(sub.SelfAttention, y, *self._kv(sub.SelfAttention, y), mask))

    def _cached_self_attn(self, block: nn.Module, x: torch.Tensor, cache: KVCache, bias: torch.Tensor, rows=None):
        """Decoder self-attention of one new position: cache its keys/values (for the cache's local ``rows``,
        all if None) and attend over the cache with the causal position bias."""
        sub = block.layer[0]
        y = sub.layer_norm(x)
        cache.write(*self._kv(sub.SelfAttention, y), rows)
        k, v, m = cache.view(rows)
        return x + self._dropout(self._attend(sub.SelfAttention, y, k, v, _biased(bias, m)))

    def _cross_attn(self, block: nn.Module, x: torch.Tensor, k, v, mask) -> torch.Tensor:
        sub = block.layer[1]
        return x + self._dropout(self._attend(sub.EncDecAttention, sub.layer_norm(x), k, v, mask))

    def _ffn(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        sub = block.layer[-1]
        d, y = sub.DenseReluDense, sub.layer_norm(x)
        if self.config.is_gated_act:
            h = d.act(F.linear(y, d.wi_0.weight)) * F.linear(y, d.wi_1.weight)
        else:
            h = d.act(F.linear(y, d.wi.weight))
        h = self._dropout(h).to(d.wo.weight.dtype)  # Hugging Face keeps `wo` in float32 under half precision
        return x + self._dropout(F.linear(h, d.wo.weight))

    def _lm_logits(self, h: torch.Tensor) -> torch.Tensor:
        """LM head of the decoder's final-normed output (scaled first when embeddings are tied)."""
        return self.model.lm_head(h if self.out_scale is None else h * self.out_scale)

    # ------------------------------------------------------------------------------------------------
    def observe(self, input_ids: torch.Tensor, attention_mask=None, protected=None) -> Observation:
        """Embeddings and the fixed-on first encoder layer for a batch of sources; EOS is never dropped."""
        mask = self.check_inputs(input_ids, attention_mask)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        first = self.encoder.block[0]
        h = self._dropout(self.encoder.embed_tokens(input_ids))
        h = self._ffn(first, self._self_attn(first, h, self._encoder_mask(positions, mask)))
        special = torch.isin(input_ids, torch.tensor(self.special_ids, device=input_ids.device))
        return Observation(h, mask, input_ids, self.always_keep(mask, special, protected), positions)

    def _encode(self, obs: Observation, plan: Plan) -> tuple[torch.Tensor, torch.Tensor]:
        """The rest of the encoder under the plan, final norm included: ``(memory [b, s', d], memory_mask [b, s'])``."""
        keep = self.keep_mask(obs, plan)
        if keep is None:  # scatters write in place; the observation stays intact
            h, mask, positions = obs.hidden.clone(), obs.attention_mask, obs.positions
        else:
            mask, (h, positions) = pack_tokens(keep, obs.hidden, obs.positions)
        bias = self._encoder_mask(positions, mask)
        rows = row_sets(plan.bits)
        for block, (ba, bf) in zip(self.encoder.block[1:], self._enc_bits):
            ra = rows[ba]
            h = on_rows(h, ra, lambda x, block=block, ra=ra: self._self_attn(block, x, _pick_shared(bias, ra)))
            h = on_rows(h, rows[bf], lambda x, block=block: self._ffn(block, x))
        return self._dropout(self.encoder.final_layer_norm(h)), mask

    def _decode_parallel(self, ids: torch.Tensor, memory: torch.Tensor, mem_mask: torch.Tensor, plan: Plan) -> torch.Tensor:
        """One causal pass of the decoder over ``ids`` under the plan (teacher forcing), final norm included."""
        dec, n = self.decoder_stack, ids.shape[1]
        pos = torch.arange(n, device=ids.device)[None]
        causal = torch.ones(n, n, dtype=torch.bool, device=ids.device).tril()
        self_mask = _biased(self._position_bias(dec, pos, pos), causal)
        cross_mask = key_mask(mem_mask)
        h = self._dropout(dec.embed_tokens(ids))
        rows = row_sets(plan.bits)
        for block, (bs, bc, bf) in zip(dec.block, self._dec_bits):

            def cross_attn(x, r, block=block):
                k, v = self._kv(block.layer[1].EncDecAttention, pick(memory, r))
                return self._cross_attn(block, x, k, v, pick(cross_mask, r))

            h = on_rows(h, rows[bs], lambda x, block=block: self._self_attn(block, x, self_mask))
            h = on_rows(h, rows[bc], lambda x, r=rows[bc]: cross_attn(x, r))
            h = on_rows(h, rows[bf], lambda x, block=block: self._ffn(block, x))
        return self._dropout(dec.final_layer_norm(h))

    def forward(
        self, obs: Observation, plan: Plan, labels: torch.Tensor | None = None, decoder_input_ids: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Teacher-forced forward under the plan: ``(logits [b, t, vocab], loss or None)``; without
        ``decoder_input_ids`` the labels are shifted right as Hugging Face T5 does."""
        self.check_plan(obs, plan)
        return teacher_forced(self, obs, plan, labels, decoder_input_ids)

    def _shift_right(self, labels: torch.Tensor) -> torch.Tensor:
        start, pad = getattr(self.config, "decoder_start_token_id", None), self.config.pad_token_id
        if start is None or pad is None:
            raise ValueError("shifting labels right needs the model config's decoder_start_token_id and pad_token_id")
        ids = labels.new_zeros(labels.shape)
        ids[:, 1:] = labels[:, :-1]
        ids[:, 0] = start
        return ids.masked_fill(ids == -100, pad)

    def classify(self, obs: Observation, plan: Plan, labels: torch.Tensor | None = None) -> ClassifyOutput:
        raise ValueError("the T5 runtime wraps T5ForConditionalGeneration, a generator: use generate() or forward()")

    def flops_table(self, lengths, kept, steps, beams: int = 1):
        """Encoder over ``lengths`` (first layer) and ``kept`` tokens; decoder: ``steps`` cached steps over
        ``beams`` rows, cross-attention keys projected once per instance; the LM head once per step and row."""
        if steps is None:
            raise ValueError("the T5 runtime generates: its FLOPs need the number of decoding steps")
        c, a = self.config, self.attn
        sf, sk, n = fl.lengths(lengths, kept, steps)
        fixed = fl.attention(a, sf, sf) + self._mlp_flops(sf) + beams * fl.lm_head(n, c.d_model, c.vocab_size)
        per_kind = {
            "enc_attn": fl.attention(a, sk, sk),
            "enc_ffn": self._mlp_flops(sk),
            "dec_self_attn": beams * fl.cached_self_attention(a, n),
            "dec_cross_attn": fl.kv_projection(a, sk) + beams * fl.attention(a, n, sk, 0),
            "dec_ffn": beams * self._mlp_flops(n),
        }
        return fixed, torch.stack([per_kind[cand.kind] for cand in self.space.skippable], dim=1)

    def _mlp_flops(self, n):
        return fl.mlp(n, self.config.d_model, self.config.d_ff, gated=self.config.is_gated_act)

    # ------------------------------------------------------------------------------------------------
    def decoder(self, obs: Observation, plan: Plan, beams: int, capacity: int):
        memory, mem_mask = self._encode(obs, plan)
        start = self.prompt(obs)[:, 0]
        return _T5Decoder(self, memory, mem_mask, plan.bits, beams, capacity, repeat_rows(start, beams)), mem_mask.sum(1)

    def exit_stack(self, obs: Observation, capacity: int) -> "_T5ExitStack":
        """The full model's decoder one layer at a time, for :class:`rlskip.methods.EarlyExit`."""
        memory, mem_mask = self._encode(obs, Plan.all_ones(self.space, obs.batch_size))
        return _T5ExitStack(self, obs, memory, mem_mask, capacity)


class _T5Decoder(CrossDecoder):
    """Incremental decoder for :mod:`rlskip.runtime.search` (:class:`~rlskip.runtime.seq2seq.CrossDecoder`), with
    the decoder's causal position bias for every position it may reach."""

    def __init__(self, rt: T5Runtime, memory, mem_mask, bits: torch.Tensor, beams: int, capacity: int, start) -> None:
        blocks = rt.decoder_stack.block
        super().__init__(rt, blocks, lambda b: b.layer[1].EncDecAttention, rt.attn, memory, mem_mask, bits, beams, capacity, start)
        self.bias = rt._decoder_bias(capacity, memory.device)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        rt = self.rt
        h = rt._dropout(rt.decoder_stack.embed_tokens(tokens[:, None]))
        bias = rt._step_bias(self.bias, self.t)
        for block, (bs, bc, bf), cache, cross in zip(rt.decoder_stack.block, rt._dec_bits, self.caches, self.cross):
            h = on_rows(h, self.rows[bs], lambda x, block=block, cache=cache: rt._cached_self_attn(block, x, cache, bias))
            h = on_rows(h, self.rows[bc], lambda x, block=block, cross=cross: rt._cross_attn(block, x, *cross))
            h = on_rows(h, self.rows[bf], lambda x, block=block: rt._ffn(block, x))
        self.advance()
        return rt._lm_logits(rt._dropout(rt.decoder_stack.final_layer_norm(h[:, 0])))


class _T5ExitStack(CrossExitStack):
    """The full decoder one layer at a time for confident early exit (:class:`~rlskip.runtime.seq2seq.CrossExitStack`);
    ``logits(x)`` is the final norm and the (scaled) LM head, so an intermediate state is read as the last
    layer's output would be."""

    def __init__(self, rt: T5Runtime, obs: Observation, memory, mem_mask, capacity: int) -> None:
        super().__init__(
            rt, rt.decoder_stack.block, lambda b: b.layer[1].EncDecAttention, rt.attn, rt._mlp_flops(1), obs, memory,
            mem_mask, capacity,
        )
        self.bias = rt._decoder_bias(capacity, memory.device)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.rt._dropout(self.rt.decoder_stack.embed_tokens(tokens[:, None]))

    def layer(self, i: int, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        rt, block = self.rt, self.rt.decoder_stack.block[i]
        x = rt._cached_self_attn(block, x, self.caches[i], rt._step_bias(self.bias, self.t), rows)
        k, v, m = self.cross[i]
        x = rt._cross_attn(block, x, k[rows], v[rows], None if m is None else m[rows])
        return rt._ffn(block, x)

    def fill(self, i: int, x: torch.Tensor, rows: torch.Tensor) -> None:
        sub = self.rt.decoder_stack.block[i].layer[0]
        self.caches[i].write(*self.rt._kv(sub.SelfAttention, sub.layer_norm(x)), rows)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.rt._lm_logits(self.rt.decoder_stack.final_layer_norm(x[:, 0]))
