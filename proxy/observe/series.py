"""Counters, histograms and gauges kept in plain floats, for the series a request feeds.

prometheus-client's own take a lock on every change (another thread may read or change the
value) and check themselves on every call: about 0.4 us a counter increment and 1 us a
histogram observation, a dozen of them each request. These keep a float per child, changed
without a lock, and collect into the very families prometheus-client's would (same names,
labels, order and values), so /metrics reads the same, byte for byte.

Invariant: one thread alone changes and reads them, the event loop's: it settles requests
and renders /metrics. A value changed from another thread (the logbook's writer) belongs in
a prometheus-client metric. In one process only: with WORKERS > 1 every value must be
written to prometheus-client's mmap files, which only its own metrics do (`Metrics` chooses).
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable, Sequence
from typing import Generic, TypeVar

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import INF, floatToGoString


class LoopCount:
    """One counter's float."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        if amount < 0:  # as prometheus-client refuses it
            raise ValueError("Counters can only be incremented by non-negative amounts.")
        self.value += amount


class LoopValue:
    """One gauge's float."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount

    def dec(self, amount: float = 1.0) -> None:
        self.value -= amount

    def set(self, value: float) -> None:
        self.value = float(value)


class LoopBuckets:
    """One histogram's counts per bucket (not cumulative) and the sum of its observations."""

    __slots__ = ("_bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self._bounds = bounds
        self.counts = [0.0] * len(bounds)
        self.sum = 0.0

    def observe(self, amount: float) -> None:
        # The first bucket whose bound holds the amount, as prometheus-client's loop finds it.
        self.counts[bisect_left(self._bounds, amount)] += 1.0
        self.sum += amount


Child = TypeVar("Child", LoopCount, LoopValue, LoopBuckets)


class _Series(Collector, Generic[Child]):
    """A family of children by label values, registered like a prometheus-client metric."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str] = (),
        registry: CollectorRegistry | None = None,
    ) -> None:
        self._name, self._documentation = name, documentation
        self._labelnames = tuple(labelnames)
        self._children: dict[tuple[str, ...], Child] = {}
        if not self._labelnames:
            self._children[()] = self._new_child()  # a series without labels is there at 0
        if registry is not None:
            registry.register(self)

    def _new_child(self) -> Child:
        raise NotImplementedError

    def labels(self, *values: str) -> Child:
        return self._child(values)

    def remove(self, *values: str) -> None:
        """Drop the child of these label values, if it has one (as prometheus-client's)."""
        self._children.pop(values, None)

    def _child(self, values: tuple[str, ...]) -> Child:
        child = self._children.get(values)
        if child is None:
            if len(values) != len(self._labelnames):
                raise ValueError(f"{self._name} takes labels {self._labelnames}, got {values}")
            child = self._children[values] = self._new_child()
        return child

    def describe(self) -> Iterable[Metric]:
        return [self._family()]

    def collect(self) -> Iterable[Metric]:
        family = self._family()
        for values, child in self._children.items():
            self._add(family, values, child)
        return [family]

    def _family(self) -> Metric:
        raise NotImplementedError

    def _add(self, family: Metric, values: tuple[str, ...], child: Child) -> None:
        raise NotImplementedError


class _OneValue(_Series[Child]):
    """A family whose children each hold one float (`value`): counters and gauges."""

    _family_type: type[CounterMetricFamily] | type[GaugeMetricFamily]

    def _family(self) -> Metric:
        return self._family_type(self._name, self._documentation, labels=self._labelnames)

    def _add(self, family: Metric, values: tuple[str, ...], child: Child) -> None:
        assert isinstance(family, self._family_type) and not isinstance(child, LoopBuckets)
        family.add_metric(values, child.value)


class LoopCounter(_OneValue[LoopCount]):
    """A counter: `labels(...)` (or the counter itself, without labels) `.inc(amount)`."""

    _family_type = CounterMetricFamily

    def _new_child(self) -> LoopCount:
        return LoopCount()

    def inc(self, amount: float = 1.0) -> None:
        self.labels().inc(amount)


class LoopGauge(_OneValue[LoopValue]):
    """A gauge: `labels(...)` (or the gauge itself, without labels) `.inc`, `.dec`, `.set`."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str] = (),
        registry: CollectorRegistry | None = None,
        multiprocess_mode: str = "",  # how prometheus-client sums workers: not one process's
    ) -> None:
        super().__init__(name, documentation, labelnames, registry)

    _family_type = GaugeMetricFamily

    def _new_child(self) -> LoopValue:
        return LoopValue()

    def inc(self, amount: float = 1.0) -> None:
        self.labels().inc(amount)

    def dec(self, amount: float = 1.0) -> None:
        self.labels().dec(amount)

    def set(self, value: float) -> None:
        self.labels().set(value)


class LoopHistogram(_Series[LoopBuckets]):
    """A histogram with fixed buckets: `labels(...).observe(amount)`."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str] = (),
        registry: CollectorRegistry | None = None,
        buckets: Sequence[float] = (),
    ) -> None:
        bounds = [float(bound) for bound in buckets]
        if not bounds or bounds != sorted(bounds):
            raise ValueError(f"{name}: buckets must be given, in order")
        if bounds[-1] != INF:
            bounds.append(INF)
        self._bounds = tuple(bounds)
        # The "le" values as prometheus-client writes them (0.00025, 1.0, +Inf).
        self._bucket_labels = tuple(floatToGoString(bound) for bound in bounds)  # type: ignore[no-untyped-call]  # unannotated in prometheus-client
        super().__init__(name, documentation, labelnames, registry)

    def _new_child(self) -> LoopBuckets:
        return LoopBuckets(self._bounds)

    def _family(self) -> Metric:
        return HistogramMetricFamily(self._name, self._documentation, labels=self._labelnames)

    def _add(self, family: Metric, values: tuple[str, ...], child: LoopBuckets) -> None:
        assert isinstance(family, HistogramMetricFamily)
        cumulative, total = [], 0.0
        for le, count in zip(self._bucket_labels, child.counts, strict=True):
            total += count
            cumulative.append((le, total))
        family.add_metric(values, cumulative, child.sum)
