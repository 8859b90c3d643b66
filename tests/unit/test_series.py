"""The loop's own series render exactly as prometheus-client's do, in both formats."""

from __future__ import annotations

import prometheus_client
import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import choose_encoder

from proxy.observe.series import LoopCounter, LoopGauge, LoopHistogram

BUCKETS = (0.0001, 0.00025, 0.001, 0.05, 1, 2.5, 600)
OPENMETRICS = "application/openmetrics-text; version=1.0.0"


def fed(counter: type, histogram: type, gauge: type) -> CollectorRegistry:
    """A registry of one of each kind, fed the same changes in the same order."""
    registry = CollectorRegistry()
    requests = counter("t_requests", "Requests.", ["provider", "status"], registry=registry)
    errors = counter("t_errors", "Errors, none yet.", ["kind"], registry=registry)
    lost = counter("t_lost", "Unlabelled.", registry=registry)
    duration = histogram(
        "t_duration_seconds", "Durations.", ["provider"], buckets=BUCKETS, registry=registry
    )
    in_flight = gauge("t_in_flight", "In flight.", registry=registry, multiprocess_mode="livesum")
    slots = gauge("t_slots", "Slots.", ["team"], registry=registry, multiprocess_mode="livesum")
    last = gauge("t_last_seconds", "Last.", registry=registry, multiprocess_mode="max")
    for provider, status, seconds in [
        ("openai", "200", 0.00012),
        ("anthropic", "429", 0.0001),  # on a bound: that bucket
        ("openai", "200", 3.5),
        ("openai", "500", 1e9),  # past every bound: +Inf
        ("openai", "200", 0.0),
    ]:
        requests.labels(provider, status).inc()
        duration.labels(provider).observe(seconds)
    requests.labels("openai", "200").inc(2.5)
    lost.inc()
    in_flight.inc()
    in_flight.inc()
    in_flight.dec()
    slots.labels("red").inc(3)
    slots.labels("red").inc(-1)
    slots.labels("blue")
    last.set(1764866400.123)
    assert errors  # labelled, never counted: its family has no sample
    return registry


@pytest.mark.parametrize("accept", ["text/plain", OPENMETRICS])
def test_the_loop_series_render_as_prometheus_clients_own(accept: str) -> None:
    # As `Metrics` has it: no `_created` series (the loop's series keep none).
    prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]  # unannotated in prometheus-client
    encode, _ = choose_encoder(accept)
    theirs = encode(fed(Counter, Histogram, Gauge))
    ours = encode(fed(LoopCounter, LoopHistogram, LoopGauge))
    assert ours == theirs


def test_a_counter_refuses_to_go_down_and_labels_must_be_complete() -> None:
    counter = LoopCounter("t_count", "Count.", ["a", "b"])
    with pytest.raises(ValueError):
        counter.labels("x", "y").inc(-1)
    with pytest.raises(ValueError):
        counter.labels("x")
