"""Data-parallel training on torch.distributed (gloo, 2 CPU processes): the job trains what one process trains on
the same global batch, every rank ends with the same weights, only rank 0 writes, and a dead rank fails the run
with one line instead of a hang."""

from __future__ import annotations

import builtins
import json
import multiprocessing as mp
import os
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from test_train import TINY

ARGS = TINY + ["agent.policies=1", "agent.iterations=4", "log.checkpoint_every=2"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _guard_writes(run_dir: Path) -> None:
    """Make any write below ``run_dir`` from this process an error (rank 1 must write nothing there)."""
    root = str(run_dir.resolve())
    real_open, real_os_open, real_mkdir = builtins.open, os.open, Path.mkdir

    def inside(path) -> bool:
        return str(Path(path).resolve()).startswith(root)

    def guarded_open(file, mode="r", *a, **k):
        if isinstance(file, (str, os.PathLike)) and any(c in mode for c in "wax+") and inside(file):
            raise AssertionError(f"rank 1 wrote {file}")
        return real_open(file, mode, *a, **k)

    def guarded_os_open(path, flags, *a, **k):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and inside(path):
            raise AssertionError(f"rank 1 wrote {path}")
        return real_os_open(path, flags, *a, **k)

    def guarded_mkdir(self, *a, **k):
        if inside(self):
            raise AssertionError(f"rank 1 made {self}")
        return real_mkdir(self, *a, **k)

    builtins.open, os.open, Path.mkdir = guarded_open, guarded_os_open, guarded_mkdir


def _rank(rank: int, world: int, port: int, args: list[str], out: str, die_at: int | None) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    import rlskip.agents.trainer as trainer
    from rlskip.agents.reinforce import Reinforce
    from rlskip.train import main

    train_policy = trainer.train_policy

    def keep_policy(*a, **k):  # what this rank's learner holds at the end
        learner, ref, stats = train_policy(*a, **k)
        torch.save(learner.policy.state_dict(), Path(out) / f"rank{rank}.pt")
        tm = learner.env.rollout.time_model
        if tm is not None:  # the time model this rank priced plans with (env.cost=time)
            Path(out, f"time_model{rank}.json").write_text(json.dumps(tm.to_dict()))
        return learner, ref, stats

    trainer.train_policy = keep_policy
    if die_at is not None and rank == 1:
        step = Reinforce.train_iteration

        def die(self, *a, **k):
            if self.iteration == die_at:
                os._exit(1)
            return step(self, *a, **k)

        Reinforce.train_iteration = die
    run_dir = next(a.split("=", 1)[1] for a in args if a.startswith("run_dir="))
    if rank > 0:
        _guard_writes(Path(run_dir))
    rc = main(args)
    Path(out, f"rc{rank}").write_text(str(rc))


def _job(world: int, args: list[str], out: Path, die_at: int | None = None, timeout: float = 600) -> list[int | None]:
    ctx, port = mp.get_context("spawn"), _free_port()
    procs = [ctx.Process(target=_rank, args=(r, world, port, args, str(out), die_at)) for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(1.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
            pytest.fail("a rank hung")
    return [int((out / f"rc{r}").read_text()) if (out / f"rc{r}").is_file() else None for r in range(world)]


def test_two_ranks_train_what_one_process_trains(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    (tmp_path / "o1").mkdir()
    (tmp_path / "o2").mkdir()
    assert _job(1, ARGS + [f"run_dir={one}"], tmp_path / "o1") == [0]
    assert _job(2, ARGS + [f"run_dir={two}"], tmp_path / "o2") == [0, 0]  # rank 1 wrote nothing in the run dir
    ranks = [torch.load(tmp_path / "o2" / f"rank{r}.pt") for r in (0, 1)]
    single = torch.load(tmp_path / "o1" / "rank0.pt")
    for k, v in single.items():
        assert torch.equal(ranks[0][k], ranks[1][k]), k  # every rank holds the same weights
        assert torch.allclose(ranks[0][k], v, atol=1e-5), k  # and what one process learns from the same batches
    s1, s2 = (json.loads((r / "summary.json").read_text()) for r in (one, two))
    assert s1["quality"] == s2["quality"] and s1["threshold"] == s2["threshold"]
    assert s1["flops_ratio"] == pytest.approx(s2["flops_ratio"], abs=1e-6)
    # throughput counts both ranks' instances: iterations 2-4 of the global batch, within the policy phase
    assert s2["train_instances_per_s"][0] > 3 * 8 / s2["seconds"]["policy"]
    rows = lambda r: (r / "tb" / "progress.csv").read_text().splitlines()  # noqa: E731
    assert len(rows(one)) == len(rows(two))  # the whole batch's statistics, logged once, by rank 0


def test_rank_0_measures_the_time_model_and_every_rank_prices_with_it(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    assert _job(2, ARGS + ["env.cost=time", f"run_dir={tmp_path / 'run'}"], out) == [0, 0]  # rank 1 wrote nothing there
    saved = json.loads((tmp_path / "run" / "time_model.json").read_text())
    assert json.loads((out / "time_model0.json").read_text()) == saved == json.loads((out / "time_model1.json").read_text())


def test_a_dead_rank_fails_the_run_in_one_line_instead_of_hanging(tmp_path, capfd):
    t0 = time.monotonic()
    rcs = _job(2, ARGS + ["dist_timeout_s=30", f"run_dir={tmp_path / 'run'}"], tmp_path, die_at=2, timeout=300)
    assert rcs == [2, None] and time.monotonic() - t0 < 200
    err = [ln for ln in capfd.readouterr().err.splitlines() if ln.startswith("error:")]
    assert err and "peer process stopped or stalled" in err[-1]


def test_ppo_refuses_to_train_data_parallel_and_devices_are_checked():
    from omegaconf import OmegaConf

    from rlskip.agents.trainer import make_learner
    from rlskip.config import compose
    from rlskip.distributed import Dist, resolve_device

    cfg = compose(["agent=ppo"])
    with pytest.raises(ValueError, match="agent=ppo trains in one process"):
        make_learner(cfg, env=OmegaConf.create({}), logger=None, seed=0, dist=Dist(rank=0, world=2))
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device is available"):
            resolve_device("cuda:1")
    with pytest.raises(ValueError, match=r"device='gpu', expected cpu, cuda, cuda:<index> or auto"):
        compose(["device=gpu"])


@pytest.mark.parametrize("world", [2, 3, 4])
def test_ranks_get_equal_shares_of_the_batch_dealt_by_source_length(world):
    """The shares partition the batch, are equal in size, keep the stream's order, and hold about the same
    total length: each rank's total is within one longest instance of every other's."""
    from types import SimpleNamespace

    from rlskip.envs.vec_env import SkipVecEnv

    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 60, size=200).tolist()
    env = SimpleNamespace(rollout=SimpleNamespace(source_ids=[[0] * n for n in lengths]))
    drawn = [{"index": int(i)} for i in rng.permutation(200)[: 8 * world]]
    shares = [SkipVecEnv._dealt(env, drawn, r, world) for r in range(world)]
    assert sorted(j for s in shares for j in s) == list(range(len(drawn)))
    assert all(len(s) == 8 and s == sorted(s) for s in shares)
    totals = [sum(lengths[drawn[j]["index"]] for j in s) for s in shares]
    assert max(totals) - min(totals) <= max(lengths)
    contiguous = [sum(lengths[d["index"]] for d in drawn[r * 8 : (r + 1) * 8]) for r in range(world)]
    assert max(totals) - min(totals) <= max(contiguous) - min(contiguous)


def _reduce_rank(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from rlskip.distributed import Dist, average_gradients_and_gather_rows

    dist.init_process_group("gloo", rank=rank, world_size=world, init_method=f"tcp://127.0.0.1:{port}")
    try:
        used, unused = torch.nn.Parameter(torch.zeros(2, 3)), torch.nn.Parameter(torch.zeros(4))
        used.grad = torch.full((2, 3), float(rank + 1)) + torch.arange(6.0).view(2, 3)
        if rank == 1:  # a parameter only one rank's batch reached
            unused.grad = torch.ones(4)
        rows = {"quality": np.arange(3.0) + 10 * rank, "bits": np.full((3, 4), rank, dtype=np.float64)}
        got = average_gradients_and_gather_rows([used, unused], rows, Dist(rank=rank, world=world))()
        np.save(Path(out) / f"q{rank}.npy", got["quality"])
        np.save(Path(out) / f"b{rank}.npy", got["bits"])
        np.save(Path(out) / f"g{rank}.npy", used.grad.numpy())
        np.save(Path(out) / f"u{rank}.npy", unused.grad.numpy())
    finally:
        dist.destroy_process_group()


def test_one_collective_averages_gradients_and_gathers_rows_in_rank_order(tmp_path):
    ctx, port = mp.get_context("spawn"), _free_port()
    procs = [ctx.Process(target=_reduce_rank, args=(r, 2, port, str(tmp_path))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    for r in range(2):
        np.testing.assert_array_equal(np.load(tmp_path / f"q{r}.npy"), [0, 1, 2, 10, 11, 12])
        bits = np.load(tmp_path / f"b{r}.npy")
        assert bits.shape == (6, 4) and (bits[:3] == 0).all() and (bits[3:] == 1).all()
        np.testing.assert_array_equal(np.load(tmp_path / f"g{r}.npy"), 1.5 + np.arange(6.0).reshape(2, 3))
        np.testing.assert_array_equal(np.load(tmp_path / f"u{r}.npy"), np.full(4, 0.5))
