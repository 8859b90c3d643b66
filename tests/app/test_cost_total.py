"""1,000 mixed requests: the gateway's total cost equals the one computed independently.

JSON and streams, both providers, every endpoint that produces tokens,
cached and reasoning tokens, cache writes, every content coding, some answers cut short.
The independent figure comes from the fake provider's own record of the usage it sent
(`fake.usage`), read and priced by genai-prices' own extractors and `calc_price` — not by
the gateway's tap or arithmetic. Where the fake reported a usage, the gateway's cost equals
it, request by request and in total; where it reported none (a stream that never asked, an
answer cut before its usage), the gateway charged an estimate, never nothing; where it
reported only a running count (an Anthropic stream cut after `message_start`), its prompt
as counted there and at least the completion delivered (none delivered: none known, the
running count's start of 1 output token being no output).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import genai_prices
import pytest
from aiohttp.test_utils import TestClient

from proxy.quota.tracker import KINDS
from tests.conftest import ANTHROPIC_VK, OPENAI_REAL, OPENAI_VK, auth
from tests.support.fake_provider import FakeState

EXACT_VK = "vk_test_cost_exact_3e8a1f6c2d"
REQUESTS = 1000
CONCURRENCY = 16
WORDS = "the quick brown fox jumps over the lazy dog again and again".split()
# Anthropic's usage fields that make up the prompt (its cache reads and writes apart).
ANTHROPIC_PROMPT = ("input_tokens", "cache_read_input_tokens", "cache_creation_input_tokens")


@pytest.fixture
async def cost_gateway(gateway_with_keys: Callable[..., Awaitable[TestClient]]) -> TestClient:
    exact = {"provider": "openai", "api_key": OPENAI_REAL, "name": "exact", "stream_usage": "exact"}
    return await gateway_with_keys({EXACT_VK: exact}, QUOTA_ENABLED="false")


def plan(index: int, chance: random.Random) -> dict[str, Any]:
    """One request of the mix: key, path, body, fake knobs, and how to price what it reports."""
    prompt = " ".join(chance.choices(WORDS, k=chance.randint(1, 40)))
    is_stream = chance.random() < 0.5
    headers = {
        "x-request-id": f"cost-{index}",
        "x-fake-chunks": str(chance.randint(1, 30)),
        "x-fake-cached-tokens": str(chance.choice([0, 0, 64, 1024, 5000])),
    }
    coding = chance.choice([None, None, "gzip", "deflate", "br", "zstd"])
    if coding:
        headers["x-fake-encoding"] = coding
    if chance.random() < 0.1:
        headers["x-fake-drop"] = "midstream"  # cut short: a stream, or a JSON body in half
    kind = chance.choice(["chat", "chat", "responses", "embeddings", "messages", "messages"])
    if kind == "messages":
        headers["x-fake-cache-write-tokens"] = str(chance.choice([0, 0, 300, 2000]))
        model = chance.choice(["claude-3-5-haiku-latest", "claude-sonnet-4-5"])
        body: dict[str, Any] = {
            "model": model,
            "max_tokens": 100,
            "messages": [{"role": "user", "content": prompt}],
            "stream": is_stream,
        }
        return {
            "key": ANTHROPIC_VK,
            "path": "/v1/messages",
            "body": body,
            "headers": headers,
            "provider": "anthropic",
            "flavor": "default",
        }
    model = chance.choice(["gpt-4o-mini", "o3-mini", "gpt-4o"])
    headers["x-fake-reasoning-tokens"] = str(chance.choice([0, 0, 200, 3000]))
    if kind == "embeddings":
        body = {"model": "text-embedding-3-small", "input": prompt}
        return {
            "key": OPENAI_VK,
            "path": "/v1/embeddings",
            "body": body,
            "headers": headers,
            "provider": "openai",
            "flavor": "embeddings",
        }
    if kind == "responses":
        body = {"model": model, "input": prompt, "stream": is_stream}
        path, flavor = "/v1/responses", "responses"
    else:
        body = {"model": model, "messages": [{"role": "user", "content": prompt}]}
        if is_stream:
            body["stream"] = True
            if chance.random() < 0.4:
                body["stream_options"] = {"include_usage": True}
        path, flavor = "/v1/chat/completions", "chat"
    # Streams that do not ask for usage: estimated with the plain key, exact with EXACT_VK.
    key = chance.choice([OPENAI_VK, EXACT_VK])
    return {
        "key": key,
        "path": path,
        "body": body,
        "headers": headers,
        "provider": "openai",
        "flavor": flavor,
    }


def is_cut_anthropic_stream(request: dict[str, Any]) -> bool:
    return (
        request["provider"] == "anthropic"
        and request["body"]["stream"]
        and request["headers"].get("x-fake-drop") == "midstream"
    )


def independent_cost(request: dict[str, Any], usage: dict[str, Any]) -> float:
    """genai-prices' own reading of the provider's usage object, priced by genai-prices."""
    response = {"model": request["body"]["model"], "usage": usage}
    extracted = genai_prices.extract_usage(
        response, provider_id=request["provider"], api_flavor=request["flavor"]
    )
    return float(extracted.calc_price().total_price)


async def test_a_thousand_mixed_requests_cost_what_the_providers_usage_says(
    cost_gateway: TestClient,
    fake: FakeState,
    records: Callable[..., Awaitable[list[dict[str, Any]]]],
) -> None:
    chance = random.Random(14)
    requests = [plan(index, chance) for index in range(REQUESTS)]
    gate = asyncio.Semaphore(CONCURRENCY)

    async def send(session: aiohttp.ClientSession, request: dict[str, Any]) -> None:
        async with gate:
            url = cost_gateway.make_url(request["path"])
            headers = {**auth(request["key"]), **request["headers"]}
            async with session.post(url, json=request["body"], headers=headers) as response:
                with contextlib.suppress(aiohttp.ClientPayloadError):  # cut short
                    await response.read()

    # Bytes as sent: the client does not decode (nor fail on) zstd.
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        await asyncio.gather(*(send(session, request) for request in requests))
    lines = {line["request_id"]: line for line in await records(REQUESTS, timeout=30)}
    assert len(lines) == REQUESTS

    gateway_total = independent_total = 0.0
    known = estimated = 0
    for request in requests:
        rid = request["headers"]["x-request-id"]
        line, reported = lines[rid], fake.usage.get(rid)
        assert line["usage"] is not None, line  # every one of them produced tokens
        if reported and is_cut_anthropic_stream(request):
            # The fake's message_start said output_tokens 1, and its total never came: the
            # prompt as reported, the completion at least what was delivered, estimated
            # (the 1 only when something was: before any output it counts none).
            assert line["usage"]["estimated"] is True, (request, line)
            prompt = sum(reported[name] for name in ANTHROPIC_PROMPT)
            assert line["usage"]["prompt_tokens"] == prompt, (request, line)
            started = {**reported, "output_tokens": 0}
            assert line["cost_usd"] >= independent_cost(request, started), (request, line)
            if line["usage"]["completion_tokens"]:
                assert line["cost_usd"] >= independent_cost(request, reported), (request, line)
            estimated += 1
        elif reported:
            expected = independent_cost(request, reported)
            assert line["usage"]["estimated"] is False, (request, line)
            assert line["cost_usd"] == pytest.approx(expected, rel=1e-9), (request, line)
            gateway_total += line["cost_usd"]
            independent_total += expected
            known += 1
        else:  # the fake reported nothing: the gateway estimated, and charged it
            assert line["usage"]["estimated"] is True, (request, line)
            assert line["cost_usd"] > 0, (request, line)
            estimated += 1
    assert gateway_total == pytest.approx(independent_total, rel=1e-9)
    # The mix really has both, and the kinds priced apart.
    assert known > 700 and estimated > 50, (known, estimated)
    assert any(line["usage"]["cache_read_tokens"] for line in lines.values())
    assert any(line["usage"]["cache_write_tokens"] for line in lines.values())
    assert any(line["usage"]["reasoning_tokens"] for line in lines.values())

    # GET /usage: each key's totals by kind are its log lines' sums; its spend their cost,
    # to the micro-dollar (fractions carried, not each rounded up; estimates spend too).
    for key in (OPENAI_VK, EXACT_VK, ANTHROPIC_VK):
        mine = [
            lines[request["headers"]["x-request-id"]]
            for request in requests
            if request["key"] == key
        ]
        totals = (await (await cost_gateway.get("/usage", headers=auth(key))).json())["totals"]
        assert totals["requests"] == len(mine)
        for kind in KINDS:
            assert totals[kind] == sum(line["usage"][kind] for line in mine), (key, kind)
        assert totals["tokens"] == totals["prompt_tokens"] + totals["completion_tokens"]
        cost = sum(line["cost_usd"] for line in mine)
        assert totals["spent_usd"] == pytest.approx(cost, abs=1e-6), key
