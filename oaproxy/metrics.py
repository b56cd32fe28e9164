"""Prometheus metrics for oaproxy.

One ``Metrics`` object per process owns a private ``CollectorRegistry``: tests
build as many as they like and a config reload keeps the same object (see
``Metrics.update_labels``), so collectors are registered exactly once.

The forwarder calls ``Metrics.request_started`` when a client request arrives
and ``Metrics.request_finished`` with the record (the dict described in the
spec) when it is done; everything per request is derived from the record.
Every label value is bounded: models, routes and upstreams outside the
configured or well-known sets are counted as ``"other"``, so no client can
create new time series by sending made-up names.

``MetricsResource`` exposes the registry at ``/v1/metrics`` and ``/metrics``.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Protocol, cast

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
)
from twisted.logger import Logger
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource
from twisted.web.server import Request

from oaproxy.cache.ticket import CacheResult
from oaproxy.errors import error_body
from oaproxy.routing import NOT_BEARER, WRONG_KEY

__all__ = [
    "ALERT_CHANNELS",
    "ALERT_RESULTS",
    "DEFAULT_KNOWN_MODELS",
    "KNOWN_ROUTES",
    "LATENCY_BUCKETS",
    "ActiveRequest",
    "Metrics",
    "MetricsResource",
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
# A record's "cache", as counted in oaproxy_cache_total (besides "store").
CACHE_RESULTS: frozenset[str] = frozenset(result.value for result in CacheResult)

OTHER = "other"
NONE = "none"

# Prefixes of an attempt's "error" string, as agreed with the forwarder, and
# the outcome label each one maps to.
_ERROR_OUTCOMES: tuple[tuple[str, str], ...] = (
    ("timeout", "timeout"),
    ("connect", "connect_error"),
    ("cancelled", "cancelled"),
)

_TOKEN_KINDS: tuple[tuple[str, str], ...] = (
    ("prompt_tokens", "prompt"),
    ("completion_tokens", "completion"),
)


def status_class(status: object) -> str:
    """Return the class of an HTTP status code: ``"2xx"``, ``"4xx"``, …

    ``status`` is a status code, or ``None`` when there was no response.
    Returns ``"1xx"`` to ``"5xx"``, ``"none"`` for ``None``, ``"other"`` for
    anything else.
    """
    if status is None:
        return NONE
    if isinstance(status, int) and not isinstance(status, bool) and 100 <= status <= 599:
        return f"{status // 100}xx"
    return OTHER


def attempt_outcome(attempt: Mapping[str, Any]) -> str:
    """Map one attempt of a record to its outcome label.

    The forwarder's ``error`` strings start with ``"timeout"``, ``"connect"`` or
    ``"cancelled"`` (the client went away) for those failures; they win over
    the status, since a stream can time out after its 200 headers.

    ``attempt`` has the keys ``{"upstream", "status", "error", "ttfb",
    "duration"}``.  Returns ``"timeout"``, ``"connect_error"``,
    ``"cancelled"``, ``"ok"`` for a 2xx without error, the status class
    (``"4xx"``, ``"5xx"``, …) for any other status, or ``"error"`` otherwise
    (including a 2xx that broke with some other error, such as a stream cut
    mid-way).
    """
    error = attempt.get("error")
    status = attempt.get("status")
    if isinstance(error, str):
        for prefix, outcome in _ERROR_OUTCOMES:
            if error.startswith(prefix):
                return outcome
    klass = status_class(status)
    if klass == "2xx":
        return "error" if error else "ok"
    if klass in (NONE, OTHER):
        return "error"
    return klass


def route_label(path: object) -> str:
    """Return the bounded route label of a request path.

    ``path`` is the request path, possibly with a query string.  Returns one
    of ``KNOWN_ROUTES``, or ``"other"``.
    """
    if not isinstance(path, str):
        return OTHER
    path = path.partition("?")[0]
    parts = path.split("/", 4)
    # Longest route first: KNOWN_ROUTES are at most three segments deep, so
    # only the first three and the first two segments need looking up.
    for depth in (4, 3):
        candidate = "/".join(parts[:depth])
        if candidate in _KNOWN_ROUTES:
            return candidate
    return OTHER


def _bounded(value: object, allowed: frozenset[str]) -> str:
    if value is None:
        return NONE
    if isinstance(value, str) and value in allowed:
        return value
    return OTHER


def _seconds(value: object) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0:
        return float(value)
    return None


def _count(value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    return 0


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
                value = getattr(sink, attribute, None)
                # A sink without, say, a spool has no "spilled": leave the
                # series out rather than fail the whole scrape.
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    family.add_metric([sink_name], value)
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
        self._metrics._active_requests.dec()
        if self._stream:
            self._metrics._active_streams.dec()


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

        self._requests = Counter(
            "oaproxy_requests",
            "Client requests by route, final status class and upstream.",
            ["route", "status_class", "upstream"],
            registry=registry,
        )
        self._duration = Histogram(
            "oaproxy_request_duration_seconds",
            "Time from request arrival to its end.",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self._ttfb = Histogram(
            "oaproxy_time_to_first_byte_seconds",
            "Time from request arrival to the first response byte sent to the client.",
            ["route", "stream"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self._attempts = Counter(
            "oaproxy_attempts",
            "Upstream attempts by upstream and outcome.",
            ["upstream", "outcome"],
            registry=registry,
        )
        self._failovers = Counter(
            "oaproxy_failovers",
            "Attempts that were followed by another, by the upstream left.",
            ["upstream"],
            registry=registry,
        )
        self._exhausted = Counter(
            "oaproxy_failover_exhausted",
            "Requests for which every candidate upstream failed.",
            ["route"],
            registry=registry,
        )
        self._bytes_in = Counter(
            "oaproxy_bytes_in",
            "Request body bytes received from clients.",
            registry=registry,
        )
        self._bytes_out = Counter(
            "oaproxy_bytes_out",
            "Response body bytes sent to clients.",
            registry=registry,
        )
        self._tokens = Counter(
            "oaproxy_tokens",
            "Tokens reported by upstreams, by upstream, model and kind.",
            ["upstream", "model", "kind"],
            registry=registry,
        )
        self._active_requests = Gauge(
            "oaproxy_active_requests",
            "Client requests in progress.",
            registry=registry,
        )
        self._active_streams = Gauge(
            "oaproxy_active_streams",
            "Client requests in progress that asked for a stream.",
            registry=registry,
        )
        self._alerts = Counter(
            "oaproxy_alerts",
            "Alerts by channel and result.",
            ["channel", "result"],
            registry=registry,
        )
        self._cache = Counter(
            "oaproxy_cache",
            "Response cache lookups by result (hit, miss, bypass), and entries stored (store).",
            ["result"],
            registry=registry,
        )
        self._sinks = _SinkCollector()
        registry.register(self._sinks)

    def update_labels(self, known_models: Iterable[str], upstream_names: Iterable[str]) -> None:
        """Replace the known models and upstream names, e.g. after a config
        reload. Collectors stay registered; series already counted under an
        old name keep their values.

        ``known_models`` is as for the constructor (paths are ignored);
        ``upstream_names`` are the configured upstreams' names.
        """
        models = {m for m in known_models if isinstance(m, str) and not m.startswith("/")}
        models.update(self._extra_known_models)
        # Swap whole frozensets so a label lookup never sees a half-update.
        self._known_models = frozenset(models)
        self._upstreams = frozenset(n for n in upstream_names if isinstance(n, str))

    def model_label(self, model: object) -> str:
        """Return the model itself when known, ``"none"`` for ``None``, else
        ``"other"``.
        """
        return _bounded(model, self._known_models)

    def upstream_label(self, upstream: object) -> str:
        """Return the upstream name when configured, ``"none"`` for ``None``,
        else ``"other"``.
        """
        return _bounded(upstream, self._upstreams)

    def route_label(self, path: object) -> str:
        """Return the bounded route of ``path``; see the module's ``route_label``."""
        return route_label(path)

    def request_started(self, stream: bool) -> ActiveRequest:
        """Count a client request as active (and as an active stream when it
        asked for one).

        ``stream`` tells whether the request asked for a stream.  Returns the
        handle whose ``ActiveRequest.finish`` ends it; call that in a
        ``finally``, or pass it to ``request_finished``.
        """
        self._active_requests.inc()
        if stream:
            self._active_streams.inc()
        return ActiveRequest(self, stream)

    def request_finished(
        self, record: Mapping[str, Any], active: ActiveRequest | None = None
    ) -> None:
        """Count a finished client request from its record.

        Never raises: a malformed record is logged, and metrics never break
        a request.

        ``record`` is the record dict of the spec (``path``, ``status``,
        ``upstream``, ``ttfb``, ``duration``, ``bytes_in``, ``bytes_out``,
        ``usage``, ``model``, ``stream``, ``attempts``, ``outcome``).
        ``active`` is the handle from ``request_started``, finished here if
        given (finishing twice is harmless).
        """
        if active is not None:
            active.finish()
        try:
            self._count_record(record)
        except Exception:  # noqa: BLE001 -- counting must never fail a request
            self.log.failure(
                "Could not count record {record_id} in metrics",
                record_id=record.get("id"),
            )

    def _count_record(self, record: Mapping[str, Any]) -> None:
        route = route_label(record.get("path"))
        upstream = self.upstream_label(record.get("upstream"))
        self._requests.labels(route, status_class(record.get("status")), upstream).inc()

        duration = _seconds(record.get("duration"))
        if duration is not None:
            self._duration.labels(route).observe(duration)
        ttfb = _seconds(record.get("ttfb"))
        if ttfb is not None:
            stream = "true" if record.get("stream") else "false"
            self._ttfb.labels(route, stream).observe(ttfb)

        attempts = record.get("attempts") or ()
        last = len(attempts) - 1
        for index, attempt in enumerate(attempts):
            if not isinstance(attempt, Mapping):
                continue
            attempt_upstream = self.upstream_label(attempt.get("upstream"))
            self._attempts.labels(attempt_upstream, attempt_outcome(attempt)).inc()
            if index < last:
                self._failovers.labels(attempt_upstream).inc()
        if record.get("outcome") == "exhausted":
            self._exhausted.labels(route).inc()

        bytes_in = _count(record.get("bytes_in"))
        if bytes_in:
            self._bytes_in.inc(bytes_in)
        bytes_out = _count(record.get("bytes_out"))
        if bytes_out:
            self._bytes_out.inc(bytes_out)

        cache = record.get("cache")
        if cache in CACHE_RESULTS:
            self._cache.labels(cache).inc()
        usage = record.get("usage")
        # A cache hit's usage is the replayed answer's: no upstream used tokens.
        if isinstance(usage, Mapping) and cache != CacheResult.HIT.value:
            model = self.model_label(record.get("model"))
            for key, kind in _TOKEN_KINDS:
                tokens = _count(usage.get(key))
                if tokens:
                    self._tokens.labels(upstream, model, kind).inc(tokens)

    def cache_stored(self) -> None:
        """Count one answer stored in the response cache."""
        self._cache.labels("store").inc()

    def alert_sent(self, channel: str, result: str) -> None:
        """Count one alert, for the notifier.

        ``channel`` is one of ``ALERT_CHANNELS``, else counted as ``"other"``;
        ``result`` is one of ``ALERT_RESULTS`` (``"ok"``, ``"error"``,
        ``"timeout"``, ``"suppressed"`` by the rate limit), else ``"other"``.
        """
        channel = channel if channel in ALERT_CHANNELS else OTHER
        result = result if result in ALERT_RESULTS else OTHER
        self._alerts.labels(channel, result).inc()

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


class MetricsResource(Resource):
    """Serves the metrics in the Prometheus text format (or OpenMetrics when the
    scraper asks for it), optionally behind a bearer key.

    ``metrics_key`` is the key scrapers must send as
    ``Authorization: Bearer <key>``, or ``None`` for an open endpoint.
    Assignable on reload.
    """

    isLeaf = True

    def __init__(self, metrics: Metrics, metrics_key: str | None = None) -> None:
        super().__init__()
        self._metrics = metrics
        self.metrics_key = metrics_key

    def render(self, request: IRequest) -> bytes:
        # Site hands us a server.Request; the cast lets mypy see its methods
        # with or without the mypy-zope plugin.
        return self._render(cast(Request, request))

    def _render(self, request: Request) -> bytes:
        # Our own 405: Resource.render's goes through a deprecated error page.
        if request.method not in (b"GET", b"HEAD"):
            request.setResponseCode(405)
            request.setHeader(b"allow", b"GET, HEAD")
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            return b"Method Not Allowed\n"
        return self._render_get(request)

    def _render_get(self, request: Request) -> bytes:
        refusal = self._refusal(request)
        if refusal is not None:
            request.setResponseCode(401)
            request.setHeader(b"content-type", b"application/json")
            request.setHeader(b"www-authenticate", b"Bearer")
            return error_body(refusal, code="invalid_api_key")
        accept = request.getHeader(b"accept")
        encoder, content_type = choose_encoder(accept.decode("latin-1") if accept else "")
        output = encoder(self._metrics.registry)
        request.setHeader(b"content-type", content_type.encode("ascii"))
        request.setHeader(b"cache-control", b"no-store")
        return output

    def _refusal(self, request: Request) -> str | None:
        key = self.metrics_key
        if not key:
            return None
        header = request.getHeader(b"authorization")
        if header is None or not header.startswith(b"Bearer "):
            return NOT_BEARER
        given = header[len(b"Bearer ") :].strip()
        if not hmac.compare_digest(given, key.encode("utf-8")):
            return WRONG_KEY
        return None
