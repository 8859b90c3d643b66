"""The wire: HTTP/1.1 to providers over kept-alive connections, parsed by httptools.

aiohttp's `ClientSession.request` was the largest single cost of a proxied request (cookie
jars, redirects, tracing hooks, auto headers, decompression: work a proxy switches off one
by one). This is what a proxy's upstream side needs and no more, measured in
`bench/foundations.py` at about half the CPU per request:

- one pool of idle connections per origin (scheme, host, port), last in first out, an idle
  connection closed after `keepalive_seconds` (found so when the origin is next used, or by
  a sweep at the oldest's time when none is: those a burst left are closed whether traffic
  goes on or stops, not kept for as long as the provider allows), and any, however busy,
  once `MAX_AGE` old (so a provider's name is asked
  again: a move by DNS is followed); no limit on connections (concurrency is the quota's
  business);
- an idle connection left `HINT_MARGIN` (1 s) before the time its provider said it closes
  it (`Keep-Alive: timeout=N`, Node.js's 5 s), as Node's own client and undici do: a request
  written as the provider closes crosses its close unread, and a POST is not sent again;
- a connection idle over `LOOK_AFTER` (1 s) looked at before a request is written on it
  (one poll that does not wait, as urllib3 does for each): one whose provider closed it
  (uvicorn after 5 s, saying nothing) while the loop had not yet read its FIN is closed and
  another taken; one reused sooner, as under load, costs no system call. Idle, for both,
  counts from when reading paused for a slow reader, if it did: the provider may have
  written its answer's end then, and its idle time begun, long before it was read here;
- the request written once: head and body in one write (a body over JOIN_BYTES in a
  second, not copied onto its head); only `Host` and `Content-Length` are added (no
  User-Agent, Accept or Accept-Encoding of ours); a request given up while its body is
  still being written (no head in time, the client gone) loses the rest with its
  connection, so the provider gets it cut short, not whole;
- the answer handed back as soon as its head is parsed, then the body as the chunks arrive
  (`content.readany()`), the provider's chunked framing removed (any other transfer
  coding is refused: its header is hop-by-hop, so the client could not undo it) and its
  content coding kept: bytes pass as received; a body read to its end gives its connection back; a body
  framed by neither length nor chunks ends when the provider closes the connection;
- one answer per request: bytes past an answer's end (a second answer, a body longer than
  its Content-Length) or on an idle connection answer nothing asked, and close the
  connection, never read into this answer or the next request's;
- reading pauses while more than `HIGH_WATER` bytes wait for a slow client, so a fast
  provider cannot fill the gateway's memory;
- a host name's addresses tried as aiohttp's connector tries them (happy eyeballs, RFC 8305:
  the next address, of the other family first, is tried `HAPPY_EYEBALLS_DELAY` after the one
  before if that has not connected), so a first address that drops connection attempts (a
  replica gone, a broken IPv6 route) costs a quarter of a second, not the connect timeout;
  the name resolved on each new connection (nothing cached: a provider moved by DNS is
  reached at its new address by the connections opened after the change, at most `MAX_AGE`
  later);
- TLS with the system's default context (certificates and host names verified; a private
  CA through SSL_CERT_FILE or SSL_CERT_DIR, as OpenSSL reads them); a fully qualified name
  written with its trailing dot is looked up so, and verified and sent in Host without it;
- through an outbound proxy when one applies to the origin (`Egress`: HTTPS_PROXY,
  HTTP_PROXY, NO_PROXY as curl reads them): an https origin over a CONNECT tunnel, the TLS
  to the origin inside it, kept alive as any connection; an http origin by the request's
  absolute URL sent to the proxy (its 407 is the proxy's: a connect failure, never the
  client's answer). Without a proxy nothing of this runs but one check when connecting and
  one per request;
- the wait for an answer's head bounded (`timeout`, connecting included) without a timer
  per request: the requests waiting for a head share one alarm, set for the earliest
  deadline among them (under steady traffic it goes off about once a `timeout`);
- a reused connection the provider closed before answering is retried once on a new one,
  for idempotent methods only (a POST may have been read: it costs money; the two guards
  above keep it off connections its provider closed or is closing, all but one whose close
  was still on its way); the caller is told when a request was written (`on_sent`), which
  is where "surely not started" ends;
- failures are aiohttp's own exception types (`ClientConnectorError`,
  `ServerDisconnectedError`, `ClientPayloadError`, ...), so the attempt loop's failure map
  stays as it is.

WebSocket sessions still go through aiohttp's client, which this does not replace.
"""

from __future__ import annotations

import asyncio
import http
import math
import re
import select
import socket
import ssl
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import TypeVar, cast

import aiohappyeyeballs
import aiohttp
import httptools
from aiohappyeyeballs import AddrInfoType
from aiohttp.client_reqrep import ConnectionKey
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from proxy.upstream.egress import Egress, Hop, Origin

HIGH_WATER = 1 << 16  # bytes buffered for a slow reader before reading pauses
# Bytes read before an answer's head is whole (the reads that carry it): a provider's head is
# a few KiB; one that never ends fails here, not after holding it all until the timeout.
MAX_HEAD_BYTES = 1 << 20
IDEMPOTENT = frozenset(("GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"))
BODILESS = frozenset((204, 304))
# Each status's own reason phrase (RFC 9110 §15), as a provider's status line spells it: an
# answer with its status's own phrase (nearly every one) leaves the phrase to the server's
# writer, which writes the same; only another is read (`_phrase`).
_OWN_PHRASES = {status.value: status.phrase.encode() for status in http.HTTPStatus}
# What no status line may hold (RFC 9112 §4: a reason phrase is tabs, spaces, visible
# characters and obs-text), as no header may (RFC 9110 §5.5): the phrase's line would end in
# a client's parser (a CR or LF cannot come: the line ends there, httptools refuses a CR).
_NOT_IN_A_PHRASE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
# A provider's Keep-Alive timeout less this is how long its connection waits idle: its close
# and a request sent just then would cross (Node.js's http.Agent and undici take a second).
HINT_MARGIN = 1.0
# A connection idle longer than this is looked at (`_closed_under_us`, one system call)
# before a request is written on it; one reused sooner, as under load, is not. Below the
# shortest idle timeout of common servers (gunicorn's 2 s; uvicorn's, Node's 5 s).
LOOK_AFTER = 1.0
# Seconds a connection serves at most, however busy: then it is closed as it comes back to
# the pool, and the next one asks the provider's name again (a provider moved by DNS is
# followed within this while the old address still answers). nginx's upstream keepalive_time
# is an hour; this matches the WebSocket sessions' DNS cache (app.py's ttl_dns_cache).
MAX_AGE = 300.0
# Seconds a new connection may take to be set up (its address tried, TCP, the proxy's tunnel,
# TLS), within REQUEST_TIMEOUT: the OpenAI and Anthropic SDKs' own (httpx's connect timeout
# of 5 s within their 600). A provider host that drops connection attempts is failed over
# in seconds, not after the kernel's SYN retries (about two minutes) or REQUEST_TIMEOUT.
CONNECT_SECONDS = 5.0
# Seconds before the next of a host name's addresses is tried while the one before has not
# connected yet (aiohttp's connector's default; RFC 8305 recommends 0.25 s).
HAPPY_EYEBALLS_DELAY = 0.25
# The alarm may go off this early (an event loop's timers round to the millisecond).
CLOCK_SLACK = 0.001
# Seconds at least between two sweeps of the idle connections past their time: an idle one
# may outlive its time by this much (no request is written on it: it is looked at first).
SWEEP_GAP = 1.0
# A body up to this size is joined to its head, one write (one system call); a larger one
# is written after it as it is: joined, it was copied, and the copy held as long as the
# request (8 clients each sending a 30 MB image took the gateway 445 MB over its idle size
# while the provider thought, 277 MB written apart).
JOIN_BYTES = 65536


class Body:
    """The answer's body as it arrives: `readany()` gives what is there, b"" at its end.

    It, not its Reply, gives the connection back (`release`, `close`), once: read to its
    end, the connection serves the next request. It holds no reference to its Reply, and
    the connection lets go of both when given back: an answer's objects are freed by
    reference counting, not left for the garbage collector to find in a cycle. So it keeps
    a failure's words, not the exception: each read raises a new one, whose traceback holds
    the reader's frames (and this body) without this body holding it."""

    __slots__ = ("_chunks", "_size", "_done", "_error", "_waiter", "_connection", "_released")

    def __init__(self, connection: Connection) -> None:
        self._chunks: deque[bytes] = deque()
        self._size = 0
        self._done = False
        self._error: str | None = None  # why the body broke off
        self._waiter: asyncio.Future[None] | None = None
        self._connection = connection
        self._released = False

    def has_arrived(self) -> bool:
        """All of the body is here, whole (most small answers come with their head)."""
        return self._done and self._error is None

    async def readany(self) -> bytes:
        while not self._chunks:
            if self._error is not None:
                raise aiohttp.ClientPayloadError(self._error)
            if self._done:
                self.release()
                return b""
            self._waiter = self._connection.loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        chunk = self._chunks.popleft()
        size = self._size
        self._size = size - len(chunk)
        if size >= HIGH_WATER > self._size:  # only then can reading have paused (feed)
            self._connection.resume()
        return chunk

    async def arrive(self) -> bool:
        """Wait, taking nothing, until the whole body is here (True), or it is not small:
        HIGH_WATER bytes wait unread (reading paused: False). Raises its failure (aiohttp's
        ClientPayloadError...) when it broke off first."""
        while not self._done and self._error is None and self._size < HIGH_WATER:
            self._waiter = self._connection.loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        if self._error is not None:
            raise aiohttp.ClientPayloadError(self._error)
        return self.has_arrived()

    def at_hand(self) -> bytes:
        """What has come and waits unread, taking nothing (b"" when nothing has)."""
        chunks = self._chunks
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def grown(self, size: int) -> None:
        """Wait, taking nothing, until more than `size` bytes wait unread, or the body ended.
        Raises its failure when it broke off first (and stays broken for the reader)."""
        while self._size <= size and not self._done and self._error is None:
            self._waiter = self._connection.loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        if self._size <= size and self._error is not None:
            raise aiohttp.ClientPayloadError(self._error)

    async def read(self) -> bytes:
        """The rest of the body, whole; the connection given back."""
        if self.has_arrived():  # most small answers: no wait
            body = b"".join(self._chunks)
            self._chunks.clear()
            self._size = 0
            self.release()
            return body
        parts = []
        while chunk := await self.readany():
            parts.append(chunk)
        return b"".join(parts)

    async def iter_any(self) -> AsyncIterator[bytes]:
        while chunk := await self.readany():
            yield chunk

    def release(self) -> None:
        """Done with the answer: its connection goes back to the pool if it can be reused."""
        if not self._released:
            self._released = True
            self._connection.finish(self._done and not self._chunks)

    def close(self) -> None:
        """Done, whatever is left unread: the connection is closed."""
        if not self._released:
            self._released = True
            self._connection.finish(False)

    def feed(self, chunk: bytes) -> None:
        self._chunks.append(chunk)
        self._size += len(chunk)
        if self._size >= HIGH_WATER:
            self._connection.pause()
        self._wake()

    def end(self) -> None:
        self._done = True
        self._wake()

    def fail(self, why: str) -> None:
        """The body broke off: each read from now raises aiohttp's ClientPayloadError(why)."""
        if not self._done and self._error is None:  # the first failure is the cause
            self._error = why
            self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


class Reply:
    """A provider's answer: the surface of aiohttp's ClientResponse that the relay reads."""

    __slots__ = ("status", "reason", "headers", "content", "has_raw_bytes")

    def __init__(self, connection: Connection) -> None:
        self.status = 0
        # The status line's reason phrase, when it is not the status's own (None): the
        # provider's words ("529 Overloaded", "429 Slow Down", "200 " with none), passed on.
        self.reason: str | None = None
        self.headers: CIMultiDictProxy[str] = _NO_HEADERS
        self.content = Body(connection)
        # A header value (or the reason) holds bytes that are not UTF-8, as lone surrogates
        # (`on_header`): its head is written back with them (relay/head_bytes.py).
        self.has_raw_bytes = False

    @property
    def content_length(self) -> int | None:
        length = self.headers.get("Content-Length")
        return int(length) if length is not None and length.isdigit() else None

    async def read(self) -> bytes:
        return await self.content.read()

    def release(self) -> None:
        """Done with the answer: its connection goes back to the pool if it can be reused."""
        self.content.release()

    def close(self) -> None:
        """Done, whatever is left unread: the connection is closed."""
        self.content.close()


_NO_HEADERS: CIMultiDictProxy[str] = CIMultiDictProxy(CIMultiDict())  # read-only: shared


class Connection(asyncio.Protocol):
    """One connection to an origin, answering one request at a time."""

    def __init__(self, wire: Wire, origin: Origin) -> None:
        self.wire, self.origin, self.loop = wire, origin, wire.loop
        self.transport: asyncio.Transport | None = None
        self.reply: Reply | None = None
        self.headed: asyncio.Future[Reply] | None = None
        self.idle_since = 0.0
        self.expires = 0.0  # the loop's time past which, idle, it is not used (Wire.keep)
        self.retires = self.loop.time() + MAX_AGE  # past which it is not kept, however busy
        self.paused_at = math.inf  # when reading first paused for a slow reader (Wire.keep)
        self.reusable = False
        self.heard = False  # any byte of the current answer arrived
        self.head_only = False  # answering a HEAD: no body follows the head
        self.answered = False  # the current request's (final) answer came whole
        self._paused = False
        self._head_left = -1  # bytes an answer's head may still take; -1: its head is whole
        self._has_raw_bytes = False  # a value of the head being parsed is not UTF-8
        self._phrase = b""  # the reason phrase of the head being parsed, as far as it came
        # The answer's header fields as they are parsed (after its head, a throwaway that
        # takes a chunked body's trailers).
        self._fields: CIMultiDict[str] = CIMultiDict()
        self._parser = httptools.HttpResponseParser(self)

    def begin(self, head_only: bool) -> asyncio.Future[Reply]:
        self._fields, self.heard, self.reusable = CIMultiDict(), False, False
        self.head_only, self.answered = head_only, False
        self._head_left, self._has_raw_bytes = MAX_HEAD_BYTES, False  # not a trailer's
        self.reply = Reply(self)
        self.headed = self.loop.create_future()
        return self.headed

    # --- asyncio.Protocol ---
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        self.heard = True
        if self._head_left >= 0:
            self._head_left -= len(data)
            if self._head_left < 0:
                self._fail(f"head over {MAX_HEAD_BYTES} bytes")
                return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail("unexpected upgrade")
        except httptools.HttpParserCallbackError as error:  # a callback of ours refused it
            self._fail(str(error.__context__ or error))
        except httptools.HttpParserError as error:
            self._fail(str(error))

    def connection_lost(self, exc: Exception | None) -> None:
        self.reusable = False
        self.wire.forget(self)
        # The parser calls back into this connection, a cycle: let go of, a closed connection
        # is freed by reference counting, not left for a collection to find.
        del self._parser
        if self.headed is not None and not self.headed.done():
            self.headed.set_exception(_lost_unanswered(self.origin, exc))
        elif self.reply is not None:
            if exc is None and _ends_at_close(self.reply.headers):
                self.reply.content.end()  # the close is its end: the body is whole
                return
            self.reply.content.fail(f"the provider closed the connection ({exc or 'EOF'})")

    # --- httptools callbacks ---
    def on_message_begin(self) -> None:
        """An answer begins: to a request sent, and only one (a 1xx is not one). Anything
        else (a second answer to one request, bytes past a Content-Length, bytes while the
        connection waits in the pool) answers nothing asked: read as this request's, it
        would change its head and body, or take the next request's answer for its body.
        Raising stops the parse, and the connection is closed (data_received)."""
        if self.reply is None or self.answered:
            raise UnaskedAnswer

    def on_status(self, phrase: bytes) -> None:
        # The reason phrase, in as many pieces as the reads that carried it (most: one).
        self._phrase += phrase

    def on_header(self, name: bytes, value: bytes) -> None:
        # UTF-8 (a file name in Content-Disposition) as aiohttp's server writes it back: the
        # same bytes. Any other byte (Latin-1, obs-text: RFC 9110 §5.5) as a lone surrogate,
        # as aiohttp holds a request's: the relay writes such a head back byte for byte
        # (`has_raw_bytes`). Read as Latin-1, it went out re-encoded (`\xe9` as `\xc3\xa9`).
        try:
            text = value.decode()
        except UnicodeDecodeError:
            text = value.decode("utf-8", "surrogateescape")
            self._has_raw_bytes = True
        self._fields.add(name.decode("latin-1"), text)

    def on_headers_complete(self) -> None:
        reply, headed, parser = self.reply, self.headed, self._parser
        if reply is None or headed is None:  # given up (finish): the answer is not wanted
            return
        status = parser.get_status_code()
        fields, self._fields = self._fields, CIMultiDict()
        has_raw_bytes, self._has_raw_bytes = self._has_raw_bytes, False
        phrase, self._phrase = self._phrase, b""
        if status < 200:  # 1xx: an interim answer, the real one follows
            if status < 100:
                self._fail(f"status {status}")
            return
        codings = fields.getall("Transfer-Encoding", ())  # two fields: "chunked, chunked"
        if codings and (len(codings) > 1 or codings[0].strip(" \t").lower() != "chunked"):
            # Only chunked framing is taken off (and the header is hop-by-hop): a body coded
            # further would reach the client as coded bytes with nothing saying so. Its
            # value is not quoted: an error body carries none of the provider's bytes.
            raise NotReadable("a Transfer-Encoding other than chunked")
        reply.status, self._head_left = status, -1
        reply.headers = CIMultiDictProxy(fields)
        if phrase != _OWN_PHRASES.get(status):  # the provider's own words: seldom
            reply.reason, is_raw = _phrase(phrase)
            has_raw_bytes = has_raw_bytes or is_raw
        reply.has_raw_bytes = has_raw_bytes
        if not headed.done():
            headed.set_result(reply)
        if self.head_only or status in BODILESS:
            self.answered = True
            reply.content.end()  # no body follows; the parser cannot know that for HEAD
            self.reusable = status in BODILESS and parser.should_keep_alive()

    def on_body(self, body: bytes) -> None:
        # None: given up (finish), the rest is not wanted; answered: a HEAD's, whose
        # Content-Length the parser takes for a body to come
        if self.reply is not None and not self.answered:
            self.reply.content.feed(body)

    def on_message_complete(self) -> None:
        if self.reply is None or self.reply.status < 200:
            return
        self.answered = True
        self.reusable = self._parser.should_keep_alive() and not self.head_only
        self.reply.content.end()

    # --- flow control and ending ---
    def pause(self) -> None:
        if not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
            if self.paused_at == math.inf:
                self.paused_at = self.loop.time()

    def resume(self) -> None:
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()

    def finish(self, complete: bool) -> None:
        self.resume()
        reply = self.reply
        self.reply = self.headed = None
        if complete and self.reusable and self.transport and not self.transport.is_closing():
            assert reply is not None  # reusable: its answer came whole
            self.wire.keep(self, reply.headers.get("Keep-Alive"))
        else:
            self.drop()

    def time_out(self) -> None:
        """The head did not come in time: its waiter gets TimeoutError (and closes this)."""
        if self.headed is not None and not self.headed.done():
            self.headed.set_exception(TimeoutError())

    def _fail(self, problem: str) -> None:
        """What came is not valid HTTP: before the head, the answer fails as aiohttp's
        ClientResponseError; after it, its body breaks off (ClientPayloadError, as a cut)."""
        if self.headed is not None and not self.headed.done():
            self.headed.set_exception(aiohttp.ClientResponseError(_info(), (), message=problem))
        elif self.reply is not None:
            self.reply.content.fail(f"not valid HTTP: {problem}")
        self.drop()

    def drop(self) -> None:
        """Close, not to be reused. What of the request is not yet written (a large body
        given up on: no head in time, the client gone) is dropped: a transport's close()
        writes it all first, which finished the request for the provider, and waited for
        ever on one that reads nothing (the body held with the connection)."""
        transport = self.transport
        if transport is None:
            return
        if transport.get_write_buffer_size():
            transport.abort()
        else:
            transport.close()


class NotReadable(Exception):
    """An answer the wire does not read (`Connection.on_headers_complete`)."""


class UnaskedAnswer(Exception):
    """A provider sent an answer to no request (`Connection.on_message_begin`)."""


class Wire:
    """Kept-alive connections per origin, and the one way to send a request on them."""

    def __init__(
        self,
        connect_timeout: float,
        keepalive_seconds: float = 30.0,
        egress: Egress | None = None,
        resolve: Resolve | None = None,
    ) -> None:
        """Made in the running loop, which it keeps: asking for it (asyncio.get_running_loop)
        costs a getpid() system call in CPython 3.11, several times a request. `egress`: the
        outbound proxies (None: every origin directly). `resolve`: a host name and port to
        their addresses, as getaddrinfo answers (None: the loop's getaddrinfo)."""
        self.loop = asyncio.get_running_loop()
        self._egress = egress
        self._resolve = resolve or self._getaddrinfo
        self.connect_timeout = connect_timeout
        self.keepalive_seconds = keepalive_seconds
        self.look_after = LOOK_AFTER
        self._idle: dict[Origin, deque[Connection]] = {}
        self._tls = ssl.create_default_context()
        self._closed = False
        # Connections whose answer's head is awaited, with its deadline (the loop's time);
        # one alarm for them all, at the earliest (`_alarm_at`).
        self._heads: dict[Connection, float] = {}
        self._alarm: asyncio.TimerHandle | None = None
        self._alarm_at = math.inf
        # The sweep of idle connections past their time, at the soonest such time (`_sweep_at`).
        self._sweep: asyncio.TimerHandle | None = None
        self._sweep_at = math.inf

    async def request(
        self,
        method: str,
        url: URL,
        headers: Mapping[str, str],
        body: bytes | None,
        on_sent: Callable[[], None] | None = None,
        timeout: float | None = None,
    ) -> Reply:
        """Send one request; return as soon as the answer's head arrived.

        `on_sent` is told when the request is written to a connection: from then on the
        provider may be at work on it (before, a failure surely did not start it).
        `timeout`: seconds from now until the head (connecting included); None: no bound
        but the connect timeout. Raises TimeoutError when it passed (an
        aiohttp.ConnectionTimeoutError while connecting, surely not sent).
        """
        scheme, host, port = url.scheme, url.raw_host or "", url.port
        default_port = 443 if scheme == "https" else 80
        origin = (scheme, host, port or default_port)
        if host[-1:] == ".":  # a name with the root's dot: looked up so, never named so
            host = _named(host)
        if ":" in host:  # an IPv6 address: bracketed in Host, as in the URL (RFC 9110 §7.2)
            host = f"[{host}]"
        if port is not None and port != default_port:
            host = f"{host}:{port}"
        target, extra, hop = url.raw_path_qs or "/", "", None
        if self._egress is not None and scheme == "http":
            hop = self._egress.hop(origin)
            if hop is not None:  # to the proxy: the absolute URL, and its credentials
                target = f"http://{host}{target}"
                if hop.authorization is not None:
                    extra = f"\r\nProxy-Authorization: {hop.authorization}"
        head = _head(method, target, host, headers, body, extra)
        # A large body follows its head in a write of its own (`_head` joins the others).
        tail = body if body is not None and len(body) > JOIN_BYTES else None
        now = self.loop.time()
        deadline = math.inf if timeout is None else now + timeout
        connection = self._idle_one(origin, now)
        reused, heads = connection is not None, self._heads
        while True:
            if connection is None:
                connection = await self._connect(origin, deadline)
            headed = connection.begin(head_only=method == "HEAD")
            assert connection.transport is not None
            connection.transport.write(head)
            if tail is not None:
                connection.transport.write(tail)
            if on_sent is not None:
                on_sent()
            if deadline < math.inf:
                heads[connection] = deadline
                if deadline < self._alarm_at:
                    self._set_alarm(deadline)
            try:
                reply = await headed
            except BaseException as error:
                heads.pop(connection, None)
                connection.finish(False)  # cancelled, timed out or failed: not reused
                if not (
                    reused
                    and isinstance(error, aiohttp.ServerDisconnectedError)
                    and method in IDEMPOTENT
                    and not connection.heard
                ):
                    raise
                # A kept connection the provider had closed, unheard: once more on a new one.
                connection, reused = None, False
                continue
            heads.pop(connection, None)
            if hop is not None and reply.status == 407:  # the proxy's, for its credentials
                reply.close()
                raise _proxy_error(hop, f"it refused the request ({_status(407)})")
            return reply

    def _set_alarm(self, when: float) -> None:
        if self._alarm is not None:
            self._alarm.cancel()
        self._alarm = self.loop.call_at(when, self._ring)
        self._alarm_at = when

    def _ring(self) -> None:
        """The alarm: every head awaited past its deadline times out; the next is set."""
        self._alarm, self._alarm_at = None, math.inf
        heads = self._heads
        now = self.loop.time() + CLOCK_SLACK
        for connection in [c for c, deadline in heads.items() if deadline <= now]:
            del heads[connection]
            connection.time_out()
        if heads:
            self._set_alarm(min(heads.values()))

    def _idle_one(self, origin: Origin, now: float) -> Connection | None:
        """The connection to `origin` kept last, if one is still open and fresh."""
        idle = self._idle.get(origin)
        while idle:
            connection = idle.pop()
            transport = connection.transport
            if transport is None or transport.is_closing():
                continue
            if now > connection.expires:
                transport.close()
                continue
            if now - connection.idle_since > self.look_after and _closed_under_us(transport):
                transport.close()  # its provider closed it: the loop had not read that yet
                continue
            return connection
        return None

    async def _connect(self, origin: Origin, deadline: float) -> Connection:
        scheme, host, port = origin
        tls = self._tls if scheme == "https" else None
        loop = self.loop
        hop = self._egress.hop(origin) if self._egress is not None else None
        try:
            async with asyncio.timeout_at(min(loop.time() + self.connect_timeout, deadline)):
                if hop is None:
                    _, connection = await loop.create_connection(
                        lambda: Connection(self, origin),
                        sock=await self._socket(host, port),
                        ssl=tls,
                        server_hostname=_named(host) if tls else None,
                    )
                elif tls is None:  # http: each request goes to the proxy, absolute-form
                    connection = await self._to_proxy(hop, lambda: Connection(self, origin))
                else:
                    connection = await self._tunnel(hop, origin, tls)
        except TimeoutError as error:
            through = f" through the outbound proxy {hop.where}" if hop is not None else ""
            raise aiohttp.ConnectionTimeoutError(
                f"connecting to {host}:{port}{through} timed out"
            ) from error
        except aiohttp.ClientConnectorError:  # the proxy's (an OSError too)
            raise
        except OSError as error:
            raise _connect_error(origin, error) from error
        sock = connection.transport.get_extra_info("socket") if connection.transport else None
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return connection

    async def _socket(self, host: str, port: int) -> socket.socket:
        """A TCP socket connected to `host` at one of its addresses, tried as aiohttp's
        connector tries them (happy eyeballs). Raises OSError (socket.gaierror: no such name)."""
        addresses = await self._resolve(host, port)
        if not addresses:
            raise socket.gaierror(socket.EAI_NONAME, "no address")
        try:
            return await aiohappyeyeballs.start_connection(
                addresses, happy_eyeballs_delay=HAPPY_EYEBALLS_DELAY, loop=self.loop
            )
        except RuntimeError as error:  # uvloop's way of saying some connect failed
            raise OSError(str(error)) from error

    async def _getaddrinfo(self, host: str, port: int) -> Sequence[AddrInfoType]:
        return await self.loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)

    async def _to_proxy(self, hop: Hop, protocol: Callable[[], _P]) -> _P:
        """A TCP connection to the proxy, speaking `protocol`. Raises
        aiohttp.ClientProxyConnectionError when the proxy cannot be reached."""
        try:
            sock = await self._socket(hop.host, hop.port)
            _, connected = await self.loop.create_connection(protocol, sock=sock)
        except OSError as error:
            raise _proxy_error(hop, f"could not connect ({_reason(error)})") from error
        return connected

    async def _tunnel(self, hop: Hop, origin: Origin, tls: ssl.SSLContext) -> Connection:
        """A connection to an https origin through the proxy: CONNECT, the proxy's 2xx, then
        TLS to the origin (verified as a direct one) over the same socket. Raises
        aiohttp.ClientProxyConnectionError when the proxy refuses (407, 403, 502...)."""
        _, host, port = origin
        authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        tunnel = await self._to_proxy(hop, lambda: Tunnel(self.loop))
        transport = tunnel.transport
        assert transport is not None
        try:
            authorization = (
                f"Proxy-Authorization: {hop.authorization}\r\n" if hop.authorization else ""
            )
            transport.write(
                f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n{authorization}\r\n".encode(
                    "utf-8", "surrogateescape"
                )
            )
            try:
                status = await tunnel.answered
            except TunnelBroken as error:
                raise _proxy_error(hop, str(error)) from None
            if not 200 <= status < 300:
                raise _proxy_error(hop, f"it refused the tunnel ({_status(status)})")
            connection = Connection(self, origin)
            secured = await self.loop.start_tls(
                transport, connection, tls, server_hostname=_named(host)
            )
        except BaseException:
            transport.close()
            raise
        if secured is None:  # the transport closed while TLS began
            raise _proxy_error(hop, "it closed the tunnel")
        connection.connection_made(secured)
        return connection

    def keep(self, connection: Connection, hint: str | None = None) -> None:
        """Keep `connection` for the next request to its origin, `keepalive_seconds` at most,
        less when the provider's Keep-Alive header (`hint`) says it closes sooner."""
        lifetime = (
            self.keepalive_seconds if hint is None else _lifetime(hint, self.keepalive_seconds)
        )
        now = self.loop.time()
        # The provider is idle from when it wrote the answer's end: when reading paused for a
        # slow reader, perhaps long before the answer was read through here (its close, then,
        # waits unread behind the answer's last bytes).
        since = connection.paused_at
        if since > now:  # most answers: read as they came
            since = now
        else:
            connection.paused_at = math.inf
        expires = since + lifetime
        if expires > connection.retires:  # not min(): a call less a request
            expires = connection.retires
        connection.idle_since, connection.expires = since, expires
        if self._closed or connection.expires <= now:
            if connection.transport is not None:
                connection.transport.close()
            return
        idle = self._idle.get(connection.origin)
        if idle is None:  # not setdefault: it would make a deque each time
            idle = self._idle[connection.origin] = deque()
        idle.append(connection)
        # Traffic takes the newest (last in, first out), so those a burst left sit under it
        # untaken: close those idle past their time, oldest first, as each is kept.
        while idle[0].expires < now:
            stale = idle.popleft()
            if stale.transport is not None:
                stale.transport.close()
        # When no request comes to find them (traffic stopped after a burst), the sweep does.
        if expires < self._sweep_at:
            self._set_sweep(expires)

    def _set_sweep(self, when: float) -> None:
        if self._sweep is not None:
            self._sweep.cancel()
        self._sweep = self.loop.call_at(when, self._sweep_idle)
        self._sweep_at = when

    def _sweep_idle(self) -> None:
        """Close every idle connection past its time; set the next sweep at the soonest time
        of those left. Under traffic, about one pass a keep-alive; idle, none once all are
        closed."""
        self._sweep, self._sweep_at = None, math.inf
        now, soonest = self.loop.time() + CLOCK_SLACK, math.inf
        for origin, idle in self._idle.items():
            fresh: deque[Connection] = deque()
            for connection in idle:
                if connection.expires > now:
                    fresh.append(connection)
                    if connection.expires < soonest:
                        soonest = connection.expires
                elif connection.transport is not None:
                    connection.transport.close()
            self._idle[origin] = fresh
        if soonest < math.inf:  # not sooner than SWEEP_GAP: a pass per connection kept
            self._set_sweep(max(soonest, now + SWEEP_GAP))

    def forget(self, connection: Connection) -> None:
        idle = self._idle.get(connection.origin)
        if idle and connection in idle:
            idle.remove(connection)

    async def close(self) -> None:
        self._closed = True
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep, self._sweep_at = None, math.inf
        if self._alarm is not None and not self._heads:
            self._alarm.cancel()
            self._alarm, self._alarm_at = None, math.inf
        for idle in self._idle.values():
            for connection in idle:
                if connection.transport is not None:
                    connection.transport.close()
        self._idle.clear()


def _head(
    method: str,
    target: str,
    host: str,
    headers: Mapping[str, str],
    body: bytes | None,
    extra: str = "",
) -> bytes:
    """The request line for `target` (path and query, or the absolute URL for a proxy), the
    headers plus Host, `extra` (a proxy's "\r\nProxy-Authorization: ...") and Content-Length
    of ours, then the body unless it is over JOIN_BYTES (written on its own)."""
    if isinstance(headers, _CASELESS) and headers.keys().isdisjoint(_OURS):
        # the relay's (none of ours to drop, asked case-blind): each "name: value" joined in C
        fields = "\r\n".join(map(": ".join, headers.items()))
    else:
        fields = "\r\n".join(
            [f"{name}: {value}" for name, value in headers.items() if name.lower() not in _OURS]
        )
    before = "\r\n" if fields else ""
    length = f"\r\nContent-Length: {len(body) if body else 0}" if body or method in _BODIED else ""
    text = f"{method} {target} HTTP/1.1\r\nHost: {host}{before}{fields}{extra}{length}\r\n\r\n"
    head = text.encode("utf-8", "surrogateescape")
    return head + body if body and len(body) <= JOIN_BYTES else head


_OURS = frozenset(("host", "content-length", "transfer-encoding", "connection"))
_CASELESS = (CIMultiDict, CIMultiDictProxy)
_BODIED = frozenset(("POST", "PUT", "PATCH"))  # a Content-Length even when empty


def _named(host: str) -> str:
    """A host as TLS (SNI, the certificate's names) and Host name it: a fully qualified name
    without its trailing dot (RFC 6066 §3), which only its DNS lookup keeps (aiohttp #3636)."""
    return host.rstrip(".")


def _lifetime(hint: str, longest: float) -> float:
    """How long a connection may wait idle when its provider's Keep-Alive header says
    `timeout=N` (Node.js servers send it): HINT_MARGIN less than N, so it is not used just
    as the provider closes it; `longest` when the header says no timeout."""
    for parameter in hint.split(","):
        name, _, value = parameter.partition("=")
        if name.strip(" \t").lower() == "timeout":
            value = value.strip(' \t"')
            if value.isascii() and value.isdigit():
                if len(value) > 9:  # over 30 years: longer than `longest` (and any float)
                    return longest
                return min(longest, int(value) - HINT_MARGIN)
    return longest


def _closed_under_us(transport: asyncio.Transport) -> bool:
    """Its provider closed this idle connection (its FIN or RST waits in the socket) or sent
    on it (bytes that answer nothing, or TLS's close_notify) since the loop last read it: a
    request written there would cross the close. One poll of its descriptor that does not
    wait (urllib3's wait_for_read(sock, 0)); nothing is read."""
    sock = transport.get_extra_info("socket")  # a TLS transport's too: the TCP socket's
    if sock is None:
        return False
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)  # POLLHUP, POLLERR come unasked
    return bool(poller.poll(0))


def _ends_at_close(headers: CIMultiDictProxy[str]) -> bool:
    """A body framed by neither Content-Length nor chunked coding, which ends when the
    server closes the connection (RFC 9112 §6.3: an HTTP/1.0 server's, a minimal one's).
    Any other Transfer-Encoding than chunked was refused with the head."""
    return "Content-Length" not in headers and "Transfer-Encoding" not in headers


def _connect_error(origin: Origin, error: OSError) -> aiohttp.ClientConnectorError:
    scheme, host, port = origin
    key = ConnectionKey(host, port, scheme == "https", True, None, None, None)
    if isinstance(error, socket.gaierror):
        return aiohttp.ClientConnectorDNSError(key, error)
    if isinstance(error, ssl.SSLCertVerificationError):
        return aiohttp.ClientConnectorCertificateError(key, error)
    if isinstance(error, ssl.SSLError):
        return aiohttp.ClientConnectorSSLError(key, error)
    return aiohttp.ClientConnectorError(key, error)


def _lost_unanswered(origin: Origin, error: Exception | None) -> aiohttp.ClientError:
    """A connection lost before its answer's head: closed by the provider, or TLS refused.

    Under TLS 1.3 the client's side of the handshake ends before the server has read the
    client's certificate, so a provider that requires one (mutual TLS) sends its refusal, an
    alert, where the answer should be: TLS's failure, as at connect, not a close."""
    if isinstance(error, ssl.SSLError):
        return _connect_error(origin, error)
    return aiohttp.ServerDisconnectedError()


class TunnelBroken(Exception):
    """The proxy's answer to CONNECT is not one (`Tunnel`)."""


class Tunnel(asyncio.Protocol):
    """A proxy's answer to CONNECT: its status once its head is whole (`answered`). Nothing
    after the head is read: TLS takes the socket over from there (a refusal's page is
    dropped with its connection)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.transport: asyncio.Transport | None = None
        self.answered: asyncio.Future[int] = loop.create_future()
        self._head = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self.answered.done():
            return
        self._head += data
        end = self._head.find(b"\r\n\r\n")
        if end < 0:
            if len(self._head) > MAX_HEAD_BYTES:
                self.answered.set_exception(TunnelBroken("its answer to CONNECT never ended"))
            return
        line = self._head.split(b"\r\n", 1)[0].split()
        if len(line) < 2 or not line[0].startswith(b"HTTP/1.") or not line[1].isdigit():
            self.answered.set_exception(TunnelBroken("its answer to CONNECT is not HTTP"))
            return
        status = int(line[1])
        # Past a refusal, its error page (Squid's, tinyproxy's), not read: the status says it.
        if end + 4 != len(self._head) and 200 <= status < 300:
            # a proxy speaking for the origin before TLS began
            self.answered.set_exception(TunnelBroken("it sent bytes past its answer to CONNECT"))
            return
        assert self.transport is not None
        self.transport.pause_reading()  # until TLS takes over (or the refusal closes it)
        self.answered.set_result(status)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.answered.done():
            self.answered.set_exception(
                TunnelBroken("it closed the connection before answering CONNECT")
            )


_P = TypeVar("_P", bound=asyncio.BaseProtocol)
# A host name and port to their addresses, as getaddrinfo answers (family, type, protocol,
# canonical name, address), in the order to try them.
Resolve = Callable[[str, int], Awaitable[Sequence[AddrInfoType]]]


def _proxy_error(hop: Hop, problem: str) -> aiohttp.ClientProxyConnectionError:
    """The proxy failed the connection: aiohttp's error for it (a connect failure, the
    gateway's 502 upstream_unreachable), naming the proxy by host and port only."""
    key = ConnectionKey(hop.host, hop.port, False, True, None, None, None)
    return aiohttp.ClientProxyConnectionError(key, OSError(0, problem))


def _status(status: int) -> str:
    """A proxy's status with the standard phrase (its own words are not quoted)."""
    try:
        return f"{status} {http.HTTPStatus(status).phrase}"
    except ValueError:
        return str(status)


# getaddrinfo's answers when the resolver failed (unreachable, timed out, SERVFAIL), which
# say nothing of whether the name exists.
LOOKUP_FAILED = frozenset((socket.EAI_AGAIN, socket.EAI_FAIL))


def _phrase(phrase: bytes) -> tuple[str | None, bool]:
    """A reason phrase that is not its status's own, as the relay writes it back, and whether
    it holds bytes that are not UTF-8 (obs-text: each a lone surrogate, written back as the
    byte it was by relay/head_bytes.py). None (the status's own phrase goes out) for one
    holding a control no status line may hold: never written, whatever a client would read
    into it."""
    if _NOT_IN_A_PHRASE.search(phrase) is not None:
        return None, False
    try:
        return phrase.decode(), False
    except UnicodeDecodeError:
        return phrase.decode("utf-8", "surrogateescape"), True


def _reason(error: OSError) -> str:
    if isinstance(error, socket.gaierror):
        if error.errno in LOOKUP_FAILED:  # the resolver's failure, not the name's
            return f"the DNS lookup of its host name failed ({error.strerror})"
        return "its host name was not found"
    return error.strerror or type(error).__name__


def _info() -> aiohttp.RequestInfo:
    return aiohttp.RequestInfo(URL(), "", CIMultiDictProxy(CIMultiDict()), URL())
