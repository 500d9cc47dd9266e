"""Batched rollouts: n skip episodes stepped in one runtime call, as a Stable-Baselines3 ``VecEnv``.

Stepping n :class:`~rlskip.envs.skip_env.SkipEnv` one after another pays the per-call overhead (python,
the decoding loop, small matrix products) n times; here the n instances are observed in one batched
``observe`` and their n distinct plans executed in one ``generate`` (or ``classify``), the runtime running
each sub-layer only on the rows whose plan keeps it. Rewards and infos are those of ``SkipEnv`` on the same
instances and actions.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from stable_baselines3.common.vec_env import VecEnv
from stable_baselines3.common.vec_env.base_vec_env import VecEnvIndices, VecEnvObs, VecEnvStepReturn

from rlskip.envs.rollout import (
    Budget,
    ConstraintHandler,
    RolloutFront,
    SkipRollout,
    new_seed,
)
from rlskip.envs.tasks.base import Example, Task
from rlskip.prompts import PromptFormat


class SkipVecEnv(RolloutFront, VecEnv):
    """``num_envs`` one-step skip episodes per step, executed as one batch.

    Observation, action, reward and info are those of :class:`~rlskip.envs.skip_env.SkipEnv` (see there),
    stacked over the ``num_envs`` slots. Every episode lasts one step, so after each step every slot is done:
    as Stable-Baselines3 expects, ``infos[j]["terminal_observation"]`` holds the finished instance's
    observation, and the returned observations are those of n freshly drawn instances (observed in one
    batched call). The full model's outputs are cached per instance index; those still missing at a step
    are computed in the same runtime call.

    All slots draw from **one** data stream: step ``t``'s slot ``j`` holds episode ``t * num_envs + j`` of the
    stream ``seed`` (the order of ``SkipEnv`` with the same seed), so the order follows from the seed and the
    episode count. With ``group_size = k > 1`` each drawn instance fills ``k`` consecutive slots (slot ``j``
    holds episode ``t * num_envs / k + j // k``), so a learner can compare several plans for the same input
    (a per-instance baseline, as in :class:`~rlskip.agents.reinforce.Reinforce`). :meth:`get_state` /
    :meth:`set_state` save and restore the order, and the instances in the slots, for a learner that resumes.
    ``seed(s)`` restarts the stream with ``s`` at the next ``reset()``; ``set_options`` accepts, per slot,
    ``{"index": i}`` (that instance, not drawn) and ``{"budget": b}``, applied at the next ``reset()``.

    The slots are one batched environment, not n objects: ``get_attr`` returns the shared attribute once
    per requested slot, ``set_attr`` sets it for all slots (``set_attr("constraint", handler)`` or
    ``vec_env.constraint = handler`` swaps the reward handler), and ``env_method`` calls the method once
    and returns its result for each requested slot.

    Args:
        model, tokenizer, task, examples, split, data_files, limit, max_source_tokens, max_new_tokens,
        gen_kwargs, budget, budget_in_obs, fidelity, policy_flops, constraint, seed, margin, prompt: as for
            :class:`~rlskip.envs.skip_env.SkipEnv`.
        num_envs: number of parallel slots per step (the batch size of the runtime calls).
        group_size: slots per drawn instance (a divisor of ``num_envs``); a group's slots share the instance
            and the budget, and ``set_options`` applies to a group through its first slot.
        shard: ``(rank, world)`` of a data-parallel job: every step draws ``world * num_envs`` slots from the one
            stream and this environment keeps rank ``rank``'s share, dealt by source length (:meth:`_dealt`),
            so the ranks together step what one environment of ``world * num_envs`` slots would.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        task: Task,
        examples: Sequence[Example] | None = None,
        *,
        num_envs: int = 16,
        split: str | None = None,
        data_files: Any = None,
        limit: int | None = None,
        max_source_tokens: int | None = None,
        max_new_tokens: int | None = None,
        gen_kwargs: dict[str, Any] | None = None,
        budget: Budget = 1.0,
        budget_in_obs: bool = False,
        fidelity: str | None = None,
        policy_flops: float = 0.0,
        constraint: ConstraintHandler | None = None,
        seed: int | None = None,
        group_size: int = 1,
        shard: tuple[int, int] = (0, 1),
        margin: float = 0.0,
        prompt: PromptFormat | None = None,
    ) -> None:
        if num_envs < 1:
            raise ValueError(f"num_envs must be positive, got {num_envs}")
        if group_size < 1 or num_envs % group_size:
            raise ValueError(f"group_size must be a positive divisor of num_envs={num_envs}, got {group_size}")
        self.group_size = int(group_size)
        rank, world = shard
        if not 0 <= rank < world:
            raise ValueError(f"shard must be (rank, world) with 0 <= rank < world, got {shard}")
        self.shard = (int(rank), int(world))
        self.rollout = SkipRollout(
            model, tokenizer, task, examples, split, data_files, limit, max_source_tokens, max_new_tokens,
            gen_kwargs, budget, budget_in_obs, fidelity, policy_flops, margin, prompt,
        )
        self.render_mode = None  # read by VecEnv.__init__ through get_attr
        self._start_stream(constraint, seed)
        self._actions: np.ndarray | None = None
        super().__init__(num_envs, self.rollout.observation_space, self.rollout.action_space)

    def current_indices(self) -> list[int]:
        """The instance index in each slot (the instances the next step executes)."""
        return [slot["index"] for slot in self._slots]

    def set_state(self, state: dict[str, Any]) -> VecEnvObs | None:
        """Restore a :meth:`get_state` result: the held instances are observed again (one batched call), so
        ``step()`` may follow directly; ``reset()`` continues the stream. Returns their observations, or None."""
        slots = [dict(slot) for slot in state["slots"]]
        if slots and len(slots) != self.num_envs:
            raise ValueError(f"the state holds {len(slots)} slots but this SkipVecEnv has {self.num_envs}")
        self._seed, self._episodes = int(state["seed"]), int(state["episodes"])
        if not slots:
            self._slots, self._obs, self._arrays = [], None, {}
            return None
        return self._load(slots)

    def seed(self, seed: int | None = None) -> Sequence[int | None]:
        """Restart the (single, shared) data stream with ``seed`` at the next ``reset()``; None draws one."""
        seed = new_seed() if seed is None else int(seed)
        self._seeds = [seed] * self.num_envs
        return list(self._seeds)

    # -- episodes -----------------------------------------------------------------------------------
    def _draw(self, options: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        """Slots for the next step: one draw per group (its first slot's options), repeated over the group. A
        shard draws the whole data-parallel batch from the shared stream and keeps its own share (:meth:`_dealt`)."""
        k, (rank, world) = self.group_size, self.shard
        options = list(options)[::k]
        if world > 1:
            if any(options):
                raise ValueError("per-slot options (index, budget) are not supported in a sharded environment")
            options = options * world
        drawn, self._episodes = self.rollout.draw(self._seed, self._episodes, options)
        mine = self._dealt(drawn, rank, world) if world > 1 else range(len(drawn))
        # "row": the slot's place in the whole batch, as one process of world * num_envs slots would hold it
        return [dict(drawn[j], row=j * k + i) for j in mine for i in range(k)]

    def global_rows(self) -> list[int]:
        """Each slot's place in the whole data-parallel batch (``range(num_envs)`` in one process): a learner
        draws its sampling noise for the whole batch and takes these rows, so N ranks sample what one would."""
        rank = self.shard[0]
        return [int(slot.get("row", rank * self.num_envs + i)) for i, slot in enumerate(self._slots)]

    def _dealt(self, drawn: list[dict[str, Any]], rank: int, world: int) -> list[int]:
        """This rank's share of the data-parallel batch ``drawn``: the instances sorted by source length (longest
        first) and dealt out snake-wise (0, 1, ..., w-1, w-1, ..., 0, ...), in the stream's order. Every step
        waits for the slowest rank, and a rollout's time grows with its longest instance: dealt this way, each
        rank gets about the same mix of lengths instead of whatever a contiguous slice holds."""
        length = [len(self.rollout.source_ids[slot["index"]]) for slot in drawn]
        order = sorted(range(len(drawn)), key=lambda j: (-length[j], j))
        mine = [j for p, j in enumerate(order) if (p % world if (p // world) % 2 == 0 else world - 1 - p % world) == rank]
        return sorted(mine)

    def _load(self, slots: list[dict[str, Any]]) -> VecEnvObs:
        """Put instances in the slots and observe them in one batched call."""
        self._slots = slots
        self._obs, self._arrays = self.rollout.load(slots)
        self.reset_infos = [dict(slot) for slot in slots]
        return {k: v.copy() for k, v in self._arrays.items()}

    def observe_again(self) -> VecEnvObs:
        """Observe the held instances again (one batched call) after the generator changed (joint tuning), so the
        next step executes, and the policy reads, what the current generator computes; returns the observations."""
        if not self._slots:
            raise RuntimeError("call reset() before observe_again()")
        return self._load(self._slots)

    def reset(self) -> VecEnvObs:
        """Draw ``num_envs`` instances (applying pending ``seed`` and ``set_options``) and observe them."""
        if self._seeds[0] is not None:
            self._seed, self._episodes = int(self._seeds[0]), 0
        slots = self._draw(self._options)
        self._reset_seeds()
        self._reset_options()
        return self._load(slots)

    def step_async(self, actions: np.ndarray) -> None:
        self._actions = np.asarray(actions)

    def step_wait(self) -> VecEnvStepReturn:
        if self._actions is None:
            raise RuntimeError("call reset() before step(), and step_async() before step_wait()")
        actions, self._actions = self._actions, None
        rewards, infos = self.execute(actions)
        return self.advance(), rewards, np.ones(self.num_envs, dtype=bool), infos

    def execute(self, actions: np.ndarray) -> tuple[np.ndarray, list[dict[str, Any]]]:
        """The first half of a step: execute ``actions`` on the held instances (every episode is one step, so
        all of them end); returns the rewards and the infos. :meth:`advance` then draws and observes the next
        instances. A learner calls the two halves itself to do other work between them (a data-parallel
        learner's collective is in flight while the next batch is observed)."""
        if not self._slots:
            raise RuntimeError("call reset() before step()")
        if self._obs is None:
            raise RuntimeError("these instances were executed already: call advance() for the next ones")
        actions = np.asarray(actions)
        if actions.shape[:1] != (self.num_envs,):
            raise ValueError(f"expected one action per slot ({self.num_envs}), got actions of shape {list(actions.shape)}")
        rewards, infos = self.rollout.step(self._obs, self._slots, actions, self.constraint)
        finished = self._arrays
        for j, info in enumerate(infos):
            info["terminal_observation"] = {k: v[j].copy() for k, v in finished.items()}
            info["TimeLimit.truncated"] = False
        self._obs = None  # executed: the next step needs advance()
        return rewards.astype(np.float32), infos

    def advance(self) -> VecEnvObs:
        """The second half of a step: draw the next instances and observe them (what ``step`` returns)."""
        return self._load(self._draw([{}] * self.num_envs))

    def close(self) -> None:
        self._slots, self._obs, self._arrays = [], None, {}

    # -- VecEnv plumbing for a single batched environment -------------------------------------------
    def _slot_numbers(self, indices: VecEnvIndices) -> list[int]:
        slots = list(self._get_indices(indices))
        bad = [i for i in slots if not 0 <= i < self.num_envs]
        if bad:
            raise ValueError(f"slot indices {bad} out of range for {self.num_envs} environments")
        return slots

    def get_attr(self, attr_name: str, indices: VecEnvIndices = None) -> list[Any]:
        value = getattr(self, attr_name)
        return [value for _ in self._slot_numbers(indices)]

    def set_attr(self, attr_name: str, value: Any, indices: VecEnvIndices = None) -> None:
        if sorted(self._slot_numbers(indices)) != list(range(self.num_envs)):
            raise ValueError(f"attributes of a SkipVecEnv are shared by all slots; cannot set {attr_name!r} for some only")
        setattr(self, attr_name, value)

    def env_method(self, method_name: str, *method_args, indices: VecEnvIndices = None, **method_kwargs) -> list[Any]:
        slots = self._slot_numbers(indices)
        result = getattr(self, method_name)(*method_args, **method_kwargs)
        return [result for _ in slots]

    def env_is_wrapped(self, wrapper_class: type[gym.Wrapper], indices: VecEnvIndices = None) -> list[bool]:
        return [False for _ in self._slot_numbers(indices)]
