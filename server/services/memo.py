"""A small bounded memo for pure functions on the request path.

Some per-request work is a pure function of what a request says (a prompt's token
count, a cache key's hashes), and a cache hit is by definition a request seen
before. `Memo` remembers such results up to a budget (a number of entries and a
total "size", e.g. characters of prompt held) and then starts over: no eviction
bookkeeping on the hot path, and memory never grows past the budget.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

MISSING: Any = object()


class Memo:
    def __init__(self, *, max_entries: int = 4096, max_size: int = 2_000_000):
        self.max_entries = max_entries
        self.max_size = max_size
        self._values: dict[Hashable, Any] = {}
        self._size = 0

    def get(self, key: Hashable) -> Any:
        """The remembered value, or MISSING."""
        return self._values.get(key, MISSING)

    def put(self, key: Hashable, value: Any, size: int = 0) -> None:
        if size > self.max_size:
            return
        if len(self._values) >= self.max_entries or self._size + size > self.max_size:
            self._values.clear()
            self._size = 0
        self._values[key] = value
        self._size += size

    def __len__(self) -> int:
        return len(self._values)
