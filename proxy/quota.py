"""The quota as a client sees it: admission, the 429, the x-ratelimit headers, GET /usage.

`tracker` counts; this module speaks HTTP about the counts. A refused request answers
429 with `Retry-After` (whole seconds until the window admits it), `retry-after-ms`, and
`x-should-retry: false` when the wait is longer than the SDKs will sleep, so a client
fails fast instead of retrying into a closed window. Every proxied response carries the
gateway's own `x-ratelimit-*` headers in place of the provider's.

When the tracker's backend (Redis) is lost, `QUOTA_ON_REDIS_ERROR` decides: `allow` lets
the request through uncounted, `deny` answers 503. Each decision is reported to
`on_tracker_lost` (a metric and /health's degraded state); the first success after that
reports `on_tracker_back`.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Coroutine
from typing import Any

import orjson
from aiohttp import web
from multidict import CIMultiDict

from proxy import errors
from proxy.errors import GatewayError
from proxy.keys import KeyRing, VirtualKey
from proxy.tracker import Admission, Tracker, TrackerUnavailable

# The OpenAI and Anthropic SDKs honour a Retry-After of at most 60 s; past that they use
# their own short backoff, which would only knock on a window that is still closed.
SDK_MAX_RETRY_WAIT_SECONDS = 60.0


class Quota:
    """Admission and token charges for every key, over one tracker."""

    def __init__(
        self,
        tracker: Tracker,
        key_ring: KeyRing,
        deny_when_lost: bool = False,
        on_tracker_lost: Callable[[str, str], None] = lambda decision, error: None,
        on_tracker_back: Callable[[], None] = lambda: None,
    ) -> None:
        self.tracker = tracker
        self._key_ring = key_ring
        self._deny_when_lost = deny_when_lost
        self._on_lost = on_tracker_lost
        self._on_back = on_tracker_back
        self._is_lost = False
        self._pending: set[asyncio.Task[None]] = set()

    async def admit(self, key: VirtualKey) -> Admission | None:
        """Check and count one request. Raises 429 (over quota), 503 (tracker lost, deny)."""
        if key.limits is None:
            return None
        try:
            admission = await self.tracker.admit(key.id, key.limits)
        except TrackerUnavailable as error:
            decision = "deny" if self._deny_when_lost else "allow"
            self._lost(decision, str(error))
            if self._deny_when_lost:
                raise GatewayError(
                    503,
                    "quota_unavailable",
                    "The gateway cannot check quotas right now; retry shortly.",
                ) from None
            return None
        self._back()
        if not admission.admitted:
            raise refusal(admission)
        return admission

    def _lost(self, decision: str, error: str) -> None:
        self._is_lost = True
        self._on_lost(decision, error)

    def _back(self) -> None:
        if self._is_lost:
            self._is_lost = False
            self._on_back()

    def charge_later(self, key: VirtualKey, tokens: int) -> None:
        """Charge a finished response's tokens without holding up its ending."""
        if key.limits is None or tokens <= 0:
            return
        self._spawn(self._charge(key, tokens))

    async def _charge(self, key: VirtualKey, tokens: int) -> None:
        assert key.limits is not None
        try:
            await self.tracker.charge(key.id, key.limits, tokens)
        except TrackerUnavailable as error:
            # The tokens are lost to the window; the log line and metrics still have them.
            self._lost("uncharged", str(error))

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._pending.add(task)  # a reference, so the task is not collected mid-flight
        task.add_done_callback(self._pending.discard)

    async def close(self) -> None:
        """Finish the charges still under way, then close the tracker."""
        if self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)
        await self.tracker.close()

    async def handle_usage(self, request: web.Request) -> web.Response:
        """GET /usage: the presenting key's own usage, limits and totals."""
        try:
            key = self._key_ring.authenticate(request.headers)
        except GatewayError as error:
            return errors.render(error, request.path)
        document: dict[str, Any] = {
            "key": key.name,
            "provider": key.provider.name,
            "quota_enabled": key.limits is not None,
        }
        if key.limits is not None:
            try:
                document.update(await self.tracker.report(key.id, key.limits))
            except TrackerUnavailable:
                error = GatewayError(
                    503, "quota_unavailable", "Usage cannot be read right now; retry shortly."
                )
                return errors.render(error, request.path)
        return web.Response(body=orjson.dumps(document), content_type="application/json")


def refusal(admission: Admission) -> GatewayError:
    """The 429 for a refused admission, with the waits the SDKs understand."""
    wait = max(admission.retry_after_seconds, 0.001)
    headers = {
        "retry-after": str(max(1, math.ceil(wait))),
        "retry-after-ms": str(math.ceil(wait * 1000)),
    }
    if wait > SDK_MAX_RETRY_WAIT_SECONDS:
        headers["x-should-retry"] = "false"
    headers.update(ratelimit_headers(admission))
    limits = admission.limits
    if admission.remaining_requests <= 0:
        what = f"{limits.requests} requests"
    else:
        what = f"{limits.tokens} tokens"
    return GatewayError(
        429,
        "rate_limit_exceeded",
        f"Quota exceeded for this key: {what} per {limits.window_seconds:g} seconds. "
        f"Retry in {math.ceil(wait)} seconds.",
        headers=headers,
    )


def stamp(headers: CIMultiDict[str], admission: Admission) -> None:
    """Replace the provider's x-ratelimit-* headers with the gateway's own."""
    for name in [name for name in headers if name.lower().startswith("x-ratelimit-")]:
        headers.popall(name, None)
    headers.update(ratelimit_headers(admission))


def ratelimit_headers(admission: Admission) -> dict[str, str]:
    """x-ratelimit-{limit,remaining,reset}-requests, and the -tokens trio when set."""
    limits = admission.limits
    headers = {
        "x-ratelimit-limit-requests": str(limits.requests),
        "x-ratelimit-remaining-requests": str(max(0, admission.remaining_requests)),
        "x-ratelimit-reset-requests": duration(admission.reset_requests_seconds),
    }
    if limits.tokens is not None:
        headers["x-ratelimit-limit-tokens"] = str(limits.tokens)
        headers["x-ratelimit-remaining-tokens"] = str(max(0, admission.remaining_tokens or 0))
        headers["x-ratelimit-reset-tokens"] = duration(admission.reset_tokens_seconds or 0.0)
    return headers


def duration(seconds: float) -> str:
    """A wait in the providers' style: '1m30s', '2.5s', '0s'."""
    seconds = max(0.0, seconds)
    minutes, rest = divmod(seconds, 60.0)
    rest = math.ceil(rest * 1000) / 1000
    text = f"{rest:.3f}".rstrip("0").rstrip(".") + "s"
    if minutes >= 1:
        hours, minutes = divmod(int(minutes), 60)
        text = (f"{hours}h" if hours else "") + f"{minutes}m" + text
    return text
