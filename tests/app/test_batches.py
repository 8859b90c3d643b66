"""Batches are charged to the key that made them, once, at batch prices, when seen ended.

A batch (OpenAI /v1/batches, Anthropic message batches) answers its POST with no usage,
and every retrieval of it carried none either: a key made thousands of requests through a
batch and was charged nothing by tokens or dollars. Through a real gateway in front of the
fake provider, with the official SDKs; two gateways on one Redis are in
tests/process/test_batches_redis.py.
"""

from __future__ import annotations

import io
from collections.abc import Awaitable, Callable
from typing import Any

import anthropic
import genai_prices
import genai_prices.types
import openai
import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer

from tests.conftest import auth
from tests.support.fake_batches import FAKE_BATCHES
from tests.support.fake_provider import FakeState

OPENAI_VK = "vk_test_batches_openai_5e7a9c1b3d"
OPENAI_REAL = "sk-batches-real-openai-8642097531"
OTHER_VK = "vk_test_batches_other_2c4e6a8b0d"
ANTHROPIC_VK = "vk_test_batches_anthropic_9b7d5f3a1c"
ANTHROPIC_REAL = "sk-ant-batches-real-1357913579"
REQUESTS = 10  # a batch of ten requests
PROMPT = "one two three"  # 3 prompt tokens each, at the fake
COMPLETION = 1000  # completion tokens each (x-fake-chunks)
TOKENS = REQUESTS * (3 + COMPLETION)
OPENAI_MODEL, ANTHROPIC_MODEL = "gpt-4o-mini", "claude-haiku-4-5"

Records = Callable[..., Awaitable[list[dict[str, Any]]]]
MakeGateway = Callable[..., Awaitable[TestClient]]


def batch_price(provider: str, model: str) -> float:
    """What the batch costs at the price data's batch price of `model` (half the usual)."""
    usage = genai_prices.types.Usage(input_tokens=REQUESTS * 3, output_tokens=TOKENS - REQUESTS * 3)
    batch = {"processing": "batch"}
    price = genai_prices.calc_price(usage, model, provider_id=provider, price_context=batch)
    usual = genai_prices.calc_price(usage, model, provider_id=provider)
    assert price.total_price * 2 == usual.total_price
    return float(price.total_price)


def budgeted(provider: str, real: str, name: str) -> dict[str, Any]:
    return {
        "provider": provider,
        "api_key": real,
        "name": name,
        "quota": {"requests": 1000, "tokens": 1_000_000, "window_seconds": 3600},
        "budget": {"usd": 100, "window_seconds": 3600},
    }


def batch_keys() -> dict[str, dict[str, Any]]:
    """Keys with a token limit and a budget: one per dialect, and another OpenAI key that
    shares the first one's real key (another user of the same account)."""
    return {
        OPENAI_VK: budgeted("openai", OPENAI_REAL, "batches-openai"),
        OTHER_VK: budgeted("openai", OPENAI_REAL, "batches-other"),
        ANTHROPIC_VK: budgeted("anthropic", ANTHROPIC_REAL, "batches-anthropic"),
    }


@pytest.fixture
async def gateway(gateway_with_keys: MakeGateway) -> TestClient:
    return await gateway_with_keys(batch_keys())


def openai_client(gateway: TestClient, key: str = OPENAI_VK, **headers: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        api_key=key,
        base_url=str(gateway.make_url("/v1")),
        max_retries=0,
        default_headers={"x-fake-chunks": str(COMPLETION), **headers},
    )


def anthropic_client(gateway: TestClient, **headers: str) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(
        api_key=ANTHROPIC_VK,
        base_url=str(gateway.make_url("")),
        max_retries=0,
        default_headers={"x-fake-chunks": str(COMPLETION), **headers},
    )


async def openai_batch(gateway: TestClient, **headers: str) -> str:
    """A batch of REQUESTS chat completions made through the gateway; its id."""
    sdk = openai_client(gateway, **headers)
    lines = b"".join(
        orjson.dumps(
            {
                "custom_id": f"request-{index}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {"model": OPENAI_MODEL, "messages": [{"role": "user", "content": PROMPT}]},
            }
        )
        + b"\n"
        for index in range(REQUESTS)
    )
    uploaded = await sdk.files.create(file=("input.jsonl", io.BytesIO(lines)), purpose="batch")
    made = await sdk.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    assert made.status == "validating"
    return made.id


async def anthropic_batch(gateway: TestClient, **headers: str) -> str:
    made = await anthropic_client(gateway, **headers).messages.batches.create(
        requests=[
            {
                "custom_id": f"request-{index}",
                "params": {
                    "model": ANTHROPIC_MODEL,
                    "max_tokens": 2000,
                    "messages": [{"role": "user", "content": PROMPT}],
                },
            }
            for index in range(REQUESTS)
        ]
    )
    assert made.processing_status == "in_progress"
    return made.id


async def usage_of(gateway: TestClient, records: Records, lines: int, key: str) -> dict[str, Any]:
    """GET /usage of `key` once `lines` requests are settled (each writes its log line then)."""
    assert len(await records(lines)) == lines
    return await (await gateway.get("/usage", headers=auth(key))).json()


def output_reads(fake: FakeState) -> list[str]:
    """The paths of every read of a batch's output the fake answered."""
    return [
        seen.path
        for seen in fake.requests
        if seen.method == "GET" and seen.path.endswith(("/content", "/results"))
    ]


async def test_an_openai_batch_is_charged_once_to_its_key_at_batch_prices_when_seen_ended(
    gateway: TestClient, records: Records, fake: FakeState, fake_provider: TestServer
) -> None:
    batch_id = await openai_batch(gateway, **{"x-fake-polls": "1"})
    sdk = openai_client(gateway)
    statuses = [(await sdk.batches.retrieve(batch_id)).status for _ in range(3)]
    assert statuses == ["in_progress", "completed", "completed"]
    usage = await usage_of(gateway, records, 5, OPENAI_VK)
    assert fake_provider.app[FAKE_BATCHES].batches[batch_id].tokens == TOKENS
    assert usage["totals"]["tokens"] == TOKENS
    cost = batch_price("openai", OPENAI_MODEL)
    assert usage["budget"]["spent_usd"] == pytest.approx(cost, abs=1e-6)
    upload, made, running, ended, again = await records(5)
    assert [line["usage"] for line in (upload, made, running, again)] == [None] * 4
    assert ended["usage"]["prompt_tokens"] == REQUESTS * 3
    assert ended["usage"]["completion_tokens"] == REQUESTS * COMPLETION
    assert ended["model"] == OPENAI_MODEL and ended["cost_usd"] == pytest.approx(cost)
    # The gateway read the output file once, with the real key, never the virtual one.
    (read,) = output_reads(fake)
    (seen,) = [s for s in fake.requests if s.path == read]
    assert seen.headers["authorization"] == f"Bearer {OPENAI_REAL}"


async def test_an_openai_batch_that_reports_its_own_usage_is_charged_that_without_a_read(
    gateway: TestClient, records: Records, fake: FakeState
) -> None:
    batch_id = await openai_batch(gateway, **{"x-fake-batch-usage": "1"})
    assert (await openai_client(gateway).batches.retrieve(batch_id)).usage is not None
    usage = await usage_of(gateway, records, 3, OPENAI_VK)
    assert usage["totals"]["tokens"] == TOKENS
    assert usage["budget"]["spent_usd"] == pytest.approx(
        batch_price("openai", OPENAI_MODEL), abs=1e-6
    )
    assert output_reads(fake) == []


async def test_an_anthropic_message_batch_is_charged_once_at_batch_prices_when_it_ended(
    gateway: TestClient, records: Records, fake: FakeState
) -> None:
    batch_id = await anthropic_batch(gateway, **{"x-fake-polls": "1"})
    sdk = anthropic_client(gateway)
    statuses = [(await sdk.messages.batches.retrieve(batch_id)).processing_status for _ in range(3)]
    assert statuses == ["in_progress", "ended", "ended"]
    usage = await usage_of(gateway, records, 4, ANTHROPIC_VK)
    assert usage["totals"]["tokens"] == TOKENS
    cost = batch_price("anthropic", ANTHROPIC_MODEL)
    assert usage["budget"]["spent_usd"] == pytest.approx(cost, abs=1e-6)
    made, running, ended, again = await records(4)
    assert [line["usage"] for line in (made, running, again)] == [None] * 3
    assert ended["usage"]["total_tokens"] == TOKENS and ended["cost_usd"] == pytest.approx(cost)
    (read,) = output_reads(fake)
    (seen,) = [s for s in fake.requests if s.path == read]
    assert seen.headers["x-api-key"] == ANTHROPIC_REAL


async def test_requests_of_a_batch_that_failed_are_not_charged(
    gateway: TestClient, records: Records
) -> None:
    batch_id = await anthropic_batch(gateway, **{"x-fake-batch-errors": "4"})
    await anthropic_client(gateway).messages.batches.retrieve(batch_id)
    usage = await usage_of(gateway, records, 2, ANTHROPIC_VK)
    assert usage["totals"]["tokens"] == TOKENS * (REQUESTS - 4) // REQUESTS


async def test_a_cancelled_openai_batch_is_charged_by_its_cancel_and_not_again(
    gateway: TestClient, records: Records
) -> None:
    batch_id = await openai_batch(gateway)
    sdk = openai_client(gateway)
    assert (await sdk.batches.cancel(batch_id)).status == "cancelled"
    assert (await sdk.batches.retrieve(batch_id)).status == "cancelled"
    usage = await usage_of(gateway, records, 4, OPENAI_VK)
    assert usage["totals"]["tokens"] == TOKENS
    assert [line["usage"] is None for line in await records(4)] == [True, True, False, True]


async def test_a_batch_whose_output_could_not_be_read_stays_owed_and_the_next_look_charges_it(
    gateway: TestClient, records: Records, fake: FakeState
) -> None:
    batch_id = await anthropic_batch(gateway, **{"x-fake-output-fails": "1"})
    sdk = anthropic_client(gateway)
    await sdk.messages.batches.retrieve(batch_id)  # its output answers 500: nothing yet
    assert (await usage_of(gateway, records, 2, ANTHROPIC_VK))["totals"]["tokens"] == 0
    await sdk.messages.batches.retrieve(batch_id)
    await sdk.messages.batches.retrieve(batch_id)
    assert (await usage_of(gateway, records, 4, ANTHROPIC_VK))["totals"]["tokens"] == TOKENS
    assert len(output_reads(fake)) == 2
    assert [line["usage"] is None for line in await records(4)] == [True, True, False, True]


async def test_a_batch_seen_ended_by_another_key_is_charged_to_the_key_that_made_it(
    gateway: TestClient, records: Records
) -> None:
    batch_id = await openai_batch(gateway)
    seen = await openai_client(gateway, OTHER_VK).batches.retrieve(batch_id)
    assert seen.status == "completed"
    assert (await usage_of(gateway, records, 3, OTHER_VK))["totals"]["tokens"] == 0
    usage = await usage_of(gateway, records, 3, OPENAI_VK)
    assert usage["totals"]["tokens"] == TOKENS
    await openai_client(gateway).batches.retrieve(batch_id)  # its maker's own look: nothing more
    assert (await usage_of(gateway, records, 4, OPENAI_VK))["totals"]["tokens"] == TOKENS


@pytest.mark.parametrize("encoding", [None, "gzip"])
async def test_the_anthropic_sdks_batch_results_are_read_through_the_gateway(
    gateway: TestClient, records: Records, fake: FakeState, encoding: str | None
) -> None:
    # Anthropic's results_url is absolute, at the provider, and the SDK's results() dials it
    # as it is: the virtual key went to the provider's host, past the gateway.
    batch_id = await anthropic_batch(gateway)
    headers = {} if encoding is None else {"x-fake-encoding": encoding}
    sdk = anthropic_client(gateway, **headers)
    results = [line async for line in await sdk.messages.batches.results(batch_id)]
    assert sorted(line.custom_id for line in results) == [f"request-{i}" for i in range(REQUESTS)]
    assert all(line.result.type == "succeeded" for line in results)
    for seen in fake.requests:
        assert not any(ANTHROPIC_VK in value for value in seen.headers.values()), seen.headers
    made, retrieved, read = await records(3)
    assert read["path"] == f"/v1/messages/batches/{batch_id}/results"
    assert read["status"] == 200 and read["key"] == "batches-anthropic"
    assert read["usage"] is None  # the batch was charged when its retrieval saw it ended
    # The rewritten link is relative: the SDK joins it to its own base URL.
    batch = await sdk.messages.batches.retrieve(batch_id)
    assert batch.results_url == f"/v1/messages/batches/{batch_id}/results"
