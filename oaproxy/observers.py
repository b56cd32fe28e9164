"""The observers every config has: records to the sinks, metrics, readiness,
alerts. Each sees a finished request's record (see ``oaproxy.pipeline``)."""

from __future__ import annotations

from twisted.web.server import Request

from oaproxy.alerts import Notifier, alert_from_record
from oaproxy.exchange import Exchange
from oaproxy.health import Readiness
from oaproxy.metrics import Metrics
from oaproxy.pipeline import Observer
from oaproxy.record import Record
from oaproxy.records import RecordEmitter


class RecordPublishing(Observer):
    """Emits each record to the record publisher, which the sinks observe."""

    def __init__(self, emitter: RecordEmitter) -> None:
        self._emitter = emitter

    def request_finished(self, exchange: Exchange, record: Record | None) -> None:
        if record is not None:
            self._emitter.emit(record)


class MetricsCounting(Observer):
    """The active gauges while a request runs, the counters when it is over."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def request_started(self, exchange: Exchange, request: Request) -> None:
        exchange.active = self._metrics.request_started(exchange.call.stream)

    def request_finished(self, exchange: Exchange, record: Record | None) -> None:
        if record is not None:
            self._metrics.request_finished(record, exchange.active)
        elif exchange.active is not None:
            exchange.active.finish()


class ReadinessFollowing(Observer):
    """Upstreams failing their recent attempts make ``/readyz`` say so."""

    def __init__(self, readiness: Readiness) -> None:
        self._readiness = readiness

    def request_finished(self, exchange: Exchange, record: Record | None) -> None:
        if record is not None:
            self._readiness.observe(record)


class Alerting(Observer):
    """Posts an alert for a request that exhausted failover or whose stream broke."""

    def __init__(self, notifier: Notifier) -> None:
        self._notifier = notifier

    def request_finished(self, exchange: Exchange, record: Record | None) -> None:
        alert = alert_from_record(record) if record is not None else None
        if alert is not None:
            self._notifier.alert(alert)
