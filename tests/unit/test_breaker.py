"""Provider health from traffic, without a server: each target's breaker (failures in a row, an
error ratio over a window, one probe after its cooldown) and what counts as an upstream failure.
/health and /ready are tests/app/test_health.py."""

from __future__ import annotations

from proxy.observe.health import Health, is_upstream_failure
from proxy.record import CLIENT_CLOSED, Outcome, Record
from proxy.upstream.breaker import CLOSED, HALF_OPEN, OPEN, BreakerPolicy, Breakers
from tests.support.clock import Clock


def breakers(clock: Clock | None = None, **policy: float) -> Breakers:
    return Breakers(["openai", "anthropic"], BreakerPolicy(**policy), clock or Clock())  # type: ignore[arg-type]


def health_of(board: Breakers, clock: Clock | None = None, **kwargs: object) -> Health:
    return Health(
        {"openai": 2, "anthropic": 1},
        board,
        {"openai": "openai", "anthropic": "anthropic"},
        clock=clock or Clock(),
        **kwargs,  # type: ignore[arg-type]
    )


def is_healthy(health: Health, provider: str = "openai") -> bool:
    providers = health.report()["providers"]
    assert isinstance(providers, dict)
    return bool(providers[provider]["healthy"])


def test_three_failures_in_a_row_open_a_breaker_and_the_provider_turns_unhealthy() -> None:
    board = breakers()
    health = health_of(board)
    board["openai"].failed(1000.0, "connection refused")
    board["openai"].failed(1000.0, "connection refused")
    assert is_healthy(health) and board["openai"].state == CLOSED

    board["openai"].failed(1000.0, "connection refused")
    assert board["openai"].state == OPEN
    assert not is_healthy(health)
    assert is_healthy(health, "anthropic")


def test_one_success_resets_the_streak() -> None:
    board = breakers()
    breaker = board["openai"]
    breaker.failed(1.0, "x")
    breaker.failed(1.0, "x")
    breaker.succeeded(1.0)
    breaker.failed(1.0, "x")
    breaker.failed(1.0, "x")
    assert breaker.state == CLOSED  # the streak starts over after a success


def test_one_keys_timeouts_are_held_and_a_second_keys_counts_them_all() -> None:
    breaker = breakers()["openai"]
    for _ in range(10):  # one client's long generations: never the provider's fault alone
        breaker.failed(1.0, "no headers in time", key="alice")
    assert breaker.state == CLOSED and breaker.failures_in_a_row == 0
    assert breaker.last_error is None
    breaker.succeeded(2.0)  # another key answered: the held ones are forgotten
    breaker.failed(3.0, "no headers in time", key="alice")
    assert breaker.state == CLOSED
    breaker.failed(4.0, "no headers in time", key="bob")  # two keys: the provider is slow
    assert breaker.failures_in_a_row == 2 and breaker.state == CLOSED
    breaker.failed(5.0, "no headers in time", key="alice")
    assert breaker.state == OPEN


def test_a_held_timeout_leaves_the_window_and_statuses_count_as_ever() -> None:
    breaker = breakers(window_seconds=60)["openai"]
    breaker.failed(0.0, "no headers in time", key="alice")
    breaker.failed(61.0, "no headers in time", key="bob")  # alice's is out of the window
    assert breaker.failures_in_a_row == 0
    for _ in range(3):
        breaker.failed(62.0, "503 from provider")  # a status judges the provider alone
    assert breaker.state == OPEN


def test_a_status_counts_itself_not_one_keys_held_timeouts() -> None:
    breaker = breakers()["openai"]
    breaker.failed(1.0, "no headers in time", key="alice")
    breaker.failed(1.0, "no headers in time", key="alice")
    breaker.failed(1.0, "503 from provider")
    assert breaker.failures_in_a_row == 1 and breaker.state == CLOSED


def test_a_probe_that_one_key_timed_out_gives_its_turn_back() -> None:
    clock = Clock()
    breaker = breakers(clock, cooldown_seconds=30)["openai"]
    for _ in range(3):
        breaker.failed(clock(), "connection refused")
    clock.advance(30)
    assert breaker.admits(clock()) and breaker.state == HALF_OPEN
    breaker.failed(clock(), "no headers in time", key="alice")
    assert breaker.state == HALF_OPEN and breaker.admits(clock())  # the next may probe


def test_an_open_breaker_lets_exactly_one_probe_through_after_its_cooldown() -> None:
    clock = Clock()
    breaker = breakers(clock, cooldown_seconds=30)["openai"]
    for _ in range(3):
        breaker.failed(clock.now, "503")
    assert not breaker.admits(clock.now)
    clock.now += 29.9
    assert not breaker.admits(clock.now)
    clock.now += 0.2
    assert breaker.admits(clock.now) and breaker.state == HALF_OPEN
    assert not breaker.admits(clock.now)  # one probe, not a burst
    assert not breaker.admits(clock.now + 100)
    breaker.failed(clock.now, "503 again")  # the probe failed: open for another cooldown
    assert breaker.state == OPEN and not breaker.admits(clock.now + 29)
    assert breaker.admits(clock.now + 31)
    breaker.succeeded(clock.now + 31)  # the probe succeeded: closed
    assert breaker.state == CLOSED and breaker.admits(clock.now + 31)


def test_a_failure_while_open_starts_another_cooldown_even_when_the_ratio_has_faded() -> None:
    # Opened by its error ratio; once the window passed, the ratio alone would not open it
    # again: a probe's failure still starts a full cooldown (probes.py counts on it).
    clock = Clock()
    board = breakers(clock, failures_in_a_row=100, min_requests=4, window_seconds=60)
    breaker = board["openai"]
    for _ in range(4):
        breaker.failed(clock.now, "503")
    assert breaker.state == OPEN and board.not_closed() == ["openai"]
    clock.now += 61  # past the window, and the 30 s cooldown
    breaker.failed(clock.now, "probe: 503")
    assert breaker.state == OPEN and not breaker.admits(clock.now + 29)
    assert breaker.admits(clock.now + 31)


def test_an_error_ratio_over_the_minimum_opens_a_breaker_without_failures_in_a_row() -> None:
    clock = Clock()
    breaker = breakers(clock, failures_in_a_row=100, error_ratio=0.5, min_requests=10)["openai"]
    for _ in range(4):
        breaker.failed(clock.now, "503")
        breaker.succeeded(clock.now)
    assert breaker.state == CLOSED  # 8 attempts: under the minimum
    breaker.failed(clock.now, "503")
    breaker.succeeded(clock.now)
    assert breaker.state == CLOSED  # 10 attempts, ratio 0.5, but the last was a success
    breaker.failed(clock.now, "503")
    assert breaker.state == OPEN  # 11 attempts, 6 failed


def test_failures_older_than_the_window_leave_the_ratio() -> None:
    clock = Clock()
    breaker = breakers(clock, failures_in_a_row=100, min_requests=4, window_seconds=60)["openai"]
    for _ in range(3):
        breaker.failed(clock.now, "503")
        breaker.succeeded(clock.now)
    clock.now += 61
    breaker.succeeded(clock.now)
    breaker.succeeded(clock.now)
    breaker.succeeded(clock.now)
    breaker.failed(clock.now, "503")
    assert breaker.state == CLOSED  # 1 of 4 in the window


def test_what_counts_as_an_upstream_failure() -> None:
    def record(status: int, outcome: Outcome, answered: bool = True) -> Record:
        finished = Record.begin(None, "POST", "/v1/chat/completions")
        finished.ttft_ms = 50.0 if answered else None
        finished.end(status, outcome)
        return finished

    assert is_upstream_failure(record(503, Outcome.ANSWERED))  # the provider's own 503
    assert is_upstream_failure(record(200, Outcome.BROKEN))  # cut mid-stream
    assert is_upstream_failure(record(504, Outcome.TIMEOUT, answered=False))
    assert not is_upstream_failure(record(503, Outcome.REFUSED, answered=False))  # Redis down
    assert not is_upstream_failure(record(500, Outcome.INTERNAL, answered=False))
    assert not is_upstream_failure(record(429, Outcome.ANSWERED))
    assert not is_upstream_failure(record(CLIENT_CLOSED, Outcome.CLIENT_LEFT))
