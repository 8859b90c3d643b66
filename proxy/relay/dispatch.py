"""The server side of each request: which handler answers it, and what every answer carries.

aiohttp's `web.Application` answers each request by walking its router (the catch-all's
regex, a match info, the method check), wrapping the middlewares, and, as each response is
prepared, sending `on_response_prepare` (a coroutine per receiver). For the proxied paths,
nearly every request, that came to ~11 us of CPU a request for nothing the exchange reads
(the server alone, a trivial handler in the exchange's place: 47 us a request, 36 here;
aiohttp's low-level server 33). Here, instead:

- `Dispatch` sends a request whose path no own endpoint (/health, /metrics, /admin/...) can
  match straight to the exchange, after the catch-all route's `Expect` handler and the CORS
  preflight, in the order the app ran them; every other request goes through the app's
  router as before, so the own endpoints, their methods and their 405s are aiohttp's;
- `GatewayRequest` stamps each answer as it is prepared, in one plain call: the Server
  header, a provider answer's missing Content-Type and its header bytes that are not UTF-8
  (`head_bytes`), CORS, `Connection: close` once the drain has begun, the end of an
  HTTP/1.0 connection its head announced or whose request named a Transfer-Encoding. No
  `on_response_prepare` receiver is left; a new stamp goes here.

Both replace private members of the app (`serve_through`): aiohttp 3.14 builds its server
from `app._handle` and `app._make_request` (pinned in requirements.txt); the Server header
tests fail if a new aiohttp stops reading them.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable

from aiohttp import HttpVersion10, hdrs, web
from aiohttp.http import SERVER_SOFTWARE

from proxy.relay.cors import Cors
from proxy.relay.expect import ExpectHandler
from proxy.relay.head_bytes import keep_raw
from proxy.relay.relay import keep_untyped

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

SERVER_NAME = "llm-gateway"  # the Server header of the gateway's own answers: no version


class Dispatch:
    """The handler of every request: the exchange for a proxied path, else the app's router."""

    def __init__(
        self,
        router: web.UrlDispatcher,
        *,
        routed: Handler,
        proxied: Handler,
        expect: ExpectHandler,
        cors: Cors | None,
    ) -> None:
        """`router` holds the own endpoints only, when this is made: the catch-all comes after.

        `routed`: the app's own handling (router, middlewares); `proxied`: the catch-all's.
        """
        paths, prefixes = set(), []
        for resource in router.resources():
            info = resource.get_info()
            if "path" in info:  # a plain path matches itself only
                paths.add(info["path"])
            else:  # a pattern: every path from its first variable part on
                prefixes.append(resource.canonical.partition("{")[0])
        self._own_paths = frozenset(paths)
        self._own_prefixes = tuple(prefixes)
        self._routed = routed
        self._proxied = proxied
        self._expect = expect
        self._cors = cors

    def __call__(self, request: web.Request) -> Awaitable[web.StreamResponse]:
        """The handler's answer, to await. Not a coroutine itself: aiohttp awaits what it
        returns, so a proxied request steps through one coroutine level less at each await."""
        # The path the router matches (`path_safe`: %2F stays encoded), so a path goes to
        # the exchange here exactly when the router would resolve it to the catch-all.
        path = request.rel_url.path_safe
        if path in self._own_paths or path.startswith(self._own_prefixes):
            return self._routed(request)
        if request.headers.get(hdrs.EXPECT):
            return self._expected(request)
        if self._cors is not None and request.method == hdrs.METH_OPTIONS:
            return self._cors.preflight(request, self._proxied)  # any other: not a preflight
        return self._proxied(request)

    async def _expected(self, request: web.Request) -> web.StreamResponse:
        """A proxied request with an `Expect`: answered first, then as any other."""
        answer = await self._expect(request)
        await request.writer.drain()
        if answer is not None:
            return answer
        if self._cors is not None:
            return await self._cors.preflight(request, self._proxied)
        return await self._proxied(request)


class GatewayRequest(web.Request):
    """aiohttp's request, whose answers are stamped as they are prepared (no signals)."""

    async def _prepare_hook(self, response: web.StreamResponse) -> None:
        self._stamp(response)

    def _stamp(self, response: web.StreamResponse) -> None:
        headers = response.headers
        # aiohttp's default names Python's and its own version; a provider's own Server passes.
        if headers.get(hdrs.SERVER, SERVER_SOFTWARE) == SERVER_SOFTWARE:
            headers[hdrs.SERVER] = SERVER_NAME
        # len() first: most answers hold no state, where `get` would raise KeyError inside.
        if len(response):
            keep_untyped(response)
            keep_raw(response, self.writer)
        if self._protocol._force_close and response.keep_alive:
            # The connection ends after this answer (the drain has begun): the head says so
            # (RFC 9112 §9.6), or a proxy in front that keeps its connections to the gateway
            # (nginx's upstream keepalive, a load balancer) could send its next request on it
            # as it closes, and answer that request 502.
            if self.version == HttpVersion10:
                headers.popall(hdrs.CONNECTION, None)
            else:
                headers[hdrs.CONNECTION] = "close"
            response.force_close()
        elif self.version == HttpVersion10 and response.keep_alive:
            if hdrs.TRANSFER_ENCODING in self.headers:
                # RFC 9112 §6.1: HTTP/1.0 has no transfer coding, so such a request's framing
                # is faulty (a proxy in front may have read no body): its connection ends.
                response.headers.popall(hdrs.CONNECTION, None)
            ends_connection(response)


def ends_connection(response: web.StreamResponse) -> None:
    """An HTTP/1.0 answer whose head does not say `Connection: keep-alive` ends the
    connection (RFC 1945): a body of unknown length (a stream: HTTP/1.0 has no chunked
    coding) is read to the connection's end. aiohttp 3.14 leaves such a head without the
    header but keeps the connection open, so a client asking keep-alive waited for the end
    of its stream until the keep-alive timer, and a next request's answer read as more of
    the stream. Called with the head prepared: it closes what the head announced."""
    if response.headers.get(hdrs.CONNECTION, "").lower() != "keep-alive":
        response.force_close()


def request_class(cors: Cors | None) -> type[GatewayRequest]:
    """The app's request class: with CORS on, its answers carry CORS headers too."""
    if cors is None:
        return GatewayRequest
    stamp = cors.stamp

    class CorsRequest(GatewayRequest):
        def _stamp(self, response: web.StreamResponse) -> None:
            super()._stamp(response)
            stamp(self, response)

    return CorsRequest


def serve_through(app: web.Application, dispatch: Dispatch, request: type[web.Request]) -> None:
    """Make the app's server answer every request with `dispatch`, and make `request`s.

    aiohttp has no public way to give an Application's server another handler or request
    class; its `_make_handler` builds the server from these two members, looked up on the
    app when the runner starts (in production and under the tests' clients alike).
    """
    members = vars(app)
    members["_handle"] = dispatch
    members["_make_request"] = functools.partial(app._make_request, _cls=request)
