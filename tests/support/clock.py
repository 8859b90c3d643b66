"""The one injected clock of the tests: time moves only when the test moves it.

Pass it where the code takes a `clock` (a callable returning seconds); move it with
`advance(seconds)` or by setting `now`. No test sleeps through a window, a cooldown or a TTL.
"""

from __future__ import annotations


class Clock:
    """A clock that moves only when told."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
