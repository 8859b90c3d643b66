"""Waiting on what a test expects to happen, never on time: poll a condition with a deadline.

`until(condition)` asks `condition` (a plain or an async callable) every `every` seconds until
it holds and returns how long that took; past `within` seconds it fails naming `what`. The
poll interval is not a guess at how long something takes: the deadline only bounds a failure,
so the default is generous (15 s): the suite runs on two pytest-xdist workers, and on two
loaded cores what a quiet machine does in milliseconds can take seconds (ba72c95).
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable


async def until(
    condition: Callable[[], bool | Awaitable[bool]],
    within: float = 15.0,
    what: str = "the condition",
    every: float = 0.01,
) -> float:
    """Poll `condition` until it holds; the seconds it took. AssertionError past `within`."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    while True:
        held = condition()
        if inspect.isawaitable(held):
            held = await held
        if held:
            return loop.time() - started
        assert loop.time() - started < within, f"{what} did not hold within {within} s"
        await asyncio.sleep(every)
