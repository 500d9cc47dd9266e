"""Shared fixtures: tiny BART models built from configs, the real tokenizer and data from ../shared."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

# Tiny models gain nothing from intra-op threads, and on a shared 2-core machine torch's OpenMP workers
# spin against other processes (runs 5-25x slower were measured); one thread keeps the suite's time stable.
torch.set_num_threads(1)

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
TOKENIZER_DIR = SHARED / "models" / "bart-tokenizer"
DATA_DIR = SHARED / "data"


def tiny_bart_config(vocab_size: int = 50265, enc: int = 3, dec: int = 2, **kw):
    from transformers import BartConfig

    base = dict(
        vocab_size=vocab_size, d_model=32, encoder_layers=enc, decoder_layers=dec, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=256,
    )
    base.update(kw)
    return BartConfig(**base)


@pytest.fixture(scope="session")
def bart_tokenizer():
    if not (TOKENIZER_DIR / "tokenizer.json").is_file():
        pytest.skip(f"real BART tokenizer not found at {TOKENIZER_DIR}")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))


@pytest.fixture(scope="session")
def tiny_bart(bart_tokenizer):
    """A tiny random BART whose EOS logit is raised so generations end at varied lengths."""
    from transformers import BartForConditionalGeneration

    torch.manual_seed(0)
    # untied head and a wider init make outputs depend on the source; the EOS bias makes rows stop at
    # different steps, so EOS handling and padding of finished rows are exercised
    model = BartForConditionalGeneration(
        tiny_bart_config(len(bart_tokenizer), tie_word_embeddings=False, init_std=0.15)
    ).eval()
    with torch.no_grad():
        model.final_logits_bias[0, model.config.eos_token_id] = 3.0
    return model


@pytest.fixture(scope="session")
def mixed_batch(bart_tokenizer):
    texts = [
        "The quick brown fox jumps over the lazy dog near the river bank this morning.",
        "Hello world",
        "A much longer sentence about the summarisation of news articles with BART, and about skipping layers.",
        "Short one here.",
        "Markets fell sharply on Tuesday after the central bank raised interest rates again.",
    ]
    return bart_tokenizer(texts, return_tensors="pt", padding=True)
