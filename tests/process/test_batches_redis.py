"""Batches on Redis: two gateways (in one process, then as two processes) share one
redis-server, and a batch is charged once, never twice and never not at all, whichever of
them sees it ended first, however many retrievals race."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path

import openai
import pytest
import redis
from aiohttp.test_utils import TestClient, TestServer

from tests.app.test_batches import (
    ANTHROPIC_VK,
    COMPLETION,
    OPENAI_MODEL,
    OPENAI_VK,
    OTHER_VK,
    TOKENS,
    Records,
    anthropic_batch,
    anthropic_client,
    batch_keys,
    batch_price,
    openai_batch,
    openai_client,
    output_reads,
)
from tests.conftest import OPENAI_REAL as PROCESS_REAL
from tests.conftest import OPENAI_VK as PROCESS_VK
from tests.conftest import keys_document
from tests.support.fake_provider import FakeState
from tests.support.observed import key_usage, log_lines
from tests.support.processes import Processes, start_gateway


async def test_two_gateways_on_one_redis_charge_a_batch_once_however_many_look(
    gateway_with_keys: Callable[..., Awaitable[TestClient]],
    redis_url: str,
    raw_redis: redis.Redis,
    records: Records,
    fake: FakeState,
    fake_provider: TestServer,
) -> None:
    first, second = [await gateway_with_keys(batch_keys(), REDIS_URL=redis_url) for _ in range(2)]
    openai_id = await openai_batch(first)
    anthropic_id = await anthropic_batch(second)
    owed = raw_redis.keys("llm-gateway:deferred:*batch:*")
    assert len(owed) == 2 and all(0 < raw_redis.ttl(name) <= 7 * 24 * 3600 for name in owed)
    looks = [  # by its maker and by another key of the same account, on both gateways
        openai_client(gateway, key).batches.retrieve(openai_id)
        for gateway in (first, second)
        for key in (OPENAI_VK, OTHER_VK) * 2
    ] + [
        anthropic_client(gateway).messages.batches.retrieve(anthropic_id)
        for gateway in (first, second) * 4
    ]
    await asyncio.gather(*looks)
    lines = await records(3 + 16)
    assert sum(line["usage"] is not None for line in lines) == 2
    usage = await key_usage(second, OPENAI_VK, TOKENS)
    assert usage["totals"]["tokens"] == TOKENS
    assert usage["budget"]["spent_usd"] == pytest.approx(
        batch_price("openai", OPENAI_MODEL), abs=1e-6
    )
    assert (await key_usage(first, OTHER_VK, 0))["totals"]["tokens"] == 0
    assert (await key_usage(first, ANTHROPIC_VK, TOKENS))["totals"]["tokens"] == TOKENS
    assert len(output_reads(fake)) == 2  # each output read once, by the look that claimed it
    assert raw_redis.keys("llm-gateway:deferred:*batch:*") == []


async def test_two_gateway_processes_on_one_redis_charge_a_batch_once_to_its_maker(
    processes: Processes, fake_url: str, redis_url: str, tmp_path: Path
) -> None:
    """Made through one process by one key; looked at through both by another key of the
    same account, all at once: the maker is charged once, the looker nothing."""
    document = keys_document(fake_url)
    document["virtual_keys"][OTHER_VK] = {"provider": "openai", "api_key": PROCESS_REAL}
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps(document))
    logs = [tmp_path / f"log{index}.jsonl" for index in range(2)]
    urls = [start_gateway(processes, keys, log, REDIS_URL=redis_url)[1] for log in logs]
    maker, *lookers = [
        openai.AsyncOpenAI(
            api_key=key,
            base_url=f"{url}/v1",
            max_retries=0,
            default_headers={"x-fake-chunks": str(COMPLETION)},
        )
        for key, url in ((PROCESS_VK, urls[0]), (OTHER_VK, urls[0]), (OTHER_VK, urls[1]))
    ]
    lines = b"".join(
        json.dumps(
            {
                "custom_id": f"request-{index}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {
                    "model": OPENAI_MODEL,
                    "messages": [{"role": "user", "content": "one two three"}],
                },
            }
        ).encode()
        + b"\n"
        for index in range(10)
    )
    uploaded = await maker.files.create(file=("input.jsonl", lines), purpose="batch")
    made = await maker.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    looks = [lookers[index % 2].batches.retrieve(made.id) for index in range(8)]
    assert {seen.status for seen in await asyncio.gather(*looks)} == {"completed"}

    charged = [line for line in await log_lines(logs, 10) if line["usage"] is not None]
    assert len(charged) == 1 and charged[0]["method"] == "GET"
    assert charged[0]["usage"]["total_tokens"] == TOKENS
    assert charged[0]["cost_usd"] == pytest.approx(batch_price("openai", OPENAI_MODEL))
    assert (await key_usage(urls[1], PROCESS_VK, TOKENS))["totals"]["tokens"] == TOKENS
    assert (await key_usage(urls[0], OTHER_VK, 0))["totals"]["tokens"] == 0


async def test_a_full_redis_still_charges_a_batch_to_its_maker(
    gateway_with_keys: Callable[..., Awaitable[TestClient]],
    redis_url: str,
    raw_redis: redis.Redis,
    records: Records,
) -> None:
    # A Redis at its maxmemory with noeviction refused the SET that marks a batch owed and
    # the MULTI that claims it (EXECABORT), while the quota's scripts ran whole: the batch
    # went uncharged, and the gateway said the tracker was lost, then back.
    gateway = await gateway_with_keys(batch_keys(), REDIS_URL=redis_url)
    raw_redis.config_set("maxmemory-policy", "noeviction")
    raw_redis.config_set("maxmemory", 1)
    try:
        batch_id = await openai_batch(gateway)
        await openai_client(gateway, OPENAI_VK).batches.retrieve(batch_id)
        await records(3)
        usage = await key_usage(gateway, OPENAI_VK, TOKENS)
    finally:
        raw_redis.config_set("maxmemory", 0)
    assert usage["totals"]["tokens"] == TOKENS
    metrics = await (await gateway.get("/metrics")).text()
    assert 'llm_gateway_redis_errors_total{decision="uncharged"} 0.0' in metrics
