"""The admin endpoints: absent without ADMIN_TOKEN, guarded with it, and never showing a secret."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import pytest
from aiohttp.test_utils import TestClient

from proxy.keys.keys import masked
from tests.conftest import (
    ANTHROPIC_VK,
    LIMITED_VK,
    OPENAI_REAL,
    OPENAI_VK,
    RESTRICTED_VK,
    SECRETS,
    assert_openai_error,
    auth,
)
from tests.support.bodies import CHAT

TOKEN = "admin-token-for-tests-0123456789"
BUDGETED_VK = "vk_test_admin_budgeted_5c2e9a7d1b"


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/admin/keys"), ("POST", "/admin/reload"), ("GET", "/admin"), ("GET", "/admin/x")],
)
async def test_without_admin_token_every_admin_path_is_404_even_with_a_virtual_key(
    gateway: TestClient, method: str, path: str
) -> None:
    for headers in ({}, auth(OPENAI_VK), {"Authorization": f"Bearer {TOKEN}"}):
        response = await gateway.request(method, path, headers=headers)
        assert response.status == 404
        assert_openai_error(await response.json(), "unknown_route")


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong-token"},
        {"Authorization": f"Bearer {TOKEN}x"},
        {"Authorization": TOKEN},  # no scheme
        {"x-api-key": TOKEN},  # admin takes the bearer header only
        auth(OPENAI_VK),
    ],
)
async def test_a_missing_or_wrong_token_gets_401_is_logged_and_counted(
    make_gateway: Callable[..., Awaitable[TestClient]],
    headers: dict[str, str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    gateway = await make_gateway(ADMIN_TOKEN=TOKEN)
    with caplog.at_level(logging.WARNING, logger="llm_gateway"):
        keys = await gateway.get("/admin/keys", headers=headers)
        reload = await gateway.post("/admin/reload", headers=headers)
    for response in (keys, reload):
        assert response.status == 401
        assert_openai_error(await response.json(), "invalid_admin_token")
    refusals = [r for r in caplog.records if "failed authentication" in r.getMessage()]
    assert len(refusals) == 2 and "127.0.0.1" in refusals[0].getMessage()
    assert TOKEN not in caplog.text
    metrics = await (await gateway.get("/metrics")).text()
    assert 'llm_gateway_auth_failures_total{outcome="refused"} 2.0' in metrics


async def test_an_admin_token_whose_bytes_are_not_utf8_starts_and_guards(
    make_gateway: Callable[..., Awaitable[TestClient]],
) -> None:
    # os.environ hands ADMIN_TOKEN=$'admin-\xfftoken' over as a lone surrogate: the start
    # ended in a traceback (the audit's digest of the token encoded it).
    gateway = await make_gateway(ADMIN_TOKEN="admin-\udcfftoken-0123456789")
    response = await gateway.get("/admin/keys", headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status == 401


async def test_guessing_the_admin_token_is_throttled_like_guessing_a_key(
    make_gateway: Callable[..., Awaitable[TestClient]],
) -> None:
    gateway = await make_gateway(ADMIN_TOKEN=TOKEN, AUTH_FAILURE_LIMIT="3")
    wrong = {"Authorization": "Bearer guess"}
    statuses = [(await gateway.get("/admin/keys", headers=wrong)).status for _ in range(4)]
    assert statuses == [401, 401, 401, 429]
    # A stale token locks out its own prefix, never the admin token.
    right = await gateway.get("/admin/keys", headers={"Authorization": f"Bearer {TOKEN}"})
    assert right.status == 200


async def test_admin_keys_lists_every_key_masked_with_limits_models_and_usage(
    make_gateway: Callable[..., Awaitable[TestClient]],
) -> None:
    gateway = await make_gateway(ADMIN_TOKEN=TOKEN)
    for _ in range(2):
        response = await gateway.post("/v1/chat/completions", json=CHAT, headers=auth(LIMITED_VK))
        assert response.status == 200
    response = await gateway.get("/admin/keys", headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status == 200 and response.headers["x-request-id"]
    text = await response.text()
    for secret in SECRETS:
        assert secret not in text, "a real or full virtual key in /admin/keys"
    body = await response.json()
    assert body["config"]["hash"]
    by_name = {key["name"]: key for key in body["keys"]}
    assert len(by_name) == 6
    limited = by_name["limited"]
    assert limited["provider"] == "openai" and limited["key"] == masked(LIMITED_VK)
    assert limited["limits"] == {"requests": 3, "tokens": None, "window_seconds": 3600.0}
    assert limited["usage"]["requests"]["used"] == 2
    assert limited["usage"]["requests"]["remaining"] == 1
    assert by_name["restricted"]["allowed_models"] == ["claude-3-5-haiku-*", "claude-sonnet-4-*"]
    assert by_name["restricted"]["key"] == masked(RESTRICTED_VK)
    assert by_name["team-anthropic"]["allowed_models"] is None
    assert by_name["team-anthropic"]["key"] == masked(ANTHROPIC_VK)


async def test_with_quotas_off_admin_keys_shows_no_limits_but_each_keys_totals(
    make_gateway: Callable[..., Awaitable[TestClient]],
) -> None:
    """Quotas off, the tracker still counts every key's totals (its /usage shows them, and
    /admin/teams sums them per team): the admin view of the keys shows the same totals."""
    gateway = await make_gateway(ADMIN_TOKEN=TOKEN, QUOTA_ENABLED="false")
    for _ in range(3):
        response = await gateway.post("/v1/chat/completions", json=CHAT, headers=auth(OPENAI_VK))
        assert response.status == 200
    own = await (await gateway.get("/usage", headers=auth(OPENAI_VK))).json()
    response = await gateway.get("/admin/keys", headers={"Authorization": f"Bearer {TOKEN}"})
    keys = (await response.json())["keys"]
    assert all(key["limits"] is None for key in keys)
    by_name = {key["name"]: key for key in keys}
    usage = by_name[own["key"]]["usage"]
    assert usage is not None, "a key's totals hidden from /admin/keys with quotas off"
    assert usage == {"totals": own["totals"]}  # no window to show, only what it used
    assert usage["totals"]["requests"] == 3 and usage["totals"]["tokens"] > 0
    assert by_name["limited"]["usage"]["totals"]["requests"] == 0


async def test_with_quotas_off_admin_keys_still_shows_the_spend_of_a_key_with_a_budget(
    gateway_with_keys: Callable[..., Awaitable[TestClient]],
) -> None:
    """QUOTA_ENABLED=false leaves budgets on: the spend they cap stays in sight."""
    budgeted = {
        "provider": "openai",
        "api_key": OPENAI_REAL,
        "name": "budgeted",
        "budget": {"usd": 50, "window_seconds": 86400},
    }
    gateway = await gateway_with_keys(
        {BUDGETED_VK: budgeted}, ADMIN_TOKEN=TOKEN, QUOTA_ENABLED="false"
    )
    response = await gateway.post("/v1/chat/completions", json=CHAT, headers=auth(BUDGETED_VK))
    assert response.status == 200
    response = await gateway.get("/admin/keys", headers={"Authorization": f"Bearer {TOKEN}"})
    by_name = {key["name"]: key for key in (await response.json())["keys"]}
    usage = by_name["budgeted"]["usage"]
    assert usage is not None, "a budgeted key's spend hidden from /admin/keys"
    assert usage["budget"]["spent_usd"] > 0
    assert usage["totals"]["requests"] == 1
    assert set(by_name["limited"]["usage"]) == {"totals"}  # no window, no budget: its totals


@pytest.mark.parametrize("path", ["/admin/keys", "/admin/teams", "/admin/export"])
async def test_head_on_an_admin_listing_is_answered_as_its_get_without_the_body(
    make_gateway: Callable[..., Awaitable[TestClient]], path: str
) -> None:
    # HEAD /admin/keys and /admin/teams were 405 with `Allow: GET, POST`, though every
    # server must answer HEAD where it answers GET (RFC 9110 §9.1), as /health, /metrics,
    # /usage and /admin/export did: a `curl -I` check of the admin API failed.
    gateway = await make_gateway(ADMIN_TOKEN=TOKEN)
    admin = {"Authorization": f"Bearer {TOKEN}"}
    got = await gateway.get(path, headers=admin)
    head = await gateway.head(path, headers=admin)
    assert (got.status, head.status) == (200, 200)
    assert head.headers["Content-Type"] == got.headers["Content-Type"]
    assert await head.read() == b""
    assert (await gateway.head(path)).status == 401  # guarded as its GET is
    wrong_method = await gateway.put(path, headers=admin)
    assert wrong_method.status == 405
    assert "HEAD" in wrong_method.headers["allow"].split(", ")


async def test_with_a_token_unknown_admin_paths_are_404_and_reload_is_405_but_for_post(
    make_gateway: Callable[..., Awaitable[TestClient]],
) -> None:
    gateway = await make_gateway(ADMIN_TOKEN=TOKEN)
    admin = {"Authorization": f"Bearer {TOKEN}"}
    assert (await gateway.get("/admin/nothing", headers=admin)).status == 404
    wrong_method = await gateway.get("/admin/reload", headers=admin)
    assert wrong_method.status == 405 and wrong_method.headers["allow"] == "POST"
    assert (await gateway.get("/admin/nothing")).status == 401  # no hint without the token
