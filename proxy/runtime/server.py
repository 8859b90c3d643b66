"""Serving the app in one process: listen, bound the connections, drain on SIGTERM/SIGINT.

Owns the process side of one gateway process: the listening socket, how many client
connections it holds and for how long a request's head may take, the signals, and the
drain. It does not build the app (`app.build_app`) nor supervise several processes
(`workers`).

Why not `web.run_app`: its drain waits `shutdown_timeout` twice (once for handlers to
finish, once more after cancelling only the request body), so streams that never end
kept a stopping gateway up for twice SHUTDOWN_GRACE_SECONDS, and its
protocol factory cannot be wrapped. Here the same `AppRunner` runs under one deadline:
when the grace is over, the connections still open are closed, which cancels their
handlers (`handler_cancellation`), each handler writes its log line on the way out, and
the app's cleanup (the logbook's flush) runs after that, as before.

Bounds on what a client can hold, so that slow or idle connections cannot exhaust the
process's memory, measured in `bench/connections.py`:
- request heads (set in `app.build_app`'s `handler_args`, where tests get them too): at most
  64 headers (the SDKs send about 20; a mesh and a CDN in front add a dozen or more) of at
  most 4 KiB each, name and value, and a request line of 8 KiB (aiohttp's default); past
  them the answer is 431 (`handle_error`). A head is kept twice (raw and decoded), so one
  connection's head holds about 0.5 MB at most,
  where aiohttp's 128 headers of 64 KiB let it hold 16 MB;
- the head must arrive within CLIENT_HEADER_TIMEOUT of the connection opening or of the
  previous response ending (aiohttp's keep-alive timer, which it starts with the connection
  and does not restart while a head trickles in): a slowloris is cut, and an idle
  keep-alive connection is closed after the same time;
- at most MAX_CONNECTIONS client connections per process: the next one takes the place of
  an idle keep-alive connection (closed; looked for at most once in LOOK_AGAIN_SECONDS while
  none is), else is answered 503 with Retry-After and closed at once, without a parser or a buffer of its own, so the process never holds more
  sockets to clients than MAX_CONNECTIONS (one more, for a turn of the loop, while an idle
  one closes);
- a connection whose client takes nothing of what was sent to it for twice
  STREAM_IDLE_TIMEOUT is dropped by the kernel (`drop_unread`), also once its request is
  over and the rest of its answer waits in a buffer the relay no longer watches.
And the other way round, so the process can hold that many: its soft limit on open files is
raised to the hard one (`raise_open_files_limit`). Past that limit, a connection that took the
process's last descriptor is answered 503 too_many_open_files, as one past the cap is, which
frees it for the next (`_RequestHandler.connection_made`), counted in /metrics, said once on
stderr and in /health; where asyncio's loop runs the gateway, an accept that found none left
is said the same way (`accept_failures`), not by a traceback at each try.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import math
import resource
import signal
import socket
from asyncio.trsock import TransportSocket
from collections.abc import Callable, Iterator
from typing import Any, cast

import orjson
from aiohttp import HttpVersion11, StreamReader, web
from aiohttp.http_exceptions import (
    BadHttpMethod,
    BadStatusLine,
    HttpProcessingError,
    InvalidHeader,
    InvalidURLError,
    LineTooLong,
    TransferEncodingError,
)
from aiohttp.web_protocol import RequestHandler, _ErrInfo
from aiohttp.web_request import BaseRequest

from proxy.app import HEALTH, MAX_HEADER_BYTES, MAX_HEADERS, METRICS, REALTIME
from proxy.errors import GatewayError, body, render
from proxy.exchange import reset_on_close
from proxy.observe.logfile import is_stdout
from proxy.observe.notices import STDERR_FILENO, STDOUT_FILENO, Notices
from proxy.record import GRACE_OVER, own_request_id
from proxy.settings import Settings
from proxy.upstream.described import OUT_OF_FILES, limit_reached
from proxy.upstream.failover import out_of_files_error

# The cyclic garbage collector's first threshold: container allocations between two young
# collections (CPython's default is 700). Each request allocates a few hundred containers,
# and 256 requests in flight keep thousands alive, so at 700 a young collection ran every
# few requests and walked every in-flight request's objects, promoting them: ~4-10 % of the
# CPU under load (bench/README.md). At 50,000 the garbage held between collections is a few
# MB at most; reference counting frees all the rest at once, as before.
GC_YOUNG_THRESHOLD = 50_000
# What shutdown may take past the grace, whatever the log, trace and stdout sinks do: the
# cut requests' log lines and the app's cleanup get CLEANUP_MARGIN_SECONDS, the operator's
# last lines SAY_MARGIN_SECONDS; a sink still stuck then keeps what it holds.
CLEANUP_MARGIN_SECONDS = 1.0
SAY_MARGIN_SECONDS = 0.5
# The most open files macOS lets a process have when its hard limit is unlimited.
MACOS_OPEN_MAX = 10_240
# TCP_USER_TIMEOUT's largest value (an unsigned int of milliseconds, kept signed): 24 days.
MAX_USER_TIMEOUT_MS = 2**31 - 1


class CannotListen(Exception):
    """The port is taken or the address is not ours: a refusal to start, not a crash."""


def serve(
    settings: Settings,
    app: web.Application,
    label: str = "",
    reuse_port: bool = False,
    on_listening: Callable[[], None] = lambda: None,
) -> None:
    """Run until SIGTERM or SIGINT, then drain for SHUTDOWN_GRACE_SECONDS. Raises CannotListen.

    `label` follows each line this prints (a worker's pid); `on_listening` is called once
    the socket listens.
    """
    # SIGHUP's default action kills the process and every stream in it: an
    # operator's `kill -HUP` to reload keys must never cut streams in flight.
    # The app's reload handler, when it installs one on the loop, takes over from this.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    raise_open_files_limit()
    tune_gc()
    notices = Notices()  # stdout and stderr through a thread: a full pipe never stalls the loop
    notices.start()
    notices.install()

    # The status lines (listening, draining, stopped) go to stdout, unless the interaction
    # log is written there (also by a LOG_FILE_PATH of /dev/stdout): then to stderr, so
    # stdout holds JSON lines only (`| jq`, a collector parsing each line).
    logged = settings.log_file_path if settings.log_to_file else None
    status = STDERR_FILENO if is_stdout(logged) else STDOUT_FILENO

    def say(line: str) -> None:
        notices.say(f"llm-gateway {line}{label}", status)

    loop = new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        loop.run_until_complete(_serve(settings, app, say, reuse_port, on_listening))
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        asyncio.set_event_loop(None)
        loop.close()
        notices.close(SAY_MARGIN_SECONDS)


async def _serve(
    settings: Settings,
    app: web.Application,
    say: Callable[[str], None],
    reuse_port: bool,
    on_listening: Callable[[], None],
) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    runner = web.AppRunner(
        app,
        handle_signals=False,
        handler_cancellation=True,  # a client that leaves cancels its upstream request
        access_log=None,  # the interaction log is the access log
        keepalive_timeout=settings.client_header_timeout,
        shutdown_timeout=settings.shutdown_grace_seconds,
    )
    try:
        await runner.setup()
    except BaseException:
        # A start refused halfway (the key store's KeysFileError): what did start is closed
        # in reverse order, as at shutdown, rather than left to the loop's end, which
        # finalizes the generators in no order and prints their tracebacks.
        await runner.cleanup()
        raise
    loop.set_exception_handler(accept_failures(app[HEALTH].ran_out_of_files))
    cut = 0
    try:
        assert runner.server is not None  # set by setup()
        listener = await listen(
            runner.server,
            settings,
            reuse_port,
            app[HEALTH].report,
            app[HEALTH].ran_out_of_files,
            app[METRICS].connection_refused,
        )
        say("listening on " + addresses(listener, settings))
        on_listening()
        await stop.wait()
        listener.close()  # no new connections
        say(draining(app, settings.shutdown_grace_seconds))
    finally:
        cut, is_clean = await drain(runner, settings.shutdown_grace_seconds, app)
    ending = (
        "every request finished"
        if not cut
        else f"{cut} request{'' if cut == 1 else 's'} cut at the end of the grace period"
    )
    if not is_clean:
        ending += f"; the cleanup was left unfinished after {CLEANUP_MARGIN_SECONDS:g} s more"
    say("stopped: " + ending)


# asyncio's words for an accept that failed for want of a descriptor or memory
# (`BaseSelectorEventLoop._accept_connection`).
_ACCEPT_OUT_OF_RESOURCES = "socket.accept() out of system resource"


def accept_failures(
    out_of_files: Callable[[str], None],
) -> Callable[[asyncio.AbstractEventLoop, dict[str, Any]], None]:
    """The loop's exception handler: an accept asyncio's loop could not make for want of a
    file descriptor is told to `out_of_files` (stderr once, /health), not logged with its
    traceback; anything else goes to the loop's default handler, as before.

    asyncio tries again a second later, the client's connection waiting in the listen queue,
    but logged each try: up to the whole listen queue's length (1024) of tracebacks at once
    (its loop over the queue goes on after the failure), thousands a second until a descriptor
    was free. uvloop never calls this: libuv closes such a connection itself (a connection is
    refused before that happens: `_RequestHandler.connection_made`)."""

    def handle(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        error = context.get("exception")
        if (
            context.get("message") == _ACCEPT_OUT_OF_RESOURCES
            and isinstance(error, OSError)
            and error.errno in OUT_OF_FILES
        ):
            out_of_files(
                limit_reached(error.errno) + ": new client connections wait to be accepted"
            )
            return
        loop.default_exception_handler(context)

    return handle


def draining(app: web.Application, grace: float) -> str:
    """The drain's first line: what it waits for (the WebSocket sessions with no turn in
    flight are closed at once: not waited for, said apart)."""
    idle = app[REALTIME].idle()
    in_flight = app[METRICS].requests_in_flight - idle
    line = (
        f"draining: {in_flight} request{'' if in_flight == 1 else 's'} in flight, up to {grace:g} s"
    )
    if idle:
        line += f"; {idle} idle WebSocket session{'' if idle == 1 else 's'} closed"
    return line


async def listen(
    server: web.Server,
    settings: Settings,
    reuse_port: bool,
    health: Callable[[], dict[str, object]] | None = None,
    out_of_files: Callable[[str], None] | None = None,
    refused: Callable[[str], None] | None = None,
) -> asyncio.Server:
    """The listening socket(s), each connection capped by MAX_CONNECTIONS. Raises CannotListen.

    `health`: the /health report, which a connection past the cap is still answered (a
    liveness probe's: `Overflow`). `out_of_files`: told why each time a connection that
    took the process's last file descriptor is refused (`_RequestHandler.connection_made`).
    `refused`: told the reason of each connection answered 503 unserved (`Refusal`)."""
    loop = asyncio.get_running_loop()
    overflow = Overflow(loop, health, out_of_files, refused)
    host, port = settings.server_host, settings.server_port

    # `server.connections` copies every connection into a new list at each call: its dict
    # is counted in place (up to MAX_CONNECTIONS entries at each new connection).
    held, most = server._connections, settings.max_connections
    # `server()` would build aiohttp's own RequestHandler with `_kwargs`; this one differs in
    # `cut` and what it answers itself, and sets aiohttp's TCP keep-alive itself (on the
    # socket it reads for its descriptor: `_RequestHandler.connection_made`).
    kwargs = {**server._kwargs, "tcp_keepalive": False}

    def connection() -> asyncio.BaseProtocol:
        if len(held) >= most and not make_room(held, overflow):
            return Refusal(overflow)
        return _RequestHandler(server, overflow, loop=loop, **kwargs)

    with _refusals(host, port):
        listener = await loop.create_server(
            connection, hosts(host), port, reuse_port=reuse_port or None, backlog=1024
        )
    if None in listener.sockets:
        # uvloop binds each address with SO_REUSEADDR, so two that overlap (0.0.0.0 and
        # 127.0.0.1) both bind; the second listen then fails without raising, its socket None.
        listener.close()
        await listener.wait_closed()
        raise CannotListen(
            f"cannot listen on {host}:{port}: its addresses overlap {_OVERLAP}: list each "
            "address once"
        )
    for sock in listener.sockets:
        # Twice the relay's own bound, which cuts first and says why (relay.silence).
        drop_unread(sock, settings.stream_idle_timeout * 2)
    return listener


# Why two addresses of SERVER_HOST cannot both be listened on, on one port.
_OVERLAP = "(0.0.0.0 takes every IPv4 address, :: every IPv6 one)"


def hosts(host: str) -> str | list[str]:
    """SERVER_HOST as create_server takes it: one address, or several separated by commas
    (`0.0.0.0,::`: IPv4 and IPv6; `::` alone is IPv6 only, as asyncio sets IPV6_V6ONLY)."""
    if "," not in host:
        return host
    # Once each: asyncio listens once on an address written twice, uvloop tried it twice.
    return list(dict.fromkeys(part.strip() for part in host.split(",") if part.strip()))


def check_port_free(settings: Settings) -> None:
    """Refuse a port something listens on already, before workers share it. Raises CannotListen.

    Workers listen with SO_REUSEPORT, which the kernel grants any process of the same user:
    a second gateway of workers on the port would take its share of the connections instead
    of being refused, as a gateway of one process is. A bind without it tells.
    """
    host, port = settings.server_host, settings.server_port

    async def bind() -> None:
        with _refusals(host, port):
            probe = await asyncio.get_running_loop().create_server(
                asyncio.Protocol, hosts(host), port
            )
        probe.close()
        await probe.wait_closed()

    asyncio.run(bind())


@contextlib.contextmanager
def _refusals(host: str, port: int) -> Iterator[None]:
    """A listen that cannot be had, as the one line that refuses the start."""
    try:
        yield
    except socket.gaierror as error:
        raise CannotListen(
            f"SERVER_HOST {host!r} cannot be resolved ({error.strerror}): "
            "give an address, such as 0.0.0.0 or 127.0.0.1"
        ) from None
    except OSError as error:
        if error.errno == errno.EADDRINUSE:
            listed = hosts(host)
            if isinstance(listed, list) and len(listed) > 1 and port:  # may take each other's
                raise CannotListen(
                    f"port {port} on {host} is already in use, or its addresses overlap "
                    f"{_OVERLAP}: list each address once, or stop what holds the port"
                ) from None
            raise CannotListen(
                f"port {port} on {host} is already in use: "
                "stop what holds it, or choose another with SERVER_PORT or --server-port"
            ) from None
        # Not available, denied, or any other the kernel says (EINVAL: a link-local IPv6
        # address without its interface): one line naming the address, never a traceback.
        reason = error.strerror or str(error)
        raise CannotListen(f"cannot listen on {host}:{port}: {reason}") from None


def make_room(held: dict[RequestHandler, asyncio.Transport], overflow: Overflow) -> bool:
    """Close one idle keep-alive connection for a new one, as nginx reuses them; False when
    none is idle. Only at the cap: a scan of the connections held, and once one found none,
    none again for LOOK_AGAIN_SECONDS (a scan for each new connection: a burst of 3,000 past
    3,000 streams took 0.9 s of the loop, their chunks up to 234 ms late; 8,000: 6 s)."""
    now = overflow.loop.time()
    if now < overflow.look_again_at:
        return False
    for handler in held:
        if isinstance(handler, _RequestHandler) and handler.is_idle():
            handler.force_close()
            return True
    overflow.look_again_at = now + LOOK_AGAIN_SECONDS
    return False


def addresses(listener: asyncio.Server, settings: Settings) -> str:
    """Where the gateway listens, with the real port (also for SERVER_PORT=0)."""
    names = []
    for sock in listener.sockets:
        host, port = sock.getsockname()[:2]
        names.append(f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}")
    return ", ".join(names) or f"http://{settings.server_host}:{settings.server_port}"


async def drain(runner: web.AppRunner, grace: float, app: web.Application) -> tuple[int, bool]:
    """aiohttp's cleanup under one deadline, then a bounded margin.

    Returns the number of requests cut when the grace passed, and whether the cleanup
    (the cut requests' handlers, the log's flush, the trace export) ended within the
    margin after it; if not, it is abandoned: the process exits all the same.

    When the grace passes, the WebSocket sessions still open (a turn still running) are
    closed with 1001 first, within the first half of the margin (their close frames out,
    their peers' answers awaited); what is left then is cut, they too.
    """
    cleanup = asyncio.ensure_future(runner.cleanup())
    done, _ = await asyncio.wait({cleanup}, timeout=grace)
    cut = 0
    margin = CLEANUP_MARGIN_SECONDS
    ending: asyncio.Future[None] | None = None
    if not done and runner.server is not None:
        cut = app[METRICS].requests_in_flight
        loop = asyncio.get_running_loop()
        began = loop.time()
        ending = asyncio.ensure_future(app[REALTIME].end_all())
        await asyncio.wait({ending}, timeout=margin / 2)
        margin -= loop.time() - began
        for connection in runner.server.connections:
            if isinstance(connection, _RequestHandler):
                connection.cut()  # cancels its handler, which logs the request as cut
            else:
                connection.force_close()
    done, _ = await asyncio.wait({cleanup}, timeout=margin)
    if ending is not None and not ending.done():  # a peer that never answered its close
        ending.cancel()
    if not done:
        cleanup.cancel()
        return cut, False
    cleanup.result()
    return cut, True


class _RequestHandler(RequestHandler):
    """aiohttp's protocol, which the drain can cut with the gateway's own reason, and whose
    own answers (not HTTP, TLS on the plain port, a bad header, a handler's crash) are the
    gateway's errors (`handle_error`).

    Those answers are prepared for one of the app's requests too, so `relay.dispatch` names
    the gateway in their Server header, not `Python/3.11 aiohttp/3.x`.
    """

    __slots__ = ("_overflow",)

    def __init__(self, manager: web.Server, overflow: Overflow, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._overflow = overflow

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """aiohttp's, but a connection that took the process's last file descriptor is
        answered 503 too_many_open_files and closed (`Overflow.refuse_out_of_files`).

        Past that limit the event loop's accept fails, and uvloop never tells the app: libuv
        accepts each connection on a spare descriptor of its own and closes it at once (the
        client saw a reset or an empty answer; nothing was said or counted), a trick it keeps
        to itself; asyncio leaves it waiting and tells its exception handler (`accept_failures`).
        The kernel gives each new socket the lowest free descriptor, so the connection given
        the last one found every other one taken: refused, it frees that descriptor for the
        next, and the loop's accept does not fail for want of one, as long as it is client
        connections that take the last one (a provider's socket taking it, the next accept
        fails as before). The socket is the one aiohttp reads to turn TCP keep-alive on, done
        here in its place (`listen`): what this adds to a connection is a look at a number."""
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)  # aiohttp's tcp_keepalive
            overflow = self._overflow
            if sock.fileno() >= overflow.last_descriptor and overflow.refuse_out_of_files(
                transport, sock.fileno()
            ):
                return
        super().connection_made(transport)

    def is_idle(self) -> bool:
        """Kept alive after an answer, waiting for a next request (as aiohttp's own keep-alive
        timer tells idle), and not closing already."""
        waiter = self._waiter
        return (
            self._request_count > 0
            and not self._force_close
            and waiter is not None
            and not waiter.done()
        )

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """The gateway's own error, JSON in the endpoint's dialect with a request id, in
        place of aiohttp's text/plain one, which quotes the line it refused: a header that
        carries a virtual key included.

        A request its parser refused has no path the gateway could read: its answer is in
        the OpenAI dialect, which the SDKs of both sides raise by status."""
        super().handle_error(request, status, exc, message)  # logs; raises if one began
        response = render(refused(status, exc), request.path, own_request_id(None))
        response.force_close()  # as aiohttp's: the connection cannot be trusted further
        return response

    def data_received(self, data: bytes) -> None:
        """aiohttp's, except that a body on its way and a WebSocket's frames are still read
        while the drain runs, and a body its C parser refuses mid-way ends its request.

        aiohttp stops reading a connection once its shutdown begins (or it is closing): the
        rest of a body still arriving was dropped, and its request waited, unanswered, to be
        cut at the end of the grace. Its bytes now reach the body's reader; what follows it
        (a next request) is not taken, as before. A WebSocket session let finish its turn
        (`realtime`) keeps getting its client's frames (the audio it streams, a pong, the
        answer to its close), which were dropped too.

        aiohttp's C parser, refusing a body (a broken chunk), queues the refusal as the next
        request and never tells the body's reader, which then waits for the rest forever:
        the request hung unanswered until the client left, and was logged as its leaving
        (499). Here the body's reader gets the refusal, as aiohttp's pure-Python parser
        hands it over, so the relay answers 400 `invalid_body`; the connection then closes
        (nothing after the broken chunk can be framed) once the request being answered
        has its answer (a pipelined one queued behind it, whose body broke, gets none)."""
        if self._close or self._force_close:  # set by the shutdown, on every connection
            if self._payload_parser is not None:  # a WebSocket's: its frames, as aiohttp reads them
                if self._data_received_cb is not None:
                    self._data_received_cb()
                self._payload_parser.feed_data(data)
            else:
                self._read_body_on_its_way(data)
            return
        super().data_received(data)
        messages = self._messages
        refusal = messages[-1][0] if messages else None
        if not isinstance(refusal, _ErrInfo):
            return
        # The body the parser was in: the last one queued before the refusal, else the
        # request being answered's (its end came: the refusal is of a next request's head).
        if len(messages) > 1:
            body: StreamReader | None = messages[-2][1]
        else:
            body = self._body_on_its_way()
        if body is None or body.is_eof():
            return
        messages.pop()
        _end_body(body, refusal.exc)
        self.close()  # after the answer that request gets

    def _body_on_its_way(self) -> StreamReader | None:
        """The body of the request being answered, while more of it is to come."""
        current = self._current_request
        body = None if current is None else current.content
        return None if body is None or body.is_eof() else body

    def _read_body_on_its_way(self, data: bytes) -> None:
        """On a closing connection, `data` that belongs to the body on its way goes to it."""
        body = self._body_on_its_way()
        if body is None or self._parser is None:
            return
        try:
            self._parser.feed_data(data)  # the body's bytes; a next request is dropped
        except HttpProcessingError as refusal:
            _end_body(body, refusal)

    def cut(self) -> None:
        """End the request in flight as the gateway's cut, then close the connection.

        The handler is cancelled with GRACE_OVER before the connection closes, so it logs
        the gateway's cut; closing alone would cancel it as if the client had left (499).
        """
        task = self._task_handler
        if task is not None and not task.done():
            task.cancel(GRACE_OVER)
        current, transport = self._current_request, self.transport
        if current is not None and current.version < HttpVersion11 and transport is not None:
            reset_on_close(transport)  # over HTTP/1.0 the close would end the answer whole
        self.force_close()


def _end_body(body: StreamReader, refusal: BaseException) -> None:
    """The body's reader gets `refusal`, and its end: aiohttp drains no rest after the answer
    (its drain would meet the refusal, and log it as an unhandled exception)."""
    body.set_exception(refusal)
    body.feed_eof()


# Connections past MAX_CONNECTIONS whose request line is awaited, to tell a liveness probe's
# `GET /health` from the rest: at most this many at once (past them, refused unread), each
# for at most PROBE_WAIT_SECONDS.
PROBE_RESERVE = 8
PROBE_WAIT_SECONDS = 1.0
# Seconds after a look over the connections held found none idle before the next look: a
# connection past the cap in between is refused (its 503 says Retry-After: 1) unscanned.
LOOK_AGAIN_SECONDS = 0.05
# The most of a request's first bytes read for its request line.
PROBE_LINE_BYTES = 1024


class Overflow:
    """What the connections past MAX_CONNECTIONS share: the /health report (None: not
    answered, every one refused unread), how many await their request line, and when the
    connections held may next be looked over for an idle one (`make_room`). And what the
    connections past the limit on open files share: the last descriptor's number, and who is
    told of each one refused (`out_of_files`). `refused` counts each connection answered 503
    unserved, by its reason (metrics.REFUSAL_REASONS)."""

    __slots__ = (
        "health",
        "last_descriptor",
        "look_again_at",
        "loop",
        "out_of_files",
        "refused",
        "waiting",
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        health: Callable[[], dict[str, object]] | None,
        out_of_files: Callable[[str], None] | None = None,
        refused: Callable[[str], None] | None = None,
    ) -> None:
        self.loop, self.health, self.waiting = loop, health, 0
        self.look_again_at = -math.inf
        self.out_of_files, self.refused = out_of_files, refused
        self.last_descriptor = _last_descriptor()

    def refuse_out_of_files(self, transport: asyncio.BaseTransport, descriptor: int) -> bool:
        """A connection on `descriptor`, at or past the last one: answered 503 (or /health) as
        one past the cap is (`Refusal`), and `out_of_files` told. False when the limit was
        raised since (prlimit): the connection is served."""
        self.last_descriptor = _last_descriptor()
        if descriptor < self.last_descriptor:
            return False
        why = limit_reached(errno.EMFILE)
        refusal = Refusal(self, _refusal(out_of_files_error(why + "; retry shortly")), "open_files")
        transport.set_protocol(refusal)
        refusal.connection_made(transport)
        if self.out_of_files is not None:
            self.out_of_files(
                why + ": a new client connection was answered 503 too_many_open_files"
            )
        return True


def _last_descriptor() -> float:
    """The highest file descriptor number the process may hold (its soft limit on open
    files, less one); infinite when unlimited."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return math.inf if soft == resource.RLIM_INFINITY else soft - 1


class Refusal(asyncio.Protocol):
    """A connection over MAX_CONNECTIONS: a 503 in the OpenAI dialect, and closed, but for
    `GET /health`, answered as ever (a pod full of streams answered its liveness probe 503,
    and the kubelet restarted it, cutting them all). `/ready` gets the 503: a full pod is
    not ready, and the Service sends new work elsewhere.

    Its request line is read for that, within PROBE_WAIT_SECONDS, and only while fewer than
    PROBE_RESERVE connections past the cap wait for theirs: MAX_CONNECTIONS + PROBE_RESERVE
    bound what clients can hold. Past those, the 503 goes at once, unread, as before. The
    503 and the FIN reach the client before anything it sends after them (which the kernel
    answers with a reset); a client still sending its body when that reset arrives may see
    the reset instead.
    """

    __slots__ = ("_head", "_overflow", "_reason", "_refusal", "_timer", "_transport")

    def __init__(
        self, overflow: Overflow, refusal: bytes | None = None, reason: str = "max_connections"
    ) -> None:
        """`refusal`: the 503 to answer (None: the cap's, too_many_connections), counted
        under `reason` (a /health answered instead is not)."""
        self._overflow = overflow
        self._refusal = _refusal() if refusal is None else refusal
        self._reason = reason
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._head = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's: not a subclass
        overflow = self._overflow
        if overflow.health is None or overflow.waiting >= PROBE_RESERVE:
            self._answer(self._refusal)
            return
        overflow.waiting += 1
        self._timer = overflow.loop.call_later(PROBE_WAIT_SECONDS, self._answer, self._refusal)

    def data_received(self, data: bytes) -> None:
        if self._transport is None:
            return  # answered: the rest is not read
        head = self._head = self._head + data
        line_end = head.find(b"\r\n")
        if line_end < 0:
            if len(head) > PROBE_LINE_BYTES:
                self._answer(self._refusal)
            return
        method, _, rest = head[:line_end].partition(b" ")
        health = self._overflow.health
        if method in (b"GET", b"HEAD") and rest.partition(b" ")[0] == b"/health" and health:
            self._answer(_health_answer(health(), is_head=method == b"HEAD"))
        else:
            self._answer(self._refusal)

    def connection_lost(self, exc: Exception | None) -> None:
        self._settle()

    def _answer(self, answer: bytes) -> None:
        transport = self._transport
        if transport is None:
            return
        self._transport = None
        transport.write(answer)
        transport.close()  # after the answer is handed to the kernel
        self._settle()
        if answer is self._refusal and self._overflow.refused is not None:
            self._overflow.refused(self._reason)

    def _settle(self) -> None:
        if self._timer is not None:  # it waited for its request line: no longer
            self._timer.cancel()
            self._timer = None
            self._overflow.waiting -= 1


def refused(status: int, fault: BaseException | None) -> GatewayError:
    """What aiohttp refused or failed at, said without a byte of the request."""
    if status >= 500 or not isinstance(fault, HttpProcessingError):
        return GatewayError(
            500, "internal_error", "The gateway failed on this request; its log says why."
        )
    reason = fault.message.partition("\n")[0].rstrip(":. ")
    if isinstance(fault, LineTooLong) or reason.startswith("Too many headers"):
        return GatewayError(
            431,
            "request_head_too_large",
            "The request's head is larger than the gateway takes: a request line of up to "
            f"8 KiB, and at most {MAX_HEADERS} header fields of up to "
            f"{MAX_HEADER_BYTES // 1024} KiB each.",
        )
    return GatewayError(
        status, "invalid_http", f"The request is not valid HTTP/1.1 ({_reason(fault, reason)})."
    )


# Refusals whose message can be the request's own bytes, unquoted or quoted as a str (a
# target without a host, the request line, a chunk size, a header): aiohttp's checks of
# what llhttp parsed, and every refusal of its pure-Python parser (AIOHTTP_NO_EXTENSIONS=1,
# or no C extension). They are said by their kind. llhttp's own reason leads the C
# parser's message, the bytes it refused quoted after it (`reason:\n\n  b'...'`): kept.
_KINDS: tuple[tuple[type[HttpProcessingError], str], ...] = (
    (InvalidURLError, "bad request target"),
    (BadHttpMethod, "bad method"),
    (BadStatusLine, "bad request line"),
    (InvalidHeader, "bad header field"),
    (TransferEncodingError, "bad chunked body"),
)
# aiohttp's own words for one such refusal, which quote nothing
_PLAIN = frozenset(("Received HTTPS traffic on an HTTP port",))


def _reason(fault: HttpProcessingError, first_line: str) -> str:
    """Why the parser refused the request, in words none of which are the request's."""
    message = fault.message
    # A chunk size's bytes (the pure-Python parser's message) can take llhttp's shape too.
    is_llhttps = not isinstance(fault, TransferEncodingError) and (
        "\n\n  b'" in message or '\n\n  b"' in message
    )
    if not is_llhttps and message not in _PLAIN:
        for kind, said in _KINDS:
            if isinstance(fault, kind):
                return said
    if not first_line or "b'" in first_line or 'b"' in first_line:  # a quote of the request
        return "malformed request"
    return first_line


def _health_answer(report: dict[str, object], is_head: bool) -> bytes:
    """/health's answer as the app gives it (200, its report, an x-request-id), for a
    connection past MAX_CONNECTIONS, which the app does not serve."""
    payload = orjson.dumps(report)
    return (
        b"HTTP/1.1 200 OK\r\n"
        b"Content-Type: application/json\r\n"
        b"x-request-id: " + own_request_id(None).encode() + b"\r\n"
        b"Connection: close\r\n"
        b"Content-Length: "
        + str(len(payload)).encode()
        + b"\r\n\r\n"
        + (b"" if is_head else payload)
    )


# The 503 of a connection past MAX_CONNECTIONS.
_TOO_MANY_CONNECTIONS = GatewayError(
    503,
    "too_many_connections",
    "The gateway has as many open connections as MAX_CONNECTIONS allows; retry shortly",
)


def _refusal(error: GatewayError = _TOO_MANY_CONNECTIONS) -> bytes:
    """A 503 in the OpenAI dialect, with Retry-After: 1, and the connection's close."""
    payload = body(error, "/v1")
    # A fresh id, as every answer has one (SPEC: errors); the request's own headers go unread.
    request_id = own_request_id(None).encode()
    return (
        b"HTTP/1.1 503 Service Unavailable\r\n"
        b"Content-Type: application/json\r\n"
        b"Retry-After: 1\r\n"
        b"x-request-id: " + request_id + b"\r\n"
        b"request-id: " + request_id + b"\r\n"
        b"Connection: close\r\n"
        b"Content-Length: " + str(len(payload)).encode() + b"\r\n\r\n" + payload
    )


def raise_open_files_limit() -> None:
    """Raise the soft limit on open files to the hard one, as Go's runtime does.

    Each stream holds two sockets (the client's, the provider's), and a terminal's soft
    limit (256 on macOS, 1024 on many Linux desktops) is below what MAX_CONNECTIONS' 1024
    needs: past it, accepts failed and providers could not be reached (502). The hard limit
    is the operator's to set; it is not raised.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == hard:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError):
        # macOS: an unlimited hard limit, which no soft limit may be; OPEN_MAX is its ceiling
        if soft != resource.RLIM_INFINITY and soft < MACOS_OPEN_MAX:
            with contextlib.suppress(ValueError, OSError):
                resource.setrlimit(resource.RLIMIT_NOFILE, (MACOS_OPEN_MAX, hard))


def tune_gc() -> None:
    """Collect young garbage less often, and leave what the start built out of collections.

    Modules, the keys and the price tables live as long as the process: `gc.freeze` moves
    them out of every later collection (a full one walked ~68,000 objects, 45 ms). Called
    before the first request, so nothing of a request is frozen: that would never be
    collected once in a cycle. What of it a reload replaces is freed by reference counting
    (the key ring holds no cycle); a reload freezes the keys it loads, and bounds what of
    the requests then in flight it freezes with them (keys/reload.py's LoopFirst).
    """
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, old)


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop when installed, else asyncio's own."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def drop_unread(listener: socket.socket | TransportSocket, seconds: float) -> None:
    """The connections accepted on `listener` are dropped by the kernel once what was sent
    on them has waited `seconds` for the client to take any of it (TCP_USER_TIMEOUT, which
    accepted sockets inherit; Linux only: elsewhere nothing is set).

    The relay cuts a client that reads nothing while an answer is written (STREAM_IDLE_TIMEOUT),
    but once the last write went to the transport's buffer the request is over: a client that
    then reads nothing more, its socket open (a hung app), held its connection for ever, as
    aiohttp's close waits for that buffer to go out first."""
    option = getattr(socket, "TCP_USER_TIMEOUT", None)
    if option is None:
        return
    milliseconds = min(int(seconds * 1000), MAX_USER_TIMEOUT_MS)
    with contextlib.suppress(OSError):  # not TCP (a test's socket): nothing to bound
        listener.setsockopt(socket.IPPROTO_TCP, option, milliseconds)
