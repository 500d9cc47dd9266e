"""Benchmark tasks on their real local files, the loader's errors, and counted truncation."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import datasets
import pytest
from huggingface_hub import constants as hub_constants
from rlskip.envs.tasks import TASKS, get_task, hf_data
from rlskip.encoding import encode_examples, encode_targets

from rlskip.metrics import METRICS

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
DATA = SHARED / "data"
TOKENIZER = SHARED / "models" / "bart-tokenizer"


def real(relative: str) -> Path:
    """A file under ../shared/data, or skip the test when it is absent."""
    path = DATA / relative
    if not path.is_file():
        pytest.skip(f"real data absent: {path}")
    return path


def first_rows(path: Path, n: int = 1) -> list[dict]:
    with path.open() as f:
        return [json.loads(next(f)) for _ in range(n)]


@pytest.fixture(scope="module")
def tokenizer():
    if not TOKENIZER.is_dir():
        pytest.skip(f"real tokenizer absent: {TOKENIZER}")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TOKENIZER)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_registry_has_the_benchmarks():
    assert {"xsum", "cnn_dailymail", "squad", "glue"} <= set(TASKS)
    with pytest.raises(ValueError, match="unknown task 'xsumm'"):
        get_task("xsumm")


@pytest.mark.parametrize(
    "task, relative, count, source_field, target_field",
    [
        ("xsum", "xsum/test_1000.jsonl", 1000, "document", "summary"),
        ("cnn_dailymail", "cnn_dailymail/test_250.jsonl", 250, "article", "highlights"),
    ],
)
def test_summarisation_tasks_load_real_files(task, relative, count, source_field, target_field):
    path = real(relative)
    t = get_task(task)
    examples = t.load(data_files=str(path))
    assert len(examples) == count
    assert t.stats == {"loaded": count, "empty_skipped": 0}
    row = first_rows(path)[0]
    assert examples[0].id == row["id"]
    assert examples[0].source == row[source_field]
    assert examples[0].targets == (row[target_field],)
    assert examples[0].source_pair is None and examples[0].label is None
    assert len({e.id for e in examples}) == count
    assert t.kind == "generation" and t.metric == "rougeL"
    # The reference scores itself perfectly under every reported metric; another item's reference does not.
    perfect = t.score_all([e.targets[0] for e in examples[:3]], examples[:3])
    assert set(perfect) == {"rouge1", "rouge2", "rougeL", "rougeLsum"}
    assert all(v == pytest.approx(1.0) for values in perfect.values() for v in values)
    assert t.score([examples[1].targets[0]], examples[:1])[0] < 0.5


def test_summarisation_metric_is_configurable():
    t = get_task("xsum", metric="rouge2")
    assert t.metric == "rouge2"
    with pytest.raises(ValueError, match="cannot score with 'accuracy'"):
        get_task("xsum", metric="accuracy")


def test_squad_loads_real_file_with_all_gold_answers():
    path = real("squad/validation_super_bowl_50.jsonl")
    t = get_task("squad")
    examples = t.load(data_files=path)
    assert len(examples) == 810 and t.stats["empty_skipped"] == 0
    rows = first_rows(path, 3)
    for example, row in zip(examples, rows):
        assert example.id == row["id"]
        assert example.source == row["question"]
        assert example.source_pair == row["context"]
        assert example.targets == tuple(row["answers"]["text"])
    assert examples[0].targets[0] == "Denver Broncos"
    assert t.pair_truncation == "only_second" and t.metric == "squad_f1"
    scores = t.score_all(["the Denver Broncos", "Carolina Panthers won"], examples[:2])
    assert scores["squad_em"][0] == 1.0 and scores["squad_f1"][0] == 1.0
    gold = examples[1].targets  # "Carolina Panthers": pred has one extra token -> P = 2/3, R = 1
    assert "Carolina Panthers" in gold
    assert scores["squad_f1"][1] == pytest.approx(0.8) and scores["squad_em"][1] == 0.0


@pytest.mark.parametrize(
    "config, split, count, pair",
    [
        ("sst2", "validation", 872, False),
        ("mrpc", "validation", 408, True),
        ("mrpc", "train", 3668, True),
        ("rte", "validation", 277, True),
        ("rte", "train", 2490, True),
    ],
)
def test_glue_loads_real_files(config, split, count, pair):
    path = real(f"glue/{config}/{split}.jsonl")
    t = get_task("glue", config=config)
    examples = t.load(data_files=path)
    assert len(examples) == count
    row = first_rows(path)[0]
    assert examples[0].id == str(row["idx"])
    assert examples[0].label == row["label"]
    if pair:
        assert (examples[0].source, examples[0].source_pair) == (row["sentence1"], row["sentence2"])
    else:
        assert examples[0].source == row["sentence"] and examples[0].source_pair is None
    assert t.num_labels == len(t.label_names) == 2
    assert {e.label for e in examples} == {0, 1}
    labels = [e.label for e in examples[:4]]
    assert t.score(labels, examples[:4]) == [1.0] * 4
    assert t.score([1 - y for y in labels], examples[:4]) == [0.0] * 4
    assert t.kind == "classification" and t.pair_truncation == "longest_first"


def test_glue_rejects_unknown_config_and_hidden_test_labels(tmp_path):
    with pytest.raises(ValueError, match=r"unknown GLUE config 'cola'; expected one of \['mrpc', 'rte', 'sst2'\]"):
        get_task("glue", config="cola")
    path = write_jsonl(tmp_path / "test.jsonl", [{"sentence": "fine film", "label": -1, "idx": 0}])
    with pytest.raises(ValueError, match="label -1.*test labels are hidden"):
        get_task("glue", config="sst2").load(data_files=path)
    assert get_task("glue", config="rte").label_names == ("entailment", "not_entailment")


def test_limit_keeps_the_first_examples():
    path = real("xsum/test_1000.jsonl")
    t = get_task("xsum")
    examples = t.load(data_files=path, limit=5)
    assert [e.id for e in examples] == [row["id"] for row in first_rows(path, 5)]
    assert t.stats["loaded"] == 5
    with pytest.raises(ValueError, match="limit must be a positive"):
        t.load(data_files=path, limit=0)


def test_empty_documents_are_skipped_counted_and_logged_once(tmp_path, caplog):
    rows = [
        {"id": "1", "document": "A real article.", "summary": "real"},
        {"id": "2", "document": "", "summary": "empty"},
        {"id": "3", "document": "  \n\t ", "summary": "blank"},
        {"id": "4", "document": "Another article.", "summary": "another"},
    ]
    path = write_jsonl(tmp_path / "xsum.jsonl", rows)
    t = get_task("xsum")
    with caplog.at_level(logging.WARNING, logger=hf_data.__name__):
        examples = t.load(data_files=path)
    assert [e.id for e in examples] == ["1", "4"]
    assert t.stats == {"loaded": 2, "empty_skipped": 2}
    records = [r for r in caplog.records if r.name == hf_data.__name__]
    assert len(records) == 1 and "skipped 2 empty" in records[0].getMessage()
    # limit counts kept examples, not rows read: the empties in between do not use it up
    assert [e.id for e in t.load(data_files=path, limit=2)] == ["1", "4"]


def test_empty_squad_context_is_skipped(tmp_path):
    answers = {"text": ["x"], "answer_start": [0]}
    rows = [
        {"id": "a", "question": "q?", "context": "x y", "answers": answers},
        {"id": "b", "question": "q?", "context": " ", "answers": answers},
    ]
    t = get_task("squad")
    assert [e.id for e in t.load(data_files=write_jsonl(tmp_path / "squad.jsonl", rows))] == ["a"]
    assert t.stats["empty_skipped"] == 1


def test_missing_field_fails_at_load_naming_field_and_file(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"id": "1", "document": "text", "headline": "no summary field"}])
    with pytest.raises(ValueError) as err:
        get_task("xsum").load(data_files=path)
    message = str(err.value)
    assert "summary" in message and str(path) in message and "\n" not in message
    with pytest.raises(ValueError, match="sentence2"):
        get_task("glue", config="rte").load(
            data_files=write_jsonl(tmp_path / "rte.jsonl", [{"sentence1": "a", "label": 0}])
        )


def test_missing_file_and_bad_files_fail_clearly(tmp_path):
    missing = tmp_path / "nope" / "test.jsonl"
    with pytest.raises(FileNotFoundError, match=f"data file not found: {missing}"):
        get_task("xsum").load(data_files=str(missing))
    odd = tmp_path / "data.txt"
    odd.write_text("document\tsummary\n")
    with pytest.raises(ValueError, match=r"unknown extension '\.txt'"):
        get_task("xsum").load(data_files=odd)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"document": "a", "summary": "b"}\n{"document": "unterminated\n')
    with pytest.raises(ValueError, match=f"cannot read {broken} as json") as err:
        get_task("xsum").load(data_files=broken)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="empty list"):
        get_task("xsum").load(data_files=[])


def test_csv_and_parquet_files_give_the_same_records(tmp_path):
    path = real("squad/validation_super_bowl_50.jsonl")
    rows = first_rows(path, 4)
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "squad.parquet"))
    from_parquet = get_task("squad").load(data_files=tmp_path / "squad.parquet")
    from_jsonl = get_task("squad").load(data_files=path, limit=4)
    assert from_parquet == from_jsonl  # nested answers{text, answer_start} survive Parquet
    (tmp_path / "squad.json").write_text(json.dumps(rows))  # a JSON array of records
    assert get_task("squad").load(data_files=tmp_path / "squad.json") == from_jsonl

    glue_rows = first_rows(real("glue/mrpc/validation.jsonl"), 5)
    datasets.Dataset.from_list(glue_rows).to_csv(str(tmp_path / "mrpc.csv"), index=False)
    task = get_task("glue", config="mrpc")
    assert [(e.source, e.source_pair, e.label) for e in task.load(data_files=tmp_path / "mrpc.csv")] == [
        (r["sentence1"], r["sentence2"], r["label"]) for r in glue_rows
    ]
    # several files are read in order, as one split
    both = task.load(data_files=[tmp_path / "mrpc.csv", tmp_path / "mrpc.csv"])
    assert len(both) == 10 and both[5].source == glue_rows[0]["sentence1"]


def test_offline_hub_gives_one_line_error_naming_env_data_files(monkeypatch):
    # Set only the environment variable, after datasets was imported: the loader must notice it itself.
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    flags = (datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE)
    with pytest.raises(ValueError) as err:
        get_task("xsum").load()
    message = str(err.value)
    assert "\n" not in message
    assert "cannot load EdinburghNLP/xsum from the Hugging Face hub (offline)" in message
    assert "env.data_files=" in message and "document, summary" in message
    with pytest.raises(ValueError, match=r"abisee/cnn_dailymail \(3\.0\.0\).*env\.data_files"):
        get_task("cnn_dailymail").load()
    with pytest.raises(ValueError, match=r"nyu-mll/glue \(rte\).*sentence1, sentence2, label"):
        get_task("glue", config="rte").load()
    assert (datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE) == flags  # restored


def test_unreachable_hub_gives_the_same_error(monkeypatch):
    # A real unreachable hub retries for ~25 s, so the connection failure is simulated.
    def unreachable(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'rajpurkar/squad' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hf_data.datasets, "load_dataset", unreachable)
    # (unreachable: the probe found no hub; or the library's own failure, named)
    with pytest.raises(ValueError, match=r"rajpurkar/squad from the Hugging Face hub \(unreachable(: ConnectionError)?\)"):
        get_task("squad").load()


def test_truncation_is_counted_on_real_documents(tokenizer):
    examples = get_task("xsum").load(data_files=real("xsum/test_1000.jsonl"), limit=40)
    full = [tokenizer(e.source)["input_ids"] for e in examples]
    max_tokens = 256
    ids, n_truncated = encode_examples(tokenizer, examples, max_tokens)
    assert n_truncated == sum(len(f) > max_tokens for f in full) > 0
    assert n_truncated < len(examples)
    for row, whole in zip(ids, full):
        assert len(row) <= max_tokens
        assert row[0] == tokenizer.bos_token_id and row[-1] == tokenizer.eos_token_id
        if len(whole) <= max_tokens:
            assert row == whole
        else:
            assert row[:-1] == whole[: max_tokens - 1]

    targets, n_cut = encode_targets(tokenizer, [e.targets[0] for e in examples], 12)
    assert n_cut == sum(len(tokenizer(text_target=e.targets[0])["input_ids"]) > 12 for e in examples)
    assert all(len(t) <= 12 for t in targets)
    assert encode_examples(tokenizer, [], 8) == ([], 0)


def test_pair_truncation_keeps_the_squad_question(tokenizer):
    t = get_task("squad")
    examples = t.load(data_files=real("squad/validation_super_bowl_50.jsonl"), limit=8)
    ids, n_truncated = encode_examples(tokenizer, examples, 48, t.pair_truncation)
    assert n_truncated == 8
    for row, example in zip(ids, examples):
        assert len(row) == 48
        assert tokenizer.decode(row, skip_special_tokens=True).startswith(example.source)

    rte = get_task("glue", config="rte")
    pairs = rte.load(data_files=real("glue/rte/validation.jsonl"), limit=8)
    ids, n_truncated = encode_examples(tokenizer, pairs, 32, rte.pair_truncation)
    full = tokenizer([e.source for e in pairs], [e.source_pair for e in pairs])["input_ids"]
    assert n_truncated == sum(len(f) > 32 for f in full)
    assert all(len(row) <= 32 for row in ids)


def test_encoding_rejects_bad_arguments(tokenizer):
    single = get_task("xsum").load(data_files=real("xsum/test_1000.jsonl"), limit=1)
    pair = get_task("squad").load(data_files=real("squad/validation_super_bowl_50.jsonl"), limit=1)
    with pytest.raises(ValueError, match="mix single texts and text pairs"):
        encode_examples(tokenizer, single + pair, 64)
    with pytest.raises(ValueError, match="unknown pair_truncation 'only_first'"):
        encode_examples(tokenizer, pair, 64, "only_first")
    with pytest.raises(ValueError, match="max tokens must be positive"):
        encode_examples(tokenizer, single, 0)


def test_task_scores_use_the_registered_metrics():
    examples = get_task("squad").load(data_files=real("squad/validation_super_bowl_50.jsonl"), limit=5)
    predictions = ["Broncos", "the Panthers", "Santa Clara", "x", "Denver"]
    expected = METRICS["squad_f1"](predictions, [e.targets for e in examples])
    assert get_task("squad").score(predictions, examples) == expected
