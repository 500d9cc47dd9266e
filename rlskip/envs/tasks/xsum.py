"""XSum (Narayan et al., 2018): one-sentence summaries of BBC articles; hub ``EdinburghNLP/xsum``."""

from __future__ import annotations

from typing import Any

from rlskip.metrics import ROUGE_TYPES

from .base import Example, register
from .hf_data import HFTask


@register("xsum")
class XSumTask(HFTask):
    """document -> summary, scored by ROUGE.

    The default reward metric is ROUGE-L F1: on XSum's single-sentence summaries, ROUGE-2 is exactly 0
    for most items even for a sensible summary (lead-1 scores 0 on 73% of the first 1000 test items,
    ROUGE-L on 6%), so a ROUGE-2 reward would be mostly zeros with rare spikes. Pass ``metric="rouge2"``
    to reproduce papers that optimise ROUGE-2; :meth:`score_all` reports all four ROUGE variants.
    """

    name = "xsum"
    kind = "generation"
    metric = "rougeL"
    report_metrics = ROUGE_TYPES
    hub_path = "EdinburghNLP/xsum"
    default_split = "test"
    required_fields = ("document", "summary")
    local_example = "../shared/data/xsum/test_1000.jsonl"
    prompt = "Summarize the following article in one sentence.\n\n{input}"
    answer_cue = "One-sentence summary:"

    def __init__(self, metric: str | None = None) -> None:
        super().__init__(metric=metric)

    def to_example(self, record: dict[str, Any], index: int) -> Example:
        """The article is the source; the reference summary is the single target."""
        return Example(id=str(record.get("id", index)), source=record["document"], targets=(record["summary"],))
