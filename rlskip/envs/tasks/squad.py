"""SQuAD v1.1 (Rajpurkar et al., 2016): extractive QA posed as generation; hub ``rajpurkar/squad``."""

from __future__ import annotations

from typing import Any

from .base import Example, register
from .hf_data import HFTask


@register("squad")
class SquadTask(HFTask):
    """question + context -> answer text, scored by the official SQuAD v1.1 F1 (EM also reported).

    The question is the first segment and the context the second, so ``only_second`` truncation trims
    the context and never the question. All gold answers are targets: the first is the training target,
    and scoring takes the best match over all of them, as the official script does.
    """

    name = "squad"
    kind = "generation"
    metric = "squad_f1"
    report_metrics = ("squad_f1", "squad_em")
    pair_truncation = "only_second"
    hub_path = "rajpurkar/squad"
    default_split = "validation"
    required_fields = ("question", "context", "answers")
    local_example = "../shared/data/squad/validation_super_bowl_50.jsonl"
    prompt = "Answer the question with a short phrase copied from the context.\n\nContext: {pair}\n\nQuestion: {input}"

    def __init__(self, metric: str | None = None) -> None:
        super().__init__(metric=metric)

    def to_example(self, record: dict[str, Any], index: int) -> Example:
        """Question as source, context as source_pair, every gold answer text as a target."""
        return Example(
            id=str(record.get("id", index)),
            source=record["question"],
            source_pair=record["context"],
            targets=tuple(record["answers"]["text"]),
        )
