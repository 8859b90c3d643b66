"""Two gateway processes on one Redis share the response cache: an answer stored by one is a
hit on the other, with the key's TTL set on the entry in Redis, hits counted for both, and
identical requests in flight on both go upstream once. And the Redis store itself, against
a real Redis: what one instance stores another reads, claims are exclusive, drops keep the
shared totals."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import orjson
import pytest
import redis
from aiohttp.test_utils import TestClient

from proxy.app import CACHE
from proxy.cache.entry import Entry, encode
from proxy.cache.redis_store import RedisStore
from proxy.cache.store import StoreUnavailable
from tests.conftest import OPENAI_REAL, auth, keys_document
from tests.support.fake_provider import FakeState
from tests.support.polling import until
from tests.support.processes import Processes, start_gateway
from tests.support.redis_server import MovingAddress, RedisServer, failed_over, standby_of

CACHED_VK = "vk_test_cached_process_6f8a0c2e4b"
ADMIN = "admin-token-for-cache-tests"
TTL = 120
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "say hello please"}]}
# The cached key's entry in keys.json (a plain OpenAI key with a cache).
CACHED_ENTRY = {
    "provider": "openai",
    "api_key": OPENAI_REAL,
    "name": "cached",
    "cache": {"ttl_seconds": TTL},
}


def cached_keys(tmp_path: Path, fake_url: str) -> Path:
    document = keys_document(fake_url)
    document["virtual_keys"][CACHED_VK] = CACHED_ENTRY
    path = tmp_path / "cached-keys.json"
    path.write_text(json.dumps(document))
    return path


def two_gateways(processes: Processes, tmp_path: Path, fake_url: str, redis_url: str) -> list[str]:
    keys = cached_keys(tmp_path, fake_url)
    return [
        start_gateway(processes, keys, tmp_path / f"log{index}.jsonl", REDIS_URL=redis_url)[1]
        for index in range(2)
    ]


async def ask(
    session: aiohttp.ClientSession, url: str, document: dict[str, object] = CHAT, **headers: str
) -> tuple[str, bytes]:
    async with session.post(
        f"{url}/v1/chat/completions",
        data=orjson.dumps(document),
        headers={"Authorization": f"Bearer {CACHED_VK}", **headers},
    ) as response:
        assert response.status == 200
        return response.headers["x-llm-gateway-cache"], await response.read()


async def test_an_answer_stored_by_one_gateway_is_a_hit_on_the_other(
    processes: Processes, tmp_path: Path, fake_url: str, redis_url: str, raw_redis: redis.Redis
) -> None:
    first, second = two_gateways(processes, tmp_path, fake_url, redis_url)
    async with aiohttp.ClientSession() as session:
        miss = await ask(session, first)
        assert miss[0] == "miss"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 15  # only bounds a failure (loaded cores)
        while not raw_redis.keys("llm-gateway:cache:k:*"):  # stored after the answer went out
            assert loop.time() < deadline, "the answer never reached Redis"
            await asyncio.sleep(0.01)
        hit = await ask(session, second)
        assert hit == ("hit", miss[1])  # the fake's fresh id per answer: only a replay repeats it
        again = await ask(session, first)
        assert again == ("hit", miss[1])
        # Both gateways' hits, each counted when its request settled (after its answer went out).
        hits, deadline = 0, loop.time() + 15
        while hits != 2 and loop.time() < deadline:
            async with session.get(
                f"{second}/usage", headers={"Authorization": f"Bearer {CACHED_VK}"}
            ) as usage:
                hits = (await usage.json())["cache"]["hits"]
            await asyncio.sleep(0.01)
        assert hits == 2
    [entry] = raw_redis.keys("llm-gateway:cache:k:*")
    assert 0 < raw_redis.pttl(entry) <= TTL * 1000


async def test_identical_requests_in_flight_on_two_gateways_go_upstream_once(
    processes: Processes, tmp_path: Path, fake_url: str, redis_url: str
) -> None:
    gateways = two_gateways(processes, tmp_path, fake_url, redis_url)
    stream = {**CHAT, "stream": True}
    # The first answer takes 1.5 s to stream: every other request arrives while it is in flight.
    slow = {"x-fake-chunks": "5", "x-fake-delay-ms": "300"}
    async with aiohttp.ClientSession() as session:
        answers = await asyncio.gather(
            *(ask(session, gateways[index % 2], stream, **slow) for index in range(10))
        )
    assert sorted(cached for cached, _ in answers) == ["hit"] * 9 + ["miss"]
    assert len({body for _, body in answers}) == 1


async def test_the_redis_store_keeps_drops_and_claims_as_the_memory_store_does(
    redis_url: str, raw_redis: redis.Redis
) -> None:
    entry = Entry(200, "OK", (("Content-Type", "application/json"),), (b"{}",))
    first, other = RedisStore(redis_url), RedisStore(redis_url)
    try:
        asked = time.time()
        await first.put("k:a:1", entry, 60, "k:a:", asked)
        await first.put("k:a:2", entry, 0.05, "k:a:", asked)  # gone from Redis in 50 ms
        await first.put("s:b:1", entry, 60, "s:b:", asked)
        assert await other.get("k:a:1") == entry  # another instance reads it
        assert first.size()[0] == 3
        assert await first.claim("k:a:9", 5) and not await other.claim("k:a:9", 5)
        assert await other.is_claimed("k:a:9")
        await other.release("k:a:9")  # not its claim: it stays
        assert await other.is_claimed("k:a:9")
        await first.release("k:a:9")
        assert not await other.is_claimed("k:a:9")
        raw_redis.set("llm-gateway:cache:k:a:3", "not an entry")
        assert await first.get("k:a:3") is None  # a miss, never an error
        assert await other.drop("k:a:", asked + 1) == 2
        assert other.size() == (1, len(encode(entry)))  # the shared totals: s:b:1 alone
        assert await first.get("k:a:1") is None and await first.get("s:b:1") == entry
        # An answer asked for before the drop (in flight on any instance) is not kept after
        # it; one asked for after it is, and another scope's never was kept out.
        await first.put("k:a:1", entry, 60, "k:a:", asked + 0.5)
        await first.put("s:b:2", entry, 60, "s:b:", asked + 0.5)
        assert await other.get("k:a:1") is None and await other.get("s:b:2") == entry
        assert first.size() == (2, 2 * len(encode(entry)))
        await first.put("k:a:1", entry, 60, "k:a:", asked + 2)
        assert await other.get("k:a:1") == entry
        await first.add_hit("key1")
        await other.add_hit("key1")
        assert await first.hits("key1") == 2
    finally:
        await first.close()
        await other.close()


async def test_after_a_failover_the_store_writes_to_the_new_primary(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    # The old primary, made a replica, keeps the pool's connections and answers each write
    # READONLY. Before, the pool kept those connections: every store failed (answers went
    # uncached) for as long as they lived.
    standby = standby_of(redis_server, tmp_path)
    entry = Entry(200, "OK", (("Content-Type", "application/json"),), (b"{}",))
    try:
        with MovingAddress(redis_server.port) as address:
            store = RedisStore(address.url)
            try:
                await store.put("k:a:1", entry, 60, "k:a:", time.time())
                with failed_over(redis_server, standby, address):
                    with pytest.raises(StoreUnavailable, match="read only replica"):
                        await store.put("k:a:2", entry, 60, "k:a:", time.time())
                    await store.put("k:a:2", entry, 60, "k:a:", time.time())
                    assert await store.get("k:a:2") == entry
            finally:
                await store.close()
    finally:
        standby.kill()


async def test_an_answer_redis_would_not_store_leaves_no_claim_that_holds_up_the_next(
    gateway_with_keys: Callable[..., Awaitable[TestClient]],
    redis_server: RedisServer,
    raw_redis: redis.Redis,
) -> None:
    # The store of a miss's answer failed (Redis out of memory for a moment, a failover, a
    # timeout on a large entry): its claim was never let go, and the next identical request,
    # on any instance, this one too, waited for an answer that never came, REQUEST_TIMEOUT
    # (10 minutes by default), before it went upstream.
    gateway = await gateway_with_keys(
        {CACHED_VK: CACHED_ENTRY}, REDIS_URL=redis_server.url, QUOTA_ENABLED="false"
    )
    headers = {**auth(CACHED_VK), "x-fake-chunks": "4", "x-fake-delay-ms": "300"}
    stream = {**CHAT, "stream": True}
    try:
        async with gateway.post("/v1/chat/completions", json=stream, headers=headers) as first:
            assert first.headers["x-llm-gateway-cache"] == "miss"
            await first.content.readany()  # the claim is Redis's: set before upstream
            raw_redis.config_set("maxmemory", 1)  # noeviction: every write that grows refused
            await first.read()

        async def put_failed() -> bool:
            metrics = await (await gateway.get("/metrics")).text()
            return 'llm_gateway_redis_errors_total{decision="uncached"} 1.0' in metrics

        await until(put_failed, what="the store's failure counted")
    finally:
        raw_redis.config_set("maxmemory", 0)
    second = await asyncio.wait_for(
        gateway.post("/v1/chat/completions", json=stream, headers=auth(CACHED_VK)), 5
    )
    assert second.status == 200 and second.headers["x-llm-gateway-cache"] == "miss"
    await second.read()


async def test_a_redis_that_refuses_every_answer_is_said_on_stderr_once_not_only_counted(
    gateway_with_keys: Callable[..., Awaitable[TestClient]],
    raw_redis: redis.Redis,
    redis_server: RedisServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A Redis full to its maxmemory with noeviction: the claims and hit counts (and most
    # answers) the cache would store are refused, so requests go upstream (paid for). Before,
    # only a metric counted it; no line anywhere said why the cache never hit.
    gateway = await gateway_with_keys(
        {CACHED_VK: CACHED_ENTRY}, REDIS_URL=redis_server.url, QUOTA_ENABLED="false"
    )
    raw_redis.config_set("maxmemory-policy", "noeviction")
    raw_redis.config_set("maxmemory", 1)
    try:
        for _ in range(3):
            response = await gateway.post(
                "/v1/chat/completions", json=CHAT, headers=auth(CACHED_VK)
            )
            # Answered: a miss, or a hit when the put's script ran whole (a script Redis let
            # begin with a write may go past maxmemory), whichever this Redis's state gives.
            assert response.status == 200
            await response.read()

        async def counted() -> bool:
            metrics = await (await gateway.get("/metrics")).text()
            name = 'llm_gateway_redis_errors_total{decision="uncached"} '
            found = [line for line in metrics.splitlines() if line.startswith(name)]
            return bool(found) and float(found[0].split()[-1]) >= 3  # a lookup's, a store's

        await until(counted, what="each refusal counted")
    finally:
        raw_redis.config_set("maxmemory", 0)
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("cache: ")]
    assert len(said) == 1, said  # once, not per request
    assert "maxmemory" in said[0] and 'decision="uncached"' in said[0], said


class HeldReplies:
    """A hop in front of Redis that holds Redis's replies on a connection once it has carried
    a claim (`SET … claim:…`), until `let_go` is set: a claim Redis has made, whose reply is
    still on its way when the client leaves."""

    def __init__(self, port: int) -> None:
        self._port = port
        self.claim_sent, self.let_go = asyncio.Event(), asyncio.Event()
        self._server: asyncio.Server | None = None
        self.url = ""

    async def __aenter__(self) -> HeldReplies:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"redis://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.let_go.set()
        assert self._server is not None
        self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self._port)
        claimed = asyncio.Event()

        async def forward() -> None:
            while data := await reader.read(65536):
                if b"claim:" in data:
                    claimed.set()
                    self.claim_sent.set()
                up_writer.write(data)
                await up_writer.drain()
            up_writer.close()

        async def back() -> None:
            while data := await up_reader.read(65536):
                if claimed.is_set():
                    await self.let_go.wait()
                writer.write(data)
                await writer.drain()
            writer.close()

        await asyncio.gather(forward(), back(), return_exceptions=True)


async def test_a_client_leaving_while_its_claim_is_made_leaves_no_claim_behind(
    gateway_with_keys: Callable[..., Awaitable[TestClient]],
    redis_server: RedisServer,
    log_path: Path,
) -> None:
    # A client that left (its SDK's timeout, a user's Ctrl-C) while its miss's claim was on
    # its way to Redis: Redis made the claim, and nobody let go of it. Every identical request
    # after it, on every instance, waited REQUEST_TIMEOUT (10 minutes by default) for the
    # answer of a request that was gone, then went upstream.
    async with HeldReplies(redis_server.port) as hop:
        gateway = await gateway_with_keys(
            {CACHED_VK: CACHED_ENTRY}, REDIS_URL=hop.url, QUOTA_ENABLED="false"
        )
        body = orjson.dumps(CHAT)
        head = (
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: gateway\r\n"
            f"Authorization: Bearer {CACHED_VK}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        _, writer = await asyncio.open_connection(gateway.host, gateway.port)
        writer.write(head + body)
        await asyncio.wait_for(hop.claim_sent.wait(), 5)
        writer.close()  # the client leaves while Redis's answer to its claim is held

        def logged() -> list[dict[str, object]]:
            text = log_path.read_text() if log_path.exists() else ""
            return [json.loads(line) for line in text.splitlines()]

        await until(lambda: len(logged()) == 1, what="the leaver's log line")
        assert logged()[0]["status"] == 499
        hop.let_go.set()
        second = await asyncio.wait_for(
            gateway.post(
                "/v1/chat/completions",
                data=body,
                headers=auth(CACHED_VK),
                skip_auto_headers=("Accept-Encoding",),
            ),
            5,
        )  # the same bytes and headers: the same entry
        assert second.status == 200 and second.headers["x-llm-gateway-cache"] == "miss"
        await second.read()


async def test_a_claim_redis_could_not_be_told_to_let_go_of_is_let_go_of_once_it_answers(
    gateway_with_keys: Callable[..., Awaitable[TestClient]],
    redis_server: RedisServer,
    raw_redis: redis.Redis,
) -> None:
    # Redis lost for a moment (a failover, writes paused) when a miss's answer was to be
    # stored: the store failed, and so did letting go of the claim, which outlived the
    # moment (a promoted replica has it): every identical request, on every instance,
    # waited REQUEST_TIMEOUT (10 minutes by default) for an answer nobody would bring.
    gateway = await gateway_with_keys(
        {CACHED_VK: CACHED_ENTRY}, REDIS_URL=redis_server.url, QUOTA_ENABLED="false"
    )
    headers = {**auth(CACHED_VK), "x-fake-chunks": "4", "x-fake-delay-ms": "300"}
    stream = {**CHAT, "stream": True}
    async with gateway.post("/v1/chat/completions", json=stream, headers=headers) as first:
        assert first.headers["x-llm-gateway-cache"] == "miss"
        await first.content.readany()  # the claim is Redis's: set before upstream
        # Writes wait 5 s: the store and the claim's release, each given 0.5 s, both fail.
        raw_redis.execute_command("CLIENT", "PAUSE", 5000, "WRITE")
        await first.read()
    claims = "llm-gateway:cache:claim:*"
    assert raw_redis.keys(claims)
    await until(lambda: not raw_redis.keys(claims), within=15, what="the claim let go of")
    second = await asyncio.wait_for(
        gateway.post("/v1/chat/completions", json=stream, headers=auth(CACHED_VK)), 5
    )
    assert second.status == 200 and second.headers["x-llm-gateway-cache"] == "miss"
    await second.read()


async def test_after_a_drop_on_one_instance_another_does_not_serve_an_answer_begun_before(
    gateway_with_keys: Callable[..., Awaitable[TestClient]],
    redis_server: RedisServer,
    fake: FakeState,
) -> None:
    # The operator drops a key's entries on one instance while an identical request is on
    # its way upstream on another: a request arriving there after the drop joined that
    # request and was served its answer, begun before the drop, as a hit (on the instance
    # that took the drop, and without Redis, such a request is not given it: docs/cache.md).
    env = {"REDIS_URL": redis_server.url, "QUOTA_ENABLED": "false", "ADMIN_TOKEN": ADMIN}
    dropping = await gateway_with_keys({CACHED_VK: CACHED_ENTRY}, **env)
    flying = await gateway_with_keys({CACHED_VK: CACHED_ENTRY}, **env)
    body = orjson.dumps(CHAT)

    async def ask_flying(**headers: str) -> tuple[str, bytes]:
        response = await flying.post(
            "/v1/chat/completions", data=body, headers={**auth(CACHED_VK), **headers}
        )
        assert response.status == 200
        return response.headers["x-llm-gateway-cache"], await response.read()

    before = asyncio.create_task(ask_flying(**{"x-fake-hold": "1"}))  # held upstream
    await until(lambda: len(fake.requests) == 1, what="the miss upstream")
    dropped = await dropping.delete("/admin/cache?key=cached", headers=auth(ADMIN))
    assert await dropped.json() == {"dropped": 0}
    after = asyncio.create_task(ask_flying())
    try:
        await until(lambda: flying.app[CACHE].waiting() == 1, what="the request after waiting")
    finally:
        fake.release.set()  # the answer begun before the drop ends
    before_cached, before_body = await before
    after_cached, after_body = await after
    assert before_cached == after_cached == "miss"
    assert after_body != before_body  # its own answer, asked for after the drop
