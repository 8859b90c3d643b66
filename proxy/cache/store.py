"""What the cache needs from the place its entries live: this process's memory, or Redis.

Both stores answer alike; `memory_store.py` and `redis_store.py` are the two. A store that
cannot be reached raises `StoreUnavailable`: the cache then answers from upstream, counted,
and never fails a request because of it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from proxy.cache.entry import Entry


class StoreUnavailable(Exception):
    """The store cannot be reached (Redis lost)."""


class Store(Protocol):
    async def get(self, name: str) -> Entry | None:
        """The live entry named so, else None."""
        ...

    async def put(
        self, name: str, entry: Entry, ttl_seconds: float, prefix: str, asked_at: float
    ) -> None:
        """Keep `entry` for `ttl_seconds`, replacing one of the same name; unless the
        entries whose names start with `prefix` (its scope's) were dropped at or after
        `asked_at`, when its request asked (the cache's clock): an answer begun before a
        drop is not kept after it."""
        ...

    async def claim(self, name: str, seconds: float) -> bool:
        """Become the one instance that asks upstream for `name`, for at most `seconds`.

        False: another instance holds the claim (its answer will be stored).
        """
        ...

    async def is_claimed(self, name: str) -> bool:
        """True while another instance still holds the claim on `name`."""
        ...

    async def release(self, name: str) -> None:
        """Let go of this instance's claim on `name`."""
        ...

    async def drop(self, prefix: str, at: float) -> int:
        """Remove every entry whose name starts with `prefix`, and keep out those of
        requests that asked before `at` (now, the cache's clock); how many were removed."""
        ...

    async def dropped_at(self, prefix: str) -> float | None:
        """When the entries under `prefix` were last dropped (the cache's clock); None: not
        that the store remembers."""
        ...

    async def add_hit(self, key_id: str) -> None: ...

    async def hits(self, key_id: str) -> int:
        """A key's hits since the store began (with Redis: by every instance)."""
        ...

    def forget_hits(self, key_ids: Iterable[str]) -> None:
        """Drop the hit counts of keys deleted (nothing reads them again)."""
        ...

    def size(self) -> tuple[int, int]:
        """Entries and bytes held, as last known (the gauges)."""
        ...

    async def close(self) -> None: ...
