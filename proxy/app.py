"""build_app(settings): the one place the gateway's objects are created and wired.

Each concern is created once and stored under a typed `web.AppKey`; resources that open
and close (the upstream wire and WebSocket client, the logbook's writer, the tracker) each get one
`cleanup_ctx` generator, which aiohttp unwinds in reverse order at shutdown, after the
in-flight requests had their grace period: so the last log line is written after the
last request ended.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

import aiohttp
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from proxy import errors
from proxy.cache.cache import Cache, Others
from proxy.cache.memory_store import MemoryStore
from proxy.cache.store import Store
from proxy.endpoints.admin import Admin
from proxy.endpoints.admin_writes import AdminWrites
from proxy.endpoints.usage_report import UsageReport
from proxy.errors import GatewayError
from proxy.exchange import Entrance
from proxy.keys.credentials import presents_token
from proxy.keys.fields import Defaults
from proxy.keys.keys import KeyRing, read_file
from proxy.keys.lockout import Lockout
from proxy.keys.reload import KeysFile, Siblings
from proxy.keys.store import FileStore, KeyStore, Parse, decoded
from proxy.observe.health import Health
from proxy.observe.logbook import Logbook, rfc3339
from proxy.observe.metrics import Metrics, takes_gzip
from proxy.quota.memory_tracker import MemoryTracker
from proxy.quota.quota import Quota
from proxy.quota.tracker import Budget, Scope, Tracker
from proxy.realtime.realtime import Realtime, hide_browser_keys
from proxy.record import own_request_id
from proxy.relay.cors import Cors
from proxy.relay.dispatch import Dispatch, request_class, serve_through
from proxy.relay.expect import expect_handler
from proxy.relay.relay import Relay
from proxy.settings import Settings
from proxy.upstream.breaker import BreakerPolicy, Breakers
from proxy.upstream.egress import Egress
from proxy.upstream.failover import Failover, RetryPolicy
from proxy.upstream.probes import Probes
from proxy.upstream.wire import CONNECT_SECONDS, Wire
from proxy.usage.batch_charges import BatchCharges
from proxy.usage.pricing import Prices
from proxy.usage.usage import TapMemory

if TYPE_CHECKING:
    from proxy.observe.tracing import Tracing

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

SETTINGS = web.AppKey("settings", Settings)
KEY_RING = web.AppKey("key_ring", KeyRing)
QUOTA = web.AppKey("quota", Quota)
METRICS = web.AppKey("metrics", Metrics)
HEALTH = web.AppKey("health", Health)
LOGBOOK = web.AppKey("logbook", Logbook)
LOCKOUT = web.AppKey("lockout", Lockout)
PRICES = web.AppKey("prices", Prices)
TAP_MEMORY = web.AppKey("tap_memory", TapMemory)
KEYS_FILE = web.AppKey("keys_file", KeysFile)
REALTIME = web.AppKey("realtime", Realtime)
FAILOVER = web.AppKey("failover", Failover)
CACHE = web.AppKey("cache", Cache)
PROBES = web.AppKey("probes", Probes)
KEY_STORE: web.AppKey[KeyStore] = web.AppKey("key_store")
TRACING: web.AppKey[Tracing] = web.AppKey("tracing")  # set only when tracing is on

# A request head's bounds (aiohttp's own for the request line, 8 KiB): what an SDK sends and
# little more (runtime/server.py: why, and what answers a head past them).
MAX_HEADER_BYTES = 4096
MAX_HEADERS = 64

# At shutdown, the log writes what is queued for as long as its sink takes lines, within
# the grace (and runtime.server's bounded margin after it); a sink that takes none for
# LOG_FLUSH_SECONDS is stuck, and keeps its lines.
LOG_FLUSH_SECONDS = 0.5
TRACE_FLUSH_SECONDS = 0.5  # the same for the spans still queued for the trace collector

# The SDKs' own headers pass through as sent; aiohttp must not add its defaults
# (an Accept-Encoding the client never sent would hand it a body it cannot read).
_NO_DEFAULT_HEADERS = ("Accept", "Accept-Encoding", "User-Agent", "Content-Type")
# Why keys.json is not reloaded with KEYS_STORE=redis (SIGHUP, POST /admin/reload).
KEYS_IN_REDIS = (
    "KEYS_STORE=redis: the keys live in Redis; change them through /admin/keys "
    "(keys.json only seeds an empty store)"
)


class ClientFaults(logging.Filter):
    """Drop aiohttp's tracebacks for what clients did: unparsable HTTP, leaving mid-request.

    aiohttp already answered those (400, or nothing to a client that left); a traceback per
    bad request would let any client flood the gateway's log.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        fault = record.exc_info[1] if record.exc_info else None
        return not isinstance(fault, HttpProcessingError | ConnectionError)


def quiet_client_faults() -> None:
    """Install `ClientFaults` on aiohttp's server logger, once."""
    server_log = logging.getLogger("aiohttp.server")
    if not any(isinstance(existing, ClientFaults) for existing in server_log.filters):
        server_log.addFilter(ClientFaults())


def key_defaults(settings: Settings) -> Defaults:
    """What a key falls back to: this gateway's quota and budget settings."""
    return Defaults(
        quota_enabled=settings.quota_enabled,
        requests=settings.quota_limit,
        tokens=settings.quota_tokens,
        window_seconds=settings.quota_window_seconds,
        budget=None
        if settings.budget_usd is None
        else Budget(settings.budget_usd, settings.budget_window_seconds),
        budget_window_seconds=settings.budget_window_seconds,
        unshared_workers=settings.workers if settings.redis_url is None else 1,
        output_allowance=settings.output_allowance_tokens,
    )


def load_keys(
    settings: Settings, environ: Mapping[str, str], clock: Callable[[], float] = time.time
) -> KeyRing:
    """keys.json with this gateway's quota defaults. Raises KeysFileError."""
    return KeyRing.load(settings.keys_file_path, environ, key_defaults(settings), clock)


def parse_keys(
    settings: Settings,
    environ: Mapping[str, str],
    clock: Callable[[], float],
    document: dict[str, Any],
    digest: str,
) -> KeyRing:
    """A keys document the admin API made, checked as keys.json is. Raises KeysFileError.
    The Redis store's keys and teams that do not load are left out (the ring says why): an
    older version may have stored values this one refuses, mended through the admin API."""
    in_redis = settings.keys_store == "redis" and settings.redis_url is not None
    where = "key store" if in_redis else settings.keys_file_path
    return KeyRing.from_document(
        where, document, digest, environ, key_defaults(settings), clock, leave_out=in_redis
    )


class OtherWorkers(Siblings, Others, Protocol):
    """The other workers of this gateway (WORKERS > 1): told keys.json changes and cache drops."""


def build_app(
    settings: Settings,
    key_ring: KeyRing | None = None,
    metrics_dir: str | None = None,
    siblings: OtherWorkers | None = None,
    cache_clock: Callable[[], float] = time.monotonic,
    key_clock: Callable[[], float] = time.time,
) -> web.Application:
    """The gateway as an aiohttp application. Raises KeysFileError for a bad keys file.

    `metrics_dir`: where the workers of one gateway (WORKERS > 1) pool their metrics.
    `siblings`: the other workers (WORKERS > 1), made to reload keys.json with this one,
    and to drop what this one drops from its cache (entries in memory).
    `cache_clock`: what ages the in-memory cache's entries (tests step it).
    `key_clock`: Unix time, which ends a rotated key's grace (tests step it).
    """
    if key_ring is None:
        key_ring = load_keys(settings, os.environ, key_clock)
    quiet_client_faults()
    hide_browser_keys()
    app = web.Application(
        client_max_size=settings.max_body_bytes,
        # Request bodies stay as sent (a gzip upload goes up gzip); relay inflates only to peek.
        # Heads no larger than an SDK sends, so a connection holds little (server.py: why).
        handler_args={
            "auto_decompress": False,
            "max_field_size": MAX_HEADER_BYTES,
            "max_headers": MAX_HEADERS,
        },
    )
    metrics = Metrics(metrics_dir, cache_is_shared=settings.redis_url is not None)
    metrics.know_providers({*key_ring.key_counts(), *providers_of(key_ring).values()})
    targets = key_ring.targets()
    breakers = Breakers(targets, breaker_policy(settings), on_change=metrics.breaker_changed)
    health = Health(
        key_ring.key_counts(),
        breakers,
        providers_of(key_ring),
        tracker_backend="redis" if settings.redis_url else "memory",
        members=key_ring.members_report,
        recheck=lambda: app[QUOTA].recheck(),
    )
    app[SETTINGS] = settings
    app[KEY_RING] = key_ring
    app[METRICS] = metrics
    app[HEALTH] = health
    app[LOCKOUT] = lockout = Lockout(
        settings.auth_failure_limit,
        settings.auth_failure_window_seconds,
        metrics.auth_failed,
        trusted_proxies=settings.trusted_proxies or (),
    )
    app[PRICES] = Prices.load(settings.prices_file)  # checked at start by gateway.py
    app[TAP_MEMORY] = TapMemory()  # what the usage taps of this process hold, together

    def tracker_lost(decision: str, error: str) -> None:
        metrics.redis_error_decision(decision)
        health.tracker_degraded = error

    def tracker_back() -> None:
        health.tracker_degraded = None

    def keys_reloaded(error: str | None) -> None:
        metrics.config_reloaded(error is None)
        health.reload_failed = (
            None if error is None else {"reason": error, "at": rfc3339(time.time())}
        )
        if error is None:
            breakers.keep_only(key_ring.targets().keys())
            health.count_keys(key_ring.key_counts(), providers_of(key_ring))
            health.config = app[KEYS_FILE].config

    def keys_gone(scopes: tuple[Scope, ...]) -> None:
        # Deleted (admin API, keys.json, the Redis store): nothing reads them again.
        app[QUOTA].forget(scopes)
        app[CACHE].forget(scope.id for scope in scopes if scope.kind == "key")
        for scope in scopes:
            if scope.kind == "key":
                metrics.key_gone(scope.name)
            elif scope.kind == "team":
                metrics.team_gone(scope.name)

    in_redis = settings.keys_store == "redis"
    app[KEYS_FILE] = KeysFile(
        settings.keys_file_path,
        key_ring,
        functools.partial(load_keys, settings, os.environ, key_clock),
        on_reload=keys_reloaded,
        is_watched=settings.keys_file_watch and not in_redis,
        on_sighup=lambda: app[LOGBOOK].reopen(),  # logrotate's signal: the log follows its path
        # With the keys in Redis, keys.json only seeds an empty store: it is not reloaded.
        kept_elsewhere=KEYS_IN_REDIS if in_redis else None,
        siblings=siblings,
        on_gone=keys_gone,
    )
    health.config = app[KEYS_FILE].config
    app[QUOTA] = Quota(
        new_tracker(settings),
        deny_when_lost=settings.quota_on_redis_error == "deny",
        on_tracker_lost=tracker_lost,
        on_tracker_back=tracker_back,
        on_refused=lambda scope, limit: metrics.limit_refused(
            scope.kind, limit, scope.name if scope.kind == "team" else ""
        ),
        on_slots=lambda scope, change: (
            metrics.team_slots(scope.name, change) if scope.kind == "team" else None
        ),
        price=app[PRICES].cost,  # to price a budget's reservations
    )
    app[LOGBOOK] = Logbook(
        settings.log_file_path if settings.log_to_file else None,
        settings.log_bodies,
        on_write_error=metrics.log_write_failed,
        on_dropped=metrics.log_line_dropped,
        secrets=lambda: app[KEY_RING].real_keys(),  # the current file's, after a reload too
        keys_in=lambda words: app[KEY_RING].secrets_in(words),
    )
    if settings.is_tracing_on:
        from proxy.observe.tracing import (
            Tracing,  # the OpenTelemetry SDK loads only when it is used
        )

        app[TRACING] = Tracing(
            settings.otel,
            on_export_failure=metrics.trace_export_failed,
            on_dropped=metrics.trace_spans_dropped,
        )
        app.cleanup_ctx.append(_tracing)
    app[REALTIME] = Realtime(settings, breakers, on_out_of_files=health.ran_out_of_files)
    app.on_shutdown.append(app[REALTIME].shut)  # open WebSocket sessions end with 1001
    app[FAILOVER] = Failover(
        retry_policy(settings),
        breakers,
        settings.max_body_bytes,
        on_out_of_files=health.ran_out_of_files,
    )
    app[CACHE] = new_cache(settings, metrics, cache_clock, siblings)
    app[PROBES] = Probes(
        breakers=breakers,
        targets=key_ring.every_target,  # the keys in force, after a reload too
        interval_seconds=settings.probe_interval_seconds,
        timeout_seconds=settings.request_timeout,
        on_probed=metrics.probed,
    )
    # Every proxied request, HTTP or WebSocket, enters through one exchange.
    entrance = Entrance(
        key_ring=key_ring,
        keys=app[KEYS_FILE],
        lockout=lockout,
        quota=app[QUOTA],
        prices=app[PRICES],
        breakers=breakers,
        metrics=metrics,
        logbook=app[LOGBOOK],
        http=Relay(settings, app[FAILOVER], app[TAP_MEMORY]),
        websocket=app[REALTIME],
        batches=BatchCharges(
            quota=app[QUOTA],
            prices=app[PRICES],
            failover=app[FAILOVER],
            keys=key_ring,
            idle_seconds=settings.stream_idle_timeout,
        ),
        cache=app[CACHE],
        tracing=app.get(TRACING),
    )
    app.cleanup_ctx.append(_upstream)
    app.cleanup_ctx.append(_logbook)
    app.cleanup_ctx.append(_quota)
    if in_redis:  # the keys in Redis first: a store that cannot be read stops the start
        app.cleanup_ctx.append(_redis_keys)
    app.cleanup_ctx.append(_keys_file)
    app.cleanup_ctx.append(_cache)
    app.on_shutdown.append(_not_ready)
    app.router.add_get("/health", with_request_id(app[HEALTH].handle_health))
    app.router.add_get("/ready", with_request_id(app[HEALTH].handle_ready))
    # With a token, guessing it counts as failed authentications; without, /metrics is open.
    metrics_handler = lockout.guarded(_metrics) if settings.metrics_token else _metrics
    app.router.add_get("/metrics", with_request_id(metrics_handler))
    usage_report = UsageReport(key_ring, app[QUOTA], app[CACHE], app[KEYS_FILE])
    app.router.add_get("/usage", with_request_id(lockout.guarded(usage_report.handle_usage)))
    parse = functools.partial(parse_keys, settings, os.environ, key_clock)
    app[KEY_STORE] = new_key_store(settings, app[KEYS_FILE], parse, siblings, key_clock)
    writes = None
    if settings.admin_token is not None:
        writes = AdminWrites(app[KEY_STORE], settings.admin_token, app[LOGBOOK].audit, key_clock)
    admin = Admin(
        settings.admin_token,
        key_ring,
        app[QUOTA],
        app[KEYS_FILE],
        siblings,
        app[CACHE],
        writes,
    )
    admin.add_routes(app.router, lambda handler: with_request_id(lockout.guarded(handler)))
    cors = None
    if settings.cors_allowed_origins:
        cors = Cors(settings.cors_allowed_origins, settings.cors_allow_credentials)
        app.middlewares.append(cors.preflight)  # the own endpoints' preflights
    expect = expect_handler(key_ring, lockout, app[QUOTA], settings.max_body_bytes)
    # The proxied paths skip the router (relay.dispatch); it still routes what an own
    # endpoint's path with another method falls through to.
    dispatch = Dispatch(
        app.router, routed=app._handle, proxied=entrance.handle, expect=expect, cors=cors
    )
    # (?s): a path with %0a is still proxied, and refused by the exchange in the dialect, logged.
    app.router.add_route("*", "/{tail:(?s:.*)}", entrance.handle, expect_handler=expect)
    serve_through(app, dispatch, request_class(cors))
    return app


def providers_of(key_ring: KeyRing) -> dict[str, str]:
    """Target name → its provider's name, for /health."""
    return {name: target.provider.name for name, target in key_ring.targets().items()}


def retry_policy(settings: Settings) -> RetryPolicy:
    return RetryPolicy(
        attempts=settings.retry_attempts,
        max_wait_seconds=settings.retry_max_wait_seconds,
        deadline_seconds=settings.retry_deadline_seconds,
        request_timeout=settings.request_timeout,
    )


def breaker_policy(settings: Settings) -> BreakerPolicy:
    return BreakerPolicy(
        failures_in_a_row=settings.breaker_failures,
        error_ratio=settings.breaker_error_ratio,
        min_requests=settings.breaker_min_requests,
        window_seconds=settings.breaker_window_seconds,
        cooldown_seconds=settings.breaker_cooldown_seconds,
    )


def new_tracker(settings: Settings) -> Tracker:
    """Redis when REDIS_URL is set (shared by every process), else in this process's memory."""
    if settings.redis_url is None:
        return MemoryTracker()
    from proxy.quota.redis_tracker import RedisTracker

    return RedisTracker(settings.redis_url)


def new_key_store(
    settings: Settings,
    keys_file: KeysFile,
    parse: Parse,
    siblings: Siblings | None,
    clock: Callable[[], float],
) -> KeyStore:
    """keys.json itself (KEYS_STORE=file), or Redis shared by every instance."""
    if settings.keys_store == "file" or settings.redis_url is None:
        return FileStore(keys_file, parse, siblings, clock)
    from proxy.keys.redis_store import RedisStore

    return RedisStore(
        settings.redis_url,
        settings.keys_store_secret or "",
        parse,
        lambda fresh: keys_file.apply(fresh, "key store"),
        clock,
        keys_file.refused,
    )


async def _redis_keys(app: web.Application) -> AsyncIterator[None]:
    from proxy.keys.redis_store import RedisStore

    store = app[KEY_STORE]
    assert isinstance(store, RedisStore)
    path = app[SETTINGS].keys_file_path
    seed = decoded(path, read_file(path))
    async with store.running(seed):
        yield


def new_cache(
    settings: Settings,
    metrics: Metrics,
    clock: Callable[[], float],
    siblings: Others | None = None,
) -> Cache:
    """Entries in Redis when REDIS_URL is set (shared by every process), else in memory
    (each worker's own: its drops are told to the other workers, `siblings`)."""
    store: Store
    others = None
    if settings.redis_url is None:
        others = siblings
        store = MemoryStore(settings.cache_max_bytes, clock)
    else:
        from proxy.cache.redis_store import RedisStore

        store = RedisStore(settings.redis_url)
        clock = time.time  # every instance reads an entry's age
    return Cache(
        store,
        is_shared=settings.redis_url is not None,
        max_entry_bytes=settings.cache_max_entry_bytes,
        # A request waits for an identical one in flight as long as it would for headers.
        wait_seconds=settings.request_timeout,
        on_store_lost=lambda error: metrics.redis_error_decision("uncached"),
        on_size=metrics.cache_size,
        clock=clock,
        others=others,
    )


def with_request_id(handler: Handler) -> Handler:
    """The gateway's own endpoints answer with an x-request-id too (relay sets its own)."""

    @functools.wraps(handler)
    async def answer(request: web.Request) -> web.StreamResponse:
        response = await handler(request)
        response.headers["x-request-id"] = own_request_id(request.headers.get("x-request-id"))
        return response

    return answer


async def _upstream(app: web.Application) -> AsyncIterator[None]:
    """The wire for HTTP requests and probes, and aiohttp's client for WebSocket sessions."""
    settings = app[SETTINGS]
    # HTTPS_PROXY, HTTP_PROXY, NO_PROXY (read once, with the settings): the same proxies for
    # the wire and WebSocket sessions. None when no proxy is set: nothing is checked.
    egress = Egress.of(settings.proxies)
    wire = Wire(connect_timeout=min(settings.request_timeout, CONNECT_SECONDS), egress=egress)
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, keepalive_timeout=30),
        auto_decompress=False,  # frames pass as received
        cookie_jar=aiohttp.DummyCookieJar(),  # a proxy keeps no provider cookies
        skip_auto_headers=_NO_DEFAULT_HEADERS,
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=settings.request_timeout),
    )
    app[FAILOVER].use(wire)
    app[REALTIME].use(session, egress)
    # Probes of open breakers (PROBE_INTERVAL_SECONDS > 0) go out on the same wire, and stop
    # (a probe in flight cancelled) before it closes.
    async with app[PROBES].running(wire):
        yield
    await wire.close()
    await session.close()


async def _tracing(app: web.Application) -> AsyncIterator[None]:
    yield
    # After the last request, so its spans are exported too; within the shutdown's margin.
    await app[TRACING].close(TRACE_FLUSH_SECONDS)


async def _logbook(app: web.Application) -> AsyncIterator[None]:
    app[LOGBOOK].open()
    yield
    grace = max(app[SETTINGS].shutdown_grace_seconds, LOG_FLUSH_SECONDS)  # a grace of 0 too
    await app[LOGBOOK].close(grace, stall_seconds=LOG_FLUSH_SECONDS)


async def _cache(app: web.Application) -> AsyncIterator[None]:
    async with app[CACHE].running():  # with workers: the drops the others tell
        yield
    await app[CACHE].close()  # answers still being stored reach the store first


async def _quota(app: web.Application) -> AsyncIterator[None]:
    yield
    await app[QUOTA].close()


async def _keys_file(app: web.Application) -> AsyncIterator[None]:
    async with app[KEYS_FILE].running():
        yield


async def _not_ready(app: web.Application) -> None:
    app[HEALTH].shutting_down = True


async def _metrics(request: web.Request) -> web.Response:
    token = request.app[SETTINGS].metrics_token
    if token is not None and not presents_token(request.headers, token):
        # The series name keys and models: with METRICS_TOKEN set, only its holder reads them.
        error = GatewayError(
            401, "invalid_metrics_token", "/metrics needs 'Authorization: Bearer <METRICS_TOKEN>'."
        )
        return errors.render(error, request.path)
    request.app[FAILOVER].breakers.cool()  # the breaker-state gauge: cooldowns that ended
    body, content_type = request.app[METRICS].render(request.headers.get("accept", ""))
    response = web.Response(body=body, headers={"content-type": content_type})
    if takes_gzip(request.headers.get("accept-encoding", "")):
        # As prometheus-client's own exposition answers a scrape; aiohttp compresses a body
        # over 4 KiB in a thread, off the event loop.
        response.enable_compression(web.ContentCoding.gzip)
    return response
