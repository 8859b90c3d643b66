"""/health and /ready: what a client reads of the providers' health, the tracker and a shutdown
(the breakers underneath are tests/unit/test_breaker.py)."""

from __future__ import annotations

import resource
from collections.abc import Awaitable, Callable

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from proxy.observe.health import Health
from tests.support.clock import Clock
from tests.unit.test_breaker import breakers, health_of

Client = TestClient[web.Request, web.Application]


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
        "open_files": {
            "limit": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
            "healthy": True,
            "last_error": None,
            "last_error_at": None,
        },
    }


async def test_health_says_the_gateway_ran_out_of_files_until_one_is_free_again(
    serve: Callable[[Health], Awaitable[Client]],
) -> None:
    # Told by the attempt loop (the process at its limit: tests/process/test_open_files.py);
    # here a descriptor is free at once, so the first /health after finds it healthy again.
    clock = Clock()
    health = health_of(breakers(clock), clock)
    why = "the gateway is out of file descriptors (...): provider 'openai' at x:1 was not asked"
    health.ran_out_of_files(why)
    report = health.report()
    assert report["status"] == "degraded"
    assert report["open_files"]["healthy"] is False  # type: ignore[index]
    assert report["providers"]["openai"]["healthy"] is True  # type: ignore[index]
    client = await serve(health)
    body = await (await client.get("/health")).json()
    assert body["status"] == "healthy"
    assert body["open_files"]["healthy"] is True
    assert body["open_files"]["last_error"] == why  # still told, with when
    assert body["open_files"]["last_error_at"].endswith("Z")


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
