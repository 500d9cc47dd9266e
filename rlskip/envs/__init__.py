"""Gymnasium environments for the skip decision: one instance per episode, batched rollouts, task data.

- :class:`SkipEnv`: a ``gymnasium.Env``; one episode observes one instance and executes one plan.
- :class:`SkipVecEnv`: a Stable-Baselines3 ``VecEnv`` stepping n instances in one batched runtime call.
- :class:`ConstraintHandler`: what a reward handler (``rlskip.constraints``) must provide.
- :mod:`rlskip.envs.tasks`: the benchmarks (data and quality metrics).
"""

from rlskip.envs.rollout import ConstraintHandler, FullOutput
from rlskip.envs.skip_env import SkipEnv
from rlskip.envs.vec_env import SkipVecEnv

__all__ = ["ConstraintHandler", "FullOutput", "SkipEnv", "SkipVecEnv"]
