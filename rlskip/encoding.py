"""Tokenising inputs and targets, counting what was cut: the one encoder every caller uses.

The environment, evaluation, inference, the generator warm-up and joint tuning all tokenise through an
:class:`Encoder`, so an input is cut and padded the same way wherever it goes. Over-long inputs are
truncated, never dropped, and the number truncated is returned so the caller can log it once: a silent cut
would make quality look worse for no visible reason.

Examples are duck-typed: anything with ``source`` and ``source_pair`` (and ``targets`` for training) works,
such as :class:`rlskip.envs.tasks.Example`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from rlskip.prompts import PromptFormat, Prompter, Tokens

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
    examples: Sequence[Any],
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


@dataclass(frozen=True)
class Text:
    """A raw input (an inference request): the same fields the encoder reads from a task example."""

    source: str
    source_pair: str | None = None


def pad_rows(rows: Sequence[Sequence[int]], value: int) -> torch.Tensor:
    """Right-pad token-id rows with ``value`` into a long tensor ``[len(rows), longest]``."""
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.as_tensor(r, dtype=torch.long)
    return out


class Encoder:
    """Tokenises inputs (and targets for training) for one backbone, the same way for every caller.

    Args:
        tokenizer: the backbone's Hugging Face tokenizer.
        max_tokens: input budget per instance, special and template tokens included; longer inputs are
            truncated (counted).
        pair_truncation: how a (source, source_pair) input is cut: ``"only_second"`` keeps the first segment
            whole (a SQuAD question), ``"longest_first"`` trims the longer one (see :func:`encode_examples`).
        max_target_tokens: label budget for training.
        prompt: wrap each input in this instruction template (:mod:`rlskip.prompts`); needed by decoder-only
            models, optional for others (a T5-style prefix). Its template tokens are protected from dropping.
        causal: the backbone is decoder-only: training sequences are prompt + target in one row.
    """

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, max_tokens: int, pair_truncation: str = "longest_first",
        max_target_tokens: int = 256, prompt: PromptFormat | None = None, causal: bool = False,
    ) -> None:
        if int(max_tokens) < 1:
            raise ValueError(f"max tokens must be positive, got {max_tokens}")
        if pair_truncation not in PAIR_TRUNCATIONS:
            raise ValueError(f"unknown pair_truncation {pair_truncation!r}; expected one of {list(PAIR_TRUNCATIONS)}")
        if causal and prompt is None:
            raise ValueError("a decoder-only backbone needs a prompt format (its input becomes the prompt)")
        self.tokenizer, self.max_tokens, self.pair_truncation = tokenizer, int(max_tokens), pair_truncation
        self.max_target_tokens, self.causal = int(max_target_tokens), causal
        self.prompter = None if prompt is None else Prompter(tokenizer, prompt)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad is None:
            raise ValueError("the tokenizer has neither a pad nor an EOS token to pad batches with")
        self.pad_id = int(pad)

    @property
    def prompt(self) -> PromptFormat | None:
        """The prompt format inputs are wrapped in (None: inputs as they are)."""
        return None if self.prompter is None else self.prompter.format

    def inputs(self, items: Sequence[Any]) -> tuple[list[list[int]], int]:
        """Input ids per item (texts, or examples with ``source``/``source_pair``) and how many were cut.
        With a prompt format each row is a :class:`~rlskip.prompts.Tokens` that knows its template positions."""
        items = [Text(x) if isinstance(x, str) else x for x in items]
        for i, item in enumerate(items):
            if not isinstance(item.source, str) or not item.source.strip():
                raise ValueError(f"input {i} is empty or not a string: {item.source!r}")
        if self.prompter is None:
            return encode_examples(self.tokenizer, items, self.max_tokens, self.pair_truncation)
        rows = [self.prompter.encode(x.source, x.source_pair, self.max_tokens, self.pair_truncation) for x in items]
        return [r for r, _ in rows], sum(cut for _, cut in rows)

    def batch(self, rows: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Right-padded ``(input_ids, attention_mask, protected)`` for token-id rows; ``protected`` marks the
        template positions of prompted rows (None without a prompt format)."""
        if not rows:
            raise ValueError("no inputs given")
        lengths = torch.tensor([len(r) for r in rows])
        ids = pad_rows(rows, self.pad_id)
        protected = None
        if any(getattr(r, "protected", None) for r in rows):
            protected = torch.zeros(ids.shape, dtype=torch.bool)
            for i, r in enumerate(rows):
                protected[i, list(getattr(r, "protected", ()))] = True
        return ids, torch.arange(ids.shape[1])[None, :] < lengths[:, None], protected

    def encode(self, items: Sequence[Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``inputs`` then ``batch``."""
        return self.batch(self.inputs(items)[0])

    def labels(self, examples: Sequence[Any]) -> list[list[int]]:
        """Label ids for teacher forcing: the first target of each example, cut to ``max_target_tokens``
        (a decoder-only model's end with its EOS, which ends the answer)."""
        if not examples:
            raise ValueError("training needs at least one example")
        if any(not getattr(ex, "targets", None) for ex in examples):
            raise ValueError("training needs generation examples (each with at least one target)")
        targets = [ex.targets[0] for ex in examples]
        if not self.causal:
            return encode_targets(self.tokenizer, targets, self.max_target_tokens)[0]
        eos = self.tokenizer.eos_token_id
        prefix = self.prompter.answer_prefix
        ids = self.tokenizer([prefix + t for t in targets], add_special_tokens=False)["input_ids"]
        return [row[: self.max_target_tokens - 1] + [eos] for row in ids]

    def training_rows(self, rows: Sequence[Sequence[int]], labels: Sequence[Sequence[int]]) -> tuple[torch.Tensor, ...]:
        """``(input_ids, attention_mask, protected, labels)`` for teacher forcing from encoded inputs and their
        labels (padded with -100). A decoder-only model reads prompt and answer in one row: its labels are
        -100 over the prompt, and the answer's positions are protected (only prompt tokens may be dropped)."""
        if not self.causal:
            ids, mask, protected = self.batch(rows)
            return ids, mask, protected, pad_rows(labels, -100)
        seqs = [Tokens(list(r) + list(y), [*getattr(r, "protected", ()), *range(len(r), len(r) + len(y))]) for r, y in zip(rows, labels)]
        ids, mask, protected = self.batch(seqs)
        return ids, mask, protected, pad_rows([[-100] * len(r) + list(y) for r, y in zip(rows, labels)], -100)

    def training_batch(self, examples: Sequence[Any]) -> tuple[torch.Tensor, ...]:
        """``(input_ids, attention_mask, protected, labels)`` for teacher forcing on examples."""
        labels = self.labels(examples)
        return self.training_rows(self.inputs(examples)[0], labels)

    def label_token_ids(self, words: Sequence[str]) -> list[int]:
        """The first token of each label word as the model's answer would begin it (classification by scoring
        the label words with an LM head); the words must start with different tokens."""
        if self.prompter is not None:
            ids = [self.prompter.answer_token(w) for w in words]
        else:
            ids = [self.tokenizer(" " + w, add_special_tokens=False)["input_ids"][0] for w in words]
        if len(set(ids)) != len(ids):
            raise ValueError(f"label words {list(words)} do not start with distinct tokens for this tokenizer")
        return ids

    def decode(self, token_ids: torch.Tensor) -> list[str]:
        """Texts of generated ids, special tokens removed, stripped."""
        return [t.strip() for t in self.tokenizer.batch_decode(token_ids, skip_special_tokens=True)]


def encoder_for(tokenizer, runtime, env_cfg, chat: bool, pair_truncation: str = "longest_first") -> Encoder:
    """The encoder a run's ``env`` config describes for a backbone: its token budget, and its prompt format
    (``env.prompt`` through the chat template when ``chat``; decoder-only backbones need one)."""
    prompt = None if env_cfg.get("prompt") is None else PromptFormat(env_cfg.prompt, chat)
    return Encoder(
        tokenizer, env_cfg.max_source_tokens, pair_truncation, prompt=prompt, causal=runtime.kind == "causal"
    )


def read_utf8_lines(path: Path) -> list[str]:
    """The lines of a text file; a file that is not UTF-8 fails in one line naming the file and the line."""
    lines = []
    for n, raw in enumerate(Path(path).read_bytes().splitlines(), 1):
        try:
            lines.append(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}:{n}: not valid UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1})") from None
    return lines

