"""Native constrained policy gradient: REINFORCE with a variance-reducing baseline and an entropy bonus.

Each iteration reads one batch of first-layer observations from the :class:`~rlskip.envs.SkipVecEnv`,
samples a plan per slot, executes them all in one batched runtime call, and takes one gradient step on

    loss = -mean(A * log pi(plan | obs)) - entropy_coef * mean(H) [+ value_coef * mean((V(obs) - r)^2)]

The baseline in the advantage ``A = r - b`` is, by the environment's ``group_size``:

- ``group_size = 1``: a learned value ``b = V(obs)`` (trained by the bracketed term);
- ``group_size = k > 1``: the environment puts each instance in ``k`` slots, and ``b`` is the mean reward of
  the *other* ``k - 1`` plans sampled for the same instance (the leave-one-out baseline, RLOO). It is
  unbiased, needs no value network, and removes the instance's difficulty from the advantage exactly, at
  the price of ``k`` times fewer distinct instances per batch; when all ``k`` plans agree it gives no signal,
  so it relies on the entropy bonus to keep exploring;
- ``self_critical`` with ``group_size = k > 1``: the first slot of each group plays the deterministic plan
  that deployment uses (``policy.decide``, keep where the probability is at least 0.5), and ``b`` is its
  reward for the other ``k - 1`` sampled plans (self-critical sequence training); the greedy slots take no
  gradient and are logged as ``quality/greedy`` and ``cost/greedy_flops_ratio``.

``lr_decay = f`` holds the learning rate for the first ``1 - f`` of ``iterations`` and then lowers it
linearly to 0, so the last iterate is not caught mid-swing.

With ``normalize_advantage`` the advantages are then scaled to unit spread over the batch. That helps a
sparse signal on its own (the rare informative plan moves the policy as much as any), but it rescales each
batch by its own spread: a batch without a violation has its small cost differences blown up to the size
that a violation gets in another batch, which undoes the exchange rate the constraint's reward sets (the
lexicographic ``penalty``); the configs leave it off. How these options compared on the embedded default is
in docs/experiments.md.

Rewards come from the constraint handler the learner owns; after the step the handler sees the batch (dual
ascent for ``lagrangian``). In ``joint`` generator mode the generator also takes one step of its task loss
under the sampled plans (its own optimiser), and the environment's cache of full-model outputs is refreshed.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from rlskip.agents.base import Learner
from rlskip.agents.tb import batch_stats, conditioned, record_batch
from rlskip.distributed import Dist, average_gradients_and_gather_rows


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


def obs_to_torch(obs: dict[str, np.ndarray], device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    t = {k: torch.as_tensor(v, dtype=torch.float32, device=device) for k, v in obs.items()}
    t["token_mask"] = t["token_mask"] > 0.5
    return t


def leave_one_out_mean(r: torch.Tensor, k: int) -> torch.Tensor:
    """For rewards in consecutive groups of ``k`` (``k >= 2``), each one's mean over the rest of its group."""
    g = r.view(-1, k)
    return ((g.sum(1, keepdim=True) - g) / (k - 1)).reshape(-1)


def group_first(r: torch.Tensor, k: int) -> torch.Tensor:
    """For rewards in consecutive groups of ``k``, each one's group's first reward (the self-critical baseline)."""
    return r.view(-1, k)[:, :1].expand(-1, k).reshape(-1)


class Reinforce(Learner):
    """REINFORCE over a batched skip environment.

    Args:
        env: a SkipVecEnv (reset/step over ``env.num_envs`` instances, info dicts with quality and cost).
        policy: a :class:`~rlskip.policy.SkipPolicy`.
        constraint: the constraint handler; it is attached to the environment, which reads it for rewards.
        logger: a Stable-Baselines3 logger (TensorBoard + CSV).
        config: the agent's config (:class:`rlskip.config.ReinforceConfig`: learning rate, coefficients,
            ``normalize_advantage``, ``self_critical``, ``iterations`` and ``lr_decay``).
        generator: in joint mode, a :class:`~rlskip.agents.joint.GeneratorTuner` stepped after each
            policy step to tune the generator under the sampled plans; returns its loss.
        seed: seeds the sampling (with the iteration: see :meth:`_noise`).
        dist: this process's place in a data-parallel job (default: one process, on the policy's device).
    """

    def __init__(self, env, policy, constraint, logger, config, generator=None, seed: int = 0, dist: Dist | None = None) -> None:
        self.env, self._policy, self.constraint, self.logger, self.cfg = env, policy, constraint, logger, config
        self.seed, self.dist = int(seed), dist or Dist(device=next(policy.parameters()).device)
        self.env.constraint = constraint
        self.group_size = int(getattr(env, "group_size", 1))
        if config.self_critical and self.group_size < 2:
            raise ValueError("self-critical training needs an environment with group_size >= 2 (the greedy plan takes one slot of each group)")
        # a learned baseline only without groups; with them, the other plans for the same instance are it
        self.value = None
        if self.group_size == 1:
            self.value = ValueHead(policy.d_model, policy.init_kwargs["hidden"], policy.budget_input).to(self.dist.device)
        self._params = list(policy.parameters()) + (list(self.value.parameters()) if self.value is not None else [])
        self.optimizer = torch.optim.Adam(self._params, lr=config.lr)
        self.generator = generator
        self.iteration = 0
        self._obs = None

    @property
    def policy(self):
        return self._policy

    def _noise(self, rows: int, width: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """This iteration's sampling uniforms for this rank's rows: drawn for the whole (global) batch from a
        generator seeded by the learner's seed and the iteration, and taken at this rank's rows of it
        (``SkipVecEnv.global_rows``), so N processes sample what one would, and a resumed run what an
        uninterrupted one does."""
        d = self.dist
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.iteration)
        at = torch.tensor(self.env.global_rows()) if hasattr(self.env, "global_rows") else torch.arange(rows) + d.rank * rows
        bits = torch.rand(rows * d.world, self.policy.n_bits, generator=g)[at]
        tokens = torch.rand(rows * d.world, width, generator=g)[at] if self.policy.token_head else None
        return bits, tokens

    def train_iteration(self, log: bool = False, image: bool = False) -> dict[str, float]:
        """One batch: sample plans, execute them, one gradient step (averaged over the ranks of a data-parallel
        job). Returns the (whole) batch's scalars."""
        if self._obs is None:
            self._obs = self.env.reset()
        obs = obs_to_torch(self._obs, self.dist.device)
        n = len(obs["pooled"])
        budget = obs.get("budget")
        budget = None if budget is None else budget.view(-1)
        bits, token_keep, logp, entropy = self.policy.sample(
            obs["pooled"], obs["tokens"], obs["token_mask"], budget, noise=self._noise(n, obs["tokens"].shape[1])
        )
        greedy = None
        if self.cfg.self_critical:
            # the first slot of each group plays the deterministic plan deployment uses: the baseline of the rest
            greedy = torch.arange(n, device=bits.device) % self.group_size == 0
            with torch.no_grad():
                g_bits, g_tokens = self.policy.decide(obs["pooled"], obs["tokens"], obs["token_mask"], budget)
            bits = torch.where(greedy[:, None], g_bits, bits)
            if token_keep is not None:
                token_keep = torch.where(greedy[:, None], g_tokens, token_keep)
        keep_tokens = torch.ones_like(obs["token_mask"]) if token_keep is None else token_keep
        action = torch.cat([bits, keep_tokens], 1).to(torch.int8).cpu().numpy()
        indices = self.env.current_indices() if self.generator is not None else None
        split = hasattr(self.env, "execute")  # SkipVecEnv: observe the next batch while the collective runs
        if split:
            rewards, infos = self.env.execute(action)
        else:
            self._obs, rewards, _, infos = self.env.step(action)

        r = torch.as_tensor(rewards, dtype=torch.float32, device=logp.device)
        v_loss = torch.zeros((), device=logp.device)
        if self.value is not None:
            v = self.value(obs["pooled"], budget)
            adv = r - v.detach()
            v_loss = ((v - r) ** 2).mean()
        elif greedy is not None:
            adv = r - group_first(r, self.group_size)
        else:
            adv = r - leave_one_out_mean(r, self.group_size)
        sampled = slice(None) if greedy is None else ~greedy
        adv, logp_s = adv[sampled], logp[sampled]
        if self.cfg.normalize_advantage and len(adv) > 1:
            adv = (adv - adv.mean()) / (adv.std() + 1e-8)
        pg_loss = -(adv * logp_s).mean()
        for group in self.optimizer.param_groups:
            group["lr"] = self.learning_rate(self.iteration)
        loss = pg_loss - self.cfg.entropy_coef * entropy.mean() + self.cfg.value_coef * v_loss
        self.optimizer.zero_grad()
        loss.backward()
        rows = batch_stats(infos)
        if greedy is not None:
            rows["greedy"] = greedy.cpu().numpy()
        # one collective: the gradients averaged over the ranks, and the whole batch's rows in rank order; the
        # next batch is drawn and observed while it runs (after the generator's update, in joint mode)
        reduced = average_gradients_and_gather_rows(self._params, rows, self.dist)
        if split and self.generator is None:
            self._obs = self.env.advance()
        stats = reduced()
        nn.utils.clip_grad_norm_(self._params, self.cfg.max_grad_norm)
        self.optimizer.step()
        self.constraint.update(stats["quality"], stats["quality_full"], stats["cost"], **conditioned(self.constraint, stats))
        gen_loss = None
        if self.generator is not None:
            gen_loss = self.generator.step(indices, bits.cpu(), None if token_keep is None else token_keep.cpu())
            # the next batch, as the tuned generator sees it
            self._obs = self.env.advance() if split else self.env.observe_again()
        self.iteration += 1
        if log:
            record_batch(self.logger, self.env.space, stats, self.constraint, image=image)
            if greedy is not None:
                g = stats["greedy"].astype(bool)
                self.logger.record("quality/greedy", float(stats["quality"][g].mean()))
                self.logger.record("cost/greedy_flops_ratio", float(stats["flops"][g].mean()))
            self.logger.record("train/policy_loss", float(pg_loss.detach()))
            if self.value is not None:
                self.logger.record("train/value_loss", float(v_loss.detach()))
            self.logger.record("train/entropy", float(entropy.mean().detach()))
            if gen_loss is not None:
                self.logger.record("train/generator_loss", float(gen_loss))
            self.logger.dump(self.iteration)
        return {
            "reward": float(stats["reward"].mean()), "quality": float(stats["quality"].mean()),
            "quality_full": float(stats["quality_full"].mean()), "cost": float(stats["cost"].mean()), "flops_ratio": float(stats["flops"].mean()),
        }

    def learning_rate(self, iteration: int) -> float:
        """The step size of iteration ``iteration`` (0-based): constant, then linearly to 0 over the last ``lr_decay``."""
        c = self.cfg
        if c.lr_decay <= 0.0 or c.iterations <= 0:
            return c.lr
        start = c.iterations * (1.0 - c.lr_decay)
        return c.lr * min(1.0, max(0.0, (c.iterations - iteration) / (c.iterations - start)))

    # ---- resume ------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything needed to continue exactly: weights, optimiser, constraint, data and RNG streams."""
        return {
            "iteration": self.iteration,
            "policy": self.policy.state_dict(),
            "value": self.value.state_dict() if self.value is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "constraint": self.constraint.state_dict(),
            "env": self.env.get_state(),
            "torch_rng": torch.get_rng_state(),
            "obs": self._obs,
            "generator": None if self.generator is None else self.generator.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.iteration = state["iteration"]
        self.policy.load_state_dict(state["policy"])
        if (self.value is None) != (state["value"] is None):
            raise ValueError("the saved learner state and this learner disagree on the baseline (agent.group_size)")
        if self.value is not None:
            self.value.load_state_dict(state["value"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.constraint.load_state_dict(state["constraint"])
        self.env.set_state(state["env"])
        torch.set_rng_state(state["torch_rng"])
        self._obs = state["obs"]
        if self.generator is not None:
            self.generator.load_state_dict(state["generator"])
