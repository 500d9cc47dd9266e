"""Loading task records from the Hugging Face hub or from local files with the hub's field names.

Both paths go through ``datasets`` so a local JSON lines / JSON / CSV / Parquet file and the hub yield the
same records (nested fields such as SQuAD's ``answers{text, answer_start}`` included). Every failure a
user can cause (hub unreachable, missing file, missing field, unreadable file) ends in one line that says
what to do, e.g. point ``env.data_files`` at a local file.

:class:`HFTask` holds what all hub-backed tasks share: load, skip and count empty documents, apply
``limit``, and score with a metric chosen by name. A concrete task only maps one record to an
:class:`Example` and names its metrics.
"""

from __future__ import annotations

import logging
import os
from abc import abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from itertools import chain
from pathlib import Path
from typing import Any, ClassVar

import datasets
from datasets.exceptions import DatasetGenerationError
from huggingface_hub import constants as hub_constants
from huggingface_hub.errors import LocalEntryNotFoundError

from rlskip.backbone import hub_reachable
from rlskip.encoding import read_utf8_lines
from rlskip.metrics import get_metric, score_many

from .base import Example, Task

logger = logging.getLogger(__name__)

DataFiles = str | os.PathLike | Sequence[str | os.PathLike]

# File extension -> the ``datasets`` packaged builder that reads it.
LOCAL_BUILDERS: dict[str, str] = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def hub_offline() -> bool:
    """Whether the user asked for offline mode, reading the environment *now*.

    ``datasets`` and ``huggingface_hub`` read ``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE`` once, at
    import; a variable set later (a notebook, a test, a launcher) would otherwise be ignored and the
    hub retried for ~25 s before failing.
    """
    value = os.environ.get("HF_DATASETS_OFFLINE", os.environ.get("HF_HUB_OFFLINE", ""))
    return value.upper() in datasets.config.ENV_VARS_TRUE_VALUES or bool(datasets.config.HF_HUB_OFFLINE)


@contextmanager
def _libraries_offline(offline: bool) -> Iterator[None]:
    """Tell ``datasets`` and ``huggingface_hub`` about an offline request made after they were imported.

    In offline mode ``datasets`` still serves a dataset from its local cache, so this is better than
    refusing the hub path outright.
    """
    saved = (datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE)
    if offline:
        datasets.config.HF_HUB_OFFLINE = hub_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE = saved


def _load_hub(
    hub_path: str, hub_config: str | None, split: str, required_fields: Sequence[str], local_example: str | None
) -> datasets.Dataset:
    """One split from the hub; an unreachable hub becomes a one-line ValueError naming ``env.data_files``."""
    offline = hub_offline()
    reachable = not offline and hub_reachable()
    try:
        with _libraries_offline(not reachable):
            return datasets.load_dataset(hub_path, hub_config, split=split)
    except (ConnectionError, TimeoutError, LocalEntryNotFoundError) as err:
        name = f"{hub_path} ({hub_config})" if hub_config else hub_path
        why = "offline" if offline else ("unreachable" if not reachable else f"unreachable: {type(err).__name__}")
        example = f" (e.g. env.data_files={local_example})" if local_example else ""
        raise ValueError(
            f"cannot load {name} from the Hugging Face hub ({why}); point env.data_files at local JSON lines / "
            f"JSON / CSV / Parquet files with fields {', '.join(required_fields)}{example}"
        ) from None


def _load_local_file(path: Path, required_fields: Sequence[str]) -> datasets.Dataset:
    """One local file, read by the ``datasets`` builder for its extension and checked for fields."""
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path} (resolved to {path.resolve()})")
    builder = LOCAL_BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise ValueError(
            f"cannot read {path}: unknown extension {path.suffix!r}; expected one of {sorted(LOCAL_BUILDERS)}"
        )
    if builder in ("json", "csv"):
        read_utf8_lines(path)  # a text file that is not UTF-8 fails naming its line, not deep inside datasets
    try:
        ds = datasets.load_dataset(builder, data_files=str(path), split="train")
    except DatasetGenerationError as err:
        message = str(err.__cause__ or err).strip()
        cause = message.splitlines()[0] if message else type(err.__cause__ or err).__name__
        raise ValueError(f"cannot read {path} as {builder}: {cause}") from None
    missing = [f for f in required_fields if f not in ds.column_names]
    if missing:
        raise ValueError(f"{path} lacks required field(s) {', '.join(missing)}; it has {', '.join(ds.column_names)}")
    return ds


def load_records(
    hub_path: str,
    hub_config: str | None,
    split: str,
    data_files: DataFiles | None,
    required_fields: Sequence[str],
    local_example: str | None = None,
) -> Iterator[dict[str, Any]]:
    """Records (plain dicts with the hub's field names) from the hub or from local files.

    Args:
        hub_path: hub dataset id, e.g. ``"EdinburghNLP/xsum"``; used when ``data_files`` is None.
        hub_config: hub configuration name (``"3.0.0"``, ``"sst2"``) or None.
        split: hub split; ignored for local files (each file set is one split).
        data_files: one path or a list of paths (.jsonl, .json, .csv, .parquet), read in order.
        required_fields: fields every file must have; checked for each file before any record is yielded.
        local_example: a local path to suggest in the error when the hub cannot be reached.

    All files are opened and checked eagerly, so bad input fails here; records are then produced lazily,
    so a caller that stops at ``limit`` converts only what it uses.
    """
    if data_files is None:
        parts = [_load_hub(hub_path, hub_config, split, required_fields, local_example)]
    else:
        paths = [data_files] if isinstance(data_files, (str, os.PathLike)) else list(data_files)
        if not paths:
            raise ValueError("env.data_files is an empty list; give at least one file")
        parts = [_load_local_file(Path(p), required_fields) for p in paths]
    return chain.from_iterable(parts)


def is_empty(example: Example) -> bool:
    """An example with nothing to encode: blank source, or a blank second segment of a pair."""
    return not example.source.strip() or (example.source_pair is not None and not example.source_pair.strip())


class HFTask(Task):
    """A task backed by a hub dataset (or local files with its field names).

    Subclasses set the class attributes and implement :meth:`to_example`. The class attribute ``metric``
    is the default reward metric; ``report_metrics`` are all the metrics :meth:`score_all` reports, and
    the choices for the ``metric`` argument. After :meth:`load`, ``self.stats`` holds
    ``{"loaded": n, "empty_skipped": m}``.

    Args:
        hub_config: hub configuration name, for datasets that have several.
        metric: the metric :meth:`score` uses (one of ``report_metrics``); None for the task's default.
    """

    hub_path: ClassVar[str]
    default_split: ClassVar[str]
    required_fields: ClassVar[tuple[str, ...]]
    report_metrics: ClassVar[tuple[str, ...]]
    local_example: ClassVar[str | None] = None

    def __init__(self, hub_config: str | None = None, metric: str | None = None) -> None:
        if metric is not None and metric not in self.report_metrics:
            raise ValueError(
                f"task {self.name} cannot score with {metric!r}; expected one of {list(self.report_metrics)}"
            )
        self.metric = metric or type(self).metric
        self.hub_config = hub_config
        self.stats: dict[str, int] = {"loaded": 0, "empty_skipped": 0}

    @abstractmethod
    def to_example(self, record: dict[str, Any], index: int) -> Example:
        """Map one record (hub field names) to an :class:`Example`; ``index`` is its position, for ids."""

    def load(
        self, split: str | None = None, data_files: DataFiles | None = None, limit: int | None = None
    ) -> list[Example]:
        """Up to ``limit`` non-empty examples; empty documents are skipped, counted, and logged once."""
        if limit is not None and limit < 1:
            raise ValueError(f"limit must be a positive number of examples or None, got {limit}")
        records = load_records(
            self.hub_path,
            self.hub_config,
            split or self.default_split,
            data_files,
            self.required_fields,
            self.local_example,
        )
        examples: list[Example] = []
        empty = 0
        for index, record in enumerate(records):
            if limit is not None and len(examples) >= limit:
                break
            example = self.to_example(record, index)
            if is_empty(example):
                empty += 1
            else:
                examples.append(example)
        self.stats = {"loaded": len(examples), "empty_skipped": empty}
        if empty:
            logger.warning("%s: skipped %d empty document(s); kept %d", self.name, empty, len(examples))
        return examples

    def references(self, examples: Sequence[Example]) -> list:
        """What predictions are scored against: labels for classification, all gold targets otherwise."""
        if self.kind == "classification":
            return [example.label for example in examples]
        return [example.targets for example in examples]

    def score(self, predictions: Sequence, examples: Sequence[Example]) -> list[float]:
        """Per-example quality in [0, 1] under ``self.metric``."""
        return get_metric(self.metric)(predictions, self.references(examples))

    def score_all(self, predictions: Sequence, examples: Sequence[Example]) -> dict[str, list[float]]:
        """Per-example quality under every metric in ``report_metrics``, by name."""
        return score_many(self.report_metrics, predictions, self.references(examples))
