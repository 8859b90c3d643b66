"""A library's failure lines, one a minute: a trace collector that is down says so once."""

from __future__ import annotations

import logging
import socket

import pytest

from proxy.observe.quiet import OncePerInterval
from proxy.observe.tracing import Tracing
from tests.support.clock import Clock


def test_one_record_a_minute_then_how_many_were_held_back() -> None:
    clock = Clock()
    quiet = OncePerInterval(clock=clock)
    logger = logging.getLogger("test_quiet.library")
    records = [
        logger.makeRecord(logger.name, logging.WARNING, "f", 1, "fail %d", (n,), None)
        for n in range(5)
    ]
    assert [quiet.filter(record) for record in records] == [True, False, False, False, False]
    clock.advance(59.9)
    assert not quiet.filter(records[0])
    clock.advance(0.1)
    late = logger.makeRecord(logger.name, logging.WARNING, "f", 1, "fail %d", (9,), None)
    assert quiet.filter(late)
    assert late.getMessage() == "fail 9 (5 more like it in the last minute not shown)"


def test_a_collector_that_is_down_gives_one_line_for_many_batches(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with socket.socket() as closed:  # a port nothing listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    failures: list[int] = []
    tracing = Tracing(
        {
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
            "OTEL_EXPORTER_OTLP_TIMEOUT": "1",
        },
        on_export_failure=lambda: failures.append(1),
    )
    tracer = tracing._provider.get_tracer("test")
    with caplog.at_level(logging.WARNING, logger="opentelemetry"):
        for _ in range(3):
            tracer.start_span("batch").end()
            tracing._provider.force_flush()  # one export, which fails
    assert len(failures) == 3  # every failure is counted (the metric) ...
    said = [r for r in caplog.records if r.name.startswith("opentelemetry")]
    # ... and said at most once (none when another test's collector spoke within the minute)
    assert len(said) <= 1, [r.getMessage() for r in said]
    tracing._provider.shutdown()
