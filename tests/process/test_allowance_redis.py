"""Uncapped requests across two gateway processes sharing one redis-server: each reserves
the output allowance in the one Lua admission, so a burst spread over both processes
overshoots a token window or a budget by at most one request's reservation."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import auth, keys_document
from tests.support.bodies import chat
from tests.support.fake_provider import FakeState
from tests.support.polling import until
from tests.support.processes import Processes, start_gateway

UNCAPPED = chat("hello")  # no max_tokens; "hello" is 2 tokens by the estimate
HEADERS = {"x-fake-chunks": "20", "x-fake-hold": "1"}  # 1 + 20 tokens, once released
REAL_TOKENS = 1 + 20
ALLOWANCE = 20
RESERVED_TOKENS = 2 + ALLOWANCE
USD_PER_TOKEN = 0.0001
PRICES = {"openai": {"*": {"input_mtok": 100, "output_mtok": 100}}}
WINDOWED, BUDGETED = "vk_test_windowed_5e6f7a8b9c", "vk_test_budgeted_5e6f7a8b9c"


@pytest.fixture
def gateways(processes: Processes, tmp_path: Path, fake_base: str, redis_url: str) -> list[str]:
    """Two gateways on one Redis, one key with a 100-token window and one with a $0.01
    budget; OUTPUT_ALLOWANCE_TOKENS=20."""
    document = keys_document(fake_base)
    document["virtual_keys"][WINDOWED] = {
        "provider": "openai",
        "api_key": "sk-windowed-real-123456",
        "name": "windowed",
        "quota": {"requests": 1000, "tokens": 100},
    }
    document["virtual_keys"][BUDGETED] = {
        "provider": "openai",
        "api_key": "sk-budgeted-real-123456",
        "name": "budgeted",
        "budget": {"usd": 0.01, "window_seconds": 3600},
    }
    keys, prices = tmp_path / "keys.json", tmp_path / "prices.json"
    keys.write_text(json.dumps(document))
    prices.write_text(json.dumps(PRICES))
    return [
        start_gateway(
            processes,
            keys,
            tmp_path / f"log-{n}.jsonl",
            REDIS_URL=redis_url,
            PRICES_FILE=str(prices),
            OUTPUT_ALLOWANCE_TOKENS=str(ALLOWANCE),
        )[1]
        for n in range(2)
    ]


async def burst(
    session: aiohttp.ClientSession, urls: list[str], key: str, fake: FakeState, count: int
) -> dict[str, Any]:
    """`count` uncapped requests at once over both processes, answered only once each was
    refused or reached the fake; the key's /usage once every admitted one is charged."""
    refused = 0

    async def one(n: int) -> int:
        nonlocal refused
        url = f"{urls[n % 2]}/v1/chat/completions"
        headers = {**auth(key), **HEADERS}
        async with session.post(url, json=UNCAPPED, headers=headers) as response:
            refused += response.status == 429
            await response.read()
            return response.status

    tasks = [asyncio.create_task(one(n)) for n in range(count)]
    await until(lambda: refused + len(fake.requests) == count, 20, "every request decided")
    fake.release.set()
    statuses = await asyncio.gather(*tasks)
    admitted = statuses.count(200)
    assert admitted + statuses.count(429) == count

    async def usage() -> dict[str, Any]:
        async with session.get(f"{urls[1]}/usage", headers=auth(key)) as response:
            document: dict[str, Any] = await response.json()
            return document

    async def charged() -> bool:
        totals = (await usage())["totals"]
        return bool(totals["requests"] == admitted and totals["tokens"] == admitted * REAL_TOKENS)

    await until(charged, 10, "every admitted request charged")
    return await usage()


async def test_300_uncapped_requests_over_two_processes_hold_a_100_token_window_to_one_allowance(
    gateways: list[str], fake: FakeState
) -> None:
    async with aiohttp.ClientSession() as session:
        usage = await burst(session, gateways, WINDOWED, fake, 300)
    used = usage["tokens"]["used"]
    assert 100 - RESERVED_TOKENS < used <= 100 + RESERVED_TOKENS, used
    assert usage["tokens"]["reserved"] == 0
    print(f"\n300 uncapped requests, 100-token window, two processes: {used} tokens admitted")


async def test_300_uncapped_requests_over_two_processes_hold_a_one_cent_budget_to_one_allowance(
    gateways: list[str], fake: FakeState
) -> None:
    async with aiohttp.ClientSession() as session:
        usage = await burst(session, gateways, BUDGETED, fake, 300)
    spent = usage["budget"]["spent_usd"]
    worst_case = RESERVED_TOKENS * USD_PER_TOKEN
    assert 0.01 - worst_case < spent <= 0.01 + worst_case, spent
    assert usage["budget"]["reserved_usd"] == 0
    print(f"\n300 uncapped requests, $0.01 budget, two processes: ${spent} spent")
