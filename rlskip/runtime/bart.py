"""Skip-aware runtime for BART-family encoder-decoders (``BartForConditionalGeneration`` and
``BartForSequenceClassification``, or any model with BART's module layout). Kind ``seq2seq``.

Everything the forward pass needs is in this file, reading the Hugging Face module's own parameters (no
copies). What differs from the Hugging Face forward:

- **Skipping.** A skipped sub-layer is the identity on the residual stream. BART is post-LN
  (``x = LayerNorm(x + sublayer(x))``), so the sub-layer's LayerNorm is skipped too: the skipped block
  leaves ``x`` untouched. (Keeping the LayerNorm would re-normalise an unchanged stream, which costs time
  and moves the output away from what the following layer was trained to read.)
- **Rows.** Each sub-layer runs only on the rows whose plan executes it (:mod:`rlskip.runtime.rows`).
- **Token dropping.** After the first encoder layer, dropped tokens leave the tensors (re-packed, special
  tokens always kept), so later layers and the cross-attention memory are shorter. Tokens keep their
  original positions (the positional embedding was added before dropping).
- **Decoding.** :class:`_BartDecoder` feeds the shared search (:mod:`rlskip.runtime.search`) with a
  row-compact KV cache per decoder layer (:mod:`rlskip.runtime.cache`) and cross-attention keys/values
  projected once per instance for the rows that execute it, shared by its beams (the set-up it shares with
  T5 is in :mod:`rlskip.runtime.seq2seq`).
- :class:`_BartExitStack` exposes the decoder one layer at a time for the confident-early-exit baseline
  (:mod:`rlskip.methods`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rlskip import flops as fl
from rlskip.plan import Plan
from rlskip.runtime import register_runtime
from rlskip.runtime.base import ClassifyOutput, ModelDims, Observation, Runtime
from rlskip.runtime.rows import key_mask, on_rows, pack_tokens, pick, repeat_rows, row_sets, merge_heads as _merge, split_heads as _heads
from rlskip.runtime.seq2seq import CrossDecoder, CrossExitStack, teacher_forced
from rlskip.space import SkipSpace


@register_runtime
class BartRuntime(Runtime):
    """Execute a BART-family model under per-instance plans.

    Args:
        model: a ``BartForConditionalGeneration`` or ``BartForSequenceClassification`` (or same layout).
            The runtime keeps a reference; weights are used in place, never copied.
    """

    family = "bart"
    kind = "seq2seq"

    @classmethod
    def accepts(cls, model) -> bool:
        core = getattr(model, "model", None)
        enc, dec = getattr(core, "encoder", None), getattr(core, "decoder", None)
        if enc is None or dec is None or not hasattr(enc, "layers") or not hasattr(dec, "layers"):
            return False
        if getattr(getattr(model, "config", None), "model_type", None) == "bart":
            return True
        need_enc = ("self_attn", "self_attn_layer_norm", "fc1", "fc2", "final_layer_norm")
        need_dec = need_enc + ("encoder_attn", "encoder_attn_layer_norm")
        return (
            len(enc.layers) > 0
            and all(hasattr(enc.layers[0], a) for a in need_enc)
            and all(hasattr(dec.layers[0], a) for a in need_dec)
            and hasattr(enc, "layernorm_embedding")
            and not getattr(model.config, "normalize_before", False)
        )

    def __init__(self, model: nn.Module) -> None:
        if not self.accepts(model):
            raise ValueError(
                f"unsupported model family for the BART runtime: {type(model).__name__}; expected "
                "BartForConditionalGeneration, BartForSequenceClassification or a post-LN model with BART's layout"
            )
        self.model = model
        cfg = self.config = model.config
        self.encoder, self.decoder_stack = model.model.encoder, model.model.decoder
        self.space = SkipSpace.encoder_decoder("bart", len(self.encoder.layers), len(self.decoder_stack.layers))
        self.dims = ModelDims(cfg.d_model, cfg.vocab_size, cfg.max_position_embeddings)
        self.head = "classifier" if hasattr(model, "classification_head") else "lm"
        self.enc_attn = fl.AttentionShape.mha(cfg.d_model, cfg.encoder_attention_heads)
        self.dec_attn = fl.AttentionShape.mha(cfg.d_model, cfg.decoder_attention_heads)
        bit = self.space.bit
        self._enc_bits = [(bit(f"enc.{i}.attn"), bit(f"enc.{i}.ffn")) for i in range(1, len(self.encoder.layers))]
        self._dec_bits = [
            (bit(f"dec.{i}.self_attn"), bit(f"dec.{i}.cross_attn"), bit(f"dec.{i}.ffn"))
            for i in range(len(self.decoder_stack.layers))
        ]
        self.special_ids = sorted({i for i in (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) if i is not None})

    # ------------------------------------------------------------------------------------------------
    # sub-layers: each takes the residual stream and returns it updated (post-LN)
    def _dropout(self, x: torch.Tensor, p: float) -> torch.Tensor:
        return F.dropout(x, p=p, training=self.model.training) if p > 0 else x

    def _attention(self, attn: nn.Module, x: torch.Tensor, kv: torch.Tensor, mask, n_heads: int, causal: bool = False):
        q = _heads(F.linear(x, attn.q_proj.weight, attn.q_proj.bias), n_heads)
        k = _heads(F.linear(kv, attn.k_proj.weight, attn.k_proj.bias), n_heads)
        v = _heads(F.linear(kv, attn.v_proj.weight, attn.v_proj.bias), n_heads)
        p = attn.dropout if self.model.training else 0.0
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=causal, scale=attn.scaling)
        return F.linear(_merge(o), attn.out_proj.weight, attn.out_proj.bias)

    def _enc_attn(self, layer, x, mask):
        h = self._attention(layer.self_attn, x, x, mask, self.enc_attn.heads)
        return layer.self_attn_layer_norm(x + self._dropout(h, layer.dropout))

    def _ffn(self, layer, x):
        h = layer.activation_fn(F.linear(x, layer.fc1.weight, layer.fc1.bias))
        h = F.linear(self._dropout(h, layer.activation_dropout), layer.fc2.weight, layer.fc2.bias)
        return layer.final_layer_norm(x + self._dropout(h, layer.dropout))

    def _kv(self, attn: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        nh = self.dec_attn.heads
        return (
            _heads(F.linear(x, attn.k_proj.weight, attn.k_proj.bias), nh),
            _heads(F.linear(x, attn.v_proj.weight, attn.v_proj.bias), nh),
        )

    def _attend(self, attn: nn.Module, x: torch.Tensor, k, v, mask) -> torch.Tensor:
        """One decoder attention of query ``x`` over given keys/values: the sub-layer's output before the residual."""
        q = _heads(F.linear(x, attn.q_proj.weight, attn.q_proj.bias), self.dec_attn.heads)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attn.scaling)
        return F.linear(_merge(o), attn.out_proj.weight, attn.out_proj.bias)

    # ------------------------------------------------------------------------------------------------
    def observe(self, input_ids: torch.Tensor, attention_mask=None, protected=None) -> Observation:
        """Embeddings and the fixed-on first encoder layer for a batch of sources; special tokens are never dropped."""
        mask = self.check_inputs(input_ids, attention_mask)
        enc = self.encoder
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        h = enc.layernorm_embedding(enc.embed_tokens(input_ids) + enc.embed_positions.weight[enc.embed_positions.offset + positions])
        h = self._dropout(h, enc.dropout)
        first = enc.layers[0]
        h = self._ffn(first, self._enc_attn(first, h, key_mask(mask)))
        special = torch.isin(input_ids, torch.tensor(self.special_ids, device=input_ids.device))
        return Observation(h, mask, input_ids, self.always_keep(mask, special, protected), positions)

    def _encode(self, obs: Observation, plan: Plan) -> tuple[torch.Tensor, torch.Tensor]:
        """The rest of the encoder under the plan: ``(memory [b, s', d], memory_mask [b, s'])``."""
        keep = self.keep_mask(obs, plan)
        if keep is None:
            h, mask = obs.hidden.clone(), obs.attention_mask  # scatters write in place; the observation stays intact
        else:
            mask, (h,) = pack_tokens(keep, obs.hidden)
        rows = row_sets(plan.bits)
        for layer, (ba, bf) in zip(self.encoder.layers[1:], self._enc_bits):
            ra = rows[ba]
            h = on_rows(h, ra, lambda x, ra=ra: self._enc_attn(layer, x, key_mask(pick(mask, ra))))
            h = on_rows(h, rows[bf], lambda x: self._ffn(layer, x))
        return h, mask

    # ------------------------------------------------------------------------------------------------
    def _dec_embed(self, ids: torch.Tensor, start: int) -> torch.Tensor:
        dec = self.decoder_stack
        off = dec.embed_positions.offset
        pos = dec.embed_positions.weight[off + start : off + start + ids.shape[1]]
        h = dec.layernorm_embedding(dec.embed_tokens(ids) + pos)
        return self._dropout(h, dec.dropout)

    def _decode_parallel(self, ids: torch.Tensor, memory: torch.Tensor, mem_mask: torch.Tensor, plan: Plan) -> torch.Tensor:
        """One causal pass of the decoder over ``ids`` under the plan (teacher forcing / classification)."""
        h = self._dec_embed(ids, 0)
        rows = row_sets(plan.bits)
        nh = self.dec_attn.heads
        for layer, (bs, bc, bf) in zip(self.decoder_stack.layers, self._dec_bits):

            def self_attn(x, layer=layer):
                a = self._attention(layer.self_attn, x, x, None, nh, causal=x.shape[1] > 1)
                return layer.self_attn_layer_norm(x + self._dropout(a, layer.dropout))

            def cross_attn(x, r, layer=layer):
                a = self._attention(layer.encoder_attn, x, pick(memory, r), key_mask(pick(mem_mask, r)), nh)
                return layer.encoder_attn_layer_norm(x + self._dropout(a, layer.dropout))

            h = on_rows(h, rows[bs], self_attn)
            h = on_rows(h, rows[bc], lambda x, r=rows[bc]: cross_attn(x, r))
            h = on_rows(h, rows[bf], lambda x, layer=layer: self._ffn(layer, x))
        return h

    def _lm_logits(self, h: torch.Tensor) -> torch.Tensor:
        m = self.model
        return F.linear(h, m.lm_head.weight) + m.final_logits_bias

    def forward(
        self, obs: Observation, plan: Plan, labels: torch.Tensor | None = None, decoder_input_ids: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Teacher-forced forward under the plan: ``(logits [b, t, vocab], loss or None)``; without
        ``decoder_input_ids`` the labels are shifted right as Hugging Face BART does."""
        self.check_plan(obs, plan)
        if self.head != "lm":
            raise ValueError("this runtime wraps a sequence classifier: use classify(), not forward()")
        return teacher_forced(self, obs, plan, labels, decoder_input_ids)

    def _shift_right(self, labels: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        ids = labels.new_zeros(labels.shape)
        ids[:, 1:] = labels[:, :-1]
        ids[:, 0] = cfg.decoder_start_token_id
        return ids.masked_fill(ids == -100, cfg.pad_token_id)

    def classify(self, obs: Observation, plan: Plan, labels: torch.Tensor | None = None) -> ClassifyOutput:
        """Sequence classification under the plan (encoder + one decoder pass over the shifted source).

        The decoder reads the whole (undropped) source as Hugging Face BART does; the class is read at the
        last EOS.
        """
        self.check_plan(obs, plan)
        if self.head != "classifier":
            raise ValueError("classify() needs a BartForSequenceClassification model")
        ids = obs.input_ids
        eos = (ids == self.config.eos_token_id) & obs.attention_mask
        if not bool(eos.any(1).all()):
            raise ValueError("every source must contain an EOS token for BART classification")
        memory, mem_mask = self._encode(obs, plan)
        h = self._decode_parallel(self._shift_right(ids), memory, mem_mask, plan)
        last = (eos.long() * torch.arange(ids.shape[1], device=ids.device)).argmax(1)
        logits = self.model.classification_head(h[torch.arange(h.shape[0]), last])
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        kept = mem_mask.sum(1)
        executed, full = self.flops(plan, obs.lengths.cpu(), kept.cpu())
        return ClassifyOutput(logits, loss, executed, full, kept)

    def flops_table(self, lengths, kept, steps, beams: int = 1):
        """Encoder over ``lengths`` (first layer) and ``kept`` tokens; decoder: ``steps`` cached steps over
        ``beams`` rows with cross-attention keys projected once per instance, or for classification one
        parallel pass over the whole source (``steps=None``)."""
        c = self.config
        sf, sk = fl.lengths(lengths, kept)
        ea, da = self.enc_attn, self.dec_attn
        fixed = fl.attention(ea, sf, sf) + fl.mlp(sf, c.d_model, c.encoder_ffn_dim)  # the first encoder layer
        if steps is None:  # the classification head's decoder pass reads the full source, teacher-forced
            n, k = sf, 1
            fixed = fixed + fl.linear(1, c.d_model, c.d_model) + fl.linear(1, c.d_model, c.num_labels)  # dense, out_proj
            dec_self = fl.attention(da, n, n)
            dec_cross = fl.attention(da, n, sk)
        else:
            (n,), k = fl.lengths(steps), beams
            fixed = fixed + k * fl.lm_head(n, c.d_model, c.vocab_size)
            dec_self = k * fl.cached_self_attention(da, n)
            dec_cross = fl.kv_projection(da, sk) + k * fl.attention(da, n, sk, 0)
        per_kind = {
            "enc_attn": fl.attention(ea, sk, sk),
            "enc_ffn": fl.mlp(sk, c.d_model, c.encoder_ffn_dim),
            "dec_self_attn": dec_self,
            "dec_cross_attn": dec_cross,
            "dec_ffn": k * fl.mlp(n, c.d_model, c.decoder_ffn_dim),
        }
        return fixed, torch.stack([per_kind[cand.kind] for cand in self.space.skippable], dim=1)

    # ------------------------------------------------------------------------------------------------
    def decoder(self, obs: Observation, plan: Plan, beams: int, capacity: int):
        memory, mem_mask = self._encode(obs, plan)
        start = self.prompt(obs)[:, 0]
        return _BartDecoder(self, memory, mem_mask, plan.bits, beams, capacity, repeat_rows(start, beams)), mem_mask.sum(1)

    def exit_stack(self, obs: Observation, capacity: int) -> "_BartExitStack":
        """The full model's decoder one layer at a time, for :class:`rlskip.methods.EarlyExit`."""
        ones = Plan.all_ones(self.space, obs.batch_size)
        memory, mem_mask = self._encode(obs, ones)
        return _BartExitStack(self, obs, memory, mem_mask, capacity)


class _BartDecoder(CrossDecoder):
    """Incremental decoder for :mod:`rlskip.runtime.search` (:class:`~rlskip.runtime.seq2seq.CrossDecoder`)."""

    def __init__(self, rt: BartRuntime, memory, mem_mask, bits: torch.Tensor, beams: int, capacity: int, start) -> None:
        layers = rt.decoder_stack.layers
        super().__init__(rt, layers, lambda layer: layer.encoder_attn, rt.dec_attn, memory, mem_mask, bits, beams, capacity, start)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        rt = self.rt
        h = rt._dec_embed(tokens[:, None], self.t)
        for layer, (bs, bc, bf), cache, cross in zip(rt.decoder_stack.layers, rt._dec_bits, self.caches, self.cross):

            def self_attn(x, layer=layer, cache=cache):
                cache.write(*rt._kv(layer.self_attn, x))
                return layer.self_attn_layer_norm(x + rt._attend(layer.self_attn, x, *cache.view()))

            def cross_attn(x, layer=layer, cross=cross):
                return layer.encoder_attn_layer_norm(x + rt._attend(layer.encoder_attn, x, *cross))

            h = on_rows(h, self.rows[bs], self_attn)
            h = on_rows(h, self.rows[bc], cross_attn)
            h = on_rows(h, self.rows[bf], lambda x, layer=layer: rt._ffn(layer, x))
        self.advance()
        return rt._lm_logits(h[:, 0])


class _BartExitStack(CrossExitStack):
    """The full decoder one layer at a time for confident early exit (:class:`~rlskip.runtime.seq2seq.CrossExitStack`)."""

    def __init__(self, rt: BartRuntime, obs: Observation, memory, mem_mask, capacity: int) -> None:
        c = rt.config
        super().__init__(
            rt, rt.decoder_stack.layers, lambda layer: layer.encoder_attn, rt.dec_attn,
            fl.mlp(1, c.d_model, c.decoder_ffn_dim), obs, memory, mem_mask, capacity,
        )

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.rt._dec_embed(tokens[:, None], self.t)

    def layer(self, i: int, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        rt, layer, cache = self.rt, self.rt.decoder_stack.layers[i], self.caches[i]
        cache.write(*rt._kv(layer.self_attn, x), rows)
        x = layer.self_attn_layer_norm(x + rt._attend(layer.self_attn, x, *cache.view(rows)))
        k, v, m = self.cross[i]
        x = layer.encoder_attn_layer_norm(x + rt._attend(layer.encoder_attn, x, k[rows], v[rows], None if m is None else m[rows]))
        return rt._ffn(layer, x)

    def fill(self, i: int, x: torch.Tensor, rows: torch.Tensor) -> None:
        layer = self.rt.decoder_stack.layers[i]
        self.caches[i].write(*self.rt._kv(layer.self_attn, x), rows)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.rt._lm_logits(x[:, 0])
