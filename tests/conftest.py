"""Shared fixtures: tiny BART models built from configs, the real tokenizer and data from ../shared."""

from __future__ import annotations

import pytest
import torch

from families.bart import TEXTS, bart_tokenizer as _bart_tokenizer, tiny_bart_config  # noqa: F401  (re-exported)
from paths import DATA_DIR, SHARED, TOKENIZER_DIR  # noqa: F401  (re-exported)

# Tiny models gain nothing from intra-op threads, and on a shared 2-core machine torch's OpenMP workers
# spin against other processes (runs 5-25x slower were measured); one thread keeps the suite's time stable.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def bart_tokenizer():
    return _bart_tokenizer()


@pytest.fixture(scope="session")
def tiny_bart():
    """A tiny random BART whose EOS logit is raised so generations end at varied lengths (the contract case's)."""
    from families import CASES
    import families.bart  # noqa: F401

    return CASES["bart-tiny"].model


@pytest.fixture(scope="session")
def mixed_batch(bart_tokenizer):
    return bart_tokenizer(TEXTS, return_tensors="pt", padding=True)
