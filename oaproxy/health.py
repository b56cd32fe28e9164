"""``/readyz``: whether this instance should get traffic.

Ready means at least one upstream is usable (not failing every attempt
lately, and its circuit not open) and no record sink dropped a record
lately. ``/healthz`` only says the process serves. Only failures that are the
upstream's own count (``record.evidence``, the circuit breakers' judgement
too): a client asking for a model no upstream has cannot make the instance
unready.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.web.resource import Resource
from twisted.web.server import Request

from oaproxy.circuits import Circuits, CircuitState
from oaproxy.record import Evidence, Record, evidence

# Consecutive failed attempts after which an upstream counts as unusable
# until one of its attempts succeeds again.
FAILING_AFTER = 3
# How long a dropped record keeps the instance unready.
DROP_MEMORY = 60.0


class Readiness:
    """Follows upstream attempts and sink drops, from the records."""

    def __init__(self, clock: IReactorTime, circuits: Circuits) -> None:
        self._clock = clock
        self._circuits = circuits
        self._failures: dict[str, int] = {}
        self._upstreams: tuple[str, ...] = ()
        self._sinks: Mapping[str, Any] = {}
        self._drops: dict[str, tuple[int, float]] = {}

    def configure(self, upstreams: Iterable[str], sinks: Mapping[str, Any]) -> None:
        self._upstreams = tuple(upstreams)
        self._failures = {name: self._failures.get(name, 0) for name in self._upstreams}
        self._sinks = sinks

    def observe(self, record: Record) -> None:
        for attempt in record.attempts:
            name = attempt.upstream
            if name not in self._failures:
                continue
            found = evidence(attempt)
            if found is Evidence.FAILED:
                self._failures[name] += 1
            elif found is Evidence.ANSWERED:
                self._failures[name] = 0

    def failing(self, upstream: str) -> bool:
        """Whether ``upstream`` failed its last ``FAILING_AFTER`` attempts."""
        return self._failures.get(upstream, 0) >= FAILING_AFTER

    def state(self) -> tuple[bool, dict[str, Any]]:
        now = self._clock.seconds()
        circuits = self._circuits.views(self._upstreams)
        usable = [
            name
            for name in self._upstreams
            if not self.failing(name) and circuits[name].state is not CircuitState.OPEN
        ]
        dropping = []
        for name, sink in self._sinks.items():
            count, since = self._drops.get(name, (0, -DROP_MEMORY))
            if sink.dropped > count:
                count, since = sink.dropped, now
                self._drops[name] = (count, since)
            if now - since < DROP_MEMORY:
                dropping.append(name)
        ready = bool(usable) and not dropping
        return ready, {
            "status": "ready" if ready else "unready",
            "usable_upstreams": usable,
            "failing_upstreams": [n for n in self._upstreams if n not in usable],
            "circuits": {name: view.state.label for name, view in circuits.items()},
            "sinks": {
                name: {"queued": sink.queued, "spilled": sink.spilled, "dropped": sink.dropped}
                for name, sink in self._sinks.items()
            },
            "dropping_sinks": dropping,
        }


class ReadyResource(Resource):
    isLeaf = True

    def __init__(self, state: Callable[[], tuple[bool, dict[str, Any]]]) -> None:
        super().__init__()
        self._state = state

    def render_GET(self, request: Request) -> bytes:
        ready, details = self._state()
        request.setResponseCode(200 if ready else 503)
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(details).encode("utf-8")
