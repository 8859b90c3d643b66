"""The WebSocket transport: a client's upgrade, checked, admitted, connected upstream.

A WebSocket upgrade on any proxied path (`/v1/realtime?model=…` for OpenAI's Realtime API)
comes through the exchange like any request (routed, authenticated with the virtual key: a
credential header, or the subprotocol `openai-insecure-api-key.<key>` that browsers send
since they cannot set headers; its ending written and its record settled there). Here its
models are checked (`named.check`, as for HTTP), it is admitted by the key's quota through
the exchange, and connected upstream on the app's one `ClientSession` with the real
key in the provider's header style and the client's subprotocols minus the key entry. The
provider is the first target of the key's plan for the `model` query parameter (routes
apply; fallbacks and retries do not: a session cannot be replayed), with the key of that
target's pool that its conversation goes to (POOL_STICKY_HEADER names it), else the next; a
key the provider refuses (401, 402, 403) or rate-limits (429) at the handshake rests, as
after an HTTP attempt, so the next session goes to another. Only
then does the client get its 101, with the subprotocol the provider chose: a refusal by the
gateway or the provider is an HTTP answer in the OpenAI dialect, never a half-open session.
How the handshake went is told to the target's breaker, as an HTTP attempt's is (/health).
`websocket.Session` then carries the frames, bounded by REALTIME_IDLE_TIMEOUT and
REALTIME_MAX_SESSION_SECONDS; a message is at most MAX_BODY_BYTES (1009 past it).

For a key with allowed_models, the client's session updates are read (`updates`): one
naming a transcription model the key may not use is answered with an `error` event.

Usage: the provider's `response.done` events carry `response.usage`; each is charged to the
key's token quota as it arrives (`Exchange.charge`: a session may last an hour), priced (`cost_usd`, each
response at its own token kinds: text, audio, cached) and summed into the session's one log
line, written when it ends, with its duration, frames each way and how it ended.
The Responses API's WebSocket mode (`/v1/responses`) is relayed the same way, but admitted
per turn: each `response.create` when the client sends it (`turns`), the session's opening
only refused for a key known to be over its quota right now.

On shutdown (`shut`, SIGTERM) a session with no turn in flight is closed with 1001 at once;
one with a turn in flight (a Responses turn sent and not ended, a Realtime response begun and
not done) is let finish it first, within SHUTDOWN_GRACE_SECONDS, and is then closed with
1001; a turn the client starts meanwhile is refused with an error event (`turns`,
`responding`). When the grace runs out, the drain ends what is still open (`end_all`), charged
what it generated. A Live session's turns are not followed: it is closed at once.

What it does not do: pass the provider's body when it refuses the upgrade (aiohttp drops
it; the client gets the provider's status with the gateway's own error body), compress
(permessage-deflate is offered to neither side), or cut a session that passes its token
quota midway (the charges land, and the key's next request or session is refused).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Collection, Mapping
from typing import TYPE_CHECKING, Literal

import aiohttp
from aiohttp import WSCloseCode, web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from proxy.errors import GatewayError
from proxy.exchange import Exchange
from proxy.keys.credentials import presented
from proxy.keys.keys import VirtualKey
from proxy.quota import ratelimit
from proxy.quota.tracker import Admission
from proxy.realtime.responding import Responding
from proxy.realtime.turns import Turns
from proxy.realtime.updates import Updates
from proxy.realtime.websocket import CLOSE_ANSWER_SECONDS, Gate, InFlight, Session
from proxy.record import Outcome, Record
from proxy.relay import named
from proxy.relay.echoes import searched
from proxy.relay.head_bytes import RAW_HEAD, has_raw_bytes
from proxy.relay.peek import Peek
from proxy.settings import Settings
from proxy.upstream.breaker import Breakers
from proxy.upstream.described import described, out_of_files, where
from proxy.upstream.egress import Egress, origin_of
from proxy.upstream.failover import (
    KEY_REFUSED,
    RATE_LIMITED_REST_SECONDS,
    REFUSED_KEY_REST_SECONDS,
    RETRYABLE,
    out_of_files_error,
)
from proxy.upstream.outbound import swap_query_model
from proxy.upstream.providers import downstream_headers, upstream_headers, upstream_url
from proxy.upstream.refusals import OUT_OF_CREDIT
from proxy.upstream.routing import OPENAI_API
from proxy.upstream.targets import Credential, Target, affinity_of
from proxy.usage.realtime_events import is_responses_socket, socket_usage

if TYPE_CHECKING:
    from proxy.observe.tracing import Trace

# Browsers cannot set headers on a WebSocket, so OpenAI's browser clients send the key as
# a subprotocol. The gateway reads it there and never passes it on.
BROWSER_KEY_PREFIX = "openai-insecure-api-key."


class BrowserKeyRecords(logging.Filter):
    """Drop aiohttp's WebSocket log records that quote a browser's key subprotocol.

    When the provider chooses no subprotocol, the client's offer overlaps none of the (no)
    protocols its answer may name, and aiohttp warns of that quoting every entry offered:
    the `openai-insecure-api-key.<virtual key>` one too, a full key on the gateway's stderr.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return BROWSER_KEY_PREFIX not in record.getMessage()


def hide_browser_keys() -> None:
    """Install `BrowserKeyRecords` on aiohttp's WebSocket logger, once."""
    websocket_log = logging.getLogger("aiohttp.websocket")
    if not any(isinstance(existing, BrowserKeyRecords) for existing in websocket_log.filters):
        websocket_log.addFilter(BrowserKeyRecords())


class Realtime:
    """The WebSocket transport; one per app, holding the sessions still open."""

    def __init__(
        self,
        settings: Settings,
        breakers: Breakers,
        on_out_of_files: Callable[[str], None] | None = None,
    ) -> None:
        """`on_out_of_files`: told why when a handshake had no file descriptor (/health)."""
        self._settings = settings
        self._on_out_of_files = on_out_of_files
        # Told how each handshake went, as an HTTP attempt tells them: /health and the
        # breaker-state metric see a provider that fails sessions.
        self._breakers = breakers
        self._http: aiohttp.ClientSession | None = None  # set while the app runs (use)
        self._egress: Egress | None = None
        self.sessions: set[Session] = set()
        self.is_draining = False  # the gateway shuts down: sessions end after their turn

    def use(self, session: aiohttp.ClientSession | None, egress: Egress | None = None) -> None:
        """Connect upstream through `session` (the app's one, while it runs), and through
        the outbound proxy `egress` names for the provider's origin, as the wire does."""
        self._http, self._egress = session, egress

    def credentials(self, headers: CIMultiDictProxy[str]) -> Mapping[str, str]:
        """A credential header, else the browser's key subprotocol."""
        return credentials(headers)

    async def relay(self, exchange: Exchange, key: VirtualKey) -> web.StreamResponse:
        """Check the models, admit, connect upstream, upgrade, carry frames. Raises GatewayError."""
        request, record = exchange.request, exchange.record
        # Every `model` parameter: a provider may read any of them.
        names = named.in_path(request.method, exchange.tail, request.query)
        model = names[0] if names else None
        record.saw_model(model)
        # 403. A Realtime session without a model runs the provider's default; a Responses
        # session names its model in each turn (turns.py); a Live session in a frame, unread.
        hidden = named.in_frames(exchange.tail)
        is_unnamed = not names and not is_responses(exchange.tail) and hidden is None
        unnamed = [named.Unnamed("the provider's default model")] if is_unnamed else names
        named.check(key, unnamed, hidden)

        def check(now: VirtualKey) -> None:  # the key as it is after a wait for a slot
            named.check(now, unnamed, hidden)  # 403 (a model taken away)

        check_handshake(request)  # 400
        # 400 (no route serves the model); naming none: the first route speaking OpenAI's API
        plan = key.plans.choose(model, OPENAI_API)
        target = plan.primary
        query = exchange.query
        if target.model is not None:  # the target's model runs, whichever the client named
            query = swap_query_model(query, target.model)
        # Priced as the target's model when it runs in place of one named (none named: the
        # provider's default, or a Responses session's turns, runs).
        swapped = target.model if query != exchange.query else None
        record.saw_target(target.name, target.provider.name, model=swapped)
        url = upstream_url(target.provider, exchange.tail, query)
        turns = Turns(exchange, target) if is_responses(exchange.tail) else None
        if turns is None:
            admission = await exchange.admit(Peek(model=model), target, check)  # 429, 503
            key = exchange.key or key  # as it is now, after a wait for a slot
        else:  # each turn is admitted when it is sent; a key refused right now is told so now
            exchange.precheck(None)  # 429
            admission = None
        echoable = plan.echoable()  # what no answer may carry, its request id included
        upstream = await self._connect(  # 502, 504
            url, target, request, record, exchange.trace, echoable
        )
        try:
            secrets = searched(plan.secrets)  # what the provider's frames may not carry
            gate = turns.gate if turns is not None else None
            if gate is None and key.allowed_models is not None:  # its session updates checked
                gate = Updates(key).gate
            # aiohttp keeps the handshake's answer on the socket only, as a private member.
            provided = upstream._response.headers
            record.saw_provider_request_id(
                provided.get("x-request-id") or provided.get("request-id"), echoable
            )
            answered = answer_headers(provided, echoable)
            return await self._carry(
                request, upstream, exchange, admission, answered, turns, secrets, gate
            )
        finally:
            await upstream.close(code=WSCloseCode.GOING_AWAY)  # a no-op once closed

    async def _connect(
        self,
        url: URL,
        target: Target,
        request: web.Request,
        record: Record,
        trace: Trace | None,
        echoable: tuple[str, ...],
    ) -> aiohttp.ClientWebSocketResponse[Literal[False]]:
        """The provider's end of the session. Raises 502, 504, or the provider's refusal status.

        `echoable`: the real keys (`Plan.echoable`), which its refusal's request id may not hold."""
        http = self._http
        assert http is not None, "the app's upstream session is not open"
        timeout = self._settings.request_timeout
        # The session's conversation, as an HTTP request names it to a pool (POOL_STICKY_HEADER).
        sticky = self._settings.pool_sticky_header
        conversation = request.headers.get(sticky) if sticky is not None else None
        affinity = affinity_of(conversation) if conversation else None
        # A pool's usable key for the conversation (the one its HTTP requests go to), else its
        # next (weighted round-robin); when all rest, the one whose rest ends first.
        pool = target.pool
        credential = pool.pick(self._breakers.clock(), affinity) or pool.soonest()
        headers = handshake_headers(target, credential, request.headers, record.request_id)
        if trace is not None:  # traces: a client span, its context in the handshake
            trace.attempt("GET", url, headers, target.provider.name, record.model)
        origin = origin_of(url)  # wss and https alike: a CONNECT tunnel
        hop = self._egress.hop(origin) if self._egress is not None else None
        proxy_headers = None
        if hop is not None and hop.authorization is not None:
            if origin[0] == "https":  # told to the proxy in CONNECT, never to the provider
                proxy_headers = {"Proxy-Authorization": hop.authorization}
            else:  # ws: the handshake itself goes to the proxy (absolute form), which drops it
                headers["Proxy-Authorization"] = hop.authorization
        try:
            async with asyncio.timeout(timeout):
                upstream = await http.ws_connect(
                    url,
                    headers=headers,
                    protocols=forwarded_protocols(request.headers),
                    autoping=False,
                    autoclose=False,
                    decode_text=False,
                    max_msg_size=smallest_refused(self._settings),
                    timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=CLOSE_ANSWER_SECONDS),
                    proxy=None if hop is None else hop.url,
                    proxy_headers=proxy_headers,
                )
        except aiohttp.WSServerHandshakeError as error:
            if error.status == 407 and hop is not None:  # the proxy's refusal, not the provider's
                why = f"through the outbound proxy {hop.where}: it refused (407 Proxy Authentication Required)"
                self._failed(target, f"{where(target)}: {why}")
                raise GatewayError(
                    502,
                    "upstream_unreachable",
                    f"The provider could not be reached ({why}).",
                    outcome=Outcome.UNREACHABLE,
                ) from None
            record.mark_first_byte()  # the provider answered, with a refusal
            refused = error.headers  # its own id of the request, which its support asks for
            if refused is not None:
                record.saw_provider_request_id(
                    refused.get("x-request-id") or refused.get("request-id"), echoable
                )
            if error.status in RETRYABLE and error.status != 429:  # a 429 is about the key
                self._failed(target, f"{error.status} from {where(target)}")
            # A key refused, out of credit or rate limited rests, as after an HTTP attempt.
            if error.status in KEY_REFUSED or error.status == OUT_OF_CREDIT:
                pool.rest(credential, self._breakers.clock() + REFUSED_KEY_REST_SECONDS)
            elif error.status == 429:
                pool.rest(credential, self._breakers.clock() + RATE_LIMITED_REST_SECONDS)
            status = error.status if error.status >= 400 else 502
            why = f"The provider refused the WebSocket upgrade ({error.status})."
            raise GatewayError(status, "upstream_refused", why, outcome=Outcome.ANSWERED) from None
        except TimeoutError:
            self._failed(target, f"{where(target)}: no WebSocket within {timeout:g} seconds")
            why = f"The provider did not accept the WebSocket within {timeout:g} seconds."
            raise GatewayError(504, "upstream_timeout", why, outcome=Outcome.TIMEOUT) from None
        except aiohttp.ClientError as error:
            if (short := out_of_files(error)) is not None:  # the gateway's, not the target's
                why = f"{short}: {where(target)} was not asked"
                self._breakers[target.name].abstain()
                if self._on_out_of_files is not None:
                    self._on_out_of_files(why)
                raise out_of_files_error(why) from None
            self._failed(target, f"{where(target)}: {described(error)}")
            why = f"The provider could not be reached ({described(error)})."
            raise GatewayError(
                502, "upstream_unreachable", why, outcome=Outcome.UNREACHABLE
            ) from None
        record.mark_first_byte()
        self._breakers[target.name].succeeded(self._breakers.clock())
        return upstream

    def _failed(self, target: Target, why: str) -> None:
        """The target failed a handshake: its breaker counts it, as an HTTP attempt's."""
        self._breakers[target.name].failed(self._breakers.clock(), why)

    async def _carry(
        self,
        request: web.Request,
        upstream: aiohttp.ClientWebSocketResponse[Literal[False]],
        exchange: Exchange,
        admission: Admission | None,
        answered: CIMultiDict[str],
        turns: Turns | None = None,
        secrets: tuple[bytes, ...] = (),
        gate: Gate | None = None,
    ) -> web.WebSocketResponse[Literal[False]]:
        """Answer the client's upgrade with the provider's subprotocol, then relay until closed."""
        client: web.WebSocketResponse[Literal[False]] = web.WebSocketResponse(
            protocols=(upstream.protocol,) if upstream.protocol else (),
            autoping=False,
            autoclose=False,
            compress=False,
            decode_text=False,
            max_msg_size=smallest_refused(self._settings),
            timeout=CLOSE_ANSWER_SECONDS,
        )
        client.headers.extend(answered)
        # aiohttp's client does not tell a head with bytes that are not UTF-8: looked for
        # here, once a session.
        if has_raw_bytes(answered.values()):
            client[RAW_HEAD] = True
        client.headers["x-request-id"] = exchange.record.request_id
        if admission is not None:
            client.headers.update(ratelimit.ratelimit_headers(admission))
        await client.prepare(request)
        # Each response charged as it comes; a Responses session's settles its own turn.
        in_flight: InFlight | None = turns
        if turns is not None:
            usage = socket_usage(exchange.tail, turns.completed, turns.begun, turns.refused)
        else:  # Realtime's responses begun and not done are in flight (a Live reader tells none)
            responding = in_flight = Responding()
            usage = socket_usage(
                exchange.tail,
                exchange.charge,
                on_begun=responding.begun,
                on_transcribed=exchange.charge,
                on_done=responding.done,
            )
        session = Session(
            client,
            upstream,
            idle_seconds=self._settings.realtime_idle_timeout,
            max_seconds=self._settings.realtime_max_session_seconds,
            on_provider_text=usage.read,
            abort_client=lambda: _abort(request),
            gate=gate,
            secrets=secrets,
            turns=in_flight,
        )
        self.sessions.add(session)
        try:
            if self.is_draining:  # it opened as the gateway began to shut down: no turn yet
                await session.drain()
            await session.run()
        finally:
            self.sessions.discard(session)
            usage.finish()  # a response cut short is charged what it generated
            if turns is not None:
                turns.finish()  # turns that never completed give back their reservations
            exchange.record.saw_session(usage.total, session.tally(), usage.model)
        return client

    async def shut(self, app: web.Application) -> None:
        """On shutdown: each open session ends with 1001, both ends, now, or once its turn in
        flight is over (`Session.drain`)."""
        self.is_draining = True
        await asyncio.gather(*(session.drain() for session in list(self.sessions)))

    async def end_all(self) -> None:
        """The shutdown grace is over: the sessions still open end with 1001, both ends."""
        await asyncio.gather(*(session.end("shutdown") for session in list(self.sessions)))

    def idle(self) -> int:
        """How many open sessions have no turn in flight: the shutdown closes them at once."""
        return sum(1 for session in self.sessions if not session.is_turning())


def is_responses(tail: str) -> bool:
    """The Responses API's WebSocket mode (`/v1/responses`, Azure's `/openai/v1/responses`):
    its turns are admitted one by one, as its usage is read (`socket_usage`)."""
    return is_responses_socket(tail)


def _abort(request: web.Request) -> None:
    """Drop the client's connection at once, unsent bytes and all."""
    if request.transport is not None:
        request.transport.abort()


# What of the provider's handshake answer the client's does not carry (`answer_headers`).
_NOT_ANSWERED = ("sec-websocket-", "x-request-id", "x-ratelimit-", "anthropic-ratelimit-")


def smallest_refused(settings: Settings) -> int:
    """aiohttp's `max_msg_size` for a message of MAX_BODY_BYTES to pass: it refuses a message
    of `max_msg_size` bytes or more, and the gateway only one over MAX_BODY_BYTES (1009)."""
    return settings.max_body_bytes + 1


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


def answer_headers(provided: CIMultiDictProxy[str], secrets: Collection[str]) -> CIMultiDict[str]:
    """The headers of the provider's answer to the handshake, for the client's: they pass as
    an HTTP answer's do (`downstream_headers`; Codex reads `x-codex-turn-state`,
    `openai-model` and `x-reasoning-included` there), but the handshake's own (aiohttp
    answers the client's), the provider's x-request-id (logged as `provider_request_id`:
    the client's is the gateway's) and its account's rate limits (the gateway's own go in
    their place when the session is admitted at its start)."""
    headers = downstream_headers(provided, secrets)
    for name in [name for name in headers if name.lower().startswith(_NOT_ANSWERED)]:
        headers.popall(name, None)
    headers.popall("content-length", None)
    return headers


def check_handshake(request: web.Request) -> None:
    """Refuse a broken handshake before anything goes upstream. Raises 400."""
    if "upgrade" not in request.headers:
        raise GatewayError(
            400,
            "invalid_upgrade",
            "The WebSocket handshake reached the gateway without its Upgrade header: a proxy "
            "in front dropped it. It must pass Upgrade and Connection over HTTP/1.1 (nginx: "
            "proxy_http_version 1.1 and proxy_set_header for both; docs/reverse-proxies.md).",
        )
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
    target: Target, credential: Credential, incoming: CIMultiDictProxy[str], request_id: str
) -> CIMultiDict[str]:
    """The client's headers as for any request, minus its handshake: aiohttp makes its own;
    `credential`'s real key in the provider's header."""
    headers = upstream_headers(target.provider, credential.api_key, incoming, request_id)
    for name in [name for name in headers if name.lower().startswith("sec-websocket-")]:
        headers.popall(name, None)
    return headers
