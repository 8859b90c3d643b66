"""The HTTP transport, in order: read the body → peek → admit → (cache) → forward → stream back.

One relay serves every proxied HTTP path; the exchange has routed and authenticated the
request before, and writes its ending and settles it after. Providers differ by data
(`providers.py`), and where a key's requests may go is data too (`targets.py`), walked by
one attempt loop (`failover.py`). The bytes the client sent are the bytes that go
upstream, and the provider's bytes go back as they arrive, chunk by chunk. What the relay
learns goes on the record as facts (`saw_model`, `saw_answer`); how the request ended
travels up as an exception carrying its outcome (`GatewayError` before the answer began,
`Cut` after), or as the response returned.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from functools import partial

import aiohttp
from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.cache.cache import Lookup
from proxy.cache.entry import Entry
from proxy.cache.replay import replay, response_for
from proxy.encodings import content_coding
from proxy.errors import Cut, GatewayError
from proxy.exchange import Exchange
from proxy.keys.keys import VirtualKey
from proxy.quota import ratelimit
from proxy.quota.tracker import Admission
from proxy.record import CLIENT_CLOSED, Cached, Outcome, Record
from proxy.relay.echoes import (
    StreamMask,
    is_plain,
    is_searched_whole,
    masked,
    masked_whole,
    searched,
    unechoed,
)
from proxy.relay.expect import awaits_continue
from proxy.relay.head_bytes import RAW_HEAD
from proxy.relay.links import MAX_BYTES, ResultsLinks, pointed_back
from proxy.relay.listing import ModelList
from proxy.relay.pages import Pages
from proxy.relay.peek import body_at_hand, read_body, validate
from proxy.relay.silence import Silences
from proxy.settings import Settings
from proxy.upstream.failover import Failover, Reply, StoredAnswer
from proxy.upstream.first_event import target_failure
from proxy.upstream.providers import downstream_headers
from proxy.upstream.routing import spoken_api
from proxy.upstream.targets import Plan
from proxy.upstream.wire import Reply as WireReply
from proxy.usage import bedrock, openai_chat
from proxy.usage.openai_chat import UsageChunkFilter
from proxy.usage.usage import TapMemory, UsageTap, charged

# Bodies of known length up to this size are read whole and sent in one write; a stream
# (SSE, chunked) or a larger body (a file download) goes chunk by chunk.
WHOLE_BODY_BYTES = 1 << 20
# A whole answer this small, with its head, stays under the transport's high-water mark
# (64 KiB, asyncio's and uvloop's): its write never waits for the client. A larger one waits
# while the client reads nothing, and is watched as a stream is.
WATCHED_WRITE_BYTES = 1 << 15
# Answers that are streams whatever the body said: event streams, and newline-delimited JSON
# (Ollama's native API streams unless its body says `"stream": false`).
STREAM_TYPES = ("text/event-stream", "application/x-ndjson")
# Marks a response whose provider answer had no Content-Type (see keep_untyped).
UNTYPED = web.ResponseKey("untyped", bool)
# What changes a whole answer before it goes out (a ResultsLinks, a ModelList); `headers`
# are the answer's, changed to match.
Rewrite = Callable[[bytes, CIMultiDict[str]], Awaitable[bytes]]


class Relay:
    """The transport of every proxied HTTP request, with the concerns it calls in order."""

    def __init__(self, settings: Settings, failover: Failover, tap_memory: TapMemory) -> None:
        self.settings = settings
        self.failover = failover
        self.tap_memory = tap_memory
        # STREAM_IDLE_TIMEOUT of every answer being relayed, on one timer
        self.silences = Silences(settings.stream_idle_timeout)

    def credentials(self, headers: CIMultiDictProxy[str]) -> Mapping[str, str]:
        """An HTTP client presents its key in a header."""
        return headers

    async def relay(self, exchange: Exchange, key: VirtualKey) -> web.StreamResponse:
        """Read and peek the body, admit, forward, stream back. Raises GatewayError, Cut."""
        settings, request, record = self.settings, exchange.request, exchange.record
        tail, limit = exchange.tail, settings.max_body_bytes
        length = request.content_length  # parsed from the header at each read: once here
        # 429 before a large body is read, or any body the client holds back (Expect)
        exchange.precheck(None if awaits_continue(request) else length)
        body = body_at_hand(request, limit, length)  # 400, 413
        if body is None:  # still to come
            body = await read_body(request, limit, settings.client_body_timeout)  # 400, 408, 413
        if settings.log_bodies and "content-encoding" not in request.headers:
            # also the line of a request refused for it
            record.saw_request_body(body, request.headers.get("content-type"))
        peek = validate(tail, request, body, key, limit, record)  # 400, 403, 415
        if settings.log_bodies and peek.decoded is not None:
            # what a compressed upload holds
            record.saw_request_body(peek.decoded, request.headers.get("content-type"))
        # 400 (no route serves the model); naming none: a route speaking the request's API
        api = None if peek.model is not None else spoken_api(tail, request.headers)
        plan = key.plans.choose(peek.model, api)
        sent = body  # the client's own bytes: what names a cached answer
        body, asked = openai_chat.amended(
            key, tail, request.headers, body, peek.is_stream, request.query
        )
        failover, header = self.failover, settings.pool_sticky_header
        # One conversation, one pool key: the body's name for it, else the sticky header's.
        affinity = peek.affinity or (request.headers.get(header) if header else None) or None
        # The order the targets will be tried in, chosen now: the reservation is priced at
        # the first that will be tried (a route's target, a fallback while the primary's
        # breaker is open), not at the key's first provider.
        order = failover.order(plan, affinity)

        def check(now: VirtualKey) -> None:  # the key as it is after a wait for a slot
            validate(tail, request, sent, now, limit, record)  # 403 (a model taken away)

        admission = await exchange.admit(peek, failover.first_tried(order), check)  # 429, 503
        # A usage chunk the gateway asked for is cut out of the answer's bytes: uncoded ones.
        headers = openai_chat.uncoded(request.headers) if asked else None
        found = None if key.cache is None else await exchange.look_up(sent)
        if found is not None and found.entry is not None:  # a stored answer: never upstream
            return await self.answer_hit(request, found.entry, admission, record)
        trace = exchange.trace
        on_attempt = None if trace is None else trace.attempt
        # A restricted key's model list, filtered to its models (listing.py); no other's.
        # Asked with the provider's largest page in place of the client's page size.
        # Its HEAD asks the GET whose filtered length the head says.
        query, method = exchange.query, None
        if key.allowed_models is None:
            listing = None
        elif (listing := ModelList.of(key, request.method, tail, query, plan)) is not None:
            query, method = listing.query, "GET"
        while True:
            async with failover.forward(
                request, plan, tail, query, body, record, on_attempt, affinity, order, headers,
                method,
            ) as reply:  # fmt: skip
                if listing is None or not listing.is_refused(reply.status):
                    # The usage estimate reads the prompt as the provider does: decoded.
                    readable = body if peek.decoded is None else peek.decoded
                    return await self.stream_back(
                        request, reply, plan, readable, record, admission, asked, found, listing
                    )
            # A provider whose pages are smaller refused the largest: the client's own page.
            listing = listing.as_asked()
            query = listing.query

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
        listing: ModelList | None = None,
    ) -> web.StreamResponse:
        """Send the provider's status and headers (none carrying a real key), then each chunk
        (a real key the provider echoes in it masked: `echoes`).

        `body`: the request body as the provider reads it (decoded), for the usage estimate.
        `asked_usage`: the gateway asked for the usage chunk (openai_chat.py): withhold it.
        `found`: the cache's lookup; its `pending` collects the answer as the client gets it.
        `listing`: a restricted key's model list: filtered to its models.
        """
        settings = self.settings
        echoable = plan.echoable()
        headers = downstream_headers(reply.headers, echoable)
        if "location" in headers:  # a redirect, a created resource: seldom
            pointed_back(headers, plan.answering(record.target).provider, record.path)
        reason = reply.reason  # None: the status's own phrase (nearly every answer)
        if reason is not None and any(secret in reason for secret in echoable):
            reason = None  # a real key echoed: left out, as a header holding one is
        pending = None if found is None else found.pending
        if pending is not None:
            pending.begin(reply.status, reason, headers, reply.has_raw_bytes)
        collect = None if pending is None else pending.collect
        if admission is not None:
            ratelimit.stamp(headers, admission)
        provided = reply.headers
        record.saw_provider_request_id(
            provided.get("x-request-id") or provided.get("request-id"), echoable
        )
        headers["x-request-id"] = record.request_id
        if found is not None:
            headers["x-llm-gateway-cache"] = found.cached.value
        status, content_type = reply.status, reply.headers.get("content-type")
        is_stream_type = content_type is not None and content_type.startswith(STREAM_TYPES)
        if is_stream_type:
            record.saw_event_stream()
        coding = content_coding(reply.headers)  # every line of it: two are one list
        tap = UsageTap(
            content_type,
            coding,
            settings.log_bodies,
            charged(record.method, record.path, record.is_background),
            self.tap_memory,
            record.path,
        )
        if bedrock.COUNTED in reply.headers:  # InvokeModel's: counted there, any model family
            tap.counted_aside(bedrock.counted_in_headers(reply.headers))
        if status >= 400 and bedrock.ERROR_TYPE in reply.headers:  # AWS's, its body a message
            tap.error_named_aside(bedrock.error_type(reply.headers))
        silences = self.silences
        secrets = searched(echoable)
        # A message batch's results_url, pointed back at the gateway (links.py), a restricted
        # key's model list (listing.py), the provider's further pages gathered: read whole.
        rewrite: Rewrite | None = ResultsLinks.of(record.method, record.path, status, content_type)
        if listing is not None and listing.applies(status, content_type):
            pages = Pages(
                self.failover,
                plan,
                record,
                listing.tail,
                request.headers,
                settings.stream_idle_timeout,
            )
            rewrite = partial(listing, more=pages)
        try:
            response: web.StreamResponse
            if (
                isinstance(reply, StoredAnswer)
                or is_small_whole_body(reply)
                or rewrite is not None
                or is_searched_whole(status, coding, secrets)  # a coded error of no length
                or (listing is not None and record.method == "HEAD")  # the head of a GET's body
            ):
                response = await send_whole(
                    reply, headers, tap, record, silences, collect, secrets, rewrite, reason
                )
            else:
                if is_stream_type or reply.content_length is None:
                    # A stream: nginx in front, with its defaults (HTTP/1.0 to the gateway,
                    # proxy_buffering on), held it and passed it on whole at its end.
                    headers["X-Accel-Buffering"] = "no"
                response = HeldHead(status=status, reason=reason, headers=headers)
            if "content-type" not in headers:
                response[UNTYPED] = True  # see keep_untyped
            if reply.has_raw_bytes:
                response[RAW_HEAD] = True  # see head_bytes
            try:
                writer = await response.prepare(request)
                if isinstance(response, web.Response):
                    # Sent here, not by aiohttp after the handler returns: the settle (price,
                    # quota, metrics, the log line) then runs after the client has its
                    # answer, off the latency it waits for.
                    if (response.content_length or 0) < WATCHED_WRITE_BYTES:
                        await response.write_eof()
                    else:  # a client that stops reading it: cut, as in a stream (relay_body)
                        with silences.watch(None, request.transport) as watch:
                            watch.sending()
                            await response.write_eof()
                    return response
            except ConnectionResetError:  # the client left before its answer went out
                raise Cut(
                    CLIENT_CLOSED, Outcome.CLIENT_LEFT, "client closed the connection"
                ) from None
            except TimeoutError:
                why = f"the client read nothing for {silences.idle:g} seconds"
                raise Cut(CLIENT_CLOSED, Outcome.CLIENT_LEFT, why) from None
            # After prepare() the status is sent: a failure can only end the stream.
            assert not isinstance(reply, StoredAnswer)  # a stored answer went out whole above
            is_withheld = asked_usage and UsageChunkFilter.applies(reply.headers)
            withheld = UsageChunkFilter() if is_withheld else None
            # A compressed stream is not searched (echoes.py says why).
            is_masked = bool(secrets) and is_plain(coding)
            mask = StreamMask(secrets) if is_masked else None
            assert writer is not None  # prepared: the head is ready to go
            await relay_body(
                reply, response, writer, tap, record, silences, withheld, collect, mask
            )
            return response
        except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as error:
            why = f"the provider broke the stream ({error.__class__.__name__})"
            raise Cut(status, Outcome.BROKEN, why) from None
        finally:
            # Also for a client that left: what it received was produced, and is charged.
            text = tap.text
            if text is not None and len(echoable) > len(plan.secrets):
                # LOG_BODIES: a cloud's access token is in no key ring the log masks with.
                for token in echoable[len(plan.secrets) :]:
                    text = text.replace(token, "*" * len(token))
            # The provider's words the log and the traces name: no key there either.
            error_kind = unechoed(tap.error_kind, echoable)
            if status < 400:
                usage = tap.usage(body)
                record.saw_answer(
                    usage,
                    unechoed(tap.model, echoable),
                    tap.stored,
                    text,
                    tap.batch,
                    error_kind,
                    tap.service_tier,
                    tap.speed,
                    tap.apart,
                )
                if error_kind is not None:  # the provider's error under its 200 (rare)
                    failed = target_failure(error_kind)
                    if failed is not None:
                        record.saw_failure_in_answer(failed)
            else:
                record.saw_answer(None, text=text, error_kind=error_kind)

    async def answer_hit(
        self, request: web.Request, entry: Entry, admission: Admission | None, record: Record
    ) -> web.StreamResponse:
        """Replay a stored answer with the gateway's own headers; it counted as one request."""
        headers = CIMultiDict(entry.headers)
        if admission is not None:
            ratelimit.stamp(headers, admission)
        headers["x-request-id"] = record.request_id
        headers["x-llm-gateway-cache"] = Cached.HIT.value
        if not entry.is_whole or headers.get("content-type", "").startswith(STREAM_TYPES):
            headers["X-Accel-Buffering"] = "no"  # a stream, as the miss's (stream_back)
        response = response_for(entry, headers)
        if "content-type" not in headers:
            response[UNTYPED] = True  # see keep_untyped
        if entry.has_raw_bytes:
            response[RAW_HEAD] = True  # see head_bytes
        try:
            # a client that stops reading: cut
            with self.silences.watch(None, request.transport) as watch:
                await replay(request, response, entry, record, watch.sending)
        except TimeoutError:
            why = f"the client read nothing for {self.silences.idle:g} seconds"
            raise Cut(CLIENT_CLOSED, Outcome.CLIENT_LEFT, why) from None
        return response


def is_small_whole_body(reply: WireReply) -> bool:
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
    silences: Silences,
    collect: Callable[[bytes], None] | None = None,
    secrets: tuple[bytes, ...] = (),
    rewrite: Rewrite | None = None,
    reason: str | None = None,
) -> web.Response:
    """Read the body, then answer it in one write, any of `secrets` in it masked (`echoes`),
    then `rewrite` (links pointed back at the gateway, a model list filtered), under the
    status line's `reason` (None: the status's own). Raises 502, 504: nothing was sent yet.

    The idle timeout bounds each silence while the body comes, not the whole read (a slow
    body is fine). The read is here, not a coroutine of its own: each wait for a chunk
    steps through one frame less."""
    asked = time.perf_counter()
    try:
        if isinstance(reply, StoredAnswer):
            data = reply.body
        elif reply.content.has_arrived():  # no wait, so no silence to watch
            data = await reply.read()
        else:
            parts = []
            read = reply.content.readany
            size = 0
            with silences.watch() as watch:
                while chunk := await read():
                    parts.append(chunk)
                    watch.moved()
                    size += len(chunk)
                    # only an answer of unknown length: read to rewrite, or a coded error
                    if size > MAX_BYTES:
                        raise GatewayError(
                            502,
                            "upstream_broken",
                            f"The provider's answer is larger than {MAX_BYTES} bytes, "
                            "more than a message batch, a model list or an error holds.",
                            outcome=Outcome.BROKEN,
                        )
            data = parts[0] if len(parts) == 1 else b"".join(parts)
    except TimeoutError:
        why = f"the provider sent nothing for {silences.idle:g} seconds"
        message = why[0].upper() + why[1:] + "."
        raise GatewayError(
            504, "upstream_timeout", message, outcome=Outcome.TIMEOUT, why=why
        ) from None
    except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as error:
        why = f"the provider broke off its answer ({error.__class__.__name__})"
        message = why[0].upper() + why[1:] + "."
        raise GatewayError(
            502, "upstream_broken", message, outcome=Outcome.BROKEN, why=why
        ) from None
    finally:
        record.waited_upstream(asked)
    record.mark_first_byte()
    tap.feed(data)
    if secrets:
        data = masked_whole(data, reply.status, headers, secrets)
    if rewrite is not None:
        rewritten = await rewrite(data, headers)
        if secrets and rewritten is not data:  # a model list's further pages: searched too
            rewritten = masked(rewritten, secrets)
        data = rewritten
    if collect is not None:
        collect(data)
    return web.Response(status=reply.status, reason=reason, headers=headers, body=data)


class HeldHead(web.StreamResponse):
    """A streamed answer whose head waits to go out with its first chunk, in one write
    (aiohttp's own `Response` holds its head for its body the same way); `relay_body`
    decides when the head cannot wait."""

    _send_headers_immediately = False


def send_head(writer: AbstractStreamWriter) -> None:
    """The held head goes out now, if it has not yet."""
    try:
        writer.send_headers()
    except ConnectionResetError:  # the client left: the stream's next write tells it
        return


def keep_untyped(response: web.StreamResponse) -> None:
    """At prepare (relay.dispatch), of an answer that holds state: aiohttp adds
    application/octet-stream; a provider's answer that had no Content-Type goes on without
    one: the gateway passes answers through as they came."""
    if response.get(UNTYPED):
        response.headers.popall("Content-Type", None)


async def relay_body(
    reply: WireReply,
    response: web.StreamResponse,
    writer: AbstractStreamWriter,
    tap: UsageTap,
    record: Record,
    silences: Silences,
    withheld: UsageChunkFilter | None = None,
    collect: Callable[[bytes], None] | None = None,
    mask: StreamMask | None = None,
) -> None:
    """Each chunk to the client first (less a `withheld` usage chunk, and with the real keys
    `mask` finds masked), then to the usage tap (and to the cache's `collect`, what the
    client got). Raises Cut when the stream ends early (the provider's silence, the
    client's leaving).

    One watch serves both directions: while reading it bounds the provider's silence
    (STREAM_IDLE_TIMEOUT), while writing the client's (a client that stops reading, not
    one that reads slowly: `Watch.sending`): its `is_writing` tells whose it was when it
    fires.

    `writer`: the prepared response's, which holds its head (`HeldHead`) until the first
    chunk; the head goes out alone only if that chunk has to be waited for.
    """
    content = reply.content
    read, has_arrived, clock = content.readany, content.has_arrived, time.perf_counter
    status, loop = reply.status, asyncio.get_running_loop()
    try:
        with silences.watch(loop, writer.transport) as watch:
            asked = clock()
            # The head goes out with the first chunk, in one write, when that chunk is at
            # hand; when the read has to wait, the loop's next turn sends the head alone.
            sending = loop.call_soon(send_head, writer)
            try:
                chunk = await read()
            finally:  # a read cut by the provider's silence was time awaiting it too
                sending.cancel()
                record.waited_upstream(asked)
            record.mark_first_byte()
            while chunk:
                following = None
                # Once the body's end has come, what is left of it is here: reading ahead
                # costs no wait, and tells the last chunk, which goes out with the end.
                if has_arrived() and not (following := await read()):
                    break
                watch.sending()
                sent = chunk if mask is None else mask(chunk)
                if withheld is not None:
                    sent = withheld(sent)
                await response.write(sent)
                watch.moved()
                tap.feed(chunk)
                if collect is not None:
                    collect(sent)
                if following is None:
                    asked = clock()
                    try:
                        chunk = await read()
                    finally:
                        record.waited_upstream(asked)
                else:
                    chunk = following
            watch.sending()
            await send_end(response, chunk, tap, withheld, collect, mask)
    except ConnectionResetError:  # the client left: not the provider's failure
        # ... with its whole answer: the tap has read every chunk the client was sent
        if tap.is_whole:
            record.saw_whole_answer_sent(status)
        raise Cut(CLIENT_CLOSED, Outcome.CLIENT_LEFT, "client closed the connection") from None
    except asyncio.CancelledError:  # the client left (handler_cancellation), or the shutdown
        if tap.is_whole:
            record.saw_whole_answer_sent(status)
        raise
    except TimeoutError:
        idle = silences.idle
        if watch.is_writing:  # a client that stopped reading: its own ending, not the provider's
            why = f"the client read nothing for {idle:g} seconds"
            raise Cut(CLIENT_CLOSED, Outcome.CLIENT_LEFT, why) from None
        why = f"the provider sent nothing for {idle:g} seconds"
        raise Cut(status, Outcome.TIMEOUT, why) from None
    finally:
        send_head(writer)  # the status is due whatever ended the stream (once sent: nothing)


async def send_end(
    response: web.StreamResponse,
    last: bytes,
    tap: UsageTap,
    withheld: UsageChunkFilter | None = None,
    collect: Callable[[bytes], None] | None = None,
    mask: StreamMask | None = None,
) -> None:
    """The body's `last` chunk (b"": it came before the end) and its end: in one write, not
    two, when nothing withheld is left over (the bytes are the same: the chunk's, then the
    end's); then the tap and `collect`, as for every chunk (relay_body)."""
    sent = last if mask is None else mask(last) + mask.rest()  # the end: nothing held
    if withheld is not None and sent:
        sent = withheld(sent)
    rest = b"" if withheld is None else withheld.rest()
    if rest:
        await response.write(sent)
        await response.write_eof(rest)
    else:
        await response.write_eof(sent)
    if last:
        tap.feed(last)
    if collect is not None:
        if sent:
            collect(sent)
        collect(rest)
