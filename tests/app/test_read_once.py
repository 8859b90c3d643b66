"""Messages and numbers a person reads once: each says what to do, in words and decimals."""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable
from pathlib import Path

from aiohttp.test_utils import TestClient

from tests.conftest import RESTRICTED_VK, assert_openai_error, auth
from tests.support.bodies import chat

TOKEN = "admin-token-for-tests-0123456789"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
ROUTER_VK = "vk_test_router_7d5c3b1a9e"
POOLED_VK = "vk_test_pooled_3e1f5a7c9b"
ROUTER = {
    "name": "router",
    "routes": [
        {"models": ["gpt-*"], "provider": "openai", "api_key": "sk-router-openai-1"},
        {"models": ["claude-*"], "provider": "anthropic", "api_key": "sk-router-anthropic-2"},
    ],
}
POOLED = {
    "name": "pooled",
    "provider": "openai",
    "api_keys": [{"api_key": "sk-pool-first-3"}, {"api_key": "sk-pool-second-4"}],
    "fallbacks": [{"provider": "azure", "api_key": "sk-fallback-5", "model": "gpt-4o"}],
    "budget": {"usd": 0.000001, "window_seconds": 3600},
}
# The fake's chat answer is 1 prompt and 3 completion tokens: 1.95e-6 dollars at these rates.
PRICES = {"openai": {"*": {"input_mtok": 0.15, "output_mtok": 0.6}}}


async def test_without_admin_token_an_admin_path_says_how_to_turn_it_on(
    gateway: TestClient,
) -> None:
    response = await gateway.get("/admin/keys")
    assert response.status == 404
    body = await response.json()
    assert_openai_error(body, "unknown_route")
    assert "ADMIN_TOKEN" in body["error"]["message"]


async def test_a_model_outside_allowed_models_is_refused_naming_the_allowed_ones(
    gateway: TestClient,
) -> None:
    response = await gateway.post(
        "/v1/chat/completions", json=chat("hi", model="gpt-4o"), headers=auth(RESTRICTED_VK)
    )
    assert response.status == 403
    message = (await response.json())["error"]["message"]
    assert "'gpt-4o'" in message and "claude-3-5-haiku-*, claude-sonnet-4-*" in message


async def test_a_router_key_lists_models_and_still_refuses_a_model_no_route_serves(
    gateway_with_keys: Callable[..., Awaitable[TestClient]],
) -> None:
    gateway = await gateway_with_keys({ROUTER_VK: ROUTER})
    listed = await gateway.get("/v1/models", headers=auth(ROUTER_VK))
    assert listed.status == 200, await listed.text()
    assert (await listed.json())["data"]  # the first route's provider answered
    refused = await gateway.post(
        "/v1/chat/completions", json=chat("hi", model="mistral-large"), headers=auth(ROUTER_VK)
    )
    assert refused.status == 400
    message = (await refused.json())["error"]["message"]
    assert "'mistral-large'" in message and "gpt-*, claude-*" in message


async def test_admin_keys_shows_budgets_spend_routes_fallbacks_and_pool_sizes(
    gateway_with_keys: Callable[..., Awaitable[TestClient]],
) -> None:
    gateway = await gateway_with_keys(
        {ROUTER_VK: ROUTER, POOLED_VK: POOLED}, prices=PRICES, ADMIN_TOKEN=TOKEN
    )
    ok = await gateway.post("/v1/chat/completions", json=chat("hi"), headers=auth(POOLED_VK))
    assert ok.status == 200
    await ok.read()
    response = await gateway.get("/admin/keys", headers=ADMIN)
    text = await response.text()
    assert "sk-pool" not in text and "sk-router" not in text and POOLED_VK not in text
    keys = {key["name"]: key for key in json.loads(text)["keys"]}
    pooled, router = keys["pooled"], keys["router"]
    assert pooled["budget"] == {"usd": 0.000001, "window_seconds": 3600.0}
    assert pooled["usage"]["budget"]["spent_usd"] > 0, pooled["usage"]
    assert pooled["target"] == {
        "name": "openai",
        "provider": "openai",
        "keys": 2,
        "fallbacks": [{"name": "azure/gpt-4o", "provider": "azure", "keys": 1}],
    }
    assert pooled["routes"] == [] and router["target"] is None
    assert [route["models"] for route in router["routes"]] == [["gpt-*"], ["claude-*"]]
    assert router["routes"][1]["target"]["provider"] == "anthropic"


async def test_get_admin_reload_is_405_with_allow_post(
    make_gateway: Callable[..., Awaitable[TestClient]],
) -> None:
    gateway = await make_gateway(ADMIN_TOKEN=TOKEN)
    response = await gateway.get("/admin/reload", headers=ADMIN)
    assert response.status == 405 and response.headers["allow"] == "POST"
    assert_openai_error(await response.json(), "method_not_allowed")


async def test_dollars_are_decimals_in_the_budget_refusal_and_the_log(
    gateway_with_keys: Callable[..., Awaitable[TestClient]], log_path: Path
) -> None:
    gateway = await gateway_with_keys({POOLED_VK: POOLED}, prices=PRICES)
    statuses = []
    for _ in range(3):
        response = await gateway.post(
            "/v1/chat/completions", json=chat("hi"), headers=auth(POOLED_VK)
        )
        statuses.append(response.status)
        body = await response.text()
    assert statuses[0] == 200 and statuses[-1] == 429, statuses
    message = json.loads(body)["error"]["message"]
    assert "$0.000001 per" in message, message
    assert not re.search(r"\de-\d", message), message
    await gateway.close()  # the log is flushed
    lines = [line for line in log_path.read_text().splitlines() if '"status":200' in line]
    assert lines and all('"cost_usd":0.00000195,' in line for line in lines), lines


async def test_a_failed_reload_shows_in_health_until_a_good_one(
    make_gateway: Callable[..., Awaitable[TestClient]], keys_file: Path
) -> None:
    gateway = await make_gateway(ADMIN_TOKEN=TOKEN)
    good = keys_file.read_text()
    keys_file.write_text("{ not json")
    assert (await gateway.post("/admin/reload", headers=ADMIN)).status == 422
    failed = (await (await gateway.get("/health")).json())["config"]["reload_failed"]
    assert "not valid JSON" in failed["reason"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", failed["at"])
    keys_file.write_text(good)
    assert (await gateway.post("/admin/reload", headers=ADMIN)).status == 200
    assert (await (await gateway.get("/health")).json())["config"]["reload_failed"] is None


async def test_a_models_list_and_a_token_count_count_as_requests_as_documented(
    gateway_with_keys: Callable[..., Awaitable[TestClient]],
) -> None:
    one_request = {"name": "one", "provider": "openai", "api_key": "sk-one-6"}
    gateway = await gateway_with_keys(
        {"vk_test_one_request_8a6b4c2d": {**one_request, "quota": {"requests": 2}}}
    )
    key = auth("vk_test_one_request_8a6b4c2d")
    assert (await gateway.get("/v1/models", headers=key)).status == 200
    counted = await gateway.post(
        "/v1/messages/count_tokens",
        json={"model": "claude-haiku-4-5", "messages": [{"role": "user", "content": "hi"}]},
        headers=key,
    )
    assert counted.status == 200
    refused = await gateway.post("/v1/chat/completions", json=chat("hi"), headers=key)
    assert refused.status == 429  # the window's two requests went to the list and the count
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert "`/v1/models` and `count_tokens` calls count" in readme
