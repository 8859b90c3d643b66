"""Identical requests in flight in this process go upstream once.

The first cacheable request of a name leads a `Flight`; identical ones that arrive while it
is in the air wait for its answer, each bounded by its own wait, and are served it as hits.
A flight lands with the stored entry, or with None when its answer could not be stored
(an error, a cut stream, too large): then each waiter goes upstream itself. A landed flight
stays listed until its entry is in the store, so a request arriving in between is served
too. Leading is decided with no `await` between the look and the claim: one event loop
makes it atomic.
"""

from __future__ import annotations

import asyncio

from proxy.cache.entry import Entry


class Flight:
    __slots__ = ("answer", "asked_at", "waiting")

    def __init__(self, asked_at: float) -> None:
        self.answer: asyncio.Future[Entry | None] = asyncio.get_running_loop().create_future()
        self.waiting = 0  # requests waiting for it now
        self.asked_at = asked_at  # when its leader looked up (the cache's clock)


class Flights:
    def __init__(self) -> None:
        self._flying: dict[str, Flight] = {}

    def joined(self, name: str) -> Flight | None:
        """The flight of `name` in the air (or landed, its entry not yet stored), if any."""
        return self._flying.get(name)

    def lead(self, name: str, asked_at: float) -> Flight:
        flight = self._flying[name] = Flight(asked_at)
        return flight

    def unlist(self, name: str, flight: Flight) -> None:
        """A flight no request may join any more (its scope's entries were dropped since it
        left, on another instance); those waiting already still get its answer."""
        if self._flying.get(name) is flight:
            del self._flying[name]

    def land(self, flight: Flight, entry: Entry | None) -> None:
        """Give the waiters their answer: the entry, or None to go upstream themselves."""
        if not flight.answer.done():
            flight.answer.set_result(entry)

    def end(self, name: str, flight: Flight) -> None:
        """Unlist a flight (landed first, so no waiter is left behind)."""
        self.land(flight, None)
        if self._flying.get(name) is flight:
            del self._flying[name]

    def forget(self, prefix: str) -> None:
        """Unlist the flights whose names start with `prefix` (their scope's entries were
        dropped): a request arriving now leads its own; those waiting still get theirs."""
        for name in [name for name in self._flying if name.startswith(prefix)]:
            del self._flying[name]

    async def wait(self, flight: Flight, seconds: float) -> Entry | None:
        """The flight's entry, or None when it failed or took longer than `seconds`."""
        if flight.answer.done():
            return flight.answer.result()
        flight.waiting += 1
        try:
            return await asyncio.wait_for(asyncio.shield(flight.answer), seconds)
        except TimeoutError:
            return None
        finally:
            flight.waiting -= 1

    def waiting(self) -> int:
        """Requests waiting for a flight now, in this process."""
        return sum(flight.waiting for flight in self._flying.values())
