"""The gateway as a process: --help, refusals to start, and the drain on SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import time
from pathlib import Path

import aiohttp
import pytest

from proxy.record import GRACE_OVER
from proxy.settings import SETTINGS
from tests.conftest import OPENAI_VK, auth
from tests.support.bodies import CHAT
from tests.support.polling import until
from tests.support.processes import (
    Processes,
    free_port,
    gateway_command,
    listening_sockets,
    refused,
    start_gateway,
)


def test_help_lists_every_setting_as_a_flag() -> None:
    result = refused({}, "--help")
    assert result.returncode == 0
    for setting in SETTINGS:
        assert setting.flag in result.stdout and setting.variable in result.stdout


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("keys", "env", "says"),
    [
        ("{ nope", {}, "not valid JSON"),
        (
            '{"virtual_keys": {"vk_abc_123456789": {"provider": "nowhere", "api_key": "x", "name": "bob"}}}',
            {},
            "key 'bob': provider 'nowhere'",
        ),
        (
            '{"virtual_keys": {"vk_abc_123456789": {"provider": "openai", "name": "bob"}}}',
            {},
            "key 'bob': set exactly one of api_key and api_key_env",
        ),
        (
            '{"virtual_keys": {"vk_abc_123456789": {"provider": "openai", "name": "bob", "api_key": "a", "api_key_env": "B"}}}',
            {},
            "key 'bob': set exactly one",
        ),
        (
            '{"virtual_keys": {"vk_abc_123456789": {"provider": "openai", "name": "bob", "api_key_env": "UNSET_KEY_VAR_X"}}}',
            {},
            "key 'bob': api_key_env UNSET_KEY_VAR_X is not set",
        ),
        (
            '{"virtual_keys": {}}',
            {"QUOTA_LIMIT": "ten"},
            "QUOTA_LIMIT: must be a positive integer, got 'ten'",
        ),
        (
            '{"virtual_keys": {}}',
            {"CORS_ALLOWED_ORIGINS": "x"},
            "llm-gateway: CORS_ALLOWED_ORIGINS: 'x' is not an origin",
        ),
        ('{"virtual_keys": {}}', {"QUOTA_WINDOW_SECONDS": "-3"}, "QUOTA_WINDOW_SECONDS"),
    ],
)
def test_a_bad_start_is_one_line_naming_the_culprit_and_exit_2(
    tmp_path: Path, keys: str, env: dict[str, str], says: str
) -> None:
    path = _write(tmp_path / "keys.json", keys)
    result = refused({"KEYS_FILE_PATH": str(path), **env})
    assert result.returncode == 2
    assert says in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "Traceback" not in result.stderr


def test_a_missing_keys_file_says_how_to_create_one(tmp_path: Path) -> None:
    result = refused({"KEYS_FILE_PATH": str(tmp_path / "keys.json")})
    assert result.returncode == 2
    assert "keys.example.json" in result.stderr and str(tmp_path / "keys.json") in result.stderr


def test_an_unreadable_keys_file_is_refused(tmp_path: Path) -> None:
    result = refused({"KEYS_FILE_PATH": str(tmp_path)})  # a directory
    assert result.returncode == 2 and "is a directory, not a file" in result.stderr


def test_a_log_file_that_cannot_be_opened_stops_the_start(
    process_keys: Path, tmp_path: Path
) -> None:
    result = refused(
        {
            "KEYS_FILE_PATH": str(process_keys),
            "LOG_TO_FILE": "true",
            "LOG_FILE_PATH": str(tmp_path / "no" / "such" / "dir.jsonl"),
        }
    )
    assert (
        result.returncode == 2
        and "LOG_FILE_PATH" in result.stderr
        and "Traceback" not in result.stderr
    )


def test_a_redis_url_redis_py_refuses_is_one_line_without_its_password(
    process_keys: Path,
) -> None:
    # The URL's form is checked with the settings; its options by redis-py, at the start's
    # connection: this one stopped the start with redis-py's traceback and exit code 1.
    url = "redis://127.0.0.1:6379/0?db=abc&password=s3cret"
    result = refused({"KEYS_FILE_PATH": str(process_keys), "REDIS_URL": url})
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "REDIS_URL redis://127.0.0.1:6379/0?db=abc&password=***: Invalid value for 'db'" in (
        result.stderr
    )
    assert "s3cret" not in result.stderr


def test_a_port_in_use_names_the_port_and_the_setting(process_keys: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = refused(
            {
                "KEYS_FILE_PATH": str(process_keys),
                "SERVER_HOST": "127.0.0.1",
                "SERVER_PORT": str(port),
            }
        )
    assert result.returncode == 2
    assert (
        str(port) in result.stderr
        and "SERVER_PORT" in result.stderr
        and "Traceback" not in result.stderr
    )


def test_an_unresolvable_server_host_is_one_line_and_exit_2(process_keys: Path) -> None:
    result = refused({"KEYS_FILE_PATH": str(process_keys), "SERVER_HOST": "no-such-host.invalid"})
    assert result.returncode == 2
    # After the starting line (on stderr: stdout is the interaction log's), one line says why.
    starting, refusal = result.stderr.strip().splitlines()
    assert starting.startswith("llm-gateway starting: "), result.stderr
    assert refusal.startswith("llm-gateway: SERVER_HOST 'no-such-host.invalid' cannot")


def test_server_host_addresses_that_overlap_are_one_line_and_exit_2(process_keys: Path) -> None:
    # 0.0.0.0 takes 127.0.0.1 too: with uvloop (what requirements.txt installs) the second
    # listen failed without a word, and the start ended in a traceback (a None socket), exit 1.
    port = free_port()
    result = refused(
        {
            "KEYS_FILE_PATH": str(process_keys),
            "SERVER_HOST": "0.0.0.0,127.0.0.1",
            "SERVER_PORT": str(port),
        }
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    refusal = result.stderr.strip().splitlines()[-1]
    assert refusal.startswith(f"llm-gateway: cannot listen on 0.0.0.0,127.0.0.1:{port}: ")
    assert "overlap" in refusal


async def test_an_address_written_twice_in_server_host_is_listened_on_once(
    processes: Processes, process_keys: Path, tmp_path: Path
) -> None:
    # "127.0.0.1,127.0.0.1" ended in the same traceback with uvloop; asyncio listens once.
    process, url = start_gateway(
        processes, process_keys, tmp_path / "log.jsonl", SERVER_HOST="127.0.0.1, 127.0.0.1"
    )
    async with aiohttp.ClientSession() as session, session.get(f"{url}/health") as response:
        assert response.status == 200
    assert len(listening_sockets(int(url.rsplit(":", 1)[1]))) == 1


@pytest.mark.parametrize(
    ("flags", "says"),
    [
        (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
        (["--server-port"], "argument --server-port: expected one argument"),
    ],
)
def test_a_bad_flag_is_one_line_pointing_to_help(flags: list[str], says: str) -> None:
    result = refused({}, *flags)
    assert result.returncode == 2
    assert result.stderr == f"llm-gateway: {says} (see gateway.py --help)\n"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_a_signal_lets_in_flight_streams_finish_then_exits_0(
    processes: Processes, process_keys: Path, tmp_path: Path, signum: signal.Signals
) -> None:
    log = tmp_path / "log.jsonl"
    process, url = start_gateway(processes, process_keys, log, SHUTDOWN_GRACE_SECONDS="10")
    async with aiohttp.ClientSession() as session:
        response = await session.post(
            f"{url}/v1/chat/completions",
            json={**CHAT, "stream": True},
            headers={**auth(OPENAI_VK), "x-fake-chunks": "15", "x-fake-delay-ms": "100"},
        )
        first = await response.content.readany()
        process.send_signal(signum)
        port = int(url.rsplit(":", 1)[1])
        await until(lambda: not listening_sockets(port), what="the listener closing")
        with pytest.raises(aiohttp.ClientConnectionError):  # no new connections
            async with aiohttp.ClientSession() as fresh:
                await fresh.get(f"{url}/ready")
        rest = await response.read()
    assert (first + rest).endswith(b"data: [DONE]\n\n")
    out, _ = await asyncio.to_thread(process.communicate, None, 15)
    assert process.returncode == 0
    (line,) = [json.loads(text) for text in log.read_text().splitlines()]
    assert line["status"] == 200 and line["stream"] is True
    # The operator sees the drain begin, with what is in flight, and end.
    assert "llm-gateway draining: 1 request in flight, up to 10 s\n" in out
    assert out.endswith("llm-gateway stopped: every request finished\n")


async def idle_connection(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A client connection to the gateway on `port` that was answered once (GET /health) and
    is now idle, kept alive."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /health HTTP/1.1\r\nHost: gateway\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    await reader.readexactly(length)
    return reader, writer


async def test_an_upload_under_way_at_sigterm_is_read_and_answered_within_the_grace(
    processes: Processes, process_keys: Path, tmp_path: Path
) -> None:
    """aiohttp stops reading every connection when its shutdown begins: the rest of a body
    still on its way was dropped, and its request waited, unanswered, to be cut at the end
    of the grace (503)."""
    log = tmp_path / "log.jsonl"
    process, url = start_gateway(processes, process_keys, log, SHUTDOWN_GRACE_SECONDS="10")
    port = int(url.rsplit(":", 1)[1])
    idle_reader, idle_writer = await idle_connection(port)
    body = json.dumps(CHAT).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: gateway\r\n"
            + f"Authorization: Bearer {OPENAI_VK}\r\nContent-Length: {len(body)}\r\n".encode()
            + b"Content-Type: application/json\r\nExpect: 100-continue\r\n\r\n"
        )
        continued = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert continued == b"HTTP/1.1 100 Continue\r\n\r\n"  # the gateway reads the body
        process.send_signal(signal.SIGTERM)
        # The idle connection closed: the drain has begun, on every connection.
        assert await asyncio.wait_for(idle_reader.read(), 10) == b""
        writer.write(body)
        answer = await asyncio.wait_for(reader.read(), 15)  # the answer, then the close
    finally:
        writer.close()
        idle_writer.close()
    assert answer.startswith(b"HTTP/1.1 200 "), answer
    assert await asyncio.to_thread(process.wait, 15) == 0
    (line,) = [json.loads(text) for text in log.read_text().splitlines()]
    assert line["status"] == 200


@pytest.mark.parametrize(
    ("version", "asks", "says"),
    [("1.1", b"", b"\r\nconnection: close"), ("1.0", b"Connection: keep-alive\r\n", None)],
)
async def test_an_answer_begun_during_the_drain_says_its_connection_closes(
    processes: Processes,
    process_keys: Path,
    tmp_path: Path,
    version: str,
    asks: bytes,
    says: bytes | None,
) -> None:
    """A proxy in front keeps its connections to the gateway (nginx's upstream keepalive, an
    ALB, Envoy): an answer that began once the drain had, on a connection the gateway closes
    right after it, said nothing of the close, so the proxy could send its next request on
    that connection as it closed, and answer that request 502."""
    log = tmp_path / "log.jsonl"
    process, url = start_gateway(processes, process_keys, log, SHUTDOWN_GRACE_SECONDS="10")
    port = int(url.rsplit(":", 1)[1])
    idle_reader, idle_writer = await idle_connection(port)
    body = json.dumps(CHAT).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(
            f"POST /v1/chat/completions HTTP/{version}\r\nHost: gateway\r\n".encode()
            + f"Authorization: Bearer {OPENAI_VK}\r\nContent-Length: {len(body)}\r\n".encode()
            + b"Content-Type: application/json\r\nx-fake-think-ms: 1500\r\n"
            + asks
            + b"\r\n"
            + body
        )
        async with aiohttp.ClientSession() as session:

            async def in_flight() -> bool:
                metrics = await (await session.get(f"{url}/metrics")).text()
                return "\nllm_gateway_requests_in_flight 1.0\n" in metrics

            await until(in_flight, what="the request in flight")  # its head was read
        process.send_signal(signal.SIGTERM)
        # The idle connection closed: the drain has begun, before the answer's head.
        assert await asyncio.wait_for(idle_reader.read(), 10) == b""
        answer = await asyncio.wait_for(reader.read(), 15)  # the answer, then the close
    finally:
        writer.close()
        idle_writer.close()
    answer_head = answer.partition(b"\r\n\r\n")[0].lower()
    assert answer_head.startswith(f"http/{version} 200 ".encode()), answer
    if says is not None:
        assert says in answer_head, answer_head
    assert b"keep-alive" not in answer_head  # HTTP/1.0: no keep-alive is the close
    assert await asyncio.to_thread(process.wait, 15) == 0


async def test_the_grace_period_ends_streams_that_outlast_it(
    processes: Processes, process_keys: Path, tmp_path: Path
) -> None:
    log = tmp_path / "log.jsonl"
    process, url = start_gateway(processes, process_keys, log, SHUTDOWN_GRACE_SECONDS="0.5")
    async with aiohttp.ClientSession() as session:
        response = await session.post(
            f"{url}/v1/chat/completions",
            json={**CHAT, "stream": True},
            headers={**auth(OPENAI_VK), "x-fake-chunks": "100", "x-fake-delay-ms": "100"},
        )
        await response.content.readany()
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(process.wait, 15) == 0
        assert time.monotonic() - started < 5
    assert len(log.read_text().splitlines()) == 1


async def test_a_stream_cut_at_the_grace_is_cut_for_an_http_1_0_client_not_ended(
    processes: Processes, process_keys: Path, tmp_path: Path
) -> None:
    """Over HTTP/1.0 (nginx's default towards its upstreams) a close ends a body of unknown
    length: a stream cut when the shutdown grace ran out (a rollout, with a long
    generation under way) read as whole. It ends with a reset, as a broken one does."""
    log = tmp_path / "log.jsonl"
    process, url = start_gateway(processes, process_keys, log, SHUTDOWN_GRACE_SECONDS="1")
    port = int(url.rsplit(":", 1)[1])
    body = json.dumps({**CHAT, "stream": True}).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    received = b""
    try:
        writer.write(
            b"POST /v1/chat/completions HTTP/1.0\r\nHost: gateway\r\n"
            + f"Authorization: Bearer {OPENAI_VK}\r\nContent-Length: {len(body)}\r\n".encode()
            + b"Content-Type: application/json\r\nx-fake-hang: midstream\r\n\r\n"
            + body
        )
        received = await asyncio.wait_for(reader.read(65536), 10)  # under way
        process.send_signal(signal.SIGTERM)
        with pytest.raises(ConnectionResetError):
            async with asyncio.timeout(10):
                while chunk := await reader.read(65536):
                    received += chunk
    finally:
        writer.close()
    assert received.startswith(b"HTTP/1.0 200"), received[:40]
    assert await asyncio.to_thread(process.wait, 15) == 0


async def test_streams_that_never_end_are_cut_at_the_grace_and_each_is_logged(
    processes: Processes, process_keys: Path, tmp_path: Path
) -> None:
    log = tmp_path / "log.jsonl"
    grace = 4.0
    process, url = start_gateway(
        processes, process_keys, log, SHUTDOWN_GRACE_SECONDS=f"{grace:g}", QUOTA_ENABLED="false"
    )
    async with aiohttp.ClientSession() as session:
        streams = [
            await session.post(
                f"{url}/v1/chat/completions",
                json={**CHAT, "stream": True},
                headers={**auth(OPENAI_VK), "x-fake-hang": "midstream", "x-request-id": f"s-{n}"},
            )
            for n in range(3)
        ]
        for stream in streams:
            await stream.content.readany()  # each is under way
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        out, _ = await asyncio.to_thread(process.communicate, None, 30)
        elapsed = time.monotonic() - started
    assert process.returncode == 0
    assert elapsed < grace + 1.0, f"took {elapsed:.1f} s for a grace of {grace:g} s"
    lines = [json.loads(text) for text in log.read_text().splitlines()]
    assert sorted(line["request_id"] for line in lines) == ["s-0", "s-1", "s-2"]
    # The gateway's own cut, not a client that left (499).
    assert {(line["status"], line["error"]) for line in lines} == {(503, GRACE_OVER)}
    assert "draining: 3 requests in flight" in out
    assert "stopped: 3 requests cut at the end of the grace period" in out


async def test_sighup_kills_neither_the_process_nor_its_streams(
    processes: Processes, process_keys: Path, tmp_path: Path
) -> None:
    log = tmp_path / "log.jsonl"
    process, url = start_gateway(processes, process_keys, log, QUOTA_ENABLED="false")
    async with aiohttp.ClientSession() as session:
        response = await session.post(
            f"{url}/v1/chat/completions",
            json={**CHAT, "stream": True},
            headers={**auth(OPENAI_VK), "x-fake-chunks": "10", "x-fake-delay-ms": "100"},
        )
        first = await response.content.readany()
        process.send_signal(signal.SIGHUP)
        rest = await response.read()
        assert (first + rest).endswith(b"data: [DONE]\n\n")
        async with session.post(
            f"{url}/v1/chat/completions", json=CHAT, headers=auth(OPENAI_VK)
        ) as after:
            assert after.status == 200
    assert process.poll() is None
    process.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(process.wait, 15) == 0
    assert [json.loads(text)["status"] for text in log.read_text().splitlines()] == [200, 200]


async def test_after_sigterm_every_finished_request_has_its_log_line(
    processes: Processes, process_keys: Path, tmp_path: Path
) -> None:
    log = tmp_path / "log.jsonl"
    process, url = start_gateway(processes, process_keys, log, QUOTA_LIMIT="100000")
    async with aiohttp.ClientSession() as session:
        semaphore = asyncio.Semaphore(50)

        async def one(index: int) -> int:
            async with semaphore:
                async with session.post(
                    f"{url}/v1/chat/completions",
                    json=CHAT,
                    headers={**auth(OPENAI_VK), "x-request-id": f"bulk-{index}"},
                ) as response:
                    await response.read()
                    return response.status

        statuses = await asyncio.gather(*(one(index) for index in range(500)))
    assert statuses == [200] * 500
    process.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(process.wait, 15) == 0
    lines = [json.loads(text) for text in log.read_text().splitlines()]
    assert len(lines) == 500
    assert {line["request_id"] for line in lines} == {f"bulk-{index}" for index in range(500)}


async def test_the_log_goes_to_stdout_by_default(
    processes: Processes, process_keys: Path, tmp_path: Path
) -> None:
    process, url = start_gateway(
        processes, process_keys, tmp_path / "unused.jsonl", LOG_TO_FILE="false"
    )
    async with aiohttp.ClientSession() as session:
        async with session.post(
            f"{url}/v1/chat/completions",
            json=CHAT,
            headers={**auth(OPENAI_VK), "x-request-id": "to-stdout"},
        ) as response:
            assert response.status == 200
    process.send_signal(signal.SIGTERM)
    out, err = await asyncio.to_thread(process.communicate, None, 15)
    # stdout is the log's alone (`| jq` reads every line); the status lines are on stderr.
    lines = [json.loads(text) for text in out.splitlines()]
    assert [line["request_id"] for line in lines] == ["to-stdout"]
    assert "llm-gateway stopped: every request finished" in err
    assert not (tmp_path / "unused.jsonl").exists()


def cpu_seconds(pid: int) -> float:
    """The CPU time process `pid` has used (Linux: /proc/<pid>/stat's utime and stime)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def test_sighup_during_the_start_kills_nothing(
    processes: Processes, process_keys: Path, tmp_path: Path
) -> None:
    port = free_port()
    process = processes.start(
        gateway_command(),
        env={
            "KEYS_FILE_PATH": str(process_keys),
            "SERVER_HOST": "127.0.0.1",
            "SERVER_PORT": str(port),
            "LOG_FILE_PATH": str(tmp_path / "log.jsonl"),
            "LOG_TO_FILE": "true",
        },
    )
    started = time.monotonic()
    # The interpreter starts in about 20 ms of CPU, before any line of the gateway runs; its
    # imports then take most of a second. From 150 ms on, SIGHUP must be harmless: 150 ms of
    # the process's own CPU time, which a loaded machine does not stretch (its wall clock
    # reached 150 ms before the interpreter had started, 1 run in 5 at load 8).
    while cpu_seconds(process.pid) < 0.15:
        assert process.poll() is None, f"exit {process.returncode} before any SIGHUP"
        assert time.monotonic() - started < 20, "never used 150 ms of CPU"
        time.sleep(0.001)
    hups = 0
    while time.monotonic() - started < 0.5 or not listening_sockets(port):
        process.send_signal(signal.SIGHUP)
        hups += 1
        assert process.poll() is None, f"exit {process.returncode} after {hups} SIGHUPs"
        assert time.monotonic() - started < 20, "never listened"
        time.sleep(0.01)
    async with aiohttp.ClientSession() as session:
        async with session.post(
            f"http://127.0.0.1:{port}/v1/chat/completions", json=CHAT, headers=auth(OPENAI_VK)
        ) as response:
            assert response.status == 200
    assert process.poll() is None
