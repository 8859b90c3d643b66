"""Failed authentications: counted, logged, and throttled per client address."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from multidict import CIMultiDict
from prometheus_client.parser import text_string_to_metric_families

from proxy.errors import GatewayError
from proxy.keys.lockout import Lockout
from tests.conftest import (
    ANTHROPIC_VK,
    OPENAI_VK,
    SECRETS,
    assert_anthropic_error,
    assert_openai_error,
    auth,
)
from tests.support.bodies import CHAT
from tests.support.clock import Clock
from tests.support.fake_provider import FakeState


def lockout(clock: Clock, outcomes: list[str], **changes: Any) -> Lockout:
    options: dict[str, Any] = {"failures": 3, "window_seconds": 60.0, "max_addresses": 100}
    options.update(changes)
    return Lockout(on_failure=outcomes.append, clock=clock, **options)


def test_an_address_is_refused_after_its_failures_until_the_window_ends() -> None:
    clock, outcomes = Clock(), []
    door = lockout(clock, outcomes)
    for _ in range(3):
        door.check("10.0.0.1")
        door.failed("10.0.0.1")
    with pytest.raises(GatewayError) as refused:
        door.check("10.0.0.1")
    assert refused.value.status == 429 and refused.value.headers["retry-after"] == "60"
    door.check("10.0.0.2")  # another address is not concerned
    clock.now += 59.0
    with pytest.raises(GatewayError):
        door.check("10.0.0.1")
    clock.now += 1.0
    door.check("10.0.0.1")  # the window has passed
    assert outcomes == ["refused"] * 3 + ["throttled"] * 2


def test_failures_spread_over_more_than_a_window_never_lock_out() -> None:
    clock, outcomes = Clock(), []
    door = lockout(clock, outcomes)
    for _ in range(10):
        door.failed("10.0.0.1")
        door.failed("10.0.0.1")
        clock.now += 61.0
        door.check("10.0.0.1")


def test_memory_is_bounded_by_forgetting_the_stalest_address() -> None:
    clock, outcomes = Clock(), []
    door = lockout(clock, outcomes, failures=1, max_addresses=100)
    door.failed("10.0.0.1")
    for n in range(5000):
        door.failed(f"192.168.{n // 256}.{n % 256}")
    assert len(door._failures) == 100
    door.check("10.0.0.1")  # forgotten: the stalest went first
    with pytest.raises(GatewayError):
        door.check("192.168.19.135")  # the latest is remembered


def test_the_key_is_not_looked_up_while_the_address_is_locked_out() -> None:
    class Ring:
        looked_up = 0

        def authenticate(self, headers: Any) -> Any:
            self.looked_up += 1
            raise GatewayError(401, "invalid_api_key", "no")

    clock, outcomes, ring = Clock(), [], Ring()
    door = lockout(clock, outcomes, failures=2)
    for _ in range(5):
        with pytest.raises(GatewayError):
            door.authenticate(ring, CIMultiDict(), "10.0.0.1")  # type: ignore[arg-type]
    assert ring.looked_up == 2


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
        for guess in ("vk_test_openai_0000000000", "vk_test_openai_0000000001", ""):
            response = await gateway.post("/v1/chat/completions", json=CHAT, headers=auth(guess))
            assert response.status == 401
    # Even the right key is not looked up now: the address has had its tries.
    response = await gateway.post("/v1/chat/completions", json=CHAT, headers=auth(OPENAI_VK))
    assert response.status == 429 and int(response.headers["retry-after"]) > 500
    assert_openai_error(await response.json(), "too_many_authentication_failures")
    response = await gateway.post("/v1/messages", json=CHAT, headers={"x-api-key": ANTHROPIC_VK})
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
    assert (await gateway.get("/usage", headers=auth(OPENAI_VK))).status == 200
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
    # Guessing the token counts as failed authentications too.
    assert (await gateway.get("/metrics", headers=auth("guess"))).status == 401
    assert (await gateway.get("/metrics", headers=auth(token))).status == 429
