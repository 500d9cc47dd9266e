"""Row gather/scatter and token packing: how every family runs a sub-layer only where the plan keeps it.

A batch carries one plan per row. For each candidate, :func:`row_sets` lists the rows that execute it, and
:func:`on_rows` runs the sub-layer on those rows only (gather, compute, scatter back), so a skipped
sub-layer costs nothing for the rows that skip it and a batch of distinct plans saves as much as the same
plans run alone. :func:`pack_tokens` removes dropped tokens from the tensors after the first layer.
"""

from __future__ import annotations

from typing import Callable

import torch

_EMPTY = torch.empty(0, dtype=torch.long)


def row_sets(bits: torch.Tensor) -> list[torch.Tensor | None]:
    """Per candidate: ``None`` if every row executes it, else the (possibly empty) indices of those that do."""
    out: list[torch.Tensor | None] = []
    all_on, any_on = bits.all(0).tolist(), bits.any(0).tolist()
    for j in range(bits.shape[1]):
        if all_on[j]:
            out.append(None)
        elif not any_on[j]:
            out.append(_EMPTY.to(bits.device))
        else:
            out.append(bits[:, j].nonzero().flatten())
    return out


def on_rows(h: torch.Tensor, rows: torch.Tensor | None, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Apply ``fn`` to the rows of ``h`` listed in ``rows`` (all if None) and leave the others untouched.

    Without gradients the result is written into ``h`` in place (callers own ``h``); with gradients a new
    tensor is returned so autograd sees the scatter.
    """
    if rows is None:
        return fn(h)
    if rows.numel() == 0:
        return h
    sub = fn(h.index_select(0, rows))
    if torch.is_grad_enabled() and (h.requires_grad or sub.requires_grad):
        return h.index_copy(0, rows, sub)
    return h.index_copy_(0, rows, sub)


def pick(x: torch.Tensor | None, rows: torch.Tensor | None) -> torch.Tensor | None:
    """``x[rows]``, or ``x`` itself when ``rows`` is None (every row) or ``x`` is None."""
    return x if rows is None or x is None else x.index_select(0, rows)


def repeat_rows(x: torch.Tensor | None, k: int) -> torch.Tensor | None:
    """Each row repeated ``k`` times, copies adjacent (the beams of one instance)."""
    return x if x is None or k == 1 else x.repeat_interleave(k, 0)


def pack_tokens(keep: torch.Tensor, *tensors: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Re-pack each row of ``tensors`` (``[batch, len, ...]``) to the positions ``keep`` marks, in order.

    Kept positions move to the front of their row, the batch is cut to the longest kept row, and the new
    right-padded mask is returned with the packed tensors: ``(mask [batch, len'], [packed, ...])``.
    """
    lengths = keep.sum(1)
    # a stable sort puts kept positions first, in their original order
    order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices[:, : int(lengths.max())]
    mask = torch.arange(order.shape[1], device=keep.device)[None, :] < lengths[:, None]
    packed = []
    for t in tensors:
        idx = order.view(*order.shape, *([1] * (t.dim() - 2))).expand(-1, -1, *t.shape[2:])
        packed.append(t.gather(1, idx))
    return mask, packed


def key_mask(mask: torch.Tensor) -> torch.Tensor | None:
    """Boolean key-padding mask ``[batch, 1, 1, len]`` for SDPA, or None when nothing is padded."""
    return None if bool(mask.all()) else mask[:, None, None, :]


def split_heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """``[rows, len, n_heads * head_dim] -> [rows, n_heads, len, head_dim]``."""
    b, s, _ = x.shape
    return x.view(b, s, n_heads, -1).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """``[rows, n_heads, len, head_dim] -> [rows, len, n_heads * head_dim]``."""
    b, h, s, dh = x.shape
    return x.transpose(1, 2).reshape(b, s, h * dh)
