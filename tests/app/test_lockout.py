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
from proxy.settings import SettingError, Settings
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


class Ring:
    """A key ring that knows one key."""

    def __init__(self, valid: str) -> None:
        self.valid = valid

    def authenticate(self, headers: Any) -> Any:
        if CIMultiDict(headers).get("authorization") != f"Bearer {self.valid}":
            raise GatewayError(401, "invalid_api_key", "no")
        return self.valid


def test_a_stale_key_locks_only_keys_beginning_like_it_and_a_known_key_is_served() -> None:
    clock, outcomes = Clock(), []
    door = lockout(clock, outcomes, failures=3)
    ring = Ring("vk_live_bob_9f8e7d6c5b4a")
    nat = "203.0.113.9"
    assert door.authenticate(ring, CIMultiDict(auth(ring.valid)), nat)  # type: ignore[arg-type]
    for _ in range(10):  # a stale key, retried without end from the same address
        with pytest.raises(GatewayError):
            door.authenticate(ring, CIMultiDict(auth("vk_live_alice_0ld0ld0ld")), nat)  # type: ignore[arg-type]
    assert outcomes.count("refused") == 3  # then throttled, and not counted again
    assert door.authenticate(ring, CIMultiDict(auth(ring.valid)), nat)  # type: ignore[arg-type]
    other = Ring("vk_live_carol_1a2b3c4d5e")  # a client never seen before, another prefix
    assert door.authenticate(other, CIMultiDict(auth(other.valid)), nat)  # type: ignore[arg-type]


def test_many_keys_guessed_lock_the_address_for_every_key_not_accepted_there_before() -> None:
    clock, outcomes = Clock(), []
    door = lockout(clock, outcomes, failures=3)
    ring = Ring("vk_live_bob_9f8e7d6c5b4a")
    assert door.authenticate(ring, CIMultiDict(auth(ring.valid)), "10.0.0.1")  # type: ignore[arg-type]
    for n in range(12):  # 4 times the limit, each guess another prefix
        with pytest.raises(GatewayError):
            door.authenticate(ring, CIMultiDict(auth(f"vk_{n:04d}_guess_xxxx")), "10.0.0.1")  # type: ignore[arg-type]
    found = Ring("vk_live_dave_0a0b0c0d0e")  # a right guess is not even looked up
    with pytest.raises(GatewayError) as refused:
        door.authenticate(found, CIMultiDict(auth(found.valid)), "10.0.0.1")  # type: ignore[arg-type]
    assert refused.value.status == 429 and refused.value.headers["x-should-retry"] == "false"
    assert door.authenticate(ring, CIMultiDict(auth(ring.valid)), "10.0.0.1")  # type: ignore[arg-type]


class Peer:
    """What `client_address` reads of a request: its peer and its headers."""

    def __init__(self, remote: str, *forwarded: str) -> None:
        self.remote = remote
        self.headers = CIMultiDict(("X-Forwarded-For", value) for value in forwarded)


@pytest.mark.parametrize(
    ("peer", "client"),
    [
        (Peer("10.1.2.3", "198.51.100.7"), "198.51.100.7"),  # the ingress names the client
        (Peer("10.1.2.3", "6.6.6.6, 198.51.100.7"), "198.51.100.7"),  # a forged first hop
        (Peer("10.1.2.3", "198.51.100.7, 10.9.9.9"), "198.51.100.7"),  # two trusted hops
        (Peer("10.1.2.3", "198.51.100.7", "10.9.9.9"), "198.51.100.7"),  # as two headers
        (Peer("10.1.2.3"), "10.1.2.3"),  # no header: the proxy itself
        (Peer("192.0.2.1", "198.51.100.7"), "192.0.2.1"),  # not trusted: its header ignored
        (Peer("fd00::5", "2001:db8::1"), "2001:db8::1"),
    ],
)
def test_x_forwarded_for_names_the_client_only_behind_a_trusted_proxy(
    peer: Peer, client: str
) -> None:
    networks = Settings.from_env({"TRUSTED_PROXIES": "10.0.0.0/8, fd00::/8"}, []).trusted_proxies
    assert networks is not None
    door = Lockout(3, 60.0, lambda outcome: None, trusted_proxies=networks)
    assert door.client_address(peer) == client  # type: ignore[arg-type]


def test_trusted_proxies_that_do_not_parse_stop_the_start() -> None:
    with pytest.raises(SettingError, match="TRUSTED_PROXIES.*'10.0.0.0/33'"):
        Settings.from_env({"TRUSTED_PROXIES": "10.0.0.1,10.0.0.0/33"}, [])
