"""The runtime interface: execute a backbone under a batch of per-instance plans.

One small abstract class, one implementation per model family (``bart.py``, ...), registered by name. The
runtime knows nothing of reinforcement learning: it observes inputs, executes plans, and counts FLOPs.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from rlskip.plan import Plan
from rlskip.space import SkipSpace


@dataclass
class Observation:
    """What :meth:`Runtime.observe` computed: the first layer's output, kept so the plan does not redo it.

    Attributes:
        hidden: ``[batch, source_len, d_model]`` hidden states after the fixed-on first layer.
        attention_mask: ``[batch, source_len]`` bool, True on real tokens.
        input_ids: ``[batch, source_len]`` the source ids.
        always_keep: ``[batch, source_len]`` bool, True on special tokens (never dropped).
    """

    hidden: torch.Tensor
    attention_mask: torch.Tensor
    input_ids: torch.Tensor
    always_keep: torch.Tensor

    @property
    def batch_size(self) -> int:
        return self.hidden.shape[0]

    @property
    def lengths(self) -> torch.Tensor:
        """Number of real source tokens per instance."""
        return self.attention_mask.sum(1)

    def pooled(self) -> torch.Tensor:
        """Mean of the hidden states over real tokens: ``[batch, d_model]``, the policy's summary input."""
        m = self.attention_mask.unsqueeze(-1).to(self.hidden.dtype)
        return (self.hidden * m).sum(1) / m.sum(1).clamp_min(1.0)

    def rows(self, index: torch.Tensor | list[int]) -> "Observation":
        """The observation of a subset of instances (trailing padding columns kept)."""
        idx = torch.as_tensor(index, dtype=torch.long, device=self.hidden.device)
        return Observation(self.hidden[idx], self.attention_mask[idx], self.input_ids[idx], self.always_keep[idx])


@dataclass
class GenerateOutput:
    """Result of :meth:`Runtime.generate`.

    Attributes:
        sequences: ``[batch, out_len]`` decoder token ids, as Hugging Face ``generate()`` returns them
            (starting with the decoder start token; finished rows padded).
        steps: ``[batch]`` decoder steps each instance needed (its own length, EOS included).
        flops: ``[batch]`` analytic FLOPs executed for each instance under its plan.
        full_flops: ``[batch]`` FLOPs of the full model on the same source length, steps and beams.
        source_kept: ``[batch]`` source tokens left after token dropping.
        margins: ``[batch]`` when asked for (``generate(..., return_margins=True)``) under greedy decoding, the
            smallest gap over each row's steps between the chosen token's score and the runner-up's (see
            :func:`rlskip.runtime.search.greedy_search`); None otherwise.
    """

    sequences: torch.Tensor
    steps: torch.Tensor
    flops: torch.Tensor
    full_flops: torch.Tensor
    source_kept: torch.Tensor
    margins: torch.Tensor | None = None

    @property
    def flops_ratio(self) -> torch.Tensor:
        return self.flops / self.full_flops


class Runtime(ABC):
    """Executes one backbone under plans. Subclasses wrap a Hugging Face model without copying weights."""

    family: str
    space: SkipSpace

    @abstractmethod
    def observe(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> Observation:
        """Run the embeddings and the fixed-on first layer."""

    @abstractmethod
    def generate(self, obs: Observation, plan: Plan, return_margins: bool = False, **gen_kwargs) -> GenerateOutput:
        """Generate under per-instance plans held for every step and beam (with ``return_margins``, greedy
        decoding also reports each row's decision margin)."""

    @abstractmethod
    def forward(
        self, obs: Observation, plan: Plan, labels: torch.Tensor | None = None, decoder_input_ids: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Teacher-forced forward under plans: ``(logits, loss)``, differentiable w.r.t. the weights."""

    def check_plan(self, obs: Observation, plan: Plan) -> None:
        """Raise a ValueError naming what was expected unless ``plan`` fits this backbone and batch."""
        if not isinstance(plan, Plan):
            raise ValueError(f"expected an rlskip.Plan for a {self.space.describe()}, got {type(plan).__name__}")
        self.space.check_compatible(plan.space)
        if plan.batch_size != obs.batch_size:
            raise ValueError(f"plan has {plan.batch_size} rows but the observation has {obs.batch_size} instances")
        if plan.token_keep is not None and plan.token_keep.shape[1] != obs.input_ids.shape[1]:
            raise ValueError(
                f"Plan.token_keep has {plan.token_keep.shape[1]} positions, expected the source length "
                f"{obs.input_ids.shape[1]}"
            )
