"""`/health` and `/ready`: what recent traffic says about each provider, and whether we serve.

Owns each provider's health, read from finished records only (no probes: a probe would
spend the users' real keys): unhealthy after 3 upstream failures in a row, healthy again
after one success. It also owns what counts as an upstream failure (`is_upstream_failure`),
which `metrics` reuses. A client that left (499) tells nothing about the provider, and
neither does a request the gateway answered itself (401, 400, 429, ...).

`/health` always answers 200 with `status` "degraded" while a provider is unhealthy or the
tracker has lost Redis: the gateway still serves, so a load balancer should not pull it.
`/ready` is the one that turns 503, while shutting down.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import orjson
from aiohttp import web

from proxy.record import CLIENT_CLOSED, Record

UNHEALTHY_AFTER = 3  # consecutive upstream failures
LAST_ERROR_CHARS = 200


def is_upstream_failure(record: Record) -> bool:
    """True when the provider failed: unreachable, timed out, cut the body, or answered 5xx."""
    if record.status == CLIENT_CLOSED:
        return False
    return record.upstream_failed or (_provider_answered(record) and record.status >= 500)


def _provider_answered(record: Record) -> bool:
    """True when the status came from the provider, not from the gateway itself."""
    # Only a provider's body sets the first-byte time; the gateway's own errors never do.
    return record.ttft_ms is not None


@dataclass(slots=True)
class _ProviderState:
    """One provider's recent record; mutable, updated in place for every observed record."""

    keys: int
    failures_in_a_row: int = 0
    last_error: str | None = None

    @property
    def is_healthy(self) -> bool:
        return self.failures_in_a_row < UNHEALTHY_AFTER


class Health:
    """Provider health from traffic, the tracker's state, and the shutdown flag."""

    def __init__(
        self,
        key_counts: dict[str, int],
        clock: Callable[[], float] = time.monotonic,
        tracker_backend: str = "memory",
    ) -> None:
        self._clock = clock
        self._started = clock()
        self._providers = {name: _ProviderState(keys=n) for name, n in key_counts.items()}
        self._tracker_backend = tracker_backend
        self.shutting_down = False  # set by the app on SIGTERM: /ready turns 503
        self.tracker_degraded: str | None = None  # the tracker's last error while it is lost
        self.config: dict[str, str | None] | None = None  # the keys file in force (reload.py)

    def count_keys(self, key_counts: dict[str, int]) -> None:
        """A reloaded keys file: each provider's new key count; a provider's record stays."""
        self._providers = {
            name: self._providers.get(name, _ProviderState(keys=0)) for name in key_counts
        }
        for name, count in key_counts.items():
            self._providers[name].keys = count

    def observe(self, record: Record) -> None:
        """Update the record's provider: a failure, a success, or neither (499, our own answer)."""
        if record.provider is None:
            return
        if is_upstream_failure(record):
            state = self._state(record.provider)
            state.failures_in_a_row += 1
            state.last_error = _error_text(record)
        elif record.status != CLIENT_CLOSED and _provider_answered(record):
            self._state(record.provider).failures_in_a_row = 0

    def report(self) -> dict[str, object]:
        """The /health body: status, uptime, each provider's keys and health, the tracker."""
        providers = {
            name: {"keys": s.keys, "healthy": s.is_healthy, "last_error": s.last_error}
            for name, s in self._providers.items()
        }
        is_degraded = self.tracker_degraded is not None or not all(
            s.is_healthy for s in self._providers.values()
        )
        report: dict[str, object] = {
            "status": "degraded" if is_degraded else "healthy",
            "uptime_seconds": round(self._clock() - self._started, 1),
            "providers": providers,
            "tracker": {
                "backend": self._tracker_backend,
                "healthy": self.tracker_degraded is None,
                "last_error": self.tracker_degraded,
            },
        }
        if self.config is not None:
            report["config"] = self.config
        return report

    async def handle_health(self, request: web.Request) -> web.Response:
        """200 with `report()`, degraded or not."""
        return _json(self.report(), status=200)

    async def handle_ready(self, request: web.Request) -> web.Response:
        """200 while serving, 503 once shutdown has begun."""
        if self.shutting_down:
            return _json({"status": "shutting_down"}, status=503)
        return _json({"status": "ready"}, status=200)

    def _state(self, provider: str) -> _ProviderState:
        # A provider seen in traffic but not in keys.json cannot happen today; count it anyway.
        return self._providers.setdefault(provider, _ProviderState(keys=0))


def _error_text(record: Record) -> str:
    """A short reason, e.g. "502 upstream unreachable"; records never hold keys."""
    reason = record.error or "from provider"
    return f"{record.status} {reason}"[:LAST_ERROR_CHARS]


def _json(body: dict[str, object], status: int) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")
