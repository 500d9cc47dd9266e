"""The skip decision as a one-step episode: observe an instance, choose a plan, get quality and cost.

One episode is one instance. ``reset`` draws an instance, runs the backbone's fixed-on first layer
(:meth:`rlskip.runtime.Runtime.observe`) and returns what the policy reads; ``step`` executes the chosen plan
(generation, or classification for classification tasks), scores it with the task, and ends the episode. The
work itself is done by :class:`rlskip.envs.rollout.SkipRollout`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import gymnasium as gym
import numpy as np
import torch

from rlskip.envs.rollout import (
    Budget,
    ConstraintHandler,
    RolloutFront,
    SkipRollout,
)
from rlskip.envs.tasks.base import Example, Task
from rlskip.prompts import PromptFormat


class SkipEnv(RolloutFront, gym.Env):
    """One instance per episode: observe it, choose which sub-layers and tokens to keep, get quality and cost.

    **Observation** (a single-level ``Dict`` of float32 ``Box``es): ``pooled`` ``[d_model]``, the mean of the
    fixed-on first layer's output over real tokens; ``tokens`` ``[max_source_tokens, d_model]``, that output per
    position, zero on padding; ``token_mask`` ``[max_source_tokens]``, 1 on real tokens; and, when
    ``budget_in_obs``, ``budget`` ``[1]``, the compute budget (a FLOPs ratio) of this episode. Hidden states are
    unbounded in principle, so their boxes are (-inf, inf).

    **Action** ``MultiBinary(n_bits + max_source_tokens)``, 1 = keep: first one bit per *skippable* candidate in
    :attr:`rlskip.space.SkipSpace.names` order, then one bit per source position. The fixed-on candidates (the
    whole first layer, whose output is the observation) have no bit. Bits of padding positions
    (past the instance's length) are ignored, and special tokens (``<s>``, ``</s>``) are never dropped whatever
    their bit says -- the runtime enforces both.

    **Step** executes the plan (``generate`` with ``gen_kwargs``, or ``classify`` for classification tasks),
    scores it with the task (or, with ``fidelity``, against the full model's own output), and ends the
    episode: ``terminated=True``, ``truncated=False``, and the observation returned is the episode's own.
    ``reward = constraint.reward(quality, quality_full, cost)`` where ``cost`` is the FLOPs ratio to the full
    model on the same input and output lengths (plus ``policy_flops``), and ``quality`` is, with ``margin``,
    scaled for the reward by the decision margin kept. ``info`` holds ``quality`` (as scored, never scaled),
    ``quality_full``, ``cost``, ``reward``, ``margin`` (the output's decision margin), ``plan_bits`` (int8
    ``[n_bits]``), ``tokens_kept`` (source tokens left after dropping), ``text`` (generated text, or
    predicted class id), ``text_full`` (the full model's), and the episode's ``index`` and ``budget``. The full model's output and quality are computed once per
    instance and cached in :attr:`full_outputs` (keyed by instance index); clear it after changing the
    generator's weights.

    **Data order**: episode ``k`` of the stream ``seed`` is instance ``perm(seed, k // N)[k % N]`` (a fresh
    permutation of the ``N`` instances per epoch), so the order follows from the seed and the episode count;
    :meth:`get_state` / :meth:`set_state` save and restore them (and the instance drawn but not yet stepped).
    ``reset(seed=s)`` restarts the stream ``s``.

    Rollouts run under ``torch.inference_mode()`` with the model in whatever mode it is in: put it in
    ``eval()`` for deterministic episodes.

    Args:
        model: a Hugging Face model a registered runtime accepts (:func:`rlskip.runtime.get_runtime`): a
            generator for generation tasks, a sequence classifier for classification tasks. Used in place,
            never copied.
        tokenizer: the model's tokenizer.
        task: the task (from :func:`rlskip.envs.tasks.get_task`): its kind picks generate or classify, its
            ``score`` gives quality, its ``pair_truncation`` how pairs are cut.
        examples: the instances; when None they are loaded with ``task.load(split, data_files, limit)``.
        split: split to load when ``examples`` is None (the task's default when None).
        data_files: local file(s) to load when ``examples`` is None (the hub when None).
        limit: at most this many examples to load when ``examples`` is None.
        max_source_tokens: encoder budget per instance (special tokens included); longer sources are
            truncated (counted, and logged once per environment); also the width of ``tokens``. None: the
            model's longest input (``runtime.dims.max_positions``).
        max_new_tokens: generation length limit (ignored for classification); None leaves it to ``gen_kwargs``
            or, failing that, the model's generation config.
        gen_kwargs: further Hugging Face generation options (``num_beams``, ``length_penalty``, ...) for the
            runtime's ``generate``; ignored for classification.
        budget: the compute budget of every episode (a FLOPs ratio in (0, 1]), or a range ``(low, high)`` to
            draw each episode's budget from uniformly (seeded like the data order). Reported in ``info`` and
            reset info; in the observation only with ``budget_in_obs``. ``options={"budget": b}`` overrides it.
        budget_in_obs: whether the observation carries the budget.
        fidelity: None to score against the task's references; a metric name (e.g. ``"rougeL"``,
            ``"accuracy"``) to score each output against the full model's own output on the same instance.
        policy_flops: FLOPs the policy spends per instance, added to the executed FLOPs (see
            :func:`rlskip.flops.mlp_flops`); 0 leaves the policy out of the cost.
        constraint: the reward handler (see :class:`ConstraintHandler`); default ``rlskip.constraints.Fixed(0.5)``.
        seed: seed of the data order; None draws a random one. ``reset(seed=...)`` replaces it.
        margin: 0 to reward the quality as scored; ``m > 0`` to scale an output's quality, for the reward
            only, by how much of the full model's decision margin it kept, up to ``m``
            (:meth:`SkipRollout.shaped_quality`); needs greedy decoding for generation tasks.
        prompt: the instruction template around each input (:class:`rlskip.prompts.PromptFormat`); a
            decoder-only backbone gets the task's plain-text one by default. For classification with an LM
            head, the task's label words are scored.
    """

    metadata = {"render_modes": []}

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        task: Task,
        examples: Sequence[Example] | None = None,
        *,
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
        margin: float = 0.0,
        prompt: PromptFormat | None = None,
    ) -> None:
        self.rollout = SkipRollout(
            model, tokenizer, task, examples, split, data_files, limit, max_source_tokens, max_new_tokens,
            gen_kwargs, budget, budget_in_obs, fidelity, policy_flops, margin, prompt,
        )
        self.observation_space = self.rollout.observation_space
        self.action_space = self.rollout.action_space
        self.render_mode = None
        self._start_stream(constraint, seed)

    def set_state(self, state: dict[str, Any]) -> dict[str, np.ndarray] | None:
        """Restore a :meth:`get_state` result: the held instance is observed again, so ``step()`` may follow
        directly; ``reset()`` continues the stream. Returns the held instance's observation, or None."""
        self._seed, self._episodes = int(state["seed"]), int(state["episodes"])
        self._slots = [dict(slot) for slot in state["slots"]]
        if not self._slots:
            self._obs, self._arrays = None, {}
            return None
        self._obs, arrays = self.rollout.load(self._slots)
        self._arrays = {k: v[0] for k, v in arrays.items()}
        return {k: v.copy() for k, v in self._arrays.items()}

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Draw an instance and observe it.

        Args:
            seed: restart the data order with this seed (and seed ``np_random``).
            options: ``{"index": i}`` picks instance ``i`` instead of drawing one (the stream does not
                advance); ``{"budget": b}`` sets this episode's budget.

        Returns:
            (observation, info with ``index`` and ``budget``).
        """
        super().reset(seed=seed)
        if seed is not None:
            self._seed, self._episodes = int(seed), 0
        self._slots, self._episodes = self.rollout.draw(self._seed, self._episodes, [options or {}])
        self._obs, arrays = self.rollout.load(self._slots)
        self._arrays = {k: v[0] for k, v in arrays.items()}
        return {k: v.copy() for k, v in self._arrays.items()}, dict(self._slots[0])

    def step(self, action: np.ndarray) -> tuple[dict[str, np.ndarray], float, bool, bool, dict[str, Any]]:
        """Execute the plan ``action`` on the current instance; the episode ends (see the class docstring)."""
        if not self._slots or self._obs is None:
            raise RuntimeError("call reset() before step(): each episode is one instance and one step")
        action = np.asarray(action)
        if action.ndim != 1:
            raise ValueError(f"SkipEnv takes one action of shape ({self.rollout.n_actions},), got {list(action.shape)}")
        reward, infos = self.rollout.step(self._obs, self._slots, action[None], self.constraint)
        self._slots = []
        return {k: v.copy() for k, v in self._arrays.items()}, float(reward[0]), True, False, infos[0]
