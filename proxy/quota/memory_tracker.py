"""The tracker in this process's memory: every key's window in a dict.

Keys are kept least recently active first; a key idle for a whole window (and with no
request in flight) is evicted when a new key arrives, leaving only its totals, until the
key is deleted (`forget`). The
deferred work owed (background responses, batches) is kept oldest first, at most MAX_OWED
(the oldest goes first: it is then never charged). What it does not do: share state between processes (that is
`redis_tracker`'s job).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from proxy.quota.tracker import (
    NOTHING,
    Admission,
    Budget,
    Charge,
    Limits,
    Owed,
    Scope,
    admission,
    report,
)
from proxy.quota.window import SlidingWindow, Totals

# Deferred work owed at once, at most: about 300 bytes each, so 30 MB.
MAX_OWED = 100_000


class MemoryTracker:
    """The tracker for one process: every key's window in a dict."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        # Least recently active first, so idle keys are found at the front.
        self._windows: OrderedDict[str, SlidingWindow] = OrderedDict()
        self._retired: dict[str, Totals] = {}  # totals of evicted keys
        # deferred id → (until when, what is owed), oldest first: all are owed for as long.
        self._owed: OrderedDict[str, tuple[float, Owed]] = OrderedDict()
        # scope id → the leases holding its slots (a process cannot die and leave the rest).
        self._slots: dict[str, set[str]] = {}
        self.on_settle_failed: Callable[[str], None] = lambda error: None  # never fails

    def __len__(self) -> int:
        """The number of keys holding a window in memory."""
        return len(self._windows)

    async def admit(
        self,
        key_id: str,
        limits: Limits | None,
        budget: Budget | None = None,
        claim: Charge = NOTHING,
    ) -> Admission:
        """Admit, count and reserve `claim` for one request, or refuse it without counting."""
        return self.admit_now(key_id, limits, budget, claim)

    def admit_now(
        self,
        key_id: str,
        limits: Limits | None,
        budget: Budget | None = None,
        claim: Charge = NOTHING,
    ) -> Admission:
        """`admit` without a coroutine: memory decides at once (`Quota.admit_now` uses it)."""
        # No await in here: check, count and reserve are one step for the event loop.
        now = self._clock()
        reading = self._touch(key_id, limits, now).admit(now, limits, budget, claim)
        return admission(reading, limits, budget)

    async def admit_scopes(
        self, scopes: Sequence[Scope], claim: Charge = NOTHING, lease: str = ""
    ) -> tuple[Admission, ...]:
        """Admit in every scope or in none; no await between the checks and the counts."""
        now = self._clock()
        self._evict(now)  # before any is opened: a window just opened looks idle
        windows = [self._touch(scope.id, scope.limits, now, evict=False) for scope in scopes]
        rooms = [w.room(now, s.limits, s.budget) for w, s in zip(windows, scopes, strict=True)]
        held = [self._held(scope) for scope in scopes]
        slots_full = [
            s.max_in_flight is not None and n >= s.max_in_flight
            for s, n in zip(scopes, held, strict=True)
        ]
        admitted = all(rooms) and not any(slots_full)
        answers = []
        for scope, window, room, slots, full_slots in zip(
            scopes, windows, rooms, held, slots_full, strict=True
        ):
            ticket = 0
            if admitted:
                ticket = window.take(now, scope.limits, claim)
                if scope.max_in_flight is not None:
                    self._slots.setdefault(scope.id, set()).add(lease)
                    slots += 1
            reading = window.reading(
                now, scope.limits, scope.budget, admitted, ticket, not room, slots, full_slots
            )
            answers.append(admission(reading, scope.limits, scope.budget))
        return tuple(answers)

    def settle_scopes(self, scopes: Sequence[Scope], spent: Charge, tickets: Sequence[int]) -> None:
        for scope, ticket in zip(scopes, tickets, strict=True):
            self.settle(scope.id, scope.limits, spent, ticket, scope.budget)

    def release(self, scopes: Sequence[Scope], lease: str, done: Callable[[], None]) -> None:
        for scope in scopes:
            leases = self._slots.get(scope.id)
            if leases is not None:
                leases.discard(lease)
                if not leases:
                    del self._slots[scope.id]
        done()

    async def in_flight(self, scope: Scope) -> int:
        return len(self._slots.get(scope.id, ()))

    def _held(self, scope: Scope) -> int:
        if scope.max_in_flight is None:
            return -1
        return len(self._slots.get(scope.id, ()))

    def settle(
        self,
        key_id: str,
        limits: Limits | None,
        spent: Charge,
        ticket: int = 0,
        budget: Budget | None = None,
    ) -> None:
        """Release `ticket`'s reservation and charge what the request really cost."""
        now = self._clock()
        self._touch(key_id, limits, now).settle(now, limits, budget, spent, ticket)

    async def report(
        self, key_id: str, limits: Limits | None, budget: Budget | None = None
    ) -> dict[str, Any]:
        """The key's windows and totals, as `GET /usage` answers them; creates nothing."""
        window = self._windows.get(key_id)
        if window is None:
            window = SlidingWindow(limits, self._retired.get(key_id, Totals()))
        return report(window.report(self._clock(), limits, budget), limits, budget)

    async def owe(self, deferred_id: str, owed: Owed, seconds: float) -> None:
        """Remember for `seconds` what is owed for the deferred work `deferred_id`."""
        now, held = self._clock(), self._owed
        while held and (len(held) >= MAX_OWED or next(iter(held.values()))[0] <= now):
            held.popitem(last=False)  # expired, or the oldest past the bound
        held[deferred_id] = (now + seconds, owed)
        held.move_to_end(deferred_id)

    async def claim(self, deferred_id: str) -> Owed | None:
        """Take what is owed for `deferred_id` (once, whoever asks), else None."""
        held = self._owed.pop(deferred_id, None)
        if held is None or held[0] <= self._clock():
            return None
        return held[1]

    def forget(self, scope_ids: Iterable[str]) -> None:
        """Drop the windows and totals of scopes gone (a deleted key, a deleted team): a
        deleted key's /usage answers 401, and an API-made key's name made again has a new
        id, so nothing reads them again. A request of one still running opens its window
        again when it settles, to be evicted when idle."""
        for scope_id in scope_ids:
            self._windows.pop(scope_id, None)
            self._retired.pop(scope_id, None)

    async def flush(self) -> None:
        """Nothing to wait for: a settle is counted before `settle` returns."""

    async def ping(self) -> None:
        """Memory always answers."""

    async def close(self) -> None:
        """Forget every window; memory holds nothing that must be saved."""
        self._windows.clear()
        self._retired.clear()
        self._owed.clear()

    def _touch(
        self, key_id: str, limits: Limits | None, now: float, evict: bool = True
    ) -> SlidingWindow:
        """The key's window, opened if new, marked as the most recently active."""
        window = self._windows.get(key_id)
        if window is None:
            if evict:
                self._evict(now)
            window = SlidingWindow(limits, self._retired.pop(key_id, Totals()))
            self._windows[key_id] = window
            return window
        self._windows.move_to_end(key_id)
        return window

    def _evict(self, now: float) -> None:
        """Drop idle windows from the front (memory grows only when a key opens, so check then)."""
        windows = self._windows
        while windows:
            key_id, window = next(iter(windows.items()))
            if not window.idle(now):
                return
            del windows[key_id]
            self._retired[key_id] = window.totals()
