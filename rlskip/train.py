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
(a built or jointly tuned generator, ``save_pretrained``) and ``summary.json``. Every file is written
atomically (temp file + rename).
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

from rlskip.backbone import SYNTHETIC_SMALL, load_backbone, load_tokenizer
from rlskip.config import compose

log = logging.getLogger("rlskip.train")


# ---- run directory -------------------------------------------------------------------------------------
def prepare_run_dir(cfg: DictConfig) -> Path:
    if cfg.run_dir:
        run_dir = Path(cfg.run_dir)
    else:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        run_dir = Path("runs") / f"{cfg.env.name}-{cfg.agent.name}-{stamp}"
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
    from rlskip.config import TrainConfig

    # merged onto the schema, so a run saved before a config key existed resumes with that key's default
    cfg = OmegaConf.merge(OmegaConf.structured(TrainConfig), OmegaConf.load(path / "config.yaml"))
    return cfg, path


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ---- building blocks -----------------------------------------------------------------------------------
def build_task(cfg: DictConfig):
    from rlskip.envs.tasks import get_task

    kwargs = dict(cfg.env.task_kwargs)
    if cfg.env.name == "glue":
        kwargs["config"] = cfg.env.task
    if cfg.env.metric is not None:
        kwargs["metric"] = cfg.env.metric
    if cfg.env.name == "synthetic":
        kwargs.setdefault("seed", cfg.seed)
    return get_task(cfg.env.name, **kwargs)


def load_data(cfg: DictConfig, task):
    """Training and evaluation examples; a hub failure also names the backbone override when it needs the hub."""
    try:
        train_ex = task.load(split=cfg.env.split, data_files=cfg.env.data_files, limit=cfg.env.limit)
        eval_files = cfg.env.eval_data_files or cfg.env.data_files
        eval_ex = task.load(split=cfg.env.eval_split, data_files=eval_files, limit=cfg.eval.limit)
    except ValueError as e:
        name = cfg.backbone.name_or_path
        if cfg.env.data_files is None and name != SYNTHETIC_SMALL and not Path(name).expanduser().is_dir():
            raise ValueError(f"{e}; the backbone {name} comes from the hub too: set backbone.name_or_path=<local model folder>") from None
        raise
    return train_ex, eval_ex


def split_calibration(cfg: DictConfig, train_ex: list) -> tuple[list, list]:
    """Hold the last ``eval.calibration_instances`` training examples (at most a quarter) out of training.

    The decision threshold is calibrated on them: instances the generator warm-up and the policy never saw,
    so the calibrated quality drop is what new data will see (a generator trained for many epochs knows its
    training instances better), and the evaluation set stays untouched.
    """
    n = min(int(cfg.eval.calibration_instances), len(train_ex) // 4)
    if n < 1:
        raise ValueError(
            f"calibration needs held-out training instances: eval.calibration_instances={cfg.eval.calibration_instances} "
            f"with {len(train_ex)} training examples"
        )
    if n < cfg.eval.calibration_instances:
        log.info("calibration: %d of %d training examples held out (at most a quarter)", n, len(train_ex))
    return train_ex[:-n], train_ex[-n:]


def gen_kwargs(cfg: DictConfig) -> dict:
    return {"max_new_tokens": int(cfg.env.max_new_tokens), "num_beams": int(cfg.env.num_beams)}


def build_backbone(cfg: DictConfig, task, run_dir: Path, resuming: bool, train_examples):
    """Tokenizer and generator; a built backbone is warmed up once and saved under ``generator/``."""
    name = cfg.backbone.name_or_path
    saved = run_dir / "generator"
    tokenizer = load_tokenizer(cfg.backbone.tokenizer or name, cfg.backbone.revision)
    if resuming and saved.is_dir():
        model = load_backbone(str(saved), task.kind, getattr(task, "num_labels", None))
    else:
        model = load_backbone(name, task.kind, getattr(task, "num_labels", None), cfg.backbone.revision, seed=cfg.seed)
        w = cfg.backbone.warmup
        if name == SYNTHETIC_SMALL or w.time_budget_s or w.steps:
            from rlskip.agents.warmup import train_generator

            stats = train_generator(
                model, tokenizer, train_examples, steps=w.steps, time_budget=w.time_budget_s or None,
                batch_size=w.batch_size, lr=w.lr, skip_prob=w.skip_prob, seed=cfg.seed, progress=cfg.log.progress,
            )
            log.info("generator warm-up: %d steps in %.0fs, final loss %.4f", stats.steps, stats.seconds, stats.loss)
            save_generator(model, tokenizer, saved)
    return tokenizer, model.eval()


def save_generator(model, tokenizer, folder: Path) -> None:
    tmp = folder.with_name(folder.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if folder.exists():
        import shutil

        shutil.rmtree(folder)
    tmp.rename(folder)


def backbone_reference(cfg: DictConfig, run_dir: Path, model, runtime) -> dict:
    """Where the generator the policy was trained with lives, and its content hash."""
    from rlskip.checkpoint import make_backbone_ref

    built_here = cfg.backbone.name_or_path == SYNTHETIC_SMALL or cfg.generator.mode == "joint"
    name = str((run_dir / "generator").resolve()) if built_here else cfg.backbone.name_or_path
    ref = make_backbone_ref(model, runtime.family, name_or_path=name, revision=cfg.backbone.revision)
    ref["tokenizer"] = name if built_here else (cfg.backbone.tokenizer or cfg.backbone.name_or_path)
    return ref


# ---- main loop -----------------------------------------------------------------------------------------
def run(cfg: DictConfig, run_dir: Path, resuming: bool = False) -> dict:
    from stable_baselines3.common.logger import configure
    from tqdm import tqdm

    from rlskip.agents.tb import record_text
    from rlskip.checkpoint import atomic_write_text, save_checkpoint
    from rlskip.envs import SkipVecEnv
    from rlskip.runtime import get_runtime

    if not resuming:
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    seed_everything(cfg.seed)
    torch.set_num_threads(max(1, torch.get_num_threads()))

    task = build_task(cfg)
    train_ex, eval_ex = load_data(cfg, task)
    train_ex, calib_ex = split_calibration(cfg, train_ex)
    seconds, t0 = {}, time.perf_counter()
    tokenizer, model = build_backbone(cfg, task, run_dir, resuming, train_ex)
    seconds["backbone"] = time.perf_counter() - t0
    rt = get_runtime(model)

    env = SkipVecEnv(
        model, tokenizer, task, train_ex, num_envs=cfg.agent.n_envs, max_source_tokens=cfg.env.max_source_tokens,
        gen_kwargs=gen_kwargs(cfg), budget_in_obs=cfg.env.budget_in_obs, seed=cfg.seed,
        group_size=cfg.agent.group_size,
    )
    constraint = build_constraint(cfg.constraint)
    tb = run_dir / "tb"
    if resuming and (tb / "progress.csv").is_file():
        # SB3 opens progress.csv for writing: keep the interrupted segment's rows under another name
        (tb / "progress.csv").rename(tb / f"progress.{len(list(tb.glob('progress.*.csv')))}.csv")
    logger = configure(str(tb), ["tensorboard", "csv"])
    if not resuming:
        record_text(logger, "config", OmegaConf.to_yaml(cfg, resolve=True))

    learner = make_learner(cfg, env, constraint, logger, rt, tokenizer, train_ex, run_dir)
    if resuming and (run_dir / "trainer_state.pt").is_file():
        state = torch.load(run_dir / "trainer_state.pt", weights_only=False)
        if hasattr(learner, "save_native"):
            learner.load_state_dict(state, run_dir)
        else:
            learner.load_state_dict(state)
    policy = learner.policy
    ref = backbone_reference(cfg, run_dir, model, rt)
    latency_ex = eval_ex[: cfg.eval.latency_instances]
    best, stats = -float("inf"), {}
    bar = tqdm(total=cfg.agent.iterations, initial=learner.iteration, desc="policy", disable=not cfg.log.progress)
    while learner.iteration < cfg.agent.iterations:
        it = learner.iteration + 1
        if it % cfg.log.latency_every == 0:
            logger.record("cost/latency_ratio", measured_latency(cfg, rt, task, tokenizer, latency_ex, policy))
        final = it == cfg.agent.iterations
        stats = learner.train_iteration(log=final or it % cfg.log.every == 0, image=final or it % (cfg.log.every * 10) == 0)
        bar.update(1)
        bar.set_postfix(q=f"{stats['quality']:.3f}", q_full=f"{stats['quality_full']:.3f}", flops=f"{stats['cost']:.3f}")
        if it % cfg.log.checkpoint_every == 0 or it == cfg.agent.iterations:
            if cfg.generator.mode == "joint":  # the checkpoint must point at the generator as tuned so far
                save_generator(model, tokenizer, run_dir / "generator")
                ref = backbone_reference(cfg, run_dir, model, rt)
            save_all(learner, policy, rt, ref, run_dir, it, stats)
            if stats["reward"] > best:
                best = stats["reward"]
                save_checkpoint(run_dir, policy, rt.space, ref, it, extra=stats, name="best")
    bar.close()
    seconds["policy"] = time.perf_counter() - t0 - sum(seconds.values())

    from rlskip.evaluation import calibrate_threshold

    threshold, table = calibrate_threshold(
        rt, task, tokenizer, calib_ex, policy, constraint, gen_kwargs(cfg), cfg.env.max_source_tokens,
        budget=eval_budget(cfg), confidence=cfg.eval.calibration_confidence,
    )
    save_checkpoint(run_dir, policy, rt.space, ref, learner.iteration, extra={**stats, "threshold": threshold}, name="last")
    seconds["calibration"] = time.perf_counter() - t0 - sum(seconds.values())
    summary = final_evaluation(cfg, rt, task, tokenizer, train_ex, eval_ex, policy, threshold)
    seconds["evaluation"] = time.perf_counter() - t0 - sum(seconds.values())
    summary.update(run_dir=str(run_dir), threshold=threshold, calibration=table, n_calibration=len(calib_ex), seconds=seconds)
    atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=1))
    logger.close()
    return summary


def build_constraint(c: DictConfig):
    from rlskip.constraints import make_constraint


    kwargs = {
        "lexicographic": dict(max_quality_drop=c.max_quality_drop, penalty=c.penalty),
        "lagrangian": dict(max_quality_drop=c.max_quality_drop, lam_init=c.lam, lr=c.lr),
        "fixed": dict(lam=c.lam, max_quality_drop=c.max_quality_drop),
        "budget": dict(budget=c.budget),
    }
    if c.name not in kwargs:
        raise ValueError(f"bad configuration: constraint.name={c.name!r}, expected one of {sorted(kwargs)}")
    return make_constraint(c.name, **kwargs[c.name])


def make_learner(cfg, env, constraint, logger, rt, tokenizer, train_ex, run_dir):
    generator_step = None
    if cfg.generator.mode == "joint":
        from rlskip.agents.joint import GeneratorTuner

        tuner = GeneratorTuner(rt, tokenizer, train_ex, cfg.generator.lr, cfg.env.max_source_tokens)

        def generator_step(indices, bits, token_keep):
            loss = tuner.step(indices, bits, token_keep)
            env.full_outputs = {}  # the full model changed: its cached outputs are stale
            return loss

    if cfg.agent.name == "ppo":
        from rlskip.agents.ppo import PPOLearner

        return PPOLearner(
            env, constraint, logger, cfg.agent, run_dir, seed=cfg.seed, budget_input=cfg.env.budget_in_obs, generator_step=generator_step
        )
    from rlskip.agents.policy import SkipPolicy
    from rlskip.agents.reinforce import Reinforce, ReinforceConfig

    a = cfg.agent
    policy = SkipPolicy(
        rt.dims.d_model, rt.space.n_bits, hidden=a.hidden, token_head=a.token_head and rt.space.token_dropping,
        budget_input=cfg.env.budget_in_obs, length_input=a.length_input,
    )
    return Reinforce(env, policy, constraint, logger, ReinforceConfig(a.lr, a.entropy_coef, a.value_coef, normalize_advantage=a.normalize_advantage), generator_step)


def save_all(learner, policy, rt, ref, run_dir: Path, step: int, stats: dict) -> None:
    """The ``last`` checkpoint and everything needed to resume from it (all written atomically)."""
    import io

    from rlskip.checkpoint import atomic_write_bytes, save_checkpoint

    if hasattr(learner, "save_native"):
        learner.save_native(run_dir)
    buf = io.BytesIO()
    torch.save(learner.state_dict(), buf)
    atomic_write_bytes(run_dir / "trainer_state.pt", buf.getvalue())
    save_checkpoint(run_dir, policy, rt.space, ref, step, extra=stats, name="last")


def eval_budget(cfg: DictConfig) -> float | None:
    """The budget a budget-conditioned policy is evaluated at during training: the run's constraint budget."""
    return float(cfg.constraint.budget) if cfg.env.budget_in_obs else None


def measured_latency(cfg, rt, task, tokenizer, examples, policy) -> float:
    from rlskip.evaluation import latency_ratio, policy_plans

    src = policy_plans(policy, rt.space, 0.5, budget=eval_budget(cfg))
    return latency_ratio(rt, task, tokenizer, examples, src, gen_kwargs(cfg), cfg.env.max_source_tokens, cfg.eval.latency_batch, repeats=1)


def final_evaluation(cfg, rt, task, tokenizer, train_ex, eval_ex, policy, threshold: float) -> dict:
    """Full model vs policy on held-out data, the best static plan of equal FLOPs, measured latency."""
    from rlskip.evaluation import full_model, greedy_static_search, latency_ratio, policy_plans, run_method, static_plan

    g, msl = gen_kwargs(cfg), cfg.env.max_source_tokens
    full = run_method(rt, task, tokenizer, eval_ex, full_model(rt.space), g, msl)
    pol_src = policy_plans(policy, rt.space, threshold, budget=eval_budget(cfg))
    pol = run_method(rt, task, tokenizer, eval_ex, pol_src, g, msl)
    search_ex = train_ex[: cfg.eval.static_search_instances]
    path = greedy_static_search(rt, task, tokenizer, search_ex, g, msl, min_flops_ratio=pol.flops_ratio)
    # the greedy path steps over the policy's FLOPs: report the static plans on both sides of it
    i = next((k for k, p in enumerate(path) if p["flops_ratio"] <= pol.flops_ratio), len(path) - 1)
    equal, above = path[i], path[max(i - 1, 0)]
    static = run_method(rt, task, tokenizer, eval_ex, static_plan(rt.space, equal["bits"]), g, msl)
    static_above = run_method(rt, task, tokenizer, eval_ex, static_plan(rt.space, above["bits"]), g, msl)
    lat_ex = eval_ex[: cfg.eval.latency_instances]
    lat_batched = latency_ratio(rt, task, tokenizer, lat_ex, pol_src, g, msl, cfg.eval.latency_batch)
    lat_b1 = latency_ratio(rt, task, tokenizer, lat_ex[: max(8, cfg.eval.latency_instances // 4)], pol_src, g, msl, 1)
    return {
        "task": cfg.env.name, "metric": task.metric, "n_eval": len(eval_ex),
        "quality_full": full.quality, "quality": pol.quality, "flops_ratio": pol.flops_ratio,
        "latency_ratio": lat_batched, "latency_ratio_b1": lat_b1,
        "static_quality_at_equal_flops": static.quality, "static_flops_ratio": static.flops_ratio,
        "static_quality_next_above": static_above.quality, "static_flops_ratio_next_above": static_above.flops_ratio,
        "static_skipped": [rt.space.name(j) for j in (~equal["bits"]).nonzero().flatten().tolist()],
        "quality_by_group": {"full": full.by_group, "policy": pol.by_group, "static": static.by_group},
    }


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
