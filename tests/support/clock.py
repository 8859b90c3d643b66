"""The one injected clock of the tests: time moves only when the test moves it.

Pass it where the code takes a `clock` (a callable returning seconds); move it with
`advance(seconds)` or by setting `now`. No test sleeps through a window, a cooldown or a TTL.
"""

from __future__ import annotations

import asyncio


class Clock:
    """A clock that moves only when told."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class LoopClock:
    """The running event loop's clock, moved on by a test: `advance(seconds)` is a sleep that
    ended at once. Everything reading the loop's time sees it move (a connection's idle time,
    a server's idle timer, which then goes off as it would have); nothing else does. `restore`
    puts the loop's own clock back."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop, self._real, self.offset = loop, loop.time, 0.0
        loop.time = self._time  # type: ignore[method-assign]

    def _time(self) -> float:
        return self._real() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds

    def restore(self) -> None:
        del self._loop.time  # type: ignore[method-assign]
