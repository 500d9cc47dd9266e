"""Quality metrics against their references: rouge-score itself, and hand-worked SQuAD cases."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from rouge_score import rouge_scorer

from rlskip import metrics
from rlskip.metrics import (
    METRICS,
    ROUGE_TYPES,
    accuracy,
    exact_match,
    fidelity,
    get_metric,
    normalize_answer,
    rouge_scores,
    score_many,
    sentences_for_rougelsum,
    squad_em,
    squad_f1,
)

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
DIRECT = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)

PAIRS = [
    ("The cat sat on the mat.\nIt was happy.", "A cat was sitting on a mat.\nThe cat was happy."),
    ("police arrested three men on tuesday", "Three men were arrested by police on Tuesday night."),
    ("nothing in common", "entirely different words here"),
    ("", "an empty prediction scores zero"),
]


def test_rouge_equals_rouge_score_called_directly():
    predictions, references = zip(*PAIRS)
    ours = rouge_scores(list(predictions), list(references))
    for i, (prediction, reference) in enumerate(PAIRS):
        expected = DIRECT.score(reference, prediction)
        for t in ROUGE_TYPES:
            assert ours[t][i] == pytest.approx(expected[t].fmeasure), (t, i)


def test_rouge_on_real_xsum_lead_sentences():
    path = DATA / "xsum" / "test_1000.jsonl"
    if not path.is_file():
        pytest.skip(f"real data absent: {path}")
    rows = [json.loads(line) for line in path.open()][:30]
    predictions = [row["document"].split("\n")[0] for row in rows]
    references = [row["summary"] for row in rows]
    for t in ("rouge1", "rouge2", "rougeL"):
        expected = [DIRECT.score(r, p)[t].fmeasure for p, r in zip(predictions, references)]
        assert METRICS[t](predictions, references) == pytest.approx(expected)
    assert 0 < sum(METRICS["rouge2"](predictions, references)) < len(rows)


def test_rougelsum_splits_single_line_text_into_sentences():
    text = 'He said "stop." Then he left! Police are investigating . More follows'
    assert sentences_for_rougelsum(text).split("\n") == [
        'He said "stop."',
        "Then he left!",
        "Police are investigating .",
        "More follows",
    ]
    assert sentences_for_rougelsum("already\nsplit. into lines") == "already\nsplit. into lines"
    prediction = "The cat was happy. A cat sat on the mat."
    reference = "A cat sat on a mat. The cat was happy."
    ours = METRICS["rougeLsum"]([prediction], [reference])[0]
    expected = DIRECT.score(sentences_for_rougelsum(reference), sentences_for_rougelsum(prediction))["rougeLsum"]
    assert ours == pytest.approx(expected.fmeasure)
    # Sentence-level LCS forgives the swapped sentence order; plain rougeL does not.
    assert ours > METRICS["rougeL"]([prediction], [reference])[0]


def test_rouge_scorer_is_built_once():
    metrics._rouge_scorer.cache_clear()
    for _ in range(3):
        METRICS["rouge2"](["a b c"], ["a b d"])
    assert metrics._rouge_scorer.cache_info().misses == 1


def test_rouge_multi_reference_takes_the_best():
    prediction = "denver broncos win the super bowl"
    golds = ["carolina panthers lose", "the denver broncos won the super bowl"]
    best = max(DIRECT.score(g, prediction)["rouge1"].fmeasure for g in golds)
    assert METRICS["rouge1"]([prediction], [golds]) == [pytest.approx(best)]


def test_squad_normalisation_and_exact_match():
    assert normalize_answer("The  Denver Broncos!") == "denver broncos"
    assert normalize_answer("an apple, a pear") == "apple pear"
    assert squad_em(["the Denver Broncos"], [["Denver Broncos"]]) == [1.0]
    assert squad_f1(["the Denver Broncos"], [["Denver Broncos"]]) == [1.0]
    assert squad_em(["Denver"], [["Denver Broncos"]]) == [0.0]


def test_squad_f1_hand_worked():
    # pred {denver, broncos, won} vs gold {denver, broncos}: P = 2/3, R = 1, F1 = 0.8
    assert squad_f1(["Denver Broncos won"], [["the Denver Broncos"]]) == [pytest.approx(0.8)]
    # best over golds: "Carolina" gives P = 1/2, R = 1, F1 = 2/3; "Denver Broncos" gives 0
    assert squad_f1(["Carolina Panthers"], [["Denver Broncos", "Carolina"]]) == [pytest.approx(2 / 3)]
    # repeated tokens count with multiplicity: pred [x y y], gold [y z]: common 1, P = 1/3, R = 1/2, F1 = 0.4
    assert squad_f1(["x y y"], ["y z"]) == [pytest.approx(0.4)]
    assert squad_f1(["", "no overlap"], ["gold", "gold"]) == [0.0, 0.0]


def test_accuracy_exact_match_and_fidelity():
    assert accuracy([1, 0, 1], [1, 1, 1]) == [1.0, 0.0, 1.0]
    assert exact_match(["4  1 9 3 ", "1 2"], ["4 1 9 3", "1 2 3"]) == [1.0, 0.0]
    full = ["the full model says this", "and this"]
    assert fidelity(full, full) == [1.0, 1.0]
    skipped = ["the model says this", "something else"]
    assert fidelity(skipped, full, base_metric="rouge1") == METRICS["rouge1"](skipped, full)
    assert METRICS["fidelity_rougeL"](skipped, full) == METRICS["rougeL"](skipped, full)
    with pytest.raises(ValueError, match="reference-based"):
        fidelity(skipped, full, base_metric="fidelity_rougeL")


def test_score_many_matches_single_metrics():
    predictions, references = zip(*PAIRS)
    names = ["rouge2", "exact_match", "rougeL", "squad_f1"]
    many = score_many(names, list(predictions), list(references))
    assert list(many) == names
    for name in names:
        assert many[name] == pytest.approx(METRICS[name](list(predictions), list(references)))


@pytest.mark.parametrize("name", sorted(set(METRICS) - {"accuracy"}))
def test_every_text_metric_is_in_unit_interval(name):
    predictions, references = zip(*PAIRS)
    values = METRICS[name](list(predictions), list(references))
    assert len(values) == len(PAIRS)
    assert all(0.0 <= v <= 1.0 for v in values)


def test_bad_inputs_fail_clearly():
    with pytest.raises(ValueError, match="unknown metric 'bleu'"):
        get_metric("bleu")
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        squad_f1(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="unknown ROUGE type"):
        rouge_scores(["a"], ["a"], ["rouge9x"])
    with pytest.raises(ValueError, match="no reference"):
        squad_em(["a"], [[]])
