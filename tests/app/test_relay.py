"""The request path as a whole: what reaches the provider, what comes back, refusals, failures."""

from __future__ import annotations

import asyncio
import gzip
import json
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from proxy.keys.keys import masked
from proxy.relay.silence import IDLE_SLACK, Silences
from tests.conftest import (
    ANTHROPIC_REAL,
    ANTHROPIC_VK,
    AZURE_REAL,
    AZURE_VK,
    CUSTOM_REAL,
    CUSTOM_VK,
    LIMITED_VK,
    OPENAI_REAL,
    OPENAI_VK,
    RESTRICTED_VK,
    assert_anthropic_error,
    assert_openai_error,
    auth,
    keys_document,
)
from tests.support.bodies import chat, messages
from tests.support.fake_provider import FakeState

CHAT = chat("hello there")
MESSAGES = messages(max_tokens=32)


async def test_the_request_body_reaches_the_provider_byte_for_byte(
    gateway: TestClient, fake: FakeState
) -> None:
    # Odd spacing, key order and unicode escapes: a re-encoding would change these bytes.
    body = b'{ "messages":[{"role":"user","content":"h\\u00e9llo  \xc3\xa9"}],\n "model" : "gpt-4o-mini", "zeta": 1.50}'
    response = await gateway.post(
        "/v1/chat/completions",
        data=body,
        headers={**auth(OPENAI_VK), "Content-Type": "application/json"},
    )
    assert response.status == 200
    assert fake.requests[-1].body == body


async def test_the_response_body_reaches_the_client_byte_for_byte(
    gateway: TestClient, fake: FakeState
) -> None:
    response = await gateway.post(
        "/v1/chat/completions",
        json=CHAT,
        headers={**auth(OPENAI_VK), "x-request-id": "req-bytes-1"},
    )
    assert await response.read() == fake.sent["req-bytes-1"]


async def test_the_virtual_key_is_swapped_for_the_real_key_in_each_providers_header(
    gateway: TestClient, fake: FakeState
) -> None:
    cases = [
        (OPENAI_VK, "/v1/chat/completions", CHAT, "authorization", f"Bearer {OPENAI_REAL}"),
        (ANTHROPIC_VK, "/v1/messages", MESSAGES, "x-api-key", ANTHROPIC_REAL),
        (AZURE_VK, "/v1/chat/completions", CHAT, "api-key", AZURE_REAL),
        (CUSTOM_VK, "/v1/chat/completions", CHAT, "x-goog-api-key", CUSTOM_REAL),
    ]
    for virtual, path, body, header, expected in cases:
        response = await gateway.post(path, json=body, headers={"x-api-key": virtual})
        assert response.status == 200, await response.text()
        seen = fake.requests[-1].headers
        assert seen.getall(header) == [expected]
        credentials = {"authorization", "x-api-key", "api-key", "x-goog-api-key"} - {header}
        assert not credentials & {name.lower() for name in seen}, seen
        assert virtual not in json.dumps(list(seen.items()))


async def test_anthropic_version_is_added_only_when_the_client_sent_none(
    gateway: TestClient, fake: FakeState
) -> None:
    await gateway.post("/v1/messages", json=MESSAGES, headers=auth(ANTHROPIC_VK))
    assert fake.requests[-1].headers.getall("anthropic-version") == ["2023-06-01"]
    await gateway.post(
        "/v1/messages",
        json=MESSAGES,
        headers={**auth(ANTHROPIC_VK), "anthropic-version": "2024-01-01"},
    )
    assert fake.requests[-1].headers.getall("anthropic-version") == ["2024-01-01"]


async def test_a_declared_provider_speaking_anthropic_gets_anthropic_version_too(
    tmp_path: Path,
    fake_base: str,
    fake: FakeState,
    make_gateway: Callable[..., Awaitable[TestClient]],
) -> None:
    """An Anthropic-compatible endpoint of one's own (`"api": "anthropic"`, a key's provider
    or the fallback of a built-in anthropic key) is sent the default a client without an SDK
    (curl) relies on, as the built-in is; it got none, and Anthropic answers 400 without."""
    document = keys_document(fake_base)
    document["providers"]["claude-proxy"] = {
        "base_url": f"{fake_base}/v1",
        "auth": "x-api-key",
        "api": "anthropic",
    }
    document["virtual_keys"]["vk_test_claude_proxy_6a2c4e"] = {
        "provider": "claude-proxy",
        "api_key": CUSTOM_REAL,
        "name": "claude-proxy",
    }
    path = tmp_path / "keys-claude-proxy.json"
    path.write_text(json.dumps(document))
    gateway = await make_gateway(KEYS_FILE_PATH=str(path))
    response = await gateway.post(
        "/v1/messages", json=MESSAGES, headers=auth("vk_test_claude_proxy_6a2c4e")
    )
    assert response.status == 200, await response.text()
    assert fake.requests[-1].headers.getall("anthropic-version") == ["2023-06-01"]
    await gateway.post(
        "/v1/messages",
        json=MESSAGES,
        headers={**auth("vk_test_claude_proxy_6a2c4e"), "anthropic-version": "2024-01-01"},
    )
    assert fake.requests[-1].headers.getall("anthropic-version") == ["2024-01-01"]


async def test_end_to_end_headers_pass_both_ways_and_hop_by_hop_ones_do_not(
    gateway: TestClient, fake: FakeState, fake_base: str
) -> None:
    fake_port = fake_base.rsplit(":", 1)[1]
    sent = {
        "anthropic-beta": "tools-2024-04-04",
        "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "Idempotency-Key": "idem-123",
        "OpenAI-Organization": "org-abc",
        "X-Custom-Thing": "kept",
        "Connection": "keep-alive, X-Drop-Me",
        "X-Drop-Me": "hop",
        "Keep-Alive": "timeout=5",
        "Proxy-Authorization": "Basic c2VjcmV0",
        "TE": "trailers",
    }
    response = await gateway.post(
        "/v1/chat/completions?api-version=2024-10-21&x=a%20b",
        json=CHAT,
        headers={**auth(OPENAI_VK), **sent},
    )
    seen = fake.requests[-1]
    for name in (
        "anthropic-beta",
        "traceparent",
        "Idempotency-Key",
        "OpenAI-Organization",
        "X-Custom-Thing",
    ):
        assert seen.headers.get(name) == sent[name], name
    for name in ("X-Drop-Me", "Keep-Alive", "Proxy-Authorization", "TE"):
        assert name not in seen.headers, name
    assert (
        seen.headers["host"].endswith(f":{fake_port}")
        and f":{gateway.port}" not in seen.headers["host"]
    )
    assert seen.query_string == "api-version=2024-10-21&x=a b"  # as the fake decodes it
    # The provider's own headers come back: processing time, cookies, its request id is replaced.
    assert response.headers["openai-processing-ms"] == "12"
    assert "set-cookie" in response.headers


async def test_the_providers_alt_svc_does_not_reach_the_client(
    gateway: TestClient, fake: FakeState
) -> None:
    # Alt-Svc names alternatives of the provider's origin (HTTP/3 on its port 443); passed on,
    # it told browsers and HTTP/3 clients that the gateway's host serves HTTP/3 on port 443,
    # which it does not (or another service does), for a day.
    cases = [
        ("/v1/chat/completions", OPENAI_VK, CHAT),
        ("/v1/messages", ANTHROPIC_VK, MESSAGES),
    ]
    for path, virtual, body in cases:
        response = await gateway.post(path, json=body, headers={"x-api-key": virtual})
        assert response.status == 200, await response.text()
        assert "alt-svc" not in response.headers, path
        assert response.headers["openai-processing-ms"] == "12"  # the rest passes
    streamed = await gateway.post(
        "/v1/chat/completions", json={**CHAT, "stream": True}, headers=auth(OPENAI_VK)
    )
    await streamed.read()
    assert "alt-svc" not in streamed.headers


async def test_a_redirect_to_the_providers_own_url_points_back_at_the_gateway(
    aiohttp_server: Callable[..., Awaitable[TestServer]],
    make_gateway: Callable[..., Awaitable[TestClient]],
    tmp_path: Path,
) -> None:
    # A FastAPI provider (vLLM, a LiteLLM behind the gateway) redirects a trailing slash to
    # its own absolute URL; the SDKs follow redirects, so the client went past the gateway,
    # its virtual key in x-api-key (httpx drops only Authorization on another host).
    async def redirect(request: web.Request) -> web.Response:
        if request.path == "/v1/elsewhere":
            raise web.HTTPFound("https://files.example/signed?sig=1")
        query = f"?{request.query_string}" if request.query_string else ""
        # Starlette's redirect_slashes: the URL as the Host header names it
        raise web.HTTPTemporaryRedirect(f"http://{request.host}{request.path.rstrip('/')}{query}")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", redirect)
    provider = await aiohttp_server(app)
    keys = tmp_path / "redirecting.json"
    keys.write_text(
        json.dumps(
            {
                "providers": {"openai": {"base_url": f"http://127.0.0.1:{provider.port}/v1"}},
                "virtual_keys": {OPENAI_VK: {"provider": "openai", "api_key": OPENAI_REAL}},
            }
        )
    )
    gateway = await make_gateway(KEYS_FILE_PATH=str(keys))
    for path, location in [
        ("/v1/models/", "/v1/models"),
        ("/models/", "/models"),  # a seed path: the client's own shape
        ("/v1/chat/completions/?x=1", "/v1/chat/completions?x=1"),
        ("/v1/elsewhere", "https://files.example/signed?sig=1"),  # another host: as sent
    ]:
        response = await gateway.get(path, headers=auth(OPENAI_VK), allow_redirects=False)
        assert response.status in (302, 307), path
        assert response.headers["location"] == location, path


async def test_behind_cloudflare_its_cf_connecting_ip_does_not_reach_the_provider(
    gateway: TestClient, fake: FakeState
) -> None:
    # Cloudflare's edge adds CF-Connecting-IP for the origin behind it (the gateway), and
    # refuses any request arriving with one (403 "error code: 1000"): the OpenAI and
    # Anthropic APIs are behind Cloudflare, so every call through a Cloudflare-fronted
    # gateway failed so. The client's address still goes on in X-Forwarded-For.
    through_cloudflare = {
        "CF-Connecting-IP": "203.0.113.7",
        "CF-Ray": "8f2a1b3c4d5e6f70-CDG",
        "CF-IPCountry": "FR",
        "X-Forwarded-For": "203.0.113.7",
    }
    for virtual, path, body in (
        (OPENAI_VK, "/v1/chat/completions", CHAT),
        (ANTHROPIC_VK, "/v1/messages", MESSAGES),
    ):
        response = await gateway.post(
            path, json=body, headers={"x-api-key": virtual, **through_cloudflare}
        )
        assert response.status == 200, await response.text()
        seen = fake.requests[-1].headers
        assert "CF-Connecting-IP" not in seen
        for name in ("CF-Ray", "CF-IPCountry", "X-Forwarded-For"):
            assert seen.get(name) == through_cloudflare[name], name


async def test_every_response_carries_the_clients_request_id_or_a_fresh_one(
    gateway: TestClient,
) -> None:
    mine = await gateway.post(
        "/v1/chat/completions",
        json=CHAT,
        headers={**auth(OPENAI_VK), "x-request-id": "client-chosen-7"},
    )
    assert mine.headers["x-request-id"] == "client-chosen-7"
    fresh = await gateway.post("/v1/chat/completions", json=CHAT, headers=auth(OPENAI_VK))
    refused = await gateway.post("/v1/chat/completions", json=CHAT)
    assert len(fresh.headers["x-request-id"]) >= 16 and len(refused.headers["x-request-id"]) >= 16
    assert fresh.headers["x-request-id"] != refused.headers["x-request-id"]


async def test_the_providers_own_request_id_is_in_the_log_line_for_its_support(
    gateway: TestClient, records: Any
) -> None:
    """The client's x-request-id is the gateway's; the provider's own id (OpenAI's
    x-request-id, Anthropic's request-id), which its support asks for, is logged."""
    chat_answer = await gateway.post("/v1/chat/completions", json=CHAT, headers=auth(OPENAI_VK))
    message = await gateway.post("/v1/messages", json=MESSAGES, headers=auth(ANTHROPIC_VK))
    refused = await gateway.post("/v1/chat/completions", json=CHAT)
    assert chat_answer.status == message.status == 200 and refused.status == 401
    provider_id = message.headers["request-id"]  # Anthropic's passes through
    lines = await records(3)
    assert lines[0]["request_id"] == chat_answer.headers["x-request-id"]
    assert lines[0]["provider_request_id"].startswith("req_fake_")
    assert lines[0]["provider_request_id"] != lines[0]["request_id"]
    assert lines[1]["provider_request_id"] == provider_id
    assert "provider_request_id" not in lines[2]  # never reached a provider


async def test_the_gateways_rate_limit_headers_replace_the_providers(gateway: TestClient) -> None:
    response = await gateway.post("/v1/chat/completions", json=CHAT, headers=auth(LIMITED_VK))
    assert response.headers.getall("x-ratelimit-limit-requests") == ["3"]
    assert response.headers.getall("x-ratelimit-remaining-requests") == ["2"]
    assert "x-ratelimit-reset-requests" in response.headers


async def test_a_gzip_response_reaches_the_client_still_gzip(
    gateway: TestClient, fake: FakeState
) -> None:
    response = await gateway.post(
        "/v1/chat/completions",
        json=CHAT,
        headers={
            **auth(OPENAI_VK),
            "x-fake-gzip": "1",
            "x-request-id": "gz-1",
            "Accept-Encoding": "gzip",
        },
        auto_decompress=False,
    )
    raw = await response.read()
    assert response.headers["content-encoding"] == "gzip"
    assert raw == fake.sent["gz-1"]
    assert json.loads(gzip.decompress(raw))["object"] == "chat.completion"


async def test_the_gateway_adds_no_accept_encoding_the_client_did_not_send(
    gateway: TestClient, fake: FakeState
) -> None:
    await gateway.post(
        "/v1/chat/completions",
        json=CHAT,
        headers=auth(OPENAI_VK),
        skip_auto_headers=["Accept-Encoding"],
    )
    assert "accept-encoding" not in fake.requests[-1].headers


@pytest.mark.parametrize(
    "path", ["/chat/completions", "/completions", "/embeddings", "/models", "/v1/models"]
)
async def test_seed_paths_route_like_their_v1_twins(
    gateway: TestClient, fake: FakeState, path: str
) -> None:
    body = {
        "model": "gpt-4o-mini",
        "prompt": "x",
        "input": "x",
        "messages": [{"role": "user", "content": "x"}],
    }
    method = "GET" if path.endswith("models") else "POST"
    response = await gateway.request(
        method, path, json=None if method == "GET" else body, headers=auth(OPENAI_VK)
    )
    assert response.status == 200, await response.text()
    assert fake.requests[-1].path == "/v1" + path.removeprefix("/v1")


async def test_the_seed_messages_path_routes_to_anthropic(
    gateway: TestClient, fake: FakeState
) -> None:
    response = await gateway.post("/messages", json=MESSAGES, headers={"x-api-key": ANTHROPIC_VK})
    assert response.status == 200
    assert fake.requests[-1].path == "/v1/messages"


async def test_any_other_provider_path_passes_through(gateway: TestClient, fake: FakeState) -> None:
    response = await gateway.delete(
        "/v1/vector_stores/vs_abc123?purpose=x", headers=auth(OPENAI_VK)
    )
    assert response.status == 200
    assert (fake.requests[-1].method, fake.requests[-1].path, fake.requests[-1].query_string) == (
        "DELETE",
        "/v1/vector_stores/vs_abc123",
        "purpose=x",
    )


# --- refusals, before anything goes upstream ---


async def test_no_key_gets_401_in_openai_dialect(gateway: TestClient, fake: FakeState) -> None:
    response = await gateway.post("/v1/chat/completions", json=CHAT)
    assert response.status == 401
    assert_openai_error(await response.json(), "invalid_api_key")
    assert fake.requests == []


async def test_unknown_key_gets_401_in_anthropic_dialect_without_echoing_it(
    gateway: TestClient, fake: FakeState
) -> None:
    response = await gateway.post(
        "/v1/messages", json=MESSAGES, headers={"x-api-key": "vk_not_a_real_key_123"}
    )
    assert response.status == 401
    body = await response.json()
    assert_anthropic_error(body, "authentication_error")
    assert "not found in the gateway's keys file" in body["error"]["message"]
    assert "vk_not_a_real_key_123" not in await response.text()
    assert fake.requests == []


async def test_an_oversized_body_gets_413_from_content_length(
    make_gateway: Callable[..., Awaitable[TestClient]], fake: FakeState
) -> None:
    gateway = await make_gateway(MAX_BODY_BYTES="1000")
    big = {**CHAT, "pad": "x" * 2000}
    response = await gateway.post("/v1/chat/completions", json=big, headers=auth(OPENAI_VK))
    assert response.status == 413
    assert_openai_error(await response.json(), "request_too_large")
    assert fake.requests == []


async def test_an_oversized_chunked_upload_gets_413_without_reading_it_all(
    make_gateway: Callable[..., Awaitable[TestClient]], fake: FakeState
) -> None:
    gateway = await make_gateway(MAX_BODY_BYTES="1000")
    produced = 0

    async def endless() -> Any:
        nonlocal produced
        for _ in range(10_000):  # 10 MB if read to the end
            produced += 1
            yield b"x" * 1000

    response = await gateway.post(
        "/v1/messages",
        data=endless(),
        headers={"x-api-key": ANTHROPIC_VK, "Content-Type": "application/json"},
    )
    assert response.status == 413
    assert_anthropic_error(await response.json(), "request_too_large")
    assert produced < 10_000
    assert fake.requests == []


async def test_malformed_json_gets_400(gateway: TestClient) -> None:
    response = await gateway.post(
        "/v1/chat/completions",
        data=b'{"model": "gpt',
        headers={**auth(OPENAI_VK), "Content-Type": "application/json"},
    )
    assert response.status == 400
    assert_openai_error(await response.json(), "invalid_json")


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"messages": [{"role": "user", "content": "x"}]}, "model"),
        ({"model": "", "messages": [{"role": "user", "content": "x"}]}, "model"),
        ({"model": 7, "messages": [{"role": "user", "content": "x"}]}, "model"),
        ({"model": "gpt-4o-mini"}, "messages"),
        ({"model": "gpt-4o-mini", "messages": []}, "messages"),
        ({"model": "gpt-4o-mini", "messages": "hi"}, "messages"),
    ],
)
async def test_chat_without_model_or_messages_gets_400_naming_the_field(
    gateway: TestClient, fake: FakeState, body: dict[str, Any], field: str
) -> None:
    response = await gateway.post("/v1/chat/completions", json=body, headers=auth(OPENAI_VK))
    assert response.status == 400
    error = (await response.json())["error"]
    assert error["param"] == field and field in error["message"]
    anthropic = await gateway.post("/v1/messages", json=body, headers=auth(ANTHROPIC_VK))
    assert anthropic.status == 400
    assert field in (await anthropic.json())["error"]["message"]
    assert fake.requests == []


async def test_a_model_outside_allowed_models_gets_403(
    gateway: TestClient, fake: FakeState
) -> None:
    response = await gateway.post(
        "/v1/messages", json={**MESSAGES, "model": "claude-opus-4-1"}, headers=auth(RESTRICTED_VK)
    )
    assert response.status == 403
    assert_anthropic_error(await response.json(), "permission_error")
    allowed = await gateway.post(
        "/v1/messages", json={**MESSAGES, "model": "claude-sonnet-4-5"}, headers=auth(RESTRICTED_VK)
    )
    assert allowed.status == 200
    assert len(fake.requests) == 1


@pytest.mark.parametrize("path", ["/v1/a%2Fb", "/v1//evil.example/x", "/v1/models/a%5Cb"])
async def test_a_path_that_would_climb_out_gets_400(
    gateway: TestClient, fake: FakeState, path: str
) -> None:
    response = await gateway.get(path, headers=auth(OPENAI_VK))
    assert response.status == 400
    assert_openai_error(await response.json(), "invalid_path")
    assert fake.requests == []


@pytest.mark.parametrize(
    "target",
    [
        "/v1/../../etc/passwd",
        "/v1/%2e%2e/secrets",
        "/v1/models/%2E%2E/%2e%2e/x",
        "/v1/./models",
        "http://evil.example/v1/models",
    ],
)
async def test_a_path_that_climbs_out_over_a_raw_socket_gets_400(
    gateway: TestClient, fake: FakeState, target: str
) -> None:
    # Client libraries normalise paths before sending; a raw request target is not.
    reader, writer = await asyncio.open_connection(gateway.host, gateway.port)
    writer.write(
        f"GET {target} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {OPENAI_VK}\r\nConnection: close\r\n\r\n".encode()
    )
    head = await reader.readline()
    writer.close()
    assert b" 400 " in head
    assert fake.requests == []


@pytest.mark.parametrize(
    ("method", "path", "key"),
    [
        ("TRACE", "/v1/models", OPENAI_VK),
        ("CONNECT", "/v1/models", OPENAI_VK),
        ("PROPFIND", "/v1/models", OPENAI_VK),
        ("TRACE", "/v1/messages", ANTHROPIC_VK),
    ],
)
async def test_a_method_no_provider_api_serves_gets_405_and_never_goes_upstream(
    gateway: TestClient,
    fake: FakeState,
    records: Callable[..., Awaitable[list[dict[str, Any]]]],
    method: str,
    path: str,
    key: str,
) -> None:
    # TRACE went upstream with the real key, to be echoed by whatever answers it (scanners
    # flag a TRACE answered 200), and each such request counted against the key's quota.
    reader, writer = await asyncio.open_connection(gateway.host, gateway.port)
    writer.write(
        f"{method} {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
        "Connection: close\r\n\r\n".encode()
    )
    async with asyncio.timeout(5):
        answer = await reader.read()
    writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 405 "), head
    assert b"GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS" in head
    if key == ANTHROPIC_VK:
        assert_anthropic_error(json.loads(body), "invalid_request_error")
    else:
        assert_openai_error(json.loads(body), "method_not_allowed")
    [line] = await records(1)
    assert (line["method"], line["status"]) == (method, 405)
    assert fake.requests == []


# --- the provider's answers and failures ---


@pytest.mark.parametrize("status", [400, 401, 404, 429, 500, 503])
async def test_provider_errors_pass_through_unchanged(
    gateway: TestClient, fake: FakeState, status: int
) -> None:
    response = await gateway.post(
        "/v1/chat/completions",
        json=CHAT,
        headers={**auth(OPENAI_VK), "x-fake-status": str(status), "x-request-id": f"err-{status}"},
    )
    assert response.status == status
    assert await response.read() == fake.sent[f"err-{status}"]
    if status in (429, 500, 503):
        assert response.headers["retry-after"] == "7"


@pytest.mark.parametrize(
    ("key", "path", "body", "kind"),
    [
        (OPENAI_VK, "/v1/chat/completions", CHAT, "requests"),  # OpenAI: type "requests"
        (ANTHROPIC_VK, "/v1/messages", MESSAGES, "rate_limit_error"),
    ],
)
async def test_a_provider_error_answered_whole_has_its_kind_in_the_log_line_as_in_a_stream(
    gateway: TestClient,
    records: Callable[..., Awaitable[list[dict[str, Any]]]],
    key: str,
    path: str,
    body: dict[str, Any],
    kind: str,
) -> None:
    # An operator filtering the log on `error` finds the provider's refusals whether the
    # request streamed or not: the error's type, never its message (it may quote anything).
    for stream in (False, True):
        response = await gateway.post(
            path,
            json={**body, "stream": stream},
            headers={**auth(key), "x-fake-status": "429"},
        )
        await response.read()
        assert response.status == 429
    whole, streamed = await records(2)
    assert whole["error"] == f"the provider sent an error in its answer ({kind})"
    assert whole["error"] == streamed["error"]


async def test_an_unreachable_provider_gets_502(
    aiohttp_client: Any, tmp_path: Any, settings: Any
) -> None:
    from proxy.app import build_app

    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    keys = tmp_path / "dead.json"
    keys.write_text(
        json.dumps(
            {
                "providers": {"openai": {"base_url": f"http://127.0.0.1:{port}/v1"}},
                "virtual_keys": {OPENAI_VK: {"provider": "openai", "api_key": OPENAI_REAL}},
            }
        )
    )
    client = await aiohttp_client(build_app(settings(KEYS_FILE_PATH=str(keys))))
    response = await client.post("/v1/messages", json=MESSAGES, headers=auth(OPENAI_VK))
    assert response.status == 502
    assert_anthropic_error(await response.json(), "api_error")
    response = await client.post("/v1/chat/completions", json=CHAT, headers=auth(OPENAI_VK))
    assert response.status == 502
    assert_openai_error(await response.json(), "upstream_unreachable")


async def test_a_provider_that_drops_before_headers_gets_502(gateway: TestClient) -> None:
    response = await gateway.post(
        "/v1/chat/completions", json=CHAT, headers={**auth(OPENAI_VK), "x-fake-drop": "headers"}
    )
    assert response.status == 502
    assert_openai_error(await response.json(), "upstream_unreachable")


async def test_no_response_headers_within_request_timeout_gets_504(
    make_gateway: Callable[..., Awaitable[TestClient]], records: Any
) -> None:
    gateway = await make_gateway(REQUEST_TIMEOUT="0.3")
    started = asyncio.get_running_loop().time()
    response = await gateway.post(
        "/v1/chat/completions", json=CHAT, headers={**auth(OPENAI_VK), "x-fake-hang": "headers"}
    )
    assert response.status == 504
    # REQUEST_TIMEOUT's 0.3 s, not its default 600 s: 4 s leaves loaded cores room.
    assert asyncio.get_running_loop().time() - started < 4
    assert_openai_error(await response.json(), "upstream_timeout")
    (line,) = await records(1)
    assert line["status"] == 504 and "error" in line


async def test_quota_refusals_are_429_with_retry_after(
    gateway: TestClient, fake: FakeState
) -> None:
    for _ in range(3):
        assert (
            await gateway.post("/v1/chat/completions", json=CHAT, headers=auth(LIMITED_VK))
        ).status == 200
    refused = await gateway.post("/v1/chat/completions", json=CHAT, headers=auth(LIMITED_VK))
    assert refused.status == 429
    assert_openai_error(await refused.json(), "rate_limit_exceeded")
    assert int(refused.headers["retry-after"]) > 3000
    assert refused.headers["x-should-retry"] == "false"
    assert len(fake.requests) == 3


async def test_refused_and_failed_requests_are_logged_too(
    gateway: TestClient, records: Any
) -> None:
    await gateway.post("/v1/chat/completions", json=CHAT)
    await gateway.post("/v1/chat/completions", json={"model": "x"}, headers=auth(OPENAI_VK))
    await gateway.post(
        "/v1/chat/completions", json=CHAT, headers={**auth(OPENAI_VK), "x-fake-status": "500"}
    )
    lines = await records(3)
    assert [line["status"] for line in lines] == [401, 400, 500]
    assert lines[0]["key"] is None and lines[1]["key"] == masked(OPENAI_VK)


async def test_a_json_body_cut_short_before_anything_was_sent_gets_502(
    gateway: TestClient, records: Any
) -> None:
    response = await gateway.post(
        "/v1/messages",
        json=MESSAGES,
        headers={"x-api-key": ANTHROPIC_VK, "x-fake-drop": "midstream"},
    )
    assert response.status == 502
    assert_anthropic_error(await response.json(), "api_error")
    (line,) = await records(1)
    assert line["status"] == 502 and "broke off" in line["error"]


async def test_a_small_json_answer_keeps_its_content_length(
    gateway: TestClient, fake: FakeState
) -> None:
    response = await gateway.post(
        "/v1/chat/completions", json=CHAT, headers={**auth(OPENAI_VK), "x-request-id": "len-1"}
    )
    body = await response.read()
    assert int(response.headers["content-length"]) == len(body) == len(fake.sent["len-1"])
    assert "transfer-encoding" not in response.headers


async def test_expect_100_continue_is_answered_by_the_gateway_not_forwarded(
    gateway: TestClient, fake: FakeState
) -> None:
    response = await gateway.post(
        "/v1/chat/completions", json=CHAT, headers={**auth(OPENAI_VK)}, expect100=True
    )
    assert response.status == 200
    assert "expect" not in fake.requests[-1].headers


async def test_a_slow_whole_body_is_bounded_per_silence_not_in_total(make_gateway, fake) -> None:  # type: ignore[no-untyped-def]
    from tests.conftest import OPENAI_VK, auth

    # 1 s: gaps of 0.2 s stay under it with room for a loaded machine's stalls.
    gateway = await make_gateway(STREAM_IDLE_TIMEOUT="1")
    headers = {
        **auth(OPENAI_VK),
        "x-fake-raw-chunks": "8",
        "x-fake-raw-bytes": "12800",  # 100 KB in all, with a Content-Length
        "x-fake-sized": "1",
        "x-fake-delay-ms": "200",  # 1.4 s in all, but never 1 s of silence
    }
    response = await gateway.get("/v1/files/file-abc/content", headers=headers)
    assert response.status == 200
    body = await response.read()
    assert len(body) > 100_000 and body == next(iter(fake.sent.values()))


async def test_an_answer_without_content_type_gets_none_added(gateway, fake) -> None:  # type: ignore[no-untyped-def]
    from tests.conftest import OPENAI_VK, auth

    for chunks, sized in (("3", "1"), ("3", "0")):  # sent whole, and streamed
        response = await gateway.get(
            "/v1/files/file-abc/content",
            headers={
                **auth(OPENAI_VK),
                "x-fake-raw-chunks": chunks,
                "x-fake-sized": sized,
                "x-fake-untyped": "1",
            },
        )
        assert response.status == 200
        assert "Content-Type" not in response.headers
        assert await response.read() == b"raw0\nraw1\nraw2\n"


async def test_a_silence_is_cut_by_the_first_sweep_after_the_timeout_never_before() -> None:
    silences, idle = Silences(10.0), 10.0
    forever = asyncio.get_running_loop().create_future()
    silent = asyncio.Event()  # the task reached its silence

    async def relayed() -> None:
        with silences.watch() as watch:
            for tenth in range(1, 101):  # a chunk every 0.1 s from t = 100 to 110
                watch.last = 100.0 + tenth / 10
                silences.sweep(watch.last)  # a sweep at every chunk: none cuts
            silent.set()
            await forever  # then silence from t = 110

    task = asyncio.create_task(relayed())
    await silent.wait()
    sweeps = [110.0 + idle * IDLE_SLACK * step for step in range(11)]  # one per slack
    for when in sweeps[:-1]:
        silences.sweep(when)  # the silence is shorter than the timeout: not cut
        assert task.cancelling() == 0
    silences.sweep(sweeps[-1])  # 10 s of silence: cut, at most one slack late
    assert task.cancelling() == 1
    with pytest.raises(TimeoutError):  # the cut comes up as a timeout, not a cancellation
        await task
    forever.cancel()


async def raw_provider(
    tmp_path: Path, make_gateway: Callable[..., Awaitable[TestClient]], answer: bytes
) -> tuple[TestClient, asyncio.Server]:
    """A gateway whose providers are a TCP server that writes `answer` to each request, as
    it is, then closes the connection: byte-level control of what the provider sends."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            (
                int(line[15:])
                for line in head.split(b"\r\n")
                if line.lower()[:15] == b"content-length:"
            ),
            0,
        )
        await reader.readexactly(length)
        writer.write(answer)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    path = tmp_path / "keys-raw.json"
    path.write_text(json.dumps(keys_document(f"http://127.0.0.1:{port}")))
    return await make_gateway(KEYS_FILE_PATH=str(path)), server


async def test_an_answer_ended_by_the_providers_close_reaches_the_client_whole(
    tmp_path: Path, make_gateway: Callable[..., Awaitable[TestClient]], records: Any
) -> None:
    """A small model server speaking HTTP/1.0 (Python's http.server) frames its answer by
    closing the connection: that is its end (RFC 9112 §6.3), not a broken stream."""
    completion = {
        "id": "c1",
        "object": "chat.completion",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}}],
        "usage": {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9},
    }
    body = json.dumps(completion).encode()
    head = b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n"
    gateway, server = await raw_provider(tmp_path, make_gateway, head + body)
    async with server:
        response = await gateway.post("/v1/chat/completions", json=CHAT, headers=auth(OPENAI_VK))
        assert (response.status, await response.read()) == (200, body)
    (line,) = await records(1)
    assert "error" not in line, line
    assert line["usage"]["prompt_tokens"] == 7 and not line["usage"]["estimated"], line


async def test_a_stream_whose_framing_breaks_is_cut_and_logged_as_broken_not_internal(
    tmp_path: Path, make_gateway: Callable[..., Awaitable[TestClient]], records: Any
) -> None:
    """A chunk size that is no number, after the head went on: the stream is cut and its
    log line says the provider broke it, never the gateway's own 500 (a traceback)."""
    answer = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\nzz\r\n"
    gateway, server = await raw_provider(tmp_path, make_gateway, answer)
    async with server:
        response = await gateway.post("/v1/chat/completions", json=CHAT, headers=auth(OPENAI_VK))
        assert response.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await response.read()
    (line,) = await records(1)
    assert line["status"] == 200 and "broke the stream" in line["error"], line


async def test_a_utf8_response_header_reaches_the_client_as_the_same_bytes(
    tmp_path: Path, make_gateway: Callable[..., Awaitable[TestClient]]
) -> None:
    """A file's name in Content-Disposition, sent as raw UTF-8 by many servers: the client
    reads the provider's bytes, not their Latin-1 reading re-encoded (mojibake)."""
    answer = (
        b'HTTP/1.1 200 OK\r\nContent-Disposition: attachment; filename="r\xc3\xa9sum\xc3\xa9.txt"'
        b"\r\nContent-Length: 2\r\n\r\nok"
    )
    gateway, server = await raw_provider(tmp_path, make_gateway, answer)
    async with server:
        response = await gateway.get("/v1/files/f1/content", headers=auth(OPENAI_VK))
        assert response.status == 200
        assert response.headers["Content-Disposition"] == 'attachment; filename="résumé.txt"'


@pytest.mark.parametrize(
    "coding", ["gzip, chunked", "chunked, gzip", "deflate", "chunked\r\nTransfer-Encoding: chunked"]
)
async def test_an_answer_in_a_transfer_coding_other_than_chunked_gets_502_not_its_coded_bytes(
    tmp_path: Path, make_gateway: Callable[..., Awaitable[TestClient]], coding: str
) -> None:
    """Transfer-Encoding is the provider's connection's (hop-by-hop): the gateway takes off
    chunked framing only, and drops the header. A body coded further (gzip) went to the
    client as gzip bytes labelled application/json, with nothing saying so: refused as
    nginx does ("upstream sent unknown Transfer-Encoding"), a 502 in the dialect."""
    coded = gzip.compress(b'{"id": "c1"}')
    body = b"%x\r\n%s\r\n0\r\n\r\n" % (len(coded), coded) if coding.endswith("chunked") else coded
    answer = (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
        + f"Transfer-Encoding: {coding}\r\n\r\n".encode()
        + body
    )
    gateway, server = await raw_provider(tmp_path, make_gateway, answer)
    async with server:
        response = await gateway.post("/v1/chat/completions", json=CHAT, headers=auth(OPENAI_VK))
        assert response.status == 502
        error = await response.json()
        assert "Transfer-Encoding" in error["error"]["message"], error


async def test_an_http_1_0_request_framed_by_chunks_closes_its_connection(
    gateway: TestClient, fake: FakeState
) -> None:
    """HTTP/1.0 has no chunked coding: a sender of one that names Transfer-Encoding may hold
    back bytes the next use of the connection would misread (an HTTP/1.0 proxy in front
    reads no body at all), so the connection is closed after the answer, whatever
    keep-alive asks (RFC 9112 §6.1), and what follows on it is not served."""
    body = json.dumps(CHAT).encode()
    head = (
        "POST /v1/chat/completions HTTP/1.0\r\nHost: gateway\r\n"
        f"Authorization: Bearer {OPENAI_VK}\r\nConnection: keep-alive\r\n"
        "Transfer-Encoding: chunked\r\n\r\n"
    )
    chunks = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    reader, writer = await asyncio.open_connection(gateway.host, gateway.port)
    try:
        writer.write(head.encode() + chunks + b"GET /health HTTP/1.0\r\n\r\n")
        async with asyncio.timeout(5):  # the end of the connection, not the keep-alive timer
            answer = await reader.read()
    finally:
        writer.close()
    answer_head = answer.partition(b"\r\n\r\n")[0]
    assert answer_head.startswith(b"HTTP/1.0 200"), answer_head
    assert b"keep-alive" not in answer_head.lower()
    assert answer.count(b"HTTP/1.") == 1, answer  # /health was not answered
    assert len(fake.requests) == 1


async def test_an_agents_sdk_trace_upload_routed_through_the_gateway_goes_with_the_real_key(
    gateway: TestClient, fake: FakeState, records: Callable[..., Awaitable[list[dict[str, Any]]]]
) -> None:
    # The OpenAI Agents SDK's trace exporter, pointed at the gateway (docs/agents-sdk.md):
    # POST /v1/traces/ingest, OpenAI-Beta: traces=v1, the virtual key as its bearer token.
    body = b'{"data": [{"object": "trace", "id": "trace_0123", "workflow_name": "Agent workflow"}]}'
    response = await gateway.post(
        "/v1/traces/ingest",
        data=body,
        headers={
            **auth(OPENAI_VK),
            "Content-Type": "application/json",
            "OpenAI-Beta": "traces=v1",
        },
    )
    assert response.status == 200, await response.text()
    seen = fake.requests[-1]
    assert seen.path == "/v1/traces/ingest"
    assert seen.headers.getall("authorization") == [f"Bearer {OPENAI_REAL}"]
    assert seen.headers["openai-beta"] == "traces=v1"
    assert seen.body == body
    (line,) = await records(1)
    assert (line["path"], line["model"], line["status"], line["usage"]) == (
        "/v1/traces/ingest",
        None,
        200,
        None,
    )


class Unsent:
    """A client's transport, as the sweep reads it: how much of a write it has not taken."""

    def __init__(self, size: int) -> None:
        self.size = size

    def get_write_buffer_size(self) -> int:
        return self.size


async def test_a_client_taking_a_long_write_slowly_moves_one_taking_none_is_cut() -> None:
    silences, idle = Silences(10.0), 10.0
    transport = Unsent(256 * 1024)
    forever = asyncio.get_running_loop().create_future()
    writing = asyncio.Event()

    async def relayed() -> None:
        with silences.watch(transport=transport) as watch:  # type: ignore[arg-type]
            watch.sending()
            watch.last = 100.0  # the chunk came, and its write began, at t = 100
            writing.set()
            await forever  # a write that waits for the client

    task = asyncio.create_task(relayed())
    await asyncio.wait_for(writing.wait(), 5)
    period = idle * IDLE_SLACK
    now = 100.0
    for _ in range(30):  # 30 s of one write, the client taking 4 KiB a second
        now += period
        transport.size -= 4096
        silences.sweep(now)
        assert task.cancelling() == 0, f"cut at t = {now} while the client reads"
    for _ in range(9):  # then it takes nothing: cut once that lasted the timeout
        now += period
        silences.sweep(now)
        assert task.cancelling() == 0
    silences.sweep(now + period)
    assert task.cancelling() == 1
    with pytest.raises(TimeoutError):
        await task
    forever.cancel()
