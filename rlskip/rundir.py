"""The run directory of ``python -m rlskip.train``: created for a fresh run, locked while a process uses it,
left clean by a failed start, tidied on resume.

- **Lock.** A run holds an exclusive ``fcntl`` lock on ``<run dir>/.lock`` from start to exit; the kernel drops
  it when the process dies, however it dies. A second training or resume into a locked directory fails at once
  with one line naming the holder's PID.
- **Failed starts.** Until the run has something worth resuming (its generator is ready), a failure removes
  what the run wrote, so the same command can simply be run again.
- **Resume.** Temp files of writes a kill interrupted (``*.tmp``) are removed.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import time
from pathlib import Path

LOCK_FILE = ".lock"


class RunLocked(ValueError):
    """Another process holds the run directory."""


class RunDir:
    """A locked run directory. Use as a context manager; ``started()`` marks the point after which a failure
    keeps the directory (it holds a resumable run).

    Args:
        path: the directory.
        fresh: a new run: the directory must not exist or be empty; it is created.
        writer: this process writes the run (rank 0 of a data-parallel job); the other ranks only read it, and
            neither create, lock nor clean it.
    """

    def __init__(self, path: Path, fresh: bool, writer: bool = True) -> None:
        self.path, self.fresh, self._started, self._fd, self._created = Path(path), fresh, not fresh, None, False
        self.writer = writer
        if not writer:
            return
        if fresh:
            if self.path.exists() and any(p.name != LOCK_FILE for p in self.path.iterdir()):
                raise ValueError(
                    f"run directory {self.path} is not empty; use resume={self.path} to continue it or pick another run_dir"
                )
            self._created = not self.path.exists()
            self.path.mkdir(parents=True, exist_ok=True)
        elif not self.path.is_dir():
            raise FileNotFoundError(f"run directory not found: {self.path}")

    def __enter__(self) -> "RunDir":
        if not self.writer:
            return self
        fd = os.open(self.path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunLocked(f"run directory {self.path} is in use by another rlskip process (PID {holder})") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        if not self.fresh:
            self.remove_temp_files()
        return self

    def started(self) -> None:
        """From here on the directory holds a resumable run: a failure keeps it."""
        self._started = True

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self.writer:
            return
        if exc_type is not None and not self._started:
            for p in self.path.iterdir():
                if p.name != LOCK_FILE:
                    shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        os.close(self._fd)
        if exc_type is not None and not self._started and self._created:
            shutil.rmtree(self.path, ignore_errors=True)

    def remove_temp_files(self) -> list[Path]:
        """Remove what interrupted atomic writes left (``.<name>.*.tmp`` files, ``*.tmp`` folders); returns them."""
        gone = [p for p in self.path.rglob("*.tmp")]
        for p in gone:
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        return gone


def default_run_dir(env_name: str, agent_name: str) -> Path:
    return Path("runs") / f"{env_name}-{agent_name}-{time.strftime('%Y%m%d-%H%M%S')}"
