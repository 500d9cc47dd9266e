"""BART under the contract suite: a tiny random model with the real BART tokenizer's vocabulary, and a tiny
classifier."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from families import FamilyCase, register
from paths import TOKENIZER_DIR

TEXTS = [
    "The quick brown fox jumps over the lazy dog near the river bank this morning.",
    "Hello world",
    "A much longer sentence about the summarisation of news articles with BART, and about skipping layers.",
    "Short one here.",
    "Markets fell sharply on Tuesday after the central bank raised interest rates again.",
]
BEAM = dict(num_beams=4, no_repeat_ngram_size=3, length_penalty=2.0, early_stopping=True)


def tiny_bart_config(vocab_size: int = 50265, enc: int = 3, dec: int = 2, **kw):
    from transformers import BartConfig

    base = dict(
        vocab_size=vocab_size, d_model=32, encoder_layers=enc, decoder_layers=dec, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=256,
    )
    base.update(kw)
    return BartConfig(**base)


def bart_tokenizer():
    if not (TOKENIZER_DIR / "tokenizer.json").is_file():
        pytest.skip(f"real BART tokenizer not found at {TOKENIZER_DIR}")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))


def _sub(h, keep: bool, compute):
    y = compute(h)  # always computed: the reference never saves work
    return y if keep else h


def _causal(n, dtype):
    return torch.triu(torch.full((n, n), torch.finfo(dtype).min), 1)[None, None]


def _encode(model, ids, skip, keep):
    enc = model.model.encoder
    h = enc.layernorm_embedding(enc.embed_tokens(ids) + enc.embed_positions(ids))
    for i, layer in enumerate(enc.layers):
        if i == 1 and keep is not None:
            h = h[:, keep]
        h = _sub(h, f"enc.{i}.attn" not in skip, lambda x: layer.self_attn_layer_norm(x + layer.self_attn(x)[0]))
        h = _sub(h, f"enc.{i}.ffn" not in skip, lambda x: layer.final_layer_norm(x + layer.fc2(layer.activation_fn(layer.fc1(x)))))
    return h


def _decode(model, memory, dec_ids, skip):
    dec = model.model.decoder
    y = dec.layernorm_embedding(dec.embed_tokens(dec_ids) + dec.embed_positions(dec_ids))
    mask = _causal(dec_ids.shape[1], y.dtype)
    for i, layer in enumerate(dec.layers):
        y = _sub(y, f"dec.{i}.self_attn" not in skip, lambda x: layer.self_attn_layer_norm(x + layer.self_attn(x, attention_mask=mask)[0]))
        y = _sub(y, f"dec.{i}.cross_attn" not in skip, lambda x: layer.encoder_attn_layer_norm(x + layer.encoder_attn(x, key_value_states=memory)[0]))
        y = _sub(y, f"dec.{i}.ffn" not in skip, lambda x: layer.final_layer_norm(x + layer.fc2(layer.activation_fn(layer.fc1(x)))))
    return y


@dataclass
class BartLM(FamilyCase):
    def build(self):
        from transformers import BartForConditionalGeneration

        tok = bart_tokenizer()
        torch.manual_seed(0)
        # untied head and a wider init make outputs depend on the source; the EOS bias makes rows stop at
        # different steps, so EOS handling and padding of finished rows are exercised
        model = BartForConditionalGeneration(tiny_bart_config(len(tok), tie_word_embeddings=False, init_std=0.15))
        with torch.no_grad():
            model.final_logits_bias[0, model.config.eos_token_id] = 3.0
        return model

    def inputs(self):
        enc = bart_tokenizer()(TEXTS, return_tensors="pt", padding=True)
        return enc.input_ids, enc.attention_mask.bool()

    def teacher_forced(self, ids, mask, seed=0):
        g = torch.Generator().manual_seed(seed)
        dec_ids = torch.randint(4, 1000, (ids.shape[0], 6), generator=g)
        dec_ids[:, 0] = self.model.config.decoder_start_token_id
        hf = self.model(input_ids=ids, attention_mask=mask.long(), decoder_input_ids=dec_ids).logits
        return ids, mask, {"decoder_input_ids": dec_ids}, hf, None

    def reference(self, ids, skip, keep, forward_kwargs):
        memory = _encode(self.model, ids, skip, keep)
        y = _decode(self.model, memory, forward_kwargs["decoder_input_ids"], skip)
        return self.model.lm_head(y) + self.model.final_logits_bias

    def reference_next(self, ids, skip, keep, new):
        dec_ids = torch.tensor([[self.model.config.decoder_start_token_id, *new]])
        return self.reference(ids, skip, keep, {"decoder_input_ids": dec_ids})[0, -1]


@dataclass
class BartClassifier(FamilyCase):
    def build(self):
        from transformers import BartForSequenceClassification

        torch.manual_seed(1)
        return BartForSequenceClassification(tiny_bart_config(len(bart_tokenizer()), num_labels=3, init_std=0.15))

    def inputs(self):
        enc = bart_tokenizer()(TEXTS, return_tensors="pt", padding=True)
        return enc.input_ids, enc.attention_mask.bool()

    def teacher_forced(self, ids, mask, seed=0):
        return ids, mask, {}, self.model(input_ids=ids, attention_mask=mask.long()).logits, None

    def reference(self, ids, skip, keep, forward_kwargs):
        m = self.model
        memory = _encode(m, ids, skip, keep)
        dec_ids = ids.new_zeros(ids.shape)
        dec_ids[:, 1:], dec_ids[:, 0] = ids[:, :-1], m.config.decoder_start_token_id
        y = _decode(m, memory, dec_ids, skip)
        last = (ids[0] == m.config.eos_token_id).nonzero().flatten()[-1]
        return m.classification_head(y[:, last])


register(BartLM("bart-tiny", gen_settings=[
    dict(max_new_tokens=30), dict(max_new_tokens=30, **BEAM), dict(max_new_tokens=30, min_new_tokens=6, **BEAM),
]))
register(BartClassifier("bart-classifier-tiny", head="classifier"))
