"""Realtime over WebSocket: a client's upgrade, authenticated, admitted, connected upstream.

A WebSocket upgrade on any proxied path (`/v1/realtime?model=…` for OpenAI's Realtime API)
is authenticated with the virtual key (a credential header, or the subprotocol
`openai-insecure-api-key.<key>` that browsers send since they cannot set headers), admitted
by the key's quota, and connected upstream on the app's one `ClientSession` with the real
key in the provider's header style and the client's subprotocols minus the key entry. The
provider is the first target of the key's plan for the `model` query parameter (routes
apply; fallbacks and retries do not: a session cannot be replayed), with the next key of
that target's pool. Only
then does the client get its 101, with the subprotocol the provider chose: a refusal by the
gateway or the provider is an HTTP answer in the OpenAI dialect, never a half-open session.
`websocket.Session` then carries the frames, bounded by REALTIME_IDLE_TIMEOUT and
REALTIME_MAX_SESSION_SECONDS; a message is at most MAX_BODY_BYTES (1009 past it).

Usage: the provider's `response.done` events carry `response.usage`; each is charged to the
key's token quota as it arrives (a session may last an hour), priced (`cost_usd`, each
response at its own token kinds: text, audio, cached) and summed into the session's one log
line, written when it ends, with its duration, frames each way and how it ended.
What it does not do: pass the provider's body when it refuses the upgrade (aiohttp drops
it; the client gets the provider's status with the gateway's own error body), compress
(permessage-deflate is offered to neither side), or cut a session that passes its token
quota midway (the charges land, and the key's next request or session is refused).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Literal

import aiohttp
from aiohttp import WSCloseCode, web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from proxy import errors
from proxy.errors import GatewayError
from proxy.keys.credentials import presented
from proxy.keys.keys import KeyRing, VirtualKey
from proxy.keys.lockout import Lockout
from proxy.observe.logbook import Logbook
from proxy.observe.metrics import Metrics
from proxy.quota import ratelimit
from proxy.quota.quota import Quota
from proxy.quota.tracker import Admission
from proxy.realtime.websocket import CLOSE_ANSWER_SECONDS, Session
from proxy.record import CLIENT_CLOSED, Outcome, Record, Usage
from proxy.relay.peek import Peek, shown
from proxy.relay.routing import route
from proxy.settings import Settings
from proxy.upstream.failover import described
from proxy.upstream.providers import upstream_headers, upstream_url
from proxy.upstream.targets import Target
from proxy.usage.pricing import Prices
from proxy.usage.realtime_events import SessionUsage

if TYPE_CHECKING:
    from proxy.observe.tracing import Tracing

# Browsers cannot set headers on a WebSocket, so OpenAI's browser clients send the key as
# a subprotocol. The gateway reads it there and never passes it on.
BROWSER_KEY_PREFIX = "openai-insecure-api-key."


def is_upgrade(request: web.Request) -> bool:
    """True for a WebSocket upgrade request (the one branch at the top of the relay)."""
    upgrade = request.headers.get("upgrade")  # None on the hot path: one lookup, no more
    return upgrade is not None and upgrade.strip().lower() == "websocket"


class Realtime:
    """Relays WebSocket sessions; one per app, holding the sessions still open."""

    def __init__(
        self,
        settings: Settings,
        key_ring: KeyRing,
        lockout: Lockout,
        quota: Quota,
        prices: Prices,
        metrics: Metrics,
        logbook: Logbook,
        tracing: Tracing | None = None,  # None: traces off
    ) -> None:
        self._settings = settings
        self._key_ring = key_ring
        self._lockout = lockout
        self._quota = quota
        self._prices = prices
        self._metrics = metrics
        self._logbook = logbook
        self._tracing = tracing
        self.sessions: set[Session] = set()

    async def relay(self, request: web.Request, http: aiohttp.ClientSession) -> web.StreamResponse:
        """Authenticate, admit, connect upstream, upgrade, carry frames, record."""
        record = Record.begin(request.headers.get("x-request-id"), request.method, request.path)
        admission: Admission | None = None
        if self._tracing is not None:
            record.trace = self._tracing.begin(request)  # traces: the session's server span
        self._metrics.request_started()
        try:
            sent = credentials(request.headers)
            key = self._lockout.authenticate(
                self._key_ring, sent, self._lockout.client_address(request)
            )  # 401, 429
            record.key, record.provider = key.name, key.provider.name
            tail, query = route(request.raw_path)  # 400, 404
            models = request.query.getall("model", [])  # every one: a provider may read any
            model = models[0] if models else None
            record.model = shown(model)  # bounded, no control characters: it is logged
            for name in models:
                if not key.allows(name):
                    raise GatewayError(
                        403,
                        "model_not_allowed",
                        f"This key may not use the model '{shown(name)}'.",
                        "model",
                    )
            check_handshake(request)  # 400
            target = key.plans.choose(model).primary  # 400 (no route serves the model)
            record.target, record.provider = target.name, target.provider.name
            url = upstream_url(target.provider, tail, query)
            admission = await self._quota.admit(key, Peek(model=model))  # 429, 503
            upstream = await self._connect(http, url, target, request, record)  # 502, 504, …
            try:
                return await self._carry(request, upstream, key, admission, record)
            finally:
                await upstream.close(code=WSCloseCode.GOING_AWAY)  # a no-op once closed
        except GatewayError as error:
            record.end(error.status, Outcome.REFUSED, error.message)
            if error.status == 429:
                self._metrics.quota_rejected(record.key or "none")
            return errors.render(error, request.path, record.request_id)
        except asyncio.CancelledError:
            # The client left (before its upgrade was answered, or during the session).
            record.end(CLIENT_CLOSED, Outcome.CLIENT_LEFT, "client closed the connection")
            raise
        finally:
            self._quota.release(admission)  # its in-flight slots, the moment it ends
            self._settle(record)

    async def _connect(
        self,
        http: aiohttp.ClientSession,
        url: URL,
        target: Target,
        request: web.Request,
        record: Record,
    ) -> aiohttp.ClientWebSocketResponse[Literal[False]]:
        """The provider's end of the session. Raises 502, 504, or the provider's refusal status."""
        timeout = self._settings.request_timeout
        headers = handshake_headers(target, request.headers, record.request_id)
        if record.trace is not None:  # traces: a client span, its context in the handshake
            record.trace.attempt("GET", url, headers, target.provider.name, record.model)
        try:
            async with asyncio.timeout(timeout):
                upstream = await http.ws_connect(
                    url,
                    headers=headers,
                    protocols=forwarded_protocols(request.headers),
                    autoping=False,
                    autoclose=False,
                    decode_text=False,
                    max_msg_size=self._settings.max_body_bytes,
                    timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=CLOSE_ANSWER_SECONDS),
                )
        except aiohttp.WSServerHandshakeError as error:
            record.mark_first_byte()  # the provider answered, with a refusal
            status = error.status if error.status >= 400 else 502
            why = f"The provider refused the WebSocket upgrade ({error.status})."
            record.end(status, Outcome.ANSWERED, why)
            raise GatewayError(status, "upstream_refused", why) from None
        except TimeoutError:
            why = f"The provider did not accept the WebSocket within {timeout:g} seconds."
            record.end(504, Outcome.TIMEOUT, why)
            raise GatewayError(504, "upstream_timeout", why) from None
        except aiohttp.ClientError as error:
            why = f"The provider could not be reached ({described(error)})."
            record.end(502, Outcome.UNREACHABLE, why)
            raise GatewayError(502, "upstream_unreachable", why) from None
        record.mark_first_byte()
        return upstream

    async def _carry(
        self,
        request: web.Request,
        upstream: aiohttp.ClientWebSocketResponse[Literal[False]],
        key: VirtualKey,
        admission: Admission | None,
        record: Record,
    ) -> web.WebSocketResponse[Literal[False]]:
        """Answer the client's upgrade with the provider's subprotocol, then relay until closed."""
        client: web.WebSocketResponse[Literal[False]] = web.WebSocketResponse(
            protocols=(upstream.protocol,) if upstream.protocol else (),
            autoping=False,
            autoclose=False,
            compress=False,
            decode_text=False,
            max_msg_size=self._settings.max_body_bytes,
            timeout=CLOSE_ANSWER_SECONDS,
        )
        client.headers["x-request-id"] = record.request_id
        if admission is not None:
            client.headers.update(ratelimit.ratelimit_headers(admission))
        await client.prepare(request)

        def charge(usage: Usage) -> None:
            cost = self._prices.cost(record.provider, record.model, usage)
            self._quota.charge(key, usage, cost)
            if cost is not None:
                record.cost_usd = (record.cost_usd or 0.0) + cost

        usage = SessionUsage(charge)
        session = Session(
            client,
            upstream,
            idle_seconds=self._settings.realtime_idle_timeout,
            max_seconds=self._settings.realtime_max_session_seconds,
            on_provider_text=usage.read,
        )
        self.sessions.add(session)
        try:
            await session.run()
        finally:
            self.sessions.discard(session)
            usage.finish()  # a response cut short is charged what it generated
            record.usage = usage.total
            record.websocket = session.tally()
            record.end(101, Outcome.ANSWERED)
        return client

    async def shut(self, app: web.Application) -> None:
        """On shutdown: close every open session with 1001, both ends."""
        await asyncio.gather(*(session.end("shutdown") for session in list(self.sessions)))

    def _settle(self, record: Record) -> None:
        """The session's one ending: metrics, the log line (tokens were charged live)."""
        record.finish()
        self._metrics.request_ended()
        self._metrics.observe(record)
        self._logbook.write(record)
        if record.trace is not None:  # traces: the session's span is as long as the session
            record.trace.end(record)


def offered(headers: CIMultiDictProxy[str]) -> list[str]:
    """The subprotocols the client offered, in its order."""
    values = headers.getall("sec-websocket-protocol", ())
    return [
        protocol.strip() for value in values for protocol in value.split(",") if protocol.strip()
    ]


def forwarded_protocols(headers: CIMultiDictProxy[str]) -> list[str]:
    """The client's subprotocols for the provider: all but the one carrying the virtual key."""
    return [
        protocol for protocol in offered(headers) if not protocol.startswith(BROWSER_KEY_PREFIX)
    ]


def check_handshake(request: web.Request) -> None:
    """Refuse a broken handshake before anything goes upstream. Raises 400."""
    if not web.WebSocketResponse(protocols=offered(request.headers)).can_prepare(request).ok:
        raise GatewayError(
            400, "invalid_upgrade", "Not a valid WebSocket handshake (RFC 6455 §4.1)."
        )


def credentials(headers: CIMultiDictProxy[str]) -> Mapping[str, str]:
    """Where the virtual key is: a credential header, else the browser's key subprotocol."""
    if presented(headers) is not None:
        return headers
    for protocol in offered(headers):
        if protocol.startswith(BROWSER_KEY_PREFIX):
            return {"authorization": f"Bearer {protocol.removeprefix(BROWSER_KEY_PREFIX)}"}
    return headers


def handshake_headers(
    target: Target, incoming: CIMultiDictProxy[str], request_id: str
) -> CIMultiDict[str]:
    """The client's headers as for any request, minus its handshake: aiohttp makes its own."""
    # A pool's next usable key (weighted round-robin); when all rest, its first.
    credential = target.pool.pick(time.monotonic()) or target.pool.credentials[0]
    headers = upstream_headers(target.provider, credential.api_key, incoming, request_id)
    for name in [name for name in headers if name.lower().startswith("sec-websocket-")]:
        headers.popall(name, None)
    return headers
