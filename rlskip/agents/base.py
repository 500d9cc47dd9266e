"""The learner interface every training algorithm implements (the native REINFORCE, SB3 PPO).

A learner owns a policy (:class:`rlskip.policy.SkipPolicy`), the constraint handler that turns outcomes into
rewards, and the environment it steps. The training loop (:mod:`rlskip.agents.trainer`) knows nothing else:
it calls :meth:`Learner.train_iteration` and, at checkpoints, :meth:`Learner.save`; ``resume=`` calls
:meth:`Learner.load` on the folder a previous :meth:`Learner.save` wrote.
"""

from __future__ import annotations

import hashlib
import io
from abc import ABC, abstractmethod
from pathlib import Path

import torch

from rlskip.checkpoint import atomic_write_bytes
from rlskip.policy import SkipPolicy

STATE_PREFIX = "trainer_state"
# weights this large mean a learning rate that throws them around: the policy's are O(1), a generator's O(10)
EXPLODED = 1e4


def check_weights(module: torch.nn.Module, what: str, key: str, iteration: int) -> None:
    """Raise a one-line ValueError naming ``what`` and the config ``key`` to change when the weights of
    ``module`` are non-finite or exploded."""
    worst = max((p.detach().abs().max().item() for p in module.parameters() if p.numel()), default=0.0)
    if not torch.isfinite(torch.tensor(worst)):
        raise ValueError(f"{what} diverged at iteration {iteration}: its weights are no longer finite; lower {key}")
    if worst > EXPLODED:
        raise ValueError(f"{what} diverged at iteration {iteration}: a weight reached {worst:.3g}; lower {key}")


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

    @property
    def instances_per_iteration(self) -> int:
        """Instances one :meth:`train_iteration` rolls out, over every rank of a data-parallel job."""
        dist = getattr(self, "dist", None)
        return self.env.num_envs * (dist.world if dist is not None else 1)

    @abstractmethod
    def state_dict(self) -> dict:
        """Everything needed to continue exactly (what :meth:`save` writes to ``trainer_state.pt``)."""

    @abstractmethod
    def load_state_dict(self, state: dict) -> None:
        """Restore a :meth:`state_dict`."""

    def save(self, folder: Path) -> dict[str, str]:
        """Write the state atomically to a content-named file in ``folder``; returns ``{"state": file name}``.

        Content names let a checkpoint's manifest (``last.json``) name exactly the files it was written with,
        so a kill between two writes never pairs one checkpoint's policy with another's learner state.
        """
        buf = io.BytesIO()
        torch.save(self.state_dict(), buf)
        return {"state": write_named(Path(folder), STATE_PREFIX, ".pt", buf.getvalue())}

    def load(self, folder: Path, files: dict[str, str]) -> None:
        """Continue from the files :meth:`save` wrote to ``folder`` (as a checkpoint's manifest names them)."""
        self.load_state_dict(read_state(Path(folder) / files["state"]))

    def check_health(self) -> None:
        """Stop with one line when training diverged (the policy's weights, and a tuned generator's)."""
        check_weights(self.policy, "the policy", "agent.lr", self.iteration)
        if getattr(self, "generator", None) is not None:
            check_weights(self.generator.model, "the generator", "generator.lr", self.iteration)


def write_named(folder: Path, prefix: str, suffix: str, data: bytes) -> str:
    """Write ``data`` atomically as ``<prefix>-<sha256[:16]><suffix>`` in ``folder``; returns the file name."""
    name = f"{prefix}-{hashlib.sha256(data).hexdigest()[:16]}{suffix}"
    if not (folder / name).is_file():
        atomic_write_bytes(folder / name, data)
    return name


def read_state(path: Path) -> dict:
    """A saved learner state; one line when the file is damaged."""
    try:
        return torch.load(path, weights_only=False)
    except Exception as e:  # pickle, zip and torch errors of a damaged file come in many kinds
        raise ValueError(f"{path} is truncated or corrupted ({type(e).__name__}); delete it to restart that policy") from None
