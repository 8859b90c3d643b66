"""A provider's head as the client gets it, byte for byte: raw sockets at both ends."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from proxy.app import CACHE
from tests.conftest import OPENAI_VK, keys_document
from tests.support.bodies import chat
from tests.support.raw_servers import RawServer

CACHED_VK = "vk_test_head_bytes_cached_3c5e7a9b"
# A value in Latin-1 (a 0xE9), and obs-text that is no encoding at all (RFC 9110 §5.5):
# neither is UTF-8, so nothing that decodes the head and encodes it again keeps them.
LATIN_1 = b"X-Provider-Note: caf\xe9 cr\xe8me\r\n"
OBS_TEXT = b"X-Opaque: a\x80\xff\xfez\r\n"
UTF_8 = b"X-Utf8: r\xc3\xa9sum\xc3\xa9\r\n"
FIELDS = LATIN_1 + OBS_TEXT + UTF_8


Handle = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
Provider = Callable[..., Awaitable[tuple[TestClient, RawServer]]]


@pytest.fixture
async def raw_gateway(
    tmp_path: Path, make_gateway: Callable[..., Awaitable[TestClient]]
) -> AsyncIterator[Provider]:
    """A factory: a gateway in front of a TCP server that writes `answer` to every request,
    as it is, then closes the connection (or, `answer` a handler, lets it speak); its keys
    include one with a cache."""
    servers: list[RawServer] = []

    async def make(answer: bytes | Handle, **env: str) -> tuple[TestClient, RawServer]:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            if callable(answer):
                await answer(reader, writer)
                return
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(
                (
                    int(line.partition(b":")[2])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                ),
                0,
            )
            await reader.readexactly(length)
            writer.write(answer)
            await writer.drain()
            writer.close()

        server = await RawServer.start(handle, "127.0.0.1", 0)
        servers.append(server)
        port = server.sockets[0].getsockname()[1]
        document = keys_document(f"http://127.0.0.1:{port}")
        document["virtual_keys"][CACHED_VK] = {
            "provider": "openai",
            "api_key": "sk-real-head-bytes-0123456789",
            "cache": {"ttl_seconds": 60},
        }
        path = tmp_path / f"keys-raw-{len(servers)}.json"
        path.write_text(json.dumps(document))
        return await make_gateway(KEYS_FILE_PATH=str(path), **env), server

    yield make
    for server in servers:
        server.close()
        await server.wait_closed()


async def exchange(gateway: TestClient, request: bytes) -> bytes:
    """What a raw client reads to the connection's end for `request`."""
    reader, writer = await asyncio.open_connection(gateway.host, gateway.port)
    try:
        writer.write(request)
        async with asyncio.timeout(5):
            return await reader.read()
    finally:
        writer.close()


def post(path: str, key: str, body: bytes) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: gateway\r\nAuthorization: Bearer {key}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode() + body


def head_of(answer: bytes) -> bytes:
    return answer.partition(b"\r\n\r\n")[0] + b"\r\n"


COMPLETION = json.dumps(
    {
        "id": "c1",
        "object": "chat.completion",
        "model": "gpt-4o-mini",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}}],
        "usage": {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9},
    }
).encode()
EVENTS = b'data: {"id":"c1","choices":[{"index":0,"delta":{"content":"hi"}}]}\n\ndata: [DONE]\n\n'


@pytest.mark.parametrize(
    "answer",
    [
        # a whole answer of known length (sent in one write)
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
        + FIELDS
        + b"Content-Length: %d\r\n\r\n" % len(COMPLETION)
        + COMPLETION,
        # a stream (its head held for its first chunk)
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
        + FIELDS
        + b"Transfer-Encoding: chunked\r\n\r\n"
        + b"%x\r\n%s\r\n0\r\n\r\n" % (len(EVENTS), EVENTS),
        # a provider's error, passed through
        b"HTTP/1.1 429 Too Many Requests\r\nContent-Type: application/json\r\n"
        + FIELDS
        + b'Content-Length: 11\r\n\r\n{"error":1}',
    ],
    ids=["whole", "stream", "error"],
)
async def test_header_bytes_that_are_not_utf8_reach_the_client_as_the_provider_sent_them(
    raw_gateway: Provider, answer: bytes, records: Callable[..., Awaitable[list[dict[str, Any]]]]
) -> None:
    gateway, _ = await raw_gateway(answer)
    got = await exchange(
        gateway, post("/v1/chat/completions", OPENAI_VK, json.dumps(chat("hi")).encode())
    )
    head = head_of(got)
    for field in (LATIN_1, OBS_TEXT, UTF_8):
        assert field in head, head
    body = EVENTS if b"chunked" in answer else answer.partition(b"\r\n\r\n")[2]
    assert body in got  # and the body as it came
    (line,) = await records(1)
    assert line["status"] == int(answer[9:12])


async def test_a_provider_request_id_that_is_not_utf8_is_logged_readable(
    raw_gateway: Provider, records: Callable[..., Awaitable[list[dict[str, Any]]]]
) -> None:
    answer = (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json; charset=caf\xe9\r\n"
        b"X-Request-Id: req-\xe9\xff-1\r\n"
        + FIELDS
        + b"Content-Length: %d\r\n\r\n" % len(COMPLETION)
        + COMPLETION
    )
    gateway, _ = await raw_gateway(answer, LOG_BODIES="true")
    got = await exchange(
        gateway, post("/v1/chat/completions", OPENAI_VK, json.dumps(chat("hi")).encode())
    )
    assert b"charset=caf\xe9\r\n" in head_of(got)
    (line,) = await records(1)
    assert line["status"] == 200
    assert line["provider_request_id"] == "req-\ufffd\ufffd-1"
    assert line["usage"]["total_tokens"] == 9


async def test_a_cache_hit_replays_header_bytes_that_are_not_utf8_as_the_miss_sent_them(
    raw_gateway: Provider,
) -> None:
    answer = (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
        + FIELDS
        + b"Content-Length: %d\r\n\r\n" % len(COMPLETION)
        + COMPLETION
    )
    gateway, _ = await raw_gateway(answer)
    request = post("/v1/chat/completions", CACHED_VK, json.dumps(chat("hi")).encode())
    miss = await exchange(gateway, request)
    await gateway.app[CACHE].settled()
    hit = await exchange(gateway, request)
    assert b"x-llm-gateway-cache: miss\r\n" in head_of(miss)
    assert b"x-llm-gateway-cache: hit\r\n" in head_of(hit)
    for field in (LATIN_1, OBS_TEXT, UTF_8):
        assert field in head_of(hit), head_of(hit)
    assert hit.endswith(COMPLETION)


WEBSOCKET_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


async def handshake(raw_gateway: Provider) -> bytes:
    """The head a raw client reads for its Realtime handshake, which the provider (a TCP
    server) answers with FIELDS and an X-Request-Id in Latin-1, then holds open. The gateway
    reads that answer with aiohttp's client, which holds such bytes as lone surrogates."""

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        key = next(
            line.partition(b":")[2].strip()
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"sec-websocket-key:")
        )
        accepted = base64.b64encode(hashlib.sha1(key + WEBSOCKET_GUID).digest())
        writer.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: "
            + accepted
            + b"\r\nX-Request-Id: req-\xe9-2\r\n"
            + FIELDS
            + b"\r\n"
        )
        await reader.read()  # until the gateway closes the session

    gateway, _ = await raw_gateway(accept)
    reader, writer = await asyncio.open_connection(gateway.host, gateway.port)
    try:
        writer.write(
            f"GET /v1/realtime?model=gpt-realtime HTTP/1.1\r\nHost: gateway\r\n"
            f"Authorization: Bearer {OPENAI_VK}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        async with asyncio.timeout(5):
            head = await reader.readuntil(b"\r\n\r\n")
    finally:
        writer.close()
    assert head.startswith(b"HTTP/1.1 101 "), head
    return head


async def test_a_websocket_session_whose_provider_request_id_is_not_utf8_is_logged(
    raw_gateway: Provider, records: Callable[..., Awaitable[list[dict[str, Any]]]]
) -> None:
    await handshake(raw_gateway)
    (line,) = await records(1)
    assert line["provider_request_id"] == "req-\ufffd-2"


async def test_a_websocket_handshakes_header_bytes_that_are_not_utf8_reach_the_client(
    raw_gateway: Provider,
) -> None:
    head = await handshake(raw_gateway)
    for field in (LATIN_1, OBS_TEXT, UTF_8):
        assert field in head, head
