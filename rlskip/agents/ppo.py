"""Stable-Baselines3 PPO on the same SkipVecEnv, with rlskip's own policy as the actor.

:class:`SkipActorCritic` is an SB3 ``ActorCriticPolicy`` whose actor is a :class:`SkipPolicy` (the same
module the native learner trains) and whose critic is a small value head, so a PPO run produces the same
policy checkpoint as a native run and inference never needs SB3. SB3's own zip (``ppo.zip``) is kept too and
loads with ``PPO.load``. Episodes are one step long (one decision per instance), so ``gamma`` is irrelevant
and the advantage is the reward minus the value. ``agent.normalize_advantage`` is SB3's per-minibatch
advantage normalisation; the config leaves it off, for the reason given in :mod:`rlskip.agents.reinforce`.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from stable_baselines3 import PPO
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.distributions import BernoulliDistribution
from stable_baselines3.common.policies import ActorCriticPolicy

from rlskip.policy import SkipPolicy
from rlskip.agents.reinforce import ValueHead
from rlskip.agents.base import Learner, write_named
from rlskip.agents.tb import batch_stats, conditioned, record_batch

PAD_LOGIT = 30.0  # padding token positions: "keep" with probability ~1, so no log-prob and no entropy


class SkipActorCritic(ActorCriticPolicy):
    """SB3 actor-critic over the skip observation Dict, acting through a :class:`SkipPolicy`.

    Args:
        observation_space, action_space, lr_schedule: as for any SB3 policy.
        hidden: width of the policy and value MLPs.
        token_head: whether the policy decides token dropping (else every token is kept).
        budget_input: whether the observation carries a compute budget the policy conditions on.
        length_input: whether the policy also reads ``log(1 + source length)`` (see ``SkipPolicy``).
        token_features, bit_head, lead_prior: as for ``SkipPolicy``.
    """

    def __init__(
        self, observation_space, action_space, lr_schedule, hidden: int = 64, token_head: bool = False, budget_input: bool = False,
        length_input: bool = False, token_features: bool = False, bit_head: bool = True, lead_prior: float | None = None,
        **kwargs,
    ):
        self._skip_kwargs = dict(
            hidden=hidden, token_head=token_head, budget_input=budget_input, length_input=length_input,
            token_features=token_features, bit_head=bit_head, lead_prior=lead_prior,
        )
        super().__init__(observation_space, action_space, lr_schedule, **kwargs)

    def _build(self, lr_schedule) -> None:
        d_model = self.observation_space["pooled"].shape[0]
        n_tokens = self.observation_space["token_mask"].shape[0]
        n_bits = int(self.action_space.n) - n_tokens
        self.skip_policy = SkipPolicy(d_model, n_bits, **self._skip_kwargs)
        self.value_head = ValueHead(d_model, self._skip_kwargs["hidden"], self._skip_kwargs["budget_input"])
        self.optimizer = self.optimizer_class(self.parameters(), lr=lr_schedule(1), **self.optimizer_kwargs)

    def _budget(self, obs):
        return obs["budget"].view(-1) if "budget" in obs else None

    def _distribution(self, obs) -> BernoulliDistribution:
        mask = obs["token_mask"] > 0.5
        bit_logits, tok_logits = self.skip_policy(obs["pooled"], obs["tokens"], mask, self._budget(obs))
        if tok_logits is None:
            tok_logits = torch.full_like(obs["token_mask"], PAD_LOGIT)
        tok_logits = tok_logits.masked_fill(~mask, PAD_LOGIT)
        logits = torch.cat([bit_logits, tok_logits], 1)
        return BernoulliDistribution(logits.shape[1]).proba_distribution(action_logits=logits)

    def forward(self, obs, deterministic: bool = False):
        dist = self._distribution(obs)
        actions = dist.get_actions(deterministic=deterministic)
        return actions, self.value_head(obs["pooled"], self._budget(obs)).view(-1, 1), dist.log_prob(actions)

    def evaluate_actions(self, obs, actions):
        dist = self._distribution(obs)
        return self.value_head(obs["pooled"], self._budget(obs)).view(-1, 1), dist.log_prob(actions), dist.entropy()

    def get_distribution(self, obs):
        return self._distribution(obs)

    def predict_values(self, obs):
        return self.value_head(obs["pooled"], self._budget(obs)).view(-1, 1)

    def _predict(self, observation, deterministic: bool = False):
        return self._distribution(observation).get_actions(deterministic=deterministic)


class _RolloutStats(BaseCallback):
    """Collects the episodes of one rollout so the learner can log them and update the constraint."""

    def __init__(self) -> None:
        super().__init__()
        self.infos: list[dict] = []

    def _on_rollout_start(self) -> None:
        self.infos = []

    def _on_step(self) -> bool:
        self.infos.extend(self.locals["infos"])
        return True


class PPOLearner(Learner):
    """Drives SB3 PPO one rollout + update at a time, with the native learner's interface.

    Args:
        env: the SkipVecEnv.
        constraint: the constraint handler (attached to the environment).
        logger: the shared SB3 logger (TensorBoard + CSV).
        agent_cfg: the agent's config (:class:`rlskip.config.PPOConfig`).
        run_dir: the run directory.
        seed: PPO's seed.
        budget_input: whether observations carry a budget.
        generator: joint mode: a :class:`~rlskip.agents.joint.GeneratorTuner` stepped after each rollout.
        device: where SB3 keeps the policy.
    """

    def __init__(
        self, env, constraint, logger, agent_cfg, seed: int, budget_input: bool = False, generator=None, device="cpu"
    ) -> None:
        self.env, self.constraint, self.logger = env, constraint, logger
        env.constraint = constraint
        a = agent_cfg
        n = a.n_steps * env.num_envs
        self.model = PPO(
            SkipActorCritic, env, learning_rate=a.lr, n_steps=a.n_steps, batch_size=max(8, n // 4), n_epochs=a.n_epochs,
            gamma=0.0, gae_lambda=1.0, clip_range=a.clip_range, normalize_advantage=a.normalize_advantage, ent_coef=a.entropy_coef,
            vf_coef=a.value_coef, max_grad_norm=a.max_grad_norm, seed=seed,
            policy_kwargs=dict(
                hidden=a.hidden, token_head=a.token_head, budget_input=budget_input, length_input=a.length_input,
                token_features=a.token_features, bit_head=a.bit_head, lead_prior=a.token_lead_prior,
            ), verbose=0, device=device,
        )
        self.model.set_logger(logger)
        self.stats_cb = _RolloutStats()
        self.generator = generator
        self.iteration = 0

    @property
    def policy(self) -> SkipPolicy:
        return self.model.policy.skip_policy

    @property
    def instances_per_iteration(self) -> int:
        return self.model.n_steps * self.env.num_envs

    def train_iteration(self, log: bool = False, image: bool = False) -> dict[str, float]:
        """One PPO rollout (``n_steps`` batched env steps) and its update epochs."""
        self.model.learn(self.model.n_steps * self.env.num_envs, callback=self.stats_cb, reset_num_timesteps=False, log_interval=None)
        infos = self.stats_cb.infos
        stats = batch_stats(infos)
        self.constraint.update(stats["quality"], stats["quality_full"], stats["cost"], **conditioned(self.constraint, stats))
        if self.generator is not None:
            last = infos[-self.env.num_envs :]
            bits = torch.as_tensor(np.stack([i["plan_bits"] for i in last])).bool()
            self.logger.record("train/generator_loss", self.generator.step([i["index"] for i in last], bits, None))
            self.model._last_obs = self.env.observe_again()  # the next rollout starts from the tuned generator's view
        self.iteration += 1
        if log:
            record_batch(self.logger, self.env.space, stats, self.constraint, image=image)
            self.logger.dump(self.iteration)
        return {
            "reward": float(stats["reward"].mean()), "quality": float(stats["quality"].mean()),
            "quality_full": float(stats["quality_full"].mean()), "cost": float(stats["cost"].mean()), "flops_ratio": float(stats["flops"].mean()),
        }

    def save(self, folder: Path) -> dict[str, str]:
        """SB3's own zip (``ppo-<hash>.zip``, loadable with ``PPO.load``: weights and optimiser) beside the
        learner's state."""
        buf = io.BytesIO()
        self.model.save(buf)
        return {**super().save(folder), "ppo": write_named(Path(folder), "ppo", ".zip", buf.getvalue())}

    def load(self, folder: Path, files: dict[str, str]) -> None:
        self.model = PPO.load(Path(folder) / files["ppo"], env=self.env, device=self.model.device)
        self.model.set_logger(self.logger)
        super().load(folder, files)

    def state_dict(self) -> dict:
        """Iteration, constraint, data stream and RNG; the weights and optimiser live in ``ppo.zip``.

        Resuming PPO restores weights, optimiser, constraint and data order; the rollout's sampling RNG is
        restored too, but SB3 re-collects the first rollout after loading, so a resumed PPO curve is close
        to, not identical with, an uninterrupted one (the native learner resumes exactly).
        """
        return {
            "iteration": self.iteration, "constraint": self.constraint.state_dict(), "env": self.env.get_state(),
            "torch_rng": torch.get_rng_state(),
            "generator": None if self.generator is None else self.generator.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.iteration = state["iteration"]
        self.constraint.load_state_dict(state["constraint"])
        self.env.set_state(state["env"])
        torch.set_rng_state(state["torch_rng"])
        if self.generator is not None:
            self.generator.load_state_dict(state["generator"])
