"""The attempt loop: send a request along its plan until a target answers, before the first byte.

`forward` walks the plan's targets in order (skipping those whose breaker is open), and on
each target the pool's usable keys. It yields the first answer worth passing on; it never
retries once it has yielded, so nothing that reached the client is ever sent twice, and a
client that leaves cancels the loop with its handler.

When to try again (and nothing else), top to bottom:

    not sent: refused, DNS, TLS            502 unreachable   same target (RETRY_ATTEMPTS), then the next
    not sent: no connection in time        504 timeout       same target (RETRY_ATTEMPTS), then the next
    sent, no headers in REQUEST_TIMEOUT    504 timeout       GET, PUT, DELETE...: as above; POST: never
    sent, then closed or reset             502 unreachable   GET, PUT, DELETE...: as above; POST: never
    408, 500, 502, 503, 504, 529           the provider's    same target (RETRY_ATTEMPTS), then the next
      ... its body broken off or stalled   502 broken, 504   as above (nothing of it reached the client)
    429                                    the provider's    the pool's next key at once; else as above
    401, 403 (the key refused)             the provider's    that key rests; the pool's next key at once, else
                                                             the next target (a lone key of the last: never)
    402 (the key's account out of credit)  the provider's    that key rests; the pool's next key, else the next target
    200 stream, its first event an error   the provider's    as the status it stands for (below)
      of the moment: overloaded, 429, 5xx   stream, kept
    anything else (400, 404, 413, 422...)  the provider's    never: it goes to the client as it is

A stream's first event: when the request has somewhere else to go (a target after this
one, a retry, a pool key not yet asked), a 200 event stream is not passed on until its
first event is at hand (nothing of it reached the client: the relay's head waits for the
first chunk too). One whose first event is the provider's error of the moment (Anthropic's
`overloaded_error` event, OpenAI's or OpenRouter's `data: {"error": ...}` chunk; past the
stream's start that says nothing yet, Anthropic's `message_start` and `ping`, OpenAI's role
chunk: first_event.py) is that attempt's failure, as the status it stands for (529, 429, 500...):
its breaker or its key's rest hears it so, the log's attempt shows 200 and the error, and
the stream is kept whole as the answer should nothing else answer. Nothing was generated,
so asking again is safe. Read are at most FIRST_EVENT_BYTES, for at most
RETRY_MAX_WAIT_SECONDS (and not past the deadline); a first event slower, larger, or of
content goes on as it came, and an error after content is the stream's. With nowhere else
to go nothing is read first: the stream goes on byte for byte, as it does for a key of one
target (one attempt, no walk).

In a pool of several keys, a failure tried again above goes first to a key of the pool not
yet asked, at once, whatever RETRY_ATTEMPTS: a wait is for asking the same key again. Once
every usable key was asked, RETRY_ATTEMPTS more attempts (each after its wait) go to any
usable key; then the next target.

When every key of the targets a request could try rests (429, 401, 403), the key whose rest
ends first is asked all the same, as the least recently failed target is when every breaker
is open: the client gets the provider's own answer, never nothing.

A request written to a connection may be at work at the provider (a generation runs, and
is billed, whether or not its answer comes back), so a POST that got no answer is never
sent again, here or to a fallback: one slow generation costs one generation. The record
is told (`saw_unanswered`), and the exchange charges it what it reserved. A client that
leaves meanwhile is the same for the record. The target's breaker hears of such a failure
with the key's name: it may be the request's own doing (breaker.py).

A provider answering `x-should-retry: false` (OpenAI does) is not asked again for the
request, as its SDKs would not: the pool's other keys and the fallbacks are asked all the same.

Waits between attempts on one target are exponential with full jitter, or what the
provider asked for (`retry-after-ms`, `retry-after` in seconds or as an HTTP date). A wait
longer than RETRY_MAX_WAIT_SECONDS, or than what is left of RETRY_DEADLINE_SECONDS, is not
waited: the next target is tried at once, or the answer goes to the client. No attempt
starts after the deadline; one already started keeps its own REQUEST_TIMEOUT.

When everything fails, the client gets the last provider answer unchanged (status, headers,
body), or the gateway's 502/504 when no provider answered, and always when the last try was
a POST sent and left unanswered (it may be running). A retryable answer is read whole
to be kept: one of known length up to `KEPT_ANSWER_BYTES`, or one sent without a length
(chunked: errors from behind many proxies and CDNs) that ends within what the wire buffers
unread (`wire.HIGH_WATER`). A larger one goes to the client as it is, none of it taken.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from collections.abc import Set as AbstractSet
from contextlib import asynccontextmanager
from dataclasses import dataclass

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from proxy.encodings import content_coding
from proxy.errors import GatewayError
from proxy.record import GRACE_OVER, Attempt, Outcome, Record, cut_by_gateway
from proxy.upstream.breaker import Breakers
from proxy.upstream.described import described, out_of_files, where
from proxy.upstream.first_event import MORE, Reader, decoded, reader
from proxy.upstream.outbound import Outbound, build
from proxy.upstream.refusals import (
    OUT_OF_CREDIT,
    SPENT_QUOTA,
    asked_wait,
    google_retry_delay,
    is_spent,
    refused_as,
    refuses_keys_with_400,
)
from proxy.upstream.signing import SigningFailed
from proxy.upstream.targets import WEIGHTED, Credential, Plan, Pool, Target, affinity_of
from proxy.upstream.wire import IDEMPOTENT, Wire
from proxy.upstream.wire import Reply as WireReply

# Told of each attempt before it is sent (method, url, headers, provider, model): a trace's
# client span, whose context it writes into the headers (observe/tracing.py).
OnAttempt = Callable[[str, URL, CIMultiDict[str], str, str | None], None]

RETRYABLE = frozenset((408, 429, 500, 502, 503, 504, 529))
KEY_REFUSED = frozenset((401, 403))
KEPT_ANSWER_BYTES = 1 << 20
BACKOFF_BASE_SECONDS = 0.5
# How long a pool key rests after a 429 without Retry-After, and after a 401/403 or 402.
RATE_LIMITED_REST_SECONDS = 30.0
REFUSED_KEY_REST_SECONDS = 300.0
# The most of a 200 stream read, before any goes on, for its first event (first_event.py).
FIRST_EVENT_BYTES = 1 << 14


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """RETRY_* settings, and the per-attempt bound on waiting for headers."""

    attempts: int = 0
    max_wait_seconds: float = 10.0
    deadline_seconds: float = 60.0
    request_timeout: float = 600.0


class StoredAnswer:
    """A provider answer read whole while the loop went on: passed on as it came."""

    def __init__(self, reply: WireReply, body: bytes) -> None:
        self.status, self.reason = reply.status, reply.reason
        self.headers: CIMultiDictProxy[str] = reply.headers
        self.has_raw_bytes = reply.has_raw_bytes
        self.body = body
        self.content_length = len(body)

    async def read(self) -> bytes:
        return self.body

    def close(self) -> None:
        pass


Reply = WireReply | StoredAnswer
# The pool and key whose answer went on: in flight until the client has it all (None: a
# plan of one key, which has nothing to choose).
Serving = tuple[Pool, Credential] | None


class Forwarded:
    """The answer a walk found, as an async context manager: closed on leaving it.

    A class, not @asynccontextmanager: this is on every request's path, and a generator
    and its wrapper cost several times what two plain methods do."""

    __slots__ = ("_walking", "_walk", "_reply")

    def __init__(self, walking: Coroutine[object, object, Reply], walk: _Walk | None) -> None:
        """`walking`: a walk along `walk`, or (`walk` None) the one attempt of a plan of one
        key without retries, awaited here without a walk's coroutine around it."""
        self._walking = walking
        self._walk = walk
        self._reply: Reply | None = None

    async def __aenter__(self) -> Reply:
        try:
            self._reply = await self._walking
        except Failed as failed:  # the one attempt's (a walk gives up on its own)
            raise unanswered(failed) from None
        return self._reply

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._reply is not None
        # Closing (not releasing) drops a connection whose body was not read to the end,
        # which is how a client that left cancels the upstream request at once.
        self._reply.close()
        if self._walk is not None and self._walk.serving is not None:
            pool, credential = self._walk.serving
            pool.ended(credential)


@dataclass(slots=True)
class _Walk:
    """One request's progress along its plan: the last answer kept, the last failure."""

    deadline: float  # no attempt starts after this (the breakers' clock)
    kept: StoredAnswer | None = None
    failure: Failed | None = None
    is_over: bool = False
    on_attempt: OnAttempt | None = None  # None: traces off
    affinity: bytes | None = None  # the request's conversation (targets.affinity_of)
    # The pool and key whose answer went on: in flight until the client has it all.
    serving: Serving = None
    is_followed: bool = False  # a target after the one being tried
    # The status the last answer stands for: a 200 stream whose first event was an error
    # (its kind and the status; None: the answer's own status is what it is).
    stood_for: tuple[str, int] | None = None

    def give_up(self) -> Reply:
        """The last provider answer; else the gateway's 502/504, carrying how it failed."""
        if self.kept is not None:
            return self.kept
        assert self.failure is not None, "a plan has at least one target and one key"
        raise unanswered(self.failure)


class Failed(Exception):
    """One attempt got no answer: how (an Outcome) and why, in words; `sent`: the request
    was written, so the provider may be at work on it."""

    def __init__(self, outcome: Outcome, why: str, sent: bool = False) -> None:
        super().__init__(why)
        self.outcome, self.why, self.sent = outcome, why, sent


class OutOfFiles(Failed):
    """The gateway had no file descriptor to reach the provider with: its own failure, not
    the target's (no breaker hears it), answered 503 (`out_of_files_error`)."""

    def __init__(self, why: str) -> None:
        super().__init__(Outcome.REFUSED, why)


_UNANSWERED_CODES = {Outcome.TIMEOUT: "upstream_timeout", Outcome.BROKEN: "upstream_broken"}


def unanswered(failure: Failed) -> GatewayError:
    """The gateway's 502/504 when no provider answered, carrying how the last try failed;
    its 503 when the last try had no file descriptor."""
    if isinstance(failure, OutOfFiles):
        return out_of_files_error(failure.why)
    status = 504 if failure.outcome is Outcome.TIMEOUT else 502
    code = _UNANSWERED_CODES.get(failure.outcome, "upstream_unreachable")
    message = failure.why[0].upper() + failure.why[1:] + "."
    return GatewayError(status, code, message, outcome=failure.outcome, why=failure.why)


def out_of_files_error(why: str) -> GatewayError:
    """503 too_many_open_files: the gateway's own limit, retried as the cap's 503 is."""
    message = why[0].upper() + why[1:] + "."
    return GatewayError(503, "too_many_open_files", message, headers={"Retry-After": "1"}, why=why)


class Failover:
    """Walks plans for the relay; holds the retry policy and every target's breaker."""

    def __init__(
        self,
        policy: RetryPolicy,
        breakers: Breakers,
        max_body_bytes: int,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
        jitter: Callable[[float, float], float] = random.uniform,
        on_out_of_files: Callable[[str], None] | None = None,
    ) -> None:
        """`on_out_of_files`: told why when an attempt had no file descriptor (/health)."""
        self.policy = policy
        self.breakers = breakers
        self._wire: Wire | None = None  # set while the app runs (use)
        self._max_body_bytes = max_body_bytes
        self.sleep = sleep  # a retry's wait (a test's moves its clock instead)
        self._jitter = jitter
        self._on_out_of_files = on_out_of_files

    def use(self, wire: Wire | None) -> None:
        """Send through `wire` (the app's one, while it runs; None once it closed)."""
        self._wire = wire

    def order(self, plan: Plan, affinity: str | None = None) -> tuple[Target, ...]:
        """The plan's targets in the order a walk tries them (`forward` takes it back): as
        listed, or with "latency" the one chosen now first (targets.py)."""
        targets = plan.targets
        if len(targets) == 1 or plan.balance == WEIGHTED:
            return targets
        breakers = self.breakers
        conversation = None if affinity is None else affinity_of(affinity)
        return plan.in_order(breakers.clock(), conversation, breakers.is_closed)

    def first_tried(self, order: tuple[Target, ...]) -> Target:
        """The target a walk along `order` tries first as things stand: the first whose
        breaker is closed, else (all open) the least recently failed. Where a request's
        reservation is priced: what serves it unless that target fails without an answer."""
        if len(order) == 1:
            return order[0]
        breakers = self.breakers
        for target in order:
            if breakers.is_closed(target.name):
                return target
        return min(order, key=lambda t: breakers[t.name].last_failure)

    def forward(
        self,
        request: web.Request,
        plan: Plan,
        tail: str,
        query: str,
        body: bytes,
        record: Record,
        on_attempt: OnAttempt | None = None,
        affinity: str | None = None,
        order: tuple[Target, ...] | None = None,
        headers: CIMultiDictProxy[str] | None = None,
        method: str | None = None,
    ) -> Forwarded:
        """`async with` it for the answer to pass on. Raises 502/504 when no provider answered.

        `on_attempt`: told of each attempt before it goes (None: traces off).
        `affinity`: the conversation the request belongs to (None: none), kept on one key.
        `order`: the targets in the order to try them, as `order` gave them when the
        request was admitted (None: chosen now).
        `headers`: the client's headers as the gateway changed them (None: as sent).
        `method`: the one to send (None: the client's; a HEAD of a model list asks its GET).
        """
        incoming = request.headers if headers is None else headers
        method = request.method if method is None else method
        if plan.is_single and self.policy.attempts == 0:
            # One target, one key, no retries: one attempt, and whatever it gets goes on
            # (what a walk would do too, without its bookkeeping and its coroutine).
            target = plan.primary
            outbound = build(
                target, method, incoming, tail, query, body,
                record.request_id, self._max_body_bytes,
            )  # fmt: skip
            credential = target.pool.credentials[0]
            return Forwarded(self._attempt(outbound, credential, record, on_attempt), None)
        walk = _Walk(
            self.breakers.clock() + self.policy.deadline_seconds,
            on_attempt=on_attempt,
            affinity=None if affinity is None else affinity_of(affinity),
        )
        walked = self._walk(method, incoming, plan, tail, query, body, record, walk, order)
        return Forwarded(walked, walk)

    @asynccontextmanager
    async def fetch(
        self,
        target: Target,
        credential: Credential,
        tail: str,
        query: str,
        headers: CIMultiDictProxy[str],
        request_id: str,
    ) -> AsyncIterator[WireReply]:
        """A GET the gateway makes on its own (a batch's output) with one target's key: one
        attempt, no retry, no breaker told. Raises aiohttp.ClientError, SigningFailed, and
        TimeoutError when no headers came within REQUEST_TIMEOUT."""
        wire = self._wire
        if wire is None:
            raise aiohttp.ClientConnectionError("the upstream wire is closed")
        outbound = build(target, "GET", headers, tail, query, b"", request_id, self._max_body_bytes)
        await outbound.use(credential)
        timeout = self.policy.request_timeout
        reply = await wire.request("GET", outbound.url, outbound.headers, None, None, timeout)
        try:
            yield reply
        finally:
            reply.close()

    async def _walk(
        self,
        method: str,
        incoming: CIMultiDictProxy[str],
        plan: Plan,
        tail: str,
        query: str,
        body: bytes,
        record: Record,
        walk: _Walk,
        order: tuple[Target, ...] | None = None,
    ) -> Reply:
        breakers = self.breakers
        asked_first: Target | None = None
        if order is None:
            order = plan.in_order(breakers.clock(), walk.affinity, breakers.is_closed)
        last = order[-1]
        for target in order:
            # Asked lazily, target by target: a half-open breaker's one probe is only taken
            # by a request that really goes there.
            breaker = breakers[target.name]
            if not breaker.admits(breakers.clock()):
                continue
            walk.is_followed = target is not last
            asked_first = asked_first or target
            attempts = len(record.attempts)
            reply = await self._on_target(target, method, incoming, tail, query, body, record, walk)
            if reply is not None:
                return reply
            if len(record.attempts) == attempts:
                # No key to ask (all rest), or no time left: a half-open breaker's one probe
                # went nowhere, and is given back (else the breaker stays half-open for ever).
                breaker.abstain()
            if walk.is_over:
                break
        walk.is_followed = False
        if asked_first is None:  # every breaker open: try the least recently failed, not nothing
            asked_first = min(plan.targets, key=lambda t: breakers[t.name].last_failure)
            reply = await self._on_target(
                asked_first, method, incoming, tail, query, body, record, walk
            )
            if reply is not None:
                return reply
        if walk.kept is None and walk.failure is None:
            # Nothing was asked: every key of the targets tried rests (429, 401, 403). The
            # key whose rest ends first is asked rather than nobody, as a breaker does.
            reply = await self._on_target(
                asked_first, method, incoming, tail, query, body, record, walk, is_resting=True
            )
            if reply is not None:
                return reply
        return walk.give_up()

    async def _on_target(
        self,
        target: Target,
        method: str,
        incoming: CIMultiDictProxy[str],
        tail: str,
        query: str,
        body: bytes,
        record: Record,
        walk: _Walk,
        is_resting: bool = False,
    ) -> Reply | None:
        """Attempts on one target: the answer to pass on, or None to move to the next target.

        `is_resting`: every key rests; the one whose rest ends first is asked all the same."""
        clock, policy = self.breakers.clock, self.policy
        outbound = build(
            target, method, incoming, tail, query, body,
            record.request_id, self._max_body_bytes,
        )  # fmt: skip
        retries, tried, pool = policy.attempts, set[str](), target.pool
        resting = pool.soonest() if is_resting else None
        excluded: AbstractSet[str] = tried  # a retry's pick: none
        while (credential := pool.pick(clock(), walk.affinity, excluded) or resting) is not None:
            resting, excluded = None, tried  # asked once
            if record.attempts and clock() >= walk.deadline:
                walk.is_over = True
                return None
            retry = policy.attempts - retries
            # Somewhere else to go: a 200 stream's first event is read before it goes on.
            elsewhere = (
                walk.is_followed
                or retries > 0
                or (pool.size > 1 and pool.has_usable(clock(), tried | {credential.label}))
            )
            pool.began(credential)
            try:
                reply = await self._attempt(
                    outbound, credential, record, walk.on_attempt, pool, walk if elsewhere else None
                )
            except Failed as failed:
                pool.ended(credential)
                walk.failure, wait = failed, self._backoff(retry)
                if failed.sent and method not in IDEMPOTENT:
                    walk.is_over = True  # the provider may be at work on it: never twice
                    # Its 504/502 is the answer: an earlier target's kept 429 or 5xx would
                    # tell the client nothing ran (and its SDK would send it again).
                    walk.kept = None
                    return None
            except BaseException:
                pool.ended(credential)
                raise
            else:
                status, stood_for = reply.status, walk.stood_for
                if stood_for is not None:
                    status, walk.stood_for = stood_for[1], None
                elif status == 400 and elsewhere and refuses_keys_with_400(target):
                    # A key's refusal some providers answer 400 (`refused_as`): read to tell.
                    try:
                        refusal = await self._keep(reply, outbound)
                    except Failed as failed:  # its body broke off: nothing reached the client
                        walk.failure = failed
                        pool.ended(credential)
                        tried.add(credential.label)
                        continue
                    except BaseException:  # the client left while it came
                        reply.close()
                        pool.ended(credential)
                        raise
                    if refusal is None:  # too large to keep: it goes on as it is
                        walk.serving = pool, credential
                        return reply
                    as_status = refused_as(refusal)
                    if as_status is None or (
                        as_status in KEY_REFUSED and pool.size == 1 and not walk.is_followed
                    ):
                        pool.ended(credential)
                        # A request's own 400 (or a key's 401 with no other key or target).
                        return refusal
                    walk.kept = refusal
                    pool.ended(credential)
                    target.pool.rest(credential, clock() + REFUSED_KEY_REST_SECONDS)
                    tried.add(credential.label)
                    continue
                elif (
                    status not in RETRYABLE
                    and status != OUT_OF_CREDIT
                    # a refused key: the pool's next key, else the next target
                    and not (status in KEY_REFUSED and (pool.size > 1 or walk.is_followed))
                ):
                    walk.serving = pool, credential
                    return reply
                answer: StoredAnswer | None = None  # this attempt's, read whole
                try:
                    kept = (
                        await self._keep(reply, outbound)
                        if stood_for is None
                        else await _keep_stream(reply, self.policy.max_wait_seconds)
                    )
                except Failed as failed:  # its body broke off: a failure all the same
                    walk.failure = failed
                except BaseException:  # the client left while it came: the provider goes too
                    reply.close()
                    pool.ended(credential)
                    raise
                else:
                    if kept is None:
                        walk.serving = pool, credential
                        return reply  # cannot be kept whole: it goes on as it is
                    walk.kept = answer = kept
                pool.ended(credential)
                asked = asked_wait(reply.headers)
                if asked is None and status == 429 and stood_for is None and answer is not None:
                    asked = google_retry_delay(answer)  # Gemini's 429 says it in its body
                if status == 429 and (
                    (stood_for is not None and stood_for[0] == SPENT_QUOTA)
                    or (stood_for is None and answer is not None and is_spent(answer))
                ):
                    status = OUT_OF_CREDIT  # the account's quota, not a rate: as a 402
                if status in KEY_REFUSED or status == OUT_OF_CREDIT:
                    target.pool.rest(credential, clock() + REFUSED_KEY_REST_SECONDS)
                    tried.add(credential.label)
                    continue
                if status == 429:
                    rest = RATE_LIMITED_REST_SECONDS if asked is None else asked
                    target.pool.rest(credential, clock() + rest)
                wait = self._backoff(retry) if asked is None else asked
                if reply.headers.get("x-should-retry") == "false":
                    wait = math.inf  # as the SDKs obey it: this key is not asked again
            if pool.size > 1:
                tried.add(credential.label)
                if pool.has_usable(clock(), tried):
                    continue  # another key of the pool, at once: a wait is this key's own
            if (
                retries <= 0
                or wait > policy.max_wait_seconds
                or clock() + wait >= walk.deadline
                or not pool.has_usable(clock() + wait)  # each key rests longer still
            ):
                return None  # the next target, at once
            retries -= 1
            await self.sleep(wait)
            excluded = frozenset()  # a retry of the target: any usable key, tried or not
        return None

    async def _attempt(
        self,
        outbound: Outbound,
        credential: Credential,
        record: Record,
        on_attempt: OnAttempt | None,
        pool: Pool | None = None,
        walk: _Walk | None = None,
    ) -> WireReply:
        """One request to one target with one key. Raises Failed.

        `pool`: told how long the answer's first bytes took (None: a key with one target,
        which has nothing to choose).
        `walk`: the request has somewhere else to go: a 200 stream's first event is read
        first, and an error of the moment there is the attempt's failure (`walk.stood_for`)."""
        wire = self._wire
        assert wire is not None, "the app's upstream wire is not open"
        target, breaker = outbound.target, self.breakers[outbound.target.name]
        url = outbound.url  # named in a failure: the host asked (Bedrock's: one of two)
        now = self.breakers.clock
        member = credential.label if target.pool.size > 1 else target.name
        record.saw_target(target.name, target.provider.name, member, target.model)
        if on_attempt is not None:  # traces: a client span, its context in the headers
            # Begun before the try's time: a span settled as its start plus the try's ms
            # never ends after the next try began, and a try that fails to sign has one too.
            model = target.model or record.model
            on_attempt(outbound.method, url, outbound.headers, target.provider.name, model)
        asked = time.perf_counter()
        # A pool's time to first byte is on the breakers' clock, as its fading is (a test's).
        began = now() if pool is not None else 0.0
        sent, stood_for, headed = False, None, None

        def on_sent() -> None:
            nonlocal sent
            sent = True

        try:
            timeout = self.policy.request_timeout
            if credential.signer is None:
                outbound.use_key(credential)
            else:  # a cloud's signature covers the bytes that go; it may fetch a token
                async with asyncio.timeout(timeout):
                    await outbound.use(credential)
                timeout -= time.perf_counter() - asked
            reply = await wire.request(
                outbound.method, outbound.url, outbound.headers, outbound.body or None,
                on_sent, timeout,
            )  # fmt: skip
            if (
                walk is not None
                and reply.status == 200
                and (read := reader(reply.headers.get("content-type", ""))) is not None
            ):
                headed = now()  # a pool's time to first byte is to the head, as ever
                try:
                    stood_for, came = await self._first_event(reply, walk.deadline, read)
                except BaseException:  # the client left while it came: as while awaiting it
                    reply.close()
                    raise
                if stood_for is None and came is not None:  # a start held: it came then
                    record.mark_first_byte(came)
        except TimeoutError as error:
            slow = sent  # the request's own doing, maybe: its key is named to the breaker
            timeout = self.policy.request_timeout
            if sent:
                why = f"{where(target, url)} sent no response headers within {timeout:g} seconds"
            elif isinstance(error, aiohttp.ConnectionTimeoutError):  # the wire's setup bound
                why = f"{where(target, url)}: could not connect within {wire.connect_timeout:g} seconds"
            else:
                why = f"{where(target, url)}: could not connect and send within {timeout:g} seconds"
            failed = Failed(Outcome.TIMEOUT, why, sent)
        except aiohttp.ClientError as error:
            if (short := out_of_files(error)) is not None:  # the gateway's, not the target's
                failed, slow = OutOfFiles(f"{short}: {where(target, url)} was not asked"), False
            else:
                if isinstance(error, aiohttp.ClientSSLError):
                    # TLS refused, even read in place of the answer (TLS 1.3's mutual TLS,
                    # wire.py): the provider never took the request, whatever was written.
                    sent = False
                failed = Failed(
                    Outcome.UNREACHABLE, f"{where(target, url)}: {described(error)}", sent
                )
                slow = sent and not isinstance(error, aiohttp.ClientResponseError)  # not bad HTTP
        except SigningFailed as error:
            failed = Failed(Outcome.UNREACHABLE, f"{where(target, url)}: {error}")
            slow = False
        except asyncio.CancelledError as cancel:
            if sent:
                record.saw_unanswered()
            breaker.abstain()  # a client that left says nothing about the target
            # The log line still names the try: its request may be charged its reservation.
            if cut_by_gateway(cancel):
                outcome, why = Outcome.SHUTDOWN, GRACE_OVER
            else:
                outcome, why = Outcome.CLIENT_LEFT, "client closed the connection"
            ms = record.waited_upstream(asked)
            record.add_attempt(
                Attempt(target.name, target.provider.name, credential.label, None, outcome, why, ms)
            )
            raise
        else:
            status, stream_error = reply.status, None
            if stood_for is not None and walk is not None:
                walk.stood_for, (kind, status) = stood_for, stood_for
                stream_error = (
                    f"{where(target, url)} sent 200, then {kind} as its stream's first event"
                )
            ms = record.waited_upstream(asked)
            if pool is not None:
                answered = now() if headed is None else headed
                if status not in RETRYABLE:
                    pool.measured(credential, answered - began, answered)
                elif status != 429 and pool.size > 1:  # a 429's key rests instead
                    # A pool key's failure counts as a first byte at the timeout: never
                    # measured, a key that only fails would stay "not yet measured", and be
                    # tried first for ever (a target's failures are its breaker's business).
                    pool.measured(credential, self.policy.request_timeout, answered)
            record.add_attempt(
                Attempt(
                    target.name,
                    target.provider.name,
                    credential.label,
                    reply.status,
                    Outcome.ANSWERED,
                    stream_error,
                    ms,
                    None if stood_for is None else status,
                )  # fmt: skip
            )
            if status in RETRYABLE:
                if status == 429:
                    breaker.abstain()  # about a key, not the target
                else:
                    breaker.failed(now(), stream_error or f"{status} from {where(target, url)}")
            elif status < 400:
                breaker.succeeded(now())
            else:  # a key refused (401, 403, 402) or a request refused (400, 404, 413, ...):
                # about the key or the request, not the target; no success either (a
                # half-open breaker's probe is given back, its failures in a row stand)
                breaker.abstain()
            return reply
        ms = record.waited_upstream(asked)
        is_ours = isinstance(failed, OutOfFiles)  # says nothing of the target nor its key
        if pool is not None and not is_ours:  # its first byte: later still (as above)
            gave_up = now()
            if failed.outcome is Outcome.TIMEOUT:
                pool.measured(credential, gave_up - began, gave_up)
            elif pool.size > 1:
                pool.measured(credential, self.policy.request_timeout, gave_up)
        record.add_attempt(
            Attempt(
                target.name,
                target.provider.name,
                credential.label,
                None,
                failed.outcome,
                failed.why,
                ms,
            )  # fmt: skip
        )
        if sent:
            record.saw_unanswered()
        if is_ours:
            breaker.abstain()
            if self._on_out_of_files is not None:
                self._on_out_of_files(failed.why)
        else:
            breaker.failed(now(), failed.why, record.key if slow else None)
        raise failed

    async def _keep(self, reply: WireReply, outbound: Outbound) -> StoredAnswer | None:
        """The answer read whole, its connection released; None when it is too large to
        keep (nothing of it taken). Raises Failed when its body broke off or stalled: no
        byte of it reached the client, so the walk goes on as after any failure."""
        length = reply.content_length
        if length is not None and length > KEPT_ANSWER_BYTES:
            return None
        timeout = self.policy.request_timeout
        try:
            async with asyncio.timeout(timeout):
                if length is None and not await reply.content.arrive():
                    return None
                body = await reply.read()
        except TimeoutError:
            reply.close()
            at = where(outbound.target, outbound.url)
            why = f"{at} sent {reply.status} but not its body within {timeout:g} seconds"
            raise Failed(Outcome.TIMEOUT, why) from None
        except aiohttp.ClientError as error:
            reply.close()
            broken, at = type(error).__name__, where(outbound.target, outbound.url)
            why = f"{at} sent {reply.status} and broke off its answer ({broken})"
            raise Failed(Outcome.BROKEN, why) from None
        reply.release()
        return StoredAnswer(reply, body)

    async def _first_event(
        self, reply: WireReply, deadline: float, failure: Reader
    ) -> tuple[tuple[str, int] | None, float | None]:
        """A 200 stream's first event, read by `failure` (nothing taken) before any goes on:
        (its error kind, the status it stands for) when an error of the moment
        (first_event.py); else None, also when it has not come within
        RETRY_MAX_WAIT_SECONDS or the deadline, or FIRST_EVENT_BYTES, or the body broke off
        (the relay finds it so). Beside it, when its first bytes were at hand (perf_counter;
        None: none came): a start read past may come long before the event after it."""
        coding = content_coding(reply.headers)
        if coding is not None:  # gzip, deflate, br, zstd: decoded to be read
            decoding = decoded(failure, coding, FIRST_EVENT_BYTES)
            if decoding is None:  # a coding the gateway does not decode: not read
                return None, None
            failure = decoding
        content = reply.content
        first = content.at_hand()
        came = time.perf_counter() if first else None
        found = failure(first)  # most first chunks come with the head: no wait
        if found is not MORE:
            return found, came
        if content.has_arrived():  # all of it here (an answer not streamed, mostly)
            return None, came
        wait = min(self.policy.max_wait_seconds, deadline - self.breakers.clock())
        try:
            async with asyncio.timeout(max(wait, 0.0)):
                while True:
                    at_hand = content.at_hand()
                    if len(at_hand) >= FIRST_EVENT_BYTES:
                        return None, came
                    await content.grown(len(at_hand))
                    more = content.at_hand()
                    if len(more) == len(at_hand):  # the body ended
                        return None, came
                    if came is None:
                        came = time.perf_counter()
                    found = failure(more)
                    if found is not MORE:
                        return found, came
        except (TimeoutError, aiohttp.ClientError):
            return None, came

    def _backoff(self, retry: int) -> float:
        """Exponential backoff with full jitter, capped by RETRY_MAX_WAIT_SECONDS."""
        # 2^64 half-seconds outlast any wait: a higher power would overflow a float
        ceiling = min(self.policy.max_wait_seconds, BACKOFF_BASE_SECONDS * 2.0 ** min(retry, 64))
        return self._jitter(0.0, ceiling)


async def _keep_stream(reply: WireReply, timeout: float) -> StoredAnswer:
    """A 200 stream whose first event was an error of the moment, kept to be passed on if
    nothing else answers: read to its end (it ends after its error), or what came within
    `timeout` or `wire.HIGH_WATER` bytes; its connection then given back, or closed."""
    content = reply.content
    try:
        async with asyncio.timeout(timeout):
            await content.arrive()
    except (TimeoutError, aiohttp.ClientError):
        pass
    if content.has_arrived():
        return StoredAnswer(reply, await reply.read())
    body = content.at_hand()
    reply.close()
    return StoredAnswer(reply, body)
