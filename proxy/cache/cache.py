"""The response cache: a hit replays a stored answer; a miss's answer is kept when storable.

`lookup` runs after admission, before upstream, for keys with a cache only (a key without
pays one attribute test). It answers a `Lookup`: a hit (the entry to replay), a miss (the
`Pending` that collects the answer as it goes to the client and leads the flight identical
requests wait for), or a bypass (not cacheable, or the client's no-store; a no-cache
bypass still collects, to refresh the entry). `settle` is the store sink: it keeps a
miss's answer when `verdict.is_storable` says so, lands its flight either way, and lets go
of the store's claim.

Failure of the store (Redis lost, or full: maxmemory with noeviction) never fails a request:
the lookup is a miss, the store is skipped, `on_store_lost` counts it, and stderr says it at
most once a minute (else every request a miss, paid upstream, and no line saying why). Hits are counted per key (/usage).

With WORKERS > 1 and the entries in memory, each worker has its own: a drop is told to the
others (`Others`: SIGUSR1 through the supervisor) and answered once each has made it too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson
from multidict import CIMultiDict, MultiMapping

from proxy.cache import lookup as names
from proxy.cache.entry import Entry
from proxy.cache.flights import Flight, Flights
from proxy.cache.lookup import Directive
from proxy.cache.store import Store, StoreUnavailable
from proxy.cache.verdict import is_storable
from proxy.keys.keys import VirtualKey
from proxy.observe.quiet import QUIET_SECONDS
from proxy.record import Cached, Record


@dataclass(slots=True)
class Pending:
    """A miss's answer, collected chunk by chunk as the client gets it, until too large."""

    name: str
    ttl_seconds: float
    max_bytes: int
    flight: Flight | None  # led by this request; None: a refresh, or a failed flight's waiter
    prefix: str  # its scope's: what a drop of the scope's entries names
    asked_at: float  # the lookup (the cache's clock): a drop after it keeps the answer out
    is_claimed: bool = False  # this instance holds the store's claim (Redis)
    status: int = 0
    reason: str | None = None
    headers: tuple[tuple[str, str], ...] = ()
    chunks: list[bytes] | None = field(default_factory=list)  # None: past max_bytes
    size: int = 0
    has_raw_bytes: bool = False  # a header's value holds bytes that are not UTF-8

    def begin(
        self,
        status: int,
        reason: str | None,
        headers: CIMultiDict[str],
        has_raw_bytes: bool = False,
    ) -> None:
        """The provider's status and headers, as they go to the client (before the gateway's own).

        Set-Cookie is not kept: a cookie is the first client's, never another's. Names are
        kept as one interned str each, shared by every entry (the wire's str and multidict's
        case-blind copy of each name cost an entry about 250 bytes a header, which
        CACHE_MAX_BYTES did not count).
        """
        kept = tuple(
            (sys.intern(str(name)), value)
            for name, value in headers.items()
            if name.lower() != "set-cookie"
        )
        self.status, self.reason, self.headers = status, reason, kept
        self.has_raw_bytes = has_raw_bytes

    def collect(self, chunk: bytes) -> None:
        if self.chunks is None or not chunk:
            return
        self.size += len(chunk)
        if self.size > self.max_bytes:
            self.chunks = None  # too large to keep: not stored, and not held any longer
            return
        self.chunks.append(chunk)

    def entry(self, record: Record, now: float) -> Entry | None:
        """The answer as an entry stored at `now`, if it may be stored."""
        if self.chunks is None:
            return None
        headers = CIMultiDict(self.headers)
        content_type = headers.get("content-type", "")
        coding = headers.get("content-encoding", "")
        if not is_storable(record, content_type, coding, self.chunks, self.max_bytes):
            return None
        return Entry(
            self.status,
            self.reason,
            self.headers,
            tuple(self.chunks),
            record.usage,
            record.response_model,
            now,
            self.has_raw_bytes,
            record.provider,
            record.cost_usd,  # priced before the cache's sink runs
        )


@dataclass(frozen=True, slots=True)
class Lookup:
    cached: Cached
    entry: Entry | None = None  # a hit: what to replay
    pending: Pending | None = None  # what collects this request's answer, to store it


BYPASS = Lookup(Cached.BYPASS)
# A claim Redis could not be told to let go of (lost for a moment: a failover, a timeout) is
# let go of again after each of these pauses, until Redis answers: 31 s in all.
RELEASE_RETRY_SECONDS = (1.0, 2.0, 4.0, 8.0, 16.0)

log = logging.getLogger("llm_gateway")


class Others(Protocol):
    """The other workers of this gateway (WORKERS > 1), each with its own entries in memory."""

    async def drop(self, prefix: str) -> None:
        """Tell every worker to drop the entries under `prefix` (SIGUSR1, through the
        supervisor); return once each other one has, or after a second (one that died)."""
        ...

    def dropped(self) -> tuple[int, list[str] | None]:
        """The serial of the last drop told, and the prefixes told since this worker last
        asked (None: more than are kept: drop everything)."""
        ...

    def made_drops(self, upto: int) -> None:
        """This worker has made the drops told up to serial `upto`."""
        ...


class Cache:
    def __init__(
        self,
        store: Store,
        *,
        is_shared: bool,
        max_entry_bytes: int,
        wait_seconds: float,
        on_store_lost: Callable[[str], None] = lambda error: None,
        on_size: Callable[[int, int], None] = lambda entries, size: None,
        poll_seconds: float = 0.02,
        clock: Callable[[], float] = time.time,
        others: Others | None = None,
    ) -> None:
        """`is_shared`: the store is Redis (claims and hit counts go there).

        `wait_seconds`: how long a request waits for an identical one in flight;
        `poll_seconds`: how often it looks for the entry of one in flight on another instance.
        `clock`: when an entry is stored, and how old it is when found (the memory store's
        clock; with Redis, Unix time, as every instance reads the entries).
        `others`: the other workers, each with entries of its own, told each drop.
        """
        self._store = store
        self._is_shared = is_shared
        self._max_entry_bytes = max_entry_bytes
        self._wait_seconds = wait_seconds
        self._on_store_lost = on_store_lost
        self._said_store_lost_at = -QUIET_SECONDS  # time.monotonic() of the last line said
        self._on_size = on_size
        self._poll_seconds = poll_seconds
        self._clock = clock
        self._flights = Flights()
        self._tasks: set[asyncio.Task[None]] = set()
        self._awaiting = 0  # requests polling for the entry behind another's claim
        # Claims being let go of again while the store cannot be reached (not `settled`).
        self._retries: set[asyncio.Task[None]] = set()
        self._others = others

    async def lookup(
        self, key: VirtualKey, method: str, tail: str, query: str, headers: MultiMapping[str],
        body: bytes,
    ) -> Lookup:  # fmt: skip
        """A hit, a miss that leads (or follows a failed) flight, or a bypass. Never raises."""
        policy = key.cache
        assert policy is not None, "only keys with a cache are looked up"
        asked, max_age = names.directive(headers)
        if asked is Directive.SKIP or not self._is_cacheable(method, tail, headers, body):
            return BYPASS
        scope = names.scope_of(key.id, policy)
        name = names.entry_name(scope, key.plans.served, method, tail, query, body, headers)
        pending = Pending(
            name,
            policy.ttl_seconds,
            self._max_entry_bytes,
            None,
            names.scope_prefix(scope),
            self._clock(),
        )
        if asked is Directive.REFRESH:
            return Lookup(Cached.BYPASS, pending=pending)
        flight = self._flights.joined(name)
        if flight is not None and self._is_shared:  # a drop on another instance unlists none
            if await self._is_dropped_since(pending.prefix, flight.asked_at):
                # Its answer, asked for before the drop, is not for a request after it.
                self._flights.unlist(name, flight)
                flight = self._flights.joined(name)  # one led since the drop, if any
        if flight is not None:  # an identical request is on its way: its answer, as a hit
            entry = await self._flights.wait(flight, self._wait_seconds)
            if entry is not None:
                return await self._hit(key, entry)
            return Lookup(Cached.MISS, pending=pending)  # it failed: upstream ourselves
        pending.flight = flight = self._flights.lead(name, pending.asked_at)
        try:
            entry = await self._find(name, pending)
        except BaseException:  # cancelled (the client left): the waiters go on their own
            self._flights.end(name, flight)
            raise
        fresh_for = policy.ttl_seconds if max_age is None else min(policy.ttl_seconds, max_age)
        if entry is None or self._is_older(entry, fresh_for):
            return Lookup(Cached.MISS, pending=pending)  # the answer replaces a stale entry
        self._flights.land(flight, entry)
        self._flights.end(name, flight)
        return await self._hit(key, entry)

    def settle(self, found: Lookup, record: Record) -> None:
        """The store sink: keep a miss's answer if storable; land its flight either way."""
        pending = found.pending
        if pending is None:
            return
        entry = pending.entry(record, self._clock())
        pending.chunks = None  # the entry holds them now, or nobody does
        if pending.flight is not None:
            self._flights.land(pending.flight, entry)  # waiters here are served at once
        if entry is not None or pending.is_claimed or pending.flight is not None:
            self._spawn(self._keep(pending, entry))

    def _store_failed(self, error: str) -> None:
        """A call to the store that failed: counted; said on stderr at most once a minute."""
        now = time.monotonic()
        if now - self._said_store_lost_at >= QUIET_SECONDS:
            self._said_store_lost_at = now
            log.warning(
                "cache: the store failed (%s): answers are neither found nor kept there "
                'meanwhile, each failure counted in llm_gateway_redis_errors_total{decision="'
                'uncached"} (said at most once a minute)',
                error,
            )
        self._on_store_lost(error)

    async def hits(self, key: VirtualKey) -> int | None:
        """The key's hits (None: the store cannot be read)."""
        try:
            return await self._store.hits(key.id)
        except StoreUnavailable as error:
            self._store_failed(str(error))
            return None

    def forget(self, key_ids: Iterable[str]) -> None:
        """Keys deleted: their hit counts go (their /usage answers 401)."""
        self._store.forget_hits(key_ids)

    async def drop(self, key: VirtualKey | None = None, scope: str | None = None) -> int:
        """Drop the entries a key reads (its own, or its scope's), or a scope's, and keep
        out the answers of requests that asked before (still in flight: the store refuses
        them, and a request arriving now is not served one: here it leads its own flight;
        behind another instance's claim, it asks upstream once that claim goes). Raises
        StoreUnavailable."""
        if key is not None:
            assert key.cache is not None
            prefix = names.scope_prefix(names.scope_of(key.id, key.cache))
        else:
            assert scope is not None
            prefix = names.scope_prefix(names.shared_scope(scope))
        dropped = await self._drop_here(prefix)
        if self._others is not None:
            await self._others.drop(prefix)
        return dropped

    async def _drop_here(self, prefix: str) -> int:
        """Drop the entries under `prefix` from this process's store. Raises StoreUnavailable."""
        self._flights.forget(prefix)
        dropped = await self._store.drop(prefix, self._clock())
        self._on_size(*self._store.size())
        return dropped

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """While the app runs, with other workers: SIGUSR1 makes the drops they told."""
        if self._others is None:
            yield
            return
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGUSR1, self._on_told)
        try:
            yield
        finally:
            loop.remove_signal_handler(signal.SIGUSR1)
            signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # not the default, which kills

    def _on_told(self) -> None:
        assert self._others is not None
        upto, prefixes = self._others.dropped()
        task = asyncio.get_running_loop().create_task(self._drop_told(upto, prefixes))
        self._tasks.add(task)  # a reference, so the task is not collected mid-flight
        task.add_done_callback(self._tasks.discard)

    async def _drop_told(self, upto: int, prefixes: list[str] | None) -> None:
        """Another worker's drops, made here (None: too many were missed: every entry)."""
        assert self._others is not None
        for prefix in [""] if prefixes is None else prefixes:
            await self._drop_here(prefix)  # memory: never unavailable
        self._others.made_drops(upto)

    def waiting(self) -> int:
        """Requests of this process waiting for an identical one in flight (here, or behind
        a claim in Redis)."""
        return self._flights.waiting() + self._awaiting

    async def settled(self) -> None:
        """Return once every answer kept so far is in the store (for tests, and close)."""
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def close(self) -> None:
        for retry in self._retries:  # a Redis still lost at the end: its claims expire
            retry.cancel()
        await self.settled()
        await self._store.close()

    def _is_cacheable(
        self, method: str, tail: str, headers: MultiMapping[str], body: bytes
    ) -> bool:
        if not names.is_cacheable_endpoint(method, tail):
            return False
        if headers.get("content-encoding", "identity").strip().lower() != "identity":
            return False  # the exact bytes would do as a key, but the body must be read
        try:
            document = orjson.loads(body)
        except orjson.JSONDecodeError:
            return False
        if not isinstance(document, dict):
            return False
        return names.is_cacheable(method, tail, document)

    def _is_older(self, entry: Entry, ttl_seconds: float) -> bool:
        """Stored longer ago than the key's ttl: kept under a longer one (before a reload
        shortened it, or by a key of its scope with a longer one), no answer for this key."""
        return entry.stored_at is not None and self._clock() - entry.stored_at >= ttl_seconds

    async def _find(self, name: str, pending: Pending) -> Entry | None:
        """The stored entry; else None, after another instance's claim came to nothing."""
        store = self._store
        try:
            entry = await store.get(name)
            if entry is not None or not self._is_shared:
                return entry
            try:
                is_claimed = await store.claim(name, self._wait_seconds)
            except asyncio.CancelledError:
                # The client left while the claim was on its way: Redis may have made it,
                # and no answer will come for it. Let go of it (it is ours only if made).
                self._let_go_later(name, (0.0, *RELEASE_RETRY_SECONDS))
                raise
            if is_claimed:
                pending.is_claimed = True
                return None
            return await self._await_other(name)
        except StoreUnavailable as error:
            self._store_failed(str(error))
            return None

    async def _is_dropped_since(self, prefix: str, asked_at: float) -> bool:
        """Whether the entries under `prefix` were dropped (on any instance) at or after
        `asked_at`, as the store keeps such an answer out; False when it cannot tell."""
        try:
            dropped = await self._store.dropped_at(prefix)
        except StoreUnavailable as error:
            self._store_failed(str(error))
            return False
        return dropped is not None and round(dropped * 1000) >= round(asked_at * 1000)

    async def _await_other(self, name: str) -> Entry | None:
        """Another request asks upstream (another instance's, or one here whose flight a
        drop unlisted): poll for its entry while its claim holds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._wait_seconds
        self._awaiting += 1
        try:
            while loop.time() < deadline:
                await asyncio.sleep(self._poll_seconds)
                entry = await self._store.get(name)
                if entry is not None:
                    return entry
                if not await self._store.is_claimed(name):
                    return await self._store.get(name)  # stored just before the claim went
            return None
        finally:
            self._awaiting -= 1

    async def _hit(self, key: VirtualKey, entry: Entry) -> Lookup:
        if self._is_shared:
            self._spawn(self._count_hit(key))
        else:
            await self._store.add_hit(key.id)
        return Lookup(Cached.HIT, entry=entry)

    def _let_go_later(self, name: str, pauses: tuple[float, ...] = RELEASE_RETRY_SECONDS) -> None:
        """Let go of this instance's claim on `name` in the background, after each of `pauses`
        until the store answers (a claim left would hold up every identical request, on
        every instance, until it expires: REQUEST_TIMEOUT)."""
        task = asyncio.get_running_loop().create_task(self._let_go(name, pauses))
        self._retries.add(task)
        task.add_done_callback(self._retries.discard)

    async def _let_go(self, name: str, pauses: tuple[float, ...]) -> None:
        for pause in pauses:
            await asyncio.sleep(pause)
            try:
                await self._store.release(name)
                return
            except StoreUnavailable:
                continue  # lost still: tried again after the next pause

    async def _count_hit(self, key: VirtualKey) -> None:
        try:
            await self._store.add_hit(key.id)
        except StoreUnavailable as error:
            self._store_failed(str(error))

    async def _keep(self, pending: Pending, entry: Entry | None) -> None:
        """Store the entry, then let go of the claim: also when the store failed (Redis
        refused the entry: out of memory, a timeout), or the claim would hold up every
        identical request, on every instance, until it expires (REQUEST_TIMEOUT)."""
        store = self._store
        lost = None
        try:
            if entry is not None:
                try:
                    await store.put(
                        pending.name, entry, pending.ttl_seconds, pending.prefix, pending.asked_at
                    )
                    self._on_size(*store.size())
                except StoreUnavailable as error:
                    lost = error
            if pending.is_claimed:
                try:
                    await store.release(pending.name)
                except StoreUnavailable as error:  # Redis lost for a moment (a failover)
                    lost = lost or error
                    self._let_go_later(pending.name)
            if lost is not None:  # one request, counted once
                self._store_failed(str(lost))
        finally:
            if pending.flight is not None:
                self._flights.end(pending.name, pending.flight)

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
