"""Traces: a server span per request and a client span per upstream attempt, over OTLP/HTTP.

Off unless the OpenTelemetry SDK's own variables turn it on (`Settings.is_tracing_on`:
`OTEL_EXPORTER_OTLP_ENDPOINT`, `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` or
`OTEL_TRACES_EXPORTER=otlp`). The app imports this module, and with it the SDK, only then;
with tracing off the relay pays one `if` at each of its three points and nothing else.

The three points: `Tracing.begin` (the request arrived: a server span, continuing the
client's `traceparent`/`tracestate` when it sent them), `Trace.attempt` (one upstream try:
a client span whose context replaces `traceparent`/`tracestate` in the upstream headers, so
the provider sees the attempt as its parent), `Trace.end` (the request settled: after a
stream's last byte, so the server span lasts as long as the stream). Attributes follow the
GenAI semantic conventions, plus `llm_gateway.request_id` and `llm_gateway.key` (the key's
name); never a message, a prompt, a key, or a query string.

Export runs off the request path: the SDK's `BatchSpanProcessor` queues finished spans and
its own thread sends them. A collector that is down costs requests nothing: the batch is
dropped after the exporter's bounded retries, and `on_export_failure` counts it (a metric).
A collector that hangs holds each export for the exporter's timeout (OTEL_EXPORTER_OTLP_
TIMEOUT); meanwhile the queue (OTEL_BSP_MAX_QUEUE_SIZE) fills and the spans it has no room
for are dropped and counted (`on_dropped`). `close` is bounded too: what is not exported
within its timeout is counted dropped, and the SDK's own exit hook (which waited up to
30 s for a hung collector) is not installed.

Where the OTEL_* values come from: the variables the gateway reads itself (endpoints,
headers, timeout, compression, service name, resource attributes, sampler, batch sizes) are
taken from `Settings.otel`, the environment the settings were read from, so a test passes a
dict as for every setting and one start-time check names a bad value. The SDK still reads
the variables the gateway does not pass (certificates, credential providers) from the
process environment itself; in a running gateway the two are one environment.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from urllib.parse import unquote

from aiohttp import web
from multidict import CIMultiDict
from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.http import Compression
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider, sampling
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer, set_span_in_context
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.re import parse_env_headers
from yarl import URL

from proxy.observe.quiet import quiet
from proxy.record import Attempt, Outcome, Record

SERVICE_NAME = "llm-gateway"
# Our provider names as the GenAI conventions' gen_ai.provider.name; others pass as named.
_PROVIDER_NAMES = {
    "gemini": "gcp.gemini",
    "azure": "azure.ai.openai",
    "bedrock": "aws.bedrock",
    "vertex": "gcp.vertex_ai",
}
# The last path segments of each operation (any API version or prefix before them).
_OPERATIONS = (
    ("chat/completions", "chat"),
    ("messages", "chat"),
    ("responses", "chat"),
    ("completions", "text_completion"),
    ("embeddings", "embeddings"),
    ("realtime", "chat"),
    ("converse", "chat"),  # Bedrock's Converse API
    ("converse-stream", "chat"),
)
# The native Google APIs name the method after a colon: models/<model>:generateContent.
_METHODS = {
    "generateContent": "generate_content",
    "streamGenerateContent": "generate_content",
    "embedContent": "embeddings",
    "batchEmbedContents": "embeddings",
    "rawPredict": "chat",  # a partner model on Vertex (Claude's messages)
    "streamRawPredict": "chat",
}
_PROPAGATOR = TraceContextTextMapPropagator()
DEFAULT_QUEUE_SIZE = 2048  # the SDK's OTEL_BSP_MAX_QUEUE_SIZE
CLOSE_POLL_SECONDS = 0.01


class Tracing:
    """The SDK's tracer provider: one OTLP/HTTP exporter behind a batch processor."""

    def __init__(
        self,
        otel: Mapping[str, str],
        on_export_failure: Callable[[], None],
        on_dropped: Callable[[int], None] = lambda count: None,
    ) -> None:
        exporter = OTLPSpanExporter(
            endpoint=_endpoint(otel),
            headers=parse_env_headers(_either(otel, "HEADERS") or "", liberal=True),
            timeout=float(_either(otel, "TIMEOUT") or 10),
            compression=Compression((_either(otel, "COMPRESSION") or "none").lower()),
        )
        self._provider = TracerProvider(
            sampler=_sampler(otel),
            resource=Resource.create(_resource(otel)),
            shutdown_on_exit=False,  # `close` shuts it down, bounded; atexit would wait 30 s
        )
        counted = CountedExporter(exporter, on_export_failure)
        batches = BatchSpanProcessor(
            counted,
            max_queue_size=_number(otel, "OTEL_BSP_MAX_QUEUE_SIZE"),
            schedule_delay_millis=_number(otel, "OTEL_BSP_SCHEDULE_DELAY"),
            max_export_batch_size=_number(otel, "OTEL_BSP_MAX_EXPORT_BATCH_SIZE"),
            export_timeout_millis=_number(otel, "OTEL_BSP_EXPORT_TIMEOUT"),
        )
        queue_size = _number(otel, "OTEL_BSP_MAX_QUEUE_SIZE") or DEFAULT_QUEUE_SIZE
        self._queue = QueueWatch(batches, counted, queue_size, on_dropped)
        self._provider.add_span_processor(self._queue)
        self._tracer = self._provider.get_tracer("llm_gateway")
        quiet("opentelemetry")  # a collector that is down: one line a minute, not one a batch

    def begin(self, request: web.Request) -> Trace:
        """The request's server span, a child of the client's trace when it sent one."""
        parent = _PROPAGATOR.extract(request.headers)
        span = self._tracer.start_span(request.method, parent, SpanKind.SERVER)
        return Trace(self._tracer, span)

    async def flush(self) -> None:
        """Export every finished span now (the batch processor's thread does the work)."""
        await asyncio.to_thread(self._provider.force_flush)

    async def close(self, timeout_seconds: float = 10.0) -> None:
        """Export what is queued, then stop; after `timeout_seconds`, count the rest dropped.

        The shutdown runs in a daemon thread of its own, polled rather than awaited in an
        executor: a collector that hangs must not leave a thread the interpreter waits for.
        """
        stopping = threading.Thread(target=self._provider.shutdown, name="tracing", daemon=True)
        stopping.start()
        deadline = time.monotonic() + timeout_seconds
        while stopping.is_alive() and time.monotonic() < deadline:
            await asyncio.sleep(CLOSE_POLL_SECONDS)
        if stopping.is_alive():
            self._queue.give_up()


class Trace:
    """One request's spans: the server span and one client span per upstream attempt."""

    __slots__ = ("_attempts", "_context", "_named", "_server", "_tracer")

    def __init__(self, tracer: Tracer, server: Span) -> None:
        self._tracer = tracer
        self._server = server
        self._context = set_span_in_context(server)
        self._attempts: list[Span] = []
        # Each attempt's operation, model and method, for `hide`.
        self._named: list[tuple[str | None, str | None, str]] = []

    def attempt(
        self, method: str, url: URL, headers: CIMultiDict[str], provider: str, model: str | None
    ) -> None:
        """A client span for one try; its context goes upstream in `headers`."""
        operation = operation_name(url.path)
        attributes: dict[str, str | int] = {
            "gen_ai.provider.name": provider_name(provider),
            "server.address": url.host or "",
            "server.port": url.port or 443,
        }
        if operation is not None:
            attributes["gen_ai.operation.name"] = operation
        if model is not None:
            attributes["gen_ai.request.model"] = model
        span = self._tracer.start_span(
            _span_name(operation, model, method), self._context, SpanKind.CLIENT, attributes
        )
        self._attempts.append(span)
        self._named.append((operation, model, method))
        _PROPAGATOR.inject(headers, set_span_in_context(span, Context()))

    def hide(self, secret: str, mask: str) -> None:
        """`secret` (the client's own key, named as its model) kept only as `mask` in the
        attempts' names and models, as `Record.hide` keeps it in the server span's."""
        for span, (operation, model, method) in zip(self._attempts, self._named, strict=True):
            if model is not None and secret in model:
                model = model.replace(secret, mask)
                span.set_attribute("gen_ai.request.model", model)
                span.update_name(_span_name(operation, model, method))

    def end(self, record: Record) -> None:
        """The request settled: end its attempts, then its server span."""
        if not self._server.is_recording():  # sampled out: its spans are no-ops, all of them
            return
        last = len(self._attempts) - 1
        for index, span in enumerate(self._attempts):
            # record.attempts has one entry per try that got an answer, failed, or was left
            # (the client's leaving, the shutdown's cut); a WebSocket upgrade's try has none.
            attempt = record.attempts[index] if index < len(record.attempts) else None
            status = attempt.status if attempt is not None else None
            if attempt is None and index == last and record.outcome is Outcome.ANSWERED:
                status = record.status  # a try that records no Attempt (a WebSocket upgrade)
            if status is not None:
                span.set_attribute("http.response.status_code", status)
            failure = _attempt_failure(attempt, record if index == last else None)
            if failure is not None:
                span.set_attribute("error.type", failure)
                span.set_status(Status(StatusCode.ERROR))
            if index == last or attempt is None or not span.is_recording():
                span.end()  # the last try lasts until its body ended: now
            else:  # an earlier try ended when it failed, or when its answer was put aside
                span.end(span.start_time + int(attempt.ms * 1e6))  # type: ignore[attr-defined]
        server = self._server
        operation = operation_name(record.path)
        server.update_name(_span_name(operation, record.model, record.method))
        server.set_attributes(server_attributes(record, operation))
        if record.status >= 500 or record.upstream_failed or _answer_error(record) is not None:
            server.set_status(Status(StatusCode.ERROR))
        server.end()


def _attempt_failure(attempt: Attempt | None, record: Record | None) -> str | None:
    """error.type of one try: its status from 400 up (or the one a 200 stream's first-event
    error stood for), how it failed, how its body broke, or the error its answer carried.

    `record` is given for the last try only: its body's fate is the request's.
    """
    if attempt is None:  # a WebSocket upgrade's only try
        if record is None or record.outcome in (None, Outcome.CLIENT_LEFT):
            return Outcome.CLIENT_LEFT.value
        if record.status >= 400:
            return str(record.status)
        return None if record.outcome is Outcome.ANSWERED else record.outcome.value
    if attempt.status is None:
        return attempt.outcome.value  # unreachable, timeout
    if attempt.stood_for is not None:  # a 200 stream whose first event was an error
        return str(attempt.stood_for)
    if attempt.status >= 400:
        return str(attempt.status)
    if record is not None and record.outcome in (Outcome.BROKEN, Outcome.TIMEOUT):
        return record.outcome.value  # answered, then cut or silent mid-body
    return None if record is None else _answer_error(record)


def _answer_error(record: Record) -> str | None:
    """The type of the error the provider's answer (below 400) carried: a stream's error
    event after its start (overloaded_error); None when it carried none."""
    return record.answer_error_kind if record.status < 400 else None


def server_attributes(record: Record, operation: str | None) -> dict[str, str | int]:
    """The server span's attributes: GenAI conventions, HTTP, the request id, the key's name
    and what the response cache did."""
    attributes: dict[str, str | int] = {
        "http.request.method": record.method,
        "url.path": record.path,
        "llm_gateway.request_id": record.request_id,
    }
    if record.status:
        attributes["http.response.status_code"] = record.status
    if record.key is not None:
        attributes["llm_gateway.key"] = record.key
    if record.provider is not None:
        attributes["gen_ai.provider.name"] = provider_name(record.provider)
    if operation is not None:
        attributes["gen_ai.operation.name"] = operation
    if record.model is not None:
        attributes["gen_ai.request.model"] = record.model
    if record.response_model is not None:
        attributes["gen_ai.response.model"] = record.response_model
    if record.cache is not None:
        attributes["llm_gateway.cache"] = record.cache.value
    usage = record.spent_usage  # none for a cache hit: the request that stored it spent it
    if usage is not None:
        attributes["gen_ai.usage.input_tokens"] = usage.prompt_tokens
        attributes["gen_ai.usage.output_tokens"] = usage.completion_tokens
        if usage.cache_read_tokens:  # parts of input_tokens, each at its own price
            attributes["gen_ai.usage.cache_read.input_tokens"] = usage.cache_read_tokens
        if usage.cache_write_tokens:
            attributes["gen_ai.usage.cache_creation.input_tokens"] = usage.cache_write_tokens
    if record.status >= 400:
        attributes["error.type"] = str(record.status)
    elif record.upstream_failed:  # answered, then the body broke or fell silent
        attributes["error.type"] = record.outcome.value  # type: ignore[union-attr]
    elif (kind := _answer_error(record)) is not None:  # answered, then sent its error
        attributes["error.type"] = kind
    return attributes


def provider_name(provider: str) -> str:
    return _PROVIDER_NAMES.get(provider, provider)


def operation_name(path: str) -> str | None:
    """The GenAI operation a path names: chat, text_completion, embeddings, generate_content;
    None for others."""
    path = path.rstrip("/")
    last = path.rpartition("/")[2]
    if ":" in last:
        return _METHODS.get(last.rpartition(":")[2])
    for suffix, operation in _OPERATIONS:
        if path.endswith(suffix) and path[: -len(suffix)].endswith("/"):
            return operation
    return None


def _span_name(operation: str | None, model: str | None, method: str) -> str:
    """'{operation} {model}' as the GenAI conventions name spans; the method otherwise."""
    if operation is None:
        return method
    return f"{operation} {model}" if model else operation


class QueueWatch(SpanProcessor):
    """The batch processor, with the spans its full queue drops counted.

    The SDK drops a span when its queue is full and counts it only in its own meter. Here
    the spans handed over (on the loop) and taken for export (on the batch thread) are two
    counters, each with one writer: their difference is the queue, and a span ended while
    it is full is one dropped.
    """

    def __init__(
        self,
        batches: BatchSpanProcessor,
        counted: CountedExporter,
        queue_size: int,
        on_dropped: Callable[[int], None],
    ) -> None:
        self._batches, self._counted = batches, counted
        self._queue_size = queue_size
        self._on_dropped = on_dropped
        self._handed = 0

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        self._batches.on_start(span, parent_context)  # type: ignore[arg-type]

    def on_end(self, span: ReadableSpan) -> None:
        if not span.context or not span.context.trace_flags.sampled:
            return  # not sampled: the batch processor does not queue it either
        if self._handed - self._counted.taken >= self._queue_size:
            self._on_dropped(1)
        else:
            self._handed += 1
        self._batches.on_end(span)

    def give_up(self) -> None:
        """Count what is still queued as dropped: the shutdown's time ran out."""
        left = self._handed - self._counted.taken
        if left > 0:
            self._handed -= left
            self._on_dropped(left)

    def shutdown(self) -> None:
        self._batches.shutdown()  # type: ignore[no-untyped-call]

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._batches.force_flush(timeout_millis)


class CountedExporter(SpanExporter):
    """The OTLP exporter with each failed export counted: a lost collector shows as a metric."""

    def __init__(self, exporter: SpanExporter, on_failure: Callable[[], None]) -> None:
        self._exporter = exporter
        self._on_failure = on_failure  # called on the batch processor's thread
        self.taken = 0  # spans taken from the queue to be exported (the batch thread's count)

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.taken += len(spans)
        try:
            result = self._exporter.export(spans)
        except Exception:
            self._on_failure()
            raise  # the batch processor logs it and goes on with the next batch
        if result is not SpanExportResult.SUCCESS:
            self._on_failure()
        return result

    def shutdown(self) -> None:
        self._exporter.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._exporter.force_flush(timeout_millis)


def _either(otel: Mapping[str, str], suffix: str) -> str | None:
    """OTEL_EXPORTER_OTLP_TRACES_<suffix>, else OTEL_EXPORTER_OTLP_<suffix> (the SDK's order)."""
    return otel.get(f"OTEL_EXPORTER_OTLP_TRACES_{suffix}") or otel.get(
        f"OTEL_EXPORTER_OTLP_{suffix}"
    )


def _endpoint(otel: Mapping[str, str]) -> str:
    """The traces URL: the traces endpoint as given, else the base endpoint + /v1/traces."""
    if "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT" in otel:
        return otel["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"]
    base = otel.get("OTEL_EXPORTER_OTLP_ENDPOINT", "http://localhost:4318")
    return f"{base.rstrip('/')}/v1/traces"


def _number(otel: Mapping[str, str], name: str) -> int | None:
    """A positive number (checked at start by Settings); None leaves the SDK's default."""
    return int(float(otel[name])) if name in otel else None


def _sampler(otel: Mapping[str, str]) -> sampling.Sampler:
    name = otel.get("OTEL_TRACES_SAMPLER", "parentbased_always_on").lower()
    ratio = float(otel.get("OTEL_TRACES_SAMPLER_ARG", "1.0"))
    root = {
        "always_on": sampling.ALWAYS_ON,
        "always_off": sampling.ALWAYS_OFF,
        "traceidratio": sampling.TraceIdRatioBased(ratio),
    }[name.removeprefix("parentbased_")]
    return sampling.ParentBased(root) if name.startswith("parentbased_") else root


def _resource(otel: Mapping[str, str]) -> dict[str, str]:
    """service.name and OTEL_RESOURCE_ATTRIBUTES (k=v,k2=v2, percent-encoded values)."""
    attributes: dict[str, str] = {}
    for pair in otel.get("OTEL_RESOURCE_ATTRIBUTES", "").split(","):
        name, is_pair, value = pair.partition("=")
        if is_pair and name.strip():
            attributes[name.strip()] = unquote(value.strip())
    attributes["service.name"] = otel.get(
        "OTEL_SERVICE_NAME", attributes.get("service.name", SERVICE_NAME)
    )
    return attributes
