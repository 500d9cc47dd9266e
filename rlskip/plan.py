"""Plan: per-instance keep/skip decisions over a SkipSpace, held for a whole generation.

``bits[i, j]`` is True when instance ``i`` executes skippable candidate ``j`` (see
:attr:`rlskip.space.SkipSpace.names` for the order). ``token_keep[i, s]`` is True when source position ``s``
of instance ``i`` survives the first encoder layer; special tokens and padding are handled by the runtime
(special tokens are always kept, padding is always removed), whatever the mask says. A plan of all ones
with no token mask reproduces the unmodified model exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlskip.space import SkipSpace


@dataclass(frozen=True)
class Plan:
    """A batch of per-instance plans.

    Args:
        space: the SkipSpace the bits refer to.
        bits: bool tensor ``[batch, space.n_bits]``; True = execute the candidate.
        token_keep: optional bool tensor ``[batch, source_len]``; True = keep the token.
    """

    space: SkipSpace
    bits: torch.Tensor
    token_keep: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.space, SkipSpace):
            raise ValueError(f"Plan.space must be a SkipSpace, got {type(self.space).__name__}")
        b = self.bits
        if not isinstance(b, torch.Tensor) or b.dtype != torch.bool:
            got = b.dtype if isinstance(b, torch.Tensor) else type(b).__name__
            raise ValueError(f"Plan.bits must be a bool tensor [batch, {self.space.n_bits}], got {got}")
        if b.dim() != 2 or b.shape[1] != self.space.n_bits:
            raise ValueError(
                f"Plan.bits must have shape [batch, {self.space.n_bits}] for a {self.space.describe()}, "
                f"got {list(b.shape)}"
            )
        t = self.token_keep
        if t is not None:
            if not self.space.token_dropping:
                raise ValueError(f"a token keep-mask was given but the {self.space.describe()} has no token candidate")
            if not isinstance(t, torch.Tensor) or t.dtype != torch.bool or t.dim() != 2 or t.shape[0] != b.shape[0]:
                desc = f"{t.dtype} {list(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"Plan.token_keep must be a bool tensor [{b.shape[0]}, source_len], got {desc}")

    @property
    def batch_size(self) -> int:
        return self.bits.shape[0]

    @classmethod
    def all_ones(cls, space: SkipSpace, batch_size: int) -> "Plan":
        """The plan that executes everything and drops no token: the unmodified model."""
        return cls(space, torch.ones(batch_size, space.n_bits, dtype=torch.bool))

    @classmethod
    def from_skips(cls, space: SkipSpace, skips: list[list[str]]) -> "Plan":
        """One plan per instance from lists of candidate names to skip."""
        bits = torch.ones(len(skips), space.n_bits, dtype=torch.bool)
        for i, names in enumerate(skips):
            for name in names:
                bits[i, space.bit(name)] = False
        return cls(space, bits)

    def rows(self, index: torch.Tensor | list[int]) -> "Plan":
        """The plans of a subset of instances, in the given order."""
        idx = torch.as_tensor(index, dtype=torch.long)
        tk = None if self.token_keep is None else self.token_keep[idx]
        return Plan(self.space, self.bits[idx], tk)

    def skipped_names(self, row: int) -> list[str]:
        """Names of the candidates instance ``row`` skips."""
        return self.space.skipped_names(self.bits[row])
