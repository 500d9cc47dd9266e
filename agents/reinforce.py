"""Native constrained policy gradient: REINFORCE with a learned value baseline and an entropy bonus.

Each iteration reads one batch of first-layer observations from the :class:`~rlskip.envs.SkipVecEnv`,
samples a plan per instance, executes them all in one batched runtime call, and takes one gradient step on

    loss = -mean(A * log pi(plan | obs)) - entropy_coef * mean(H) + value_coef * mean((V(obs) - r)^2)

with advantage ``A = r - V(obs)`` normalised over the batch. The normalisation matters: with a sparse
quality signal most plans in a batch score alike, and scaling the advantages to unit spread is what lets
the rare informative plan (an easy instance that stayed correct with more skipped) move the policy. Rewards come from the constraint handler the
learner owns (``lexicographic`` by default); after the step the handler sees the batch (dual ascent for
``lagrangian``). In ``joint`` generator mode the generator also takes one step of its task loss under the
sampled plans (its own optimiser), and the environment's cache of full-model outputs is refreshed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn

from rlskip.agents.tb import batch_stats, record_batch


class ValueHead(nn.Module):
    """V(obs) from the pooled first-layer state (and the budget, when the policy is budget-conditioned)."""

    def __init__(self, d_model: int, hidden: int = 64, budget_input: bool = False) -> None:
        super().__init__()
        self.budget_input = budget_input
        self.norm = nn.LayerNorm(d_model)
        self.net = nn.Sequential(nn.Linear(d_model + int(budget_input), hidden), nn.Tanh(), nn.Linear(hidden, 1))

    def forward(self, pooled: torch.Tensor, budget: torch.Tensor | None = None) -> torch.Tensor:
        x = self.norm(pooled)
        if self.budget_input:
            x = torch.cat([x, budget.view(-1, 1)], -1)
        return self.net(x).squeeze(-1)


def obs_to_torch(obs: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    t = {k: torch.as_tensor(v, dtype=torch.float32) for k, v in obs.items()}
    t["token_mask"] = t["token_mask"] > 0.5
    return t


@dataclass
class ReinforceConfig:
    lr: float = 3e-3
    entropy_coef: float = 0.01
    value_coef: float = 0.5
    max_grad_norm: float = 1.0


class Reinforce:
    """REINFORCE over a batched skip environment.

    Args:
        env: a SkipVecEnv (reset/step over ``env.num_envs`` instances, info dicts with quality and cost).
        policy: a :class:`~rlskip.agents.policy.SkipPolicy`.
        constraint: the constraint handler; it is attached to the environment, which reads it for rewards.
        logger: a Stable-Baselines3 logger (TensorBoard + CSV).
        config: learning rates and coefficients.
        generator_step: in joint mode, called as ``generator_step(indices, bits, token_keep)`` after each
            policy step to tune the generator under the sampled plans; returns its loss.
    """

    def __init__(self, env, policy, constraint, logger, config: ReinforceConfig, generator_step: Callable | None = None) -> None:
        self.env, self.policy, self.constraint, self.logger, self.cfg = env, policy, constraint, logger, config
        self.env.constraint = constraint
        self.value = ValueHead(policy.d_model, policy.init_kwargs["hidden"], policy.budget_input)
        self.optimizer = torch.optim.Adam(list(policy.parameters()) + list(self.value.parameters()), lr=config.lr)
        self.generator_step = generator_step
        self.iteration = 0
        self._obs = None

    def train_iteration(self, log: bool = False, image: bool = False) -> dict[str, float]:
        """One batch: sample plans, execute them, one gradient step. Returns the batch's scalars."""
        if self._obs is None:
            self._obs = self.env.reset()
        obs = obs_to_torch(self._obs)
        budget = obs.get("budget")
        budget = None if budget is None else budget.view(-1)
        bits, token_keep, logp, entropy = self.policy.sample(obs["pooled"], obs["tokens"], obs["token_mask"], budget)
        keep_tokens = torch.ones_like(obs["token_mask"]) if token_keep is None else token_keep
        action = torch.cat([bits, keep_tokens], 1).to(torch.int8).numpy()
        indices = self.env.current_indices() if self.generator_step is not None else None
        self._obs, rewards, _, infos = self.env.step(action)

        r = torch.as_tensor(rewards, dtype=torch.float32)
        v = self.value(obs["pooled"], budget)
        adv = r - v.detach()
        adv = (adv - adv.mean()) / (adv.std() + 1e-8) if len(adv) > 1 else adv
        pg_loss = -(adv * logp).mean()
        v_loss = ((v - r) ** 2).mean()
        loss = pg_loss - self.cfg.entropy_coef * entropy.mean() + self.cfg.value_coef * v_loss
        self.optimizer.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(list(self.policy.parameters()) + list(self.value.parameters()), self.cfg.max_grad_norm)
        self.optimizer.step()

        stats = batch_stats(infos)
        self.constraint.update(stats["quality"], stats["quality_full"], stats["cost"])
        gen_loss = None
        if self.generator_step is not None:
            gen_loss = self.generator_step(indices, bits, token_keep)
        self.iteration += 1
        if log:
            record_batch(self.logger, self.env.space, stats, self.constraint, image=image)
            self.logger.record("train/policy_loss", float(pg_loss.detach()))
            self.logger.record("train/value_loss", float(v_loss.detach()))
            self.logger.record("train/entropy", float(entropy.mean().detach()))
            if gen_loss is not None:
                self.logger.record("train/generator_loss", float(gen_loss))
            self.logger.dump(self.iteration)
        return {
            "reward": float(stats["reward"].mean()), "quality": float(stats["quality"].mean()),
            "quality_full": float(stats["quality_full"].mean()), "cost": float(stats["cost"].mean()),
        }

    # ---- resume ------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything needed to continue exactly: weights, optimiser, constraint, data and RNG streams."""
        return {
            "iteration": self.iteration,
            "policy": self.policy.state_dict(),
            "value": self.value.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "constraint": self.constraint.state_dict(),
            "env": self.env.get_state(),
            "torch_rng": torch.get_rng_state(),
            "obs": self._obs,
        }

    def load_state_dict(self, state: dict) -> None:
        self.iteration = state["iteration"]
        self.policy.load_state_dict(state["policy"])
        self.value.load_state_dict(state["value"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.constraint.load_state_dict(state["constraint"])
        self.env.set_state(state["env"])
        torch.set_rng_state(state["torch_rng"])
        self._obs = state["obs"]
