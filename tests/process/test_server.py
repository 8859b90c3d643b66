"""One gateway process against hostile clients: header limits, the head deadline, MAX_CONNECTIONS."""

from __future__ import annotations

import asyncio
import json
import os
import re
import resource
import signal
import time
from pathlib import Path

import aiohttp
import pytest

from proxy.keys.hashed import hashed
from tests.app.test_bad_input import malformed_http
from tests.conftest import ANTHROPIC_VK, OPENAI_VK, assert_anthropic_error, auth, keys_document
from tests.support.bodies import CHAT
from tests.support.processes import Processes, free_port, gateway_command, start_gateway

HEAD = b"POST /v1/chat/completions HTTP/1.1\r\nHost: gateway\r\n"
REFUSAL_STATUS = {
    "invalid_http": 400,
    "request_head_too_large": 431,
    "invalid_path": 400,
    "missing_field": 400,
    "invalid_body": 400,
}


async def _answer_or_close(reader: asyncio.StreamReader, timeout: float) -> bytes:
    """The first bytes the gateway sends back; b"" when it closed without a word."""
    try:
        return await asyncio.wait_for(reader.read(64), timeout)
    except ConnectionError:  # reset, or a broken pipe: closed while we were still sending
        return b""


async def test_a_header_larger_than_an_sdk_sends_is_refused_at_once(
    processes: Processes, process_keys: Path, tmp_path: Path
) -> None:
    _, url = start_gateway(processes, process_keys, tmp_path / "log.jsonl")
    port = int(url.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(HEAD + b"x-pad: " + b"a" * 20_000 + b"\r\n")
    assert (await _answer_or_close(reader, 10)).startswith(b"HTTP/1.0 431")
    writer.close()
    # Nor may a head hold more headers than an SDK sends.
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(HEAD + b"".join(b"x-pad-%d: a\r\n" % index for index in range(100)) + b"\r\n")
    assert (await _answer_or_close(reader, 10)).startswith(b"HTTP/1.0 431")
    writer.close()


async def test_a_head_that_trickles_in_is_cut_at_client_header_timeout(
    processes: Processes, process_keys: Path, tmp_path: Path
) -> None:
    _, url = start_gateway(
        processes, process_keys, tmp_path / "log.jsonl", CLIENT_HEADER_TIMEOUT="1"
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", int(url.rsplit(":", 1)[1]))
    writer.write(HEAD)
    started = time.monotonic()
    answer = asyncio.ensure_future(_answer_or_close(reader, 20))
    index = 0
    while not answer.done() and time.monotonic() - started < 20:
        writer.write(b"x-slow-%d: a\r\n" % index)  # a header every 100 ms, never the end
        index += 1
        await asyncio.wait({answer}, timeout=0.1)
    assert await answer == b"", "the gateway never closed the connection"
    assert time.monotonic() - started < 10  # 1 s, and much room for a loaded machine
    writer.close()


async def test_past_max_connections_a_connection_gets_503_and_a_freed_slot_serves_again(
    processes: Processes, process_keys: Path, tmp_path: Path
) -> None:
    _, url = start_gateway(processes, process_keys, tmp_path / "log.jsonl", MAX_CONNECTIONS="3")
    port = int(url.rsplit(":", 1)[1])
    holders = [await asyncio.open_connection("127.0.0.1", port) for _ in range(3)]
    for _, writer in holders:
        writer.write(HEAD)  # a head begun, never finished
    async with aiohttp.ClientSession() as session:
        async with session.post(
            f"{url}/v1/chat/completions", json=CHAT, headers=auth(OPENAI_VK)
        ) as response:
            assert response.status == 503
            assert response.headers["Retry-After"] == "1"
            assert (await response.json())["error"]["code"] == "too_many_connections"
            # SPEC: every response carries x-request-id; this 503 was the one without
            # (the /health answered past the cap had one), so nothing tied it to a log search.
            assert re.fullmatch("[0-9a-f]{32}", response.headers.get("x-request-id", ""))
            assert response.headers["request-id"] == response.headers["x-request-id"]
    for _, writer in holders:
        writer.close()
    deadline, refusals = time.monotonic() + 10, 1
    while True:  # the gateway notices the closed connections a moment later
        async with aiohttp.ClientSession() as session:
            async with session.post(
                f"{url}/v1/chat/completions", json=CHAT, headers=auth(OPENAI_VK)
            ) as response:
                if response.status == 200:
                    break
                refusals += 1
        assert time.monotonic() < deadline, "no slot came free"
        await asyncio.sleep(0.05)
    # Each 503 is counted, so the cap's saturation shows on a dashboard.
    assert await refused_connections(url, "max_connections") == refusals


async def test_past_max_connections_a_liveness_probe_of_health_is_still_answered(
    processes: Processes, process_keys: Path, tmp_path: Path
) -> None:
    """A pod full of streams (MAX_CONNECTIONS, none idle) answered the kubelet's liveness
    probe (`GET /health`, deploy/kubernetes) 503 as any connection past the cap: three in a
    row, and the kubelet restarted the busiest pod, cutting every stream it held. /health is
    answered past the cap; /ready and everything else still get the 503 (a full pod is not
    ready: the Service sends new work elsewhere)."""
    _, url = start_gateway(processes, process_keys, tmp_path / "log.jsonl", MAX_CONNECTIONS="3")
    port = int(url.rsplit(":", 1)[1])
    holders = [await asyncio.open_connection("127.0.0.1", port) for _ in range(3)]
    for _, writer in holders:
        writer.write(HEAD)  # a head begun, never finished: no connection idle
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{url}/health") as response:
            assert response.status == 200
            assert (await response.json())["status"] in ("healthy", "degraded")
            assert response.headers["x-request-id"]
        async with session.get(f"{url}/ready") as response:
            assert response.status == 503
            assert (await response.json())["error"]["code"] == "too_many_connections"
    for _, writer in holders:
        writer.close()
    # The /ready refused is counted, and each /metrics refused while the gateway has yet to
    # notice the closed connections; the /health answered is not.
    refusals, deadline = 1, time.monotonic() + 10
    while (counted := await refused_connections(url, "max_connections")) is None:
        refusals += 1
        assert time.monotonic() < deadline, "no slot came free"
        await asyncio.sleep(0.05)
    assert counted == refusals


async def refused_connections(url: str, reason: str) -> float | None:
    """llm_gateway_connections_refused_total{reason} as /metrics says it; None while the
    metrics themselves are refused (the gateway has yet to notice connections closed)."""
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{url}/metrics") as response:
            if response.status != 200:
                return None
            text = await response.text()
    sample = f'llm_gateway_connections_refused_total{{reason="{reason}"}} '
    return next(float(line.split()[-1]) for line in text.splitlines() if line.startswith(sample))


async def test_at_max_connections_a_new_one_takes_the_place_of_an_idle_keep_alive_one(
    processes: Processes, process_keys: Path, tmp_path: Path
) -> None:
    # SDK clients keep their connections alive between calls: a gateway full of idle ones
    # answered every new client 503 for CLIENT_HEADER_TIMEOUT (30 s), as nginx does not.
    _, url = start_gateway(processes, process_keys, tmp_path / "log.jsonl", MAX_CONNECTIONS="3")
    port = int(url.rsplit(":", 1)[1])
    request = b"GET /health HTTP/1.1\r\nHost: gateway\r\n\r\n"
    idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(3)]
    for reader, writer in idle:  # one answer each, then kept alive, silent
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
        await reader.readexactly(length)
    async with aiohttp.ClientSession() as session:
        async with session.post(
            f"{url}/v1/chat/completions", json=CHAT, headers=auth(OPENAI_VK)
        ) as response:
            assert response.status == 200
    # The one whose place it took is closed, unanswered; the others stay.
    reads = [asyncio.ensure_future(_answer_or_close(reader, 10)) for reader, _ in idle]
    done, waiting = await asyncio.wait(reads, return_when=asyncio.FIRST_COMPLETED)
    assert [read.result() for read in done] == [b""] and len(waiting) == 2
    for read in waiting:
        read.cancel()
    for _, writer in idle:
        writer.close()


async def test_dribbling_connections_are_cut_or_refused_while_a_normal_request_answers(
    processes: Processes, process_keys: Path, tmp_path: Path
) -> None:
    _, url = start_gateway(
        processes,
        process_keys,
        tmp_path / "log.jsonl",
        MAX_CONNECTIONS="60",
        CLIENT_HEADER_TIMEOUT="2",
        QUOTA_ENABLED="false",
    )
    port = int(url.rsplit(":", 1)[1])

    async def dribble(field_bytes: int) -> tuple[int, bytes]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(HEAD)
        answer = asyncio.ensure_future(_answer_or_close(reader, 30))
        for index in range(30):  # as many headers as the gateway takes, then silence
            writer.write(b"x-pad-%d: " % index + b"a" * field_bytes + b"\r\n")
            done, _ = await asyncio.wait({answer}, timeout=0.05)
            if done:
                break
        first = await answer
        writer.close()
        return field_bytes, first[:12]

    # Half send fields of 64 KiB (which today's aiohttp limit took), half fields that fit.
    attack = asyncio.gather(*(dribble(65_000 if n % 2 else 3_000) for n in range(120)))
    latencies = []
    async with aiohttp.ClientSession() as session:
        while not attack.done():
            started = time.monotonic()
            async with session.post(
                f"{url}/v1/chat/completions", json=CHAT, headers=auth(OPENAI_VK)
            ) as response:
                assert response.status == 200
            latencies.append(time.monotonic() - started)
            await asyncio.wait({attack}, timeout=0.1)
    fates = await attack
    oversized = {fate for field_bytes, fate in fates if field_bytes == 65_000}
    fitting = [fate for field_bytes, fate in fates if field_bytes == 3_000]
    # Refused at once; a client still sending may see the close before it reads the 431.
    assert oversized <= {b"HTTP/1.0 431", b"HTTP/1.1 503", b""} and b"HTTP/1.0 431" in oversized
    assert set(fitting) <= {b"", b"HTTP/1.1 503"}, set(fitting)  # cut by the deadline, or refused
    assert b"" in fitting
    assert latencies and max(latencies) < 2.0, latencies  # generous: the machine is shared


def client_sockets(pid: int, port: int) -> int:
    """How many sockets `pid` holds to clients of `port` (its listening socket excluded)."""
    inodes = set()
    for row in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = row.split()
        if fields[1].endswith(f":{port:04X}") and fields[3] != "0A":  # 0A: LISTEN
            inodes.add(f"socket:[{fields[9]}]")
    held = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            held += os.readlink(f"/proc/{pid}/fd/{fd}") in inodes
        except FileNotFoundError:
            pass  # closed meanwhile
    return held


async def test_max_connections_bounds_the_sockets_held_and_the_rest_are_closed_at_once(
    processes: Processes, process_keys: Path, tmp_path: Path
) -> None:
    process, url = start_gateway(
        processes, process_keys, tmp_path / "log.jsonl", MAX_CONNECTIONS="10"
    )
    port = int(url.rsplit(":", 1)[1])
    held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(10)]
    deadline = time.monotonic() + 10
    while client_sockets(process.pid, port) < 10:
        assert time.monotonic() < deadline, "the gateway never took the first 10 connections"
        await asyncio.sleep(0.02)
    extra = [await asyncio.open_connection("127.0.0.1", port) for _ in range(30)]
    answers = await asyncio.gather(*(_answer_or_close(reader, 10) for reader, _ in extra))
    # Each of the 30 was answered and closed: the gateway holds none of them.
    assert all(answer.startswith(b"HTTP/1.1 503") for answer in answers), set(answers)
    assert client_sockets(process.pid, port) == 10
    for _, writer in held + extra:
        writer.close()


@pytest.mark.parametrize(
    "sent",
    [
        b"hello there\r\n\r\n",  # not HTTP at all
        b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03",  # TLS on the plain port
        b"GET /health HTTP/1.1\r\nHost: x\r\nbad header\r\n\r\n",
        b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n",
    ],
)
async def test_no_answer_names_a_version_in_its_server_header(
    processes: Processes, process_keys: Path, tmp_path: Path, sent: bytes
) -> None:
    _, url = start_gateway(processes, process_keys, tmp_path / "log.jsonl")
    reader, writer = await asyncio.open_connection("127.0.0.1", int(url.rsplit(":", 1)[1]))
    writer.write(sent)
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    writer.close()
    servers = [line for line in head.split(b"\r\n") if line.lower().startswith(b"server:")]
    assert servers == [b"Server: llm-gateway"], head


async def _whole_answer(port: int, data: bytes) -> bytes:
    """The gateway's answer to `data`, head and body (by its Content-Length); b"" when it
    closed without one."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        length = next(
            int(line.split(b":", 1)[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        return head + await asyncio.wait_for(reader.readexactly(length), 10)
    except (ConnectionError, asyncio.IncompleteReadError):
        return b""
    finally:
        writer.close()


async def test_http_the_parser_refuses_gets_a_json_error_that_quotes_no_byte_of_it(
    processes: Processes, process_keys: Path, tmp_path: Path
) -> None:
    """aiohttp's own answer is text that quotes the line it refused, a header carrying the
    virtual key included: the gateway's is its JSON error (OpenAI's dialect, which both SDKs
    raise by status), with a request id, and no part of what was sent."""
    _, url = start_gateway(processes, process_keys, tmp_path / "log.jsonl")
    port = int(url.rsplit(":", 1)[1])
    key = OPENAI_VK.encode()
    cases = [
        *malformed_http(),
        ("a key before a space and a colon", HEAD + b"x-api-key : " + key + b"\r\n\r\n"),
        ("a key in a header too long", HEAD + b"Authorization: Bearer " + key + b"a" * 5000),
        ("a key in a bad value", HEAD + b"x-api-key: " + key + b"\x01\r\n\r\n"),
        # aiohttp refuses an absolute target without a host with the target as its message
        ("a key in a hostless target", b"GET http:///v1/models?key=" + key + b" HTTP/1.1\r\n\r\n"),
        ("a key as a target's user", b"GET http://" + key + b"@/v1/models HTTP/1.1\r\n\r\n"),
    ]
    problems = []
    for label, data in cases:
        answer = await _whole_answer(port, data)
        if not answer:
            continue  # closing at once is a fair answer to bytes that are not HTTP
        head, _, body = answer.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        if key in answer or b"aaaa" in answer:
            problems.append(f"{label}: the answer quotes the request: {answer[:300]!r}")
        if b"x-request-id: " not in head.lower() or b"application/json" not in head.lower():
            problems.append(f"{label}: {head!r}")
        try:
            error = json.loads(body)["error"]
        except (ValueError, KeyError, TypeError):
            problems.append(f"{label}: not the gateway's error: {body[:200]!r}")
            continue
        # The parser's refusals, and what the relay refuses in the rest (valid HTTP)
        if REFUSAL_STATUS.get(error["code"]) != status or error["type"] != "invalid_request_error":
            problems.append(f"{label}: {status} {error}")
    assert not problems, "\n".join(problems)


async def test_credentials_whose_bytes_are_not_utf8_are_wrong_ones_not_a_crash(
    processes: Processes, fake_url: str, tmp_path: Path
) -> None:
    """aiohttp hands such bytes over as lone surrogates, which str.encode() refused: the
    METRICS_TOKEN and ADMIN_TOKEN checks, a keys file holding a digest (as every key the
    admin API makes), and a prefix the lockout had locked all answered 500 with a traceback."""
    document = keys_document(fake_url)
    document["virtual_keys"][hashed("vk_" + "h" * 30)] = {"provider": "openai", "api_key": "sk-h"}
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps(document))
    process, url = start_gateway(
        processes,
        keys,
        tmp_path / "log.jsonl",
        METRICS_TOKEN="metrics-token-0123456789",
        ADMIN_TOKEN="admin-token-0123456789",
        AUTH_FAILURE_LIMIT="2",
    )
    port = int(url.rsplit(":", 1)[1])
    body = json.dumps(CHAT).encode()

    async def status(method: bytes, path: bytes, credential: bytes) -> int:
        answer = await _whole_answer(
            port,
            method + b" " + path + b" HTTP/1.1\r\nHost: gateway\r\n"
            b"Authorization: Bearer " + credential + b"\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body,
        )
        return int(answer.split(b" ", 2)[1])

    assert await status(b"GET", b"/metrics", b"metrics-\xfftoken") == 401
    assert await status(b"GET", b"/admin/keys", b"admin-\xfftoken") == 401
    guesses = [b"vk_\xffguessguess%d" % n for n in range(3)]
    statuses = [await status(b"POST", b"/v1/chat/completions", guess) for guess in guesses]
    assert statuses == [401, 401, 429]  # the third: its prefix is locked
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=10)
    assert process.returncode == 0 and "Traceback" not in stderr, stderr[-2000:]


async def test_a_chunked_upload_that_breaks_after_its_head_gets_400_not_silence(
    processes: Processes, process_keys: Path, tmp_path: Path
) -> None:
    """A broken chunk that comes after the head, once the gateway reads the body: aiohttp's
    C parser refused it but never told the body's reader, so the request hung, unanswered,
    until the client left, and was logged as the client's leaving (499)."""
    log = tmp_path / "log.jsonl"
    process, url = start_gateway(processes, process_keys, log)
    reader, writer = await asyncio.open_connection("127.0.0.1", int(url.rsplit(":", 1)[1]))
    try:
        writer.write(
            b"POST /v1/messages HTTP/1.1\r\nHost: gateway\r\n"
            + f"x-api-key: {ANTHROPIC_VK}\r\n".encode()
            + b"x-request-id: broken-chunk\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\nExpect: 100-continue\r\n\r\n"
        )
        # 100 Continue: the gateway now reads the body
        assert await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10) == (
            b"HTTP/1.1 100 Continue\r\n\r\n"
        )
        writer.write(b'5\r\n{"mod\r\nzz\r\nabc\r\n0\r\n\r\n')
        answer = await asyncio.wait_for(reader.read(), 10)  # all of it: then the close
    finally:
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 "), answer
    assert_anthropic_error(json.loads(body), "invalid_request_error")
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=10)
    assert process.returncode == 0 and "Traceback" not in stderr, stderr[-2000:]
    (line,) = [json.loads(text) for text in log.read_text().splitlines()]
    assert (line["request_id"], line["status"]) == ("broken-chunk", 400)
    assert "could not be read" in line["error"]


async def test_a_low_soft_open_files_limit_does_not_cut_concurrent_streams(
    processes: Processes, process_keys: Path, tmp_path: Path
) -> None:
    # A terminal's soft limit on open files (256 on macOS, 1024 on many Linux desktops) is
    # below what MAX_CONNECTIONS' default needs (a client and a provider socket per stream);
    # the hard limit seldom is. Under 64, streams past about 30 got 502 or a reset.
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1024:
        pytest.skip(f"the hard limit on open files here is {hard}")
    port = free_port()
    processes.start(
        ["bash", "-c", 'ulimit -Sn 64 && exec "$@"', "bash", *gateway_command()],
        env={
            "KEYS_FILE_PATH": str(process_keys),
            "SERVER_HOST": "127.0.0.1",
            "SERVER_PORT": str(port),
            "LOG_TO_FILE": "true",
            "LOG_FILE_PATH": str(tmp_path / "log.jsonl"),
            "QUOTA_LIMIT": "1000",
        },
        ready="listening on",
    )
    streamed = {**CHAT, "stream": True}
    # The fake's events 200 ms apart: every stream is open while the others start.
    headers = {**auth(OPENAI_VK), "x-fake-delay-ms": "200", "x-fake-chunks": "3"}

    async def one(session: aiohttp.ClientSession) -> int | str:
        try:
            async with session.post(
                f"http://127.0.0.1:{port}/v1/chat/completions", json=streamed, headers=headers
            ) as response:
                await response.read()
                return response.status
        except aiohttp.ClientError as error:
            return type(error).__name__

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        answers = await asyncio.gather(*(one(session) for _ in range(100)))
    assert answers == [200] * 100, sorted(map(str, answers))


async def test_server_host_takes_several_addresses_for_ipv4_and_ipv6(
    processes: Processes, process_keys: Path, tmp_path: Path
) -> None:
    # `::` alone listens on IPv6 only (asyncio sets IPV6_V6ONLY): a dual-stack cluster's
    # IPv4 clients were refused. A comma-separated list listens on each address.
    _, base = start_gateway(
        processes, process_keys, tmp_path / "log.jsonl", SERVER_HOST="127.0.0.1, ::1"
    )
    port = base.rsplit(":", 1)[1]
    async with aiohttp.ClientSession() as session:
        for base in (f"http://127.0.0.1:{port}", f"http://[::1]:{port}"):
            async with session.get(f"{base}/health") as response:
                assert response.status == 200, base
