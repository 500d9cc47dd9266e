"""Quality metrics: per-item scores in [0, 1], named in a registry so configs can say ``metric=rouge2``.

Every metric has the signature ``fn(predictions, references) -> list[float]``, one score per item, so a
reward can be computed per instance. A reference is either one string or a sequence of gold strings;
with several golds the item scores its best match (SQuAD's rule, and rouge-score's ``score_multi``).

ROUGE is computed by the ``rouge-score`` package (the reference implementation used by the literature),
never re-implemented here. SQuAD F1 / exact match follow the official v1.1 evaluation script.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Callable, Sequence
from functools import cache, partial

from rouge_score import rouge_scorer

Reference = str | Sequence[str]
MetricFn = Callable[[Sequence, Sequence], list[float]]

ROUGE_TYPES: tuple[str, ...] = ("rouge1", "rouge2", "rougeL", "rougeLsum")
_PUNCTUATION = frozenset(string.punctuation)

# A sentence ends at . ! or ? (optionally followed by a closing quote or bracket) and then whitespace.
# rouge-score's own splitter needs NLTK's punkt data, which is a separate download; this rule is what
# summarisation evaluations without punkt use, and it also splits PTB-tokenised " . " text.
_SENTENCE_END = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\"')\]]))\s+")


@cache
def _rouge_scorer(rouge_types: tuple[str, ...]) -> rouge_scorer.RougeScorer:
    """One scorer per set of ROUGE types, built once: building loads the Porter stemmer."""
    return rouge_scorer.RougeScorer(list(rouge_types), use_stemmer=True)


def _check_lengths(predictions: Sequence, references: Sequence) -> None:
    """Fail loudly on mismatched inputs instead of silently scoring a truncated zip."""
    if len(predictions) != len(references):
        raise ValueError(f"got {len(predictions)} predictions but {len(references)} references")


def _as_list(reference: Reference) -> list[str]:
    """A reference as a non-empty list of gold strings."""
    golds = [reference] if isinstance(reference, str) else list(reference)
    if not golds:
        raise ValueError("an item has no reference text to score against")
    return golds


def sentences_for_rougelsum(text: str) -> str:
    """Put one sentence per line, the layout rouge-score's ``rougeLsum`` expects.

    Text that already has newlines (Hugging Face CNN/DailyMail highlights) is kept as it is; single-line
    text (model outputs, PTB-tokenised highlights) is split after sentence-final punctuation. Without
    this, rougeLsum on single-line text silently degrades to rougeL.
    """
    if "\n" in text:
        return text
    return "\n".join(part for part in _SENTENCE_END.split(text.strip()) if part)


def rouge_scores(
    predictions: Sequence[str], references: Sequence[Reference], rouge_types: Sequence[str] = ROUGE_TYPES
) -> dict[str, list[float]]:
    """ROUGE F-measures per item for each of ``rouge_types`` (stemmed, as in the literature).

    All types are computed in one pass so tokenisation is shared; use this when reporting several.
    """
    types = tuple(rouge_types)
    unknown = sorted(set(types) - set(ROUGE_TYPES))
    if unknown:
        raise ValueError(f"unknown ROUGE type(s) {unknown}; expected some of {list(ROUGE_TYPES)}")
    _check_lengths(predictions, references)
    scorer = _rouge_scorer(types)
    lsum = "rougeLsum" in types
    out: dict[str, list[float]] = {t: [] for t in types}
    for prediction, reference in zip(predictions, references):
        golds = _as_list(reference)
        if lsum:
            prediction = sentences_for_rougelsum(prediction)
            golds = [sentences_for_rougelsum(g) for g in golds]
        scores = scorer.score_multi(golds, prediction) if len(golds) > 1 else scorer.score(golds[0], prediction)
        for t in types:
            out[t].append(float(scores[t].fmeasure))
    return out


def _rouge_one(rouge_type: str, predictions: Sequence[str], references: Sequence[Reference]) -> list[float]:
    """One ROUGE type per item (the registry's ``rouge1`` ... ``rougeLsum``)."""
    return rouge_scores(predictions, references, (rouge_type,))[rouge_type]


def normalize_answer(text: str) -> str:
    """Official SQuAD v1.1 normalisation: lowercase, drop punctuation and articles, squeeze whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def _squad_f1_single(prediction: str, gold: str) -> float:
    """Token-overlap F1 between one prediction and one gold answer (official v1.1 definition)."""
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(gold).split()
    same = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if same == 0:
        return 0.0
    precision = same / len(pred_tokens)
    recall = same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def squad_f1(predictions: Sequence[str], references: Sequence[Reference]) -> list[float]:
    """SQuAD v1.1 F1 per item: best token-overlap F1 over all gold answers."""
    _check_lengths(predictions, references)
    return [max(_squad_f1_single(p, g) for g in _as_list(r)) for p, r in zip(predictions, references)]


def squad_em(predictions: Sequence[str], references: Sequence[Reference]) -> list[float]:
    """SQuAD v1.1 exact match per item: 1 if the normalised prediction equals any normalised gold."""
    _check_lengths(predictions, references)
    return [
        float(any(normalize_answer(p) == normalize_answer(g) for g in _as_list(r)))
        for p, r in zip(predictions, references)
    ]


def accuracy(predictions: Sequence[int], references: Sequence[int]) -> list[float]:
    """1.0 where the predicted class equals the label, else 0.0."""
    _check_lengths(predictions, references)
    return [float(int(p) == int(r)) for p, r in zip(predictions, references)]


def exact_match(predictions: Sequence[str], references: Sequence[Reference]) -> list[float]:
    """1.0 where the prediction equals a reference up to whitespace (runs of spaces, leading/trailing)."""
    _check_lengths(predictions, references)
    return [
        float(any(" ".join(p.split()) == " ".join(g.split()) for g in _as_list(r)))
        for p, r in zip(predictions, references)
    ]


def fidelity(predictions: Sequence[str], full_outputs: Sequence[str], base_metric: str = "rougeL") -> list[float]:
    """Quality without references: ``base_metric`` of each prediction against the full model's own output.

    Used where the data has no gold outputs (e.g. free continuation by a decoder-only LM): a skipped
    model that reproduces the full model scores 1.
    """
    if base_metric.startswith("fidelity"):
        raise ValueError(f"fidelity needs a reference-based base metric, got {base_metric!r}")
    return get_metric(base_metric)(predictions, full_outputs)


METRICS: dict[str, MetricFn] = {
    **{t: partial(_rouge_one, t) for t in ROUGE_TYPES},
    "squad_f1": squad_f1,
    "squad_em": squad_em,
    "accuracy": accuracy,
    "exact_match": exact_match,
}
# Reference-free variants, named "fidelity_<base>", for data without gold outputs.
METRICS.update(
    {f"fidelity_{base}": partial(fidelity, base_metric=base) for base in [*ROUGE_TYPES, "squad_f1", "exact_match"]}
)


def get_metric(name: str) -> MetricFn:
    """The registered metric ``name``; unknown names fail with the list of known ones."""
    if name not in METRICS:
        raise ValueError(f"unknown metric {name!r}; expected one of {sorted(METRICS)}")
    return METRICS[name]


def score_many(names: Sequence[str], predictions: Sequence, references: Sequence) -> dict[str, list[float]]:
    """Several registered metrics at once, by name; the ROUGE types among them share one pass."""
    rouge = [n for n in names if n in ROUGE_TYPES]
    out = rouge_scores(predictions, references, rouge) if rouge else {}
    out.update({n: get_metric(n)(predictions, references) for n in names if n not in ROUGE_TYPES})
    return {n: out[n] for n in names}
