"""Prometheus metrics for oaproxy.

One ``Metrics`` object per process owns a private ``CollectorRegistry``: tests
build as many as they like and a config reload keeps the same object (see
``Metrics.update_labels``), so collectors are registered exactly once.

The metrics observer (``oaproxy.observers``) calls ``Metrics.request_started``
when a client request arrives and ``Metrics.request_finished`` with its
``Record`` when it is done; everything per request is derived from the record. Every label value is
bounded: models, routes and upstreams outside the configured or well-known
sets are counted as ``"other"``, so no client can create new time series by
sending made-up names.

``oaproxy.scrape.MetricsResource`` exposes the registry.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Protocol

from prometheus_client import (
    CollectorRegistry,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
)
from twisted.logger import Logger

from oaproxy.attemptmetrics import AttemptCounters
from oaproxy.circuits import CircuitCollector, Circuits
from oaproxy.frontmetrics import FrontMetrics
from oaproxy.record import Attempt, CacheResult, FailureKind, Outcome, Record
from oaproxy.tallies import Tallies

__all__ = [
    "ALERT_CHANNELS",
    "ALERT_RESULTS",
    "DEFAULT_KNOWN_MODELS",
    "KNOWN_ROUTES",
    "LATENCY_BUCKETS",
    "ActiveRequest",
    "Metrics",
    "SinkStats",
    "attempt_outcome",
    "route_label",
    "status_class",
]

# Common OpenAI model names, so that a proxy whose upstreams allow every model
# still gets useful per-model token counts for the usual ones.
DEFAULT_KNOWN_MODELS: tuple[str, ...] = (
    "gpt-3.5-turbo",
    "gpt-4",
    "gpt-4-turbo",
    "gpt-4o",
    "gpt-4o-mini",
    "gpt-4.1",
    "gpt-4.1-mini",
    "gpt-4.1-nano",
    "gpt-5",
    "gpt-5-mini",
    "gpt-5-nano",
    "o1",
    "o1-mini",
    "o3",
    "o3-mini",
    "o4-mini",
    "text-embedding-3-small",
    "text-embedding-3-large",
    "text-embedding-ada-002",
    "whisper-1",
    "gpt-4o-transcribe",
    "gpt-4o-mini-transcribe",
    "tts-1",
    "tts-1-hd",
    "dall-e-2",
    "dall-e-3",
    "gpt-image-1",
    "omni-moderation-latest",
)

# Well-known OpenAI API routes. A request path is labelled with the longest of
# these that is a whole-segment prefix of it (so "/v1/files/file-abc" counts as
# "/v1/files"), otherwise "other". Routes are at most three segments deep,
# which ``route_label`` relies on.
KNOWN_ROUTES: tuple[str, ...] = (
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/audio/transcriptions",
    "/v1/audio/translations",
    "/v1/audio/speech",
    "/v1/images/generations",
    "/v1/images/edits",
    "/v1/images/variations",
    "/v1/models",
    "/v1/moderations",
    "/v1/files",
    "/v1/uploads",
    "/v1/batches",
    "/v1/responses",
    "/v1/fine_tuning/jobs",
    "/v1/assistants",
    "/v1/threads",
    "/v1/vector_stores",
    "/v1/realtime",
)
_KNOWN_ROUTES = frozenset(KNOWN_ROUTES)

# LLM latencies run from tens of milliseconds (embeddings, cached answers) to
# minutes (long reasoning completions), hence the wide range.
LATENCY_BUCKETS: tuple[float, ...] = (
    0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300,
)  # fmt: skip

ALERT_CHANNELS: tuple[str, ...] = ("feishu", "matrix")
ALERT_RESULTS: tuple[str, ...] = ("ok", "error", "timeout", "suppressed")

OTHER = "other"
NONE = "none"

# The attempt outcome label of the failures that have one of their own,
# whatever the status (a stream can fall silent after its 200 headers).
_FAILURE_OUTCOMES: dict[FailureKind, str] = {
    FailureKind.TIMEOUT: "timeout",
    FailureKind.STREAM_IDLE: "timeout",
    FailureKind.CONNECT_ERROR: "connect_error",
    FailureKind.DNS_ERROR: "connect_error",
    FailureKind.TLS_ERROR: "connect_error",
    FailureKind.CANCELLED: "cancelled",
    FailureKind.CLIENT_STOPPED_READING: "cancelled",
}


# Per status code, its class: the status of every request is looked up here.
_STATUS_CLASSES: dict[int, str] = {code: f"{code // 100}xx" for code in range(100, 600)}


def status_class(status: int | None) -> str:
    """Return the class of an HTTP status code: ``"2xx"``, ``"4xx"``, …

    ``status`` is a status code, or ``None`` when there was no response.
    Returns ``"1xx"`` to ``"5xx"``, ``"none"`` for ``None``, ``"other"`` for
    a code outside 100–599.
    """
    if status is None:
        return NONE
    return _STATUS_CLASSES.get(status, OTHER)


def attempt_outcome(attempt: Attempt) -> str:
    """Map one attempt of a record to its outcome label.

    Returns ``"timeout"`` (the deadline, or a stream idle too long),
    ``"connect_error"`` (connection, DNS or TLS), ``"cancelled"`` (the client
    went away), ``"ok"`` for a 2xx that served, the status class (``"4xx"``,
    ``"5xx"``, …) of any other answer, or ``"error"`` otherwise (including
    a 2xx that broke some other way, such as a stream cut mid-way).
    """
    failure = attempt.failure
    label = _FAILURE_OUTCOMES.get(failure) if failure is not None else None
    if label is not None:
        return label
    if failure is not None and failure is not FailureKind.STATUS:
        return "error"
    klass = status_class(attempt.status)
    if klass == "2xx":
        return "ok"
    if klass in (NONE, OTHER):
        return "error"
    return klass


def route_label(path: str) -> str:
    """Return the bounded route label of a request path.

    ``path`` is the request path, possibly with a query string.  Returns one
    of ``KNOWN_ROUTES``, or ``"other"``.
    """
    if path in _KNOWN_ROUTES:
        return path
    path = path.partition("?")[0]
    parts = path.split("/", 4)
    # Longest route first: KNOWN_ROUTES are at most three segments deep, so
    # only the first three and the first two segments need looking up.
    for depth in (4, 3):
        candidate = "/".join(parts[:depth])
        if candidate in _KNOWN_ROUTES:
            return candidate
    return OTHER


def _bounded(value: str | None, allowed: frozenset[str]) -> str:
    if value is None:
        return NONE
    return value if value in allowed else OTHER


class SinkStats(Protocol):
    """What ``Metrics.add_sink`` reads from a record sink at scrape time.

    Plain integer attributes are enough; all are totals since the sink
    started except ``queued``, the records waiting right now.
    """

    @property
    def queued(self) -> int: ...

    @property
    def written(self) -> int: ...

    @property
    def spilled(self) -> int: ...

    @property
    def dropped(self) -> int: ...

    @property
    def failures(self) -> int: ...


class _SinkCollector:
    """Reads the sinks' own counters at scrape time, so the sinks keep plain
    integers and know nothing about Prometheus.
    """

    # (attribute, metric name, help, is a counter)
    _FIELDS: tuple[tuple[str, str, str, bool], ...] = (
        (
            "queued",
            "oaproxy_records_queued",
            "Records waiting in the sink's queue.",
            False,
        ),
        ("written", "oaproxy_records_written", "Records the sink has written.", True),
        (
            "spilled",
            "oaproxy_records_spilled",
            "Records the sink spilled to disk while its target was down.",
            True,
        ),
        (
            "dropped",
            "oaproxy_records_dropped",
            "Records the sink lost (queue and spool full).",
            True,
        ),
        (
            "failures",
            "oaproxy_sink_failures",
            "Failed writes of the sink to its target.",
            True,
        ),
    )

    def __init__(self) -> None:
        self.sinks: dict[str, SinkStats] = {}

    def describe(self) -> Iterator[Metric]:
        # Gives the registry the names up front, so a clash is caught at
        # registration even before any sink is added.
        for _, name, doc, is_counter in self._FIELDS:
            if is_counter:
                yield CounterMetricFamily(name, doc, labels=["sink"])
            else:
                yield GaugeMetricFamily(name, doc, labels=["sink"])

    def collect(self) -> Iterator[Metric]:
        sinks = list(self.sinks.items())
        for attribute, name, doc, is_counter in self._FIELDS:
            family: CounterMetricFamily | GaugeMetricFamily
            if is_counter:
                family = CounterMetricFamily(name, doc, labels=["sink"])
            else:
                family = GaugeMetricFamily(name, doc, labels=["sink"])
            for sink_name, sink in sinks:
                family.add_metric([sink_name], getattr(sink, attribute))
            yield family


class ActiveRequest:
    """The in-flight share of one client request in the active gauges.

    Returned by ``Metrics.request_started``. ``finish`` is idempotent, so the
    forwarder can call it from a ``finally`` (or pass it to
    ``Metrics.request_finished``) without the gauges ever drifting.
    """

    __slots__ = ("_done", "_metrics", "_stream")

    def __init__(self, metrics: Metrics, stream: bool) -> None:
        self._metrics = metrics
        self._stream = stream
        self._done = False

    def finish(self) -> None:
        """Take this request out of the active gauges; later calls do nothing."""
        if self._done:
            return
        self._done = True
        self._metrics._active_requests.value -= 1
        if self._stream:
            self._metrics._active_streams.value -= 1


class Metrics:
    """The proxy's Prometheus metrics, on a private registry.

    ``registry`` is the ``CollectorRegistry`` to expose; it also holds the
    process, platform and GC collectors.
    """

    log = Logger()

    def __init__(
        self,
        known_models: Iterable[str],
        upstream_names: Iterable[str],
        extra_known_models: Iterable[str] = DEFAULT_KNOWN_MODELS,
    ) -> None:
        """Set up the collectors on a fresh registry.

        ``known_models`` are the model names that get their own label value,
        typically every upstream's ``allow`` entries (and the ``prices``
        keys); entries starting with ``"/"`` are paths and are ignored.
        ``upstream_names`` are the configured upstreams' names.
        ``extra_known_models`` are further model names, by default
        ``DEFAULT_KNOWN_MODELS``; they are kept across ``update_labels``.
        """
        self._extra_known_models = tuple(extra_known_models)
        self._known_models: frozenset[str] = frozenset()
        self._upstreams: frozenset[str] = frozenset()
        self.update_labels(known_models, upstream_names)

        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        registry = self.registry

        tallies = Tallies(registry)
        self._requests = tallies.tally(
            "oaproxy_requests",
            "Client requests by route, final status class and upstream.",
            ["route", "status_class", "upstream"],
        )
        self._duration = tallies.spread(
            "oaproxy_request_duration_seconds",
            "Time from request arrival to its end.",
            ["route"],
            LATENCY_BUCKETS,
        )
        self._ttfb = tallies.spread(
            "oaproxy_time_to_first_byte_seconds",
            "Time from request arrival to the first response byte sent to the client.",
            ["route", "stream"],
            LATENCY_BUCKETS,
        )
        self._attempts = tallies.tally(
            "oaproxy_attempts",
            "Upstream attempts by upstream and outcome.",
            ["upstream", "outcome"],
        )
        self._failovers = tallies.tally(
            "oaproxy_failovers",
            "Attempts that were followed by another, by the upstream left.",
            ["upstream"],
        )
        self._prefix_requests = tallies.tally(
            "oaproxy_prefix_requests",
            "Client requests by route prefix (none: /v1 itself) and final status class.",
            ["prefix", "status_class"],
        )
        self._attempt_counters = AttemptCounters(tallies, self.upstream_label)
        self._exhausted = tallies.tally(
            "oaproxy_failover_exhausted",
            "Requests for which every candidate upstream failed.",
            ["route"],
        )
        self._bytes_in = tallies.tally(
            "oaproxy_bytes_in",
            "Request body bytes received from clients.",
        )
        self._bytes_out = tallies.tally(
            "oaproxy_bytes_out",
            "Response body bytes sent to clients.",
        )
        self._tokens = tallies.tally(
            "oaproxy_tokens",
            "Tokens reported by upstreams, by upstream, model and kind.",
            ["upstream", "model", "kind"],
        )
        self._active_requests = tallies.level(
            "oaproxy_active_requests",
            "Client requests in progress.",
        )
        self._active_streams = tallies.level(
            "oaproxy_active_streams",
            "Client requests in progress that asked for a stream.",
        )
        self._alerts = tallies.tally(
            "oaproxy_alerts",
            "Alerts by channel and result.",
            ["channel", "result"],
        )
        self._rate_limited = tallies.tally(
            "oaproxy_rate_limited",
            "Requests refused by a limit, by its kind and scope.",
            ["kind", "scope"],
        )
        self._limiter_backend_errors = tallies.tally(
            "oaproxy_limiter_backend_errors",
            "Checks and settlements the limiter's backend (Redis) failed.",
        )
        self._cache = tallies.tally(
            "oaproxy_cache",
            "Response cache lookups by result (hit, miss, bypass), and entries stored (store).",
            ["result"],
        )
        self.front = FrontMetrics(tallies)
        tallies.register()
        self._sinks = _SinkCollector()
        registry.register(self._sinks)

    def active_streams(self) -> int:
        """Client requests in progress that asked for a stream (the dashboard's)."""
        value = self.registry.get_sample_value("oaproxy_active_streams")
        return int(value or 0)

    def update_labels(self, known_models: Iterable[str], upstream_names: Iterable[str]) -> None:
        """Replace the known models and upstream names, e.g. after a config
        reload. Collectors stay registered; series already counted under an
        old name keep their values.

        ``known_models`` is as for the constructor (paths are ignored);
        ``upstream_names`` are the configured upstreams' names.
        """
        models = {m for m in known_models if not m.startswith("/")}
        models.update(self._extra_known_models)
        # Swap whole frozensets so a label lookup never sees a half-update.
        self._known_models = frozenset(models)
        self._upstreams = frozenset(upstream_names)

    def model_label(self, model: str | None) -> str:
        """Return the model itself when known, ``"none"`` for ``None``, else
        ``"other"``.
        """
        return _bounded(model, self._known_models)

    def upstream_label(self, upstream: str | None) -> str:
        """Return the upstream name when configured, ``"none"`` for ``None``,
        else ``"other"``.
        """
        return _bounded(upstream, self._upstreams)

    def request_started(self, stream: bool) -> ActiveRequest:
        """Count a client request as active (and as an active stream when it
        asked for one).

        ``stream`` tells whether the request asked for a stream.  Returns the
        handle whose ``ActiveRequest.finish`` ends it; call that in a
        ``finally``, or pass it to ``request_finished``.
        """
        self._active_requests.value += 1
        if stream:
            self._active_streams.value += 1
        return ActiveRequest(self, stream)

    def request_finished(self, record: Record, active: ActiveRequest | None = None) -> None:
        """Count a finished client request from its record.

        Never raises: a failure to count is logged, and metrics never break
        a request.

        ``active`` is the handle from ``request_started``, finished here if
        given (finishing twice is harmless).
        """
        if active is not None:
            active.finish()
        try:
            self._count_record(record)
        except Exception:  # noqa: BLE001 -- counting must never fail a request
            self.log.failure("Could not count record {record_id} in metrics", record_id=record.id)

    def _count_record(self, record: Record) -> None:
        path = record.path
        if record.route is not None and path.startswith(record.route):
            # The API route under the prefix; the prefix has its own counter.
            path = path[len(record.route) :]
        route = route_label(path)
        upstream = self.upstream_label(record.upstream)
        klass = status_class(record.status)
        self._requests.inc((route, klass, upstream))
        # Only configured prefixes are ever a record's route: the label is bounded.
        self._prefix_requests.inc((record.route or NONE, klass))

        # The reactor's clock is the wall clock: a step back makes a time negative.
        if record.duration >= 0:
            self._duration.observe((route,), record.duration)
        if record.ttfb is not None and record.ttfb >= 0:
            self._ttfb.observe((route, "true" if record.stream else "false"), record.ttfb)

        attempts = record.attempts
        last = len(attempts) - 1
        for index, attempt in enumerate(attempts):
            attempt_upstream = self.upstream_label(attempt.upstream)
            self._attempts.inc((attempt_upstream, attempt_outcome(attempt)))
            if index < last:
                self._failovers.inc((attempt_upstream,))
        self._attempt_counters.count(record)
        if record.outcome is Outcome.EXHAUSTED:
            self._exhausted.inc((route,))
        if record.limit is not None:
            self._rate_limited.inc((record.limit.kind.value, record.limit.scope.value))

        if record.bytes_in:
            self._bytes_in.inc((), record.bytes_in)
        if record.bytes_out:
            self._bytes_out.inc((), record.bytes_out)

        if record.cache is not None:
            self._cache.inc((record.cache.value,))
        usage = record.usage
        # A cache hit's usage is the replayed answer's: no upstream used tokens.
        if usage is not None and record.cache is not CacheResult.HIT:
            model = self.model_label(record.model)
            if usage.prompt_tokens > 0:
                self._tokens.inc((upstream, model, "prompt"), usage.prompt_tokens)
            if usage.completion_tokens > 0:
                self._tokens.inc((upstream, model, "completion"), usage.completion_tokens)

    def limiter_backend_error(self) -> None:
        """Count one failure of the limiter's backend (see ``oaproxy.traffic.backend``)."""
        self._limiter_backend_errors.inc()

    def cache_stored(self) -> None:
        """Count one answer stored in the response cache."""
        self._cache.inc(("store",))

    def alert_sent(self, channel: str, result: str) -> None:
        """Count one alert, for the notifier.

        ``channel`` is one of ``ALERT_CHANNELS``, else counted as ``"other"``;
        ``result`` is one of ``ALERT_RESULTS`` (``"ok"``, ``"error"``,
        ``"timeout"``, ``"suppressed"`` by the rate limit), else ``"other"``.
        """
        channel = channel if channel in ALERT_CHANNELS else OTHER
        result = result if result in ALERT_RESULTS else OTHER
        self._alerts.inc((channel, result))

    def add_circuits(self, circuits: Circuits) -> None:
        """Expose each configured upstream's circuit as ``oaproxy_upstream_state``."""
        self.registry.register(CircuitCollector(circuits, lambda: sorted(self._upstreams)))

    def add_sink(self, name: str, sink: SinkStats) -> None:
        """Expose a record sink's counters, read at each scrape, as
        ``oaproxy_records_queued``, ``oaproxy_records_written_total``,
        ``oaproxy_records_spilled_total``, ``oaproxy_records_dropped_total``
        and ``oaproxy_sink_failures_total``, labelled ``sink=name``. A second
        sink under the same name replaces the first (config reload).
        """
        self._sinks.sinks[name] = sink

    def remove_sink(self, name: str) -> None:
        """Stop exposing the sink called ``name``; unknown names are ignored."""
        self._sinks.sinks.pop(name, None)
