"""One exchange for every request: the same refusals, counts and endings over HTTP and WebSocket.

Each test runs a request over both transports: an HTTP request, and a WebSocket upgrade sent
as a plain GET (so the refusal's body can be read), into the fake provider (its /v1/realtime
is a real WebSocket).
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import ClientResponse
from aiohttp.test_utils import TestClient
from prometheus_client.parser import text_string_to_metric_families

from proxy.app import QUOTA
from proxy.keys.keys import masked
from proxy.record import Record
from tests.conftest import (
    ANTHROPIC_VK,
    LIMITED_VK,
    OPENAI_VK,
    RESTRICTED_VK,
    assert_anthropic_error,
    assert_openai_error,
    auth,
)

Records = Callable[..., Awaitable[list[dict[str, Any]]]]
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
TRANSPORTS = ("http", "websocket")


def upgrade_headers(**extra: str) -> dict[str, str]:
    return {
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Version": "13",
        "Sec-WebSocket-Key": base64.b64encode(os.urandom(16)).decode(),
        **extra,
    }


async def send(
    gateway: TestClient, transport: str, key: str, model: str = "gpt-4o-mini", **headers: str
) -> ClientResponse:
    """One request over `transport`: a chat completion, or a Realtime session's upgrade."""
    if transport == "http":
        body = {**CHAT, "model": model}
        return await gateway.post(
            "/v1/chat/completions", json=body, headers={**auth(key), **headers}
        )
    return await gateway.get(
        f"/v1/realtime?model={model}", headers=upgrade_headers(**auth(key), **headers)
    )


async def quota_rejections(gateway: TestClient) -> dict[str, float]:
    """llm_gateway_quota_rejections_total by key name, as /metrics says."""
    text = await (await gateway.get("/metrics")).text()
    return {
        sample.labels["key"]: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "llm_gateway_quota_rejections_total"
    }


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_lockout_429_is_not_counted_as_a_quota_rejection(
    make_gateway: Callable[..., Awaitable[TestClient]], records: Records, transport: str
) -> None:
    gateway = await make_gateway(AUTH_FAILURE_LIMIT="2", AUTH_FAILURE_WINDOW_SECONDS="600")
    for guess in ("vk_test_openai_0000000000", "vk_test_openai_0000000001"):
        assert (await send(gateway, transport, guess)).status == 401
    response = await send(gateway, transport, OPENAI_VK)  # the right key, from a locked address
    assert response.status == 429 and int(response.headers["retry-after"]) > 500
    assert_openai_error(await response.json(), "too_many_authentication_failures")
    assert await quota_rejections(gateway) == {}  # no key "none", no key at all
    line = (await records(3))[2]
    assert (line["status"], line["key"]) == (429, None)
    assert line["error"].startswith("Too many failed authentications")


async def test_a_quota_429_is_counted_for_its_key_over_either_transport(
    gateway: TestClient,
) -> None:
    for _ in range(3):  # LIMITED_VK: 3 requests per window
        assert (await send(gateway, "http", LIMITED_VK)).status == 200
    for count, transport in enumerate(TRANSPORTS, start=1):
        response = await send(gateway, transport, LIMITED_VK)
        assert response.status == 429
        assert_openai_error(await response.json(), "rate_limit_exceeded")
        assert await quota_rejections(gateway) == {"limited": count}


async def test_a_providers_429_on_the_upgrade_is_its_own_not_a_quota_rejection(
    gateway: TestClient, records: Records
) -> None:
    response = await send(gateway, "websocket", OPENAI_VK, **{"x-fake-status": "429"})
    assert response.status == 429
    assert_openai_error(await response.json(), "upstream_refused")
    assert await quota_rejections(gateway) == {}
    (line,) = await records(1)
    assert line["status"] == 429 and line["key"] is not None


def break_tracker(gateway: TestClient) -> None:
    """A bug in the memory tracker: its admission raises (both ways of asking it)."""

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("a bug in the tracker")  # not TrackerUnavailable (a lost Redis)

    tracker = gateway.app[QUOTA].tracker
    tracker.admit = broken  # type: ignore[method-assign,assignment]
    tracker.admit_now = broken  # type: ignore[attr-defined]


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_an_unexpected_error_is_logged_as_500_internal_and_answered_in_the_dialect(
    gateway: TestClient, records: Records, caplog: pytest.LogCaptureFixture, transport: str
) -> None:
    break_tracker(gateway)
    with caplog.at_level(logging.ERROR, logger="llm_gateway"):
        response = await send(gateway, transport, OPENAI_VK)
    assert response.status == 500
    assert_openai_error(await response.json(), "internal_error")
    assert "a bug in the tracker" not in await response.text()
    (line,) = await records(1)
    assert (line["status"], line["error"]) == (500, "internal error")
    assert line["key"] is not None and line["duration_ms"] is not None
    (logged,) = [entry for entry in caplog.records if "internal error on" in entry.message]
    assert logged.exc_info is not None and "a bug in the tracker" in str(logged.exc_info[1])


@pytest.mark.parametrize("broken", ["admit", "settle"])
async def test_a_virtual_key_in_the_path_of_a_failed_request_is_masked_on_stderr(
    gateway: TestClient, caplog: pytest.LogCaptureFixture, broken: str
) -> None:
    """The traceback's line names the request's path, which may hold a virtual key (pasted as
    a file's or a model's id): it is masked there, as in the log line, and never whole on
    stderr."""

    def bug(*args: object, **kwargs: object) -> None:
        raise RuntimeError("a bug in the tracker")

    tracker = gateway.app[QUOTA].tracker
    for name in ("admit", "admit_now") if broken == "admit" else ("settle", "settle_scopes"):
        setattr(tracker, name, bug)
    with caplog.at_level(logging.ERROR, logger="llm_gateway"):
        response = await gateway.get(f"/v1/models/{OPENAI_VK}", headers=auth(OPENAI_VK))
        await response.read()
    assert response.status == (500 if broken == "admit" else 200)
    (logged,) = [entry for entry in caplog.records if "internal error" in entry.message]
    assert OPENAI_VK not in logged.message
    assert f"/v1/models/{masked(OPENAI_VK)}" in logged.message


async def test_an_unexpected_error_on_an_anthropic_path_answers_in_its_dialect(
    gateway: TestClient, records: Records
) -> None:
    break_tracker(gateway)
    body = {"model": "claude-3-5-haiku-latest", "max_tokens": 8, "messages": CHAT["messages"]}
    response = await gateway.post("/v1/messages", json=body, headers={"x-api-key": ANTHROPIC_VK})
    assert response.status == 500
    assert_anthropic_error(await response.json(), "api_error")
    (line,) = await records(1)
    assert (line["status"], line["error"]) == (500, "internal error")


@pytest.mark.parametrize(
    ("http_path", "websocket_path"),
    [
        pytest.param(
            "/v1/chat/completions", "/v1/realtime?model=gpt-realtime", id="model-named-in-body"
        ),
        pytest.param(
            "/v1/deployments/gpt-realtime/chat/completions",
            "/v1/deployments/gpt-realtime/realtime",
            id="model-named-in-path",
        ),
    ],
)
async def test_a_model_outside_allowed_models_gets_the_same_403_over_both_transports(
    gateway: TestClient, records: Records, fake: Any, http_path: str, websocket_path: str
) -> None:
    """One check of allowed_models: the same refusal, the same log line, by either door."""
    body = {**CHAT, "model": "gpt-realtime"}
    over_http = await gateway.post(http_path, json=body, headers=auth(RESTRICTED_VK))
    over_websocket = await gateway.get(
        websocket_path, headers=upgrade_headers(**auth(RESTRICTED_VK))
    )
    bodies = [await over_http.json(), await over_websocket.json()]
    assert [over_http.status, over_websocket.status] == [403, 403]
    assert_openai_error(bodies[0], "model_not_allowed")
    assert bodies[0] == bodies[1]
    assert "gpt-realtime" in bodies[0]["error"]["message"]
    lines = await records(2)
    assert [(line["status"], line["model"], line["error"]) for line in lines] == [
        (403, "gpt-realtime", bodies[0]["error"]["message"])
    ] * 2
    assert fake.requests == []  # neither went upstream


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_sink_that_fails_is_logged_and_the_sinks_after_it_still_run(
    gateway: TestClient, records: Records, caplog: pytest.LogCaptureFixture, transport: str
) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("a bug in the tracker's settle")

    tracker = gateway.app[QUOTA].tracker
    tracker.settle = broken  # type: ignore[method-assign,assignment]
    tracker.settle_scopes = broken  # type: ignore[method-assign,assignment]
    with caplog.at_level(logging.ERROR, logger="llm_gateway"):
        if transport == "http":
            response = await send(gateway, transport, OPENAI_VK)
            assert response.status == 200
            await response.read()
        else:
            async with gateway.ws_connect(
                "/v1/realtime?model=gpt-realtime", headers=auth(OPENAI_VK)
            ) as ws:
                await ws.receive()  # session.created
        (line,) = await records(1)  # the log sink comes after the charge: it still ran
    assert line["status"] == (200 if transport == "http" else 101)
    (logged,) = [entry for entry in caplog.records if "internal error settling" in entry.message]
    assert logged.message.endswith("(charge)")
    text = await (await gateway.get("/metrics")).text()
    assert "llm_gateway_requests_total{" in text  # the metrics sink ran too


async def test_a_session_whose_client_vanishes_is_answered_101_not_a_499(
    gateway: TestClient, records: Records
) -> None:
    """A client leaving cancels the handler: an HTTP answer cut so is 499, but a WebSocket
    session that opened was answered, whoever ended it (its tally says who)."""
    reader, writer = await asyncio.open_connection(gateway.host, gateway.port)
    head = "".join(
        f"{name}: {value}\r\n" for name, value in upgrade_headers(**auth(OPENAI_VK)).items()
    )
    writer.write(
        f"GET /v1/realtime?model=gpt-realtime HTTP/1.1\r\nHost: gateway\r\n{head}\r\n".encode()
    )
    await writer.drain()
    assert (await asyncio.wait_for(reader.readline(), 5)).startswith(b"HTTP/1.1 101")
    writer.transport.abort()  # no close frame: the TCP connection just goes
    (line,) = await records(1)
    assert line["status"] == 101 and line.get("error") is None
    assert line["websocket"]["ended_by"] == "client_lost"


async def test_a_bug_after_the_answer_began_cuts_the_connection_and_is_logged_500(
    gateway: TestClient,
    records: Records,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Once the status went out, a 500 body cannot follow: the stream is cut, not added to."""

    def broken(record: Record) -> None:
        raise RuntimeError("a bug while streaming")

    monkeypatch.setattr(Record, "mark_first_byte", broken)  # runs after the stream's headers
    body = {**CHAT, "stream": True}
    with caplog.at_level(logging.ERROR, logger="llm_gateway"):
        response = await gateway.post("/v1/chat/completions", json=body, headers=auth(OPENAI_VK))
        assert response.status == 200  # the provider's status went out first
        with pytest.raises(aiohttp.ClientPayloadError):
            await response.read()
    (line,) = await records(1)
    assert (line["status"], line["error"]) == (500, "internal error")
    assert any("internal error on POST" in entry.message for entry in caplog.records)
