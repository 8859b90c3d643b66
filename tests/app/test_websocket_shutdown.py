"""WebSocket sessions while the gateway shuts down: a turn in flight is let finish, then 1001.

`shut` below is what the app's on_shutdown runs on SIGTERM (`Realtime.shut`), and
`Realtime.end_all` what the drain calls when the grace runs out; the test server itself is
not shut down (aiohttp's own connection drops a closing connection's frames, which the
gateway's server reads on: tests/process/test_realtime_process.py has SIGTERM through a
real process).
The fake provider holds a response begun with `"fake_hold": true` until the client sends
`fake.resume` (tests/support/fake_realtime.py): a turn in flight, for as long as a test needs.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import WSMsgType
from aiohttp.test_utils import TestClient, TestServer

from proxy.app import REALTIME
from tests.conftest import OPENAI_VK, auth
from tests.support.fake_realtime import (
    INPUT_TOKENS,
    OUTPUT_TOKENS,
    REALTIME_STATE,
    FakeSocket,
    RealtimeState,
)
from tests.support.polling import until

WAIT_SECONDS = 5.0
HELD = {"type": "response.create", "model": "gpt-4o-mini", "input": "hi", "fake_hold": True}
RESUME = orjson.dumps({"type": "fake.resume"}).decode()


@pytest.fixture
def sockets(fake_provider: TestServer) -> RealtimeState:
    return fake_provider.app[REALTIME_STATE]


async def open_session(gateway: TestClient, path: str) -> aiohttp.ClientWebSocketResponse:
    ws = await gateway.ws_connect(
        path, headers=auth(OPENAI_VK), protocols=["realtime"], autoping=False, autoclose=False
    )
    assert (await receive(ws))["type"] == "session.created"
    return ws


async def receive(ws: aiohttp.ClientWebSocketResponse) -> dict[str, Any]:
    message = await asyncio.wait_for(ws.receive(), WAIT_SECONDS)
    assert message.type is WSMsgType.TEXT, message
    return orjson.loads(message.data)


async def closed_with(ws: aiohttp.ClientWebSocketResponse) -> int:
    """The code of the close frame the client gets next (answered, as an SDK does)."""
    message = await asyncio.wait_for(ws.receive(), WAIT_SECONDS)
    assert message.type is WSMsgType.CLOSE, message
    await ws.close()
    return int(message.data)


async def hold_a_turn(ws: aiohttp.ClientWebSocketResponse) -> None:
    """A Responses turn under way: begun, its first delta out, the provider holding the rest
    until `fake.resume`."""
    await ws.send_str(orjson.dumps(HELD).decode())
    assert [(await receive(ws))["type"] for _ in range(2)] == [
        "response.created",
        "response.output_text.delta",
    ]


def shut(gateway: TestClient) -> asyncio.Task[None]:
    """The app's shutdown of its sessions, as on SIGTERM (under way in a task)."""
    return asyncio.create_task(gateway.app[REALTIME].shut(gateway.app))


def creates(socket: FakeSocket) -> int:
    """How many response.create frames reached the provider."""
    return sum(1 for _, data in socket.received if "response.create" in str(data))


async def test_a_responses_turn_in_flight_at_shutdown_ends_whole_then_its_session_closes_1001(
    gateway: TestClient,
    sockets: RealtimeState,
    records: Callable[..., Awaitable[list[dict[str, Any]]]],
) -> None:
    """A Codex session mid-turn when the gateway is rolled gets its whole turn (and pays for
    it once), then 1001; a session with no turn in flight is closed at once, as before."""
    busy = await open_session(gateway, "/v1/responses")
    idle = await open_session(gateway, "/v1/responses")
    await hold_a_turn(busy)
    closing = shut(gateway)  # as on SIGTERM
    assert await closed_with(idle) == 1001  # at once: the held turn still runs meanwhile
    await busy.send_str(RESUME)  # the provider goes on with the turn
    events = [await receive(busy)]
    while events[-1]["type"] != "response.completed":
        events.append(await receive(busy))
    assert [event["type"] for event in events] == [
        "response.output_text.delta",
        "response.completed",
    ]
    assert await closed_with(busy) == 1001
    await asyncio.wait_for(closing, WAIT_SECONDS)
    provider = sockets.sockets[0]
    assert provider.close is not None and provider.close[0] == 1001
    lines = await records(2)
    [line] = [line for line in lines if line["usage"] is not None]
    assert line["websocket"]["ended_by"] == "shutdown"
    assert line["websocket"]["close_code"] == 1001
    assert (line["usage"]["prompt_tokens"], line["usage"]["completion_tokens"]) == (
        INPUT_TOKENS,
        OUTPUT_TOKENS,
    )
    assert line["usage"]["estimated"] is False


async def test_a_turn_sent_while_the_gateway_drains_is_refused_and_never_reaches_the_provider(
    gateway: TestClient, sockets: RealtimeState
) -> None:
    """The new turn gets an error event Codex answers by opening a new connection (to another
    gateway); the turn already running still finishes, then the session closes with 1001."""
    ws = await open_session(gateway, "/v1/responses")
    await hold_a_turn(ws)
    closing = shut(gateway)
    await until(lambda: gateway.app[REALTIME].is_draining)
    await ws.send_str(orjson.dumps({**HELD, "fake_hold": False}).decode())
    refused = await receive(ws)
    assert refused["type"] == "error" and refused["status"] == 503, refused
    assert refused["error"]["code"] == "websocket_connection_limit_reached", refused
    assert "shutting down" in refused["error"]["message"]
    await ws.send_str(RESUME)
    events = [await receive(ws)]
    while events[-1]["type"] != "response.completed":
        events.append(await receive(ws))
    assert await closed_with(ws) == 1001
    await asyncio.wait_for(closing, WAIT_SECONDS)
    assert creates(sockets.sockets[0]) == 1


async def test_a_realtime_response_in_progress_at_shutdown_ends_whole_then_1001(
    gateway: TestClient,
    sockets: RealtimeState,
    records: Callable[..., Awaitable[list[dict[str, Any]]]],
) -> None:
    """Realtime: a response begun (response.created) and not done at SIGTERM runs to its
    response.done; a response.create sent meanwhile gets Realtime's error event instead."""
    ws = await open_session(gateway, "/v1/realtime?model=gpt-realtime")
    await ws.send_str(orjson.dumps(HELD).decode())
    assert (await receive(ws))["type"] == "response.created"
    closing = shut(gateway)
    await until(lambda: gateway.app[REALTIME].is_draining)
    await ws.send_str(orjson.dumps({"type": "response.create", "event_id": "evt_9"}).decode())
    refused = await receive(ws)
    assert refused["type"] == "error", refused
    assert refused["error"]["event_id"] == "evt_9"
    await ws.send_str(RESUME)
    assert (await receive(ws))["type"] == "response.done"
    assert await closed_with(ws) == 1001
    await asyncio.wait_for(closing, WAIT_SECONDS)
    assert creates(sockets.sockets[0]) == 1
    [line] = await records(1)
    assert line["websocket"]["ended_by"] == "shutdown"
    assert line["usage"]["completion_tokens"] == OUTPUT_TOKENS


async def test_a_turn_still_running_when_the_grace_runs_out_is_closed_1001_and_charged(
    gateway: TestClient,
    sockets: RealtimeState,
    records: Callable[..., Awaitable[list[dict[str, Any]]]],
) -> None:
    """The grace over, the session still mid-turn is closed with 1001 on both sides, and its
    line says what its turn generated (estimated: its usage never came)."""
    ws = await open_session(gateway, "/v1/responses")
    await hold_a_turn(ws)
    closing = shut(gateway)
    await until(lambda: gateway.app[REALTIME].is_draining)
    assert gateway.app[REALTIME].sessions  # the turn holds it open
    ending = asyncio.create_task(gateway.app[REALTIME].end_all())  # the grace ran out
    assert await closed_with(ws) == 1001
    await asyncio.wait_for(ending, WAIT_SECONDS)
    await asyncio.wait_for(closing, WAIT_SECONDS)
    provider = sockets.sockets[0]
    assert provider.close is not None and provider.close[0] == 1001
    [line] = await records(1)
    assert line["websocket"]["ended_by"] == "shutdown"
    assert line["usage"]["estimated"] is True
    assert line["usage"]["completion_tokens"] > 0
