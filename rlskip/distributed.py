"""Data-parallel training with ``torch.distributed`` (``torchrun``), and the device every tensor goes to.

``torchrun --nproc_per_node=N -m rlskip.train ...`` starts N processes (ranks) with ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK`` and a rendezvous in the environment; :func:`setup` joins the process group (``gloo`` on the CPU,
``nccl`` on GPUs) with a timeout, so a rank that dies fails the others with one line instead of a hang. Without
those variables the run is one process and every function here is a no-op.

What is sharded: each rank rolls out its own slice of every global batch (the same data stream, cut by rank),
gradients are averaged across ranks (every rank holds identical weights after each update), batch statistics are
gathered (constraint updates and logs see the whole batch), calibration and evaluation batches are split across
ranks and their outputs gathered. Rank 0 alone writes the run directory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist

DEVICES = "cpu | cuda | cuda:<index> | auto"


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """The device a ``device`` setting names: ``auto`` is the (local rank's) GPU when there is one, else the CPU;
    ``cuda`` is the local rank's GPU. A GPU that is not there fails in one line."""
    name = str(name)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ValueError(f"device={name} but no CUDA device is available here; use device=cpu or device=auto")
        index = local_rank if name == "cuda" else int(name.split(":", 1)[1])
        if index >= torch.cuda.device_count():
            raise ValueError(f"device {name} (index {index}) does not exist: {torch.cuda.device_count()} CUDA device(s)")
        return torch.device("cuda", index)
    raise ValueError(f"unknown device {name!r}; expected {DEVICES}")


@dataclass(frozen=True)
class Dist:
    """This process's place in the job: ``rank`` of ``world`` processes, and its ``device``."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        """Rank 0: the one process that writes files and measures latency."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def setup(device: str = "cpu", timeout_s: float = 300.0) -> Dist:
    """Join the process group when started by ``torchrun`` (``WORLD_SIZE`` > 1), else a one-process job."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if world == 1:
        return Dist(0, 1, dev)
    if not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", timeout=timedelta(seconds=timeout_s))
    return Dist(dist.get_rank(), dist.get_world_size(), dev)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def _gradients(params) -> list[torch.Tensor]:
    """The gradients of ``params``, zeros for a parameter that has none here: no row of this rank's batch used
    it, but one on another rank may have (every rank must send the same layout)."""
    params = list(params)
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    return [p.grad for p in params]


def _write_average(grads: list[torch.Tensor], summed: torch.Tensor, world: int) -> None:
    """Write the all-reduced sum ``summed`` (the flat gradients first) back into ``grads`` as the average."""
    offset = 0
    for g in grads:
        g.copy_((summed[offset : offset + g.numel()] / world).view_as(g))
        offset += g.numel()


def average_gradients(params, d: Dist) -> None:
    """Average the gradients of ``params`` over the ranks, in place (one flat all-reduce)."""
    if not d.active:
        return
    grads = _gradients(params)
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    _write_average(grads, flat, d.world)


def gather(obj: Any, d: Dist) -> list:
    """Every rank's ``obj``, in rank order, on every rank (``[obj]`` in one process)."""
    if not d.active:
        return [obj]
    out: list = [None] * d.world
    dist.all_gather_object(out, obj)
    return out


def average_gradients_and_gather_rows(params, arrays: dict[str, np.ndarray], d: Dist) -> Callable[[], dict[str, np.ndarray]]:
    """Start averaging the gradients of ``params`` over the ranks and gathering every rank's ``arrays`` (the same
    keys and shapes on every rank, rows first), in one collective: a single all-reduce of one float64 tensor,
    the gradients' sum followed by every rank's rows at its own place (zeros elsewhere, so the sum is exact).
    Returns ``finish``: it waits for the collective, writes the averaged gradients in place and returns the
    rows of every rank concatenated in rank order, as float64. The collective runs in the background until then,
    so the caller can do other work meanwhile (each iteration of data-parallel training otherwise waits out a
    round trip and the slower rank)."""
    if not d.active:
        return lambda: arrays
    grads = _gradients(params)
    cols = {k: np.asarray(v, dtype=np.float64).reshape(len(v), -1) for k, v in arrays.items()}
    mine = torch.from_numpy(np.concatenate(list(cols.values()), axis=1).reshape(-1))
    n_grad, n_rows = sum(g.numel() for g in grads), mine.numel()
    flat = torch.zeros(n_grad + d.world * n_rows, dtype=torch.float64, device=d.device)
    flat[:n_grad] = torch.cat([g.reshape(-1) for g in grads])
    flat[n_grad + d.rank * n_rows : n_grad + (d.rank + 1) * n_rows] = mine.to(d.device)
    work = dist.all_reduce(flat, async_op=True)

    def finish() -> dict[str, np.ndarray]:
        work.wait()
        _write_average(grads, flat, d.world)
        whole = flat[n_grad:].cpu().numpy().reshape(d.world * len(next(iter(cols.values()))), -1)
        out, at = {}, 0
        for k, c in cols.items():
            out[k] = whole[:, at : at + c.shape[1]].reshape(-1, *np.shape(arrays[k])[1:])
            at += c.shape[1]
        return out

    return finish


def barrier(d: Dist) -> None:
    if d.active:
        dist.barrier()


def current() -> Dist:
    """The job this process belongs to, as :func:`setup` left it (a one-process job when there is none)."""
    if not dist.is_initialized():
        return Dist()
    return Dist(dist.get_rank(), dist.get_world_size())
