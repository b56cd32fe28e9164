"""The metrics of the front door: client connections, and the request bodies
held at once (``oaproxy.web.ProxySite``). Part of ``oaproxy.metrics.Metrics``."""

from __future__ import annotations

from oaproxy.channel import ClientClose
from oaproxy.tallies import Tallies


class FrontMetrics:
    def __init__(self, tallies: Tallies) -> None:
        self._open = tallies.level("oaproxy_connections_open", "Client connections open now.")
        self._refused = tallies.tally(
            "oaproxy_connections_refused",
            "Client connections closed at once: max_connections were open.",
        )
        self._closed = tallies.tally(
            "oaproxy_connections_closed",
            "Client connections oaproxy closed, by why: idle, slow_head, slow_body.",
            ["reason"],
        )
        for why in ClientClose:
            self._closed.touch((why.value,))
        self._bodies = tallies.level(
            "oaproxy_request_body_bytes",
            "Request body bytes held now (max_inflight_body_bytes).",
        )

    def connections_open(self, count: int) -> None:
        self._open.value = count

    def connection_refused(self) -> None:
        self._refused.inc()

    def connection_closed(self, why: ClientClose) -> None:
        self._closed.inc((why.value,))

    def body_bytes_held(self, held: int) -> None:
        self._bodies.value = held
