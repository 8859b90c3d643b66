"""Entries in this process's memory: least recently used out first, past CACHE_MAX_BYTES.

An entry expires `ttl_seconds` after it was stored, by the injected clock; an expired entry
is dropped when it is next asked for, and each store drops the expired ones it finds at the
old end of the LRU order, so the gauges may count an expired entry until then. Claims are
this process's own business (`flights.py`): here every claim succeeds. A drop is remembered
by its scope's prefix, so an answer whose request asked before it is not stored after it
(it was in flight while the operator dropped the scope's entries). One event loop:
nothing here awaits, so each method is atomic.
"""

from __future__ import annotations

import itertools
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable

from proxy.cache.entry import Entry

# Expired entries dropped from the old end of the LRU order at each store, at most.
SWEEP = 4


class MemoryStore:
    def __init__(self, max_bytes: int, clock: Callable[[], float] = time.monotonic) -> None:
        self._max_bytes = max_bytes
        self._clock = clock
        self._entries: OrderedDict[str, tuple[Entry, float]] = OrderedDict()  # → expiry
        self._bytes = 0
        self._hits: dict[str, int] = {}
        self._dropped: dict[str, float] = {}  # prefix → when its entries were last dropped

    async def get(self, name: str) -> Entry | None:
        found = self._entries.get(name)
        if found is None:
            return None
        entry, expires = found
        if expires <= self._clock():
            self._remove(name)
            return None
        self._entries.move_to_end(name)
        return entry

    async def put(
        self, name: str, entry: Entry, ttl_seconds: float, prefix: str, asked_at: float
    ) -> None:
        size = entry.size
        if size > self._max_bytes or self._dropped.get(prefix, -math.inf) >= asked_at:
            return
        if name in self._entries:
            self._remove(name)
        self._sweep()
        self._entries[name] = (entry, self._clock() + ttl_seconds)
        self._bytes += size
        while self._bytes > self._max_bytes:
            oldest = next(iter(self._entries))
            self._remove(oldest)

    async def claim(self, name: str, seconds: float) -> bool:
        return True

    async def is_claimed(self, name: str) -> bool:
        return False

    async def release(self, name: str) -> None:
        pass

    async def drop(self, prefix: str, at: float) -> int:
        self._dropped[prefix] = at  # one per key or scope dropped: a handful
        names = [name for name in self._entries if name.startswith(prefix)]
        for name in names:
            self._remove(name)
        return len(names)

    async def dropped_at(self, prefix: str) -> float | None:
        return self._dropped.get(prefix)

    async def add_hit(self, key_id: str) -> None:
        self._hits[key_id] = self._hits.get(key_id, 0) + 1

    async def hits(self, key_id: str) -> int:
        return self._hits.get(key_id, 0)

    def forget_hits(self, key_ids: Iterable[str]) -> None:
        for key_id in key_ids:
            self._hits.pop(key_id, None)

    def size(self) -> tuple[int, int]:
        return len(self._entries), self._bytes

    async def close(self) -> None:
        self._entries.clear()
        self._bytes = 0

    def _remove(self, name: str) -> None:
        entry, _ = self._entries.pop(name)
        self._bytes -= entry.size

    def _sweep(self) -> None:
        now = self._clock()
        for name in list(itertools.islice(self._entries, SWEEP)):
            if self._entries[name][1] <= now:
                self._remove(name)
