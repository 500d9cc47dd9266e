"""Model families under the shared contract suite (tests/test_contract.py): one module per family, each
registering its :class:`FamilyCase` instances in :data:`CASES`.

A case gives the suite a tiny model (random config or real weights), a mixed-length batch, how Hugging Face
generates and computes logits on it, and an *independent reference*: the family's forward pass written with
Hugging Face's own modules, every sub-layer computed and the identity substituted where the plan skips it.
The suite checks the runtime against both.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from functools import cached_property

import torch

CASES: dict[str, "FamilyCase"] = {}


def register(case: "FamilyCase") -> "FamilyCase":
    CASES[case.id] = case
    return case


@dataclass
class FamilyCase(ABC):
    """One model of one family under the contract suite.

    Attributes:
        id: test id (``"bart-tiny"``, ``"llama-stories260k"``, ...).
        head: ``"lm"`` (generation) or ``"classifier"``.
        gen_settings: generation keyword sets the all-ones plan must reproduce ``generate()`` under (greedy and
            beam at least).
        atol: tolerance of logits against Hugging Face's and against the reference.
        flops_model: whether FLOPs are checked against FlopCounterMode on this case (tiny configs: yes).
    """

    id: str
    head: str = "lm"
    gen_settings: list[dict] = field(default_factory=list)
    atol: float = 1e-5
    flops_model: bool = True

    @cached_property
    def model(self) -> torch.nn.Module:
        return self.build().eval()

    @abstractmethod
    def build(self) -> torch.nn.Module:
        """The model (skip the test with a reason if its weights are absent)."""

    @abstractmethod
    def inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input_ids, attention_mask)``: a batch of at least 4 inputs of different lengths, padded as
        Hugging Face expects for this family (left for decoder-only generation)."""

    def hf_generate(self, ids: torch.Tensor, mask: torch.Tensor, **kw) -> torch.Tensor:
        return self.model.generate(input_ids=ids, attention_mask=mask, **kw)

    @abstractmethod
    def teacher_forced(self, ids: torch.Tensor, mask: torch.Tensor, seed: int = 0):
        """``(obs_ids, obs_mask, forward_kwargs, hf_logits, valid)`` for an all-ones teacher-forced check:
        the runtime observes ``obs_ids``/``obs_mask`` and runs ``forward(obs, plan, **forward_kwargs)``
        (``classify`` for a classifier); its logits must equal ``hf_logits`` where ``valid`` ([batch, len] bool,
        or None for all) is True."""

    @abstractmethod
    def reference(self, ids: torch.Tensor, skip: set[str], keep: torch.Tensor | None, forward_kwargs: dict) -> torch.Tensor:
        """Logits of one instance (``ids`` ``[1, n]``, no padding) under the plan that skips ``skip`` and keeps
        the input positions ``keep`` (``[n]`` bool, or None) after the first layer, as the runtime's
        ``forward``/``classify`` returns them for it, computed independently (no cache)."""

    def reference_next(self, ids: torch.Tensor, skip: set[str], keep: torch.Tensor | None, new: list[int]) -> torch.Tensor:
        """The reference's logits ``[vocab]`` of the next new token after the ``new`` tokens generated so far."""
        raise NotImplementedError
