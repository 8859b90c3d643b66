"""An in-process OTLP/HTTP trace receiver: decodes what the gateway exports, for assertions.

A real aiohttp app at POST /v1/traces that parses the protobuf `ExportTraceServiceRequest`
(gzip or deflate bodies too) into `ReceivedSpan`s, kept in `app[RECEIVED]`. `wait_for`
waits, bounded, until the spans a test expects have arrived. The fixtures `receiver` (the
running server) and `received` (what it decoded) are loaded by tests/conftest.py.
"""

from __future__ import annotations

import asyncio
import gzip
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

KINDS = {1: "internal", 2: "server", 3: "client", 4: "producer", 5: "consumer"}


@dataclass(frozen=True, slots=True)
class ReceivedSpan:
    name: str
    kind: str
    trace_id: str
    span_id: str
    parent_span_id: str
    start_ns: int
    end_ns: int
    attributes: dict[str, object]
    is_error: bool
    resource: dict[str, object]

    @property
    def duration_seconds(self) -> float:
        return (self.end_ns - self.start_ns) / 1e9


@dataclass(slots=True)
class Received:
    spans: list[ReceivedSpan] = field(default_factory=list)
    exports: int = 0
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    async def wait_for(self, count: int, timeout: float = 10.0) -> list[ReceivedSpan]:
        """At least `count` spans, waiting for exports as they come (bounded)."""
        async with asyncio.timeout(timeout):
            while len(self.spans) < count:
                self.arrived.clear()
                await self.arrived.wait()
        return self.spans


RECEIVED = web.AppKey("received", Received)


def _value(value: AnyValue) -> object:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_value(item) for item in value.array_value.values]
    return getattr(value, kind) if kind else None


async def traces(request: web.Request) -> web.Response:
    body = await request.read()
    encoding = request.headers.get("content-encoding", "")
    if encoding == "gzip":
        body = gzip.decompress(body)
    elif encoding == "deflate":
        body = zlib.decompress(body)
    export = ExportTraceServiceRequest.FromString(body)
    received = request.app[RECEIVED]
    for resource_spans in export.resource_spans:
        resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                received.spans.append(
                    ReceivedSpan(
                        name=span.name,
                        kind=KINDS.get(span.kind, str(span.kind)),
                        trace_id=span.trace_id.hex(),
                        span_id=span.span_id.hex(),
                        parent_span_id=span.parent_span_id.hex(),
                        start_ns=span.start_time_unix_nano,
                        end_ns=span.end_time_unix_nano,
                        attributes={a.key: _value(a.value) for a in span.attributes},
                        is_error=span.status.code == 2,
                        resource=resource,
                    )
                )
    received.exports += 1
    received.arrived.set()
    return web.Response(
        body=ExportTraceServiceResponse().SerializeToString(),
        content_type="application/x-protobuf",
    )


def build_receiver() -> web.Application:
    app = web.Application()
    app[RECEIVED] = Received()
    app.router.add_post("/v1/traces", traces)
    return app


@pytest.fixture
async def receiver(aiohttp_server: Callable[..., Awaitable[TestServer]]) -> TestServer:
    return await aiohttp_server(build_receiver())


@pytest.fixture
def received(receiver: TestServer) -> Received:
    return receiver.app[RECEIVED]
