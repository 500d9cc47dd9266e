"""Training one policy (the loop, checkpoints, resume) and choosing among several trained from independent seeds.

With ``agent.policies = n > 1`` the policy is trained ``n`` times, one after another, each in
``policies/<i>/`` with its own seed, ``tb/``, checkpoints and ``trainer_state.pt``. Each is calibrated on the
same held-out instances at confidence ``1 - (1 - eval.calibration_confidence) / n`` (a union bound over the
``n`` policies), and :func:`select_policy` keeps the one whose calibrated plans do best under the constraint:
policy training varies a lot from seed to seed, and keeping the better of two trades a second training for
that spread.
"""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from rlskip.agents.base import STATE_FILE, Learner
from rlskip.agents.generator import backbone_reference, save_generator
from rlskip.checkpoint import load_checkpoint, save_checkpoint
from rlskip.constraints import Budget, from_config
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
    :func:`rlskip.evaluation.calibrate_threshold`). For a budget: within the budget first, then the highest
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


def make_learner(cfg: DictConfig, env, logger, seed: int, generator_step=None) -> Learner:
    """The learner ``cfg.agent`` names, on ``env``, with the run's constraint."""
    constraint = from_config(cfg.constraint)
    if cfg.agent.name == "ppo":
        from rlskip.agents.ppo import PPOLearner

        return PPOLearner(env, constraint, logger, cfg.agent, seed=seed, generator_step=generator_step)
    from rlskip.agents.reinforce import Reinforce

    a, rt = cfg.agent, env.rollout.runtime
    policy = SkipPolicy(
        rt.dims.d_model, rt.space.n_bits, hidden=a.hidden, token_head=a.token_head and rt.space.token_dropping,
        length_input=a.length_input,
    )
    return Reinforce(env, policy, constraint, logger, a, generator_step)


def train_policy(cfg: DictConfig, c: int, cdir: Path, env, ref: dict, latency_data: EvalData, generator_dir: Path, tokenizer):
    """Train (or finish, when ``cdir`` holds its ``trainer_state.pt``) policy ``c`` on ``env``.

    Returns ``(learner, backbone reference, stats of its last batch)``. In joint mode the generator as tuned
    so far is saved to ``generator_dir`` with each checkpoint, and the reference follows it.
    """
    from stable_baselines3.common.logger import Logger, configure
    from tqdm import tqdm

    from rlskip.agents.tb import record_text

    rt, ex = env.rollout.runtime, env.rollout.executor
    resuming = (cdir / STATE_FILE).is_file()
    finished = resuming and torch.load(cdir / STATE_FILE, weights_only=False)["iteration"] >= cfg.agent.iterations
    tb = cdir / "tb"
    if finished:
        logger = Logger(None, [])  # finished before a stop: its TensorBoard events stay as they are
    else:
        if (tb / "progress.csv").is_file():
            # SB3 opens progress.csv for writing: keep the interrupted segment's rows under another name
            (tb / "progress.csv").rename(tb / f"progress.{len(list(tb.glob('progress.*.csv')))}.csv")
        logger = configure(str(tb), ["tensorboard", "csv"])
    generator_step = None
    if cfg.generator.mode == "joint":
        from rlskip.agents.joint import GeneratorTuner

        tuner = GeneratorTuner(rt, ex.encoder, env.examples, cfg.generator.lr)

        def generator_step(indices, bits, token_keep):
            loss = tuner.step(indices, bits, token_keep)
            env.full_outputs = {}  # the full model changed: its cached outputs are stale
            return loss

    learner = make_learner(cfg, env, logger, policy_seed(cfg.seed, c), generator_step)
    if resuming:
        learner.load(cdir)
    else:
        record_text(logger, "config", OmegaConf.to_yaml(cfg, resolve=True))
    n = cfg.agent.policies
    best, stats = -float("inf"), {}
    bar = tqdm(
        total=cfg.agent.iterations, initial=learner.iteration, desc="policy" if n == 1 else f"policy {c + 1}/{n}",
        disable=not cfg.log.progress,
    )
    while learner.iteration < cfg.agent.iterations:
        it = learner.iteration + 1
        if it % cfg.log.latency_every == 0:
            method = planned(policy_plans(learner.policy, rt.space, 0.5))
            logger.record("cost/latency_ratio", latency_ratio(ex, latency_data, method, cfg.eval.latency_batch, repeats=1))
        final = it == cfg.agent.iterations
        stats = learner.train_iteration(log=final or it % cfg.log.every == 0, image=final or it % (cfg.log.every * 10) == 0)
        bar.update(1)
        bar.set_postfix(q=f"{stats['quality']:.3f}", q_full=f"{stats['quality_full']:.3f}", flops=f"{stats['cost']:.3f}")
        if it % cfg.log.checkpoint_every == 0 or final:
            if cfg.generator.mode == "joint":  # the checkpoint must point at the generator as tuned so far
                save_generator(rt.model, tokenizer, generator_dir)
                ref = backbone_reference(cfg, generator_dir, rt.model, rt)
            learner.save(cdir)
            save_checkpoint(cdir, learner.policy, rt.space, ref, it, extra=stats, name="last")
            if stats["reward"] > best:
                best = stats["reward"]
                save_checkpoint(cdir, learner.policy, rt.space, ref, it, extra=stats, name="best")
    bar.close()
    logger.close()
    if not stats:  # finished before this (resumed) process: the last checkpoint holds its final batch
        stats = {k: v for k, v in load_checkpoint(cdir, "last").extra.items() if k != "threshold"}
    return learner, ref, stats
