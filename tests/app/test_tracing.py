"""Traces: what a real gateway exports to an in-process OTLP/HTTP receiver, decoded."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from multidict import CIMultiDict

from proxy.app import KEY_RING, TRACING, build_app
from proxy.observe.tracing import operation_name, provider_name
from proxy.settings import SettingError, Settings
from proxy.usage.usage import UsageTap
from tests.app.test_cache import cached_keys, make_cached, post  # noqa: F401 (fixtures)
from tests.conftest import (
    ANTHROPIC_REAL,
    ANTHROPIC_VK,
    CUSTOM_VK,
    LIMITED_VK,
    OPENAI_REAL,
    OPENAI_VK,
    SECRETS,
    auth,
)
from tests.support.fake_provider import Fault
from tests.support.fake_realtime import OUTPUT_TOKENS
from tests.support.otlp_receiver import Received, ReceivedSpan

MESSAGE = "a secret prompt the traces must never carry"
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": MESSAGE}]}
CLIENT_TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN_ID = "00f067aa0ba902b7"


@pytest.fixture
async def traced(
    make_gateway: Callable[..., Awaitable[TestClient]], receiver: TestServer
) -> TestClient:
    """A gateway exporting its traces to the receiver."""
    return await make_gateway(
        OTEL_EXPORTER_OTLP_ENDPOINT=str(receiver.make_url("")), OTEL_BSP_SCHEDULE_DELAY="50"
    )


async def exported(gateway: TestClient, received: Received, count: int) -> list[ReceivedSpan]:
    """The spans of the requests made so far, once the gateway settled them."""
    await gateway.app[TRACING].flush()
    return await received.wait_for(count)


def parent(traceparent: str) -> tuple[str, str, int]:
    """(trace id, parent span id, sampled bit) of a W3C traceparent header."""
    version, trace_id, span_id, flags = traceparent.split("-")
    assert version == "00"
    return trace_id, span_id, int(flags, 16) & 1


def by_kind(spans: list[ReceivedSpan], kind: str) -> list[ReceivedSpan]:
    return [span for span in spans if span.kind == kind]


def assert_nothing_secret(spans: list[ReceivedSpan]) -> None:
    for span in spans:
        text = repr(span)
        assert MESSAGE not in text
        assert not any(secret in text for secret in SECRETS)


async def test_a_request_is_a_server_span_with_its_attempt_as_a_client_child(
    traced: TestClient, received: Received, fake: Any
) -> None:
    response = await traced.post("/v1/chat/completions", json=CHAT, headers=auth(OPENAI_VK))
    assert response.status == 200
    body = await response.json()
    spans = await exported(traced, received, 2)
    [server], [attempt] = by_kind(spans, "server"), by_kind(spans, "client")

    assert server.parent_span_id == ""
    assert attempt.trace_id == server.trace_id
    assert attempt.parent_span_id == server.span_id
    assert server.start_ns <= attempt.start_ns <= attempt.end_ns <= server.end_ns
    assert server.name == "chat gpt-4o-mini"
    assert server.attributes == {
        "http.request.method": "POST",
        "url.path": "/v1/chat/completions",
        "http.response.status_code": 200,
        "llm_gateway.request_id": response.headers["x-request-id"],
        "llm_gateway.key": traced.app[KEY_RING].authenticate(CIMultiDict(auth(OPENAI_VK))).name,
        "gen_ai.provider.name": "openai",
        "gen_ai.operation.name": "chat",
        "gen_ai.request.model": "gpt-4o-mini",
        "gen_ai.response.model": body["model"],
        "gen_ai.usage.input_tokens": body["usage"]["prompt_tokens"],
        "gen_ai.usage.output_tokens": body["usage"]["completion_tokens"],
    }
    assert not server.is_error
    assert attempt.attributes["gen_ai.provider.name"] == "openai"
    assert attempt.attributes["gen_ai.request.model"] == "gpt-4o-mini"
    assert attempt.attributes["gen_ai.operation.name"] == "chat"
    assert attempt.attributes["http.response.status_code"] == 200
    assert attempt.attributes["server.address"] == "127.0.0.1"
    assert server.resource["service.name"] == "llm-gateway"
    assert_nothing_secret(spans)


async def test_the_provider_receives_the_attempt_span_as_its_parent(
    traced: TestClient, received: Received, fake: Any
) -> None:
    await traced.post("/v1/chat/completions", json=CHAT, headers=auth(OPENAI_VK))
    [attempt] = by_kind(await exported(traced, received, 2), "client")
    assert parent(fake.requests[-1].headers["traceparent"]) == (
        attempt.trace_id,
        attempt.span_id,
        1,
    )


async def test_a_clients_traceparent_and_tracestate_continue_its_trace(
    traced: TestClient, received: Received, fake: Any
) -> None:
    headers = {
        **auth(ANTHROPIC_VK),
        "traceparent": f"00-{CLIENT_TRACE_ID}-{CLIENT_SPAN_ID}-01",
        "tracestate": "vendor=opaque",
    }
    body = {"model": "claude-3-5-haiku-latest", "max_tokens": 10, "messages": CHAT["messages"]}
    assert (await traced.post("/v1/messages", json=body, headers=headers)).status == 200
    spans = await exported(traced, received, 2)
    [server], [attempt] = by_kind(spans, "server"), by_kind(spans, "client")
    assert server.trace_id == attempt.trace_id == CLIENT_TRACE_ID
    assert server.parent_span_id == CLIENT_SPAN_ID
    assert server.attributes["gen_ai.provider.name"] == "anthropic"
    upstream = fake.requests[-1].headers
    assert parent(upstream["traceparent"]) == (CLIENT_TRACE_ID, attempt.span_id, 1)
    assert upstream["tracestate"] == "vendor=opaque"


async def test_a_streams_server_span_ends_when_the_stream_ends(
    traced: TestClient, received: Received
) -> None:
    chunks, delay_ms = 6, 150  # the stream takes at least 5 gaps of 150 ms
    headers = {**auth(OPENAI_VK), "x-fake-chunks": str(chunks), "x-fake-delay-ms": str(delay_ms)}
    started = time.time_ns()
    response = await traced.post(
        "/v1/chat/completions", json={**CHAT, "stream": True}, headers=headers
    )
    first_byte = None
    async for _ in response.content.iter_any():
        first_byte = first_byte or time.time_ns()
    last_byte = time.time_ns()
    spans = await exported(traced, received, 2)
    [server], [attempt] = by_kind(spans, "server"), by_kind(spans, "client")
    stream_seconds = (chunks - 1) * delay_ms / 1000
    assert server.duration_seconds >= stream_seconds
    assert attempt.duration_seconds >= stream_seconds  # the attempt lasts until its body ends
    assert first_byte is not None and server.start_ns >= started
    assert server.end_ns >= first_byte + (chunks - 2) * delay_ms * 1_000_000
    # Ended at settle, right after the last byte went out (generous: a loaded machine).
    assert abs(server.end_ns - last_byte) < 1_000_000_000


async def test_a_refused_request_is_a_server_span_with_its_error_and_no_attempt(
    traced: TestClient, received: Received
) -> None:
    response = await traced.post(
        "/v1/chat/completions", json=CHAT, headers=auth("vk_wrong_key_0000")
    )
    assert response.status == 401
    [span] = await exported(traced, received, 1)
    assert span.kind == "server"
    assert span.attributes["error.type"] == "401"
    assert span.attributes["http.response.status_code"] == 401
    assert "llm_gateway.key" not in span.attributes
    assert_nothing_secret([span])


async def test_a_provider_that_fails_marks_both_spans_as_errors(
    traced: TestClient, received: Received
) -> None:
    headers = {**auth(OPENAI_VK), "x-fake-drop": "headers"}
    response = await traced.post("/v1/chat/completions", json=CHAT, headers=headers)
    assert response.status == 502
    spans = await exported(traced, received, 2)
    [server], [attempt] = by_kind(spans, "server"), by_kind(spans, "client")
    assert server.is_error and attempt.is_error
    assert server.attributes["error.type"] == "502"
    assert "error.type" in attempt.attributes


async def test_a_key_pasted_as_the_model_is_masked_in_both_spans(
    traced: TestClient, received: Received
) -> None:
    """As in the log line: the client span named the model, and so the key, in full."""
    for path in ("/v1/chat/completions", f"/v1/realtime?model={OPENAI_VK}"):
        if path.startswith("/v1/realtime"):
            async with traced.ws_connect(path, headers=auth(OPENAI_VK)) as ws:
                await ws.receive()  # the fake's session.created
        else:
            response = await traced.post(
                path, json={**CHAT, "model": OPENAI_VK}, headers=auth(OPENAI_VK)
            )
            assert response.status == 200
    spans = await exported(traced, received, 4)
    assert len(by_kind(spans, "client")) == 2
    assert_nothing_secret(spans)


async def test_an_unreachable_collector_costs_requests_nothing_but_a_counted_failure(
    make_gateway: Callable[..., Awaitable[TestClient]],
    aiohttp_server: Callable[..., Awaitable[TestServer]],
) -> None:
    holding, released = asyncio.Event(), asyncio.Event()

    async def hang(request: web.Request) -> web.Response:
        holding.set()
        await released.wait()  # a collector that accepts and answers only when the test says
        return web.Response(status=400)  # not retried: the export fails at once

    collector = web.Application()
    collector.router.add_post("/v1/traces", hang)
    server = await aiohttp_server(collector)
    gateway = await make_gateway(
        OTEL_EXPORTER_OTLP_ENDPOINT=str(server.make_url("")),
        # The yardstick: an export held 10 s fails, and the failure is counted.
        OTEL_EXPORTER_OTLP_TIMEOUT="10",
        OTEL_BSP_SCHEDULE_DELAY="10",
    )
    name = "llm_gateway_trace_export_failures_total"

    async def failures() -> float:
        metrics = await (await gateway.get("/metrics")).text()
        [line] = [line for line in metrics.splitlines() if line.startswith(name)]
        return float(line.split()[-1])

    try:
        for index in range(10):  # the first spans' export hangs while these are served
            response = await gateway.post(
                "/v1/chat/completions", json=CHAT, headers=auth(OPENAI_VK)
            )
            assert response.status == 200
            if index == 0:
                await asyncio.wait_for(holding.wait(), 30)
        # All ten served while the first export still hangs: none of them waited for it.
        assert await failures() == 0
    finally:
        released.set()
    await gateway.app[TRACING].flush()
    assert await failures() >= 1


async def test_traces_are_off_without_the_sdks_variables(gateway: TestClient, fake: Any) -> None:
    assert TRACING not in gateway.app
    headers = {**auth(OPENAI_VK), "traceparent": f"00-{CLIENT_TRACE_ID}-{CLIENT_SPAN_ID}-01"}
    assert (await gateway.post("/v1/chat/completions", json=CHAT, headers=headers)).status == 200
    # Off, the gateway is transparent to trace context: the client's own passes unchanged.
    assert fake.requests[-1].headers["traceparent"] == headers["traceparent"]


@pytest.mark.parametrize(
    ("environ", "is_on"),
    [
        ({}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, True),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"}, True),
        ({"OTEL_TRACES_EXPORTER": "otlp"}, True),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, False),
        ({"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "otlp"}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "  "}, False),  # empty is unset, as for every setting
    ],
)
def test_the_sdks_own_variables_turn_traces_on(environ: dict[str, str], is_on: bool) -> None:
    assert Settings.from_env(environ).is_tracing_on is is_on


@pytest.mark.parametrize(
    ("environ", "culprit"),
    [
        ({"OTEL_TRACES_EXPORTER": "console"}, "OTEL_TRACES_EXPORTER"),
        (
            {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"},
            "OTEL_EXPORTER_OTLP_PROTOCOL",
        ),
        (
            {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_TRACES_SAMPLER": "sometimes"},
            "OTEL_TRACES_SAMPLER",
        ),
        (
            {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_BSP_SCHEDULE_DELAY": "soon"},
            "OTEL_BSP_SCHEDULE_DELAY",
        ),
        (
            {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_COMPRESSION": "br"},
            "OTEL_EXPORTER_OTLP_COMPRESSION",
        ),
        # No scheme: every export would fail ("No connection adapters were found").
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "collector:4318"}, "OTEL_EXPORTER_OTLP_ENDPOINT"),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "10.0.0.7:4318"}, "OTEL_EXPORTER_OTLP_ENDPOINT"),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "127.0.0.1:4318"}, "OTEL_EXPORTER_OTLP_ENDPOINT"),
        (
            {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "grpc://collector:4317"},
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        ),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://"}, "OTEL_EXPORTER_OTLP_ENDPOINT"),
        # The gateway continues and passes W3C trace context only: a caller's X-B3-* or
        # X-Amzn-Trace-Id was ignored, each request the root of a trace nobody sent.
        (
            {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_PROPAGATORS": "tracecontext,b3multi"},
            "OTEL_PROPAGATORS may name tracecontext and baggage only",
        ),
        (
            {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_PROPAGATORS": "xray"},
            "OTEL_PROPAGATORS may name tracecontext and baggage only",
        ),
        # Each of these ended the start with the SDK's ValueError (or an OverflowError)
        # traceback, exit code 1: a ratio past 1 (read even with the default sampler), a
        # queue or delay that is a fraction, a batch larger than the queue, infinity.
        (
            {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_TRACES_SAMPLER_ARG": "2"},
            "OTEL_TRACES_SAMPLER_ARG must be a number from 0 to 1",
        ),
        (
            {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_TRACES_SAMPLER_ARG": "inf"},
            "OTEL_TRACES_SAMPLER_ARG must be a number from 0 to 1",
        ),
        (
            {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_BSP_MAX_QUEUE_SIZE": "0.5"},
            "OTEL_BSP_MAX_QUEUE_SIZE must be a whole number, at least 1",
        ),
        (
            {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_BSP_SCHEDULE_DELAY": "inf"},
            "OTEL_BSP_SCHEDULE_DELAY must be a whole number, at least 1",
        ),
        (
            {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_TIMEOUT": "nan"},
            "OTEL_EXPORTER_OTLP_TIMEOUT must be a positive number",
        ),
        (
            {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "5000"},
            "OTEL_BSP_MAX_EXPORT_BATCH_SIZE (5000) must not exceed OTEL_BSP_MAX_QUEUE_SIZE (2048)",
        ),
        (
            {
                "OTEL_TRACES_EXPORTER": "otlp",
                "OTEL_BSP_MAX_QUEUE_SIZE": "100",
                "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "200",
            },
            "OTEL_BSP_MAX_EXPORT_BATCH_SIZE (200) must not exceed OTEL_BSP_MAX_QUEUE_SIZE (100)",
        ),
    ],
)
def test_otel_values_the_gateway_cannot_honour_stop_the_start(
    environ: dict[str, str], culprit: str
) -> None:
    with pytest.raises(SettingError, match=re.escape(culprit)):
        Settings.from_env(environ)


def test_the_sdks_default_propagators_are_taken() -> None:
    for propagators in ("tracecontext,baggage", "TraceContext", " baggage , tracecontext "):
        environ = {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_PROPAGATORS": propagators}
        assert Settings.from_env(environ).is_tracing_on


async def test_a_sampling_ratio_of_zero_and_the_edges_of_the_batch_start(
    make_gateway: Callable[..., Awaitable[TestClient]], receiver: TestServer
) -> None:
    # A ratio of 0 (sample nothing) was refused as "not a positive number", though the SDK
    # takes any ratio from 0 to 1.
    gateway = await make_gateway(
        OTEL_EXPORTER_OTLP_ENDPOINT=str(receiver.make_url("")),
        OTEL_TRACES_SAMPLER="traceidratio",
        OTEL_TRACES_SAMPLER_ARG="0",
        OTEL_BSP_MAX_QUEUE_SIZE="100",
        OTEL_BSP_MAX_EXPORT_BATCH_SIZE="100",
    )
    assert (await gateway.get("/health")).status == 200


async def test_sampling_off_exports_nothing_but_still_passes_context(
    make_gateway: Callable[..., Awaitable[TestClient]],
    receiver: TestServer,
    received: Received,
    fake: Any,
) -> None:
    gateway = await make_gateway(
        OTEL_EXPORTER_OTLP_ENDPOINT=str(receiver.make_url("")), OTEL_TRACES_SAMPLER="always_off"
    )
    assert (
        await gateway.post("/v1/chat/completions", json=CHAT, headers=auth(LIMITED_VK))
    ).status == 200
    await gateway.app[TRACING].flush()
    assert received.spans == []
    _, _, is_sampled = parent(fake.requests[-1].headers["traceparent"])
    assert is_sampled == 0  # not sampled, and still a context the provider can join


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("application/json", b'{"id":"x","model":"gpt-4o-mini-2024-07-18","usage":{}}'),
        (
            "text/event-stream",
            b'data: {"id":"c","model":"gpt-4o-mini-2024-07-18","choices":[]}\n\ndata: [DONE]\n\n',
        ),
        (
            "text/event-stream",
            b'event: message_start\ndata: {"type":"message_start","message":'
            b'{"model":"gpt-4o-mini-2024-07-18","usage":{"input_tokens":1}}}\n\n',
        ),
        (
            "text/event-stream",
            b'data: {"type":"response.completed","response":'
            b'{"model":"gpt-4o-mini-2024-07-18","usage":{"input_tokens":1}}}\n\n',
        ),
    ],
    ids=["json", "openai-stream", "anthropic-stream", "responses-stream"],
)
def test_the_usage_tap_reads_the_model_that_answered(content_type: str, body: bytes) -> None:
    tap = UsageTap(content_type, None, keep_text=False)
    for index in range(len(body)):  # fed one byte at a time: where chunks are cut is no matter
        tap.feed(body[index : index + 1])
    tap.usage(b"")
    assert tap.model == "gpt-4o-mini-2024-07-18"


@pytest.mark.parametrize("in_stream", ["", "first"])  # a 500, or a 200 stream's first event
async def test_each_attempt_is_its_own_client_span_with_its_targets_provider_and_model(
    aiohttp_client: Callable[..., Awaitable[TestClient]],
    tmp_path: Path,
    fake_base: str,
    fake: Any,
    receiver: TestServer,
    received: Received,
    in_stream: str,
) -> None:
    primary, backup = "sk-trace-primary-1111111111", "sk-trace-backup-2222222222"
    keys = {
        "providers": {
            "openai": {"base_url": f"{fake_base}/v1"},
            "backup": {"base_url": f"{fake_base}/v1"},
        },
        "virtual_keys": {
            "vk_test_traced_failover_5a7c": {
                "provider": "openai",
                "api_key": primary,
                "fallbacks": [
                    {"provider": "backup", "api_key": backup, "model": "gpt-4o-mini-backup"}
                ],
            }
        },
    }
    (tmp_path / "failover.json").write_text(json.dumps(keys))
    settings = Settings.from_env(
        {
            "KEYS_FILE_PATH": str(tmp_path / "failover.json"),
            "OTEL_EXPORTER_OTLP_ENDPOINT": str(receiver.make_url("")),
        }
    )
    gateway = await aiohttp_client(build_app(settings))
    fake.faults[primary] = Fault(500, in_stream=in_stream)
    response = await gateway.post(
        "/v1/chat/completions", json=CHAT, headers=auth("vk_test_traced_failover_5a7c")
    )
    assert response.status == 200
    spans = await exported(gateway, received, 3)
    [server] = by_kind(spans, "server")
    first, second = sorted(by_kind(spans, "client"), key=lambda span: span.start_ns)
    assert first.parent_span_id == second.parent_span_id == server.span_id
    assert (first.attributes["gen_ai.provider.name"], first.attributes["gen_ai.request.model"]) == (
        "openai",
        "gpt-4o-mini",
    )
    assert (
        second.attributes["gen_ai.provider.name"],
        second.attributes["gen_ai.request.model"],
    ) == (
        "backup",
        "gpt-4o-mini-backup",
    )
    assert first.attributes["http.response.status_code"] == (200 if in_stream else 500)
    assert first.attributes["error.type"] == "500" and first.is_error
    assert second.attributes["http.response.status_code"] == 200
    assert "error.type" not in second.attributes and not second.is_error
    assert first.end_ns <= second.start_ns  # the first try ended when it failed
    assert [parent(seen.headers["traceparent"])[1] for seen in fake.requests] == [
        first.span_id,
        second.span_id,
    ]
    assert server.attributes["gen_ai.request.model"] == "gpt-4o-mini"


async def test_a_websocket_session_is_a_server_span_as_long_as_the_session(
    traced: TestClient, received: Received, fake: Any
) -> None:
    ws = await traced.ws_connect(
        "/v1/realtime?model=gpt-realtime", headers=auth(OPENAI_VK), protocols=["realtime"]
    )
    await ws.receive()  # session.created
    await ws.send_str('{"type": "response.create"}')
    await ws.receive()
    await ws.receive()  # response.done, with usage
    closing = time.time_ns()
    await ws.close()
    spans = await exported(traced, received, 2)
    [server], [attempt] = by_kind(spans, "server"), by_kind(spans, "client")
    assert attempt.parent_span_id == server.span_id
    assert server.start_ns < closing <= server.end_ns  # open until the client closed it
    assert server.attributes["http.response.status_code"] == 101
    assert server.attributes["gen_ai.request.model"] == "gpt-realtime"
    assert server.attributes["gen_ai.usage.output_tokens"] == OUTPUT_TOKENS
    assert "error.type" not in server.attributes and not attempt.is_error
    assert attempt.attributes["http.response.status_code"] == 101
    upgrade = [seen for seen in fake.requests if seen.path == "/v1/realtime"][-1]
    assert parent(upgrade.headers["traceparent"]) == (attempt.trace_id, attempt.span_id, 1)
    assert_nothing_secret(spans)


async def test_a_cache_hit_spends_no_tokens_in_its_span_and_says_it_was_a_hit(
    make_cached: Callable[..., Awaitable[TestClient]],  # noqa: F811 (the fixture imported)
    receiver: TestServer,
    received: Received,
) -> None:
    """As in the metrics: a hit's stored usage was spent by the request that stored it. A
    backend pricing spans from gen_ai.usage.* (Langfuse, Datadog) charged every hit again."""
    gateway = await make_cached(
        OTEL_EXPORTER_OTLP_ENDPOINT=str(receiver.make_url("")), OTEL_BSP_SCHEDULE_DELAY="50"
    )
    assert (await post(gateway))[1]["x-llm-gateway-cache"] == "miss"
    assert (await post(gateway))[1]["x-llm-gateway-cache"] == "hit"
    spans = await exported(gateway, received, 3)
    miss, hit = by_kind(spans, "server")
    assert miss.attributes["llm_gateway.cache"] == "miss"
    assert miss.attributes["gen_ai.usage.input_tokens"] > 0
    assert hit.attributes["llm_gateway.cache"] == "hit"
    assert not any(name.startswith("gen_ai.usage.") for name in hit.attributes)
    assert len(by_kind(spans, "client")) == 1  # the miss went upstream, the hit did not


async def test_the_cache_reads_and_writes_of_a_prompt_are_attributes_of_its_span(
    traced: TestClient, received: Received, records: Any
) -> None:
    """The GenAI conventions' gen_ai.usage.cache_read.input_tokens and
    cache_creation.input_tokens, parts of input_tokens: without them a backend pricing spans
    charged an Anthropic cache read at the full input rate (ten times its price)."""
    body = {"model": "claude-3-5-haiku-latest", "max_tokens": 10, "messages": CHAT["messages"]}
    headers = {
        **auth(ANTHROPIC_VK),
        "x-fake-cached-tokens": "700",
        "x-fake-cache-write-tokens": "50",
    }
    assert (await traced.post("/v1/messages", json=body, headers=headers)).status == 200
    [server] = by_kind(await exported(traced, received, 2), "server")
    (line,) = await records(1)
    assert server.attributes["gen_ai.usage.input_tokens"] == line["usage"]["prompt_tokens"]
    assert server.attributes["gen_ai.usage.cache_read.input_tokens"] == 700
    assert server.attributes["gen_ai.usage.cache_creation.input_tokens"] == 50
    assert line["usage"]["cache_read_tokens"] == 700
    assert line["usage"]["cache_write_tokens"] == 50


async def test_a_stream_that_carried_the_providers_error_under_its_200_is_an_error_span(
    traced: TestClient, received: Received, fake: Any, records: Any
) -> None:
    """Anthropic's overloaded_error event after some content: the log line says it failed,
    and so must both spans, or an error rate taken from traces never sees such streams."""
    fake.faults[ANTHROPIC_REAL] = Fault(529, in_stream="after")
    body = {
        "model": "claude-3-5-haiku-latest",
        "max_tokens": 10,
        "stream": True,
        "messages": CHAT["messages"],
    }
    response = await traced.post("/v1/messages", json=body, headers=auth(ANTHROPIC_VK))
    assert response.status == 200
    assert b"overloaded_error" in await response.read()
    spans = await exported(traced, received, 2)
    [server], [attempt] = by_kind(spans, "server"), by_kind(spans, "client")
    (line,) = await records(1)
    assert line["error"] == "the provider sent an error in its answer (overloaded_error)"
    for span in (server, attempt):
        assert span.is_error
        assert span.attributes["error.type"] == "overloaded_error"
        assert span.attributes["http.response.status_code"] == 200


@pytest.mark.parametrize("in_stream", ["after", ""])
async def test_a_real_key_as_the_providers_error_type_is_in_no_span_and_no_log_line(
    traced: TestClient, received: Received, fake: Any, log_path: Path, records: Any, in_stream: str
) -> None:
    """The error's type the log line and the spans name is the provider's word: one that
    reflects the credential it was sent there (a provider answering its own error type
    with the key it refused) has it masked, as in the body the client gets."""
    fake.faults[OPENAI_REAL] = Fault(400, in_stream=in_stream, code=OPENAI_REAL)
    body = {**CHAT, "stream": bool(in_stream)}
    response = await traced.post("/v1/chat/completions", json=body, headers=auth(OPENAI_VK))
    assert response.status == (200 if in_stream else 400)
    assert OPENAI_REAL not in await response.text()
    spans = await exported(traced, received, 2)
    (line,) = await records(1)
    assert_nothing_secret(spans)
    assert OPENAI_REAL not in log_path.read_text()
    assert line["error"] == "the provider sent an error in its answer ([redacted])"


async def test_a_real_key_as_the_model_the_provider_says_answered_is_in_no_span(
    make_gateway: Callable[..., Awaitable[TestClient]],
    receiver: TestServer,
    received: Received,
    aiohttp_server: Callable[..., Awaitable[TestServer]],
    tmp_path: Path,
) -> None:
    """`gen_ai.response.model` is the model the answer names: a provider naming the key it
    was sent there (the client's body has it masked) puts it in no span."""

    async def naming_the_key(request: web.Request) -> web.Response:
        answer = {"model": f"{OPENAI_REAL}", "choices": [], "usage": {"prompt_tokens": 1}}
        return web.json_response(answer)

    upstream = web.Application()
    upstream.router.add_post("/v1/chat/completions", naming_the_key)
    server = await aiohttp_server(upstream)
    keys = {
        "providers": {"openai": {"base_url": str(server.make_url("/v1"))}},
        "virtual_keys": {OPENAI_VK: {"provider": "openai", "api_key": OPENAI_REAL}},
    }
    (tmp_path / "upstream.json").write_text(json.dumps(keys))
    traced = await make_gateway(
        KEYS_FILE_PATH=str(tmp_path / "upstream.json"),
        OTEL_EXPORTER_OTLP_ENDPOINT=str(receiver.make_url("")),
        OTEL_BSP_SCHEDULE_DELAY="50",
    )
    response = await traced.post("/v1/chat/completions", json=CHAT, headers=auth(OPENAI_VK))
    assert response.status == 200
    assert OPENAI_REAL not in await response.text()
    spans = await exported(traced, received, 2)
    assert_nothing_secret(spans)
    [server_span] = by_kind(spans, "server")
    assert server_span.attributes["gen_ai.response.model"] == "[redacted]"


async def test_a_native_gemini_call_is_named_by_its_operation_as_an_openai_one_is(
    traced: TestClient, received: Received
) -> None:
    """Gemini's own API names its method after a colon (models/<model>:generateContent):
    its spans were named 'POST', without the gen_ai.operation.name the conventions require."""
    contents = {"contents": [{"role": "user", "parts": [{"text": "hello there"}]}]}
    for method in ("generateContent", "streamGenerateContent?alt=sse"):
        path = f"/v1/models/gemini-2.5-flash:{method}"
        response = await traced.post(path, json=contents, headers={"x-goog-api-key": CUSTOM_VK})
        assert response.status == 200
    spans = await exported(traced, received, 4)
    for span in spans:
        assert span.name == "generate_content gemini-2.5-flash"
        assert span.attributes["gen_ai.operation.name"] == "generate_content"


@pytest.mark.parametrize(
    ("path", "operation"),
    [
        ("/v1beta/models/gemini-2.5-flash:generateContent", "generate_content"),
        ("/v1/models/text-embedding-004:embedContent", "embeddings"),
        ("/v1/models/text-embedding-004:batchEmbedContents", "embeddings"),
        ("/v1/model/anthropic.claude-3-5-haiku-20241022-v1:0/converse", "chat"),
        ("/v1/model/anthropic.claude-3-5-haiku-20241022-v1:0/converse-stream", "chat"),
        (
            "/v1/projects/p/locations/us-east5/publishers/anthropic/models/claude:streamRawPredict",
            "chat",
        ),
        ("/v1/models/gemini-2.5-flash:countTokens", None),
        ("/v1/model/anthropic.claude-3-5-haiku-20241022-v1:0/invoke", None),
        ("/v1/chat/completions", "chat"),
    ],
)
def test_the_native_apis_operations(path: str, operation: str | None) -> None:
    assert operation_name(path) == operation


@pytest.mark.parametrize(
    ("provider", "named"),
    [
        ("openai", "openai"),
        ("anthropic", "anthropic"),
        ("gemini", "gcp.gemini"),
        ("azure", "azure.ai.openai"),
        ("bedrock", "aws.bedrock"),
        ("vertex", "gcp.vertex_ai"),
        ("local-vllm", "local-vllm"),  # a provider of keys.json, as it is named there
    ],
)
def test_the_built_in_providers_carry_the_conventions_names(provider: str, named: str) -> None:
    """A backend's GenAI views key on the well-known gen_ai.provider.name values: Bedrock's
    and Vertex's calls were 'bedrock' and 'vertex', so they were missing from them."""
    assert provider_name(provider) == named
