"""Prompt formats: how an input is wrapped in an instruction, for decoder-only models (and T5-style prefixes).

A :class:`PromptFormat` is a template with an ``{input}`` placeholder (and ``{pair}`` for text pairs: a SQuAD
context, a GLUE second sentence), rendered as plain text or through the tokenizer's chat template (instruct
models: the template becomes the user turn and the model answers as the assistant). :class:`Prompter`
tokenises the fixed parts of the rendered prompt once and the inputs separately, so that

- only the inputs are truncated to fit the token budget, never the instruction or the template;
- the template's positions are known: they are *protected* (a plan never drops them).

Tokenising the parts separately can split a word at a part boundary differently from tokenising the whole
string; every caller (training, evaluation, inference, serving) goes through the same :class:`Prompter`, so
the model always sees the same ids for the same input.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

_MARKS = {"input": "\uE000rlskip-input\uE000", "pair": "\uE000rlskip-pair\uE000"}


class Tokens(list):
    """Token ids of one prompt, with the positions no plan may drop (``protected``: the template's)."""

    def __init__(self, ids: Sequence[int], protected: Sequence[int] = ()) -> None:
        super().__init__(ids)
        self.protected = tuple(protected)


@dataclass(frozen=True)
class PromptFormat:
    """An instruction template around the input.

    Args:
        template: text with ``{input}`` (and ``{pair}`` for text pairs), e.g.
            ``"Summarize the article in one sentence.\\n\\n{input}"``.
        chat: render it as the user turn of the tokenizer's chat template, with the assistant's turn opened.
    """

    template: str
    chat: bool = False

    def __post_init__(self) -> None:
        if self.template.count("{input}") != 1 or self.template.count("{pair}") > 1:
            raise ValueError(f"a prompt template needs one {{input}} and at most one {{pair}}, got {self.template!r}")


class Prompter:
    """Tokenises inputs into a :class:`PromptFormat` for one tokenizer (a fast tokenizer: it needs offsets)."""

    def __init__(self, tokenizer, fmt: PromptFormat) -> None:
        self.tokenizer, self.format = tokenizer, fmt
        text = fmt.template.replace("{input}", _MARKS["input"]).replace("{pair}", _MARKS["pair"])
        if fmt.chat:
            if not getattr(tokenizer, "chat_template", None):
                raise ValueError("the prompt asks for the chat template, but the tokenizer has none (set chat to false)")
            text = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
        # the rendered prompt as fixed parts around the placeholders, in order
        self.slots: list[str] = []
        self.parts: list[str] = []
        rest = text
        while True:
            found = [(rest.find(m), name) for name, m in _MARKS.items() if m in rest]
            if not found:
                self.parts.append(rest)
                break
            at, name = min(found)
            self.parts.append(rest[:at])
            self.slots.append(name)
            rest = rest[at + len(_MARKS[name]) :]

    @property
    def has_pair(self) -> bool:
        return "pair" in self.slots

    @property
    def answer_prefix(self) -> str:
        """What precedes an answer's first word: nothing in a chat turn, a space after plain text."""
        return "" if self.format.chat else " "

    def _tokenize(self, text: str):
        # a chat template writes its own special tokens; plain text gets what the tokenizer adds (a BOS)
        return self.tokenizer(text, add_special_tokens=not self.format.chat, return_offsets_mapping=True)

    def encode(self, first: str, second: str | None, max_tokens: int, truncation: str) -> tuple[Tokens, bool]:
        """The prompt of one input cut to ``max_tokens`` (inputs trimmed at their ends, ``longest_first`` or
        ``only_second``), and whether anything was cut.

        The whole prompt is tokenised at once, so the ids are those the tokenizer gives the rendered text; a
        token lying wholly inside an input is that input's (droppable, and cut first), any other is the
        template's (protected).
        """
        if (second is not None) != self.has_pair:
            need = "a text pair ({pair} in the template)" if self.has_pair else "single texts (no {pair} in the template)"
            raise ValueError(f"this prompt format takes {need}")
        texts, spans, text = {"input": first, "pair": second}, {}, ""
        for fixed, slot in zip(self.parts, [*self.slots, None]):
            text += fixed
            if slot is not None:
                spans[slot] = (len(text), len(text) + len(texts[slot]))
                text += texts[slot]
        enc = self._tokenize(text)
        owner = [
            next((name for name, (s, e) in spans.items() if s <= a and b <= e and a < b), None)
            for a, b in enc["offset_mapping"]
        ]
        fixed = owner.count(None)
        if fixed + len(self.slots) > max_tokens:
            raise ValueError(f"the prompt template alone takes {fixed} of the {max_tokens} input tokens")
        keep = {name: owner.count(name) for name in self.slots}
        budget = max_tokens - fixed
        cut = sum(keep.values()) > budget
        if cut:
            if truncation == "only_second":
                keep["pair"] = max(1, budget - keep["input"])
                keep["input"] = budget - keep["pair"]
            else:  # longest_first: trim the longer input one token at a time, as the tokenizers do
                while sum(keep.values()) > budget:
                    longer = max(keep, key=lambda k: keep[k])
                    keep[longer] -= 1
        ids, protected, seen = [], [], dict.fromkeys(self.slots, 0)
        for tok, name in zip(enc["input_ids"], owner):
            if name is not None:
                seen[name] += 1
                if seen[name] > keep[name]:
                    continue
            else:
                protected.append(len(ids))
            ids.append(tok)
        return Tokens(ids, protected), cut

    def answer_token(self, word: str) -> int:
        """The first token of ``word`` as the model's answer would begin it, right after a prompt."""
        prompt = "".join(p + ("x" if slot else "") for p, slot in zip(self.parts, [*self.slots, None]))
        enc = self._tokenize(prompt + self.answer_prefix + word)
        start = len(prompt) + len(self.answer_prefix)
        return next(tok for tok, (a, b) in zip(enc["input_ids"], enc["offset_mapping"]) if b > start)
