"""Circuit breakers, one per target: stop sending to a target that keeps failing.

A breaker is *closed* (traffic flows) until the target fails BREAKER_FAILURES times in a
row, or fails at least BREAKER_ERROR_RATIO of at least BREAKER_MIN_REQUESTS attempts within
BREAKER_WINDOW_SECONDS. Then it is *open*: the attempt loop skips the target. After
BREAKER_COOLDOWN_SECONDS it lets exactly one probe through (*half-open*): the probe's
success closes it, its failure opens it again for another cooldown. While the probe is out,
every other request skips the target, so an outage never sees a burst of probes.

A failure is the provider's: unreachable, no headers in time, a body cut short, or a
status that says it is failing (408, 500, 502, 503, 504, 529). A 429 is about a key, not
the target (the pool sets that key aside), and a 4xx is about the request: neither counts,
and a client that left tells nothing (`abstain`: a probe that learned nothing gives its
turn back). With PROBE_INTERVAL_SECONDS, an open breaker also hears a probe that generates
nothing (`probes.py`): its success closes the breaker before any client's request is the
probe, its failure opens it for another cooldown. Breakers live in one process (each worker
learns on its own), and are read by /health and the breaker-state metric. Only their own
verbs change them: `admits`, `succeeded`, `failed`, `abstain`, `cool` (an open breaker
past its cooldown half-open, for /health and the metric), `Breakers.report_broken` for a
body cut short, `Breakers.report_failed` for an error event inside a 200 answer; `Breakers.keep_only` forgets those of targets a reload removed, and
makes those of targets it added. What a request under way on a removed target learns after
the reload goes to a breaker of its own, listed nowhere: it cannot bring the target back
to /health (degraded until the next reload, when it opened).

A request that went out and then timed out, lost its connection, or had its body cut short
may be its own doing (one client's long generations outlast any timeout): such a failure
names its virtual key, and counts only once requests of `BLAMING_KEYS` distinct keys
failed so within BREAKER_WINDOW_SECONDS. Until then it is held (a probe gives its turn
back); the failure that makes the second key counts itself and those held (in the streak
those since the last success, in the ratio those still in the window). So one client's
slow requests never move every other key to a fallback, and a provider slow for everyone
still opens its breaker. Statuses and refused connections judge the provider alone.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass

CLOSED, HALF_OPEN, OPEN = "closed", "half_open", "open"
LAST_ERROR_CHARS = 200
# The error ratio's window is kept as this many buckets of counts: memory stays constant
# whatever the traffic, and a bucket leaves the window whole (the window is that coarse).
BUCKETS = 10
# Timeouts and cuts count against a target once requests of this many keys failed so.
BLAMING_KEYS = 2
HELD_FAILURES = 64  # the most held at once (the oldest go first)


@dataclass(frozen=True, slots=True)
class BreakerPolicy:
    """When a breaker opens and how long it stays open."""

    failures_in_a_row: int = 3
    error_ratio: float = 0.5  # 0: only failures in a row count
    min_requests: int = 20
    window_seconds: float = 60.0
    cooldown_seconds: float = 30.0


class Breaker:
    """One target's breaker."""

    __slots__ = (
        "_bucket_seconds",
        "_counts",
        "_held",
        "_held_in_row",
        "_on_change",
        "_policy",
        "_slow",
        "failures_in_a_row",
        "last_error",
        "last_failure",
        "opened_at",
        "probing",
        "state",
    )

    def __init__(
        self, policy: BreakerPolicy, on_change: Callable[[str], None] = lambda state: None
    ) -> None:
        self._policy = policy
        self._on_change = on_change
        self._bucket_seconds = policy.window_seconds / BUCKETS
        # Per bucket: [its number (time // bucket seconds), attempts, failures].
        self._counts = [[-1, 0, 0] for _ in range(BUCKETS)]
        self.state = CLOSED
        self.failures_in_a_row = 0
        self.opened_at = 0.0
        self.last_failure = float("-inf")
        self.last_error: str | None = None
        self.probing = False
        self._slow: dict[str, float] = {}  # key → when its request last timed out or was cut
        self._held: deque[float] = deque(maxlen=HELD_FAILURES)  # when such failures were held
        self._held_in_row = 0  # of them, those since the last success

    def admits(self, now: float) -> bool:
        """May an attempt go to this target now? Half-open admits exactly one probe."""
        if self.state == CLOSED:
            return True
        self.cool(now)
        if self.state == HALF_OPEN and not self.probing:
            self.probing = True
            return True
        return False

    def cool(self, now: float) -> None:
        """Open past its cooldown: half-open, its next request the probe (what `admits`
        finds first, and what /health and the metric say of a target no request reached)."""
        if self.state == OPEN and now - self.opened_at >= self._policy.cooldown_seconds:
            self._move(HALF_OPEN)

    def succeeded(self, now: float) -> None:
        self.failures_in_a_row = self._held_in_row = 0
        self._remember(now, failed=False)
        if self.state != CLOSED:
            self.probing = False
            for bucket in self._counts:
                bucket[0] = -1
            self._move(CLOSED)

    def abstain(self) -> None:
        """The attempt told nothing about the target (a 429 or a refused key is about the key,
        a client that left about the client): a half-open probe gives its turn back."""
        self.probing = False

    def failed(self, now: float, why: str, key: str | None = None) -> None:
        """The target failed. `key`: the virtual key whose request went out and then timed
        out or was cut, which counts only once other keys' requests fail so too."""
        if key is not None:
            if not self._blames(now, key):
                self._held.append(now)
                self._held_in_row += 1
                self.probing = False  # a probe that learned nothing gives its turn back
                return
            self._count_held(now)
        self.failures_in_a_row += 1
        self.last_failure, self.last_error = now, why[:LAST_ERROR_CHARS]
        self._remember(now, failed=True)
        # Open or half-open, a failure (a probe's, or a request sent when every target of a
        # key was open) starts another cooldown; closed, it opens by the policy.
        if self.state != CLOSED or self._should_open(now):
            self.opened_at, self.probing = now, False
            self._move(OPEN)

    def _blames(self, now: float, key: str) -> bool:
        """Whether requests of enough distinct keys timed out or were cut here lately."""
        slow, horizon = self._slow, now - self._policy.window_seconds
        for name in [name for name, at in slow.items() if at < horizon]:
            del slow[name]
        if not slow:  # those held are older than the window
            self._held.clear()
            self._held_in_row = 0
        slow[key] = now
        return len(slow) >= BLAMING_KEYS

    def _count_held(self, now: float) -> None:
        """The held failures count now: in the streak since the last success, in the ratio
        those still in the window."""
        self.failures_in_a_row += self._held_in_row
        oldest = int(now // self._bucket_seconds) - BUCKETS + 1  # the window's first bucket
        for held in self._held:
            if int(held // self._bucket_seconds) >= oldest:
                self._remember(held, failed=True)
        self._held.clear()
        self._held_in_row = 0

    def _move(self, state: str) -> None:
        if state != self.state:
            self.state = state
            self._on_change(state)

    def _remember(self, now: float, failed: bool) -> None:
        number = int(now // self._bucket_seconds)
        bucket = self._counts[number % BUCKETS]
        if bucket[0] != number:  # a bucket from an earlier window: start it over
            bucket[0], bucket[1], bucket[2] = number, 0, 0
        bucket[1] += 1
        bucket[2] += failed

    def _should_open(self, now: float) -> bool:
        policy = self._policy
        if self.failures_in_a_row >= policy.failures_in_a_row:
            return True
        if policy.error_ratio <= 0:
            return False
        oldest = int(now // self._bucket_seconds) - BUCKETS + 1
        attempts = failures = 0
        for number, bucket_attempts, bucket_failures in self._counts:
            if number >= oldest:
                attempts += bucket_attempts
                failures += bucket_failures
        return attempts >= policy.min_requests and failures / attempts >= policy.error_ratio


class Breakers:
    """Every target's breaker, by target name (names come from keys.json only)."""

    def __init__(
        self,
        names: Iterable[str],
        policy: BreakerPolicy,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[str, str], None] = lambda name, state: None,
    ) -> None:
        """`on_change(target, state)` is told every move (the breaker-state metric)."""
        self._policy = policy
        self.clock = clock
        self._on_change = on_change
        self._breakers: dict[str, Breaker] = {}
        for name in names:
            self._add(name)

    def __getitem__(self, name: str) -> Breaker:
        breaker = self._breakers.get(name)
        if breaker is None:  # a target a reload removed: what it learns is told to no one
            return Breaker(self._policy)
        return breaker

    def _add(self, name: str) -> Breaker:
        breaker = Breaker(self._policy, lambda state: self._on_change(name, state))
        self._breakers[name] = breaker
        self._on_change(name, CLOSED)
        return breaker

    def keep_only(self, names: Collection[str]) -> None:
        """After a reload: forget the breakers of targets keys.json no longer names (no
        request goes there to close them: /health and the metric would say open for ever),
        and make those of the targets it names anew. A request still in flight on a
        forgotten one reports to a breaker listed nowhere (`__getitem__`)."""
        for name in [name for name in self._breakers if name not in names]:
            del self._breakers[name]
            self._on_change(name, CLOSED)
        for name in names:
            if name not in self._breakers:
                self._add(name)

    def is_closed(self, name: str) -> bool:
        """True while `name`'s breaker lets every request through (a question that, unlike
        `admits`, takes no half-open probe)."""
        breaker = self._breakers.get(name)
        return breaker is None or breaker.state == CLOSED

    def cool(self) -> None:
        """Every open breaker past its cooldown half-open (before /health or a scrape reads
        them: a fallback no request reaches would otherwise read open for ever)."""
        now = self.clock()
        for breaker in self._breakers.values():
            breaker.cool(now)

    def not_closed(self) -> list[str]:
        """The targets whose breaker is open or half-open (what probes.py probes)."""
        return [name for name, breaker in self._breakers.items() if breaker.state != CLOSED]

    def report_broken(self, name: str, why: str, key: str | None = None) -> None:
        """The target answered, then cut its body short (a request of `key`): a failure of
        the target's once other keys' requests fail so too."""
        self[name].failed(self.clock(), why, key)

    def report_failed(self, name: str, why: str) -> None:
        """The target answered 200, then said inside its answer that it failed (a stream's
        `overloaded_error` or server error after content): a failure at once, as its status."""
        self[name].failed(self.clock(), why)

    def items(self) -> Iterable[tuple[str, Breaker]]:
        return self._breakers.items()

    def report(self) -> dict[str, dict[str, object]]:
        """/health's view: each target's state, failures in a row, last error."""
        return {
            name: {
                "state": breaker.state,
                "failures_in_a_row": breaker.failures_in_a_row,
                "last_error": breaker.last_error,
            }
            for name, breaker in sorted(self._breakers.items())
        }
