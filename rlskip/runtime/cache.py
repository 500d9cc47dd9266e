"""The row-compact KV cache: one attention layer's keys and values for only the rows that execute it.

Hugging Face cache objects hold every row of the batch and cannot update a subset of them; a plan changes
which rows run which attention sub-layer, and a row that skips a layer's attention has nothing to cache
there. A :class:`KVCache` is preallocated for the whole generation (``capacity`` positions) and holds the
rows listed at construction, compact and in row order. Prompt (or memory) keys are written once by
:meth:`prefill`, possibly with padding (a per-row key mask then marks the valid columns); each decoding step
writes one column with :meth:`write`, reads the keys up to it with :meth:`view`, and moves on with
:meth:`advance`. :meth:`reorder` follows beam search. :class:`CachedDecoder` is the base of the families'
incremental decoders: one cache per layer, advanced and reordered together.
"""

from __future__ import annotations

import torch


class KVCache:
    """Keys and values ``[rows, kv_heads, capacity, head_dim]`` of one layer for the rows that execute it.

    Args:
        rows: global indices of the rows this cache holds, in order; None for every row.
        n_rows: rows in the whole batch (beams included).
        kv_heads, head_dim: the layer's key/value layout.
        capacity: positions to allocate (prompt or start token plus every new token).
        like: a tensor whose dtype and device the cache takes.
    """

    def __init__(self, rows: torch.Tensor | None, n_rows: int, kv_heads: int, head_dim: int, capacity: int, like: torch.Tensor):
        self.rows = rows
        n = n_rows if rows is None else rows.numel()
        self.k = like.new_empty((n, kv_heads, capacity, head_dim))
        self.v = like.new_empty((n, kv_heads, capacity, head_dim))
        self.mask: torch.Tensor | None = None  # [n, capacity] bool once some row has padding columns
        self.length = 0
        self._local = None
        if rows is not None:  # global row -> index in this cache (-1 for rows it does not hold)
            self._local = torch.full((n_rows,), -1, dtype=torch.long, device=rows.device)
            self._local[rows] = torch.arange(n, device=rows.device)

    @property
    def n_rows(self) -> int:
        return self.k.shape[0]

    def prefill(self, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Write keys/values ``[rows, kv_heads, len, head_dim]`` of a prompt; ``mask [rows, len]`` marks real ones."""
        n = k.shape[2]
        self.k[:, :, :n], self.v[:, :, :n] = k, v
        if mask is not None and not bool(mask.all()):
            self.mask = torch.ones(self.k.shape[0], self.k.shape[2], dtype=torch.bool, device=k.device)
            self.mask[:, :n] = mask
        self.length = n

    def write(self, k: torch.Tensor, v: torch.Tensor, rows: torch.Tensor | None = None) -> None:
        """Write one position's keys/values ``[rows, kv_heads, 1, head_dim]`` at column :attr:`length`, for the
        cache's rows listed in ``rows`` (local indices; all if None)."""
        t = self.length
        if rows is None:
            self.k[:, :, t], self.v[:, :, t] = k[:, :, 0], v[:, :, 0]
        else:
            self.k[rows, :, t], self.v[rows, :, t] = k[:, :, 0], v[:, :, 0]

    def view(self, rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(keys, values, SDPA key mask or None)`` up to and including column :attr:`length`, for local
        ``rows`` (all if None)."""
        end = self.length + 1
        k, v, m = self.k[:, :, :end], self.v[:, :, :end], self.mask
        if rows is not None:
            k, v, m = k[rows], v[rows], (None if m is None else m[rows])
        return k, v, (None if m is None else m[:, None, None, :end])

    def advance(self) -> None:
        """Close the current column (every row wrote it)."""
        self.length += 1

    def local(self, global_rows: torch.Tensor) -> torch.Tensor:
        """Indices in this cache of the given global rows (which it must hold)."""
        return global_rows if self._local is None else self._local[global_rows]

    def reorder(self, beam_idx: torch.Tensor) -> None:
        """Row ``i`` continues from global row ``beam_idx[i]`` (beams of one instance share a plan, so a cache
        holds all of an instance's beams or none)."""
        src = beam_idx if self.rows is None else self._local[beam_idx[self.rows]]
        t = self.length
        self.k[:, :, :t] = self.k[src, :, :t]
        self.v[:, :, :t] = self.v[src, :, :t]
        if self.mask is not None:
            self.mask[:, :t] = self.mask[src, :t]


class CachedDecoder:
    """Base of a family's incremental decoder: ``caches`` (one per layer, None for a layer no row runs) and the
    number ``t`` of positions decoded; a step ends with :meth:`advance`."""

    caches: list[KVCache | None]
    t: int

    def advance(self) -> None:
        """Close the current position in every cache."""
        for cache in self.caches:
            if cache is not None:
                cache.advance()
        self.t += 1

    def reorder(self, beam_idx: torch.Tensor) -> None:
        """Row ``i`` continues from row ``beam_idx[i]`` in every cache (beam search)."""
        for cache in self.caches:
            if cache is not None:
                cache.reorder(beam_idx)
