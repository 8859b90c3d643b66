"""Quotas as clients see them: exact admission, 429 and its waits, x-ratelimit headers, /usage."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import openai
import pytest
from aiohttp.test_utils import TestClient

from proxy.quota.ratelimit import duration, instant
from tests.conftest import (
    ANTHROPIC_VK,
    LIMITED_VK,
    OPENAI_VK,
    assert_anthropic_error,
    assert_openai_error,
    auth,
)
from tests.support.bodies import MESSAGES, chat
from tests.support.polling import until

CHAT = chat("hello")
QUOTA_VK = "vk_test_quota_0a1b2c3d4e"


@pytest.fixture
def quota_gateway(
    gateway_with_keys: Callable[..., Awaitable[TestClient]],
) -> Callable[..., Awaitable[TestClient]]:
    """A gateway with one extra key under the given quota."""

    async def make(quota: dict[str, Any], provider: str = "openai", **env: str) -> TestClient:
        entry = {
            "provider": provider,
            "api_key": "sk-quota-real-1234567",
            "name": "quota",
            "quota": quota,
        }
        return await gateway_with_keys({QUOTA_VK: entry}, **env)

    return make


async def test_two_hundred_concurrent_requests_against_fifty_admit_exactly_fifty(
    quota_gateway: Any, fake: Any
) -> None:
    gateway = await quota_gateway({"requests": 50})

    async def one() -> int:
        response = await gateway.post("/v1/chat/completions", json=CHAT, headers=auth(QUOTA_VK))
        await response.read()
        return response.status

    statuses = await asyncio.gather(*(one() for _ in range(200)))
    assert statuses.count(200) == 50 and statuses.count(429) == 150
    assert len(fake.requests) == 50
    usage = await (await gateway.get("/usage", headers=auth(QUOTA_VK))).json()
    assert usage["requests"]["used"] == 50 and usage["requests"]["remaining"] == 0


async def test_a_refused_request_is_not_counted(quota_gateway: Any) -> None:
    gateway = await quota_gateway({"requests": 2, "window_seconds": 1})
    for _ in range(2):
        assert (
            await gateway.post("/v1/chat/completions", json=CHAT, headers=auth(QUOTA_VK))
        ).status == 200
    for _ in range(5):
        assert (
            await gateway.post("/v1/chat/completions", json=CHAT, headers=auth(QUOTA_VK))
        ).status == 429

    async def admitted() -> bool:
        response = await gateway.post("/v1/chat/completions", json=CHAT, headers=auth(QUOTA_VK))
        return response.status == 200

    # Once the two admissions leave the 1 s window; had the refusals counted, it would stay full.
    await until(admitted, within=15.0, what="an admission after the window")


async def test_a_429_carries_retry_after_retry_after_ms_and_the_rate_limit_headers(
    quota_gateway: Any,
) -> None:
    gateway = await quota_gateway({"requests": 1, "window_seconds": 30})
    await gateway.post("/v1/chat/completions", json=CHAT, headers=auth(QUOTA_VK))
    refused = await gateway.post("/v1/chat/completions", json=CHAT, headers=auth(QUOTA_VK))
    assert refused.status == 429
    assert_openai_error(await refused.json(), "rate_limit_exceeded")
    assert 29 <= int(refused.headers["retry-after"]) <= 30
    assert 28_000 < int(refused.headers["retry-after-ms"]) <= 30_000
    assert "x-should-retry" not in refused.headers  # 30 s: the SDKs will wait it out
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert refused.headers["x-request-id"]


async def test_a_wait_longer_than_the_sdks_sleep_says_do_not_retry_in_anthropic_dialect(
    quota_gateway: Any,
) -> None:
    gateway = await quota_gateway({"requests": 1, "window_seconds": 3600}, provider="anthropic")
    await gateway.post("/v1/messages", json=MESSAGES, headers={"x-api-key": QUOTA_VK})
    refused = await gateway.post("/v1/messages", json=MESSAGES, headers={"x-api-key": QUOTA_VK})
    assert refused.status == 429
    assert_anthropic_error(await refused.json(), "rate_limit_error")
    assert refused.headers["x-should-retry"] == "false"
    assert int(refused.headers["retry-after"]) > 3500


async def test_anthropic_answers_carry_the_keys_limits_in_anthropics_headers_not_the_accounts(
    quota_gateway: Any, make_gateway: Any
) -> None:
    gateway = await quota_gateway(
        {"requests": 3, "tokens": 100_000, "window_seconds": 60}, provider="anthropic"
    )
    before = time.time()
    answer = await gateway.post("/v1/messages", json=MESSAGES, headers={"x-api-key": QUOTA_VK})
    assert answer.status == 200
    headers = answer.headers
    assert headers["anthropic-ratelimit-requests-limit"] == "3"
    assert headers["anthropic-ratelimit-requests-remaining"] == "2"
    reset = datetime.strptime(headers["anthropic-ratelimit-requests-reset"], "%Y-%m-%dT%H:%M:%SZ")
    assert before + 59 <= reset.replace(tzinfo=UTC).timestamp() <= time.time() + 61
    assert headers["anthropic-ratelimit-tokens-limit"] == "100000"
    assert int(headers["anthropic-ratelimit-tokens-remaining"]) < 100_000  # its reservation
    datetime.strptime(headers["anthropic-ratelimit-tokens-reset"], "%Y-%m-%dT%H:%M:%SZ")
    # The account's own buckets, which tell nothing of this key, are gone.
    assert not [name for name in headers if "input-tokens" in name or "output-tokens" in name]
    assert headers["x-ratelimit-remaining-requests"] == "2"
    # With no gateway quota, Anthropic's own view passes through.
    plain = await make_gateway(QUOTA_ENABLED="false")
    answer = await plain.post("/v1/messages", json=MESSAGES, headers={"x-api-key": ANTHROPIC_VK})
    assert answer.headers["anthropic-ratelimit-requests-remaining"] == "3999"


async def test_the_openai_sdks_own_retry_succeeds_once_the_window_moves(quota_gateway: Any) -> None:
    gateway = await quota_gateway({"requests": 1, "window_seconds": 1.5})
    client = openai.AsyncOpenAI(
        base_url=str(gateway.make_url("/v1")), api_key=QUOTA_VK, max_retries=2
    )
    await client.chat.completions.create(**CHAT)  # type: ignore[call-overload]
    started = time.monotonic()
    second = await client.chat.completions.create(**CHAT)  # type: ignore[call-overload]
    assert second.choices[0].message.content
    assert time.monotonic() - started >= 1.0  # it waited for the window, as Retry-After said


async def test_the_openai_sdk_raises_rate_limit_error_when_told_not_to_retry(
    gateway: TestClient,
) -> None:
    sent: list[Any] = []  # each HTTP request the SDK sent

    async def count(request: Any) -> None:
        sent.append(request)

    client = openai.AsyncOpenAI(
        base_url=str(gateway.make_url("/v1")),
        api_key=LIMITED_VK,
        max_retries=3,
        http_client=openai.DefaultAsyncHttpxClient(event_hooks={"request": [count]}),
    )
    for _ in range(3):
        await client.chat.completions.create(**CHAT)  # type: ignore[call-overload]
    with pytest.raises(openai.RateLimitError) as refused:
        await client.chat.completions.create(**CHAT)  # type: ignore[call-overload]
    assert refused.value.response.headers["x-should-retry"] == "false"
    assert len(sent) == 4  # told not to, the SDK did not retry into a closed window


async def test_tokens_are_charged_when_the_response_ends_and_a_token_limit_refuses(
    quota_gateway: Any, records: Any
) -> None:
    gateway = await quota_gateway({"requests": 100, "tokens": 10})
    first = await gateway.post(
        "/v1/chat/completions", json=CHAT, headers={**auth(QUOTA_VK), "x-fake-chunks": "8"}
    )
    assert first.status == 200
    assert first.headers["x-ratelimit-limit-tokens"] == "10"
    # Nothing charged before it ran, but its prompt ("hello": 2 tokens) and, naming no
    # max_tokens, the output allowance (4096) are reserved: nothing left while it runs.
    assert first.headers["x-ratelimit-remaining-tokens"] == "0"
    await first.read()
    (line,) = await records(1)
    assert (
        line["usage"].items()
        >= {
            "prompt_tokens": 1,
            "completion_tokens": 8,
            "total_tokens": 9,
            "estimated": False,
        }.items()
    )
    # 9 of 10 used: still under, so admitted, and it overshoots by its own tokens.
    second = await gateway.post(
        "/v1/chat/completions", json=CHAT, headers={**auth(QUOTA_VK), "x-fake-chunks": "8"}
    )
    assert second.status == 200 and second.headers["x-ratelimit-remaining-tokens"] == "0"
    await second.read()
    third = await gateway.post("/v1/chat/completions", json=CHAT, headers=auth(QUOTA_VK))
    assert third.status == 429
    assert "tokens" in (await third.json())["error"]["message"]


async def test_the_first_answer_says_its_reserved_tokens_come_back_after_a_window(
    quota_gateway: Any,
) -> None:
    """withResponse() in the JS SDKs (or .with_raw_response) shows the first request's
    headers: fewer tokens remaining (its reservation) cannot come back "0s" from now, as if
    the window were whole again; they come back when its charge leaves, a window later, as
    the requests trio says of the request itself."""
    gateway = await quota_gateway({"requests": 100, "tokens": 100_000, "window_seconds": 60})
    first = await gateway.post("/v1/chat/completions", json=CHAT, headers=auth(QUOTA_VK))
    assert first.status == 200
    await first.read()
    assert int(first.headers["x-ratelimit-remaining-tokens"]) < 100_000  # it holds some
    assert first.headers["x-ratelimit-reset-requests"] == "1m0s"
    assert first.headers["x-ratelimit-reset-tokens"] == "1m0s"


async def test_anthropic_stream_usage_is_charged_from_the_last_cumulative_delta(
    quota_gateway: Any, records: Any
) -> None:
    gateway = await quota_gateway({"requests": 100, "tokens": 1000}, provider="anthropic")
    response = await gateway.post(
        "/v1/messages",
        json={**MESSAGES, "stream": True},
        headers={"x-api-key": QUOTA_VK, "x-fake-chunks": "5"},
    )
    await response.read()
    (line,) = await records(1)
    assert line["usage"]["completion_tokens"] == 5 and line["usage"]["estimated"] is False
    usage = await (await gateway.get("/usage", headers={"x-api-key": QUOTA_VK})).json()
    assert usage["tokens"]["used"] == line["usage"]["total_tokens"]


async def test_a_stream_without_provider_usage_is_charged_an_estimate(
    gateway: TestClient, records: Any
) -> None:
    response = await gateway.post(
        "/v1/chat/completions",
        json={**CHAT, "stream": True},
        headers={**auth(OPENAI_VK), "x-fake-chunks": "10"},
    )
    await response.read()
    (line,) = await records(1)
    assert line["usage"]["estimated"] is True and line["usage"]["completion_tokens"] > 0


async def test_usage_shows_only_the_presenting_keys_own_counts(gateway: TestClient) -> None:
    for _ in range(2):
        await gateway.post("/v1/chat/completions", json=CHAT, headers=auth(LIMITED_VK))
    await gateway.post("/v1/chat/completions", json=CHAT, headers=auth(OPENAI_VK))
    mine = await (await gateway.get("/usage", headers=auth(LIMITED_VK))).json()
    assert mine["key"] == "limited"
    assert mine["requests"] == {
        "used": 2,
        "limit": 3,
        "remaining": 1,
        "reset_seconds": mine["requests"]["reset_seconds"],
    }
    assert 3500 < mine["requests"]["reset_seconds"] <= 3600
    assert mine["totals"]["requests"] == 2
    other = await (await gateway.get("/usage", headers=auth(OPENAI_VK))).json()
    assert other["requests"]["used"] == 1 and other["requests"]["limit"] == 100
    refused = await gateway.get("/usage")
    assert refused.status == 401


async def test_quotas_off_admit_everything_and_send_no_rate_limit_headers(
    make_gateway: Any,
) -> None:
    gateway = await make_gateway(QUOTA_ENABLED="false")
    for _ in range(5):
        response = await gateway.post("/v1/chat/completions", json=CHAT, headers=auth(LIMITED_VK))
        assert response.status == 200
    # With no gateway quota, the provider's own view passes through.
    assert response.headers["x-ratelimit-remaining-requests"] == "4999"


def test_waits_are_written_in_the_providers_style() -> None:
    assert duration(0) == "0s"
    assert duration(2.5) == "2.5s"
    assert duration(90) == "1m30s"
    assert duration(3600) == "1h0m0s"
    # A wait a hair under a whole minute is rounded up to it, never written '59m60s'.
    assert duration(3599.9996) == "1h0m0s"
    assert duration(119.9999) == "2m0s"
    assert duration(59.9999) == "1m0s"
    assert duration(59.9994) == "1m0s"
    # Anthropic's resets are times, to the second: never one before the window has room.
    assert instant(1_767_225_600.001) == "2026-01-01T00:00:01Z"
    assert instant(1_767_225_600) == "2026-01-01T00:00:00Z"


async def test_429_is_counted_in_metrics_and_logged(gateway: TestClient, records: Any) -> None:
    for _ in range(4):
        await gateway.post("/v1/chat/completions", json=CHAT, headers=auth(LIMITED_VK))
    lines = await records(4)
    assert [line["status"] for line in lines] == [200, 200, 200, 429]
    summary = await (await gateway.get("/metrics", headers={"Accept": "application/json"})).json()
    assert summary["rate_limited"] == 1 and summary["total_requests"] == 4
    # A media type is case-blind: a client that capitalises it gets the JSON summary too.
    shouted = await gateway.get("/metrics", headers={"Accept": "Application/JSON"})
    assert (await shouted.json())["total_requests"] == 4
    text = await (await gateway.get("/metrics")).text()
    assert 'llm_gateway_quota_rejections_total{key="limited"} 1.0' in text


async def test_anthropic_key_usage_endpoint_answers_in_its_own_shape(gateway: TestClient) -> None:
    response = await gateway.get("/usage", headers={"x-api-key": ANTHROPIC_VK})
    body = await response.json()
    assert body["key"] == "team-anthropic" and body["provider"] == "anthropic"
    assert ANTHROPIC_VK not in await response.text()
