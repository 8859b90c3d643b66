"""The benchmark's own HTTP/1.1 clients: cheap, raw, and timed where the bytes arrive.

- `sequential_latencies`: one blocking keep-alive socket, requests one after another
  (concurrency 1, no event loop between the clock and the socket).
- `Conn`: an asyncio Protocol for one keep-alive connection. For a Server-Sent Events
  response it notes, per event, when it arrived (CLOCK_MONOTONIC, comparable with the
  mock's `x_sent_ns` stamp, since both processes share the machine's clock).
- `stream_workers`, `many_streams`, `steady_rate`: the streaming, concurrency and soak
  drivers built on `Conn`.
"""

from __future__ import annotations

import asyncio
import re
import socket
import time
from dataclasses import dataclass, field

SENT_NS = re.compile(rb'"x_sent_ns":(\d+)')
CHAT = b'{"model":"gpt-bench","messages":[{"role":"user","content":"Say hello."}]}'
CHAT_STREAM = (
    b'{"model":"gpt-bench","messages":[{"role":"user","content":"Say hello."}],"stream":true}'
)


def request_bytes(port: int, key: str, body: bytes, extra: dict[str, str] | None = None) -> bytes:
    """A raw POST /v1/chat/completions, keep-alive, with the virtual key."""
    lines = [
        "POST /v1/chat/completions HTTP/1.1",
        f"Host: 127.0.0.1:{port}",
        f"Authorization: Bearer {key}",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
    ]
    lines += [f"{name}: {value}" for name, value in (extra or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


# --- concurrency 1, blocking -------------------------------------------------------------


def _read_response(sock: socket.socket, buf: bytes) -> tuple[int, bytes]:
    """Read one whole response (Content-Length or chunked); (status, leftover bytes)."""
    while (end := buf.find(b"\r\n\r\n")) < 0:
        buf += _recv(sock)
    head = buf[:end].split(b"\r\n")
    status = int(head[0].split(b" ", 2)[1])
    length, is_chunked = None, False
    for line in head[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding" and b"chunked" in value.lower():
            is_chunked = True
    buf = buf[end + 4 :]
    if not is_chunked:
        length = length or 0
        while len(buf) < length:
            buf += _recv(sock)
        return status, buf[length:]
    while True:  # chunked: walk the chunks
        while (eol := buf.find(b"\r\n")) < 0:
            buf += _recv(sock)
        size = int(buf[:eol].split(b";", 1)[0], 16)
        if size == 0:
            while (end := buf.find(b"\r\n\r\n", eol - 2 if eol >= 2 else 0)) < 0:
                buf += _recv(sock)
            return status, buf[end + 4 :]
        while len(buf) < eol + 2 + size + 2:
            buf += _recv(sock)
        buf = buf[eol + 2 + size + 2 :]


def _recv(sock: socket.socket) -> bytes:
    data = sock.recv(65536)
    if not data:
        raise ConnectionError("the server closed the connection")
    return data


def sequential_latencies(port: int, raw: bytes, count: int) -> tuple[list[float], int]:
    """`count` requests one after another on one connection: (latencies in ms, non-2xx)."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    latencies, bad, leftover = [], 0, b""
    clock = time.perf_counter_ns
    try:
        for _ in range(count):
            start = clock()
            sock.sendall(raw)
            status, leftover = _read_response(sock, leftover)
            latencies.append((clock() - start) / 1e6)
            bad += not 200 <= status < 300
    finally:
        sock.close()
    return latencies, bad


# --- asyncio connections -----------------------------------------------------------------


@dataclass(slots=True)
class Reply:
    """One response as the client saw it."""

    status: int = 0
    sent_at: int = 0  # monotonic ns when the request was written
    first_event_at: int = 0  # when the first SSE event (or the first body byte) arrived
    done_at: int = 0
    events: list[tuple[int, int]] = field(default_factory=list)  # (arrived ns, mock's sent ns)
    saw_done: bool = False  # the stream's `data: [DONE]` arrived
    error: str | None = None

    @property
    def ttfb_ms(self) -> float:
        return (self.first_event_at - self.sent_at) / 1e6

    @property
    def stamped(self) -> int:
        """How many content chunks (those the mock stamped) arrived."""
        return sum(1 for _, sent in self.events if sent)

    def chunk_delays_ms(self) -> list[float]:
        """How long each stamped chunk took from the mock's write to the client."""
        return [(arrived - sent) / 1e6 for arrived, sent in self.events if sent]

    def extra_gaps_ms(self) -> list[float]:
        """Per consecutive pair: arrival gap minus send gap (0 when nothing held a chunk)."""
        stamped = [(a, s) for a, s in self.events if s]
        return [
            ((a2 - a1) - (s2 - s1)) / 1e6
            for (a1, s1), (a2, s2) in zip(stamped, stamped[1:], strict=False)
        ]

    def max_gap_ms(self) -> float:
        stamped = [a for a, s in self.events if s]
        return max(((b - a) / 1e6 for a, b in zip(stamped, stamped[1:], strict=False)), default=0.0)


class Conn(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection; `await conn.send(raw)` gives a `Reply`."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.reply: Reply | None = None
        self.waiter: asyncio.Future[Reply] | None = None
        self.state = "idle"  # head, length, chunk-size, chunk-data, trailer
        self.remaining = 0
        self.sse = b""
        self.is_sse = False

    @classmethod
    async def open(cls, port: int) -> Conn:
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(cls, "127.0.0.1", port)
        return conn

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.waiter is not None and not self.waiter.done():
            assert self.reply is not None
            self.reply.error = f"connection lost ({exc.__class__.__name__ if exc else 'closed'})"
            self.waiter.set_result(self.reply)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def send(self, raw: bytes) -> asyncio.Future[Reply]:
        loop = asyncio.get_running_loop()
        self.waiter = loop.create_future()
        self.reply = Reply(sent_at=time.monotonic_ns())
        self.state, self.sse, self.is_sse = "head", b"", False
        if self.transport is None:
            self.reply.error = "not connected"
            self.waiter.set_result(self.reply)
        else:
            self.transport.write(raw)
        return self.waiter

    def data_received(self, data: bytes) -> None:
        now = time.monotonic_ns()
        reply = self.reply
        if reply is None:
            return
        buf = self.buf + data if self.buf else data
        while True:
            state = self.state
            if state == "head":
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    break
                self._head(buf[:end])
                buf = buf[end + 4 :]
            elif state == "length":
                take = buf[: self.remaining]
                if take:
                    self._body(take, now)
                self.remaining -= len(take)
                buf = buf[len(take) :]
                if self.remaining == 0:
                    self._finish(now)
                break
            elif state == "chunk-size":
                eol = buf.find(b"\r\n")
                if eol < 0:
                    break
                size = int(buf[:eol].split(b";", 1)[0], 16)
                buf = buf[eol + 2 :]
                if size == 0:
                    self.state = "trailer"
                else:
                    self.state, self.remaining = "chunk-data", size
            elif state == "chunk-data":
                if len(buf) < self.remaining + 2:
                    break
                self._body(buf[: self.remaining], now)
                buf = buf[self.remaining + 2 :]
                self.state = "chunk-size"
            elif state == "trailer":
                end = buf.find(b"\r\n")
                if end < 0:
                    break
                if end == 0:
                    buf = buf[2:]
                    self._finish(now)
                    break
                buf = buf[end + 2 :]
            else:
                break
        self.buf = buf

    def _head(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        assert self.reply is not None
        self.reply.status = int(lines[0].split(b" ", 2)[1])
        length, is_chunked = 0, False
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding" and b"chunked" in value.lower():
                is_chunked = True
            elif name == b"content-type" and b"text/event-stream" in value:
                self.is_sse = True
        if is_chunked:
            self.state = "chunk-size"
        else:
            self.state, self.remaining = "length", length
            if length == 0:
                self._finish(time.monotonic_ns())

    def _body(self, payload: bytes, now: int) -> None:
        reply = self.reply
        assert reply is not None
        if not self.is_sse:
            if not reply.first_event_at:
                reply.first_event_at = now
            return
        sse = self.sse + payload
        while (end := sse.find(b"\n\n")) >= 0:
            event, sse = sse[:end], sse[end + 2 :]
            if not reply.first_event_at:
                reply.first_event_at = now
            if event == b"data: [DONE]":
                reply.saw_done = True
                continue
            match = SENT_NS.search(event)
            reply.events.append((now, int(match.group(1)) if match else 0))
        self.sse = sse

    def _finish(self, now: int) -> None:
        self.state = "idle"
        reply, waiter = self.reply, self.waiter
        if reply is not None and waiter is not None and not waiter.done():
            reply.done_at = now
            waiter.set_result(reply)


# --- drivers -----------------------------------------------------------------------------


async def stream_workers(
    port: int, raw: bytes, workers: int, per_worker: int, stagger_s: float
) -> list[Reply]:
    """`workers` connections, each running `per_worker` streams one after another."""

    async def worker(index: int) -> list[Reply]:
        await asyncio.sleep(index * stagger_s)
        conn = await Conn.open(port)
        try:
            return [await conn.send(raw) for _ in range(per_worker)]
        finally:
            conn.close()

    results = await asyncio.gather(*(worker(i) for i in range(workers)))
    return [reply for batch in results for reply in batch]


async def many_streams(
    port: int, raw: bytes, count: int, spread_s: float, timeout_s: float
) -> tuple[list[Reply], float]:
    """Open `count` connections, then start one stream on each, spread over `spread_s`.

    All of them are open at once for the length of a stream. Returns the replies and the
    seconds it took to open the connections.
    """
    started = time.monotonic()
    gate = asyncio.Semaphore(64)  # do not overflow the listen backlog

    async def opened() -> Conn:
        async with gate:
            return await Conn.open(port)

    conns = await asyncio.gather(*(opened() for _ in range(count)))
    connect_s = time.monotonic() - started
    try:

        async def one(index: int, conn: Conn) -> Reply:
            await asyncio.sleep(spread_s * index / count)
            future = conn.send(raw)
            try:
                return await asyncio.wait_for(asyncio.shield(future), timeout_s)
            except TimeoutError:
                assert conn.reply is not None
                conn.reply.error = "timed out"
                return conn.reply

        replies = await asyncio.gather(*(one(i, c) for i, c in enumerate(conns)))
    finally:
        for conn in conns:
            conn.close()
    return replies, connect_s


async def steady_rate(
    port: int, raw: bytes, rate: float, seconds: float, conns: int = 16
) -> tuple[int, int]:
    """Non-streaming requests at `rate` per second for `seconds`: (sent, failed or non-2xx)."""
    period = conns / rate
    loop = asyncio.get_running_loop()
    start = loop.time()
    counts = [0, 0]

    async def worker(index: int) -> None:
        conn = await Conn.open(port)
        try:
            slot = start + index * period / conns
            while slot < start + seconds:
                await asyncio.sleep(max(0.0, slot - loop.time()))
                reply = await conn.send(raw)
                counts[0] += 1
                if reply.error or not 200 <= reply.status < 300:
                    counts[1] += 1
                    if reply.error:
                        conn.close()
                        conn = await Conn.open(port)
                slot += period
        finally:
            conn.close()

    await asyncio.gather(*(worker(i) for i in range(conns)))
    return counts[0], counts[1]
