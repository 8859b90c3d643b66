"""CORS: off by default; preflights answered before authentication; streams carry the headers."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from multidict import CIMultiDict

from proxy.settings import SettingError, Settings
from tests.conftest import (
    ANTHROPIC_VK,
    LIMITED_VK,
    OPENAI_REAL,
    OPENAI_VK,
    assert_openai_error,
    auth,
)
from tests.support.bodies import CHAT, MESSAGES, STREAM

APP = "https://app.example.com"
# What the OpenAI SDK in a browser asks for before its first call.
SDK_HEADERS = (
    "authorization, content-type, x-stainless-os, x-stainless-lang, x-stainless-arch, "
    "x-stainless-runtime, x-stainless-retry-count, x-stainless-timeout, openai-beta"
)


def preflight(headers: str = SDK_HEADERS, origin: str = APP) -> dict[str, str]:
    return {
        "Origin": origin,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": headers,
    }


async def test_without_cors_allowed_origins_no_cors_header_is_sent(gateway: TestClient) -> None:
    answer = await gateway.options("/v1/chat/completions", headers=preflight())
    assert answer.status == 401  # a plain OPTIONS, proxied like any request
    response = await gateway.post(
        "/v1/chat/completions", json=STREAM, headers={**auth(OPENAI_VK), "Origin": APP}
    )
    await response.read()
    assert not [name for name in response.headers if name.lower().startswith("access-control")]


async def test_a_preflight_is_answered_before_authentication_with_the_sdk_headers(
    make_gateway: Callable[..., Awaitable[TestClient]],
) -> None:
    gateway = await make_gateway(CORS_ALLOWED_ORIGINS=f"{APP}, http://localhost:5173")
    answer = await gateway.options("/v1/chat/completions", headers=preflight())
    assert answer.status == 204
    assert answer.headers["access-control-allow-origin"] == APP
    assert "POST" in answer.headers["access-control-allow-methods"]
    allowed = {h.strip() for h in answer.headers["access-control-allow-headers"].split(",")}
    assert allowed == {h.strip() for h in SDK_HEADERS.split(",")}
    assert int(answer.headers["access-control-max-age"]) > 0
    assert "Origin" in answer.headers["vary"]
    assert answer.headers["x-request-id"]  # every answer carries one (SPEC: errors)
    anthropic = await gateway.options(
        "/v1/messages",
        headers=preflight(
            "x-api-key, anthropic-version, anthropic-beta, "
            "anthropic-dangerous-direct-browser-access, content-type",
            origin="http://localhost:5173",
        ),
    )
    assert anthropic.status == 204
    assert anthropic.headers["access-control-allow-origin"] == "http://localhost:5173"
    # A page instrumented with OpenTelemetry adds the W3C trace context the gateway reads.
    traced = await gateway.options(
        "/v1/chat/completions", headers=preflight(f"{SDK_HEADERS}, traceparent, tracestate")
    )
    assert traced.status == 204
    assert "traceparent" in traced.headers["access-control-allow-headers"]


@pytest.mark.parametrize(
    ("path", "headers"),
    [
        # The OpenAI JS SDK (6.x) and the Vercel AI SDK set User-Agent on every call, also in
        # a page; Firefox and Safari send it (Chrome drops it), so their preflight asks for it,
        # as Firefox writes the list: lower case, sorted, no spaces.
        (
            "/v1/chat/completions",
            "authorization,content-type,user-agent,x-stainless-arch,x-stainless-lang,"
            "x-stainless-os,x-stainless-package-version,x-stainless-retry-count,"
            "x-stainless-runtime,x-stainless-runtime-version",
        ),
        (
            "/v1/messages",
            "anthropic-dangerous-direct-browser-access,anthropic-version,content-type,"
            "user-agent,x-api-key,x-stainless-arch,x-stainless-lang,x-stainless-os,"
            "x-stainless-package-version,x-stainless-retry-count,x-stainless-runtime,"
            "x-stainless-runtime-version,x-stainless-timeout",
        ),
        ("/v1/responses", "authorization,content-type,user-agent"),  # the AI SDK's
    ],
)
async def test_a_preflight_of_a_js_sdk_in_firefox_or_safari_asking_for_user_agent_is_allowed(
    make_gateway: Callable[..., Awaitable[TestClient]], path: str, headers: str
) -> None:
    gateway = await make_gateway(CORS_ALLOWED_ORIGINS=APP)
    answer = await gateway.options(path, headers=preflight(headers))
    assert answer.status == 204, await answer.text()
    allowed = {h.strip() for h in answer.headers["access-control-allow-headers"].split(",")}
    assert allowed == set(headers.split(","))
    # The call that follows goes through, its User-Agent passed on to the provider.
    response = await gateway.post(
        "/v1/chat/completions",
        json=STREAM,
        headers={**auth(OPENAI_VK), "Origin": APP, "User-Agent": "OpenAI/JS 6.49.0"},
    )
    assert response.status == 200
    assert response.headers["access-control-allow-origin"] == APP
    await response.read()


@pytest.mark.parametrize(
    ("headers", "origin"),
    [
        (SDK_HEADERS, "https://evil.example.com"),
        ("authorization, x-evil-header", APP),
        ("cookie", APP),
    ],
)
async def test_a_preflight_from_another_origin_or_asking_other_headers_is_refused(
    make_gateway: Callable[..., Awaitable[TestClient]], headers: str, origin: str
) -> None:
    gateway = await make_gateway(CORS_ALLOWED_ORIGINS=APP)
    answer = await gateway.options("/v1/chat/completions", headers=preflight(headers, origin))
    assert answer.status == 403
    assert_openai_error(await answer.json(), "cors_not_allowed")
    assert "access-control-allow-headers" not in answer.headers
    assert answer.headers["x-request-id"]  # every answer carries one (SPEC: errors)
    own = {**preflight(headers, origin), "x-request-id": "req_from_the_page"}
    for path in ("/v1/chat/completions", "/health"):
        answer = await gateway.options(path, headers=own)
        assert answer.headers["x-request-id"] == "req_from_the_page"


async def test_a_stream_read_by_a_browser_like_client_carries_the_headers_from_the_first_byte(
    make_gateway: Callable[..., Awaitable[TestClient]],
) -> None:
    gateway = await make_gateway(CORS_ALLOWED_ORIGINS=APP)
    response = await gateway.post(
        "/v1/chat/completions",
        json=STREAM,
        headers={
            **auth(LIMITED_VK),
            "Origin": APP,
            "x-fake-chunks": "10",
            "x-fake-delay-ms": "100",
        },
    )
    first = await response.content.readany()  # headers and first event, before the last
    assert first.startswith(b"data: ") and b"[DONE]" not in first
    assert response.headers["access-control-allow-origin"] == APP
    exposed = {h.strip() for h in response.headers["access-control-expose-headers"].split(",")}
    assert {"x-request-id", "x-ratelimit-remaining-requests", "x-ratelimit-limit-requests"} <= (
        exposed
    )
    assert "access-control-allow-credentials" not in response.headers
    assert (first + await response.read()).endswith(b"data: [DONE]\n\n")


async def test_a_page_reads_the_keys_limits_in_anthropics_headers_the_gateway_writes_for_it(
    make_gateway: Callable[..., Awaitable[TestClient]],
) -> None:
    """An Anthropic answer carries the key's limits in anthropic-ratelimit-* (in place of the
    account's), which the Anthropic SDK's `withResponse()` shows a page as it shows a
    server; they were not exposed, so a page read none of them where x-ratelimit-* it could."""
    gateway = await make_gateway(CORS_ALLOWED_ORIGINS=APP)
    response = await gateway.post(
        "/v1/messages", json=MESSAGES, headers={**auth(ANTHROPIC_VK), "Origin": APP}
    )
    assert response.status == 200
    assert response.headers["anthropic-ratelimit-requests-remaining"] == "99"
    exposed = {h.strip() for h in response.headers["access-control-expose-headers"].split(",")}
    assert {
        "anthropic-ratelimit-requests-limit",
        "anthropic-ratelimit-requests-remaining",
        "anthropic-ratelimit-requests-reset",
        "x-ratelimit-remaining-requests",
        "request-id",
    } <= exposed


async def test_a_refusal_carries_the_headers_so_the_page_can_read_it(
    make_gateway: Callable[..., Awaitable[TestClient]],
) -> None:
    gateway = await make_gateway(CORS_ALLOWED_ORIGINS=APP)
    for _ in range(3):
        await (
            await gateway.post("/v1/chat/completions", json=STREAM, headers=auth(LIMITED_VK))
        ).read()
    refused = await gateway.post(
        "/v1/chat/completions", json=STREAM, headers={**auth(LIMITED_VK), "Origin": APP}
    )
    assert refused.status == 429
    assert refused.headers["access-control-allow-origin"] == APP
    exposed = refused.headers["access-control-expose-headers"]
    assert "retry-after" in exposed and "retry-after-ms" in exposed
    unknown = await gateway.post("/v1/messages", json={}, headers={"Origin": APP})
    assert unknown.status == 401 and unknown.headers["access-control-allow-origin"] == APP


async def test_any_origin_answers_star_and_credentials_add_the_echoed_origin(
    make_gateway: Callable[..., Awaitable[TestClient]],
) -> None:
    anyone = await make_gateway(CORS_ALLOWED_ORIGINS="*")
    response = await anyone.post(
        "/v1/messages", json={}, headers={**auth(ANTHROPIC_VK), "Origin": "https://x.test"}
    )
    assert response.headers["access-control-allow-origin"] == "*"
    listed = await make_gateway(CORS_ALLOWED_ORIGINS=APP, CORS_ALLOW_CREDENTIALS="true")
    answer = await listed.options("/v1/messages", headers=preflight("content-type"))
    assert answer.headers["access-control-allow-origin"] == APP
    assert answer.headers["access-control-allow-credentials"] == "true"


def test_star_with_credentials_and_a_malformed_origin_are_refused_at_start() -> None:
    with pytest.raises(SettingError, match="CORS_ALLOW_CREDENTIALS=true cannot go with"):
        Settings.from_env({"CORS_ALLOWED_ORIGINS": "*", "CORS_ALLOW_CREDENTIALS": "true"})
    with pytest.raises(
        SettingError, match="^CORS_ALLOWED_ORIGINS: 'app.example.com' is not an origin"
    ):
        Settings.from_env({"CORS_ALLOWED_ORIGINS": "app.example.com"})
    parsed = Settings.from_env({"CORS_ALLOWED_ORIGINS": f" {APP}/ ,http://localhost:3000"})
    assert parsed.cors_allowed_origins == (APP, "http://localhost:3000")


async def test_a_page_can_read_whether_its_answer_came_from_the_cache(
    gateway_with_keys: Callable[..., Awaitable[TestClient]],
) -> None:
    """x-llm-gateway-cache is the gateway's own answer header for clients (hit, miss,
    bypass): a page reads it only if it is exposed, as the request id is."""
    cached = "vk_test_cors_cached_0a1b2c3d"
    gateway = await gateway_with_keys(
        {cached: {"provider": "openai", "api_key": OPENAI_REAL, "cache": {"ttl_seconds": 60}}},
        CORS_ALLOWED_ORIGINS=APP,
    )
    for expected in ("miss", "hit"):
        response = await gateway.post(
            "/v1/chat/completions", json=CHAT, headers={**auth(cached), "Origin": APP}
        )
        await response.read()
        assert response.headers["x-llm-gateway-cache"] == expected
        exposed = response.headers["access-control-expose-headers"].split(", ")
        assert "x-llm-gateway-cache" in exposed and "x-request-id" in exposed


async def test_a_providers_own_cors_headers_never_reach_the_browser(
    aiohttp_server: Callable[..., Awaitable[TestServer]],
    tmp_path: Path,
    make_gateway: Callable[..., Awaitable[TestClient]],
) -> None:
    """A provider that answers CORS itself (llama.cpp's server reflects the request's Origin
    on every answer, with credentials; Anthropic's API answers `*` to a request saying
    `anthropic-dangerous-direct-browser-access`): the browser reads the gateway's CORS only.
    Passed on, they let a page of any origin read answers from a gateway whose CORS is off
    (SPEC: unset, no CORS headers), or from an origin it does not allow."""

    async def reflecting(request: web.Request) -> web.Response:
        await request.read()
        origin = request.headers.get("Origin", "")
        return web.json_response(
            {"id": "chatcmpl-1", "object": "chat.completion", "choices": []},
            headers={
                "Access-Control-Allow-Origin": origin,
                "Access-Control-Allow-Credentials": "true",
                "Access-Control-Allow-Methods": "POST",
                "Access-Control-Allow-Headers": "*",
                "Access-Control-Expose-Headers": "*",
                "Access-Control-Max-Age": "86400",
            },
        )

    provider = web.Application()
    provider.router.add_post("/v1/chat/completions", reflecting)
    server = await aiohttp_server(provider)
    keys = {
        "providers": {"openai": {"base_url": str(server.make_url("/v1"))}},
        "virtual_keys": {OPENAI_VK: {"provider": "openai", "api_key": OPENAI_REAL}},
    }
    (tmp_path / "reflecting.json").write_text(json.dumps(keys))
    other = "https://elsewhere.example"
    for cors, origin, expected in [
        ({}, other, {}),  # CORS off
        ({"CORS_ALLOWED_ORIGINS": APP}, other, {}),  # an origin not allowed
        ({"CORS_ALLOWED_ORIGINS": APP}, APP, {"access-control-allow-origin": APP}),
    ]:
        gateway = await make_gateway(KEYS_FILE_PATH=str(tmp_path / "reflecting.json"), **cors)
        response = await gateway.post(
            "/v1/chat/completions", json=CHAT, headers={**auth(OPENAI_VK), "Origin": origin}
        )
        await response.read()
        assert response.status == 200
        seen = {
            name.lower(): value
            for name, value in response.headers.items()
            if name.lower().startswith("access-control-") and "expose" not in name.lower()
        }
        assert seen == expected, (cors, origin)
        exposed = response.headers.get("access-control-expose-headers")
        assert exposed is None if not expected else "x-request-id" in exposed
        await gateway.close()


async def test_every_vary_line_of_the_providers_answer_is_kept_beside_the_gateways_own(
    aiohttp_server: Callable[..., Awaitable[TestServer]],
    tmp_path: Path,
    make_gateway: Callable[..., Awaitable[TestClient]],
) -> None:
    """A provider answering two Vary lines (`Origin, X-Origin`, then `Accept-Encoding`, as
    Google's front ends do): a shared cache in front of the gateway must still key the answer
    by Accept-Encoding, or it serves a gzip body to a client that cannot read it."""

    async def two_vary_lines(request: web.Request) -> web.Response:
        await request.read()
        headers = CIMultiDict([("Vary", "Origin, X-Origin"), ("Vary", "Accept-Encoding")])
        body = {"id": "chatcmpl-1", "object": "chat.completion", "choices": []}
        return web.json_response(body, headers=headers)

    provider = web.Application()
    provider.router.add_post("/v1/chat/completions", two_vary_lines)
    server = await aiohttp_server(provider)
    keys = {
        "providers": {"openai": {"base_url": str(server.make_url("/v1"))}},
        "virtual_keys": {OPENAI_VK: {"provider": "openai", "api_key": OPENAI_REAL}},
    }
    (tmp_path / "vary.json").write_text(json.dumps(keys))
    gateway = await make_gateway(
        KEYS_FILE_PATH=str(tmp_path / "vary.json"), CORS_ALLOWED_ORIGINS=APP
    )
    response = await gateway.post(
        "/v1/chat/completions", json=CHAT, headers={**auth(OPENAI_VK), "Origin": APP}
    )
    await response.read()
    assert response.status == 200
    varies = {
        value.strip().lower()
        for line in response.headers.getall("vary")
        for value in line.split(",")
    }
    assert {"origin", "x-origin", "accept-encoding", "access-control-request-method"} <= varies
