"""The batched core of the skip environments: data, observation, execution, scoring, caching, data order.

:class:`SkipRollout` holds everything :class:`~rlskip.envs.skip_env.SkipEnv` (a batch of one) and
:class:`~rlskip.envs.vec_env.SkipVecEnv` (a batch of n, one runtime call per step) share, and does its work on
*batches* of instances, so both compute the same thing the same way. Plans run through the one execution
path (:class:`rlskip.execute.Executor`).

Rewards come from a *constraint handler*: any object with ``reward(quality, quality_full, cost) -> reward``
over numpy arrays (``rlskip.constraints`` provides the lexicographic, Lagrangian, fixed-weight and budget
ones). The environment only reads it; a learner may swap it (``env.constraint = handler``) at any time, e.g.
to update a multiplier. The default is ``rlskip.constraints.Fixed(lam=0.5)``: ``reward = quality - 0.5 * cost``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from gymnasium import spaces

from rlskip.constraints import Fixed
from rlskip.envs.tasks.base import Example, Task
from rlskip.encoding import Encoder
from rlskip.execute import Executor
from rlskip.metrics import fidelity as fidelity_metric
from rlskip.metrics import get_metric
from rlskip.plan import Plan
from rlskip.prompts import PromptFormat
from rlskip.runtime import Observation, get_runtime
from rlskip.space import SkipSpace

logger = logging.getLogger(__name__)

Budget = float | tuple[float, float]


class ConstraintHandler(Protocol):
    """What the environment needs from a constraint handler (see ``rlskip.constraints``)."""

    def reward(self, quality: np.ndarray, quality_full: np.ndarray, cost: np.ndarray) -> np.ndarray:
        """Per-instance reward from quality, the full model's quality on the same instance, and cost."""

    @property
    def lam(self) -> float:
        """The current weight (or multiplier) of the cost term."""


def default_constraint() -> ConstraintHandler:
    """The handler an environment uses until a learner sets its own: ``reward = quality - 0.5 * cost``."""
    return Fixed(lam=0.5)


@dataclass(frozen=True)
class FullOutput:
    """The full (all-ones plan) model's output on one instance and its quality."""

    text: str | int
    quality: float
    margin: float = float("inf")  # the full model's decision margin on the instance (see SkipRollout.margin)


def check_budget(budget: Budget) -> Budget:
    """A budget (FLOPs ratio) or budget range, validated: a float, or a (low, high) tuple when they differ."""
    lo, hi = (budget, budget) if isinstance(budget, (int, float)) else tuple(budget)
    if not 0.0 < lo <= hi <= 1.0:
        raise ValueError(f"budget must be a FLOPs ratio in (0, 1] or a range (low, high) within it, got {budget}")
    return float(lo) if lo == hi else (float(lo), float(hi))


def check_constraint(handler: Any) -> Any:
    """``handler`` itself, once it is known to have a ``reward`` method (a clear error otherwise)."""
    if not callable(getattr(handler, "reward", None)):
        raise ValueError(
            f"a constraint handler needs a method reward(quality, quality_full, cost), got {type(handler).__name__}"
        )
    return handler


def new_seed() -> int:
    """A fresh random seed for a data order (used when the caller gives none)."""
    return int(np.random.SeedSequence().entropy)


class SkipRollout:
    """Batched core of the skip environments: data, runtime calls, scoring, caching and data order.

    Args: as :class:`SkipEnv` (everything but ``constraint`` and ``seed``, which the environments hold).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        task: Task,
        examples: Sequence[Example] | None,
        split: str | None,
        data_files: Any,
        limit: int | None,
        max_source_tokens: int | None,
        max_new_tokens: int | None,
        gen_kwargs: dict[str, Any] | None,
        budget: Budget,
        budget_in_obs: bool,
        fidelity: str | None,
        policy_flops: float,
        margin: float = 0.0,
        prompt: PromptFormat | None = None,
    ) -> None:
        self.runtime = runtime = get_runtime(model)
        self.space = runtime.space
        self.task = task
        self.is_classification = task.kind == "classification"
        positions = runtime.dims.max_positions
        max_source_tokens = positions if max_source_tokens is None else max_source_tokens
        if max_source_tokens is None or max_source_tokens < 1 or (positions is not None and max_source_tokens > positions):
            raise ValueError(f"max_source_tokens must be in 1..{positions} (the model's positions), got {max_source_tokens}")
        self.gen_kwargs = dict(gen_kwargs or {})
        if max_new_tokens is not None:
            if max_new_tokens < 1:
                raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
            if self.gen_kwargs.get("max_new_tokens", max_new_tokens) != max_new_tokens:
                raise ValueError(
                    f"max_new_tokens={max_new_tokens} contradicts gen_kwargs['max_new_tokens']="
                    f"{self.gen_kwargs['max_new_tokens']}; give it once"
                )
            self.gen_kwargs["max_new_tokens"] = int(max_new_tokens)
        if fidelity is not None:
            if fidelity.startswith("fidelity"):
                raise ValueError(f"fidelity takes a base metric such as 'rougeL', got {fidelity!r}")
            get_metric(fidelity)  # fail now, with the list of metrics, rather than at the first step
        if not (np.isfinite(margin) and margin >= 0.0):
            raise ValueError(f"margin must be a finite number >= 0, got {margin}")
        if margin > 0.0 and not self.is_classification and int(self.gen_kwargs.get("num_beams", 1)) != 1:
            raise ValueError(f"margin shaping reads greedy decoding's margins; it needs num_beams=1, got {self.gen_kwargs['num_beams']}")
        self.examples = list(examples) if examples is not None else task.load(split, data_files, limit)
        if not self.examples:
            raise ValueError(f"task {task.name!r} gave no examples; check split, data_files and limit")
        self.max_source_tokens = int(max_source_tokens)
        self.budget = check_budget(budget)
        self.budget_in_obs = bool(budget_in_obs)
        self.fidelity = fidelity
        self.policy_flops = float(policy_flops)
        self.margin = float(margin)
        # env.cost=time: the reward's cost is the plan's predicted time ratio (rlskip.cost), set by the trainer;
        # with cost_max too (env.cost=max), the larger of that and the FLOPs ratio
        self.time_model = None
        self.cost_max = False
        # Tokenise everything once: stepping must not re-tokenise, and truncation is counted (and logged)
        # once for the whole data set rather than per item.
        if prompt is None and runtime.kind == "causal":  # a decoder-only model reads the task as a prompt
            prompt = PromptFormat(task.prompt_template(chat=False))
        encoder = Encoder(
            tokenizer, self.max_source_tokens, task.pair_truncation, prompt=prompt, causal=runtime.kind == "causal"
        )
        self.executor = Executor(runtime, encoder, task.kind, self.gen_kwargs, label_words=task.label_words)
        self.source_ids, n_cut = encoder.inputs(self.examples)
        if n_cut:
            logger.warning(
                "%s: %d of %d sources were longer than max_source_tokens=%d and were truncated",
                task.name, n_cut, len(self.examples), self.max_source_tokens,
            )
        self.n_truncated = n_cut
        self.full_outputs: dict[int, FullOutput] = {}
        self._order_cache: tuple[tuple[int, int], np.ndarray] | None = None

        d = runtime.dims.d_model
        s = self.max_source_tokens
        obs_spaces = {
            "pooled": spaces.Box(-np.inf, np.inf, (d,), np.float32),
            "tokens": spaces.Box(-np.inf, np.inf, (s, d), np.float32),
            "token_mask": spaces.Box(0.0, 1.0, (s,), np.float32),
        }
        if self.budget_in_obs:
            obs_spaces["budget"] = spaces.Box(0.0, 1.0, (1,), np.float32)
        self.observation_space = spaces.Dict(obs_spaces)
        self.n_actions = self.space.n_bits + s
        self.action_space = spaces.MultiBinary(self.n_actions)

    # -- data order ---------------------------------------------------------------------------------
    def instance(self, seed: int, episode: int) -> int:
        """The instance of the ``episode``-th draw of the stream ``seed``.

        Draws go through the data in epochs, each a fresh permutation derived from ``(seed, epoch)``, so every
        instance is seen once per epoch and the order follows from the seed and the episode count alone.
        """
        n = len(self.examples)
        epoch, pos = divmod(episode, n)
        if self._order_cache is None or self._order_cache[0] != (seed, epoch):
            self._order_cache = ((seed, epoch), np.random.default_rng([seed, epoch]).permutation(n))
        return int(self._order_cache[1][pos])

    def draw_budget(self, seed: int, episode: int) -> float:
        """The budget of the ``episode``-th draw: the fixed budget, or uniform over the budget range."""
        if isinstance(self.budget, float):
            return self.budget
        # a separate stream (third word 1) so budgets do not shift the instance order
        return float(np.random.default_rng([seed, episode, 1]).uniform(*self.budget))

    def check_index(self, index: Any) -> int:
        """An instance index from ``options``, validated."""
        if not isinstance(index, (int, np.integer)) or not 0 <= index < len(self.examples):
            raise ValueError(f"options['index'] must be an instance index in 0..{len(self.examples) - 1}, got {index!r}")
        return int(index)

    def draw(self, seed: int, episodes: int, options: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], int]:
        """Fill one slot per entry of ``options``, drawing from the stream ``seed`` after ``episodes`` draws.

        A slot is ``{"index", "budget"}``; ``{"index": i}`` in a slot's options picks that instance without
        drawing, ``{"budget": b}`` overrides the drawn budget. Returns (slots, draws taken after these).
        """
        slots = []
        for opts in options:
            budget = self.draw_budget(seed, episodes)
            if "index" in opts:
                index = self.check_index(opts["index"])
            else:
                index, episodes = self.instance(seed, episodes), episodes + 1
            if "budget" in opts:
                budget = check_budget(float(opts["budget"]))
            slots.append({"index": index, "budget": budget})
        return slots, episodes

    def load(self, slots: Sequence[dict[str, Any]]) -> tuple[Observation, dict[str, np.ndarray]]:
        """Observe the slots' instances in one batched call: (runtime observation, observation arrays)."""
        obs = self.observe([slot["index"] for slot in slots])
        return obs, self.observation_arrays(obs, [slot["budget"] for slot in slots])

    # -- observing ----------------------------------------------------------------------------------
    def observe(self, indices: Sequence[int]) -> Observation:
        """One batched ``observe`` for the instances, right-padded to the longest of them."""
        return self.executor.observe([self.source_ids[i] for i in indices])

    def observation_arrays(self, obs: Observation, budgets: Sequence[float]) -> dict[str, np.ndarray]:
        """The batch's observations as arrays ``[n, ...]`` of the observation space's shapes.

        Padding positions are zeroed: their hidden states depend on the batch's width, and the policy must see
        the same numbers for an instance whatever it was batched with.
        """
        n, width, d = obs.hidden.shape
        mask = obs.attention_mask
        tokens = np.zeros((n, self.max_source_tokens, d), dtype=np.float32)
        tokens[:, :width] = (obs.hidden * mask.unsqueeze(-1)).float().cpu().numpy()
        token_mask = np.zeros((n, self.max_source_tokens), dtype=np.float32)
        token_mask[:, :width] = mask.cpu().numpy()
        out = {"pooled": obs.pooled().float().cpu().numpy(), "tokens": tokens, "token_mask": token_mask}
        if self.budget_in_obs:
            out["budget"] = np.asarray(budgets, dtype=np.float32).reshape(n, 1)
        return out

    # -- executing ----------------------------------------------------------------------------------
    def plan_from_actions(self, actions: np.ndarray, width: int) -> Plan:
        """Plans for a batch of actions ``[n, n_bits + max_source_tokens]`` over sources ``width`` wide.

        Token bits past ``width`` are padding for every row and are cut here; bits of positions past a row's
        own length are padding too, and the runtime removes those (and keeps special tokens) whatever they say.
        """
        if actions.ndim != 2 or actions.shape[1] != self.n_actions:
            raise ValueError(
                f"an action must have {self.n_actions} entries ({self.space.n_bits} sub-layer bits + "
                f"{self.max_source_tokens} token bits), got shape {list(actions.shape[1:])}"
            )
        if not np.isin(actions, (0, 1)).all():
            raise ValueError("actions must be 0 (skip) or 1 (keep)")
        bits = torch.as_tensor(actions[:, : self.space.n_bits] == 1)
        keep = torch.as_tensor(actions[:, self.space.n_bits : self.space.n_bits + width] == 1)
        return Plan(self.space, bits, keep)

    def _run(self, obs: Observation, plan: Plan) -> tuple[list[str | int], np.ndarray, np.ndarray, np.ndarray | None, np.ndarray]:
        """Execute plans: the outputs (texts, or class ids), the cost the reward sees (the FLOPs ratio; under
        :attr:`time_model` the predicted time ratio, or with :attr:`cost_max` the larger of the two), the FLOPs
        ratio, the predicted time ratio (None without a time model) and the decision margin of each row.

        The margin is the gap between the chosen and the runner-up score: of the class logits, or, for
        generation, the smallest over the greedy decoding steps (NaN under beam search), to 3 decimals.
        """
        out = self.executor.run(obs, plan, self.policy_flops, return_margins=True)
        margins = out.margins if out.margins is not None else torch.full((len(out.predictions),), float("nan"))
        flops_ratio = cost = out.flops_ratio.numpy()
        time_ratio = None
        if self.time_model is not None:
            beams = int(self.executor.gen_kwargs.get("num_beams", 1) or 1)
            time_ratio = self.time_model.ratio(
                self.runtime, plan.bits, obs.lengths, out.input_kept, out.steps, beams, self.policy_flops
            ).numpy()
            cost = np.maximum(time_ratio, flops_ratio) if self.cost_max else time_ratio
        # rounded: the rows a batch holds move the last float bits, and an instance's reward must not depend on them
        return out.predictions, cost, flops_ratio, time_ratio, np.round(margins.double().cpu().numpy(), 3)

    def shaped_quality(self, quality: np.ndarray, margins: np.ndarray, full_margins: np.ndarray) -> np.ndarray:
        """The quality the reward sees: ``quality`` itself, or with ``margin = m > 0`` scaled by
        ``min(1, g / min(m, g_full))``, where ``g`` is the output's decision margin and ``g_full`` the full
        model's on the same instance. An output decoded with less to spare than the full model had (up to ``m``)
        counts as partly lost, so a learner sees the near-failures of a plan before they fail."""
        if self.margin <= 0.0:
            return quality
        ref = np.minimum(self.margin, full_margins)
        factor = np.where(ref > 0.0, np.clip(margins / np.where(ref > 0.0, ref, 1.0), 0.0, 1.0), 1.0)
        return quality * factor

    def _quality(self, outputs: list, indices: Sequence[int], full: Sequence[str | int] | None = None) -> list[float]:
        if self.fidelity is not None:
            return fidelity_metric(outputs, list(full), base_metric=self.fidelity)
        return self.task.score(outputs, [self.examples[i] for i in indices])

    def step(
        self, obs: Observation, slots: Sequence[dict[str, Any]], actions: np.ndarray, constraint: ConstraintHandler
    ) -> tuple[np.ndarray, list[dict[str, Any]]]:
        """Execute one plan per slot (as :meth:`load` observed them) in one runtime call: ``(rewards [n], infos)``.

        Instances whose full-model output is not cached yet ride along in the same call as extra rows with the
        all-ones plan (no second decoding loop), and are cached by instance index.
        """
        indices = [slot["index"] for slot in slots]
        n = len(indices)
        plan = self.plan_from_actions(actions, obs.input_ids.shape[1])
        first_row: dict[int, int] = {}
        for row, i in enumerate(indices):
            if i not in self.full_outputs:
                first_row.setdefault(i, row)
        missing = list(first_row)
        if missing:
            extra = [first_row[i] for i in missing]
            run_obs = obs.rows(list(range(n)) + extra)
            ones = torch.ones(len(extra), plan.bits.shape[1], dtype=torch.bool)
            run_plan = Plan(
                self.space,
                torch.cat([plan.bits, ones]),
                torch.cat([plan.token_keep, torch.ones(len(extra), plan.token_keep.shape[1], dtype=torch.bool)]),
            )
        else:
            run_obs, run_plan = obs, plan
        outputs, cost, flops_ratio, time_ratio, margins = self._run(run_obs, run_plan)
        if missing:
            full_out = outputs[n:]
            quality = self._quality(full_out, missing, full_out)
            self.full_outputs.update(
                {i: FullOutput(o, float(q), float(g)) for i, o, q, g in zip(missing, full_out, quality, margins[n:])}
            )
        full = [self.full_outputs[i] for i in indices]
        outputs, cost, margins, flops_ratio = outputs[:n], cost[:n], margins[:n], flops_ratio[:n]
        time_ratio = None if time_ratio is None else time_ratio[:n]
        quality = np.asarray(self._quality(outputs, indices, [f.text for f in full]), dtype=np.float64)
        quality_full = np.asarray([f.quality for f in full], dtype=np.float64)
        shaped = self.shaped_quality(quality, margins, np.asarray([f.margin for f in full], dtype=np.float64))
        # a budget-conditioned handler rewards each instance at its own budget
        conditioned = {"budget": np.array([slot["budget"] for slot in slots])} if getattr(constraint, "budget_range", None) else {}
        reward = np.asarray(constraint.reward(shaped, quality_full, cost, **conditioned), dtype=np.float64)
        if reward.shape != (n,):
            raise ValueError(f"the constraint handler returned rewards of shape {reward.shape}, expected ({n},)")
        # what the runtime keeps: the real tokens the plan keeps, plus every special token
        kept = ((plan.token_keep & obs.attention_mask.cpu()) | obs.always_keep.cpu()).sum(1).tolist()
        bits = plan.bits.numpy().astype(np.int8)
        infos = [
            {
                "index": int(indices[r]),
                "quality": float(quality[r]),
                "quality_full": float(quality_full[r]),
                "cost": float(cost[r]),
                "flops_ratio": float(flops_ratio[r]),
                **({"time_ratio": float(time_ratio[r])} if time_ratio is not None else {}),
                "reward": float(reward[r]),
                "margin": float(margins[r]),
                "plan_bits": bits[r].copy(),
                "tokens_kept": int(kept[r]),
                "text": outputs[r],
                "text_full": full[r].text,
                "budget": slots[r]["budget"],
            }
            for r in range(n)
        ]
        return reward, infos

    def precompute_full(self, indices: Sequence[int] | None = None, batch_size: int = 16) -> None:
        """Compute and cache the full model's outputs for ``indices`` (all instances by default), in batches."""
        todo = [i for i in (range(len(self.examples)) if indices is None else indices) if i not in self.full_outputs]
        todo = list(dict.fromkeys(todo))
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            obs = self.observe(chunk)
            outputs, _, _, _, margins = self._run(obs, Plan(self.space, torch.ones(len(chunk), self.space.n_bits, dtype=torch.bool)))
            quality = self._quality(outputs, chunk, outputs)
            self.full_outputs.update(
                {i: FullOutput(o, float(q), float(g)) for i, o, q, g in zip(chunk, outputs, quality, margins)}
            )


class RolloutFront:
    """What :class:`~rlskip.envs.skip_env.SkipEnv` and :class:`~rlskip.envs.vec_env.SkipVecEnv` expose of their
    :class:`SkipRollout` and data stream, defined once for both."""

    rollout: SkipRollout

    def _start_stream(self, constraint: ConstraintHandler | None, seed: int | None) -> None:
        self.constraint = constraint if constraint is not None else default_constraint()
        self._seed = new_seed() if seed is None else int(seed)
        self._episodes = 0  # draws taken from the stream so far
        self._slots: list[dict[str, Any]] = []  # the instances drawn for the next step, {"index", "budget"} each
        self._obs: Observation | None = None
        self._arrays: dict[str, np.ndarray] = {}

    @property
    def constraint(self) -> ConstraintHandler:
        """The reward handler; assign to swap it (e.g. a learner updating its multiplier)."""
        return self._constraint

    @constraint.setter
    def constraint(self, handler: ConstraintHandler) -> None:
        self._constraint = check_constraint(handler)

    @property
    def full_outputs(self) -> dict[int, FullOutput]:
        """Cache of the full model's output and quality per instance index (shareable between environments
        over the same model and examples; clear it after changing the generator's weights)."""
        return self.rollout.full_outputs

    @full_outputs.setter
    def full_outputs(self, cache: dict[int, FullOutput]) -> None:
        self.rollout.full_outputs = cache

    @property
    def examples(self) -> list[Example]:
        return self.rollout.examples

    @property
    def space(self) -> SkipSpace:
        """The backbone's SkipSpace: the order of the sub-layer bits of an action."""
        return self.rollout.space

    def precompute_full(self, indices: Sequence[int] | None = None, batch_size: int = 16) -> None:
        """Fill :attr:`full_outputs` for ``indices`` (all instances by default) in batches of ``batch_size``."""
        self.rollout.precompute_full(indices, batch_size)

    def get_state(self) -> dict[str, Any]:
        """The data order's state, JSON-serialisable: ``{"seed", "episodes"`` (draws taken from the stream),
        ``"slots"`` (the instances drawn but not yet stepped, ``[{"index", "budget"}, ...]``, or ``[]``)``}``."""
        return {"seed": self._seed, "episodes": self._episodes, "slots": [dict(slot) for slot in self._slots]}

