"""The running batch's KV cache, reshaped in place as requests join and leave.

A `DynamicCache` grows each layer with `torch.cat`, copying the whole layer on every
decode step, and rebuilding the batch when one row leaves or newcomers join
(`index_select`, left-padding and `torch.cat`) copies it again. At 16 rows on a small
CPU those copies were ~8% of the wall time of a serving run. Here each layer's keys
and values are views, `buf[:rows, :, start:end]`, of a buffer with spare rows and
columns:

- a forward writes only its new columns at `end`;
- trimming leading columns that are padding in every row moves `start`;
- a row that leaves is filled by a row from the tail (one row copied, not the batch);
- newcomers are written into spare rows, right-aligned with the batch (only their own
  keys and values are copied); a newcomer longer than the batch takes columns to the
  left of `start`.

A buffer is reallocated (one full copy) only when it runs out of rows or columns.
Spare space holds zeros or an earlier occupant's keys and values: always finite, and
always masked as padding, so it gets zero attention weight and never changes a result.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

_SPARE_COLUMNS_MIN = 32


def compaction(keep: list[int], rows: int) -> tuple[list[int], list[tuple[int, int]]]:
    """How to keep rows `keep` (ascending) of `rows` in place, filling the holes they
    leave below `len(keep)` with kept rows from the tail.

    Returns `order` (new row j is old row `order[j]`) and the `(to, from)` row moves."""
    n = len(keep)
    kept = set(keep)
    holes = [i for i in range(n) if i not in kept]
    tail = [i for i in keep if i >= n]
    order = list(range(n))
    for hole, row in zip(holes, tail, strict=True):
        order[hole] = row
    return order, list(zip(holes, tail, strict=True))


class KVLayer(DynamicLayer):
    """One layer's keys and values as views of a buffer with spare rows and columns."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._kbuf: torch.Tensor | None = None
        self._vbuf: torch.Tensor | None = None
        self._rows = self._start = self._end = 0

    def get_seq_length(self) -> int:
        return self._end - self._start if self.is_initialized else 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        rows, t = key_states.shape[0], key_states.shape[-2]
        if self._kbuf is None:
            self._allocate(key_states, value_states, rows, 0, t)
            self._rows = rows
        elif self._end + t > self._kbuf.shape[-2]:
            self._reallocate(self._rows, 0, self.get_seq_length() + t)
        end = self._end + t
        self._kbuf[:rows, :, self._end : end] = key_states
        self._vbuf[:rows, :, self._end : end] = value_states
        self._end = end
        self._refresh()
        return self.keys, self.values

    # ---- reshaping (the scheduler's thread, between forwards)

    def move_rows(self, moves: list[tuple[int, int]], rows: int) -> None:
        """Copy row `from` over row `to` for each move, then keep the first `rows`."""
        cols = slice(self._start, self._end)
        for to, frm in moves:
            self._kbuf[to, :, cols] = self._kbuf[frm, :, cols]
            self._vbuf[to, :, cols] = self._vbuf[frm, :, cols]
        self._rows = rows
        self._refresh()

    def trim_left(self, columns: int) -> None:
        self._start += columns
        self._refresh()

    def append_rows(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Add rows after the current ones, right-aligned with them."""
        k, n = keys.shape[0], keys.shape[-2]
        length = self.get_seq_length()
        wider = max(0, n - length)  # columns the batch needs on its left
        rows = self._rows + k
        if rows > self._kbuf.shape[0] or wider > self._start:
            self._reallocate(rows, wider, length)
        self._start -= wider
        self._kbuf[self._rows : rows, :, self._end - n : self._end] = keys
        self._vbuf[self._rows : rows, :, self._end - n : self._end] = values
        self._rows = rows
        self._refresh()

    # ---- buffers

    def _allocate(self, like_k: torch.Tensor, like_v: torch.Tensor, rows: int, left: int,
                  columns: int) -> None:
        """Fresh zeroed buffers for `rows` rows and `columns` columns starting at `left`,
        with spare columns on the right (a quarter more, at least 32)."""
        cap = left + columns + max(_SPARE_COLUMNS_MIN, columns // 4)
        _, h, _, d = like_k.shape
        self._kbuf = like_k.new_zeros(rows, h, cap, d)
        self._vbuf = like_v.new_zeros(rows, h, cap, like_v.shape[-1])
        self._start = self._end = left

    def _reallocate(self, rows: int, left: int, columns: int) -> None:
        """Move the contents into new buffers (rows at least doubled when they grow)."""
        old_k, old_v = self.keys, self.values
        have = self._kbuf.shape[0]
        rows = max(rows, 2 * have) if rows > have else have
        self._allocate(old_k, old_v, rows, left, columns)
        length = old_k.shape[-2]
        self._kbuf[: self._rows, :, left : left + length] = old_k
        self._vbuf[: self._rows, :, left : left + length] = old_v
        self._end = left + length

    def _refresh(self) -> None:
        self.keys = self._kbuf[: self._rows, :, self._start : self._end]
        self.values = self._vbuf[: self._rows, :, self._start : self._end]


class BatchCache(DynamicCache):
    """The batch's KV cache: a `DynamicCache` whose layers are `KVLayer`s."""

    def __init__(self):
        super().__init__()
        self.layer_class_to_replicate = KVLayer

    def _filled(self) -> list[KVLayer]:
        return [layer for layer in self.layers if layer.get_seq_length() > 0]

    def keep_rows(self, keep: list[int], rows: int) -> list[int]:
        """Keep rows `keep` (ascending) of `rows`; returns the new row order (new row j
        is old row `order[j]`), which the caller applies to its per-row state."""
        order, moves = compaction(keep, rows)
        for layer in self._filled():
            layer.move_rows(moves, len(keep))
        return order

    def trim_left(self, columns: int) -> None:
        for layer in self._filled():
            layer.trim_left(columns)

    def append(self, other: BatchCache) -> None:
        """Take `other`'s rows after this cache's, right-aligned (the shorter side is
        left-padded: its extra columns are masked by the caller)."""
        for mine, theirs in zip(self.layers, other.layers, strict=True):
            mine.append_rows(theirs.keys, theirs.values)
