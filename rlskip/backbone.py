"""Building or loading the generator (backbone) and its tokenizer.

``synthetic-small`` is built from a config for the embedded synthetic task (no download). Anything else is
a Hugging Face hub id or a local model folder, loaded with ``from_pretrained``; when the hub cannot be
reached the error is one line naming the overrides that point at local files instead.
"""

from __future__ import annotations

import torch

SYNTHETIC_SMALL = "synthetic-small"


class BackboneError(ValueError):
    """A backbone that cannot be built or loaded (one line, says what to do)."""


def load_tokenizer(name_or_path: str, revision: str | None = None):
    """The tokenizer of a backbone (the synthetic task's own for ``synthetic-small``)."""
    if name_or_path == SYNTHETIC_SMALL:
        from rlskip.envs.tasks.synthetic import synthetic_tokenizer

        return synthetic_tokenizer()
    from transformers import AutoTokenizer

    return _from_pretrained(AutoTokenizer, name_or_path, revision, what="tokenizer")


def load_backbone(name_or_path: str, kind: str = "generation", num_labels: int | None = None, revision: str | None = None, seed: int = 0):
    """The generator model: seq2seq LM for generation tasks, sequence classifier for classification tasks.

    Args:
        name_or_path: hub id, local folder, or ``synthetic-small``.
        kind: ``"generation"`` or ``"classification"`` (the task's kind).
        num_labels: classes, for classification.
        revision: hub revision (branch, tag or commit).
        seed: seeds the initialisation of a built model.
    """
    from transformers import AutoModelForSeq2SeqLM, AutoModelForSequenceClassification, BartForConditionalGeneration

    if name_or_path == SYNTHETIC_SMALL:
        if kind != "generation":
            raise BackboneError("the synthetic-small backbone is a generator; pick a classification backbone for GLUE")
        from rlskip.envs.tasks.synthetic import small_bart_config

        torch.manual_seed(seed)
        return BartForConditionalGeneration(small_bart_config())
    if kind == "classification":
        return _from_pretrained(AutoModelForSequenceClassification, name_or_path, revision, num_labels=num_labels)
    return _from_pretrained(AutoModelForSeq2SeqLM, name_or_path, revision)


def _from_pretrained(cls, name_or_path: str, revision: str | None, what: str = "model", **kwargs):
    from pathlib import Path

    looks_local = name_or_path.startswith((".", "/", "~")) or Path(name_or_path).expanduser().exists()
    if looks_local and not Path(name_or_path).expanduser().is_dir():
        raise BackboneError(f"backbone folder not found: {name_or_path}")
    try:
        return cls.from_pretrained(name_or_path, revision=revision, **kwargs)
    except (OSError, ValueError) as e:
        if looks_local:
            raise BackboneError(f"cannot load the {what} from {name_or_path}: {str(e).splitlines()[0]}") from None
        raise BackboneError(
            f"cannot load {name_or_path} from the Hugging Face hub (offline or unreachable); point "
            f"backbone.name_or_path (and backbone.tokenizer) at a local model folder and env.data_files at local data"
        ) from None
