"""rlskip: per-instance skipping of sub-layers and tokens in transformer generators, learned with RL.

``rlskip.load(run_dir)`` loads a trained policy with its generator for inference (see
:mod:`rlskip.inference`). Importing the package itself stays light: torch and transformers are imported
only when something is loaded.
"""

from __future__ import annotations


def load(
    path, name: str = "last", backbone: str | None = None, threshold: float | None = None, batch_size: int = 16,
    plan_aware: bool = True,
):
    """Load a checkpoint for inference; see :func:`rlskip.inference.load`."""
    from rlskip.inference import load as _load

    return _load(path, name=name, backbone=backbone, threshold=threshold, batch_size=batch_size, plan_aware=plan_aware)


__all__ = ["load"]
