"""The generator of a training run: built (``synthetic-small``) or loaded, warmed up, saved, referenced.

A built generator, or one the run warms up or tunes jointly, is saved in the run directory under
``generator/`` (``save_pretrained``, with its tokenizer), and checkpoints reference it there by content hash.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch
from omegaconf import DictConfig

from rlskip.backbone import load_backbone, load_tokenizer
from rlskip.checkpoint import make_backbone_ref
from rlskip.encoding import Encoder

log = logging.getLogger("rlskip.train")

SYNTHETIC_SMALL = "synthetic-small"


def head_of(task) -> str:
    """The model head a task needs: ``"classifier"`` for classification, ``"lm"`` for generation."""
    return "classifier" if task.kind == "classification" else "lm"


def _load(cfg: DictConfig, task, source: str):
    return load_backbone(source, head_of(task), getattr(task, "num_labels", None), cfg.backbone.revision)


def built_here(cfg: DictConfig) -> bool:
    """Whether the run's generator lives in its own ``generator/`` folder (built, warmed up or tuned here)."""
    w = cfg.backbone.warmup
    return cfg.backbone.name_or_path == SYNTHETIC_SMALL or bool(w.time_budget_s or w.steps) or cfg.generator.mode == "joint"


def build_generator(cfg: DictConfig, task, run_dir: Path, resuming: bool, train_examples):
    """``(tokenizer, model)`` for the run; a built or warmed-up generator is trained once and saved under
    ``generator/`` (a resumed run loads it from there)."""
    from rlskip.agents.warmup import train_generator

    name = cfg.backbone.name_or_path
    saved = run_dir / "generator"
    if resuming and saved.is_dir():
        return load_tokenizer(str(saved)), _load(cfg, task, str(saved))
    if name == SYNTHETIC_SMALL:
        from rlskip.envs.tasks.synthetic import small_bart_config, synthetic_tokenizer
        from transformers import BartForConditionalGeneration

        if task.kind != "generation":
            raise ValueError("the synthetic-small backbone is a generator; pick a classification backbone for GLUE")
        torch.manual_seed(cfg.seed)
        tokenizer, model = synthetic_tokenizer(), BartForConditionalGeneration(small_bart_config())
    else:
        tokenizer = load_tokenizer(cfg.backbone.tokenizer or name, cfg.backbone.revision)
        model = _load(cfg, task, name)
    w = cfg.backbone.warmup
    if name == SYNTHETIC_SMALL or w.time_budget_s or w.steps:
        stats = train_generator(
            model, Encoder(tokenizer, cfg.env.max_source_tokens, task.pair_truncation), train_examples, steps=w.steps,
            time_budget=w.time_budget_s or None, batch_size=w.batch_size, lr=w.lr, skip_prob=w.skip_prob, seed=cfg.seed,
            progress=cfg.log.progress,
        )
        log.info("generator warm-up: %d steps in %.0fs, final loss %.4f", stats.steps, stats.seconds, stats.loss)
        save_generator(model, tokenizer, saved)
    return tokenizer, model.eval()


def save_generator(model, tokenizer, folder: Path) -> None:
    """``save_pretrained`` into a temp folder, then swap it in."""
    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)


def load_generator_weights(cfg: DictConfig, task, model, folder: Path | None, start: dict) -> None:
    """Put the weights saved in ``folder`` (:func:`save_generator`), or ``start`` when None, into ``model`` in place."""
    if folder is None:
        model.load_state_dict(start)
        return
    model.load_state_dict(_load(cfg, task, str(folder)).state_dict())


def backbone_reference(cfg: DictConfig, generator_dir: Path, model, runtime) -> dict:
    """Where the generator the policy was trained with lives (``generator_dir`` when built, warmed up or tuned
    here), and its content hash."""
    here = built_here(cfg)
    name = str(generator_dir.resolve()) if here else cfg.backbone.name_or_path
    ref = make_backbone_ref(model, runtime.family, name_or_path=name, revision=cfg.backbone.revision)
    ref["tokenizer"] = name if here else (cfg.backbone.tokenizer or cfg.backbone.name_or_path)
    return ref
