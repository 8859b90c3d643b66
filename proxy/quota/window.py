"""One key's sliding logs in memory: admissions, token charges, reservations, spend.

Admission times sit in a ring of at most `limits.requests` entries (so admitting is O(1);
after keys.json lowered the limit, the admissions made before stay until they leave);
token charges in a time-ordered log with a running sum; the reservations of requests still
running in a dict by ticket; spend in a `SpendLog` of time buckets (a budget's window is
long, a month, so one entry per request would grow without bound). Expired entries are
dropped as the key is used. The answers are the Redis scripts' answers, step for step
(`tests/test_redis_tracker.py` checks it); a change here is a change there.
"""

from __future__ import annotations

from array import array
from collections import OrderedDict
from dataclasses import dataclass

from proxy.quota.tracker import (
    IN_FLIGHT_WAIT_SECONDS,
    NO_KINDS,
    Budget,
    Charge,
    Limits,
    Reading,
    budget_over,
    tokens_over,
)

# A new key's ring starts this small and doubles up to its limit, so a key with a large
# limit but little traffic costs little.
INITIAL_RING = 8
# Compact the token log once this many dead entries sit at its front.
COMPACT_AFTER = 64
# A budget's window is cut into this many buckets; spend leaves the window a bucket at a
# time, at the end of its bucket, so never earlier than exactly (and at most 0.1 % later).
SPEND_BUCKETS = 1000
MAX_COUNT = 2**53  # Lua numbers are doubles: both backends clamp counts where sums are exact


def clamped(count: int) -> int:
    """A count as both backends take it: 0 to MAX_COUNT."""
    if 0 <= count <= MAX_COUNT:  # every real count: no calls
        return count
    return max(0, min(count, MAX_COUNT))


@dataclass(frozen=True, slots=True)
class Totals:
    """A key's counts since it was first seen."""

    requests: int = 0
    tokens: int = 0
    micro_usd: int = 0
    kinds: tuple[int, ...] = NO_KINDS


def microseconds(now: float) -> int:
    return round(now * 1e6)


class SpendLog:
    """Spend per time bucket of one budget window, with a running sum; time in integer µs.

    Integer microseconds, as the Redis script counts, so both backends cut buckets alike.
    """

    __slots__ = ("buckets", "spent", "width_us", "window", "window_us")

    def __init__(self, window_seconds: float) -> None:
        self.window = window_seconds
        self.window_us = round(window_seconds * 1e6)
        self.width_us = max(1, self.window_us // SPEND_BUCKETS)
        self.buckets: OrderedDict[int, int] = OrderedDict()  # bucket index → micro-dollars
        self.spent = 0

    def add(self, now_us: int, micro_usd: int) -> None:
        index = now_us // self.width_us
        self.buckets[index] = self.buckets.get(index, 0) + micro_usd
        self.spent += micro_usd

    def expire(self, now_us: int) -> None:
        """Drop the buckets whose end is a whole window ago."""
        buckets = self.buckets
        last_gone = (now_us - self.window_us) // self.width_us - 1
        while buckets:
            index, micro = next(iter(buckets.items()))
            if index > last_gone:
                return
            del buckets[index]
            self.spent -= micro

    def wait(self, now_us: int, budget_micro: int, reserved: int) -> float:
        """Seconds until the spend (plus `reserved`) is under `budget_micro` again."""
        left = self.spent + reserved
        for index, micro in self.buckets.items():
            left -= micro
            if left < budget_micro:
                return self._leaves(index, now_us)
        return IN_FLIGHT_WAIT_SECONDS

    def oldest_leaves(self, now_us: int) -> float:
        for index in self.buckets:
            return self._leaves(index, now_us)
        return 0.0

    def rebucketed(self, window_seconds: float) -> SpendLog:
        """This spend in a log of another window: each bucket's where its end falls, so a
        spend leaves the new window at most a bucket late, never early."""
        log = SpendLog(window_seconds)
        for index, micro in self.buckets.items():
            log.add((index + 1) * self.width_us - 1, micro)
        return log

    def _leaves(self, index: int, now_us: int) -> float:
        return ((index + 1) * self.width_us + self.window_us - now_us) / 1e6


class SlidingWindow:
    """One key's sliding logs: admissions in a ring, charges in arrays, spend in buckets."""

    __slots__ = (
        "charge_head",
        "charge_times",
        "charge_tokens",
        "head",
        "last_active",
        "limits",
        "reservations",
        "reserved_micro_usd",
        "reserved_tokens",
        "size",
        "spend",
        "stamps",
        "tokens_used",
        "total_kinds",
        "total_micro_usd",
        "total_requests",
        "total_tokens",
    )

    def __init__(self, limits: Limits | None, totals: Totals | None = None) -> None:
        totals = totals or Totals()
        self.limits = limits
        self.stamps = array("d", bytes(8 * min(limits.requests if limits else 0, INITIAL_RING)))
        self.head = 0  # the oldest counted admission
        self.size = 0
        self.charge_times = array("d")
        self.charge_tokens = array("q")
        self.charge_head = 0  # entries before it have left the window
        self.tokens_used = 0
        self.reservations: dict[int, Charge] = {}  # ticket → what its request reserved
        self.reserved_tokens = self.reserved_micro_usd = 0  # their sums
        self.spend: SpendLog | None = None
        self.last_active = float("-inf")
        self.total_requests = totals.requests
        self.total_tokens = totals.tokens
        self.total_micro_usd = totals.micro_usd
        self.total_kinds = list(totals.kinds)

    def admit(
        self, now: float, limits: Limits | None, budget: Budget | None, claim: Charge
    ) -> Reading:
        """Count one admission at `now` and reserve `claim` if every window has room; never awaits."""
        admitted = self.room(now, limits, budget)
        ticket = self.take(now, limits, claim) if admitted else 0
        return self.reading(
            now, limits, budget, admitted=admitted, ticket=ticket, full=not admitted
        )

    def room(self, now: float, limits: Limits | None, budget: Budget | None) -> bool:
        """True when the window and the budget admit one more request at `now` (counts nothing)."""
        self._adopt(limits)
        requests_full = False
        if limits is not None:
            window = limits.window_seconds
            self._expire_stamps(now, window)
            requests_full = self.size >= limits.requests
            if limits.tokens is not None:
                self._expire_charges(now, window)
        spend = self._spend(now, budget)
        spent = spend.spent if spend is not None else 0
        return not (
            requests_full
            or tokens_over(self.tokens_used, self.reserved_tokens, limits)
            or budget_over(spent, self.reserved_micro_usd, budget)
        )

    def take(self, now: float, limits: Limits | None, claim: Charge) -> int:
        """Count one admission and reserve `claim`, after `room` said yes: the ticket."""
        ticket = self._count(now, limits)
        if claim.tokens or claim.micro_usd:
            self.reservations[ticket] = claim
            self.reserved_tokens += claim.tokens
            self.reserved_micro_usd += claim.micro_usd
        return ticket

    def settle(
        self, now: float, limits: Limits | None, budget: Budget | None, spent: Charge, ticket: int
    ) -> None:
        """Release `ticket`'s reservation; log `spent` at `now` and add it to the totals.

        The ring is left as it is: a changed limit is taken by the next admission, as the
        Redis script takes it (a settle there rides with the next call, under its limits).
        """
        claim = self.reservations.pop(ticket, None)
        if claim is not None:
            self.reserved_tokens -= claim.tokens
            self.reserved_micro_usd -= claim.micro_usd
        tokens = clamped(spent.tokens)
        micro = clamped(spent.micro_usd)
        self.total_tokens += tokens
        self.total_micro_usd += micro
        if spent.kinds is not NO_KINDS:
            kinds = self.total_kinds
            for index, count in enumerate(spent.kinds):
                if count:  # most kinds are 0 for most answers
                    kinds[index] += clamped(count)
        self.last_active = now
        if limits is not None:
            self._expire_charges(now, limits.window_seconds)
            if tokens:
                self.charge_times.append(now)
                self.charge_tokens.append(tokens)
                self.tokens_used += tokens
        spend = self._spend(now, budget)
        if spend is not None and micro:
            spend.add(microseconds(now), micro)

    def report(self, now: float, limits: Limits | None, budget: Budget | None) -> Reading:
        """The windows as of `now`, for `GET /usage`."""
        self._adopt(limits)
        if limits is not None:
            self._expire_stamps(now, limits.window_seconds)
            self._expire_charges(now, limits.window_seconds)
        self._spend(now, budget)
        return self.reading(now, limits, budget)

    def idle(self, now: float) -> bool:
        """True when no request is in flight and every entry has left its window."""
        if self.reservations:
            return False
        spend = self.spend
        longest = max(
            self.limits.window_seconds if self.limits else 0.0,
            # A spend leaves at the end of its bucket plus the window: up to a bucket after
            # the last activity plus the window (0.1 % of it: 43 minutes of 30 days).
            (spend.window_us + spend.width_us) / 1e6 if spend else 0.0,
        )
        return now - self.last_active >= longest

    def totals(self) -> Totals:
        return Totals(
            self.total_requests, self.total_tokens, self.total_micro_usd, tuple(self.total_kinds)
        )

    def reading(
        self,
        now: float,
        limits: Limits | None,
        budget: Budget | None,
        admitted: bool = False,
        ticket: int = 0,
        full: bool = False,
        slots: int = -1,
        slots_full: bool = False,
    ) -> Reading:
        """What the windows hold now (already expired); waits only where a limit is reached."""
        requests = request_leaves = token_wait = charge_leaves = 0.0
        spent = 0
        budget_wait = spend_leaves = 0.0
        if limits is not None:
            window = limits.window_seconds
            requests = self.size
            if requests:
                # The admission whose leaving brings the window under its limit: the oldest,
                # unless a lowered limit left more than it in the window.
                over = requests - limits.requests
                at = self.head if over <= 0 else (self.head + over) % len(self.stamps)
                request_leaves = self.stamps[at] + window - now
            charge_leaves = self._oldest_charge_leaves(now, window)
            if limits.tokens is not None:
                token_wait = self._token_wait(now, window, limits.tokens)
        spend = self.spend if budget is not None else None
        if spend is not None and budget is not None:
            spent = spend.spent
            now_us = microseconds(now)
            spend_leaves = spend.oldest_leaves(now_us)
            if budget_over(spent, self.reserved_micro_usd, budget):
                budget_wait = spend.wait(now_us, budget.micro_usd, self.reserved_micro_usd)
        # tuple.__new__ takes the fields in order as one tuple: the named tuple's own
        # __new__ (a Python function of 19 arguments) costs twice as much (~0.45 us).
        return tuple.__new__(Reading, (
            admitted,
            ticket,
            full,
            slots,
            slots_full,
            int(requests),  # requests
            request_leaves,
            self.tokens_used if limits is not None else 0,  # tokens
            self.reserved_tokens,  # tokens_reserved
            token_wait,
            charge_leaves,
            spent,
            self.reserved_micro_usd,  # spend_reserved
            budget_wait,
            spend_leaves,
            self.total_requests,  # total_requests
            self.total_tokens,  # total_tokens
            self.total_micro_usd,  # total_micro_usd
            tuple(self.total_kinds),  # total_kinds
        ))  # fmt: skip

    def _spend(self, now: float, budget: Budget | None) -> SpendLog | None:
        """The budget's spend log, expired to `now`; a changed window (keys.json reloaded)
        takes each spend at its own time, in buckets of the new window's width."""
        if budget is None:
            return None
        spend = self.spend
        now_us = microseconds(now)
        if spend is None:
            spend = self.spend = SpendLog(budget.window_seconds)
        elif spend.window_us != round(budget.window_seconds * 1e6):
            spend = self.spend = spend.rebucketed(budget.window_seconds)
        spend.expire(now_us)
        return spend

    def _count(self, now: float, limits: Limits | None) -> int:
        self.total_requests += 1
        self.last_active = now
        if limits is not None:
            if self.size == len(self.stamps):
                self._grow()
            position = (self.head + self.size) % len(self.stamps)
            self.stamps[position] = now
            self.size += 1
        return self.total_requests  # the serial doubles as the reservation's ticket

    # An entry has left once its time plus the window is `now` or before: the sum the waits
    # are told from (`now - window` may round an ulp below a time whose sum is `now`, and
    # refuse a request at the very instant its Retry-After named, with a wait of 0).
    def _expire_stamps(self, now: float, window: float) -> None:
        # Admissions are stamped in clock order, so the expired ones are all at the head.
        stamps, capacity = self.stamps, len(self.stamps)
        head, size = self.head, self.size
        while size and stamps[head] + window <= now:
            head = head + 1 if head + 1 < capacity else 0
            size -= 1
        self.head, self.size = head, size

    def _expire_charges(self, now: float, window: float) -> None:
        times, tokens = self.charge_times, self.charge_tokens
        head, end = self.charge_head, len(times)
        while head < end and times[head] + window <= now:
            self.tokens_used -= tokens[head]
            head += 1
        if head == end:
            if end:
                del times[:], tokens[:]
            head = 0
        elif head >= COMPACT_AFTER and head * 2 >= end:
            del times[:head], tokens[:head]
            head = 0
        self.charge_head = head

    def _token_wait(self, now: float, window: float, token_limit: int | None) -> float:
        """Seconds until enough charges leave the window to bring it under the limit."""
        if token_limit is None:
            return 0.0
        used = self.tokens_used + self.reserved_tokens
        if used < token_limit:
            return 0.0
        times, tokens = self.charge_times, self.charge_tokens
        for index in range(self.charge_head, len(times)):
            used -= tokens[index]
            if used < token_limit:
                return times[index] + window - now
        return IN_FLIGHT_WAIT_SECONDS  # full with reservations alone

    def _oldest_charge_leaves(self, now: float, window: float) -> float:
        if self.charge_head < len(self.charge_times):
            return self.charge_times[self.charge_head] + window - now
        return 0.0

    def _ordered(self) -> array[float]:
        """The counted admission times, oldest first."""
        end = self.head + self.size
        if end <= len(self.stamps):
            return self.stamps[self.head : end]
        return self.stamps[self.head :] + self.stamps[: end - len(self.stamps)]

    def _grow(self) -> None:
        assert self.limits is not None
        ordered = self._ordered()
        capacity = min(self.limits.requests, max(INITIAL_RING, 2 * len(ordered)))
        ordered.extend(array("d", bytes(8 * (capacity - len(ordered)))))
        self.stamps, self.head = ordered, 0

    def _adopt(self, limits: Limits | None) -> None:
        """Take a key's new limits (keys.json may change them); rebuild the ring for a new size."""
        previous, self.limits = self.limits, limits
        if limits is previous or limits is None:
            return
        if previous is not None and limits.requests == previous.requests:
            return
        # Every admission stays counted (a lowered limit, raised again, forgets none of them):
        # the ring holds more than the new limit only until the older ones leave.
        ordered = self._ordered() if self.size else array("d")
        kept = len(ordered)
        ordered.extend(
            array("d", bytes(8 * (max(kept, min(limits.requests, INITIAL_RING)) - kept)))
        )
        self.stamps, self.head, self.size = ordered, 0, kept
