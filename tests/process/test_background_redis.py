"""Background Responses on Redis: two gateways (in one process, then as two processes) share
one redis-server, and a background response is charged once, to the key that created it,
whichever of them is polled and by whichever key."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import openai
import pytest
import redis
from aiohttp.test_utils import TestClient

from tests.app.test_background import (
    ALL_SECRETS,
    ANSWER,
    BUDGET_VK,
    INPUT,
    OTHER_VK,
    PRICES,
    REAL_TOKENS,
    SHARED_VK,
    USD_PER_TOKEN,
    Records,
    background_keys,
    client,
    create,
    usage_of,
)
from tests.conftest import OPENAI_VK, auth, keys_document
from tests.support.observed import key_usage, log_lines
from tests.support.processes import Processes, start_gateway


async def test_two_gateways_on_one_redis_charge_a_background_response_exactly_once(
    gateway_with_keys: Callable[..., Awaitable[TestClient]],
    redis_url: str,
    raw_redis: redis.Redis,
    records: Records,
    log_path: Path,
) -> None:
    first, second = [
        await gateway_with_keys(background_keys(), prices=PRICES, REDIS_URL=redis_url)
        for _ in range(2)
    ]
    response_ids = [await create(first) for _ in range(3)]
    owed = raw_redis.keys("llm-gateway:deferred:*")
    assert len(owed) == 3 and all(0 < raw_redis.ttl(name) <= 24 * 3600 for name in owed)
    assert not any(secret in name for name in owed for secret in ALL_SECRETS)
    # Each response polled at once from both gateways, twice each: one poll charges it.
    polls = [
        client(gateway).responses.retrieve(response_id)
        for response_id in response_ids
        for gateway in (first, second, first, second)
    ]
    assert {polled.status for polled in await asyncio.gather(*polls)} == {"completed"}
    lines = await records(3 + 12)  # every request settled: its charge is held, or in Redis
    # The second gateway sends the charges it holds within its settle delay (50 ms); the
    # first reads them from Redis.
    deadline = asyncio.get_running_loop().time() + 5
    while (tokens := (await usage_of(first, records, 15))["totals"]["tokens"]) < 3 * REAL_TOKENS:
        if asyncio.get_running_loop().time() > deadline:
            break
        await asyncio.sleep(0.02)
    assert tokens == 3 * REAL_TOKENS
    assert (await usage_of(second, records, 15))["budget"]["spent_usd"] == pytest.approx(
        3 * REAL_TOKENS * USD_PER_TOKEN
    )
    assert raw_redis.keys("llm-gateway:deferred:*") == []
    assert sum(line["usage"] is not None for line in lines) == 3
    text = log_path.read_text()
    assert not any(secret in text for secret in ALL_SECRETS)


async def test_two_gateway_processes_on_one_redis_charge_it_once_whichever_is_polled(
    processes: Processes, process_keys: Path, redis_url: str, tmp_path: Path
) -> None:
    logs = [tmp_path / f"log{index}.jsonl" for index in range(2)]
    urls = [start_gateway(processes, process_keys, log, REDIS_URL=redis_url)[1] for log in logs]
    sdks = [
        openai.AsyncOpenAI(
            api_key=OPENAI_VK, base_url=f"{url}/v1", max_retries=0, default_headers=ANSWER
        )
        for url in urls
    ]
    made = await sdks[0].responses.create(model="gpt-4o-mini", input=INPUT, background=True)
    polls = [sdks[index % 2].responses.retrieve(made.id) for index in range(8)]
    assert {polled.status for polled in await asyncio.gather(*polls)} == {"completed"}

    charged_lines = [line for line in await log_lines(logs, 9) if line["usage"] is not None]
    assert len(charged_lines) == 1 and charged_lines[0]["method"] == "GET"
    assert charged_lines[0]["usage"]["total_tokens"] == REAL_TOKENS
    tokens = (await key_usage(urls[0], OPENAI_VK, REAL_TOKENS))["totals"]["tokens"]
    assert tokens == REAL_TOKENS


def background_processes(
    processes: Processes, tmp_path: Path, fake_url: str, redis_url: str
) -> tuple[list[Path], list[str]]:
    """Two gateway processes on one Redis, with the background keys, priced: logs, URLs."""
    document = keys_document(fake_url)
    document["virtual_keys"].update(background_keys())
    keys = tmp_path / "background-keys.json"
    keys.write_text(json.dumps(document))
    prices = tmp_path / "prices.json"
    prices.write_text(json.dumps(PRICES))
    logs = [tmp_path / f"log{index}.jsonl" for index in range(2)]
    urls = [
        start_gateway(processes, keys, log, REDIS_URL=redis_url, PRICES_FILE=str(prices))[1]
        for log in logs
    ]
    return logs, urls


async def test_two_processes_charge_the_creator_once_whichever_key_fetches_it(
    processes: Processes, fake_url: str, redis_url: str, tmp_path: Path
) -> None:
    logs, urls = background_processes(processes, tmp_path, fake_url, redis_url)

    def sdk(index: int, key: str) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(
            api_key=key, base_url=f"{urls[index]}/v1", max_retries=0, default_headers=ANSWER
        )

    made = await sdk(0, BUDGET_VK).responses.create(
        model="gpt-4o-mini", input=INPUT, background=True
    )
    # Fetched at once through both processes, four times each, by the key sharing its real
    # key and by a key of another real key: one of them claims it, its creator pays.
    keys = (SHARED_VK, OTHER_VK, SHARED_VK, OTHER_VK)
    polls = [sdk(index % 2, key).responses.retrieve(made.id) for index in range(2) for key in keys]
    assert {polled.status for polled in await asyncio.gather(*polls)} == {"completed"}
    lines = await log_lines(logs, 9)
    assert len(lines) == 9
    charged_lines = [line for line in lines if line["usage"] is not None]
    assert len(charged_lines) == 1 and charged_lines[0]["method"] == "GET"
    assert charged_lines[0]["usage"]["total_tokens"] == REAL_TOKENS
    creator = (await key_usage(urls[1], BUDGET_VK, REAL_TOKENS))["totals"]
    assert creator["tokens"] == REAL_TOKENS  # never zero, and once
    assert creator["spent_usd"] == pytest.approx(REAL_TOKENS * USD_PER_TOKEN)
    for key in (SHARED_VK, OTHER_VK):
        for url in urls:
            assert (await key_usage(url, key))["totals"]["tokens"] == 0
    # The creator's own poll afterwards charges nothing more.
    await sdk(0, BUDGET_VK).responses.retrieve(made.id)
    assert len(await log_lines(logs, 10)) == 10
    assert (await key_usage(urls[0], BUDGET_VK))["totals"]["tokens"] == REAL_TOKENS
    text = "".join(log.read_text() for log in logs)
    assert not any(secret in text for secret in ALL_SECRETS)


async def test_a_stream_cut_in_one_process_is_charged_then_the_rest_when_another_fetches_it(
    processes: Processes, fake_url: str, redis_url: str, tmp_path: Path
) -> None:
    logs, urls = background_processes(processes, tmp_path, fake_url, redis_url)
    body = {"model": "gpt-4o-mini", "input": INPUT, "background": True, "stream": True}
    headers = {**auth(BUDGET_VK), **ANSWER, "x-fake-delay-ms": "20"}
    received = b""
    async with aiohttp.ClientSession() as session:  # read to its text's end, then leave
        async with session.post(f"{urls[0]}/v1/responses", json=body, headers=headers) as cut:
            async for chunk in cut.content.iter_any():
                received += chunk
                if b"response.output_text.done" in received:
                    break
            cut.close()
    created = json.loads(received.split(b"data: ", 1)[1].split(b"\n", 1)[0])
    (post,) = await log_lines(logs, 1)
    delivered = post["usage"]["total_tokens"]
    assert post["status"] == 499 and 0 < delivered < REAL_TOKENS  # charged, never zero
    assert (await key_usage(urls[1], BUDGET_VK, delivered))["totals"]["tokens"] == delivered
    # Fetched finished through the other process, by the key sharing its real key, at once
    # with the creator through the first: the creator is charged the rest, once.
    fetches = [
        openai.AsyncOpenAI(
            api_key=key, base_url=f"{url}/v1", max_retries=0, default_headers=ANSWER
        ).responses.retrieve(created["response"]["id"])
        for url, key in ((urls[1], SHARED_VK), (urls[0], BUDGET_VK), (urls[1], SHARED_VK))
    ]
    assert {fetched.status for fetched in await asyncio.gather(*fetches)} == {"completed"}
    lines = await log_lines(logs, 4)
    charged = [line["usage"]["total_tokens"] for line in lines[1:] if line["usage"] is not None]
    assert charged == [REAL_TOKENS - delivered]
    creator = (await key_usage(urls[0], BUDGET_VK, REAL_TOKENS))["totals"]
    assert creator["tokens"] == REAL_TOKENS
    assert creator["spent_usd"] == pytest.approx(REAL_TOKENS * USD_PER_TOKEN)
    assert (await key_usage(urls[1], SHARED_VK))["totals"]["tokens"] == 0


async def test_a_full_redis_still_charges_a_background_response_to_its_creator(
    gateway_with_keys: Callable[..., Awaitable[TestClient]],
    redis_url: str,
    raw_redis: redis.Redis,
    records: Records,
) -> None:
    # A Redis at its maxmemory with noeviction (shared with other data, and full) refused the
    # plain SET that marks a background response owed, while the quota's scripts ran whole:
    # the response's charge was lost, and the gateway said "the tracker is lost ... requests
    # go through uncounted" (/health degraded), then "answers again" at the next request.
    gateway = await gateway_with_keys(background_keys(), prices=PRICES, REDIS_URL=redis_url)
    raw_redis.config_set("maxmemory-policy", "noeviction")
    raw_redis.config_set("maxmemory", 1)
    try:
        made = await create(gateway)
        health = await (await gateway.get("/health")).json()
        assert health["tracker"]["healthy"] is True, health["tracker"]
        polled = await client(gateway).responses.retrieve(made)
        assert polled.status == "completed"
        usage = await usage_of(gateway, records, 2)
    finally:
        raw_redis.config_set("maxmemory", 0)
    metrics = await (await gateway.get("/metrics")).text()
    assert usage["totals"]["tokens"] == REAL_TOKENS
    assert 'llm_gateway_redis_errors_total{decision="uncharged"} 0.0' in metrics
