"""Run-directory safety, early validation, exact joint-mode checkpoints under kill -9, divergence, data hygiene,
and one-line errors for damaged files and bad inputs."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rlskip.train import main

from test_train import TINY, _error_line

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
JOINT = TINY + ["generator.mode=joint", "generator.lr=1e-3", "agent.policies=1", "log.checkpoint_every=1", "agent.iterations=6"]


KILL_IN_WRITE = """
import os, signal
_n, _dir, _seen = int(os.environ["RLSKIP_KILL_AT_WRITE"]), os.environ["RLSKIP_KILL_DIR"], [0]
def _guard(orig):
    def wrapped(src, dst, *a, **k):
        if str(dst).startswith(_dir) and os.path.exists(os.path.join(_dir, "last.json")):
            _seen[0] += 1
            if _seen[0] == _n:  # the temp file (or folder) is complete; die before it replaces the old one
                os.kill(os.getpid(), signal.SIGKILL)
        return orig(src, dst, *a, **k)
    return wrapped
os.replace, os.rename = _guard(os.replace), _guard(os.rename)
"""


def _train(args: list[str], kill_at_write: int | None = None, run_dir: Path | None = None, **kw) -> subprocess.Popen:
    code = "import sys, torch; torch.set_num_threads(1); from rlskip.train import main; sys.exit(main(sys.argv[1:]))"
    env = ENV
    if kill_at_write is not None:
        code = KILL_IN_WRITE + code
        env = {**ENV, "RLSKIP_KILL_AT_WRITE": str(kill_at_write), "RLSKIP_KILL_DIR": str(run_dir.resolve())}
    return subprocess.Popen([sys.executable, "-c", code, *args], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, **kw)


def _weights(run: Path, name: str) -> dict:
    from rlskip.checkpoint import load_checkpoint

    ckpt = load_checkpoint(run, name)
    return {"policy": ckpt.policy_state, "generator": ckpt.backbone_ref["content_hash"], "step": ckpt.step}


def _same(a: dict, b: dict) -> bool:
    return a["generator"] == b["generator"] and a["step"] == b["step"] and all(
        torch.equal(v, b["policy"][k]) for k, v in a["policy"].items()
    )


def test_joint_mode_survives_kill_9_and_resumes_exactly(tmp_path):
    """kill -9 three times inside checkpoint writes (a temp file complete, the rename not yet done) and six times
    at random moments: after every kill the run directory loads (last and best), and the resumed run ends where
    an uninterrupted run ends (policy weights, tuned generator, best checkpoint, summary)."""
    import rlskip

    args = JOINT + ["agent.iterations=12"]
    straight = tmp_path / "straight"
    proc = _train(args + [f"run_dir={straight}"])
    assert proc.wait(timeout=600) == 0, proc.stderr.read()[-2000:]
    rng = random.Random(0)
    killed = tmp_path / "killed"
    moments = [("write", rng.randint(2, 6)) for _ in range(3)] + [("random", rng.uniform(0.0, 1.0)) for _ in range(6)]
    kills = 0
    for i, (how, at) in enumerate(moments):
        start = args + [f"run_dir={killed}"] if i == 0 else [f"resume={killed}"]
        if how == "write":
            # the at-th file write into the run directory once it holds a checkpoint
            proc = _train(start, kill_at_write=at, run_dir=killed)
        else:
            proc = _train(start)
            while not (killed / "last.json").is_file() and proc.poll() is None:
                time.sleep(0.05)
            time.sleep(at)
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
        code = proc.wait(timeout=600)
        assert code in (0, -signal.SIGKILL), proc.stderr.read()[-2000:]
        kills += code == -signal.SIGKILL
        for name in ("last", "best"):
            rlskip.load(killed, name=name)  # loads, hash check included
        if code == 0:
            break
    assert kills >= 8, f"only {kills} of the 9 kills landed before the run finished"
    proc = _train([f"resume={killed}"])
    assert proc.wait(timeout=600) == 0, proc.stderr.read()[-2000:]
    for name in ("last", "best"):
        assert _same(_weights(straight, name), _weights(killed, name)), name
    s1, s2 = (json.loads((r / "summary.json").read_text()) for r in (straight, killed))
    assert s1["quality"] == s2["quality"] and s1["threshold"] == s2["threshold"]
    assert not list(killed.rglob("*.tmp"))  # leftovers of interrupted writes were cleaned on resume


def test_a_locked_run_directory_refuses_a_second_process_at_once(tmp_path, capsys):
    from omegaconf import OmegaConf

    from rlskip.config import compose

    run = tmp_path / "run"
    run.mkdir()
    saved = OmegaConf.to_yaml(compose([]))
    (run / "config.yaml").write_text(saved)
    holder = subprocess.Popen(
        [sys.executable, "-c", f"import time; from rlskip.rundir import RunDir\nwith RunDir({str(run)!r}, fresh=False):\n"
         "    print('locked', flush=True); time.sleep(60)"],
        cwd=ROOT, env=ENV, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        t0 = time.perf_counter()
        assert main([f"resume={run}"]) == 2
        line = _error_line(capsys)
        assert f"in use by another rlskip process (PID {holder.pid})" in line and time.perf_counter() - t0 < 10
    finally:
        holder.kill()
        holder.wait()
    assert (run / "config.yaml").read_text() == saved  # nothing lost


def test_bad_values_fail_fast_and_failed_starts_leave_nothing(tmp_path, capsys):
    for args, key in ((["agent.lr=-1"], "agent.lr"), (["agent.n_envs=0"], "agent.n_envs"),
                      (["agent.iterations=-5"], "agent.iterations"), (["constraint.max_quality_drop=2"], "constraint.max_quality_drop"),
                      (["backbone.warmup.distill=-1"], "backbone.warmup.distill"),
                      (["backbone.warmup.token_drop=1"], "backbone.warmup.token_drop"),
                      (["backbone.warmup.token_drop_rule=middle"], "backbone.warmup.token_drop_rule"),
                      (["backbone.warmup.targets=gold"], "backbone.warmup.targets"),
                      (["env=glue", "env.task=mrpc", "backbone.warmup.targets=own"], "backbone.warmup.targets"),
                      (["backbone.warmup.distill=1", "backbone.warmup.batch_size=1"], "backbone.warmup.batch_size")):
        run = tmp_path / key
        t0 = time.perf_counter()
        assert main(args + [f"run_dir={run}"]) == 2
        assert key in _error_line(capsys) and time.perf_counter() - t0 < 10
        assert not run.exists()
    # a failure after the run directory was made (missing data; a diverging warm-up) removes what it wrote,
    # so the same command can simply be run again
    run = tmp_path / "nodata"
    assert main(["env=xsum", "env.data_files=/nope/missing.jsonl", "backbone=synthetic_small", f"run_dir={run}"]) == 2
    assert "/nope/missing.jsonl" in _error_line(capsys) and not run.exists()
    run = tmp_path / "nan"
    assert main(TINY + ["backbone.warmup.lr=1e12", f"run_dir={run}"]) == 2
    line = _error_line(capsys)
    assert "warm-up diverged" in line and "backbone.warmup.lr" in line and not run.exists()


def test_divergence_stops_with_one_line_and_writes_no_broken_checkpoint(tmp_path, capsys):
    run = tmp_path / "diverged"
    assert main(TINY + ["agent.lr=1e9", "agent.policies=1", "log.checkpoint_every=1", f"run_dir={run}"]) == 2
    line = _error_line(capsys)
    assert "the policy diverged at iteration 1" in line and "agent.lr" in line
    assert not (run / "last.json").exists()  # nothing non-finite or exploded was checkpointed
    from rlskip.checkpoint import save_checkpoint
    from rlskip.policy import SkipPolicy
    from rlskip.space import SkipSpace

    space = SkipSpace.encoder_decoder("bart", 2, 1)
    policy = SkipPolicy(8, space.n_bits)
    with torch.no_grad():
        policy.bit_out.weight.fill_(float("nan"))
    with pytest.raises(ValueError, match="weights are not finite"):
        save_checkpoint(tmp_path / "x", policy, space, {"name_or_path": "", "content_hash": "", "family": "", "config": {}}, 1)
    assert not (tmp_path / "x" / "last.json").exists()


def test_damaged_files_fail_in_one_line(tmp_path, tmp_path_factory, capsys):
    import shutil

    import rlskip
    from test_inference import trained_run

    src = trained_run(tmp_path_factory)
    for damage, args, expect in (
        ("generator/model.safetensors", None, "cannot load the model"),
        ("config.yaml", [], "is not a valid run config"),
    ):
        run = tmp_path / damage.replace("/", "-")
        shutil.copytree(src, run)
        target = run / damage
        target.write_bytes(b"\x00garbage: [unclosed" + target.read_bytes()[:50])
        with pytest.raises((ValueError, FileNotFoundError)) as e:
            rlskip.load(run, backbone=str(run / "generator"))  # the copy's own (a reference names the original)
        assert expect in str(e.value) and "\n" not in str(e.value)
        if args is not None:
            assert main([f"resume={run}"]) == 2
            assert expect in _error_line(capsys)
    # a damaged learner state, on resume
    run = tmp_path / "state"
    proc = _train(TINY + ["agent.policies=1", "agent.iterations=2", f"run_dir={run}"])
    assert proc.wait(timeout=600) == 0
    state = json.loads((run / "last.json").read_text())["extra"]["files"]["state"]
    (run / state).write_bytes(b"not a torch file")
    (run / "last.json").write_text((run / "last.json").read_text().replace('"step": 2', '"step": 1'))
    assert main([f"resume={run}"]) == 2
    assert "is truncated or corrupted" in _error_line(capsys)


def test_inputs_that_are_not_utf8_name_file_and_line(tmp_path):
    from rlskip.envs.tasks import get_task
    from rlskip.inference import read_texts

    bad = tmp_path / "in.txt"
    bad.write_bytes(b"fine line\nbad \xff line\n")
    with pytest.raises(ValueError, match=r"in.txt:2: not valid UTF-8"):
        read_texts(bad)
    data = tmp_path / "data.jsonl"
    data.write_bytes(b'{"document": "ok", "summary": "ok"}\n{"document": "\xfe", "summary": "x"}\n')
    with pytest.raises(ValueError, match=r"data.jsonl:2: not valid UTF-8"):
        get_task("xsum").load(data_files=str(data))


def test_one_source_is_split_disjointly_and_the_split_is_recorded(tmp_path):
    from omegaconf import OmegaConf

    from rlskip.config import EnvConfig
    from rlskip.envs.data import load_examples
    from rlskip.envs.tasks import get_task

    from paths import DATA_DIR

    data = DATA_DIR / "xsum" / "test_1000.jsonl"
    if not data.is_file():
        pytest.skip(f"XSum slice not found at {data}")
    env = OmegaConf.merge(OmegaConf.structured(EnvConfig), {"name": "xsum", "data_files": str(data)})
    train, held_out, how = load_examples(env, get_task("xsum"), eval_limit=150)
    assert len(held_out) == 150 and len(train) == 850 and not {e.id for e in train} & {e.id for e in held_out}
    assert how["evaluation"] == 150 and "held out" in how["how"]
    small, held, _ = load_examples(env, get_task("xsum"), eval_limit=500)  # at most a quarter of the rows
    assert len(held) == 250 and len(small) == 750
