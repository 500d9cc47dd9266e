"""Training one policy (the loop, checkpoints, resume) and choosing among several trained from independent seeds.

With ``agent.policies = n > 1`` the policy is trained ``n`` times, one after another, each in
``policies/<i>/`` with its own seed, ``tb/``, checkpoints and ``trainer_state.pt``. Each is calibrated on the
same held-out instances at confidence ``1 - (1 - eval.calibration_confidence) / n`` (a union bound over the
``n`` policies), and :func:`select_policy` keeps the one whose calibrated plans do best under the constraint:
policy training varies a lot from seed to seed, and keeping the better of two trades a second training for
that spread.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from rlskip.agents.base import Learner
from rlskip.agents.generator import save_generator
from rlskip.checkpoint import Checkpoint, load_checkpoint, make_backbone_ref, save_checkpoint
from rlskip.constraints import Budget, from_config
from rlskip.distributed import Dist, barrier, gather
from rlskip.evaluation import EvalData, latency_ratio
from rlskip.methods import planned, policy_plans
from rlskip.policy import SkipPolicy


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
    :func:`rlskip.calibration.calibrate_threshold`). For a budget: within the budget first, then the highest
    quality (the cheapest when none is within). Otherwise: the quality constraint (at its confidence bound)
    satisfied first, then the fewest FLOPs (the smallest drop bound when none satisfies it).
    """
    if not rows:
        raise ValueError("no policies to select from")

    def key(r: dict) -> tuple:
        if isinstance(constraint, Budget):
            return (r["satisfied"], r["quality"] if r["satisfied"] else -r["flops_ratio"])
        return (r["satisfied"], -r["flops_ratio"] if r["satisfied"] else -r["drop_upper_bound"])

    return max(range(len(rows)), key=lambda i: key(rows[i]))


def budget_range(cfg: DictConfig) -> tuple[float, float] | None:
    """The budgets a budget-conditioned run trains for (``constraint.budget_range``), or None."""
    r = cfg.constraint.get("budget_range") if cfg.constraint.name == "budget" else None
    return None if r is None else (float(r[0]), float(r[1]))


def make_learner(cfg: DictConfig, env, logger, seed: int, generator=None, dist: Dist | None = None) -> Learner:
    """The learner ``cfg.agent`` names, on ``env``, with the run's constraint (and, in joint mode, the
    generator tuner), its policy on ``dist.device``."""
    dist = dist or Dist()
    constraint = from_config(cfg.constraint)
    if cfg.agent.name == "ppo":
        from rlskip.agents.ppo import PPOLearner

        if dist.active:
            raise ValueError("agent=ppo trains in one process (Stable-Baselines3 is not data-parallel); run it without torchrun")
        return PPOLearner(
            env, constraint, logger, cfg.agent, seed=seed, budget_input=budget_range(cfg) is not None, generator=generator,
            device=dist.device,
        )
    from rlskip.agents.reinforce import Reinforce

    a, rt = cfg.agent, env.rollout.runtime
    token_head = a.token_head and rt.space.token_dropping
    policy = SkipPolicy(
        rt.dims.d_model, rt.space.n_bits, hidden=a.hidden, token_head=token_head,
        length_input=a.length_input, budget_input=budget_range(cfg) is not None, token_features=a.token_features,
        bit_head=a.bit_head, lead_prior=a.token_lead_prior if token_head else None,
    ).to(dist.device)
    return Reinforce(env, policy, constraint, logger, a, generator, seed=seed, dist=dist)


def resume_point(cdir: Path) -> Checkpoint | None:
    """The ``last`` checkpoint a policy directory resumes from (None: the policy has not started)."""
    return load_checkpoint(cdir, "last") if (cdir / "last.json").is_file() else None


def tuned_generator_ref(cfg: DictConfig, rt, tokenizer, cdir: Path) -> dict:
    """Save the generator as tuned so far into ``cdir/generator-<content hash>`` (once per content) and return
    the backbone reference naming it: each checkpoint points at the generator it was trained with."""
    ref = make_backbone_ref(rt.model, rt.family, revision=cfg.backbone.revision)
    folder = cdir / f"generator-{ref['content_hash'][:16]}"
    if not folder.is_dir():
        save_generator(rt.model, tokenizer, folder)
    ref["name_or_path"] = ref["tokenizer"] = str(folder.resolve())
    return ref


def adopt_generator(ref: dict, run_dir: Path) -> dict:
    """A checkpoint's backbone reference for the run directory: a tuned generator folder from a policy's
    directory is copied up beside the run's checkpoints, so the run directory holds what its checkpoints name."""
    src = Path(ref["name_or_path"])
    if not src.name.startswith("generator-") or src.parent == run_dir.resolve():
        return ref
    dst = run_dir / src.name
    if not dst.is_dir():
        shutil.copytree(src, dst.with_name(dst.name + ".tmp"), dirs_exist_ok=True)
        dst.with_name(dst.name + ".tmp").rename(dst)
    return {**ref, "name_or_path": str(dst.resolve()), "tokenizer": str(dst.resolve())}


def prune(cdir: Path) -> None:
    """Remove the content-named files and generator folders no checkpoint of ``cdir`` names any more."""
    named = set()
    for meta in cdir.glob("*.json"):
        extra_files = json.loads(meta.read_text()).get("extra", {}).get("files", {}) if meta.stem in ("last", "best") else {}
        named |= set(extra_files.values())
        if meta.stem in ("last", "best"):
            named.add(Path(json.loads(meta.read_text())["backbone"]["name_or_path"]).name)
    for p in [*cdir.glob("trainer_state-*.pt"), *cdir.glob("ppo-*.zip"), *cdir.glob("generator-*")]:
        if p.name not in named:
            shutil.rmtree(p) if p.is_dir() else p.unlink()


def train_policy(cfg: DictConfig, c: int, cdir: Path, env, ref: dict, latency_data: EvalData, tokenizer, dist: Dist | None = None):
    """Train (or finish, when ``cdir`` holds its ``last`` checkpoint) policy ``c`` on ``env``.

    Returns ``(learner, backbone reference, stats of its last batch)``; the stats add ``instances_per_s``, the
    training throughput after this process's first iteration, when it ran two or more. A checkpoint is one unit: the learner's
    state (and SB3's zip), in joint mode the generator as tuned so far, then the policy, and last the manifest
    ``last.json`` naming them all with the best reward so far; a kill at any moment leaves the previous
    checkpoint whole. ``best`` names its own generator. In a data-parallel job every rank trains in step and
    rank 0 alone writes (TensorBoard, checkpoints) and measures latency.
    """
    from stable_baselines3.common.logger import Logger, configure
    from tqdm import tqdm

    from rlskip.agents.tb import record_text

    dist = dist or Dist()
    rt, ex = env.rollout.runtime, env.rollout.executor
    last = resume_point(cdir)
    finished = last is not None and last.step >= cfg.agent.iterations
    tb = cdir / "tb"
    if finished or not dist.main:
        logger = Logger(None, [])  # finished before a stop: its TensorBoard events stay as they are
    else:
        if (tb / "progress.csv").is_file():
            # SB3 opens progress.csv for writing: keep the interrupted segment's rows under another name
            (tb / "progress.csv").rename(tb / f"progress.{len(list(tb.glob('progress.*.csv')))}.csv")
        logger = configure(str(tb), ["tensorboard", "csv"])
    generator = None
    if cfg.generator.mode == "joint":
        from rlskip.agents.joint import GeneratorTuner

        generator = GeneratorTuner(env, cfg.generator.lr, dist, cfg.generator.distill)
    learner = make_learner(cfg, env, logger, policy_seed(cfg.seed, c), generator, dist)
    best, stats = -float("inf"), {}
    if last is not None:
        learner.load(cdir, last.extra["files"])
        best = last.extra["best_reward"]
        ref = last.backbone_ref
    elif dist.main:
        record_text(logger, "config", OmegaConf.to_yaml(cfg, resolve=True))
    n = cfg.agent.policies
    bar = tqdm(
        total=cfg.agent.iterations, initial=learner.iteration, desc="policy" if n == 1 else f"policy {c + 1}/{n}",
        disable=not cfg.log.progress or not dist.main,
    )
    # throughput from the end of this process's first iteration, which carries its one-time costs (first
    # allocations, the process group's first collectives)
    clock: list[float] = []  # when each iteration ended
    while learner.iteration < cfg.agent.iterations:
        it = learner.iteration + 1
        final = it == cfg.agent.iterations
        log_now = final or it % cfg.log.every == 0
        if log_now and len(clock) > 1:
            logger.record("time/instances_per_s", instances_per_s(clock, learner.instances_per_iteration))
        if it % cfg.log.latency_every == 0 and dist.main:
            at = cfg.constraint.budget if budget_range(cfg) else None  # a conditioned policy, at the run's budget
            method = planned(policy_plans(learner.policy, rt.space, 0.5, at))
            logger.record("cost/latency_ratio", latency_ratio(ex, latency_data, method, cfg.eval.latency_batch, repeats=1))
        checkpoint = it % cfg.log.checkpoint_every == 0 or final
        # only rank 0 writes TensorBoard: the others skip building its records (the heatmap image takes ~0.5 s)
        stats = learner.train_iteration(log=log_now and dist.main, image=final or it % (cfg.log.every * 10) == 0)
        clock.append(time.perf_counter())
        learner.check_health()
        bar.update(1)
        bar.set_postfix(q=f"{stats['quality']:.3f}", q_full=f"{stats['quality_full']:.3f}", flops=f"{stats['flops_ratio']:.3f}")
        if checkpoint and dist.main:
            if generator is not None:
                ref = tuned_generator_ref(cfg, rt, tokenizer, cdir)
            files = learner.save(cdir)
            if stats["reward"] > best:
                best = stats["reward"]
                save_checkpoint(cdir, learner.policy, rt.space, ref, it, extra=stats, name="best")
            save_checkpoint(cdir, learner.policy, rt.space, ref, it, extra={**stats, "files": files, "best_reward": best}, name="last")
            prune(cdir)
        if checkpoint and generator is not None:
            ref = gather(ref, dist)[0]  # rank 0 saved the tuned generator: every rank names its folder
    bar.close()
    logger.close()
    barrier(dist)  # rank 0's last checkpoint is on disk before any rank reads it
    if not stats:  # finished before this (resumed) process: the last checkpoint holds its final batch
        stats = {k: v for k, v in last.extra.items() if k in ("reward", "quality", "quality_full", "cost")}
    if len(clock) > 1:
        stats["instances_per_s"] = instances_per_s(clock, learner.instances_per_iteration)
    return learner, ref, stats


def instances_per_s(clock: list[float], per_iteration: int) -> float:
    """Training throughput between the first and the last of ``clock`` (iteration end times), all ranks together."""
    return per_iteration * (len(clock) - 1) / max(clock[-1] - clock[0], 1e-9)
