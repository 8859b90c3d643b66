"""The sliding-window tracker: admit requests, charge tokens, report usage per key.

A true sliding window (a sliding log, not fixed buckets): a key gets at most
`limits.requests` admissions in any trailing `limits.window_seconds`, and is admitted while
the tokens charged in that window are under `limits.tokens`.

Invariants:
- `admit` checks and counts in one atomic step: in memory there is no `await` between the
  check and the increment (the Redis backend does both in one script), so concurrent
  requests can never overshoot the request limit.
- A refused request is not counted.
- Tokens are known only when a response ends, so the last admitted request may overshoot
  the token limit by its own tokens; the next one then waits until the window is under.

The memory backend keeps per key a ring of admission times (at most `requests` of them,
so `admit` is O(1)) and a log of token charges; expired entries are dropped as the key is
used, and a key idle for a whole window is evicted when a new key arrives, leaving only
its totals. What it does not do: share state between processes (that is the Redis
backend's job), or remember entries that a shorter window already dropped when a key's
window is later lengthened.
"""

from __future__ import annotations

import time
from array import array
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

# A new key's ring starts this small and doubles up to its limit, so a key with a large
# limit but little traffic costs little.
INITIAL_RING = 8
# Compact the token log once this many dead entries sit at its front.
COMPACT_AFTER = 64


@dataclass(frozen=True, slots=True)
class Limits:
    """A key's quota: requests (and tokens, None for no limit) per window."""

    requests: int
    tokens: int | None
    window_seconds: float

    def __post_init__(self) -> None:
        if (
            self.requests < 1
            or (self.tokens is not None and self.tokens < 1)
            or self.window_seconds <= 0
        ):
            raise ValueError(f"limits must be positive, got {self}")


@dataclass(frozen=True, slots=True)
class Admission:
    """The answer to one `admit`: the verdict and what the rate-limit headers say."""

    admitted: bool
    limits: Limits
    remaining_requests: int
    # Until the window admits one more request (0 when it has room); when admitted: until
    # the oldest counted request leaves.
    reset_requests_seconds: float
    remaining_tokens: int | None  # None when no token limit
    reset_tokens_seconds: float | None
    # 0.0 when admitted; else until a request would be admitted (requests and tokens both).
    retry_after_seconds: float


class TrackerUnavailable(Exception):
    """The backend cannot be reached (Redis lost); `quota` applies QUOTA_ON_REDIS_ERROR."""


class Tracker(Protocol):
    """What `relay` and `/usage` need from a tracker, whatever keeps its state."""

    async def admit(self, key_id: str, limits: Limits) -> Admission:
        """Admit and count one request, or refuse it without counting."""
        ...

    async def charge(self, key_id: str, limits: Limits, tokens: int) -> None:
        """Add a finished response's tokens to the key's window and totals."""
        ...

    async def report(self, key_id: str, limits: Limits) -> dict[str, Any]:
        """The key's window and totals, as `GET /usage` answers them."""
        ...

    async def close(self) -> None:
        """Release what the backend holds."""
        ...


class SlidingWindow:
    """One key's sliding logs: admission times in a ring, token charges in arrays."""

    __slots__ = (
        "charge_head",
        "charge_times",
        "charge_tokens",
        "head",
        "last_active",
        "limits",
        "size",
        "stamps",
        "tokens_used",
        "total_requests",
        "total_tokens",
    )

    def __init__(self, limits: Limits, totals: tuple[int, int] = (0, 0)) -> None:
        self.limits = limits
        self.stamps = array("d", bytes(8 * min(limits.requests, INITIAL_RING)))
        self.head = 0  # the oldest counted admission
        self.size = 0
        self.charge_times = array("d")
        self.charge_tokens = array("q")
        self.charge_head = 0  # entries before it have left the window
        self.tokens_used = 0
        self.last_active = float("-inf")
        self.total_requests, self.total_tokens = totals

    def admit(self, now: float, limits: Limits) -> Admission:
        """Count one admission at `now` if the window has room; never awaits."""
        if limits is not self.limits:
            self._adopt(limits)
        cutoff = now - limits.window_seconds
        self._expire_stamps(cutoff)
        tokens_full = False
        if limits.tokens is not None:
            self._expire_charges(cutoff)
            tokens_full = self.tokens_used >= limits.tokens
        admitted = self.size < limits.requests and not tokens_full
        if admitted:
            self._count(now)
        return self._admission(now, limits, admitted, tokens_full)

    def charge(self, now: float, limits: Limits, tokens: int) -> None:
        """Log `tokens` at `now` and add them to the totals."""
        if limits is not self.limits:
            self._adopt(limits)
        self._expire_charges(now - limits.window_seconds)
        tokens = max(0, min(tokens, 2**62))  # an array('q') slot; no provider counts higher
        self.total_tokens += tokens
        if tokens:
            self.charge_times.append(now)
            self.charge_tokens.append(tokens)
            self.tokens_used += tokens
            self.last_active = now

    def report(self, now: float, limits: Limits) -> dict[str, Any]:
        """The window as of `now`, in the shape of `GET /usage`."""
        if limits is not self.limits:
            self._adopt(limits)
        window = limits.window_seconds
        self._expire_stamps(now - window)
        self._expire_charges(now - window)
        token_limit = limits.tokens
        over = token_limit is not None and self.tokens_used >= token_limit
        remaining_tokens = None if token_limit is None else max(0, token_limit - self.tokens_used)
        return {
            "window_seconds": window,
            "requests": {
                "used": self.size,
                "limit": limits.requests,
                "remaining": max(0, limits.requests - self.size),
                "reset_seconds": self.stamps[self.head] + window - now if self.size else 0.0,
            },
            "tokens": {
                "used": self.tokens_used,
                "limit": token_limit,
                "remaining": remaining_tokens,
                "reset_seconds": (
                    self._token_wait(now, window, token_limit)
                    if over
                    else self._oldest_charge_leaves(now, window)
                ),
            },
            "totals": {"requests": self.total_requests, "tokens": self.total_tokens},
        }

    def idle(self, now: float) -> bool:
        """True when every entry has left the window, so the window holds nothing but totals."""
        return now - self.last_active >= self.limits.window_seconds

    def _count(self, now: float) -> None:
        if self.size == len(self.stamps):
            self._grow()
        position = (self.head + self.size) % len(self.stamps)
        self.stamps[position] = now
        self.size += 1
        self.total_requests += 1
        self.last_active = now

    def _admission(
        self, now: float, limits: Limits, admitted: bool, tokens_full: bool
    ) -> Admission:
        window = limits.window_seconds
        # When the oldest counted admission leaves, a full window gets room again.
        full = self.size >= limits.requests
        request_wait = self.stamps[self.head] + window - now if admitted or full else 0.0
        token_wait = self._token_wait(now, window, limits.tokens) if tokens_full else 0.0
        remaining_tokens = reset_tokens = None
        if limits.tokens is not None:
            remaining_tokens = max(0, limits.tokens - self.tokens_used)
            reset_tokens = token_wait if tokens_full else self._oldest_charge_leaves(now, window)
        return Admission(
            admitted=admitted,
            limits=limits,
            remaining_requests=limits.requests - self.size,
            reset_requests_seconds=request_wait,
            remaining_tokens=remaining_tokens,
            reset_tokens_seconds=reset_tokens,
            retry_after_seconds=0.0 if admitted else max(request_wait, token_wait),
        )

    def _expire_stamps(self, cutoff: float) -> None:
        # Admissions are stamped in clock order, so the expired ones are all at the head.
        stamps, capacity = self.stamps, len(self.stamps)
        head, size = self.head, self.size
        while size and stamps[head] <= cutoff:
            head = head + 1 if head + 1 < capacity else 0
            size -= 1
        self.head, self.size = head, size

    def _expire_charges(self, cutoff: float) -> None:
        times, tokens = self.charge_times, self.charge_tokens
        head, end = self.charge_head, len(times)
        while head < end and times[head] <= cutoff:
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
        used = self.tokens_used
        times, tokens = self.charge_times, self.charge_tokens
        for index in range(self.charge_head, len(times)):
            used -= tokens[index]
            if used < token_limit:
                return times[index] + window - now
        return 0.0  # already under the limit

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
        ordered = self._ordered()
        capacity = min(self.limits.requests, 2 * len(ordered))
        ordered.extend(array("d", bytes(8 * (capacity - len(ordered)))))
        self.stamps, self.head = ordered, 0

    def _adopt(self, limits: Limits) -> None:
        """Take a key's new limits (keys.json may change them); rebuild the ring for a new size."""
        previous, self.limits = self.limits, limits
        if limits.requests == previous.requests:
            return
        # Keeping the newest `requests` admissions is exactly what the new limit needs to know.
        ordered = self._ordered()[-limits.requests :] if self.size else array("d")
        kept = len(ordered)
        ordered.extend(
            array("d", bytes(8 * (max(kept, min(limits.requests, INITIAL_RING)) - kept)))
        )
        self.stamps, self.head, self.size = ordered, 0, kept


class MemoryTracker:
    """The tracker for one process: every key's window in a dict."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        # Least recently active first, so idle keys are found at the front.
        self._windows: OrderedDict[str, SlidingWindow] = OrderedDict()
        self._retired: dict[str, tuple[int, int]] = {}  # totals of evicted keys

    def __len__(self) -> int:
        """The number of keys holding a window in memory."""
        return len(self._windows)

    async def admit(self, key_id: str, limits: Limits) -> Admission:
        """Admit and count one request, or refuse it without counting."""
        # No await in here: check and count are one step for the event loop.
        now = self._clock()
        return self._touch(key_id, limits, now).admit(now, limits)

    async def charge(self, key_id: str, limits: Limits, tokens: int) -> None:
        """Add a finished response's tokens to the key's window and totals."""
        now = self._clock()
        self._touch(key_id, limits, now).charge(now, limits, tokens)

    async def report(self, key_id: str, limits: Limits) -> dict[str, Any]:
        """The key's window and totals, as `GET /usage` answers them; creates nothing."""
        window = self._windows.get(key_id)
        if window is None:
            window = SlidingWindow(limits, self._retired.get(key_id, (0, 0)))
        return window.report(self._clock(), limits)

    async def close(self) -> None:
        """Forget every window; memory holds nothing that must be saved."""
        self._windows.clear()
        self._retired.clear()

    def _touch(self, key_id: str, limits: Limits, now: float) -> SlidingWindow:
        """The key's window, opened if new, marked as the most recently active."""
        window = self._windows.get(key_id)
        if window is None:
            return self._open(key_id, limits, now)
        self._windows.move_to_end(key_id)
        return window

    def _open(self, key_id: str, limits: Limits, now: float) -> SlidingWindow:
        self._evict(now)
        window = SlidingWindow(limits, self._retired.pop(key_id, (0, 0)))
        self._windows[key_id] = window
        return window

    def _evict(self, now: float) -> None:
        """Drop idle windows from the front (memory grows only when a key opens, so check then)."""
        windows = self._windows
        while windows:
            key_id, window = next(iter(windows.items()))
            if not window.idle(now):
                return
            del windows[key_id]
            self._retired[key_id] = (window.total_requests, window.total_tokens)
