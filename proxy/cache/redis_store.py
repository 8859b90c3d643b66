"""Entries in Redis, shared by every gateway process and instance that points at it.

Each entry is one Redis string (`entry.encode`), set with the key's TTL (PX), so Redis
expires it. Beside them: an index (a sorted set of entry names by expiry) and each entry's
size, which the store script keeps up to date, so the gauges (entries, bytes) are the
shared totals and an operator's drop finds a scope's entries without scanning the
keyspace. The store script also forgets index rows of entries that expired (up to 64 per
store); an entry Redis evicts under `maxmemory` stays counted until then.

Claims make identical requests on several instances go upstream once: the first instance
to miss sets `claim:<name>` (SET NX PX, the time it may take); the others poll for the
entry (every 20 ms, `Cache`'s `poll_seconds`) until it appears (a hit), the claim goes (the first failed or
its answer was not storable: they go upstream themselves), or their own wait runs out.

A drop leaves a mark under `dropped:<scope prefix>` (its time, for a day): an answer whose
request asked before it, on any instance, is not stored after it (time read from each
instance's clock, so exact within their skew).

Every Redis error raises `StoreUnavailable`, with short timeouts: the cache then goes
upstream and counts it, it never fails or long delays a request.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable

import redis.asyncio
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ReadOnlyError, RedisError

from proxy.cache.entry import CorruptEntry, Entry, decode, encode
from proxy.cache.store import StoreUnavailable

PREFIX = "llm-gateway:cache:"
TIMEOUT_SECONDS = 0.5
MAX_CONNECTIONS = 64
# How long a drop keeps out the answers of requests that asked before it: longer than any
# request stays in flight.
DROP_MARK_SECONDS = 86400

# KEYS: entry, index, sizes, bytes, the scope's drop mark. ARGV: blob, ttl ms, now ms, when
# its request asked (ms).
_PUT = """
local dropped = redis.call('GET', KEYS[5])
if dropped and tonumber(dropped) >= tonumber(ARGV[4]) then
  return {redis.call('ZCARD', KEYS[2]), tonumber(redis.call('GET', KEYS[4]) or '0')}
end
local gone = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[3], 'LIMIT', 0, 64)
for _, name in ipairs(gone) do
  redis.call('DECRBY', KEYS[4], tonumber(redis.call('HGET', KEYS[3], name) or '0'))
  redis.call('HDEL', KEYS[3], name)
  redis.call('ZREM', KEYS[2], name)
end
local old = tonumber(redis.call('HGET', KEYS[3], KEYS[1]) or '0')
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('ZADD', KEYS[2], tonumber(ARGV[3]) + tonumber(ARGV[2]), KEYS[1])
redis.call('HSET', KEYS[3], KEYS[1], string.len(ARGV[1]))
local bytes = redis.call('INCRBY', KEYS[4], string.len(ARGV[1]) - old)
return {redis.call('ZCARD', KEYS[2]), bytes}
"""
# KEYS: index, sizes, bytes, the scope's drop mark. ARGV: the prefix of the names to drop,
# now (ms), how long the mark stays (ms).
_DROP = """
if tonumber(redis.call('GET', KEYS[4]) or '0') < tonumber(ARGV[2]) then
  redis.call('SET', KEYS[4], ARGV[2], 'PX', ARGV[3])
end
local dropped = 0
for _, name in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  if string.sub(name, 1, string.len(ARGV[1])) == ARGV[1] then
    redis.call('DEL', name)
    redis.call('DECRBY', KEYS[3], tonumber(redis.call('HGET', KEYS[2], name) or '0'))
    redis.call('HDEL', KEYS[2], name)
    redis.call('ZREM', KEYS[1], name)
    dropped = dropped + 1
  end
end
return {dropped, redis.call('ZCARD', KEYS[1]), tonumber(redis.call('GET', KEYS[3]) or '0')}
"""
# KEYS: claim. ARGV: this instance's token.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class RedisStore:
    def __init__(self, url: str) -> None:
        pool = redis.asyncio.BlockingConnectionPool.from_url(
            url,
            max_connections=MAX_CONNECTIONS,
            timeout=TIMEOUT_SECONDS,
            socket_timeout=TIMEOUT_SECONDS,
            socket_connect_timeout=TIMEOUT_SECONDS,
            retry=Retry(NoBackoff(), 0),
            # A write answered READONLY (a primary a failover made a replica keeps its
            # clients' connections) drops its connection, as one that failed: the next
            # opens where the address leads now, the new primary.
            retry_on_error=[ReadOnlyError],
            client_name="llm-gateway-cache",
            protocol=2,
        )
        self._client = redis.asyncio.Redis.from_pool(pool)
        self._put = self._client.register_script(_PUT)
        self._drop = self._client.register_script(_DROP)
        self._release = self._client.register_script(_RELEASE)
        self._token = os.urandom(8).hex()  # whose claim it is
        self._index, self._sizes, self._bytes = PREFIX + "index", PREFIX + "sizes", PREFIX + "bytes"
        self._size = (0, 0)

    async def get(self, name: str) -> Entry | None:
        try:
            blob = await self._client.get(PREFIX + name)
        except (RedisError, OSError) as error:
            raise StoreUnavailable(str(error)) from None
        if not isinstance(blob, bytes):
            return None
        try:
            return decode(blob)
        except CorruptEntry:
            return None  # not ours to read: a miss, and the next answer replaces it

    async def put(
        self, name: str, entry: Entry, ttl_seconds: float, prefix: str, asked_at: float
    ) -> None:
        keys = [PREFIX + name, self._index, self._sizes, self._bytes, _drop_mark(prefix)]
        ttl_ms = max(1, round(ttl_seconds * 1000))
        now_ms = round(time.time() * 1000)
        args: list[bytes | int] = [encode(entry), ttl_ms, now_ms, round(asked_at * 1000)]
        try:
            entries, size = await self._put(keys=keys, args=args)
        except (RedisError, OSError) as error:
            raise StoreUnavailable(str(error)) from None
        self._size = (int(entries), int(size))

    async def claim(self, name: str, seconds: float) -> bool:
        try:
            taken = await self._client.set(
                PREFIX + "claim:" + name, self._token, nx=True, px=max(1, round(seconds * 1000))
            )
        except (RedisError, OSError) as error:
            raise StoreUnavailable(str(error)) from None
        return bool(taken)

    async def is_claimed(self, name: str) -> bool:
        try:
            return bool(await self._client.exists(PREFIX + "claim:" + name))
        except (RedisError, OSError) as error:
            raise StoreUnavailable(str(error)) from None

    async def release(self, name: str) -> None:
        try:
            await self._release(keys=[PREFIX + "claim:" + name], args=[self._token])
        except (RedisError, OSError) as error:
            raise StoreUnavailable(str(error)) from None

    async def drop(self, prefix: str, at: float) -> int:
        keys = [self._index, self._sizes, self._bytes, _drop_mark(prefix)]
        args: list[str | int] = [PREFIX + prefix, round(at * 1000), DROP_MARK_SECONDS * 1000]
        try:
            dropped, entries, size = await self._drop(keys=keys, args=args)
        except (RedisError, OSError) as error:
            raise StoreUnavailable(str(error)) from None
        self._size = (int(entries), int(size))
        return int(dropped)

    async def dropped_at(self, prefix: str) -> float | None:
        try:
            mark = await self._client.get(_drop_mark(prefix))
        except (RedisError, OSError) as error:
            raise StoreUnavailable(str(error)) from None
        try:
            return None if mark is None else int(mark) / 1000
        except ValueError:
            return None  # not a mark of ours

    async def add_hit(self, key_id: str) -> None:
        try:
            await self._client.incr(PREFIX + "hits:" + key_id)
        except (RedisError, OSError) as error:
            raise StoreUnavailable(str(error)) from None

    async def hits(self, key_id: str) -> int:
        try:
            count = await self._client.get(PREFIX + "hits:" + key_id)
        except (RedisError, OSError) as error:
            raise StoreUnavailable(str(error)) from None
        return int(count or 0)

    def forget_hits(self, key_ids: Iterable[str]) -> None:
        """Kept: a counter in Redis, shared by every instance (docs/watching.md says so)."""

    def size(self) -> tuple[int, int]:
        return self._size

    async def close(self) -> None:
        await self._client.aclose()


def _drop_mark(prefix: str) -> str:
    """Where the time of a scope's last drop is kept (Unix ms)."""
    return PREFIX + "dropped:" + prefix
