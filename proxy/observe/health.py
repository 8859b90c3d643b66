"""`/health` and `/ready`: what the breakers say about each target, and whether we serve.

Provider health is read from traffic, never from probes (a probe would spend the users'
real keys): it is the state of each target's circuit breaker (`breaker.py`), which the
attempt loop feeds with every attempt's outcome (and, with PROBE_INTERVAL_SECONDS, a probe
that generates nothing: `upstream/probes.py`). A provider is healthy while none of its
targets' breakers is open (one past its cooldown is half-open, read or not). `/health` lists the providers (keys, healthy, last error) and
the targets (breaker state, and each key's measured time to first byte and requests in
flight, by its label: `members`).

`open_files`: the process's limit on open files, and the last time it had none left to reach
a provider with, or took a client connection on its last one (`ran_out_of_files`): the
operator's limit to raise, never the provider's fault. Unhealthy from then until a /health
finds two descriptors free again (one for a provider, one for the next client); `last_error`
stays.

`/health` always answers 200 with `status` "degraded" while a breaker is open, the tracker
has lost Redis or no file descriptor is left: the gateway still serves, so a load balancer
should not pull it.
`/ready` is the one that turns 503, while shutting down.
"""

from __future__ import annotations

import contextlib
import logging
import resource
import socket
import time
from collections.abc import Awaitable, Callable, Mapping

import orjson
from aiohttp import web

from proxy.observe.logbook import rfc3339
from proxy.record import PROVIDER_FAILURES, Record
from proxy.upstream.breaker import OPEN, Breakers

log = logging.getLogger("llm_gateway")


def is_upstream_failure(record: Record) -> bool:
    """True when the provider failed: unreachable, timed out, cut the body, answered 5xx, or
    said it failed inside its 200 answer (a stream's `overloaded_error` after content)."""
    if record.outcome in PROVIDER_FAILURES:
        return True
    if record.ttft_ms is not None and record.status >= 500:  # the provider's own 5xx
        return True
    return record.failed_in_answer is not None


class Health:
    """Target health from the breakers, the tracker's state, and the shutdown flag."""

    def __init__(
        self,
        key_counts: Mapping[str, int],
        breakers: Breakers,
        targets_of: Mapping[str, str],
        clock: Callable[[], float] = time.monotonic,
        tracker_backend: str = "memory",
        members: Callable[[], Mapping[str, Mapping[str, object]]] = dict,
        recheck: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """`targets_of`: target name → its provider's name. `members`: each target's keys
        by label, as `targets.Members` reports them. `recheck`: asks a lost tracker
        whether it answers again (it clears `tracker_degraded` when it does)."""
        self._clock = clock
        self._started = clock()
        self._key_counts = dict(key_counts)
        self._breakers = breakers
        self._provider_of = dict(targets_of)
        self._tracker_backend = tracker_backend
        self._members = members
        self._recheck = recheck
        self.shutting_down = False  # set by the app on SIGTERM: /ready turns 503
        self.tracker_degraded: str | None = None  # the tracker's last error while it is lost
        self.config: dict[str, object] | None = None  # the keys file in force (reload.py)
        # The last reload that failed, {"reason", "at"}, until a reload succeeds.
        self.reload_failed: dict[str, str] | None = None
        self._is_out_of_files = False
        self._out_of_files: tuple[str, str] | None = None  # the last time: why, when

    def ran_out_of_files(self, why: str) -> None:
        """No file descriptor was left to reach a provider: /health degraded, and a line on
        stderr once until it is healthy again (a storm of requests says it once)."""
        if not self._is_out_of_files:
            log.warning("%s; raise it (ulimit -n, docker's --ulimit nofile, LimitNOFILE)", why)
        self._is_out_of_files = True
        self._out_of_files = why, rfc3339(time.time())

    def count_keys(self, key_counts: Mapping[str, int], targets_of: Mapping[str, str]) -> None:
        """A reloaded keys file: each provider's key count, each target's provider.

        A target's breaker outlives the reload (its name is what identifies it)."""
        self._key_counts = dict(key_counts)
        self._provider_of = dict(targets_of)

    def report(self) -> dict[str, object]:
        """The /health body: status, uptime, providers, targets, the tracker."""
        self._breakers.cool()  # a cooldown ends whether or not a request came since
        providers: dict[str, dict[str, object]] = {
            name: {"keys": count, "healthy": True, "last_error": None}
            for name, count in self._key_counts.items()
        }
        latest: dict[str, float] = {}
        for target, breaker in self._breakers.items():
            provider = self._provider_of.get(target, target.partition("/")[0])
            state = providers.setdefault(provider, {"keys": 0, "healthy": True, "last_error": None})
            if breaker.state == OPEN:
                state["healthy"] = False
            if breaker.last_error is not None and breaker.last_failure > latest.get(
                provider, -1e18
            ):
                latest[provider] = breaker.last_failure
                state["last_error"] = breaker.last_error
        is_degraded = (
            self.tracker_degraded is not None
            or self._is_out_of_files
            or not all(state["healthy"] for state in providers.values())
        )
        targets = self._breakers.report()
        for name, members in self._members().items():
            if name in targets:
                targets[name]["members"] = members
        report: dict[str, object] = {
            "status": "degraded" if is_degraded else "healthy",
            "uptime_seconds": round(self._clock() - self._started, 1),
            "providers": providers,
            "targets": targets,
            "tracker": {
                "backend": self._tracker_backend,
                "healthy": self.tracker_degraded is None,
                "last_error": self.tracker_degraded,
            },
            "open_files": {
                "limit": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
                "healthy": not self._is_out_of_files,
                "last_error": None if self._out_of_files is None else self._out_of_files[0],
                "last_error_at": None if self._out_of_files is None else self._out_of_files[1],
            },
        }
        if self.config is not None:
            report["config"] = {**self.config, "reload_failed": self.reload_failed}
        return report

    async def handle_health(self, request: web.Request) -> web.Response:
        """200 with `report()`, degraded or not. A lost tracker is asked first whether it
        answers again: no request may have tried it since it came back."""
        if self.tracker_degraded is not None and self._recheck is not None:
            await self._recheck()
        if self._is_out_of_files:
            self._is_out_of_files = not _has_file_to_spare()
        return _json(self.report(), status=200)

    async def handle_ready(self, request: web.Request) -> web.Response:
        """200 while serving, 503 once shutdown has begun."""
        if self.shutting_down:
            return _json({"status": "shutting_down"}, status=503)
        return _json({"status": "ready"}, status=200)


def _has_file_to_spare() -> bool:
    """Whether the process can open two sockets now: one for a provider, and one more for the
    next client connection, which would be refused on the last descriptor
    (runtime/server.py's `_RequestHandler.connection_made`), as each refusal leaves one free."""
    with contextlib.ExitStack() as opened:
        try:
            for _ in range(2):
                opened.enter_context(socket.socket())
        except OSError:  # EMFILE, ENFILE; or ENOBUFS: no socket either way
            return False
    return True


def _json(body: dict[str, object], status: int) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")
