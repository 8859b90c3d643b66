"""At MAX_CONNECTIONS, how often the connections held are looked over for an idle one to
close for a newcomer (`runtime.server.make_room`): a look that finds none is not made again
for LOOK_AGAIN_SECONDS. Each connection past the cap looked over every connection held: a
burst of 3,000 past 3,000 streams took 0.9 s of the loop, their chunks up to 234 ms late."""

from __future__ import annotations

from typing import Any

from proxy.runtime.server import LOOK_AGAIN_SECONDS, Overflow, make_room


class Held(dict[Any, Any]):
    """The connections held, counting the looks over them."""

    looks = 0

    def __iter__(self) -> Any:
        self.looks += 1
        return super().__iter__()


class Clock:
    """The loop's time, as `make_room` reads it."""

    def __init__(self) -> None:
        self.now = 1000.0

    def time(self) -> float:
        return self.now


def test_a_burst_past_the_cap_with_none_idle_is_refused_after_one_look() -> None:
    clock = Clock()
    overflow = Overflow(clock, None)  # type: ignore[arg-type]  # a loop's clock is all it reads
    held = Held({object(): None for _ in range(2000)})  # busy: none an idle keep-alive
    for _ in range(2000):
        assert not make_room(held, overflow)
    assert held.looks == 1
    clock.now += LOOK_AGAIN_SECONDS * 0.9
    assert not make_room(held, overflow)
    assert held.looks == 1
    clock.now += LOOK_AGAIN_SECONDS * 0.1  # a connection may have turned idle: look again
    assert not make_room(held, overflow)
    assert held.looks == 2
