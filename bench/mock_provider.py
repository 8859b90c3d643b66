"""A very cheap mock OpenAI provider for the benchmark: raw asyncio Protocol on uvloop.

POST /v1/chat/completions answers a fixed chat completion (with `usage`) after
`--delay-ms`, or, when the body has `"stream": true`, a Server-Sent Events stream of
`--chunks` chunks `--chunk-gap-ms` apart (the first one `--delay-ms` after the request),
then a usage chunk and `data: [DONE]`. Each stream chunk carries `x_seq` (its index) and
`x_sent_ns` (CLOCK_MONOTONIC when it was written), so a client on the same machine can
tell how late each chunk arrived.

A request may override the defaults with `x-mock-delay-ms`, `x-mock-chunks` and
`x-mock-gap-ms` headers (the gateway passes them through), so one mock serves every
measurement of `bench/run.py`.

HTTP/1.1 keep-alive and pipelining: requests on one connection are parsed as they arrive
(Content-Length or chunked bodies) and answered strictly in order, one at a time.
No coroutines, no per-request objects beyond a small tuple: the responses are
pre-encoded bytes, delays are `loop.call_at` timers.

`python bench/mock_provider.py --ceiling` measures its own ceiling: it starts itself on
one core and drives it with wrk from the other, with no delay, and prints requests/s.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import deque

MODEL = "gpt-bench"
COMPLETION = (
    b'{"id":"chatcmpl-bench","object":"chat.completion","created":1700000000,'
    b'"model":"gpt-bench","choices":[{"index":0,"message":{"role":"assistant",'
    b'"content":"Hello from the mock provider."},"logprobs":null,"finish_reason":"stop"}],'
    b'"usage":{"prompt_tokens":12,"completion_tokens":7,"total_tokens":19}}'
)
JSON_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
    b"Content-Length: " + str(len(COMPLETION)).encode() + b"\r\n\r\n"
)
JSON_RESPONSE = JSON_HEAD + COMPLETION
SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n"
)
CHUNK_PREFIX = (
    b'data: {"id":"chatcmpl-bench","object":"chat.completion.chunk","created":1700000000,'
    b'"model":"gpt-bench","choices":[{"index":0,"delta":{"content":"tok "},'
    b'"finish_reason":null}],"x_seq":'
)
USAGE_EVENT = (
    b'data: {"id":"chatcmpl-bench","object":"chat.completion.chunk","created":1700000000,'
    b'"model":"gpt-bench","choices":[],"usage":{"prompt_tokens":12,"completion_tokens":%d,'
    b'"total_tokens":%d}}\n\n'
    b"data: [DONE]\n\n"
)
NOT_FOUND = (
    b"HTTP/1.1 404 Not Found\r\nContent-Type: text/plain\r\nContent-Length: 9\r\n\r\nnot found"
)
BAD_REQUEST = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
STREAM_TRUE = re.compile(rb'"stream"\s*:\s*true')
MAX_HEAD = 65536


def chunked(payload: bytes) -> bytes:
    """One HTTP/1.1 chunk."""
    return b"%x\r\n%s\r\n" % (len(payload), payload)


class Defaults:
    __slots__ = ("delay", "chunks", "gap")

    def __init__(self, delay_ms: float, chunks: int, gap_ms: float) -> None:
        self.delay, self.chunks, self.gap = delay_ms / 1000, chunks, gap_ms / 1000


class MockProtocol(asyncio.Protocol):
    """One client connection: parse requests as they come, answer them in order."""

    __slots__ = ("defaults", "loop", "transport", "buffer", "queue", "busy", "closing")

    def __init__(self, defaults: Defaults) -> None:
        self.defaults = defaults
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.queue: deque[tuple] = deque()  # parsed requests waiting for their turn
        self.busy = False
        self.closing = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.queue.clear()

    def data_received(self, data: bytes) -> None:
        self.buffer = self.buffer + data if self.buffer else data
        while self.buffer:
            request = self.parse()
            if request is None:
                break
            self.queue.append(request)
        if len(self.buffer) > MAX_HEAD * 64:
            self.fail()
        if not self.busy:
            self.next()

    def parse(self) -> tuple | None:
        """Take one complete request off the buffer, or None when more bytes are needed."""
        buf = self.buffer
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            if len(buf) > MAX_HEAD:
                self.fail()
            return None
        head = buf[:end].decode("latin-1")
        lines = head.split("\r\n")
        try:
            method, target, _ = lines[0].split(" ", 2)
        except ValueError:
            self.fail()
            return None
        length, is_chunked, close = 0, False, False
        delay, chunks, gap = self.defaults.delay, self.defaults.chunks, self.defaults.gap
        for line in lines[1:]:
            name, _, value = line.partition(":")
            name = name.strip().lower()
            if name == "content-length":
                length = int(value)
            elif name == "transfer-encoding":
                is_chunked = "chunked" in value.lower()
            elif name == "connection":
                close = value.strip().lower() == "close"
            elif name.startswith("x-mock-"):
                if name == "x-mock-delay-ms":
                    delay = float(value) / 1000
                elif name == "x-mock-chunks":
                    chunks = int(value)
                elif name == "x-mock-gap-ms":
                    gap = float(value) / 1000
        start = end + 4
        if is_chunked:
            body, consumed = dechunk(buf, start)
            if body is None:
                return None
            self.buffer = buf[consumed:]
        else:
            if len(buf) < start + length:
                return None
            body = buf[start : start + length]
            self.buffer = buf[start + length :]
        return method, target, body, close, delay, chunks, gap

    def fail(self) -> None:
        self.buffer = b""
        self.queue.clear()
        if self.transport is not None:
            self.transport.write(BAD_REQUEST)
            self.transport.close()

    def next(self) -> None:
        """Answer queued requests in order; one with a delay or a stream holds the rest."""
        while self.queue and self.transport is not None:
            method, target, body, close, delay, chunks, gap = self.queue.popleft()
            self.closing = close
            if method != "POST" or not target.split("?", 1)[0].endswith("/chat/completions"):
                self.respond(NOT_FOUND)
                continue
            if STREAM_TRUE.search(body):
                self.busy = True
                self.transport.write(SSE_HEAD)
                start = self.loop.time() + delay
                if delay > 0:
                    self.loop.call_at(start, self.send_chunk, 0, chunks, start, gap)
                else:
                    self.send_chunk(0, chunks, start, gap)
                return
            if delay > 0:
                self.busy = True
                self.loop.call_later(delay, self.delayed, JSON_RESPONSE)
                return
            self.respond(JSON_RESPONSE)
        self.busy = False

    def respond(self, data: bytes) -> None:
        if self.transport is None:
            return
        self.transport.write(data)
        if self.closing:
            self.transport.close()
            self.transport = None

    def delayed(self, data: bytes) -> None:
        self.respond(data)
        self.busy = False
        self.next()

    def send_chunk(self, seq: int, chunks: int, start: float, gap: float) -> None:
        transport = self.transport
        if transport is None:
            return
        if seq < chunks:
            event = CHUNK_PREFIX + b'%d,"x_sent_ns":%d}\n\n' % (seq, time.monotonic_ns())
            if seq + 1 < chunks:
                transport.write(chunked(event))
                self.loop.call_at(
                    start + (seq + 1) * gap, self.send_chunk, seq + 1, chunks, start, gap
                )
                return
        else:
            event = b""
        # The last content chunk goes out with the usage chunk, [DONE] and the end.
        tail = USAGE_EVENT % (chunks, 12 + chunks)
        transport.write(chunked(event + tail) + b"0\r\n\r\n")
        if self.closing:
            transport.close()
            self.transport = None
        self.busy = False
        self.next()


def dechunk(buf: bytes, pos: int) -> tuple[bytes | None, int]:
    """A chunked body starting at `pos`: (body, end offset), or (None, 0) if incomplete."""
    parts = []
    while True:
        eol = buf.find(b"\r\n", pos)
        if eol < 0:
            return None, 0
        size = int(buf[pos:eol].split(b";", 1)[0], 16)
        pos = eol + 2
        if size == 0:
            trailer_end = buf.find(b"\r\n\r\n", pos - 2)
            if trailer_end < 0:
                return None, 0
            return b"".join(parts), trailer_end + 4
        if len(buf) < pos + size + 2:
            return None, 0
        parts.append(buf[pos : pos + size])
        pos += size + 2


async def serve(host: str, port: int, defaults: Defaults) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: MockProtocol(defaults), host, port, backlog=4096, reuse_address=True
    )
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"mock provider listening on http://{host}:{port}", flush=True)
    async with server:
        await stop.wait()


def run(host: str, port: int, defaults: Defaults) -> None:
    try:
        import uvloop
    except ImportError:
        print("mock provider: uvloop not installed, using asyncio's loop", file=sys.stderr)
        asyncio.run(serve(host, port, defaults))
        return
    uvloop.run(serve(host, port, defaults))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port} after {timeout:g} s")


def measure_ceiling(seconds: int = 5, connections: int = 64) -> float:
    """Start a mock on core 1, drive it with wrk on core 0 (no delay); its requests/s."""
    if shutil.which("wrk") is None:
        raise SystemExit("wrk not found: apt-get install -y wrk (or `make bench`)")
    port = free_port()
    mock = subprocess.Popen(
        ["taskset", "-c", "1", sys.executable, os.path.abspath(__file__), "--port", str(port)],
        stdout=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_for_port(port)
        lua = os.path.join(os.path.dirname(os.path.abspath(__file__)), "chat.lua")
        env = dict(os.environ, BENCH_KEY="none", BENCH_DELAY_MS="0")
        out = subprocess.run(
            [
                "taskset",
                "-c",
                "0",
                "wrk",
                "-t1",
                f"-c{connections}",
                f"-d{seconds}s",
                "-s",
                lua,
                f"http://127.0.0.1:{port}/v1/chat/completions",
            ],
            capture_output=True,
            text=True,
            env=env,
            check=True,
        ).stdout
        match = re.search(r"Requests/sec:\s+([\d.]+)", out)
        return float(match.group(1)) if match else 0.0
    finally:
        os.killpg(mock.pid, signal.SIGTERM)
        mock.wait(timeout=5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument(
        "--delay-ms", type=float, default=0.0, help="before the answer (or first chunk)"
    )
    parser.add_argument("--chunks", type=int, default=20, help="content chunks per stream")
    parser.add_argument(
        "--chunk-gap-ms", type=float, default=20.0, help="between two stream chunks"
    )
    parser.add_argument(
        "--ceiling", action="store_true", help="measure this mock's own requests/s and exit"
    )
    args = parser.parse_args()
    if args.ceiling:
        print(
            f"mock provider ceiling: {measure_ceiling():,.0f} requests/s on one core (wrk on the other, no delay)"
        )
        return
    run(args.host, args.port, Defaults(args.delay_ms, args.chunks, args.chunk_gap_ms))


if __name__ == "__main__":
    main()
