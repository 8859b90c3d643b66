"""Streams flow chunk by chunk, end promptly when either side fails, and cancel upstream."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp.test_utils import TestClient, get_port_socket
from openai import AsyncOpenAI
from prometheus_client.parser import text_string_to_metric_families

from proxy.app import build_app
from proxy.settings import Settings
from tests.conftest import ANTHROPIC_VK, OPENAI_VK, auth, keys_document
from tests.support.bodies import chat, messages
from tests.support.fake_provider import FakeState
from tests.support.observed import assert_views_agree
from tests.support.polling import until

STREAM = chat("count", stream=True)


async def arrivals(response: aiohttp.ClientResponse) -> list[tuple[float, bytes]]:
    """Each piece of body as the client received it, with its arrival time."""
    pieces = []
    async for chunk in response.content.iter_any():
        pieces.append((time.monotonic(), chunk))
    return pieces


async def provider_saw_a_disconnect(fake: FakeState, within: float = 1.0) -> None:
    """Wait (bounded) until the fake provider saw a client leave."""
    deadline = time.monotonic() + within
    while not fake.disconnects and time.monotonic() < deadline:
        await asyncio.sleep(0.01)


async def test_twenty_chunks_fifty_ms_apart_arrive_as_twenty_arrivals_over_a_second(
    gateway: TestClient, fake: FakeState
) -> None:
    response = await gateway.post(
        "/v1/chat/completions",
        json=STREAM,
        headers={
            **auth(OPENAI_VK),
            "x-fake-chunks": "20",
            "x-fake-delay-ms": "50",
            "x-request-id": "flow-1",
        },
    )
    first = await response.content.readany()
    # What the provider had sent when the first piece came (not a clock: a loaded machine
    # may take 0.3 s to the first piece, where a buffered stream waits for the whole).
    sent_then = len(fake.sent["flow-1"])
    pieces = [(time.monotonic(), first), *await arrivals(response)]
    assert b"".join(chunk for _, chunk in pieces) == fake.sent["flow-1"]
    assert len(pieces) >= 20, f"{len(pieces)} arrivals: the stream was batched"
    whole = len(fake.sent["flow-1"])
    assert sent_then < whole / 2, f"first piece once {sent_then} of {whole} bytes went: buffered"
    spread = pieces[-1][0] - pieces[0][0]
    assert spread > 0.8, f"arrivals spread over {spread:.3f}s only"


async def test_an_anthropic_stream_flows_event_by_event(
    gateway: TestClient, fake: FakeState
) -> None:
    body = {
        "model": "claude-3-5-haiku-latest",
        "max_tokens": 64,
        "stream": True,
        "messages": [{"role": "user", "content": "x"}],
    }
    response = await gateway.post(
        "/v1/messages",
        json=body,
        headers={
            "x-api-key": ANTHROPIC_VK,
            "x-fake-chunks": "10",
            "x-fake-delay-ms": "40",
            "x-request-id": "anth-1",
        },
    )
    pieces = await arrivals(response)
    assert b"".join(chunk for _, chunk in pieces) == fake.sent["anth-1"]
    assert len(pieces) >= 10 and pieces[-1][0] - pieces[0][0] > 0.3


async def test_a_plain_chunked_body_streams_too(gateway: TestClient, fake: FakeState) -> None:
    response = await gateway.get(
        "/v1/files/file-1/content",
        headers={
            **auth(OPENAI_VK),
            "x-fake-raw-chunks": "8",
            "x-fake-delay-ms": "50",
            "x-request-id": "raw-1",
        },
    )
    pieces = await arrivals(response)
    assert b"".join(chunk for _, chunk in pieces) == fake.sent["raw-1"]
    assert len(pieces) >= 8 and pieces[-1][0] - pieces[0][0] > 0.25


async def test_a_stream_tells_a_buffering_proxy_in_front_to_pass_it_on_as_it_comes(
    gateway: TestClient,
) -> None:
    # Behind nginx with its defaults (HTTP/1.0 to the gateway, proxy_buffering on), a stream
    # came to the client whole at its end (tests/deploy/test_reverse_proxy.py runs one).
    # `X-Accel-Buffering: no` turns buffering off for the one answer (nginx reads the header
    # and does not pass it on); answers sent whole may still be buffered.
    streamed = [
        ("POST", "/v1/chat/completions", STREAM),
        ("POST", "/v1/messages", messages("count", stream=True)),
        ("GET", "/v1/files/file-1/content", None),  # a chunked body of no Content-Type
    ]
    for method, path, body in streamed:
        headers = {**auth(ANTHROPIC_VK if "messages" in path else OPENAI_VK)}
        if body is None:
            headers["x-fake-raw-chunks"] = "2"
        response = await gateway.request(method, path, json=body, headers=headers)
        await response.read()
        assert response.status == 200, path
        assert response.headers.get("x-accel-buffering") == "no", path
    response = await gateway.post("/v1/chat/completions", json=chat("hi"), headers=auth(OPENAI_VK))
    await response.read()
    assert response.status == 200 and "x-accel-buffering" not in response.headers


async def test_an_http_1_0_client_asking_keep_alive_gets_a_stream_that_ends_with_the_connection(
    gateway: TestClient, fake: FakeState
) -> None:
    # HTTP/1.0 has no chunked coding: a body of unknown length ends when the connection
    # does, so the gateway must close it, and answer nothing more on it (the next request
    # would read as the end of this body).
    body = orjson.dumps(STREAM)
    head = (
        f"POST /v1/chat/completions HTTP/1.0\r\nHost: gateway\r\n"
        f"Authorization: Bearer {OPENAI_VK}\r\nContent-Type: application/json\r\n"
        f"Connection: keep-alive\r\nx-request-id: ten-1\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    reader, writer = await asyncio.open_connection(gateway.host, gateway.port)
    try:
        writer.write(head.encode() + body + b"GET /health HTTP/1.0\r\n\r\n")
        async with asyncio.timeout(5):  # the end of the connection, not the keep-alive timer
            answer = await reader.read()
    finally:
        writer.close()
    answer_head, _, answer_body = answer.partition(b"\r\n\r\n")
    assert answer_head.startswith(b"HTTP/1.0 200"), answer_head
    assert b"keep-alive" not in answer_head.lower()
    assert answer_body == fake.sent["ten-1"]


async def test_a_stream_the_provider_cuts_is_cut_for_an_http_1_0_client_not_ended(
    gateway: TestClient,
) -> None:
    # Over HTTP/1.0 a body of unknown length ends with the connection: closed as after a
    # whole answer, a stream the provider broke off read as complete (behind nginx's
    # defaults, which speak HTTP/1.0 to the gateway, curl got a clean 200 and half an
    # answer). The connection is reset instead, as a reverse proxy does when its upstream
    # breaks, so the reader (and nginx, which then cuts its own client) sees the break.
    body = orjson.dumps(STREAM)
    head = (
        f"POST /v1/chat/completions HTTP/1.0\r\nHost: gateway\r\n"
        f"Authorization: Bearer {OPENAI_VK}\r\nContent-Type: application/json\r\n"
        f"x-fake-drop: midstream\r\nx-fake-chunks: 6\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    reader, writer = await asyncio.open_connection(gateway.host, gateway.port)
    received = b""
    try:
        writer.write(head.encode() + body)
        with pytest.raises(ConnectionResetError):
            async with asyncio.timeout(5):
                while chunk := await reader.read(65536):
                    received += chunk
    finally:
        writer.close()
    assert received.startswith(b"HTTP/1.0 200"), received[:40]


async def test_a_client_that_leaves_mid_stream_cancels_the_upstream_within_a_second(
    gateway: TestClient, fake: FakeState, records: Callable[..., Awaitable[list[dict[str, Any]]]]
) -> None:
    response = await gateway.post(
        "/v1/chat/completions",
        json=STREAM,
        headers={**auth(OPENAI_VK), "x-fake-chunks": "200", "x-fake-delay-ms": "50"},
    )
    received = b""
    while b"tok2" not in received:
        received += await response.content.readany()
    left = time.monotonic()
    response.close()  # drop the connection mid-stream
    await provider_saw_a_disconnect(fake)
    assert fake.disconnects, "the provider never saw the gateway leave"
    assert fake.disconnects[0] - left < 1.0
    (line,) = await records(1)
    assert line["status"] == 499 and line["stream"] is True
    assert line["usage"]["completion_tokens"] > 0  # what it received was produced: charged
    health = await (await gateway.get("/health")).json()
    assert (
        health["providers"]["openai"]["last_error"] is None
    )  # leaving is not the provider's fault


async def test_a_client_that_leaves_once_it_has_done_was_answered_not_cut(
    gateway: TestClient, fake: FakeState, records: Callable[..., Awaitable[list[dict[str, Any]]]]
) -> None:
    # The openai SDK before 3.x (under LangChain, LlamaIndex, LiteLLM) closes the connection
    # as soon as it reads `data: [DONE]`: when the provider's last chunk (the body's end)
    # comes after it, the client has its whole answer, and leaves before that end.
    response = await gateway.post(
        "/v1/chat/completions",
        json=chat("count", stream=True, stream_options={"include_usage": True}),
        headers={**auth(OPENAI_VK), "x-fake-hang": "end", "x-request-id": "done-1"},
    )
    received = b""
    while not received.rstrip().endswith(b"data: [DONE]"):
        chunk = await response.content.readany()
        assert chunk, f"the stream ended before [DONE]: {received!r}"
        received += chunk
    response.close()  # as the SDK does at [DONE]
    (line,) = await records(1)
    assert received == fake.sent["done-1"]
    assert line["status"] == 200 and "error" not in line
    assert line["usage"]["completion_tokens"] == 3 and line["usage"]["estimated"] is False


async def test_a_client_that_leaves_once_it_has_message_stop_was_answered_not_cut(
    gateway: TestClient, fake: FakeState, records: Callable[..., Awaitable[list[dict[str, Any]]]]
) -> None:
    # LiteLLM's synchronous Anthropic stream stops reading at the last event, message_stop,
    # and closes the connection before the body's end.
    response = await gateway.post(
        "/v1/messages",
        json=messages("count", stream=True),
        headers={**auth(ANTHROPIC_VK), "x-fake-hang": "end", "x-request-id": "stop-1"},
    )
    received = b""
    while b'"message_stop"' not in received.rstrip().rpartition(b"\n")[2]:
        chunk = await response.content.readany()
        assert chunk, f"the stream ended before message_stop: {received!r}"
        received += chunk
    response.close()
    (line,) = await records(1)
    assert received == fake.sent["stop-1"]
    assert line["status"] == 200 and "error" not in line
    assert line["usage"]["completion_tokens"] == 3 and line["usage"]["estimated"] is False


async def test_a_client_that_leaves_once_it_has_the_stop_reason_was_answered_not_cut(
    gateway: TestClient, fake: FakeState, records: Callable[..., Awaitable[list[dict[str, Any]]]]
) -> None:
    # LiteLLM's synchronous Anthropic stream reads ahead: it closes the connection once it has
    # the message_delta that says why the message stopped (and its final usage), before
    # message_stop, which carries nothing more.
    response = await gateway.post(
        "/v1/messages",
        json=messages("count", stream=True),
        headers={**auth(ANTHROPIC_VK), "x-fake-hang": "last", "x-request-id": "stop-2"},
    )
    received = b""
    while b'"stop_reason":"end_turn"' not in received:
        chunk = await response.content.readany()
        assert chunk, f"the stream ended before its message_delta: {received!r}"
        received += chunk
    response.close()
    (line,) = await records(1)
    assert received == fake.sent["stop-2"] and b"message_stop" not in received
    assert line["status"] == 200 and "error" not in line
    assert line["usage"]["completion_tokens"] == 3 and line["usage"]["estimated"] is False


@pytest.mark.parametrize(
    "framing",
    [
        {"x-fake-line-end": "crlf"},
        {"x-fake-line-end": "cr"},
        {"x-fake-split": "5"},  # the last event cut inside `data: [DONE]` and its line end
        {"x-fake-split": "1", "x-fake-line-end": "crlf"},  # and between its CR and its LF
        {"x-fake-encoding": "gzip"},
    ],
)
@pytest.mark.parametrize("dialect", ["openai", "anthropic"])
async def test_a_client_that_leaves_once_it_has_the_last_event_was_answered_in_any_framing(
    gateway: TestClient,
    fake: FakeState,
    records: Callable[..., Awaitable[list[dict[str, Any]]]],
    dialect: str,
    framing: dict[str, str],
) -> None:
    # As above (the SDK leaving at the last event, before the body's end), with the line
    # ends the SSE specification allows, the stream cut anywhere by a proxy in front of the
    # provider, or compressed: the whole answer was sent all the same.
    if dialect == "openai":
        path, key, last = "/v1/chat/completions", OPENAI_VK, b"data: [DONE]"
        body = chat("count", stream=True, stream_options={"include_usage": True})
    else:
        path, key, last = "/v1/messages", ANTHROPIC_VK, b'data: {"type":"message_stop"}'
        body = messages("count", stream=True)
    headers = {**auth(key), **framing, "x-fake-hang": "end", "x-request-id": "framed-1"}
    response = await gateway.post(path, json=body, headers=headers)
    received = b""
    while not received.rstrip().endswith(last):
        chunk = await response.content.readany()
        assert chunk, f"the stream ended before its last event: {received!r}"
        received += chunk
    response.close()
    (line,) = await records(1)
    assert line["status"] == 200 and "error" not in line
    assert line["usage"]["completion_tokens"] == 3 and line["usage"]["estimated"] is False


@pytest.mark.parametrize("ending", ["completed", "incomplete", "failed"])
async def test_a_responses_client_that_leaves_at_the_responses_end_was_answered_not_cut(
    gateway: TestClient,
    fake: FakeState,
    records: Callable[..., Awaitable[list[dict[str, Any]]]],
    ending: str,
) -> None:
    # Codex stops reading a Responses stream at its response.completed (or .incomplete,
    # .failed) and drops the connection; so does an openai SDK loop that breaks there. The
    # provider's body end comes after that last event: the client had the whole answer.
    client = AsyncOpenAI(base_url=str(gateway.make_url("/v1")), api_key=OPENAI_VK, max_retries=0)
    headers = {"x-fake-hang": "end", "x-fake-response-end": ending, "x-request-id": "ends-1"}
    try:
        stream = await client.responses.create(
            model="gpt-4o-mini", input="count", stream=True, extra_headers=headers
        )
        async for event in stream:
            if event.type == f"response.{ending}":
                break
        await stream.close()
    finally:
        await client.close()
    (line,) = await records(1)
    assert line["status"] == 200 and line.get("error") != "client closed the connection", line
    assert line["usage"]["completion_tokens"] == 3 and line["usage"]["estimated"] is False
    assert line["usage"]["prompt_tokens"] == fake.usage["ends-1"]["input_tokens"]
    await assert_views_agree(gateway, OPENAI_VK, line)


async def test_a_text_completions_client_that_leaves_at_done_was_answered_not_cut(
    gateway: TestClient, fake: FakeState, records: Callable[..., Awaitable[list[dict[str, Any]]]]
) -> None:
    # Legacy text completions end with `data: [DONE]` as chat does (the openai SDK before
    # 3.x stops reading there).
    body = {"model": "gpt-3.5-turbo-instruct", "prompt": "count", "stream": True}
    body["stream_options"] = {"include_usage": True}
    headers = {**auth(OPENAI_VK), "x-fake-hang": "end", "x-request-id": "ends-2"}
    response = await gateway.post("/v1/completions", json=body, headers=headers)
    received = b""
    while not received.rstrip().endswith(b"data: [DONE]"):
        chunk = await response.content.readany()
        assert chunk, f"the stream ended before [DONE]: {received!r}"
        received += chunk
    response.close()
    (line,) = await records(1)
    assert received == fake.sent["ends-2"]
    assert line["status"] == 200 and "error" not in line
    assert line["usage"]["completion_tokens"] == 3 and line["usage"]["estimated"] is False
    await assert_views_agree(gateway, OPENAI_VK, line)


@pytest.mark.parametrize(
    "framing",
    [
        {"x-fake-line-end": "crlf"},
        {"x-fake-line-end": "cr", "x-fake-bom": "1"},
        {"x-fake-split": "1", "x-fake-line-end": "crlf", "x-fake-bom": "1"},
        {"x-fake-split": "7", "x-fake-tool-chars": "70000", "x-fake-piece-chars": "70000"},
        {"x-fake-encoding": "gzip", "x-fake-split": "3", "x-fake-line-end": "crlf"},
    ],
)
@pytest.mark.parametrize("dialect", ["openai", "anthropic"])
async def test_every_framing_passes_byte_for_byte_and_is_charged_the_providers_usage(
    gateway: TestClient,
    fake: FakeState,
    records: Callable[..., Awaitable[list[dict[str, Any]]]],
    dialect: str,
    framing: dict[str, str],
) -> None:
    # Line ends the SSE specification allows, a BOM, the stream cut at every byte (inside a
    # CRLF, a `data:`, a character), one event of 70 KB (a tool call's arguments), gzip.
    tool = {"name": "lookup", "description": "d", "parameters": {"type": "object"}}
    if dialect == "openai":
        path, key = "/v1/chat/completions", OPENAI_VK
        body = chat("count é", stream=True, stream_options={"include_usage": True})
        body["tools"] = [{"type": "function", "function": tool}]
    else:
        path, key = "/v1/messages", ANTHROPIC_VK
        body = messages("count é", stream=True)
        body["tools"] = [{"name": "lookup", "input_schema": {"type": "object"}}]
    headers = {**auth(key), **framing, "x-request-id": "framing-1"}
    response = await gateway.post(path, json=body, headers=headers, auto_decompress=False)
    received = await response.read()
    (line,) = await records(1)
    assert received == fake.sent["framing-1"]
    assert (len(received) > 70000) is ("x-fake-tool-chars" in framing)
    assert line["status"] == 200 and "error" not in line
    reported = fake.usage["framing-1"]
    prompt = reported.get("prompt_tokens", reported.get("input_tokens"))
    completion = reported.get("completion_tokens", reported.get("output_tokens"))
    assert (line["usage"]["prompt_tokens"], line["usage"]["completion_tokens"]) == (
        prompt,
        completion,
    )
    assert line["usage"]["estimated"] is False


async def test_a_client_that_leaves_during_a_silent_upstream_still_cancels_it(
    gateway: TestClient, fake: FakeState
) -> None:
    response = await gateway.post(
        "/v1/chat/completions",
        json=STREAM,
        headers={**auth(OPENAI_VK), "x-fake-chunks": "4", "x-fake-hang": "midstream"},
    )
    await response.content.readany()
    left = time.monotonic()
    response.close()
    await provider_saw_a_disconnect(fake)
    assert fake.disconnects and fake.disconnects[0] - left < 1.0


async def test_an_upstream_that_drops_mid_stream_ends_the_clients_stream_promptly(
    gateway: TestClient, records: Callable[..., Awaitable[list[dict[str, Any]]]]
) -> None:
    started = time.monotonic()
    response = await gateway.post(
        "/v1/chat/completions",
        json=STREAM,
        headers={**auth(OPENAI_VK), "x-fake-chunks": "10", "x-fake-drop": "midstream"},
    )
    failed = False
    try:
        await response.read()
    except aiohttp.ClientPayloadError:
        failed = True  # the client sees an incomplete body, not a clean end
    assert failed and time.monotonic() - started < 2
    (line,) = await records(1)
    assert line["status"] == 200 and "broke" in line["error"]


async def test_stream_idle_timeout_bounds_the_gap_between_two_chunks(
    make_gateway: Callable[..., Awaitable[TestClient]],
    fake: FakeState,
    records: Callable[..., Awaitable[list[dict[str, Any]]]],
) -> None:
    gateway = await make_gateway(STREAM_IDLE_TIMEOUT="0.3")
    # The cut is the idle timeout's (its words in the log line), not the request timeout's
    # (minutes): the bound only keeps a regression from hanging the run, with room for a
    # loaded machine (a bound of 2 s once failed there).
    async with asyncio.timeout(30):
        response = await gateway.post(
            "/v1/chat/completions",
            json=STREAM,
            headers={**auth(OPENAI_VK), "x-fake-chunks": "6", "x-fake-hang": "midstream"},
        )
        with pytest.raises(aiohttp.ClientPayloadError):
            await response.read()
    (line,) = await records(1)
    assert "nothing for 0.3 seconds" in line["error"]
    await provider_saw_a_disconnect(fake)
    assert fake.disconnects, "the silent upstream request was not closed"


async def test_a_slow_stream_within_the_idle_timeout_is_not_cut(
    make_gateway: Callable[..., Awaitable[TestClient]],
) -> None:
    # 1 s: gaps of 0.2 s stay under it with room for a loaded machine's stalls.
    gateway = await make_gateway(STREAM_IDLE_TIMEOUT="1")
    response = await gateway.post(
        "/v1/chat/completions",
        json=STREAM,
        headers={**auth(OPENAI_VK), "x-fake-chunks": "5", "x-fake-delay-ms": "200"},
    )
    body = await response.read()  # 8 events, 1.4 s in all, but no gap near 1 s
    assert body.endswith(b"data: [DONE]\n\n")


async def test_a_client_that_stops_reading_is_the_clients_fault_not_the_providers(
    make_gateway: Callable[..., Awaitable[TestClient]],
    records: Callable[..., Awaitable[list[dict[str, Any]]]],
) -> None:
    gateway = await make_gateway(STREAM_IDLE_TIMEOUT="0.5")
    # A raw socket that reads the response head, then nothing more, while the provider
    # keeps sending (200 chunks of 256 KiB: far more than the socket buffers hold).
    reader, writer = await asyncio.open_connection(gateway.host, gateway.port)
    writer.write(
        b"GET /v1/download HTTP/1.1\r\nHost: gateway\r\n"
        + f"Authorization: Bearer {OPENAI_VK}\r\n".encode()
        + b"x-fake-raw-chunks: 200\r\nx-fake-raw-bytes: 262144\r\n\r\n"
    )
    await writer.drain()
    assert (await reader.readline()).startswith(b"HTTP/1.1 200")
    (line,) = await records(1, timeout=10.0)  # written once the gateway gave up on the client
    writer.close()
    assert line["status"] == 499
    assert "client read nothing for 0.5 seconds" in line["error"]
    report = await (await gateway.get("/health")).json()
    assert report["providers"]["openai"] == {"keys": 2, "healthy": True, "last_error": None}
    metrics = await (await gateway.get("/metrics")).text()
    upstream_errors = [
        sample.value
        for family in text_string_to_metric_families(metrics)
        for sample in family.samples
        if sample.name == "llm_gateway_upstream_errors_total"
    ]
    assert sum(upstream_errors) == 0


CACHED_VK = "vk_test_cached_7e5d3c1b9a"


def cached_key_settings(
    settings: Callable[..., Settings], fake_base: str, tmp_path: Path, idle: str
) -> Settings:
    """Settings with the test keys plus CACHED_VK, a key whose answers are cached, and
    STREAM_IDLE_TIMEOUT `idle`."""
    document = keys_document(fake_base)
    document["virtual_keys"][CACHED_VK] = {
        "provider": "openai",
        "api_key": "sk-real-cached-0123456789",
        "name": "cached",
        "cache": {"ttl_seconds": 600},
    }
    keys = tmp_path / "cached-keys.json"
    keys.write_text(json.dumps(document))
    return settings(STREAM_IDLE_TIMEOUT=idle, KEYS_FILE_PATH=str(keys))


def small_send_buffers(host: str, port: int, family: socket.AddressFamily) -> socket.socket:
    """The gateway's listening socket; the connections it accepts inherit a send buffer of a
    few KiB (as a slow client far away sees it), so an answer waits in the gateway's own
    buffer, not the kernel's, while the client reads nothing."""
    listener = get_port_socket(host, port, family)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    return listener


STREAM_BYTES = 64 * 1024 * 1024  # one tool call's arguments, in events of 64 KiB


async def stalled_reader(
    gateway: TestClient, request_id: str
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A client with a 4 KiB receive buffer that asks for a 64 MiB stream, reads its head,
    then nothing more."""
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.setblocking(False)
    await asyncio.get_running_loop().sock_connect(client, (gateway.host, gateway.port))
    reader, writer = await asyncio.open_connection(sock=client)
    body = chat("count", stream=True)
    body["tools"] = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    raw = orjson.dumps(body)
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: gateway\r\n"
        + f"Authorization: Bearer {OPENAI_VK}\r\nx-request-id: {request_id}\r\n".encode()
        + f"x-fake-tool-chars: {STREAM_BYTES}\r\nx-fake-piece-chars: 65536\r\n".encode()
        + f"Content-Type: application/json\r\nContent-Length: {len(raw)}\r\n\r\n".encode()
        + raw
    )
    await writer.drain()
    assert (await reader.readline()).startswith(b"HTTP/1.1 200")
    return reader, writer


async def test_a_stream_a_client_stops_reading_holds_the_provider_back_then_lets_it_go(
    aiohttp_client: Callable[..., Awaitable[TestClient]],
    settings: Callable[..., Settings],
    fake: FakeState,
    records: Callable[..., Awaitable[list[dict[str, Any]]]],
) -> None:
    # The gateway reads from the provider only as fast as the client takes: what the
    # provider could send is what the buffers on the way hold, not the 64 MiB stream.
    app = build_app(settings(STREAM_IDLE_TIMEOUT="1"))
    gateway = await aiohttp_client(app, server_kwargs={"socket_factory": small_send_buffers})
    _, writer = await stalled_reader(gateway, "stalled-1")
    try:
        (line,) = await records(1, timeout=20.0)  # once the gateway gave up on the client
    finally:
        writer.close()
    assert len(fake.sent["stalled-1"]) < STREAM_BYTES // 4
    assert (line["status"], line["error"]) == (499, "the client read nothing for 1 seconds")
    assert line["usage"]["prompt_tokens"] > 0 and line["usage"]["completion_tokens"] > 0
    await until(lambda: fake.open_now == 0, what="the upstream request to end")
    assert fake.disconnects, "the upstream connection was not closed"
    answer = await gateway.post("/v1/chat/completions", json=STREAM, headers=auth(OPENAI_VK))
    assert (await answer.read()).endswith(b"data: [DONE]\n\n")


async def test_a_client_that_stops_reading_and_leaves_is_logged_charged_and_let_go(
    aiohttp_client: Callable[..., Awaitable[TestClient]],
    settings: Callable[..., Settings],
    fake: FakeState,
    records: Callable[..., Awaitable[list[dict[str, Any]]]],
) -> None:
    # No idle timeout to end it: the client itself leaves while the gateway waits to write.
    app = build_app(settings())
    gateway = await aiohttp_client(app, server_kwargs={"socket_factory": small_send_buffers})
    _, writer = await stalled_reader(gateway, "stalled-2")
    await until(lambda: len(fake.sent.get("stalled-2", b"")) > 1 << 20, what="1 MiB sent")
    writer.close()
    (line,) = await records(1)
    assert (line["status"], line["error"]) == (499, "client closed the connection")
    assert line["usage"]["prompt_tokens"] > 0 and line["usage"]["completion_tokens"] > 0
    await until(lambda: fake.open_now == 0, what="the upstream request to end")
    assert fake.disconnects, "the upstream connection was not closed"
    assert len(fake.sent["stalled-2"]) < STREAM_BYTES // 4
    answer = await gateway.post("/v1/chat/completions", json=STREAM, headers=auth(OPENAI_VK))
    assert (await answer.read()).endswith(b"data: [DONE]\n\n")


async def test_a_client_that_stops_reading_a_whole_answer_is_cut_as_a_streams_is(
    aiohttp_client: Callable[..., Awaitable[TestClient]],
    settings: Callable[..., Settings],
    records: Callable[..., Awaitable[list[dict[str, Any]]]],
) -> None:
    # An answer of known length up to 1 MiB goes out in one write; a client that read none
    # of it held its request in flight (its slot, its log line) until it left, for ever.
    app = build_app(settings(STREAM_IDLE_TIMEOUT="0.5"))
    gateway = await aiohttp_client(app, server_kwargs={"socket_factory": small_send_buffers})
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.setblocking(False)
    await asyncio.get_running_loop().sock_connect(client, (gateway.host, gateway.port))
    reader, writer = await asyncio.open_connection(sock=client)
    writer.write(
        b"GET /v1/download HTTP/1.1\r\nHost: gateway\r\n"
        + f"Authorization: Bearer {OPENAI_VK}\r\n".encode()
        + b"x-fake-raw-chunks: 3\r\nx-fake-raw-bytes: 300000\r\nx-fake-sized: 1\r\n\r\n"
    )
    try:
        await writer.drain()
        assert (await reader.readline()).startswith(b"HTTP/1.1 200")
        lines = await records(1, timeout=10.0)  # written once the gateway gave up on the client
    finally:
        writer.close()
    assert [(line["status"], line["error"]) for line in lines] == [
        (499, "the client read nothing for 0.5 seconds")
    ]


async def test_a_client_that_stops_reading_a_cached_answer_is_cut_too(
    aiohttp_client: Callable[..., Awaitable[TestClient]],
    settings: Callable[..., Settings],
    records: Callable[..., Awaitable[list[dict[str, Any]]]],
    fake_base: str,
    tmp_path: Path,
) -> None:
    app = build_app(cached_key_settings(settings, fake_base, tmp_path, "0.5"))
    gateway = await aiohttp_client(app, server_kwargs={"socket_factory": small_send_buffers})
    body = orjson.dumps(chat("the same question"))
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: gateway\r\n"
        b"Authorization: Bearer vk_test_cached_7e5d3c1b9a\r\nContent-Type: application/json\r\n"
        b"x-fake-chunks: 100000\r\nContent-Length: %d\r\n\r\n" % len(body)
    )
    reader, writer = await asyncio.open_connection(gateway.host, gateway.port)
    writer.write(head + body)  # the same request, read whole: its answer is stored
    answer_head = await reader.readuntil(b"\r\n\r\n")
    length = int(answer_head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    assert length > 500_000 and len(await reader.readexactly(length)) == length
    writer.close()
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.setblocking(False)
    await asyncio.get_running_loop().sock_connect(client, (gateway.host, gateway.port))
    reader, writer = await asyncio.open_connection(sock=client)
    writer.write(head + body)
    try:
        await writer.drain()
        assert (await reader.readline()).startswith(b"HTTP/1.1 200")
        lines = await records(2, timeout=10.0)  # the hit's, once the gateway gave up on it
    finally:
        writer.close()
    assert [(line["status"], line["cache"], line.get("error")) for line in lines] == [
        (200, "miss", None),
        (499, "hit", "the client read nothing for 0.5 seconds"),
    ]


class ScriptedBody:
    """A provider's body as the wire hands it over: chunks the test gives, in order."""

    def __init__(self, chunks: list[bytes], *, is_whole: bool = False) -> None:
        self.chunks: asyncio.Queue[bytes] = asyncio.Queue()
        for chunk in chunks:
            self.chunks.put_nowait(chunk)
        self.is_whole = is_whole  # the body's end has come (all its chunks are queued)

    def has_arrived(self) -> bool:
        return self.is_whole

    async def readany(self) -> bytes:
        return await self.chunks.get()


class CountedTransport:
    """The connection's transport, counting the writes that reach it."""

    def __init__(self, transport: Any) -> None:
        self.transport, self.writes = transport, 0

    def write(self, data: bytes) -> None:
        self.writes += 1
        self.transport.write(data)

    def writelines(self, data: Any) -> None:
        self.writes += 1
        self.transport.writelines(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.transport, name)


async def relayed_stream(
    aiohttp_client: Any, body: ScriptedBody
) -> tuple[TestClient, list[CountedTransport]]:
    """A server whose one handler relays `body` as a provider's event stream."""
    from aiohttp import web
    from multidict import CIMultiDict, CIMultiDictProxy

    from proxy.record import Record
    from proxy.relay.relay import HeldHead, relay_body
    from proxy.relay.silence import Silences
    from proxy.usage.usage import Charged, TapMemory, UsageTap

    counted: list[CountedTransport] = []
    headers = CIMultiDictProxy(CIMultiDict({"Content-Type": "text/event-stream"}))

    class Reply:
        status, reason, content = 200, "OK", body

    async def handler(request: web.Request) -> web.StreamResponse:
        counted.append(CountedTransport(request.protocol.transport))
        request.protocol.transport = counted[-1]  # type: ignore[assignment]
        response = HeldHead(status=200, headers=headers)
        writer = await response.prepare(request)
        assert writer is not None
        tap = UsageTap("text/event-stream", None, False, Charged.TEXT, TapMemory(), "/v1/x")
        record = Record.begin(None, "POST", "/v1/chat/completions")
        await relay_body(Reply(), response, writer, tap, record, Silences(60.0))  # type: ignore[arg-type]
        return response

    app = web.Application()
    app.router.add_post("/", handler)
    return await aiohttp_client(app), counted


async def test_the_head_goes_out_alone_when_the_first_chunk_has_to_be_waited_for(
    aiohttp_client: Any,
) -> None:
    body = ScriptedBody([])
    client, _ = await relayed_stream(aiohttp_client, body)
    response = await asyncio.wait_for(client.post("/"), 5)  # the head came, the chunk not
    assert response.status == 200 and body.chunks.empty()
    body.chunks.put_nowait(b"data: 1\n\n")
    body.chunks.put_nowait(b"")
    assert await response.read() == b"data: 1\n\n"


async def test_chunks_at_hand_go_with_the_head_and_the_end_in_one_write_each(
    aiohttp_client: Any,
) -> None:
    # The head and the first chunk in one write; the last chunk and the end in one write.
    body = ScriptedBody([b"data: 1\n\n", b"data: 2\n\n", b""], is_whole=True)
    client, counted = await relayed_stream(aiohttp_client, body)
    response = await client.post("/")
    assert await response.read() == b"data: 1\n\ndata: 2\n\n"
    assert counted[0].writes == 2


async def read_steadily(gateway: TestClient, request: bytes, pace: float = 0.01) -> bytes:
    """A client on a slow link (a 4 KiB receive buffer) that sends `request`, then reads
    its answer 4 KiB at a time, one read every `pace` seconds, to the end: always taking
    some, never stalled. What it got, up to the end or a reset (a gateway that cut it)."""
    received = bytearray()
    with socket.socket() as client:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        client.setblocking(False)
        loop = asyncio.get_running_loop()
        await loop.sock_connect(client, (gateway.host, gateway.port))
        await loop.sock_sendall(client, request)
        try:
            while piece := await loop.sock_recv(client, 4096):
                received += piece
                await asyncio.sleep(pace)  # the link's pace, not a wait for something
        except ConnectionResetError:
            pass
    return bytes(received)


async def test_a_client_that_reads_a_large_chunk_slowly_but_steadily_is_not_cut(
    aiohttp_client: Callable[..., Awaitable[TestClient]],
    settings: Callable[..., Settings],
    fake: FakeState,
    records: Callable[..., Awaitable[list[dict[str, Any]]]],
) -> None:
    # A provider that sends 256 KiB chunks at once, and a client on a slow link that takes
    # each in about a second, never stopping: nobody was silent for STREAM_IDLE_TIMEOUT,
    # yet the gateway noted progress only when a whole chunk's write finished, and cut
    # the client as one that "read nothing".
    app = build_app(settings(STREAM_IDLE_TIMEOUT="0.3"))
    gateway = await aiohttp_client(app, server_kwargs={"socket_factory": small_send_buffers})
    request = (
        b"GET /v1/download HTTP/1.1\r\nHost: gateway\r\nConnection: close\r\n"
        + f"Authorization: Bearer {OPENAI_VK}\r\nx-request-id: steady-1\r\n".encode()
        + b"x-fake-raw-chunks: 3\r\nx-fake-raw-bytes: 262144\r\n\r\n"
    )
    received = await read_steadily(gateway, request)
    (line,) = await records(1)
    assert (line["status"], line.get("error")) == (200, None)
    assert received.endswith(b"0\r\n\r\n") and fake.sent["steady-1"][-6:] in received


async def test_a_client_that_reads_a_whole_answer_slowly_but_steadily_is_not_cut(
    aiohttp_client: Callable[..., Awaitable[TestClient]],
    settings: Callable[..., Settings],
    fake: FakeState,
    records: Callable[..., Awaitable[list[dict[str, Any]]]],
) -> None:
    # An answer of known length up to 1 MiB goes out in one write: a client on a slow link
    # that kept reading it for longer than STREAM_IDLE_TIMEOUT was cut, where the same
    # answer 1 byte over 1 MiB, streamed, was not.
    app = build_app(settings(STREAM_IDLE_TIMEOUT="0.3"))
    gateway = await aiohttp_client(app, server_kwargs={"socket_factory": small_send_buffers})
    request = (
        b"GET /v1/download HTTP/1.1\r\nHost: gateway\r\nConnection: close\r\n"
        + f"Authorization: Bearer {OPENAI_VK}\r\nx-request-id: steady-2\r\n".encode()
        + b"x-fake-raw-chunks: 3\r\nx-fake-raw-bytes: 300000\r\nx-fake-sized: 1\r\n\r\n"
    )
    received = await read_steadily(gateway, request)
    (line,) = await records(1)
    assert (line["status"], line.get("error")) == (200, None)
    assert received.endswith(fake.sent["steady-2"])


async def test_a_client_that_reads_a_cached_answer_slowly_but_steadily_is_not_cut(
    aiohttp_client: Callable[..., Awaitable[TestClient]],
    settings: Callable[..., Settings],
    records: Callable[..., Awaitable[list[dict[str, Any]]]],
    fake_base: str,
    tmp_path: Path,
) -> None:
    app = build_app(cached_key_settings(settings, fake_base, tmp_path, "0.3"))
    gateway = await aiohttp_client(app, server_kwargs={"socket_factory": small_send_buffers})
    body = orjson.dumps(chat("the same question"))
    request = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: gateway\r\nConnection: close\r\n"
        b"Authorization: Bearer vk_test_cached_7e5d3c1b9a\r\n"
        b"Content-Type: application/json\r\nx-fake-chunks: 60000\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body)
    ) + body
    stored = await read_steadily(gateway, request, pace=0)  # the answer, now stored
    assert len(stored) > 300_000 and b"x-llm-gateway-cache: miss" in stored.lower()
    received = await read_steadily(gateway, request)  # the hit, on a slow link
    assert b"x-llm-gateway-cache: hit" in received.lower()
    lines = await records(2)
    assert [(line["status"], line["cache"], line.get("error")) for line in lines] == [
        (200, "miss", None),
        (200, "hit", None),
    ]


async def test_a_client_cut_for_reading_nothing_lets_its_connection_go(
    aiohttp_client: Callable[..., Awaitable[TestClient]],
    settings: Callable[..., Settings],
    records: Callable[..., Awaitable[list[dict[str, Any]]]],
) -> None:
    # A client whose app hangs (or a phone whose link died with no FIN): its socket stays
    # open and reads nothing. The gateway cut its stream at STREAM_IDLE_TIMEOUT, then closed
    # the connection politely: the close waited for the client to take what was buffered,
    # for ever, so the connection (one of MAX_CONNECTIONS) and its buffer were held.
    app = build_app(settings(STREAM_IDLE_TIMEOUT="0.5"))
    gateway = await aiohttp_client(app, server_kwargs={"socket_factory": small_send_buffers})
    reader, writer = await stalled_reader(gateway, "hung-1")
    try:
        (line,) = await records(1, timeout=20.0)  # once the gateway gave up on the client
        assert (line["status"], line["error"]) == (499, "the client read nothing for 0.5 seconds")
        server = gateway.server.runner.server
        assert server is not None
        await until(lambda: not server.connections, what="the connection to be let go")
    finally:
        writer.close()


async def test_an_answered_connection_whose_client_takes_nothing_more_is_let_go(
    aiohttp_client: Callable[..., Awaitable[TestClient]],
    settings: Callable[..., Settings],
    records: Callable[..., Awaitable[list[dict[str, Any]]]],
) -> None:
    # The answer's last write went to the transport's buffer (under its high-water mark), so
    # the request ended answered; then the client hung, its socket open, reading nothing.
    # The keep-alive timer closed the connection politely: the close waited for the client
    # to take the rest first, for ever, and the connection (one of MAX_CONNECTIONS) stayed.
    from proxy.runtime.server import drop_unread

    def listener(host: str, port: int, family: socket.AddressFamily) -> socket.socket:
        sock = small_send_buffers(host, port, family)
        drop_unread(sock, 0.5)  # as `listen` does, with STREAM_IDLE_TIMEOUT
        return sock

    app = build_app(settings(STREAM_IDLE_TIMEOUT="0.5"))
    server_kwargs = {"socket_factory": listener, "keepalive_timeout": 0.5}
    gateway = await aiohttp_client(app, server_kwargs=server_kwargs)
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(client, (gateway.host, gateway.port))
    try:
        await loop.sock_sendall(
            client,
            b"GET /v1/download HTTP/1.1\r\nHost: gateway\r\n"
            + f"Authorization: Bearer {OPENAI_VK}\r\n".encode()
            + b"x-fake-raw-chunks: 1\r\nx-fake-raw-bytes: 50000\r\nx-fake-sized: 1\r\n\r\n",
        )
        (line,) = await records(1)
        assert line["status"] == 200
        server = gateway.server.runner.server
        assert server is not None
        await until(lambda: not server.connections, within=10, what="the connection to go")
    finally:
        client.close()


@pytest.mark.skipif(not hasattr(socket, "TCP_USER_TIMEOUT"), reason="Linux only")
async def test_the_gateways_listener_lets_a_client_leave_its_answer_unread_twice_the_idle_time(
    settings: Callable[..., Settings],
) -> None:
    from aiohttp import web

    from proxy.runtime.server import listen

    server = web.Server(lambda request: web.Response())  # type: ignore[arg-type, return-value]
    serving = settings(SERVER_HOST="127.0.0.1", SERVER_PORT="0", STREAM_IDLE_TIMEOUT="7")
    listener = await listen(server, serving, False)
    try:
        (sock,) = listener.sockets
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 14_000
    finally:
        listener.close()


async def test_the_gateways_client_connections_keep_tcp_keep_alive_on(
    settings: Callable[..., Settings],
) -> None:
    # aiohttp turns SO_KEEPALIVE on for each connection; the gateway's own handler does it in
    # its place, on the socket it reads for its descriptor (runtime.server.listen).
    from aiohttp import web

    from proxy.runtime.server import listen

    async def answer(request: web.BaseRequest) -> web.Response:
        return web.Response()

    server = web.Server(answer)
    listener = await listen(server, settings(SERVER_HOST="127.0.0.1", SERVER_PORT="0"), False)
    try:
        port = listener.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await reader.readline()).startswith(b"HTTP/1.1 200")
        (transport,) = server._connections.values()
        sock = transport.get_extra_info("socket")
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        writer.close()
    finally:
        listener.close()


@pytest.mark.parametrize(
    ("path", "key", "body"),
    [
        (
            "/v1/chat/completions",
            OPENAI_VK,
            chat("count", stream=True, stream_options={"include_usage": True}),
        ),
        ("/v1/messages", ANTHROPIC_VK, messages("count", stream=True)),
        ("/v1/responses", OPENAI_VK, {"model": "gpt-4o-mini", "input": "count", "stream": True}),
    ],
)
async def test_a_stream_sent_without_a_content_type_is_charged_the_providers_usage(
    gateway: TestClient,
    records: Callable[..., Awaitable[list[dict[str, Any]]]],
    path: str,
    key: str,
    body: dict[str, Any],
) -> None:
    # Some OpenAI-compatible servers send a stream unlabelled (no Content-Type, or
    # application/octet-stream): the SDKs read it as the event stream it is, and so does the
    # usage: not an estimate of every byte of its events (about 70 times the answer's tokens).
    headers = {**auth(key), "x-fake-chunks": "50", "x-fake-untyped": "1"}
    response = await gateway.post(path, json=body, headers=headers)
    assert response.status == 200 and "Content-Type" not in response.headers
    assert b"tok49" in await response.read()
    [line] = await records(1)
    assert line["usage"]["completion_tokens"] == 50
    assert line["usage"]["estimated"] is False
