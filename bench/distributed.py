"""Rollout throughput of the embedded default's policy training at 1 and 2 data-parallel processes.

The generator is warmed up once (the embedded default's recipe, fewer steps) and saved; then the same policy
training (REINFORCE, 32 rollouts per process and iteration, the default's batch) runs as one process and under
``torchrun --nproc_per_node=2``, one torch thread per process. Each run's steady-state throughput is the one the
training reports (``summary.json``: ``train_instances_per_s``, all ranks' instances from the end of the
first iteration to the end of the last), so one-time costs (process start, the process group's first collectives,
the last checkpoint) stay out of it; the ``whole_phase_*`` figures divide by the whole policy phase
(``seconds.policy``) instead, those costs included. ``scaling_efficiency`` is the 2-process throughput over twice
the 1-process throughput, each process rolling out the default's 32 per iteration (a global batch of 64: data
parallelism adds rollouts per update). ``scaling_efficiency_same_global_batch`` splits the default's 32 over the
two processes instead (16 each): a batch of 16 decodes nearly as slowly as one of 32 on a model this small, so
that split gains little. ``hardware_efficiency`` runs two independent 1-process trainings at the same time (no
communication at all) and compares their summed throughput with twice one alone: what the two cores give
without any distributed training, the ceiling of ``scaling_efficiency`` here; ``scaling_efficiency_over_hardware``
is the 2-process throughput over that ceiling. The machine should be otherwise idle: two processes need both cores.

Each measurement is a few seconds of policy training, and on a shared virtual machine one run can come out 15%
faster or slower than the next (and the machine's speed can drift far more within an hour); so the 1- and 2-process runs are repeated (``--repeats``, alternating, one pair
after the other) and every figure is the median over the repeats, with each pair's own efficiency listed
(``scaling_efficiency_pairs``) to show the spread.

    python bench/distributed.py            # about 12 minutes on 2 cores
    python bench/distributed.py --quick    # fewer iterations, 6-10 minutes

Prints one JSON object as its last line (``instances_per_s_1proc``, ``instances_per_s_2proc``,
``scaling_efficiency``) and writes it to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENV = Path(sys.executable).parent


def cpu_ticks() -> list[int]:
    """The machine's CPU time counters (/proc/stat, all CPUs; empty where there is none)."""
    try:
        return [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return []


def steal_fraction(before: list[int], after: list[int]) -> float | None:
    """The share of the CPU time between two :func:`cpu_ticks` that the hypervisor gave to other guests (steal,
    the 8th counter): on a shared virtual machine it is what makes one run slower than the next."""
    if len(before) < 8 or len(after) < 8:
        return None
    delta = [b - a for a, b in zip(before, after)]
    return round(delta[7] / max(1, sum(delta[:8])), 4)


def start(args: list[str], procs: int, run_dir: Path) -> tuple[subprocess.Popen, Path]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    if procs == 1:
        cmd = [sys.executable, "-m", "rlskip.train"]
    else:
        cmd = [str(VENV / "torchrun"), "--standalone", f"--nproc_per_node={procs}", "-m", "rlskip.train"]
    proc = subprocess.Popen(cmd + args + [f"run_dir={run_dir}", "log.progress=false"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    return proc, run_dir


def finish(started: tuple[subprocess.Popen, Path], procs: int) -> dict:
    proc, run_dir = started
    _, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"training with {procs} process(es) failed:\n{err[-3000:]}")
    return json.loads((run_dir / "summary.json").read_text())


def train(args: list[str], procs: int, run_dir: Path) -> dict:
    return finish(start(args, procs, run_dir), procs)


def rates(summary: dict, instances: int) -> tuple[float, float]:
    """(steady-state instances/s after the first iteration, instances/s over the whole policy phase)."""
    return summary["train_instances_per_s"][0], instances / summary["seconds"]["policy"]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer iterations")
    ap.add_argument("--repeats", type=int, default=3, help="alternating 1- and 2-process runs; figures are medians")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "distributed.json")
    args = ap.parse_args(argv)
    if args.repeats < 1:
        raise SystemExit(f"--repeats must be >= 1, got {args.repeats}")
    iterations = 60 if args.quick else 150
    load = os.getloadavg()[0]  # another job on the cores distorts both runs
    work = Path(tempfile.mkdtemp(prefix="rlskip-dist-"))
    try:
        warm = train(["backbone.warmup.steps=1500", "agent.iterations=1", "agent.policies=1", "eval.limit=16",
                      "eval.static_search_instances=8", "eval.latency_instances=8"], 1, work / "warm")
        generator = Path(warm["run_dir"]) / "generator"
        policy = [
            f"backbone.name_or_path={generator}", "backbone.warmup.steps=null", "backbone.warmup.time_budget_s=0", f"agent.iterations={iterations}",
            "agent.policies=1", "log.latency_every=100000", f"log.checkpoint_every={iterations}", "eval.limit=16",
            "eval.static_search_instances=8", "eval.latency_instances=8", "eval.calibration_instances=64",
        ]
        keys = ((1, 32), (2, 64), (2, 32), (0, 32))
        steady: dict[tuple[int, int], list[float]] = {k: [] for k in keys}
        whole: dict[tuple[int, int], list[float]] = {k: [] for k in keys}
        steal: dict[tuple[int, int], list[float | None]] = {k: [] for k in keys}
        for r in range(args.repeats):
            for procs, batch in keys[:3]:
                before = cpu_ticks()
                summary = train(policy + [f"agent.n_envs={batch}"], procs, work / f"p{procs}-{batch}-{r}")
                steal[procs, batch].append(steal_fraction(before, cpu_ticks()))
                for into, x in zip((steady, whole), rates(summary, batch * iterations)):
                    into[procs, batch].append(x)
            # the machine's own ceiling: two independent 1-process trainings at once, no communication at all
            before = cpu_ticks()
            pair = [start(policy + ["agent.n_envs=32", f"seed={i}"], 1, work / f"independent-{i}-{r}") for i in range(2)]
            both = [rates(finish(p, 1), 32 * iterations) for p in pair]
            steal[0, 32].append(steal_fraction(before, cpu_ticks()))
            for into, x in zip((steady, whole), zip(*both)):
                into[0, 32].append(sum(x))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    one, two, same, independent = (statistics.median(steady[k]) for k in keys)
    one_w, two_w = statistics.median(whole[1, 32]), statistics.median(whole[2, 64])
    result = {
        "instances_per_s_1proc": round(one, 2), "instances_per_s_2proc": round(two, 2),
        "scaling_efficiency": round(two / (2 * one), 4),
        "scaling_efficiency_pairs": [round(b / (2 * a), 4) for a, b in zip(steady[1, 32], steady[2, 64])],
        "instances_per_s_2proc_same_global_batch": round(same, 2),
        "scaling_efficiency_same_global_batch": round(same / (2 * one), 4),
        "instances_per_s_2_independent_1proc": round(independent, 2),
        "hardware_efficiency": round(independent / (2 * one), 4),
        "scaling_efficiency_over_hardware": round(two / independent, 4),
        "instances_per_s_runs": {f"{p}proc_batch{b}" if p else "2_independent": [round(x, 2) for x in v] for (p, b), v in steady.items()},
        # the share of CPU time the hypervisor gave to other guests during each run (a contended host)
        "steal_fraction_runs": {f"{p}proc_batch{b}" if p else "2_independent": v for (p, b), v in steal.items()},
        # the whole policy phase, one-time costs included (process group, first collectives, the last checkpoint)
        "whole_phase_instances_per_s_1proc": round(one_w, 2), "whole_phase_instances_per_s_2proc": round(two_w, 2),
        "whole_phase_scaling_efficiency": round(two_w / (2 * one_w), 4),
        "whole_phase_scaling_efficiency_pairs": [round(b / (2 * a), 4) for a, b in zip(whole[1, 32], whole[2, 64])],
        "iterations": iterations, "batch_per_process": 32, "repeats": args.repeats, "load_average_at_start": load,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
