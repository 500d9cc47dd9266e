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

With ``agent.policies = n > 1`` (the default for ``agent=reinforce``: 2) the policy is trained ``n`` times
from independent seeds, one after another, each in ``policies/<i>/`` with its own ``tb/``, checkpoints and
``trainer_state.pt`` (and, in joint mode, its own tuned ``generator/``, all starting from the same one).
Each is calibrated on the same held-out instances at confidence ``1 - (1 - eval.calibration_confidence) / n``
(a union bound over the ``n`` policies), and the one whose calibrated plans do best under the constraint is
kept: its checkpoints (and generator) are copied to the run directory, and ``summary.json`` lists every
policy's calibration outcome (``policies``) and the one kept (``kept_policy``). Policy training varies a
lot from seed to seed; keeping the better of two trades a second training for that spread.
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


def load_generator_weights(model, folder: Path | None, start: dict, task) -> None:
    """Put the weights saved in ``folder`` (``save_generator``), or ``start`` when None, into ``model`` in place."""
    if folder is None:
        model.load_state_dict(start)
        return
    saved = load_backbone(str(folder), task.kind, getattr(task, "num_labels", None))
    model.load_state_dict(saved.state_dict())


def backbone_reference(cfg: DictConfig, generator_dir: Path, model, runtime) -> dict:
    """Where the generator the policy was trained with lives (``generator_dir`` when built or tuned here), and its content hash."""
    from rlskip.checkpoint import make_backbone_ref

    built_here = cfg.backbone.name_or_path == SYNTHETIC_SMALL or cfg.generator.mode == "joint"
    name = str(generator_dir.resolve()) if built_here else cfg.backbone.name_or_path
    ref = make_backbone_ref(model, runtime.family, name_or_path=name, revision=cfg.backbone.revision)
    ref["tokenizer"] = name if built_here else (cfg.backbone.tokenizer or cfg.backbone.name_or_path)
    return ref


# ---- main loop -----------------------------------------------------------------------------------------
def policy_seed(seed: int, c: int) -> int:
    """Seed of policy ``c``: the run's seed for the first, so a one-policy run is the run it always was."""
    return seed + 10_000 * c


def policy_dir(cfg: DictConfig, run_dir: Path, c: int) -> Path:
    """Where policy ``c`` trains: the run directory itself with one policy, else ``policies/<c>``."""
    return run_dir if cfg.agent.policies == 1 else run_dir / "policies" / str(c)


def policy_confidence(cfg: DictConfig) -> float:
    """Each policy's calibration confidence: the run's, split over the ``agent.policies`` (Bonferroni).

    The kept policy is the best of ``n`` calibrated on the same instances; if each one's bound holds with
    probability ``1 - (1 - confidence) / n``, all of them hold together, so the kept one's too, with
    probability at least ``confidence``.
    """
    return 1.0 - (1.0 - float(cfg.eval.calibration_confidence)) / int(cfg.agent.policies)


def select_policy(constraint, rows: list[dict]) -> int:
    """Index of the policy whose calibrated deterministic plans do best under the run's constraint.

    ``rows`` are the calibration rows at each policy's chosen threshold (see
    :func:`rlskip.evaluation.calibrate_threshold`). For a budget: within the budget first, then the highest
    quality (the cheapest when none is within). Otherwise: the quality constraint (at its confidence bound)
    satisfied first, then the fewest FLOPs (the smallest drop bound when none satisfies it).
    """
    from rlskip.constraints import Budget

    if not rows:
        raise ValueError("no policies to select from")

    def key(r: dict) -> tuple:
        if isinstance(constraint, Budget):
            return (r["satisfied"], r["quality"] if r["satisfied"] else -r["flops_ratio"])
        return (r["satisfied"], -r["flops_ratio"] if r["satisfied"] else -r["drop_upper_bound"])

    return max(range(len(rows)), key=lambda i: key(rows[i]))


def train_policy(cfg, c: int, cdir: Path, model, tokenizer, task, train_ex, latency_ex, rt, ref, generator_dir: Path):
    """Train (or finish, when ``cdir`` holds its ``trainer_state.pt``) policy ``c``.

    Returns ``(learner, backbone reference, stats of its last batch)``.

    Every policy has its own seed (:func:`policy_seed`), data stream, TensorBoard events and
    checkpoints under ``cdir``, so a run stopped anywhere resumes with the policy it was training. In
    joint mode the generator as tuned so far is saved to ``generator_dir`` with each checkpoint.
    """
    from stable_baselines3.common.logger import Logger, configure
    from tqdm import tqdm

    from rlskip.agents.tb import record_text
    from rlskip.checkpoint import load_checkpoint, save_checkpoint
    from rlskip.envs import SkipVecEnv

    seed = policy_seed(cfg.seed, c)
    if c > 0:
        seed_everything(seed)
    env = SkipVecEnv(
        model, tokenizer, task, train_ex, num_envs=cfg.agent.n_envs, max_source_tokens=cfg.env.max_source_tokens,
        gen_kwargs=gen_kwargs(cfg), budget_in_obs=cfg.env.budget_in_obs, seed=seed, group_size=cfg.agent.group_size,
        margin=cfg.env.margin,
    )
    constraint = build_constraint(cfg.constraint)
    state = torch.load(cdir / "trainer_state.pt", weights_only=False) if (cdir / "trainer_state.pt").is_file() else None
    tb = cdir / "tb"
    if state is not None and state["iteration"] >= cfg.agent.iterations:
        logger = Logger(None, [])  # finished before a stop: its TensorBoard events stay as they are
    else:
        if (tb / "progress.csv").is_file():
            # SB3 opens progress.csv for writing: keep the interrupted segment's rows under another name
            (tb / "progress.csv").rename(tb / f"progress.{len(list(tb.glob('progress.*.csv')))}.csv")
        logger = configure(str(tb), ["tensorboard", "csv"])
    learner = make_learner(cfg, env, constraint, logger, rt, tokenizer, train_ex, cdir, seed)
    if state is not None:
        if hasattr(learner, "save_native"):
            learner.load_state_dict(state, cdir)
        else:
            learner.load_state_dict(state)
    else:
        record_text(logger, "config", OmegaConf.to_yaml(cfg, resolve=True))
    policy = learner.policy
    best, stats = -float("inf"), {}
    n = cfg.agent.policies
    desc = "policy" if n == 1 else f"policy {c + 1}/{n}"
    bar = tqdm(total=cfg.agent.iterations, initial=learner.iteration, desc=desc, disable=not cfg.log.progress)
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
                save_generator(model, tokenizer, generator_dir)
                ref = backbone_reference(cfg, generator_dir, model, rt)
            save_all(learner, policy, rt, ref, cdir, it, stats)
            if stats["reward"] > best:
                best = stats["reward"]
                save_checkpoint(cdir, policy, rt.space, ref, it, extra=stats, name="best")
    bar.close()
    logger.close()
    if not stats:  # finished before this (resumed) process: the last checkpoint holds its final batch
        stats = {k: v for k, v in load_checkpoint(cdir, "last").extra.items() if k != "threshold"}
    return learner, ref, stats


def run(cfg: DictConfig, run_dir: Path, resuming: bool = False) -> dict:
    from rlskip.checkpoint import atomic_write_bytes, atomic_write_text, load_checkpoint, save_checkpoint
    from rlskip.evaluation import calibrate_threshold
    from rlskip.runtime import get_runtime

    if not resuming:
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    seed_everything(cfg.seed)
    torch.set_num_threads(max(1, torch.get_num_threads()))

    task = build_task(cfg)
    train_ex, eval_ex = load_data(cfg, task)
    train_ex, calib_ex = split_calibration(cfg, train_ex)
    seconds, t0 = {"backbone": 0.0, "policy": 0.0, "calibration": 0.0}, time.perf_counter()
    tokenizer, model = build_backbone(cfg, task, run_dir, resuming, train_ex)
    seconds["backbone"] = time.perf_counter() - t0
    rt = get_runtime(model)
    ref = backbone_reference(cfg, run_dir / "generator", model, rt)
    latency_ex = eval_ex[: cfg.eval.latency_instances]
    confidence = policy_confidence(cfg)
    n = cfg.agent.policies
    # joint mode with several policies: each one tunes its own copy of the generator, from the same start
    own_generators = cfg.generator.mode == "joint" and n > 1
    start = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()} if own_generators else None
    policies, rows = [], []
    for c in range(n):
        cdir = policy_dir(cfg, run_dir, c)
        generator_dir = cdir / "generator" if own_generators else run_dir / "generator"
        if own_generators:
            load_generator_weights(model, generator_dir if (cdir / "trainer_state.pt").is_file() else None, start, task)
            ref = backbone_reference(cfg, generator_dir, model, rt)
        t = time.perf_counter()
        learner, ref, stats = train_policy(cfg, c, cdir, model, tokenizer, task, train_ex, latency_ex, rt, ref, generator_dir)
        seconds["policy"] += time.perf_counter() - t
        t = time.perf_counter()
        threshold, table = calibrate_threshold(
            rt, task, tokenizer, calib_ex, learner.policy, learner.constraint, gen_kwargs(cfg), cfg.env.max_source_tokens,
            budget=eval_budget(cfg), confidence=confidence,
        )
        seconds["calibration"] += time.perf_counter() - t
        extra = {**stats, "threshold": threshold}
        save_checkpoint(cdir, learner.policy, rt.space, ref, learner.iteration, extra=extra, name="last")
        chosen = next(r for r in table if r["threshold"] == threshold)
        policies.append((learner.policy, learner.constraint, threshold, table, extra))
        rows.append({"policy": c, "seed": policy_seed(cfg.seed, c), **chosen})
    k = select_policy(policies[0][1], rows)
    policy, _, threshold, table, extra = policies[k]
    if n > 1:
        cdir = policy_dir(cfg, run_dir, k)
        log.info("kept policy %d of %d: %s", k, n,
                 ", ".join(f"{r['policy']}: FLOPs {r['flops_ratio']:.3f} drop bound {r['drop_upper_bound']:.4f}" for r in rows))
        if own_generators:  # the kept policy's tuned generator becomes the run's
            load_generator_weights(model, cdir / "generator", start, task)
            save_generator(model, tokenizer, run_dir / "generator")
            ref = backbone_reference(cfg, run_dir / "generator", model, rt)
        best_ckpt = load_checkpoint(cdir, "best")
        save_checkpoint(run_dir, best_ckpt.build_policy(), rt.space, ref, best_ckpt.step, extra={**best_ckpt.extra, "kept_policy": k}, name="best")
        save_checkpoint(run_dir, policy, rt.space, ref, cfg.agent.iterations, extra={**extra, "kept_policy": k}, name="last")
        if (cdir / "ppo.zip").is_file():
            atomic_write_bytes(run_dir / "ppo.zip", (cdir / "ppo.zip").read_bytes())
    t = time.perf_counter()
    summary = final_evaluation(cfg, rt, task, tokenizer, train_ex, eval_ex, policy, threshold)
    seconds["evaluation"] = time.perf_counter() - t
    summary.update(
        run_dir=str(run_dir), threshold=threshold, calibration=table, n_calibration=len(calib_ex),
        calibration_confidence=confidence, kept_policy=k, policies=rows, seconds=seconds,
    )
    atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=1))
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


def make_learner(cfg, env, constraint, logger, rt, tokenizer, train_ex, run_dir, seed: int):
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
            env, constraint, logger, cfg.agent, run_dir, seed=seed, budget_input=cfg.env.budget_in_obs, generator_step=generator_step
        )
    from rlskip.agents.policy import SkipPolicy
    from rlskip.agents.reinforce import Reinforce, ReinforceConfig

    a = cfg.agent
    policy = SkipPolicy(
        rt.dims.d_model, rt.space.n_bits, hidden=a.hidden, token_head=a.token_head and rt.space.token_dropping,
        budget_input=cfg.env.budget_in_obs, length_input=a.length_input,
    )
    config = ReinforceConfig(
        a.lr, a.entropy_coef, a.value_coef, normalize_advantage=a.normalize_advantage, self_critical=a.self_critical,
        iterations=a.iterations, lr_decay=a.lr_decay,
    )
    return Reinforce(env, policy, constraint, logger, config, generator_step)


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
