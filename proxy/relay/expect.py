"""`Expect: 100-continue`: invite the body only of a request the gateway will read.

aiohttp answers `100 Continue` before the handler runs, so by default a client with an
unknown key or a body over MAX_BODY_BYTES is invited to send it all anyway, and the gateway reads
megabytes it will refuse.
This expect handler sends `100 Continue` only when the path is proxied, the client address
is not locked out, the key is known, its quota window is not known to be closed (a 429
this process gave it and whose Retry-After has not passed: `Quota.precheck`) and the
declared Content-Length fits; otherwise it sends nothing, and `relay` answers the refusal
(404, 429, 401, 413) at once, in the dialect and logged, without reading the body (RFC
9110 §10.1.1: a server may answer with the final status instead of 100). It counts
nothing: `relay` counts the refusal once. A key whose window filled up on another worker
or gateway is invited all the same: the 429 then comes after the body, from the tracker.
A client gone before its 100 could be written still reaches `relay`, and its log line (499).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import HttpVersion11, web

from proxy.errors import GatewayError
from proxy.keys.credentials import with_query
from proxy.keys.keys import KeyRing
from proxy.keys.lockout import Lockout
from proxy.quota.quota import Quota
from proxy.upstream.routing import route

ExpectHandler = Callable[[web.Request], Awaitable[web.StreamResponse | None]]


def awaits_continue(request: web.Request) -> bool:
    """Whether the client holds its body back until `100 Continue`."""
    expect = request.headers.get("expect", "").strip().lower()
    return request.version == HttpVersion11 and expect == "100-continue"


def expect_handler(
    ring: KeyRing, lockout: Lockout, quota: Quota, max_body_bytes: int
) -> ExpectHandler:
    """The catch-all route's answer to `Expect`: 100 Continue only for a body it will read."""

    async def answer(request: web.Request) -> None:
        if not awaits_continue(request):
            return None  # HTTP/1.0 knows no 100; another expectation is ignored (RFC 9110 §10.1.1)
        length = request.content_length
        if length is not None and length > max_body_bytes:
            return None
        if lockout.refuses(request):
            return None
        try:
            credentials, _ = with_query(request.headers, route(request.raw_path)[1])
            if quota.refuses(ring.authenticate(credentials)):
                return None
        except GatewayError:
            return None
        try:
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        except ConnectionResetError:
            # The client left: its request goes on to `relay`, which logs it 499, as it
            # logs a client that leaves without Expect.
            return None
        request.writer.output_size = 0  # as aiohttp's own handler: the response has not begun
        return None

    return answer
