"""The admin endpoints, off unless ADMIN_TOKEN is set: `GET /admin/keys`, `GET /admin/teams`,
`POST /admin/reload`.

Unset, every `/admin` path answers 404, as if it did not exist. Set, every `/admin` path
needs `Authorization: Bearer <ADMIN_TOKEN>`, compared in constant time
(`credentials.presents_token`); a missing or wrong token gets 401. The app puts these
routes behind `lockout.guarded`, so each 401 is a failed authentication like a wrong
virtual key: a warning line with the client's address, a count in
`llm_gateway_auth_failures_total`, and the address throttled after too many.

`/admin/keys` shows what an operator needs to check that a change took: each key's name,
provider, masked key, limits, allowed models, team, response cache, current window usage and
totals (with quotas off too, as `/usage` shows them);
`/admin/teams` each team's members (by name), limits and usage. Never a real key or a full
virtual key: only `keys.masked` of the virtual key goes out.

`DELETE /admin/cache?key=<name>` drops the cached answers a key reads (its own, or its
shared scope's), `?scope=<name>` a scope's: 200 `{"dropped": N}`; 400 without exactly one
of them (once, not empty, no other parameter) or for a key without a cache, 404 for an unknown key name, 503 when Redis is lost.

`POST /admin/reload` reloads keys.json in this process and answers whether it took; with
WORKERS > 1 it then asks the supervisor to pass SIGHUP to every worker (this one
included, which then reloads the same file again), so no worker keeps the old keys.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import hdrs, web

from proxy import errors
from proxy.cache.cache import Cache
from proxy.cache.store import StoreUnavailable
from proxy.endpoints.admin_writes import AdminWrites, refusals
from proxy.endpoints.usage_report import scope_report
from proxy.errors import GatewayError
from proxy.keys.credentials import presents_token
from proxy.keys.keys import KeyRing, VirtualKey, masked
from proxy.keys.reload import KeysFile, Siblings
from proxy.keys.teams import Team
from proxy.quota.quota import Quota
from proxy.quota.tracker import Limits, TrackerUnavailable
from proxy.upstream.targets import Plan, Target

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Admin:
    """The admin endpoints over the live key ring, the quota and the keys file."""

    def __init__(
        self,
        token: str | None,
        key_ring: KeyRing,
        quota: Quota,
        keys_file: KeysFile,
        siblings: Siblings | None = None,
        cache: Cache | None = None,
        writes: AdminWrites | None = None,  # the API that changes keys and teams
    ) -> None:
        self._token = token
        self._writes = writes
        self._cache = cache
        self._key_ring = key_ring
        self._quota = quota
        self._keys_file = keys_file
        self._siblings = siblings

    def add_routes(self, router: web.UrlDispatcher, wrap: Callable[[Handler], Handler]) -> None:
        """The admin routes, before the relay's catch-all; every other /admin path is 404.

        `wrap` is applied to each handler (the app's request id and lockout).
        """
        if self._token is not None:
            routes = [
                ("GET", "/admin/keys", self.handle_keys),
                ("GET", "/admin/teams", self.handle_teams),
                ("POST", "/admin/reload", self.handle_reload),
                ("DELETE", "/admin/cache", self.handle_drop_cache),
            ]
            for method, path, handler in routes:
                guarded = wrap(self._guarded(handler))
                if method == hdrs.METH_GET:  # and HEAD, as every GET (RFC 9110 §9.1)
                    router.add_get(path, guarded)
                else:
                    router.add_route(method, path, guarded)
        if self._writes is not None:
            self._writes.add_routes(router, lambda handler: wrap(self._guarded(refusals(handler))))
        router.add_route("*", r"/admin{tail:(?:/.*)?}", wrap(self._guarded(self._not_found)))

    def _guarded(self, handler: Handler) -> Handler:
        async def guarded(request: web.Request) -> web.StreamResponse:
            if self._token is not None and not presents_token(request.headers, self._token):
                return errors.render(
                    GatewayError(
                        401,
                        "invalid_admin_token",
                        "Send the gateway's ADMIN_TOKEN as 'Authorization: Bearer <token>'.",
                    ),
                    request.path,
                )
            misnamed = self._addressed_by_its_secret(request)
            if misnamed is not None:
                return errors.render(misnamed, request.path)
            return await handler(request)

        return guarded

    def _addressed_by_its_secret(self, request: web.Request) -> GatewayError | None:
        """A key addressed by its virtual key instead of its name (an operator revoking a
        leaked key knows the key): 404 naming the key, never quoting what was sent."""
        if request.path.startswith("/admin/teams"):
            return None
        given = request.match_info.get("name")
        if request.path == "/admin/cache":
            given = request.query.get("key")
        if not given or any(key.name == given for key in self._key_ring):
            return None
        try:
            key = self._key_ring.key_for(given)
        except GatewayError:
            return None
        return GatewayError(
            404,
            "unknown_key",
            "No key is named so: that is a virtual key, and the admin API addresses keys by "
            f"name. It is the key named {key.name[:100]!r}.",
        )

    async def _not_found(self, request: web.Request) -> web.Response:
        if self._token is None:
            message = (
                "The admin API is off: start the gateway with ADMIN_TOKEN set to a long random "
                "string to turn it on, then send it as 'Authorization: Bearer <token>'."
            )
            return errors.render(GatewayError(404, "unknown_route", message), request.path)
        route, allowed = await allowed_methods(request)
        if allowed:
            methods = ", ".join(allowed)
            return errors.render(
                GatewayError(
                    405,
                    "method_not_allowed",
                    f"{route} answers {methods} only.",
                    headers={"allow": methods},
                ),
                request.path,
            )
        return errors.render(GatewayError(404, "unknown_route", "No such endpoint."), request.path)

    async def handle_keys(self, request: web.Request) -> web.Response:
        """GET /admin/keys: every key, masked, with its limits and its window's usage."""
        keys = await asyncio.gather(*(self._describe(key) for key in self._key_ring))
        document = {"config": self._keys_file.config, "keys": keys}
        return web.Response(body=orjson.dumps(document), content_type="application/json")

    async def _describe(self, key: VirtualKey) -> dict[str, Any]:
        limits = key.limits
        # Quotas off, the tracker still counts every key's totals (its /usage shows them).
        usage: dict[str, Any] | None
        try:
            usage = await self._quota.tracker.report(key.id, limits, key.budget)
        except TrackerUnavailable:
            usage = None  # Redis lost: the keys are still worth showing
        scope = key.scope
        return {
            "name": key.name,
            "provider": key.provider.name,
            "key": masked(key.secret),
            "limits": shown(limits),
            "allowed_models": None if key.model_patterns is None else list(key.model_patterns),
            "allow_client_secrets": key.allows_client_secrets,
            "team": None if key.team is None else key.team.name,
            "max_in_flight": scope.max_in_flight,
            "queue_seconds": scope.queue_seconds,
            "model_quotas": [
                {"models": list(group.patterns), **(shown(group.scope.limits) or {})}
                for group in key.model_quotas
            ],
            "cache": None
            if key.cache is None
            else {"ttl_seconds": key.cache.ttl_seconds, "scope": key.cache.scope},
            "budget": None
            if key.budget is None
            else {"usd": key.budget.usd, "window_seconds": key.budget.window_seconds},
            "output_allowance": key.output_allowance,
            "target": None if key.plans.own is None else plan_shown(key.plans.own),
            "routes": [
                {"models": list(route.patterns), "target": plan_shown(route.plan)}
                for route in key.plans.routes
            ],
            "usage": usage,
        }

    async def handle_teams(self, request: web.Request) -> web.Response:
        """GET /admin/teams: every team of keys.json with its members, limits and usage."""
        teams = self._key_ring.teams.values()
        described = await asyncio.gather(*(self._describe_team(team) for team in teams))
        document = {"config": self._keys_file.config, "teams": described}
        return web.Response(body=orjson.dumps(document), content_type="application/json")

    async def _describe_team(self, team: Team) -> dict[str, Any]:
        scope = team.scope
        try:
            usage: dict[str, Any] | None = await scope_report(self._quota.tracker, scope)
        except TrackerUnavailable:
            usage = None  # Redis lost: the teams are still worth showing
        budget = scope.budget
        return {
            "name": team.name,
            "members": sorted(
                key.name
                for key in self._key_ring
                if key.team is not None and key.team.name == team.name
            ),
            "limits": shown(scope.limits),
            "budget": None
            if budget is None
            else {"usd": budget.usd, "window_seconds": budget.window_seconds},
            "max_in_flight": scope.max_in_flight,
            "queue_seconds": scope.queue_seconds,
            "usage": usage,
        }

    async def handle_drop_cache(self, request: web.Request) -> web.Response:
        """DELETE /admin/cache?key=<name> or ?scope=<name>: drop those cached answers."""
        name, scope = request.query.get("key"), request.query.get("scope")
        # One parameter, once, not empty: `?key=a&key=b` would drop a's entries only.
        asked = len(request.query) == 1 and (name or scope)
        if not asked or (name is None) == (scope is None) or self._cache is None:
            return _refuse(request, 400, "Name exactly one of ?key=<key name> and ?scope=<scope>.")
        key = None
        if name is not None:
            key = next((key for key in self._key_ring if key.name == name), None)
            if key is None:
                return _refuse(request, 404, f"No key is named {name[:100]!r}.", "unknown_key")
            if key.cache is None:
                return _refuse(request, 400, f"The key {name[:100]!r} has no cache.")
        try:
            dropped = await self._cache.drop(key=key, scope=scope)
        except StoreUnavailable:
            return _refuse(
                request, 503, "The cache's Redis cannot be reached.", "cache_unavailable"
            )
        return web.Response(
            body=orjson.dumps({"dropped": dropped}), content_type="application/json"
        )

    async def handle_reload(self, request: web.Request) -> web.Response:
        """POST /admin/reload: 200 with the config in force, or 422 saying why nothing changed."""
        error = await self._keys_file.reload("POST /admin/reload")
        if self._siblings is not None and self._keys_file.is_reloadable:
            # Every worker reads the file, a broken one too: each then keeps its keys and
            # shows the failure on /health, whichever worker answers.
            await self._siblings.reload()
        if error is not None:
            return errors.render(
                GatewayError(
                    422,
                    "keys_file_invalid",
                    f"The keys file was not reloaded; the previous keys stay in force: {error}",
                ),
                request.path,
            )
        document = {
            "reloaded": True,
            "keys": len(self._key_ring),
            "config": self._keys_file.config,
        }
        return web.Response(body=orjson.dumps(document), content_type="application/json")


def plan_shown(plan: Plan) -> dict[str, Any]:
    """Where a plan sends requests: its target and pool size, then each fallback's."""

    def target(one: Target) -> dict[str, Any]:
        return {"name": one.name, "provider": one.provider.name, "keys": len(one.pool.credentials)}

    return {**target(plan.primary), "fallbacks": [target(one) for one in plan.targets[1:]]}


def shown(limits: Limits | None) -> dict[str, Any] | None:
    if limits is None:
        return None
    return {
        "requests": limits.requests,
        "tokens": limits.tokens,
        "window_seconds": limits.window_seconds,
    }


def _refuse(
    request: web.Request, status: int, message: str, code: str = "invalid_request"
) -> web.Response:
    return errors.render(GatewayError(status, code, message), request.path)


async def allowed_methods(request: web.Request) -> tuple[str, list[str]]:
    """The route the admin routes answer this path as (`/admin/keys/{name}`: never the path
    as sent, which may hold a whole virtual key given as a name), and the methods they
    answer on it (the writes' included, HEAD beside each GET), for a 405."""
    route, methods = request.path, set[str]()
    for resource in request.app.router.resources():
        _, allowed = await resource.resolve(request)
        if allowed and hdrs.METH_ANY not in allowed:  # not the catch-alls (this 404's, the relay's)
            route, methods = resource.canonical, methods | allowed
    return route, sorted(methods)
