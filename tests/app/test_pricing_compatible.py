"""Keys on OpenAI-compatible providers other than OpenAI, charged as each provider reports
usage and bills it: a provider declared in keys.json under its price data's name, answering
as its real API does (its own usage fields), called with the openai SDK through the gateway.
The log line's usage and cost, and the budget's spend, are what genai-prices' calc_price
gives for the usage the provider billed."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from genai_prices import Usage as LibraryUsage
from genai_prices import calc_price
from openai import AsyncOpenAI

from tests.conftest import auth

KEY = "vk_test_compatible_5e2a9c7d1b"


async def gateway_before(
    provider: str,
    answer: dict[str, Any],
    aiohttp_server: Callable[..., Awaitable[TestServer]],
    tmp_path: Path,
    make_gateway: Callable[..., Awaitable[TestClient]],
) -> TestClient:
    """A gateway with a budgeted key on a provider declared as `provider`, whose chat
    completions and responses answer `answer` (its usage as that provider reports it)."""

    async def answering(request: web.Request) -> web.Response:
        body = await request.json()
        return web.json_response({**answer, "model": body["model"]})

    upstream = web.Application()
    upstream.router.add_post("/v1/chat/completions", answering)
    upstream.router.add_post("/v1/responses", answering)
    server = await aiohttp_server(upstream)
    keys = {
        "providers": {provider: {"base_url": str(server.make_url("/v1"))}},
        "virtual_keys": {
            KEY: {"provider": provider, "api_key": "sk-real-compatible", "budget": {"usd": 100}}
        },
    }
    (tmp_path / "compatible.json").write_text(json.dumps(keys))
    return await make_gateway(KEYS_FILE_PATH=str(tmp_path / "compatible.json"))


async def ask(gateway: TestClient, model: str) -> None:
    client = AsyncOpenAI(api_key=KEY, base_url=str(gateway.make_url("/v1")), max_retries=0)
    try:
        await client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Hello"}]
        )
    finally:
        await client.close()


async def assert_charged_as_billed(
    gateway: TestClient, line: dict[str, Any], billed: LibraryUsage, model: str, provider: str
) -> None:
    """The line's cost and the key's budget spend are genai-prices' price of `billed`."""
    price = float(calc_price(billed, model, provider_id=provider).total_price)
    assert line["cost_usd"] == pytest.approx(price)
    spent = (await (await gateway.get("/usage", headers=auth(KEY))).json())["budget"]
    assert spent["spent_usd"] == pytest.approx(price, abs=1e-6)


def answer_with(usage: dict[str, Any]) -> dict[str, Any]:
    message = {"role": "assistant", "content": "Hi"}
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1,
        "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
        "usage": usage,
    }


# (provider, model, its usage as the provider reports it, what the log line's usage must
# say, what the provider bills in genai-prices' terms)
CHAT_CASES = [
    # DeepSeek's documented usage: the prompt split into cache hits and misses, beside
    # prompt_tokens (no prompt_tokens_details); a hit costs 2% of a miss on deepseek-v4-flash.
    (
        "deepseek",
        "deepseek-v4-flash",
        {
            "prompt_tokens": 10_000,
            "completion_tokens": 100,
            "total_tokens": 10_100,
            "prompt_cache_hit_tokens": 9_000,
            "prompt_cache_miss_tokens": 1_000,
        },
        {"cache_read_tokens": 9_000},
        LibraryUsage(input_tokens=10_000, cache_read_tokens=9_000, output_tokens=100),
    ),
    # sonar-deep-research bills each search it ran ($5 a thousand), reported beside the
    # tokens as num_search_queries.
    (
        "perplexity",
        "sonar-deep-research",
        {
            "prompt_tokens": 19,
            "completion_tokens": 2_738,
            "total_tokens": 2_757,
            "num_search_queries": 18,
        },
        {"web_searches": 18},
        LibraryUsage(input_tokens=19, output_tokens=2_738, web_searches=18),
    ),
    # ... and reports its reasoning beside the completion (total_tokens leaves it out), billed
    # at $3 a million: here 27 times the completion.
    (
        "perplexity",
        "sonar-deep-research",
        {
            "prompt_tokens": 19,
            "completion_tokens": 2_738,
            "total_tokens": 2_757,
            "reasoning_tokens": 73_997,
        },
        {"completion_tokens": 2_738 + 73_997, "reasoning_tokens": 73_997},
        LibraryUsage(input_tokens=19, output_tokens=2_738 + 73_997, output_reasoning_tokens=73_997),
    ),
]


@pytest.mark.parametrize(("provider", "model", "usage", "logged", "billed"), CHAT_CASES)
async def test_a_chat_completion_is_charged_what_its_provider_bills(
    aiohttp_server: Callable[..., Awaitable[TestServer]],
    tmp_path: Path,
    make_gateway: Callable[..., Awaitable[TestClient]],
    records: Callable[..., Awaitable[list[dict[str, Any]]]],
    provider: str,
    model: str,
    usage: dict[str, Any],
    logged: dict[str, int],
    billed: LibraryUsage,
) -> None:
    gateway = await gateway_before(
        provider, answer_with(usage), aiohttp_server, tmp_path, make_gateway
    )
    await ask(gateway, model)
    (line,) = await records(1)
    assert {name: line["usage"][name] for name in logged} == logged
    await assert_charged_as_billed(gateway, line, billed, model, provider)


async def test_perplexity_agent_api_web_searches_are_charged_per_search(
    aiohttp_server: Callable[..., Awaitable[TestServer]],
    tmp_path: Path,
    make_gateway: Callable[..., Awaitable[TestClient]],
    records: Callable[..., Awaitable[list[dict[str, Any]]]],
) -> None:
    # Perplexity's Agent API (the Responses format, since Sonar Chat Completions ended) counts
    # its web_search tool's calls in usage.tool_calls_details.search_web.invocation, billed
    # per thousand beside the tokens (and says the bill in usage.cost).
    usage = {
        "input_tokens": 3_000,
        "output_tokens": 400,
        "total_tokens": 3_400,
        "input_tokens_details": {"cached_tokens": 0},
        "cost": {"currency": "USD", "tool_calls_cost": 0.0075, "total_cost": 0.00925},
        "tool_calls_details": {"search_web": {"invocation": 3}},
    }
    message = {
        "type": "message",
        "id": "msg_1",
        "role": "assistant",
        "status": "completed",
        "content": [{"type": "output_text", "text": "Hi", "annotations": []}],
    }
    answer = {
        "id": "resp_1",
        "object": "response",
        "created_at": 1,
        "status": "completed",
        "output": [message],
        "usage": usage,
    }
    gateway = await gateway_before("perplexity", answer, aiohttp_server, tmp_path, make_gateway)
    client = AsyncOpenAI(api_key=KEY, base_url=str(gateway.make_url("/v1")), max_retries=0)
    try:
        await client.responses.create(model="perplexity/sonar", input="Hello")
    finally:
        await client.close()
    (line,) = await records(1)
    assert line["usage"]["web_searches"] == 3
    billed = LibraryUsage(input_tokens=3_000, output_tokens=400, web_searches=3)
    await assert_charged_as_billed(gateway, line, billed, "perplexity/sonar", "perplexity")
