"""The learner interface every training algorithm implements (the native REINFORCE, SB3 PPO).

A learner owns a policy (:class:`rlskip.policy.SkipPolicy`), the constraint handler that turns outcomes into
rewards, and the environment it steps. The training loop (:mod:`rlskip.agents.trainer`) knows nothing else:
it calls :meth:`Learner.train_iteration` and, at checkpoints, :meth:`Learner.save`; ``resume=`` calls
:meth:`Learner.load` on the folder a previous :meth:`Learner.save` wrote.
"""

from __future__ import annotations

import io
from abc import ABC, abstractmethod
from pathlib import Path

import torch

from rlskip.checkpoint import atomic_write_bytes
from rlskip.policy import SkipPolicy

STATE_FILE = "trainer_state.pt"


class Learner(ABC):
    """One algorithm training one policy on one batched skip environment.

    Attributes: ``env`` (a :class:`rlskip.envs.SkipVecEnv`), ``policy``, ``constraint``, ``iteration``
    (iterations done), ``logger`` (Stable-Baselines3's, TensorBoard + CSV).
    """

    env: object
    constraint: object
    iteration: int

    @property
    @abstractmethod
    def policy(self) -> SkipPolicy:
        """The policy being trained (what checkpoints save and inference loads)."""

    @abstractmethod
    def train_iteration(self, log: bool = False, image: bool = False) -> dict[str, float]:
        """One batch of rollouts and one update; returns the batch's ``reward``, ``quality``, ``quality_full``
        and ``cost`` means. ``log`` records the batch's statistics, ``image`` the skip-rate heatmap too."""

    @abstractmethod
    def state_dict(self) -> dict:
        """Everything needed to continue exactly (what :meth:`save` writes to ``trainer_state.pt``)."""

    @abstractmethod
    def load_state_dict(self, state: dict) -> None:
        """Restore a :meth:`state_dict`."""

    def save(self, folder: Path) -> None:
        """Write the state to ``folder/trainer_state.pt`` atomically."""
        buf = io.BytesIO()
        torch.save(self.state_dict(), buf)
        atomic_write_bytes(Path(folder) / STATE_FILE, buf.getvalue())

    def load(self, folder: Path) -> None:
        """Continue from what :meth:`save` wrote to ``folder``."""
        self.load_state_dict(torch.load(Path(folder) / STATE_FILE, weights_only=False))
