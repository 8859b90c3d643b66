"""GET /usage: the presenting key's own windows, limits, reservations, spend and totals.

Counts are whole numbers, waits in seconds to the millisecond, dollars to the micro-dollar.
Totals are shown with quotas off too (the tracker counts every key); without Redis they are
this process's own. A key with a team also shows the team's windows, budget and slots in
flight (`team`); a key with max_in_flight its own slots (`in_flight`); a key with
model_quotas each group's window (`model_quotas`). A key with a response cache also gets
its policy and its hits (`cache`; with Redis, every instance's; null when Redis is lost).
A key not found while keys.json is reloaded (made a moment ago through another worker's
admin API) is looked up again once the reload has ended, as a proxied request's is.
"""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from proxy import errors
from proxy.cache.cache import Cache
from proxy.errors import GatewayError
from proxy.keys.credentials import presented
from proxy.keys.keys import KeyRing
from proxy.keys.reload import KeysFile
from proxy.quota.quota import Quota
from proxy.quota.tracker import Scope, Tracker, TrackerUnavailable


class UsageReport:
    """The /usage endpoint over the key ring and the quota's tracker."""

    def __init__(
        self,
        key_ring: KeyRing,
        quota: Quota,
        cache: Cache | None = None,
        keys: KeysFile | None = None,  # reloads: a key not found while one is under way waits
    ) -> None:
        self._key_ring = key_ring
        self._keys = keys
        self._quota = quota
        self._cache = cache

    async def handle_usage(self, request: web.Request) -> web.Response:
        """GET /usage: 401 without a known key, 503 when Redis cannot be read."""
        try:
            key = self._key_ring.authenticate(request.headers)
        except GatewayError as error:
            keys = self._keys
            if keys is None or presented(request.headers) is None or not keys.is_reloading():
                return errors.render(error, request.path)
            await keys.reloaded()  # made a moment ago on another worker: asked once reloaded
            try:
                key = self._key_ring.authenticate(request.headers)
            except GatewayError as again:
                return errors.render(again, request.path)
        document: dict[str, Any] = {
            "key": key.name,
            "provider": key.provider.name,
            "quota_enabled": key.limits is not None,
        }
        try:
            tracker = self._quota.tracker
            document.update(await tracker.report(key.id, key.limits, key.budget))
            if key.scope.max_in_flight is not None:
                document["in_flight"] = await slots(tracker, key.scope)
            if key.team is not None:
                document["team"] = {
                    "name": key.team.name,
                    **await scope_report(tracker, key.team.scope),
                }
            if key.model_quotas:
                document["model_quotas"] = [
                    {"models": list(group.patterns), **await scope_report(tracker, group.scope)}
                    for group in key.model_quotas
                ]
        except TrackerUnavailable:
            refusal = GatewayError(
                503, "quota_unavailable", "Usage cannot be read right now; retry shortly."
            )
            return errors.render(refusal, request.path)
        if key.cache is not None and self._cache is not None:
            document["cache"] = {
                "ttl_seconds": key.cache.ttl_seconds,
                "scope": key.cache.scope,
                "hits": await self._cache.hits(key),
            }
        return web.Response(body=orjson.dumps(document), content_type="application/json")


async def scope_report(tracker: Tracker, scope: Scope) -> dict[str, Any]:
    """A team's or a model group's windows, budget, totals and slots. Raises TrackerUnavailable."""
    document = await tracker.report(scope.id, scope.limits, scope.budget)
    if scope.max_in_flight is not None:
        document["in_flight"] = await slots(tracker, scope)
    return document


async def slots(tracker: Tracker, scope: Scope) -> dict[str, Any]:
    """The slots held and the cap, and how long a request may wait for one."""
    return {
        "used": await tracker.in_flight(scope),
        "limit": scope.max_in_flight,
        "queue_seconds": scope.queue_seconds,
    }
