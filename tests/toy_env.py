"""A controlled toy skip environment with a known optimum, for testing learners fast.

Instances are "easy" (pooled[0] > pooled[1]: only candidate 0 is needed) or "hard" (candidates 0, 1 and 2 are
needed). Quality is 1 when every needed candidate is kept, else 0; the full model always scores 1; cost is
0.2 + 0.8 * (fraction of candidates kept). So the best lexicographic policy keeps exactly the needed
candidates, per instance.
"""

from __future__ import annotations

import numpy as np
from gymnasium import spaces
from stable_baselines3.common.vec_env import VecEnv

from rlskip.space import SkipSpace

D, S = 8, 4


def is_easy(pooled):
    """A difference of features, so the rule survives the policy's LayerNorm (a sign alone would not)."""
    return pooled[:, 0] > pooled[:, 1]


class ToyVecEnv(VecEnv):
    def __init__(self, num_envs: int = 32, seed: int = 0, constraint=None, group_size: int = 1) -> None:
        self.group_size = group_size  # as SkipVecEnv: each drawn instance fills group_size consecutive slots
        self.space = SkipSpace.encoder_decoder("bart", 2, 1)  # 5 bits
        obs_space = spaces.Dict({
            "pooled": spaces.Box(-np.inf, np.inf, (D,), np.float32),
            "tokens": spaces.Box(-np.inf, np.inf, (S, D), np.float32),
            "token_mask": spaces.Box(0, 1, (S,), np.float32),
        })
        super().__init__(num_envs, obs_space, spaces.MultiBinary(self.space.n_bits + S))
        self.constraint = constraint
        self.rng = np.random.default_rng(seed)
        self._obs = None
        self._actions = None

    def _draw(self):
        pooled = self.rng.normal(size=(self.num_envs // self.group_size, D)).astype(np.float32).repeat(self.group_size, 0)
        return {"pooled": pooled, "tokens": np.zeros((self.num_envs, S, D), np.float32), "token_mask": np.ones((self.num_envs, S), np.float32)}

    def reset(self):
        self._obs = self._draw()
        return self._obs

    def step_async(self, actions):
        self._actions = np.asarray(actions)

    def step_wait(self):
        bits = self._actions[:, : self.space.n_bits].astype(bool)
        easy = is_easy(self._obs["pooled"])
        needed_ok = np.where(easy, bits[:, 0], bits[:, :3].all(1))
        quality = needed_ok.astype(np.float64)
        quality_full = np.ones_like(quality)
        cost = 0.2 + 0.8 * bits.mean(1)
        rewards = self.constraint.reward(quality, quality_full, cost).astype(np.float32)
        infos = [
            {"quality": quality[i], "quality_full": 1.0, "cost": cost[i], "reward": float(rewards[i]), "plan_bits": bits[i].astype(np.int8),
             "tokens_kept": float(S), "index": i, "terminal_observation": {k: v[i] for k, v in self._obs.items()}}
            for i in range(self.num_envs)
        ]
        self._obs = self._draw()
        return self._obs, rewards, np.ones(self.num_envs, dtype=bool), infos

    def current_indices(self):
        return list(range(self.num_envs))

    def get_state(self):
        return {"rng": self.rng.bit_generator.state, "obs": self._obs}

    def set_state(self, state):
        self.rng.bit_generator.state = state["rng"]
        self._obs = state["obs"]

    def close(self):
        pass

    def get_attr(self, attr_name, indices=None):
        return [getattr(self, attr_name)] * self.num_envs

    def set_attr(self, attr_name, value, indices=None):
        setattr(self, attr_name, value)

    def env_method(self, method_name, *args, indices=None, **kwargs):
        return [getattr(self, method_name)(*args, **kwargs)] * self.num_envs

    def env_is_wrapped(self, wrapper_class, indices=None):
        return [False] * self.num_envs

    def seed(self, seed=None):
        self.rng = np.random.default_rng(seed)
        return [seed] * self.num_envs
