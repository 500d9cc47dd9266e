"""Constraint handlers: turn (quality, full-model quality, cost) into a scalar reward per instance.

The task is "spend as little compute as possible without losing more than ``max_quality_drop`` of quality"
(or, in the budget form, "lose as little quality as possible within a compute budget"). A handler encodes
one way of optimising that constrained problem with a plain policy-gradient learner.

The environment only *reads* a handler (:meth:`Constraint.reward`, :meth:`Constraint.satisfied`); the learner
owns it and calls :meth:`Constraint.update` after every batch, so a handler with state (the Lagrange
multiplier) changes only between batches and every instance of one batch is scored by the same rule.

Inputs, all broadcastable numpy arrays (or scalars):

- ``quality`` q in [0, 1]: the score of the output produced under the plan;
- ``quality_full`` in [0, 1]: the score the full model gets on the same instance;
- ``cost`` c >= 0: the FLOPs ratio of the plan (policy included) to the full model, so about 1 when
  nothing is skipped.

``drop = quality_full - quality`` is the quality lost to skipping (negative when skipping happens to help).
Handlers are registered by name; :func:`make_constraint` builds one from a config.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from typing import Callable

import numpy as np
from numpy.typing import ArrayLike

from rlskip.config import FixedConfig, LagrangianConfig, LexicographicConfig

# constructor defaults are the config schemas' (one place)
_LEX, _LAG, _FIX = LexicographicConfig(), LagrangianConfig(), FixedConfig()

# name -> handler class
CONSTRAINTS: dict[str, type["Constraint"]] = {}


def register_constraint(name: str) -> Callable[[type["Constraint"]], type["Constraint"]]:
    """Class decorator registering a constraint handler under ``name``."""

    def deco(cls: type["Constraint"]) -> type["Constraint"]:
        cls.name = name
        CONSTRAINTS[name] = cls
        return cls

    return deco


def from_config(cfg) -> "Constraint":
    """The handler a ``constraint`` config node (one of :data:`rlskip.config.CONSTRAINTS`) describes."""
    return make_constraint(cfg.name, **{k: v for k, v in cfg.items() if k != "name"})


def make_constraint(name: str, **kwargs) -> "Constraint":
    """Build the handler registered as ``name``.

    Args:
        name: one of :data:`CONSTRAINTS` (``"lexicographic"``, ``"lagrangian"``, ``"fixed"``, ``"budget"``).
        **kwargs: the handler's constructor arguments.

    Raises:
        ValueError: unknown name, or an argument the handler does not take or needs and did not get.
    """
    if name not in CONSTRAINTS:
        raise ValueError(f"unknown constraint {name!r}; expected one of {sorted(CONSTRAINTS)}")
    cls = CONSTRAINTS[name]
    params = inspect.signature(cls.__init__).parameters
    accepted = [p for p in params if p != "self"]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ValueError(f"constraint {name!r} got unexpected argument(s) {unknown}; it accepts {accepted}")
    missing = [p for p in accepted if params[p].default is inspect.Parameter.empty and p not in kwargs]
    if missing:
        raise ValueError(f"constraint {name!r} needs argument(s) {missing}")
    return cls(**kwargs)


def _arrays(quality: ArrayLike, quality_full: ArrayLike, cost: ArrayLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validate and broadcast the three inputs to float64 arrays of one shape.

    Rejected rather than clipped: a NaN or an out-of-range score is a bug upstream (a metric or FLOPs
    counter), and a reward computed from it would silently poison training.
    """
    try:
        q, qf, c = np.broadcast_arrays(*(np.asarray(x, dtype=np.float64) for x in (quality, quality_full, cost)))
    except ValueError:
        shapes = [np.shape(x) for x in (quality, quality_full, cost)]
        raise ValueError(f"quality, quality_full and cost must have broadcastable shapes, got {shapes}") from None
    for label, x in (("quality", q), ("quality_full", qf), ("cost", c)):
        if not np.isfinite(x).all():
            raise ValueError(f"{label} contains NaN or inf: {x[~np.isfinite(x)][:3].tolist()}")
    for label, x in (("quality", q), ("quality_full", qf)):
        if x.size and (x.min() < 0.0 or x.max() > 1.0):
            raise ValueError(f"{label} must lie in [0, 1], got values in [{x.min():.4g}, {x.max():.4g}]")
    if c.size and c.min() < 0.0:
        raise ValueError(f"cost (a FLOPs ratio) must be >= 0, got {c.min():.4g}")
    return q, qf, c


def _check_number(label: str, value: float, allow_zero: bool) -> float:
    """``value`` as a float if finite and > 0 (>= 0 with ``allow_zero``), else a one-line ValueError."""
    if not (np.isfinite(value) and (value >= 0.0 if allow_zero else value > 0.0)):
        raise ValueError(f"{label} must be a finite number {'>=' if allow_zero else '>'} 0, got {value}")
    return float(value)


def _check_drop(max_quality_drop: float) -> float:
    eps = float(max_quality_drop)
    if not 0.0 <= eps <= 1.0:
        raise ValueError(f"max_quality_drop must lie in [0, 1], got {max_quality_drop}")
    return eps


def _within_drop(quality: ArrayLike, quality_full: ArrayLike, cost: ArrayLike, max_quality_drop: float) -> np.ndarray:
    """The quality constraint shared by the quality-first handlers: ``quality_full - quality <= max_quality_drop``."""
    q, qf, _ = _arrays(quality, quality_full, cost)
    return qf - q <= max_quality_drop


class Constraint(ABC):
    """A constraint handler: reward, feasibility test, logged multiplier, optional per-batch update."""

    name: str

    @abstractmethod
    def reward(self, quality: ArrayLike, quality_full: ArrayLike, cost: ArrayLike) -> np.ndarray:
        """Per-instance reward (float64 array of the broadcast shape); higher is better.

        Args:
            quality: score under the plan, in [0, 1].
            quality_full: score of the full model on the same instance, in [0, 1].
            cost: FLOPs ratio of the plan to the full model, >= 0.
        """

    @abstractmethod
    def satisfied(self, quality: ArrayLike, quality_full: ArrayLike, cost: ArrayLike) -> np.ndarray:
        """Per-instance bool array: does the outcome meet the constraint? Arguments as in :meth:`reward`."""

    @property
    @abstractmethod
    def lam(self) -> float:
        """A scalar logged as ``constraint/lambda``; each handler documents what it means."""

    def update(self, quality: ArrayLike, quality_full: ArrayLike, cost: ArrayLike) -> None:
        """Learn from one batch of outcomes (called by the learner after each batch). Arguments as in :meth:`reward`."""

    def state_dict(self) -> dict:
        """JSON-serialisable state to resume from (the handler's arguments come from the run's config)."""
        return {"name": self.name}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` output.

        Args:
            state: a dict saved by the same kind of handler.

        Raises:
            ValueError: the state belongs to another handler or lacks a field.
        """
        if not isinstance(state, dict) or state.get("name") != self.name:
            got = state.get("name") if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"cannot load the state of constraint {got!r} into a {self.name!r} constraint")
        self._load(state)

    def _load(self, state: dict) -> None:
        """Restore handler-specific fields (the name is already checked)."""


class _TracksViolation(Constraint):
    """Base for handlers whose ``lam`` is the fraction of the last batch that violated the constraint."""

    def __init__(self) -> None:
        self._violating = 0.0

    @property
    def lam(self) -> float:
        """Fraction of the last batch given to :meth:`update` that violated the constraint (0 before any)."""
        return self._violating

    def update(self, quality: ArrayLike, quality_full: ArrayLike, cost: ArrayLike) -> None:
        ok = self.satisfied(quality, quality_full, cost)
        self._violating = float(1.0 - ok.mean()) if ok.size else 0.0

    def state_dict(self) -> dict:
        return {"name": self.name, "violating": self._violating}

    def _load(self, state: dict) -> None:
        try:
            self._violating = float(state["violating"])
        except KeyError:
            raise ValueError(f"{self.name!r} constraint state lacks the field 'violating'") from None


@register_constraint("lexicographic")
class Lexicographic(_TracksViolation):
    """Quality first, compute second (the default).

    While ``drop <= max_quality_drop`` is violated only quality counts; once it holds, compute is
    minimised without leaving it::

        satisfied:  reward = 2 - cost                                      in (0, 2]        for cost in [0, 2)
        violated:   reward = -penalty * (drop - max_quality_drop) < 0      in [-penalty, 0)

    Ordering, for quality in [0, 1] and cost in [0, 2) (a FLOPs ratio is about 1 at most; above 2 the
    policy would cost more than the whole model, so such costs are rejected as a bug):

    - every satisfying outcome scores above every violating one (``> 0`` against ``< 0``);
    - among satisfying outcomes, lower cost scores strictly higher, whatever the quality;
    - among violating outcomes, a smaller drop (higher quality relative to the full model) scores strictly
      higher, whatever the cost.

    ``lam`` is the fraction of the last batch that violated the constraint: the share of instances for which
    only quality counted.

    The ordering is per instance; a learner maximises its *expectation*, where a policy may still buy a
    little violation probability with compute: an extra violation rate ``v`` pays for a FLOPs saving of
    about ``v * (2 - cost + penalty * excess)``. ``penalty`` sets that exchange rate without changing the
    ordering: at the default 50, with exact-match quality (excess 0.99), 1% more wrong answers must save
    about half of the model's FLOPs to be worth it; at 1 they paid for themselves with 0.025.

    Args:
        max_quality_drop: largest tolerated ``quality_full - quality``, in [0, 1].
        penalty: scale of the violating rewards, > 0.
    """

    def __init__(self, max_quality_drop: float = _LEX.max_quality_drop, penalty: float = _LEX.penalty) -> None:
        super().__init__()
        self.max_quality_drop = _check_drop(max_quality_drop)
        self.penalty = _check_number("lexicographic penalty", penalty, allow_zero=False)

    def satisfied(self, quality: ArrayLike, quality_full: ArrayLike, cost: ArrayLike) -> np.ndarray:
        return _within_drop(quality, quality_full, cost, self.max_quality_drop)

    def reward(self, quality: ArrayLike, quality_full: ArrayLike, cost: ArrayLike) -> np.ndarray:
        q, qf, c = _arrays(quality, quality_full, cost)
        if c.size and c.max() >= 2.0:
            raise ValueError(f"lexicographic reward needs cost (a FLOPs ratio) below 2, got {c.max():.4g}")
        excess = (qf - q) - self.max_quality_drop
        return np.where(excess <= 0.0, 2.0 - c, -self.penalty * excess)


@register_constraint("lagrangian")
class Lagrangian(Constraint):
    """Minimise cost subject to ``drop <= max_quality_drop``, by dual ascent on a Lagrange multiplier.

    The Lagrangian of ``min E[cost] s.t. E[drop] - eps <= 0`` is ``E[cost] + lam * (E[drop] - eps)``; the
    policy maximises its negative per instance. This standard linear form prices exactly the mean
    constraint that the dual step below measures; a hinge ``max(0, drop - eps)`` would price a stricter,
    per-instance constraint than the one the multiplier tracks::

        reward = -cost - lam * (drop - eps)

    After each batch the learner calls :meth:`update`, a projected dual-ascent step::

        lam <- max(0, lam + lr * mean(drop - eps))

    so ``lam`` rises while the constraint is violated on average and falls (to 0 at the least) while it
    has slack. ``lam`` is the multiplier itself.

    Args:
        max_quality_drop: eps, the largest tolerated mean ``quality_full - quality``, in [0, 1].
        lam_init: starting multiplier, >= 0. Starting above 0 keeps the first batches from trading quality
            for compute before the multiplier has learnt the constraint's price.
        lr: dual step size, > 0.
    """

    def __init__(
        self, max_quality_drop: float = _LAG.max_quality_drop, lam_init: float = _LAG.lam_init, lr: float = _LAG.lr
    ) -> None:
        self.max_quality_drop = _check_drop(max_quality_drop)
        self._lam = _check_number("lam_init", lam_init, allow_zero=True)
        self.lr = _check_number("lr", lr, allow_zero=False)

    @property
    def lam(self) -> float:
        """The current Lagrange multiplier (>= 0)."""
        return self._lam

    def satisfied(self, quality: ArrayLike, quality_full: ArrayLike, cost: ArrayLike) -> np.ndarray:
        return _within_drop(quality, quality_full, cost, self.max_quality_drop)

    def reward(self, quality: ArrayLike, quality_full: ArrayLike, cost: ArrayLike) -> np.ndarray:
        q, qf, c = _arrays(quality, quality_full, cost)
        return -c - self._lam * ((qf - q) - self.max_quality_drop)

    def update(self, quality: ArrayLike, quality_full: ArrayLike, cost: ArrayLike) -> None:
        q, qf, _ = _arrays(quality, quality_full, cost)
        if q.size:
            self._lam = max(0.0, self._lam + self.lr * float(np.mean((qf - q) - self.max_quality_drop)))

    def state_dict(self) -> dict:
        return {"name": self.name, "lam": self._lam}

    def _load(self, state: dict) -> None:
        try:
            self._lam = float(state["lam"])
        except KeyError:
            raise ValueError("'lagrangian' constraint state lacks the field 'lam'") from None


@register_constraint("fixed")
class Fixed(Constraint):
    """Weighted sum, the unconstrained baseline: ``reward = quality - lam * cost``.

    ``lam`` never changes. The quality constraint plays no part in the reward; ``max_quality_drop`` only
    defines :meth:`satisfied`, so runs of this baseline report feasibility the same way as the others.

    Args:
        lam: price of compute in quality units, >= 0.
        max_quality_drop: tolerated ``quality_full - quality`` for :meth:`satisfied`, in [0, 1].
    """

    def __init__(self, lam: float, max_quality_drop: float = _FIX.max_quality_drop) -> None:
        self._lam = _check_number("lam", lam, allow_zero=True)
        self.max_quality_drop = _check_drop(max_quality_drop)

    @property
    def lam(self) -> float:
        """The fixed weight of cost."""
        return self._lam

    def satisfied(self, quality: ArrayLike, quality_full: ArrayLike, cost: ArrayLike) -> np.ndarray:
        return _within_drop(quality, quality_full, cost, self.max_quality_drop)

    def reward(self, quality: ArrayLike, quality_full: ArrayLike, cost: ArrayLike) -> np.ndarray:
        q, _, c = _arrays(quality, quality_full, cost)
        return q - self._lam * c


@register_constraint("budget")
class Budget(_TracksViolation):
    """The budget form: maximise quality subject to ``cost <= budget``::

        within budget:  reward = quality                   in [0, 1]
        over budget:    reward = -(cost - budget) < 0

    Every outcome within budget scores above every outcome over it; over budget the reward ignores quality
    (quality bought with forbidden compute earns nothing) and falls as the excess grows, so the policy is
    pushed back towards the budget. ``lam`` is the fraction of the last batch that was over budget.

    A budget-conditioned run (``budget_range``) draws a budget per instance, which the policy reads: ``reward``,
    ``satisfied`` and ``update`` then take each instance's ``budget``.

    Args:
        budget: largest allowed FLOPs ratio, > 0 (the budget a conditioned policy is evaluated at by default).
        budget_range: ``(low, high)`` within (0, 1] to train one policy for every budget in, or None.
    """

    def __init__(self, budget: float, budget_range: tuple[float, float] | None = None) -> None:
        super().__init__()
        if not (np.isfinite(budget) and budget > 0.0):
            raise ValueError(f"budget must be a finite FLOPs ratio > 0, got {budget}")
        self.budget = float(budget)
        self.budget_range = None
        if budget_range is not None:
            lo, hi = (float(x) for x in budget_range)
            if not 0.0 < lo < hi <= 1.0:
                raise ValueError(f"budget_range must be (low, high) with 0 < low < high <= 1, got {list(budget_range)}")
            self.budget_range = (lo, hi)

    def _limit(self, budget: ArrayLike | None):
        return self.budget if budget is None else np.asarray(budget, dtype=np.float64)

    def satisfied(self, quality: ArrayLike, quality_full: ArrayLike, cost: ArrayLike, budget: ArrayLike | None = None) -> np.ndarray:
        _, _, c = _arrays(quality, quality_full, cost)
        return c <= self._limit(budget)

    def reward(self, quality: ArrayLike, quality_full: ArrayLike, cost: ArrayLike, budget: ArrayLike | None = None) -> np.ndarray:
        q, _, c = _arrays(quality, quality_full, cost)
        b = self._limit(budget)
        return np.where(c <= b, q, -(c - b))

    def update(self, quality: ArrayLike, quality_full: ArrayLike, cost: ArrayLike, budget: ArrayLike | None = None) -> None:
        ok = self.satisfied(quality, quality_full, cost, budget)
        self._violating = float(1.0 - ok.mean()) if ok.size else 0.0
