"""The metrics of the front door: client connections, and the request bodies
held at once (``oaproxy.web.ProxySite``). Part of ``oaproxy.metrics.Metrics``."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

from oaproxy.channel import ClientClose


class FrontMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self._open = Gauge(
            "oaproxy_connections_open",
            "Client connections open now.",
            registry=registry,
        )
        self._refused = Counter(
            "oaproxy_connections_refused",
            "Client connections closed at once: max_connections were open.",
            registry=registry,
        )
        self._closed = Counter(
            "oaproxy_connections_closed",
            "Client connections oaproxy closed, by why: idle, slow_head, slow_body.",
            ["reason"],
            registry=registry,
        )
        for why in ClientClose:
            self._closed.labels(why.value)
        self._bodies = Gauge(
            "oaproxy_request_body_bytes",
            "Request body bytes held now (max_inflight_body_bytes).",
            registry=registry,
        )

    def connections_open(self, count: int) -> None:
        self._open.set(count)

    def connection_refused(self) -> None:
        self._refused.inc()

    def connection_closed(self, why: ClientClose) -> None:
        self._closed.labels(why.value).inc()

    def body_bytes_held(self, held: int) -> None:
        self._bodies.set(held)
