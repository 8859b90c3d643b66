"""CORS, so a page in a browser can call the gateway; off unless CORS_ALLOWED_ORIGINS is set.

A preflight (`OPTIONS` with `Origin` and `Access-Control-Request-Method`) is answered
here, before authentication: browsers never send credentials on a preflight (`preflight`:
the app's middleware for its own endpoints, called by `relay.dispatch` for the proxied
paths). Every other response to an allowed `Origin` gets `Access-Control-Allow-Origin` and
`Access-Control-Expose-Headers` as it is prepared (`stamp`, from `relay.dispatch`), before
the first byte goes out, so streams carry them too, and so do the gateway's own errors (a browser client
must be able to read a 401 or a 429 and its `retry-after`).

Not aiohttp-cors (checked against 0.8.1), which cannot do three things this needs:
- it refuses a route registered for every method ("already has a '*' handler for all
  methods", aio-libs/aiohttp-cors#241), and the relay is one such route for every path;
- its allowed headers are a fixed list of names or everything ("*"), while the SDKs send
  header families (`x-stainless-*`, `anthropic-*`, `openai-*`) whose members change with
  each release: here they are patterns, and a preflight gets whatever it asks for under them;
- its exposed headers are a fixed list too; `x-ratelimit-*` is a family, so here each
  response exposes the members it actually carries.
With `*` as an origin the answer is `Access-Control-Allow-Origin: *`; credentials with `*`
are refused at start (settings.py), since the Fetch standard forbids that pair.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable

from aiohttp import web
from aiohttp.typedefs import Handler

from proxy import errors
from proxy.errors import GatewayError
from proxy.record import own_request_id

# What the OpenAI and Anthropic SDKs (and curl-like clients) send, by name or family.
ALLOWED_HEADERS = (
    "accept",
    "content-type",
    "authorization",
    "x-api-key",
    "api-key",
    "x-goog-api-key",
    "x-request-id",
    "traceparent",  # W3C trace context, which a page's OpenTelemetry adds (docs/traces.md)
    "tracestate",
    # The JS SDKs (OpenAI's, Anthropic's, Vercel's AI SDK) set User-Agent in a page too;
    # Firefox and Safari send it (Chrome drops it), so their preflight asks for it.
    "user-agent",
    "anthropic-*",
    "x-stainless-*",
    "openai-*",
)
# What a browser client must be able to read: request ids, waits, quota state.
EXPOSED_HEADERS = (
    "x-request-id",
    "request-id",
    "retry-after",
    "retry-after-ms",
    "x-should-retry",
    "x-ratelimit-*",
    "anthropic-ratelimit-*",  # the key's limits on Anthropic answers (quota.ratelimit)
    "x-llm-gateway-cache",  # hit, miss or bypass, on the requests of keys with a cache
)
METHODS = "GET, POST, PUT, PATCH, DELETE, OPTIONS"
MAX_AGE_SECONDS = 600  # how long a browser may reuse a preflight's answer
VARY = "Origin, Access-Control-Request-Method, Access-Control-Request-Headers"
# How many header names the exposure of each is remembered for: a provider's answers repeat
# a few dozen names, and a name matched once is not matched again (the regex over each
# header of an answer with 18 took 22 us of CPU, the remembered names 8 for the whole stamp);
# past the bound, names are matched each time, so no answer can grow it further.
KNOWN_NAMES = 1024


def _patterns(names: Iterable[str]) -> re.Pattern[str]:
    return re.compile("|".join(fnmatch.translate(name) for name in names), re.IGNORECASE)


class Cors:
    """Which origins may call, which headers they may send and read."""

    def __init__(self, origins: Iterable[str], allow_credentials: bool = False) -> None:
        self._origins = frozenset(origin.lower() for origin in origins)
        self._is_any = "*" in self._origins
        self._allow_credentials = allow_credentials
        self._allowed = _patterns(ALLOWED_HEADERS)
        self._exposed = _patterns(EXPOSED_HEADERS)
        self._exposed_as: dict[str, str] = {}  # a header name → its exposed form, or ""

    def _allows(self, origin: str) -> bool:
        return self._is_any or origin.rstrip("/").lower() in self._origins

    @web.middleware
    async def preflight(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Answer a preflight (204, or 403 for an origin or a header not allowed) before
        `handler` sees it; hand every other request to `handler`. Either answer carries an
        x-request-id, as every answer does (SPEC: errors)."""
        headers = request.headers
        if (
            request.method != "OPTIONS"
            or "origin" not in headers
            or "access-control-request-method" not in headers
        ):
            return await handler(request)
        origin = headers["origin"]
        if not self._allows(origin):
            return _refusal(request, f"The origin {origin} may not call this gateway.")
        asked = [
            name.strip().lower()
            for name in headers.get("access-control-request-headers", "").split(",")
            if name.strip()
        ]
        refused = [name for name in asked if not self._allowed.fullmatch(name)]
        if refused:
            return _refusal(request, f"Headers not allowed here: {', '.join(refused)}.")
        response = web.Response(status=204)
        response.headers["x-request-id"] = own_request_id(headers.get("x-request-id"))
        response.headers["access-control-allow-methods"] = METHODS
        if asked:
            response.headers["access-control-allow-headers"] = ", ".join(asked)
        response.headers["access-control-max-age"] = str(MAX_AGE_SECONDS)
        return response

    def stamp(self, request: web.Request, response: web.StreamResponse) -> None:
        """The CORS headers of an answer to an allowed origin, as it is prepared."""
        origin = request.headers.get("origin")
        if origin is None or not self._allows(origin):
            return
        headers = response.headers
        # Every Vary line the provider sent (`Origin, X-Origin`, then `Accept-Encoding`), then
        # ours, as one: a cache in front keys the answer by all of them.
        headers["vary"] = ", ".join(filter(None, (*headers.getall("vary", ()), VARY)))
        if self._is_any and not self._allow_credentials:
            headers["access-control-allow-origin"] = "*"
        else:
            headers["access-control-allow-origin"] = origin
        if self._allow_credentials:
            headers["access-control-allow-credentials"] = "true"
        if request.method == "OPTIONS" and response.status == 204:
            return  # a preflight's answer exposes nothing
        known, exposed = self._exposed_as, set()
        for name in headers:
            shown = known.get(name)
            if shown is None:
                shown = self._learn(name)
            if shown:
                exposed.add(shown)
        if exposed:
            headers["access-control-expose-headers"] = ", ".join(sorted(exposed))

    def _learn(self, name: str) -> str:
        """A header name as it is exposed (lower case), or "" when it is not exposed."""
        shown = name.lower() if self._exposed.fullmatch(name) else ""
        if len(self._exposed_as) < KNOWN_NAMES:
            self._exposed_as[name] = shown
        return shown


def _refusal(request: web.Request, message: str) -> web.Response:
    """403 in the path's dialect, without CORS headers: the browser reports the failure."""
    request_id = own_request_id(request.headers.get("x-request-id"))
    return errors.render(GatewayError(403, "cors_not_allowed", message), request.path, request_id)
