"""The task interface: where instances come from and how an output is scored.

A task turns a dataset (from the Hugging Face hub, or from local files with the hub's field names) into
:class:`Example` records, and scores model outputs with a quality in [0, 1]. It knows nothing of models,
plans or rewards; the environment tokenises the examples and runs the runtime.

Tasks register by name (lm-evaluation-harness style) so configs can say ``env.task=xsum``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Callable, ClassVar


@dataclass(frozen=True)
class Example:
    """One instance.

    Args:
        id: stable identifier (dataset id or index).
        source: text fed to the encoder (for pairs, the first segment).
        source_pair: optional second segment (sentence pairs, SQuAD context), encoded as a text pair.
        targets: reference outputs for generation tasks; the first is the training target, all count for
            scoring (SQuAD has several gold answers).
        label: class label for classification tasks.
        group: optional difficulty group (the synthetic task reports quality per group).
    """

    id: str
    source: str
    source_pair: str | None = None
    targets: tuple[str, ...] = ()
    label: int | None = None
    group: str | None = None
    meta: dict = field(default_factory=dict, compare=False)


class Task(ABC):
    """A benchmark: its data and its quality metric.

    Subclasses set the class attributes and implement :meth:`load` and :meth:`score`.
    """

    name: ClassVar[str]
    kind: ClassVar[str]  # "generation" or "classification"
    metric: ClassVar[str]  # e.g. "rouge2", "squad_f1", "accuracy", "exact_match"
    # How a (source, source_pair) input is cut to the encoder's budget: "only_second" keeps a SQuAD
    # question whole and trims the context; "longest_first" trims whichever segment is longer.
    pair_truncation: ClassVar[str] = "longest_first"
    # How a decoder-only model is asked for the task: an instruction around {input} (and {pair}), and for
    # plain-text (base) models the cue the answer follows (rlskip.prompts).
    prompt: ClassVar[str] = "{input}"
    answer_cue: ClassVar[str] = "Answer:"
    # classification with an LM head scores these words' first tokens, one per label id
    label_words: tuple[str, ...] = ()

    def prompt_template(self, chat: bool) -> str:
        """The instruction template for a decoder-only model: as is in a chat turn, with the answer cue after
        it in plain text."""
        return self.prompt if chat else f"{self.prompt}\n{self.answer_cue}"

    @abstractmethod
    def load(self, split: str | None = None, data_files: str | list[str] | None = None, limit: int | None = None) -> list[Example]:
        """Load examples from the hub (``data_files=None``) or from local files with the hub's field names."""

    @abstractmethod
    def score(self, predictions: list[str] | list[int], examples: list[Example]) -> list[float]:
        """Per-example quality in [0, 1] of ``predictions`` (texts, or class ids for classification)."""

    def score_all(self, predictions: list[str] | list[int], examples: list[Example]) -> dict[str, list[float]]:
        """Every metric the task reports, by name (e.g. all ROUGE variants); the default is just ``metric``."""
        return {self.metric: self.score(predictions, examples)}


TASKS: dict[str, Callable[..., Task]] = {}


def register(name: str):
    """Class decorator: make a task constructible by name."""

    def deco(cls):
        TASKS[name] = cls
        return cls

    return deco


def get_task(name: str, **kwargs) -> Task:
    """Construct a registered task by name; unknown names fail with the list of known ones."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; expected one of {sorted(TASKS)}")
    return TASKS[name](**kwargs)
