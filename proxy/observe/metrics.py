"""Prometheus collectors for the gateway, rendered as Prometheus text or the JSON summary.

Owns the `llm_gateway_*` series, fed by finished records and a few events (in-flight
requests, quota rejections, lost log lines, Redis error decisions), and their rendering:
Prometheus text (or OpenMetrics when asked; gzipped when the scrape takes it: `takes_gzip`),
or the seed's JSON summary (`summary`). It does not decide what a failure is
(`health.is_upstream_failure` does) nor when to observe (`relay`).

Labels stay bounded whatever clients send: `provider` comes from keys.json, `key` is the
key's name (never the key), and `model`, which clients choose, is cut to 64 characters and
has a value of its own for at most 100 models the provider answered (a status below 400)
and 20 more never answered as themselves (refused by the gateway or the provider, or replaced
by the `model` of the target that served them), per process; any other is `other`. Made-up
names, which the provider refuses or a target replaces, so never take the values of the models
it serves.

Each `Metrics` has its own `CollectorRegistry`, so tests can build many apps in one process.

In one process the series a request feeds are the event loop's own plain floats
(`series`: a lock and checks per change cost a request several microseconds); the rest, and
every series in multiprocess mode, are prometheus-client's. Both render the same text.

Multiprocess mode (WORKERS > 1): with `multiprocess_dir`, every worker writes its values to
mmap files there and `render` sums all workers (`worker_metrics` says how).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

import orjson
import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, multiprocess
from prometheus_client.exposition import choose_encoder, gzip_accepted

from proxy.observe.health import is_upstream_failure
from proxy.observe.series import LoopCounter, LoopGauge, LoopHistogram
from proxy.observe.summary import summary
from proxy.observe.worker_metrics import use_multiprocess_values, use_process_values
from proxy.record import Cached, Record

BREAKER_STATES = {"closed": 0, "half_open": 1, "open": 2}
NONE = "none"  # the label for a provider or model the request never got to
OTHER = "other"  # the label for models past MODEL_LABEL_VALUES (or MODEL_LABEL_UNANSWERED)
AUTH_OUTCOMES = ("refused", "throttled")
# What refuses a team's request (`limit_refused`): its windows, its budget, its slots.
TEAM_LIMITS = ("requests", "tokens", "budget", "in_flight")
# How a provider fails (`_failure_kind`): a 5xx answer, or an outcome in PROVIDER_FAILURES.
UPSTREAM_ERROR_KINDS = ("status", "unreachable", "timeout", "broken", "error_event")
MODEL_LABEL_CHARS = 64
MODEL_LABEL_VALUES = 100  # models the provider answered
MODEL_LABEL_UNANSWERED = 20  # models never answered: refused, by the provider or the gateway
# Exported at 0 from the start, because a series born at its first increment is invisible to
# rate() and increase(): the alerts on a short Redis loss or on one failed reload
# (deploy/prometheus/alerts.yml) would never fire.
REDIS_DECISIONS = ("allow", "deny", "uncharged", "uncached")
RELOAD_RESULTS = ("ok", "failed")
# Why a client connection was answered 503 and closed unserved (`connection_refused`).
REFUSAL_REASONS = ("max_connections", "open_files")

# LLM calls run from milliseconds (embeddings) to minutes (long reasoning streams).
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25)
TTFB_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    """The gateway's counters, histograms and gauges, and their two renderings."""

    def __init__(self, multiprocess_dir: str | None = None, cache_is_shared: bool = False) -> None:
        """`cache_is_shared`: the response cache lives in Redis, where every worker reads
        the same totals (else each worker's memory holds its own entries, summed)."""
        # No `_created` series: a start time per label set doubles the text and means nothing
        # to a dashboard. Process-wide in prometheus-client, and the same for every Metrics.
        prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]  # unannotated in prometheus-client
        self._registry = CollectorRegistry()
        owner: CollectorRegistry | None = self._registry
        if multiprocess_dir is None:
            use_process_values()
        else:
            use_multiprocess_values(multiprocess_dir)
            multiprocess.MultiProcessCollector(self._registry, path=multiprocess_dir)  # type: ignore[no-untyped-call]  # unannotated in prometheus-client
            owner = None  # values live in the files; the collector reads every worker's
        # The series a request feeds, in plain floats in one process (series.py: why); with
        # workers, prometheus-client's, whose values go to the shared files.
        self._is_multiprocess = multiprocess_dir is not None
        counter: Any = Counter if multiprocess_dir is not None else LoopCounter
        histogram: Any = Histogram if multiprocess_dir is not None else LoopHistogram
        gauge: Any = Gauge if multiprocess_dir is not None else LoopGauge
        self._models: set[str] = set()  # label values of models answered
        self._unanswered: set[str] = set()  # of models not answered when they took one
        # This process's own count, for the drain's line: the gauge may sum several workers.
        self.requests_in_flight = 0
        # Labelled children, looked up once: `labels()` validates and locks on every call,
        # and observe runs for every request. Bounded as the label values are.
        self._children: dict[tuple[Any, tuple[str, ...]], Any] = {}
        # The children a request's provider, model and status feed, found in one lookup.
        self._rows: dict[tuple[str, str, int], _Row] = {}

        self._requests = counter(
            "llm_gateway_requests",
            "Finished requests.",
            ["provider", "model", "status"],
            registry=owner,
        )
        self._duration = histogram(
            "llm_gateway_request_duration_seconds",
            "Time from request to last byte.",
            ["provider"],
            buckets=DURATION_BUCKETS,
            registry=owner,
        )
        self._ttfb = histogram(
            "llm_gateway_time_to_first_byte_seconds",
            "Time from request to the provider's first body byte.",
            ["provider"],
            buckets=TTFB_BUCKETS,
            registry=owner,
        )
        self._overhead = histogram(
            "llm_gateway_overhead_seconds",
            "The gateway's own time per request: its duration minus the time awaiting the provider.",
            ["provider"],
            buckets=OVERHEAD_BUCKETS,
            registry=owner,
        )
        self._prompt_tokens = counter(
            "llm_gateway_prompt_tokens",
            "Prompt tokens, reported or estimated.",
            ["provider", "model"],
            registry=owner,
        )
        self._completion_tokens = counter(
            "llm_gateway_completion_tokens",
            "Completion tokens, reported or estimated.",
            ["provider", "model"],
            registry=owner,
        )
        self._cost = counter(
            "llm_gateway_cost_usd",
            "What requests cost in USD, as priced by the gateway (estimated usage included).",
            ["provider", "model"],
            registry=owner,
        )
        self._unpriced = counter(
            "llm_gateway_unpriced_requests",
            "Requests with usage but no price for their model (cost_usd null).",
            ["provider", "model"],
            registry=owner,
        )
        self._quota_rejections = counter(
            "llm_gateway_quota_rejections",
            "Requests refused over quota, by key name.",
            ["key"],
            registry=owner,
        )
        self._limit_refusals = counter(
            "llm_gateway_limit_refusals",
            "Requests refused by a limit: the scope (key, team, model), the limit "
            "(requests, tokens, budget, in_flight), and the team's name from keys.json.",
            ["scope", "limit", "team"],
            registry=owner,
        )
        self._team_in_flight = gauge(
            "llm_gateway_team_requests_in_flight",
            "Requests holding a slot of a team's max_in_flight, in this gateway.",
            ["team"],
            registry=owner,
            multiprocess_mode="livesum",
        )
        self._upstream_errors = counter(
            "llm_gateway_upstream_errors",
            "Provider failures, by kind.",
            ["provider", "kind"],
            registry=owner,
        )
        self._in_flight = gauge(
            "llm_gateway_requests_in_flight",
            "Requests being served now.",
            registry=owner,
            multiprocess_mode="livesum",
        )
        self._log_write_errors = Counter(
            "llm_gateway_log_write_errors",
            "Interaction log lines that could not be written.",
            registry=owner,
        )
        self._log_lines_dropped = Counter(
            "llm_gateway_log_lines_dropped",
            "Interaction log lines dropped because the log's queue was full (a stuck sink).",
            registry=owner,
        )
        self._trace_spans_dropped = Counter(
            "llm_gateway_trace_spans_dropped",
            "Spans dropped: the export queue was full (a slow or hung collector), or the "
            "shutdown's time ran out before they were exported.",
            registry=owner,
        )
        self._trace_export_failures = Counter(
            "llm_gateway_trace_export_failures",
            "Span batches the trace collector did not take (unreachable, refused, timed out).",
            registry=owner,
        )
        self._redis_errors = Counter(
            "llm_gateway_redis_errors",
            "Requests decided without Redis, by decision.",
            ["decision"],
            registry=owner,
        )
        for decision in REDIS_DECISIONS:
            self._redis_errors.labels(decision)
        self._auth_failures = counter(
            "llm_gateway_auth_failures",
            "Failed authentications: refused (401, no or unknown key or token) or throttled "
            "(429, the client address failed too often).",
            ["outcome"],
            registry=owner,
        )
        for outcome in AUTH_OUTCOMES:
            self._auth_failures.labels(outcome)  # present at zero from the start
        self._reloads = Counter(
            "llm_gateway_config_reloads",
            "Reloads of the keys file, by result: ok, or failed (the previous keys stay).",
            ["result"],
            registry=owner,
        )
        for result in RELOAD_RESULTS:
            self._reloads.labels(result)
        self._connections_refused = Counter(
            "llm_gateway_connections_refused",
            "Client connections answered 503 and closed unserved, by reason: open_files (the "
            "connection took the process's last file descriptor: its limit on open files).",
            ["reason"],
            registry=owner,
        )
        for reason in REFUSAL_REASONS:
            self._connections_refused.labels(reason)
        self._retries = counter(
            "llm_gateway_retries",
            "Attempts repeated on the same target and key, by provider and the reason.",
            ["provider", "reason"],
            registry=owner,
        )
        self._failovers = counter(
            "llm_gateway_failovers",
            "Moves to another target or pool key before the first byte, by the provider left "
            "and the reason.",
            ["provider", "reason"],
            registry=owner,
        )
        self._choices = counter(
            "llm_gateway_choices",
            "Attempts by the target and the member chosen: a pool key by its label "
            "(openai#2), never the key.",
            ["target", "member"],
            registry=owner,
        )
        self._probes = Counter(
            "llm_gateway_probes",
            "Probes of targets whose breaker is open (GET models: nothing generated), by "
            "result: ok (the breaker closed), failed (open for another cooldown) or "
            "inconclusive (a 4xx: about the key or the path).",
            ["target", "result"],
            registry=owner,
        )
        self._breaker_state = Gauge(
            "llm_gateway_breaker_state",
            "Each target's circuit breaker: 0 closed, 1 half-open, 2 open (the worst of the workers).",
            ["target"],
            registry=owner,
            multiprocess_mode="livemax",
        )
        self._cache_hits = counter(
            "llm_gateway_cache_hits",
            "Requests answered from the response cache (never sent upstream).",
            ["provider", "model"],
            registry=owner,
        )
        self._cache_misses = counter(
            "llm_gateway_cache_misses",
            "Cacheable requests of keys with a cache that were not in it (sent upstream).",
            ["provider", "model"],
            registry=owner,
        )
        # With Redis every process reads the shared totals: the most recent is the answer;
        # in memory each worker holds its own entries: the sum of the live ones.
        cache_mode: Literal["mostrecent", "livesum"] = (
            "mostrecent" if cache_is_shared else "livesum"
        )
        self._cache_entries = Gauge(
            "llm_gateway_cache_entries",
            "Answers held by the response cache (in memory, or in Redis).",
            registry=owner,
            multiprocess_mode=cache_mode,
        )
        self._cache_bytes = Gauge(
            "llm_gateway_cache_bytes",
            "Bytes held by the response cache (in memory, or in Redis).",
            registry=owner,
            multiprocess_mode=cache_mode,
        )
        self._last_request = gauge(
            "llm_gateway_last_request_timestamp_seconds",
            "Unix time the last request ended.",
            registry=owner,
            multiprocess_mode="max",
        )

    def observe(self, record: Record) -> None:
        """Count one finished request: status, timings, tokens, upstream failure."""
        provider = record.provider or NONE
        # Answered as itself: a target that names its model answers any name with that one.
        as_sent = record.target_model is None or record.target_model == record.model
        model = self._model_label(record.model, record.status < 400 and as_sent)
        child = self._child
        row = self._rows.get((provider, model, record.status))
        if row is None:
            requests = child(self._requests, provider, model, str(record.status))
            row = self._rows[(provider, model, record.status)] = _Row(requests)
        row.requests.inc()
        # Each series is made at its first count, so it appears then, as it always has.
        if record.duration_ms is not None:
            if row.duration is None:
                row.duration = child(self._duration, provider)
            row.duration.observe(record.duration_ms / 1000.0)
        if record.ttft_ms is not None:  # the provider's first byte (a cache hit has none)
            if row.ttfb is None:
                row.ttfb = child(self._ttfb, provider)
            row.ttfb.observe(record.ttft_ms / 1000.0)
        overhead_ms = record.overhead_ms
        if overhead_ms is not None:
            if row.overhead is None:
                row.overhead = child(self._overhead, provider)
            row.overhead.observe(overhead_ms / 1000.0)
        usage = record.spent_usage  # a cache hit spent no tokens and no dollars
        if usage is not None:
            if row.prompt is None:
                row.prompt = child(self._prompt_tokens, provider, model)
                row.completion = child(self._completion_tokens, provider, model)
            row.prompt.inc(usage.prompt_tokens)
            row.completion.inc(usage.completion_tokens)
            if record.cost_usd is None:
                if row.unpriced is None:
                    row.unpriced = child(self._unpriced, provider, model)
                row.unpriced.inc()
            else:
                if row.cost is None:
                    row.cost = child(self._cost, provider, model)
                row.cost.inc(record.cost_usd)
        if record.cache is Cached.HIT:
            child(self._cache_hits, provider, model).inc()
        elif record.cache is Cached.MISS:
            child(self._cache_misses, provider, model).inc()
        if is_upstream_failure(record):
            self._child(self._upstream_errors, provider, _failure_kind(record)).inc()
        attempts = record.attempts
        for attempt in attempts:
            child(self._choices, attempt.target, attempt.key).inc()
        if len(attempts) > 1:
            for previous, current in zip(attempts, attempts[1:], strict=False):
                moved = previous.target != current.target or previous.key != current.key
                counter = self._failovers if moved else self._retries
                child(counter, previous.provider, previous.reason).inc()
        self._last_request.set(time.time())

    def know_providers(self, providers: Iterable[str]) -> None:
        """Export each provider's upstream error series at zero, before its first error.

        A counter that appears only with its first increment hides that increment from
        `rate()` and `increase()`; providers added by a reload appear on first error.
        """
        for provider in providers:
            for kind in UPSTREAM_ERROR_KINDS:
                self._child(self._upstream_errors, provider, kind)

    def probed(self, target: str, result: str) -> None:
        """A probe of `target`'s open breaker ended: "ok", "failed" or "inconclusive"."""
        self._child(self._probes, target, result).inc()

    def breaker_changed(self, target: str, state: str) -> None:
        """A target's breaker moved to `state` (closed, half_open, open)."""
        self._breaker_state.labels(target).set(BREAKER_STATES[state])

    def request_started(self) -> None:
        self.requests_in_flight += 1
        self._in_flight.inc()

    def request_ended(self) -> None:
        self.requests_in_flight -= 1
        self._in_flight.dec()

    def quota_rejected(self, key: str) -> None:
        """Count a 429 from the tracker; `key` is the key's name."""
        self._quota_rejections.labels(key).inc()

    def key_gone(self, key: str) -> None:
        """A key deleted (`key`: its name): its series go, as Prometheus expects of a subject
        that is gone. With workers the shared files keep what each worker counted: there
        its series stay until the gateway restarts."""
        if not self._is_multiprocess:  # prometheus-client cannot remove from the files
            self._quota_rejections.remove(key)

    def team_gone(self, team: str) -> None:
        """A team deleted (`team`: its name): its in-flight gauge and refusal series go, as a
        deleted key's; with workers they stay, as a key's do."""
        if self._is_multiprocess:
            return
        for limit in TEAM_LIMITS:
            self._limit_refusals.remove("team", limit, team)
            self._children.pop((self._limit_refusals, ("team", limit, team)), None)
        self._team_in_flight.remove(team)
        self._children.pop((self._team_in_flight, (team,)), None)

    def limit_refused(self, scope: str, limit: str, team: str = "") -> None:
        """Count a 429 of a shared limit (`team`: the team's name, "" for other scopes)."""
        self._child(self._limit_refusals, scope, limit, team).inc()

    def team_slots(self, team: str, change: int) -> None:
        """A request of `team` took (+1) or gave back (-1) one of its slots. A slot given back
        after its team was deleted (`team_gone`) leaves no series behind at -1."""
        if change < 0 and (self._team_in_flight, (team,)) not in self._children:
            return
        self._child(self._team_in_flight, team).inc(change)

    def auth_failed(self, outcome: str) -> None:
        """Count a failed authentication: "refused" (401) or "throttled" (429)."""
        self._auth_failures.labels(outcome).inc()

    def connection_refused(self, reason: str) -> None:
        """Count a client connection answered 503 unserved, by one of REFUSAL_REASONS."""
        self._connections_refused.labels(reason).inc()

    def log_write_failed(self) -> None:
        """Count a lost log line; thread-safe, the logbook calls it from its writer thread."""
        self._log_write_errors.inc()

    def log_line_dropped(self) -> None:
        """Count a log line the full queue had no room for (called on the event loop)."""
        self._log_lines_dropped.inc()

    def trace_spans_dropped(self, count: int) -> None:
        """Count spans lost before export; thread-safe."""
        self._trace_spans_dropped.inc(count)

    def trace_export_failed(self) -> None:
        """Count a span batch lost; thread-safe, the tracer's export thread calls it."""
        self._trace_export_failures.inc()

    def redis_error_decision(self, decision: str) -> None:
        """Count a decision made without Redis: a request let through ("allow"), refused
        ("deny"), or a finished response whose tokens could not be charged ("uncharged")."""
        self._redis_errors.labels(decision).inc()

    def cache_size(self, entries: int, size: int) -> None:
        """The response cache now holds `entries` answers of `size` bytes together."""
        self._cache_entries.set(entries)
        self._cache_bytes.set(size)

    def config_reloaded(self, is_ok: bool) -> None:
        self._reloads.labels("ok" if is_ok else "failed").inc()

    def render(self, accept: str) -> tuple[bytes, str]:
        """Body and Content-Type: the JSON summary if `accept` asks for JSON, else Prometheus."""
        if "application/json" in accept.lower():  # media types are case-blind (RFC 9110)
            return orjson.dumps(summary(self._registry.collect())), "application/json"
        encode, content_type = choose_encoder(accept)
        return encode(self._registry), content_type

    def _child(self, metric: Any, *labels: str) -> Any:
        """`metric.labels(*labels)`, cached."""
        key = (metric, labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found

    def _model_label(self, model: str | None, is_answered: bool) -> str:
        """The model as a bounded label value (clients can send any string). Models the
        provider answered by their own name (`is_answered`: a status below 400, and no
        target's model in their place) and those it did not take their values from two
        bounds, so names a client makes up (refused, or replaced) never use up the values of
        the models the provider serves."""
        if not model:
            return NONE
        label = model[:MODEL_LABEL_CHARS]
        if label in self._models or label in self._unanswered:
            return label
        if is_answered:
            held, bound = self._models, MODEL_LABEL_VALUES
        else:
            held, bound = self._unanswered, MODEL_LABEL_UNANSWERED
        if len(held) >= bound:
            return OTHER
        held.add(label)
        return label


def takes_gzip(accept_encoding: str) -> bool:
    """Whether a scrape takes the rendering gzipped: its Accept-Encoding read as
    prometheus-client's own exposition reads it (Prometheus asks for gzip on every scrape)."""
    return gzip_accepted(accept_encoding)


@dataclass(slots=True)
class _Row:
    """The children of one provider, model and status that most requests feed; None until
    the first count of each (a series appears with its first count)."""

    requests: Any
    duration: Any = None
    ttfb: Any = None
    overhead: Any = None
    prompt: Any = None
    completion: Any = None
    cost: Any = None
    unpriced: Any = None


def _failure_kind(record: Record) -> str:
    """How the provider failed: unreachable, timeout, broken mid-body, a 5xx status, or an
    error event inside its 200 answer."""
    if not record.upstream_failed:
        # it answered, with a 5xx, or with a 200 whose stream said it failed
        return "status" if record.failed_in_answer is None else "error_event"
    assert record.outcome is not None
    return record.outcome.value
