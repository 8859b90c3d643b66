"""Failover through a running gateway: retries, fallbacks, pools, breakers, routes.

The fake provider fails per real key (`FakeState.faults`), so one fake serves the primary
and the fallback and the test can tell which answered. Every test checks what the client
saw and what the fake saw; the log line's `attempts` and the metrics are checked where they
are the point.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import io
import json
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import openai
import pytest
from aiohttp.test_utils import TestClient
from multidict import CIMultiDict
from multipart import MultipartParser, parse_options_header  # type: ignore[import-untyped]

from proxy.app import FAILOVER, build_app
from proxy.keys.fields import KeysFileError
from proxy.record import Usage
from proxy.settings import Settings
from proxy.usage.pricing import Prices
from tests.conftest import assert_openai_error, auth
from tests.support.bodies import chat, messages
from tests.support.clock import Clock, LoopClock
from tests.support.fake_provider import FakeState, Fault, credential
from tests.support.polling import until

CHAT = chat("hello")
MESSAGES = messages(model="claude-haiku-4-5")
VK = "vk_test_failover_3c5e7a9b1d"
PRIMARY = "sk-primary-real-1111111111"
BACKUP = "sk-backup-real-2222222222"
POOL = ("sk-pool-real-aaaaaaaaaa", "sk-pool-real-bbbbbbbbbb", "sk-pool-real-cccccccccc")
ANT_PRIMARY = "sk-ant-primary-3333333333"
ANT_BACKUP = "sk-ant-backup-4444444444"


def document(base: str, **key: Any) -> dict[str, Any]:
    """keys.json: openai, a second OpenAI-speaking provider 'backup', anthropic, an
    Anthropic-speaking 'ant-backup' and gemini's OpenAI endpoint, all on the fake."""
    return {
        "providers": {
            "openai": {"base_url": f"{base}/v1"},
            "backup": {"base_url": f"{base}/v1"},
            "anthropic": {"base_url": f"{base}/v1"},
            "ant-backup": {"base_url": f"{base}/v1", "auth": "x-api-key", "api": "anthropic"},
            "gemini": {"base_url": f"{base}/v1beta/openai"},
        },
        "virtual_keys": {VK: {"name": "failover", **key}},
    }


WITH_FALLBACK = {
    "provider": "openai",
    "api_key": PRIMARY,
    "fallbacks": [{"provider": "backup", "api_key": BACKUP}],
}


@pytest.fixture
def failover_gateway(
    aiohttp_client: Callable[..., Awaitable[TestClient]],
    tmp_path: Path,
    fake_base: str,
    log_path: Path,
) -> Callable[..., Awaitable[TestClient]]:
    """A gateway whose one key has the given targets, with these setting overrides."""

    async def make(key: dict[str, Any], base: str | None = None, **env: str) -> TestClient:
        path = tmp_path / "keys.json"
        path.write_text(json.dumps(document(base or fake_base, **key)))
        settings = Settings.from_env(
            {"KEYS_FILE_PATH": str(path), "LOG_TO_FILE": "true", "LOG_FILE_PATH": str(log_path)}
            | env
        )
        return await aiohttp_client(
            build_app(settings), server_kwargs={"handler_cancellation": True}
        )

    return make


def keys_seen(fake: FakeState) -> list[str | None]:
    return [credential(seen.headers) for seen in fake.requests]


def waits_on_a_clock(gateway: TestClient) -> Clock:
    """The gateway's deadlines and retry waits on a test Clock: a wait moves it, none sleeps."""
    clock = Clock()
    failover = gateway.app[FAILOVER]
    failover.breakers.clock = clock

    async def wait(seconds: float) -> None:
        clock.advance(seconds)

    failover.sleep = wait
    return clock


async def test_a_primary_answering_503_is_failed_over_and_comes_back_when_its_breaker_closes(
    failover_gateway: Callable[..., Awaitable[TestClient]], fake: FakeState
) -> None:
    gateway = await failover_gateway(WITH_FALLBACK, QUOTA_ENABLED="false")
    clock = Clock()
    gateway.app[FAILOVER].breakers.clock = clock  # cooldowns pass when the test says so
    fake.faults[PRIMARY] = Fault(503)
    statuses: list[int] = []

    async def one() -> None:
        response = await gateway.post("/v1/chat/completions", json=CHAT, headers=auth(VK))
        await response.read()
        statuses.append(response.status)

    for _ in range(20):  # 1,000 requests, 50 at a time
        await asyncio.gather(*(one() for _ in range(50)))
    assert statuses == [200] * 1000
    seen = keys_seen(fake)
    assert seen.count(BACKUP) == 1000  # every answer came from the fallback
    # Only the first 50, sent together before any failed, went to the primary: then its
    # breaker was open, and with the clock standing still it let no probe through.
    assert seen.count(PRIMARY) == 50
    health = await (await gateway.get("/health")).json()
    assert health["targets"]["openai"]["state"] == "open"
    assert health["providers"]["openai"]["healthy"] is False

    del fake.faults[PRIMARY]  # the outage ends
    await one()
    assert keys_seen(fake)[-1] == BACKUP  # still open: the cooldown has not passed
    clock.now += 30  # BREAKER_COOLDOWN_SECONDS
    fake.requests.clear()
    await asyncio.gather(*(one() for _ in range(20)))
    assert keys_seen(fake).count(PRIMARY) >= 1  # the probe went to the primary...
    await asyncio.gather(*(one() for _ in range(20)))
    assert keys_seen(fake)[-20:] == [PRIMARY] * 20  # ...succeeded, and closed the breaker
    health = await (await gateway.get("/health")).json()
    assert health["targets"]["openai"]["state"] == "closed"
    assert statuses == [200] * len(statuses)


async def test_a_half_open_breaker_whose_keys_all_rest_lets_the_next_request_probe(
    failover_gateway: Callable[..., Awaitable[TestClient]], fake: FakeState
) -> None:
    key = {
        "provider": "openai",
        "api_keys": [{"api_key": k} for k in POOL[:2]],
        "fallbacks": [{"provider": "backup", "api_key": BACKUP}],
    }
    gateway = await failover_gateway(key, QUOTA_ENABLED="false", BREAKER_FAILURES="1")
    clock = Clock()
    gateway.app[FAILOVER].breakers.clock = clock

    async def served_by() -> list[str | None]:
        fake.requests.clear()
        response = await gateway.post("/v1/chat/completions", json=CHAT, headers=auth(VK))
        assert response.status == 200
        return keys_seen(fake)

    fake.faults[POOL[0]] = fake.faults[POOL[1]] = Fault(503)
    assert (await served_by())[-1] == BACKUP  # one 503: the breaker opens
    clock.advance(30)  # BREAKER_COOLDOWN_SECONDS: half-open
    fake.faults[POOL[0]] = fake.faults[POOL[1]] = Fault(429, {"retry-after": "5"})
    assert (await served_by())[-1] == BACKUP  # both keys 429: they rest 5 s
    # Half-open, its probe taken by a request that found no key to ask: the turn goes back.
    assert await served_by() == [BACKUP]
    fake.faults.clear()
    clock.advance(5)  # the rests end, the provider is well again
    assert await served_by() in ([POOL[0]], [POOL[1]])  # the probe, and its success
    health = await (await gateway.get("/health")).json()
    assert health["targets"]["openai"]["state"] == "closed"


async def test_a_client_error_neither_closes_a_half_open_breaker_nor_resets_its_failures(
    failover_gateway: Callable[..., Awaitable[TestClient]], fake: FakeState
) -> None:
    # A provider's edge answers a request it refuses (context too long, unknown model)
    # while its generation is down: that 400 says nothing of the target, as a probe's
    # 4xx says nothing (test_probes), so it is no success either.
    gateway = await failover_gateway(WITH_FALLBACK, QUOTA_ENABLED="false")
    clock = Clock()
    gateway.app[FAILOVER].breakers.clock = clock

    async def status(fault: Fault) -> int:
        fake.faults[PRIMARY] = fault
        response = await gateway.post("/v1/chat/completions", json=CHAT, headers=auth(VK))
        await response.read()
        return response.status

    async def state() -> str:
        health = await (await gateway.get("/health")).json()
        return str(health["targets"]["openai"]["state"])

    # Failures in a row, a client's 400 between them: the third failure opens it.
    assert [await status(Fault(s)) for s in (503, 503, 400, 503)] == [200, 200, 400, 200]
    assert await state() == "open"
    clock.advance(30)  # BREAKER_COOLDOWN_SECONDS: the next request is the probe
    assert await status(Fault(400)) == 400  # the probe's answer is about the request
    assert await state() != "closed"
    fake.requests.clear()
    assert await status(Fault(503)) == 200  # the next request probes: still down
    assert keys_seen(fake) == [PRIMARY, BACKUP]
    assert await state() == "open"


async def test_an_open_breaker_whose_cooldown_passed_is_no_longer_reported_open(
    failover_gateway: Callable[..., Awaitable[TestClient]], fake: FakeState
) -> None:
    # A fallback failed once and the primary serves again: no request goes to the fallback,
    # yet its cooldown ends all the same, and /health and the metric say so.
    key = {
        "provider": "openai",
        "api_key": PRIMARY,
        "fallbacks": [{"provider": "backup", "api_key": BACKUP}],
    }
    gateway = await failover_gateway(key, QUOTA_ENABLED="false", BREAKER_FAILURES="1")
    clock = Clock()
    gateway.app[FAILOVER].breakers.clock = clock
    fake.faults[PRIMARY] = fake.faults[BACKUP] = Fault(503)
    response = await gateway.post("/v1/chat/completions", json=CHAT, headers=auth(VK))
    assert response.status == 503
    fake.faults.clear()

    async def seen() -> tuple[str, bool, str, str]:
        health = await (await gateway.get("/health")).json()
        metrics = await (await gateway.get("/metrics")).text()
        line = next(
            line
            for line in metrics.splitlines()
            if line.startswith('llm_gateway_breaker_state{target="backup"}')
        )
        state = health["targets"]["backup"]["state"]
        return state, health["providers"]["backup"]["healthy"], health["status"], line

    assert await seen() == (
        "open", False, "degraded", 'llm_gateway_breaker_state{target="backup"} 2.0'
    )  # fmt: skip
    clock.advance(30)  # BREAKER_COOLDOWN_SECONDS: the primary gets both requests meanwhile
    fake.requests.clear()
    assert (await gateway.post("/v1/chat/completions", json=CHAT, headers=auth(VK))).status == 200
    assert keys_seen(fake) == [PRIMARY]
    assert await seen() == (
        "half_open", True, "healthy", 'llm_gateway_breaker_state{target="backup"} 1.0'
    )  # fmt: skip


async def test_a_fallback_fires_on_a_stream_and_the_sdk_sees_one_clean_stream(
    failover_gateway: Callable[..., Awaitable[TestClient]], fake: FakeState
) -> None:
    gateway = await failover_gateway(WITH_FALLBACK)
    fake.faults[PRIMARY] = Fault(503)
    client = openai.AsyncOpenAI(api_key=VK, base_url=str(gateway.make_url("/v1")), max_retries=0)
    stream = await client.chat.completions.create(**CHAT, stream=True)
    text = "".join(
        [chunk.choices[0].delta.content or "" async for chunk in stream if chunk.choices]
    )
    assert text == "tok0 tok1 tok2 "
    assert keys_seen(fake) == [PRIMARY, BACKUP]


async def test_a_fallback_fires_on_a_stream_when_the_error_comes_without_a_content_length(
    failover_gateway: Callable[..., Awaitable[TestClient]],
    fake: FakeState,
    records: Callable[..., Awaitable[list[dict[str, Any]]]],
) -> None:
    """A 503 sent chunked (as from behind a CDN or a proxy): before, it was not kept, so
    neither retried nor failed over; it went to the client as the answer."""
    gateway = await failover_gateway(WITH_FALLBACK, RETRY_ATTEMPTS="1")
    fake.faults[PRIMARY] = Fault(503, {"retry-after": "0"}, is_unsized=True)
    client = openai.AsyncOpenAI(api_key=VK, base_url=str(gateway.make_url("/v1")), max_retries=0)
    stream = await client.chat.completions.create(**CHAT, stream=True)
    text = "".join(
        [chunk.choices[0].delta.content or "" async for chunk in stream if chunk.choices]
    )
    assert text == "tok0 tok1 tok2 "
    assert keys_seen(fake) == [PRIMARY, PRIMARY, BACKUP]  # retried once, then failed over
    [line] = await records(1)
    assert [(a["target"], a["status"]) for a in line["attempts"]] == [
        ("openai", 503),
        ("openai", 503),
        ("backup", 200),
    ]


async def test_a_503_whose_body_breaks_off_is_failed_over_like_any_503(
    failover_gateway: Callable[..., Awaitable[TestClient]],
    fake: FakeState,
    records: Callable[..., Awaitable[list[dict[str, Any]]]],
) -> None:
    """Before, the broken 503 went on as the answer: the client got 502 upstream_broken and
    the fallback was never asked, though nothing had reached the client."""
    gateway = await failover_gateway(WITH_FALLBACK)
    for is_unsized in (False, True):
        fake.faults[PRIMARY] = Fault(503, is_unsized=is_unsized, is_cut=True)
        response = await gateway.post("/v1/chat/completions", json=CHAT, headers=auth(VK))
        assert response.status == 200
        assert (await response.json())["choices"][0]["message"]["content"] == "tok0 tok1 tok2 "
    assert keys_seen(fake) == [PRIMARY, BACKUP] * 2
    lines = await records(2)
    for line in lines:
        assert [(a["target"], a["status"]) for a in line["attempts"]] == [
            ("openai", 503),
            ("backup", 200),
        ]


@pytest.mark.parametrize(
    ("fault", "stream"),
    [
        (Fault(503, is_unsized=True), False),  # a 503 whose body is read to be kept
        (Fault(500, in_stream="first"), True),  # a stream whose first event failed, kept
    ],
)
async def test_a_client_leaving_while_a_failed_answer_is_kept_lets_the_provider_go(
    failover_gateway: Callable[..., Awaitable[TestClient]],
    fake: FakeState,
    records: Callable[..., Awaitable[list[dict[str, Any]]]],
    fault: Fault,
    stream: bool,
) -> None:
    """Before, the connection of an answer the walk was reading to keep stayed open after
    the client left, neither closed nor given back: held until the provider closed it."""
    gateway = await failover_gateway(WITH_FALLBACK)
    fake.faults[PRIMARY] = fault
    headers = {**auth(VK), "x-fake-hang": "end"}  # its body's end never comes
    leaving = asyncio.create_task(
        gateway.post("/v1/chat/completions", json={**CHAT, "stream": stream}, headers=headers)
    )

    async def heard() -> bool:  # the breaker heard of it: the walk reads it to keep it
        health = await (await gateway.get("/health")).json()
        return health["targets"]["openai"]["last_error"] is not None

    await until(heard, what="the primary's failure reaching its breaker")
    leaving.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await leaving
    await until(lambda: fake.disconnects, what="the gateway closing the provider's connection")
    [line] = await records(1)
    assert line["status"] == 499
    assert keys_seen(fake) == [PRIMARY]


async def test_a_broken_503_from_the_last_target_gives_the_gateways_502(
    failover_gateway: Callable[..., Awaitable[TestClient]], fake: FakeState
) -> None:
    gateway = await failover_gateway(WITH_FALLBACK)
    fake.faults[PRIMARY] = Fault(503, is_cut=True)
    fake.faults[BACKUP] = Fault(503, is_cut=True)
    response = await gateway.post("/v1/chat/completions", json=CHAT, headers=auth(VK))
    assert response.status == 502
    body = await response.json()
    assert_openai_error(body, "upstream_broken")
    assert "'backup' at 127.0.0.1" in body["error"]["message"]
    assert keys_seen(fake) == [PRIMARY, BACKUP]


async def test_an_unsized_error_from_the_last_target_reaches_the_client_unchanged(
    failover_gateway: Callable[..., Awaitable[TestClient]], fake: FakeState
) -> None:
    gateway = await failover_gateway(WITH_FALLBACK)
    fake.faults[PRIMARY] = Fault(503, {"retry-after": "0"}, is_unsized=True)
    fake.faults[BACKUP] = Fault(529, is_unsized=True)
    response = await gateway.post(
        "/v1/chat/completions", json={**CHAT, "stream": True}, headers=auth(VK)
    )
    assert response.status == 529
    assert (await response.json())["error"]["message"] == "fake provider error 529"
    assert response.headers["retry-after"] == "7"  # the provider's own
    assert keys_seen(fake) == [PRIMARY, BACKUP]


@pytest.mark.parametrize(
    ("backup", "stream"),
    [
        (Fault(529, reason="Overloaded"), False),  # read whole and kept, then passed on
        (Fault(529, is_unsized=True, reason="Overloaded"), True),
        (Fault(500, in_stream="first", reason="Overloaded"), True),  # a 200 stream, kept
    ],
    ids=["sized", "unsized", "stream-error"],
)
async def test_the_last_targets_answer_keeps_its_reason_phrase(
    failover_gateway: Callable[..., Awaitable[TestClient]],
    fake: FakeState,
    backup: Fault,
    stream: bool,
) -> None:
    """Before, a kept answer went on with its status's own phrase (none for a 529)."""
    gateway = await failover_gateway(WITH_FALLBACK)
    fake.faults[PRIMARY] = Fault(503, {"retry-after": "0"}, reason="Primary Down")
    fake.faults[BACKUP] = backup
    response = await gateway.post(
        "/v1/chat/completions", json={**CHAT, "stream": stream}, headers=auth(VK)
    )
    status = 200 if backup.in_stream else backup.status
    assert (response.status, response.reason) == (status, "Overloaded")
    assert keys_seen(fake) == [PRIMARY, BACKUP]


@pytest.mark.parametrize("stream", [False, True])
async def test_a_fallbacks_answer_keeps_its_own_reason_phrase(
    failover_gateway: Callable[..., Awaitable[TestClient]], fake: FakeState, stream: bool
) -> None:
    gateway = await failover_gateway(WITH_FALLBACK)
    fake.faults[PRIMARY] = Fault(503, {"retry-after": "0"}, reason="Primary Down")
    response = await gateway.post(
        "/v1/chat/completions",
        json={**CHAT, "stream": stream},
        headers={**auth(VK), "x-fake-reason": "Backup Fine"},
    )
    assert (response.status, response.reason) == (200, "Backup Fine")
    await response.read()
    assert keys_seen(fake) == [PRIMARY, BACKUP]


async def test_an_anthropic_529_fails_over_to_an_anthropic_fallback(
    failover_gateway: Callable[..., Awaitable[TestClient]],
    fake: FakeState,
    records: Callable[..., Awaitable[list[dict[str, Any]]]],
) -> None:
    key = {
        "provider": "anthropic",
        "api_key": ANT_PRIMARY,
        "fallbacks": [{"provider": "ant-backup", "api_key": ANT_BACKUP}],
    }
    gateway = await failover_gateway(key)
    fake.faults[ANT_PRIMARY] = Fault(529)
    client = anthropic.AsyncAnthropic(api_key=VK, base_url=str(gateway.make_url("")), max_retries=0)
    message = await client.messages.create(**MESSAGES)
    assert message.content[0].text  # type: ignore[union-attr]
    assert keys_seen(fake) == [ANT_PRIMARY, ANT_BACKUP]
    [line] = await records(1)
    assert line["target"] == "ant-backup" and line["provider"] == "ant-backup"
    assert [(a["target"], a["status"]) for a in line["attempts"]] == [
        ("anthropic", 529),
        ("ant-backup", 200),
    ]
    assert ANT_PRIMARY not in json.dumps(line) and ANT_BACKUP not in json.dumps(line)


async def test_an_unanswered_fallback_that_swaps_the_model_is_charged_at_that_models_price(
    failover_gateway: Callable[..., Awaitable[TestClient]],
    fake: FakeState,
    records: Callable[..., Awaitable[list[dict[str, Any]]]],
) -> None:
    """Before, its reservation was priced at the model the client named (gpt-4o), 16 times
    what the fallback's gpt-4o-mini costs, though the log line named that target."""
    key = {
        "provider": "openai",
        "api_key": PRIMARY,
        "budget": {"usd": 10, "window_seconds": 3600},
        "fallbacks": [{"provider": "openai", "api_key": BACKUP, "model": "gpt-4o-mini"}],
    }
    # 1 s: the primary's 503, an ordinary answer, must come within it on a loaded machine.
    gateway = await failover_gateway(key, REQUEST_TIMEOUT="1")
    fake.faults[PRIMARY] = Fault(503)
    response = await gateway.post(
        "/v1/chat/completions",
        json=chat("hello", model="gpt-4o", max_tokens=1000),
        headers={**auth(VK), "x-fake-hang": "headers"},  # the fallback's: the primary's 503 first
    )
    assert response.status == 504
    [line] = await records(1)
    assert line["target"] == "openai/gpt-4o-mini" and line["usage"]["completion_tokens"] == 1000
    usage = Usage(line["usage"]["prompt_tokens"], 1000, estimated=True)
    prices = Prices.load(None)
    assert line["cost_usd"] == pytest.approx(prices.cost("openai", "gpt-4o-mini", usage))


async def test_a_stream_whose_first_chunk_reached_the_client_is_never_retried(
    failover_gateway: Callable[..., Awaitable[TestClient]], fake: FakeState
) -> None:
    gateway = await failover_gateway(WITH_FALLBACK, RETRY_ATTEMPTS="3")
    response = await gateway.post(
        "/v1/chat/completions",
        json={**CHAT, "stream": True},
        headers={**auth(VK), "x-fake-drop": "midstream", "x-fake-chunks": "6"},
    )
    assert response.status == 200
    with pytest.raises(Exception):  # noqa: B017 - the client sees the cut, whatever aiohttp calls it
        await response.read()
    assert keys_seen(fake) == [PRIMARY]


async def test_a_400_is_never_retried_and_reaches_the_client_unchanged(
    failover_gateway: Callable[..., Awaitable[TestClient]], fake: FakeState
) -> None:
    gateway = await failover_gateway(WITH_FALLBACK, RETRY_ATTEMPTS="3")
    fake.faults[PRIMARY] = Fault(400)
    response = await gateway.post("/v1/chat/completions", json=CHAT, headers=auth(VK))
    assert response.status == 400
    assert (await response.json())["error"]["message"] == "fake provider error 400"
    assert keys_seen(fake) == [PRIMARY]


async def test_retries_wait_what_the_provider_asks_then_succeed(
    failover_gateway: Callable[..., Awaitable[TestClient]], fake: FakeState
) -> None:
    gateway = await failover_gateway({"provider": "openai", "api_key": PRIMARY}, RETRY_ATTEMPTS="2")
    fake.faults[PRIMARY] = Fault(503, {"retry-after-ms": "300"}, times=2)
    clock = waits_on_a_clock(gateway)
    started = clock.now
    response = await gateway.post("/v1/chat/completions", json=CHAT, headers=auth(VK))
    assert response.status == 200
    assert clock.now - started == pytest.approx(0.6)  # two waits of 300 ms, as asked
    assert keys_seen(fake) == [PRIMARY] * 3


async def test_a_provider_asking_for_an_hour_is_not_waited_for_and_its_answer_goes_back(
    failover_gateway: Callable[..., Awaitable[TestClient]], fake: FakeState
) -> None:
    gateway = await failover_gateway(
        {"provider": "openai", "api_key": PRIMARY},
        RETRY_ATTEMPTS="5",
        RETRY_DEADLINE_SECONDS="2",
    )
    fake.faults[PRIMARY] = Fault(503, {"retry-after": "3600"})
    clock = waits_on_a_clock(gateway)
    started = clock.now
    response = await gateway.post("/v1/chat/completions", json=CHAT, headers=auth(VK))
    assert clock.now == started  # not waited for at all
    assert response.status == 503 and response.headers["retry-after"] == "3600"
    assert (await response.json())["error"]["message"] == "fake provider error 503"
    assert keys_seen(fake) == [PRIMARY]


async def test_the_overall_deadline_holds_with_a_provider_that_always_fails(
    failover_gateway: Callable[..., Awaitable[TestClient]], fake: FakeState
) -> None:
    gateway = await failover_gateway(
        {"provider": "openai", "api_key": PRIMARY},
        RETRY_ATTEMPTS="1000",
        RETRY_MAX_WAIT_SECONDS="0.2",
        RETRY_DEADLINE_SECONDS="1",
        BREAKER_FAILURES="100000",
    )
    fake.faults[PRIMARY] = Fault(503, {"retry-after-ms": "100"})
    clock = waits_on_a_clock(gateway)
    started = clock.now
    response = await gateway.post("/v1/chat/completions", json=CHAT, headers=auth(VK))
    assert response.status == 503  # the last provider answer, unchanged
    # Waits of 100 ms until the next would end past the 1 s deadline: nine, ten tries.
    assert clock.now - started == pytest.approx(0.9)
    assert len(fake.requests) == 10


async def test_retries_past_a_thousand_without_waits_end_in_the_gateways_502(
    failover_gateway: Callable[..., Awaitable[TestClient]],
) -> None:
    """RETRY_ATTEMPTS of thousands and RETRY_MAX_WAIT_SECONDS=0 (retry at once, until the
    deadline): before, the 1,024th retry's backoff (0.5 s x 2^1024) overflowed a float, and
    the client got the gateway's 500 internal_error, not the provider's failure."""
    gateway = await failover_gateway(
        {"provider": "openai", "api_key": PRIMARY},
        base="http://127.0.0.1:9",  # nothing listens: refused at once
        RETRY_ATTEMPTS="1100",
        RETRY_MAX_WAIT_SECONDS="0",
        BREAKER_FAILURES="100000",
    )
    waits_on_a_clock(gateway)  # the deadline's clock stands still: every retry is made
    response = await gateway.post("/v1/chat/completions", json=CHAT, headers=auth(VK))
    assert response.status == 502
    assert_openai_error(await response.json(), "upstream_unreachable")


async def test_a_pool_key_answering_429_rests_for_its_retry_after_with_no_client_errors(
    failover_gateway: Callable[..., Awaitable[TestClient]], fake: FakeState
) -> None:
    key = {"provider": "openai", "api_keys": [{"api_key": k} for k in POOL]}
    gateway = await failover_gateway(key, QUOTA_ENABLED="false")
    clock = Clock()
    gateway.app[FAILOVER].breakers.clock = clock  # the rest ends when the test says so
    fake.faults[POOL[0]] = Fault(429, {"retry-after": "2"}, times=1)

    async def keys_of_a_round() -> list[str | None]:
        fake.requests.clear()
        for _ in range(12):
            response = await gateway.post("/v1/chat/completions", json=CHAT, headers=auth(VK))
            assert response.status == 200  # the 429 never reaches the client
        return keys_seen(fake)

    seen = await keys_of_a_round()
    first_429 = seen.index(POOL[0])
    assert POOL[0] not in seen[first_429 + 1 :] and {POOL[1], POOL[2]} <= set(seen)
    clock.advance(1.9)
    assert POOL[0] not in await keys_of_a_round()  # still resting: its 2 s have not passed
    clock.advance(0.2)
    assert POOL[0] in await keys_of_a_round()  # back in the rotation


async def test_a_resting_pool_key_still_rests_after_a_reload_unless_its_real_key_changed(
    failover_gateway: Callable[..., Awaitable[TestClient]], fake: FakeState, tmp_path: Path
) -> None:
    """Before, any reload (SIGHUP, the admin API changing another key, a watched file)
    ended every rest: a key OpenAI had told to wait a minute was asked again at once."""
    key = {"provider": "openai", "api_keys": [{"api_key": k} for k in POOL]}
    gateway = await failover_gateway(key, QUOTA_ENABLED="false", ADMIN_TOKEN="t" * 32)
    gateway.app[FAILOVER].breakers.clock = Clock()  # the rest lasts until the test says
    fake.faults[POOL[0]] = Fault(429, {"retry-after": "60"})

    async def reload(pool: list[str]) -> None:
        path = tmp_path / "keys.json"
        document = json.loads(path.read_text())
        document["virtual_keys"][VK]["api_keys"] = [{"api_key": k} for k in pool]
        path.write_text(json.dumps(document))
        admin = {"Authorization": "Bearer " + "t" * 32}
        assert (await gateway.post("/admin/reload", headers=admin)).status == 200

    async def keys_of_a_round() -> list[str | None]:
        fake.requests.clear()
        for _ in range(6):
            response = await gateway.post("/v1/chat/completions", json=CHAT, headers=auth(VK))
            assert response.status == 200  # the 429 never reaches the client
        return keys_seen(fake)

    assert POOL[0] in await keys_of_a_round()  # asked once: it rests from then on
    await reload(list(POOL))  # the same pool
    assert POOL[0] not in await keys_of_a_round()
    await reload([POOL[0], POOL[2]])  # another key removed: it is known by its real key
    assert POOL[0] not in await keys_of_a_round()
    del fake.faults[POOL[0]]
    await reload(["sk-pool-real-replaced-zz", POOL[2]])  # its real key replaced: a new key
    assert "sk-pool-real-replaced-zz" in await keys_of_a_round()


async def test_a_breaker_open_on_a_target_keys_json_no_longer_names_is_forgotten_at_reload(
    failover_gateway: Callable[..., Awaitable[TestClient]], fake: FakeState, tmp_path: Path
) -> None:
    """Before, /health stayed degraded, the provider unhealthy and the breaker-state metric
    open (its alert firing) until a restart, for a target no key could send to any more."""
    gateway = await failover_gateway(WITH_FALLBACK, BREAKER_FAILURES="1", ADMIN_TOKEN="t" * 32)
    fake.faults[PRIMARY] = Fault(500)
    assert (await gateway.post("/v1/chat/completions", json=CHAT, headers=auth(VK))).status == 200
    health = await (await gateway.get("/health")).json()
    assert health["status"] == "degraded" and health["targets"]["openai"]["state"] == "open"

    path = tmp_path / "keys.json"
    document = json.loads(path.read_text())
    document["virtual_keys"][VK] = {"name": "failover", "provider": "backup", "api_key": BACKUP}
    path.write_text(json.dumps(document))
    admin = {"Authorization": "Bearer " + "t" * 32}
    assert (await gateway.post("/admin/reload", headers=admin)).status == 200
    health = await (await gateway.get("/health")).json()
    assert health["status"] == "healthy", health
    assert "openai" not in health["targets"]
    assert all(provider["healthy"] for provider in health["providers"].values())
    text = await (await gateway.get("/metrics")).text()
    assert 'llm_gateway_breaker_state{target="openai"} 0.0' in text


async def test_streams_cut_after_a_reload_removed_their_target_do_not_bring_its_breaker_back(
    failover_gateway: Callable[..., Awaitable[TestClient]],
    fake: FakeState,
    tmp_path: Path,
    records: Callable[..., Awaitable[list[dict[str, Any]]]],
) -> None:
    """Streams of two keys under way on a target when a reload removes it, then cut by the
    provider: their failures concern a target no key sends to any more. Before, they made
    it a breaker again, which opened: /health degraded until the next reload."""
    other = "vk_test_failover_other_8d0f2b4c6e"
    gateway = await failover_gateway(WITH_FALLBACK, BREAKER_FAILURES="1", ADMIN_TOKEN="t" * 32)
    path = tmp_path / "keys.json"
    document = json.loads(path.read_text())
    document["virtual_keys"][other] = {"name": "other", **WITH_FALLBACK}
    path.write_text(json.dumps(document))
    admin = {"Authorization": "Bearer " + "t" * 32}
    assert (await gateway.post("/admin/reload", headers=admin)).status == 200
    cut = {"x-fake-hold": "1", "x-fake-drop": "midstream"}
    streams = [
        asyncio.create_task(
            gateway.post(
                "/v1/chat/completions", json={**CHAT, "stream": True}, headers={**auth(key), **cut}
            )
        )
        for key in (VK, other)
    ]
    await until(lambda: len(fake.requests) == 2)
    for key in (VK, other):  # both keys to backup alone: the target openai is gone
        document["virtual_keys"][key] = {"provider": "backup", "api_key": BACKUP}
    path.write_text(json.dumps(document))
    assert (await gateway.post("/admin/reload", headers=admin)).status == 200
    fake.release.set()
    for response in await asyncio.gather(*streams):
        with contextlib.suppress(aiohttp.ClientPayloadError):
            await response.read()
    lines = await records(2)
    assert [line["status"] for line in lines] == [200, 200]
    assert all(line["error"] for line in lines), lines  # both cut by the provider
    health = await (await gateway.get("/health")).json()
    assert health["status"] == "healthy", health
    assert "openai" not in health["targets"]


async def test_a_pool_whose_every_key_rests_still_asks_the_one_whose_rest_ends_first(
    failover_gateway: Callable[..., Awaitable[TestClient]], fake: FakeState
) -> None:
    key = {"provider": "openai", "api_keys": [{"api_key": k} for k in POOL[:2]]}
    gateway = await failover_gateway(key, QUOTA_ENABLED="false")
    gateway.app[FAILOVER].breakers.clock = Clock()  # the rests last until the test says
    fake.faults[POOL[0]] = Fault(429, {"retry-after": "20"})
    fake.faults[POOL[1]] = Fault(429, {"retry-after": "10"})
    first = await gateway.post("/v1/chat/completions", json=CHAT, headers=auth(VK))
    assert first.status == 429  # both keys asked, both rest now
    assert sorted(keys_seen(fake)) == sorted(POOL[:2])

    fake.requests.clear()
    again = await gateway.post("/v1/chat/completions", json=CHAT, headers=auth(VK))
    # Not the gateway's 500: the provider's own 429, from the key whose rest ends first.
    assert again.status == 429
    assert (await again.json())["error"]["code"] == "rate_limit_exceeded"
    assert keys_seen(fake) == [POOL[1]]
    del fake.faults[POOL[1]]
    fake.requests.clear()
    assert (await gateway.post("/v1/chat/completions", json=CHAT, headers=auth(VK))).status == 200
    assert keys_seen(fake) == [POOL[1]]


async def test_a_pool_spreads_by_weight_and_a_refused_key_is_set_aside_at_once(
    failover_gateway: Callable[..., Awaitable[TestClient]], fake: FakeState
) -> None:
    key = {
        "provider": "openai",
        "api_keys": [{"api_key": POOL[0], "weight": 3}, {"api_key": POOL[1]}, {"api_key": POOL[2]}],
    }
    gateway = await failover_gateway(key, QUOTA_ENABLED="false")
    for _ in range(50):
        assert (
            await gateway.post("/v1/chat/completions", json=CHAT, headers=auth(VK))
        ).status == 200
    seen = keys_seen(fake)
    assert (seen.count(POOL[0]), seen.count(POOL[1]), seen.count(POOL[2])) == (30, 10, 10)

    fake.requests.clear()
    fake.faults[POOL[1]] = Fault(401)  # revoked at the provider
    for _ in range(20):
        assert (
            await gateway.post("/v1/chat/completions", json=CHAT, headers=auth(VK))
        ).status == 200
    assert keys_seen(fake).count(POOL[1]) == 1  # tried once, then set aside


async def test_a_sticky_header_keeps_a_client_on_one_pool_key(
    failover_gateway: Callable[..., Awaitable[TestClient]], fake: FakeState
) -> None:
    key = {"provider": "openai", "api_keys": [{"api_key": k} for k in POOL]}
    gateway = await failover_gateway(key, POOL_STICKY_HEADER="x-session", QUOTA_ENABLED="false")
    for session in ("alice", "bob", "carol", "dave"):
        fake.requests.clear()
        for _ in range(5):
            headers = {**auth(VK), "x-session": session}
            assert (
                await gateway.post("/v1/chat/completions", json=CHAT, headers=headers)
            ).status == 200
        assert len(set(keys_seen(fake))) == 1


async def test_routes_pick_the_target_by_model_and_an_unrouted_model_gets_400(
    failover_gateway: Callable[..., Awaitable[TestClient]], fake: FakeState
) -> None:
    key = {
        "routes": [
            {"models": ["gpt-4o*"], "provider": "openai", "api_key": PRIMARY},
            {"models": ["llama-*", "mistral-*"], "provider": "backup", "api_key": BACKUP},
        ]
    }
    gateway = await failover_gateway(key)
    for model, expected in (("gpt-4o-mini", PRIMARY), ("llama-3-70b", BACKUP)):
        response = await gateway.post(
            "/v1/chat/completions", json={**CHAT, "model": model}, headers=auth(VK)
        )
        assert response.status == 200
        assert keys_seen(fake)[-1] == expected
    response = await gateway.post(
        "/v1/chat/completions", json={**CHAT, "model": "claude-x"}, headers=auth(VK)
    )
    assert response.status == 400
    body = await response.json()
    assert_openai_error(body, "model_not_routed")
    assert "gpt-4o*" in body["error"]["message"] and "llama-*" in body["error"]["message"]
    assert len(fake.requests) == 2


async def test_an_anthropic_sdks_call_naming_no_model_goes_to_the_route_speaking_its_api(
    failover_gateway: Callable[..., Awaitable[TestClient]], fake: FakeState
) -> None:
    """The README's router, OpenAI first: a message batch's retrieval, its results and the
    model list name no model, and went to the first route, OpenAI, with its OpenAI key (in
    production OpenAI's 404, and a Claude batch its SDK could never read back)."""
    key = {
        "routes": [
            {"models": ["gpt-*"], "provider": "openai", "api_key": PRIMARY},
            {"models": ["claude-*"], "provider": "anthropic", "api_key": ANT_PRIMARY},
        ]
    }
    gateway = await failover_gateway(key)
    client = anthropic.AsyncAnthropic(base_url=str(gateway.make_url("")), api_key=VK, max_retries=0)
    params = {"model": "claude-haiku-4-5", "max_tokens": 9, "messages": MESSAGES["messages"]}
    batch = await client.messages.batches.create(requests=[{"custom_id": "a", "params": params}])
    assert (await client.messages.batches.retrieve(batch.id)).processing_status == "ended"
    assert [result.custom_id async for result in await client.messages.batches.results(batch.id)]
    assert [model.id async for model in client.models.list()]
    await client.close()
    assert len(fake.requests) >= 4
    assert set(keys_seen(fake)) == {ANT_PRIMARY}


async def test_an_openai_sdks_call_naming_no_model_goes_to_the_route_speaking_its_api(
    failover_gateway: Callable[..., Awaitable[TestClient]], fake: FakeState
) -> None:
    """Routes listed Anthropic first: an upload, its content and the model list of the OpenAI
    SDK go to the OpenAI route, not to Anthropic with the Anthropic key."""
    key = {
        "routes": [
            {"models": ["claude-*"], "provider": "anthropic", "api_key": ANT_PRIMARY},
            {"models": ["gpt-*"], "provider": "openai", "api_key": PRIMARY},
        ]
    }
    gateway = await failover_gateway(key)
    client = openai.AsyncOpenAI(base_url=str(gateway.make_url("/v1")), api_key=VK, max_retries=0)
    uploaded = await client.files.create(file=("in.jsonl", b"{}\n"), purpose="batch")
    assert (await client.files.content(uploaded.id)).content == b"{}\n"
    assert [model.id async for model in client.models.list()]
    await client.close()
    assert keys_seen(fake) == [PRIMARY] * 3


async def test_a_target_model_replaces_only_the_bodys_model_value(
    failover_gateway: Callable[..., Awaitable[TestClient]], fake: FakeState
) -> None:
    key = {
        "provider": "openai",
        "api_key": PRIMARY,
        "fallbacks": [{"provider": "backup", "api_key": BACKUP, "model": "gpt-4o-mini-backup"}],
    }
    gateway = await failover_gateway(key)
    fake.faults[PRIMARY] = Fault(500)
    raw = b'{ "messages": [{"role": "user", "content": "say \\"model\\": x"}],\n  "model" : "gpt-4o-mini", "temperature": 0.5 }'
    response = await gateway.post(
        "/v1/chat/completions",
        data=raw,
        headers={**auth(VK), "content-type": "application/json"},
    )
    assert response.status == 200
    primary, backup = fake.requests
    assert primary.body == raw
    assert backup.body == raw.replace(b'"gpt-4o-mini"', b'"gpt-4o-mini-backup"')


async def test_a_target_model_replaces_a_model_spelt_in_another_case(
    failover_gateway: Callable[..., Awaitable[TestClient]], fake: FakeState
) -> None:
    """Go's encoding/json (Ollama, LocalAI, Go gateways) reads "Model" or "MODEL" as `model`,
    the last one in the body winning: the swap replaced only "model", so behind such a server
    `{"model": "llama3", "MODEL": "llama3:70b"}` ran the client's llama3:70b on a target
    pinning another model."""
    gateway = await failover_gateway({"provider": "openai", "api_key": PRIMARY, "model": "pinned"})
    raw = b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "MODEL": "o1-pro", "M\\u006fdel": "o3"}'
    response = await gateway.post(
        "/v1/chat/completions", data=raw, headers={**auth(VK), "content-type": "application/json"}
    )
    assert response.status == 200
    (seen,) = fake.requests
    pinned = raw.replace(b'"gpt-4o-mini"', b'"pinned"').replace(b'"o1-pro"', b'"pinned"')
    assert seen.body == pinned.replace(b'"o3"', b'"pinned"')


async def test_a_target_model_is_put_in_a_body_under_two_content_encoding_lines(
    failover_gateway: Callable[..., Awaitable[TestClient]], fake: FakeState
) -> None:
    """Two Content-Encoding lines are one list ("gzip, gzip", RFC 9110 §5.3), as the peek and
    the provider read them: the swap read only the first line, found no `model` in what was
    still gzip, and sent the body on as it came, so the provider ran the client's model, not
    the one keys.json pins."""
    gateway = await failover_gateway({"provider": "openai", "api_key": PRIMARY, "model": "pinned"})
    body = gzip.compress(gzip.compress(json.dumps(chat("hi", model="gpt-4o")).encode()))
    headers = CIMultiDict(auth(VK))
    headers.add("Content-Type", "application/json")
    headers.add("Content-Encoding", "gzip")
    headers.add("Content-Encoding", "gzip")
    response = await gateway.post("/v1/chat/completions", data=body, headers=headers)
    assert response.status == 200, await response.text()
    (seen,) = fake.requests
    assert "Content-Encoding" not in seen.headers  # it went up decoded, as one swap does
    assert json.loads(seen.body)["model"] == "pinned"


async def test_a_target_model_is_put_in_a_forms_model_field(
    failover_gateway: Callable[..., Awaitable[TestClient]], fake: FakeState
) -> None:
    """A multipart upload (a transcription, an image edit) and a url-encoded form name their
    model in a form field: the swap looked for a JSON `model` only and sent such a body on as
    it came, so a fallback serving whisper under another name (Groq's whisper-large-v3) was
    asked for whisper-1 and refused it, and a key pinned to a cheap model ran whatever model
    its client named, priced as the pinned one."""
    gateway = await failover_gateway({"provider": "openai", "api_key": PRIMARY, "model": "pinned"})
    client = openai.AsyncOpenAI(base_url=str(gateway.make_url("/v1")), api_key=VK, max_retries=0)
    audio = b"RIFF" + bytes(range(256)) * 8
    await client.audio.transcriptions.create(model="whisper-1", file=("a.wav", audio))
    form = b"prompt=a%20cat&model=dall-e-2;n=1"
    response = await gateway.post(
        "/v1/forms",
        data=form,
        headers={**auth(VK), "Content-Type": "application/x-www-form-urlencoded"},
    )
    assert response.status == 200
    multipart, urlencoded = fake.requests
    _, options = parse_options_header(multipart.headers["Content-Type"])
    parts = MultipartParser(io.BytesIO(multipart.body), options["boundary"])
    assert {part.name: part.raw for part in parts} == {"model": b"pinned", "file": audio}
    assert urlencoded.body == form.replace(b"dall-e-2", b"pinned")


async def test_a_route_model_is_put_in_the_id_of_a_model_config_object(
    failover_gateway: Callable[..., Awaitable[TestClient]],
    fake: FakeState,
    records: Callable[..., Awaitable[list[dict[str, Any]]]],
) -> None:
    """Anthropic's managed agents take their model as a model config object (`{"id": ...,
    "effort": ..., "speed": ...}`): the swap replaced only a string `model` and sent the
    object on as it came, so a route pinning the model ran the client's instead (routed and
    priced as the pinned one). Now only the object's `id` is replaced; its `effort`, `speed`
    and every other byte go up as sent."""
    route = {"models": ["claude-sonnet-4-*"], "provider": "anthropic", "api_key": ANT_PRIMARY}
    gateway = await failover_gateway({"routes": [{**route, "model": "claude-sonnet-4-pinned"}]})
    client = anthropic.AsyncAnthropic(base_url=str(gateway.make_url("")), api_key=VK, max_retries=0)
    config = {"id": "claude-sonnet-4-5", "effort": "high", "speed": "fast"}
    await client.beta.agents.create(name="helper", model=config)
    raw = b'{"name": "h", "model": { "speed": "fast", "id" :"claude-sonnet-4-5", "effort": {"id": "x"} }}'
    response = await gateway.post(
        "/v1/agents", data=raw, headers={**auth(VK), "content-type": "application/json"}
    )
    assert response.status == 200
    made, posted = fake.requests
    assert json.loads(made.body)["model"] == {**config, "id": "claude-sonnet-4-pinned"}
    assert posted.body == raw.replace(b'"claude-sonnet-4-5"', b'"claude-sonnet-4-pinned"')
    lines = await records(2)  # the log names the client's model, as for a string `model`
    assert [line["model"] for line in lines] == ["claude-sonnet-4-5"] * 2


async def test_a_route_model_is_put_in_each_request_of_a_message_batch(
    failover_gateway: Callable[..., Awaitable[TestClient]], fake: FakeState
) -> None:
    """A message batch names its models in each request's `params`, none at its top: the
    swap found no `model` there and sent the batch on as it came, so a route pinning the
    model (chosen by the batch's first model) ran every request on the client's models."""
    route = {"models": ["claude-*"], "provider": "anthropic", "api_key": ANT_PRIMARY}
    gateway = await failover_gateway({"routes": [{**route, "model": "claude-pinned"}]})
    client = anthropic.AsyncAnthropic(base_url=str(gateway.make_url("")), api_key=VK, max_retries=0)
    await client.messages.batches.create(
        requests=[
            {"custom_id": "a", "params": messages("hi", model="claude-haiku-4-5")},
            {"custom_id": "b", "params": messages("hi", model="claude-opus-4-1", metadata={})},
        ]
    )
    raw = b'{"requests": [{"params": {"model" :"claude-x", "system": "model"}, "custom_id": "model"}]}'
    response = await gateway.post(
        "/v1/messages/batches", data=raw, headers={**auth(VK), "content-type": "application/json"}
    )
    assert response.status == 200
    made, posted = fake.requests
    sent = json.loads(made.body)["requests"]
    assert [item["params"]["model"] for item in sent] == ["claude-pinned"] * 2
    assert posted.body == raw.replace(b'"claude-x"', b'"claude-pinned"')


async def test_every_target_failing_gives_the_client_the_last_provider_answer(
    failover_gateway: Callable[..., Awaitable[TestClient]], fake: FakeState
) -> None:
    gateway = await failover_gateway(WITH_FALLBACK)
    fake.faults[PRIMARY] = Fault(502)
    fake.faults[BACKUP] = Fault(503, {"x-provider-says": "overloaded"})
    response = await gateway.post("/v1/chat/completions", json=CHAT, headers=auth(VK))
    assert response.status == 503
    assert response.headers["x-provider-says"] == "overloaded"
    assert (await response.json())["error"]["message"] == "fake provider error 503"


async def test_no_provider_answering_gives_a_502_naming_provider_host_and_cause(
    failover_gateway: Callable[..., Awaitable[TestClient]],
    records: Callable[..., Awaitable[list[dict[str, Any]]]],
) -> None:
    # Nothing listens on port 9 (discard) of loopback: connection refused, for both targets.
    gateway = await failover_gateway(WITH_FALLBACK, base="http://127.0.0.1:9")
    response = await gateway.post("/v1/chat/completions", json=CHAT, headers=auth(VK))
    assert response.status == 502
    body = await response.json()
    assert_openai_error(body, "upstream_unreachable")
    message = body["error"]["message"]
    assert "'backup' at 127.0.0.1:9" in message and "connection refused" in message
    [line] = await records(1)
    assert [a["target"] for a in line["attempts"]] == ["openai", "backup"]
    assert [a["status"] for a in line["attempts"]] == [None, None]
    assert line["status"] == 502 and "connection refused" in line["error"]
    health = await (await gateway.get("/health")).json()
    assert "connection refused" in health["providers"]["openai"]["last_error"]


async def test_an_ipv6_provider_is_named_with_its_address_in_brackets(
    failover_gateway: Callable[..., Awaitable[TestClient]],
) -> None:
    """http://[::1]:9/v1 unreachable: the message names [::1]:9, as a URL writes it; before,
    '::1:9' (an address of its own, port unknown)."""
    gateway = await failover_gateway(WITH_FALLBACK, base="http://[::1]:9")
    response = await gateway.post("/v1/chat/completions", json=CHAT, headers=auth(VK))
    assert response.status == 502
    message = (await response.json())["error"]["message"]
    assert "'backup' at [::1]:9:" in message, message
    health = await (await gateway.get("/health")).json()
    assert "'openai' at [::1]:9:" in health["providers"]["openai"]["last_error"]


async def test_failover_is_counted_in_metrics_by_provider_and_reason(
    failover_gateway: Callable[..., Awaitable[TestClient]], fake: FakeState
) -> None:
    gateway = await failover_gateway(WITH_FALLBACK, RETRY_ATTEMPTS="1", RETRY_MAX_WAIT_SECONDS="0")
    fake.faults[PRIMARY] = Fault(503, {"retry-after": "0"})
    assert (await gateway.post("/v1/chat/completions", json=CHAT, headers=auth(VK))).status == 200
    text = await (await gateway.get("/metrics")).text()
    assert 'llm_gateway_retries_total{provider="openai",reason="503"} 1.0' in text
    assert 'llm_gateway_failovers_total{provider="openai",reason="503"} 1.0' in text
    assert 'llm_gateway_breaker_state{target="backup"} 0.0' in text
    assert PRIMARY not in text and BACKUP not in text


def test_keys_json_refuses_a_fallback_that_speaks_another_api(tmp_path: Path) -> None:
    key = {
        "provider": "anthropic",
        "api_key": ANT_PRIMARY,
        "fallbacks": [{"provider": "openai", "api_key": PRIMARY}],
    }
    path = tmp_path / "keys.json"
    path.write_text(json.dumps(document("http://127.0.0.1:1", **key)))
    with pytest.raises(KeysFileError, match=r"key 'failover': fallbacks\[0\].*same API"):
        build_app(Settings.from_env({"KEYS_FILE_PATH": str(path)}))


def test_keys_json_names_a_misspelt_field_inside_a_fallback(tmp_path: Path) -> None:
    key = {
        "provider": "openai",
        "api_key": PRIMARY,
        "fallbacks": [{"provider": "backup", "api_kye": BACKUP}],
    }
    path = tmp_path / "keys.json"
    path.write_text(json.dumps(document("http://127.0.0.1:1", **key)))
    with pytest.raises(KeysFileError, match=r"fallbacks\[0\]\.api_kye.*did you mean"):
        build_app(Settings.from_env({"KEYS_FILE_PATH": str(path)}))


@pytest.mark.parametrize("attempts", ["0", "1", "2"])
@pytest.mark.parametrize("status", [500, 503, 429])
async def test_a_pool_key_failing_passes_to_a_healthy_key_at_once_whatever_retry_attempts(
    failover_gateway: Callable[..., Awaitable[TestClient]],
    fake: FakeState,
    records: Callable[..., Awaitable[list[dict[str, Any]]]],
    attempts: str,
    status: int,
) -> None:
    """Before, a 5xx with retry-after: 7 on a pool key made RETRY_ATTEMPTS=1 wait 7 s before
    the healthy key was tried (and with 0 the client got the 5xx: the other key never asked)."""
    key = {"provider": "openai", "api_keys": [{"api_key": k} for k in POOL[:2]]}
    gateway = await failover_gateway(key, QUOTA_ENABLED="false", RETRY_ATTEMPTS=attempts)
    clock = waits_on_a_clock(gateway)
    started = clock.now
    fake.faults[POOL[0]] = Fault(status, {"retry-after": "7"})
    response = await gateway.post("/v1/chat/completions", json=CHAT, headers=auth(VK))
    assert response.status == 200
    assert clock.now == started  # no wait: another key was there to ask
    assert keys_seen(fake) == [POOL[0], POOL[1]]
    [line] = await records(1)
    assert [(a["key"], a["status"]) for a in line["attempts"]] == [
        ("openai#1", status),
        ("openai#2", 200),
    ]


@pytest.mark.parametrize(("attempts", "waited"), [("0", 0.0), ("1", 2.0), ("2", 4.0)])
async def test_a_pool_whose_every_key_fails_asks_each_once_then_waits_only_for_its_retries(
    failover_gateway: Callable[..., Awaitable[TestClient]],
    fake: FakeState,
    attempts: str,
    waited: float,
) -> None:
    key = {"provider": "openai", "api_keys": [{"api_key": k} for k in POOL]}
    gateway = await failover_gateway(key, QUOTA_ENABLED="false", RETRY_ATTEMPTS=attempts)
    clock = waits_on_a_clock(gateway)
    started = clock.now
    for real in POOL:
        fake.faults[real] = Fault(503, {"retry-after": "2"})
    response = await gateway.post("/v1/chat/completions", json=CHAT, headers=auth(VK))
    assert response.status == 503  # the last provider answer, unchanged
    assert response.headers["retry-after"] == "2"
    seen = keys_seen(fake)
    # Each key once, at once; then RETRY_ATTEMPTS more, each after the wait asked for.
    assert sorted(seen[:3]) == sorted(POOL) and len(seen) == 3 + int(attempts)
    assert clock.now - started == pytest.approx(waited)


async def test_a_provider_saying_x_should_retry_false_is_not_retried_but_failed_over(
    failover_gateway: Callable[..., Awaitable[TestClient]],
    fake: FakeState,
) -> None:
    """OpenAI's `x-should-retry: false`, which its SDKs obey whatever the status: before, the
    gateway retried that target RETRY_ATTEMPTS times all the same."""
    gateway = await failover_gateway(
        {"provider": "openai", "api_keys": [{"api_key": k} for k in POOL[:2]]},
        QUOTA_ENABLED="false",
        RETRY_ATTEMPTS="2",
    )
    clock = waits_on_a_clock(gateway)
    started = clock.now
    for real in POOL[:2]:
        fake.faults[real] = Fault(503, {"retry-after": "1", "x-should-retry": "false"})
    response = await gateway.post("/v1/chat/completions", json=CHAT, headers=auth(VK))
    assert response.status == 503 and response.headers["x-should-retry"] == "false"
    assert sorted(keys_seen(fake)) == sorted(POOL[:2])  # each key once, no retry
    assert clock.now == started

    fake.requests.clear()
    gateway = await failover_gateway(WITH_FALLBACK, RETRY_ATTEMPTS="2")
    fake.faults[PRIMARY] = Fault(500, {"retry-after": "0", "x-should-retry": "false"})
    response = await gateway.post("/v1/chat/completions", json=CHAT, headers=auth(VK))
    assert response.status == 200
    assert keys_seen(fake) == [PRIMARY, BACKUP]  # the fallback all the same


@pytest.mark.parametrize(
    "garbage", ["-5", "nan", "inf", "soon", "Mon, 01 Jan 99999999999999999999 00:00:00 GMT"]
)
async def test_a_retry_after_that_is_no_wait_counts_as_none(
    failover_gateway: Callable[..., Awaitable[TestClient]], fake: FakeState, garbage: str
) -> None:
    """Before, a negative or NaN Retry-After was read as 0 (a 429's key never rested, and a
    valid retry-after beside a NaN retry-after-ms was ignored), an infinite one as for ever,
    and a date whose year overflows failed the request: 500 internal_error."""
    key = {"provider": "openai", "api_keys": [{"api_key": k} for k in POOL[:2]]}
    gateway = await failover_gateway(key, QUOTA_ENABLED="false")
    clock = waits_on_a_clock(gateway)
    fake.faults[POOL[0]] = Fault(429, {"retry-after": garbage})

    async def asked_first_key() -> int:
        fake.requests.clear()
        for _ in range(4):
            response = await gateway.post("/v1/chat/completions", json=CHAT, headers=auth(VK))
            assert response.status == 200
        return keys_seen(fake).count(POOL[0])

    assert await asked_first_key() == 1  # then it rests, as after a 429 naming no wait
    clock.advance(30)  # RATE_LIMITED_REST_SECONDS
    assert await asked_first_key() == 1  # and comes back

    fake.requests.clear()
    gateway = await failover_gateway({"provider": "openai", "api_key": PRIMARY}, RETRY_ATTEMPTS="1")
    clock = waits_on_a_clock(gateway)
    started = clock.now
    fake.faults[PRIMARY] = Fault(503, {"retry-after-ms": garbage, "retry-after": "3"}, times=1)
    response = await gateway.post("/v1/chat/completions", json=CHAT, headers=auth(VK))
    assert response.status == 200
    assert clock.now - started == pytest.approx(3.0)  # the valid one of the two


async def test_a_primary_host_dropping_connection_attempts_is_failed_over_in_seconds(
    aiohttp_client: Callable[..., Awaitable[TestClient]],
    tmp_path: Path,
    fake_base: str,
    log_path: Path,
    fake: FakeState,
    records: Callable[..., Awaitable[list[dict[str, Any]]]],
    loop_clock: LoopClock,
) -> None:
    """A provider host that drops connection attempts (down, firewalled, a route lost): the
    OpenAI and Anthropic SDKs give a connection 5 seconds within their 600, and so does the
    gateway now, so the fallback answers. A connection was given all of REQUEST_TIMEOUT
    (600 s): each request waited for the kernel's SYN retries (about two minutes), then
    REQUEST_TIMEOUT, before the fallback was tried."""
    dead = socket.socket()
    dead.bind(("127.0.0.2", 0))
    dead.listen(0)
    filler = socket.socket()  # a backlog of one, taken: the kernel drops any further SYN
    filler.connect(dead.getsockname())
    keys = document(fake_base, **WITH_FALLBACK)
    keys["providers"]["openai"]["base_url"] = f"http://127.0.0.2:{dead.getsockname()[1]}/v1"
    path = tmp_path / "keys.json"
    path.write_text(json.dumps(keys))
    settings = Settings.from_env(
        {"KEYS_FILE_PATH": str(path), "LOG_TO_FILE": "true", "LOG_FILE_PATH": str(log_path)}
    )
    gateway = await aiohttp_client(build_app(settings))
    try:
        asking = asyncio.ensure_future(
            gateway.post("/v1/chat/completions", json=CHAT, headers=auth(VK))
        )

        def answered() -> bool:
            loop_clock.advance(0.5)  # the connection's wait passes, nothing else's
            return asking.done()

        await until(answered, within=1000.0)
        response = asking.result()
        assert response.status == 200
        assert keys_seen(fake) == [BACKUP]
        [line] = await records(1)
        assert line["target"] == "backup"
        assert "could not connect within 5 seconds" in line["attempts"][0]["error"]
    finally:
        filler.close()
        dead.close()


async def test_a_key_out_of_credit_rests_and_its_fallback_or_pools_next_key_answers(
    failover_gateway: Callable[..., Awaitable[TestClient]],
    fake: FakeState,
    records: Callable[..., Awaitable[list[dict[str, Any]]]],
) -> None:
    """402 is a key's account out of credit (Anthropic's billing_error, OpenRouter's and
    DeepSeek's insufficient balance), as OpenAI's 429 insufficient_quota is: another key or
    target may have some. The fallback answers (a target's one key is asked again by the next
    request, as after a 429: it is never set aside); a pool's next key answers, the key
    resting; with nowhere else to go the 402 reaches the client unchanged. It went to the
    client as any 4xx, the fallback and the pool's other keys unasked."""
    gateway = await failover_gateway(WITH_FALLBACK)
    fake.faults[PRIMARY] = Fault(402)
    for _ in range(2):
        response = await gateway.post("/v1/chat/completions", json=CHAT, headers=auth(VK))
        assert response.status == 200, await response.text()
    assert keys_seen(fake) == [PRIMARY, BACKUP, PRIMARY, BACKUP]
    first = (await records(2))[0]
    assert [(a["target"], a["status"]) for a in first["attempts"]] == [
        ("openai", 402),
        ("backup", 200),
    ]
    health = await (await gateway.get("/health")).json()
    assert health["targets"]["openai"]["state"] == "closed"  # the account's, not the target's
    fake.requests.clear()
    pooled = await failover_gateway(
        {"provider": "openai", "api_keys": [{"api_key": key} for key in POOL[:2]]}
    )
    fake.faults[POOL[0]] = Fault(402)
    for _ in range(3):
        response = await pooled.post("/v1/chat/completions", json=CHAT, headers=auth(VK))
        assert response.status == 200
    assert keys_seen(fake).count(POOL[0]) <= 1
    fake.requests.clear()
    alone = await failover_gateway({"provider": "openai", "api_key": PRIMARY})
    response = await alone.post("/v1/chat/completions", json=CHAT, headers=auth(VK))
    assert response.status == 402
    assert keys_seen(fake) == [PRIMARY]


@pytest.mark.parametrize("status", [401, 403])
async def test_a_targets_lone_key_refused_by_its_provider_is_failed_over_to_the_fallback(
    failover_gateway: Callable[..., Awaitable[TestClient]],
    fake: FakeState,
    records: Callable[..., Awaitable[list[dict[str, Any]]]],
    status: int,
) -> None:
    """The target's real key revoked or expired at the provider: the client's virtual key was
    good, and its SDK raised AuthenticationError for the operator's key while the fallback,
    another key, was never asked (a pool's keys all refused already failed over). The
    fallback answers; with nowhere else to go the refusal reaches the client unchanged."""
    gateway = await failover_gateway(WITH_FALLBACK)
    fake.faults[PRIMARY] = Fault(status)
    client = openai.AsyncOpenAI(api_key=VK, base_url=str(gateway.make_url("/v1")), max_retries=0)
    answer = await client.chat.completions.create(**CHAT)
    assert answer.choices[0].message.content
    assert keys_seen(fake) == [PRIMARY, BACKUP]
    (line,) = await records(1)
    assert [(a["target"], a["status"]) for a in line["attempts"]] == [
        ("openai", status),
        ("backup", 200),
    ]
    health = await (await gateway.get("/health")).json()
    assert health["targets"]["openai"]["failures_in_a_row"] == 0  # the key's, not the target's
    fake.requests.clear()
    alone = await failover_gateway({"provider": "openai", "api_key": PRIMARY})
    response = await alone.post("/v1/chat/completions", json=CHAT, headers=auth(VK))
    assert response.status == status
    assert keys_seen(fake) == [PRIMARY]


LOW_CREDIT = (
    "Your credit balance is too low to access the Anthropic API. "
    "Please go to Plans & Billing to upgrade or purchase credits."
)


async def test_an_anthropic_key_out_of_credit_answering_400_is_passed_over_like_a_402(
    failover_gateway: Callable[..., Awaitable[TestClient]],
    fake: FakeState,
    records: Callable[..., Awaitable[list[dict[str, Any]]]],
) -> None:
    """Anthropic answers an account out of credit with 400 invalid_request_error "Your credit
    balance is too low", not its 402 billing_error: the pool's next key or the fallback
    answers all the same; any other 400 still goes to the client as it came, and with
    nowhere else to go this one too."""
    key = {
        "provider": "anthropic",
        "api_key": ANT_PRIMARY,
        "fallbacks": [{"provider": "ant-backup", "api_key": ANT_BACKUP}],
    }
    gateway = await failover_gateway(key)
    fake.faults[ANT_PRIMARY] = Fault(400, message=LOW_CREDIT)
    client = anthropic.AsyncAnthropic(api_key=VK, base_url=str(gateway.make_url("")), max_retries=0)
    answer = await client.messages.create(**MESSAGES)
    assert answer.content
    assert keys_seen(fake) == [ANT_PRIMARY, ANT_BACKUP]
    (line,) = await records(1)
    assert [(a["target"], a["status"]) for a in line["attempts"]] == [
        ("anthropic", 400),
        ("ant-backup", 200),
    ]
    fake.requests.clear()
    fake.faults[ANT_PRIMARY] = Fault(400)  # a request's own fault: the same everywhere
    with pytest.raises(anthropic.BadRequestError) as refused:
        await client.messages.create(**MESSAGES)
    assert refused.value.body["error"]["message"] == "fake provider error 400"  # type: ignore[index]
    assert keys_seen(fake) == [ANT_PRIMARY]

    fake.requests.clear()
    pooled = await failover_gateway(
        {"provider": "anthropic", "api_keys": [{"api_key": k} for k in (ANT_PRIMARY, ANT_BACKUP)]}
    )
    fake.faults[ANT_PRIMARY] = Fault(400, message=LOW_CREDIT)
    for _ in range(3):
        response = await pooled.post("/v1/messages", json=MESSAGES, headers=auth(VK))
        assert response.status == 200, await response.text()
    assert keys_seen(fake).count(ANT_PRIMARY) == 1  # then it rests

    fake.requests.clear()
    alone = await failover_gateway({"provider": "anthropic", "api_key": ANT_PRIMARY})
    response = await alone.post("/v1/messages", json=MESSAGES, headers=auth(VK))
    assert response.status == 400
    assert (await response.json())["error"]["message"] == LOW_CREDIT
    assert keys_seen(fake) == [ANT_PRIMARY]


async def test_a_gemini_pool_key_google_calls_not_valid_rests_like_a_401(
    failover_gateway: Callable[..., Awaitable[TestClient]], fake: FakeState
) -> None:
    """Google answers a revoked or expired API key with 400 INVALID_ARGUMENT ("API key not
    valid", reason API_KEY_INVALID), not 401: in a pool that key rests as a refused one does,
    and the pool's other key answers; any other 400 goes to the client as it came."""
    gateway = await failover_gateway(
        {"provider": "gemini", "api_keys": [{"api_key": key} for key in POOL[:2]]}
    )
    fake.faults[POOL[0]] = Fault(400, message="API key not valid. Please pass a valid API key.")
    gemini = {**CHAT, "model": "gemini-2.5-flash"}
    for _ in range(4):
        response = await gateway.post("/v1/chat/completions", json=gemini, headers=auth(VK))
        assert response.status == 200, await response.text()
    assert keys_seen(fake).count(POOL[0]) == 1  # then it rests
    fake.requests.clear()
    fake.faults[POOL[1]] = Fault(400)  # a request's own fault: the same everywhere
    response = await gateway.post("/v1/chat/completions", json=gemini, headers=auth(VK))
    assert response.status == 400
    assert keys_seen(fake) == [POOL[1]]


async def test_an_openai_key_whose_quota_is_spent_rests_like_a_402_and_is_not_retried(
    failover_gateway: Callable[..., Awaitable[TestClient]], fake: FakeState
) -> None:
    """OpenAI's 429 insufficient_quota is the account out of credit, not a rate of the
    moment: its Retry-After is no promise. The key rests as after a 402 (five minutes), and
    RETRY_ATTEMPTS does not ask it again."""
    spent = Fault(429, code="insufficient_quota")  # the fake's 429s say Retry-After: 7
    pooled = await failover_gateway(
        {"provider": "openai", "api_keys": [{"api_key": key} for key in POOL[:2]]}
    )
    clock = waits_on_a_clock(pooled)
    fake.faults[POOL[0]] = spent
    for _ in range(3):
        response = await pooled.post("/v1/chat/completions", json=CHAT, headers=auth(VK))
        assert response.status == 200
    clock.advance(60)  # past its Retry-After, within a refused key's rest
    for _ in range(3):
        response = await pooled.post("/v1/chat/completions", json=CHAT, headers=auth(VK))
        assert response.status == 200
    assert keys_seen(fake).count(POOL[0]) == 1
    fake.requests.clear()
    alone = await failover_gateway({"provider": "openai", "api_key": PRIMARY}, RETRY_ATTEMPTS="2")
    waits_on_a_clock(alone)
    fake.faults[PRIMARY] = spent
    response = await alone.post("/v1/chat/completions", json=CHAT, headers=auth(VK))
    assert response.status == 429
    assert (await response.json())["error"]["code"] == "insufficient_quota"
    assert keys_seen(fake) == [PRIMARY]  # asked once: its quota comes back no sooner


async def test_a_gemini_key_rests_for_the_retry_delay_google_puts_in_its_429s_body(
    failover_gateway: Callable[..., Awaitable[TestClient]], fake: FakeState
) -> None:
    """Gemini says how long to wait in its 429's body (a RetryInfo detail, `retryDelay`),
    with no Retry-After header: the key rests that long, not the 30 s of a 429 silent on it."""
    pooled = await failover_gateway(
        {"provider": "gemini", "api_keys": [{"api_key": key} for key in POOL[:2]]}
    )
    clock = waits_on_a_clock(pooled)
    fake.faults[POOL[0]] = Fault(429, {"retry-after": ""}, retry_delay="52s")
    gemini = {**CHAT, "model": "gemini-2.5-flash"}

    async def asked_first_key(times: int) -> int:
        fake.requests.clear()
        for _ in range(times):
            response = await pooled.post("/v1/chat/completions", json=gemini, headers=auth(VK))
            assert response.status == 200
        return keys_seen(fake).count(POOL[0])

    assert await asked_first_key(3) == 1
    clock.advance(40)  # past a silent 429's 30 s, within the 52 s asked
    assert await asked_first_key(3) == 0
    clock.advance(15)
    del fake.faults[POOL[0]]
    assert await asked_first_key(4) >= 1
