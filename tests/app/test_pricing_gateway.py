"""Each request's cost in front of the fake provider: the log line and the metrics carry what
the prices say, and a model without a price is counted, not guessed."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from anthropic import AsyncAnthropic
from openai import AsyncOpenAI

from proxy.record import Usage
from proxy.usage.pricing import Prices
from tests.conftest import ANTHROPIC_VK, CUSTOM_VK, OPENAI_VK, auth
from tests.unit.test_pricing import library_cost, write

TIERS = {"service_tier": "priority"}
FAST = {"speed": "fast"}


async def test_the_log_line_and_metrics_carry_each_requests_cost(
    make_gateway: Callable[..., Awaitable[TestClient]],
    records: Callable[..., Awaitable[list[dict[str, Any]]]],
    tmp_path: Path,
) -> None:
    prices_file = write(tmp_path / "prices.json", {"local": {"*": {"input_mtok": 1e6}}})
    gateway = await make_gateway(PRICES_FILE=prices_file)
    asks = [
        (OPENAI_VK, "/v1/chat/completions", "gpt-4o-mini"),
        (ANTHROPIC_VK, "/v1/messages", "claude-3-5-haiku-latest"),
        (OPENAI_VK, "/v1/chat/completions", "unpriced-model"),
        (CUSTOM_VK, "/v1/chat/completions", "my-llama"),
    ]
    for key, path, model in asks:
        body = {"model": model, "max_tokens": 5, "messages": [{"role": "user", "content": "a b"}]}
        response = await gateway.post(path, json=body, headers=auth(key))
        assert response.status == 200
    lines = await records(len(asks))
    by_model = {line["model"]: line for line in lines}
    prices = Prices.load(prices_file)
    for line in lines:
        usage = Usage(line["usage"]["prompt_tokens"], line["usage"]["completion_tokens"])
        assert line["cost_usd"] == prices.cost(line["provider"], line["model"], usage)
    assert by_model["gpt-4o-mini"]["cost_usd"] == pytest.approx(
        library_cost("openai", "gpt-4o-mini", Usage(2, 3))
    )
    assert by_model["unpriced-model"]["cost_usd"] is None
    assert by_model["my-llama"]["cost_usd"] == pytest.approx(2.0)  # 2 prompt tokens at $1 each
    metrics = await (await gateway.get("/metrics")).text()
    haiku = library_cost("anthropic", "claude-3-5-haiku-latest", Usage(2, 3))
    assert (
        'llm_gateway_cost_usd_total{model="claude-3-5-haiku-latest",provider="anthropic"} '
        f"{haiku}" in metrics
    )
    assert (
        'llm_gateway_unpriced_requests_total{model="unpriced-model",provider="openai"} 1.0'
        in metrics
    )


@pytest.mark.parametrize("is_stream", [False, True])
async def test_a_stored_prompt_naming_no_model_is_charged_to_the_budget_at_the_model_that_answered(
    gateway_with_keys: Callable[..., Awaitable[TestClient]],
    records: Callable[..., Awaitable[list[dict[str, Any]]]],
    is_stream: bool,
) -> None:
    # A Responses request may name a stored prompt instead of a model; the answer names the
    # model that ran (the fake: fake-model, at $1 a token). Before: cost null, budget $0.
    budgeted = {"provider": "openai", "api_key": "sk-real-prompt-1", "name": "prompted"}
    key = "vk_test_prompted_7c1d9e3a5b"
    gateway = await gateway_with_keys(
        {key: {**budgeted, "budget": {"usd": 1000}}},
        prices={"openai": {"fake-model": {"input_mtok": 1e6, "output_mtok": 1e6}}},
    )
    body = {"prompt": {"id": "pmpt_123"}, "input": "a b", "stream": is_stream}
    response = await gateway.post(
        "/v1/responses", json=body, headers={**auth(key), "x-fake-chunks": "3"}
    )
    assert response.status == 200
    await response.read()
    (line,) = await records(1)
    assert line["usage"]["estimated"] is False
    tokens = line["usage"]["prompt_tokens"] + line["usage"]["completion_tokens"]
    assert line["cost_usd"] == pytest.approx(tokens)
    usage = await (await gateway.get("/usage", headers=auth(key))).json()
    assert usage["budget"]["spent_usd"] == pytest.approx(tokens)
    metrics = await (await gateway.get("/metrics")).text()
    assert "llm_gateway_unpriced_requests_total{" not in metrics


@pytest.mark.parametrize("is_stream", [False, True])
async def test_a_chat_completion_served_at_the_priority_tier_costs_the_priority_price(
    gateway: TestClient,
    records: Callable[..., Awaitable[list[dict[str, Any]]]],
    is_stream: bool,
) -> None:
    client = AsyncOpenAI(api_key=OPENAI_VK, base_url=str(gateway.make_url("/v1")), max_retries=0)
    messages: Any = [{"role": "user", "content": "a b"}]
    try:
        if is_stream:
            chunks = await client.chat.completions.create(
                model="gpt-4o-mini",
                messages=messages,
                service_tier="priority",
                stream=True,
                stream_options={"include_usage": True},
            )
            assert {chunk.service_tier async for chunk in chunks} == {"priority"}
        else:
            answer = await client.chat.completions.create(
                model="gpt-4o-mini", messages=messages, service_tier="priority"
            )
            assert answer.service_tier == "priority"
    finally:
        await client.close()
    (line,) = await records(1)
    assert not line["usage"]["estimated"]
    usage = Usage(line["usage"]["prompt_tokens"], line["usage"]["completion_tokens"])
    assert line["cost_usd"] == pytest.approx(library_cost("openai", "gpt-4o-mini", usage, TIERS))


@pytest.mark.parametrize("is_stream", [False, True])
async def test_a_response_served_at_the_priority_tier_costs_the_priority_price(
    gateway: TestClient,
    records: Callable[..., Awaitable[list[dict[str, Any]]]],
    is_stream: bool,
) -> None:
    """OpenAI bills `service_tier: "priority"` at its own, higher rates (and flex at lower
    ones): the answer names the tier that served it, and the cost and budget follow it."""
    client = AsyncOpenAI(api_key=OPENAI_VK, base_url=str(gateway.make_url("/v1")), max_retries=0)
    try:
        if is_stream:
            async for event in await client.responses.create(
                model="gpt-4o-mini", input="a b", service_tier="priority", stream=True
            ):
                if event.type == "response.completed":
                    assert event.response.service_tier == "priority"
        else:
            answer = await client.responses.create(
                model="gpt-4o-mini", input="a b", service_tier="priority"
            )
            assert answer.service_tier == "priority"
    finally:
        await client.close()
    (line,) = await records(1)
    usage = Usage(line["usage"]["prompt_tokens"], line["usage"]["completion_tokens"])
    assert line["cost_usd"] == pytest.approx(library_cost("openai", "gpt-4o-mini", usage, TIERS))
    assert line["cost_usd"] > library_cost("openai", "gpt-4o-mini", usage)


@pytest.mark.parametrize("is_stream", [False, True])
async def test_anthropic_hour_long_cache_writes_and_web_searches_are_charged_at_their_rates(
    gateway: TestClient,
    records: Callable[..., Awaitable[list[dict[str, Any]]]],
    is_stream: bool,
) -> None:
    """Anthropic bills a 1-hour cache write at twice the input rate (a 5-minute one at 1.25x)
    and each server-side web search at $10 a thousand: its usage says how many of each
    (`cache_creation`, `server_tool_use`; a stream's searches in its message_delta). The log
    line shows them, and the cost and the budget pay them."""
    client = AsyncAnthropic(api_key=ANTHROPIC_VK, base_url=str(gateway.make_url("")), max_retries=0)
    headers = {
        "x-fake-cache-write-tokens": "4000",
        "x-fake-cache-write-1h-tokens": "3000",
        "x-fake-web-searches": "2",
    }
    ask: Any = {
        "model": "claude-haiku-4-5",
        "max_tokens": 64,
        "messages": [{"role": "user", "content": "a b"}],
        "extra_headers": headers,
    }
    try:
        if is_stream:
            async with client.messages.stream(**ask) as stream:
                message = await stream.get_final_message()
        else:
            message = await client.messages.create(**ask)
        assert message.usage.server_tool_use is not None
        assert message.usage.server_tool_use.web_search_requests == 2
    finally:
        await client.close()
    (line,) = await records(1)
    assert line["usage"]["cache_write_tokens"] == 4000
    assert line["usage"]["cache_write_1h_tokens"] == 3000
    assert line["usage"]["web_searches"] == 2
    usage = Usage(
        line["usage"]["prompt_tokens"],
        line["usage"]["completion_tokens"],
        cache_write_tokens=4000,
        cache_write_1h_tokens=3000,
        web_searches=2,
    )
    expected = library_cost("anthropic", "claude-haiku-4-5", usage)
    assert line["cost_usd"] == pytest.approx(expected, rel=1e-9)
    five_minute = library_cost(
        "anthropic",
        "claude-haiku-4-5",
        Usage(usage.prompt_tokens, usage.completion_tokens, cache_write_tokens=4000),
    )
    assert expected > five_minute + 0.02  # the searches alone are $0.02
    spent = await (await gateway.get("/usage", headers=auth(ANTHROPIC_VK))).json()
    assert spent["totals"]["spent_usd"] == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("is_stream", [False, True])
async def test_responses_web_search_calls_are_charged_at_their_rate(
    gateway: TestClient,
    records: Callable[..., Awaitable[list[dict[str, Any]]]],
    is_stream: bool,
) -> None:
    """OpenAI bills each web_search call of the Responses API ($10 a thousand) on top of the
    tokens, and its answer counts them beside `usage`: `tool_usage.web_search.num_requests`
    (a stream's in `response.completed`). The log line shows them; the cost and the budget
    pay them."""
    client = AsyncOpenAI(api_key=OPENAI_VK, base_url=str(gateway.make_url("/v1")), max_retries=0)
    ask: Any = {
        "model": "gpt-4o-mini",
        "input": "news today",
        "tools": [{"type": "web_search"}],
        "extra_headers": {"x-fake-web-searches": "3"},
    }
    try:
        if is_stream:
            async with client.responses.stream(**ask) as stream:
                answer = await stream.get_final_response()
        else:
            answer = await client.responses.create(**ask)
        assert answer.tool_usage is not None
        assert answer.tool_usage.web_search.num_requests == 3
    finally:
        await client.close()
    (line,) = await records(1)
    assert line["usage"]["web_searches"] == 3
    usage = Usage(line["usage"]["prompt_tokens"], line["usage"]["completion_tokens"])
    tokens_only = library_cost("openai", "gpt-4o-mini", usage)
    expected = library_cost(
        "openai", "gpt-4o-mini", Usage(usage.prompt_tokens, usage.completion_tokens, web_searches=3)
    )
    assert expected == pytest.approx(tokens_only + 0.03)  # the searches are $0.03
    assert line["cost_usd"] == pytest.approx(expected, rel=1e-9)
    spent = await (await gateway.get("/usage", headers=auth(OPENAI_VK))).json()
    # Spent in whole micro-dollars, the fraction carried to the key's next request.
    assert spent["totals"]["spent_usd"] == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("is_stream", [False, True])
async def test_a_message_served_in_fast_mode_costs_the_fast_price(
    gateway: TestClient,
    records: Callable[..., Awaitable[list[dict[str, Any]]]],
    is_stream: bool,
) -> None:
    """Anthropic bills fast mode (`speed: "fast"`, which the answer's usage names) at its own,
    higher rates; before, it was priced as a standard answer."""
    client = AsyncAnthropic(api_key=ANTHROPIC_VK, base_url=str(gateway.make_url("")), max_retries=0)
    messages: Any = [{"role": "user", "content": "a b"}]
    async with client:
        if is_stream:
            async with client.beta.messages.stream(
                model="claude-opus-4-8", max_tokens=64, messages=messages, speed="fast"
            ) as stream:
                answer = await stream.get_final_message()
        else:
            answer = await client.beta.messages.create(
                model="claude-opus-4-8", max_tokens=64, messages=messages, speed="fast"
            )
    assert answer.usage.speed == "fast"
    (line,) = await records(1)
    assert not line["usage"]["estimated"]
    usage = Usage(line["usage"]["prompt_tokens"], line["usage"]["completion_tokens"])
    fast = library_cost("anthropic", "claude-opus-4-8", usage, FAST)
    assert fast > library_cost("anthropic", "claude-opus-4-8", usage)
    assert line["cost_usd"] == pytest.approx(fast)
