"""A request that names no output cap reserves the key's output allowance, priced where it
will be served: concurrency overshoots a token window or a budget by at most one request's
reservation, a key whose window is smaller than the allowance still gets its requests
through one at a time, and a route or a fallback to an expensive model reserves at its
price. The Redis, two-process variant is in tests/process/test_allowance_redis.py.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from proxy.usage import estimate
from proxy.usage.prompt import prompt_chars
from tests.conftest import assert_openai_error, auth, keys_document
from tests.support.bodies import chat, messages
from tests.support.fake_provider import FakeState, Fault
from tests.support.polling import until

VK = "vk_test_allowance_4d5e6f7a8b"
UNCAPPED = chat("hello")  # no max_tokens: "hello" is 2 tokens by the estimate
HELD = {"x-fake-hold": "1"}  # answered once the test sets fake.release
ANSWER = {"x-fake-chunks": "20"}  # the fake answers 1 + 20 = 21 tokens
REAL_TOKENS = 1 + 20
ALLOWANCE = 20  # OUTPUT_ALLOWANCE_TOKENS in the bound tests: one reservation is 2 + 20
RESERVED_TOKENS = 2 + ALLOWANCE
USD_PER_TOKEN = 0.0001
PRICES = {"openai": {"*": {"input_mtok": 100, "output_mtok": 100}}}


@pytest.fixture
def allowance_gateway(
    gateway_with_keys: Callable[..., Awaitable[TestClient]],
) -> Callable[..., Awaitable[TestClient]]:
    """A gateway with one extra key (its fields as given), prices from `prices`."""

    async def make(entry: dict[str, Any], prices: Any = PRICES, **env: str) -> TestClient:
        key = {"provider": "openai", "api_key": "sk-allowance-real-123456", "name": "allowance"}
        return await gateway_with_keys({VK: {**key, **entry}}, prices=prices, **env)

    return make


async def held_burst(
    gateway: TestClient, fake: FakeState, count: int, keys: tuple[str, ...] = (VK,)
) -> list[int]:
    """`count` uncapped requests at once (of `keys` in turn), their answers held until every
    one was either refused or reached the fake (so all are admitted against reservations
    alone, none settled); their statuses."""
    refused = 0

    async def one(key: str) -> int:
        nonlocal refused
        headers = {**auth(key), **ANSWER, **HELD}
        async with gateway.post("/v1/chat/completions", json=UNCAPPED, headers=headers) as response:
            refused += response.status == 429
            await response.read()
            return response.status

    tasks = [asyncio.create_task(one(keys[n % len(keys)])) for n in range(count)]
    await until(lambda: refused + len(fake.requests) == count, 10, "every request decided")
    fake.release.set()
    return await asyncio.gather(*tasks)


async def usage_of(gateway: TestClient) -> dict[str, Any]:
    async with gateway.get("/usage", headers=auth(VK)) as response:
        document: dict[str, Any] = await response.json()
        return document


async def settled(gateway: TestClient, admitted: int, tokens: int | None = None) -> dict[str, Any]:
    """/usage once the `admitted` requests were charged (`tokens`: REAL_TOKENS each)."""
    expected = admitted * REAL_TOKENS if tokens is None else tokens

    async def done() -> bool:
        totals = (await usage_of(gateway))["totals"]
        return bool(totals["requests"] == admitted and totals["tokens"] == expected)

    await until(done, 10, "every request charged")
    return await usage_of(gateway)


async def test_300_concurrent_uncapped_requests_against_100_tokens_overshoot_by_at_most_one_allowance(
    allowance_gateway: Any, fake: FakeState
) -> None:
    gateway = await allowance_gateway(
        {"quota": {"requests": 1000, "tokens": 100}},
        OUTPUT_ALLOWANCE_TOKENS=str(ALLOWANCE),
    )
    statuses = await held_burst(gateway, fake, 300)
    admitted = statuses.count(200)
    assert admitted + statuses.count(429) == 300
    usage = await settled(gateway, admitted)
    charged = usage["tokens"]["used"]
    assert charged == admitted * REAL_TOKENS
    # Admitted while the window plus every reservation was under 100: each reserved 22.
    assert 100 - RESERVED_TOKENS < charged <= 100 + RESERVED_TOKENS, (admitted, charged)
    assert usage["tokens"]["reserved"] == 0


async def test_200_concurrent_uncapped_requests_against_a_one_cent_budget_spend_at_most_one_allowance_more(
    allowance_gateway: Any, fake: FakeState
) -> None:
    gateway = await allowance_gateway(
        {"budget": {"usd": 0.01, "window_seconds": 3600}}, OUTPUT_ALLOWANCE_TOKENS=str(ALLOWANCE)
    )
    statuses = await held_burst(gateway, fake, 200)
    admitted = statuses.count(200)
    usage = await settled(gateway, admitted)
    spent = usage["budget"]["spent_usd"]
    worst_case = RESERVED_TOKENS * USD_PER_TOKEN
    assert spent == pytest.approx(admitted * REAL_TOKENS * USD_PER_TOKEN)
    assert 0.01 - worst_case < spent <= 0.01 + worst_case, (admitted, spent)
    assert usage["budget"]["reserved_usd"] == 0


MEMBERS = tuple(f"vk_test_member_{n}_4d5e6f7a8b" for n in range(4))


@pytest.mark.parametrize("scope", ["team", "model group"])
async def test_uncapped_requests_of_a_teams_keys_or_a_model_group_hold_its_window_to_one_allowance(
    make_gateway: Callable[..., Awaitable[TestClient]],
    tmp_path: Path,
    fake_base: str,
    fake: FakeState,
    scope: str,
) -> None:
    window = {"requests": 1000, "tokens": 100}
    document = keys_document(fake_base)
    document["teams"] = {"research": {"quota": window}}
    for n, secret in enumerate(MEMBERS):
        member = {"provider": "openai", "api_key": f"sk-member-real-{n}-1234", "name": f"m{n}"}
        if scope == "team":
            member["team"] = "research"
        else:
            member["model_quotas"] = [{"models": ["gpt-4o*"], "tokens": 100}]
        document["virtual_keys"][secret] = member
    path = tmp_path / "scoped-keys.json"
    path.write_text(json.dumps(document))
    gateway = await make_gateway(KEYS_FILE_PATH=str(path), OUTPUT_ALLOWANCE_TOKENS=str(ALLOWANCE))
    # The team's keys share its window; each key's model group is its own.
    keys = MEMBERS if scope == "team" else MEMBERS[:1]
    statuses = await held_burst(gateway, fake, 200, keys)
    charged = statuses.count(200) * REAL_TOKENS  # every admitted one answered whole
    assert 100 - RESERVED_TOKENS < charged <= 100 + RESERVED_TOKENS, (scope, charged)


async def test_a_key_whose_window_is_smaller_than_its_allowance_sends_uncapped_requests_one_at_a_time(
    allowance_gateway: Any, fake: FakeState
) -> None:
    gateway = await allowance_gateway({"quota": {"requests": 100, "tokens": 30}})  # allowance 4096
    headers = {**auth(VK), **ANSWER, **HELD}
    first = asyncio.create_task(
        gateway.post("/v1/chat/completions", json=UNCAPPED, headers=headers)
    )
    await until(lambda: len(fake.requests) == 1, what="the first request upstream")
    # Its window had room: admitted, and while it runs its allowance holds the window.
    usage = await usage_of(gateway)
    assert usage["tokens"]["reserved"] == 2 + 4096 and usage["tokens"]["remaining"] == 0
    async with gateway.post("/v1/chat/completions", json=UNCAPPED, headers=auth(VK)) as second:
        assert second.status == 429
        assert "tokens" in (await second.json())["error"]["message"]
    fake.release.set()
    async with await first as answered:
        assert answered.status == 200
        await answered.read()
    await settled(gateway, 1)
    # Settled to what it really used (21 of 30): room again, so the next one goes through.
    usage = await usage_of(gateway)
    assert usage["tokens"]["used"] == REAL_TOKENS and usage["tokens"]["reserved"] == 0
    async with gateway.post("/v1/chat/completions", json=UNCAPPED, headers=auth(VK)) as third:
        assert third.status == 200
    assert len(fake.requests) == 2


async def test_an_uncapped_request_reserves_its_allowance_and_a_capped_one_only_its_cap(
    allowance_gateway: Any, fake: FakeState
) -> None:
    gateway = await allowance_gateway(
        {"quota": {"requests": 100, "tokens": 100_000}, "output_allowance": 1000}
    )
    headers = {**auth(VK), **ANSWER, **HELD}
    post = gateway.post
    capped = asyncio.create_task(
        post("/v1/chat/completions", json=chat("hello", max_tokens=50), headers=headers)
    )
    await until(lambda: len(fake.requests) == 1)
    assert (await usage_of(gateway))["tokens"]["reserved"] == 2 + 50
    uncapped = asyncio.create_task(post("/v1/chat/completions", json=UNCAPPED, headers=headers))
    await until(lambda: len(fake.requests) == 2)
    assert (await usage_of(gateway))["tokens"]["reserved"] == 2 + 50 + 2 + 1000
    fake.release.set()
    for task in (capped, uncapped):
        async with await task as response:
            assert response.status == 200
    usage = await settled(gateway, 2)
    assert usage["tokens"]["used"] == 2 * REAL_TOKENS and usage["tokens"]["reserved"] == 0


@pytest.mark.parametrize(
    ("path", "body", "output"),
    [
        ("/v1/chat/completions", chat("hello", n=3, max_tokens=50), 3 * 50),
        ("/v1/chat/completions", chat("hello", n=3, max_completion_tokens=50), 3 * 50),
        ("/v1/chat/completions", chat("hello", n=3), 3 * 1000),
        ("/v1/chat/completions", chat("hello", n=3, stream=True), 3 * 1000),
        (
            "/v1/completions",
            {"model": "gpt-3.5-turbo-instruct", "prompt": "hello", "n": 2, "max_tokens": 50},
            2 * 50,
        ),
        (
            "/v1/completions",
            {"model": "gpt-3.5-turbo-instruct", "prompt": "hello", "n": 2, "best_of": 4},
            4 * 1000,
        ),
        (  # Gemini's n: candidateCount, each candidate up to maxOutputTokens
            "/v1/models/gemini-2.5-flash:generateContent",
            {
                "contents": [{"role": "user", "parts": [{"text": "hello"}]}],
                "generationConfig": {"maxOutputTokens": 50, "candidateCount": 3},
            },
            3 * 50,
        ),
        (
            "/v1/models/gemini-2.5-flash:generateContent",
            {
                "contents": [{"role": "user", "parts": [{"text": "hello"}]}],
                "generation_config": {"candidate_count": 2},
            },
            2 * 1000,
        ),
        (  # a completion for each prompt of a list, n of each
            "/v1/completions",
            {"model": "davinci-002", "prompt": ["hi", "yo", "ok"], "n": 2, "max_tokens": 50},
            3 * 2 * 50,
        ),
        (  # one prompt of tokens, two prompts of tokens
            "/v1/completions",
            {"model": "davinci-002", "prompt": [1, 2, 3], "max_tokens": 50},
            50,
        ),
        (
            "/v1/completions",
            {"model": "davinci-002", "prompt": [[1, 2], [3, 4]], "max_tokens": 50},
            2 * 50,
        ),
    ],
)
async def test_a_request_for_several_answers_reserves_the_output_of_each(
    allowance_gateway: Any, fake: FakeState, path: str, body: dict[str, Any], output: int
) -> None:
    """`n` choices (a text completion's `best_of`, of each of its prompts) are each up to the
    cap, all billed."""
    gateway = await allowance_gateway(
        {"quota": {"requests": 100, "tokens": 100_000}, "output_allowance": 1000}
    )
    task = asyncio.create_task(gateway.post(path, json=body, headers={**auth(VK), **HELD}))
    await until(lambda: len(fake.requests) == 1)
    prompt = estimate.tokens(prompt_chars(path, body))
    assert (await usage_of(gateway))["tokens"]["reserved"] == prompt + output
    fake.release.set()
    async with await task as response:
        assert response.status == 200
        await response.read()


@pytest.mark.parametrize(
    ("fields", "output"),
    [
        # SGLang, vLLM and most compatible servers cap at max_completion_tokens when both are
        # named; OpenAI at one or the other: the larger reserved
        ({"max_tokens": 10, "max_completion_tokens": 5000}, 5000),
        ({"max_completion_tokens": 10, "max_tokens": 5000}, 5000),
        ({"max_tokens": 10, "max_output_tokens": 5000}, 5000),
        # pydantic's lax integers (vLLM, SGLang): 5000.0, 5e3 and "5000" are 5000
        ({"max_tokens": 5000.0}, 5000),
        ({"max_completion_tokens": " 5000 "}, 5000),
        ({"max_tokens": 500, "n": 3.0}, 3 * 500),
        ({"max_tokens": 500, "n": "2"}, 2 * 500),
        # Go's encoding/json (Ollama, LocalAI) matches names whatever their case
        ({"max_tokens": 10, "MAX_TOKENS": 5000}, 5000),
        ({"max_tokens": 500, "N": 3}, 3 * 500),
        # what no server reads as a cap: the allowance
        ({"max_tokens": 5000.5}, 1000),
        ({"max_tokens": "lots"}, 1000),
        ({"max_tokens": True}, 1000),
    ],
)
async def test_a_cap_the_provider_reads_is_reserved_however_the_body_spells_it(
    allowance_gateway: Any, fake: FakeState, fields: dict[str, Any], output: int
) -> None:
    """A small cap beside a large one under another name, or a large cap spelt as a float or
    a string, reserved the small one or the allowance while the provider generated the large."""
    gateway = await allowance_gateway(
        {"quota": {"requests": 100, "tokens": 100_000}, "output_allowance": 1000}
    )
    body = chat("hello", **fields)
    path = "/v1/chat/completions"
    task = asyncio.create_task(gateway.post(path, json=body, headers={**auth(VK), **HELD}))
    await until(lambda: len(fake.requests) == 1)
    prompt = estimate.tokens(prompt_chars(path, body))
    assert (await usage_of(gateway))["tokens"]["reserved"] == prompt + output
    fake.release.set()
    async with await task as response:
        assert response.status == 200
        await response.read()


# Capped, so that what differs is only the price: 2 + 100 tokens reserved.
CAPPED = chat("hello", max_tokens=100)
# The cheap model and the expensive one, per token: 1,000 times apart.
CHEAP, EXPENSIVE = 0.0001, 0.1
TIERED = {
    "openai": {
        "expensive-model": {"input_mtok": 100_000, "output_mtok": 100_000},
        "*": {"input_mtok": 100, "output_mtok": 100},
    }
}


async def test_a_route_to_an_expensive_model_reserves_at_its_price(
    allowance_gateway: Any, fake: FakeState
) -> None:
    route = {"provider": "openai", "api_key": "sk-route-real-1234567", "model": "expensive-model"}
    gateway = await allowance_gateway(
        {
            "budget": {"usd": 10_000, "window_seconds": 3600},
            "routes": [{"models": ["big-*"], **route}],
        },
        prices=TIERED,
    )
    body = {**CAPPED, "model": "big-1"}
    task = asyncio.create_task(
        gateway.post("/v1/chat/completions", json=body, headers={**auth(VK), **ANSWER, **HELD})
    )
    await until(lambda: len(fake.requests) == 1)
    reserved = (await usage_of(gateway))["budget"]["reserved_usd"]
    assert reserved == pytest.approx((2 + 100) * EXPENSIVE)  # not at the key's own, cheap
    fake.release.set()
    async with await task as response:
        assert response.status == 200
    usage = await settled(gateway, 1)
    assert usage["budget"]["spent_usd"] == pytest.approx(REAL_TOKENS * EXPENSIVE)
    assert usage["budget"]["reserved_usd"] == 0


async def test_while_the_primary_breaker_is_open_a_request_reserves_at_the_fallbacks_price(
    allowance_gateway: Any, fake: FakeState
) -> None:
    fallback = {
        "provider": "openai",
        "api_key": "sk-fallback-real-7654321",
        "model": "expensive-model",
    }
    gateway = await allowance_gateway(
        {
            "model": "cheap-model",
            "budget": {"usd": 10_000, "window_seconds": 3600},
            "fallbacks": [fallback],
        },
        prices=TIERED,
        BREAKER_FAILURES="1",
    )
    fake.faults["sk-allowance-real-123456"] = Fault(503)
    async with gateway.post("/v1/chat/completions", json=UNCAPPED, headers=auth(VK)) as opened:
        assert opened.status == 200  # the primary failed (its breaker opens), the fallback answered
    await settled(gateway, 1, tokens=1 + 3)
    task = asyncio.create_task(
        gateway.post("/v1/chat/completions", json=CAPPED, headers={**auth(VK), **ANSWER, **HELD})
    )
    await until(lambda: len(fake.requests) == 3)  # the fallback alone: the breaker is open
    reserved = (await usage_of(gateway))["budget"]["reserved_usd"]
    assert reserved == pytest.approx((2 + 100) * EXPENSIVE)
    fake.release.set()
    async with await task as response:
        assert response.status == 200


@pytest.mark.parametrize(
    ("path", "body"),
    [
        (
            "/v1/models/gemini-2.5-flash:generateContent",
            {
                "contents": [{"parts": [{"text": "hello"}]}],
                "generationConfig": {"maxOutputTokens": 50},
            },
        ),
        (
            "/v1/model/amazon.nova-lite-v1:0/converse",
            {
                "messages": [{"role": "user", "content": [{"text": "hello"}]}],
                "inferenceConfig": {"maxTokens": 50},
            },
        ),
    ],
)
async def test_a_cap_named_the_native_apis_way_is_reserved_in_place_of_the_allowance(
    allowance_gateway: Any, fake: FakeState, path: str, body: dict[str, Any]
) -> None:
    gateway = await allowance_gateway(
        {"quota": {"requests": 100, "tokens": 100_000}, "output_allowance": 1000}
    )
    task = asyncio.create_task(gateway.post(path, json=body, headers={**auth(VK), **HELD}))
    await until(lambda: len(fake.requests) == 1)
    prompt = estimate.tokens(prompt_chars(path, body))
    assert (await usage_of(gateway))["tokens"]["reserved"] == prompt + 50
    fake.release.set()
    async with await task as response:
        await response.read()


async def test_a_server_side_fallbacks_own_cap_is_reserved_when_it_is_the_largest(
    allowance_gateway: Any, fake: FakeState
) -> None:
    # Anthropic's `fallbacks` entries (server-side-fallback-2026-06-01) each take a
    # `max_tokens` "in place of the request's" for the attempt on their model: Claude Fable 5
    # capped at 50 may decline to Opus 4.8 writing up to 4000. Before: 50 reserved.
    gateway = await allowance_gateway(
        {"quota": {"requests": 100, "tokens": 100_000}, "output_allowance": 1000}
    )
    fallbacks = [{"model": "claude-sonnet-5"}, {"model": "claude-opus-4-8", "max_tokens": 4000}]
    body = messages("hello", "claude-fable-5", 50, fallbacks=fallbacks)
    path = "/v1/messages"
    task = asyncio.create_task(gateway.post(path, json=body, headers={**auth(VK), **HELD}))
    await until(lambda: len(fake.requests) == 1)
    prompt = estimate.tokens(prompt_chars(path, body))
    assert (await usage_of(gateway))["tokens"]["reserved"] == prompt + 4000
    fake.release.set()
    async with await task as response:
        assert response.status == 200
        await response.read()


@pytest.mark.parametrize(
    "limit",
    [
        {"quota": {"requests": 100, "tokens": 100, "window_seconds": 7200}},
        {"budget": {"usd": 0.01, "window_seconds": 7200}},
    ],
)
async def test_a_window_full_only_while_requests_run_says_retry_soon_not_when_charges_leave(
    allowance_gateway: Any, fake: FakeState, limit: dict[str, Any]
) -> None:
    # 80 tokens charged, then a request reserving 32 runs: the window is full, but only until
    # it settles. Its refusal must not say "two hours" (the charges' age) with
    # x-should-retry: false: the SDK retries a 1-second wait by itself.
    gateway = await allowance_gateway(limit)
    first = await gateway.post(
        "/v1/chat/completions", json=UNCAPPED, headers={**auth(VK), "x-fake-chunks": "79"}
    )
    assert first.status == 200
    await first.read()
    await settled(gateway, 1, 80)
    capped = {**UNCAPPED, "max_tokens": 30}
    running = asyncio.create_task(
        gateway.post("/v1/chat/completions", json=capped, headers={**auth(VK), **HELD})
    )
    await until(lambda: len(fake.requests) == 2, what="the second request upstream")
    async with gateway.post("/v1/chat/completions", json=capped, headers=auth(VK)) as refused:
        assert refused.status == 429
        message = (await refused.json())["error"]["message"]
        assert refused.headers["retry-after"] == "1", message
        assert "x-should-retry" not in refused.headers, message
        assert "in flight" in message, message
    fake.release.set()
    async with await running as answered:
        assert answered.status == 200


# A turn as Codex CLI sends it (wire_api "responses"): streamed, not stored, its reasoning
# asked back encrypted, no output cap (so it reserves the key's allowance).
CODEX_TURN = {
    "model": "gpt-4o-mini",
    "instructions": "You are a coding agent running in the Codex CLI.",
    "input": [
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]}
    ],
    "tools": [],
    "tool_choice": "auto",
    "parallel_tool_calls": True,
    "reasoning": {"summary": "auto"},
    "store": False,
    "stream": True,
    "include": ["reasoning.encrypted_content"],
    "prompt_cache_key": "0199a0b1-6c2e-7d10-9a3f-5b2c1d0e9f8a",
}


async def test_a_budget_held_only_by_requests_in_flight_is_a_rate_limit_not_insufficient_quota(
    allowance_gateway: Any, fake: FakeState
) -> None:
    # Codex CLI ends the turn at once on `insufficient_quota` ("Quota exceeded. Check your
    # plan and billing details."), as OpenAI means it: billing exhausted, never retry. A
    # budget full only while another session's turn holds its reservation has room in a
    # moment: its 429 must be one the agent retries (a rate limit, Retry-After: 1).
    gateway = await allowance_gateway(
        {"budget": {"usd": 0.003, "window_seconds": 3600}}, OUTPUT_ALLOWANCE_TOKENS=str(ALLOWANCE)
    )
    headers = {**auth(VK), "Accept": "text/event-stream"}
    running = asyncio.create_task(
        gateway.post("/v1/responses", json=CODEX_TURN, headers={**headers, **HELD})
    )
    await until(lambda: len(fake.requests) == 1, what="the first turn upstream")
    async with gateway.post("/v1/responses", json=CODEX_TURN, headers=headers) as refused:
        assert refused.status == 429
        body = await refused.json()
        assert refused.headers["retry-after"] == "1", body
        assert "x-should-retry" not in refused.headers, body
        assert_openai_error(body, "rate_limit_exceeded")
        assert body["error"]["type"] == "rate_limit_error"
        assert "in flight" in body["error"]["message"]
    fake.release.set()
    async with await running as answered:
        assert answered.status == 200
        await answered.read()


async def test_a_full_request_window_beside_a_budget_held_in_flight_is_named_not_the_budget(
    allowance_gateway: Any, fake: FakeState
) -> None:
    # One request a minute, and a budget the running turn's reservation fills: the next turn
    # waits a minute for the request window, not for the budget (which has room once the
    # running turn settles). Its 429 must say so: the request quota, a rate limit; not
    # "Budget exhausted", insufficient_quota, on which Codex ends its turn for good.
    gateway = await allowance_gateway(
        {
            "quota": {"requests": 1, "window_seconds": 60},
            "budget": {"usd": 0.003, "window_seconds": 3600},
        },
        OUTPUT_ALLOWANCE_TOKENS=str(ALLOWANCE),
    )
    headers = {**auth(VK), "Accept": "text/event-stream"}
    running = asyncio.create_task(
        gateway.post("/v1/responses", json=CODEX_TURN, headers={**headers, **HELD})
    )
    await until(lambda: len(fake.requests) == 1, what="the first turn upstream")
    async with gateway.post("/v1/responses", json=CODEX_TURN, headers=headers) as refused:
        assert refused.status == 429
        body = await refused.json()
        assert_openai_error(body, "rate_limit_exceeded")
        assert body["error"]["message"].startswith(
            "Quota exceeded for this key: 1 request per 60 seconds."
        ), body
        assert 59 <= int(refused.headers["retry-after"]) <= 60
    fake.release.set()
    async with await running as answered:
        assert answered.status == 200
        await answered.read()


@pytest.mark.parametrize("cap", [1.7e308, 1e300, 18446744073709551615])
async def test_a_cap_past_any_count_is_admitted_and_priced_without_a_failure(
    allowance_gateway: Any, fake: FakeState, cap: float
) -> None:
    """A cap read as a float (1.7e308 is a whole number to pydantic) times 128 answers was
    past what a float holds: pricing the reservation failed with a 500."""
    gateway = await allowance_gateway(
        {"quota": {"requests": 100, "tokens": 100_000}, "budget": {"usd": 10, "window_seconds": 60}}
    )
    body = chat("hello", n=128, max_tokens=cap)
    async with gateway.post("/v1/chat/completions", json=body, headers=auth(VK)) as response:
        assert response.status == 200, await response.text()


async def test_usage_says_tokens_and_spend_held_only_by_reservations_come_back_a_window_later(
    allowance_gateway: Any, fake: FakeState
) -> None:
    """GET /usage while the window's first request runs: its reservation holds tokens and
    spend, which come back when its charge leaves, a window from now (as the x-ratelimit
    headers say), not "0 seconds" from now as if the window were whole again."""
    gateway = await allowance_gateway(
        {
            "quota": {"requests": 100, "tokens": 100_000, "window_seconds": 60},
            "budget": {"usd": 10, "window_seconds": 3600},
        }
    )
    held = asyncio.create_task(
        gateway.post("/v1/chat/completions", json=UNCAPPED, headers={**auth(VK), **HELD})
    )
    await until(lambda: len(fake.requests) == 1)
    usage = await usage_of(gateway)
    assert usage["tokens"]["used"] == 0 and usage["tokens"]["reserved"] > 0
    assert usage["tokens"]["reset_seconds"] == 60
    assert usage["budget"]["spent_usd"] == 0 and usage["budget"]["reserved_usd"] > 0
    assert usage["budget"]["reset_seconds"] == 3600
    fake.release.set()
    async with await held as response:
        assert response.status == 200
