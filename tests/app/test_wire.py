"""The wire: the upstream HTTP/1.1 client, against real servers on loopback."""

from __future__ import annotations

import asyncio
import errno
import gzip
import socket
import struct
import time
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from aiohappyeyeballs import AddrInfoType
from aiohttp import web
from aiohttp.test_utils import TestServer
from yarl import URL

from proxy.upstream import wire as wire_module
from proxy.upstream.wire import HIGH_WATER, MAX_HEAD_BYTES, Resolve, Wire
from tests.support.certificates import self_signed
from tests.support.clock import LoopClock
from tests.support.idle_closing import IdleClosing
from tests.support.polling import until
from tests.support.processes import free_port
from tests.support.raw_servers import RawServer

Serve = Callable[..., Awaitable[TestServer]]
GATE = web.AppKey("gate", asyncio.Queue[None])


@pytest.fixture
async def wire() -> AsyncIterator[Wire]:
    wire = Wire(connect_timeout=2.0)
    yield wire
    await wire.close()


async def echo(request: web.Request) -> web.StreamResponse:
    body = await request.read()
    seen = {k: v for k, v in request.headers.items()}
    return web.json_response({"method": request.method, "body": body.decode(), "headers": seen})


async def stream(request: web.Request) -> web.StreamResponse:
    """Five SSE events, each written only after the client told us it read the one before."""
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    gate: asyncio.Queue[None] = request.app[GATE]
    for n in range(5):
        await response.write(f"data: {n}\n\n".encode())
        await gate.get()
    await response.write_eof()
    return response


def app() -> web.Application:
    application = web.Application()
    application[GATE] = asyncio.Queue()
    application.router.add_route("*", "/echo", echo)
    application.router.add_get("/stream", stream)
    application.router.add_get("/gzip", gzipped)
    application.router.add_get("/big", big)
    application.router.add_route("*", "/empty", empty)
    application.router.add_get("/peer", peer)
    return application


async def gzipped(request: web.Request) -> web.Response:
    return web.Response(body=gzip.compress(b"hello" * 100), headers={"Content-Encoding": "gzip"})


async def big(request: web.Request) -> web.Response:
    return web.Response(body=b"x" * (HIGH_WATER * 8))


async def empty(request: web.Request) -> web.Response:
    return web.Response(status=204 if request.method != "HEAD" else 200, headers={"X-A": "1"})


async def peer(request: web.Request) -> web.Response:
    assert request.transport is not None
    return web.Response(text=str(request.transport.get_extra_info("peername")[1]))


async def test_a_post_arrives_with_its_headers_and_body_and_nothing_of_ours(
    aiohttp_server: Serve, wire: Wire
) -> None:
    server = await aiohttp_server(app())
    headers = {"Authorization": "Bearer sk-x", "anthropic-beta": "b1", "Content-Length": "999"}
    reply = await wire.request("POST", server.make_url("/echo"), headers, b'{"a": 1}')
    assert reply.status == 200
    seen = await _json(reply)
    assert seen["body"] == '{"a": 1}' and seen["method"] == "POST"
    assert seen["headers"]["Authorization"] == "Bearer sk-x"
    assert seen["headers"]["anthropic-beta"] == "b1"
    assert seen["headers"]["Content-Length"] == "8"  # ours, from the bytes, not the caller's
    assert "User-Agent" not in seen["headers"] and "Accept-Encoding" not in seen["headers"]


async def test_a_large_body_is_not_copied_while_its_answer_is_awaited(wire: Wire) -> None:
    # A 30 MB image in a chat request was copied onto the request's head to go in one write,
    # and the copy held until the provider answered: 8 such clients took the gateway 445 MB
    # over its idle size, not the 240 MB of their bodies. The server holds its answer until
    # the body came whole, while the wire's own memory is measured.
    body = b'{"image": "' + b"A" * 4_000_000 + b'"}'
    received, release = asyncio.Event(), asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        while length:  # read and dropped, so the server's memory is not the wire's
            length -= len(await reader.read(min(length, 65536)))
        received.set()
        await release.wait()
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()

    wire_file = tracemalloc.Filter(True, wire_module.__file__)
    async with await RawServer.start(handle, "127.0.0.1", 0) as server:
        url = URL(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1/chat/completions")
        tracemalloc.start()
        try:
            asked = asyncio.create_task(wire.request("POST", url, {}, body))
            await asyncio.wait_for(received.wait(), 10)
            held = sum(
                trace.size
                for trace in tracemalloc.take_snapshot().filter_traces([wire_file]).traces
            )
        finally:
            tracemalloc.stop()
            release.set()
        reply = await asyncio.wait_for(asked, 10)
        assert await reply.read() == b"ok"
    assert held < 100_000  # the head and its bookkeeping: no second copy of the 4 MB


async def test_a_stream_is_handed_on_chunk_by_chunk(aiohttp_server: Serve, wire: Wire) -> None:
    application = app()
    server = await aiohttp_server(application)
    reply = await wire.request("GET", server.make_url("/stream"), {}, None)
    assert reply.headers["Content-Type"] == "text/event-stream"
    events = []
    for _ in range(5):  # the server writes the next event only after we read this one
        events.append(await asyncio.wait_for(reply.content.readany(), 5))
        await application[GATE].put(None)
    assert events == [f"data: {n}\n\n".encode() for n in range(5)]
    assert await reply.content.readany() == b""
    reply.release()


async def test_content_coding_is_kept_as_sent(aiohttp_server: Serve, wire: Wire) -> None:
    server = await aiohttp_server(app())
    reply = await wire.request("GET", server.make_url("/gzip"), {}, None)
    assert reply.headers["Content-Encoding"] == "gzip"
    assert gzip.decompress(await reply.read()) == b"hello" * 100


async def test_a_connection_is_kept_alive_and_reused(aiohttp_server: Serve, wire: Wire) -> None:
    server = await aiohttp_server(app())
    ports = []
    for _ in range(3):
        reply = await wire.request("GET", server.make_url("/peer"), {}, None)
        ports.append(await reply.read())
    assert len(set(ports)) == 1


async def test_a_bursts_connections_idle_past_the_keepalive_are_closed_under_steady_traffic(
    aiohttp_server: Serve, loop_clock: LoopClock
) -> None:
    """Steady traffic after a burst reuses the connection kept last: the burst's others, idle
    since, are closed past keepalive_seconds, not held open for as long as the provider lets
    them (a spike of a thousand streams left a thousand sockets open)."""
    wire = Wire(connect_timeout=2.0, keepalive_seconds=10.0)
    transports: list[asyncio.BaseTransport] = []
    arrived, release = asyncio.Queue[None](), asyncio.Event()

    async def held(request: web.Request) -> web.Response:
        assert request.transport is not None
        transports.append(request.transport)
        arrived.put_nowait(None)
        await release.wait()
        return web.Response(text="ok")

    application = web.Application()
    application.router.add_get("/held", held)
    server = await aiohttp_server(application)

    async def ask() -> bytes:
        reply = await wire.request("GET", server.make_url("/held"), {}, None)
        return await reply.read()

    def open_ones() -> int:
        return sum(not transport.is_closing() for transport in set(transports))

    try:
        burst = [asyncio.create_task(ask()) for _ in range(4)]
        for _ in burst:
            await asyncio.wait_for(arrived.get(), 5)
        release.set()
        assert await asyncio.gather(*burst) == [b"ok"] * 4
        for _ in range(2):  # steady traffic, a request every 6 s on the loop's clock
            loop_clock.advance(6.0)
            assert await ask() == b"ok"
        assert len(set(transports)) == 4  # the steady requests went on the burst's newest
        # 12 s on, the three under it were closed as it was kept: the provider sees them go.
        await until(lambda: open_ones() == 1, 5, "the burst's idle connections are closed")
    finally:
        await wire.close()


async def test_a_bursts_connections_are_closed_past_the_keepalive_when_traffic_stops() -> None:
    """A burst of streams, then no request: its connections, idle past keepalive_seconds,
    are closed though no request comes to find them. They were held open for as long as the
    provider let them (1,000 connections to a server keeping them: 1,000 sockets, for ever)."""
    wire = Wire(connect_timeout=2.0, keepalive_seconds=0.1)
    arrived, release, closed = asyncio.Queue[None](), asyncio.Event(), asyncio.Queue[None]()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        arrived.put_nowait(None)
        await release.wait()
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        await reader.read()  # the server keeps its connections: it waits for the wire's close
        closed.put_nowait(None)

    async def ask() -> bytes:
        reply = await wire.request("GET", url, {}, None)
        return await reply.read()

    async with await RawServer.start(handle, "127.0.0.1", 0) as server:
        url = URL(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1/models")
        try:
            burst = [asyncio.create_task(ask()) for _ in range(4)]
            for _ in burst:
                await asyncio.wait_for(arrived.get(), 5)
            release.set()
            assert await asyncio.gather(*burst) == [b"ok"] * 4
            for _ in burst:  # no request follows: the sweep closes them
                await asyncio.wait_for(closed.get(), 5)
        finally:
            await wire.close()


async def test_a_body_left_unread_closes_its_connection(aiohttp_server: Serve, wire: Wire) -> None:
    server = await aiohttp_server(app())
    reply = await wire.request("GET", server.make_url("/big"), {}, None)
    first = await reply.content.readany()
    assert 0 < len(first) < HIGH_WATER * 8
    reply.close()
    again = await wire.request("GET", server.make_url("/peer"), {}, None)
    other = await wire.request("GET", server.make_url("/peer"), {}, None)
    assert (await again.read()) != b"" and (await other.read()) != b""


async def test_a_large_body_arrives_whole_when_read_slowly(
    aiohttp_server: Serve, wire: Wire
) -> None:
    server = await aiohttp_server(app())
    reply = await wire.request("GET", server.make_url("/big"), {}, None)
    received = 0
    while chunk := await reply.content.readany():
        received += len(chunk)
        await asyncio.sleep(0)  # a reader slower than the socket: reading pauses and resumes
    assert received == HIGH_WATER * 8


async def test_arrive_waits_for_a_small_body_and_takes_none_of_a_large_one(
    aiohttp_server: Serve, wire: Wire
) -> None:
    """What the attempt loop keeps of an unsized answer: all of a small one, none of the rest."""
    server = await aiohttp_server(app())
    small = await wire.request("GET", server.make_url("/peer"), {}, None)
    assert await small.content.arrive() is True
    assert (await small.read()).isdigit()
    large = await wire.request("GET", server.make_url("/big"), {}, None)
    assert await large.content.arrive() is False  # reading paused at HIGH_WATER
    assert len(await large.read()) == HIGH_WATER * 8  # nothing was taken from it


@pytest.mark.parametrize("method, status", [("HEAD", 200), ("GET", 204)])
async def test_answers_without_a_body_end_at_their_head(
    aiohttp_server: Serve, wire: Wire, method: str, status: int
) -> None:
    server = await aiohttp_server(app())
    reply = await wire.request(method, server.make_url("/empty"), {}, None)
    assert (reply.status, reply.headers["X-A"]) == (status, "1")
    assert await asyncio.wait_for(reply.read(), 5) == b""


async def test_a_refused_connection_is_aiohttps_connector_error(wire: Wire) -> None:
    url = URL(f"http://127.0.0.1:{free_port()}/x")
    with pytest.raises(aiohttp.ClientConnectorError) as caught:
        await wire.request("POST", url, {}, b"{}")
    assert caught.value.os_error.errno == errno.ECONNREFUSED


async def raw_server(answer: Callable[[bytes], bytes | None]) -> tuple[RawServer, URL]:
    """A TCP server that reads a request and writes `answer(request)` (None: close at once)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            reply = answer(head)
            if reply is None:
                writer.close()
                return
            writer.write(reply)
            await writer.drain()
            if b"Connection: close" in reply:
                writer.close()
                return

    server = await RawServer.start(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, URL(f"http://127.0.0.1:{port}/x")


async def test_a_body_cut_short_is_a_payload_error(wire: Wire) -> None:
    server, url = await raw_server(
        lambda _: b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\nConnection: close\r\n\r\nshort"
    )
    async with server:
        reply = await wire.request("GET", url, {}, None)
        assert await reply.content.readany() == b"short"
        with pytest.raises(aiohttp.ClientPayloadError):
            await reply.content.readany()


async def test_a_provider_that_closes_before_answering_a_post_is_not_asked_again(
    wire: Wire,
) -> None:
    asked = []

    def answer(head: bytes) -> bytes | None:
        asked.append(head)
        return None

    server, url = await raw_server(answer)
    async with server:
        with pytest.raises(aiohttp.ServerDisconnectedError):
            await wire.request("POST", url, {}, b"")
    assert len(asked) == 1


@pytest.mark.parametrize("give_up", ["no head in time", "the client left"])
async def test_a_request_given_up_while_its_body_is_written_is_not_finished(
    wire: Wire, give_up: str
) -> None:
    """Given up while its body was still being written (REQUEST_TIMEOUT; a client gone, as
    the relay's cancel), a request was finished all the same: closing the transport flushed
    the rest of the body, so the provider got the whole request, and could run it for a
    client that had left (a 16 MB upload, given up after 3 MB, arrived whole); one that
    had stopped reading held the connection and the buffered body for as long as it
    stayed up. Now what is not written is dropped with the connection."""
    received, sent = await give_a_request_up(wire, give_up)
    # What the kernels held when it was given up still arrives (a few MB at most).
    assert received < sent


def test_a_request_given_up_is_not_finished_under_uvloop_as_the_gateway_runs_it() -> None:
    import uvloop

    async def scenario() -> tuple[int, int]:
        wire = Wire(connect_timeout=2.0)
        try:
            return await give_a_request_up(wire, "no head in time")
        finally:
            await wire.close()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        received, sent = runner.run(scenario())
    assert received < sent


async def give_a_request_up(wire: Wire, give_up: str) -> tuple[int, int]:
    """POST a 16 MB body to a provider that reads its head, then nothing until the request
    is given up (`give_up`); the bytes of the body it then gets before the connection's end,
    and the body's size."""
    body = b"x" * (16 << 20)
    headed, given_up = asyncio.Event(), asyncio.Event()
    received: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        headed.set()
        await given_up.wait()
        size = 0
        while chunk := await reader.read(1 << 20):
            size += len(chunk)
        received.set_result(size)

    listening = socket.socket()
    listening.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)  # its accepted one's
    listening.bind(("127.0.0.1", 0))
    server = await RawServer.start(handle, None, None, sock=listening)  # type: ignore[arg-type]
    url = URL(f"http://127.0.0.1:{listening.getsockname()[1]}/x")
    async with server:
        if give_up == "no head in time":
            with pytest.raises(TimeoutError):
                await wire.request("POST", url, {}, body, timeout=0.5)
        else:
            sending = asyncio.create_task(wire.request("POST", url, {}, body))
            await headed.wait()
            sending.cancel()
            await asyncio.gather(sending, return_exceptions=True)
        given_up.set()
        return await asyncio.wait_for(received, 10), len(body)


async def test_a_chunked_answer_is_handed_on_without_its_framing(wire: Wire) -> None:
    server, url = await raw_server(
        lambda _: b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
    )
    async with server:
        reply = await wire.request("GET", url, {}, None)
        assert await reply.read() == b"hello world"


async def test_an_interim_answer_is_skipped(wire: Wire) -> None:
    server, url = await raw_server(
        lambda _: b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok"
    )
    async with server:
        reply = await wire.request("POST", url, {}, b"x")
        assert (reply.status, await reply.read()) == (201, b"ok")


async def test_a_status_below_100_is_not_valid_http_not_an_interim_answer(wire: Wire) -> None:
    # Taken for a 1xx, it left the request waiting for an answer until REQUEST_TIMEOUT.
    server, url = await raw_server(lambda _: b"HTTP/1.1 099 Odd\r\nContent-Length: 2\r\n\r\nok")
    async with server:
        with pytest.raises(aiohttp.ClientResponseError, match="status 99"):
            await asyncio.wait_for(wire.request("GET", url, {}, None), 10)


async def test_a_head_that_never_ends_fails_at_its_bound_not_at_the_timeout(wire: Wire) -> None:
    # A provider sending header bytes without end held them all in memory until
    # REQUEST_TIMEOUT; past MAX_HEAD_BYTES the answer is not valid HTTP.
    endless = b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * (MAX_HEAD_BYTES + 65536)
    server, url = await raw_server(lambda _: endless)
    async with server:
        with pytest.raises(aiohttp.ClientResponseError, match="head over"):
            await asyncio.wait_for(wire.request("GET", url, {}, None), 10)


async def test_tls_verifies_the_certificate(wire: Wire, tmp_path: Path) -> None:
    """A server whose certificate no authority signed is refused, not trusted."""
    _, context = self_signed(tmp_path, "cert")
    server = await RawServer.start(lambda r, w: None, "127.0.0.1", 0, ssl=context)
    port = server.sockets[0].getsockname()[1]
    async with server:
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            await wire.request("GET", URL(f"https://localhost:{port}/x"), {}, None)


async def _json(reply: object) -> dict[str, object]:
    import orjson

    data: dict[str, object] = orjson.loads(await reply.read())  # type: ignore[attr-defined]
    return data


def test_under_uvloop_as_the_gateway_runs_it() -> None:
    """The gateway's loop is uvloop, whose transports are not asyncio's classes."""
    import uvloop

    async def scenario() -> list[bytes]:
        runner = web.AppRunner(app())
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        wire = Wire(connect_timeout=2.0)
        try:
            bodies = []
            for _ in range(2):
                reply = await wire.request("POST", URL(f"http://127.0.0.1:{port}/echo"), {}, b"hi")
                bodies.append(await reply.read())
            return bodies
        finally:
            await wire.close()
            await runner.cleanup()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        bodies = runner.run(scenario())
    assert all(b'"body": "hi"' in body or b'"body":"hi"' in body for body in bodies), bodies


async def test_a_body_read_to_its_end_gives_its_connection_back(
    aiohttp_server: Serve, wire: Wire
) -> None:
    """As the relay reads: chunk by chunk to the end, never calling release()."""
    server = await aiohttp_server(app())
    ports = []
    for _ in range(3):
        reply = await wire.request("GET", server.make_url("/peer"), {}, None)
        body = b""
        while chunk := await reply.content.readany():
            body += chunk
        ports.append(body)
    assert len(set(ports)) == 1


async def test_each_head_awaited_times_out_at_its_own_deadline(wire: Wire) -> None:
    """One alarm serves every request waiting for a head: a later request with an earlier
    deadline moves it; an answered one is left alone; a timed-out connection is closed."""
    closed: asyncio.Queue[None] = asyncio.Queue()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        if head.startswith(b"GET /fast"):
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await reader.read()  # the wire closes what timed out; keeps what answered
        closed.put_nowait(None)

    server = await RawServer.start(handle, "127.0.0.1", 0)
    base = URL(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}")
    async with server:
        slow = asyncio.create_task(wire.request("GET", base / "slow", {}, None, timeout=30))
        # fast's deadline first, then soon's; 2 s for fast's answer on a loaded machine (two
        # pytest-xdist workers on two cores), soon's 3 s the time the test waits.
        soon = asyncio.create_task(wire.request("GET", base / "soon", {}, None, timeout=3))
        fast = await wire.request("GET", base / "fast", {}, None, timeout=2)
        assert (fast.status, await fast.read()) == (200, b"ok")
        done, _ = await asyncio.wait([slow, soon], return_when=asyncio.FIRST_COMPLETED)
        assert done == {soon} and isinstance(soon.exception(), TimeoutError)
        await asyncio.wait_for(closed.get(), 5)  # its connection, closed
        slow.cancel()
        await asyncio.gather(slow, return_exceptions=True)


async def test_a_provider_at_an_ipv6_address_gets_a_bracketed_host(wire: Wire) -> None:
    # base_url http://[::1]:8000/v1 (a model server on the host's IPv6 loopback): RFC 9110
    # §7.2 keeps the brackets in Host; `Host: ::1:8000` is refused by strict servers.
    heads: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        heads.append(await reader.readuntil(b"\r\n\r\n"))
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        writer.close()

    server = await RawServer.start(handle, "::1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        reply = await wire.request("GET", URL(f"http://[::1]:{port}/v1/models"), {}, None)
        assert reply.status == 200 and await reply.read() == b"ok"
    finally:
        server.close()
    assert f"\r\nHost: [::1]:{port}\r\n".encode() in heads[0], heads[0]


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n",  # neither length nor chunks
        b"HTTP/1.0 200 OK\r\n\r\n",  # a small HTTP/1.0 server (Python's http.server)
    ],
)
async def test_a_body_ended_by_closing_the_connection_is_whole(wire: Wire, head: bytes) -> None:
    """RFC 9112 §6.3: without Content-Length or chunked coding, the body is what comes until
    the server closes the connection; that close is its end, not a break."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(head + b'{"a": 1}')
        await writer.drain()
        writer.close()

    server = await RawServer.start(handle, "127.0.0.1", 0)
    url = URL(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/x")
    async with server:
        reply = await wire.request("GET", url, {}, None)
        assert reply.status == 200
        assert await asyncio.wait_for(reply.read(), 5) == b'{"a": 1}'


async def test_a_body_without_length_cut_by_a_reset_is_still_a_payload_error(wire: Wire) -> None:
    """A close-delimited body ends at a clean close only; a reset breaks it off."""
    headed = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\n\r\npart")
        await headed.wait()
        linger = struct.pack("ii", 1, 0)  # closing with a zero linger: RST, not FIN
        writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
        writer.transport.abort()

    server = await RawServer.start(handle, "127.0.0.1", 0)
    url = URL(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/x")
    async with server:
        reply = await wire.request("GET", url, {}, None)
        headed.set()
        with pytest.raises(aiohttp.ClientPayloadError):
            await asyncio.wait_for(reply.read(), 5)


async def test_a_malformed_body_after_the_head_is_a_payload_error(wire: Wire) -> None:
    """Bad framing found once the head went on (a chunk size that is no number) breaks the
    body as a cut does: aiohttp's ClientPayloadError, which the relay ends a stream on."""
    first_read = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n")
        await first_read.wait()
        writer.write(b"zz\r\n")  # while the reader waits for the next chunk
        await reader.read()

    server = await RawServer.start(handle, "127.0.0.1", 0)
    url = URL(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/x")
    async with server:
        reply = await wire.request("GET", url, {}, None)
        assert await reply.content.readany() == b"{}"
        first_read.set()
        with pytest.raises(aiohttp.ClientPayloadError):
            await asyncio.wait_for(reply.content.readany(), 5)
        reply.close()


STRAY = b"HTTP/1.1 200 OK\r\nX-Stray: 1\r\nContent-Length: 5\r\n\r\nstray"


@pytest.mark.parametrize(
    ("answer", "body"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfirst", b"first"),
        (b"HTTP/1.1 304 Not Modified\r\n\r\n", b""),
    ],
)
async def test_a_second_answer_to_one_request_is_not_read_into_the_first(
    wire: Wire, answer: bytes, body: bytes
) -> None:
    """A provider that writes two answers to one request (a proxy's desync, extra bytes past
    its Content-Length): the first is the answer, whole and untouched (its status, headers
    and body), and the connection is not used again, so the stray one answers nothing."""
    opened = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        opened.append(writer)
        await reader.readuntil(b"\r\n\r\n")
        writer.write(
            answer + STRAY
            if len(opened) == 1
            else b"HTTP/1.1 201 OK\r\nContent-Length: 6\r\n\r\nsecond"
        )
        await writer.drain()
        await reader.read()

    server = await RawServer.start(handle, "127.0.0.1", 0)
    url = URL(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/x")
    async with server:
        reply = await wire.request("GET", url, {}, None)
        assert await reply.read() == body
        assert (reply.status, "X-Stray" in reply.headers) == (int(answer[9:12]), False)
        following = await wire.request("GET", url, {}, None)
        assert (following.status, await following.read()) == (201, b"second")
    assert len(opened) == 2


async def test_bytes_a_provider_sends_on_an_idle_connection_close_it(wire: Wire) -> None:
    """Bytes that come while no request is waiting answer nothing: the connection is closed,
    not handed the next request (whose answer would be read as the stray's body)."""
    released, closed = asyncio.Event(), asyncio.Event()
    opened = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        opened.append(writer)
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfirst")
        if len(opened) == 1:
            await released.wait()
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 20\r\n\r\n")  # half an answer
        while await reader.read(1024):
            pass
        closed.set()

    server = await RawServer.start(handle, "127.0.0.1", 0)
    url = URL(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/x")
    async with server:
        reply = await wire.request("GET", url, {}, None)
        assert await reply.read() == b"first"
        released.set()
        await asyncio.wait_for(closed.wait(), 5)  # the wire closed the idle connection
        following = await wire.request("GET", url, {}, None)
        assert (following.status, await following.read()) == (200, b"first")
    assert len(opened) == 2


async def test_a_connection_is_not_used_as_its_provider_said_it_closes_it(
    wire: Wire, loop_clock: LoopClock
) -> None:
    """Node.js servers close a connection idle 5 s and say so (`Keep-Alive: timeout=5`); a
    request written on it as it closes crosses the close, and a POST is never sent again (it
    may have been read): 502. The wire keeps such a connection idle HINT_MARGIN less than
    said; a request past that goes on a new connection, read once."""
    provider = IdleClosing(idle=5, hint=True)
    url = await provider.start() / "v1" / "chat" / "completions"
    try:
        for waited in (0.0, 3.9, 4.1, 5.0, 7.0, 2.0):
            loop_clock.advance(waited)
            reply = await wire.request("POST", url, {}, f'{{"after": {waited}}}'.encode())
            assert (reply.status, len(await reply.read()) > 0) == (200, True)
    finally:
        await provider.close()
    assert provider.dropped == 0
    assert [number for number, _ in provider.answered] == [1, 1, 2, 3, 4, 4]


@pytest.mark.parametrize(
    ("hint", "connections"),
    [
        ("timeout=1", [1, 2, 3]),  # not a second to spare: never kept
        ('Timeout="3", max=100', [1, 1, 2]),  # kept 2 s
        ("max=100", [1, 1, 1]),  # no timeout said: keepalive_seconds
        ("timeout=x", [1, 1, 1]),  # not a number: as if unsaid
        ("timeout=600", [1, 1, 1]),  # longer than keepalive_seconds: that
        # ... however long: before, one past a float's range failed the read of a whole answer
        ("timeout=" + "9" * 400, [1, 1, 1]),
    ],
)
async def test_a_keep_alive_header_shortens_the_wait_never_lengthens_it(
    wire: Wire, loop_clock: LoopClock, hint: str, connections: list[int]
) -> None:
    opened: list[int] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        opened.append(len(opened) + 1)
        number = len(opened)
        try:
            while True:
                await reader.readuntil(b"\r\n\r\n")
                answer = f"HTTP/1.1 200 OK\r\nKeep-Alive: {hint}\r\nContent-Length: 1\r\n\r\n"
                writer.write(answer.encode() + str(number).encode())
        except asyncio.IncompleteReadError:
            writer.close()

    server = await RawServer.start(handle, "127.0.0.1", 0)
    url = URL(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/x")
    seen = []
    async with server:
        for waited in (0.0, 1.5, 2.5):
            loop_clock.advance(waited)
            reply = await wire.request("GET", url, {}, None)
            seen.append(int(await reply.read()))
    assert seen == connections


class ClosingServer:
    """A server on plain sockets that answers each connection's first request, then holds it
    open until the test closes it (`close_idle`) between two turns of the loop: the server's
    FIN reaches the wire's socket before the loop has read it, as when a provider's idle
    timer goes off while the gateway is busy. `heard` lists each request, as read."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.setblocking(False)
        self.url = URL(f"http://127.0.0.1:{self.listener.getsockname()[1]}/x")
        self.heard: list[bytes] = []
        self.accepted: list[socket.socket] = []
        self._task = asyncio.get_running_loop().create_task(self._serve())

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            connection, _ = await loop.sock_accept(self.listener)
            self.accepted.append(connection)
            self.heard.append(await loop.sock_recv(connection, 65536))  # one small request
            await loop.sock_sendall(connection, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    def close_idle(self, number: int) -> None:
        """Close connection `number` (1: the first), now: its FIN is in the wire's socket
        when this returns (the wire's kernel acknowledged it), unread by the loop."""
        connection = self.accepted[number - 1]
        connection.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + 5
        while connection.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] != FIN_WAIT2:
            assert time.monotonic() < deadline, "the FIN was not acknowledged"
            time.sleep(0.001)  # the loop must not turn: it would read the FIN
        connection.close()

    async def stop(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        for connection in self.accepted:
            connection.close()
        self.listener.close()


FIN_WAIT2 = 5  # tcp_info.tcpi_state: our FIN acknowledged, theirs not sent
linux_tcp_info = pytest.mark.skipif(
    not hasattr(socket, "TCP_INFO"), reason="ClosingServer reads Linux's TCP_INFO"
)


@linux_tcp_info
async def test_a_post_is_not_written_on_a_connection_its_provider_closed_while_idle(
    wire: Wire, loop_clock: LoopClock
) -> None:
    """uvicorn closes an idle connection after 5 s and says nothing of it. Its FIN can be in
    the gateway's socket, unread, when a request takes the connection: written there, a POST
    was lost ("closed the connection before answering", 502). A connection idle a while is
    looked at before the request is written, and one its provider closed is not used."""
    server = ClosingServer()
    try:
        first = await wire.request("POST", server.url, {}, b'{"n": 1}')
        assert await first.read() == b"ok"
        server.close_idle(1)
        loop_clock.advance(5.0)
        second = await wire.request("POST", server.url, {}, b'{"n": 2}')
        assert (second.status, await second.read()) == (200, b"ok")
    finally:
        await server.stop()
    assert [heard.endswith(b'{"n": 1}') for heard in server.heard] == [True, False]
    assert server.heard[1].endswith(b'{"n": 2}') and len(server.accepted) == 2


async def test_a_connection_reused_at_once_is_not_looked_at(
    wire: Wire, loop_clock: LoopClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under load a connection is reused within milliseconds: no system call is added to
    take it. Only one idle past `look_after` is looked at, once."""
    looked: list[object] = []
    real = wire_module._closed_under_us

    def counted(transport: asyncio.Transport) -> bool:
        looked.append(transport)
        return real(transport)

    monkeypatch.setattr(wire_module, "_closed_under_us", counted)
    server, url = await raw_server(lambda _: b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    async with server:
        for waited in (0.0, 0.0, 0.5, 0.0, wire.look_after + 0.1, 0.0):
            loop_clock.advance(waited)
            reply = await wire.request("GET", url, {}, None)
            assert await reply.read() == b"ok"
    assert len(looked) == 1


@linux_tcp_info
def test_a_closed_idle_connection_is_found_under_uvloop_as_the_gateway_runs_it() -> None:
    """uvloop's transports lend a socket without recv(): the look goes by its descriptor."""
    import uvloop

    async def scenario() -> list[bytes]:
        wire, server = Wire(connect_timeout=2.0), ClosingServer()
        wire.look_after = -1.0  # every reuse (uvloop's clock cannot be moved)
        try:
            first = await wire.request("POST", server.url, {}, b"1")
            bodies = [await first.read()]
            server.close_idle(1)
            second = await wire.request("POST", server.url, {}, b"2")
            return [*bodies, await second.read()]
        finally:
            await wire.close()
            await server.stop()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        assert runner.run(scenario()) == [b"ok", b"ok"]


@linux_tcp_info
async def test_a_connection_kept_after_a_slow_read_is_looked_at_before_it_is_reused(
    wire: Wire, loop_clock: LoopClock
) -> None:
    """A provider's idle time starts when it has written its answer, not when a slow client
    has read it through the gateway: a large answer read slowly can end after the provider,
    idle 5 s by its clock, closed the connection. Its FIN waits behind the answer's last
    bytes, unread when the connection is kept: a POST on it was lost (502)."""
    body = b"x" * (HIGH_WATER * 2)  # reading pauses; it fits the sockets' buffers
    closed, heard = asyncio.Event(), []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        heard.append(await reader.readuntil(b"\r\n\r\n"))
        if len(heard) > 1:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()
            return
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        await writer.drain()  # all of it in the sockets' buffers: the provider is idle
        sock = writer.get_extra_info("socket")
        sock.shutdown(socket.SHUT_WR)  # its idle timer went off while the client read
        while sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] != FIN_WAIT2:
            await asyncio.sleep(0.001)  # until the wire's kernel acknowledged the FIN
        closed.set()
        await reader.read()

    server = await RawServer.start(handle, "127.0.0.1", 0)
    url = URL(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/x")
    async with server:
        reply = await wire.request("GET", url, {}, None)
        await asyncio.wait_for(closed.wait(), 5)  # the wire's reading paused meanwhile
        loop_clock.advance(5.0)  # a slow client took 5 s over the answer
        assert len(await reply.read()) == len(body)
        following = await wire.request("POST", url, {}, b"{}")
        assert (following.status, await following.read()) == (200, b"ok")
    assert len(heard) == 2


def _resolving(name: str, addresses: list[str]) -> Resolve:
    """A resolver that answers `name` with `addresses`, in that order (as a DNS answer with
    several records, or `localhost` as ::1 then 127.0.0.1), and nothing else."""

    async def resolve(host: str, port: int) -> list[AddrInfoType]:
        assert host == name
        return [
            (socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port))
            for a in addresses
        ]

    return resolve


@pytest.mark.parametrize("first", ["silent", "refusing"])
async def test_a_name_whose_first_address_fails_is_reached_at_the_next(first: str) -> None:
    """A host name answering two addresses, the first dead: one that drops connection attempts
    (a replica gone, a route that loses packets) or refuses them (localhost as ::1 while the
    server listens on 127.0.0.1). The request reaches the second address at once, as aiohttp's
    connector (happy eyeballs, 0.25 s) would; before, a silent first address took the whole
    connect timeout (REQUEST_TIMEOUT, 600 s) of every new connection, then failed it."""
    server = TestServer(app(), host="127.0.0.1")
    await server.start_server()
    port = server.port
    assert port is not None
    dead = socket.socket()
    dead.bind(("127.0.0.2", port))
    filler = socket.socket()
    if first == "silent":  # a backlog of one, taken: the kernel drops any further SYN
        dead.listen(0)
        filler.connect(("127.0.0.2", port))
    # refusing: bound, never listening
    wire = Wire(
        connect_timeout=30.0, resolve=_resolving("provider.test", ["127.0.0.2", "127.0.0.1"])
    )
    try:
        reply = await wire.request("GET", URL(f"http://provider.test:{port}/peer"), {}, None)
        assert reply.status == 200
        await reply.read()
    finally:
        await wire.close()
        filler.close()
        dead.close()
        await server.close()


async def test_a_provider_moved_by_dns_is_followed_by_a_busy_kept_connection_too(
    loop_clock: LoopClock,
) -> None:
    """The provider's name now answers another address (a failover by DNS) while the old one
    still serves. A connection in steady use (a request every 20 s, under keepalive_seconds)
    was reused for ever, every request going to the old address for as long as the traffic
    lasted; it is now retired after MAX_AGE, and the next connection asks the name again
    (nginx's upstream keepalive_time does this, an hour by default)."""

    async def where(request: web.Request) -> web.Response:
        assert request.transport is not None
        return web.Response(text=request.transport.get_extra_info("sockname")[0])

    application = web.Application()
    application.router.add_get("/where", where)
    runner = web.AppRunner(application)
    await runner.setup()
    first = web.TCPSite(runner, "127.0.0.1", 0)
    await first.start()
    port = runner.addresses[0][1]
    await web.TCPSite(runner, "127.0.0.2", port).start()
    answer = ["127.0.0.1"]

    async def resolve(host: str, port: int) -> list[AddrInfoType]:
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (answer[0], port))]

    wire = Wire(connect_timeout=5.0, resolve=resolve)
    url = URL(f"http://provider.test:{port}/where")

    async def served_from() -> bytes:
        reply = await wire.request("GET", url, {}, None)
        return await reply.read()

    try:
        assert await served_from() == b"127.0.0.1"
        answer[0] = "127.0.0.2"  # the name moves; the old address still answers
        assert await served_from() == b"127.0.0.1"  # a young kept connection is reused
        seen = []
        for _ in range(int(wire_module.MAX_AGE // 20) + 2):
            loop_clock.advance(20.0)
            seen.append(await served_from())
        assert seen[-1] == b"127.0.0.2", seen
    finally:
        await wire.close()
        await runner.cleanup()


async def test_a_name_written_with_its_trailing_dot_is_verified_and_sent_without_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A base_url whose host is a fully qualified name with its trailing dot
    (https://vllm.ml.svc.cluster.local./v1, written so in Kubernetes to skip the search
    domains): the name is looked up as written, but a certificate names no trailing dot,
    nor does a Host (RFC 6066 §3): TLS failed 'Hostname mismatch'. aiohttp, which the wire
    replaced, strips it for both (aiohttp #3636)."""
    cert, context = self_signed(tmp_path, "cert", "DNS:provider.test")
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    hosts = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        hosts.extend(line for line in head.split(b"\r\n") if line.lower().startswith(b"host:"))
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await reader.read()

    server = await RawServer.start(handle, "127.0.0.1", 0, ssl=context)
    port = server.sockets[0].getsockname()[1]
    wire = Wire(connect_timeout=5.0, resolve=_resolving("provider.test.", ["127.0.0.1"]))
    try:
        async with server:
            reply = await wire.request("GET", URL(f"https://provider.test.:{port}/x"), {}, None)
            assert (reply.status, await reply.read()) == (200, b"ok")
    finally:
        await wire.close()
    assert hosts == [f"Host: provider.test:{port}".encode()]
