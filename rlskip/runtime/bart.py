"""Skip-aware runtime for BART-family encoder-decoders (``BartForConditionalGeneration`` and
``BartForSequenceClassification``, or any model with BART's module layout).

Everything the forward pass needs is in this file, reading the Hugging Face module's own parameters (no
copies). What differs from the Hugging Face forward:

- **Skipping.** A skipped sub-layer is the identity on the residual stream. BART is post-LN
  (``x = LayerNorm(x + sublayer(x))``), so the sub-layer's LayerNorm is skipped too: the skipped block
  leaves ``x`` untouched. (Keeping the LayerNorm would re-normalise an unchanged stream, which costs time
  and moves the output away from what the following layer was trained to read.)
- **Gather/scatter.** Each sub-layer runs only on the rows whose plan executes it: those rows are
  gathered, the sub-layer runs on them, the results are scattered back. A skipped sub-layer costs nothing
  for the rows that skip it, so a batch of distinct plans saves as much as the same plans run alone.
- **Token dropping.** After the first encoder layer, dropped tokens leave the tensors: each row is
  re-packed to its kept tokens (special tokens always kept) and the batch is padded to the longest kept
  row, so later layers and the cross-attention memory are shorter. Tokens keep their original positions
  (the positional embedding was added before dropping).
- **Decoding.** The runtime owns the loop (``search.py``) with a preallocated KV cache per decoder layer
  holding only the rows that execute that layer's self-attention; positions are kept by the loop, not
  derived from a cache length. Plans hold for every step and every beam.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rlskip.flops import Dims, encoder_decoder_flops, plan_flops
from rlskip.plan import Plan
from rlskip.runtime import register_runtime
from rlskip.runtime.base import GenerateOutput, Observation, Runtime
from rlskip.runtime.search import beam_search, greedy_search, resolve_settings
from rlskip.space import SkipSpace

_EMPTY = torch.empty(0, dtype=torch.long)


def _is_bart(model) -> bool:
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


def _row_sets(bits: torch.Tensor) -> list[torch.Tensor | None]:
    """Per candidate: ``None`` if every row executes it, else the (possibly empty) indices that do."""
    out: list[torch.Tensor | None] = []
    all_on, any_on = bits.all(0).tolist(), bits.any(0).tolist()
    for j in range(bits.shape[1]):
        if all_on[j]:
            out.append(None)
        elif not any_on[j]:
            out.append(_EMPTY.to(bits.device))
        else:
            out.append(bits[:, j].nonzero().flatten())
    return out


def _on_rows(h: torch.Tensor, rows: torch.Tensor | None, fn) -> torch.Tensor:
    """Apply ``fn`` to the rows of ``h`` listed in ``rows`` (all if None) and leave the others untouched."""
    if rows is None:
        return fn(h)
    if rows.numel() == 0:
        return h
    sub = fn(h.index_select(0, rows))
    if torch.is_grad_enabled() and (h.requires_grad or sub.requires_grad):
        return h.index_copy(0, rows, sub)
    return h.index_copy_(0, rows, sub)


def _heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """``[b, s, d] -> [b, heads, s, d / heads]``."""
    b, s, d = x.shape
    return x.view(b, s, n_heads, d // n_heads).transpose(1, 2)


def _merge(x: torch.Tensor) -> torch.Tensor:
    b, h, s, dh = x.shape
    return x.transpose(1, 2).reshape(b, s, h * dh)


@register_runtime("bart", _is_bart)
class BartRuntime(Runtime):
    """Execute a BART-family model under per-instance plans.

    Args:
        model: a ``BartForConditionalGeneration`` or ``BartForSequenceClassification`` (or same layout).
            The runtime keeps a reference; weights are used in place, never copied.
    """

    family = "bart"

    def __init__(self, model: nn.Module) -> None:
        if not _is_bart(model):
            raise ValueError(
                f"unsupported model family for the BART runtime: {type(model).__name__}; expected "
                "BartForConditionalGeneration, BartForSequenceClassification or a post-LN model with BART's layout"
            )
        self.model = model
        cfg = model.config
        self.config = cfg
        self.encoder, self.decoder = model.model.encoder, model.model.decoder
        self.space = SkipSpace.encoder_decoder("bart", len(self.encoder.layers), len(self.decoder.layers))
        self.dims = Dims(
            cfg.d_model, cfg.encoder_ffn_dim, cfg.decoder_ffn_dim, cfg.vocab_size, cfg.encoder_layers, cfg.decoder_layers
        )
        self.n_heads_enc, self.n_heads_dec = cfg.encoder_attention_heads, cfg.decoder_attention_heads
        bit = self.space.bit
        self._enc_bits = [
            (None, None) if i == 0 else (bit(f"enc.{i}.attn"), bit(f"enc.{i}.ffn")) for i in range(len(self.encoder.layers))
        ]
        self._dec_bits = [
            (bit(f"dec.{i}.self_attn"), bit(f"dec.{i}.cross_attn"), bit(f"dec.{i}.ffn")) for i in range(len(self.decoder.layers))
        ]
        self.special_ids = sorted({i for i in (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) if i is not None})
        self.is_classifier = hasattr(model, "classification_head")

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
        h = self._attention(layer.self_attn, x, x, mask, self.n_heads_enc)
        return layer.self_attn_layer_norm(x + self._dropout(h, layer.dropout))

    def _ffn(self, layer, x):
        h = layer.activation_fn(F.linear(x, layer.fc1.weight, layer.fc1.bias))
        h = F.linear(self._dropout(h, layer.activation_dropout), layer.fc2.weight, layer.fc2.bias)
        return layer.final_layer_norm(x + self._dropout(h, layer.dropout))

    @staticmethod
    def _key_mask(mask: torch.Tensor) -> torch.Tensor | None:
        """Boolean key-padding mask ``[b, 1, 1, s]`` for SDPA, or None when nothing is padded."""
        return None if bool(mask.all()) else mask[:, None, None, :]

    # ------------------------------------------------------------------------------------------------
    def observe(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> Observation:
        """Embeddings and the fixed-on first encoder layer for a batch of (right-padded) sources."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype != torch.long:
            raise ValueError("input_ids must be a long tensor [batch, source_len]")
        if input_ids.shape[1] > self.config.max_position_embeddings:
            raise ValueError(
                f"source of {input_ids.shape[1]} tokens exceeds the model's {self.config.max_position_embeddings} positions"
            )
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
        mask = attention_mask.bool()
        if not bool(mask.any(1).all()):
            raise ValueError("every source must have at least one real token (an empty row was given)")
        enc = self.encoder
        pos = enc.embed_positions.weight[enc.embed_positions.offset : enc.embed_positions.offset + input_ids.shape[1]]
        h = enc.layernorm_embedding(enc.embed_tokens(input_ids) + pos)
        h = self._dropout(h, enc.dropout)
        first = enc.layers[0]
        key_mask = self._key_mask(mask)
        h = self._ffn(first, self._enc_attn(first, h, key_mask))
        always = torch.isin(input_ids, torch.tensor(self.special_ids, device=input_ids.device)) & mask
        return Observation(h, mask, input_ids, always)

    def _drop_tokens(self, obs: Observation, token_keep: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Re-pack each row to its kept tokens; returns ``(hidden [b, s', d], mask [b, s'])``."""
        if token_keep is None:
            return obs.hidden, obs.attention_mask
        keep = (token_keep.to(obs.attention_mask.device) & obs.attention_mask) | obs.always_keep
        lengths = keep.sum(1)
        # stable sort puts kept positions first, in their original order
        order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices[:, : int(lengths.max())]
        hidden = obs.hidden.gather(1, order.unsqueeze(-1).expand(-1, -1, obs.hidden.shape[-1]))
        mask = torch.arange(order.shape[1], device=keep.device)[None, :] < lengths[:, None]
        return hidden, mask

    def _encode(self, obs: Observation, plan: Plan) -> tuple[torch.Tensor, torch.Tensor]:
        """The rest of the encoder under the plan: ``(memory [b, s', d], memory_mask [b, s'])``."""
        h, mask = self._drop_tokens(obs, plan.token_keep)
        if h is obs.hidden:
            h = h.clone()  # scatters may write in place; the observation must stay intact
        rows = _row_sets(plan.bits)
        for layer, (ba, bf) in zip(self.encoder.layers[1:], self._enc_bits[1:]):
            ra = rows[ba]
            h = _on_rows(h, ra, lambda x, ra=ra: self._enc_attn(layer, x, self._key_mask(mask if ra is None else mask[ra])))
            h = _on_rows(h, rows[bf], lambda x: self._ffn(layer, x))
        return h, mask

    # ------------------------------------------------------------------------------------------------
    def _dec_embed(self, ids: torch.Tensor, start: int) -> torch.Tensor:
        dec = self.decoder
        off = dec.embed_positions.offset
        pos = dec.embed_positions.weight[off + start : off + start + ids.shape[1]]
        h = dec.layernorm_embedding(dec.embed_tokens(ids) + pos)
        return self._dropout(h, dec.dropout)

    def _decode_parallel(self, ids: torch.Tensor, memory: torch.Tensor, mem_mask: torch.Tensor, plan: Plan) -> torch.Tensor:
        """One causal pass of the decoder over ``ids`` under the plan (teacher forcing / classification)."""
        h = self._dec_embed(ids, 0)
        rows = _row_sets(plan.bits)
        nh = self.n_heads_dec
        for layer, (bs, bc, bf) in zip(self.decoder.layers, self._dec_bits):

            def self_attn(x, layer=layer):
                a = self._attention(layer.self_attn, x, x, None, nh, causal=x.shape[1] > 1)
                return layer.self_attn_layer_norm(x + self._dropout(a, layer.dropout))

            def cross_attn(x, r, layer=layer):
                mem, mm = (memory, mem_mask) if r is None else (memory[r], mem_mask[r])
                a = self._attention(layer.encoder_attn, x, mem, self._key_mask(mm), nh)
                return layer.encoder_attn_layer_norm(x + self._dropout(a, layer.dropout))

            h = _on_rows(h, rows[bs], self_attn)
            h = _on_rows(h, rows[bc], lambda x, r=rows[bc]: cross_attn(x, r))
            h = _on_rows(h, rows[bf], lambda x, layer=layer: self._ffn(layer, x))
        return h

    def _lm_logits(self, h: torch.Tensor) -> torch.Tensor:
        m = self.model
        return F.linear(h, m.lm_head.weight) + m.final_logits_bias

    def forward(
        self,
        obs: Observation,
        plan: Plan,
        labels: torch.Tensor | None = None,
        decoder_input_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Teacher-forced forward under the plan: ``(logits [b, t, vocab], loss or None)``.

        ``labels`` are padded with -100; without ``decoder_input_ids`` they are shifted right as Hugging Face
        BART does. Differentiable with respect to the model's weights (and the observation's graph).
        """
        self.check_plan(obs, plan)
        if self.is_classifier:
            raise ValueError("this runtime wraps a sequence classifier: use classify(), not forward()")
        if decoder_input_ids is None:
            if labels is None:
                raise ValueError("forward() needs labels or decoder_input_ids")
            decoder_input_ids = self._shift_right(labels)
        memory, mem_mask = self._encode(obs, plan)
        logits = self._lm_logits(self._decode_parallel(decoder_input_ids, memory, mem_mask, plan))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
        return logits, loss

    def _shift_right(self, labels: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        ids = labels.new_zeros(labels.shape)
        ids[:, 1:] = labels[:, :-1]
        ids[:, 0] = cfg.decoder_start_token_id
        return ids.masked_fill(ids == -100, cfg.pad_token_id)

    def classify(self, obs: Observation, plan: Plan, labels: torch.Tensor | None = None):
        """Sequence classification under the plan (encoder + one decoder pass over the shifted source).

        Returns ``(logits [b, num_labels], loss or None, flops [b], full_flops [b])``. The decoder reads the
        whole (undropped) source as Hugging Face BART does and the class is read at the last EOS.
        """
        self.check_plan(obs, plan)
        if not self.is_classifier:
            raise ValueError("classify() needs a BartForSequenceClassification model")
        memory, mem_mask = self._encode(obs, plan)
        ids = obs.input_ids
        dec_ids = self._shift_right(ids)
        h = self._decode_parallel(dec_ids, memory, mem_mask, plan)
        eos = (ids == self.config.eos_token_id) & obs.attention_mask
        if not bool(eos.any(1).all()):
            raise ValueError("every source must contain an EOS token for BART classification")
        last = (eos.long() * torch.arange(ids.shape[1], device=ids.device)).argmax(1)
        logits = self.model.classification_head(h[torch.arange(h.shape[0]), last])
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        n_dec = obs.lengths
        fixed, per = self._flops_table(obs, mem_mask.sum(1), n_dec, beams=1, teacher_forced=True, lm_head=False)
        full_fixed, full_per = self._flops_table(obs, obs.lengths, n_dec, 1, True, False)
        return logits, loss, plan_flops(fixed, per, plan.bits), full_fixed + full_per.sum(1)

    # ------------------------------------------------------------------------------------------------
    def generate(self, obs: Observation, plan: Plan, return_margins: bool = False, **gen_kwargs) -> GenerateOutput:
        """Greedy or beam-search generation with each instance's plan held for every step and beam.

        Keyword arguments are Hugging Face generation options (``max_new_tokens``, ``num_beams``,
        ``length_penalty``, ``no_repeat_ngram_size``, ``min_new_tokens``, ``early_stopping``, ...) merged over
        the model's ``generation_config``. With an all-ones plan the tokens equal ``model.generate()``'s.
        ``return_margins``: fill ``GenerateOutput.margins`` (greedy decoding only; None under beam search).
        """
        self.check_plan(obs, plan)
        if self.is_classifier:
            raise ValueError("this runtime wraps a sequence classifier: use classify(), not generate()")
        s = resolve_settings(self.model.generation_config, **gen_kwargs)
        device = obs.hidden.device
        with torch.no_grad():
            memory, mem_mask = self._encode(obs, plan)
            dec = _CachedDecoder(self, memory, mem_mask, plan.bits, s.num_beams, s.max_length)
            margins = None
            if s.num_beams == 1:
                seqs, steps, margins = greedy_search(dec, obs.batch_size, s, device, return_margins)
            else:
                seqs, steps = beam_search(dec, obs.batch_size, s, device)
        kept = mem_mask.sum(1)
        fixed, per = self._flops_table(obs, kept, steps, s.num_beams)
        full_fixed, full_per = self._flops_table(obs, obs.lengths, steps, s.num_beams)
        return GenerateOutput(seqs, steps, plan_flops(fixed, per, plan.bits), full_fixed + full_per.sum(1), kept, margins)

    def _flops_table(self, obs, kept, steps, beams, teacher_forced=False, lm_head=True):
        return encoder_decoder_flops(
            self.dims, self.space, obs.lengths.cpu(), kept.cpu(), steps.cpu(), beams, teacher_forced, lm_head
        )

    def flops(self, plan: Plan, src_len, steps, beams: int = 1, src_kept=None, teacher_forced: bool = False):
        """Analytic ``(executed [b], full [b])`` FLOPs for plans at given lengths (see :mod:`rlskip.flops`)."""
        b = plan.batch_size
        full_len = torch.as_tensor(src_len).expand(b)
        kept = full_len if src_kept is None else torch.as_tensor(src_kept).expand(b)
        n = torch.as_tensor(steps).expand(b)
        fixed, per = encoder_decoder_flops(self.dims, self.space, full_len, kept, n, beams, teacher_forced)
        ffixed, fper = encoder_decoder_flops(self.dims, self.space, full_len, full_len, n, beams, teacher_forced)
        return plan_flops(fixed, per, plan.bits), ffixed + fper.sum(1)

    # ------------------------------------------------------------------------------------------------
    # CALM-style confident early exit: a baseline for python -m rlskip.evaluate
    def generate_early_exit(self, obs: Observation, threshold: float, **gen_kwargs) -> GenerateOutput:
        """Greedy decoding with CALM-style early exit per token (Schuster et al., 2022), full encoder, no plan.

        After each decoder layer but the last, the LM head reads the token's intermediate hidden state; when the
        softmax's top-1 minus top-2 probability reaches ``threshold``, that token skips its remaining decoder layers
        and is predicted from those logits. The exited state is copied forward (CALM's state propagation): each
        skipped layer's self-attention keys/values for that position are projected from it, so later tokens that
        run the layer attend over every position. ``threshold > 1`` never exits and gives the full model's tokens.

        FLOPs are counted honestly per token: every decoder layer run, every LM-head evaluation (intermediate ones
        included, so never exiting costs more than the full model) and the key/value projections of the skipped
        layers; the encoder and the cross-attention memory projections of every layer are the full model's.
        ``full_flops`` is the full model's count at the same lengths.
        """
        if self.is_classifier:
            raise ValueError("early exit applies to generation: this runtime wraps a sequence classifier")
        s = resolve_settings(self.model.generation_config, **gen_kwargs)
        if s.num_beams != 1:
            raise ValueError(f"early exit decodes greedily (num_beams=1), got num_beams={s.num_beams}")
        ones = Plan.all_ones(self.space, obs.batch_size)
        with torch.no_grad():
            memory, mem_mask = self._encode(obs, ones)
            dec = _EarlyExitDecoder(self, memory, mem_mask, float(threshold), s.max_length)
            seqs, steps, _ = greedy_search(dec, obs.batch_size, s, obs.hidden.device)
        d, f, vocab, n_layers = self.dims.d_model, self.dims.dec_ffn, self.dims.vocab, self.dims.decoder_layers
        full_fixed, full_per = self._flops_table(obs, obs.lengths, steps, 1)
        full = full_fixed + full_per.sum(1)
        # the encoder and the cross-attention memory projections: everything of the full model but decoder steps
        enc_cols = [j for j, c in enumerate(self.space.skippable) if c.kind in ("enc_attn", "enc_ffn")]
        n = steps.cpu().to(torch.float64)
        sk = obs.lengths.cpu().to(torch.float64)
        fixed = full_fixed - n * 2 * d * vocab + full_per[:, enc_cols].sum(1) + n_layers * 4 * sk * d * d
        t_len = dec.layers_run.shape[1]
        t = torch.arange(t_len, dtype=torch.float64)
        valid = (t[None, :] < n[:, None]).to(torch.float64)
        run = dec.layers_run.cpu().to(torch.float64) * valid
        layer_cost = 12 * d * d + 4 * (t[None, :] + 1) * d + 4 * sk[:, None] * d + 4 * d * f  # one layer at step t
        per_step = run * (layer_cost + 2 * d * vocab) + (n_layers * valid - run) * 4 * d * d
        return GenerateOutput(seqs, steps, fixed + per_step.sum(1), full, obs.lengths)


class _CachedDecoder:
    """Incremental decoder for :mod:`rlskip.runtime.search`: one position per call, per-row KV caches.

    Rows are ``batch * beams`` (beams of an instance adjacent). For each decoder layer the self-attention
    cache holds only the rows that execute it (compact, in row order), and the cross-attention keys/values
    are projected once per instance for the rows that execute it, then shared by its beams.
    """

    def __init__(self, rt: BartRuntime, memory, mem_mask, bits: torch.Tensor, beams: int, max_len: int) -> None:
        self.rt, self.beams = rt, beams
        self.t = 0
        row_bits = bits.repeat_interleave(beams, 0) if beams > 1 else bits
        self.n_rows = row_bits.shape[0]
        self.rows = _row_sets(row_bits.to(memory.device))
        inst_rows = _row_sets(bits.to(memory.device))
        nh = rt.n_heads_dec
        self.self_k, self.self_v, self.cross_kv, self.pos = [], [], [], []
        for layer, (bs, bc, _) in zip(rt.decoder.layers, rt._dec_bits):
            n = self.n_rows if self.rows[bs] is None else self.rows[bs].numel()
            shape = (n, nh, max_len, rt.dims.d_model // nh)
            self.self_k.append(memory.new_empty(shape))
            self.self_v.append(memory.new_empty(shape))
            self.pos.append(self._positions(self.rows[bs]))
            r = inst_rows[bc]
            if r is not None and r.numel() == 0:
                self.cross_kv.append(None)
                continue
            mem, mm = (memory, mem_mask) if r is None else (memory[r], mem_mask[r])
            att = layer.encoder_attn
            k = _heads(F.linear(mem, att.k_proj.weight, att.k_proj.bias), nh)
            v = _heads(F.linear(mem, att.v_proj.weight, att.v_proj.bias), nh)
            key_mask = BartRuntime._key_mask(mm)
            if beams > 1:
                k, v = k.repeat_interleave(beams, 0), v.repeat_interleave(beams, 0)
                key_mask = None if key_mask is None else key_mask.repeat_interleave(beams, 0)
            self.cross_kv.append((k, v, key_mask))

    def _positions(self, rows: torch.Tensor | None) -> torch.Tensor | None:
        """Map from global row to index in a compact cache (None when the cache holds every row)."""
        if rows is None:
            return None
        pos = torch.full((self.n_rows,), -1, dtype=torch.long, device=rows.device)
        pos[rows] = torch.arange(rows.numel(), device=rows.device)
        return pos

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        rt, t = self.rt, self.t
        h = rt._dec_embed(tokens[:, None], t)
        nh = rt.n_heads_dec
        for i, (layer, (bs, bc, bf)) in enumerate(zip(rt.decoder.layers, rt._dec_bits)):
            ck, cv = self.self_k[i], self.self_v[i]

            def self_attn(x, layer=layer, ck=ck, cv=cv):
                att = layer.self_attn
                q = _heads(F.linear(x, att.q_proj.weight, att.q_proj.bias), nh)
                ck[:, :, t] = _heads(F.linear(x, att.k_proj.weight, att.k_proj.bias), nh)[:, :, 0]
                cv[:, :, t] = _heads(F.linear(x, att.v_proj.weight, att.v_proj.bias), nh)[:, :, 0]
                o = F.scaled_dot_product_attention(q, ck[:, :, : t + 1], cv[:, :, : t + 1], scale=att.scaling)
                return layer.self_attn_layer_norm(x + F.linear(_merge(o), att.out_proj.weight, att.out_proj.bias))

            def cross_attn(x, layer=layer, kv=self.cross_kv[i]):
                att = layer.encoder_attn
                q = _heads(F.linear(x, att.q_proj.weight, att.q_proj.bias), nh)
                o = F.scaled_dot_product_attention(q, kv[0], kv[1], attn_mask=kv[2], scale=att.scaling)
                return layer.encoder_attn_layer_norm(x + F.linear(_merge(o), att.out_proj.weight, att.out_proj.bias))

            h = _on_rows(h, self.rows[bs], self_attn)
            h = _on_rows(h, self.rows[bc], cross_attn)
            h = _on_rows(h, self.rows[bf], lambda x, layer=layer: rt._ffn(layer, x))
        self.t += 1
        return rt._lm_logits(h[:, 0])

    def reorder(self, beam_idx: torch.Tensor) -> None:
        t = self.t
        for i, (bs, _, _) in enumerate(self.rt._dec_bits):
            rows, pos = self.rows[bs], self.pos[i]
            if rows is not None and rows.numel() == 0:
                continue
            local = beam_idx if rows is None else pos[beam_idx[rows]]
            for cache in (self.self_k[i], self.self_v[i]):
                cache[:, :, :t] = cache[local, :, :t]


class _EarlyExitDecoder:
    """Incremental decoder for :func:`rlskip.runtime.search.greedy_search` whose tokens exit early.

    ``layers_run[row, t]`` counts the decoder layers position ``t`` of ``row`` ran (which equals its LM-head
    evaluations: one after each layer run but the last, plus the final one).
    """

    def __init__(self, rt: BartRuntime, memory, mem_mask, threshold: float, max_len: int) -> None:
        self.rt, self.threshold, self.t = rt, threshold, 0
        rows, nh, d = memory.shape[0], rt.n_heads_dec, rt.dims.d_model
        self.self_k = [memory.new_empty((rows, nh, max_len, d // nh)) for _ in rt.decoder.layers]
        self.self_v = [memory.new_empty((rows, nh, max_len, d // nh)) for _ in rt.decoder.layers]
        self.cross_kv = []
        key_mask = BartRuntime._key_mask(mem_mask)
        for layer in rt.decoder.layers:
            att = layer.encoder_attn
            k = _heads(F.linear(memory, att.k_proj.weight, att.k_proj.bias), nh)
            v = _heads(F.linear(memory, att.v_proj.weight, att.v_proj.bias), nh)
            self.cross_kv.append((k, v, key_mask))
        self.layers_run = torch.zeros(rows, max_len, dtype=torch.long, device=memory.device)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        rt, t, nh = self.rt, self.t, self.rt.n_heads_dec
        h = rt._dec_embed(tokens[:, None], t)
        active = torch.ones(h.shape[0], dtype=torch.bool, device=h.device)
        logits = h.new_empty(h.shape[0], rt.dims.vocab)
        last = len(rt.decoder.layers) - 1
        for i, layer in enumerate(rt.decoder.layers):
            ck, cv, att = self.self_k[i], self.self_v[i], layer.self_attn
            idx = None if bool(active.all()) else active.nonzero().flatten()
            if idx is not None:
                done = (~active).nonzero().flatten()  # exited rows: keys/values from the copied-forward state
                x = h[done]
                ck[done, :, t] = _heads(F.linear(x, att.k_proj.weight, att.k_proj.bias), nh)[:, :, 0]
                cv[done, :, t] = _heads(F.linear(x, att.v_proj.weight, att.v_proj.bias), nh)[:, :, 0]
                if idx.numel() == 0:
                    continue
            x = h if idx is None else h[idx]
            q = _heads(F.linear(x, att.q_proj.weight, att.q_proj.bias), nh)
            k = _heads(F.linear(x, att.k_proj.weight, att.k_proj.bias), nh)[:, :, 0]
            v = _heads(F.linear(x, att.v_proj.weight, att.v_proj.bias), nh)[:, :, 0]
            if idx is None:
                ck[:, :, t], cv[:, :, t] = k, v
                keys, values = ck[:, :, : t + 1], cv[:, :, : t + 1]
            else:
                ck[idx, :, t], cv[idx, :, t] = k, v
                keys, values = ck[idx, :, : t + 1], cv[idx, :, : t + 1]
            o = F.scaled_dot_product_attention(q, keys, values, scale=att.scaling)
            x = layer.self_attn_layer_norm(x + F.linear(_merge(o), att.out_proj.weight, att.out_proj.bias))
            ca = layer.encoder_attn
            mk, mv, mm = self.cross_kv[i]
            if idx is not None:
                mk, mv, mm = mk[idx], mv[idx], (None if mm is None else mm[idx])
            q = _heads(F.linear(x, ca.q_proj.weight, ca.q_proj.bias), nh)
            o = F.scaled_dot_product_attention(q, mk, mv, attn_mask=mm, scale=ca.scaling)
            x = layer.encoder_attn_layer_norm(x + F.linear(_merge(o), ca.out_proj.weight, ca.out_proj.bias))
            x = rt._ffn(layer, x)
            rows = torch.arange(h.shape[0], device=h.device) if idx is None else idx
            if idx is None:
                h = x
            else:
                h[idx] = x
            self.layers_run[rows, t] += 1
            lg = rt._lm_logits(x[:, 0])
            if i == last:
                logits[rows] = lg
                break
            top2 = torch.softmax(lg.float(), dim=-1).topk(2, dim=-1).values
            exit_now = (top2[:, 0] - top2[:, 1]) >= self.threshold
            if bool(exit_now.any()):
                logits[rows[exit_now]] = lg[exit_now]
                active[rows[exit_now]] = False
        self.t += 1
        return logits
