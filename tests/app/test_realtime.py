"""Realtime over WebSocket: sessions relayed through a real gateway to the fake provider's socket."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import genai_prices
import orjson
import pytest
from aiohttp import WSMsgType
from aiohttp.test_utils import TestClient, TestServer
from genai_prices import Usage as LibraryUsage
from openai import AsyncOpenAI
from prometheus_client.parser import text_string_to_metric_families

from proxy.app import REALTIME, build_app
from proxy.record import Usage
from proxy.settings import Settings
from proxy.usage.pricing import Prices
from proxy.usage.realtime_events import SessionUsage
from tests.conftest import (
    LIMITED_VK,
    OPENAI_REAL,
    OPENAI_VK,
    RESTRICTED_VK,
    SECRETS,
    assert_openai_error,
    auth,
    keys_document,
)
from tests.support.fake_provider import FakeState
from tests.support.fake_realtime import (
    CACHED_AUDIO_TOKENS,
    CACHED_IMAGE_TOKENS,
    CACHED_TOKENS,
    CALL_MODEL,
    INPUT_AUDIO_TOKENS,
    INPUT_IMAGE_TOKENS,
    INPUT_TOKENS,
    LIVE_DELEGATED_MODEL,
    OUTPUT_AUDIO_TOKENS,
    OUTPUT_TOKENS,
    REALTIME_STATE,
    TRANSCRIBED_AUDIO_TOKENS,
    TRANSCRIBED_SECONDS,
    TRANSCRIPT_TOKENS,
    FakeSocket,
    RealtimeState,
)
from tests.support.polling import until

PATH = "/v1/realtime?model=gpt-realtime"
GONE_VK = "vk_test_gone_3c5e7a9b1d"
# Either side closing closes the other within this: a half-open session holds two sockets.
CLOSE_WITHIN_SECONDS = 1.0
WAIT_SECONDS = 5.0  # a bound on waits for events that should come at once


@pytest.fixture
def sockets(fake_provider: TestServer) -> RealtimeState:
    """What the fake provider's Realtime socket observed."""
    return fake_provider.app[REALTIME_STATE]


async def connect(gateway: TestClient, **options: Any) -> aiohttp.ClientWebSocketResponse:
    options.setdefault("headers", auth(OPENAI_VK))
    options.setdefault("protocols", ["realtime"])
    return await gateway.ws_connect(PATH, autoping=False, autoclose=False, **options)


async def fake_socket(sockets: RealtimeState) -> FakeSocket:
    await asyncio.wait_for(sockets.opened.wait(), WAIT_SECONDS)
    return sockets.sockets[-1]


async def next_data(ws: aiohttp.ClientWebSocketResponse) -> aiohttp.WSMessage:
    message = await asyncio.wait_for(ws.receive(), WAIT_SECONDS)
    assert message.type in (
        WSMsgType.TEXT,
        WSMsgType.BINARY,
        WSMsgType.PING,
        WSMsgType.PONG,
        WSMsgType.CLOSE,
    ), message
    return message


def upgrade_headers(**extra: str) -> dict[str, str]:
    """A WebSocket handshake sent as a plain GET, so the test can read a refusal's body."""
    return {
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Version": "13",
        "Sec-WebSocket-Key": base64.b64encode(os.urandom(16)).decode(),
        **extra,
    }


async def no_session_left(gateway: TestClient) -> None:
    """Nothing of a session is left: no open session, no pump task."""
    deadline = time.monotonic() + WAIT_SECONDS
    while gateway.app[REALTIME].sessions or any(
        task.get_name().startswith("websocket-") for task in asyncio.all_tasks()
    ):
        assert time.monotonic() < deadline, "a session or its pumps outlived the session"
        await asyncio.sleep(0.01)


async def test_frames_pass_both_ways_unchanged_and_the_provider_gets_the_real_key(
    gateway: TestClient, sockets: RealtimeState, fake: Any
) -> None:
    ws = await connect(gateway)
    assert ws.protocol == "realtime"
    socket = await fake_socket(sockets)
    received = [await next_data(ws)]  # session.created
    await ws.send_str("plain text, not JSON: é")
    received.append(await next_data(ws))
    await ws.send_bytes(bytes(range(256)))
    received.append(await next_data(ws))
    await ws.ping(b"client-ping")
    pong = await next_data(ws)
    assert (pong.type, pong.data) == (WSMsgType.PONG, b"client-ping")
    await ws.send_str(orjson.dumps({"type": "fake.ping", "data": "provider-ping"}).decode())
    ping = await next_data(ws)
    assert (ping.type, ping.data) == (WSMsgType.PING, b"provider-ping")
    await ws.pong(b"provider-ping")
    await ws.send_str(orjson.dumps({"type": "response.create"}).decode())
    received += [await next_data(ws), await next_data(ws)]

    # Provider → client: every frame the fake sent arrived, same type, same bytes, in order.
    assert [(m.type, m.data) for m in received] == socket.sent
    # Client → provider: the frames the client sent, pings and pongs included.
    assert socket.received == [
        (WSMsgType.TEXT, "plain text, not JSON: é"),
        (WSMsgType.BINARY, bytes(range(256))),
        (WSMsgType.PING, b"client-ping"),
        (WSMsgType.TEXT, '{"type":"fake.ping","data":"provider-ping"}'),
        (WSMsgType.PONG, b"provider-ping"),
        (WSMsgType.TEXT, '{"type":"response.create"}'),
    ]
    upgrade = fake.requests[-1]
    assert upgrade.path == "/v1/realtime"
    assert upgrade.headers["Authorization"] == f"Bearer {OPENAI_REAL}"
    assert all(secret not in value for value in upgrade.headers.values() for secret in (OPENAI_VK,))

    started = time.monotonic()
    await ws.close(code=4000, message=b"client bye")
    await asyncio.wait_for(socket.ended.wait(), WAIT_SECONDS)
    assert time.monotonic() - started < CLOSE_WITHIN_SECONDS
    assert socket.close == (4000, "client bye")
    assert ws.close_code == 4000  # the provider's answer, passed back
    await no_session_left(gateway)


async def test_a_real_key_the_provider_quotes_in_a_frame_reaches_the_client_masked(
    gateway: TestClient, sockets: RealtimeState
) -> None:
    """SPEC: a real key never appears in a response, not even when the provider echoes it
    back: in a text or binary frame, a ping or a close reason, it is overwritten by a mask
    of its length; every other byte arrives as the provider sent it."""
    real = OPENAI_REAL.encode()
    mask = b"[redacted]" + b"*" * (len(real) - len(b"[redacted]"))
    quoted = b"Incorrect API key provided: Bearer " + real + b"."
    ws = await connect(gateway)
    await next_data(ws)  # session.created
    socket = await fake_socket(sockets)
    for kind in ("text", "binary"):
        await ws.send_str(orjson.dumps({"type": "fake.quote_key", "as": kind}).decode())
        message = await next_data(ws)
        sent_type, sent = socket.sent[-1]
        sent = sent.encode() if isinstance(sent, str) else sent
        got = message.data.encode() if isinstance(message.data, str) else message.data
        assert quoted in sent  # the provider did quote it
        assert (message.type, got) == (sent_type, sent.replace(real, mask))
    await ws.send_str(orjson.dumps({"type": "fake.quote_key", "as": "ping"}).decode())
    ping = await next_data(ws)
    assert (ping.type, ping.data) == (WSMsgType.PING, quoted.replace(real, mask))
    await ws.send_str(orjson.dumps({"type": "fake.quote_key", "as": "close"}).decode())
    close = await next_data(ws)
    assert (close.type, close.data) == (WSMsgType.CLOSE, 1008)
    assert close.extra == quoted.replace(real, mask).decode()
    await ws.close(code=1008)
    await asyncio.wait_for(socket.ended.wait(), WAIT_SECONDS)
    await no_session_left(gateway)


async def test_a_browser_key_in_the_subprotocol_authenticates_and_is_not_forwarded(
    gateway: TestClient, sockets: RealtimeState, fake: Any
) -> None:
    protocols = ["realtime", f"openai-insecure-api-key.{OPENAI_VK}", "openai-beta.realtime-v1"]
    ws = await connect(gateway, headers={}, protocols=protocols)
    assert ws.protocol == "realtime"
    await next_data(ws)
    upgrade = fake.requests[-1]
    assert upgrade.headers["Authorization"] == f"Bearer {OPENAI_REAL}"
    assert upgrade.headers["Sec-WebSocket-Protocol"] == "realtime,openai-beta.realtime-v1"
    assert not any(OPENAI_VK in value for value in upgrade.headers.values())
    await ws.close()


async def test_a_browser_key_the_provider_chose_no_subprotocol_for_is_not_logged(
    gateway: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    # The client offers only its key: the provider gets no subprotocol and chooses none, so
    # the client's offer overlaps nothing, which aiohttp warns of, quoting every entry.
    caplog.set_level(logging.DEBUG)
    ws = await connect(gateway, headers={}, protocols=[f"openai-insecure-api-key.{OPENAI_VK}"])
    assert ws.protocol is None
    await next_data(ws)
    await ws.close()
    await no_session_left(gateway)
    logged = [record.getMessage() for record in caplog.get_records("call")]
    assert not [message for message in logged if any(s in message for s in SECRETS)]


async def test_the_provider_closing_passes_its_code_and_reason_to_the_client(
    gateway: TestClient, sockets: RealtimeState
) -> None:
    ws = await connect(gateway)
    await next_data(ws)
    started = time.monotonic()
    await ws.send_str(
        orjson.dumps({"type": "fake.close", "code": 4001, "reason": "provider bye"}).decode()
    )
    close = await next_data(ws)
    assert time.monotonic() - started < CLOSE_WITHIN_SECONDS
    assert (close.type, close.data, close.extra) == (WSMsgType.CLOSE, 4001, "provider bye")
    await ws.close(code=4001)
    socket = await fake_socket(sockets)
    await asyncio.wait_for(socket.ended.wait(), WAIT_SECONDS)
    assert not socket.is_lost
    await no_session_left(gateway)


async def test_a_client_that_vanishes_closes_the_provider_side_with_1001(
    gateway: TestClient,
    sockets: RealtimeState,
    records: Callable[..., Awaitable[list[dict[str, Any]]]],
) -> None:
    reader, writer = await asyncio.open_connection(gateway.host, gateway.port)
    head = "".join(
        f"{name}: {value}\r\n" for name, value in upgrade_headers(**auth(OPENAI_VK)).items()
    )
    writer.write(f"GET {PATH} HTTP/1.1\r\nHost: gateway\r\n{head}\r\n".encode())
    await writer.drain()
    assert (await asyncio.wait_for(reader.readline(), WAIT_SECONDS)).startswith(b"HTTP/1.1 101")
    socket = await fake_socket(sockets)
    started = time.monotonic()
    writer.transport.abort()  # no close frame: the TCP connection just goes
    await asyncio.wait_for(socket.ended.wait(), WAIT_SECONDS)
    assert time.monotonic() - started < CLOSE_WITHIN_SECONDS
    assert socket.close is not None and socket.close[0] == 1001
    await no_session_left(gateway)
    # Its line says so, with the code the provider got, whichever of the gateway's tasks
    # learnt first that the client was gone (the handler cancelled, or the pump).
    [line] = await records(1)
    assert (line["websocket"]["ended_by"], line["websocket"]["close_code"]) == ("client_lost", 1001)


async def test_a_close_frame_without_a_code_is_logged_as_1005(
    gateway: TestClient,
    sockets: RealtimeState,
    records: Callable[..., Awaitable[list[dict[str, Any]]]],
) -> None:
    # RFC 6455 §7.4.1: 1005 is the code that says a close frame carried none (not 0).
    reader, writer = await asyncio.open_connection(gateway.host, gateway.port)
    head = "".join(
        f"{name}: {value}\r\n" for name, value in upgrade_headers(**auth(OPENAI_VK)).items()
    )
    writer.write(f"GET {PATH} HTTP/1.1\r\nHost: gateway\r\n{head}\r\n".encode())
    await writer.drain()
    assert (await asyncio.wait_for(reader.readline(), WAIT_SECONDS)).startswith(b"HTTP/1.1 101")
    socket = await fake_socket(sockets)
    writer.write(b"\x88\x80" + os.urandom(4))  # a masked close frame with no payload
    await writer.drain()
    await asyncio.wait_for(socket.ended.wait(), WAIT_SECONDS)
    writer.close()
    [line] = await records(1)
    assert (line["websocket"]["ended_by"], line["websocket"]["close_code"]) == ("client", 1005)


async def test_a_provider_that_vanishes_closes_the_client_side_with_1014(
    gateway: TestClient,
) -> None:
    ws = await connect(gateway)
    await next_data(ws)
    await ws.send_str(orjson.dumps({"type": "fake.drop"}).decode())
    close = await next_data(ws)
    assert (close.type, close.data) == (WSMsgType.CLOSE, 1014)
    await ws.close()
    await no_session_left(gateway)


async def test_one_log_line_per_session_with_frames_usage_and_its_ending(
    gateway: TestClient, records: Callable[..., Awaitable[list[dict[str, Any]]]]
) -> None:
    ws = await connect(gateway)
    await next_data(ws)
    for _ in range(2):
        await ws.send_str('{"type": "response.create"}')
        await next_data(ws)
        await next_data(ws)
    await ws.close()
    [line] = await records(1)
    assert line["status"] == 101
    assert line["path"] == "/v1/realtime"
    assert line["model"] == "gpt-realtime"
    assert line["usage"] == {
        "prompt_tokens": 2 * INPUT_TOKENS,
        "completion_tokens": 2 * OUTPUT_TOKENS,
        "total_tokens": 2 * (INPUT_TOKENS + OUTPUT_TOKENS),
        "cache_read_tokens": 2 * CACHED_TOKENS,
        "cache_write_tokens": 0,
        "input_audio_tokens": 2 * INPUT_AUDIO_TOKENS,
        "reasoning_tokens": 0,
        "output_audio_tokens": 2 * OUTPUT_AUDIO_TOKENS,
        "input_image_tokens": 2 * INPUT_IMAGE_TOKENS,
        "cache_audio_read_tokens": 2 * CACHED_AUDIO_TOKENS,
        "cache_image_read_tokens": 2 * CACHED_IMAGE_TOKENS,
        "estimated": False,
    }
    one_response = Usage(
        prompt_tokens=INPUT_TOKENS,
        completion_tokens=OUTPUT_TOKENS,
        cache_read_tokens=CACHED_TOKENS,
        input_audio_tokens=INPUT_AUDIO_TOKENS,
        output_audio_tokens=OUTPUT_AUDIO_TOKENS,
        input_image_tokens=INPUT_IMAGE_TOKENS,
        cache_audio_read_tokens=CACHED_AUDIO_TOKENS,
        cache_image_read_tokens=CACHED_IMAGE_TOKENS,
    )
    price = Prices.load(None).cost("openai", "gpt-realtime", one_response)
    assert price is not None and price > 0
    assert line["cost_usd"] == pytest.approx(2 * price)
    assert line["websocket"] == {
        "frames_up": 2,
        "frames_down": 5,
        "ended_by": "client",
        "close_code": 1000,
    }
    assert line["duration_ms"] > 0
    assert not any(secret in orjson.dumps(line).decode() for secret in SECRETS)


async def test_response_done_usage_is_charged_to_the_token_quota(
    make_gateway: Callable[..., Awaitable[TestClient]],
) -> None:
    gateway = await make_gateway(QUOTA_TOKENS="20")
    ws = await connect(gateway)
    await next_data(ws)
    await ws.send_str('{"type": "response.create"}')
    await next_data(ws)
    await next_data(ws)
    await ws.close()
    deadline = time.monotonic() + WAIT_SECONDS
    while True:  # the charge is made off the session's path
        usage = await (await gateway.get("/usage", headers=auth(OPENAI_VK))).json()
        if usage["tokens"]["used"] == INPUT_TOKENS + OUTPUT_TOKENS or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.01)
    assert usage["tokens"]["used"] == INPUT_TOKENS + OUTPUT_TOKENS
    # 18 of 20 tokens used: the next session is still admitted, and its usage passes the limit.
    ws = await connect(gateway)
    await next_data(ws)
    await ws.send_str('{"type": "response.create"}')
    await next_data(ws)
    await next_data(ws)
    await ws.close()
    deadline = time.monotonic() + WAIT_SECONDS
    while True:
        refused = await gateway.get(PATH, headers=upgrade_headers(**auth(OPENAI_VK)))
        if refused.status == 429 or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.01)
    assert refused.status == 429


async def test_an_over_quota_key_is_refused_before_the_upgrade_in_the_openai_dialect(
    gateway: TestClient, sockets: RealtimeState
) -> None:
    for _ in range(3):  # LIMITED_VK: 3 requests per window
        assert (await gateway.get("/v1/models", headers=auth(LIMITED_VK))).status == 200
    response = await gateway.get(PATH, headers=upgrade_headers(**auth(LIMITED_VK)))
    assert response.status == 429
    assert response.headers["retry-after"]
    assert_openai_error(await response.json(), "rate_limit_exceeded")
    assert sockets.sockets == []
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await connect(gateway, headers=auth(LIMITED_VK))
    assert refused.value.status == 429


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param(upgrade_headers(Authorization="Bearer vk_wrong_key_000000"), id="header"),
        pytest.param(
            upgrade_headers(
                **{"Sec-WebSocket-Protocol": "realtime, openai-insecure-api-key.vk_wrong"}
            ),
            id="subprotocol",
        ),
        pytest.param(upgrade_headers(), id="none"),
    ],
)
async def test_a_wrong_or_missing_key_is_refused_with_401(
    gateway: TestClient, sockets: RealtimeState, headers: dict[str, str]
) -> None:
    response = await gateway.get(PATH, headers=headers)
    assert response.status == 401
    assert_openai_error(await response.json(), "invalid_api_key")
    assert sockets.sockets == []


@pytest.mark.parametrize("path", [PATH, "/v1/responses"])
async def test_a_handshake_whose_upgrade_a_proxy_dropped_is_refused_saying_so(
    gateway: TestClient, fake: FakeState, sockets: RealtimeState, path: str
) -> None:
    # nginx with its defaults speaks HTTP/1.0 to the gateway and drops Upgrade and
    # Connection (hop-by-hop), but passes the Sec-WebSocket-* headers: such a handshake went
    # upstream as a plain GET, counted against the quota, and the client got whatever the
    # provider answers a GET there, never a session.
    headers = upgrade_headers(**auth(LIMITED_VK), Host="gateway")
    del headers["Upgrade"]
    headers["Connection"] = "close"
    head = f"GET {path} HTTP/1.0\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    for _ in range(4):  # LIMITED_VK: 3 requests per window, none of these counted
        reader, writer = await asyncio.open_connection(gateway.host, gateway.port)
        try:
            writer.write(head.encode() + b"\r\n")
            async with asyncio.timeout(WAIT_SECONDS):
                answer = await reader.read()
        finally:
            writer.close()
        answer_head, _, answer_body = answer.partition(b"\r\n\r\n")
        assert answer_head.startswith(b"HTTP/1.0 400"), answer_head
        body = orjson.loads(answer_body)
        assert_openai_error(body, "invalid_upgrade")
        assert "Upgrade" in body["error"]["message"] and "proxy" in body["error"]["message"]
    assert fake.requests == [] and sockets.sockets == []
    assert (await gateway.get("/v1/models", headers=auth(LIMITED_VK))).status == 200


async def test_a_provider_refusing_the_upgrade_gives_its_status(gateway: TestClient) -> None:
    response = await gateway.get(
        PATH, headers=upgrade_headers(**auth(OPENAI_VK), **{"x-fake-status": "403"})
    )
    assert response.status == 403
    assert_openai_error(await response.json(), "upstream_refused")


async def test_a_refused_upgrade_logs_the_providers_own_request_id(
    gateway: TestClient, records: Callable[..., Awaitable[list[dict[str, Any]]]]
) -> None:
    # The id the provider's support asks for was logged for an HTTP answer, refusals
    # included, and for an opened session, but not for a handshake it refused.
    for status in ("429", "500"):
        response = await gateway.get(
            PATH, headers=upgrade_headers(**auth(OPENAI_VK), **{"x-fake-status": status})
        )
        assert response.status == int(status)
    lines = await records(2)
    for line in lines:
        assert line["provider_request_id"].startswith("req_fake_"), line
        assert line["provider_request_id"] != line["request_id"]


@pytest.mark.parametrize(
    ("env", "why"),
    [
        ({"REALTIME_IDLE_TIMEOUT": "0.2"}, "idle"),
        ({"REALTIME_MAX_SESSION_SECONDS": "0.3"}, "max duration"),
    ],
)
async def test_the_gateway_ends_an_idle_or_too_long_session_on_both_sides(
    make_gateway: Callable[..., Awaitable[TestClient]],
    sockets: RealtimeState,
    records: Callable[..., Awaitable[list[dict[str, Any]]]],
    env: dict[str, str],
    why: str,
) -> None:
    gateway = await make_gateway(**env)
    ws = await connect(gateway)
    close = await next_data(ws)  # session.created, unless a loaded machine took past the bound
    while close.type is not WSMsgType.CLOSE:
        close = await next_data(ws)
    assert close.data == 1001
    assert why in close.extra
    await ws.close()
    socket = await fake_socket(sockets)
    await asyncio.wait_for(socket.ended.wait(), WAIT_SECONDS)
    assert socket.close is not None and socket.close[0] == 1001 and why in socket.close[1]
    [line] = await records(1)
    assert line["websocket"]["ended_by"] == why.replace(" ", "_")


async def test_shutting_down_closes_open_sessions_with_1001(
    gateway: TestClient, sockets: RealtimeState
) -> None:
    ws = await connect(gateway)
    await next_data(ws)
    closing = asyncio.create_task(gateway.server.close())  # the server shuts down, as on SIGTERM
    close = await next_data(ws)
    assert (close.type, close.data) == (WSMsgType.CLOSE, 1001)
    await ws.close()
    await asyncio.wait_for(closing, WAIT_SECONDS)
    socket = await fake_socket(sockets)
    assert socket.close is not None and socket.close[0] == 1001


async def test_a_client_that_does_not_read_slows_the_provider_instead_of_filling_memory(
    gateway: TestClient, sockets: RealtimeState
) -> None:
    ws = await connect(gateway)
    await next_data(ws)
    count, size = 64, 1 << 20  # 64 MiB, far past every socket buffer on the way
    await ws.send_str(orjson.dumps({"type": "fake.flood", "count": count, "size": size}).decode())
    socket = await fake_socket(sockets)
    # Proving an absence takes a time window: unbuffered, the flood would end in well under
    # this (loopback); with backpressure it cannot end while the client reads nothing.
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(socket.flooded.wait(), 2.0)
    assert len(socket.sent) < count
    for index in range(count):
        message = await next_data(ws)
        assert message.type is WSMsgType.TEXT and message.data.startswith(f"{index:08d}")
        assert len(message.data) == size
    await asyncio.wait_for(socket.flooded.wait(), WAIT_SECONDS)
    await ws.close()


async def test_the_openai_sdk_realtime_client_works_through_the_gateway(
    gateway: TestClient, fake: Any
) -> None:
    client = AsyncOpenAI(api_key=OPENAI_VK, base_url=str(gateway.make_url("/v1")), max_retries=0)
    async with client.realtime.connect(model="gpt-realtime") as connection:
        assert (await connection.recv()).type == "session.created"
        await connection.response.create()
        events = [await connection.recv(), await connection.recv()]
    assert [event.type for event in events] == ["response.created", "response.done"]
    assert events[1].response.usage.output_tokens == OUTPUT_TOKENS
    assert fake.requests[-1].headers["Authorization"] == f"Bearer {OPENAI_REAL}"
    await no_session_left(gateway)


async def requests_by_model(gateway: TestClient) -> dict[str, float]:
    """The gateway's requests counted, by their model label."""
    text = await (await gateway.get("/metrics")).text()
    return {
        sample.labels["model"]: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "llm_gateway_requests_total"
    }


async def test_a_live_sessions_delegated_responses_are_charged(
    make_gateway: Callable[..., Awaitable[TestClient]],
    records: Callable[..., Awaitable[list[dict[str, Any]]]],
) -> None:
    # The Live API reports what its Responses delegation runs inside `response.event`
    # frames (the nested event a Responses stream's); each finished response is charged.
    gateway = await make_gateway(QUOTA_TOKENS="1000")
    client = AsyncOpenAI(api_key=OPENAI_VK, base_url=str(gateway.make_url("/v1")), max_retries=0)
    async with client.live.connect() as connection:
        assert (await connection.recv_bytes()).startswith(b'{"type":"session.created"')
        await connection.send({"type": "response.create"})
        events = [json.loads(await connection.recv_bytes()) for _ in range(5)]
    assert [event["type"] for event in events] == [*["response.event"] * 4, "session.usage.updated"]
    assert events[3]["event"]["type"] == "response.completed"
    [line] = await records(1)
    assert line["path"] == "/v1/live/sessions"
    # Logged and counted as the model its delegation ran, as the provider says (before: null).
    assert line["model"] == LIVE_DELEGATED_MODEL
    assert await requests_by_model(gateway) == {LIVE_DELEGATED_MODEL: 1}
    assert line["usage"]["prompt_tokens"] == INPUT_TOKENS
    assert line["usage"]["completion_tokens"] == OUTPUT_TOKENS
    assert line["usage"]["estimated"] is False
    # Priced as the model the delegation ran (its response says it): the URL names none.
    delegated = Usage(INPUT_TOKENS, OUTPUT_TOKENS, cache_read_tokens=CACHED_TOKENS)
    price = Prices.load(None).cost("openai", None, delegated, LIVE_DELEGATED_MODEL)
    assert price is not None and price > 0
    assert line["cost_usd"] == pytest.approx(price)
    usage = await (await gateway.get("/usage", headers=auth(OPENAI_VK))).json()
    assert usage["tokens"]["used"] == INPUT_TOKENS + OUTPUT_TOKENS
    await no_session_left(gateway)


async def test_a_calls_sideband_is_charged_and_priced_as_the_model_its_session_runs(
    make_gateway: Callable[..., Awaitable[TestClient]],
    records: Callable[..., Awaitable[list[dict[str, Any]]]],
) -> None:
    # A server joins a WebRTC or SIP call (`?call_id=`, no model in the URL): the provider's
    # session.created says the model the call runs, and its responses are priced as that.
    gateway = await make_gateway(QUOTA_TOKENS="1000")
    client = AsyncOpenAI(api_key=OPENAI_VK, base_url=str(gateway.make_url("/v1")), max_retries=0)
    async with client.realtime.connect(call_id="rtc_1") as connection:
        assert (await connection.recv()).type == "session.created"
        await connection.response.create()
        assert (await connection.recv()).type == "response.created"
        assert (await connection.recv()).type == "response.done"
    [line] = await records(1)
    assert line["path"] == "/v1/realtime"
    # Logged and counted as the model the provider says the call runs (before: null).
    assert line["model"] == CALL_MODEL
    assert await requests_by_model(gateway) == {CALL_MODEL: 1}
    assert line["usage"]["total_tokens"] == INPUT_TOKENS + OUTPUT_TOKENS
    one_response = Usage(
        prompt_tokens=INPUT_TOKENS,
        completion_tokens=OUTPUT_TOKENS,
        cache_read_tokens=CACHED_TOKENS,
        input_audio_tokens=INPUT_AUDIO_TOKENS,
        output_audio_tokens=OUTPUT_AUDIO_TOKENS,
        input_image_tokens=INPUT_IMAGE_TOKENS,
        cache_audio_read_tokens=CACHED_AUDIO_TOKENS,
        cache_image_read_tokens=CACHED_IMAGE_TOKENS,
    )
    price = Prices.load(None).cost("openai", CALL_MODEL, one_response)
    assert price is not None and price > 0
    assert line["cost_usd"] == pytest.approx(price)
    usage = await (await gateway.get("/usage", headers=auth(OPENAI_VK))).json()
    assert usage["tokens"]["used"] == INPUT_TOKENS + OUTPUT_TOKENS
    await no_session_left(gateway)


async def test_a_calls_sideband_without_a_response_is_logged_as_the_model_its_session_runs(
    make_gateway: Callable[..., Awaitable[TestClient]],
    records: Callable[..., Awaitable[list[dict[str, Any]]]],
) -> None:
    gateway = await make_gateway()
    client = AsyncOpenAI(api_key=OPENAI_VK, base_url=str(gateway.make_url("/v1")), max_retries=0)
    async with client.realtime.connect(call_id="rtc_1") as connection:
        assert (await connection.recv()).type == "session.created"
    [line] = await records(1)
    assert (line["model"], line["status"], line["usage"]) == (CALL_MODEL, 101, None)
    await no_session_left(gateway)


async def test_a_live_sidebands_delegated_responses_are_charged(
    make_gateway: Callable[..., Awaitable[TestClient]],
    records: Callable[..., Awaitable[list[dict[str, Any]]]],
) -> None:
    # A server attached to a WebRTC or SIP Live session (`…/sessions/{id}/attach`, whose
    # primary connection goes to the provider directly) drives its turns: the sideband sees
    # the delegated Responses as the primary would, and is the gateway's only view of them.
    gateway = await make_gateway(QUOTA_TOKENS="1000")
    client = AsyncOpenAI(api_key=OPENAI_VK, base_url=str(gateway.make_url("/v1")), max_retries=0)
    async with client.live.sideband.connect(session_id="sess_1") as connection:
        assert (await connection.recv_bytes()).startswith(b'{"type":"session.created"')
        await connection.send({"type": "response.create"})
        events = [json.loads(await connection.recv_bytes()) for _ in range(5)]
    assert events[3]["event"]["type"] == "response.completed"
    [line] = await records(1)
    assert line["path"] == "/v1/live/sessions/sess_1/attach"
    assert line["model"] == LIVE_DELEGATED_MODEL
    assert line["usage"]["prompt_tokens"] == INPUT_TOKENS
    assert line["usage"]["completion_tokens"] == OUTPUT_TOKENS
    assert line["usage"]["estimated"] is False
    assert line["cost_usd"] > 0  # as the model the delegation ran
    usage = await (await gateway.get("/usage", headers=auth(OPENAI_VK))).json()
    assert usage["tokens"]["used"] == INPUT_TOKENS + OUTPUT_TOKENS
    metrics = (await (await gateway.get("/metrics")).text()).splitlines()
    assert any(
        row.startswith("llm_gateway_completion_tokens_total{")
        and row.endswith(f" {float(OUTPUT_TOKENS)}")
        for row in metrics
    ), [row for row in metrics if "tokens_total" in row]
    await no_session_left(gateway)


async def test_the_openai_sdk_beta_realtime_client_works_given_a_websocket_base_url(
    gateway: TestClient, fake: Any, records: Callable[..., Awaitable[list[dict[str, Any]]]]
) -> None:
    """`client.beta.realtime` connects to wss:// whatever `base_url`'s scheme (docs/realtime.md):
    through a plain-HTTP gateway it takes `websocket_base_url`; its OpenAI-Beta header reaches
    the provider, and an out-of-band response is charged as any."""
    base = str(gateway.make_url("/v1"))
    client = AsyncOpenAI(
        api_key=OPENAI_VK,
        base_url=base,
        websocket_base_url=base.replace("http://", "ws://"),
        max_retries=0,
    )
    async with client.beta.realtime.connect(model="gpt-4o-realtime-preview") as connection:
        assert (await connection.recv()).type == "session.created"
        await connection.response.create(response={"conversation": "none"})
        assert (await connection.recv()).type == "response.created"
        assert (await connection.recv()).type == "response.done"
    assert fake.requests[-1].headers["OpenAI-Beta"] == "realtime=v1"
    [line] = await records(1)
    assert line["model"] == "gpt-4o-realtime-preview"
    assert line["usage"]["total_tokens"] == INPUT_TOKENS + OUTPUT_TOKENS
    assert line["cost_usd"] > 0


async def test_a_model_outside_the_keys_allowed_models_is_refused_with_403(
    gateway: TestClient, sockets: RealtimeState
) -> None:
    response = await gateway.get(PATH, headers=upgrade_headers(**auth(RESTRICTED_VK)))
    assert response.status == 403
    assert_openai_error(await response.json(), "model_not_allowed")
    assert sockets.sockets == []
    # Without a model the provider would run its default, which the key cannot be checked for.
    unnamed = await gateway.get("/v1/realtime", headers=upgrade_headers(**auth(RESTRICTED_VK)))
    assert unnamed.status == 403
    assert "names none" in (await unnamed.json())["error"]["message"]
    assert sockets.sockets == []


@pytest.mark.parametrize(
    "path",
    [
        "/v1/live/sessions?model=claude-sonnet-4-5",
        "/v1/live/sessions/live_1/fork?model=claude-sonnet-4-5",
        "/v1/live/sessions/live_1/attach?model=claude-sonnet-4-5",  # a sideband: session.update
    ],
)
async def test_a_live_session_is_refused_to_a_restricted_key_whatever_its_url_names(
    gateway: TestClient, sockets: RealtimeState, path: str
) -> None:
    # A Live session names its model in its session.start frame, not the URL (and its
    # delegations' in session.update, a sideband's too): an allowed model in the URL opened
    # it, and the frames then ran any model past allowed_models.
    response = await gateway.get(path, headers=upgrade_headers(**auth(RESTRICTED_VK)))
    status = response.status
    response.close()  # a session opened (101) would otherwise stay open
    assert status == 403
    assert sockets.sockets == []


@pytest.mark.parametrize(
    ("frames", "expected"),
    [
        pytest.param([b'{"type":"response.done"}'], None, id="no-usage"),
        pytest.param([b"response.done but not JSON"], None, id="not-json"),
        pytest.param([b'["response.done"]'], None, id="not-an-object"),
        pytest.param(
            [b'{"type":"conversation.item.created","text":"response.done"}'], None, id="other-event"
        ),
        pytest.param(
            [
                b'{"type":"response.done","response":{"usage":{"input_tokens":3,"output_tokens":4}}}',
                b'{"type":"response.done","response":{"usage":{"input_tokens":true,"output_tokens":-2}}}',
                b'{"type": "response.done", "response": {"usage": {"input_tokens": 5, "output_tokens": 1}}}',
            ],
            (8, 5),
            id="summed-and-sane",
        ),
    ],
)
def test_session_usage_reads_only_response_done_usage(
    frames: list[bytes], expected: tuple[int, int] | None
) -> None:
    responses: list[Usage] = []
    usage = SessionUsage(lambda response, **_: responses.append(response))
    for frame in frames:
        usage.read(frame)
    if expected is None:
        assert usage.total is None and responses == []
    else:
        assert usage.total is not None
        assert (usage.total.prompt_tokens, usage.total.completion_tokens) == expected
        assert [response.total_tokens for response in responses] == [7, 0, 6]


async def test_a_session_goes_to_the_route_its_model_names_with_that_targets_key(
    aiohttp_client: Callable[..., Awaitable[TestClient]],
    tmp_path: Path,
    fake_base: str,
    fake: Any,
) -> None:
    routed_real, own_real = "sk-real-routed-realtime-8888", "sk-real-own-9999999999"
    keys = {
        "providers": {
            "openai": {"base_url": f"{fake_base}/v1"},
            "voice": {"base_url": f"{fake_base}/v1"},
        },
        "virtual_keys": {
            "vk_test_routed_realtime_1": {
                "provider": "openai",
                "api_key": own_real,
                "routes": [
                    {"models": ["gpt-realtime*"], "provider": "voice", "api_key": routed_real}
                ],
            }
        },
    }
    (tmp_path / "routed.json").write_text(json.dumps(keys))
    gateway = await aiohttp_client(
        build_app(Settings.from_env({"KEYS_FILE_PATH": str(tmp_path / "routed.json")}))
    )
    ws = await connect(gateway, headers=auth("vk_test_routed_realtime_1"))
    await next_data(ws)
    await ws.close()
    assert fake.requests[-1].headers["Authorization"] == f"Bearer {routed_real}"


async def test_a_session_of_a_target_pinning_a_model_runs_that_model(
    aiohttp_client: Callable[..., Awaitable[TestClient]],
    tmp_path: Path,
    fake_base: str,
    fake: Any,
) -> None:
    """A target's `model` replaces the model a request names (docs/failover.md); a session
    went upstream with the client's `?model=` as it came, so a key pinned to a cheaper
    realtime model ran whichever its client asked for."""
    keys = {
        "providers": {"openai": {"base_url": f"{fake_base}/v1"}},
        "virtual_keys": {
            "vk_test_pinned_realtime_1": {
                "provider": "openai",
                "api_key": OPENAI_REAL,
                "model": "gpt-realtime-mini",
            }
        },
    }
    (tmp_path / "pinned.json").write_text(json.dumps(keys))
    log = tmp_path / "pinned.jsonl"
    settings = {"KEYS_FILE_PATH": str(tmp_path / "pinned.json"), "LOG_TO_FILE": "true"}
    gateway = await aiohttp_client(
        build_app(Settings.from_env({**settings, "LOG_FILE_PATH": str(log)}))
    )
    path = "/v1/realtime?model=gpt-realtime&model=gpt-4o-realtime-preview&voice=x"
    ws = await gateway.ws_connect(
        path, headers=auth("vk_test_pinned_realtime_1"), protocols=["realtime"]
    )
    await next_data(ws)
    await ws.send_str('{"type": "response.create"}')
    await next_data(ws)
    await next_data(ws)  # response.done, charged as it comes
    await ws.close()
    seen = fake.requests[-1]
    assert seen.path == "/v1/realtime"
    assert seen.query_string == "model=gpt-realtime-mini&model=gpt-realtime-mini&voice=x"
    await until(lambda: log.exists() and log.read_text().endswith("\n"), what="the log line")
    line = json.loads(log.read_text())
    prices = Prices.load(None)
    usage = Usage(
        **{k: v for k, v in line["usage"].items() if k not in ("estimated", "total_tokens")}
    )
    mini = prices.cost("openai", "gpt-realtime-mini", usage)
    assert mini is not None and mini != prices.cost("openai", "gpt-realtime", usage)
    assert line["cost_usd"] == pytest.approx(mini)
    # A session naming no model runs the provider's default, unswapped: not priced as mini.
    ws = await gateway.ws_connect(
        "/v1/realtime", headers=auth("vk_test_pinned_realtime_1"), protocols=["realtime"]
    )
    await next_data(ws)
    await ws.send_str('{"type": "response.create"}')
    await next_data(ws)
    await next_data(ws)
    await ws.close()
    assert fake.requests[-1].query_string == ""
    await until(lambda: len(log.read_text().splitlines()) == 2, what="the second log line")
    assert json.loads(log.read_text().splitlines()[1])["cost_usd"] is None


async def test_a_message_over_max_body_bytes_closes_the_session_with_1009(
    make_gateway: Callable[..., Awaitable[TestClient]],
    sockets: RealtimeState,
    records: Callable[..., Awaitable[list[dict[str, Any]]]],
) -> None:
    gateway = await make_gateway(MAX_BODY_BYTES="1000")
    ws = await connect(gateway)
    await next_data(ws)
    await ws.send_str("x" * 2000)
    close = await next_data(ws)
    assert (close.type, close.data) == (WSMsgType.CLOSE, 1009)
    socket = await fake_socket(sockets)
    await asyncio.wait_for(socket.ended.wait(), WAIT_SECONDS)
    assert socket.close is not None and socket.close[0] == 1001
    assert socket.received == []  # the message never reached the provider
    [line] = await records(1)
    assert (line["websocket"]["ended_by"], line["websocket"]["close_code"]) == (
        "client_error",
        1009,
    )


async def test_a_message_of_exactly_max_body_bytes_goes_through_both_ways(
    make_gateway: Callable[..., Awaitable[TestClient]], sockets: RealtimeState
) -> None:
    # "Over MAX_BODY_BYTES" gets 1009, as an HTTP body over it gets 413: one of it passes.
    gateway = await make_gateway(MAX_BODY_BYTES="1000")
    ws = await connect(gateway)
    await next_data(ws)
    await ws.send_bytes(b"x" * 1000)  # up, and the fake's echo of it down
    echo = await next_data(ws)
    assert (echo.type, echo.data) == (WSMsgType.BINARY, b"x" * 1000)
    await ws.close()
    await no_session_left(gateway)


async def test_a_second_model_parameter_cannot_slip_past_allowed_models(
    gateway: TestClient, sockets: RealtimeState
) -> None:
    # RESTRICTED_VK may use claude-3-5-haiku-*: the first `model` passes, the second must not.
    path = "/v1/realtime?model=claude-3-5-haiku-latest&model=gpt-realtime"
    response = await gateway.get(path, headers=upgrade_headers(**auth(RESTRICTED_VK)))
    assert response.status == 403
    assert_openai_error(await response.json(), "model_not_allowed")
    assert "gpt-realtime" in (await response.json())["error"]["message"]
    assert sockets.sockets == []


async def test_a_response_cut_by_the_session_end_is_charged_what_it_generated(
    gateway: TestClient, records: Callable[..., Awaitable[list[dict[str, Any]]]]
) -> None:
    """No response.done: its transcript and tool-call arguments are estimated, not free."""
    ws = await connect(gateway)
    await next_data(ws)
    text = "x" * 2000
    await ws.send_str(orjson.dumps({"type": "fake.generate", "text": text, "pieces": 10}).decode())
    for _ in range(2 + 2 * 10):  # created, the audio, the deltas
        await next_data(ws)
    await ws.close()
    [line] = await records(1)
    assert line["usage"]["estimated"] is True
    assert line["usage"]["completion_tokens"] == 2 * len(text) // 4  # transcript + arguments
    assert line["usage"]["prompt_tokens"] == 0


async def test_a_response_done_without_usage_is_estimated_and_the_next_reported_exactly(
    gateway: TestClient, records: Callable[..., Awaitable[list[dict[str, Any]]]]
) -> None:
    ws = await connect(gateway)
    await next_data(ws)
    command = {"type": "fake.generate", "text": "y" * 400, "pieces": 4, "done": True}
    await ws.send_str(orjson.dumps(command).decode())
    for _ in range(2 + 2 * 4 + 1):
        await next_data(ws)
    await ws.send_str('{"type": "response.create"}')
    await next_data(ws)
    await next_data(ws)
    await ws.close()
    [line] = await records(1)
    assert line["usage"]["estimated"] is True
    assert line["usage"]["completion_tokens"] == 800 // 4 + OUTPUT_TOKENS
    assert line["usage"]["prompt_tokens"] == INPUT_TOKENS


def test_session_usage_estimates_deltas_and_skips_the_audio() -> None:
    responses: list[Usage] = []
    usage = SessionUsage(lambda response, **_: responses.append(response))
    usage.read(b'{"type":"response.output_audio.delta","delta":"' + b"A" * 4000 + b'"}')
    usage.read(b'{"type":"response.text.delta","delta":"abcd"}')
    usage.read(b'{"type":"response.audio_transcript.delta","delta":"efgh"}')
    usage.read(b'{"type":"conversation.item.input_audio_transcription.delta","delta":"user"}')
    assert responses == []
    usage.finish()
    assert responses == [Usage(0, 2, estimated=True)]
    usage.finish()  # nothing more generated: nothing more charged
    assert usage.total == Usage(0, 2, estimated=True)


@pytest.mark.parametrize("has_usage", [True, False])
async def test_responses_over_a_websocket_are_charged_each_as_it_completes(
    gateway: TestClient, records: Callable[..., Awaitable[list[dict[str, Any]]]], has_usage: bool
) -> None:
    """The Responses API's WebSocket mode: response.completed's usage, else an estimate."""
    ws = await gateway.ws_connect(
        "/v1/responses?model=gpt-4o-mini", headers=auth(OPENAI_VK), autoping=False
    )
    await next_data(ws)  # session.created
    for _ in range(2):
        await ws.send_str(
            orjson.dumps({"type": "response.create", "fake_no_usage": not has_usage}).decode()
        )
        for _ in range(4):  # created, two deltas, completed
            await next_data(ws)
    await ws.close()
    [line] = await records(1)
    if has_usage:
        assert line["usage"]["estimated"] is False
        assert (line["usage"]["prompt_tokens"], line["usage"]["completion_tokens"]) == (
            2 * INPUT_TOKENS,
            2 * OUTPUT_TOKENS,
        )
        assert line["usage"]["cache_read_tokens"] == 2 * CACHED_TOKENS
    else:  # "Hello, world": 12 characters, 3 tokens a response
        assert line["usage"]["estimated"] is True
        assert (line["usage"]["prompt_tokens"], line["usage"]["completion_tokens"]) == (0, 6)


async def test_a_provider_unreachable_for_a_session_shows_in_health(
    make_gateway: Callable[..., Awaitable[TestClient]], tmp_path: Path, fake_base: str
) -> None:
    # As an HTTP request's would: the target's breaker counts the failure, /health says so.
    document = keys_document(fake_base)
    # Nothing listens on port 9 (discard) of loopback: connection refused.
    document["providers"]["gone"] = {"base_url": "http://127.0.0.1:9/v1", "auth": "bearer"}
    document["virtual_keys"][GONE_VK] = {"provider": "gone", "api_key": OPENAI_REAL}
    keys = tmp_path / "gone.json"
    keys.write_text(json.dumps(document))
    gateway = await make_gateway(KEYS_FILE_PATH=str(keys), BREAKER_FAILURES="1")
    response = await gateway.get(PATH, headers=upgrade_headers(**auth(GONE_VK)))
    assert response.status == 502
    health = await (await gateway.get("/health")).json()
    assert health["providers"]["gone"]["healthy"] is False, health
    assert "127.0.0.1:9" in health["targets"]["gone"]["last_error"], health


async def test_a_post_carrying_upgrade_websocket_is_relayed_as_the_post_it_is(
    gateway: TestClient, fake: FakeState
) -> None:
    """A WebSocket handshake is a GET (RFC 6455 §4.1). A POST naming `Upgrade: websocket`
    was taken for one: a GET handshake went upstream and the POST's body was dropped. The
    Upgrade header may be ignored (RFC 9110 §7.8): the POST goes on as any other, body and
    all, and the hop-by-hop Upgrade stays behind."""
    body = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]})
    response = await gateway.post(
        "/v1/chat/completions",
        data=body,
        headers={**upgrade_headers(**auth(OPENAI_VK)), "Content-Type": "application/json"},
    )
    assert response.status == 200, await response.text()
    seen = fake.requests[-1]
    assert (seen.method, seen.path, seen.body) == ("POST", "/v1/chat/completions", body.encode())
    assert "Upgrade" not in seen.headers


async def one_response_priced_as_the_library(
    gateway: TestClient, records: Callable[..., Awaitable[list[dict[str, Any]]]], model: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """One response of a session of `model`: its usage, and its log line, whose cost is
    what genai-prices' realtime reader and price make of that usage."""
    ws = await gateway.ws_connect(
        f"/v1/realtime?model={model}", headers=auth(OPENAI_VK), protocols=["realtime"]
    )
    await next_data(ws)
    await ws.send_str('{"type": "response.create"}')
    await next_data(ws)
    done = orjson.loads((await next_data(ws)).data)
    await ws.close()
    [line] = await records(1)
    usage = done["response"]["usage"]
    extracted = genai_prices.extract_usage(
        {"model": model, "response": {"usage": usage}}, provider_id="openai", api_flavor="realtime"
    )
    assert line["cost_usd"] == pytest.approx(float(extracted.calc_price().total_price))
    return usage, line


@pytest.mark.parametrize("model", ["gpt-realtime", "gpt-realtime-mini"])
async def test_cached_audio_input_is_charged_at_the_cached_audio_rate(
    gateway: TestClient,
    sockets: RealtimeState,
    records: Callable[..., Awaitable[list[dict[str, Any]]]],
    model: str,
) -> None:
    """A response.done's cached input is broken down by kind (`cached_tokens_details`): its
    audio is a part of both the cached and the audio input, and costs the cached audio rate
    (gpt-realtime: $0.40/M, not the audio input's $32/M), as genai-prices prices it."""
    usage, line = await one_response_priced_as_the_library(gateway, records, model)
    assert usage["input_token_details"]["cached_tokens_details"]["audio_tokens"] > 0
    assert line["usage"]["cache_audio_read_tokens"] == CACHED_AUDIO_TOKENS


@pytest.mark.parametrize("model", ["gpt-realtime", "gpt-realtime-mini"])
async def test_image_input_cached_or_not_is_charged_at_the_image_rates(
    gateway: TestClient,
    records: Callable[..., Awaitable[list[dict[str, Any]]]],
    model: str,
) -> None:
    """A response's image input (`input_token_details.image_tokens`, of them cached:
    `cached_tokens_details.image_tokens`) costs the image rates (gpt-realtime: $5/M, cached
    $0.50/M), not the text ones, as genai-prices prices it."""
    usage, line = await one_response_priced_as_the_library(gateway, records, model)
    assert usage["input_token_details"]["cached_tokens_details"]["image_tokens"] > 0
    assert line["usage"]["input_image_tokens"] == INPUT_IMAGE_TOKENS
    assert line["usage"]["cache_image_read_tokens"] == CACHED_IMAGE_TOKENS


async def test_the_transcription_of_committed_audio_is_charged_at_the_transcription_models_price(
    gateway: TestClient, records: Callable[..., Awaitable[list[dict[str, Any]]]]
) -> None:
    """A session that transcribes its input audio (session.audio.input.transcription) is
    billed for each transcription by its own usage (conversation.item.input_audio_
    transcription.completed), at the transcription model's price: the key is charged it."""
    client = AsyncOpenAI(api_key=OPENAI_VK, base_url=str(gateway.make_url("/v1")), max_retries=0)
    async with client.realtime.connect(model="gpt-realtime") as connection:
        assert (await connection.recv()).type == "session.created"
        transcription = {"model": "gpt-4o-transcribe"}
        await connection.session.update(
            session={"type": "realtime", "audio": {"input": {"transcription": transcription}}}
        )
        assert (await connection.recv()).type == "session.updated"
        await connection.input_audio_buffer.append(audio=base64.b64encode(bytes(3200)).decode())
        await connection.input_audio_buffer.commit()
        assert (await connection.recv()).type == "input_audio_buffer.committed"
        done = await connection.recv()
        assert done.type == "conversation.item.input_audio_transcription.completed"
    [line] = await records(1)
    assert (line["usage"]["prompt_tokens"], line["usage"]["completion_tokens"]) == (
        TRANSCRIBED_AUDIO_TOKENS,
        TRANSCRIPT_TOKENS,
    )
    assert line["usage"]["input_audio_tokens"] == TRANSCRIBED_AUDIO_TOKENS
    billed = LibraryUsage(
        input_tokens=TRANSCRIBED_AUDIO_TOKENS,
        input_audio_tokens=TRANSCRIBED_AUDIO_TOKENS,
        output_tokens=TRANSCRIPT_TOKENS,
    )
    price = genai_prices.calc_price(billed, "gpt-4o-transcribe", provider_id="openai")
    assert line["cost_usd"] == pytest.approx(float(price.total_price))
    usage = await (await gateway.get("/usage", headers=auth(OPENAI_VK))).json()
    assert usage["tokens"]["used"] == TRANSCRIBED_AUDIO_TOKENS + TRANSCRIPT_TOKENS


async def test_events_quoting_another_events_name_are_read_as_their_own_type(
    gateway: TestClient, records: Callable[..., Awaitable[list[dict[str, Any]]]]
) -> None:
    """Instructions that name `response.done`, a user who says it: the session.updated that
    sets the transcription model, and the transcription, are still read and charged."""
    client = AsyncOpenAI(api_key=OPENAI_VK, base_url=str(gateway.make_url("/v1")), max_retries=0)
    async with client.realtime.connect(model="gpt-realtime") as connection:
        assert (await connection.recv()).type == "session.created"
        session = {
            "type": "realtime",
            "instructions": "Call the tool after each response.done event.",
            "audio": {"input": {"transcription": {"model": "gpt-4o-transcribe"}}},
        }
        await connection.session.update(session=session)  # type: ignore[arg-type]
        assert (await connection.recv()).type == "session.updated"
        await connection.input_audio_buffer.append(audio=base64.b64encode(bytes(3200)).decode())
        said = "What does response.done mean?"
        await connection.send(
            {"type": "input_audio_buffer.commit", "fake_transcript": said}  # type: ignore[misc]
        )
        assert (await connection.recv()).type == "input_audio_buffer.committed"
        done = await connection.recv()
        assert done.type == "conversation.item.input_audio_transcription.completed"
        assert done.transcript == said
    [line] = await records(1)
    assert line["usage"] is not None
    assert (line["usage"]["prompt_tokens"], line["usage"]["completion_tokens"]) == (
        TRANSCRIBED_AUDIO_TOKENS,
        TRANSCRIPT_TOKENS,
    )
    billed = LibraryUsage(
        input_tokens=TRANSCRIBED_AUDIO_TOKENS,
        input_audio_tokens=TRANSCRIBED_AUDIO_TOKENS,
        output_tokens=TRANSCRIPT_TOKENS,
    )
    price = genai_prices.calc_price(billed, "gpt-4o-transcribe", provider_id="openai")
    assert line["cost_usd"] == pytest.approx(float(price.total_price))


async def test_a_transcription_session_is_charged_its_audio_seconds(
    gateway: TestClient, records: Callable[..., Awaitable[list[dict[str, Any]]]]
) -> None:
    """A transcription-only session (the beta's `intent=transcription`) runs no response:
    each transcription's usage (whisper-1: seconds of audio) is what it is billed."""
    ws = await gateway.ws_connect(
        "/v1/realtime?intent=transcription", headers=auth(OPENAI_VK), protocols=["realtime"]
    )
    await next_data(ws)  # session.created
    update = {"input_audio_transcription": {"model": "whisper-1"}}
    await ws.send_json({"type": "transcription_session.update", "session": update})
    assert orjson.loads((await next_data(ws)).data)["type"] == "transcription_session.updated"
    await ws.send_json({"type": "input_audio_buffer.commit"})
    await next_data(ws)  # committed
    completed = orjson.loads((await next_data(ws)).data)
    assert completed["usage"] == {"type": "duration", "seconds": TRANSCRIBED_SECONDS}
    await ws.close()
    [line] = await records(1)
    assert line["usage"]["input_audio_seconds"] == TRANSCRIBED_SECONDS
    price = genai_prices.calc_price(
        LibraryUsage(audio_seconds=TRANSCRIBED_SECONDS, input_audio_seconds=TRANSCRIBED_SECONDS),
        "whisper-1",
        provider_id="openai",
    )
    assert line["cost_usd"] == pytest.approx(float(price.total_price))


async def test_a_transcription_model_outside_the_keys_allowed_models_is_refused_in_session(
    gateway_with_keys: Callable[..., Awaitable[TestClient]], sockets: RealtimeState
) -> None:
    """A restricted key's session may not have its audio transcribed by a model outside its
    allowed_models: the session.update naming one never reaches the provider, and the client
    gets Realtime's `error` event instead (the session stays open); an allowed one passes."""
    restricted = "vk_test_realtime_restricted_7c1e"
    allowed = ["gpt-realtime", "whisper-1"]
    gateway = await gateway_with_keys(
        {restricted: {"provider": "openai", "api_key": OPENAI_REAL, "allowed_models": allowed}}
    )
    ws = await gateway.ws_connect(PATH, headers=auth(restricted), protocols=["realtime"])
    await next_data(ws)  # session.created
    socket = await fake_socket(sockets)
    ga = {"type": "realtime", "audio": {"input": {"transcription": {"model": "gpt-4o-transcribe"}}}}
    refused = [
        orjson.dumps({"type": "session.update", "event_id": "evt_1", "session": ga}).decode(),
        # The type spelled with a JSON escape is the same event to the provider.
        '{"type": "session\\u002eupdate", "session": {"input_audio_transcription": '
        '{"model": "gpt-4o-transcribe"}}}',
    ]
    errors = []
    for frame in refused:
        await ws.send_str(frame)
        errors.append(orjson.loads((await next_data(ws)).data))
    # Sent as a binary frame, whose bytes a provider's JSON reader takes as well: refused too.
    await ws.send_bytes(refused[0].replace("evt_1", "evt_2").encode())
    errors.append(orjson.loads((await next_data(ws)).data))
    for error in errors:
        assert error["type"] == "error"
        assert error["error"]["code"] == "model_not_allowed"
        assert error["error"]["type"] == "invalid_request_error"
        assert "gpt-4o-transcribe" in error["error"]["message"]
    # As the provider's own error events, it names the client event it answers.
    assert [error["error"]["event_id"] for error in errors] == ["evt_1", None, "evt_2"]
    whisper = {"input_audio_transcription": {"model": "whisper-1"}}
    await ws.send_json({"type": "session.update", "session": whisper})
    assert orjson.loads((await next_data(ws)).data)["type"] == "session.updated"
    assert [orjson.loads(data)["session"] for _, data in socket.received] == [whisper]
    # The model named twice, or as `Model`: the copy the gateway reads is allowed, the other
    # one a first-reading or case-folding server (gjson, Go's encoding/json) would run. Refused
    # as an HTTP body naming it so is (400 duplicate_field, 403).
    for spelt, code in (
        ('"model": "gpt-4o-transcribe", "model": "whisper-1"', "duplicate_field"),
        ('"model": "whisper-1", "Model": "gpt-4o-transcribe"', "model_not_allowed"),
    ):
        transcription = '{"audio": {"input": {"transcription": {' + spelt + "}}}}"
        await ws.send_str('{"type": "session.update", "session": ' + transcription + "}")
        error = orjson.loads((await next_data(ws)).data)
        assert error["type"] == "error" and error["error"]["code"] == code, error
    assert len(socket.received) == 1  # only the allowed update reached the provider
    await ws.close()
