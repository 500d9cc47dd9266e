"""Tokenising task examples for the encoder (and targets for the decoder), counting what was cut.

Over-long documents are truncated, never dropped, and the number truncated is returned so the caller can
log it once: a silent cut would make quality look worse for no visible reason.
"""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase

from .base import Example

PAIR_TRUNCATIONS = ("longest_first", "only_second")


def _texts(first: list[str], second: list[str] | None, rows: Sequence[int] | None, as_target: bool) -> dict:
    """Tokenizer text arguments for the given rows (all when None): targets go through ``text_target``."""
    pick = (lambda xs: xs) if rows is None else (lambda xs: [xs[i] for i in rows])
    if as_target:
        return {"text_target": pick(first)}
    return {"text": pick(first), "text_pair": pick(second) if second is not None else None}


def _encode_truncating(
    tokenizer: PreTrainedTokenizerBase,
    first: list[str],
    second: list[str] | None,
    max_tokens: int,
    truncation: str,
    as_target: bool = False,
) -> tuple[list[list[int]], int]:
    """Encode (pairs of) texts to at most ``max_tokens`` ids each, special tokens included; count the cut ones.

    Everything is encoded once in full (to see what is too long); only the over-long rows are encoded
    again with truncation, so the tokenizer, not this code, decides how special tokens and pairs are cut.
    """
    if max_tokens < 1:
        raise ValueError(f"max tokens must be positive, got {max_tokens}")
    # verbose=False: the full-length pass is expected to exceed model_max_length for long documents.
    ids = tokenizer(**_texts(first, second, None, as_target), truncation=False, verbose=False)["input_ids"]
    too_long = [i for i, row in enumerate(ids) if len(row) > max_tokens]
    if too_long:
        cut = tokenizer(**_texts(first, second, too_long, as_target), truncation=truncation, max_length=max_tokens)[
            "input_ids"
        ]
        for i, row in zip(too_long, cut):
            ids[i] = row
    return ids, len(too_long)


def encode_examples(
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    max_source_tokens: int,
    pair_truncation: str = "longest_first",
) -> tuple[list[list[int]], int]:
    """Encoder input ids for each example, at most ``max_source_tokens`` long (special tokens included).

    Args:
        tokenizer: a Hugging Face tokenizer; pairs are encoded as text pairs (``source``, ``source_pair``).
        examples: all single-text or all pairs (mixing would need two calls; it is refused).
        max_source_tokens: the encoder budget per example.
        pair_truncation: ``"only_second"`` keeps the first segment whole (SQuAD question) and trims the
            second (context); ``"longest_first"`` trims the longer segment (GLUE pairs). Use the task's
            ``pair_truncation`` attribute.

    Returns:
        (token-id lists in example order, number of examples that were truncated).
    """
    if pair_truncation not in PAIR_TRUNCATIONS:
        raise ValueError(f"unknown pair_truncation {pair_truncation!r}; expected one of {list(PAIR_TRUNCATIONS)}")
    if not examples:
        return [], 0
    has_pair = {example.source_pair is not None for example in examples}
    if len(has_pair) > 1:
        raise ValueError("examples mix single texts and text pairs; encode them separately")
    first = [example.source for example in examples]
    second = [example.source_pair for example in examples] if has_pair == {True} else None
    # Single texts have nothing to choose between, so their truncation is always the plain cut.
    truncation = pair_truncation if second is not None else "longest_first"
    return _encode_truncating(tokenizer, first, second, max_source_tokens, truncation)


def encode_targets(
    tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_target_tokens: int
) -> tuple[list[list[int]], int]:
    """Decoder label ids for each target text, at most ``max_target_tokens`` long (special tokens included).

    Returns:
        (token-id lists in order, number of targets that were truncated).
    """
    if not texts:
        return [], 0
    return _encode_truncating(tokenizer, list(texts), None, max_target_tokens, "longest_first", as_target=True)
