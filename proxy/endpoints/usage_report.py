"""GET /usage: the presenting key's own windows, limits, reservations, spend and totals.

Counts are whole numbers, waits in seconds to the millisecond, dollars to the micro-dollar.
Totals are shown with quotas off too (the tracker counts every key); without Redis they are
this process's own.
"""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from proxy import errors
from proxy.errors import GatewayError
from proxy.keys.keys import KeyRing
from proxy.quota.quota import Quota
from proxy.quota.tracker import TrackerUnavailable


class UsageReport:
    """The /usage endpoint over the key ring and the quota's tracker."""

    def __init__(self, key_ring: KeyRing, quota: Quota) -> None:
        self._key_ring = key_ring
        self._quota = quota

    async def handle_usage(self, request: web.Request) -> web.Response:
        """GET /usage: 401 without a known key, 503 when Redis cannot be read."""
        try:
            key = self._key_ring.authenticate(request.headers)
        except GatewayError as error:
            return errors.render(error, request.path)
        document: dict[str, Any] = {
            "key": key.name,
            "provider": key.provider.name,
            "quota_enabled": key.limits is not None,
        }
        try:
            document.update(await self._quota.tracker.report(key.id, key.limits, key.budget))
        except TrackerUnavailable:
            refusal = GatewayError(
                503, "quota_unavailable", "Usage cannot be read right now; retry shortly."
            )
            return errors.render(refusal, request.path)
        return web.Response(body=orjson.dumps(document), content_type="application/json")
