"""How a pool chooses its key, without a server: latency balancing on an injected clock
(a small simulation of requests in flight), weighted rendezvous affinity, and the order of a
plan's targets. Through the gateway: tests/app/test_choice.py."""

from __future__ import annotations

import heapq
import random
import uuid
from collections import Counter

from proxy.upstream.providers import BUILTINS
from proxy.upstream.targets import (
    LATENCY,
    Credential,
    Plan,
    Pool,
    Target,
    affinity_of,
    two_by_weight,
)
from tests.support.clock import Clock


def pool(*weights: int, balance: str = "weighted", seed: int = 7) -> Pool:
    credentials = [
        Credential(f"sk-{index}", f"openai#{index + 1}", weight)
        for index, weight in enumerate(weights)
    ]
    return Pool(credentials, balance, random.Random(seed).random)


class Traffic:
    """Requests arriving at a steady rate on `clock`, each answered after its member's time
    to first byte (in flight until then), across phases of different speeds."""

    def __init__(self, members: Pool, clock: Clock, per_second: float) -> None:
        self.members, self.clock, self.step = members, clock, 1.0 / per_second
        self.pending: list[tuple[float, int, Credential, float]] = []
        self.count = 0

    def run(self, ttfb: dict[str, float], seconds: float) -> Counter[str]:
        """`seconds` of requests with these times to first byte: how many each member got."""
        members, clock, chosen = self.members, self.clock, Counter[str]()
        end = clock.now + seconds
        while clock.now < end:
            while self.pending and self.pending[0][0] <= clock.now:
                when, _, credential, took = heapq.heappop(self.pending)
                members.measured(credential, took, when)
                members.ended(credential)
            picked = members.pick(clock.now)
            assert picked is not None
            members.began(picked)
            self.count += 1
            took = ttfb[picked.label]
            heapq.heappush(self.pending, (clock.now + took, self.count, picked, took))
            chosen[picked.label] += 1
            clock.advance(self.step)
        return chosen


def test_weighted_stays_smooth_round_robin_by_default() -> None:
    members = pool(3, 1)
    picks = [members.pick(0.0) for _ in range(8)]
    assert [c.label for c in picks if c] == ["openai#1"] * 2 + ["openai#2"] + ["openai#1"] * 3 + [
        "openai#2",
        "openai#1",
    ]


def test_a_ten_times_slower_member_gets_little_traffic_and_its_share_back_once_it_recovers() -> (
    None
):
    traffic = Traffic(pool(1, 1, balance=LATENCY), Clock(), per_second=20)
    before = traffic.run({"openai#1": 0.1, "openai#2": 1.0}, seconds=60)  # 1,200 requests
    assert before["openai#1"] >= 0.8 * before.total()
    fast = {"openai#1": 0.1, "openai#2": 0.1}  # the slow one recovers
    after = traffic.run(fast, seconds=60)  # within a minute, back toward 1:1
    assert 0.4 <= after["openai#2"] / after.total() <= 0.6
    assert 0.45 <= traffic.run(fast, seconds=60)["openai#2"] / 1200 <= 0.55  # and stays


def test_a_member_left_aside_is_measured_again_as_its_measurement_fades() -> None:
    clock = Clock()
    members = pool(1, 1, balance=LATENCY)
    fast, slow = members.credentials
    members.measured(fast, 0.1, clock.now)
    members.measured(slow, 1.0, clock.now)
    assert all(members.pick(clock.now) is fast for _ in range(20))
    for _ in range(30):  # one request a second on the fast one, none on the slow one
        clock.advance(1.0)
        members.measured(fast, 0.1, clock.now)
    assert members.pick(clock.now) is slow  # faded below the fast one's: tried again


def test_members_not_yet_measured_are_tried_first_one_request_each() -> None:
    members = pool(1, 1, 1, balance=LATENCY)
    first = members.pick(0.0)
    assert first is not None
    members.measured(first, 0.5, 0.0)
    members.began(first)
    second = members.pick(0.0)
    assert second is not None and second is not first
    members.began(second)  # unmeasured and busy: not chosen again before the third is tried
    third = members.pick(0.0)
    assert third not in (first, second)


def test_two_are_drawn_by_weight() -> None:
    members = pool(6, 2, 1, 1).credentials
    draw = random.Random(3).random
    firsts = Counter(two_by_weight(members, draw)[0].label for _ in range(10_000))
    assert 0.55 <= firsts["openai#1"] / 10_000 <= 0.65
    assert all(
        len({a.label, b.label}) == 2 for a, b in (two_by_weight(members, draw) for _ in range(1000))
    )


def conversations(count: int = 100) -> list[bytes]:
    """Conversations named as clients name them (UUIDs), the same in every run."""
    draw = random.Random(27)
    return [affinity_of(str(uuid.UUID(int=draw.getrandbits(128)))) for _ in range(count)]


def test_conversations_stay_on_one_member_and_the_split_follows_the_weights() -> None:
    members = pool(2, 1, 1)
    homes: dict[bytes, set[str]] = {}
    for _ in range(5):
        for conversation in conversations():
            picked = members.pick(0.0, conversation)
            assert picked is not None
            homes.setdefault(conversation, set()).add(picked.label)
    assert all(len(home) == 1 for home in homes.values())
    split = Counter(home.pop() for home in homes.values())
    assert abs(split["openai#1"] - 50) <= 10
    assert abs(split["openai#2"] - 25) <= 10 and abs(split["openai#3"] - 25) <= 10


def test_over_many_conversations_the_split_is_the_weights() -> None:
    # 100 conversations fall within 10 points of the weights about 19 times in 20 (a
    # binomial's spread); 10,000 show the hashing itself has no bias.
    members = pool(2, 1, 1)
    split = Counter(
        picked.label
        for conversation in conversations(10_000)
        if (picked := members.pick(0.0, conversation)) is not None
    )
    assert abs(split["openai#1"] - 5000) <= 200
    assert abs(split["openai#2"] - 2500) <= 200 and abs(split["openai#3"] - 2500) <= 200


def test_more_than_sixteen_members_each_get_conversations() -> None:
    members = pool(*[1] * 20)
    split = Counter(
        picked.label
        for conversation in conversations(4000)
        if (picked := members.pick(0.0, conversation)) is not None
    )
    assert len(split) == 20 and all(150 <= count <= 250 for count in split.values())


def test_a_resting_member_hands_over_only_its_conversations_and_gets_them_back() -> None:
    members = pool(2, 1, 1)
    home = {c: members.pick(0.0, c) for c in conversations()}
    resting = members.credentials[1]
    members.rest(resting, until=10.0)
    moved = {c: members.pick(5.0, c) for c in conversations()}
    for conversation, before in home.items():
        if before is resting:
            assert moved[conversation] is not resting
        else:
            assert moved[conversation] is before  # the others stay where they were
    assert {c: members.pick(10.0, c) for c in conversations()} == home  # back when usable


def test_a_member_added_takes_only_conversations_to_itself() -> None:
    three, four = pool(1, 1, 1), pool(1, 1, 1, 1)
    for conversation in conversations():
        before, after = three.pick(0.0, conversation), four.pick(0.0, conversation)
        assert before is not None and after is not None
        assert after.label in (before.label, "openai#4")


def test_a_conversation_goes_to_its_next_choice_when_its_member_was_tried() -> None:
    members = pool(1, 1, 1)
    conversation = affinity_of("alice")
    first = members.pick(0.0, conversation)
    assert first is not None
    second = members.pick(0.0, conversation, frozenset((first.label,)))
    assert second is not None and second is not first
    assert members.pick(0.0, conversation, frozenset((first.label,))) is second


def target(name: str) -> Target:
    return Target(name, BUILTINS["openai"], Pool([Credential("sk", f"{name}#1")]))


def test_a_latency_plan_puts_the_faster_target_first_and_skips_open_breakers() -> None:
    slow, fast = target("slow"), target("fast")
    plan = Plan((slow, fast), balance=LATENCY)
    slow.pool.measured(slow.pool.credentials[0], 1.0, 0.0)
    fast.pool.measured(fast.pool.credentials[0], 0.1, 0.0)
    assert plan.in_order(0.0, None, lambda name: True) == (fast, slow)
    assert plan.in_order(0.0, None, lambda name: name != "fast") == (slow, fast)
    listed = Plan((slow, fast))  # weighted: as listed
    assert listed.in_order(0.0, None, lambda name: True) == (slow, fast)


def test_a_latency_plan_keeps_a_conversation_on_one_target() -> None:
    targets = tuple(target(f"t{index}") for index in range(3))
    plan = Plan(targets, balance=LATENCY)
    for conversation in conversations(20):
        orders = {
            tuple(t.name for t in plan.in_order(0.0, conversation, lambda name: True))
            for _ in range(5)
        }
        assert len(orders) == 1
