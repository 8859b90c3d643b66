"""One request's life, for HTTP and WebSocket alike: begin → route → authenticate → relay → settle.

`Entrance.handle` is the handler of every proxied request. It picks the transport (a
WebSocket upgrade goes to `realtime`, any other request to `relay`), begins one `Exchange`
(the record, and the trace) and the in-flight gauge, routes (no key needed), authenticates,
and hands the exchange and the key to the transport. The transport reads what it
needs, asks the exchange to admit (`precheck`, `admit`: a quota refusal is counted there,
so never a lockout's 429 nor one of key "none"), and relays.

Whatever happens, the exchange alone writes the record's ending, once:

    the transport returned a response   its status, answered (a session: 101)
    GatewayError                        its status and outcome; answered in the dialect
    Cut (an answer under way ended)     its status and outcome; the connection is closed
    CancelledError (the client left)    499 client_left; an open WebSocket session: 101;
                                        a stream it had whole (its last event, where the
                                        openai SDK before 3.x and LiteLLM leave): its status,
                                        answered
    CancelledError(GRACE_OVER)          503 shutdown: the server cut it when the shutdown
                                        grace ran out (runtime.server)
    any other exception (a bug)         500 internal, logged with its traceback, answered
                                        in the dialect (or the connection closed, when the
                                        answer had begun)

A key with a response cache is looked up (`look_up`) after admission, before upstream: a
hit is answered from stored bytes, charged nothing (it counts as a request).

Then it settles: a background Response is owed or claimed (`usage.background`, which may
wait on the tracker; a claim is charged to the key that created the response, whichever
key fetched it), a batch owed or claimed and its output read (`usage.batch_charges`, charged
alike), then the sinks, each called once, in this order: reckon → price →
quota charge → cache store → breaker report → metrics → log → trace (a sink that fails is
logged, and the next ones still run).

Reckoning decides what a generation is charged when it did not end with a whole answer
(a gateway timeout, a cut, a client that left): what the provider reported, else its
prompt plus every token delivered (the tap's estimate), and when nothing of the output is
known (`Record.is_work_unknown`: the request was sent and no answer, or no output, came)
its reservation, the prompt's estimate plus its output cap, or the key's output allowance
when it names none (`Quota.reservation`): the provider may have done that work, and bills
it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import socket
import struct
from collections.abc import Callable, Coroutine, Mapping
from typing import TYPE_CHECKING, Any, Protocol

from aiohttp import HttpVersion11, web
from multidict import CIMultiDictProxy

from proxy import errors
from proxy.cache.cache import Cache, Lookup
from proxy.errors import Cut, GatewayError
from proxy.keys.credentials import presented, with_query
from proxy.keys.keys import KeyRing, VirtualKey, masked
from proxy.keys.lockout import Lockout, NotYetKnown
from proxy.keys.reload import KeysFile
from proxy.observe.logbook import Logbook
from proxy.observe.metrics import Metrics
from proxy.quota.quota import Quota
from proxy.quota.subjects import QuotaRequest, Serving
from proxy.quota.tracker import Admission
from proxy.record import (
    CLIENT_CLOSED,
    GRACE_OVER,
    GRACE_OVER_STATUS,
    Cached,
    Outcome,
    Record,
    Usage,
    cut_by_gateway,
)
from proxy.upstream.breaker import Breakers
from proxy.upstream.routing import PROXIED_METHODS, not_proxied, route
from proxy.usage import background
from proxy.usage.batch_charges import BatchCharges
from proxy.usage.pricing import Prices
from proxy.usage.usage import Charged, charged

if TYPE_CHECKING:
    from proxy.observe.tracing import Trace, Tracing

log = logging.getLogger("llm_gateway")
# The answers that produce tokens: one that never came is charged what it reserved.
_GENERATED = frozenset((Charged.TEXT, Charged.PROMPT))
# SO_LINGER on with a 0 s linger: a close resets the connection (_closed).
_LINGER_NONE = struct.pack("ii", 1, 0)


def is_upgrade(request: web.Request) -> bool:
    """True for a WebSocket upgrade request: a GET (RFC 6455 §4.1). Another method naming
    `Upgrade: websocket` goes on as itself, body and all, its Upgrade ignored (RFC 9110
    §7.8) and dropped as hop-by-hop. A GET with a `Sec-WebSocket-Key` and no Upgrade is a
    handshake whose Upgrade a proxy in front dropped (nginx's defaults: HTTP/1.0 to the
    gateway): the WebSocket transport refuses it, saying so, rather than it going upstream
    as a plain GET."""
    if request.method != "GET":  # a POST on the hot path: no header lookup
        return False
    headers = request.headers
    upgrade = headers.get("upgrade")
    if upgrade is None:
        return "sec-websocket-key" in headers
    return upgrade.strip().lower() == "websocket"


class Transport(Protocol):
    """How requests of one kind reach the provider: HTTP (`relay`) or WebSocket (`realtime`)."""

    def credentials(self, headers: CIMultiDictProxy[str]) -> Mapping[str, str]:
        """Where this transport's client presents its virtual key."""
        ...

    async def relay(self, exchange: Exchange, key: VirtualKey) -> web.StreamResponse:
        """Admit (through `exchange`), forward, answer. Raises GatewayError, Cut."""
        ...


class Entrance:
    """Every proxied request enters here; holds what an exchange needs, built once."""

    def __init__(
        self,
        *,
        key_ring: KeyRing,
        keys: KeysFile,
        lockout: Lockout,
        quota: Quota,
        prices: Prices,
        breakers: Breakers,
        metrics: Metrics,
        logbook: Logbook,
        http: Transport,
        websocket: Transport,
        batches: BatchCharges,
        cache: Cache | None = None,  # None: no key's answers are cached
        tracing: Tracing | None = None,  # None: traces off
    ) -> None:
        self.key_ring = key_ring
        self._keys = keys  # reloads: a key not found while one is under way waits for it
        self.lockout = lockout
        self.quota = quota
        self.prices = prices
        self.breakers = breakers
        self.metrics = metrics
        self.logbook = logbook
        self.cache = cache
        self.tracing = tracing
        self.batches = batches
        self._http = http
        self._websocket = websocket
        # The settle, in its one order.
        sinks: list[Callable[[Exchange], None]] = [
            Exchange.hide_key,
            self._reckon,
            self._price,
            self._charge,
        ]
        if cache is not None:
            sinks.append(self._store)
        sinks += [self._report_breaker, self._observe, self._log]
        if tracing is not None:
            sinks.append(self._end_trace)
        self._sinks = tuple(sinks)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """The one handler of every proxied path: route, authenticate, relay; write the
        ending; settle. (The exchange's steps run here, not in a coroutine of its own: each
        coroutine the request nests is stepped through again at every await.)"""
        transport = self._websocket if is_upgrade(request) else self._http
        exchange = Exchange(self, request)
        record = exchange.record
        self.metrics.request_started()
        try:
            try:
                key = exchange.authenticate(transport, self._keys.is_reloading)  # 400...429
            except NotYetKnown:  # made a moment ago on another worker: asked once reloaded
                await self._keys.reloaded()
                key = exchange.authenticate(transport)
            response = await transport.relay(exchange, key)
            record.end(response.status, Outcome.ANSWERED)
            return response
        except GatewayError as error:
            record.end(error.status, error.outcome, error.why)
            return _refused(exchange.without_keys(error), request, record)
        except Cut as cut:
            if cut.outcome is Outcome.CLIENT_LEFT and record.whole_answer_status is not None:
                record.end(record.whole_answer_status, Outcome.ANSWERED)  # it had it all
            else:
                record.end(cut.status, cut.outcome, cut.why)
            return _closed(request, cut.status, cut.outcome is Outcome.CLIENT_LEFT)
        except asyncio.CancelledError as cancel:
            # aiohttp cancels the handler when the client disconnects (handler_cancellation),
            # and the server when the shutdown grace ran out (the gateway's own cut).
            if record.is_session:  # a session that opened was answered, whoever ended it
                record.end(101, Outcome.ANSWERED)
            elif cut_by_gateway(cancel):
                record.end(GRACE_OVER_STATUS, Outcome.SHUTDOWN, GRACE_OVER)
            elif record.whole_answer_status is not None:  # it left once it had it all
                record.end(record.whole_answer_status, Outcome.ANSWERED)
            else:
                record.end(CLIENT_CLOSED, Outcome.CLIENT_LEFT, "client closed the connection")
            raise
        except Exception:
            # A bug, not an input: one log line with the traceback, a 500 in the dialect. Its
            # path as the log line shows it: a key pasted there masked (the settle's own step,
            # early: masking twice changes nothing).
            exchange.hide_key()
            log.exception("internal error on %s %s", request.method, record.path)
            record.end(500, Outcome.INTERNAL, "internal error")
            if request.writer.output_size:  # the answer had begun: it can only be cut
                return _closed(request, 500)
            failure = GatewayError(500, "internal_error", "The gateway failed on this request.")
            return _refused(failure, request, record)
        finally:
            try:
                step = exchange.deferred()
                if step is not None:
                    await _to_its_end(step)
            finally:  # also when the client's leaving cancels the handler meanwhile
                self.settle(exchange)

    def settle(self, exchange: Exchange) -> None:
        """The request's one settle: each sink once, in order. A sink that fails (a bug) is
        logged with its traceback, and the sinks after it still run: the answer is gone, and
        its log line and metrics must not go with the failure."""
        exchange.record.finish()
        self.metrics.request_ended()
        for sink in self._sinks:
            try:
                sink(exchange)
            except Exception:
                record = exchange.record
                log.exception(
                    "internal error settling %s %s (%s)",
                    record.method,
                    record.path,  # as the log line shows it: a key pasted there masked
                    sink.__name__.lstrip("_"),
                )

    def _reckon(self, exchange: Exchange) -> None:
        key, record, peek = exchange.key, exchange.record, exchange.peek
        if key is None or peek is None or exchange.is_charged_live or record.cache is Cached.HIT:
            return
        if record.is_work_unknown and charged(record.method, record.path) in _GENERATED:
            reserved, read = self.quota.reservation(key, peek), record.usage
            if read is not None and read.prompt_tokens >= reserved.prompt_tokens:
                # The prompt as read (the provider's count: Anthropic's message_start), its
                # parts kept, each priced at its rate (cache reads, writes); with the cap.
                reserved = dataclasses.replace(
                    read, completion_tokens=reserved.completion_tokens, estimated=True
                )
            elif read is not None:  # the reservation's estimate of the prompt is the larger
                reserved = Usage(reserved.prompt_tokens, reserved.completion_tokens, estimated=True)
            if reserved.total_tokens:  # a key with no token limit nor budget reserves none
                record.saw_reserved(reserved)

    def _price(self, exchange: Exchange) -> None:
        record = exchange.record
        if exchange.is_charged_live:  # each response was priced as it came
            record.priced(exchange.live_cost_usd)
            return
        if record.is_batch_charge:  # priced by model at batch prices (batch_charges)
            return
        if record.is_priced_replay:  # a cache hit: priced as its answer was
            return
        # The model that ran: the one the provider says answered, else the one the target
        # swapped in (an answer that never came: its reservation), else the client's.
        answered = record.response_model or record.target_model
        record.priced(
            self.prices.cost(
                record.provider,
                record.model,
                record.usage,
                answered,
                service_tier=record.service_tier,
                speed=record.speed,
                apart=record.apart,
            )
        )

    def _charge(self, exchange: Exchange) -> None:
        key, record = exchange.key, exchange.record
        if key is not None:  # the reservation becomes the real count
            # A cache hit spent nothing, and a session's responses were charged as they came.
            usage = None if exchange.is_charged_live else record.spent_usage
            creator = exchange.creator
            if creator is None:
                self.quota.settle(key, exchange.admission, usage, record.cost_usd)
            else:  # deferred work it claimed: its creator pays, this request itself nothing
                self.quota.settle(key, exchange.admission, None, None)
                if usage is not None:
                    self.quota.charge_deferred(creator, record.model, usage, record.cost_usd)
            # A key (or team) deleted while this request ran: its settle opened again what
            # the delete dropped (windows, totals, a micro-dollar fraction), to be kept for
            # the life of the process, unreachable; dropped again, nothing stays once the
            # last of its requests settled.
            gone = self.key_ring.gone_scopes(key)
            if creator is not None:
                gone += self.key_ring.gone_scopes(creator)
            if gone:
                self.quota.forget(gone)

    def _store(self, exchange: Exchange) -> None:
        if exchange.found is not None and self.cache is not None:
            self.cache.settle(exchange.found, exchange.record)  # a miss's answer, if storable

    def _report_breaker(self, exchange: Exchange) -> None:
        record = exchange.record
        if record.outcome is Outcome.BROKEN and record.target is not None:
            self.breakers.report_broken(record.target, record.error or "broken", record.key)
        elif record.failed_in_answer is not None and record.target is not None:
            attempts = record.attempts
            # A first event that stood for a status was heard by the attempt loop already.
            if not attempts or attempts[-1].stood_for is None:
                self.breakers.report_failed(record.target, record.error or "error event")

    def _observe(self, exchange: Exchange) -> None:
        self.metrics.observe(exchange.record)

    def _log(self, exchange: Exchange) -> None:
        self.logbook.write(exchange.record)

    def _end_trace(self, exchange: Exchange) -> None:
        if exchange.trace is not None:  # after the last byte: a stream's span is its length
            exchange.trace.end(exchange.record)


class Exchange:
    """One request: its record, its key once known, its admission; and the steps it offers."""

    __slots__ = (
        "_credentials",
        "_entrance",
        "_is_id_named",
        "admission",
        "creator",
        "found",
        "is_charged_live",
        "key",
        "live_cost_usd",
        "peek",
        "query",
        "record",
        "request",
        "tail",
        "trace",
    )

    def __init__(self, entrance: Entrance, request: web.Request) -> None:
        self._entrance = entrance
        self.request = request
        named_id = request.headers.get("x-request-id")
        self.record = Record.begin(named_id, request.method, request.path)
        self._is_id_named = named_id is not None  # the client's own id goes back in headers
        tracing = entrance.tracing
        self.trace: Trace | None = None if tracing is None else tracing.begin(request)
        self.key: VirtualKey | None = None
        self._credentials: Mapping[str, str] = {}  # where the key was presented
        self.admission: Admission | None = None
        self.peek: QuotaRequest | None = None  # what the request was admitted as
        self.found: Lookup | None = None  # what the response cache did, for keys with one
        self.tail = self.query = ""
        self.is_charged_live = False
        self.live_cost_usd: float | None = None
        # The key that created the deferred work this request claimed (a background response
        # it fetched finished): it pays the usage; None: the request's own key pays its own.
        self.creator: VirtualKey | None = None

    def authenticate(
        self, transport: Transport, is_reloading: Callable[[], bool] | None = None
    ) -> VirtualKey:
        """Route (no key needed), then find the key where `transport` presents it. Raises
        400, 404, 405 (the path, or a method no provider API serves), 401, 429 (the lockout); NotYetKnown for a key not found
        while `is_reloading()`."""
        entrance, request = self._entrance, self.request
        self.tail, query = route(request.raw_path)
        if request.method not in PROXIED_METHODS:
            raise not_proxied(request.method)
        credentials, self.query = with_query(transport.credentials(request.headers), query)
        self._credentials = credentials
        if self._is_id_named:
            self._take_no_keyed_id(credentials)
        lockout = entrance.lockout
        address = lockout.client_address(request)
        self.key = key = lockout.authenticate(entrance.key_ring, credentials, address, is_reloading)
        team = key.team
        self.record.saw_key(key.name, key.provider.name, team.name if team is not None else None)
        if key.cache is not None:  # until a lookup says more: the cache neither read nor written
            self.record.saw_cache(Cached.BYPASS)
        return key

    def _take_no_keyed_id(self, credentials: Mapping[str, str]) -> None:
        """The client's x-request-id is the request's, handed back in every answer's headers
        (before a refusal too): one holding the key the client presented, or that is a key
        of the file, is replaced by the gateway's own."""
        record, secret = self.record, presented(credentials)
        named = record.request_id
        if (secret and secret in named) or self._entrance.key_ring.secrets_in([named]):
            record.took_own_request_id()

    def hide_key(self) -> None:
        """The key the client presented, named again in its path or model (pasted where the
        model goes, or a probe), is masked on the record: SPEC keeps a full virtual key out
        of every log line and metric. So is another key of the file named there whole (a
        user's virtual key, a real key), whoever wrote it, also glued inside a longer model
        or path segment (`gpt-4o:<key>`)."""
        secret = presented(self._credentials) if self.key is not None else None
        if secret:
            self.record.hide(secret, masked(secret))
            if self.trace is not None:  # the attempts' spans named the model before the record
                self.trace.hide(secret, masked(secret))
        ring, record = self._entrance.key_ring, self.record
        found = ring.secrets_in(record.ids()) + ring.secrets_inside(record.written())
        if len(found) > 1:  # a key holding another is masked whole
            found.sort(key=lambda pair: -len(pair[0]))
        for name, mask in found:
            if name != secret:
                self.record.hide_named(name, mask)
                if self.trace is not None:
                    self.trace.hide(name, mask)

    def without_keys(self, error: GatewayError) -> GatewayError:
        """`error` as the client reads it: a key its message quotes from the request (the
        model or a path segment the client sent, with its own key, another user's or a
        real key pasted into it) masked, as the log line shows it."""
        message = error.message
        secret = presented(self._credentials) if self.key is not None else None
        if secret and secret in message:
            message = message.replace(secret, masked(secret))
        for name, mask in self._entrance.key_ring.secrets_inside(self.record.written()):
            message = message.replace(name, mask)
        if message == error.message:
            return error
        return GatewayError(
            error.status, error.code, message, error.param, error.headers, error.outcome, error.why
        )

    def deferred(self) -> Coroutine[Any, Any, None] | None:
        """The step that owes or claims the deferred work this request made or fetched: a
        background response (`usage.background`), a batch (`usage.batch_charges`); None
        for any other request (most: they pay no task for it)."""
        entrance, request, record = self._entrance, self.request, self.record
        if self.key is None:
            return None
        if record.stored is not None:
            return background.owe_or_claim(
                entrance.quota,
                self.key,
                record,
                keys=entrance.key_ring,
                prices=entrance.prices,
                on_claim=self.claimed,
            )
        if record.batch is not None:
            return entrance.batches.settle(
                self.key, record, request.headers, self.query, on_claim=self.claimed
            )
        return None

    def claimed(self, creator: VirtualKey) -> None:
        """This request claimed deferred work that `creator` made: its usage is charged there."""
        self.creator = creator

    def precheck(self, body_bytes: int | None) -> None:
        """Before a large body is read: 429 for a key known to be refused right now."""
        assert self.key is not None
        try:
            self._entrance.quota.precheck(self.key, body_bytes)
        except GatewayError:
            self._entrance.metrics.quota_rejected(self.key.name)
            raise

    async def admit(
        self,
        peek: QuotaRequest,
        serving: Serving | None = None,
        check: Callable[[VirtualKey], None] | None = None,
    ) -> Admission | None:
        """Admit the request by its key's quota and budget. Raises 429, 503, and after a
        wait for a slot 401 (the key revoked meanwhile) or what `check` raises.

        `serving`: the target that will serve it (its reservation is priced there).
        `check`: the transport's checks of the key on this request (its models: 403), made
        again on the key as it is after a wait for a slot.
        None: nothing to settle (the tracker was lost and the request let through).
        """
        assert self.key is not None
        self.peek = peek
        quota = self._entrance.quota
        try:
            admission = quota.admit_now(self.key, peek, serving)  # memory: no coroutine
            if admission is None:

                def current() -> VirtualKey:
                    return self._current_key(check)

                admission = await quota.admit(self.key, peek, serving, current)
            self.admission = admission
        except GatewayError as error:
            if error.status == 429:
                self._entrance.metrics.quota_rejected(self.key.name)
            raise
        return self.admission

    def _current_key(self, check: Callable[[VirtualKey], None] | None) -> VirtualKey:
        """The request's key as the keys are now, for a request that waited for a slot:
        revoked meanwhile, it is refused (401); restricted meanwhile so that `check` refuses
        this request (a model taken out of its allowed_models), refused as `check` says
        (403); changed otherwise, it is admitted and charged as it is now, and its log line
        names its team as now. Where it is sent stays as it came."""
        key = self._entrance.key_ring.authenticate(self._credentials)
        self.key = key
        team = key.team
        self.record.saw_key(key.name, key.provider.name, team.name if team else None)
        if check is not None:
            check(key)
        return key

    async def look_up(self, body: bytes) -> Lookup | None:
        """The response cache's answer for this request (`body`: as the client sent it): a
        hit to replay, a miss whose answer is collected to store, or a bypass. None: the key
        has no cache. Never raises."""
        cache, key = self._entrance.cache, self.key
        if cache is None or key is None or key.cache is None:
            return None
        request = self.request
        self.found = found = await cache.lookup(
            key, request.method, self.tail, self.query, request.headers, body
        )
        self.record.saw_cache(found.cached)
        return found

    async def admit_turn(
        self, peek: QuotaRequest, serving: Serving, check: Callable[[VirtualKey], None]
    ) -> tuple[VirtualKey, Admission | None]:
        """One turn of a session admitted on its own (the Responses API's WebSocket mode): the
        key as keys.json has it now, `check`ed (its models: a turn it refuses is not counted),
        admitted by its quota and budget, priced at `serving` (the session's target). Raises
        401 (the key was revoked since the session opened, or while the turn waited for a
        slot), what `check` raises, 429, 503."""
        entrance = self._entrance
        key = entrance.key_ring.authenticate(self._credentials)
        check(key)
        admitted = [key]  # the key as it was when the turn was last asked about

        def current() -> VirtualKey:
            admitted[0] = entrance.key_ring.authenticate(self._credentials)
            check(admitted[0])  # restricted while the turn waited: refused as at its start
            return admitted[0]

        try:
            admission = await entrance.quota.admit(key, peek, serving, current)
        except GatewayError as error:
            if error.status == 429:
                entrance.metrics.quota_rejected(admitted[0].name)
            raise
        return admitted[0], admission

    def settle_turn(
        self,
        key: VirtualKey,
        admission: Admission | None,
        usage: Usage | None,
        model: str | None,
        service_tier: str | None = None,
        answered: str | None = None,
    ) -> None:
        """A turn's end: its reservation replaced by its usage, priced (at `service_tier`,
        the tier that served it, and as `answered`, the model the provider says ran it, as
        an HTTP answer is); None: nothing came."""
        entrance, record = self._entrance, self.record
        cost = None
        if usage is not None:
            ran = model or record.model
            cost = entrance.prices.cost(
                record.provider, ran, usage, answered, service_tier=service_tier
            )
            if cost is not None:
                self.live_cost_usd = (self.live_cost_usd or 0.0) + cost
        if admission is None and usage is not None:  # the tracker was lost: charge it anyway
            entrance.quota.charge(key, usage, cost, model or record.model)
        else:
            entrance.quota.settle(key, admission, usage, cost)
        self.is_charged_live = True

    def charge(
        self,
        usage: Usage,
        model: str | None = None,
        *,
        service_tier: str | None = None,
        answered: str | None = None,
    ) -> None:
        """Charge one response's usage as it comes (a session may last an hour), priced as
        the model the session runs (its target's, else the request's), or `model` (a
        Realtime session's transcription model), at `service_tier` when a tier was said.
        `answered`: the model the provider says ran the response (a Live delegation's), priced
        first, as an HTTP answer's is (`Prices.cost`)."""
        entrance, record = self._entrance, self.record
        assert self.key is not None
        ran = model or record.target_model or record.model
        cost = entrance.prices.cost(
            record.provider, ran, usage, answered, service_tier=service_tier
        )
        entrance.quota.charge(self.key, usage, cost, ran)
        self.is_charged_live = True
        if cost is not None:
            self.live_cost_usd = (self.live_cost_usd or 0.0) + cost


async def _to_its_end(step: Coroutine[Any, Any, None]) -> None:
    """Run `step` to its end even when the handler is cancelled meanwhile (a client that
    closes its connection makes aiohttp cancel it: handler_cancellation), then let the
    cancellation go on: a claim that took deferred work also charges it."""
    task = asyncio.ensure_future(step)
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        await task
        raise


def _refused(error: GatewayError, request: web.Request, record: Record) -> web.Response:
    """The gateway's own error in the path's dialect, with the request id and, for a key
    with a cache, what the cache did (its answers say it: so do its errors)."""
    response = errors.render(error, request.path, record.request_id)
    if record.cache is not None:
        response.headers["x-llm-gateway-cache"] = record.cache.value
    if error.status == 408:  # a body that stopped arriving: the connection closes after
        response.force_close()  # the answer (RFC 9110 §15.5.9), once aiohttp's drain ends
    return response


def _closed(request: web.Request, status: int, is_abandoned: bool = False) -> web.Response:
    """Close a connection whose answer began, so the client sees it cut; the response is
    never sent.

    `is_abandoned`: the client left, or read nothing for STREAM_IDLE_TIMEOUT. What is still
    buffered for it will not be taken, and a close waits for it to go out first: a client
    whose socket stays open reading nothing (a hung app, a link gone without a FIN) held
    the connection and its buffer for ever. Its connection is dropped at once.

    Over HTTP/1.1 the cut shows (a chunked body without its last chunk, or short of its
    Content-Length). Over HTTP/1.0 a body of unknown length ends with the connection, so a
    close reads as a whole answer (nginx's defaults speak HTTP/1.0 to the gateway, and
    passed a broken stream on as complete): the connection is reset instead, as a reverse
    proxy does when its upstream breaks."""
    transport = request.transport
    if transport is not None:
        if is_abandoned:
            transport.abort()
        else:
            if request.version < HttpVersion11:
                reset_on_close(transport)
            transport.close()
    return web.Response(status=status)


def reset_on_close(transport: asyncio.BaseTransport) -> None:
    """The connection's close sends a reset, not a FIN (SO_LINGER on, 0 seconds): over
    HTTP/1.0 the one way to say an answer of unknown length was cut (`_closed`, and the
    shutdown's cut in runtime.server)."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_NONE)
