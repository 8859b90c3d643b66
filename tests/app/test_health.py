"""Provider health from traffic, /health and /ready."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from proxy.observe.health import Health, is_upstream_failure
from proxy.record import CLIENT_CLOSED, Outcome, Record
from proxy.upstream.breaker import CLOSED, HALF_OPEN, OPEN, BreakerPolicy, Breakers
from tests.support.clock import Clock

Client = TestClient[web.Request, web.Application]


def breakers(clock: Clock | None = None, **policy: float) -> Breakers:
    return Breakers(["openai", "anthropic"], BreakerPolicy(**policy), clock or Clock())  # type: ignore[arg-type]


def health_of(board: Breakers, clock: Clock | None = None, **kwargs: object) -> Health:
    return Health(
        {"openai": 2, "anthropic": 1},
        board,
        {"openai": "openai", "anthropic": "anthropic"},
        clock=clock or Clock(),
        **kwargs,  # type: ignore[arg-type]
    )


def is_healthy(health: Health, provider: str = "openai") -> bool:
    providers = health.report()["providers"]
    assert isinstance(providers, dict)
    return bool(providers[provider]["healthy"])


@pytest.fixture
def serve(
    aiohttp_client: Callable[[web.Application], Awaitable[Client]],
) -> Callable[[Health], Awaitable[Client]]:
    """A client for a tiny app that serves only the health's two handlers."""

    async def start(health: Health) -> Client:
        app = web.Application()
        app.router.add_get("/health", health.handle_health)
        app.router.add_get("/ready", health.handle_ready)
        return await aiohttp_client(app)

    return start


def test_three_failures_in_a_row_open_a_breaker_and_the_provider_turns_unhealthy() -> None:
    board = breakers()
    health = health_of(board)
    board["openai"].failed(1000.0, "connection refused")
    board["openai"].failed(1000.0, "connection refused")
    assert is_healthy(health) and board["openai"].state == CLOSED

    board["openai"].failed(1000.0, "connection refused")
    assert board["openai"].state == OPEN
    assert not is_healthy(health)
    assert is_healthy(health, "anthropic")


def test_one_success_resets_the_streak() -> None:
    board = breakers()
    breaker = board["openai"]
    breaker.failed(1.0, "x")
    breaker.failed(1.0, "x")
    breaker.succeeded(1.0)
    breaker.failed(1.0, "x")
    breaker.failed(1.0, "x")
    assert breaker.state == CLOSED  # the streak starts over after a success


def test_an_open_breaker_lets_exactly_one_probe_through_after_its_cooldown() -> None:
    clock = Clock()
    breaker = breakers(clock, cooldown_seconds=30)["openai"]
    for _ in range(3):
        breaker.failed(clock.now, "503")
    assert not breaker.admits(clock.now)
    clock.now += 29.9
    assert not breaker.admits(clock.now)
    clock.now += 0.2
    assert breaker.admits(clock.now) and breaker.state == HALF_OPEN
    assert not breaker.admits(clock.now)  # one probe, not a burst
    assert not breaker.admits(clock.now + 100)
    breaker.failed(clock.now, "503 again")  # the probe failed: open for another cooldown
    assert breaker.state == OPEN and not breaker.admits(clock.now + 29)
    assert breaker.admits(clock.now + 31)
    breaker.succeeded(clock.now + 31)  # the probe succeeded: closed
    assert breaker.state == CLOSED and breaker.admits(clock.now + 31)


def test_an_error_ratio_over_the_minimum_opens_a_breaker_without_failures_in_a_row() -> None:
    clock = Clock()
    breaker = breakers(clock, failures_in_a_row=100, error_ratio=0.5, min_requests=10)["openai"]
    for _ in range(4):
        breaker.failed(clock.now, "503")
        breaker.succeeded(clock.now)
    assert breaker.state == CLOSED  # 8 attempts: under the minimum
    breaker.failed(clock.now, "503")
    breaker.succeeded(clock.now)
    assert breaker.state == CLOSED  # 10 attempts, ratio 0.5, but the last was a success
    breaker.failed(clock.now, "503")
    assert breaker.state == OPEN  # 11 attempts, 6 failed


def test_failures_older_than_the_window_leave_the_ratio() -> None:
    clock = Clock()
    breaker = breakers(clock, failures_in_a_row=100, min_requests=4, window_seconds=60)["openai"]
    for _ in range(3):
        breaker.failed(clock.now, "503")
        breaker.succeeded(clock.now)
    clock.now += 61
    breaker.succeeded(clock.now)
    breaker.succeeded(clock.now)
    breaker.succeeded(clock.now)
    breaker.failed(clock.now, "503")
    assert breaker.state == CLOSED  # 1 of 4 in the window


def test_what_counts_as_an_upstream_failure() -> None:
    def record(status: int, outcome: Outcome, answered: bool = True) -> Record:
        finished = Record.begin(None, "POST", "/v1/chat/completions")
        finished.ttft_ms = 50.0 if answered else None
        finished.end(status, outcome)
        return finished

    assert is_upstream_failure(record(503, Outcome.ANSWERED))  # the provider's own 503
    assert is_upstream_failure(record(200, Outcome.BROKEN))  # cut mid-stream
    assert is_upstream_failure(record(504, Outcome.TIMEOUT, answered=False))
    assert not is_upstream_failure(record(503, Outcome.REFUSED, answered=False))  # Redis down
    assert not is_upstream_failure(record(500, Outcome.INTERNAL, answered=False))
    assert not is_upstream_failure(record(429, Outcome.ANSWERED))
    assert not is_upstream_failure(record(CLIENT_CLOSED, Outcome.CLIENT_LEFT))


async def test_health_reports_status_uptime_providers_targets_and_tracker(
    serve: Callable[[Health], Awaitable[Client]],
) -> None:
    clock = Clock()
    health = health_of(breakers(clock), clock)
    clock.now += 12.34
    client = await serve(health)

    response = await client.get("/health")
    assert response.status == 200
    assert response.content_type == "application/json"
    closed = {"state": "closed", "failures_in_a_row": 0, "last_error": None}
    assert await response.json() == {
        "status": "healthy",
        "uptime_seconds": 12.3,
        "providers": {
            "openai": {"keys": 2, "healthy": True, "last_error": None},
            "anthropic": {"keys": 1, "healthy": True, "last_error": None},
        },
        "targets": {"anthropic": closed, "openai": closed},
        "tracker": {"backend": "memory", "healthy": True, "last_error": None},
    }


async def test_health_names_the_last_error_of_an_unhealthy_provider(
    serve: Callable[[Health], Awaitable[Client]],
) -> None:
    board = breakers()
    health = health_of(board)
    why = "provider 'openai' at api.openai.com:443: connection refused"
    for _ in range(3):
        board["openai"].failed(1000.0, why)
    client = await serve(health)

    body = await (await client.get("/health")).json()
    assert body["status"] == "degraded"
    assert body["providers"]["openai"] == {"keys": 2, "healthy": False, "last_error": why}
    assert body["targets"]["openai"]["state"] == "open"
    assert body["providers"]["anthropic"]["healthy"] is True


async def test_health_is_degraded_while_the_tracker_has_lost_redis(
    serve: Callable[[Health], Awaitable[Client]],
) -> None:
    health = health_of(breakers(), tracker_backend="redis")
    client = await serve(health)
    health.tracker_degraded = "ConnectionError: Connection refused"

    response = await client.get("/health")
    body = await response.json()
    assert response.status == 200
    assert body["status"] == "degraded"
    assert body["tracker"] == {
        "backend": "redis",
        "healthy": False,
        "last_error": "ConnectionError: Connection refused",
    }

    health.tracker_degraded = None
    assert (await (await client.get("/health")).json())["status"] == "healthy"


async def test_ready_is_200_while_serving_and_503_once_shutting_down(
    serve: Callable[[Health], Awaitable[Client]],
) -> None:
    health = health_of(breakers())
    client = await serve(health)

    response = await client.get("/ready")
    assert (response.status, await response.json()) == (200, {"status": "ready"})
    health.shutting_down = True
    response = await client.get("/ready")
    assert (response.status, await response.json()) == (503, {"status": "shutting_down"})


# --- through a running gateway ---


async def test_a_provider_turns_unhealthy_after_three_failures_and_back_after_a_success(
    gateway,
) -> None:  # type: ignore[no-untyped-def]
    from tests.conftest import OPENAI_VK, auth

    chat = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}]}
    for _ in range(3):
        await gateway.post(
            "/v1/chat/completions", json=chat, headers={**auth(OPENAI_VK), "x-fake-status": "503"}
        )
    report = await (await gateway.get("/health")).json()
    assert report["providers"]["openai"]["healthy"] is False
    assert report["providers"]["openai"]["keys"] == 2  # the openai and the limited key
    assert "503" in report["providers"]["openai"]["last_error"]
    assert report["providers"]["anthropic"]["healthy"] is True
    await gateway.post("/v1/chat/completions", json=chat, headers=auth(OPENAI_VK))
    report = await (await gateway.get("/health")).json()
    assert report["providers"]["openai"]["healthy"] is True and report["status"] == "healthy"


async def test_ready_turns_503_when_shutdown_begins(gateway) -> None:  # type: ignore[no-untyped-def]
    assert (await gateway.get("/ready")).status == 200
    await gateway.app.shutdown()  # what SIGTERM starts
    response = await gateway.get("/ready")
    assert response.status == 503
