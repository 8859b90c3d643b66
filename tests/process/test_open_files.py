"""A real gateway process at its limit on open files: the fault is named as the gateway's own."""

from __future__ import annotations

import http.client
import json
import os
import resource
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.conftest import OPENAI_VK, auth
from tests.support.bodies import CHAT
from tests.support.polling import until
from tests.support.processes import Processes, gateway_command_on_asyncio, start_gateway

LIMIT = 64  # the gateway's own files take about 15 of them

pytestmark = pytest.mark.skipif(
    not Path("/proc/self/fd").is_dir(), reason="counts the gateway's descriptors in /proc"
)


def _open_files(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _limited() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (LIMIT, LIMIT))


@contextmanager
def _connections() -> Iterator[list[http.client.HTTPConnection]]:
    held: list[http.client.HTTPConnection] = []
    try:
        yield held
    finally:
        for connection in held:
            connection.close()


def _get(connection: http.client.HTTPConnection, path: str) -> tuple[int, dict]:
    connection.request("GET", path)
    response = connection.getresponse()
    return response.status, json.loads(response.read())


def _chat(connection: http.client.HTTPConnection) -> tuple[int, dict[str, str], dict]:
    connection.request(
        "POST",
        "/v1/chat/completions",
        body=json.dumps(CHAT),
        headers={**auth(OPENAI_VK), "Content-Type": "application/json"},
    )
    response = connection.getresponse()
    return response.status, dict(response.getheaders()), json.loads(response.read())


async def test_a_gateway_out_of_file_descriptors_says_so_and_does_not_blame_the_provider(
    processes: Processes, process_keys: Path, tmp_path: Path
) -> None:
    # At its limit on open files, the gateway's connection to the provider failed with EMFILE:
    # the client got 502 "Provider 'openai' at ...: could not connect (Too many open files)",
    # and the provider's breaker counted a failure (/health: its last_error; enough of them
    # opened it: the provider "unhealthy"), when the limit to raise was the operator's own.
    log = tmp_path / "log.jsonl"
    process, url = start_gateway(processes, process_keys, log, preexec_fn=_limited)
    host, port = url.removeprefix("http://").split(":")
    with _connections() as held:
        # Idle client connections, each one descriptor, until one is left (a new client
        # connection would take it, and be refused: the next test); a stream takes it for
        # its provider, and the next request has none for its own.
        while _open_files(process.pid) < LIMIT - 1:
            held.append(http.client.HTTPConnection(host, int(port), timeout=10))
            assert _get(held[-1], "/ready")[0] == 200
            assert len(held) < LIMIT, "the gateway's descriptors did not grow"
        streaming = held[1]
        streaming.request(
            "POST",
            "/v1/chat/completions",
            body=json.dumps({**CHAT, "stream": True}),
            headers={
                **auth(OPENAI_VK),
                "Content-Type": "application/json",
                "x-fake-hang": "midstream",
            },
        )
        assert streaming.getresponse().status == 200  # its provider's socket is open
        status, headers, body = _chat(held[2])
        assert status == 503, body
        assert headers["Retry-After"] == "1"
        error = body["error"]
        assert error["code"] == "too_many_open_files"
        assert error["type"] == "api_error"
        assert error["message"].startswith("The gateway is out of file descriptors")
        assert f"limit on open files, {LIMIT}," in error["message"]
        assert "could not connect" not in error["message"]

        _, report = _get(held[0], "/health")
        assert report["status"] == "degraded"
        openai = report["providers"]["openai"]
        assert openai["healthy"] is True and openai["last_error"] is None
        assert report["targets"]["openai"]["failures_in_a_row"] == 0
        open_files = report["open_files"]
        assert open_files["limit"] == LIMIT
        assert open_files["healthy"] is False
        assert open_files["last_error"].startswith("the gateway is out of file descriptors")

        for connection in held[1:11]:  # ten descriptors given back
            connection.close()
        await until(lambda: _open_files(process.pid) <= LIMIT - 10)
        _, report = _get(held[0], "/health")
        assert report["status"] == "healthy"
        assert report["open_files"]["healthy"] is True
        assert report["open_files"]["last_error"] == open_files["last_error"]  # still told
        assert _chat(held[0])[0] == 200

    await until(lambda: log.exists() and log.read_text().count("\n") == 3, what="three lines")
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    refused = [line for line in lines if line["status"] == 503]
    assert len(refused) == 1
    assert refused[0]["error"].startswith("the gateway is out of file descriptors")
    assert refused[0]["attempts"][0]["status"] is None


def _refused_or_ready(host: str, port: int) -> tuple[http.client.HTTPConnection, int, dict]:
    """A new client connection and the answer to its GET /ready."""
    connection = http.client.HTTPConnection(host, port, timeout=10)
    status, body = _get(connection, "/ready")
    return connection, status, body


def _refused_connections(metrics_text: str) -> float:
    for line in metrics_text.splitlines():
        if line.startswith('llm_gateway_connections_refused_total{reason="open_files"}'):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError("no llm_gateway_connections_refused_total{reason=open_files}")


async def test_a_connection_that_finds_no_file_descriptor_left_is_answered_503_counted_and_said_once(
    processes: Processes, process_keys: Path, tmp_path: Path
) -> None:
    # At its limit on open files, the event loop (libuv under uvloop) accepted each new client
    # connection and closed it at once: the client saw a reset or an empty answer, the
    # gateway said nothing and counted nothing. The connection that takes the process's last
    # descriptor is now answered 503 too_many_open_files and closed, which frees it for the
    # next; stderr says so once, /metrics counts each, and new connections are served again
    # once descriptors are free.
    process, url = start_gateway(
        processes, process_keys, tmp_path / "log.jsonl", preexec_fn=_limited
    )
    host, port = url.removeprefix("http://").split(":")
    with _connections() as held:
        while True:
            connection, status, body = _refused_or_ready(host, int(port))
            held.append(connection)
            if status != 200:
                break
            assert len(held) < LIMIT, "no connection was refused"
        assert status == 503, body
        error = body["error"]
        assert error["code"] == "too_many_open_files"
        assert error["type"] == "api_error"
        assert f"limit on open files, {LIMIT}," in error["message"]
        for _ in range(2):  # the freed descriptor is the next one's: refused again
            connection, status, body = _refused_or_ready(host, int(port))
            connection.close()
            assert status == 503 and body["error"]["code"] == "too_many_open_files"

        keeper = held[0]
        keeper.request("GET", "/metrics")
        assert _refused_connections(keeper.getresponse().read().decode()) == 3
        _, report = _get(keeper, "/health")
        assert report["status"] == "degraded"
        assert report["open_files"]["healthy"] is False
        assert "new client connection" in report["open_files"]["last_error"]

        for connection in held[1:11]:  # ten descriptors given back
            connection.close()
        await until(lambda: _open_files(process.pid) <= LIMIT - 10)
        connection, status, _ = _refused_or_ready(host, int(port))
        held.append(connection)
        assert status == 200
        _, report = _get(keeper, "/health")
        assert report["status"] == "healthy"

    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=10)
    said = [line for line in stderr.splitlines() if "out of file descriptors" in line]
    assert len(said) == 1, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]


async def test_on_asyncios_loop_an_accept_out_of_descriptors_is_said_once_and_resumes(
    processes: Processes, process_keys: Path, tmp_path: Path
) -> None:
    # Where uvloop is not installed, asyncio's loop runs the gateway: its accept, failing for
    # want of a descriptor (every one taken, the last by a provider's socket), logged a
    # traceback at each try, up to 1024 at once and thousands a second until one was free.
    # Now stderr says it once; the client's connection waits and is served once one is.
    process, url = start_gateway(
        processes,
        process_keys,
        tmp_path / "log.jsonl",
        preexec_fn=_limited,
        command=gateway_command_on_asyncio(),
    )
    assert process.stderr is not None
    said: list[str] = []
    reader = threading.Thread(target=lambda: said.extend(process.stderr), daemon=True)
    reader.start()
    host, port = url.removeprefix("http://").split(":")
    with _connections() as held:
        while _open_files(process.pid) < LIMIT - 1:  # one descriptor left
            held.append(http.client.HTTPConnection(host, int(port), timeout=10))
            assert _get(held[-1], "/ready")[0] == 200
            assert len(held) < LIMIT, "the gateway's descriptors did not grow"
        streaming = held[1]  # its provider's socket takes the last one
        streaming.request(
            "POST",
            "/v1/chat/completions",
            body=json.dumps({**CHAT, "stream": True}),
            headers={
                **auth(OPENAI_VK),
                "Content-Type": "application/json",
                "x-fake-hang": "midstream",
            },
        )
        assert streaming.getresponse().status == 200
        waiting = http.client.HTTPConnection(host, int(port), timeout=10)
        held.append(waiting)
        waiting.request("GET", "/ready")
        await until(
            lambda: any("out of file descriptors" in line for line in said), what="the warning"
        )
        streaming.close()  # its two descriptors given back
        response = waiting.getresponse()
        assert response.status == 200, response.read()

    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=10) == 0
    reader.join(timeout=10)
    warnings = [line for line in said if "out of file descriptors" in line]
    assert len(warnings) == 1, "".join(said)[-3000:]
    assert "new client connections wait to be accepted" in warnings[0]
    assert not [line for line in said if "socket.accept()" in line], "".join(said)[:3000]
    # Left as it is: asyncio's tries again, one per failed try in its loop over the listen
    # queue, still pending when SIGTERM closes the listener, each fail on its closed socket
    # (its ValueError's traceback, once each): CPython's, at shutdown only.
    errors = [line for line in said if " ERROR " in line]
    assert all("BaseSelectorEventLoop._start_serving" in line for line in errors), errors[:3]
