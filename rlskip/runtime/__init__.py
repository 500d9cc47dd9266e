"""Skip-aware runtimes, one per model family, registered by name.

``get_runtime(model)`` picks the runtime for a Hugging Face model; an unsupported family fails with a
ValueError listing the supported ones. A family is one module that subclasses
:class:`~rlskip.runtime.base.Runtime` and decorates it with :func:`register_runtime`.
"""

from __future__ import annotations

from rlskip.runtime.base import KINDS, ClassifyOutput, GenerateOutput, ModelDims, Observation, Runtime

# family name -> runtime class
RUNTIMES: dict[str, type[Runtime]] = {}


def register_runtime(cls: type[Runtime]) -> type[Runtime]:
    """Class decorator registering a runtime under its ``family`` name."""
    if cls.kind not in KINDS:
        raise ValueError(f"runtime {cls.__name__} has kind {cls.kind!r}; expected one of {list(KINDS)}")
    RUNTIMES[cls.family] = cls
    return cls


def get_runtime(model) -> Runtime:
    """The runtime for ``model`` (wraps it; shares its weights)."""
    for cls in RUNTIMES.values():
        if cls.accepts(model):
            return cls(model)
    cfg = getattr(model, "config", None)
    what = f"{type(model).__name__} (model_type {getattr(cfg, 'model_type', None)!r})"
    raise ValueError(f"unsupported model family: {what}; supported: {sorted(RUNTIMES)}")


from rlskip.runtime import bart  # noqa: E402,F401  (registers the family)
from rlskip.runtime import llama  # noqa: E402,F401  (registers the family)
from rlskip.runtime import bert  # noqa: E402,F401
from rlskip.runtime import t5  # noqa: E402,F401

__all__ = [
    "KINDS", "ClassifyOutput", "GenerateOutput", "ModelDims", "Observation", "Runtime", "RUNTIMES", "get_runtime",
    "register_runtime",
]
