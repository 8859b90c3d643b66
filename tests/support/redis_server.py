"""A real `redis-server` for tests: on a free loopback port, in a temp dir, stopped at the end.

fakeredis cannot prove atomicity, so the Redis tests run against the real thing. Import
the fixtures (`redis_server`, `redis_url`) into a test module; they skip, saying why, when
`redis-server` is not installed (`make test` installs it with apt-get).
"""

from __future__ import annotations

import contextlib
import random
import shutil
import socket
import socketserver
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.support.processes import free_port

START_SECONDS = 10.0


# A cluster node also listens on its port + 10,000 (the cluster bus), so its port is at most
# 55,535: redis-server refuses a higher one, which the kernel's free ports often are.
CLUSTER_BUS_OFFSET = 10_000


def cluster_port() -> int:
    """A loopback port free now whose cluster bus port (+10,000) is free too."""
    rng = random.Random()
    for _ in range(200):
        port = rng.randint(20_000, 65_535 - CLUSTER_BUS_OFFSET)
        with socket.socket() as first, socket.socket() as bus:
            try:
                first.bind(("127.0.0.1", port))
                bus.bind(("127.0.0.1", port + CLUSTER_BUS_OFFSET))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port pair for a Redis Cluster node")


class RedisServer:
    """One redis-server process: no persistence, so a restart comes back empty, like a lost node."""

    def __init__(
        self, directory: Path, port: int | None = None, options: tuple[str, ...] = ()
    ) -> None:
        self.directory = directory
        is_cluster = "--cluster-enabled" in options
        self.port = port or (cluster_port() if is_cluster else free_port())
        self.options = options  # more of redis-server's flags (`--cluster-enabled yes`)
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
                *self.options,
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
    ElastiCache's primary endpoint or a Kubernetes Service is moved to the new primary.
    Served by threads, so a gateway's synchronous start check can reach it too."""

    def __init__(self, port: int) -> None:
        self.port = port  # the server new connections reach
        address = self

        class Forward(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                with socket.create_connection(("127.0.0.1", address.port)) as upstream:
                    back = threading.Thread(target=_pipe, args=(upstream, self.request))
                    back.start()
                    _pipe(self.request, upstream)
                    back.join()

        self._server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Forward)
        self._server.daemon_threads = True
        self.url = f"redis://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> MovingAddress:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._server.shutdown()
        self._server.server_close()


def _pipe(source: socket.socket, sink: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while data := source.recv(65536):
            sink.sendall(data)
    with contextlib.suppress(OSError):
        sink.shutdown(socket.SHUT_WR)


def standby_of(primary: RedisServer, directory: Path) -> RedisServer:
    """A replica of `primary`, started and in sync: the one a failover promotes."""
    standby = RedisServer(directory)
    standby.start()
    client = redis.Redis(port=standby.port, decode_responses=True)
    try:
        with redis.Redis(port=primary.port) as source:  # sync now, not after 5 s
            source.config_set("repl-diskless-sync-delay", 0)
        client.execute_command("REPLICAOF", "127.0.0.1", primary.port)
        deadline = time.monotonic() + START_SECONDS
        while client.info("replication").get("master_link_status") != "up":
            if time.monotonic() > deadline:
                raise RuntimeError(f"the replica on port {standby.port} did not sync")
            time.sleep(0.02)
    finally:
        client.close()
    return standby


@contextlib.contextmanager
def failed_over(old: RedisServer, new: RedisServer, address: MovingAddress) -> Iterator[None]:
    """A failover: `new` (a `standby_of` `old`) promoted once it has every write, `old` made
    its replica (it keeps its clients' connections and answers their writes READONLY), and
    `address` moved to `new`."""
    demoted, promoted = redis.Redis(port=old.port), redis.Redis(port=new.port)
    try:
        assert demoted.execute_command("WAIT", 1, 5000) == 1, "the standby is behind"
        promoted.execute_command("REPLICAOF", "NO", "ONE")
        demoted.execute_command("REPLICAOF", "127.0.0.1", new.port)
        address.port = new.port
        yield
    finally:
        demoted.close()
        promoted.close()
