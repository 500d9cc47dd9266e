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
from rlskip.distributed import Dist, barrier, setup, teardown
from rlskip.rundir import RunDir, default_run_dir

log = logging.getLogger("rlskip.train")


def load_resumed_config(run_dir: str, overrides: list[str]) -> tuple[DictConfig, Path]:
    """The saved config of a run, for ``resume=<run dir>`` (other overrides are refused: same run, same setup)."""
    from omegaconf.errors import OmegaConfBaseException

    from rlskip.inference import run_config

    path = Path(run_dir)
    saved = run_config(path)
    if overrides:
        raise ValueError(f"resume={run_dir} continues a run with its saved config; drop the other overrides {overrides}")
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(TrainConfig), saved)
    except OmegaConfBaseException as e:
        raise ValueError(f"{path / 'config.yaml'} is not a training config this rlskip reads: {str(e).splitlines()[0]}") from None
    OmegaConf.set_readonly(cfg, True)
    return cfg, path


def _bound(row: dict) -> str:
    """The calibrated bound a policy's selection row holds: on the quality drop, or (budget-conditioned) on FLOPs."""
    if "drop_upper_bound" in row:
        return f" drop bound {row['drop_upper_bound']:.4f}"
    return f" FLOPs bound {row['flops_upper_bound']:.4f} at budget {row['budget']:g}" if "flops_upper_bound" in row else ""


def check_world(cfg: DictConfig, dist: Dist) -> None:
    """The global batch (``agent.n_envs``) must split evenly over the ranks, in whole groups of plans."""
    group = cfg.agent.get("group_size", 1)
    if cfg.agent.n_envs % (dist.world * group):
        raise ValueError(
            f"agent.n_envs={cfg.agent.n_envs} (the global batch) must split into {dist.world} ranks of whole groups of "
            f"agent.group_size={group}"
        )


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def run(cfg: DictConfig, rd: RunDir, resuming: bool = False, dist: Dist | None = None) -> dict:
    """Train, calibrate, select and evaluate in the run directory ``rd`` (locked by rank 0, the one process of a
    data-parallel job that writes); returns the summary."""
    from rlskip.agents.generator import SYNTHETIC_SMALL, backbone_reference, load_generator, load_generator_weights, warm_up
    from rlskip.agents.trainer import (
        adopt_generator, budget_range, policy_confidence, policy_dir, policy_seed, resume_point, select_policy, train_policy,
    )
    from rlskip.checkpoint import atomic_write_bytes, atomic_write_text, load_checkpoint, save_checkpoint
    from rlskip.encoding import encoder_for
    from rlskip.envs import SkipVecEnv
    from rlskip.envs.data import build_task, load_examples, split_calibration, with_task_defaults
    from rlskip.calibration import calibrate_budgets, calibrate_threshold
    from rlskip.evaluation import EvalData, final_evaluation, run_method
    from rlskip.execute import Executor
    from rlskip.methods import budget_grid, budget_plans, full_model, planned, policy_plans
    from rlskip.runtime import get_runtime

    dist = dist or Dist()
    run_dir = rd.path
    seed_everything(cfg.seed)

    # data: training, calibration (held out of training) and evaluation examples
    task = build_task(cfg.env, cfg.seed)
    try:
        train_ex, eval_ex, data_split = load_examples(cfg.env, task, cfg.eval.limit)
    except ValueError as e:
        name = cfg.backbone.name_or_path
        if cfg.env.data_files is None and name != SYNTHETIC_SMALL and not Path(name).expanduser().exists():
            raise ValueError(f"{e}; the backbone {name} comes from the hub too: set backbone.name_or_path=<local model>") from None
        raise
    train_ex, calib_ex = split_calibration(train_ex, cfg.eval.calibration_instances)
    data_split.update(train=len(train_ex), calibration=len(calib_ex), how=data_split["how"] + "; calibration: the last training rows")

    # the generator, built or loaded; the config, with what the task decides for it, is saved; a warm-up
    seconds, t = {"backbone": 0.0, "policy": 0.0, "calibration": 0.0}, time.perf_counter()
    tokenizer, model = load_generator(cfg, task, run_dir, resuming)
    model.to(dist.device)
    rt = get_runtime(model)
    cfg = with_task_defaults(cfg, task, rt)
    if not resuming and dist.main:
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    encoder = encoder_for(tokenizer, rt, cfg.env, cfg.backbone.chat, task.pair_truncation)
    if dist.main:
        warm_up(cfg, model, tokenizer, encoder, run_dir, train_ex)
    barrier(dist)
    if not dist.main and (run_dir / "generator").is_dir():  # the generator rank 0 built or warmed up
        load_generator_weights(cfg, task, model, run_dir / "generator", None)
    rd.started()  # from here on a failure leaves a run that resume= continues
    seconds["backbone"] = time.perf_counter() - t
    ex = Executor(rt, encoder, task.kind, generation_settings(cfg), cfg.env.label_words)
    calib_data, eval_data = EvalData.encode(ex, calib_ex), EvalData.encode(ex, eval_ex)
    latency_data = eval_data.head(cfg.eval.latency_instances)
    time_model = time_model_for(cfg, run_dir, ex, train_ex, dist) if cfg.env.cost != "flops" else None

    # the policies, one after another, each calibrated on the held-out instances
    n = cfg.agent.policies
    joint = cfg.generator.mode == "joint"  # each policy tunes its own copy of the generator, from the same start
    start = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()} if joint else None
    frozen_ref = backbone_reference(cfg, run_dir / "generator", model, rt)
    budgets = budget_range(cfg)  # a budget-conditioned run draws each instance's budget from this range
    trained, rows, throughput = [], [], []
    for c in range(n):
        cdir = policy_dir(cfg, run_dir, c)
        if dist.main:
            cdir.mkdir(parents=True, exist_ok=True)
        if joint:  # from the start, or as the policy's last checkpoint left it
            last = resume_point(cdir)
            load_generator_weights(cfg, task, model, None if last is None else Path(last.backbone_ref["name_or_path"]), start)
        if c > 0:
            seed_everything(policy_seed(cfg.seed, c))
        env = SkipVecEnv(
            model, tokenizer, task, train_ex, num_envs=cfg.agent.n_envs // dist.world, max_source_tokens=cfg.env.max_source_tokens,
            gen_kwargs=generation_settings(cfg), seed=policy_seed(cfg.seed, c), group_size=cfg.agent.get("group_size", 1),
            margin=cfg.env.margin, fidelity=cfg.env.fidelity, prompt=encoder.prompt, shard=(dist.rank, dist.world),
            **({"budget": budgets, "budget_in_obs": True} if budgets else {}),
        )
        env.rollout.time_model, env.rollout.cost_max = time_model, cfg.env.cost == "max"
        t = time.perf_counter()
        learner, ref, stats = train_policy(cfg, c, cdir, env, frozen_ref, latency_data, tokenizer, dist)
        seconds["policy"] += time.perf_counter() - t
        t = time.perf_counter()
        extra = load_checkpoint(cdir, "last").extra
        if budgets:  # one threshold per budget of a grid; the run's own budget is the default operating point
            grid, table = calibrate_budgets(ex, task, calib_data, learner.policy, budget_grid(*budgets), confidence=policy_confidence(cfg))
            at = max(g for g in grid if g <= cfg.constraint.budget + 1e-9)
            threshold, extra["thresholds"] = grid[at], {f"{g:g}": th for g, th in grid.items()}
            chosen = next(r for r in table if r["budget"] == at)
        else:
            threshold, table = calibrate_threshold(
                ex, task, calib_data, learner.policy, learner.constraint, confidence=policy_confidence(cfg)
            )
            chosen = next(r for r in table if r["threshold"] == threshold)
        seconds["calibration"] += time.perf_counter() - t
        extra["threshold"] = threshold
        if dist.main:
            save_checkpoint(cdir, learner.policy, rt.space, ref, learner.iteration, extra=extra, name="last")
        trained.append((learner.policy, ref, threshold, table, extra))
        rows.append({"policy": c, "seed": policy_seed(cfg.seed, c), **chosen})
        throughput.append(stats.get("instances_per_s"))  # None for a policy finished before a resume

    # keep the policy whose calibrated plans do best under the constraint; its files become the run's
    k = select_policy(learner.constraint, rows)
    policy, ref, threshold, table, extra = trained[k]
    cdir = policy_dir(cfg, run_dir, k)
    if joint:  # the generator the kept policy was tuned with
        load_generator_weights(cfg, task, model, Path(ref["name_or_path"]), start)
    if n > 1 and dist.main:
        log.info("kept policy %d of %d: %s", k, n,
                 ", ".join(f"{r['policy']}: FLOPs {r['flops_ratio']:.3f}" + _bound(r) for r in rows))
        for name, ckpt in (("best", load_checkpoint(cdir, "best")), ("last", load_checkpoint(cdir, "last"))):
            save_checkpoint(
                run_dir, ckpt.build_policy(), rt.space, adopt_generator(ckpt.backbone_ref, run_dir), ckpt.step,
                extra={**ckpt.extra, "kept_policy": k}, name=name,
            )
    if "ppo" in extra["files"] and dist.main:  # SB3's zip of the kept policy, under the name PPO.load users expect
        atomic_write_bytes(run_dir / "ppo.zip", (cdir / extra["files"]["ppo"]).read_bytes())

    # the summary: held-out evaluation against the full model and the best static plan
    t = time.perf_counter()
    search_data = EvalData.encode(ex, train_ex[: cfg.eval.static_search_instances])
    if budgets:  # at the run's own budget
        method = planned(budget_plans(policy, rt.space, {float(g): th for g, th in extra["thresholds"].items()}, cfg.constraint.budget))
    else:
        method = planned(policy_plans(policy, rt.space, threshold))
    summary = final_evaluation(
        ex, task, eval_data, search_data, method, cfg.eval.latency_instances, cfg.eval.latency_batch, cfg.eval.static_search,
    )
    if joint:  # the full model the tuning started from (the warm-up's, or the backbone), on the same held-out data
        tuned = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        model.load_state_dict(start)
        summary["quality_full_start"] = run_method(ex, task, eval_data, planned(full_model(rt.space))).quality
        model.load_state_dict(tuned)
    seconds["evaluation"] = time.perf_counter() - t
    summary.update(
        run_dir=str(run_dir), threshold=threshold, calibration=table, n_calibration=len(calib_ex), data_split=data_split,
        calibration_confidence=policy_confidence(cfg), kept_policy=k, policies=rows, seconds=seconds,
        train_instances_per_s=throughput, **({"time_model": time_model.to_dict()} if time_model else {}),
    )
    if dist.main:
        atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=1))
    return summary


def time_model_for(cfg: DictConfig, run_dir: Path, ex, train_ex, dist: Dist):
    """``env.cost=time`` or ``max``: the run's time model (:mod:`rlskip.cost`), measured by rank 0 on the first
    ``eval.latency_batch`` training instances and shared with every rank, or read back from
    ``time_model.json`` when resuming, so a resumed run keeps pricing plans as it did."""
    from rlskip.checkpoint import atomic_write_text
    from rlskip.cost import TimeModel, measure_time_model

    path = run_dir / "time_model.json"
    if path.is_file():
        try:
            return TimeModel.from_dict(json.loads(path.read_text()))
        except ValueError as e:
            raise ValueError(f"{path} cannot be read back ({e}); restore it or start a new run") from None
    found = [None]
    if dist.main:
        rows = ex.encoder.inputs(list(train_ex[: cfg.eval.latency_batch]))[0]
        new_tokens = None if ex.task_kind == "classification" else cfg.env.max_new_tokens
        tm = measure_time_model(ex, ex.observe(rows), new_tokens)
        log.info("time model: seconds per FLOP relative to the full model's average: fixed %.2f, %s",
                 tm.fixed, ", ".join(f"{k} {v:.2f}" for k, v in tm.kinds.items()))
        atomic_write_text(path, json.dumps(tm.to_dict(), indent=1))
        found = [tm.to_dict()]
    if dist.active:
        torch.distributed.broadcast_object_list(found, src=0)
    return TimeModel.from_dict(found[0])


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        resume = next((a.split("=", 1)[1] for a in argv if a.startswith("resume=")), None)
        if resume:
            cfg, run_dir = load_resumed_config(resume, [a for a in argv if not a.startswith("resume=")])
        else:
            cfg = compose(argv)
            run_dir = Path(cfg.run_dir) if cfg.run_dir else default_run_dir(cfg.env.name, cfg.agent.name)
        dist = setup(cfg.device, cfg.dist_timeout_s)
        check_world(cfg, dist)
        with RunDir(run_dir, fresh=not resume, writer=dist.main) as rd:
            summary = run(cfg, rd, resuming=bool(resume), dist=dist)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (torch.distributed.DistBackendError, RuntimeError) as e:
        if not torch.distributed.is_initialized():
            raise
        # a peer rank died or stalled: this rank's collective failed or timed out
        print(f"error: a data-parallel peer process stopped or stalled ({str(e).splitlines()[0][:200]})", file=sys.stderr)
        return 2
    finally:
        teardown()
    print(json.dumps({k: v for k, v in summary.items() if k != "quality_by_group"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
