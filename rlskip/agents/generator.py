"""The generator of a training run: built (``synthetic-small``) or loaded, warmed up, saved, referenced.

A built generator, or one the run warms up or tunes jointly, is saved in the run directory under
``generator/`` (``save_pretrained``, with its tokenizer), and checkpoints reference it there by content hash.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import torch
from omegaconf import DictConfig

from rlskip.backbone import load_backbone, load_tokenizer, quiet_transformers
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


def load_generator(cfg: DictConfig, task, run_dir: Path, resuming: bool):
    """``(tokenizer, model)`` for the run: a resumed run's own ``generator/``, the synthetic task's small BART
    built from its config, or the configured backbone."""
    name = cfg.backbone.name_or_path
    saved = run_dir / "generator"
    if resuming and saved.is_dir():
        return load_tokenizer(str(saved)), _load(cfg, task, str(saved))
    if name == SYNTHETIC_SMALL:
        from transformers import BartForConditionalGeneration

        from rlskip.envs.tasks.synthetic import small_bart_config, synthetic_tokenizer

        if task.kind != "generation":
            raise ValueError("the synthetic-small backbone is a generator; pick a classification backbone for GLUE")
        torch.manual_seed(cfg.seed)
        return synthetic_tokenizer(), BartForConditionalGeneration(small_bart_config()).eval()
    return load_tokenizer(cfg.backbone.tokenizer or name, cfg.backbone.revision), _load(cfg, task, name)


def warm_up(cfg: DictConfig, model, tokenizer, encoder: Encoder, run_dir: Path, train_examples) -> None:
    """Train the generator on the task under random sub-layer dropping and save it under ``generator/``, when
    the run builds its generator or asks for a warm-up (``backbone.warmup``) and has not done so already."""
    from rlskip.agents.warmup import own_targets, train_generator
    from rlskip.config import generation_settings

    w = cfg.backbone.warmup
    if (run_dir / "generator").is_dir() or not (cfg.backbone.name_or_path == SYNTHETIC_SMALL or w.time_budget_s or w.steps):
        return
    if w.targets == "own":
        t = time.perf_counter()
        train_examples = own_targets(model, encoder, train_examples, generation_settings(cfg), progress=cfg.log.progress)
        log.info("generator warm-up: the full model's own outputs for %d training examples in %.0fs", len(train_examples), time.perf_counter() - t)
    stats = train_generator(
        model, encoder, train_examples, steps=w.steps, time_budget=w.time_budget_s or None, batch_size=w.batch_size,
        lr=w.lr, skip_prob=w.skip_prob, distill=w.distill, token_drop=w.token_drop, token_drop_rule=w.token_drop_rule,
        seed=cfg.seed, progress=cfg.log.progress,
    )
    log.info("generator warm-up: %d steps in %.0fs, final loss %.4f", stats.steps, stats.seconds, stats.loss)
    save_generator(model, tokenizer, run_dir / "generator")


def save_generator(model, tokenizer, folder: Path) -> None:
    """``save_pretrained`` into a temp folder, then swap it in."""
    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    with quiet_transformers():
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
