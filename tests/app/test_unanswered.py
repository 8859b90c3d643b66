"""Work the provider may still be doing is charged, and never started twice (issue 22, point 2).

A generation POST written to the provider runs there (and is billed) whether or not its
answer comes back: once sent, it is never sent again, to the same target or a fallback,
and a request that ends without its answer (a gateway timeout, a cut, a client that left)
is charged its prompt plus what was delivered, or its reservation (the prompt's estimate
plus its output cap) when nothing of its output is known. What surely did not start (a
refused connection) is still failed over, and idempotent requests keep their retries.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import openai
import pytest
from aiohttp.test_utils import TestClient

from proxy.app import build_app
from proxy.record import Usage
from proxy.settings import Settings
from proxy.usage import estimate
from proxy.usage.pricing import Prices
from proxy.usage.prompt import prompt_chars
from tests.conftest import auth
from tests.support.bodies import chat, messages
from tests.support.fake_provider import FakeState, Fault, credential
from tests.support.polling import until

VK = "vk_test_unanswered_6b8d0f2a4c"
ANT_VK = "vk_test_unanswered_ant_1e3a5c7e9b"
PRIMARY = "sk-unanswered-primary-1111111111"
POOL = ("sk-unanswered-pool-aaaaaaaaaa", "sk-unanswered-pool-bbbbbbbbbb", "sk-unanswered-pool-cccc")
ANT_REAL = "sk-ant-unanswered-2222222222"
CAP = 1000
BODY = chat("Write a long essay about the sea, please.", max_tokens=CAP)
PROMPT = estimate.tokens(prompt_chars("chat/completions", BODY))  # what admission estimated
METERED = {
    "quota": {"requests": 100, "tokens": 1_000_000, "window_seconds": 3600},
    "budget": {"usd": 10, "window_seconds": 3600},
}
Records = Callable[..., Awaitable[list[dict[str, Any]]]]


def document(primary: str, fallback: str) -> dict[str, Any]:
    """A metered key whose primary has a fallback pool of three real keys; an Anthropic key."""
    return {
        "providers": {
            "openai": {"base_url": f"{primary}/v1"},
            "backup": {"base_url": f"{fallback}/v1"},
            "anthropic": {"base_url": f"{primary}/v1"},
        },
        "virtual_keys": {
            VK: {
                "name": "slow",
                "provider": "openai",
                "api_key": PRIMARY,
                "fallbacks": [{"provider": "backup", "api_keys": [{"api_key": k} for k in POOL]}],
                **METERED,
            },
            ANT_VK: {"name": "slow-ant", "provider": "anthropic", "api_key": ANT_REAL, **METERED},
        },
    }


@pytest.fixture
def gateway_at(
    aiohttp_client: Callable[..., Awaitable[TestClient]],
    tmp_path: Path,
    fake_base: str,
    log_path: Path,
) -> Callable[..., Awaitable[TestClient]]:
    """A gateway with these settings; its primary at `primary` (default: the fake)."""

    async def make(primary: str | None = None, **env: str) -> TestClient:
        path = tmp_path / "keys.json"
        path.write_text(json.dumps(document(primary or fake_base, fake_base)))
        base = {"KEYS_FILE_PATH": str(path), "LOG_TO_FILE": "true", "LOG_FILE_PATH": str(log_path)}
        return await aiohttp_client(
            build_app(Settings.from_env(base | env)), server_kwargs={"handler_cancellation": True}
        )

    return make


def sdk(gateway: TestClient) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(api_key=VK, base_url=str(gateway.make_url("/v1")), max_retries=0)


async def charged_tokens(gateway: TestClient, key: str = VK) -> int:
    report = await (await gateway.get("/usage", headers=auth(key))).json()
    return int(report["totals"]["tokens"])


def assert_reservation(line: dict[str, Any], prompt: int = PROMPT, cap: int = CAP) -> None:
    """The log line charges the reservation: the prompt's estimate and the whole cap, priced."""
    assert line["usage"]["estimated"] is True
    assert (line["usage"]["prompt_tokens"], line["usage"]["completion_tokens"]) == (prompt, cap)
    assert line["cost_usd"] > 0


async def test_a_generation_that_times_out_is_sent_once_and_charged_its_reservation(
    gateway_at: Callable[..., Awaitable[TestClient]], fake: FakeState, records: Records
) -> None:
    # The scenario, faster: retries and a fallback pool of three keys. On main the
    # provider was sent six requests (three per target) and the key was charged nothing.
    gateway = await gateway_at(
        REQUEST_TIMEOUT="0.3", RETRY_ATTEMPTS="2", RETRY_MAX_WAIT_SECONDS="0"
    )
    with pytest.raises(openai.InternalServerError) as raised:
        await sdk(gateway).chat.completions.create(**BODY, extra_headers={"x-fake-hang": "headers"})
    assert raised.value.status_code == 504
    assert [credential(seen.headers) for seen in fake.requests] == [PRIMARY]
    (line,) = await records(1)
    assert line["status"] == 504 and len(line["attempts"]) == 1
    assert_reservation(line)
    assert await charged_tokens(gateway) == PROMPT + CAP


async def test_a_fallback_that_times_out_after_a_503_ends_in_the_gateways_504_and_is_charged(
    gateway_at: Callable[..., Awaitable[TestClient]], fake: FakeState, records: Records
) -> None:
    """Before, the client got the primary's 503 back (kept from the first attempt), as if
    nothing ran, inviting its SDK to retry, and the key was charged nothing for the
    fallback's generation, which was sent and may run on."""
    # 1 s: the primary's 503, an ordinary answer, must come within it on a loaded machine.
    gateway = await gateway_at(REQUEST_TIMEOUT="1", RETRY_MAX_WAIT_SECONDS="0")
    fake.faults[PRIMARY] = Fault(503)
    with pytest.raises(openai.InternalServerError) as raised:
        await sdk(gateway).chat.completions.create(**BODY, extra_headers={"x-fake-hang": "headers"})
    assert raised.value.status_code == 504
    seen = [credential(seen.headers) for seen in fake.requests]
    assert seen[0] == PRIMARY and len(seen) == 2 and seen[1] in POOL  # the fallback once
    (line,) = await records(1)
    assert line["status"] == 504 and [a["status"] for a in line["attempts"]] == [503, None]
    usage = line["usage"]  # the reservation ("backup", a declared provider, has no price)
    assert (usage["prompt_tokens"], usage["completion_tokens"], usage["estimated"]) == (
        PROMPT,
        CAP,
        True,
    )
    assert await charged_tokens(gateway) == PROMPT + CAP


async def test_a_connection_closed_after_the_request_went_is_not_sent_again(
    gateway_at: Callable[..., Awaitable[TestClient]], fake: FakeState, records: Records
) -> None:
    gateway = await gateway_at(RETRY_ATTEMPTS="2", RETRY_MAX_WAIT_SECONDS="0")
    with pytest.raises(openai.InternalServerError) as raised:
        await sdk(gateway).chat.completions.create(**BODY, extra_headers={"x-fake-drop": "headers"})
    assert raised.value.status_code == 502
    assert len(fake.requests) == 1
    (line,) = await records(1)
    assert_reservation(line)
    assert await charged_tokens(gateway) == PROMPT + CAP


async def test_a_refused_connection_surely_did_not_start_and_is_failed_over(
    gateway_at: Callable[..., Awaitable[TestClient]], fake: FakeState, records: Records
) -> None:
    # Nothing listens on port 9 of loopback: the primary refuses, the fallback answers.
    gateway = await gateway_at(primary="http://127.0.0.1:9")
    answer = await sdk(gateway).chat.completions.create(**BODY)
    assert answer.choices[0].message.content == "tok0 tok1 tok2 "
    assert credential(fake.requests[0].headers) in POOL
    (line,) = await records(1)
    assert [a["status"] for a in line["attempts"]] == [None, 200]
    assert line["usage"]["estimated"] is False  # what the fallback reported, no more
    assert await charged_tokens(gateway) == line["usage"]["total_tokens"]


async def test_a_get_that_times_out_keeps_its_retries_and_costs_nothing(
    gateway_at: Callable[..., Awaitable[TestClient]], fake: FakeState, records: Records
) -> None:
    gateway = await gateway_at(
        REQUEST_TIMEOUT="0.2", RETRY_ATTEMPTS="1", RETRY_MAX_WAIT_SECONDS="0"
    )
    response = await gateway.get("/v1/models", headers={**auth(VK), "x-fake-hang": "headers"})
    assert response.status == 504
    seen = [credential(seen.headers) for seen in fake.requests]
    # The primary twice; the fallback's pool: each key once, then its one retry.
    assert seen[:2] == [PRIMARY, PRIMARY] and len(seen) == 6
    assert sorted(seen[2:5]) == sorted(POOL) and seen[5] in POOL
    (line,) = await records(1)
    assert line["usage"] is None
    assert await charged_tokens(gateway) == 0


async def test_a_client_that_leaves_before_the_answer_is_charged_its_reservation(
    gateway_at: Callable[..., Awaitable[TestClient]], fake: FakeState, records: Records
) -> None:
    gateway = await gateway_at()
    leaving = asyncio.create_task(
        gateway.post(
            "/v1/chat/completions", json=BODY, headers={**auth(VK), "x-fake-hang": "headers"}
        )
    )
    await until(lambda: fake.requests, what="the request reaching the provider")
    leaving.cancel()  # the client gives up on the answer and closes its connection
    with contextlib.suppress(asyncio.CancelledError):
        await leaving
    (line,) = await records(1)
    assert line["status"] == 499
    assert_reservation(line)
    # Which target (and pool key) it was sent to and charged at: the line had neither.
    assert line["target"] == "openai"
    (attempt,) = line["attempts"]
    assert (attempt["target"], attempt["key"], attempt["status"]) == ("openai", "openai#1", None)
    assert attempt["error"] == "client closed the connection" and attempt["ms"] >= 0
    assert await charged_tokens(gateway) == PROMPT + CAP
    await until(lambda: fake.disconnects, what="the gateway leaving the provider")
    assert len(fake.requests) == 1


async def test_an_answer_whose_body_stalls_after_its_headers_is_charged_its_reservation(
    gateway_at: Callable[..., Awaitable[TestClient]], records: Records
) -> None:
    gateway = await gateway_at(STREAM_IDLE_TIMEOUT="0.2")
    with pytest.raises(openai.InternalServerError) as raised:
        await sdk(gateway).chat.completions.create(
            **BODY, extra_headers={"x-fake-hang": "midstream"}
        )
    assert raised.value.status_code == 504
    (line,) = await records(1)
    assert_reservation(line)


async def test_a_stream_cut_after_some_tokens_is_charged_what_it_delivered(
    gateway_at: Callable[..., Awaitable[TestClient]], records: Records
) -> None:
    gateway = await gateway_at()
    response = await gateway.post(
        "/v1/chat/completions",
        json={**BODY, "stream": True},
        headers={**auth(VK), "x-fake-drop": "midstream", "x-fake-chunks": "40"},
    )
    with contextlib.suppress(aiohttp.ClientPayloadError):  # cut for the client too
        await response.read()
    (line,) = await records(1)
    usage = line["usage"]
    assert usage["estimated"] is True and usage["prompt_tokens"] > 0
    assert 0 < usage["completion_tokens"] < CAP  # what was delivered, not the reservation
    assert await charged_tokens(gateway) == usage["total_tokens"]


async def test_an_anthropic_message_that_times_out_is_charged_its_reservation(
    gateway_at: Callable[..., Awaitable[TestClient]], fake: FakeState, records: Records
) -> None:
    gateway = await gateway_at(REQUEST_TIMEOUT="0.2")
    body = messages("Write a long essay about the sea, please.", max_tokens=CAP)
    client = anthropic.AsyncAnthropic(
        api_key=ANT_VK, base_url=str(gateway.make_url("")), max_retries=0
    )
    with pytest.raises(anthropic.InternalServerError) as raised:
        await client.messages.create(**body, extra_headers={"x-fake-hang": "headers"})
    assert raised.value.status_code == 504
    assert len(fake.requests) == 1
    (line,) = await records(1)
    assert_reservation(line, prompt=estimate.tokens(prompt_chars("messages", body)))
    assert await charged_tokens(gateway, ANT_VK) == line["usage"]["total_tokens"]


@pytest.mark.parametrize("ending", ["the provider fell silent", "the client left"])
async def test_an_anthropic_stream_cut_before_its_first_token_is_charged_its_reservation(
    gateway_at: Callable[..., Awaitable[TestClient]], records: Records, ending: str
) -> None:
    """Anthropic starts a stream (message_start, content_block_start, ping) before the
    model has written anything, and message_start's running count already says 1 output
    token. Before: a stream cut there (the provider silent past STREAM_IDLE_TIMEOUT, the
    client gone, the shutdown's cut) took that 1 for output known and was charged 1
    completion token, where an OpenAI stream cut after its role chunk is charged its
    reservation, as quotas-and-money.md says of work whose output is unknown."""
    gateway = await gateway_at(STREAM_IDLE_TIMEOUT="0.2")
    body = messages("Write a long essay about the sea, please.", max_tokens=CAP, stream=True)
    silent = ending == "the provider fell silent"
    # No text deltas: message_start, content_block_start and ping, then the provider holds
    # (silent), or waits far longer than the client stays (left).
    fault = {"x-fake-hang": "midstream"} if silent else {"x-fake-delay-ms": "60000"}
    response = await gateway.post(
        "/v1/messages", json=body, headers={**auth(ANT_VK), "x-fake-chunks": "0", **fault}
    )
    assert response.status == 200
    received = b""
    with contextlib.suppress(aiohttp.ClientPayloadError):  # the provider's silence cuts it
        while b"message_start" not in received:
            chunk = await response.content.readany()
            if not chunk:
                break
            received += chunk
        if silent:
            await response.read()
    response.close()
    assert b"text_delta" not in received
    (line,) = await records(1)
    assert line["status"] == (200 if silent else 499)
    usage = line["usage"]
    assert (usage["completion_tokens"], usage["estimated"]) == (CAP, True)
    assert usage["prompt_tokens"] >= estimate.tokens(prompt_chars("messages", body))
    assert line["cost_usd"] > 0
    assert await charged_tokens(gateway, ANT_VK) == usage["total_tokens"]


async def test_a_stream_cut_before_its_first_token_keeps_its_cached_prompt_priced_as_cached(
    gateway_at: Callable[..., Awaitable[TestClient]], records: Records
) -> None:
    """message_start counts the prompt exactly, its cache reads and writes apart. Before: the
    reservation of a stream cut there kept the prompt's total and dropped its parts, so
    100,000 tokens read from the cache were priced as fresh input, ten times their rate."""
    gateway = await gateway_at()
    body = messages("Write a long essay about the sea, please.", max_tokens=CAP, stream=True)
    cached = {"x-fake-cached-tokens": "100000", "x-fake-cache-write-tokens": "20000"}
    headers = {**auth(ANT_VK), "x-fake-chunks": "0", "x-fake-delay-ms": "60000", **cached}
    response = await gateway.post("/v1/messages", json=body, headers=headers)
    received = b""
    while b"message_start" not in received:  # the client leaves once the stream started
        received += await response.content.readany()
    response.close()
    (line,) = await records(1)
    assert line["status"] == 499
    usage = line["usage"]
    assert (usage["cache_read_tokens"], usage["cache_write_tokens"]) == (100_000, 20_000)
    assert usage["prompt_tokens"] > 120_000 and usage["completion_tokens"] == CAP
    spent = Usage(
        usage["prompt_tokens"],
        CAP,
        estimated=True,
        cache_read_tokens=100_000,
        cache_write_tokens=20_000,
    )
    expected = Prices.load(None).cost("anthropic", body["model"], spent)
    assert line["cost_usd"] == pytest.approx(expected)
