"""No secret leaves a gateway in front of a provider that echoes the credentials it was sent:
neither its response headers, nor its response bodies, nor the interaction log carry one
(the whole-process search of everything a gateway writes is tests/process/test_leaks.py)."""

from __future__ import annotations

import asyncio
import gzip
import json
import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from multidict import CIMultiDict

from proxy.keys.keys import masked
from tests.conftest import (
    ANTHROPIC_REAL,
    ANTHROPIC_VK,
    AZURE_REAL,
    AZURE_VK,
    CUSTOM_VK,
    OPENAI_REAL,
    OPENAI_VK,
    RESTRICTED_VK,
    SECRETS,
    auth,
    keys_document,
)
from tests.support.bodies import CHAT, MESSAGES
from tests.support.fake_provider import FakeState, Fault
from tests.support.raw_servers import RawServer


async def test_a_provider_that_echoes_the_real_key_hands_it_to_no_client_and_no_log(
    make_gateway: Callable[..., Awaitable[TestClient]],
    fake: FakeState,
    log_path: Path,
    records: Callable[..., Awaitable[list[dict[str, Any]]]],
) -> None:
    gateway = await make_gateway(LOG_BODIES="true")
    cases = [
        ("/v1/chat/completions", auth(OPENAI_VK), CHAT, {}),
        ("/v1/chat/completions", auth(OPENAI_VK), {**CHAT, "stream": True}, {}),
        ("/v1/chat/completions", auth(AZURE_VK), CHAT, {}),
        ("/v1/chat/completions", auth(CUSTOM_VK), CHAT, {}),
        ("/v1/messages", {"x-api-key": ANTHROPIC_VK}, MESSAGES, {}),
        ("/v1/chat/completions", auth(OPENAI_VK), CHAT, {"x-fake-status": "401"}),
        ("/v1/messages", {"x-api-key": ANTHROPIC_VK}, MESSAGES, {"x-fake-status": "401"}),
    ]
    for path, credential, body, extra in cases:
        response = await gateway.post(
            path, json=body, headers={**credential, **extra, "x-fake-reflect": "body"}
        )
        await response.read()
        assert response.status in (200, 401)
        # The provider did echo it: the gateway dropped those headers, kept the others.
        assert "x-echo-authorization" not in response.headers
        assert "x-echo-x-api-key" not in response.headers
        assert "x-echo-api-key" not in response.headers
        assert "x-echo-x-goog-api-key" not in response.headers
        assert "x-debug-request" not in response.headers
        assert "x-request-id" in response.headers and "content-type" in response.headers
        headers = json.dumps(list(response.headers.items()))
        for secret in SECRETS:
            assert secret not in headers, f"{secret!r} in the headers of {path} {extra}"
    credentials = ("authorization", "x-api-key", "api-key", "x-goog-api-key")
    assert all(any(name in seen.headers for name in credentials) for seen in fake.requests)
    lines = await records(len(cases))
    assert len(lines) == len(cases)
    errors = [line["response"] for line in lines if line["status"] == 401]
    assert errors and all("[redacted]" in json.dumps(error) for error in errors)
    text = log_path.read_text()
    for secret in SECRETS:
        assert secret not in text, f"{secret!r} leaked into the log"


async def test_a_real_key_the_provider_quotes_in_its_body_reaches_the_client_masked(
    gateway: TestClient, fake: FakeState
) -> None:
    """SPEC: never in a response, not even when the provider echoes it back: an error body
    quoting the key it refused (plain or gzip, which the SDKs accept) reaches the client with
    the key masked, the rest of the provider's body as it was."""
    cases = [
        ("/v1/chat/completions", auth(OPENAI_VK), CHAT, {}, OPENAI_REAL),
        ("/v1/chat/completions", auth(OPENAI_VK), CHAT, {"x-fake-gzip": "1"}, OPENAI_REAL),
        ("/v1/messages", {"x-api-key": ANTHROPIC_VK}, MESSAGES, {}, ANTHROPIC_REAL),
        ("/v1/chat/completions", auth(AZURE_VK), CHAT, {"x-fake-gzip": "1"}, AZURE_REAL),
    ]
    for path, credential, body, extra, real in cases:
        headers = {**credential, **extra, "x-fake-reflect": "body", "x-fake-status": "401"}
        response = await gateway.post(path, json=body, headers=headers)
        text = await response.text()
        assert response.status == 401
        assert fake.requests[-1].headers.get("x-fake-reflect") == "body"  # it did quote it
        for secret in SECRETS:
            assert secret not in text, f"{secret!r} in the body of {path} {extra}"
        message = json.loads(text)["error"]["message"]
        assert message.startswith("fake provider error 401: credentials received")
        assert "[redacted]" in message and len(message) > len(real)


@pytest.mark.parametrize("placeholder", ["-", "x"])
async def test_a_placeholder_real_key_takes_no_header_from_the_providers_answer(
    tmp_path: Path,
    fake_base: str,
    make_gateway: Callable[..., Awaitable[TestClient]],
    placeholder: str,
) -> None:
    """A self-hosted server that checks no key is given a placeholder (docs/keys.md: any;
    TGI's own docs write `api_key="-"`), under the 16 characters below which no body is
    searched for a real key: no header of the answer is dropped for holding it. Dropped, a
    placeholder "-" or "x" took the answer's Content-Type (what the JS SDKs read to parse
    JSON: without it they return the text) and the provider's other headers with it."""
    document = keys_document(fake_base)
    document["providers"]["selfhosted"] = {"base_url": f"{fake_base}/v1", "auth": "none"}
    document["virtual_keys"] = {CUSTOM_VK: {"provider": "selfhosted", "api_key": placeholder}}
    (tmp_path / "selfhosted.json").write_text(json.dumps(document))
    gateway = await make_gateway(KEYS_FILE_PATH=str(tmp_path / "selfhosted.json"))
    for body, content_type in [
        (CHAT, "application/json"),
        ({**CHAT, "stream": True}, "text/event-stream; charset=utf-8"),
    ]:
        response = await gateway.post("/v1/chat/completions", json=body, headers=auth(CUSTOM_VK))
        await response.read()
        assert response.status == 200
        assert response.headers.get("content-type") == content_type
        assert response.headers.get("openai-processing-ms") == "12"  # the provider's own


@pytest.mark.parametrize(
    ("steer", "fault_headers"),
    [
        # gzip, as a server behind nginx (gzip on) or a CDN compresses an error for a client
        # that accepts it (undici's fetch asks `gzip, deflate`): chunked, no Content-Length
        ({"x-fake-gzip": "1"}, {}),
        # "identity" names no coding at all: the body is as plain as without the header
        ({}, {"Content-Encoding": "identity"}),
    ],
)
async def test_a_real_key_quoted_in_a_chunked_coded_error_body_reaches_the_client_masked(
    gateway: TestClient, fake: FakeState, steer: dict[str, str], fault_headers: dict[str, str]
) -> None:
    """The same quote of the refused key as above, in an error body sent without a length
    (chunked) and with a Content-Encoding: the client gets it masked all the same."""
    fake.faults[OPENAI_REAL] = Fault(401, fault_headers, is_unsized=True)
    response = await gateway.post(
        "/v1/chat/completions",
        json=CHAT,
        headers={
            **auth(OPENAI_VK),
            **steer,
            "x-fake-reflect": "body",
            "Accept-Encoding": "gzip, deflate",  # what Node's fetch sends
        },
    )
    text = await response.text()  # decoded as a client decodes it
    assert response.status == 401
    assert fake.requests[-1].headers.get("x-fake-reflect") == "body"  # it did quote it
    for secret in SECRETS:
        assert secret not in text
    message = json.loads(text)["error"]["message"]
    assert message.startswith("fake provider error 401: credentials received")
    assert "[redacted]" in message


async def test_a_pools_key_that_begins_with_another_of_its_keys_is_masked_whole(
    gateway_with_keys: Callable[..., Awaitable[TestClient]], fake: FakeState
) -> None:
    """Keys chosen by hand for a self-hosted server can begin with one another (`...-key` and
    `...-key-2`): an echo of the longer one is masked whole, not only as far as the shorter
    one reaches (its tail then went out)."""
    short = "sk-local-pool-key-alpha"
    long = f"{short}-2nd-of-the-pool"
    pool = {"api_keys": [{"api_key": short}, {"api_key": long}]}
    gateway = await gateway_with_keys({"vk_test_pool_7e1d3c5b9a": {"provider": "openai", **pool}})
    for _ in range(2):  # each key of the pool in turn
        response = await gateway.post(
            "/v1/chat/completions",
            json=CHAT,
            headers={
                **auth("vk_test_pool_7e1d3c5b9a"),
                "x-fake-reflect": "body",
                "x-fake-status": "400",
            },
        )
        text = await response.text()
        assert response.status == 400
        assert "2nd-of-the-pool" not in text and short not in text
    sent = {seen.headers["authorization"] for seen in fake.requests}
    assert sent == {f"Bearer {short}", f"Bearer {long}"}


async def test_a_real_key_in_a_broken_websocket_handshake_answer_is_in_no_error(
    tmp_path: Path,
    make_gateway: Callable[..., Awaitable[TestClient]],
    log_path: Path,
    records: Callable[..., Awaitable[list[dict[str, Any]]]],
) -> None:
    """A Realtime handshake answered with a status line that is not HTTP, reflecting the key
    it was sent: aiohttp's parser quotes that line in its error, and the 502's message, the
    log line and /health's last_error (read without a key) said part of the real key."""

    async def broken(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 4x1 " + OPENAI_REAL.encode() + b"\r\n\r\n")
        await writer.drain()
        writer.close()

    async with await RawServer.start(broken, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        keys = {
            "providers": {"openai": {"base_url": f"http://127.0.0.1:{port}/v1"}},
            "virtual_keys": {OPENAI_VK: {"provider": "openai", "api_key": OPENAI_REAL}},
        }
        (tmp_path / "broken.json").write_text(json.dumps(keys))
        gateway = await make_gateway(KEYS_FILE_PATH=str(tmp_path / "broken.json"))
        upgrade = {
            "Connection": "Upgrade",
            "Upgrade": "websocket",
            "Sec-WebSocket-Version": "13",
            "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
        }
        response = await gateway.get(
            "/v1/realtime?model=gpt-realtime", headers={**auth(OPENAI_VK), **upgrade}
        )
        body = await response.text()
        health = await (await gateway.get("/health")).text()
    assert response.status == 502
    assert "not valid HTTP (Bad status line" in body
    await records(1)
    shown = OPENAI_REAL[:12]  # the key's first characters: what the cut message kept
    for text in (body, health, log_path.read_text()):
        assert shown not in text


async def gateway_in_front_of(
    chat_completions: Callable[[web.Request], Awaitable[web.StreamResponse]],
    aiohttp_server: Callable[..., Awaitable[TestServer]],
    tmp_path: Path,
    make_gateway: Callable[..., Awaitable[TestClient]],
) -> TestClient:
    """A gateway whose OpenAI key's provider answers chat completions with this handler."""
    upstream = web.Application()
    upstream.router.add_post("/v1/chat/completions", chat_completions)
    server = await aiohttp_server(upstream)
    keys = {
        "providers": {"openai": {"base_url": str(server.make_url("/v1"))}},
        "virtual_keys": {OPENAI_VK: {"provider": "openai", "api_key": OPENAI_REAL}},
    }
    (tmp_path / "upstream.json").write_text(json.dumps(keys))
    return await make_gateway(KEYS_FILE_PATH=str(tmp_path / "upstream.json"))


async def test_a_real_key_split_between_two_chunks_of_a_stream_is_masked(
    aiohttp_server: Callable[..., Awaitable[TestServer]],
    tmp_path: Path,
    make_gateway: Callable[..., Awaitable[TestClient]],
) -> None:
    """A provider streaming its echo of the key, cut inside the key: the client gets the
    stream whole, the key masked, and an event not held back for it."""
    real = OPENAI_REAL.encode()
    head = b'data: {"echo": "'
    first_seen = asyncio.Event()  # the client has what came before the key's first bytes

    async def echoing(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(head + real[:9])
        await first_seen.wait()  # the rest only once the first chunk went through alone
        await response.write(real[9:] + b'"}\n\n')
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    gateway = await gateway_in_front_of(echoing, aiohttp_server, tmp_path, make_gateway)
    response = await gateway.post(
        "/v1/chat/completions", json={**CHAT, "stream": True}, headers=auth(OPENAI_VK)
    )
    assert response.status == 200
    # The chunk's bytes before the key's beginning go out at once; the 9 that begin it wait.
    async with asyncio.timeout(10):  # a gateway holding the whole chunk would never send it
        body = await response.content.readexactly(len(head))
    assert body == head
    first_seen.set()
    body += await response.read()
    masked = b"[redacted]" + b"*" * (len(real) - len(b"[redacted]"))
    assert body == b'data: {"echo": "' + masked + b'"}\n\n' + b"data: [DONE]\n\n"


@pytest.mark.parametrize("is_sized", [True, False])
async def test_a_real_key_in_an_error_coded_over_two_content_encoding_lines_is_masked(
    aiohttp_server: Callable[..., Awaitable[TestServer]],
    tmp_path: Path,
    make_gateway: Callable[..., Awaitable[TestClient]],
    is_sized: bool,
) -> None:
    """Content-Encoding said in two header lines (`identity`, then `gzip`: RFC 9110 reads
    them as one list, as clients do): the error quoting the key is still searched decoded."""
    body = gzip.compress(b'{"error": {"message": "bad key ' + OPENAI_REAL.encode() + b'"}}')

    async def quoting(request: web.Request) -> web.StreamResponse:
        headers = CIMultiDict([("Content-Type", "application/json")])
        headers.add("Content-Encoding", "identity")
        headers.add("Content-Encoding", "gzip")
        if is_sized:
            return web.Response(status=401, body=body, headers=headers)
        response = web.StreamResponse(status=401, headers=headers)
        await response.prepare(request)
        await response.write(body)
        await response.write_eof()
        return response

    gateway = await gateway_in_front_of(quoting, aiohttp_server, tmp_path, make_gateway)
    response = await gateway.post(
        "/v1/chat/completions", json=CHAT, headers={**auth(OPENAI_VK), "Accept-Encoding": "gzip"}
    )
    text = await response.text()  # decoded as a client decodes it
    assert response.status == 401
    assert OPENAI_REAL not in text
    assert "bad key [redacted]" in text


async def ask_each(
    gateway: TestClient, asks: list[tuple[str, str, dict[str, Any] | None]]
) -> list[int]:
    """Each (method, path, JSON body) sent with OpenAI's test key, read to its end: the
    statuses."""
    statuses = []
    for method, path, body in asks:
        response = await gateway.request(method, path, json=body, headers=auth(OPENAI_VK))
        await response.read()
        statuses.append(response.status)
    return statuses


async def chat_each(gateway: TestClient, bodies: list[str]) -> list[int]:
    """Each chat body, sent as written (its escapes kept) with OpenAI's test key, read to its
    end: the statuses."""
    statuses = []
    for body in bodies:
        response = await gateway.post(
            "/v1/chat/completions",
            data=body,
            headers={**auth(OPENAI_VK), "content-type": "application/json"},
        )
        await response.read()
        statuses.append(response.status)
    return statuses


async def test_a_client_naming_its_own_virtual_key_finds_it_in_no_log_line_or_metric(
    make_gateway: Callable[..., Awaitable[TestClient]],
    log_path: Path,
    records: Callable[..., Awaitable[list[dict[str, Any]]]],
) -> None:
    # By mistake (the key pasted where the model goes) or to probe: SPEC keeps a full
    # virtual key out of every log line and metric, whoever put it in the request.
    gateway = await make_gateway()
    asks = [
        ("POST", "/v1/chat/completions", {**CHAT, "model": OPENAI_VK}),
        ("GET", f"/v1/models/{OPENAI_VK}", None),
        ("POST", "/v1/chat/completions", {**CHAT, "model": f"x-{OPENAI_VK}-y", "stream": True}),
    ]
    assert await ask_each(gateway, asks) == [200] * len(asks)
    lines = await records(len(asks))
    assert OPENAI_VK not in log_path.read_text()
    hidden = masked(OPENAI_VK)
    assert lines[0]["model"] == hidden and lines[2]["model"] == f"x-{hidden}-y"
    assert lines[1]["path"] == f"/v1/models/{hidden}"
    metrics = await (await gateway.get("/metrics")).text()
    assert OPENAI_VK not in metrics and f'model="{hidden}"' in metrics


async def test_a_client_sending_its_own_virtual_key_as_its_request_id_finds_it_in_no_log_line(
    make_gateway: Callable[..., Awaitable[TestClient]],
    log_path: Path,
    records: Callable[..., Awaitable[list[dict[str, Any]]]],
) -> None:
    # A client's x-request-id is kept as the line's request_id: one holding a key (a header
    # mapped wrongly, or a probe) is not, the gateway's own id is, in the log as in the
    # answer's headers.
    gateway = await make_gateway()
    handed_back = []
    for body in (CHAT, b"{not json"):  # answered, and refused by the gateway itself
        response = await gateway.post(
            "/v1/chat/completions",
            data=body if isinstance(body, bytes) else json.dumps(body),
            headers={**auth(OPENAI_VK), "x-request-id": f"run-{OPENAI_VK}"},
        )
        await response.read()
        handed_back.append(response.headers["x-request-id"])
    lines = await records(2)
    assert OPENAI_VK not in log_path.read_text()
    assert [line["request_id"] for line in lines] == handed_back
    assert all(re.fullmatch("[0-9a-f]{32}", request_id) for request_id in handed_back)


@pytest.mark.parametrize("answered_id", ["echoed", "real key"])
async def test_a_key_in_the_providers_request_id_is_in_no_log_line(
    aiohttp_server: Callable[..., Awaitable[TestServer]],
    tmp_path: Path,
    make_gateway: Callable[..., Awaitable[TestClient]],
    log_path: Path,
    records: Callable[..., Awaitable[list[dict[str, Any]]]],
    answered_id: str,
) -> None:
    """The provider's own request id is logged as `provider_request_id`. A server that answers
    with the x-request-id it was sent (vLLM's --enable-request-id-headers, a proxy in front)
    hands back the client's, which may hold its virtual key; one that reflects credentials
    may answer with the real key. The log masks the one as in `request_id`, and holds
    neither."""

    async def reflecting(request: web.Request) -> web.StreamResponse:
        # The gateway sends its own id when the client's holds a key: the client's as a
        # server behind another hop (that kept it) would echo it.
        assert OPENAI_VK not in request.headers["x-request-id"]
        given = f"run-{OPENAI_VK}" if answered_id == "echoed" else f"req-{OPENAI_REAL}"
        return web.json_response({"choices": []}, headers={"x-request-id": given})

    gateway = await gateway_in_front_of(reflecting, aiohttp_server, tmp_path, make_gateway)
    response = await gateway.post(
        "/v1/chat/completions",
        json=CHAT,
        headers={**auth(OPENAI_VK), "x-request-id": f"run-{OPENAI_VK}"},
    )
    await response.read()
    assert response.status == 200
    [line] = await records(1)
    written = log_path.read_text()
    assert OPENAI_VK not in written and OPENAI_REAL not in written
    if answered_id == "echoed":
        assert line["provider_request_id"] == f"run-{masked(OPENAI_VK)}"


async def test_a_virtual_key_in_a_logged_body_is_masked_in_any_spelling(
    make_gateway: Callable[..., Awaitable[TestClient]],
    log_path: Path,
    records: Callable[..., Awaitable[list[dict[str, Any]]]],
) -> None:
    # With LOG_BODIES a client that pastes its own key into its prompt, plainly or with
    # JSON escapes (which the log, writing the body as a JSON value, would decode), finds
    # it masked in the logged body, as in the path and the model.
    gateway = await make_gateway(LOG_BODIES="true")
    escaped = "".join(f"\\u{ord(c):04x}" for c in OPENAI_VK)
    bodies = [
        json.dumps({**CHAT, "messages": [{"role": "user", "content": f"my key {OPENAI_VK}"}]}),
        json.dumps(CHAT).replace('"hi"', f'"{escaped}"', 1),
    ]
    assert escaped in bodies[1]
    assert await chat_each(gateway, bodies) == [200] * len(bodies)
    lines = await records(len(bodies))
    assert OPENAI_VK not in log_path.read_text()
    hidden = masked(OPENAI_VK)
    logged = [json.dumps(line["request"], ensure_ascii=False) for line in lines]
    assert hidden in logged[0] and hidden in logged[1]


async def test_credentials_a_body_hands_to_third_parties_are_not_in_the_logged_body(
    make_gateway: Callable[..., Awaitable[TestClient]],
    fake: FakeState,
    log_path: Path,
    records: Callable[..., Awaitable[list[dict[str, Any]]]],
) -> None:
    """With LOG_BODIES, the tokens a request gives the provider for remote MCP servers
    (Anthropic's `mcp_servers[].authorization_token`, OpenAI's MCP tool `authorization` and
    its `headers`) reach the provider, and the log has them redacted: a secret the log's
    readers must not get, like the keys."""
    gateway = await make_gateway(LOG_BODIES="true")
    secrets = ["mcp-token-anthropic-1234", "mcp-oauth-openai-5678", "Bearer hdr-secret-9012"]
    anthropic_body = {
        **MESSAGES,
        "mcp_servers": [
            {
                "type": "url",
                "url": "https://mcp.example",
                "name": "x",
                "authorization_token": secrets[0],
            }
        ],
    }
    responses_body = {
        "model": "gpt-4o-mini",
        "input": "hi",
        "tools": [
            {
                "type": "mcp",
                "server_label": "x",
                "server_url": "https://mcp.example",
                "authorization": secrets[1],
                "headers": {"Authorization": secrets[2]},
            }
        ],
    }
    first = await gateway.post("/v1/messages", json=anthropic_body, headers=auth(ANTHROPIC_VK))
    second = await gateway.post("/v1/responses", json=responses_body, headers=auth(OPENAI_VK))
    assert first.status == second.status == 200
    sent = b"".join(seen.body for seen in fake.requests)
    assert all(secret.encode() in sent for secret in secrets)  # the provider needs them
    lines = await records(2)
    logged = log_path.read_text()
    assert not [secret for secret in secrets if secret in logged]
    mcp = lines[0]["request"]["mcp_servers"][0]
    assert mcp["authorization_token"] == "[redacted]" and mcp["url"] == "https://mcp.example"
    tool = lines[1]["request"]["tools"][0]
    assert tool["authorization"] == "[redacted]"
    assert tool["headers"] == {"Authorization": "[redacted]"}


async def test_another_users_key_in_a_logged_body_is_masked(
    make_gateway: Callable[..., Awaitable[TestClient]],
    log_path: Path,
    records: Callable[..., Awaitable[list[dict[str, Any]]]],
) -> None:
    # With LOG_BODIES a prompt (or an answer) may hold another user's virtual key, as a word,
    # quoted, after `=`, at a sentence's end, after a JSON escape, spelt with escapes: the log
    # shows it masked, as it shows the client's own.
    gateway = await make_gateway(LOG_BODIES="true")
    escaped = "".join(f"\\u{ord(c):04x}" for c in ANTHROPIC_VK)
    prompts = [
        f"use {ANTHROPIC_VK} now",
        f'token="{ANTHROPIC_VK}"',
        f"key={ANTHROPIC_VK}&x=1",
        f"it is {ANTHROPIC_VK}.",
        f"line one\n{ANTHROPIC_VK}",
    ]
    bodies = [
        json.dumps({**CHAT, "messages": [{"role": "user", "content": prompt}]})
        for prompt in prompts
    ]
    bodies.append(json.dumps(CHAT).replace('"hi"', f'"{escaped}"', 1))
    assert await chat_each(gateway, bodies) == [200] * len(bodies)
    lines = await records(len(bodies))
    assert ANTHROPIC_VK not in log_path.read_text()
    for line in lines:
        assert masked(ANTHROPIC_VK) in json.dumps(line["request"], ensure_ascii=False)


async def test_another_key_named_as_the_model_or_in_the_path_is_in_no_log_line_or_metric(
    make_gateway: Callable[..., Awaitable[TestClient]],
    log_path: Path,
    records: Callable[..., Awaitable[list[dict[str, Any]]]],
) -> None:
    # Not the client's own key: another user's virtual key, or a real key of the file. Whoever
    # writes one where the model or a path segment goes, the log and /metrics show neither.
    gateway = await make_gateway()
    asks = [
        ("POST", "/v1/chat/completions", {**CHAT, "model": ANTHROPIC_VK}),
        ("POST", "/v1/chat/completions", {**CHAT, "model": OPENAI_REAL}),
        ("GET", f"/v1/models/{ANTHROPIC_REAL}", None),
        ("GET", f"/v1/files/{ANTHROPIC_VK}/content", None),
    ]
    await ask_each(gateway, asks)
    lines = await records(len(asks))
    written = log_path.read_text()
    metrics = await (await gateway.get("/metrics")).text()
    for secret in (ANTHROPIC_VK, OPENAI_REAL, ANTHROPIC_REAL):
        assert secret not in written and secret not in metrics
    assert lines[0]["model"] == masked(ANTHROPIC_VK)
    assert lines[1]["model"] == lines[2]["model"] == "[redacted]"
    assert lines[3]["path"] == f"/v1/files/{masked(ANTHROPIC_VK)}/content"


async def test_a_key_written_inside_a_longer_model_or_path_segment_is_in_no_log_line_or_metric(
    make_gateway: Callable[..., Awaitable[TestClient]],
    log_path: Path,
    records: Callable[..., Awaitable[list[dict[str, Any]]]],
) -> None:
    # A key glued to other text (`gpt-4o:<real key>`, `<model> <key>`, a suffix) went into the
    # log line and the model label whole: only a text that was a key as a whole was masked.
    gateway = await make_gateway()
    asks = [
        ("POST", "/v1/chat/completions", {**CHAT, "model": f"gpt-4o:{OPENAI_REAL}"}),
        ("POST", "/v1/chat/completions", {**CHAT, "model": f"gpt-4o {ANTHROPIC_VK}"}),
        ("POST", "/v1/chat/completions", {**CHAT, "model": f"gpt-4o-{ANTHROPIC_VK}x"}),
        ("GET", f"/v1/models/ft:{ANTHROPIC_REAL}:v2", None),
    ]
    await ask_each(gateway, asks)
    lines = await records(len(asks))
    written = log_path.read_text()
    metrics = await (await gateway.get("/metrics")).text()
    for secret in (ANTHROPIC_VK, OPENAI_REAL, ANTHROPIC_REAL):
        assert secret not in written and secret not in metrics
    assert lines[0]["model"] == "gpt-4o:[redacted]"
    assert lines[1]["model"] == f"gpt-4o {masked(ANTHROPIC_VK)}"
    assert lines[2]["model"] == f"gpt-4o-{masked(ANTHROPIC_VK)}x"
    assert lines[3]["path"] == "/v1/models/ft:[redacted]:v2"


async def test_an_error_quoting_the_model_shows_no_key_pasted_into_it(
    make_gateway: Callable[..., Awaitable[TestClient]],
    records: Callable[..., Awaitable[list[dict[str, Any]]]],
) -> None:
    # A refusal quotes the model the client sent ("may not use the model '...'"): a key
    # pasted there, the client's own, another user's or a real key, came back whole in the
    # error body.
    gateway = await make_gateway()
    models = [RESTRICTED_VK, f"claude:{ANTHROPIC_REAL}", f"{OPENAI_VK} please"]
    bodies = []
    for model in models:
        response = await gateway.post(
            "/v1/messages", json={**MESSAGES, "model": model}, headers={"x-api-key": RESTRICTED_VK}
        )
        assert response.status == 403
        bodies.append(await response.text())
    for secret in (RESTRICTED_VK, ANTHROPIC_REAL, OPENAI_VK):
        assert not any(secret in body for body in bodies), secret
    assert masked(RESTRICTED_VK) in bodies[0] and "claude:[redacted]" in bodies[1]
    assert f"'{masked(OPENAI_VK)} please'" in bodies[2]
    lines = await records(len(models))
    assert [line["status"] for line in lines] == [403] * len(models)


async def test_an_x_request_id_holding_a_key_is_not_handed_back_in_the_answers_headers(
    make_gateway: Callable[..., Awaitable[TestClient]],
    log_path: Path,
    records: Callable[..., Awaitable[list[dict[str, Any]]]],
) -> None:
    # The client's x-request-id is the gateway's (echoed in x-request-id and request-id):
    # one holding the client's own key, another user's or a real key came back whole in the
    # answer's headers, to a client that was refused too. An ordinary one is still kept.
    gateway = await make_gateway()
    cases = [
        (auth(OPENAI_VK), f"trace-{OPENAI_VK}"),
        (auth(OPENAI_VK), ANTHROPIC_REAL),
        (auth("vk_not_a_key_of_the_file_0"), ANTHROPIC_VK),
        (auth(OPENAI_VK), "trace-0001"),
    ]
    echoed = []
    for credential, request_id in cases:
        response = await gateway.post(
            "/v1/chat/completions", json=CHAT, headers={**credential, "x-request-id": request_id}
        )
        await response.read()
        echoed.append(json.dumps(list(response.headers.items())))
    for secret in (OPENAI_VK, ANTHROPIC_REAL, ANTHROPIC_VK):
        assert not any(secret in headers for headers in echoed), secret
    assert '"trace-0001"' in echoed[3]
    await records(len(cases))
    written = log_path.read_text()
    for secret in (OPENAI_VK, ANTHROPIC_REAL, ANTHROPIC_VK):
        assert secret not in written
