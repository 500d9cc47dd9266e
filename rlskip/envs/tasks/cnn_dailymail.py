"""CNN/DailyMail (Hermann et al., 2015; See et al., 2017): multi-sentence news highlights; hub
``abisee/cnn_dailymail``, config ``3.0.0``."""

from __future__ import annotations

from typing import Any

from rlskip.metrics import ROUGE_TYPES

from .base import Example, register
from .hf_data import HFTask


@register("cnn_dailymail")
class CNNDailyMailTask(HFTask):
    """article -> highlights, scored by ROUGE.

    The default reward metric is ROUGE-L F1, for the same reason as XSum (denser than ROUGE-2, so the
    reward varies smoothly with quality); :meth:`score_all` reports all four variants, including
    rougeLsum, the number CNN/DailyMail papers quote. Highlights are newline-separated on the hub and
    " . "-separated in PTB-tokenised copies; :func:`rlskip.metrics.sentences_for_rougelsum` handles both.
    """

    name = "cnn_dailymail"
    kind = "generation"
    metric = "rougeL"
    prompt = "Summarize the following news article in three sentences.\n\n{input}"
    answer_cue = "Summary:"
    report_metrics = ROUGE_TYPES
    hub_path = "abisee/cnn_dailymail"
    default_split = "test"
    required_fields = ("article", "highlights")
    local_example = "../shared/data/cnn_dailymail/test_250.jsonl"

    def __init__(self, metric: str | None = None) -> None:
        super().__init__(hub_config="3.0.0", metric=metric)

    def to_example(self, record: dict[str, Any], index: int) -> Example:
        """The article is the source; the highlights are the single target."""
        return Example(id=str(record.get("id", index)), source=record["article"], targets=(record["highlights"],))
