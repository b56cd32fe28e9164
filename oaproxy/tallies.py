"""Counters, gauges and histograms kept as plain numbers, read by Prometheus
at scrape time.

``prometheus_client``'s own metrics take a lock and look a child up by its
labels on every increment; a proxy counting a dozen series per request pays
that on the reactor thread for every request. These keep a dict from label
values to numbers instead, and ``Tallies`` (a custom collector) turns them
into metric families only when ``/metrics`` is scraped. Only the reactor
thread counts, so no lock is needed. The exposition is the one
``prometheus_client`` would give: ``_total`` and ``_created`` for counters,
``_bucket``/``_count``/``_sum``/``_created`` for histograms; an unlabelled
counter shows from the start, a labelled series from its first count.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Iterator, Sequence

from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import CollectorRegistry
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

Labels = tuple[str, ...]


class Tally:
    """A counter: ``inc(labels, amount)`` per series, ``labels`` in the
    order of ``label_names``."""

    def __init__(self, name: str, doc: str, label_names: Sequence[str] = ()) -> None:
        self.name = name
        self.doc = doc
        self.label_names = tuple(label_names)
        self.values: dict[Labels, float] = {}
        self.created: dict[Labels, float] = {}
        if not self.label_names:
            self.touch(())

    def touch(self, labels: Labels) -> None:
        """Show the series ``labels`` at 0 until it is counted."""
        if labels not in self.values:
            self.values[labels] = 0
            self.created[labels] = time.time()

    def inc(self, labels: Labels = (), amount: float = 1) -> None:
        values = self.values
        if labels in values:
            values[labels] += amount
        else:
            values[labels] = amount
            self.created[labels] = time.time()

    def family(self) -> Metric:
        family = CounterMetricFamily(self.name, self.doc, labels=self.label_names)
        created = self.created
        for labels, value in list(self.values.items()):
            family.add_metric(labels, value, created=created[labels])
        return family


class Level:
    """A gauge without labels: ``value`` is read at scrape time."""

    def __init__(self, name: str, doc: str) -> None:
        self.name = name
        self.doc = doc
        self.value: float = 0

    def family(self) -> Metric:
        return GaugeMetricFamily(self.name, self.doc, value=self.value)


class Spread:
    """A histogram over ``buckets`` (upper bounds, ascending; +Inf is added)."""

    def __init__(
        self, name: str, doc: str, label_names: Sequence[str], buckets: Sequence[float]
    ) -> None:
        self.name = name
        self.doc = doc
        self.label_names = tuple(label_names)
        self.bounds = tuple(buckets)
        self._le = [floatToGoString(b) for b in self.bounds] + ["+Inf"]
        # Per series: the count in each bucket (not cumulative), then the sum.
        self.counts: dict[Labels, list[int]] = {}
        self.sums: dict[Labels, float] = {}
        self.created: dict[Labels, float] = {}

    def observe(self, labels: Labels, value: float) -> None:
        counts = self.counts.get(labels)
        if counts is None:
            counts = self.counts[labels] = [0] * (len(self.bounds) + 1)
            self.sums[labels] = 0.0
            self.created[labels] = time.time()
        # bisect_left: a value equal to a bound falls in that bound's bucket (le).
        counts[bisect_left(self.bounds, value)] += 1
        self.sums[labels] += value

    def family(self) -> Metric:
        family = HistogramMetricFamily(self.name, self.doc, labels=self.label_names)
        for labels, counts in list(self.counts.items()):
            cumulative = 0
            buckets = []
            for le, count in zip(self._le, counts):
                cumulative += count
                buckets.append((le, float(cumulative)))
            family.add_metric(labels, buckets, self.sums[labels])
            named = dict(zip(self.label_names, labels))
            family.samples.append(Sample(self.name + "_created", named, self.created[labels]))
        return family


Kept = Tally | Level | Spread


class Tallies:
    """The collector of a set of ``Tally``, ``Level`` and ``Spread``; register
    it once with ``register``, then ``add`` them as they are made."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._kept: list[Kept] = []
        self._registry = registry

    def tally(self, name: str, doc: str, label_names: Sequence[str] = ()) -> Tally:
        tally = Tally(name, doc, label_names)
        self._kept.append(tally)
        return tally

    def level(self, name: str, doc: str) -> Level:
        level = Level(name, doc)
        self._kept.append(level)
        return level

    def spread(
        self, name: str, doc: str, label_names: Sequence[str], buckets: Sequence[float]
    ) -> Spread:
        spread = Spread(name, doc, label_names, buckets)
        self._kept.append(spread)
        return spread

    def register(self) -> None:
        """Register with the registry, once every metric is added: the
        registry checks the names against its other collectors then."""
        self._registry.register(self)

    def describe(self) -> Iterator[Metric]:
        # The names up front, so the registry catches a clash at registration.
        for kept in self._kept:
            yield kept.family()

    def collect(self) -> Iterator[Metric]:
        for kept in self._kept:
            yield kept.family()
