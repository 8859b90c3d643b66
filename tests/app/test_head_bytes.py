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
from tests.conftest import ANTHROPIC_VK, OPENAI_REAL, OPENAI_VK, keys_document
from tests.support.bodies import chat, messages
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


# --- the status line's reason phrase ----------------------------------------------------


def asked(path: str, key: str, body: dict[str, Any], **knobs: str) -> bytes:
    """A raw POST with the fake provider's knobs (x-fake-*) as headers."""
    lines = "".join(
        f"x-fake-{name.replace('_', '-')}: {value}\r\n" for name, value in knobs.items()
    )
    data = json.dumps(body).encode()
    request = post(path, key, data)
    return request.replace(b"\r\n\r\n", b"\r\n" + lines.encode() + b"\r\n", 1)


CHATS = ("/v1/chat/completions", OPENAI_VK)
MESSAGES = ("/v1/messages", ANTHROPIC_VK)


@pytest.mark.parametrize(
    ("request_bytes", "line"),
    [
        # a whole JSON answer, a phrase of the provider's own on a standard code
        (asked(*CHATS, chat(), reason="Fine Thanks"), b"200 Fine Thanks"),
        # event streams (their heads held for their first chunks)
        (asked(*CHATS, chat(stream=True), reason="Streaming"), b"200 Streaming"),
        (asked(*MESSAGES, messages(stream=True), reason="Here Goes"), b"200 Here Goes"),
        # a provider's errors: a code of its own (no standard phrase), a standard one
        (asked(*MESSAGES, messages(), status="529", reason="Overloaded"), b"529 Overloaded"),
        (asked(*CHATS, chat(), status="429", reason="Slow Down"), b"429 Slow Down"),
        # an error that echoes the key, read whole to be masked
        (asked(*CHATS, chat(), status="503", reason="Back", reflect="body"), b"503 Back"),
        # a phrase as the provider spaced it, UTF-8 in it
        (asked(*CHATS, chat(), reason="Two  Caf\u00e9s"), "200 Two  Caf\u00e9s".encode()),
        # no phrase at all
        (asked(*CHATS, chat(), reason=""), b"200 "),
    ],
    ids=["json", "sse", "anthropic-sse", "529", "429", "echoing-error", "spaced", "empty"],
)
async def test_the_providers_reason_phrase_reaches_the_client_as_it_was_sent(
    make_gateway: Callable[..., Awaitable[TestClient]], request_bytes: bytes, line: bytes
) -> None:
    gateway = await make_gateway()
    got = await exchange(gateway, request_bytes)
    assert got.startswith(b"HTTP/1.1 " + line + b"\r\n"), head_of(got)


def answered(status_line: bytes, body: bytes = COMPLETION) -> bytes:
    return (
        status_line
        + b"\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
        + body
    )


@pytest.mark.parametrize(
    ("sent", "got"),
    [
        # obs-text (RFC 9112 §4: a reason phrase may hold any byte from 0x80), no UTF-8
        (b"HTTP/1.1 200 Caf\xe9 \x80\xff", b"HTTP/1.1 200 Caf\xe9 \x80\xff"),
        # a tab, and spaces as they came (the phrase is everything after the code's space)
        (b"HTTP/1.1 200  Tab\there ", b"HTTP/1.1 200  Tab\there "),
        # no phrase, not even the space before it (RFC 9112 allows neither to be left out,
        # HTTP/1.0 servers did): the space is due, the phrase stays empty
        (b"HTTP/1.0 200", b"HTTP/1.1 200 "),
        # controls no status line may hold (as a header would be split by one, a client's
        # parser may end the line there): never written; the status's own phrase instead
        (b"HTTP/1.1 503 Bad\x00Byte", b"HTTP/1.1 503 Service Unavailable"),
        (b"HTTP/1.1 503 Esc\x1b[31mRed", b"HTTP/1.1 503 Service Unavailable"),
        (b"HTTP/1.1 429 Del\x7f", b"HTTP/1.1 429 Too Many Requests"),
        (b"HTTP/1.1 529 Bell\x07", b"HTTP/1.1 529 "),  # a code with no phrase of its own
        # the real key echoed (a debugging proxy's): the status's own phrase, as a header
        # holding it is left out whole
        (b"HTTP/1.1 401 Bad key " + OPENAI_REAL.encode(), b"HTTP/1.1 401 Unauthorized"),
    ],
    ids=["obs-text", "tab", "none", "nul", "escape", "del", "bell-529", "echoed-key"],
)
async def test_a_reason_phrase_goes_on_byte_for_byte_unless_no_status_line_may_hold_it(
    raw_gateway: Provider, sent: bytes, got: bytes
) -> None:
    gateway, _ = await raw_gateway(answered(sent))
    answer = await exchange(
        gateway, post("/v1/chat/completions", OPENAI_VK, json.dumps(chat("hi")).encode())
    )
    assert answer.startswith(got + b"\r\n"), head_of(answer)
    assert OPENAI_REAL.encode() not in answer
    assert answer.endswith(COMPLETION)


async def test_a_cache_hit_replays_the_reason_phrase_the_miss_sent(raw_gateway: Provider) -> None:
    gateway, _ = await raw_gateway(answered(b"HTTP/1.1 200 Fresh Caf\xe9"))
    request = post("/v1/chat/completions", CACHED_VK, json.dumps(chat("hi")).encode())
    miss = await exchange(gateway, request)
    await gateway.app[CACHE].settled()
    hit = await exchange(gateway, request)
    assert miss.startswith(b"HTTP/1.1 200 Fresh Caf\xe9\r\n"), head_of(miss)
    assert b"x-llm-gateway-cache: hit\r\n" in head_of(hit)
    assert hit.startswith(b"HTTP/1.1 200 Fresh Caf\xe9\r\n"), head_of(hit)
