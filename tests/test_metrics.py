"""Tests for ``oaproxy.metrics`` and the resource scrapers read, ``oaproxy.scrape``."""

from __future__ import annotations

import random
import string
from typing import cast

import attrs
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import IResource, Resource
from twisted.web.server import Site

from oaproxy.metrics import (
    DEFAULT_KNOWN_MODELS,
    KNOWN_ROUTES,
    LATENCY_BUCKETS,
    Metrics,
    attempt_outcome,
    route_label,
    status_class,
)
from oaproxy.record import FailureKind, Outcome, Record
from oaproxy.scrape import MetricsResource
from tests.doubles import Client, Reply, Scrape, SinkCounters
from tests.payloads import error_body, http_request
from tests.records import attempt, record, usage

UPSTREAMS = ("alpha", "beta")
ALLOW = ("llama-3-70b", "/v1/audio/transcriptions", "gpt-4o-mini")


def make_metrics() -> Metrics:
    return Metrics(known_models=ALLOW, upstream_names=UPSTREAMS)


def scrape(metrics: Metrics) -> Scrape:
    from prometheus_client import generate_latest

    return Scrape(generate_latest(metrics.registry).decode("utf-8"))


def get(
    resource: Resource,
    path: bytes = b"/metrics",
    method: bytes = b"GET",
    headers: dict[bytes, bytes] | None = None,
) -> Reply:
    """Ask a real ``Site`` for ``path`` over an in-memory transport, with the
    resource mounted where the lead mounts it: ``/metrics`` and ``/v1/metrics``.
    """
    root = Resource()
    v1 = Resource()
    # cast: without the mypy-zope plugin mypy cannot see that a Resource
    # provides IResource.
    root.putChild(b"metrics", cast(IResource, resource))
    root.putChild(b"v1", cast(IResource, v1))
    v1.putChild(b"metrics", cast(IResource, resource))
    client = Client(Site(root))
    lines = [(b"Connection", b"close"), *(headers or {}).items()]
    client.send(http_request(method, path, header_lines=lines))
    client.disconnect()
    return client.reply()


class LabelTests(SynchronousTestCase):
    def test_status_class(self) -> None:
        """Statuses are labelled by class; no status is 'none'; a number
        outside 100-599 is 'other'."""
        self.assertEqual(status_class(200), "2xx")
        self.assertEqual(status_class(204), "2xx")
        self.assertEqual(status_class(429), "4xx")
        self.assertEqual(status_class(502), "5xx")
        self.assertEqual(status_class(None), "none")
        self.assertEqual(status_class(99), "other")
        self.assertEqual(status_class(600), "other")

    def test_attempt_outcome(self) -> None:
        """Failures with a label of their own win over the status; answers
        are labelled by their status class."""
        status = FailureKind.STATUS
        cases = [
            (attempt("a", 200), "ok"),
            (attempt("a", 201), "ok"),
            (attempt("a", 429, failure=status), "4xx"),
            (attempt("a", 400), "4xx"),
            (attempt("a", 503, failure=status), "5xx"),
            (attempt("a", None, "timeout after 10s", failure=FailureKind.TIMEOUT), "timeout"),
            (
                attempt("a", None, "connect error: …", failure=FailureKind.CONNECT_ERROR),
                "connect_error",
            ),
            (
                attempt("a", None, "connect error: …", failure=FailureKind.DNS_ERROR),
                "connect_error",
            ),
            (
                attempt("a", None, "connect error: …", failure=FailureKind.TLS_ERROR),
                "connect_error",
            ),
            (attempt("a", None, "cancelled: …", failure=FailureKind.CANCELLED), "cancelled"),
            (
                attempt("a", 200, "cancelled: …", failure=FailureKind.CLIENT_STOPPED_READING),
                "cancelled",
            ),
            # A stream that fell silent after its 200 headers timed out.
            (attempt("a", 200, "stream idle …", failure=FailureKind.STREAM_IDLE), "timeout"),
            # A 200 that broke some other way did not succeed.
            (
                attempt("a", 200, "PotentialDataLoss", failure=FailureKind.UPSTREAM_ENDED_EARLY),
                "error",
            ),
            (attempt("a", None, "ConnectionLost", failure=FailureKind.OTHER), "error"),
            (
                attempt("a", None, "response body over …", failure=FailureKind.BODY_TOO_LARGE),
                "error",
            ),
            (attempt("a", None, None), "error"),
            (attempt("a", 502, "bad gateway body", failure=status), "5xx"),
        ]
        for given_attempt, expected in cases:
            self.assertEqual(attempt_outcome(given_attempt), expected, given_attempt)

    def test_every_failure_kind_has_a_label(self) -> None:
        """No failure kind falls through to an unbounded label."""
        labels = {"ok", "4xx", "5xx", "timeout", "connect_error", "cancelled", "error"}
        for kind in FailureKind:
            self.assertIn(attempt_outcome(attempt("a", 503, "x", failure=kind)), labels, kind)

    def test_route_label(self) -> None:
        """Paths are labelled by their known route, query and ids dropped;
        anything else is 'other'."""
        cases = [
            ("/v1/chat/completions", "/v1/chat/completions"),
            ("/v1/chat/completions?api-version=2024", "/v1/chat/completions"),
            ("/v1/completions", "/v1/completions"),
            ("/v1/files/file-abc", "/v1/files"),
            ("/v1/files/file-abc/content", "/v1/files"),
            ("/v1/models/", "/v1/models"),
            ("/v1/models/gpt-4o", "/v1/models"),
            ("/v1/fine_tuning/jobs/ftjob-1/events", "/v1/fine_tuning/jobs"),
            ("/v1/audio/transcriptions", "/v1/audio/transcriptions"),
            ("/v1/audio/other", "other"),
            ("/v1/chat", "other"),
            ("/v1/chat/completionsX", "other"),
            ("/v1/filesystem", "other"),
            ("/v2/chat/completions", "other"),
            ("", "other"),
            ("/", "other"),
        ]
        for path, expected in cases:
            self.assertEqual(route_label(path), expected, path)

    @given(st.text())
    def test_route_label_bounded(self, path: str) -> None:
        """Any text at all gets one of the known routes or 'other'."""
        self.assertIn(route_label(path), (*KNOWN_ROUTES, "other"))

    def test_model_label(self) -> None:
        """Models named in allow lists or known by default keep their names; no
        model is 'none'; unknown models and paths are 'other'."""
        metrics = make_metrics()
        self.assertEqual(metrics.model_label("llama-3-70b"), "llama-3-70b")
        self.assertEqual(metrics.model_label("gpt-4o-mini"), "gpt-4o-mini")
        self.assertEqual(metrics.model_label("whisper-1"), "whisper-1")
        self.assertEqual(metrics.model_label(None), "none")
        self.assertEqual(metrics.model_label("my-secret-finetune"), "other")
        # Allow entries starting with "/" are paths, not models.
        self.assertEqual(metrics.model_label("/v1/audio/transcriptions"), "other")

    def test_default_known_models(self) -> None:
        """OpenAI's common models are known by default, unless the default list is turned off."""
        for model in (
            "gpt-4o",
            "gpt-4o-mini",
            "o3",
            "text-embedding-3-small",
            "whisper-1",
            "tts-1",
            "dall-e-3",
            "gpt-3.5-turbo",
        ):
            self.assertIn(model, DEFAULT_KNOWN_MODELS)
        metrics = Metrics(["mine"], UPSTREAMS, extra_known_models=())
        self.assertEqual(metrics.model_label("gpt-4o"), "other")
        self.assertEqual(metrics.model_label("mine"), "mine")

    def test_upstream_label(self) -> None:
        """Configured upstreams keep their names; an unknown one is 'other', none is 'none'."""
        metrics = make_metrics()
        self.assertEqual(metrics.upstream_label("alpha"), "alpha")
        self.assertEqual(metrics.upstream_label("ghost"), "other")
        self.assertEqual(metrics.upstream_label(None), "none")

    def test_update_labels(self) -> None:
        """A reload swaps the label sets without registering anything again;
        what was counted before stays.
        """
        metrics = make_metrics()
        metrics.request_finished(record(upstream="alpha"))
        metrics.update_labels(["qwen-72b"], ["gamma"])
        self.assertEqual(metrics.model_label("qwen-72b"), "qwen-72b")
        self.assertEqual(metrics.model_label("llama-3-70b"), "other")
        self.assertEqual(metrics.model_label("gpt-4o"), "gpt-4o")
        self.assertEqual(metrics.upstream_label("alpha"), "other")
        metrics.request_finished(record(upstream="gamma"))
        result = scrape(metrics)
        labels = {"route": "/v1/chat/completions", "status_class": "2xx"}
        self.assertEqual(result.value("oaproxy_requests_total", upstream="alpha", **labels), 1)
        self.assertEqual(result.value("oaproxy_requests_total", upstream="gamma", **labels), 1)


class TrafficTests(SynchronousTestCase):
    """Known traffic in, exact values out."""

    def setUp(self) -> None:
        self.metrics = make_metrics()
        feed = [
            # A 200 stream with usage.
            record(
                stream=True,
                ttfb=0.3,
                duration=4.0,
                bytes_in=100,
                bytes_out=2000,
                attempts=[attempt("alpha", 200, ttfb=0.3)],
                usage=usage(10, 20),
            ),
            # A failover from alpha's 503 to beta, then success.
            record(
                path="/v1/embeddings?x=1",
                model="text-embedding-3-small",
                attempts=[
                    attempt("alpha", 503, failure=FailureKind.STATUS),
                    attempt("beta", 200),
                ],
                upstream="beta",
                ttfb=1.5,
                duration=1.6,
                bytes_in=50,
                bytes_out=500,
                usage=usage(5, 0),
            ),
            # Exhausted: alpha timed out, beta refused the connection.
            record(
                attempts=[
                    attempt("alpha", None, "timeout after 10s", None, failure=FailureKind.TIMEOUT),
                    attempt(
                        "beta", None, "connect error: …", None, failure=FailureKind.CONNECT_ERROR
                    ),
                ],
                upstream=None,
                status=502,
                outcome=Outcome.EXHAUSTED,
                ttfb=25.0,
                duration=25.0,
                bytes_in=10,
                bytes_out=300,
            ),
            # The client went away during the only attempt.
            record(
                attempts=[
                    attempt(
                        "alpha",
                        None,
                        "cancelled: client disconnected",
                        None,
                        failure=FailureKind.CANCELLED,
                    )
                ],
                upstream=None,
                status=499,
                outcome=Outcome.CLIENT_DISCONNECTED,
                ttfb=None,
                duration=0.7,
                stream=True,
            ),
            # A made-up model on a made-up route through an unknown upstream.
            record(
                path="/v1/files/file-abc",
                model="my-private-model-123",
                attempts=[attempt("ghost", 200)],
                upstream="ghost",
                usage=usage(7, 3),
            ),
            record(
                path="/v1/not-a-route",
                model="my-private-model-123",
                usage=usage(1, 2),
            ),
        ]
        for each in feed:
            self.metrics.request_finished(each)
        self.scrape = scrape(self.metrics)

    def test_requests(self) -> None:
        """Requests are counted by route, status class and the upstream that
        answered, six series for six kinds of request."""
        value = self.scrape.value
        chat = "/v1/chat/completions"
        self.assertEqual(
            value(
                "oaproxy_requests_total",
                route=chat,
                status_class="2xx",
                upstream="alpha",
            ),
            1,
        )
        self.assertEqual(
            value(
                "oaproxy_requests_total",
                route="/v1/embeddings",
                status_class="2xx",
                upstream="beta",
            ),
            1,
        )
        self.assertEqual(
            value(
                "oaproxy_requests_total",
                route=chat,
                status_class="5xx",
                upstream="none",
            ),
            1,
        )
        self.assertEqual(
            value(
                "oaproxy_requests_total",
                route=chat,
                status_class="4xx",
                upstream="none",
            ),
            1,
        )
        self.assertEqual(
            value(
                "oaproxy_requests_total",
                route="/v1/files",
                status_class="2xx",
                upstream="other",
            ),
            1,
        )
        self.assertEqual(
            value(
                "oaproxy_requests_total",
                route="other",
                status_class="2xx",
                upstream="alpha",
            ),
            1,
        )
        self.assertEqual(len(self.scrape.series("oaproxy_requests_total")), 6)

    def test_attempts(self) -> None:
        """Attempts are counted by upstream and outcome label: ok, 5xx, timeout,
        cancelled, connect_error."""
        value = self.scrape.value
        self.assertEqual(value("oaproxy_attempts_total", upstream="alpha", outcome="ok"), 2)
        self.assertEqual(value("oaproxy_attempts_total", upstream="alpha", outcome="5xx"), 1)
        self.assertEqual(value("oaproxy_attempts_total", upstream="alpha", outcome="timeout"), 1)
        self.assertEqual(value("oaproxy_attempts_total", upstream="alpha", outcome="cancelled"), 1)
        self.assertEqual(value("oaproxy_attempts_total", upstream="beta", outcome="ok"), 1)
        self.assertEqual(
            value("oaproxy_attempts_total", upstream="beta", outcome="connect_error"), 1
        )
        self.assertEqual(value("oaproxy_attempts_total", upstream="other", outcome="ok"), 1)
        self.assertEqual(len(self.scrape.series("oaproxy_attempts_total")), 7)

    def test_failovers(self) -> None:
        """A failover is counted for each upstream left for another (never for
        the last one tried), and an exhausted request once for its route."""
        value = self.scrape.value
        # Left alpha twice (503, timeout); never left beta, the last one tried.
        self.assertEqual(value("oaproxy_failovers_total", upstream="alpha"), 2)
        self.assertIsNone(value("oaproxy_failovers_total", upstream="beta"))
        self.assertEqual(value("oaproxy_failover_exhausted_total", route="/v1/chat/completions"), 1)
        self.assertEqual(
            self.scrape.series("oaproxy_failover_exhausted_total"),
            [{"route": "/v1/chat/completions"}],
        )

    def test_duration_histogram(self) -> None:
        """Request durations fill the histogram's buckets by route,
        cumulatively, with every bucket present."""
        value = self.scrape.value
        chat = "/v1/chat/completions"
        # Chat durations: 4.0, 25.0, 0.7, and 0.6 for the "other" route.
        expected = {
            "0.5": 0,
            "1.0": 1,
            "2.5": 1,
            "5.0": 2,
            "20.0": 2,
            "30.0": 3,
            "300.0": 3,
            "+Inf": 3,
        }
        for le, count in expected.items():
            self.assertEqual(
                value("oaproxy_request_duration_seconds_bucket", route=chat, le=le),
                count,
                le,
            )
        self.assertEqual(value("oaproxy_request_duration_seconds_count", route=chat), 3)
        self.assertAlmostEqual(value("oaproxy_request_duration_seconds_sum", route=chat) or 0, 29.7)
        buckets = {
            s["le"]
            for s in self.scrape.series("oaproxy_request_duration_seconds_bucket")
            if s["route"] == chat
        }
        self.assertEqual(len(buckets), len(LATENCY_BUCKETS) + 1)

    def test_ttfb_histogram(self) -> None:
        """Time to first byte is observed by route and stream flag; a request
        that sent no byte is not observed."""
        value = self.scrape.value
        chat = "/v1/chat/completions"
        self.assertEqual(
            value(
                "oaproxy_time_to_first_byte_seconds_bucket",
                route=chat,
                stream="true",
                le="0.25",
            ),
            0,
        )
        self.assertEqual(
            value(
                "oaproxy_time_to_first_byte_seconds_bucket",
                route=chat,
                stream="true",
                le="0.5",
            ),
            1,
        )
        # The cancelled stream sent no byte: not observed.
        self.assertEqual(
            value("oaproxy_time_to_first_byte_seconds_count", route=chat, stream="true"),
            1,
        )
        self.assertEqual(
            value(
                "oaproxy_time_to_first_byte_seconds_bucket",
                route=chat,
                stream="false",
                le="20.0",
            ),
            0,
        )
        self.assertEqual(
            value(
                "oaproxy_time_to_first_byte_seconds_bucket",
                route=chat,
                stream="false",
                le="30.0",
            ),
            1,
        )
        self.assertEqual(
            value(
                "oaproxy_time_to_first_byte_seconds_bucket",
                route="/v1/embeddings",
                stream="false",
                le="2.5",
            ),
            1,
        )
        self.assertEqual(
            value(
                "oaproxy_time_to_first_byte_seconds_bucket",
                route="/v1/embeddings",
                stream="false",
                le="1.0",
            ),
            0,
        )

    def test_bytes(self) -> None:
        """Bytes in and out are summed over all requests."""
        self.assertEqual(self.scrape.value("oaproxy_bytes_in_total"), 160)
        self.assertEqual(self.scrape.value("oaproxy_bytes_out_total"), 2800)

    def test_tokens(self) -> None:
        """Tokens are counted by upstream, model and kind; unknown models and
        upstreams are folded into 'other', and no private name, path or id
        reaches the scrape."""
        value = self.scrape.value
        self.assertEqual(
            value(
                "oaproxy_tokens_total",
                upstream="alpha",
                model="gpt-4o-mini",
                kind="prompt",
            ),
            10,
        )
        self.assertEqual(
            value(
                "oaproxy_tokens_total",
                upstream="alpha",
                model="gpt-4o-mini",
                kind="completion",
            ),
            20,
        )
        self.assertEqual(
            value(
                "oaproxy_tokens_total",
                upstream="beta",
                model="text-embedding-3-small",
                kind="prompt",
            ),
            5,
        )
        self.assertIsNone(
            value(
                "oaproxy_tokens_total",
                upstream="beta",
                model="text-embedding-3-small",
                kind="completion",
            )
        )
        self.assertEqual(
            value("oaproxy_tokens_total", upstream="other", model="other", kind="prompt"),
            7,
        )
        self.assertEqual(
            value(
                "oaproxy_tokens_total",
                upstream="alpha",
                model="other",
                kind="completion",
            ),
            2,
        )
        self.assertNotIn("my-private-model-123", self.scrape.text)
        self.assertNotIn("ghost", self.scrape.text)
        self.assertNotIn("not-a-route", self.scrape.text)
        self.assertNotIn("file-abc", self.scrape.text)


class CardinalityTests(SynchronousTestCase):
    def test_random_names_add_no_series(self) -> None:
        """A thousand made-up models, upstreams and paths add no time series
        once the first of them made the "other" series exist.
        """
        metrics = make_metrics()
        rng = random.Random(1234)

        def name() -> str:
            return "".join(rng.choices(string.ascii_letters + string.digits + "-/.", k=16))

        def one() -> Record:
            return record(
                model=name(),
                path="/v1/" + name(),
                upstream=name(),
                attempts=[attempt(name(), 500, failure=FailureKind.STATUS), attempt(name(), 200)],
                usage=usage(1, 1),
            )

        metrics.request_finished(one())
        before = len(scrape(metrics).samples)
        for _ in range(1000):
            metrics.request_finished(one())
        after = scrape(metrics)
        self.assertEqual(len(after.samples), before)
        self.assertEqual(
            after.value("oaproxy_tokens_total", upstream="other", model="other", kind="prompt"),
            1001,
        )


class ActiveTests(SynchronousTestCase):
    def gauges(self, metrics: Metrics) -> tuple[float | None, float | None]:
        result = scrape(metrics)
        return (
            result.value("oaproxy_active_requests"),
            result.value("oaproxy_active_streams"),
        )

    def test_started_and_finished(self) -> None:
        """The active gauges count requests and streams under way; finishing one
        twice changes nothing, and request_finished ends it too."""
        metrics = make_metrics()
        self.assertEqual(self.gauges(metrics), (0, 0))
        stream = metrics.request_started(stream=True)
        plain = metrics.request_started(stream=False)
        self.assertEqual(self.gauges(metrics), (2, 1))
        stream.finish()
        self.assertEqual(self.gauges(metrics), (1, 0))
        # Finishing again (a finally after request_finished) changes nothing.
        stream.finish()
        self.assertEqual(self.gauges(metrics), (1, 0))
        metrics.request_finished(record(), plain)
        self.assertEqual(self.gauges(metrics), (0, 0))
        plain.finish()
        self.assertEqual(self.gauges(metrics), (0, 0))

    def test_exception_in_forwarder(self) -> None:
        """The try/finally pattern keeps the gauges exact when the forwarder
        fails before it has a record.
        """
        metrics = make_metrics()

        def forward() -> None:
            active = metrics.request_started(stream=True)
            try:
                raise RuntimeError("boom")
            finally:
                active.finish()

        self.assertRaises(RuntimeError, forward)
        self.assertEqual(self.gauges(metrics), (0, 0))

    def test_counting_failure(self) -> None:
        """A record that cannot be counted is logged, never raised into the
        forwarder, and still finishes the active request.
        """
        metrics = make_metrics()
        active = metrics.request_started(stream=False)
        broken = attrs.evolve(record(), attempts=5)  # type: ignore[arg-type]
        metrics.request_finished(broken, active)
        self.assertEqual(len(self.flushLoggedErrors(TypeError)), 1)
        self.assertEqual(self.gauges(metrics), (0, 0))

    def test_negative_times_and_tokens_not_counted(self) -> None:
        """A wall clock stepping back, or an upstream's nonsense token count,
        is left out rather than counted."""
        metrics = make_metrics()
        metrics.request_finished(record(duration=-1.0, ttfb=-0.5, usage=usage(-5, 3)))
        result = scrape(metrics)
        chat = "/v1/chat/completions"
        self.assertIsNone(result.value("oaproxy_request_duration_seconds_count", route=chat))
        self.assertIsNone(
            result.value("oaproxy_time_to_first_byte_seconds_count", route=chat, stream="false")
        )
        labels = {"upstream": "alpha", "model": "gpt-4o-mini"}
        self.assertIsNone(result.value("oaproxy_tokens_total", kind="prompt", **labels))
        self.assertEqual(result.value("oaproxy_tokens_total", kind="completion", **labels), 3)


class SinkAndAlertTests(SynchronousTestCase):
    def test_sinks_read_at_scrape(self) -> None:
        """Each sink's counters are read at every scrape, live; a removed sink
        leaves the scrape, and removing one never added is harmless."""
        metrics = make_metrics()
        redis = SinkCounters(3, 100, 7, 1, 2)
        metrics.add_sink("redis", redis)
        metrics.add_sink("file", SinkCounters(0, 50, 0, 0, 0))
        result = scrape(metrics)
        self.assertEqual(result.value("oaproxy_records_queued", sink="redis"), 3)
        self.assertEqual(result.value("oaproxy_records_written_total", sink="redis"), 100)
        self.assertEqual(result.value("oaproxy_records_spilled_total", sink="redis"), 7)
        self.assertEqual(result.value("oaproxy_records_dropped_total", sink="redis"), 1)
        self.assertEqual(result.value("oaproxy_sink_failures_total", sink="redis"), 2)
        self.assertEqual(result.value("oaproxy_records_written_total", sink="file"), 50)

        # Values are read live, at each scrape.
        redis.queued = 0
        redis.written = 110
        result = scrape(metrics)
        self.assertEqual(result.value("oaproxy_records_queued", sink="redis"), 0)
        self.assertEqual(result.value("oaproxy_records_written_total", sink="redis"), 110)

        metrics.remove_sink("redis")
        metrics.remove_sink("never-added")
        result = scrape(metrics)
        self.assertEqual(result.series("oaproxy_records_queued"), [{"sink": "file"}])

    def test_alerts(self) -> None:
        """Alerts are counted by channel and result; an unknown channel or result is 'other'."""
        metrics = make_metrics()
        metrics.alert_sent("feishu", "ok")
        metrics.alert_sent("feishu", "ok")
        metrics.alert_sent("matrix", "error")
        metrics.alert_sent("pigeon", "lost")
        result = scrape(metrics)
        self.assertEqual(result.value("oaproxy_alerts_total", channel="feishu", result="ok"), 2)
        self.assertEqual(result.value("oaproxy_alerts_total", channel="matrix", result="error"), 1)
        self.assertEqual(result.value("oaproxy_alerts_total", channel="other", result="other"), 1)


class RegistryTests(SynchronousTestCase):
    def test_private_registries(self) -> None:
        """Two instances neither collide nor share values, and neither touches
        the global registry.
        """
        from prometheus_client import REGISTRY

        first, second = make_metrics(), make_metrics()
        first.request_finished(record())
        self.assertEqual(
            scrape(first).value(
                "oaproxy_requests_total",
                route="/v1/chat/completions",
                status_class="2xx",
                upstream="alpha",
            ),
            1,
        )
        self.assertEqual(scrape(second).series("oaproxy_requests_total"), [])
        self.assertIsNone(REGISTRY.get_sample_value("oaproxy_active_requests"))

    def test_process_and_platform(self) -> None:
        """The scrape has the process and platform collectors."""
        result = scrape(make_metrics())
        self.assertTrue(result.series("python_info"))
        self.assertIsNotNone(result.value("process_resident_memory_bytes"))
        self.assertIsNotNone(result.value("process_cpu_seconds_total"))


class ResourceTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.metrics = make_metrics()
        self.metrics.request_finished(record())

    def assertMetrics(self, response: Reply) -> None:
        self.assertEqual(response.status, 200)
        self.assertTrue((response.header(b"content-type") or b"").startswith(b"text/plain"))
        result = Scrape(response.body.decode("utf-8"))
        self.assertEqual(
            result.value(
                "oaproxy_requests_total",
                route="/v1/chat/completions",
                status_class="2xx",
                upstream="alpha",
            ),
            1,
        )

    def assertUnauthorized(self, response: Reply, message: str) -> None:
        self.assertEqual(response.status, 401)
        self.assertEqual(response.header(b"content-type"), b"application/json")
        self.assertEqual(response.json(), error_body(message, "invalid_api_key"))
        self.assertNotIn(b"oaproxy_", response.body)

    def test_open(self) -> None:
        """Without a metrics key the resource answers the exposition at /metrics and /v1/metrics."""
        resource = MetricsResource(self.metrics)
        self.assertMetrics(get(resource, b"/metrics"))
        self.assertMetrics(get(resource, b"/v1/metrics"))

    def test_key_required(self) -> None:
        """With a metrics key, a missing, non-bearer or wrong key gets OpenAI's
        401 without any metric or a hint of the key; the right one gets the
        scrape."""
        resource = MetricsResource(self.metrics, metrics_key="scrape-secret")
        self.assertUnauthorized(get(resource), "authorization header should start with 'Bearer'")
        self.assertUnauthorized(
            get(resource, headers={b"Authorization": b"Basic c2NyYXBlLXNlY3JldA=="}),
            "authorization header should start with 'Bearer'",
        )
        wrong = get(
            resource,
            b"/v1/metrics",
            headers={b"Authorization": b"Bearer scrape-secreT"},
        )
        self.assertUnauthorized(wrong, "wrong authorization header")
        self.assertNotIn(b"scrape-secre", wrong.body)
        self.assertMetrics(
            get(
                resource,
                b"/v1/metrics",
                headers={b"Authorization": b"Bearer scrape-secret"},
            )
        )

    def test_key_changed_on_reload(self) -> None:
        """A key changed on the resource takes effect at once: the old one is
        refused, and with no key set the scrape is open again."""
        resource = MetricsResource(self.metrics, metrics_key="old")
        resource.metrics_key = "new"
        self.assertEqual(get(resource, headers={b"Authorization": b"Bearer old"}).status, 401)
        self.assertMetrics(get(resource, headers={b"Authorization": b"Bearer new"}))
        resource.metrics_key = None
        self.assertMetrics(get(resource))

    def test_openmetrics(self) -> None:
        """A Prometheus server asking for OpenMetrics gets it."""
        resource = MetricsResource(self.metrics)
        response = get(
            resource,
            headers={b"Accept": b"application/openmetrics-text;version=1.0.0,text/plain;q=0.5"},
        )
        self.assertEqual(response.status, 200)
        self.assertTrue(
            (response.header(b"content-type") or b"").startswith(b"application/openmetrics-text")
        )
        samples = [
            s
            for f in openmetrics_families(response.body.decode("utf-8"))
            for s in f.samples
            if s.name == "oaproxy_requests_total"
        ]
        self.assertEqual([s.value for s in samples], [1])

    def test_only_get(self) -> None:
        """Any method but GET and HEAD is answered 405 naming those two."""
        response = get(MetricsResource(self.metrics), method=b"POST")
        self.assertEqual(response.status, 405)
        self.assertEqual(response.header(b"allow"), b"GET, HEAD")

    def test_head(self) -> None:
        """HEAD answers 200 without a body."""
        response = get(MetricsResource(self.metrics), method=b"HEAD")
        self.assertEqual(response.status, 200)
        self.assertEqual(response.body, b"")
