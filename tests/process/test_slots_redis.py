"""Slots on Redis: leases renewed while held, taken again when Redis comes back empty,
refused in one scope and so counted in none; a lost Redis under QUOTA_ON_REDIS_ERROR."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import redis
import redis.asyncio
from aiohttp.test_utils import TestClient

from proxy.app import build_app
from proxy.quota.redis_tracker import RedisTracker
from proxy.quota.tracker import Limits, Scope, TrackerUnavailable
from proxy.settings import Settings
from tests.conftest import auth, keys_document
from tests.support.redis_server import RedisServer

TEAM = Scope("team-slots", "team", "crew", None, max_in_flight=2)
KEY = Scope("key-slots", "key", "alice", Limits(10, None, 3600.0))


async def until(check: Callable[[], Awaitable[bool]], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if await check():
                return
        except TrackerUnavailable:
            pass  # Redis on its way back
        assert time.monotonic() < deadline, "the condition never held"
        await asyncio.sleep(0.02)


async def test_leases_are_taken_again_when_redis_comes_back_empty(
    redis_server: RedisServer,
) -> None:
    tracker = RedisTracker(redis_server.url)
    tracker.lease_seconds = 0.6
    done: list[str] = []
    try:
        first = await tracker.admit_scopes((KEY, TEAM), lease="a")
        assert first[1].admitted and first[1].in_flight == 1
        redis_server.kill()
        with pytest.raises(TrackerUnavailable):
            await tracker.admit_scopes((KEY, TEAM), lease="b")
        redis_server.start()  # empty: the slot is not there any more...
        assert await tracker.in_flight(TEAM) in (0, 1)

        async def held() -> bool:
            return await tracker.in_flight(TEAM) == 1

        await until(held)  # ...until the next renewal puts it back
        second = await tracker.admit_scopes((KEY, TEAM), lease="c")
        third = await tracker.admit_scopes((KEY, TEAM), lease="d")
        assert second[1].admitted and not third[1].admitted and third[1].slots_full
        assert not third[0].full  # the key had room: the team's slots refused
        # Refused by the team's slots, so counted in no window: two admissions since the restart.
        assert (await tracker.report(KEY.id, KEY.limits))["requests"]["used"] == 1
        tracker.release((KEY, TEAM), "a", lambda: done.append("a"))
        await until(lambda: asyncio.sleep(0, bool(done)))

        async def one_left() -> bool:
            return await tracker.in_flight(TEAM) == 1

        await until(one_left)
        started = time.monotonic()
        while time.monotonic() - started < 3 * tracker.lease_seconds:  # renewed, never lost
            assert await tracker.in_flight(TEAM) == 1
            await asyncio.sleep(0.1)
    finally:
        await tracker.close()


async def test_a_full_redis_still_renews_the_leases_of_slots_held(
    redis_server: RedisServer,
) -> None:
    # maxmemory with noeviction, full: the renewal's first write (a ZADD) was refused, so a
    # stream longer than a lease lost its slot and the team's max_in_flight let one more in.
    # Redis's own events say each renewal, and its clock when the first lease would have
    # ended unrenewed.
    tracker = RedisTracker(redis_server.url)
    tracker.lease_seconds = 0.6
    raw = redis.asyncio.Redis.from_url(redis_server.url)
    watching = raw.pubsub()
    try:
        assert (await tracker.admit_scopes((KEY, TEAM), lease="a"))[1].in_flight == 1
        ends = [await raw.zscore(key, "a") async for key in raw.scan_iter(_type="zset")]
        first_end = max(end for end in ends if end is not None)  # the lease's, in µs
        await raw.config_set("notify-keyspace-events", "Kz")
        await watching.psubscribe("__keyspace@*__:*")
        await raw.config_set("maxmemory-policy", "noeviction")
        await raw.config_set("maxmemory", 1)
        async with asyncio.timeout(10):  # a renewal refused: no ZADD comes, the lease ends
            while True:
                event = await watching.get_message(ignore_subscribe_messages=True, timeout=1)
                if event is None or event["data"] != b"zadd":
                    continue
                seconds, micros = await raw.time()
                if seconds * 1_000_000 + micros > first_end:
                    break
        assert await tracker.in_flight(TEAM) == 1
    finally:
        await watching.aclose()
        await raw.aclose()
        await tracker.close()


@pytest.mark.parametrize(("policy", "status"), [("deny", 503), ("allow", 200)])
async def test_a_lost_redis_applies_quota_on_redis_error_to_a_team_key(
    aiohttp_client: Callable[..., Awaitable[TestClient]],
    tmp_path: Path,
    fake_base: str,
    redis_server: RedisServer,
    policy: str,
    status: int,
) -> None:
    document = keys_document(fake_base)
    document["teams"] = {"crew": {"max_in_flight": 1}}
    document["virtual_keys"]["vk_test_crew_member_0a1b2c"] = {
        "provider": "openai",
        "api_key": "sk-crew-real-0123456",
        "name": "crew-member",
        "team": "crew",
    }
    path = tmp_path / "keys.json"
    path.write_text(json.dumps(document))
    settings = Settings.from_env(
        {
            "KEYS_FILE_PATH": str(path),
            "LOG_FILE_PATH": str(tmp_path / "log.jsonl"),
            "REDIS_URL": redis_server.url,
            "QUOTA_ON_REDIS_ERROR": policy,
        }
    )
    gateway = await aiohttp_client(build_app(settings))
    chat = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    headers = auth("vk_test_crew_member_0a1b2c")
    assert (await gateway.post("/v1/chat/completions", json=chat, headers=headers)).status == 200
    redis_server.kill()
    statuses = [
        (await gateway.post("/v1/chat/completions", json=chat, headers=headers)).status
        for _ in range(2)
    ]
    # deny: 503 each time; allow: through, uncounted (no per-process stand-in for Redis).
    assert statuses == [status, status]


async def test_a_client_sending_one_request_after_another_always_finds_its_slot(
    aiohttp_client: Callable[..., Awaitable[TestClient]],
    tmp_path: Path,
    fake_base: str,
    redis_url: str,
) -> None:
    document = keys_document(fake_base)
    document["virtual_keys"]["vk_test_one_at_a_time_0a1b"] = {
        "provider": "openai",
        "api_key": "sk-one-real-0123456",
        "name": "one-at-a-time",
        "max_in_flight": 1,
    }
    path = tmp_path / "keys.json"
    path.write_text(json.dumps(document))
    settings = Settings.from_env(
        {
            "KEYS_FILE_PATH": str(path),
            "LOG_FILE_PATH": str(tmp_path / "log.jsonl"),
            "REDIS_URL": redis_url,
        }
    )
    gateway = await aiohttp_client(build_app(settings))
    chat = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    headers = auth("vk_test_one_at_a_time_0a1b")
    statuses = []
    for _ in range(40):  # each sent the moment the previous answer is read
        response = await gateway.post("/v1/chat/completions", json=chat, headers=headers)
        await response.read()
        statuses.append(response.status)
    assert statuses == [200] * 40
