"""Throttling of failed authentications, per client address.

A virtual key is a password, and every endpoint that looks one up is a way to guess it:
without a limit a client can try keys as fast as the gateway answers (a
12-character key fell in 4,096 requests). After `failures` failed authentications from one
address within `window_seconds` of the first, that address gets 429 until the window
ends, and the key it presents is not even looked up. A success does not reset the count:
a client holding one valid key could otherwise interleave its guesses with it.

The address is the connection's peer (`request.remote`), never a header a client can
forge: behind a reverse proxy every client shares the proxy's address, so raise the
limit there (AUTH_FAILURE_LIMIT).

Memory is bounded: at most `max_addresses` addresses are remembered, the one that failed
least recently forgotten first. State is per process (WORKERS > 1: each worker counts
its own connections).
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from aiohttp import web

from proxy import errors
from proxy.errors import GatewayError
from proxy.keys.keys import KeyRing, VirtualKey

log = logging.getLogger("llm_gateway")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

MAX_ADDRESSES = 10_000


@dataclass(slots=True)
class _Failures:
    since: float  # the first failure of the current window (the clock's time)
    count: int


class Lockout:
    """Failed authentications per address in a fixed window; over the limit: 429."""

    def __init__(
        self,
        failures: int,
        window_seconds: float,
        on_failure: Callable[[str], None],
        clock: Callable[[], float] = time.monotonic,
        max_addresses: int = MAX_ADDRESSES,
    ) -> None:
        self._limit = failures
        self._window = window_seconds
        # Told "refused" (a 401) or "throttled" (a 429 from here): the app counts both.
        self._on_failure = on_failure
        self._clock = clock
        self._max_addresses = max_addresses
        self._failures: OrderedDict[str, _Failures] = OrderedDict()

    def authenticate(
        self, ring: KeyRing, headers: Mapping[str, str], address: str | None
    ) -> VirtualKey:
        """The key the headers name, unless this address failed too often. Raises 401, 429."""
        self.check(address)
        try:
            return ring.authenticate(headers)
        except GatewayError:
            self.failed(address)
            raise

    def guarded(self, handler: Handler) -> Handler:
        """An own endpoint (`/usage`, `/metrics`) behind the lockout: its 401s count as failures."""

        @functools.wraps(handler)
        async def answer(request: web.Request) -> web.StreamResponse:
            try:
                self.check(request.remote)
            except GatewayError as error:
                return errors.render(error, request.path)
            response = await handler(request)
            if response.status == 401:
                self.failed(request.remote)
            return response

        return answer

    def check(self, address: str | None) -> None:
        """Raise 429 when `address` is locked out."""
        wait = self.locked_for(address)
        if wait is not None:
            self._on_failure("throttled")
            raise GatewayError(
                429,
                "too_many_authentication_failures",
                f"Too many failed authentications from this address; retry in {math.ceil(wait)} "
                "seconds with a valid key.",
                headers={"retry-after": str(max(1, math.ceil(wait)))},
            )

    def locked_for(self, address: str | None) -> float | None:
        """Seconds until `address` may try again, or None when it may now."""
        entry = self._failures.get(address or "")
        if entry is None or entry.count < self._limit:
            return None
        wait = entry.since + self._window - self._clock()
        return wait if wait > 0 else None

    def failed(self, address: str | None) -> None:
        """Count one failed authentication from `address`."""
        self._on_failure("refused")
        now, address = self._clock(), address or ""
        entry = self._failures.pop(address, None)
        if entry is None or now - entry.since >= self._window:
            entry = _Failures(since=now, count=0)
        entry.count += 1
        self._failures[address] = entry  # most recent last
        # One line per failure: at most `failures` per window per address, then 429s.
        log.warning(
            "failed authentication from %s (%d of %d allowed in %g s)",
            address or "an unknown address",
            entry.count,
            self._limit,
            self._window,
        )
        while len(self._failures) > self._max_addresses:
            self._failures.popitem(last=False)
