"""The tracker's promise: the memory and the Redis backends give the same answers. Every test
here runs on both, driven by one injected clock (no test sleeps through a window).

The memory runs are unit level (`make unit` runs them; they need nothing installed), the
Redis runs are process level: a real redis-server each. What only one backend has is
tests/unit/test_memory_tracker.py and tests/process/test_redis_tracker.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest

from proxy.quota.memory_tracker import MemoryTracker
from proxy.quota.redis_tracker import RedisTracker
from proxy.quota.tracker import Admission, Budget, Charge, Limits, Owed, Tracker
from tests.support.clock import Clock
from tests.unit.test_memory_tracker import NO_KIND_TOTALS

KEY = "0123456789abcdef01234567"  # the shape of a key_id: a digest, never the virtual key
# The tokens by kind of the two settles in the report tests, summed.
KIND_TOTALS = {
    "prompt_tokens": 400,
    "completion_tokens": 100,
    "cache_read_tokens": 100,
    "cache_write_tokens": 20,
    "input_audio_tokens": 5,
    "reasoning_tokens": 10,
    "output_audio_tokens": 0,
}


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture(params=[pytest.param("memory", marks=pytest.mark.unit), "redis"])
async def tracker(request: pytest.FixtureRequest, clock: Clock) -> AsyncIterator[Tracker]:
    """The memory tracker, or a Redis tracker on a fresh redis-server; both on `clock`."""
    if request.param == "memory":
        yield MemoryTracker(clock)
        return
    shared = RedisTracker(request.getfixturevalue("redis_url"), clock)
    yield shared
    await shared.close()


@pytest.fixture
def stored(tracker: Tracker, request: pytest.FixtureRequest) -> Callable[[], int]:
    """How much the backend holds: windows in memory, keys in Redis."""
    if isinstance(tracker, MemoryTracker):
        return lambda: len(tracker)
    raw = request.getfixturevalue("raw_redis")
    return lambda: int(raw.dbsize())


async def admit_many(
    tracker: Tracker, limits: Limits, count: int, key: str = KEY
) -> list[Admission]:
    return [await tracker.admit(key, limits) for _ in range(count)]


async def test_the_request_limit_is_respected(tracker: Tracker):
    limits = Limits(requests=3, tokens=None, window_seconds=60)
    answers = await admit_many(tracker, limits, 5)
    assert [answer.admitted for answer in answers] == [True, True, True, False, False]
    assert [answer.remaining_requests for answer in answers] == [2, 1, 0, 0, 0]
    assert answers[0].remaining_tokens is None and answers[0].reset_tokens_seconds is None


async def test_a_refused_request_is_not_counted(tracker: Tracker, clock: Clock):
    limits = Limits(requests=2, tokens=None, window_seconds=10)
    await tracker.admit(KEY, limits)  # t = 0
    clock.advance(5)
    await tracker.admit(KEY, limits)  # t = 5
    clock.advance(1)
    assert not any(answer.admitted for answer in await admit_many(tracker, limits, 20))
    clock.advance(4)  # t = 10: the first admission left; the refusals at t = 6 never counted
    assert (await tracker.admit(KEY, limits)).admitted
    assert not (await tracker.admit(KEY, limits)).admitted
    assert (await tracker.report(KEY, limits))["totals"]["requests"] == 3


async def test_a_burst_at_the_end_of_one_window_and_the_start_of_the_next_cannot_exceed_the_limit(
    tracker: Tracker, clock: Clock
):
    limits = Limits(requests=10, tokens=None, window_seconds=60)
    clock.advance(59)  # the end of a fixed window [0, 60)
    assert all(answer.admitted for answer in await admit_many(tracker, limits, 10))
    clock.advance(2)  # the start of the next fixed window: a fixed counter would be empty here
    assert not any(answer.admitted for answer in await admit_many(tracker, limits, 10))
    clock.advance(57.5)  # 59.5 s after the burst: still inside the trailing window
    assert not (await tracker.admit(KEY, limits)).admitted
    clock.advance(0.5)  # exactly 60 s after the burst: it has left
    assert all(answer.admitted for answer in await admit_many(tracker, limits, 10))


async def test_200_concurrent_admits_against_a_limit_of_50_admit_exactly_50(tracker: Tracker):
    limits = Limits(requests=50, tokens=None, window_seconds=3600)
    answers = await asyncio.gather(*(tracker.admit(KEY, limits) for _ in range(200)))
    assert sum(answer.admitted for answer in answers) == 50
    assert (await tracker.report(KEY, limits))["requests"]["used"] == 50


async def test_retry_after_is_the_wait_until_the_oldest_admission_leaves(
    tracker: Tracker, clock: Clock
):
    limits = Limits(requests=2, tokens=None, window_seconds=10)
    first = await tracker.admit(KEY, limits)
    assert first.retry_after_seconds == 0.0
    assert first.reset_requests_seconds == 10.0
    clock.advance(3)
    second = await tracker.admit(KEY, limits)
    assert second.remaining_requests == 0 and second.reset_requests_seconds == 7.0
    clock.advance(1)
    refused = await tracker.admit(KEY, limits)
    assert not refused.admitted
    assert refused.retry_after_seconds == refused.reset_requests_seconds == 6.0
    clock.advance(refused.retry_after_seconds - 0.001)
    assert not (await tracker.admit(KEY, limits)).admitted
    clock.advance(0.001)
    assert (await tracker.admit(KEY, limits)).admitted


async def test_the_token_limit_admits_while_under_and_lets_the_last_request_overshoot(
    tracker: Tracker, clock: Clock
):
    limits = Limits(requests=100, tokens=100, window_seconds=60)
    assert (await tracker.admit(KEY, limits)).remaining_tokens == 100
    tracker.settle(KEY, limits, Charge(80))  # t = 0
    clock.advance(10)
    second = await tracker.admit(KEY, limits)
    assert second.admitted and second.remaining_tokens == 20
    assert second.reset_tokens_seconds == 50.0  # when the 80 leave
    tracker.settle(
        KEY, limits, Charge(50)
    )  # t = 10: 130 used, over by the last request's own tokens
    clock.advance(5)
    refused = await tracker.admit(KEY, limits)
    assert not refused.admitted
    assert refused.remaining_tokens == 0 and refused.remaining_requests == 98
    assert refused.reset_requests_seconds == 0.0  # requests are not what is full
    # Under the limit again once the 80 charged at t = 0 leave, at t = 60.
    assert refused.retry_after_seconds == refused.reset_tokens_seconds == 45.0
    clock.advance(45)
    assert (await tracker.admit(KEY, limits)).admitted


# A window's end as a float sum: `start + window` rounds so that `now - window` falls an ulp
# before `start` (about 1 pair in 100 of such decimal times).
@pytest.mark.parametrize(("start", "window"), [(844.718, 5169.37), (258420.83, 6478.7)])
async def test_a_request_exactly_a_window_after_the_last_is_admitted_whatever_the_rounding(
    tracker: Tracker, clock: Clock, start: float, window: float
) -> None:
    limits = Limits(requests=1, tokens=10, window_seconds=window)
    clock.now = start
    assert (await tracker.admit(KEY, limits)).admitted
    tracker.settle(KEY, limits, Charge(10))  # the token window full too
    refused = await tracker.admit(KEY, limits)
    assert not refused.admitted and refused.retry_after_seconds == pytest.approx(window)
    clock.now = start + window  # the admission and the charge leave, as the wait said
    answer = await tracker.admit(KEY, limits)
    assert answer.admitted, answer


async def test_the_token_wait_runs_until_the_window_is_strictly_under_the_limit(
    tracker: Tracker, clock: Clock
) -> None:
    limits = Limits(requests=10, tokens=100, window_seconds=60)
    tracker.settle(KEY, limits, Charge(30))  # t = 0
    clock.advance(10)
    tracker.settle(KEY, limits, Charge(100))  # t = 10: without the 30, exactly the limit: full
    clock.advance(5)
    refused = await tracker.admit(KEY, limits)
    assert not refused.admitted and refused.retry_after_seconds == 55.0  # when the 100 leave


async def test_retry_after_is_the_longer_of_the_request_and_token_waits(
    tracker: Tracker, clock: Clock
):
    limits = Limits(requests=1, tokens=10, window_seconds=60)
    await tracker.admit(KEY, limits)  # t = 0
    clock.advance(30)
    tracker.settle(
        KEY, limits, Charge(10)
    )  # t = 30: the tokens leave at t = 90, the request at t = 60
    refused = await tracker.admit(KEY, limits)
    assert refused.reset_requests_seconds == 30.0
    assert refused.reset_tokens_seconds == 60.0
    assert refused.retry_after_seconds == 60.0


async def test_report_gives_the_window_limits_remaining_and_totals(tracker: Tracker, clock: Clock):
    limits = Limits(requests=5, tokens=1000, window_seconds=100)
    await tracker.admit(KEY, limits)
    tracker.settle(KEY, limits, Charge(300, 0, (250, 50, 100, 20, 0, 10, 0)))
    clock.advance(40)
    await tracker.admit(KEY, limits)
    tracker.settle(KEY, limits, Charge(200, 0, (150, 50, 0, 0, 5, 0, 0)))
    clock.advance(10)
    assert await tracker.report(KEY, limits) == {
        "window_seconds": 100,
        "requests": {"used": 2, "limit": 5, "remaining": 3, "reset_seconds": 50.0},
        "tokens": {
            "used": 500,
            "reserved": 0,
            "limit": 1000,
            "remaining": 500,
            "reset_seconds": 50.0,
        },
        "totals": {"requests": 2, "tokens": 500, "spent_usd": 0.0, **KIND_TOTALS},
    }
    clock.advance(50)  # the first request and its tokens leave; the totals stay
    report = await tracker.report(KEY, limits)
    assert report["requests"] == {"used": 1, "limit": 5, "remaining": 4, "reset_seconds": 40.0}
    assert report["tokens"] == {
        "used": 200,
        "reserved": 0,
        "limit": 1000,
        "remaining": 800,
        "reset_seconds": 40.0,
    }
    assert report["totals"] == {"requests": 2, "tokens": 500, "spent_usd": 0.0, **KIND_TOTALS}


async def test_report_of_a_key_never_seen_is_empty_and_creates_nothing(
    tracker: Tracker, stored: Callable[[], int]
):
    limits = Limits(requests=5, tokens=None, window_seconds=100)
    assert await tracker.report("unseen", limits) == {
        "window_seconds": 100,
        "requests": {"used": 0, "limit": 5, "remaining": 5, "reset_seconds": 0.0},
        "tokens": {
            "used": 0,
            "reserved": 0,
            "limit": None,
            "remaining": None,
            "reset_seconds": 0.0,
        },
        "totals": {"requests": 0, "tokens": 0, "spent_usd": 0.0, **NO_KIND_TOTALS},
    }
    assert stored() == 0


async def test_keys_are_independent(tracker: Tracker):
    limits = Limits(requests=1, tokens=None, window_seconds=60)
    assert (await tracker.admit("a", limits)).admitted
    assert (await tracker.admit("b", limits)).admitted
    assert not (await tracker.admit("a", limits)).admitted


async def test_a_changed_limit_keeps_every_admission_of_the_window(tracker: Tracker, clock: Clock):
    five = Limits(requests=5, tokens=None, window_seconds=10)
    for _ in range(4):
        await tracker.admit(KEY, five)
        clock.advance(1)  # admissions at t = 0, 1, 2, 3
    two = Limits(requests=2, tokens=None, window_seconds=10)
    refused = await tracker.admit(KEY, two)  # t = 4
    assert not refused.admitted and refused.remaining_requests == 0
    assert refused.retry_after_seconds == 8.0  # under two once t = 2 leaves, at 12
    assert (await tracker.report(KEY, two))["requests"]["used"] == 4  # none forgotten
    twenty = Limits(requests=20, tokens=None, window_seconds=10)
    answers = await admit_many(tracker, twenty, 20)
    assert sum(answer.admitted for answer in answers) == 16  # room beside the four made
    clock.advance(8)  # t = 12: t = 3 and the sixteen of t = 4 are left; under two at 14
    assert (await tracker.admit(KEY, two)).retry_after_seconds == 2.0


async def test_concurrent_admissions_see_each_others_reservations(tracker: Tracker, clock: Clock):
    limits = Limits(requests=100, tokens=100, window_seconds=60)
    answers = [await tracker.admit(KEY, limits, None, Charge(30)) for _ in range(5)]
    assert [answer.admitted for answer in answers] == [True] * 4 + [False]
    assert [answer.ticket for answer in answers] == [1, 2, 3, 4, 0]
    # Full with reservations alone: nobody knows when they end, so "come back in a second".
    assert answers[4].retry_after_seconds == 1.0 and answers[4].remaining_tokens == 0
    tracker.settle(KEY, limits, Charge(10), ticket=1)  # 10 charged + 90 reserved: still full
    assert not (await tracker.admit(KEY, limits)).admitted
    tracker.settle(KEY, limits, Charge(5), ticket=2)  # 15 charged + 60 reserved
    assert (await tracker.admit(KEY, limits)).admitted
    report = await tracker.report(KEY, limits)
    assert report["tokens"]["used"] == 15 and report["tokens"]["reserved"] == 60


async def test_a_budget_admits_while_the_spend_is_under_and_says_when_it_frees_up(
    tracker: Tracker, clock: Clock
):
    budget = Budget(usd=0.001, window_seconds=100)  # 1,000 micro-dollars; buckets of 0.1 s
    first = await tracker.admit(KEY, None, budget, Charge(0, 300))
    tracker.settle(KEY, None, Charge(7, 600), first.ticket, budget)  # t = 1000.0
    clock.advance(10)
    second = await tracker.admit(KEY, None, budget, Charge(0, 300))
    assert second.admitted and second.spent_micro_usd == 900
    tracker.settle(KEY, None, Charge(7, 500), second.ticket, budget)
    refused = await tracker.admit(KEY, None, budget, Charge(0, 300))
    assert not refused.admitted and refused.over_budget and refused.spent_micro_usd == 1100
    # The first 600 leave when their bucket (1000.0 to 1000.1) is a whole window old.
    assert refused.retry_after_seconds == pytest.approx(90.1)
    clock.advance(90.1)
    assert (await tracker.admit(KEY, None, budget)).admitted
    report = await tracker.report(KEY, None, budget)
    assert report["budget"]["spent_usd"] == 0.0005
    assert report["totals"] == {"requests": 3, "tokens": 14, "spent_usd": 0.0011, **NO_KIND_TOTALS}


async def test_a_budget_window_a_reload_changes_keeps_each_spend_at_its_own_time(
    tracker: Tracker, clock: Clock
):
    # 600 spent at t = 0 under 100 s; 90 s later keys.json says 1000 s: the 600 still leaves
    # 1000 s after it was spent (its 0.1 s bucket's end, in a bucket of the new 1 s width),
    # not 1000 s after the reload. Then 50 s: it was spent 90 s ago, so it has left.
    budget = Budget(usd=0.001, window_seconds=100)
    first = await tracker.admit(KEY, None, budget, Charge(0, 300))
    tracker.settle(KEY, None, Charge(0, 600), first.ticket, budget)
    clock.advance(90)
    longer = await tracker.report(KEY, None, Budget(usd=0.001, window_seconds=1000))
    assert longer["budget"]["spent_usd"] == 0.0006
    assert longer["budget"]["reset_seconds"] == pytest.approx(911.0)
    shorter = await tracker.report(KEY, None, Budget(usd=0.001, window_seconds=50))
    assert shorter["budget"]["spent_usd"] == 0.0
    assert (await tracker.admit(KEY, None, Budget(0.0005, 50), Charge(0, 400))).admitted


async def test_deferred_work_owed_is_claimed_once_by_its_id_whoever_asks(
    tracker: Tracker,
) -> None:
    first = Owed(KEY, "origin-a", Charge(12, 340, (4, 8, 1, 0, 0, 2, 0)))
    await tracker.owe("response:openai:resp_1", first, 600)
    await tracker.owe("response:openai:resp_2", Owed("another-key-digest", "origin-b"), 600)
    assert await tracker.claim("response:openai:resp_unknown") is None
    claims = await asyncio.gather(*(tracker.claim("response:openai:resp_1") for _ in range(20)))
    assert claims.count(first) == 1 and claims.count(None) == 19  # once, however many ask
    assert await tracker.claim("response:openai:resp_2") == Owed("another-key-digest", "origin-b")
    assert await tracker.claim("response:openai:resp_2") is None
