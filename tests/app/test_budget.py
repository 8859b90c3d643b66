"""Reservations, budgets and the pre-check, as clients see them through a real gateway.

Reservations bound the overshoot under concurrency; budgets refuse in dollars; an exhausted
key's large body is refused before it is read. The Redis, two-process variants are in
`test_redis_tracker.py`.
"""

from __future__ import annotations

import asyncio
import gc
import re
import tracemalloc
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import openai
import pytest
from aiohttp.test_utils import TestClient

import proxy
from tests.conftest import assert_openai_error, auth
from tests.support.bodies import chat

BUDGET_VK = "vk_test_budget_5e6f7a8b9c"
# "hello" is 2 tokens by the estimate (5 characters); the fake answers 1 + 8 = 9 tokens.
CHAT = chat("hello", max_tokens=10)
RESERVED_TOKENS = 2 + 10  # one request's reservation: its prompt estimate plus max_tokens
ANSWER = {"x-fake-chunks": "8"}
REAL_TOKENS = 1 + 8
USD_PER_TOKEN = 0.0001
# The operator's price list (PRICES_FILE): every token of the fake's models costs the same.
PRICES = {"openai": {"*": {"input_mtok": 100, "output_mtok": 100}}}


@pytest.fixture
def budget_gateway(
    gateway_with_keys: Callable[..., Awaitable[TestClient]],
) -> Callable[..., Awaitable[TestClient]]:
    """A gateway with one extra key with this quota and budget, prices from PRICES."""

    async def make(entry: dict[str, Any], **env: str) -> TestClient:
        budgeted = {
            "provider": "openai",
            "api_key": "sk-budget-real-7654321",
            "name": "budgeted",
            **entry,
        }
        return await gateway_with_keys({BUDGET_VK: budgeted}, prices=PRICES, **env)

    return make


async def one(gateway: TestClient) -> int:
    response = await gateway.post(
        "/v1/chat/completions", json=CHAT, headers={**auth(BUDGET_VK), **ANSWER}
    )
    await response.read()
    return response.status


async def burst(gateway: TestClient, count: int) -> list[int]:
    """`count` requests at once; their statuses, 200s first."""
    return sorted(await asyncio.gather(*(one(gateway) for _ in range(count))))


async def in_turn(gateway: TestClient, count: int) -> list[int]:
    return [await one(gateway) for _ in range(count)]


async def usage_of(gateway: TestClient, records: Any, lines: int) -> dict[str, Any]:
    """GET /usage once the log holds `lines` lines: a request's log line is written after
    its charge was settled with the quota."""
    assert len(await records(lines, timeout=10)) >= lines
    return await (await gateway.get("/usage", headers=auth(BUDGET_VK))).json()


async def test_300_concurrent_requests_against_100_tokens_overshoot_by_at_most_one_request(
    budget_gateway: Any, records: Any
) -> None:
    gateway = await budget_gateway({"quota": {"requests": 1000, "tokens": 100}})
    statuses = await burst(gateway, 300)
    usage = await usage_of(gateway, records, 300)
    charged = usage["tokens"]["used"]
    assert charged == statuses.count(200) * REAL_TOKENS
    # Each admission saw the others' reservations: admitted while under, so at most the
    # limit plus the one request that crossed it.
    assert 100 - RESERVED_TOKENS < charged <= 100 + RESERVED_TOKENS
    assert usage["tokens"]["reserved"] == 0  # every reservation settled to the real count


async def test_200_concurrent_requests_against_a_one_cent_budget_spend_at_most_one_more_request(
    budget_gateway: Any, records: Any
) -> None:
    gateway = await budget_gateway({"budget": {"usd": 0.01, "window_seconds": 3600}})
    statuses = await burst(gateway, 200)
    usage = await usage_of(gateway, records, 200)
    spent = usage["budget"]["spent_usd"]
    worst_case = RESERVED_TOKENS * USD_PER_TOKEN  # max_tokens caps what one request costs
    assert spent == pytest.approx(statuses.count(200) * REAL_TOKENS * USD_PER_TOKEN)
    assert 0.01 - worst_case < spent <= 0.01 + worst_case
    assert usage["budget"]["reserved_usd"] == 0
    assert usage["totals"]["spent_usd"] == spent
    assert statuses.count(429) == 200 - statuses.count(200)


async def test_an_exhausted_budget_is_a_429_insufficient_quota_that_says_when_it_frees_up(
    budget_gateway: Any, records: Any
) -> None:
    gateway = await budget_gateway({"budget": {"usd": 0.001, "window_seconds": 86400}})
    assert await in_turn(gateway, 2) == [200, 200]  # 0.0009 spent: under, so the second runs
    refused = await gateway.post(
        "/v1/chat/completions", json=CHAT, headers={**auth(BUDGET_VK), **ANSWER}
    )
    assert refused.status == 429
    assert refused.headers["x-should-retry"] == "false"
    # The spend leaves a day after its time bucket (a thousandth of the window) ends.
    assert 86000 < int(refused.headers["retry-after"]) <= 86400 + 87
    body = await refused.json()
    assert_openai_error(body, "insufficient_quota")
    message = body["error"]["message"]
    assert "Budget exhausted for this key: $0.001 per 1 day" in message
    assert re.search(r"It frees up in 24 hours, at \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ\.", message)
    lines = await records(3)
    assert lines[-1]["status"] == 429 and "frees up in 24 hours" in lines[-1]["error"]
    # The SDK sees a RateLimitError at once: it does not retry into a closed day.
    client = openai.AsyncOpenAI(
        api_key=BUDGET_VK, base_url=str(gateway.make_url("/v1")), max_retries=2
    )
    with pytest.raises(openai.RateLimitError) as raised:
        await client.chat.completions.create(**CHAT)
    assert raised.value.code == "insufficient_quota"
    await client.close()


async def test_a_budget_spent_for_a_few_seconds_is_a_rate_limit_the_sdk_waits_out(
    budget_gateway: Any,
) -> None:
    # A budget of dollars per minute (or less) is a rate in dollars: spent, it frees up in
    # seconds. Its 429 must be one the SDKs wait out (Retry-After within their 60 s, no
    # x-should-retry: false) and agents retry (rate_limit_exceeded: Codex ends its turn for
    # good on insufficient_quota), as a full request or token window's is.
    gateway = await budget_gateway({"budget": {"usd": 0.001, "window_seconds": 1.5}})
    assert await in_turn(gateway, 2) == [200, 200]  # 0.0009 spent: under, so the second runs
    refused = await gateway.post(
        "/v1/chat/completions", json=CHAT, headers={**auth(BUDGET_VK), **ANSWER}
    )
    body = await refused.json()
    assert refused.status == 429
    assert int(refused.headers["retry-after"]) <= 2, body
    assert "x-should-retry" not in refused.headers, body
    assert_openai_error(body, "rate_limit_exceeded")
    assert "Budget exhausted for this key" in body["error"]["message"]
    client = openai.AsyncOpenAI(
        api_key=BUDGET_VK, base_url=str(gateway.make_url("/v1")), max_retries=2
    )
    # The SDK sleeps the Retry-After and retries: by then the first spend has left.
    answer = await client.chat.completions.create(**CHAT, extra_headers=ANSWER)
    assert answer.choices[0].message.content
    await client.close()


async def test_a_default_budget_applies_to_keys_without_one_and_null_means_none(
    budget_gateway: Any,
) -> None:
    capped = await budget_gateway({}, BUDGET_USD="0.0005", BUDGET_WINDOW_SECONDS="60")
    assert await in_turn(capped, 3) == [200, 429, 429]
    free = await budget_gateway({"budget": None}, BUDGET_USD="0.0005")
    assert await in_turn(free, 3) == [200, 200, 200]


async def test_usage_rounds_waits_and_shows_totals_with_quotas_off(
    budget_gateway: Any, records: Any
) -> None:
    gateway = await budget_gateway({"quota": {"requests": 5, "window_seconds": 3600}})
    await in_turn(gateway, 2)
    usage = await usage_of(gateway, records, 2)
    for wait in (usage["requests"]["reset_seconds"], usage["tokens"]["reset_seconds"]):
        assert wait == round(wait, 3) and 3599 < wait <= 3600
    off = await budget_gateway({}, QUOTA_ENABLED="false")
    await in_turn(off, 2)
    usage = await usage_of(off, records, 4)
    assert usage["quota_enabled"] is False
    assert usage["totals"] == {
        "requests": 2,
        "tokens": 2 * REAL_TOKENS,
        "spent_usd": 0.0018,
        "prompt_tokens": 2 * 1,
        "completion_tokens": 2 * 8,
        "cache_read_tokens": 0,
        "cache_write_tokens": 0,
        "input_audio_tokens": 0,
        "reasoning_tokens": 0,
        "output_audio_tokens": 0,
    }


async def test_a_429_log_line_names_the_wait_and_that_sdks_retry_short_ones(
    budget_gateway: Any, records: Any
) -> None:
    gateway = await budget_gateway({"quota": {"requests": 1, "window_seconds": 30}})
    assert await in_turn(gateway, 2) == [200, 429]
    refused = (await records(2))[-1]
    assert refused["status"] == 429
    assert re.search(r"Retry in (29|30) seconds \(an SDK retries", refused["error"])


async def send_large_body(host: str, port: int, length: int) -> tuple[bytes, int]:
    """Send the head and 64 KiB of a `length`-byte body, then read the answer: (status line, bytes sent)."""
    reader, writer = await asyncio.open_connection(host, port)
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\n"
        f"Authorization: Bearer {BUDGET_VK}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {length}\r\n\r\n"
    )
    writer.write(head.encode() + b" " * 65536)
    await writer.drain()
    try:
        status = await asyncio.wait_for(reader.readline(), timeout=10)
    finally:
        writer.close()
    return status, 65536


async def test_an_exhausted_key_is_refused_before_its_10_mb_bodies_are_read(
    budget_gateway: Any, fake: Any
) -> None:
    gateway = await budget_gateway({"quota": {"requests": 1, "window_seconds": 3600}})
    assert await burst(gateway, 2) == [200, 429]  # the second refusal closes the window
    host, port = gateway.server.host, gateway.server.port
    answers = await asyncio.gather(
        *(send_large_body(host, port, 10 * 1024 * 1024) for _ in range(40))
    )
    # Each got its 429 with only 64 KiB of its 10 MB sent: the gateway never waited for the rest.
    assert [status for status, _ in answers] == [b"HTTP/1.1 429 Too Many Requests\r\n"] * 40
    assert len(fake.requests) == 1


async def test_the_largest_budget_keys_json_takes_serves_and_reports(
    budget_gateway: Callable[..., Awaitable[TestClient]],
) -> None:
    # A budget of $1e308 (meant as "no cap") loaded, then every request of its key and its
    # GET /usage answered 500: its micro-dollars overflowed a float. The largest budget the
    # file takes serves as any other.
    gateway = await budget_gateway({"budget": {"usd": 1_000_000_000_000}})
    assert await one(gateway) == 200
    usage = await gateway.get("/usage", headers=auth(BUDGET_VK))
    assert usage.status == 200
    assert (await usage.json())["budget"]["limit_usd"] == 1_000_000_000_000


async def test_made_up_model_names_of_a_budgeted_key_hold_no_memory_after_their_requests(
    gateway_with_keys: Callable[..., Awaitable[TestClient]],
) -> None:
    # A budget's reservation is priced by the body's model, from the price library: its
    # lookups were remembered by the whole name, 4,096 of them, so a client sending names of
    # 10 MB each (MAX_BODY_BYTES) could make the gateway hold 40 GB. No price names a model
    # that long; the log line and the settle price the name cut to 200 characters.
    key = {"provider": "openai", "api_key": "sk-budget-real-7654321", "budget": {"usd": 50}}
    gateway = await gateway_with_keys({BUDGET_VK: key})
    assert await one(gateway) == 200  # whatever the first request builds once is built
    proxy_files = tracemalloc.Filter(True, str(Path(proxy.__file__).parent / "*"))
    tracemalloc.start()
    try:
        gc.collect()
        before = tracemalloc.take_snapshot().filter_traces([proxy_files])
        for number in range(10):
            model = f"gpt-4o-mini-{number}-" + "x" * 200_000
            body = {**CHAT, "model": model}
            response = await gateway.post(
                "/v1/chat/completions", json=body, headers={**auth(BUDGET_VK), **ANSWER}
            )
            assert response.status == 200
            await response.read()
        gc.collect()
        after = tracemalloc.take_snapshot().filter_traces([proxy_files])
    finally:
        tracemalloc.stop()
    held = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
    # The ten names were 2 MB together; a kept connection holds its largest read (~200 KB).
    assert held < 1_000_000
