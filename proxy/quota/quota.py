"""Admission policy: what a request reserves, when it is refused, what happens when Redis is lost.

`tracker` counts; this module decides what to ask it. At admission a request reserves an
estimate of what it will use (`reservation`): its prompt (`prompt_tokens_estimate`) plus
the output cap its body names; a generation that names none reserves the key's output
allowance (keys.json's `output_allowance`, else OUTPUT_ALLOWANCE_TOKENS). For a key with a
budget that estimate is priced where the request will be served: the target its plan tries
first (the relay says which; a route's target and the model it puts in place of the
body's), not the key's first provider. When it ends, `settle` replaces the reservation
with the real tokens and cost (a stream cut short: what it produced; nothing known of what
the provider did: the reservation itself).

The whole allowance is reserved, even when it is more than the window or the budget has
left: a request is admitted while the window has any room (`tracker`), so a key whose
window is smaller than its allowance still gets its uncapped request through, and while it
runs the window stays closed. Reserving only what is left would let more requests in
beside it, each free to produce its whole allowance: the overshoot would grow with the
concurrency. As it is, concurrent requests overshoot a window or a budget by at most one
request's reservation, as long as each produces no more than it reserved.
`refusals` renders the 429s, `ratelimit` the headers, `usage_report` answers GET /usage.

`precheck` refuses a request with a large body (over 64 KiB, or of unknown length) before
the body is read and without asking the tracker, when the key's last refusal said its
window stays closed until a time still ahead: a 10 MB body of an exhausted key is never
read. Smaller bodies are read and asked about as usual, so their answers stay exact. A
request of the key that ends forgets that refusal: its reservation, which the refusal may
have counted, is given back, and its tokens or budget may have room again (not its request
count: a full request window stays full whatever a request ends with).

When the tracker's backend (Redis) is lost, `QUOTA_ON_REDIS_ERROR` decides: `allow` lets
the request through uncounted, `deny` answers 503 (a key with neither quota nor budget is
always let through). Each decision is reported to `on_tracker_lost` (a metric and
/health's degraded state); the first success after that reports `on_tracker_back`. The
loss and the return are each said once on stderr, so an operator reading the gateway's
output learns that quotas are not being counted (or that requests are refused).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import operator
import time
import uuid
from collections.abc import Callable, Sequence

from proxy.errors import GatewayError
from proxy.quota.memory_tracker import MemoryTracker
from proxy.quota.ratelimit import tightest
from proxy.quota.refusals import concurrency_refusal, label, refusal
from proxy.quota.slots import Lines, Waiter
from proxy.quota.subjects import QuotaKey, QuotaRequest, Serving
from proxy.quota.tracker import (
    KINDS,
    MICRO,
    NOTHING,
    Admission,
    Charge,
    Owed,
    Scope,
    Tracker,
    TrackerUnavailable,
)
from proxy.record import Usage

log = logging.getLogger("llm_gateway")  # in a gateway process: stderr, never blocking

# A usage's token counts in KINDS order, as a tuple (one C call).
_kinds_of = operator.attrgetter(*KINDS)

# Bodies up to this size are read before the key's quota is asked; past it (or of unknown
# length) a key known to be refused right now is refused before its body is read.
PRECHECK_BODY_BYTES = 64 * 1024

# (provider, model, usage, the model that answers when a target swaps it) → US dollars,
# or None for a model without a price (usage.pricing.Prices.cost).
Price = Callable[[str, str | None, Usage, str | None], float | None]


def unpriced(
    provider: str, model: str | None, usage: Usage, answered: str | None = None
) -> float | None:
    """No prices known: spend counts as nothing."""
    return None


class Quota:
    """Admission, reservations and settling for every key, over one tracker."""

    def __init__(
        self,
        tracker: Tracker,
        deny_when_lost: bool = False,
        on_tracker_lost: Callable[[str, str], None] = lambda decision, error: None,
        on_tracker_back: Callable[[], None] = lambda: None,
        on_refused: Callable[[Scope, str], None] = lambda scope, limit: None,
        on_slots: Callable[[Scope, int], None] = lambda scope, change: None,
        price: Price = unpriced,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.tracker = tracker
        # The memory tracker decides at once: `admit_now` asks it without a coroutine (the
        # three nested ones of `admit` cost a request about a microsecond).
        self._memory = tracker if isinstance(tracker, MemoryTracker) else None
        self._deny_when_lost = deny_when_lost
        self._on_lost = on_tracker_lost
        self._on_back = on_tracker_back
        self.price = price  # build_app sets the price list; tests may too
        self._clock = clock
        self._is_lost = False
        # key id → (until when its window stays closed, the refusal that said so).
        self._closed: dict[str, tuple[float, Admission]] = {}
        # A refusal, by the scope and the limit ("requests", "tokens", "budget",
        # "in_flight"); slots taken (+1) and given back (-1), for the metrics.
        self._on_refused = on_refused
        self._on_slots = on_slots
        self._lines = Lines()  # requests waiting for a slot (queue_seconds)
        self._leases = (f"{uuid.uuid4().hex[:12]}:{n}" for n in itertools.count())
        # key id → the fraction of a micro-dollar its spend carries to its next charge.
        self._fractions: dict[str, float] = {}
        tracker.on_settle_failed = lambda error: self._lost("uncharged", error)

    @property
    def queued(self) -> int:
        """Requests of this process waiting for an in-flight slot (queue_seconds)."""
        return len(self._lines)

    def precheck(self, key: QuotaKey, body_bytes: int | None) -> None:
        """Before a large body is read: 429 for a key known to be refused right now. Asks nobody.

        `body_bytes`: the Content-Length, None when unknown (chunked). A small body is cheap
        to read, so its request goes to the tracker as usual and gets its exact answer.
        """
        if body_bytes is not None and body_bytes <= PRECHECK_BODY_BYTES:
            return
        refused = self._known_refusal(key)
        if refused is not None:
            self._on_refused(key.scopes(None)[0], refused_limit(refused))
            raise refusal(refused)

    def refuses(self, key: QuotaKey) -> bool:
        """Whether `precheck` would refuse a body of unknown length now, counting nothing
        (`Expect: 100-continue`: the request's own precheck counts its refusal once)."""
        return self._known_refusal(key) is not None

    def _known_refusal(self, key: QuotaKey) -> Admission | None:
        """The key's last refusal as it stands now, while its wait still runs; else None."""
        closed = self._closed.get(key.id)
        if closed is None:
            return None
        until, admission = closed
        if admission.limits is not key.limits or admission.budget is not key.budget:
            del self._closed[key.id]  # keys.json changed the key's limits since: ask again
            return None
        wait = until - self._clock()
        if wait <= 0:
            del self._closed[key.id]
            return None
        # Every wait the 429 tells has run as long since the refusal it repeats.
        elapsed = admission.retry_after_seconds - wait
        tokens = admission.reset_tokens_seconds
        return admission._replace(
            retry_after_seconds=wait,
            reset_requests_seconds=max(0.0, admission.reset_requests_seconds - elapsed),
            reset_tokens_seconds=None if tokens is None else max(0.0, tokens - elapsed),
        )

    async def admit(
        self,
        key: QuotaKey,
        peek: QuotaRequest,
        serving: Serving | None = None,
        current: Callable[[], QuotaKey] | None = None,
    ) -> Admission | None:
        """Check, count and reserve one request. Raises 429 (over quota or budget), 503.

        `serving`: the target that will serve it, where its reservation is priced (None:
        the key's first provider, with the body's model).
        `current`: the key as the keys are now (raises 401 once it is revoked), asked again
        each time the request has waited for a slot (queue_seconds): what an operator
        changed or revoked meanwhile (a raised max_in_flight, a deleted key) applies to it.
        None: nothing to settle (the tracker was lost and the request let through).
        """
        claim = self._estimate(key, peek, serving)
        if key.shares:  # a team, a slot cap or model windows: every scope at once
            return await self._admit_shared(key, peek, serving, claim, current)
        try:
            admission = await self.tracker.admit(key.id, key.limits, key.budget, claim)
        except TrackerUnavailable as error:
            deny = self._deny_when_lost and (key.limits is not None or key.budget is not None)
            self._lost("deny" if deny else "allow", str(error))
            if deny:
                raise GatewayError(
                    503,
                    "quota_unavailable",
                    "The gateway cannot check quotas right now; retry shortly.",
                ) from None
            return None
        self._back()
        return self._verdict(key, admission)

    def admit_now(
        self, key: QuotaKey, peek: QuotaRequest, serving: Serving | None = None
    ) -> Admission | None:
        """`admit` without awaiting, where the answer needs no wait: a key of its own (no
        shared scope) over the memory tracker, which is never lost. Raises 429. None: this
        request must await `admit` (Redis, or a key that shares)."""
        memory = self._memory
        if memory is None or key.shares:
            return None
        claim = self._estimate(key, peek, serving)
        return self._verdict(key, memory.admit_now(key.id, key.limits, key.budget, claim))

    def _verdict(self, key: QuotaKey, admission: Admission) -> Admission:
        """The tracker's answer for a key of its own: admitted, or a 429 remembered for
        `precheck`."""
        if not admission.admitted:
            self._closed[key.id] = (self._clock() + admission.retry_after_seconds, admission)
            self._on_refused(key.scopes(None)[0], refused_limit(admission))
            raise refusal(admission)
        return admission

    async def _admit_shared(
        self,
        key: QuotaKey,
        peek: QuotaRequest,
        serving: Serving | None,
        claim: Charge,
        current: Callable[[], QuotaKey] | None,
    ) -> Admission | None:
        """Admit in every scope or none; wait for a slot up to queue_seconds, first come
        first served; after each wait, ask for the key as `current` gives it now. Raises
        429 naming the limit that refused, 401 (`current`), 503."""
        scopes = key.scopes(peek.model)
        capped = any(scope.max_in_flight is not None for scope in scopes)
        lease = next(self._leases) if capped else ""
        loop = asyncio.get_running_loop()
        started = loop.time()
        ahead = self._lines.waiting(scopes) if capped else None
        waiter: Waiter | None = None
        line: Scope | None = None
        try:
            if ahead is not None and ahead.queue_seconds > 0:  # behind those already waiting
                line, waiter = ahead, self._lines.join(ahead)
                await waiter.turn(started + ahead.queue_seconds)
            while True:
                if waiter is not None and current is not None:  # it waited: the key as now
                    key = current()
                    scopes, claim = key.scopes(peek.model), self._estimate(key, peek, serving)
                answers = await self._ask(key, scopes, claim, lease)
                if answers is None:
                    return None
                if answers[0].admitted:
                    for scope in scopes:
                        if scope.max_in_flight is not None:
                            self._on_slots(scope, 1)
                    tickets = tuple(answer.ticket for answer in answers)
                    headline = tightest(answers)  # what its x-ratelimit-* headers tell
                    return headline._replace(scopes=scopes, tickets=tickets, lease=lease)
                scope, answer = refused_by(scopes, answers)
                if not answer.slots_full or scope.queue_seconds <= 0:
                    # Only a request that stood in a line waited for a slot; the tracker's
                    # own round trip is no such wait.
                    waited = loop.time() - started if waiter is not None else 0.0
                    raise self._refused(key, scope, answer, waited)
                if line is None or waiter is None:
                    line, waiter = scope, self._lines.join(scope)
                elif not slots_full_in(line, scopes, answers):
                    # Its line's slots have room; another scope's (its key's) hold it up:
                    # wait in that line, not at the head of this one, where a slot given
                    # back would wake only it and those behind it would wait on.
                    self._lines.leave(line, waiter)
                    line, waiter = scope, self._lines.join(scope)
                if not await waiter.turn(started + scope.queue_seconds):
                    raise self._refused(key, scope, answer, loop.time() - started)
        finally:
            if waiter is not None and line is not None:
                self._lines.leave(line, waiter)

    async def _ask(
        self, key: QuotaKey, scopes: tuple[Scope, ...], claim: Charge, lease: str
    ) -> tuple[Admission, ...] | None:
        """The tracker's answers; None when it is lost and QUOTA_ON_REDIS_ERROR lets it by."""
        try:
            answers = await self.tracker.admit_scopes(scopes, claim, lease)
        except TrackerUnavailable as error:
            deny = self._deny_when_lost and any(
                scope.counted or scope.max_in_flight is not None for scope in scopes
            )
            self._lost("deny" if deny else "allow", str(error))
            if deny:
                raise GatewayError(
                    503,
                    "quota_unavailable",
                    "The gateway cannot check quotas right now; retry shortly.",
                ) from None
            return None
        self._back()
        return answers

    def _refused(
        self, key: QuotaKey, scope: Scope, answer: Admission, waited: float
    ) -> GatewayError:
        if answer.full:
            self._on_refused(scope, refused_limit(answer))
            return refusal(answer, label(scope, key.name))
        self._on_refused(scope, "in_flight")
        return concurrency_refusal(scope, key.name, round(waited, 3) if waited >= 0.001 else 0)

    def settle(
        self,
        key: QuotaKey,
        admission: Admission | None,
        usage: Usage | None,
        cost_usd: float | None,
    ) -> None:
        """Replace the request's reservation with what it really used, give back its slots;
        never waits. `usage` None: nothing more to charge (none reported, or charged as it
        came)."""
        if admission is None:
            return
        if self._closed:
            self._reopen(key)
        spent = NOTHING if usage is None else self._spent(key, usage, cost_usd)
        if admission.scopes:
            self.tracker.settle_scopes(admission.scopes, spent, admission.tickets)
            self.release(admission)
            return
        self.tracker.settle(key.id, key.limits, spent, admission.ticket, key.budget)

    def _reopen(self, key: QuotaKey) -> None:
        """Forget the key's last refusal when a settle may have opened its window: its tokens
        or its budget, which the settled request's reservation counted in (a full request
        window stays full whatever a request ends with)."""
        closed = self._closed.get(key.id)
        if closed is not None:
            refused = closed[1]
            if refused.limits is None or refused.remaining_requests > 0:
                del self._closed[key.id]

    def forget(self, scopes: Sequence[Scope]) -> None:
        """Drop what this process keeps of scopes gone (deleted keys and teams): a key's
        last refusal, its micro-dollar fraction, the tracker's windows and totals."""
        for scope in scopes:
            self._closed.pop(scope.id, None)
            self._fractions.pop(scope.id, None)
        self.tracker.forget(scope.id for scope in scopes)

    def release(self, admission: Admission | None) -> None:
        """Give back the slots the request holds (at its end, or when its client leaves)."""
        if admission is None or not admission.lease:
            return
        capped = [scope for scope in admission.scopes if scope.max_in_flight is not None]
        for scope in capped:
            self._on_slots(scope, -1)
        wake = self._lines.wake
        self.tracker.release(admission.scopes, admission.lease, lambda: wake(capped))

    def charge(
        self, key: QuotaKey, usage: Usage, cost_usd: float | None, model: str | None = None
    ) -> None:
        """Charge usage that no reservation covered (a Realtime session's each response) in
        every scope a request of the key for `model` counts in; never waits."""
        self.charge_deferred(key, model, usage, cost_usd)

    async def owe(
        self,
        deferred_id: str,
        key: QuotaKey,
        origin: str,
        seconds: float,
        charged: Charge = NOTHING,
    ) -> None:
        """Remember that `key` owes the deferred work `deferred_id` (a background response, a
        batch), of which `charged` was charged already; never raises."""
        try:
            await self.tracker.owe(deferred_id, Owed(key.id, origin, charged), seconds)
        except TrackerUnavailable as error:
            self._lost("uncharged", str(error))  # it will not be charged

    async def claim(self, deferred_id: str) -> Owed | None:
        """Take what is owed for the deferred work, whoever retrieves it, once across every
        process; None when nothing is owed (any more, or the tracker is lost: then it is
        not charged)."""
        try:
            return await self.tracker.claim(deferred_id)
        except TrackerUnavailable as error:
            self._lost("uncharged", str(error))
            return None

    def charge_deferred(
        self, key: QuotaKey, model: str | None, usage: Usage, cost_usd: float | None
    ) -> None:
        """Charge claimed deferred work to the key that created it: in every scope a request
        of it for `model` counts in (its own, its team's, its model group's); never waits."""
        spent = self._spent(key, usage, cost_usd)
        if key.shares:
            scopes = key.scopes(model)
            self.tracker.settle_scopes(scopes, spent, (0,) * len(scopes))
            return
        self.tracker.settle(key.id, key.limits, spent, 0, key.budget)

    async def close(self) -> None:
        """Send the settles still held, then close the tracker."""
        await self.tracker.close()

    def reservation(self, key: QuotaKey, peek: QuotaRequest) -> Usage:
        """What a request reserves, as usage: its prompt's estimate and its output allowance.
        Also what it is charged when the provider may have done the work and nothing of it
        is known (a timeout before the answer, its client gone meanwhile)."""
        return Usage(peek.prompt_tokens_estimate, output_allowance(key, peek), True)

    def _estimate(self, key: QuotaKey, peek: QuotaRequest, serving: Serving | None) -> Charge:
        """The reservation in tokens, priced where it will be served for a key with a budget."""
        output = output_allowance(key, peek)
        tokens = peek.prompt_tokens_estimate + output
        if not tokens:
            return NOTHING
        team_budget = key.team is not None and key.team.scope.budget is not None
        if key.budget is None and not team_budget:
            return Charge(tokens)
        usage = Usage(peek.prompt_tokens_estimate, output, True)
        if serving is None:
            cost = self.price(key.provider.name, peek.model, usage, None)
        else:  # priced as its answer will be: the body's model, answered by the target's
            cost = self.price(serving.provider.name, peek.model, usage, serving.model)
        return Charge(tokens, micro(cost))

    async def recheck(self) -> None:
        """While the tracker is lost, ask it whether it answers again (/health does, so an
        idle process does not say its Redis is lost once it is back)."""
        if not self._is_lost:
            return
        try:
            await self.tracker.ping()
        except TrackerUnavailable:
            return
        self._back()

    def _spent(self, key: QuotaKey, usage: Usage, cost_usd: float | None) -> Charge:
        """What a response's usage charges its key: `charged`, but its cost in the whole
        micro-dollars it makes with the fraction the key's earlier charges left over, and
        that fraction carried on. So requests of a fraction of a micro-dollar each (short
        embeddings) spend what they cost together, not a micro-dollar each."""
        if cost_usd is None or not 0 < cost_usd < math.inf:
            return charged(usage, None)
        fractions = self._fractions
        exact = round(cost_usd * MICRO + fractions.get(key.id, 0.0), 6)
        whole = math.floor(exact)
        fractions[key.id] = exact - whole
        return Charge(usage.total_tokens, whole, _kinds_of(usage))

    def _lost(self, decision: str, error: str) -> None:
        if not self._is_lost:
            self._is_lost = True
            log.warning(
                "quota: the tracker is lost (%s): %s until it answers again",
                error,
                "requests with a quota or a budget are refused with 503 (QUOTA_ON_REDIS_ERROR=deny)"
                if self._deny_when_lost
                else "requests go through uncounted (QUOTA_ON_REDIS_ERROR=allow)",
            )
        self._on_lost(decision, error)

    def _back(self) -> None:
        if self._is_lost:
            self._is_lost = False
            log.warning("quota: the tracker answers again: requests are counted")
            self._on_back()


def refused_limit(answer: Admission) -> str:
    """Which limit of a full window refused: "budget", "requests" or "tokens"."""
    if answer.over_budget:
        return "budget"
    return "requests" if answer.names_requests else "tokens"


def output_allowance(key: QuotaKey, peek: QuotaRequest) -> int:
    """The output tokens a request reserves: the cap its body names, else for a generation
    the key's allowance (what it may produce when nothing caps it), else none; for each of
    the answers it asks for (`n`: the cap is each one's)."""
    if peek.max_output_tokens:
        return peek.max_output_tokens * peek.answers
    return key.output_allowance * peek.answers if peek.is_generation else 0


def charged(usage: Usage, cost_usd: float | None) -> Charge:
    """What a response's usage charges: its tokens, its cost, and the tokens by kind."""
    return Charge(usage.total_tokens, micro(cost_usd), _kinds_of(usage))


def micro(usd: float | None) -> int:
    """Dollars as whole micro-dollars, rounded up (a fraction of a micro-dollar is spent)."""
    if usd is None or not usd > 0 or usd == math.inf:
        return 0
    return math.ceil(round(usd * MICRO, 6))  # round first: 0.0009 * 1e6 is 900.0000000000001


def slots_full_in(line: Scope, scopes: tuple[Scope, ...], answers: tuple[Admission, ...]) -> bool:
    """Whether the tracker found every slot of `line` (one of `scopes`) taken."""
    return any(s.id == line.id and a.slots_full for s, a in zip(scopes, answers, strict=True))


def refused_by(
    scopes: tuple[Scope, ...], answers: tuple[Admission, ...]
) -> tuple[Scope, Admission]:
    """The limit to name: of the full windows and budgets, the one closed longest; else
    the first scope whose slots are all taken."""
    full = [(a.retry_after_seconds, i) for i, a in enumerate(answers) if a.full]
    if full:
        index = max(full)[1]
    else:
        index = next(i for i, a in enumerate(answers) if a.slots_full)
    return scopes[index], answers[index]
