"""The tracker: admit requests, reserve and settle what they cost, report usage per key.

A true sliding window (a sliding log, not fixed buckets): a key gets at most
`limits.requests` admissions in any trailing `limits.window_seconds`, and is admitted while
the tokens charged in that window plus those reserved by its requests still running are
under `limits.tokens`, and while its spend in the budget's window plus the spend reserved
is under `budget.usd`.

Invariants:
- `admit` checks, counts and reserves in one atomic step: in memory there is no `await`
  between the check and the count (the Redis backend does all in one script), so
  concurrent requests never overshoot the request limit and see each other's reservations.
- A refused request is not counted and reserves nothing.
- `settle` replaces a request's reservation by what it really cost. So the tokens (or the
  spend) can overshoot a limit only by what the last admitted requests used beyond their
  own reservations: at most one request's worth when estimates hold, since each request is
  admitted only while the window plus every reservation is under the limit.

The tracker also remembers deferred work owed (`owe`, `claim`): a background response or a
batch, found by its id alone and remembering the key that created it (`Owed`), so whichever
key retrieves it finished, its creator is charged; a claim succeeds once, in whichever
process asks first, so each is charged exactly once.

This module holds the shared vocabulary and the backends' protocol; `memory_tracker.py`
(over `window.py`) and `redis_tracker.py` are the two backends, with the same answers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

MICRO = 1_000_000  # micro-dollars per dollar: spend is counted in integers, exact in Redis
# The token kinds counted in a key's totals, as the log line's `usage` names them: the two
# totals, then the parts of the prompt (cache reads and writes, audio) and of the completion
# (reasoning, audio), each priced at its own rate.
KINDS = (
    "prompt_tokens",
    "completion_tokens",
    "cache_read_tokens",
    "cache_write_tokens",
    "input_audio_tokens",
    "reasoning_tokens",
    "output_audio_tokens",
)
NO_KINDS = (0,) * len(KINDS)
# When a window is full only because of requests still running, nobody knows when they end:
# a refused client is told to come back after this long, and asks again.
IN_FLIGHT_WAIT_SECONDS = 1.0


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
class Budget:
    """A key's spending cap: at most `usd` dollars in any trailing `window_seconds`."""

    usd: float
    window_seconds: float

    def __post_init__(self) -> None:
        if not (self.usd > 0 and self.window_seconds > 0):
            raise ValueError(f"a budget must be positive, got {self}")

    @property
    def micro_usd(self) -> int:
        return round(self.usd * MICRO)


class Charge(NamedTuple):
    """What a request costs (or is expected to cost, as a reservation): tokens and dollars.

    Charge, Admission and Reading are made on every request: named tuples, as immutable as
    a frozen dataclass and made in a fraction of its time."""

    tokens: int = 0
    micro_usd: int = 0
    kinds: tuple[int, ...] = NO_KINDS  # tokens by kind, in KINDS order (totals only)


NOTHING = Charge()


@dataclass(frozen=True, slots=True)
class Owed:
    """Deferred work a key owes: a background response or a batch, whose usage comes later.

    Kept by the work's id alone (`Tracker.owe`), so the first retrieval that finds it
    finished, by whichever key, claims it and charges the key that created it.
    """

    key_id: str  # the creating key's tracker handle (a digest, never the key)
    origin: str  # what charging it needs later: the owing module's choice (provider, model)
    charged: Charge = NOTHING  # what the creating request was charged for it already


@dataclass(frozen=True, slots=True)
class Scope:
    """One set of limits a request must pass: a key's own, its team's, or a model group's.

    `id` is the tracker's handle (a digest, never a key); `kind` ("key", "team", "model")
    and `name` say in a refusal which limit refused. `max_in_flight`: the requests it may
    have open at once (None: no cap); a request holds a slot of each scope that has one.
    """

    id: str
    kind: str
    name: str
    limits: Limits | None
    budget: Budget | None = None
    max_in_flight: int | None = None
    queue_seconds: float = 0.0

    @property
    def counted(self) -> bool:
        """True when the scope has a window or a budget to count requests in."""
        return self.limits is not None or self.budget is not None


class Admission(NamedTuple):
    """The answer to one `admit`: the verdict, the reservation's ticket, what the headers say."""

    admitted: bool
    limits: Limits | None
    remaining_requests: int
    # Until the window admits one more request (0 when it has room); when admitted: until
    # the oldest counted request leaves.
    reset_requests_seconds: float
    remaining_tokens: int | None  # None when no token limit
    reset_tokens_seconds: float | None
    # 0.0 when admitted; else until a request would be admitted (requests, tokens, budget).
    retry_after_seconds: float
    ticket: int = 0  # names the reservation `settle` releases; 0 when refused
    budget: Budget | None = None
    spent_micro_usd: int = 0  # in the budget's window, reservations included
    full: bool = False  # refused: this scope's window or budget had no room
    slots_full: bool = False  # refused: this scope's max_in_flight slots were all taken
    in_flight: int = 0  # slots held, this request's included when admitted
    # Set by the quota for a request admitted over several scopes: what settling releases.
    scopes: tuple[Scope, ...] = ()
    tickets: tuple[int, ...] = ()  # one per scope
    lease: str = ""  # the slots it holds ("" none)
    # Refused by a window that is full only while requests in flight hold their reservations:
    # it has room again when they settle (`retry_after_seconds` is IN_FLIGHT_WAIT_SECONDS).
    awaits_in_flight: bool = False

    @property
    def over_budget(self) -> bool:
        """Refused for the budget: it is full, and no full window of requests or tokens
        keeps the request out as long (a budget held only by requests in flight frees up in
        a second; a full request window may keep the request out a minute)."""
        if self.admitted or self.budget is None or self.spent_micro_usd < self.budget.micro_usd:
            return False
        if self.limits is None:
            return True
        wait = self.retry_after_seconds
        return not (
            (self.remaining_requests <= 0 and self.reset_requests_seconds >= wait)
            or (self.remaining_tokens == 0 and (self.reset_tokens_seconds or 0.0) >= wait)
        )

    @property
    def names_requests(self) -> bool:
        """A refusal not the budget's is its request window's: full, and no full token
        window keeps the request out longer (else the token window's)."""
        if self.remaining_requests > 0:
            return False
        tokens_full = self.remaining_tokens == 0
        return not tokens_full or self.reset_requests_seconds >= (self.reset_tokens_seconds or 0.0)


class Reading(NamedTuple):
    """What a backend read of one key's windows in one atomic step; this module decides from it.

    Waits are in seconds; a wait to get under a limit is read only when the key is over it.
    """

    admitted: bool = False
    ticket: int = 0
    full: bool = False  # the window or the budget had no room (whatever the verdict)
    slots: int = -1  # slots held (-1: no max_in_flight); `slots_full` when at the cap
    slots_full: bool = False
    requests: int = 0  # counted admissions in the window
    request_leaves: float = 0.0  # until the oldest of them leaves (0: none)
    tokens: int = 0  # charged in the window
    tokens_reserved: int = 0  # reserved by requests still running
    token_wait: float = 0.0  # until the tokens are under the limit again
    charge_leaves: float = 0.0  # until the oldest charge leaves
    spent: int = 0  # micro-dollars in the budget's window
    spend_reserved: int = 0
    budget_wait: float = 0.0
    spend_leaves: float = 0.0
    total_requests: int = 0
    total_tokens: int = 0
    total_micro_usd: int = 0
    total_kinds: tuple[int, ...] = NO_KINDS  # in KINDS order


def tokens_over(used: int, reserved: int, limits: Limits | None) -> bool:
    """The token window is full: what was charged plus what is reserved reaches the limit."""
    return limits is not None and limits.tokens is not None and used + reserved >= limits.tokens


def budget_over(spent: int, reserved: int, budget: Budget | None) -> bool:
    """The budget is spent: the window's spend plus what is reserved reaches it (micro-$)."""
    return budget is not None and spent + reserved >= budget.micro_usd


def tokens_full(reading: Reading, limits: Limits | None) -> bool:
    return tokens_over(reading.tokens, reading.tokens_reserved, limits)


def budget_full(reading: Reading, budget: Budget | None) -> bool:
    return budget_over(reading.spent, reading.spend_reserved, budget)


def admission(reading: Reading, limits: Limits | None, budget: Budget | None) -> Admission:
    """The verdict and the waits the headers tell, from one backend reading."""
    admitted = reading.admitted
    request_wait = token_wait = budget_wait = 0.0
    running = False  # a full token window or budget has room once requests in flight settle
    remaining_requests = 0
    remaining_tokens = reset_tokens = None
    if limits is not None:
        # When the admission that `request_leaves` names leaves, a full window gets room
        # again (a lowered limit may leave more admissions in it than the limit).
        full = reading.requests >= limits.requests
        request_wait = reading.request_leaves if admitted or full else 0.0
        remaining_requests = max(0, limits.requests - reading.requests)
        if limits.tokens is not None:
            over = tokens_full(reading, limits)
            token_wait = reading.token_wait if over else 0.0
            if over and reading.tokens < limits.tokens:  # the charges alone leave room
                token_wait, running = min(token_wait, IN_FLIGHT_WAIT_SECONDS), True
            used = reading.tokens + reading.tokens_reserved
            remaining_tokens = max(0, limits.tokens - used)
            reset_tokens = token_wait if over else reading.charge_leaves
            if not over and not reset_tokens and reading.tokens_reserved:
                # Only reservations hold tokens: they come back as charges, a window from now.
                reset_tokens = limits.window_seconds
    if not admitted and budget is not None and budget_full(reading, budget):
        budget_wait = reading.budget_wait
        if reading.spent < budget.micro_usd:  # the spend alone leaves room
            budget_wait, running = min(budget_wait, IN_FLIGHT_WAIT_SECONDS), True
    wait = 0.0 if admitted else max(request_wait, token_wait, budget_wait)
    # Every field in order as one tuple: see window.SlidingWindow.reading (~0.45 -> 0.25 us).
    return tuple.__new__(Admission, (
        admitted,
        limits,
        remaining_requests,
        request_wait,  # reset_requests_seconds
        remaining_tokens,
        reset_tokens,  # reset_tokens_seconds
        wait,  # retry_after_seconds
        reading.ticket,  # ticket
        budget,
        reading.spent + reading.spend_reserved if budget else 0,  # spent_micro_usd
        reading.full and not admitted,  # full
        reading.slots_full and not admitted,  # slots_full
        max(0, reading.slots),  # in_flight
        (),  # scopes
        (),  # tickets
        "",  # lease
        running and not admitted and wait <= IN_FLIGHT_WAIT_SECONDS,  # awaits_in_flight
    ))  # fmt: skip


def usd(micro_usd: int) -> float:
    return round(micro_usd / MICRO, 6)


def seconds(value: float) -> float:
    """Waits in reports: milliseconds are enough (3599.7704429010005 is noise)."""
    return round(max(0.0, value), 3)


def report(reading: Reading, limits: Limits | None, budget: Budget | None) -> dict[str, Any]:
    """The windows and totals in the shape of `GET /usage`, from one backend reading."""
    document: dict[str, Any] = {}
    if limits is not None:
        token_limit = limits.tokens
        reserved = reading.tokens_reserved
        token_reset = reading.token_wait if tokens_full(reading, limits) else reading.charge_leaves
        if not token_reset and reserved:
            # Only reservations hold tokens: they come back as charges, a window from now
            # (as `admission` tells x-ratelimit-reset-tokens).
            token_reset = limits.window_seconds
        document = {
            "window_seconds": limits.window_seconds,
            "requests": {
                "used": reading.requests,
                "limit": limits.requests,
                "remaining": max(0, limits.requests - reading.requests),
                "reset_seconds": seconds(reading.request_leaves),
            },
            "tokens": {
                "used": reading.tokens,
                "reserved": reserved,
                "limit": token_limit,
                "remaining": None
                if token_limit is None
                else max(0, token_limit - reading.tokens - reserved),
                "reset_seconds": seconds(token_reset),
            },
        }
    if budget is not None:
        held = reading.spent + reading.spend_reserved
        spend_reset = reading.budget_wait if budget_full(reading, budget) else reading.spend_leaves
        if not spend_reset and reading.spend_reserved:
            spend_reset = budget.window_seconds  # only reservations: spent a window from now
        document["budget"] = {
            "window_seconds": budget.window_seconds,
            "limit_usd": budget.usd,
            "spent_usd": usd(reading.spent),
            "reserved_usd": usd(reading.spend_reserved),
            "remaining_usd": usd(max(0, budget.micro_usd - held)),
            "reset_seconds": seconds(spend_reset),
        }
    document["totals"] = {
        "requests": reading.total_requests,
        "tokens": reading.total_tokens,
        "spent_usd": usd(reading.total_micro_usd),
        **dict(zip(KINDS, reading.total_kinds, strict=True)),
    }
    return document


class TrackerUnavailable(Exception):
    """The backend cannot be reached (Redis lost); `quota` applies QUOTA_ON_REDIS_ERROR."""


class Tracker(Protocol):
    """What `quota` and `/usage` need from a tracker, whatever keeps its state."""

    # Called with the cause when settles could not be sent (Redis lost): they are lost.
    on_settle_failed: Callable[[str], None]

    async def admit(
        self,
        key_id: str,
        limits: Limits | None,
        budget: Budget | None = None,
        claim: Charge = NOTHING,
    ) -> Admission:
        """Admit, count and reserve `claim` for one request, or refuse it without counting."""
        ...

    def settle(
        self,
        key_id: str,
        limits: Limits | None,
        spent: Charge,
        ticket: int = 0,
        budget: Budget | None = None,
    ) -> None:
        """Release `ticket`'s reservation and charge what the request really cost."""
        ...

    async def admit_scopes(
        self, scopes: Sequence[Scope], claim: Charge = NOTHING, lease: str = ""
    ) -> tuple[Admission, ...]:
        """Admit a request in every scope or in none, in one atomic step: one Admission per
        scope, all admitted or all refused. A refusal counts and reserves nothing. `lease`
        names the slot the request takes in each scope with a max_in_flight."""
        ...

    def settle_scopes(self, scopes: Sequence[Scope], spent: Charge, tickets: Sequence[int]) -> None:
        """`settle` in each scope, with the ticket its admission gave."""
        ...

    def release(self, scopes: Sequence[Scope], lease: str, done: Callable[[], None]) -> None:
        """Give back the slots `lease` holds in `scopes` now, never waiting; `done` is
        called once they are back (so a request waiting for one can try again)."""
        ...

    async def in_flight(self, scope: Scope) -> int:
        """The slots of `scope` held right now (every process, with Redis)."""
        ...

    async def report(
        self, key_id: str, limits: Limits | None, budget: Budget | None = None
    ) -> dict[str, Any]:
        """The key's windows and totals, as `GET /usage` answers them."""
        ...

    async def owe(self, deferred_id: str, owed: Owed, seconds: float) -> None:
        """Remember for `seconds` that `owed.key_id` owes the deferred work `deferred_id` (a
        background response, a batch: unique among everything owed, the caller's namespace).
        Owing it again replaces what was owed."""
        ...

    async def claim(self, deferred_id: str) -> Owed | None:
        """Take what is owed for `deferred_id`, whoever asks: to exactly one caller, in every
        process sharing the state; None when nothing is owed (any more)."""
        ...

    def forget(self, scope_ids: Iterable[str]) -> None:
        """Drop what this process keeps of scopes no key or team has any more (deleted):
        their windows and totals, never asked for again. Shared state is left as it is."""
        ...

    async def flush(self) -> None:
        """Return once every settle made so far is in the shared state."""
        ...

    async def ping(self) -> None:
        """Return once the backend answers. Raises TrackerUnavailable."""
        ...

    async def close(self) -> None:
        """Release what the backend holds (the Redis backend first sends what it still holds)."""
        ...
