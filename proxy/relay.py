"""The request path, in order: authenticate → validate → admit → forward → stream back → record.

One relay serves every proxied path; providers differ by data (`providers.py`). The bytes
the client sent are the bytes that go upstream, and the provider's bytes go back as they
arrive, chunk by chunk. Each step's module owns its details; this one owns their order
and the guarantee that every request ends in exactly one settled `Record`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from proxy import app as wiring
from proxy import errors, quota
from proxy.errors import GatewayError
from proxy.keys import VirtualKey
from proxy.peek import read_body, validate
from proxy.providers import downstream_headers, upstream_headers, upstream_url
from proxy.realtime import is_upgrade
from proxy.record import CLIENT_CLOSED, Record
from proxy.routing import route
from proxy.tracker import Admission
from proxy.usage import UsageTap, charged

log = logging.getLogger("llm_gateway")

# Bodies of known length up to this size are read whole and sent in one write; a stream
# (SSE, chunked) or a larger body (a file download) goes chunk by chunk.
WHOLE_BODY_BYTES = 1 << 20


async def relay(request: web.Request) -> web.StreamResponse:
    """Authenticate, validate, admit, forward, stream back, record."""
    app = request.app
    if is_upgrade(request):  # a WebSocket session (Realtime API): relayed frame by frame
        return await app[wiring.REALTIME].relay(request, app[wiring.SESSION])
    settings = app[wiring.SETTINGS]
    record = Record.begin(request.headers.get("x-request-id"), request.method, request.path)
    key: VirtualKey | None = None
    app[wiring.METRICS].request_started()
    try:
        key = app[wiring.LOCKOUT].authenticate(app[wiring.KEY_RING], request.headers, request.remote)  # 401, 429
        record.key, record.provider = key.name, key.provider.name
        tail, query = route(request.raw_path)  # 400, 404
        body = await read_body(request, settings.max_body_bytes)  # 400, 413
        peek = validate(tail, request, body, key, settings.max_body_bytes, record)  # 400, 403, 415
        if settings.log_bodies:
            record.request_body = body
        admission = await app[wiring.QUOTA].admit(key)  # 429, 503
        async with forward(app, key, request, tail, query, body, record) as reply:  # 502, 504
            return await stream_back(request, reply, body, record, admission, (key.api_key,))
    except GatewayError as error:
        record.status, record.error = error.status, error.message
        if error.status == 429:
            app[wiring.METRICS].quota_rejected(record.key or "none")
        return errors.render(error, request.path, record.request_id)
    except asyncio.CancelledError:
        # aiohttp cancels the handler when the client disconnects (handler_cancellation).
        _client_left(record)
        raise
    except Exception:
        # A bug, not an input: one log line with the traceback, a 500 in the dialect.
        log.exception("internal error on %s %s", request.method, request.path)
        error = GatewayError(500, "internal_error", "The gateway failed on this request.")
        record.status, record.error = 500, "internal error"
        return errors.render(error, request.path, record.request_id)
    finally:
        settle(app, record, key)


@asynccontextmanager
async def forward(
    app: web.Application,
    key: VirtualKey,
    request: web.Request,
    tail: str,
    query: str,
    body: bytes,
    record: Record,
) -> AsyncIterator[aiohttp.ClientResponse]:
    """Send the request upstream; yield once its headers arrive. Raises 502, 504.

    Client errors are translated here and nowhere else, top to bottom:
    no headers within REQUEST_TIMEOUT → 504; refused, reset, DNS, TLS, a bad status
    line → 502. No retries: these are POSTs that cost money.
    """
    settings = app[wiring.SETTINGS]
    url = upstream_url(key.provider, tail, query)
    headers = upstream_headers(key.provider, key.api_key, request.headers, record.request_id)
    asked = time.perf_counter()
    try:
        async with asyncio.timeout(settings.request_timeout):
            reply = await app[wiring.SESSION].request(
                request.method, url, headers=headers, data=body or None, allow_redirects=False
            )
    except TimeoutError:
        record.upstream_failed = True
        raise GatewayError(
            504,
            "upstream_timeout",
            f"The provider sent no response within {settings.request_timeout:g} seconds.",
        ) from None
    except aiohttp.ClientError as error:
        record.upstream_failed = True
        raise GatewayError(
            502,
            "upstream_unreachable",
            f"The provider could not be reached ({error.__class__.__name__}).",
        ) from None
    finally:
        record.waited_upstream(asked)
    try:
        yield reply
    finally:
        # Closing (not releasing) drops a connection whose body was not read to the end,
        # which is how a client that left cancels the upstream request at once.
        reply.close()


async def stream_back(
    request: web.Request,
    reply: aiohttp.ClientResponse,
    body: bytes,
    record: Record,
    admission: Admission | None,
    secrets: tuple[str, ...] = (),
) -> web.StreamResponse:
    """Send the provider's status and headers (none carrying `secrets`), then each chunk."""
    app = request.app
    settings = app[wiring.SETTINGS]
    headers = downstream_headers(reply.headers, secrets)
    if admission is not None:
        quota.stamp(headers, admission)
    headers["x-request-id"] = record.request_id
    record.status = reply.status
    tap = UsageTap(
        reply.headers.get("content-type"),
        reply.headers.get("content-encoding"),
        settings.log_bodies,
        charged(record.method, record.path),
        app[wiring.TAP_MEMORY],
    )
    try:
        if is_small_whole_body(reply):
            return await send_whole(reply, headers, tap, record, settings.stream_idle_timeout)
        response = web.StreamResponse(status=reply.status, reason=reply.reason, headers=headers)
        await response.prepare(request)
        # After prepare() the status is sent: a failure can only end the stream, and the record says why.
        await relay_body(reply, response, tap, record, settings.stream_idle_timeout)
        return response
    except TimeoutError:
        _cut(
            request,
            record,
            f"the provider sent nothing for {settings.stream_idle_timeout:g} seconds",
        )
    except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as error:
        _cut(request, record, f"the provider broke the stream ({error.__class__.__name__})")
    finally:
        # Also for a client that left: what it received was produced, and is charged.
        if reply.status < 400:
            record.usage = tap.usage(body)
        record.response_text = tap.text
    return web.Response(status=reply.status)  # not sent: the connection is closed


def is_small_whole_body(reply: aiohttp.ClientResponse) -> bool:
    """A body of known, small length that is not an event stream: one write, not a chunk loop."""
    length = reply.content_length
    return (
        length is not None
        and length <= WHOLE_BODY_BYTES
        and not reply.headers.get("content-type", "").startswith("text/event-stream")
    )


async def send_whole(
    reply: aiohttp.ClientResponse,
    headers: CIMultiDict[str],
    tap: UsageTap,
    record: Record,
    idle: float,
) -> web.Response:
    """Read the body, then answer it in one write. Raises 502, 504: nothing was sent yet."""
    asked = time.perf_counter()
    try:
        async with asyncio.timeout(idle):
            data = await reply.read()
    except TimeoutError:
        record.upstream_failed = True
        raise GatewayError(
            504, "upstream_timeout", f"The provider sent no body for {idle:g} seconds."
        ) from None
    except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as error:
        record.upstream_failed = True
        raise GatewayError(
            502,
            "upstream_broken",
            f"The provider broke off its answer ({error.__class__.__name__}).",
        ) from None
    finally:
        record.waited_upstream(asked)
    record.mark_first_byte()
    tap.feed(data)
    return web.Response(status=reply.status, reason=reply.reason, headers=headers, body=data)


async def relay_body(
    reply: aiohttp.ClientResponse,
    response: web.StreamResponse,
    tap: UsageTap,
    record: Record,
    idle: float,
) -> None:
    """Each chunk to the client first, then to the usage tap. Raises TimeoutError past `idle`."""
    loop = asyncio.get_running_loop()
    read, clock = reply.content.readany, time.perf_counter
    asked = clock()
    async with asyncio.timeout_at(loop.time() + idle) as deadline:
        chunk = await read()
        record.waited_upstream(asked)
        record.mark_first_byte()
        while chunk:
            try:
                await response.write(chunk)
            except ConnectionResetError:  # the client left: not the provider's failure
                return _client_left(record)
            tap.feed(chunk)
            deadline.reschedule(loop.time() + idle)
            asked = clock()
            chunk = await read()
            record.waited_upstream(asked)
    try:
        await response.write_eof()
    except ConnectionResetError:
        _client_left(record)


def _client_left(record: Record) -> None:
    record.status, record.error = CLIENT_CLOSED, "client closed the connection"


def _cut(request: web.Request, record: Record, why: str) -> None:
    """End a stream the provider failed: close the connection, so the client sees it cut."""
    record.error, record.upstream_failed = why, True
    if request.transport is not None:
        request.transport.close()


def settle(app: web.Application, record: Record, key: VirtualKey | None) -> None:
    """The one ending of every request: tokens to the tracker, metrics, health, the log."""
    record.finish()
    app[wiring.METRICS].request_ended()
    record.cost_usd = app[wiring.PRICES].cost(record.provider, record.model, record.usage)
    if key is not None and record.usage is not None:
        app[wiring.QUOTA].charge_later(key, record.usage.total_tokens)
    app[wiring.METRICS].observe(record)
    app[wiring.HEALTH].observe(record)
    app[wiring.LOGBOOK].write(record)
