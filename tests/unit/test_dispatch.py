"""relay.dispatch: a path goes straight to the exchange only where the router would have sent it
to the catch-all route; every other path goes through the router."""

from __future__ import annotations

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from proxy.relay.dispatch import Dispatch

PATHS = (
    "/v1/chat/completions",
    "/v1/messages?beta=true",
    "/",
    "/health",
    "/health/",
    "/healthz",
    "/hea%6Cth",
    "/metrics",
    "/admin",
    "/admin/",
    "/admin/keys",
    "/admin/keys/user-1",
    "/admin%2Fkeys",
    "/administrator",
    "/v1/admin/keys",
    "/%0a",
)


async def _stub(request: web.Request) -> web.StreamResponse:
    return web.Response()


def _router() -> tuple[web.UrlDispatcher, list[str], Dispatch, web.AbstractRoute]:
    """The app's shape: own endpoints, the admin's catch-all, then the proxied catch-all."""
    router = web.UrlDispatcher()
    router.add_get("/health", _stub)
    router.add_get("/metrics", _stub)
    router.add_route("PUT", "/admin/keys/{name}", _stub)
    router.add_get("/admin/keys", _stub)
    router.add_route("*", r"/admin{tail:(?:/.*)?}", _stub)
    called: list[str] = []

    async def routed(request: web.Request) -> web.StreamResponse:
        called.append("routed")
        return web.Response()

    async def proxied(request: web.Request) -> web.StreamResponse:
        called.append("proxied")
        return web.Response()

    async def expect(request: web.Request) -> None:
        return None

    dispatch = Dispatch(router, routed=routed, proxied=proxied, expect=expect, cors=None)
    catch_all = router.add_route("*", "/{tail:(?s:.*)}", proxied)
    return router, called, dispatch, catch_all


@pytest.mark.parametrize("method", ["GET", "POST", "PUT"])
@pytest.mark.parametrize("path", PATHS)
async def test_a_path_skips_the_router_only_where_it_would_reach_the_catch_all(
    method: str, path: str
) -> None:
    router, called, dispatch, catch_all = _router()
    await dispatch(make_mocked_request(method, path))
    resolved = await router.resolve(make_mocked_request(method, path))
    if called == ["proxied"]:
        assert resolved.route is catch_all, (method, path, resolved)


async def test_the_own_endpoints_go_through_the_router() -> None:
    for path in ("/health", "/metrics", "/admin/keys", "/admin/keys/user-1", "/admin"):
        _, called, dispatch, _ = _router()
        await dispatch(make_mocked_request("GET", path))
        assert called == ["routed"], path


async def test_a_proxied_path_goes_straight_to_the_exchange() -> None:
    for path in ("/v1/chat/completions", "/v1/admin/keys", "/health/", "/"):
        _, called, dispatch, _ = _router()
        await dispatch(make_mocked_request("POST", path))
        assert called == ["proxied"], path
