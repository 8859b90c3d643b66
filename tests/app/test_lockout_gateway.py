"""Failed authentications through the gateway: refused, counted, logged, then throttled per client
address, on the proxied paths, /usage and /metrics alike (the Lockout itself is
tests/unit/test_lockout.py)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import (
    ANTHROPIC_VK,
    OPENAI_VK,
    SECRETS,
    assert_anthropic_error,
    assert_openai_error,
    auth,
)
from tests.support.bodies import CHAT
from tests.support.fake_provider import FakeState


def auth_failures(text: str) -> dict[str, float]:
    return {
        sample.labels["outcome"]: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "llm_gateway_auth_failures_total"
    }


async def test_guessing_keys_is_refused_counted_and_logged_then_throttled(
    make_gateway: Callable[..., Awaitable[TestClient]],
    fake: FakeState,
    records: Callable[..., Awaitable[list[dict[str, Any]]]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    gateway = await make_gateway(AUTH_FAILURE_LIMIT="3", AUTH_FAILURE_WINDOW_SECONDS="600")
    assert auth_failures(await (await gateway.get("/metrics")).text()) == {
        "refused": 0,
        "throttled": 0,
    }
    with caplog.at_level(logging.WARNING, logger="llm_gateway"):
        for n in range(3):  # guessing the rest of a key that begins as OPENAI_VK does
            guess = f"vk_test_openai_{n:010d}"
            response = await gateway.post("/v1/chat/completions", json=CHAT, headers=auth(guess))
            assert response.status == 401
    # A key beginning alike is not looked up now, the right one included (it was never
    # accepted from this address): that prefix has had its tries here.
    response = await gateway.post("/v1/chat/completions", json=CHAT, headers=auth(OPENAI_VK))
    assert response.status == 429 and int(response.headers["retry-after"]) > 500
    assert response.headers["x-should-retry"] == "false"
    assert_openai_error(await response.json(), "too_many_authentication_failures")
    response = await gateway.post(
        "/v1/messages", json=CHAT, headers={"x-api-key": "vk_test_openai_0000000009"}
    )
    assert response.status == 429
    assert_anthropic_error(await response.json(), "rate_limit_error")
    assert fake.requests == []
    lines = await records(5)
    assert [line["status"] for line in lines] == [401, 401, 401, 429, 429]
    failures = [r.getMessage() for r in caplog.records if "failed authentication" in r.message]
    assert len(failures) == 3 and "127.0.0.1" in failures[0]
    metrics = await (await gateway.get("/metrics")).text()
    assert auth_failures(metrics) == {"refused": 3, "throttled": 2}
    assert "llm_gateway_quota_rejections_total{" not in metrics  # a lockout is not a quota
    for secret in SECRETS:
        assert all(secret not in message for message in failures)


async def test_usage_is_throttled_the_same_way_and_its_failures_counted(
    make_gateway: Callable[..., Awaitable[TestClient]], caplog: pytest.LogCaptureFixture
) -> None:
    gateway = await make_gateway(AUTH_FAILURE_LIMIT="3", AUTH_FAILURE_WINDOW_SECONDS="600")
    assert (await gateway.get("/usage", headers=auth(ANTHROPIC_VK))).status == 200
    with caplog.at_level(logging.WARNING, logger="llm_gateway"):
        for n in range(3):
            response = await gateway.get("/usage", headers=auth(f"vk_test_openai_{n:010d}"))
            assert response.status == 401
    assert sum("failed authentication" in r.message for r in caplog.records) == 3
    response = await gateway.get("/usage", headers=auth(OPENAI_VK))
    assert response.status == 429 and "retry-after" in response.headers
    assert_openai_error(await response.json(), "too_many_authentication_failures")
    # The proxied paths share the address's count.
    response = await gateway.post("/v1/chat/completions", json=CHAT, headers=auth(OPENAI_VK))
    assert response.status == 429
    # A key accepted from this address before is served all the same.
    assert (await gateway.get("/usage", headers=auth(ANTHROPIC_VK))).status == 200
    assert auth_failures(await (await gateway.get("/metrics")).text()) == {
        "refused": 3,
        "throttled": 2,
    }


async def test_metrics_needs_the_metrics_token_when_one_is_set(
    make_gateway: Callable[..., Awaitable[TestClient]],
) -> None:
    open_gateway = await make_gateway()
    assert (await open_gateway.get("/metrics")).status == 200
    token = "metrics-token-6f1e2d3c4b5a"
    gateway = await make_gateway(METRICS_TOKEN=token, AUTH_FAILURE_LIMIT="5")
    for headers in ({}, auth("wrong-token"), auth(token[:-1]), {"x-api-key": token}):
        response = await gateway.get("/metrics", headers=headers)
        assert response.status == 401
        body = await response.text()
        assert_openai_error(await response.json(), "invalid_metrics_token")
        assert token not in body and "llm_gateway_requests" not in body
    response = await gateway.get("/metrics", headers=auth(token))
    assert response.status == 200 and "llm_gateway_requests_in_flight" in await response.text()
    response = await gateway.get("/metrics", headers={**auth(token), "Accept": "application/json"})
    assert (await response.json())["total_requests"] == 0
    # Guessing the token counts as failed authentications too...
    for n in range(3):  # with token[:-1] and x-api-key above: 5 tries of its prefix
        assert (await gateway.get("/metrics", headers=auth(f"{token[:-2]}{n:02d}"))).status == 401
    assert (await gateway.get("/metrics", headers=auth(f"{token[:-2]}99"))).status == 429
    # ...and the token, accepted from here before, is still served.
    assert (await gateway.get("/metrics", headers=auth(token))).status == 200


async def test_a_guesser_behind_a_load_balancer_that_writes_its_port_is_locked_out(
    make_gateway: Callable[..., Awaitable[TestClient]], caplog: pytest.LogCaptureFixture
) -> None:
    # Azure Application Gateway writes `ip:port` (`[ip]:port` for IPv6) in X-Forwarded-For,
    # and every new connection of a client has a new port.
    gateway = await make_gateway(
        TRUSTED_PROXIES="127.0.0.1", AUTH_FAILURE_LIMIT="3", AUTH_FAILURE_WINDOW_SECONDS="600"
    )
    for client in ("198.51.100.7:{port}", "[2001:db8::7]:{port}"):
        with caplog.at_level(logging.WARNING, logger="llm_gateway"):
            for n in range(3):
                forwarded = {"X-Forwarded-For": client.format(port=50000 + n)}
                guess = auth(f"vk_test_openai_{n:010d}")
                response = await gateway.get("/usage", headers={**guess, **forwarded})
                assert response.status == 401
        forwarded = {"X-Forwarded-For": client.format(port=50009)}
        response = await gateway.get("/usage", headers={**auth(OPENAI_VK), **forwarded})
        assert response.status == 429
    failures = [r.getMessage() for r in caplog.records if "failed authentication" in r.message]
    assert "from 198.51.100.7 (" in failures[0] and "from 2001:db8::/64 (" in failures[-1]
    # Another client behind the same balancer is not locked out by them.
    other = {"X-Forwarded-For": "203.0.113.9:40000"}
    response = await gateway.get("/usage", headers={**auth(OPENAI_VK), **other})
    assert response.status == 200


async def test_a_guesser_rotating_ipv6_addresses_within_its_64_is_locked_out(
    make_gateway: Callable[..., Awaitable[TestClient]], caplog: pytest.LogCaptureFixture
) -> None:
    # A host is given a /64: 2**64 addresses, each of which had its own fresh tries.
    gateway = await make_gateway(
        TRUSTED_PROXIES="127.0.0.1", AUTH_FAILURE_LIMIT="3", AUTH_FAILURE_WINDOW_SECONDS="600"
    )
    with caplog.at_level(logging.WARNING, logger="llm_gateway"):
        for n in range(3):
            forwarded = {"X-Forwarded-For": f"2001:db8:1:2::{n + 1:x}"}
            guess = auth(f"vk_test_openai_{n:010d}")
            response = await gateway.get("/usage", headers={**guess, **forwarded})
            assert response.status == 401
    forwarded = {"X-Forwarded-For": "2001:db8:1:2:ffff:ffff:ffff:fffe"}
    response = await gateway.get("/usage", headers={**auth(OPENAI_VK), **forwarded})
    assert response.status == 429
    failures = [r.getMessage() for r in caplog.records if "failed authentication" in r.message]
    assert all("from 2001:db8:1:2::/64 (" in failure for failure in failures)
    # The next /64 is someone else.
    forwarded = {"X-Forwarded-For": "2001:db8:1:3::1"}
    response = await gateway.get("/usage", headers={**auth(OPENAI_VK), **forwarded})
    assert response.status == 200
