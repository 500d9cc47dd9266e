"""``python -m rlskip.evaluate``: every method and key in eval.json, the CSV, the Pareto PNG, baselines, errors."""

from __future__ import annotations

import csv
import math
import json
from pathlib import Path

import pytest

from rlskip.evaluation import calibrate_keep_prob
from rlskip.evaluate import main as evaluate_main

from test_inference import _error_line, one_thread, trained_run  # noqa: F401  (one_thread: autouse)

KEYS = ("quality", "flops_ratio", "latency_ratio_b1", "latency_ratio_batched")
SMALL = ["limit=8", "latency_instances=4", "latency_batch=4", "repeats=1", "static_search_instances=4", "progress=false"]


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory) -> Path:
    return trained_run(tmp_path_factory)


def test_evaluate_writes_every_method_csv_and_a_png_that_opens(run_dir, tmp_path):
    import matplotlib.image

    out = tmp_path / "eval"
    assert evaluate_main([f"ckpt={run_dir}", "name=last", f"out={out}", "thresholds=[0,0.8,2]"] + SMALL) == 0
    result = json.loads((out / "eval.json").read_text())
    methods = {m["method"]: m for m in result["methods"]}
    want = {
        "full", "policy", "layerdrop", "static@policy", "modal@policy", "random@policy", "early_exit@0", "early_exit@0.8",
        "early_exit@2",
    }
    assert set(methods) == want
    for m in methods.values():
        for k in KEYS:
            assert isinstance(m[k], float) and m[k] == m[k], (m["method"], k)
        assert 0.0 <= m["quality"] <= 1.0
    assert methods["full"]["flops_ratio"] == 1.0 and result["n_eval"] == 8
    assert methods["layerdrop"]["flops_ratio"] < 0.9
    # never exiting reproduces the full model; exiting at once is cheaper than never exiting
    assert methods["early_exit@2"]["quality"] == methods["full"]["quality"]
    assert methods["early_exit@0"]["flops_ratio"] < 1.0 < methods["early_exit@2"]["flops_ratio"]
    assert methods["static@policy"]["flops_ratio"] <= methods["policy"]["flops_ratio"] + 1e-9
    assert 0.0 < methods["modal@policy"]["share"] <= 1.0 and methods["modal@policy"]["kind"] == "modal"
    with open(out / "eval.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["method"] for r in rows] == [m["method"] for m in result["methods"]]
    assert all(float(r[k]) == pytest.approx(methods[r["method"]][k]) for r in rows for k in KEYS)
    png = (out / "pareto.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    img = matplotlib.image.imread(out / "pareto.png")
    assert img.ndim == 3 and img.shape[1] > img.shape[0] > 100  # two panels side by side


def test_evaluate_errors_are_one_line_exit_2(run_dir, tmp_path, capsys):
    assert evaluate_main([f"ckpt={run_dir}", "colour=red"]) == 2
    assert "unknown config key 'colour'" in _error_line(capsys)
    assert evaluate_main([f"ckpt={tmp_path / 'missing'}"]) == 2
    assert "run directory not found" in _error_line(capsys)
    assert evaluate_main([f"ckpt={run_dir}", "thresholds=[a,b]"] + SMALL) == 2
    assert "thresholds" in _error_line(capsys)
    assert evaluate_main([f"ckpt={run_dir}"] + SMALL + ["repeats=0"]) == 2
    assert "repeats must be positive" in _error_line(capsys)
    assert not (run_dir / "eval").exists()  # nothing written by a failed evaluation


def test_layerdrop_skips_every_second_layer_but_never_the_first():
    from rlskip.methods import every_other_layer_bits, truncation_bits
    from rlskip.space import SkipSpace

    space = SkipSpace.encoder_decoder("bart", 4, 3)
    bits = every_other_layer_bits(space)
    skipped = {space.name(j) for j in (~bits).nonzero().flatten().tolist()}
    assert skipped == {
        "enc.1.attn", "enc.1.ffn", "enc.3.attn", "enc.3.ffn", "dec.1.self_attn", "dec.1.cross_attn", "dec.1.ffn",
    }
    single = SkipSpace.single_stack("llama", 5, token_dropping=True)
    skipped = {single.name(j) for j in (~every_other_layer_bits(single)).nonzero().flatten().tolist()}
    assert skipped == {"1.attn", "1.ffn", "3.attn", "3.ffn"}
    skipped = {single.name(j) for j in (~truncation_bits(single, 2)).nonzero().flatten().tolist()}
    assert skipped == {"3.attn", "3.ffn", "4.attn", "4.ffn"}
    with pytest.raises(ValueError, match="single-stack"):
        truncation_bits(space, 1)


def test_random_keep_probability_is_calibrated_to_the_target_ratio():
    calls = []

    def ratio(p):  # a convex, monotone FLOPs ratio as seen through generation lengths
        calls.append(p)
        return 0.2 + 0.8 * p**1.5

    p = calibrate_keep_prob(ratio, target=0.6, floor=0.2)
    assert abs(ratio(p) - 0.6) < 0.03 and len(calls) <= 3
    assert calibrate_keep_prob(lambda p: 1.0, target=1.2, floor=0.2) == 1.0
    assert calibrate_keep_prob(lambda p: 0.2 + 0.8 * p, 0.1, 0.2) == 0.0  # below the floor: skip all


def test_fidelity_scores_outputs_against_the_full_models_own_outputs():
    """ROUGE-scored tasks: ROUGE-L (rouge-score's own F-measure) to the full model's text; otherwise the task's
    metric, e.g. label agreement for a classifier."""
    from types import SimpleNamespace

    from rouge_score import rouge_scorer

    from rlskip.evaluation import fidelity

    full = ["the cat sat on the mat", "rain is expected tomorrow in the north"]
    pred = ["the cat sat on the mat", "tomorrow brings rain to the south"]
    judge = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    want = sum(judge.score(f, p)["rougeL"].fmeasure for f, p in zip(full, pred)) / 2
    assert fidelity(SimpleNamespace(metric="rouge2"), pred, full) == pytest.approx(want)
    assert fidelity(SimpleNamespace(metric="rougeL"), full, full) == 1.0
    assert fidelity(SimpleNamespace(metric="accuracy"), [0, 1, 1, 0], [0, 1, 0, 0]) == 0.75


def test_lead_tokens_keeps_the_first_fraction_of_droppable_tokens():
    """The lead baseline keeps every sub-layer, every always-kept token and the first ceil(f * n) droppable ones;
    f = 1 is the full model's plan, f = 0 keeps only what no plan may drop."""
    import families.llama  # noqa: F401  (registers its cases)
    import torch
    from families import CASES
    from rlskip.methods import lead_tokens
    from rlskip.runtime import get_runtime

    rt = get_runtime(CASES["llama-tiny"].model)
    ids, mask = CASES["llama-tiny"].inputs()
    obs = rt.observe(ids, mask)
    droppable = mask & ~obs.always_keep
    for f in (0.0, 0.3, 0.5, 1.0):
        plan, cost = lead_tokens(rt.space, f)(obs)
        assert plan.bits.all() and cost.eq(0).all()
        keep = plan.token_keep
        assert not (keep & ~mask).any() and keep[obs.always_keep].all()
        for i in range(ids.shape[0]):
            cols = droppable[i].nonzero().flatten()
            n = math.ceil(len(cols) * f)
            assert keep[i, cols[:n]].all() and not keep[i, cols[n:]].any()
    with pytest.raises(ValueError, match="fraction must lie in"):
        lead_tokens(rt.space, 1.5)
    from rlskip.space import SkipSpace

    with pytest.raises(ValueError, match="needs a space with token dropping"):
        lead_tokens(SkipSpace.single_stack("llama", 3, token_dropping=False), 0.5)
