"""``python -m rlskip.train [overrides]``: train a skip policy (and optionally the generator) end to end.

With no overrides it runs the embedded default offline: the synthetic task, a small BART built from a
config and warmed up here (random sub-layer dropping, so it tolerates skips), then the policy, then a final
evaluation against the full model and the best static plan of equal FLOPs. Examples::

    python -m rlskip.train                                   # embedded default, a few minutes on 2 cores
    python -m rlskip.train env=xsum env.data_files=../shared/data/xsum/test_1000.jsonl backbone.name_or_path=<folder>
    python -m rlskip.train agent=ppo constraint=lagrangian generator.mode=joint seed=3
    python -m rlskip.train resume=runs/<run dir>

Each run writes one directory: ``config.yaml`` (resolved), TensorBoard events under ``tb/``, the policy
checkpoints ``last`` and ``best`` (``<name>.json`` + safetensors weights, see :mod:`rlskip.checkpoint`),
``skip_space.json``, ``trainer_state.pt`` (and ``ppo.zip`` for PPO) to resume from ``last``, ``generator/``
(a built or tuned generator, ``save_pretrained``) and ``summary.json``. Several policies
(``agent.policies``) train in ``policies/<i>/`` and the kept one is copied up (:mod:`rlskip.agents.trainer`).
"""

from __future__ import annotations

import json
import logging
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from rlskip.config import TrainConfig, compose, generation_settings

log = logging.getLogger("rlskip.train")


def prepare_run_dir(cfg: DictConfig) -> Path:
    if cfg.run_dir:
        run_dir = Path(cfg.run_dir)
    else:
        run_dir = Path("runs") / f"{cfg.env.name}-{cfg.agent.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    if run_dir.exists() and any(run_dir.iterdir()):
        raise ValueError(f"run directory {run_dir} is not empty; use resume={run_dir} to continue it or pick another run_dir")
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def load_resumed_config(run_dir: str, overrides: list[str]) -> tuple[DictConfig, Path]:
    """The saved config of a run, for ``resume=<run dir>`` (other overrides are refused: same run, same setup)."""
    path = Path(run_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"run directory not found: {path}")
    if not (path / "config.yaml").is_file():
        raise FileNotFoundError(f"not a run directory (no config.yaml): {path}")
    if overrides:
        raise ValueError(f"resume={run_dir} continues a run with its saved config; drop the other overrides {overrides}")
    return OmegaConf.merge(OmegaConf.structured(TrainConfig), OmegaConf.load(path / "config.yaml")), path


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def run(cfg: DictConfig, run_dir: Path, resuming: bool = False) -> dict:
    from rlskip.agents.generator import (
        SYNTHETIC_SMALL, backbone_reference, load_generator, load_generator_weights, save_generator, warm_up,
    )
    from rlskip.agents.trainer import policy_confidence, policy_dir, policy_seed, select_policy, train_policy
    from rlskip.checkpoint import atomic_write_bytes, atomic_write_text, load_checkpoint, save_checkpoint
    from rlskip.encoding import encoder_for
    from rlskip.envs import SkipVecEnv
    from rlskip.envs.data import build_task, load_examples, split_calibration, with_task_defaults
    from rlskip.evaluation import EvalData, calibrate_threshold, final_evaluation
    from rlskip.execute import Executor
    from rlskip.methods import planned, policy_plans
    from rlskip.runtime import get_runtime

    seed_everything(cfg.seed)

    # data: training, calibration (held out of training) and evaluation examples
    task = build_task(cfg.env, cfg.seed)
    try:
        train_ex, eval_ex = load_examples(cfg.env, task, cfg.eval.limit)
    except ValueError as e:
        name = cfg.backbone.name_or_path
        if cfg.env.data_files is None and name != SYNTHETIC_SMALL and not Path(name).expanduser().exists():
            raise ValueError(f"{e}; the backbone {name} comes from the hub too: set backbone.name_or_path=<local model>") from None
        raise
    train_ex, calib_ex = split_calibration(train_ex, cfg.eval.calibration_instances)

    # the generator, built or loaded; the config, with what the task decides for it, is saved; a warm-up
    seconds, t = {"backbone": 0.0, "policy": 0.0, "calibration": 0.0}, time.perf_counter()
    tokenizer, model = load_generator(cfg, task, run_dir, resuming)
    rt = get_runtime(model)
    cfg = with_task_defaults(cfg, task, rt)
    if not resuming:
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    encoder = encoder_for(tokenizer, rt, cfg.env, cfg.backbone.chat, task.pair_truncation)
    warm_up(cfg, model, tokenizer, encoder, run_dir, train_ex)
    seconds["backbone"] = time.perf_counter() - t
    ex = Executor(rt, encoder, task.kind, generation_settings(cfg), cfg.env.label_words)
    calib_data, eval_data = EvalData.encode(ex, calib_ex), EvalData.encode(ex, eval_ex)
    latency_data = eval_data.head(cfg.eval.latency_instances)

    # the policies, one after another, each calibrated on the held-out instances
    n = cfg.agent.policies
    own_generators = cfg.generator.mode == "joint" and n > 1  # each tunes its own copy, from the same start
    start = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()} if own_generators else None
    ref = backbone_reference(cfg, run_dir / "generator", model, rt)
    trained, rows = [], []
    for c in range(n):
        cdir = policy_dir(cfg, run_dir, c)
        generator_dir = cdir / "generator" if own_generators else run_dir / "generator"
        if own_generators:
            load_generator_weights(cfg, task, model, generator_dir if (cdir / "trainer_state.pt").is_file() else None, start)
            ref = backbone_reference(cfg, generator_dir, model, rt)
        if c > 0:
            seed_everything(policy_seed(cfg.seed, c))
        env = SkipVecEnv(
            model, tokenizer, task, train_ex, num_envs=cfg.agent.n_envs, max_source_tokens=cfg.env.max_source_tokens,
            gen_kwargs=generation_settings(cfg), seed=policy_seed(cfg.seed, c), group_size=cfg.agent.get("group_size", 1),
            margin=cfg.env.margin, fidelity=cfg.env.fidelity, prompt=encoder.prompt,
        )
        t = time.perf_counter()
        learner, ref, stats = train_policy(cfg, c, cdir, env, ref, latency_data, generator_dir, tokenizer)
        seconds["policy"] += time.perf_counter() - t
        t = time.perf_counter()
        threshold, table = calibrate_threshold(
            ex, task, calib_data, learner.policy, learner.constraint, confidence=policy_confidence(cfg)
        )
        seconds["calibration"] += time.perf_counter() - t
        extra = {**stats, "threshold": threshold}
        save_checkpoint(cdir, learner.policy, rt.space, ref, learner.iteration, extra=extra, name="last")
        trained.append((learner.policy, threshold, table, extra))
        rows.append({"policy": c, "seed": policy_seed(cfg.seed, c), **next(r for r in table if r["threshold"] == threshold)})

    # keep the policy whose calibrated plans do best under the constraint
    k = select_policy(learner.constraint, rows)
    policy, threshold, table, extra = trained[k]
    if n > 1:
        cdir = policy_dir(cfg, run_dir, k)
        log.info("kept policy %d of %d: %s", k, n,
                 ", ".join(f"{r['policy']}: FLOPs {r['flops_ratio']:.3f} drop bound {r['drop_upper_bound']:.4f}" for r in rows))
        if own_generators:  # the kept policy's tuned generator becomes the run's
            load_generator_weights(cfg, task, model, cdir / "generator", start)
            save_generator(model, tokenizer, run_dir / "generator")
            ref = backbone_reference(cfg, run_dir / "generator", model, rt)
        best_ckpt = load_checkpoint(cdir, "best")
        save_checkpoint(run_dir, best_ckpt.build_policy(), rt.space, ref, best_ckpt.step, extra={**best_ckpt.extra, "kept_policy": k}, name="best")
        save_checkpoint(run_dir, policy, rt.space, ref, cfg.agent.iterations, extra={**extra, "kept_policy": k}, name="last")
        if (cdir / "ppo.zip").is_file():
            atomic_write_bytes(run_dir / "ppo.zip", (cdir / "ppo.zip").read_bytes())

    # the summary: held-out evaluation against the full model and the best static plan
    t = time.perf_counter()
    search_data = EvalData.encode(ex, train_ex[: cfg.eval.static_search_instances])
    summary = final_evaluation(
        ex, task, eval_data, search_data, planned(policy_plans(policy, rt.space, threshold)), cfg.eval.latency_instances,
        cfg.eval.latency_batch,
    )
    seconds["evaluation"] = time.perf_counter() - t
    summary.update(
        run_dir=str(run_dir), threshold=threshold, calibration=table, n_calibration=len(calib_ex),
        calibration_confidence=policy_confidence(cfg), kept_policy=k, policies=rows, seconds=seconds,
    )
    atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=1))
    return summary


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        resume = next((a.split("=", 1)[1] for a in argv if a.startswith("resume=")), None)
        if resume:
            cfg, run_dir = load_resumed_config(resume, [a for a in argv if not a.startswith("resume=")])
        else:
            cfg = compose(argv)
            run_dir = prepare_run_dir(cfg)
        summary = run(cfg, run_dir, resuming=bool(resume))
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({k: v for k, v in summary.items() if k != "quality_by_group"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
