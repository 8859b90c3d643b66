"""Waiting for an in-flight slot (`queue_seconds`): first come, first served.

Each scope with waiters in this process has a line of them. Only the first asks the
tracker again, when a slot of the scope is given back in this process, or every
POLL_SECONDS (a slot freed by another process or instance wakes nobody here). A newcomer
joins the end of a line that exists instead of trying ahead of it. Across processes
the order is by who asks first after a slot frees: each process's own line stays in order.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Iterable

from proxy.quota.tracker import Scope

# How often the first in line asks again when nothing in this process woke it.
POLL_SECONDS = 0.1


class Waiter:
    """One request's place in a line."""

    __slots__ = ("line", "woken")

    def __init__(self, line: deque[Waiter]) -> None:
        self.line = line
        self.woken = asyncio.Event()

    @property
    def first(self) -> bool:
        return bool(self.line) and self.line[0] is self

    async def turn(self, deadline: float) -> bool:
        """Wait until woken or, when first, POLL_SECONDS; False once `deadline` has passed."""
        loop = asyncio.get_running_loop()
        left = deadline - loop.time()
        if left <= 0:
            return False
        wait = min(left, POLL_SECONDS) if self.first else left
        try:
            async with asyncio.timeout(wait):
                await self.woken.wait()
        except TimeoutError:
            pass
        self.woken.clear()
        return loop.time() < deadline

    def leave(self) -> None:
        """Out of the line (admitted, refused or gone); the next one gets its turn."""
        if self in self.line:
            self.line.remove(self)
        if self.line:
            self.line[0].woken.set()


class Lines:
    """Every scope's line of requests waiting for a slot, in this process."""

    def __init__(self) -> None:
        self._lines: dict[str, deque[Waiter]] = {}

    def __len__(self) -> int:
        """Requests waiting in every line."""
        return sum(len(line) for line in self._lines.values())

    def waiting(self, scopes: Iterable[Scope]) -> Scope | None:
        """The first scope that has requests waiting (a newcomer queues behind them)."""
        for scope in scopes:
            if self._lines.get(scope.id):
                return scope
        return None

    def join(self, scope: Scope) -> Waiter:
        line = self._lines.setdefault(scope.id, deque())
        waiter = Waiter(line)
        line.append(waiter)
        return waiter

    def leave(self, scope: Scope, waiter: Waiter) -> None:
        waiter.leave()
        if not waiter.line and self._lines.get(scope.id) is waiter.line:
            del self._lines[scope.id]

    def wake(self, scopes: Iterable[Scope]) -> None:
        """A slot of these scopes is back: the first in each line asks again."""
        for scope in scopes:
            line = self._lines.get(scope.id)
            if line:
                line[0].woken.set()
