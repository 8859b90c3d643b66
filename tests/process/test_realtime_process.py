"""Realtime through a gateway process: a session relayed over a real socket, and SIGTERM closing
it with 1001 instead of holding the drain for the whole grace period, unless a turn is in
flight: that one is let finish first, within the grace."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import time
from pathlib import Path

import aiohttp
import pytest
from aiohttp import WSMsgType

from tests.app.test_realtime import PATH, next_data
from tests.conftest import OPENAI_VK, auth
from tests.support.processes import Processes, start_gateway


async def test_a_gateway_process_relays_a_session_and_closes_it_with_1001_on_sigterm(
    processes: Processes, process_keys: Path, tmp_path: Path
) -> None:
    process, url = start_gateway(
        processes, process_keys, tmp_path / "interactions.jsonl", SHUTDOWN_GRACE_SECONDS="20"
    )
    async with aiohttp.ClientSession() as session:
        ws = await session.ws_connect(
            f"{url}{PATH}", headers=auth(OPENAI_VK), protocols=["realtime"], autoclose=False
        )
        assert ws.protocol == "realtime"
        await next_data(ws)  # session.created
        await ws.send_str("over a real process")
        echo = await next_data(ws)
        assert (echo.type, echo.data) == (WSMsgType.TEXT, "over a real process")
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        close = await next_data(ws)
        assert (close.type, close.data) == (WSMsgType.CLOSE, 1001)
        await ws.close()
    assert await asyncio.to_thread(process.wait, 30) == 0
    assert time.monotonic() - started < 10  # the open session did not hold the drain for its grace


HELD = {"type": "response.create", "model": "gpt-4o-mini", "input": "hi", "fake_hold": True}


async def open_responses(
    session: aiohttp.ClientSession, url: str
) -> aiohttp.ClientWebSocketResponse:
    """A Responses WebSocket session (Codex's transport), its session.created read."""
    ws = await session.ws_connect(f"{url}/v1/responses", headers=auth(OPENAI_VK), autoping=False)
    assert json.loads((await next_data(ws)).data)["type"] == "session.created"
    return ws


async def held_turn(ws: aiohttp.ClientWebSocketResponse) -> None:
    """Start a turn the fake provider holds mid-way (until fake.resume)."""
    await ws.send_str(json.dumps(HELD))
    for expected in ("response.created", "response.output_text.delta"):
        assert json.loads((await next_data(ws)).data)["type"] == expected


async def test_sigterm_lets_a_turn_in_flight_finish_then_closes_1001_and_an_idle_session_at_once(
    processes: Processes, process_keys: Path, tmp_path: Path
) -> None:
    """A Codex turn streaming when Kubernetes rolls the gateway reaches its client whole (it
    was paid for), then 1001; a session between turns is closed at once."""
    log = tmp_path / "interactions.jsonl"
    process, url = start_gateway(processes, process_keys, log, SHUTDOWN_GRACE_SECONDS="20")
    async with aiohttp.ClientSession() as session:
        busy = await open_responses(session, url)
        idle = await open_responses(session, url)
        await held_turn(busy)
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        close = await next_data(idle)  # at once, while the busy one's turn is held
        assert (close.type, close.data) == (WSMsgType.CLOSE, 1001)
        await busy.send_str(json.dumps({"type": "fake.resume"}))  # read while draining
        rest = [json.loads((await next_data(busy)).data)["type"] for _ in range(2)]
        assert rest == ["response.output_text.delta", "response.completed"]
        close = await next_data(busy)
        assert (close.type, close.data) == (WSMsgType.CLOSE, 1001)
        assert "shutdown" in close.extra
    out, _ = await asyncio.to_thread(process.communicate, None, 30)
    assert process.returncode == 0
    assert time.monotonic() - started < 10  # the turn's end ended the drain, not the grace
    assert "draining: 1 request in flight, up to 20 s; 1 idle WebSocket session closed\n" in out
    assert out.endswith("llm-gateway stopped: every request finished\n")
    lines = [json.loads(text) for text in log.read_text().splitlines()]
    [line] = [line for line in lines if line["usage"] is not None]
    assert line["websocket"]["ended_by"] == "shutdown" and line["status"] == 101
    assert line["usage"]["estimated"] is False and line["usage"]["completion_tokens"] > 0


async def test_a_turn_still_running_when_the_grace_runs_out_is_closed_1001_and_logged(
    processes: Processes, process_keys: Path, tmp_path: Path
) -> None:
    log = tmp_path / "interactions.jsonl"
    grace = 2.0
    process, url = start_gateway(processes, process_keys, log, SHUTDOWN_GRACE_SECONDS=f"{grace:g}")
    async with aiohttp.ClientSession() as session:
        busy = await open_responses(session, url)
        await held_turn(busy)  # never resumed
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        close = await asyncio.wait_for(busy.receive(), grace + 5)
        assert (close.type, close.data) == (WSMsgType.CLOSE, 1001)
        assert time.monotonic() - started > grace - 0.5  # the turn had its grace
    out, _ = await asyncio.to_thread(process.communicate, None, 30)
    assert process.returncode == 0
    assert time.monotonic() - started < grace + 2.0
    assert out.endswith("llm-gateway stopped: 1 request cut at the end of the grace period\n")
    (line,) = [json.loads(text) for text in log.read_text().splitlines()]
    assert line["websocket"]["ended_by"] == "shutdown", line
    assert line["websocket"]["close_code"] == 1001
    assert line["usage"]["estimated"] is True and line["usage"]["completion_tokens"] > 0


async def deaf_session(
    url: str, command: bytes
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A Realtime session whose client sends `command` once and then reads nothing, ever."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        f"GET {PATH} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {base64.b64encode(os.urandom(16)).decode()}\r\n"
        "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: realtime\r\n"
        f"Authorization: Bearer {OPENAI_VK}\r\n\r\n".encode()
    )
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert head.startswith(b"HTTP/1.1 101"), head
    mask = os.urandom(4)
    masked = bytes(byte ^ mask[index % 4] for index, byte in enumerate(command))
    assert len(command) < 126
    writer.write(bytes([0x81, 0x80 | len(command)]) + mask + masked)  # one masked text frame
    await writer.drain()
    return reader, writer


# 400 frames of 64 KiB: far more than the sockets' buffers hold for a client that reads nothing.
FLOOD = b'{"type": "fake.flood", "count": 400, "size": 65536}'


@pytest.mark.parametrize(
    ("limit", "ended_by"),
    [("REALTIME_IDLE_TIMEOUT", "idle"), ("REALTIME_MAX_SESSION_SECONDS", "max_duration")],
)
async def test_a_client_that_never_reads_is_dropped_at_the_session_limits_and_its_line_logged(
    processes: Processes, process_keys: Path, tmp_path: Path, limit: str, ended_by: str
) -> None:
    log = tmp_path / "interactions.jsonl"
    idle = 2.0
    process, url = start_gateway(
        processes, process_keys, log, **{limit: f"{idle:g}"}, QUOTA_ENABLED="false"
    )
    _, writer = await deaf_session(url, FLOOD)
    started = time.monotonic()
    deadline = started + idle + 10
    while not log.read_text():
        assert time.monotonic() < deadline, "the session never ended"
        await asyncio.sleep(0.05)
    ended = time.monotonic() - started
    (line,) = [json.loads(text) for text in log.read_text().splitlines()]
    assert line["websocket"]["ended_by"] == ended_by, line
    # The limit, plus the bounded close.
    assert ended < idle + 4.0, f"ended after {ended:.1f} s, {limit}={idle:g}"
    writer.close()
    process.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(process.wait, 15) == 0


async def test_sigterm_with_a_client_that_never_reads_ends_within_the_grace_and_logs_it(
    processes: Processes, process_keys: Path, tmp_path: Path
) -> None:
    log = tmp_path / "interactions.jsonl"
    grace = 3.0
    process, url = start_gateway(
        processes, process_keys, log, SHUTDOWN_GRACE_SECONDS=f"{grace:g}", QUOTA_ENABLED="false"
    )
    _, writer = await deaf_session(url, FLOOD)
    await asyncio.sleep(1.0)  # the flood fills the buffers (nothing to wait on: it never ends)
    started = time.monotonic()
    process.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(process.wait, 30) == 0
    elapsed = time.monotonic() - started
    _, err = process.communicate(timeout=10)
    assert elapsed < grace + 2.0, f"{elapsed:.1f} s to stop, grace {grace:g} s"
    (line,) = [json.loads(text) for text in log.read_text().splitlines()]
    assert line["websocket"]["ended_by"] == "shutdown", line
    assert "came after close" not in err
    writer.close()
