"""GLUE classification tasks SST-2, MRPC and RTE (Wang et al., 2019); hub ``nyu-mll/glue``."""

from __future__ import annotations

from typing import Any

from .base import Example, register
from .hf_data import HFTask

# config -> (first text field, second text field or None, label names in label-id order)
GLUE_CONFIGS: dict[str, tuple[str, str | None, tuple[str, ...]]] = {
    "sst2": ("sentence", None, ("negative", "positive")),
    "mrpc": ("sentence1", "sentence2", ("not_equivalent", "equivalent")),
    "rte": ("sentence1", "sentence2", ("entailment", "not_entailment")),
}
# config -> (instruction for an LM, the answer words it scores in label-id order)
GLUE_PROMPTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "sst2": ("Is the sentiment of this sentence positive or negative? Answer with one word.\n\n{input}", ("negative", "positive")),
    "mrpc": ("Do these two sentences mean the same thing? Answer yes or no.\n\nSentence 1: {input}\nSentence 2: {pair}", ("no", "yes")),
    "rte": ("Does the first sentence imply the second? Answer yes or no.\n\nSentence 1: {input}\nSentence 2: {pair}", ("yes", "no")),
}


@register("glue")
class GlueTask(HFTask):
    """Sentence (pair) classification, scored by accuracy.

    Args:
        config: which GLUE task: ``"sst2"``, ``"mrpc"`` or ``"rte"``.
    """

    name = "glue"
    kind = "classification"
    metric = "accuracy"
    report_metrics = ("accuracy",)
    hub_path = "nyu-mll/glue"
    default_split = "validation"

    def __init__(self, config: str) -> None:
        if config not in GLUE_CONFIGS:
            raise ValueError(f"unknown GLUE config {config!r}; expected one of {sorted(GLUE_CONFIGS)}")
        super().__init__(hub_config=config)
        self.first_field, self.second_field, self.label_names = GLUE_CONFIGS[config]
        self.prompt, self.label_words = GLUE_PROMPTS[config]
        self.num_labels = len(self.label_names)
        self.required_fields = (self.first_field, *([self.second_field] if self.second_field else []), "label")
        self.local_example = f"../shared/data/glue/{config}/validation.jsonl"

    def to_example(self, record: dict[str, Any], index: int) -> Example:
        """One sentence (SST-2) or a sentence pair (MRPC, RTE) and its label; unlabelled rows are refused."""
        label = int(record["label"])
        if not 0 <= label < self.num_labels:
            raise ValueError(
                f"glue/{self.hub_config} row {index} has label {label}, not in 0..{self.num_labels - 1} "
                "(GLUE test labels are hidden as -1; use the train or validation split)"
            )
        return Example(
            id=str(record.get("idx", index)),
            source=record[self.first_field],
            source_pair=record[self.second_field] if self.second_field else None,
            label=label,
        )
