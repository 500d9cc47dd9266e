"""T5 under the contract suite: a tiny random T5 v1.0 (ReLU feed-forward, tied and scaled LM head, teacher-forced
through ``labels``) and a tiny v1.1 / FLAN-T5 layout (gated GELU, unscaled head, ``decoder_input_ids``), both
with attention wider than the model (``num_heads * d_kv != d_model``) and few relative-position buckets, so the
logarithmic buckets are exercised by short inputs. No tokenizer: random ids, right-padded, EOS (id 1) ending
each row.

The v1.0 case keeps T5's special ids (padding and decoder start 0). Beam search then fills finished rows with
EOS, not padding (``generate()`` fills with ``pad_token_id or eos``, and 0 is falsy), which the suite's
distinct-plans test does not expect: its first and last settings decode greedily, while the v1.1 case pads with
id 2 and runs that test under beam search."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from families import FamilyCase, register

BEAM = dict(num_beams=4, no_repeat_ngram_size=3, length_penalty=2.0, early_stopping=True)
LENGTHS = (12, 5, 17, 8, 14)
VOCAB, START, EOS = 96, 0, 1


def tiny_t5_config(**kw):
    from transformers import T5Config

    base = dict(
        vocab_size=VOCAB, d_model=32, d_kv=6, d_ff=64, num_layers=3, num_decoder_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=16, decoder_start_token_id=START,
        pad_token_id=START, eos_token_id=EOS,
    )
    base.update(kw)
    return T5Config(**base)


def _sub(h, keep: bool, compute):
    y = compute(h)  # always computed: the reference never saves work
    return y if keep else h


def _encode(model, ids, skip, keep):
    """Every encoder layer given the bias of the tokens' original positions (Hugging Face's own compute_bias on
    the full input, then the kept rows and columns)."""
    enc = model.encoder
    n = ids.shape[1]
    bias = enc.block[0].layer[0].SelfAttention.compute_bias(n, n)
    h = enc.embed_tokens(ids)
    for i, block in enumerate(enc.block):
        if i == 1 and keep is not None:
            h, bias = h[:, keep], bias[:, :, keep][:, :, :, keep]
        sa, ff = block.layer[0], block.layer[-1]
        h = _sub(h, f"enc.{i}.attn" not in skip, lambda x: sa(x, position_bias=bias)[0])
        h = _sub(h, f"enc.{i}.ffn" not in skip, ff)
    return enc.final_layer_norm(h)


def _decode(model, memory, dec_ids, skip):
    dec = model.decoder
    n = dec_ids.shape[1]
    bias = dec.block[0].layer[0].SelfAttention.compute_bias(n, n)
    bias = bias.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), torch.finfo(bias.dtype).min)
    y = dec.embed_tokens(dec_ids)
    for i, block in enumerate(dec.block):
        sa, ca, ff = block.layer
        y = _sub(y, f"dec.{i}.self_attn" not in skip, lambda x: sa(x, position_bias=bias)[0])
        y = _sub(y, f"dec.{i}.cross_attn" not in skip, lambda x: ca(x, key_value_states=memory)[0])
        y = _sub(y, f"dec.{i}.ffn" not in skip, ff)
    y = dec.final_layer_norm(y)
    if model.config.scale_decoder_outputs:
        y = y * model.config.d_model**-0.5
    return model.lm_head(y)


@dataclass
class T5LM(FamilyCase):
    config: dict = field(default_factory=dict)
    eos_bias: float = 0.0
    use_labels: bool = False  # teacher-force through labels (shifted right inside) instead of decoder_input_ids

    def build(self):
        from transformers import T5ForConditionalGeneration

        torch.manual_seed(0)
        model = T5ForConditionalGeneration(tiny_t5_config(**self.config))
        # T5's head has no bias; one added here (over the tied weight) raises the EOS logit so rows stop at
        # different steps, as bart.py's final_logits_bias does. The runtime calls the model's own lm_head.
        head = torch.nn.Linear(model.config.d_model, VOCAB, bias=True)
        head.weight = model.shared.weight
        with torch.no_grad():
            head.bias.zero_()
            head.bias[EOS] = self.eos_bias
        model.lm_head = head
        return model

    def inputs(self):
        g = torch.Generator().manual_seed(0)
        pad = self.model.config.pad_token_id
        ids = torch.full((len(LENGTHS), max(LENGTHS)), pad)
        for i, n in enumerate(LENGTHS):
            ids[i, : n - 1] = torch.randint(3, VOCAB, (n - 1,), generator=g)
            ids[i, n - 1] = EOS
        return ids, ids != pad

    def teacher_forced(self, ids, mask, seed=0):
        g = torch.Generator().manual_seed(seed)
        tgt = torch.randint(3, VOCAB, (ids.shape[0], 6), generator=g)
        if self.use_labels:
            tgt[1, 4:] = -100  # ignored positions become padding after the shift
            kwargs = {"labels": tgt}
        else:
            tgt[:, 0] = self.model.config.decoder_start_token_id
            kwargs = {"decoder_input_ids": tgt}
        # without gradients, as the runtime's logits are taken: SDPA picks its kernel by whether the position
        # bias requires grad, and the two kernels differ in the last bits
        with torch.no_grad():
            hf = self.model(input_ids=ids, attention_mask=mask.long(), **kwargs).logits
        return ids, mask, kwargs, hf, None

    def reference(self, ids, skip, keep, forward_kwargs):
        dec_ids = forward_kwargs.get("decoder_input_ids")
        if dec_ids is None:
            dec_ids = self.model._shift_right(forward_kwargs["labels"])
        return _decode(self.model, _encode(self.model, ids, skip, keep), dec_ids, skip)

    def reference_next(self, ids, skip, keep, new):
        dec_ids = torch.tensor([[self.model.config.decoder_start_token_id, *new]])
        return self.reference(ids, skip, keep, {"decoder_input_ids": dec_ids})[0, -1]


GREEDY, BEAM_MIN = dict(max_new_tokens=30), dict(max_new_tokens=30, min_new_tokens=6, **BEAM)
# a slightly wider init (initializer_factor) makes outputs depend on the source (a much wider one makes the logits
# sensitive to the last bits of SDPA's kernels); the EOS biases make rows stop at varied steps
register(T5LM(
    "t5-v1_0-tiny", gen_settings=[GREEDY, dict(GREEDY, min_new_tokens=6), dict(max_new_tokens=30, **BEAM), BEAM_MIN],
    eos_bias=5.0, use_labels=True, config=dict(feed_forward_proj="relu", initializer_factor=1.2),
))
register(T5LM(
    "t5-v1_1-tiny", gen_settings=[GREEDY, dict(max_new_tokens=30, **BEAM), BEAM_MIN], eos_bias=16.0,
    config=dict(
        feed_forward_proj="gated-gelu", tie_word_embeddings=False, d_kv=8, num_layers=2, num_decoder_layers=2,
        initializer_factor=1.2, pad_token_id=2,
    ),
))
