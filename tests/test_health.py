"""Provider health from traffic, /health and /ready."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from proxy.health import Health, is_upstream_failure
from proxy.record import CLIENT_CLOSED, Record

Client = TestClient[web.Request, web.Application]


def record(provider: str = "openai", status: int = 200, **changes: object) -> Record:
    """A finished record; the provider answered unless told otherwise."""
    finished = Record.begin(None, "POST", "/v1/chat/completions")
    finished.provider, finished.status, finished.ttft_ms = provider, status, 50.0
    for name, value in changes.items():
        setattr(finished, name, value)
    return finished


def unreachable(provider: str = "openai") -> Record:
    return record(
        provider,
        502,
        ttft_ms=None,
        upstream_failed=True,
        error="The provider could not be reached (ClientConnectorError).",
    )


def is_healthy(health: Health, provider: str = "openai") -> bool:
    providers = health.report()["providers"]
    assert isinstance(providers, dict)
    return bool(providers[provider]["healthy"])


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


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


def test_three_upstream_failures_in_a_row_make_a_provider_unhealthy() -> None:
    health = Health({"openai": 2, "anthropic": 1})
    health.observe(unreachable())
    health.observe(unreachable())
    assert is_healthy(health)

    health.observe(unreachable())
    assert not is_healthy(health)
    assert is_healthy(health, "anthropic")


def test_one_success_makes_a_provider_healthy_again() -> None:
    health = Health({"openai": 1})
    for _ in range(5):
        health.observe(unreachable())
    health.observe(record(status=200))

    assert is_healthy(health)
    health.observe(unreachable())
    health.observe(unreachable())
    assert is_healthy(health)  # the streak starts over after a success


def test_a_client_that_left_counts_as_neither_failure_nor_success() -> None:
    health = Health({"openai": 1})
    health.observe(unreachable())
    health.observe(unreachable())
    health.observe(record(status=CLIENT_CLOSED, error="client closed the connection"))
    assert is_healthy(health)  # not a third failure...

    health.observe(unreachable())
    assert not is_healthy(health)  # ...and it did not reset the streak either


def test_a_provider_5xx_is_a_failure_and_a_refusal_by_the_gateway_is_neither() -> None:
    assert is_upstream_failure(record(status=503))  # the provider's own 503
    assert is_upstream_failure(record(status=200, upstream_failed=True, error="cut mid-stream"))
    assert is_upstream_failure(record(status=504, ttft_ms=None, upstream_failed=True))
    assert not is_upstream_failure(record(status=503, ttft_ms=None, error="Redis is down."))
    assert not is_upstream_failure(record(status=500, ttft_ms=None, error="internal error"))
    assert not is_upstream_failure(record(status=429))

    health = Health({"openai": 1})
    health.observe(unreachable())
    health.observe(unreachable())
    health.observe(record(status=429, ttft_ms=None, error="quota exceeded"))  # not a success
    health.observe(unreachable())
    assert not is_healthy(health)


async def test_health_reports_status_uptime_providers_and_tracker(
    serve: Callable[[Health], Awaitable[Client]],
) -> None:
    clock = Clock()
    health = Health({"openai": 2, "anthropic": 1}, clock=clock)
    clock.now += 12.34
    client = await serve(health)

    response = await client.get("/health")
    assert response.status == 200
    assert response.content_type == "application/json"
    assert await response.json() == {
        "status": "healthy",
        "uptime_seconds": 12.3,
        "providers": {
            "openai": {"keys": 2, "healthy": True, "last_error": None},
            "anthropic": {"keys": 1, "healthy": True, "last_error": None},
        },
        "tracker": {"backend": "memory", "healthy": True, "last_error": None},
    }


async def test_health_names_the_last_error_of_an_unhealthy_provider(
    serve: Callable[[Health], Awaitable[Client]],
) -> None:
    health = Health({"openai": 1, "anthropic": 1})
    for _ in range(3):
        health.observe(unreachable())
    client = await serve(health)

    body = await (await client.get("/health")).json()
    assert body["status"] == "degraded"
    assert body["providers"]["openai"] == {
        "keys": 1,
        "healthy": False,
        "last_error": "502 The provider could not be reached (ClientConnectorError).",
    }
    assert body["providers"]["anthropic"]["healthy"] is True


async def test_health_is_degraded_while_the_tracker_has_lost_redis(
    serve: Callable[[Health], Awaitable[Client]],
) -> None:
    health = Health({"openai": 1}, tracker_backend="redis")
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
    health = Health({"openai": 1})
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
