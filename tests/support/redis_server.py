"""A real `redis-server` for tests: on a free loopback port, in a temp dir, stopped at the end.

fakeredis cannot prove atomicity, so the Redis tests run against the real thing. Import
the fixtures (`redis_server`, `redis_url`) into a test module; they skip, saying why, when
`redis-server` is not installed (`make test` installs it with apt-get).
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis

from tests.support.processes import free_port
from tests.support.raw_servers import RawServer

START_SECONDS = 10.0


class RedisServer:
    """One redis-server process: no persistence, so a restart comes back empty, like a lost node."""

    def __init__(self, directory: Path, port: int | None = None) -> None:
        self.directory = directory
        self.port = port or free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def start(self) -> None:
        """Start on the same port as before and wait until it answers PING."""
        binary = shutil.which("redis-server")
        assert binary is not None, "redis-server is not installed"
        self.process = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.directory),
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "no",
                "--loglevel",
                "warning",
                "--logfile",
                str(self.directory / "redis.log"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + START_SECONDS
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"redis-server exited: {(self.directory / 'redis.log').read_text()}"
                )
            if self.answers():
                return
            time.sleep(0.02)
        raise RuntimeError(f"redis-server on port {self.port} did not answer in {START_SECONDS} s")

    def kill(self) -> None:
        """SIGKILL, as a crash: clients see their connections drop."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
        if self.process is not None:
            self.process.wait(timeout=10)
        self.process = None

    def answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as connection:
                connection.sendall(b"PING\r\n")
                return connection.recv(16).startswith(b"+PONG")
        except OSError:
            return False


def has_redis_server() -> bool:
    return shutil.which("redis-server") is not None


@pytest.fixture
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A fresh, empty redis-server for one test; killed at its end, also on failure."""
    if not has_redis_server():
        pytest.skip(
            "redis-server is not installed (make test installs it: apt-get install -y redis-server)"
        )
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    return redis_server.url


@pytest.fixture
def raw_redis(redis_url: str) -> Iterator[redis.Redis]:
    """A plain client, to look at what the gateway or a tracker left in Redis."""
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        yield client
    finally:
        client.close()


class MovingAddress:
    """One address in front of Redis servers, leading each new connection to the server
    `port` names when it opens (a connection keeps its server): a failover's endpoint, as
    ElastiCache's primary endpoint or a Kubernetes Service is moved to the new primary."""

    def __init__(self, port: int) -> None:
        self.port = port  # the server new connections reach
        self.url = ""

    async def forward(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self.port)

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await source.read(65536):
                    sink.write(data)
            sink.close()

        await asyncio.gather(pipe(reader, upstream_writer), pipe(upstream_reader, writer))


@contextlib.asynccontextmanager
async def moving_address(port: int) -> AsyncIterator[MovingAddress]:
    """A `MovingAddress` leading to `port` until moved; its `url` is the Redis URL to use."""
    address = MovingAddress(port)
    server = await RawServer.start(address.forward, "127.0.0.1", 0)
    address.url = f"redis://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        yield address
    finally:
        server.close()


@contextlib.contextmanager
def failed_over(old: RedisServer, new: RedisServer, address: MovingAddress) -> Iterator[None]:
    """A failover: `old` made a replica of `new` (it keeps its clients' connections and
    answers their writes READONLY), and `address` moved to `new`."""
    client = redis.Redis(port=old.port)
    try:
        client.execute_command("REPLICAOF", "127.0.0.1", new.port)
        address.port = new.port
        yield
    finally:
        client.close()
