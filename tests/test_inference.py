"""Inference: ``rlskip.load`` round trip in a fresh process, ``python -m rlskip.generate``, CALM early exit, errors."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rlskip.execute import Executor
from rlskip.generate import main as generate_main

from test_train import TINY

ROOT = Path(__file__).resolve().parents[1]
TEXTS = ["reverse 1 2 3 4 5", "copy 7 1 1 2 1 7 5 6", "sort 3 1 2 9 0"]
_RUNS: dict[str, Path] = {}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models on a shared 2-core machine: several torch threads per process oversubscribe the cores
    and make each small op wait (measured: 6 min instead of 14 s for one evaluation)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def trained_run(tmp_path_factory) -> Path:
    """One tiny training run for the whole session (shared with test_evaluate.py)."""
    if "run" not in _RUNS:
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        from rlskip.config import EvalConfig
        from rlskip.train import main

        run = tmp_path_factory.mktemp("inference") / "run"
        extra = ["eval.limit=8", "log.latency_every=100"]
        if "calibration_instances" in {f.name for f in dataclasses.fields(EvalConfig)}:
            extra.append("eval.calibration_instances=8")
        try:
            assert main(TINY + extra + [f"run_dir={run}"]) == 0
        finally:
            torch.set_num_threads(before)
        _RUNS["run"] = run
    return _RUNS["run"]


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory) -> Path:
    return trained_run(tmp_path_factory)


def _error_line(capsys) -> str:
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert len(err) == 1, err
    return err[0]


def _reference(run_dir: Path, name: str, threshold: float) -> dict:
    """Plans and outputs computed from the checkpoint's parts directly (no rlskip.inference)."""
    from transformers import AutoTokenizer, BartForConditionalGeneration

    from omegaconf import OmegaConf

    from rlskip.checkpoint import load_checkpoint
    from rlskip.config import generation_settings
    from rlskip.encoding import Encoder
    from rlskip.methods import policy_plans
    from rlskip.runtime import get_runtime

    cfg = OmegaConf.load(run_dir / "config.yaml")
    ckpt = load_checkpoint(run_dir, name)
    model = BartForConditionalGeneration.from_pretrained(run_dir / "generator").eval()
    tok = AutoTokenizer.from_pretrained(run_dir / "generator")
    rt = get_runtime(model)
    ids, mask, _ = Encoder(tok, cfg.env.max_source_tokens).encode(TEXTS)
    with torch.no_grad():
        obs = rt.observe(ids, mask)
        plan, cost = policy_plans(ckpt.build_policy(), rt.space, threshold)(obs)
        out = rt.generate(obs, plan, **generation_settings(cfg))
    gens = [t.strip() for t in tok.batch_decode(out.sequences, skip_special_tokens=True)]
    return {"bits": plan.bits.tolist(), "generations": gens, "flops_ratio": ((out.flops + cost) / out.full_flops).tolist()}


FRESH = """
import json, sys
import rlskip
out = {}
for th in (None, 0.96):
    m = rlskip.load(sys.argv[1], name="last", threshold=th)
    d = m.generate(json.loads(sys.argv[2]), return_details=True)
    out[str(th)] = {"threshold": m.threshold, "bits": m.decide(json.loads(sys.argv[2])).bits.tolist(),
                    "generations": [r["generation"] for r in d], "flops_ratio": [r["flops_ratio"] for r in d]}
out["heavy"] = sorted(k for k in ("gymnasium", "stable_baselines3") if k in sys.modules)
print(json.dumps(out))
"""


def test_round_trip_in_a_fresh_process_matches_and_imports_no_rl_stack(run_dir):
    proc = subprocess.run(
        [sys.executable, "-c", FRESH, str(run_dir), json.dumps(TEXTS)], capture_output=True, text=True, cwd=ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["heavy"] == []  # inference needs neither gymnasium nor Stable-Baselines3
    calibrated = json.loads((run_dir / "last.json").read_text())["extra"].get("threshold", 0.5)
    assert got["None"]["threshold"] == calibrated
    skipped_somewhere = False
    for key in ("None", "0.96"):
        want = _reference(run_dir, "last", got[key]["threshold"])
        assert got[key]["bits"] == want["bits"]
        assert got[key]["generations"] == want["generations"]
        assert got[key]["flops_ratio"] == pytest.approx(want["flops_ratio"], rel=1e-12)
        skipped_somewhere |= not all(all(row) for row in want["bits"])
    assert skipped_somewhere  # a threshold above the initial keep probability (0.953) switches units off


def test_in_process_load_agrees_with_input_ids_and_decide(run_dir):
    import rlskip

    m = rlskip.load(run_dir, name="last", threshold=0.96)
    ids, mask, _ = m.executor.encoder.encode(TEXTS)
    assert m.generate(ids, attention_mask=mask) == m.generate(TEXTS)
    assert m.generate(ids) == m.generate(TEXTS)  # the mask defaults to the non-pad positions
    plan = m.decide(TEXTS)
    details = m.generate(TEXTS, return_details=True)
    for i, d in enumerate(details):
        assert d["text"] == TEXTS[i] and d["skipped"] == plan.skipped_names(i)
        assert 0.0 < d["flops_ratio"] <= 1.01
    assert m.generate(TEXTS, max_new_tokens=2) != m.generate(TEXTS)  # call kwargs override the run's defaults
    with pytest.raises(ValueError, match="budget"):
        m.generate(TEXTS, budget=0.5)
    with pytest.raises(ValueError, match="classifier|generator"):
        m.classify(TEXTS)
    with pytest.raises(ValueError, match="empty"):
        m.generate([""])


def test_an_over_long_input_is_truncated_with_a_notice(run_dir, caplog):
    import logging

    import rlskip

    m = rlskip.load(run_dir, name="last")
    with caplog.at_level(logging.WARNING, logger="rlskip"):
        out = m.generate(["copy " + " ".join("7" * 50_000)])
    assert len(out) == 1
    assert any("1 of 1 inputs were longer than" in r.getMessage() for r in caplog.records)


def test_load_errors_are_one_clear_line(run_dir, tmp_path):
    import rlskip
    from transformers import BartConfig, BartForConditionalGeneration

    with pytest.raises(FileNotFoundError, match="run directory not found"):
        rlskip.load(tmp_path / "nope")
    # a truncated weights file
    broken = tmp_path / "broken"
    shutil.copytree(run_dir, broken)
    weights = broken / json.loads((broken / "last.json").read_text())["weights"]
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match="truncated or corrupted") as e:
        rlskip.load(broken, name="last")
    assert "\n" not in str(e.value)
    # a generator with other weights
    other = tmp_path / "other-generator"
    torch.manual_seed(123)
    BartForConditionalGeneration(BartConfig.from_pretrained(run_dir / "generator")).save_pretrained(other)
    with pytest.raises(ValueError) as e:
        rlskip.load(run_dir, name="last", backbone=str(other))
    msg = str(e.value)
    assert "\n" not in msg and str(other) in msg and str(run_dir / "generator") in msg and "backbone=" in msg


def test_generate_cli_prints_and_writes_json_lines(run_dir, tmp_path, capsys):
    import rlskip

    assert generate_main([f"ckpt={run_dir}", "name=last", f"text={TEXTS[0]}"]) == 0
    line = capsys.readouterr().out.strip().splitlines()
    assert len(line) == 1 and "flops ratio" in line[0]
    src = tmp_path / "in.jsonl"
    src.write_text(f"{TEXTS[0]}\n\n" + json.dumps({"document": TEXTS[1]}) + "\n" + json.dumps({"text": TEXTS[2]}) + "\n")
    out = tmp_path / "out.jsonl"
    assert generate_main([f"ckpt={run_dir}", "name=last", f"input={src}", f"output={out}", "batch_size=2"]) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["text"] for r in rows] == TEXTS
    assert [r["generation"] for r in rows] == rlskip.load(run_dir, name="last").generate(TEXTS)
    assert all(set(r) == {"text", "generation", "flops_ratio"} for r in rows)


def test_generate_cli_errors_are_one_line_exit_2(run_dir, tmp_path, capsys):
    from transformers import BartConfig, BartForConditionalGeneration

    assert generate_main([f"ckpt={run_dir}", "text=x", "colour=red"]) == 2
    assert "unknown config key 'colour'" in _error_line(capsys)
    assert generate_main([f"ckpt={tmp_path / 'missing'}", "text=x"]) == 2
    assert "run directory not found" in _error_line(capsys)
    broken = tmp_path / "broken"
    shutil.copytree(run_dir, broken)
    (broken / "last.json").write_text((broken / "last.json").read_text()[:50])
    assert generate_main([f"ckpt={broken}", "text=x"]) == 2
    assert "truncated or corrupted" in _error_line(capsys)
    other = tmp_path / "other"
    torch.manual_seed(7)
    BartForConditionalGeneration(BartConfig.from_pretrained(run_dir / "generator")).save_pretrained(other)
    assert generate_main([f"ckpt={run_dir}", "text=x", f"backbone={other}"]) == 2
    assert "does not fit checkpoint" in _error_line(capsys)
    # a real process: exit status 2 and a single line on stderr
    proc = subprocess.run(
        [sys.executable, "-m", "rlskip.generate", f"ckpt={tmp_path / 'missing'}", "text=x"], capture_output=True, text=True,
        cwd=ROOT, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [f"error: run directory not found: {tmp_path / 'missing'}"]


def test_early_exit_never_exiting_is_the_full_model_and_low_thresholds_save_flops(run_dir):
    import rlskip
    from rlskip.methods import EarlyExit, full_model, planned

    m = rlskip.load(run_dir, name="last")
    ex = m.executor
    obs = m.observe(TEXTS)
    full = planned(full_model(m.space))(ex, obs)
    never = EarlyExit(1.5)(ex, obs)
    assert never.predictions == full.predictions and torch.equal(never.steps, full.steps)
    assert torch.equal(never.full_flops, full.flops)
    # never exiting costs exactly the intermediate LM-head evaluations on top of the full model
    cfg = m.model.config
    extra = full.steps.double() * (cfg.decoder_layers - 1) * 2 * cfg.d_model * cfg.vocab_size
    assert torch.allclose(never.flops - full.flops, extra)
    low = EarlyExit(0.0)(ex, obs)  # every token exits after the first layer
    assert bool((low.flops_ratio < 1.0).all()) and bool((low.flops_ratio < never.flops_ratio).all())
    with pytest.raises(ValueError, match="num_beams"):
        EarlyExit(0.5)(Executor(m.runtime, ex.encoder, "generation", {"max_new_tokens": 4, "num_beams": 2}), obs)
