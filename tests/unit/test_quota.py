"""The admission policy over a tracker that takes a round trip to answer, as Redis does."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

import orjson
import pytest

from proxy.errors import GatewayError, body
from proxy.quota.memory_tracker import MemoryTracker
from proxy.quota.quota import Quota
from proxy.quota.refusals import refusal
from proxy.quota.tracker import NOTHING, Admission, Budget, Charge, Limits, Scope
from proxy.record import Usage
from tests.support.clock import Clock

ROUND_TRIP_SECONDS = 0.01


class RoundTripTracker(MemoryTracker):
    """The memory tracker's answers, each after a round trip (a Redis under load takes more)."""

    async def admit_scopes(
        self, scopes: Sequence[Scope], claim: Charge = NOTHING, lease: str = ""
    ) -> tuple[Admission, ...]:
        await asyncio.sleep(ROUND_TRIP_SECONDS)
        return await super().admit_scopes(scopes, claim, lease)


@dataclass(frozen=True)
class Provider:
    name: str = "openai"


@dataclass(frozen=True)
class Key:
    """A key with slots of its own (QuotaKey's fields)."""

    scope: Scope
    name: str = "alice"
    limits: Limits | None = None
    budget: Budget | None = None
    team: None = None
    shares: bool = True
    provider: Provider = Provider()
    output_allowance: int = 0

    @property
    def id(self) -> str:
        return self.scope.id

    def scopes(self, model: str | None) -> tuple[Scope, ...]:
        return (self.scope,)


@dataclass(frozen=True)
class Peek:
    model: str | None = "gpt-4o-mini"
    prompt_tokens_estimate: int = 0
    max_output_tokens: int | None = None
    answers: int = 1
    is_generation: bool = False


async def test_a_full_cap_without_a_queue_refuses_without_saying_it_waited_for_a_slot() -> None:
    quota = Quota(RoundTripTracker())
    key = Key(Scope("key-digest-1", "key", "alice", None, max_in_flight=1))
    assert await quota.admit(key, Peek()) is not None  # holds the one slot
    with pytest.raises(GatewayError) as refused:
        await quota.admit(key, Peek())
    assert refused.value.status == 429
    assert refused.value.code == "concurrency_limit_exceeded"
    # The tracker's round trip is no wait for a slot: the key has no queue_seconds.
    assert refused.value.message == (
        "Too many requests in flight: key 'alice': 1 at once. Retry in 1 second."
    )


def test_a_refusal_says_a_one_second_wait_in_the_singular() -> None:
    admission = Admission(
        admitted=False,
        limits=Limits(requests=5, tokens=None, window_seconds=60),
        remaining_requests=0,
        reset_requests_seconds=0.4,
        remaining_tokens=None,
        reset_tokens_seconds=None,
        retry_after_seconds=0.4,
    )
    assert refusal(admission).message.endswith(
        "Retry in 1 second (an SDK retries a wait of 60 s or less by itself)."
    )
    assert refusal(admission._replace(retry_after_seconds=90.0)).message.endswith(
        "Retry in 90 seconds."
    )


async def test_requests_cheaper_than_a_micro_dollar_spend_what_they_cost_together() -> None:
    # 100 embeddings of 3 tokens at $0.02 per million: $0.00000006 each, $0.000006 in all.
    # Each rounded up to a whole micro-dollar, they spent $0.0001 of the budget: 16 times
    # their cost, and a budget of cheap requests ran out that much sooner.
    quota = Quota(MemoryTracker())
    budget = Budget(usd=1.0, window_seconds=3600)
    key = Key(Scope("key-digest-cheap", "key", "cheap", None), shares=False, budget=budget)
    for _ in range(100):
        admission = await quota.admit(key, Peek())
        quota.settle(key, admission, Usage(3, 0), 0.00000006)
    usage = await quota.tracker.report(key.id, None, budget)
    assert usage["budget"]["spent_usd"] == pytest.approx(0.000006, abs=1e-6)
    assert usage["totals"]["spent_usd"] == pytest.approx(0.000006, abs=1e-6)


async def test_a_refusal_that_requests_in_flight_took_part_in_ends_with_their_settle() -> None:
    # 50 tokens charged and 60 reserved by a request in flight: the next is refused, told to
    # come back in a second (the 50 alone leave room: not the hour until they leave). The
    # request in flight then ends using 5: the window has room, and a small request is
    # admitted. A large body must not get the remembered refusal.
    quota = Quota(MemoryTracker())
    limits = Limits(requests=100, tokens=100, window_seconds=3600)
    key = Key(Scope("key-digest-held", "key", "held", None), shares=False, limits=limits)
    capped = Peek(max_output_tokens=60, is_generation=True)
    quota.settle(key, await quota.admit(key, capped), Usage(0, 50), None)
    running = await quota.admit(key, capped)
    with pytest.raises(GatewayError) as refused:
        await quota.admit(key, capped)
    assert refused.value.headers["retry-after"] == "1"
    quota.settle(key, running, Usage(0, 5), None)
    quota.precheck(key, 10 * 1024 * 1024)  # not refused: the window has room again
    assert await quota.admit(key, capped) is not None


def test_an_exhausted_budget_answers_openai_s_own_insufficient_quota_error() -> None:
    # OpenAI answers an exhausted quota with type and code both `insufficient_quota`; a
    # client that tells it from a rate limit by `error.type` must see it so.
    admission = Admission(
        admitted=False,
        limits=None,
        remaining_requests=0,
        reset_requests_seconds=0.0,
        remaining_tokens=None,
        reset_tokens_seconds=None,
        retry_after_seconds=3600.0,
        budget=Budget(usd=1.0, window_seconds=3600),
        spent_micro_usd=1_000_000,
    )
    error = orjson.loads(body(refusal(admission), "/v1/chat/completions"))["error"]
    assert (error["type"], error["code"]) == ("insufficient_quota", "insufficient_quota")
    anthropic = orjson.loads(body(refusal(admission), "/v1/messages"))["error"]
    assert anthropic["type"] == "rate_limit_error"


async def test_a_large_body_refused_before_it_is_read_is_told_the_reset_still_ahead() -> None:
    # Refused at t=0 with 30 s to wait; 20 s later a large body is refused before it is read:
    # its Retry-After and its x-ratelimit-reset-requests both say the 10 s left, not 30.
    clock = Clock()
    quota = Quota(MemoryTracker(clock), clock=clock)
    limits = Limits(requests=1, tokens=None, window_seconds=30)
    key = Key(Scope("key-digest-precheck", "key", "pre", None), shares=False, limits=limits)
    assert await quota.admit(key, Peek()) is not None
    with pytest.raises(GatewayError) as first:
        await quota.admit(key, Peek())
    assert first.value.headers["x-ratelimit-reset-requests"] == "30s"
    clock.advance(20)
    with pytest.raises(GatewayError) as early:
        quota.precheck(key, 10 * 1024 * 1024)
    assert early.value.headers["retry-after"] == "10"
    assert early.value.headers["x-ratelimit-reset-requests"] == "10s"


async def test_a_refusal_names_the_window_that_stays_closed_longest() -> None:
    # One request a minute and 100 tokens: a stream admitted at t=0 ends at t=30 having used
    # 500 tokens. At t=40 the request window opens in 20 s, the token window in 50 s: the
    # 429 says "Retry in 50 seconds", and must name the tokens that keep it out that long,
    # not the one request a minute, which would let it in at t=60.
    clock = Clock()
    refused_by: list[str] = []
    quota = Quota(
        MemoryTracker(clock),
        clock=clock,
        on_refused=lambda scope, limit: refused_by.append(limit),
    )
    limits = Limits(requests=1, tokens=100, window_seconds=60)
    key = Key(Scope("key-digest-longest", "key", "longest", None), shares=False, limits=limits)
    admission = await quota.admit(key, Peek())
    clock.advance(30)
    quota.settle(key, admission, Usage(100, 400), None)
    clock.advance(10)
    with pytest.raises(GatewayError) as refused:
        await quota.admit(key, Peek())
    assert refused.value.headers["retry-after"] == "50"
    assert refused.value.message.startswith(
        "Quota exceeded for this key: 100 tokens per 60 seconds. Retry in 50 seconds"
    ), refused.value.message
    assert refused_by == ["tokens"]
