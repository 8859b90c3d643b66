"""The memory tracker, driven by an injected clock: no test sleeps through a window."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.quota.memory_tracker import MemoryTracker
from proxy.quota.tracker import KINDS, Admission, Budget, Charge, Limits
from tests.support.clock import Clock

KEY = "key-digest-1"
NO_KIND_TOTALS = dict.fromkeys(KINDS, 0)
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


@pytest.fixture
def tracker(clock: Clock) -> MemoryTracker:
    return MemoryTracker(clock)


async def admit_many(
    tracker: MemoryTracker, limits: Limits, count: int, key: str = KEY
) -> list[Admission]:
    return [await tracker.admit(key, limits) for _ in range(count)]


async def test_the_request_limit_is_respected(tracker: MemoryTracker):
    limits = Limits(requests=3, tokens=None, window_seconds=60)
    answers = await admit_many(tracker, limits, 5)
    assert [answer.admitted for answer in answers] == [True, True, True, False, False]
    assert [answer.remaining_requests for answer in answers] == [2, 1, 0, 0, 0]
    assert answers[0].remaining_tokens is None and answers[0].reset_tokens_seconds is None


async def test_a_refused_request_is_not_counted(tracker: MemoryTracker, clock: Clock):
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
    tracker: MemoryTracker, clock: Clock
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


async def test_200_concurrent_admits_against_a_limit_of_50_admit_exactly_50(tracker: MemoryTracker):
    limits = Limits(requests=50, tokens=None, window_seconds=3600)
    answers = await asyncio.gather(*(tracker.admit(KEY, limits) for _ in range(200)))
    assert sum(answer.admitted for answer in answers) == 50
    assert (await tracker.report(KEY, limits))["requests"]["used"] == 50


async def test_retry_after_is_the_wait_until_the_oldest_admission_leaves(
    tracker: MemoryTracker, clock: Clock
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
    tracker: MemoryTracker, clock: Clock
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


async def test_retry_after_is_the_longer_of_the_request_and_token_waits(
    tracker: MemoryTracker, clock: Clock
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


async def test_report_gives_the_window_limits_remaining_and_totals(
    tracker: MemoryTracker, clock: Clock
):
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


async def test_report_of_a_key_never_seen_is_empty_and_creates_nothing(tracker: MemoryTracker):
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
    assert len(tracker) == 0


async def test_keys_idle_past_their_window_are_evicted_and_keep_their_totals(
    tracker: MemoryTracker, clock: Clock
):
    limits = Limits(requests=100, tokens=None, window_seconds=60)
    for index in range(1000):
        await admit_many(tracker, limits, 3, key=f"key-{index}")
        tracker.settle(f"key-{index}", limits, Charge(7))
    assert len(tracker) == 1000
    clock.advance(30)
    await tracker.admit("busy", limits)
    assert len(tracker) == 1001  # nobody is idle yet
    clock.advance(30)
    await tracker.admit("newcomer", limits)
    assert len(tracker) == 2  # "busy" is still inside its window
    assert (await tracker.report("key-7", limits))["totals"] == {
        "requests": 3,
        "tokens": 7,
        "spent_usd": 0.0,
        **NO_KIND_TOTALS,
    }
    assert (await tracker.admit("key-7", limits)).remaining_requests == 99
    assert (await tracker.report("key-7", limits))["totals"] == {
        "requests": 4,
        "tokens": 7,
        "spent_usd": 0.0,
        **NO_KIND_TOTALS,
    }


async def test_keys_are_independent(tracker: MemoryTracker):
    limits = Limits(requests=1, tokens=None, window_seconds=60)
    assert (await tracker.admit("a", limits)).admitted
    assert (await tracker.admit("b", limits)).admitted
    assert not (await tracker.admit("a", limits)).admitted


async def test_a_changed_limit_rebuilds_the_ring_and_keeps_the_newest_admissions(
    tracker: MemoryTracker, clock: Clock
):
    five = Limits(requests=5, tokens=None, window_seconds=10)
    for _ in range(4):
        await tracker.admit(KEY, five)
        clock.advance(1)  # admissions at t = 0, 1, 2, 3
    two = Limits(requests=2, tokens=None, window_seconds=10)
    refused = await tracker.admit(KEY, two)  # t = 4
    assert not refused.admitted
    assert refused.retry_after_seconds == 8.0  # the newest two are t = 2 and 3; t = 2 leaves at 12
    twenty = Limits(requests=20, tokens=None, window_seconds=10)
    answers = await admit_many(tracker, twenty, 20)
    assert sum(answer.admitted for answer in answers) == 18  # room beside the two kept
    clock.advance(8)  # t = 12: shrunk to two again, the newest two are from t = 4
    assert (await tracker.admit(KEY, two)).retry_after_seconds == 2.0


async def test_limits_must_be_positive():
    for bad in ((0, None, 60), (5, 0, 60), (5, None, 0)):
        with pytest.raises(ValueError):
            Limits(*bad)


async def test_close_forgets_every_window(tracker: MemoryTracker):
    await tracker.admit(KEY, Limits(requests=1, tokens=None, window_seconds=60))
    await tracker.close()
    assert len(tracker) == 0


@settings(max_examples=200, deadline=None)
@given(
    requests=st.integers(1, 20),
    token_limit=st.none() | st.integers(1, 50),
    steps=st.lists(
        st.tuples(st.integers(0, 12), st.sampled_from(["admit", "charge"]), st.integers(0, 30)),
        max_size=120,
    ),
)
def test_admissions_match_a_naive_sliding_log(
    requests: int, token_limit: int | None, steps: list
) -> None:
    """Against a list of every admission and charge: same verdicts, counts and waits."""
    clock = Clock(0.0)
    tracker = MemoryTracker(clock)
    limits = Limits(requests=requests, tokens=token_limit, window_seconds=10)
    admitted: list[float] = []
    charges: list[tuple[float, int]] = []

    async def run() -> None:
        for half_seconds, action, tokens in steps:
            clock.advance(half_seconds / 2)
            now = clock.now
            if action == "charge":
                tracker.settle(KEY, limits, Charge(tokens))
                charges.append((now, tokens))
                continue
            answer = await tracker.admit(KEY, limits)
            live = [stamp for stamp in admitted if now - stamp < 10]
            live_charges = [
                (stamp, count) for stamp, count in charges if now - stamp < 10 and count
            ]
            used = sum(count for _, count in live_charges)
            tokens_full = token_limit is not None and used >= token_limit
            expected = len(live) < requests and not tokens_full
            assert answer.admitted == expected
            if expected:
                admitted.append(now)
                live.append(now)
            assert answer.remaining_requests == requests - len(live)
            if not expected:
                request_wait = live[-requests] + 10 - now if len(live) >= requests else 0.0
                token_wait = 0.0
                if token_limit is not None and tokens_full:
                    left = used
                    for stamp, count in live_charges:
                        left -= count
                        if left < token_limit:
                            token_wait = stamp + 10 - now
                            break
                assert answer.retry_after_seconds == max(request_wait, token_wait)
                assert answer.retry_after_seconds > 0

    asyncio.run(run())


async def test_concurrent_admissions_see_each_others_reservations(
    tracker: MemoryTracker, clock: Clock
):
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
    tracker: MemoryTracker, clock: Clock
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
