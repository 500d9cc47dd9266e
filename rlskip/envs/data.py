"""A run's task and data from its ``env`` config: the task, and disjoint training, calibration and
evaluation examples."""

from __future__ import annotations

import logging

from omegaconf import OmegaConf

from rlskip.envs.tasks import get_task

log = logging.getLogger("rlskip.train")


def build_task(env_cfg, seed: int):
    """The task an ``env`` config names (GLUE's subset from ``env.task``, the synthetic task seeded by the run)."""
    kwargs = dict(env_cfg.task_kwargs)
    if env_cfg.name == "glue":
        kwargs["config"] = env_cfg.task
    if env_cfg.metric is not None:
        kwargs["metric"] = env_cfg.metric
    if env_cfg.name == "synthetic":
        kwargs.setdefault("seed", seed)
    return get_task(env_cfg.name, **kwargs)


def load_examples(env_cfg, task, eval_limit: int) -> tuple[list, list, dict]:
    """Training and evaluation examples, disjoint, and how they were made (for ``summary.json``).

    With separate sources (``env.eval_data_files``, or another ``env.eval_split`` of the hub or the
    synthetic task) evaluation reads its own. When both would read the same rows (``env.data_files`` without
    ``env.eval_data_files``, or one split for both), the rows are loaded once and split in file order: the last
    ``eval.limit`` rows (at most a quarter) for evaluation, the rest (up to ``env.limit``) for training.
    """
    eval_files = env_cfg.eval_data_files or env_cfg.data_files
    same = eval_files == env_cfg.data_files and (env_cfg.data_files is not None or env_cfg.split == env_cfg.eval_split)
    if not same:
        train = task.load(split=env_cfg.split, data_files=env_cfg.data_files, limit=env_cfg.limit)
        held_out = task.load(split=env_cfg.eval_split, data_files=eval_files, limit=eval_limit)
        how = f"training from {env_cfg.data_files or 'split ' + env_cfg.split}, evaluation from {eval_files or 'split ' + env_cfg.eval_split}"
        return train, held_out, {"how": how, "train": len(train), "evaluation": len(held_out)}
    pool = task.load(split=env_cfg.split, data_files=env_cfg.data_files)
    n_eval = min(int(eval_limit), len(pool) // 4)
    if n_eval < 1:
        raise ValueError(f"{len(pool)} examples are too few to hold any out for evaluation; add data or set env.eval_data_files")
    train, held_out = pool[: len(pool) - n_eval], pool[len(pool) - n_eval :]
    if env_cfg.limit is not None:
        train = train[: env_cfg.limit]
    source = env_cfg.data_files or f"split {env_cfg.split}"
    how = f"one source ({source}, {len(pool)} rows) split in order: training first, the last {n_eval} rows held out for evaluation"
    return train, held_out, {"how": how, "train": len(train), "evaluation": len(held_out)}


def split_calibration(train: list, wanted: int) -> tuple[list, list]:
    """Hold the last ``wanted`` training examples (at most a quarter) out of training.

    The decision threshold is calibrated on them: instances the generator warm-up and the policy never saw,
    so the calibrated quality drop is what new data will see (a generator trained for many epochs knows its
    training instances better), and the evaluation set stays untouched.
    """
    n = min(int(wanted), len(train) // 4)
    if n < 1:
        raise ValueError(
            f"calibration needs held-out training instances: eval.calibration_instances={wanted} "
            f"with {len(train)} training examples"
        )
    if n < wanted:
        log.info("calibration: %d of %d training examples held out (at most a quarter)", n, len(train))
    return train[:-n], train[-n:]


def with_task_defaults(cfg, task, runtime):
    """The run's config with what the task decides for this backbone made explicit, so that inference, which
    reads only the run's config, uses the same: a decoder-only backbone's prompt template (``env.prompt``) and,
    for classification with an LM head, the label words it scores (``env.label_words``)."""
    updates = {}
    if runtime.kind == "causal" and cfg.env.prompt is None:
        updates["prompt"] = task.prompt_template(cfg.backbone.chat)
    if task.kind == "classification" and runtime.head == "lm" and cfg.env.label_words is None:
        if not task.label_words:
            raise ValueError(f"task {task.name} has no label words to score with an LM head; set env.label_words")
        updates["label_words"] = list(task.label_words)
    if not updates:
        return cfg
    merged = OmegaConf.merge(cfg, {"env": updates})
    OmegaConf.set_readonly(merged, True)
    return merged

