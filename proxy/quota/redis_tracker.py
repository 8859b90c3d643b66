"""The tracker in Redis: every process and every instance shares one sliding window per key.

Same semantics as `memory_tracker.MemoryTracker` (the same `Reading`, so the same
`Admission` and report), kept in eight Redis keys per virtual key (`redis_scripts.py` lists
them), named from its `key_id` digest (never the key itself) with a `{…}` hash tag so a
cluster keeps them in one slot. The calls go to the one node the URL names and follow no
MOVED, so a cluster of several shards is refused at start (`check`); one of one shard works.

Invariant: `admit` checks, counts and reserves in ONE Lua script, so no other client can
run between the check and the count (no read-then-write race), and a refused request is
not counted. The time is Redis's own `TIME`, read inside the script, so every instance sees
one clock. The window keys expire (PEXPIRE) one window after their last write, so memory
stays bounded by the active keys; the totals hash stays. Each script is loaded once and
called by its SHA (EVAL with its source when Redis answers NOSCRIPT, e.g. after it restarted).
The calls go over one pipelined connection per process (`redis_wire.py`), not redis-py's
pooled client, whose own work per call cost more CPU than the rest of the admission.

One round trip per request: `settle` sends nothing itself. It holds the settle, and the
key's next `admit` (or `report`) in this process carries it in the same script, applied
before the check. Settles no admission picked up within SETTLE_DELAY_SECONDS go in one
background call per key. Until then other processes see the request's reservation in place
of its real cost: the bound on overshoot is unchanged, only later by that delay.

Deferred work owed (a background response, a batch) is one more key per work,
`deferred:{<deferred id>}`, holding what is owed (`Owed`: the creating key's digest, the
origin, what was charged already) and expiring after the owing module's time (a day for a
background response); its claim, by whichever key, is a GET and a DEL in one MULTI, and only
the caller whose DEL answers 1 charges it.

Failure: socket timeouts are short and nothing is retried (a retried script may already
have counted), so a lost Redis fails within about a second; every Redis error becomes
`TrackerUnavailable`, and `quota` applies QUOTA_ON_REDIS_ERROR (an admit that timed out
may still run once Redis wakes: it then counts a request that was let through or refused,
which errs toward the limit, never past it). A lost connection is opened again by the next
call, so the tracker recovers by itself when Redis is back. A caller that leaves while its
admission is on its way (its client closed the connection) is not waited for, but what the
script admits is given back when Redis answers: no reservation or slot held for nobody.
Needs Redis 5 or later (scripts replicate their effects, so `TIME` before writes is allowed).
"""

from __future__ import annotations

import asyncio
import functools
import math
import os
import re
import ssl
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import orjson
import redis
from redis.exceptions import RedisError, ResponseError

from proxy.quota.redis_scripts import CLAIM, OWE, RENEW, SCRIPTS, SETTLE_FIELDS
from proxy.quota.redis_wire import RedisWire, ReplyError, Script, pack
from proxy.quota.tracker import (
    NO_KINDS,
    NOTHING,
    Admission,
    Budget,
    Charge,
    Limits,
    Owed,
    Reading,
    Scope,
    TrackerUnavailable,
    admission,
    report,
)
from proxy.quota.window import clamped

KEY_PREFIX = "llm-gateway:"
CLUSTER_SLOTS = 16384
# Short, so that a lost Redis costs a request one second at most, not the default five.
TIMEOUT_SECONDS = 1.0
# A connection idle this long is PINGed before use (NAT and proxies drop idle TCP silently).
HEALTH_CHECK_SECONDS = 30
# How long a settle waits for the key's next admission to carry it before going alone.
SETTLE_DELAY_SECONDS = 0.05
REASON_CHARS = 200
_CONNECT_ERROR = re.compile(r"Error (-?\d+) connecting to \S+?\.? (.*?)\.?$")

_KEY_NAMES = (
    "admissions",
    "charges",
    "charged",
    "totals",
    "reservations",
    "reserved",
    "spend",
    "spent",
    "in_flight",
)
# A slot's lease lasts this long unless renewed; a running request renews it every third of
# it, so a process killed while holding slots gives them back within LEASE_SECONDS.
LEASE_SECONDS = 10.0

Policy = tuple[Limits | None, Budget | None]


class RedisTracker:
    """The tracker over one Redis, shared by every gateway process that points at it."""

    def __init__(
        self,
        url: str,
        clock: Callable[[], float] | None = None,
        settle_delay: float = SETTLE_DELAY_SECONDS,
    ) -> None:
        # `clock` (seconds) replaces Redis TIME, for tests that step through windows.
        self._clock = clock
        self._settle_delay = settle_delay
        # One pipelined connection per process, RESP2 (works down to Redis 5).
        self._wire = RedisWire(url, TIMEOUT_SECONDS, "llm-gateway", HEALTH_CHECK_SECONDS)
        self._admit = Script(SCRIPTS["admit"])
        self._settle = Script(SCRIPTS["settle"])
        self._report = Script(SCRIPTS["report"])
        self._renew = Script(RENEW)
        self._owe, self._claim = Script(OWE), Script(CLAIM)
        self._release = Script(SCRIPTS["release"])
        # lease → the lease sets it holds a slot in, renewed while the request runs.
        self._leases: dict[str, list[str]] = {}
        self._renewer: asyncio.Task[None] | None = None
        self._renewing: asyncio.Future[Any] | None = None  # a renewal on its way to Redis
        self._releasing: set[asyncio.Task[None]] = set()
        # scope id → releases of its slots on their way: an admission in the scope waits for
        # them, so a client that sends its next request the moment it has its answer finds
        # its slot free (in this process; another process may ask before the release lands).
        self._freeing: dict[str, set[asyncio.Task[None]]] = {}
        self.lease_seconds = LEASE_SECONDS
        # key_id → (the latest policy, the settles waiting for a ride: ticket, tokens, µ$,
        # when it ended in µs of the local clock, and the tokens by kind).
        self._held: dict[str, tuple[Policy, list[int]]] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._flushing: set[asyncio.Task[None]] = set()
        # Admissions whose caller left while Redis had them: given back when they answer.
        self._abandoned: set[asyncio.Future[list[Reading]]] = set()
        self.on_settle_failed: Callable[[str], None] = lambda error: None

    async def admit(
        self,
        key_id: str,
        limits: Limits | None,
        budget: Budget | None = None,
        claim: Charge = NOTHING,
    ) -> Admission:
        """Admit, count and reserve `claim`, or refuse without counting. Raises TrackerUnavailable."""
        scope = Scope(key_id, "key", "", limits, budget)
        return (await self.admit_scopes((scope,), claim))[0]

    async def admit_scopes(
        self, scopes: Sequence[Scope], claim: Charge = NOTHING, lease: str = ""
    ) -> tuple[Admission, ...]:
        """Admit in every scope or in none: one script, one round trip. Raises TrackerUnavailable."""
        if self._freeing:
            freeing = [t for s in scopes for t in self._freeing.get(s.id, ())]
            if freeing:
                await asyncio.wait(freeing)
        tokens = clamped(claim.tokens)
        micro = clamped(claim.micro_usd)
        lease_us = round(self.lease_seconds * 1e6)
        asking = asyncio.ensure_future(
            self._run(self._admit, scopes, tokens, micro, lease, lease_us)
        )
        try:
            readings = await asyncio.shield(asking)
        except asyncio.CancelledError:
            # The caller left (its client closed the connection) with the script on its
            # way: Redis runs it all the same, and what it admits is given back when it
            # answers, not held for nobody until it counts as leaked (RESERVATION_SECONDS).
            self._abandoned.add(asking)
            asking.add_done_callback(functools.partial(self._give_back_abandoned, scopes, lease))
            raise
        if lease and readings[0].admitted:
            sets = [window_keys(s.id)[-1] for s in scopes if s.max_in_flight is not None]
            if sets:
                self._leases[lease] = sets
                self._renew_soon()
        return tuple(
            admission(r, s.limits, s.budget) for r, s in zip(readings, scopes, strict=True)
        )

    def _give_back_abandoned(
        self, scopes: Sequence[Scope], lease: str, asking: asyncio.Future[list[Reading]]
    ) -> None:
        """An admission whose caller left: its reservations settled at nothing, its slots
        released. Not when it failed (Redis lost: a late run then leaks, as any timed out)."""
        self._abandoned.discard(asking)
        if asking.cancelled() or asking.exception() is not None:
            return
        readings = asking.result()
        if not readings[0].admitted:
            return
        for scope, reading in zip(scopes, readings, strict=True):
            self.settle(scope.id, scope.limits, NOTHING, reading.ticket, scope.budget)
        if lease and any(scope.max_in_flight is not None for scope in scopes):
            self._leases[lease] = []  # held, for `release` to give back
            self.release(scopes, lease, lambda: None)

    def settle_scopes(self, scopes: Sequence[Scope], spent: Charge, tickets: Sequence[int]) -> None:
        for scope, ticket in zip(scopes, tickets, strict=True):
            self.settle(scope.id, scope.limits, spent, ticket, scope.budget)

    def release(self, scopes: Sequence[Scope], lease: str, done: Callable[[], None]) -> None:
        """Give the lease's slots back now, in one call sent without waiting for it, which
        also carries the settles held for the scopes (the request's own among them)."""
        if self._leases.pop(lease, None) is None:
            done()
            return
        task = asyncio.get_running_loop().create_task(self._give_back(scopes, lease, done))
        self._releasing.add(task)
        task.add_done_callback(self._releasing.discard)
        for scope in scopes:
            if scope.max_in_flight is not None:
                self._freeing.setdefault(scope.id, set()).add(task)
                task.add_done_callback(functools.partial(self._freed, scope.id))

    def _freed(self, scope_id: str, task: asyncio.Task[None]) -> None:
        tasks = self._freeing.get(scope_id)
        if tasks is not None:
            tasks.discard(task)
            if not tasks:
                del self._freeing[scope_id]

    async def in_flight(self, scope: Scope) -> int:
        """The scope's slots held now, in every process. Raises TrackerUnavailable."""
        return max(0, (await self._run(self._report, (scope,)))[0].slots)

    async def _give_back(
        self, scopes: Sequence[Scope], lease: str, done: Callable[[], None]
    ) -> None:
        try:
            renewing = self._renewing
            if renewing is not None:  # it may add this lease back: remove it after
                await asyncio.wait([renewing])
            await self._carry(self._release, scopes, lease)
        except TrackerUnavailable:
            pass  # the lease expires within lease_seconds
        finally:
            done()

    def _renew_soon(self) -> None:
        if self._renewer is None or self._renewer.done():
            self._renewer = asyncio.get_running_loop().create_task(self._renew_leases())

    async def _renew_leases(self) -> None:
        """Every third of a lease's life, push back the expiry of every lease still held,
        adding back any Redis lost (restarted empty): the slots are taken again."""
        while self._leases:
            await asyncio.sleep(self.lease_seconds / 3)
            keys: list[str] = []
            args: list[str] = []
            for lease, sets in list(self._leases.items()):
                keys += sets
                args += [lease] * len(sets)
            if not keys:
                continue
            life = round(self.lease_seconds * 1e6)
            self._renewing = asyncio.ensure_future(self._wire.run(self._renew, keys, [life, *args]))
            try:
                await self._renewing
            except (ReplyError, OSError):
                pass  # Redis lost: the next round adds them back
            finally:
                self._renewing = None

    def settle(
        self,
        key_id: str,
        limits: Limits | None,
        spent: Charge,
        ticket: int = 0,
        budget: Budget | None = None,
    ) -> None:
        """Hold the settle for the key's next admission to carry; never waits on Redis."""
        tokens = clamped(spent.tokens)
        micro = clamped(spent.micro_usd)
        held = self._held.get(key_id)
        settles = held[1] if held is not None else []
        settles += (ticket, tokens, micro, self._now_us())
        settles += (clamped(count) for count in spent.kinds)
        self._held[key_id] = ((limits, budget), settles)
        if self._timer is None:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(self._settle_delay, self._flush_later)

    async def report(
        self, key_id: str, limits: Limits | None, budget: Budget | None = None
    ) -> dict[str, Any]:
        """The key's windows and totals, as `GET /usage` answers them. Raises TrackerUnavailable."""
        readings = await self._run(self._report, (Scope(key_id, "key", "", limits, budget),))
        return report(readings[0], limits, budget)

    async def owe(self, deferred_id: str, owed: Owed, seconds: float) -> None:
        """Remember for `seconds` what is owed for the deferred work `deferred_id`."""
        try:
            value = orjson.dumps(encoded(owed))
            expiry = max(1, math.ceil(seconds))
            await self._wire.run(self._owe, (owed_key(deferred_id),), (value, expiry))
        except (ReplyError, OSError) as error:
            raise TrackerUnavailable(f"Redis: {reason(error)}") from error

    async def claim(self, deferred_id: str) -> Owed | None:
        """Take what is owed for `deferred_id`, whoever asks: the one caller whose script
        found it gets it (GET and DEL in one script, so no other client runs between them)."""
        try:
            value = await self._wire.run(self._claim, (owed_key(deferred_id),), ())
        except (ReplyError, OSError) as error:
            raise TrackerUnavailable(f"Redis: {reason(error)}") from error
        return None if value is None else decoded(value)

    async def flush(self) -> None:
        """Send every held settle now, and wait for those already on their way (and for
        the admissions whose caller left, whose give-back is one)."""
        if self._abandoned:  # waited for, never cancelled (gather would cancel them)
            await asyncio.wait(list(self._abandoned))
        await asyncio.gather(self._send_held(), *self._flushing)

    def forget(self, scope_ids: Iterable[str]) -> None:
        """Nothing: every window and total is in Redis (a deleted key's totals hash stays
        there, as its windows do until they expire)."""

    async def ping(self) -> None:
        """Whether Redis takes writes again, on the connection the scripts use (opened again
        if it was lost): a write that changes nothing (PEXPIRE of a key that never exists),
        since a replica (a primary a failover demoted) answers PING but refuses every
        script, and would pass for a Redis that answers again."""
        try:
            (answer,) = await self._wire.call(pack("PEXPIRE", f"{KEY_PREFIX}ping", 1))
        except (ReplyError, OSError) as error:  # ReplyError: a new connection's handshake refused
            raise TrackerUnavailable(f"Redis: {reason(error)}") from error
        if isinstance(answer, ReplyError):  # LOADING, MISCONF...: not answering scripts
            raise TrackerUnavailable(f"Redis: {answer}")

    async def close(self) -> None:
        """Send what is held, then close the connection; the state stays in Redis."""
        await self.flush()
        if self._renewer is not None:
            self._renewer.cancel()
        await asyncio.gather(*self._releasing)
        await self._wire.close()

    def _flush_later(self) -> None:
        task = asyncio.get_running_loop().create_task(self._send_held())
        self._flushing.add(task)  # a reference, so the task is not collected mid-flight
        task.add_done_callback(self._flushing.discard)

    async def _send_held(self) -> None:
        """Each key's held settles in one call per key (those no admission carried in time)."""
        if self._timer is not None:
            self._timer.cancel()
        self._timer = None
        held, self._held = self._held, {}
        await asyncio.gather(
            *(self._send(key_id, policy, settles) for key_id, (policy, settles) in held.items())
        )

    async def _send(self, key_id: str, policy: Policy, settles: list[int]) -> None:
        try:
            scope = Scope(key_id, "key", "", policy[0], policy[1])
            await self._call(self._settle, (scope,), {key_id: settles})
        except TrackerUnavailable as error:
            # The tokens are lost to the window; the log line and metrics still have them.
            self.on_settle_failed(str(error))

    async def _run(self, script: Script, scopes: Sequence[Scope], *own: int | str) -> list[Reading]:
        """Run `script` over the scopes, carrying the settles held for each: its readings."""
        return [parsed(values) for values in await self._carry(script, scopes, *own)]

    async def _carry(self, script: Script, scopes: Sequence[Scope], *own: int | str) -> Any:
        """Run `script` over the scopes, carrying the settles held for each: its answer."""
        settles: dict[str, list[int]] = {}
        for scope in scopes:
            held = self._held.pop(scope.id, None)
            if held is not None:
                settles[scope.id] = held[1]
        try:
            answers = await self._call(script, scopes, settles, *own)
        except TrackerUnavailable as error:
            if settles:
                self.on_settle_failed(str(error))
            raise
        return answers

    def _now_us(self) -> int:
        return round((self._clock or time.monotonic)() * 1e6)

    async def _call(
        self,
        script: Script,
        scopes: Sequence[Scope],
        settles: dict[str, list[int]],
        *own: int | str,
    ) -> Any:
        now_us = -1 if self._clock is None else round(self._clock() * 1e6)
        local_now = self._now_us()
        keys: list[str] = []
        args: list[int | str] = [now_us, len(scopes)]
        for scope in scopes:
            keys += window_keys(scope.id)
            held = settles.get(scope.id, [])
            args += policy_args(scope)
            args.append(len(held) // SETTLE_FIELDS)
            # Each settle's end, as an age: Redis TIME minus the age is its time on Redis's clock.
            args += [
                value if index % SETTLE_FIELDS != 3 else max(0, local_now - value)
                for index, value in enumerate(held)
            ]
        args += own
        try:
            return await self._wire.run(script, keys, args)
        except (ReplyError, OSError) as error:
            raise TrackerUnavailable(f"Redis: {reason(error)}") from error


def policy_args(scope: Scope) -> list[int]:
    """A scope's policy as the scripts read it (POLICY_FIELDS - 1 values; -1: none)."""
    limits, budget = scope.limits, scope.budget
    if limits is None:
        quota = [0, -1, -1]
    else:
        token_limit = -1 if limits.tokens is None else limits.tokens
        quota = [round(limits.window_seconds * 1e6), limits.requests, token_limit]
    spending = [-1, 0] if budget is None else [budget.micro_usd, round(budget.window_seconds * 1e6)]
    cap = -1 if scope.max_in_flight is None else scope.max_in_flight
    return [*quota, *spending, cap]


def parsed(values: list[int]) -> Reading:
    """One scope's answer from a script, as a Reading."""
    admitted, ticket, size, leaves, used, reserved, wait, charge_leaves, *rest = values
    spent, spend_reserved, spend_wait, spend_leaves, full, slots, slots_full, *rest = rest
    requests, tokens, micro, *kinds = rest
    return Reading(
        admitted=bool(admitted),
        ticket=ticket,
        full=bool(full),
        slots=slots,
        slots_full=bool(slots_full),
        requests=size,
        request_leaves=leaves / 1e6,
        tokens=used,
        tokens_reserved=reserved,
        token_wait=wait / 1e6,
        charge_leaves=charge_leaves / 1e6,
        spent=spent,
        spend_reserved=spend_reserved,
        budget_wait=spend_wait / 1e6,
        spend_leaves=spend_leaves / 1e6,
        total_requests=requests,
        total_tokens=tokens,
        total_micro_usd=micro,
        total_kinds=tuple(kinds) if kinds else NO_KINDS,
    )


def window_keys(key_id: str) -> list[str]:
    """The Redis keys of one scope, in the scripts' KEYS order. A model group's id is its
    key's id, '/', its own: it shares the key's hash tag."""
    tag, slash, group = key_id.partition("/")
    base = f"{KEY_PREFIX}{{{tag}}}{slash}{group}:"
    return [base + name for name in _KEY_NAMES]


def owed_key(deferred_id: str) -> str:
    """The Redis key of deferred work owed, by its id alone (never a virtual key)."""
    return f"{KEY_PREFIX}deferred:{{{deferred_id}}}"


def encoded(owed: Owed) -> list[object]:
    """What is owed as Redis keeps it: [key id, origin, tokens, µ$, tokens by kind...]."""
    charged = owed.charged
    return [owed.key_id, owed.origin, charged.tokens, charged.micro_usd, *charged.kinds]


def decoded(value: bytes) -> Owed | None:
    """What `encoded` wrote; None for a value it did not write (nothing to charge)."""
    try:
        key_id, origin, tokens, micro, *kinds = orjson.loads(value)
    except (orjson.JSONDecodeError, TypeError, ValueError):
        return None
    if not (isinstance(key_id, str) and isinstance(origin, str) and len(kinds) == len(NO_KINDS)):
        return None
    if not all(type(count) is int for count in (tokens, micro, *kinds)):
        return None
    return Owed(key_id, origin, Charge(tokens, micro, tuple(kinds)))


def reason(error: Exception) -> str:
    """A short, key-free cause of a Redis failure, e.g. 'Connection refused'."""
    cause: BaseException | None = error
    while cause is not None and not isinstance(cause, OSError):
        cause = cause.__cause__ or cause.__context__
    # A TLS error's errno (1, EPERM) says nothing of TLS: "Operation not permitted".
    if isinstance(cause, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {cause.verify_message}"[:REASON_CHARS]
    if isinstance(cause, ssl.SSLError):
        return f"TLS: {cause.reason or type(cause).__name__}"[:REASON_CHARS]
    if isinstance(cause, OSError) and isinstance(cause.errno, int) and cause.errno > 0:
        return os.strerror(cause.errno)  # asyncio's own text names the address instead
    if isinstance(cause, OSError) and cause.strerror:
        return cause.strerror[:REASON_CHARS]
    # redis-py may re-raise its "Error 111 connecting to host:port. …" without the OSError.
    connecting = _CONNECT_ERROR.match(str(error))
    if connecting and int(connecting[1]) > 0:
        return os.strerror(int(connecting[1]))
    if connecting:
        return connecting[2][:REASON_CHARS]
    return (str(error).strip() or type(error).__name__)[:REASON_CHARS]


def check(url: str) -> None:
    """Connect, PING and load the scripts, as at start. Raises TrackerUnavailable saying what failed."""
    client = redis.Redis.from_url(
        url,
        socket_timeout=2 * TIMEOUT_SECONDS,
        socket_connect_timeout=2 * TIMEOUT_SECONDS,
        protocol=2,
    )
    try:
        try:
            client.ping()
            served = _slots_served(client)
        except (RedisError, OSError) as error:
            raise TrackerUnavailable(f"cannot connect ({reason(error)})") from None
        if served is not None and served < CLUSTER_SLOTS:
            raise TrackerUnavailable(
                f"a Redis Cluster node serving {served} of the {CLUSTER_SLOTS} slots: the "
                "gateway speaks to the one node REDIS_URL names (other keys would be answered "
                "MOVED); give it a single Redis, a primary with replicas, or a cluster of one "
                "shard"
            )
        try:
            for source in (*SCRIPTS.values(), RENEW, OWE, CLAIM):
                client.script_load(source)
        except (RedisError, OSError) as error:
            raise TrackerUnavailable(f"cannot load the quota scripts ({reason(error)})") from None
    finally:
        client.close()


def _slots_served(client: redis.Redis) -> int | None:
    """How many of a cluster's slots the node holds itself; None when it is no cluster, or
    when the server will not say (an ACL without INFO, a managed Redis that renamed CLUSTER):
    then nothing is refused."""
    try:
        if not client.info("cluster").get("cluster_enabled"):
            return None
        nodes = client.execute_command("CLUSTER", "NODES")  # type: ignore[no-untyped-call]
    except ResponseError:
        return None
    text = nodes.decode() if isinstance(nodes, bytes) else str(nodes)
    served = 0
    for line in text.splitlines():
        fields = line.split()
        if len(fields) > 8 and "myself" in fields[2].split(","):
            for span in fields[8:]:
                if span.startswith("["):  # a slot being moved in or out
                    continue
                first, _, last = span.partition("-")
                served += int(last or first) - int(first) + 1
    return served
