"""Skip-aware runtimes, one per model family, registered by name.

``get_runtime(model)`` picks the runtime for a Hugging Face model; an unsupported family fails with a
ValueError listing the supported ones.
"""

from __future__ import annotations

from typing import Callable

from rlskip.runtime.base import GenerateOutput, Observation, Runtime

# family name -> (predicate on the model, constructor)
RUNTIMES: dict[str, tuple[Callable[[object], bool], Callable[[object], Runtime]]] = {}


def register_runtime(family: str, accepts: Callable[[object], bool]):
    """Class decorator registering a runtime for the models ``accepts`` says yes to."""

    def deco(cls):
        RUNTIMES[family] = (accepts, cls)
        return cls

    return deco


def get_runtime(model) -> Runtime:
    """The runtime for ``model`` (wraps it; shares its weights)."""
    for accepts, cls in RUNTIMES.values():
        if accepts(model):
            return cls(model)
    cfg = getattr(model, "config", None)
    what = f"{type(model).__name__} (model_type {getattr(cfg, 'model_type', None)!r})"
    raise ValueError(f"unsupported model family: {what}; supported: {sorted(RUNTIMES)}")


from rlskip.runtime import bart  # noqa: E402,F401  (registers the BART runtime)

__all__ = ["GenerateOutput", "Observation", "Runtime", "get_runtime", "register_runtime", "RUNTIMES"]
