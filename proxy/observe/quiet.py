"""A library that logs once per failure, quieted to one line a minute.

The OpenTelemetry exporter logs a line for every span batch it cannot deliver: a collector
that is down fills the gateway's stderr with one line every few seconds. `quiet` lets one
line through per minute for all of a library's loggers together, and says in that line how
many were held back since (the metrics count every failure:
llm_gateway_trace_export_failures_total).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

QUIET_SECONDS = 60.0


class OncePerInterval(logging.Filter):
    """Lets a record through when `interval` passed since the last one let through."""

    def __init__(
        self, interval: float = QUIET_SECONDS, clock: Callable[[], float] = time.monotonic
    ) -> None:
        super().__init__()
        self._interval = interval
        self._clock = clock
        self._last: float | None = None
        self._held = 0
        self._lock = threading.Lock()  # libraries log from their own threads

    def filter(self, record: logging.LogRecord) -> bool:
        with self._lock:
            now = self._clock()
            if self._last is not None and now - self._last < self._interval:
                self._held += 1
                return False
            held, self._held, self._last = self._held, 0, now
        if held:
            record.msg = f"{record.getMessage()} ({held} more like it in the last minute not shown)"
            record.args = None
        return True


def quiet(prefix: str, clock: Callable[[], float] = time.monotonic) -> OncePerInterval:
    """One shared filter on every logger named `prefix` or below it that exists now (their
    modules are imported); a logger that has one already keeps it."""
    existing = logging.getLogger(prefix).filters
    shared = next((f for f in existing if isinstance(f, OncePerInterval)), None)
    shared = shared or OncePerInterval(clock=clock)
    names = [prefix, *(n for n in logging.root.manager.loggerDict if n.startswith(prefix + "."))]
    for name in names:
        logger = logging.getLogger(name)
        if shared not in logger.filters:
            logger.addFilter(shared)
    return shared
