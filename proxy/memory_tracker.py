"""The tracker in this process's memory: every key's window in a dict.

Keys are kept least recently active first; a key idle for a whole window (and with no
request in flight) is evicted when a new key arrives, leaving only its totals. What it
does not do: share state between processes (that is `redis_tracker`'s job).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from proxy.tracker import NOTHING, Admission, Budget, Charge, Limits, admission, report
from proxy.window import SlidingWindow, Totals


class MemoryTracker:
    """The tracker for one process: every key's window in a dict."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        # Least recently active first, so idle keys are found at the front.
        self._windows: OrderedDict[str, SlidingWindow] = OrderedDict()
        self._retired: dict[str, Totals] = {}  # totals of evicted keys
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
        # No await in here: check, count and reserve are one step for the event loop.
        now = self._clock()
        reading = self._touch(key_id, limits, now).admit(now, limits, budget, claim)
        return admission(reading, limits, budget)

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

    async def flush(self) -> None:
        """Nothing to wait for: a settle is counted before `settle` returns."""

    async def close(self) -> None:
        """Forget every window; memory holds nothing that must be saved."""
        self._windows.clear()
        self._retired.clear()

    def _touch(self, key_id: str, limits: Limits | None, now: float) -> SlidingWindow:
        """The key's window, opened if new, marked as the most recently active."""
        window = self._windows.get(key_id)
        if window is None:
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
