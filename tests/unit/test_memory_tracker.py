"""What only the memory tracker has: windows evicted when idle, a close that forgets, every answer
checked against a naive sliding log, owed responses forgotten on its clock and bounded. Its
answers equal Redis's: tests/process/test_tracker.py runs the shared behaviours on both (its
memory runs are unit level too)."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.quota.memory_tracker import MAX_OWED, MemoryTracker
from proxy.quota.tracker import KINDS, Admission, Budget, Charge, Limits, Owed
from tests.support.clock import Clock

KEY = "key-digest-1"
NO_KIND_TOTALS = dict.fromkeys(KINDS, 0)


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


async def test_a_spent_budget_stays_spent_until_its_429_says_when_another_key_evicts_the_idle(
    tracker: MemoryTracker, clock: Clock
):
    """A budget's spend leaves at the end of its bucket plus the window, a little after the
    key's last activity plus the window: a key idle that long keeps its window (and its
    spend) until then, as Redis keeps it, so a newcomer's arrival cannot open it early."""
    limits = Limits(requests=100, tokens=None, window_seconds=60)
    budget = Budget(usd=1.0, window_seconds=1000)  # buckets of one second
    clock.now = 1000.1
    admitted = await tracker.admit(KEY, limits, budget)
    tracker.settle(KEY, limits, Charge(0, 1_000_000), admitted.ticket, budget)  # $1 at 1000.1
    clock.now = 2000.5  # the key idle for its whole budget window; its spend leaves at 2001
    refused = await tracker.admit(KEY, limits, budget)
    assert not refused.admitted and refused.retry_after_seconds == pytest.approx(0.5)
    await tracker.admit("newcomer", limits)  # a key arrives: the idle ones are evicted
    assert not (await tracker.admit(KEY, limits, budget)).admitted
    clock.now = 2001.0
    assert (await tracker.admit(KEY, limits, budget)).admitted


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


async def test_the_memory_tracker_owes_once_forgets_after_the_ttl_and_is_bounded() -> None:
    clock = Clock(0.0)
    tracker = MemoryTracker(clock=clock)
    owed = Owed("key", "origin", Charge(5, 7, (2, 3, 0, 0, 0, 0, 0)))
    await tracker.owe("resp_1", owed, 10)
    assert await tracker.claim("resp_1") == owed  # whoever asks: found by its id alone
    assert await tracker.claim("resp_1") is None  # once
    await tracker.owe("resp_2", owed, 10)
    clock.now = 10.0
    assert await tracker.claim("resp_2") is None  # expired
    for index in range(MAX_OWED + 1):
        await tracker.owe(f"resp_{index}", Owed("key", "origin"), 10)
    assert await tracker.claim("resp_0") is None  # the oldest went
    assert await tracker.claim(f"resp_{MAX_OWED}") == Owed("key", "origin")
