"""The request path, in order: authenticate → validate → admit → forward → stream back → record.

One relay serves every proxied path; providers differ by data (`providers.py`), and where
a key's requests may go is data too (`targets.py`), walked by one attempt loop
(`failover.py`). The bytes the client sent are the bytes that go upstream, and the
provider's bytes go back as they arrive, chunk by chunk. Each step's module owns its
details; this one owns their order and the guarantee that every request ends in exactly
one settled `Record`, whose ending (`Record.end`) is written once, where it happens.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from proxy import errors
from proxy.cache.cache import Cache, Lookup
from proxy.cache.entry import Entry
from proxy.cache.replay import replay, response_for
from proxy.errors import GatewayError
from proxy.keys.keys import KeyRing, VirtualKey
from proxy.keys.lockout import Lockout
from proxy.observe.logbook import Logbook
from proxy.observe.metrics import Metrics
from proxy.quota import ratelimit
from proxy.quota.quota import Quota
from proxy.quota.tracker import Admission
from proxy.realtime.realtime import Realtime, is_upgrade
from proxy.record import CLIENT_CLOSED, Cached, Outcome, Record
from proxy.relay.expect import awaits_continue
from proxy.relay.peek import read_body, validate
from proxy.relay.routing import route
from proxy.settings import Settings
from proxy.upstream.failover import Failover, Reply, StoredAnswer
from proxy.upstream.providers import downstream_headers
from proxy.upstream.targets import Plan
from proxy.usage import background, openai_chat
from proxy.usage.openai_chat import UsageChunkFilter
from proxy.usage.pricing import Prices
from proxy.usage.usage import TapMemory, UsageTap, charged

if TYPE_CHECKING:
    from proxy.observe.tracing import Tracing

log = logging.getLogger("llm_gateway")

# Bodies of known length up to this size are read whole and sent in one write; a stream
# (SSE, chunked) or a larger body (a file download) goes chunk by chunk.
WHOLE_BODY_BYTES = 1 << 20
# A silence deadline is moved at most once per this share of it: each chunk would otherwise
# cancel one timer and arm another (~10 us of a chunk's ~250). So a silence is cut after
# between 1 and 1 + IDLE_SLACK times the timeout, never before.
IDLE_SLACK = 0.1
# Marks a response whose provider answer had no Content-Type (see keep_untyped).
UNTYPED = web.ResponseKey("untyped", bool)


class Relay:
    """The handler of every proxied request, with the concerns it calls in order."""

    def __init__(
        self,
        settings: Settings,
        key_ring: KeyRing,
        lockout: Lockout,
        quota: Quota,
        failover: Failover,
        prices: Prices,
        metrics: Metrics,
        logbook: Logbook,
        realtime: Realtime,
        tap_memory: TapMemory,
        tracing: Tracing | None = None,  # None: traces off
        cache: Cache | None = None,  # None: no key's answers are cached
    ) -> None:
        self.settings = settings
        self.key_ring = key_ring
        self.lockout = lockout
        self.quota = quota
        self.failover = failover
        self.prices = prices
        self.metrics = metrics
        self.logbook = logbook
        self.realtime = realtime
        self.tap_memory = tap_memory
        self.tracing = tracing
        self.cache = cache

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """Authenticate, validate, admit, forward, stream back, record."""
        if is_upgrade(request):  # a WebSocket session (Realtime API): relayed frame by frame
            assert self.failover.session is not None
            return await self.realtime.relay(request, self.failover.session)
        settings = self.settings
        record = Record.begin(request.headers.get("x-request-id"), request.method, request.path)
        key: VirtualKey | None = None
        admission: Admission | None = None
        found: Lookup | None = None  # what the cache did, for keys with a cache
        if self.tracing is not None:
            record.trace = self.tracing.begin(request)  # traces: the request's server span
        self.metrics.request_started()
        try:
            tail, query = route(request.raw_path)  # 400, 404, 405
            ring, limit = self.key_ring, settings.max_body_bytes
            client = self.lockout.client_address(request)
            key = self.lockout.authenticate(ring, request.headers, client)  # 401, 429
            record.key, record.provider = key.name, key.provider.name
            # 429 before a large body is read, or any body the client holds back (Expect)
            self.quota.precheck(key, None if awaits_continue(request) else request.content_length)
            body = await read_body(request, limit)  # 400, 413
            peek = validate(tail, request, body, key, limit, record)  # 400, 403, 415
            plan = key.plans.choose(peek.model)  # 400 (no route serves the model)
            if settings.log_bodies:
                record.request_body = body
            sent = body  # the client's own bytes: what names a cached answer
            body, asked = openai_chat.amended(key, tail, request.headers, body, peek.is_stream)
            admission = await self.quota.admit(key, peek)  # 429, 503
            if key.cache is not None and self.cache is not None:
                # A stored answer, or an identical request's in flight: never upstream.
                found = await self.cache.lookup(
                    key, request.method, tail, query, request.headers, sent
                )
                record.cache = found.cached
                if found.entry is not None:
                    return await self.answer_hit(request, found.entry, admission, record)
            async with self.failover.forward(request, plan, tail, query, body, record) as reply:
                return await self.stream_back(
                    request, reply, plan, body, record, admission, asked, found
                )
        except GatewayError as error:
            record.end(error.status, Outcome.REFUSED, error.message)
            if error.status == 429 and key is not None:  # not a lockout's 429: no key yet
                self.metrics.quota_rejected(key.name)
            return errors.render(error, request.path, record.request_id)
        except asyncio.CancelledError:
            # aiohttp cancels the handler when the client disconnects (handler_cancellation).
            record.end(CLIENT_CLOSED, Outcome.CLIENT_LEFT, "client closed the connection")
            raise
        except Exception:
            # A bug, not an input: one log line with the traceback, a 500 in the dialect.
            log.exception("internal error on %s %s", request.method, request.path)
            record.end(500, Outcome.INTERNAL, "internal error")
            failure = GatewayError(500, "internal_error", "The gateway failed on this request.")
            return errors.render(failure, request.path, record.request_id)
        finally:
            try:
                if record.stored is not None and key is not None:  # a background response:
                    await background.owe_or_claim(self.quota, key, record)  # owed, or charged
            finally:  # also when the client's leaving cancels the handler meanwhile
                self.settle(record, key, admission, found)

    async def stream_back(
        self,
        request: web.Request,
        reply: Reply,
        plan: Plan,
        body: bytes,
        record: Record,
        admission: Admission | None,
        asked_usage: bool = False,
        found: Lookup | None = None,
    ) -> web.StreamResponse:
        """Send the provider's status and headers (none carrying a real key), then each chunk.

        `asked_usage`: the gateway asked for the usage chunk (openai_chat.py): withhold it.
        `found`: the cache's lookup; its `pending` collects the answer as the client gets it.
        """
        settings = self.settings
        headers = downstream_headers(reply.headers, plan.secrets)
        pending = None if found is None else found.pending
        if pending is not None:
            pending.begin(reply.status, reply.reason, headers)
        collect = None if pending is None else pending.collect
        if admission is not None:
            ratelimit.stamp(headers, admission)
        headers["x-request-id"] = record.request_id
        if found is not None:
            headers["x-llm-gateway-cache"] = found.cached.value
        status = reply.status
        tap = UsageTap(
            reply.headers.get("content-type"),
            reply.headers.get("content-encoding"),
            settings.log_bodies,
            charged(record.method, record.path, record.is_background),
            self.tap_memory,
        )
        idle = settings.stream_idle_timeout
        try:
            response: web.StreamResponse
            if isinstance(reply, StoredAnswer) or is_small_whole_body(reply):
                response = await send_whole(reply, headers, tap, record, idle, collect)
            else:
                response = web.StreamResponse(status=status, reason=reply.reason, headers=headers)
            if "content-type" not in headers:
                response[UNTYPED] = True  # see keep_untyped
            try:
                await response.prepare(request)
                if isinstance(response, web.Response):
                    # Sent here, not by aiohttp after the handler returns: the settle (price,
                    # quota, metrics, the log line) then runs after the client has its
                    # answer, off the latency it waits for.
                    await response.write_eof()
                    return response
            except ConnectionResetError:  # the client left before its answer went out
                record.end(CLIENT_CLOSED, Outcome.CLIENT_LEFT, "client closed the connection")
                return response
            # After prepare() the status is sent: a failure can only end the stream.
            assert not isinstance(reply, StoredAnswer)  # a stored answer went out whole above
            is_withheld = asked_usage and UsageChunkFilter.applies(reply.headers)
            withheld = UsageChunkFilter() if is_withheld else None
            await relay_body(request, reply, response, tap, record, idle, withheld, collect)
            return response
        except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as error:
            why = f"the provider broke the stream ({error.__class__.__name__})"
            _cut(request, record, status, Outcome.BROKEN, why)
        finally:
            # Also for a client that left: what it received was produced, and is charged.
            if status < 400:
                record.usage = tap.usage(body)
                record.response_model = tap.model
                record.stored = tap.stored
            record.response_text = tap.text
        return web.Response(status=status)  # not sent: the connection is closed

    async def answer_hit(
        self, request: web.Request, entry: Entry, admission: Admission | None, record: Record
    ) -> web.StreamResponse:
        """Replay a stored answer with the gateway's own headers; it counted as one request."""
        headers = CIMultiDict(entry.headers)
        if admission is not None:
            ratelimit.stamp(headers, admission)
        headers["x-request-id"] = record.request_id
        headers["x-llm-gateway-cache"] = Cached.HIT.value
        response = response_for(entry, headers)
        if "content-type" not in headers:
            response[UNTYPED] = True  # see keep_untyped
        await replay(request, response, entry, record)
        return response

    def settle(
        self,
        record: Record,
        key: VirtualKey | None,
        admission: Admission | None,
        found: Lookup | None = None,
    ) -> None:
        """The one ending of every request: cost, quota, cache, breakers, metrics, the log, traces.

        A cache hit is priced (what it would have cost, for its log line) but charges nothing.
        """
        record.finish()
        self.metrics.request_ended()
        record.cost_usd = self.prices.cost(
            record.provider, record.model, record.usage, record.response_model
        )
        if key is not None:
            self.quota.settle(key, admission, record)  # the reservation becomes the real count
        if found is not None and self.cache is not None:
            self.cache.settle(found, record)  # a miss's answer stored, if storable
        if record.outcome is Outcome.BROKEN and record.target is not None:
            breakers = self.failover.breakers
            breakers[record.target].failed(breakers.clock(), record.error or "broken")
        self.metrics.observe(record)
        self.logbook.write(record)
        if record.trace is not None:  # traces: after the last byte (a stream's span is its length)
            record.trace.end(record)


def is_small_whole_body(reply: aiohttp.ClientResponse) -> bool:
    """A body of known, small length that is not an event stream: one write, not a chunk loop."""
    length = reply.content_length
    return (
        length is not None
        and length <= WHOLE_BODY_BYTES
        and not reply.headers.get("content-type", "").startswith("text/event-stream")
    )


async def send_whole(
    reply: Reply,
    headers: CIMultiDict[str],
    tap: UsageTap,
    record: Record,
    idle: float,
    collect: Callable[[bytes], None] | None = None,
) -> web.Response:
    """Read the body, then answer it in one write. Raises 502, 504: nothing was sent yet."""
    asked = time.perf_counter()
    try:
        data = await read_whole(reply, idle)
    except TimeoutError:
        why = f"the provider sent nothing for {idle:g} seconds"
        record.end(504, Outcome.TIMEOUT, why)
        raise GatewayError(
            504, "upstream_timeout", f"The provider sent nothing for {idle:g} seconds."
        ) from None
    except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as error:
        why = f"the provider broke off its answer ({error.__class__.__name__})"
        record.end(502, Outcome.BROKEN, why)
        raise GatewayError(502, "upstream_broken", why[0].upper() + why[1:] + ".") from None
    finally:
        record.waited_upstream(asked)
    record.mark_first_byte()
    tap.feed(data)
    if collect is not None:
        collect(data)
    record.end(reply.status, Outcome.ANSWERED)
    return web.Response(status=reply.status, reason=reply.reason, headers=headers, body=data)


async def read_whole(reply: Reply, idle: float) -> bytes:
    """The whole body; `idle` bounds each silence, not the whole read (a slow body is fine)."""
    if isinstance(reply, StoredAnswer):
        return reply.body
    if reply.content.is_eof():  # it all came with the headers (most small bodies): no wait
        return await reply.read()
    loop, parts = asyncio.get_running_loop(), []
    async with asyncio.timeout_at(loop.time() + idle) as deadline:
        while chunk := await reply.content.readany():
            parts.append(chunk)
            extend(deadline, loop.time(), idle)
    return b"".join(parts)


def extend(deadline: asyncio.Timeout, now: float, idle: float) -> None:
    """Allow `idle` more seconds of silence from `now`, moving the deadline only when it
    would come sooner (then IDLE_SLACK later than needed)."""
    if now + idle > (deadline.when() or 0.0):
        deadline.reschedule(now + idle * (1 + IDLE_SLACK))


async def keep_untyped(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: aiohttp adds application/octet-stream; a provider's answer
    that had no Content-Type goes on without one: the gateway passes answers through as
    they came."""
    if response.get(UNTYPED):
        response.headers.popall("Content-Type", None)


async def relay_body(
    request: web.Request,
    reply: aiohttp.ClientResponse,
    response: web.StreamResponse,
    tap: UsageTap,
    record: Record,
    idle: float,
    withheld: UsageChunkFilter | None = None,
    collect: Callable[[bytes], None] | None = None,
) -> None:
    """Each chunk to the client first (less a `withheld` usage chunk), then to the usage tap
    (and to the cache's `collect`, what the client got); the record says how it ended.

    One deadline serves both directions: while reading it bounds the provider's silence
    (STREAM_IDLE_TIMEOUT), while writing the client's (a client that stops reading): the
    flag `is_writing` tells whose it was when it fires.
    """
    loop = asyncio.get_running_loop()
    read, clock = reply.content.readany, time.perf_counter
    status, is_writing = reply.status, False
    try:
        async with asyncio.timeout_at(loop.time() + idle) as deadline:
            asked = clock()
            chunk = await read()
            record.waited_upstream(asked)
            record.mark_first_byte()
            while chunk:
                is_writing = True
                sent = chunk if withheld is None else withheld(chunk)
                await response.write(sent)
                is_writing = False
                tap.feed(chunk)
                if collect is not None:
                    collect(sent)
                extend(deadline, loop.time(), idle)
                asked = clock()
                chunk = await read()
                record.waited_upstream(asked)
            is_writing = True
            rest = b"" if withheld is None else withheld.rest()
            await response.write_eof(rest)
            if collect is not None:
                collect(rest)
    except ConnectionResetError:  # the client left: not the provider's failure
        record.end(CLIENT_CLOSED, Outcome.CLIENT_LEFT, "client closed the connection")
        return
    except TimeoutError:
        if is_writing:  # a client that stopped reading: its own ending, not the provider's
            why = f"the client read nothing for {idle:g} seconds"
            _cut(request, record, CLIENT_CLOSED, Outcome.CLIENT_LEFT, why)
        else:
            why = f"the provider sent nothing for {idle:g} seconds"
            _cut(request, record, status, Outcome.TIMEOUT, why)
        return
    record.end(status, Outcome.ANSWERED)


def _cut(request: web.Request, record: Record, status: int, outcome: Outcome, why: str) -> None:
    """End a stream the provider failed: close the connection, so the client sees it cut."""
    record.end(status, outcome, why)
    if request.transport is not None:
        request.transport.close()
