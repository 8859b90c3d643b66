"""Routing through the gateway: every path gets an answer in the dialect, and a log line."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from tests.conftest import OPENAI_VK, assert_openai_error, auth


async def test_a_newline_in_the_path_gets_a_json_400_and_a_log_line(
    gateway: TestClient, records: Callable[..., Awaitable[list[dict[str, Any]]]]
) -> None:
    response = await gateway.post(
        "/v1/chat%0a/completions", json={"model": "gpt-4o-mini"}, headers=auth(OPENAI_VK)
    )
    assert response.status == 400
    assert_openai_error(await response.json(), "invalid_path")
    response = await gateway.get("/%0a")
    assert response.status == 404
    assert_openai_error(await response.json(), "unknown_route")
    lines = await records(2)
    assert [line["status"] for line in lines] == [400, 404]


@pytest.mark.parametrize("path", ["/health", "/ready", "/metrics", "/usage"])
async def test_an_own_endpoint_with_another_method_gets_405(gateway: TestClient, path: str) -> None:
    response = await gateway.post(path, headers=auth(OPENAI_VK))
    assert response.status == 405
    assert response.headers["allow"] == "GET, HEAD"
    assert_openai_error(await response.json(), "method_not_allowed")
    assert (await gateway.delete(path)).status == 405
    assert (await gateway.get(path, headers=auth(OPENAI_VK))).status == 200


@pytest.mark.parametrize("path", ["/", "/favicon.ico", "/v2/chat/completions"])
async def test_an_unproxied_path_gets_404_naming_the_proxied_ones_without_a_key(
    gateway: TestClient, path: str
) -> None:
    response = await gateway.get(path)
    assert response.status == 404
    message = (await response.json())["error"]["message"]
    assert "/v1/chat/completions" in message and "/messages" in message and "/health" in message


async def test_an_absolute_url_in_the_path_is_named_so_by_the_gateway(gateway: TestClient) -> None:
    response = await gateway.get("/v1/http://evil.com/x", headers=auth(OPENAI_VK))
    assert response.status == 400
    assert "an absolute URL" in (await response.json())["error"]["message"]
