"""Choosing a pool's key through a running gateway: latency balancing, prompt-cache affinity
(by prompt_cache_key through the openai SDK, by metadata.user_id through the anthropic SDK),
what /health, the metrics and the log line say about it.

The fake provider tells the pool's keys apart by the real key each request presents, and
holds one key's answers longer (`FakeState.slow`) to make it the slow one.
"""

from __future__ import annotations

import asyncio
import json
import random
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import openai
import pytest
from aiohttp.test_utils import TestClient

from proxy.app import FAILOVER, build_app
from proxy.settings import Settings
from tests.conftest import auth
from tests.support.bodies import chat, messages
from tests.support.clock import Clock
from tests.support.fake_provider import FakeState, Fault, credential
from tests.support.polling import until

CHAT = chat("hello")
VK = "vk_test_choice_5e7a9b1d3c"
KEYS = ("sk-choice-real-aaaaaaaaaa", "sk-choice-real-bbbbbbbbbb", "sk-choice-real-cccccccccc")


@pytest.fixture
def gateway_with(
    aiohttp_client: Callable[..., Awaitable[TestClient]],
    tmp_path: Path,
    fake_base: str,
    log_path: Path,
) -> Callable[..., Awaitable[TestClient]]:
    """A gateway whose one key is `key` (its targets), with these setting overrides."""

    async def make(key: dict[str, Any], **env: str) -> TestClient:
        path = tmp_path / "keys.json"
        document = {
            "providers": {
                "openai": {"base_url": f"{fake_base}/v1"},
                "anthropic": {"base_url": f"{fake_base}/v1"},
            },
            "virtual_keys": {VK: {"name": "choice", **key}},
        }
        path.write_text(json.dumps(document))
        settings = Settings.from_env(
            {
                "KEYS_FILE_PATH": str(path),
                "LOG_TO_FILE": "true",
                "LOG_FILE_PATH": str(log_path),
                "QUOTA_ENABLED": "false",
            }
            | env
        )
        return await aiohttp_client(
            build_app(settings), server_kwargs={"handler_cancellation": True}
        )

    return make


def pool(*weights: int, provider: str = "openai", **extra: Any) -> dict[str, Any]:
    members = [{"api_key": k, "weight": w} for k, w in zip(KEYS, weights, strict=False)]
    return {"provider": provider, "api_keys": members, **extra}


def keys_seen(fake: FakeState) -> list[str | None]:
    return [credential(seen.headers) for seen in fake.requests if seen.method == "POST"]


async def test_a_ten_times_slower_key_gets_little_of_a_latency_pool(
    gateway_with: Callable[..., Awaitable[TestClient]], fake: FakeState
) -> None:
    gateway = await gateway_with(pool(1, 1, balance="latency"))
    # Times to first byte on the test's clock, moved while the fake holds the answers: the
    # fast key's come 10 ms after they were asked, the slow key's 100 ms, whatever the load.
    clock = Clock()
    gateway.app[FAILOVER].breakers.clock = clock
    holds = {KEYS[0]: 0.010, KEYS[1]: 0.100}
    gates = {key: fake.gates.setdefault(key, asyncio.Event()) for key in holds}

    async def one() -> None:
        response = await gateway.post("/v1/chat/completions", json=CHAT, headers=auth(VK))
        assert response.status == 200
        await response.read()

    async def five() -> None:
        """Five requests at once, each key's answers let go once all five are at the fake."""
        asked, started = len(fake.requests), clock.now
        calls = [asyncio.create_task(one()) for _ in range(5)]
        await until(lambda: len(fake.requests) == asked + 5, 30, "5 requests at the fake", 0.001)
        chosen, answered = Counter(keys_seen(fake)[asked:]), 0
        for key, hold in holds.items():  # the fast key's answers first, then the slow key's
            clock.now = started + hold
            gates[key].set()
            answered += chosen[key]
            await until(lambda n=answered: sum(c.done() for c in calls) == n, 30, key, 0.001)
        await asyncio.gather(*calls)
        for gate in gates.values():
            gate.clear()

    for _ in range(200):  # 1,000 requests
        await five()
    seen = Counter(keys_seen(fake))
    assert seen[KEYS[0]] + seen[KEYS[1]] == 1000
    assert seen[KEYS[0]] >= 800, seen
    health = await (await gateway.get("/health")).json()
    members = health["targets"]["openai"]["members"]
    assert members["openai#1"]["in_flight"] == members["openai#2"]["in_flight"] == 0
    assert (members["openai#1"]["ttfb_ms"], members["openai#2"]["ttfb_ms"]) == (10.0, 100.0)


async def test_a_key_that_only_fails_is_left_aside_by_a_latency_pool(
    gateway_with: Callable[..., Awaitable[TestClient]], fake: FakeState
) -> None:
    """Before, a key answering only 5xx was never measured, so it stayed "not yet measured"
    and was tried first by every request and every retry: every client got its 500 while
    the pool's other key was healthy. A failure now counts as a first byte at the timeout."""
    gateway = await gateway_with(pool(1, 1, balance="latency"), RETRY_ATTEMPTS="1")
    fake.faults[KEYS[0]] = Fault(500, {"retry-after": "0"})
    for _ in range(20):
        response = await gateway.post("/v1/chat/completions", json=CHAT, headers=auth(VK))
        assert response.status == 200
    assert Counter(keys_seen(fake)) == {KEYS[0]: 1, KEYS[1]: 20}
    health = await (await gateway.get("/health")).json()
    assert health["targets"]["openai"]["members"]["openai#1"]["ttfb_ms"] == 600_000.0


async def test_a_failing_target_of_one_key_is_left_to_its_breaker_not_measured(
    gateway_with: Callable[..., Awaitable[TestClient]], fake: FakeState
) -> None:
    """A target's failures are its breaker's business: once it closes again (a probe's
    success), the next request may go there at once, unslowed by a measurement."""
    key = {
        "provider": "openai",
        "api_key": KEYS[0],
        "balance": "latency",
        "fallbacks": [{"provider": "openai", "api_key": KEYS[1], "model": "gpt-4o-mini"}],
    }
    gateway = await gateway_with(key)
    fake.faults[KEYS[0]] = Fault(500)
    for _ in range(3):
        response = await gateway.post("/v1/chat/completions", json=CHAT, headers=auth(VK))
        assert response.status in (200, 500)
    health = await (await gateway.get("/health")).json()
    assert health["targets"]["openai"]["members"]["openai#1"]["ttfb_ms"] is None


async def test_a_weighted_pool_ignores_speed(
    gateway_with: Callable[..., Awaitable[TestClient]], fake: FakeState
) -> None:
    gateway = await gateway_with(pool(1, 1))
    fake.slow[KEYS[1]] = 0.020
    for _ in range(20):
        assert (
            await gateway.post("/v1/chat/completions", json=CHAT, headers=auth(VK))
        ).status == 200
    assert Counter(keys_seen(fake)) == {KEYS[0]: 10, KEYS[1]: 10}


def conversations(count: int = 100) -> list[str]:
    """Conversations named as clients name them (UUIDs), the same in every run; 100 fall
    within 10 points of the weights about 19 times in 20 (tests/unit/test_choice.py checks
    the hashing over 10,000)."""
    draw = random.Random(27)
    return [str(uuid.UUID(int=draw.getrandbits(128))) for _ in range(count)]


async def homes_of(client: openai.AsyncOpenAI, fake: FakeState, names: list[str]) -> dict[str, str]:
    """Each conversation's key (the one that answered): two requests each, through the
    SDK's prompt_cache_key."""
    homes: dict[str, set[str | None]] = {}
    for _ in range(2):
        for name in names:
            fake.requests.clear()
            await client.chat.completions.create(**CHAT, prompt_cache_key=name)
            homes.setdefault(name, set()).add(keys_seen(fake)[-1])
    assert all(len(home) == 1 for home in homes.values()), homes
    return {name: str(home.pop()) for name, home in homes.items()}


async def test_a_conversation_stays_on_one_key_and_conversations_split_by_weight(
    gateway_with: Callable[..., Awaitable[TestClient]], fake: FakeState
) -> None:
    gateway = await gateway_with(pool(2, 1, 1))
    client = openai.AsyncOpenAI(api_key=VK, base_url=str(gateway.make_url("/v1")), max_retries=0)
    homes = await homes_of(client, fake, conversations())
    split = Counter(homes.values())
    assert abs(split[KEYS[0]] - 50) <= 10, split
    assert abs(split[KEYS[1]] - 25) <= 10 and abs(split[KEYS[2]] - 25) <= 10, split
    # The bytes the client sent are the bytes that went: the key is read, not removed.
    assert f'"prompt_cache_key":"{conversations()[-1]}"'.encode() in fake.requests[-1].body


async def test_a_resting_key_hands_over_only_its_conversations_and_gets_them_back(
    gateway_with: Callable[..., Awaitable[TestClient]], fake: FakeState
) -> None:
    gateway = await gateway_with(pool(2, 1, 1))
    clock = Clock()
    gateway.app[FAILOVER].breakers.clock = clock  # the rest ends when the test says so
    client = openai.AsyncOpenAI(api_key=VK, base_url=str(gateway.make_url("/v1")), max_retries=0)
    names = conversations(30)
    homes = await homes_of(client, fake, names)
    fake.faults[KEYS[1]] = Fault(429, {"retry-after": "20"}, times=1)  # it rests 20 s
    during = await homes_of(client, fake, names)
    for name in names:
        if homes[name] == KEYS[1]:
            assert during[name] != KEYS[1]
        else:
            assert during[name] == homes[name]  # the others never moved
    assert KEYS[1] in homes.values() and KEYS[1] not in during.values()
    clock.advance(21)
    assert await homes_of(client, fake, names) == homes  # back once it is usable


async def test_a_sticky_header_names_the_conversation_when_the_body_names_none(
    gateway_with: Callable[..., Awaitable[TestClient]], fake: FakeState
) -> None:
    gateway = await gateway_with(pool(1, 1, 1), POOL_STICKY_HEADER="x-session")
    for session in ("alice", "bob", "carol", "dave"):
        fake.requests.clear()
        for _ in range(5):
            headers = {**auth(VK), "x-session": session}
            assert (
                await gateway.post("/v1/chat/completions", json=CHAT, headers=headers)
            ).status == 200
        assert len(set(keys_seen(fake))) == 1
    # The body's name wins over the header's: one body name, many header values, one key.
    fake.requests.clear()
    for session in ("alice", "bob", "carol", "dave"):
        headers = {**auth(VK), "x-session": session}
        body = {**CHAT, "prompt_cache_key": "one-conversation"}
        assert (
            await gateway.post("/v1/chat/completions", json=body, headers=headers)
        ).status == 200
    assert len(set(keys_seen(fake))) == 1


async def test_a_sticky_header_keeps_a_websocket_session_on_its_conversations_key(
    gateway_with: Callable[..., Awaitable[TestClient]], fake: FakeState
) -> None:
    # Codex names its session in a `session-id` header, on its HTTP turns and on the
    # Responses API's WebSocket handshake alike: a session it opens (again: a connection
    # lasts at most an hour) goes to the key its HTTP turns went to, where the cache is.
    gateway = await gateway_with(pool(1, 1, 1), POOL_STICKY_HEADER="session-id")
    headers = {**auth(VK), "session-id": "codex-session-1"}
    turn = {"model": "gpt-4o-mini", "input": "hi"}
    assert (await gateway.post("/v1/responses", json=turn, headers=headers)).status == 200
    [home] = set(keys_seen(fake))
    for _ in range(4):
        ws = await gateway.ws_connect("/v1/responses", headers=headers)
        await asyncio.wait_for(ws.receive(), 5)  # the fake's session.created
        await ws.close()
    upgrades = [credential(seen.headers) for seen in fake.requests if seen.method == "GET"]
    assert upgrades == [home] * 4


async def test_a_key_the_provider_refuses_at_a_websocket_handshake_rests_as_over_http(
    gateway_with: Callable[..., Awaitable[TestClient]], fake: FakeState
) -> None:
    # A session's key refused (revoked: 401) is set aside as an HTTP request's is, so the
    # conversation's next session goes to another key instead of that one every time.
    gateway = await gateway_with(pool(1, 1, 1), POOL_STICKY_HEADER="session-id")
    headers = {**auth(VK), "session-id": "codex-session-2"}
    turn = {"model": "gpt-4o-mini", "input": "hi"}
    assert (await gateway.post("/v1/responses", json=turn, headers=headers)).status == 200
    [home] = set(keys_seen(fake))
    fake.faults[home] = Fault(401)
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await gateway.ws_connect("/v1/responses", headers=headers)
    assert refused.value.status == 401
    ws = await gateway.ws_connect("/v1/responses", headers=headers)
    await asyncio.wait_for(ws.receive(), 5)  # the fake's session.created
    await ws.close()
    upgrades = [credential(seen.headers) for seen in fake.requests if seen.method == "GET"]
    assert upgrades[0] == home and upgrades[1] != home


async def test_anthropic_metadata_user_id_keeps_a_conversation_on_one_key(
    gateway_with: Callable[..., Awaitable[TestClient]], fake: FakeState
) -> None:
    gateway = await gateway_with(pool(1, 1, 1, provider="anthropic", balance="latency"))
    client = anthropic.AsyncAnthropic(api_key=VK, base_url=str(gateway.make_url("")), max_retries=0)
    homes: dict[str, set[str | None]] = {}
    for _ in range(3):
        for user in ("user-a", "user-b", "user-c", "user-d", "user-e", "user-f"):
            fake.requests.clear()
            await client.messages.create(
                **messages(model="claude-haiku-4-5"), metadata={"user_id": user}
            )
            homes.setdefault(user, set()).update(keys_seen(fake))
    assert all(len(home) == 1 for home in homes.values()), homes
    assert len({key for home in homes.values() for key in home}) >= 2  # spread, not one key


async def test_the_log_line_and_the_metrics_name_the_pool_key_that_served(
    gateway_with: Callable[..., Awaitable[TestClient]],
    fake: FakeState,
    records: Callable[..., Awaitable[list[dict[str, Any]]]],
) -> None:
    gateway = await gateway_with(pool(1, 1))
    for _ in range(4):
        assert (
            await gateway.post("/v1/chat/completions", json=CHAT, headers=auth(VK))
        ).status == 200
    lines = await records(4)
    assert [line["target"] for line in lines] == ["openai#1", "openai#2"] * 2
    text = await (await gateway.get("/metrics")).text()
    for member in ("openai#1", "openai#2"):
        assert f'llm_gateway_choices_total{{member="{member}",target="openai"}} 2.0' in text
    logged = json.dumps(lines) + text
    assert not any(key in logged or key[-10:] in logged for key in KEYS)


async def test_health_sums_every_virtual_keys_use_of_a_target_key_and_shows_the_last_measured(
    aiohttp_client: Callable[..., Awaitable[TestClient]],
    tmp_path: Path,
    fake_base: str,
    log_path: Path,
    fake: FakeState,
) -> None:
    """Two virtual keys with a pool on the same target: /health's member `openai#1` is both
    pools' first key, their requests in flight summed, its time to first byte the one
    measured last (each key's first request goes to its pool's first key)."""
    path = tmp_path / "keys.json"
    first, second = VK, "vk_test_choice_other_8a6c4e2f0b"
    document = {
        "providers": {"openai": {"base_url": f"{fake_base}/v1"}},
        "virtual_keys": {
            first: {"name": "first", **pool(1, 1)},
            second: {
                "name": "second",
                "provider": "openai",
                "api_keys": [
                    {"api_key": KEYS[1]},
                    {"api_key": KEYS[2]},
                ],
            },
        },
    }
    path.write_text(json.dumps(document))
    settings = Settings.from_env(
        {"KEYS_FILE_PATH": str(path), "LOG_TO_FILE": "true", "LOG_FILE_PATH": str(log_path)}
    )
    gateway = await aiohttp_client(build_app(settings))
    clock = Clock()
    gateway.app[FAILOVER].breakers.clock = clock
    gates = {key: fake.gates.setdefault(key, asyncio.Event()) for key in KEYS[:2]}

    async def one(virtual_key: str) -> None:
        response = await gateway.post("/v1/chat/completions", json=CHAT, headers=auth(virtual_key))
        assert response.status == 200
        await response.read()

    async def member() -> dict[str, Any]:
        health = await (await gateway.get("/health")).json()
        shown: dict[str, Any] = health["targets"]["openai"]["members"]["openai#1"]
        return shown

    started = clock.now
    calls = [asyncio.create_task(one(first)), asyncio.create_task(one(second))]
    await until(lambda: len(keys_seen(fake)) == 2, 30, "both requests at the fake", 0.001)
    assert await member() == {"ttfb_ms": None, "in_flight": 2}
    clock.now = started + 0.010
    gates[KEYS[0]].set()
    await calls[0]
    assert await member() == {"ttfb_ms": 10.0, "in_flight": 1}
    clock.now = started + 0.030
    gates[KEYS[1]].set()
    await calls[1]
    assert await member() == {"ttfb_ms": 30.0, "in_flight": 0}
