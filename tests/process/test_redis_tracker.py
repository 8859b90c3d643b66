"""The Redis tracker against a real redis-server: every answer the memory tracker's, exact across
processes, and what the gateway does when Redis is lost and comes back. (The behaviours both
backends share run on both in tests/process/test_tracker.py.)"""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.quota.memory_tracker import MemoryTracker
from proxy.quota.redis_tracker import RedisTracker, check, window_keys
from proxy.quota.tracker import KINDS, Budget, Charge, Limits, TrackerUnavailable
from tests.conftest import ANTHROPIC_VK, OPENAI_VK, assert_openai_error, auth
from tests.support.bodies import CHAT
from tests.support.certificates import self_signed
from tests.support.clock import Clock
from tests.support.polling import until
from tests.support.processes import Processes, refused, start_gateway
from tests.support.redis_server import (
    MovingAddress,
    RedisServer,
    failed_over,
    free_port,
    has_redis_server,
    standby_of,
)
from tests.unit.test_memory_tracker import NO_KIND_TOTALS

KEY = "0123456789abcdef01234567"  # the shape of a key_id: a digest, never the virtual key


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def tracker(redis_url: str, clock: Clock) -> AsyncIterator[RedisTracker]:
    """A Redis tracker on a fresh server, its time stepped by `clock` instead of Redis TIME."""
    tracker = RedisTracker(redis_url, clock)
    yield tracker
    await tracker.close()


@pytest.fixture
async def real_time_tracker(redis_url: str) -> AsyncIterator[RedisTracker]:
    tracker = RedisTracker(redis_url)
    yield tracker
    await tracker.close()


# --- the memory tracker's answers, for any sequence ----------------------------------------


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    requests=st.tuples(st.integers(1, 8), st.integers(1, 8)),
    token_limit=st.none() | st.integers(1, 40),
    budget=st.none() | st.sampled_from([Budget(0.00003, 10), Budget(0.00005, 4)]),
    quota_on=st.booleans(),
    steps=st.lists(
        st.tuples(
            st.integers(0, 6),  # half-seconds to advance; the window is 10 s
            st.sampled_from(["admit", "admit", "admit", "settle", "settle", "report"]),
            st.integers(0, 20),  # tokens to reserve or charge
            st.integers(0, 20),  # micro-dollars to reserve or charge
            st.sampled_from(
                [0, 0, 0, 1]
            ),  # which of the two limits: a key's limit changes now and then
        ),
        max_size=60,
    ),
)
def test_every_answer_equals_the_memory_trackers_for_the_same_sequence(
    redis_url: str,
    requests: tuple[int, int],
    token_limit: int | None,
    budget: Budget | None,
    quota_on: bool,
    steps: list[tuple[int, str, int, int, int]],
) -> None:
    """Admissions (every field), reports (the whole dict): equal, step by step, with
    reservations, settles carried by the next admission, budgets, and limits that change."""
    limit_pair = [
        Limits(requests=count, tokens=token_limit, window_seconds=10) if quota_on else None
        for count in requests
    ]
    key = uuid.uuid4().hex  # the server is shared by every example

    async def run() -> None:
        clock = Clock(0.0)
        memory, shared = MemoryTracker(clock), RedisTracker(redis_url, clock)
        tickets: list[int] = []
        try:
            for half_seconds, action, tokens, micro, which in steps:
                clock.advance(half_seconds / 2)
                limits = limit_pair[which]
                if action == "admit":
                    claim = Charge(tokens, micro)
                    answer = await memory.admit(key, limits, budget, claim)
                    assert await shared.admit(key, limits, budget, claim) == answer
                    if answer.ticket:
                        tickets.append(answer.ticket)
                elif action == "settle":
                    ticket = tickets.pop(0) if tickets else 0
                    # Every kind its own count, so a kind added to the wrong field shows.
                    kinds = tuple(tokens * (index + 1) % 7 for index in range(len(KINDS)))
                    spent = Charge(tokens, micro, kinds)
                    shared.settle(key, limits, spent, ticket, budget)
                    memory.settle(key, limits, spent, ticket, budget)
                else:
                    assert await shared.report(key, limits, budget) == await memory.report(
                        key, limits, budget
                    )
            assert await shared.report(key, limit_pair[0], budget) == await memory.report(
                key, limit_pair[0], budget
            )
        finally:
            await shared.close()

    asyncio.run(run())


# --- atomic, shared, bounded ---------------------------------------------------------------


async def test_four_trackers_with_their_own_connections_share_one_limit_exactly(
    redis_url: str,
) -> None:
    limits = Limits(requests=50, tokens=None, window_seconds=3600)
    trackers = [RedisTracker(redis_url) for _ in range(4)]
    try:
        # As four processes would: each pipelining 64 admissions on its own connection, all
        # connecting at once.
        answers = await asyncio.gather(
            *(trackers[index % 4].admit(KEY, limits) for index in range(256))
        )
        assert sum(answer.admitted for answer in answers) == 50
        for tracker in trackers:
            assert (await tracker.report(KEY, limits))["totals"]["requests"] == 50
    finally:
        await asyncio.gather(*(tracker.close() for tracker in trackers))


async def test_four_trackers_share_one_budget_and_overshoot_it_by_at_most_one_request(
    redis_url: str,
) -> None:
    """200 concurrent requests against $0.01, each reserving its worst case."""
    budget = Budget(usd=0.01, window_seconds=3600)
    worst, real = Charge(0, 1200), Charge(0, 900)  # micro-dollars
    trackers = [RedisTracker(redis_url) for _ in range(4)]

    async def one(index: int) -> bool:
        tracker = trackers[index % 4]
        answer = await tracker.admit(KEY, None, budget, worst)
        if answer.admitted:
            tracker.settle(KEY, None, real, answer.ticket, budget)
        return answer.admitted

    try:
        admitted = sum(await asyncio.gather(*(one(index) for index in range(200))))
        await asyncio.gather(*(tracker.flush() for tracker in trackers))
        report = await trackers[0].report(KEY, None, budget)
    finally:
        await asyncio.gather(*(tracker.close() for tracker in trackers))
    # Admitted while spend and reservations were under 10,000 micro-dollars: nine at 1,200
    # each, a little more where settles (900 each) landed between the admissions.
    assert 9 <= admitted <= 11
    assert report["budget"]["spent_usd"] == pytest.approx(admitted * 0.0009)
    assert report["budget"]["spent_usd"] <= 0.01 + 0.0012
    assert report["budget"]["reserved_usd"] == 0


async def test_redis_time_is_the_clock_when_none_is_injected(
    real_time_tracker: RedisTracker,
) -> None:
    limits = Limits(requests=1, tokens=None, window_seconds=0.3)
    assert (await real_time_tracker.admit(KEY, limits)).admitted
    refused = await real_time_tracker.admit(KEY, limits)
    assert not refused.admitted and 0 < refused.retry_after_seconds <= 0.3
    # Redis's clock moves on its own: ask again (a refusal counts nothing) until admitted.
    deadline = time.monotonic() + 15  # only bounds a failure (loaded cores)
    while not (await real_time_tracker.admit(KEY, limits)).admitted:
        assert time.monotonic() < deadline, "the window never freed up on Redis's clock"
        await asyncio.sleep(0.01)


async def test_keys_are_named_from_the_digest_and_the_window_expires_leaving_the_totals(
    real_time_tracker: RedisTracker, raw_redis: redis.Redis
) -> None:
    limits = Limits(requests=5, tokens=100, window_seconds=0.3)
    await real_time_tracker.admit(KEY, limits)
    real_time_tracker.settle(KEY, limits, Charge(42))
    await real_time_tracker.flush()
    admissions, charges, charged, totals, *_ = window_keys(KEY)
    assert sorted(raw_redis.keys("*")) == sorted([admissions, charges, charged, totals])
    assert all(name.startswith("llm-gateway:{" + KEY + "}:") for name in window_keys(KEY))
    for name in (admissions, charges, charged):
        assert 0 < raw_redis.pttl(name) <= 300
    assert raw_redis.pttl(totals) == -1  # totals since the key was first seen
    assert int(raw_redis.get(charged)) == 42
    deadline = time.monotonic() + 15  # Redis expires the window's keys on its own clock
    while raw_redis.keys("*") != [totals]:
        assert time.monotonic() < deadline, raw_redis.keys("*")
        await asyncio.sleep(0.01)
    assert (await real_time_tracker.report(KEY, limits))["totals"] == {
        "requests": 1,
        "tokens": 42,
        "spent_usd": 0.0,
        **NO_KIND_TOTALS,
    }


async def test_a_window_lengthened_while_the_key_is_refused_keeps_its_log_for_the_new_length(
    tracker: RedisTracker, raw_redis: redis.Redis
) -> None:
    # 2 requests and 100 tokens in a minute, all spent; keys.json then says per hour. A
    # client refused meanwhile (nothing admitted, nothing written) must not see its minute's
    # log expire by the old minute's TTL and get 2 more: memory keeps it while it is asked.
    limits = Limits(requests=2, tokens=100, window_seconds=60)
    for _ in range(2):
        answer = await tracker.admit(KEY, limits)
        tracker.settle(KEY, limits, Charge(100), answer.ticket)
    await tracker.flush()
    hourly = Limits(requests=2, tokens=100, window_seconds=3600)
    assert not (await tracker.admit(KEY, hourly)).admitted
    admissions, charges, charged, *_ = window_keys(KEY)
    for name in (admissions, charges, charged):
        assert raw_redis.pttl(name) > 60_000, name


async def test_a_settle_no_admission_carries_goes_alone_and_close_still_returns(
    redis_url: str, raw_redis: redis.Redis
) -> None:
    tracker = RedisTracker(redis_url, settle_delay=0.01)
    limits = Limits(requests=5, tokens=100, window_seconds=60)
    try:
        answer = await tracker.admit(KEY, limits, None, Charge(30))
        tracker.settle(KEY, limits, Charge(12), answer.ticket)
        totals = window_keys(KEY)[3]
        deadline = time.monotonic() + 15  # only bounds a failure (loaded cores)
        while raw_redis.hget(totals, "tokens") != "12" and time.monotonic() < deadline:
            await asyncio.sleep(0.01)  # the background send, SETTLE_DELAY after the settle
        assert raw_redis.hget(totals, "tokens") == "12"
        assert raw_redis.hget(window_keys(KEY)[5], "tokens") == "0"  # the reservation released
    finally:
        await asyncio.wait_for(tracker.close(), timeout=5)  # (it once waited on itself)


async def test_a_window_sum_evicted_alone_is_counted_again_from_the_log(
    tracker: RedisTracker, raw_redis: redis.Redis
) -> None:
    limits = Limits(requests=10, tokens=100, window_seconds=60)
    tracker.settle(KEY, limits, Charge(70))
    tracker.settle(KEY, limits, Charge(40))
    raw_redis.delete(window_keys(KEY)[2])  # as maxmemory eviction could
    refused = await tracker.admit(KEY, limits)
    assert not refused.admitted and refused.remaining_tokens == 0
    assert (await tracker.report(KEY, limits))["tokens"]["used"] == 110


# --- the connection: one per tracker, pipelined, as the URL says ------------------------


async def test_one_connection_carries_every_call_and_each_answer_reaches_its_caller(
    real_time_tracker: RedisTracker, raw_redis: redis.Redis
) -> None:
    # Ten keys with ten limits: key k admits k + 1 requests, so a misrouted answer shows.
    keys = [f"{KEY[:-2]}{k:02d}" for k in range(10)]

    async def admit(k: int) -> int:
        answer = await real_time_tracker.admit(keys[k], Limits(k + 1, None, 3600))
        return answer.remaining_requests if answer.admitted else -1

    await admit(9)  # the connection open, the script loaded
    first = [asyncio.ensure_future(admit(k)) for k in range(10) for _ in range(3)]
    await asyncio.sleep(0)  # every admission sent at the end of this turn of the loop
    await asyncio.sleep(0)
    for task in first[::4]:  # callers that leave: their answers arrive and are dropped
        task.cancel()
    await asyncio.gather(*first, return_exceptions=True)
    answers = await asyncio.gather(*(admit(k) for k in range(10)))
    # Each key counted its three first admissions, the cancelled ones included (they ran).
    assert answers == [max(-1, k + 1 - 4) for k in range(9)] + [9 + 1 - 5]
    names = [client["name"] for client in raw_redis.client_list()]
    assert names.count("llm-gateway") == 1


async def test_a_full_redis_still_counts_and_charges_every_request(
    tracker: RedisTracker, raw_redis: redis.Redis
) -> None:
    # A Redis at its maxmemory with noeviction (shared with other data, and full) refuses a
    # script whose first write may grow it, and lets one that wrote already run on. Before,
    # the admissions that began by trimming their window ran, while every settle (its first
    # write a HINCRBY) and lease renewal (a ZADD) was refused: tokens went uncharged, and
    # the gateway said "the tracker is lost" and "answers again" for each request in turn.
    limits = Limits(requests=3, tokens=1000, window_seconds=60)
    assert (await tracker.admit(KEY, limits)).admitted
    raw_redis.config_set("maxmemory-policy", "noeviction")
    raw_redis.config_set("maxmemory", 1)
    tracker.settle(KEY, limits, Charge(40))
    assert (await tracker.admit(KEY, limits)).admitted  # carries the settle
    tracker.settle(KEY, limits, Charge(70))
    await tracker.flush()  # a settle alone
    assert (await tracker.admit(KEY, limits)).admitted
    assert not (await tracker.admit(KEY, limits)).admitted
    used = (await tracker.report(KEY, limits))["tokens"]["used"]
    assert used == 110
    other = "fedcba9876543210fedcba98"
    assert (await tracker.admit(other, None)).admitted  # a key without a quota: no trim first
    tracker.settle(other, None, Charge(5))
    await tracker.flush()
    assert (await tracker.report(other, None))["totals"] == {
        **NO_KIND_TOTALS,
        "requests": 1,
        "tokens": 5,
        "spent_usd": 0.0,
    }


async def test_a_password_and_a_database_in_the_url_are_used(
    redis_server: RedisServer, raw_redis: redis.Redis
) -> None:
    raw_redis.config_set("requirepass", "s3cret-pass")
    tracker = RedisTracker(f"redis://:s3cret-pass@127.0.0.1:{redis_server.port}/5")
    limits = Limits(requests=1, tokens=None, window_seconds=3600)
    try:
        assert (await tracker.admit(KEY, limits)).admitted
        assert not (await tracker.admit(KEY, limits)).admitted
    finally:
        await tracker.close()
    authed = redis.Redis(port=redis_server.port, password="s3cret-pass", db=5)
    try:
        assert authed.zcard(window_keys(KEY)[0]) == 1
        assert authed.execute_command("SELECT", 0) and authed.dbsize() == 0
    finally:
        authed.close()
    wrong = RedisTracker(f"redis://:wrong@127.0.0.1:{redis_server.port}/5")
    try:
        with pytest.raises(TrackerUnavailable, match="WRONGPASS|invalid password"):
            await wrong.admit(KEY, limits)
    finally:
        await wrong.close()


# --- Redis lost and back, at the tracker ---------------------------------------------------


async def test_a_lost_redis_fails_fast_and_the_tracker_reconnects_when_it_returns(
    redis_server: RedisServer,
) -> None:
    tracker = RedisTracker(redis_server.url)
    limits = Limits(requests=2, tokens=None, window_seconds=3600)
    try:
        assert (await tracker.admit(KEY, limits)).admitted
        redis_server.kill()
        # The first call may find its pooled connection closed before it sees the refusal.
        calls = (
            lambda: tracker.admit(KEY, limits),
            lambda: tracker.report(KEY, limits),
        )
        for index, call in enumerate(calls):
            started = time.monotonic()
            with pytest.raises(TrackerUnavailable) as lost:
                await call()
            assert time.monotonic() - started < 1.5
            assert (
                str(lost.value)
                in ("Redis: Connection refused", "Redis: Connection closed by server.")[
                    : 1 + (index == 0)
                ]
            )
        failures: list[str] = []
        tracker.on_settle_failed = failures.append
        tracker.settle(KEY, limits, Charge(5))
        await tracker.flush()  # the settle goes alone, fails, and says so
        assert failures == ["Redis: Connection refused"]
        redis_server.start()  # empty, and without the scripts: NOSCRIPT, then loaded again
        assert [(await tracker.admit(KEY, limits)).admitted for _ in range(3)] == [
            True,
            True,
            False,
        ]
    finally:
        await tracker.close()


async def test_a_hung_redis_fails_within_the_socket_timeout_and_is_used_again_after(
    redis_server: RedisServer,
) -> None:
    assert redis_server.process is not None
    tracker = RedisTracker(redis_server.url)
    limits = Limits(requests=100, tokens=None, window_seconds=3600)
    try:
        assert (await tracker.admit(KEY, limits)).admitted
        redis_server.process.send_signal(signal.SIGSTOP)
        try:
            started = time.monotonic()
            with pytest.raises(TrackerUnavailable, match="Redis: Timeout"):
                await tracker.admit(KEY, limits)
            assert time.monotonic() - started < 2.0
        finally:
            redis_server.process.send_signal(signal.SIGCONT)
        assert (await tracker.admit(KEY, limits)).admitted
    finally:
        await tracker.close()


async def test_a_primary_demoted_by_a_failover_is_left_for_the_address_s_new_primary(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    # A failover (ElastiCache, Azure Cache, a Kubernetes Service over a Redis operator)
    # moves the address to the new primary and makes the old one a replica, which keeps its
    # clients' connections and answers each write READONLY. Before, the tracker kept its
    # connection to the old primary: every admission failed for as long as it lived.
    standby = standby_of(redis_server, tmp_path)
    limits = Limits(requests=100, tokens=None, window_seconds=3600)
    try:
        with MovingAddress(redis_server.port) as address:
            tracker = RedisTracker(address.url)
            try:
                assert (await tracker.admit(KEY, limits)).admitted
                with failed_over(redis_server, standby, address):
                    # The admission on its way meets the old primary; the next, the new one.
                    with pytest.raises(TrackerUnavailable, match="READONLY"):
                        await tracker.admit(KEY, limits)
                    assert (await tracker.admit(KEY, limits)).admitted
            finally:
                await tracker.close()
    finally:
        standby.kill()


async def test_a_redis_made_a_replica_does_not_pass_for_answering_again(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    # A URL that names the node a failover demoted: every admission fails READONLY. Before,
    # /health's recheck (a PING, which a replica answers) said the tracker answered again:
    # /health turned healthy and stderr said "answers again" at each probe, "lost" at the
    # next request.
    standby = standby_of(redis_server, tmp_path)
    tracker = RedisTracker(redis_server.url)
    limits = Limits(requests=100, tokens=None, window_seconds=3600)
    try:
        await tracker.ping()
        with MovingAddress(standby.port) as unused, failed_over(redis_server, standby, unused):
            with pytest.raises(TrackerUnavailable, match="READONLY"):
                await tracker.admit(KEY, limits)
            with pytest.raises(TrackerUnavailable, match="READONLY"):
                await tracker.ping()
    finally:
        await tracker.close()
        standby.kill()


def test_check_names_what_failed_at_start(redis_server: RedisServer) -> None:
    check(redis_server.url)  # reachable: loads the scripts
    redis_server.kill()
    with pytest.raises(TrackerUnavailable, match=r"^cannot connect \(Connection refused\)$"):
        check(redis_server.url)


@pytest.mark.parametrize("slots", [(0, 8191), (0, 16383)])
def test_a_redis_cluster_of_several_shards_is_refused_at_start(
    tmp_path: Path, slots: tuple[int, int]
) -> None:
    # The tracker speaks to the one node REDIS_URL names and follows no MOVED: on a cluster
    # whose slots are spread over shards, about half the keys' admissions failed with MOVED
    # (quotas unenforced, or 503) while the start said nothing. A cluster of one shard (the
    # node holds every slot: ElastiCache with cluster mode on and one shard) works.
    if not has_redis_server():
        pytest.skip("redis-server is not installed")
    node = RedisServer(tmp_path, options=("--cluster-enabled", "yes"))
    node.start()
    try:
        with redis.Redis(port=node.port) as client:
            client.execute_command("CLUSTER", "ADDSLOTSRANGE", *slots)
        if slots == (0, 16383):
            check(node.url)
            return
        with pytest.raises(
            TrackerUnavailable, match=r"^a Redis Cluster node serving 8192 of the 16384 slots"
        ):
            check(node.url)
    finally:
        node.kill()


def test_a_user_whose_acl_denies_info_still_passes_the_start(
    redis_server: RedisServer, raw_redis: redis.Redis
) -> None:
    # INFO is a @dangerous command, which managed Redis users are often denied: the cluster
    # check (INFO cluster) must not refuse a Redis that says nothing of it.
    raw_redis.execute_command(
        "ACL", "SETUSER", "gateway", "on", ">s3cret-pass", "~llm-gateway:*", "+@all", "-@dangerous"
    )
    check(f"redis://gateway:s3cret-pass@127.0.0.1:{redis_server.port}")


async def test_a_redis_whose_certificate_is_not_trusted_is_said_so(tmp_path: Path) -> None:
    # A rediss:// URL to a Redis whose certificate the system does not trust (a private CA
    # without ssl_ca_certs): before, the start said "cannot connect (Operation not
    # permitted)" (the errno of the TLS error), sending the operator to file permissions.
    if not has_redis_server():
        pytest.skip("redis-server is not installed")
    certificate, _ = self_signed(tmp_path, "redis", "IP:127.0.0.1")
    port = free_port()
    server = subprocess.Popen(
        ["redis-server", "--port", "0", "--tls-port", str(port), "--tls-auth-clients", "no"]
        + ["--tls-cert-file", str(certificate), "--tls-key-file", str(tmp_path / "redis-key.pem")]
        + ["--save", "", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL,
    )
    trusting = f"rediss://127.0.0.1:{port}?ssl_ca_certs={certificate}"
    try:
        await until(lambda: _answers(trusting), 10.0, "the TLS redis-server answers")
        url = f"rediss://127.0.0.1:{port}"
        with pytest.raises(
            TrackerUnavailable,
            match=r"^cannot connect \(certificate verify failed: self.signed certificate\)$",
        ):
            check(url)
        tracker = RedisTracker(url)
        try:
            with pytest.raises(
                TrackerUnavailable, match=r"^Redis: certificate verify failed: self.signed"
            ):
                await tracker.admit(KEY, Limits(requests=1, tokens=None, window_seconds=60))
        finally:
            await tracker.close()
    finally:
        server.kill()
        server.wait()


def _answers(url: str) -> bool:
    try:
        check(url)
    except TrackerUnavailable:
        return False
    return True


# --- the gateway as processes sharing one Redis --------------------------------------------


def connector() -> aiohttp.TCPConnector:
    return aiohttp.TCPConnector(limit=0)  # every request at once, not 100 at a time


async def chat(session: aiohttp.ClientSession, url: str, key: str = OPENAI_VK) -> int:
    async with session.post(f"{url}/v1/chat/completions", json=CHAT, headers=auth(key)) as response:
        await response.read()
        return response.status


async def get_json(
    session: aiohttp.ClientSession, url: str, path: str, key: str | None = None
) -> Any:
    async with session.get(f"{url}{path}", headers=auth(key) if key else {}) as response:
        return await response.json()


async def redis_decisions(session: aiohttp.ClientSession, url: str) -> dict[str, float]:
    async with session.get(f"{url}/metrics") as response:
        text = await response.text()
    return {
        match[1]: float(match[2])
        for match in re.finditer(
            r'^llm_gateway_redis_errors_total\{decision="(\w+)"\} (\S+)$', text, re.M
        )
    }


async def test_two_gateway_processes_sharing_redis_admit_exactly_the_limit(
    processes: Processes, process_keys: Path, redis_url: str, tmp_path: Path
) -> None:
    gateways = [
        start_gateway(
            processes,
            process_keys,
            tmp_path / f"log{index}.jsonl",
            REDIS_URL=redis_url,
            QUOTA_LIMIT="100",
        )[1]
        for index in range(2)
    ]
    async with aiohttp.ClientSession(connector=connector()) as session:
        statuses = await asyncio.gather(
            *(chat(session, gateways[index % 2]) for index in range(400))
        )
        assert statuses.count(200) == 100 and statuses.count(429) == 300
        for url in gateways:
            usage = await get_json(session, url, "/usage", OPENAI_VK)
            assert usage["requests"]["used"] == 100 and usage["totals"]["requests"] == 100


async def test_two_workers_on_one_port_sharing_redis_admit_exactly_the_limit(
    processes: Processes, process_keys: Path, redis_url: str, tmp_path: Path
) -> None:
    _, url = start_gateway(
        processes,
        process_keys,
        tmp_path / "log.jsonl",
        REDIS_URL=redis_url,
        QUOTA_LIMIT="100",
        WORKERS="2",
    )
    async with aiohttp.ClientSession(connector=connector()) as session:
        statuses = await asyncio.gather(*(chat(session, url) for _ in range(400)))
        assert statuses.count(200) == 100 and statuses.count(429) == 300
        assert (await get_json(session, url, "/usage", OPENAI_VK))["totals"]["requests"] == 100


async def test_two_gateways_on_one_redis_overshoot_a_token_limit_by_at_most_one_request(
    processes: Processes, process_keys: Path, redis_url: str, tmp_path: Path
) -> None:
    """300 concurrent requests, 100 tokens: reservations bound the charge."""
    gateways = [
        start_gateway(
            processes,
            process_keys,
            tmp_path / f"log{index}.jsonl",
            REDIS_URL=redis_url,
            QUOTA_LIMIT="1000",
            QUOTA_TOKENS="100",
        )[1]
        for index in range(2)
    ]
    # "hi" is 1 token by the estimate, max_tokens 10: 11 reserved; the fake answers 1 + 8.
    capped = {**CHAT, "max_tokens": 10}
    reserved, real = 1 + 10, 1 + 8

    async def one(session: aiohttp.ClientSession, url: str) -> int:
        async with session.post(
            f"{url}/v1/chat/completions",
            json=capped,
            headers={**auth(OPENAI_VK), "x-fake-chunks": "8"},
        ) as response:
            await response.read()
            return response.status

    async with aiohttp.ClientSession(connector=connector()) as session:
        statuses = await asyncio.gather(
            *(one(session, gateways[index % 2]) for index in range(300))
        )
        assert set(statuses) == {200, 429}
        deadline = time.monotonic() + 15  # only bounds a failure (loaded cores)
        while True:  # each process sends its last settles within SETTLE_DELAY_SECONDS
            usage = await get_json(session, gateways[0], "/usage", OPENAI_VK)
            if usage["tokens"]["reserved"] == 0 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
        # No request let through uncounted (a Redis error would have let some through).
        assert not any((await redis_decisions(session, gateways[0])).values())
    assert usage["tokens"]["reserved"] == 0
    assert usage["tokens"]["used"] == statuses.count(200) * real
    assert 100 - reserved < usage["tokens"]["used"] <= 100 + reserved


@pytest.mark.parametrize("password", ["", ":hunter2-secret@"])
def test_redis_down_at_start_is_one_line_and_exit_2(process_keys: Path, password: str) -> None:
    address = f"127.0.0.1:{free_port()}"
    result = refused(
        {"KEYS_FILE_PATH": str(process_keys), "REDIS_URL": f"redis://{password}{address}"}
    )
    assert result.returncode == 2
    shown = f"redis://{':***@' if password else ''}{address}"
    assert (
        result.stderr.strip()
        == f"llm-gateway: REDIS_URL {shown}: cannot connect (Connection refused)"
    )


class Load:
    """Requests on a second key, all the time, through a Redis loss and return."""

    def __init__(self, session: aiohttp.ClientSession, url: str) -> None:
        self.statuses: list[int] = []
        self._session, self._url = session, url
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def _loop(self) -> None:
        while not self._stop.is_set():
            async with self._session.post(
                f"{self._url}/v1/messages",
                json={
                    "model": "claude-3-5-haiku-latest",
                    "max_tokens": 5,
                    "messages": [{"role": "user", "content": "hi"}],
                },
                headers=auth(ANTHROPIC_VK),
            ) as response:
                await response.read()
                self.statuses.append(response.status)

    def start(self, concurrency: int = 8) -> None:
        self._tasks = [asyncio.create_task(self._loop()) for _ in range(concurrency)]

    async def stop(self) -> list[int]:
        self._stop.set()
        await asyncio.gather(*self._tasks)
        return self.statuses


async def lose_and_restore_redis(
    processes: Processes,
    process_keys: Path,
    redis_server: RedisServer,
    tmp_path: Path,
    policy: str,
    while_lost: Callable[[aiohttp.ClientSession, str, list[int]], Any],
) -> tuple[list[int], str]:
    """Burst of 30 against a limit of 20 with Redis up, lost, and back; the load runs throughout.
    The load's statuses, and what the gateway said on stderr until it stopped."""
    process, url = start_gateway(
        processes,
        process_keys,
        tmp_path / "log.jsonl",
        REDIS_URL=redis_server.url,
        QUOTA_LIMIT="20",
        QUOTA_ON_REDIS_ERROR=policy,
    )
    async with aiohttp.ClientSession(connector=connector()) as session:
        load = Load(session, url)
        load.start()
        try:
            up = await asyncio.gather(*(chat(session, url) for _ in range(30)))
            assert sorted(up) == [200] * 20 + [429] * 10
            redis_server.kill()
            lost = await asyncio.gather(*(chat(session, url) for _ in range(30)))
            health = await get_json(session, url, "/health")
            assert health["status"] == "degraded"
            assert health["tracker"]["backend"] == "redis" and health["tracker"]["healthy"] is False
            assert health["tracker"]["last_error"].startswith("Redis: ")
            await while_lost(session, url, lost)
            redis_server.start()  # empty: the window starts again, enforced from the first request
            back = await asyncio.gather(*(chat(session, url) for _ in range(30)))
            assert sorted(back) == [200] * 20 + [429] * 10
            assert (await get_json(session, url, "/health"))["tracker"]["healthy"] is True
            assert (await get_json(session, url, "/usage", OPENAI_VK))["requests"]["used"] == 20
        finally:
            statuses = await load.stop()
    process.send_signal(signal.SIGTERM)
    _, err = await asyncio.to_thread(process.communicate, timeout=15)
    return statuses, err


def said_lost_and_back(err: str, policy: str) -> None:
    """One line when the tracker was lost, naming the policy; one when it answered again."""
    lost = [line for line in err.splitlines() if "quota: the tracker is lost" in line]
    assert len(lost) == 1, err[-3000:]
    assert "Redis: " in lost[0] and f"QUOTA_ON_REDIS_ERROR={policy}" in lost[0]
    back = [line for line in err.splitlines() if "quota: the tracker answers again" in line]
    assert len(back) == 1, err[-3000:]


async def test_with_allow_requests_flow_while_redis_is_lost_and_quotas_hold_again_after(
    processes: Processes, process_keys: Path, redis_server: RedisServer, tmp_path: Path
) -> None:
    async def while_lost(session: aiohttp.ClientSession, url: str, lost: list[int]) -> None:
        assert lost == [200] * 30  # let through, uncounted
        decisions = await redis_decisions(session, url)
        assert decisions.get("allow", 0) >= 30 and decisions.get("deny", 0) == 0

    load, err = await lose_and_restore_redis(
        processes, process_keys, redis_server, tmp_path, "allow", while_lost
    )
    assert load and set(load) <= {200, 429}
    said_lost_and_back(err, "allow")  # before: nothing said, only the metric and /health


async def test_with_deny_requests_get_503_while_redis_is_lost_and_recover_after(
    processes: Processes, process_keys: Path, redis_server: RedisServer, tmp_path: Path
) -> None:
    async def while_lost(session: aiohttp.ClientSession, url: str, lost: list[int]) -> None:
        assert lost == [503] * 30
        async with session.post(
            f"{url}/v1/chat/completions", json=CHAT, headers=auth(OPENAI_VK)
        ) as response:
            assert response.status == 503
            assert_openai_error(await response.json(), "quota_unavailable")
        decisions = await redis_decisions(session, url)
        assert decisions.get("deny", 0) >= 31 and decisions.get("allow", 0) == 0

    load, err = await lose_and_restore_redis(
        processes, process_keys, redis_server, tmp_path, "deny", while_lost
    )
    assert load and set(load) <= {200, 429, 503} and 503 in load
    said_lost_and_back(err, "deny")


async def test_health_turns_healthy_when_redis_returns_without_a_request_counted(
    processes: Processes, process_keys: Path, redis_server: RedisServer, tmp_path: Path
) -> None:
    # An idle gateway (or one worker that gets no quota request) said "Redis unreachable" on
    # /health until a request counted against a quota passed it: minutes after Redis was back.
    _, url = start_gateway(
        processes, process_keys, tmp_path / "log.jsonl", REDIS_URL=redis_server.url
    )
    async with aiohttp.ClientSession(connector=connector()) as session:
        assert await chat(session, url) == 200
        redis_server.kill()
        assert await chat(session, url) == 200  # let through, uncounted: the tracker is lost
        assert (await get_json(session, url, "/health"))["tracker"]["healthy"] is False
        redis_server.start()

        async def healthy() -> bool:
            report = await get_json(session, url, "/health")
            return bool(report["tracker"]["healthy"]) and report["status"] == "healthy"

        await until(healthy, within=10, what="/health healthy again with Redis back")


async def test_a_redis_password_changed_under_the_gateway_leaves_health_answering(
    processes: Processes, process_keys: Path, redis_server: RedisServer, tmp_path: Path
) -> None:
    # `CONFIG SET requirepass` (a password rotated on the Redis side first): the connection
    # open stays authenticated, a new one is refused at its handshake (NOAUTH). Before,
    # /health's recheck let that refusal escape: 500 and a traceback on stderr at each probe
    # (a liveness probe on /health restarted the pod), where it answers 200 "degraded".
    process, url = start_gateway(
        processes, process_keys, tmp_path / "log.jsonl", REDIS_URL=redis_server.url
    )
    async with aiohttp.ClientSession(connector=connector()) as session:
        assert await chat(session, url) == 200
        with redis.Redis(port=redis_server.port) as raw:
            raw.config_set("requirepass", "rotated-password")
            raw.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
        assert await chat(session, url) == 200  # let through, uncounted: the tracker is lost
        async with session.get(f"{url}/health") as response:
            assert response.status == 200, await response.text()
            health = await response.json()
        assert health["status"] == "degraded" and health["tracker"]["healthy"] is False
        assert "NOAUTH" in health["tracker"]["last_error"]
    process.send_signal(signal.SIGTERM)
    _, err = await asyncio.to_thread(process.communicate, None, 15)
    assert "Traceback" not in err, err[-3000:]
