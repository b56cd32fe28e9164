"""Each upstream's circuit, as this process knows it: the one object that
metrics (``oaproxy_upstream_state``), ``/readyz``, the log and the admin API
read, and that outlives a reload.

A circuit is closed until ``breaker.failures`` attempts in a row fail, or an
upstream answers 429 or 503 with ``Retry-After``; it is then open until its
time is up (``breaker.cooldown``, or what Retry-After said, whichever is
later), then half-open: one real request may probe it, and the first answer
closes it again. What counts is ``oaproxy.record.evidence``, readiness's
judgement too; ``oaproxy.breaker`` follows it and orders the candidates by
the circuits; with ``breaker.shared`` the state lives in Redis and this book
mirrors what Redis said last.

Times are the reactor's clock (wall time in the daemon, shared between
machines through NTP); Retry-After dates are read against the wall clock.
"""

from __future__ import annotations

import datetime
import email.utils
import enum
import re
from collections.abc import Callable, Iterable, Iterator, Mapping

from attrs import define, frozen
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

# An upstream's Retry-After is believed up to this long: a wrong clock or a
# bug on its side cannot park it for days.
MAX_RETRY_AFTER = 3600.0

_SECONDS = re.compile(r"[0-9]+(?:\.[0-9]+)?\Z")


class CircuitState(enum.Enum):
    """A circuit's state; the value is ``oaproxy_upstream_state``'s."""

    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2

    @property
    def label(self) -> str:
        return self.name.lower()


@frozen
class CircuitView:
    """One circuit, read-only."""

    state: CircuitState
    #: Failed attempts in a row.
    failures: int
    #: When the open time is (or was) up, on the reactor's clock; None when closed.
    open_until: float | None


@define
class _Circuit:
    failures: int = 0
    open_until: float | None = None
    # The request probing a half-open circuit: its token, and until when
    # the claim holds (a request that never finishes cannot keep it).
    probe_id: str | None = None
    probe_until: float = 0.0

    def state(self, now: float) -> CircuitState:
        if self.open_until is None:
            return CircuitState.CLOSED
        return CircuitState.OPEN if now < self.open_until else CircuitState.HALF_OPEN


def retry_after(value: str | None, wall_now: float) -> float | None:
    """The seconds a ``Retry-After`` value asks for (delta seconds or an HTTP
    date), at most ``MAX_RETRY_AFTER``; None for none, a past date or junk."""
    if value is None:
        return None
    value = value.strip()
    if _SECONDS.match(value):
        seconds = float(value)
    else:
        try:
            date = email.utils.parsedate_to_datetime(value)
            if date.tzinfo is None:
                # An HTTP date is GMT, said or not (never the local time).
                date = date.replace(tzinfo=datetime.timezone.utc)
            seconds = date.timestamp() - wall_now
        except (TypeError, ValueError, OverflowError):
            return None
    return min(seconds, MAX_RETRY_AFTER) if seconds > 0 else None


class Circuits:
    """The circuits of every upstream by name, with the state machine that
    moves them; transitions are logged."""

    log = Logger()

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self._circuits: dict[str, _Circuit] = {}

    def _circuit(self, name: str) -> _Circuit:
        circuit = self._circuits.get(name)
        if circuit is None:
            circuit = self._circuits[name] = _Circuit()
        return circuit

    # -- reading ---------------------------------------------------------------

    def now(self) -> float:
        return self._clock.seconds()

    def view(self, name: str) -> CircuitView:
        circuit = self._circuits.get(name) or _Circuit()
        return CircuitView(
            circuit.state(self._clock.seconds()), circuit.failures, circuit.open_until
        )

    def state(self, name: str) -> CircuitState:
        return self.view(name).state

    def views(self, names: Iterable[str]) -> Mapping[str, CircuitView]:
        return {name: self.view(name) for name in names}

    # -- the state machine ---------------------------------------------------------

    def claim(self, name: str, probe_id: str, hold: float) -> bool:
        """Whether the request ``probe_id`` may probe ``name`` in its normal
        place: always when closed, once per half-open period (for ``hold``
        seconds at most), never when open."""
        circuit = self._circuit(name)
        now = self._clock.seconds()
        state = circuit.state(now)
        if state is CircuitState.CLOSED:
            return True
        if state is CircuitState.OPEN:
            return False
        if circuit.probe_id not in (None, probe_id) and now < circuit.probe_until:
            return False
        if circuit.probe_id != probe_id:
            self.probing(name)
        circuit.probe_id, circuit.probe_until = probe_id, now + hold
        return True

    def probing(self, name: str) -> None:
        """A request was given the probe of the half-open ``name``."""
        self.log.info(
            "upstream {upstream}: circuit half_open, one request probes it", upstream=name
        )

    def failed(
        self,
        name: str,
        *,
        threshold: int,
        cooldown: float,
        hold: float | None,
        probe_id: str | None,
        why: str,
    ) -> None:
        """An attempt failed; ``hold`` is what Retry-After asked for."""
        circuit = self._circuit(name)
        now = self._clock.seconds()
        before = circuit.state(now)
        circuit.failures += 1
        until = circuit.open_until
        # A probe that fails opens the circuit for another cooldown when
        # failures opened it; one open only for a Retry-After is held for
        # what the new failure asks, if anything (probed again meanwhile).
        if circuit.failures >= threshold:
            until = max(until or now, now + cooldown)
        if hold is not None:
            until = max(until or now, now + hold)
        circuit.open_until = until
        if probe_id is not None and circuit.probe_id == probe_id:
            circuit.probe_id = None
        self.transition(name, before, circuit.state(now), failed_in_a_row(circuit.failures, why))

    def succeeded(self, name: str) -> None:
        """An attempt was answered: the circuit closes."""
        circuit = self._circuits.pop(name, None)
        if circuit is not None:
            before = circuit.state(self._clock.seconds())
            self.transition(name, before, CircuitState.CLOSED, "it answered")

    def release(self, name: str, probe_id: str) -> None:
        """The request ``probe_id`` did not probe after all."""
        circuit = self._circuits.get(name)
        if circuit is not None and circuit.probe_id == probe_id:
            circuit.probe_id = None

    # -- mirroring shared state ------------------------------------------------------

    def mirror(self, name: str, failures: int, open_until: float | None) -> CircuitState:
        """Take what the shared store says of ``name``; its state now."""
        circuit = self._circuit(name)
        circuit.failures, circuit.open_until = failures, open_until
        return circuit.state(self._clock.seconds())

    def transition(self, name: str, before: CircuitState, after: CircuitState, why: str) -> None:
        if before is after:
            return
        self.log.info(
            "upstream {upstream}: circuit {before} -> {after} ({why})",
            upstream=name,
            before=before.label,
            after=after.label,
            why=why,
        )


def failed_in_a_row(failures: int, why: str) -> str:
    """Why a circuit opened, for the log."""
    return f"{failures} failed in a row, the last: {why}"


class CircuitCollector:
    """``oaproxy_upstream_state{upstream}``, read from the circuits at scrape time."""

    def __init__(self, circuits: Circuits, upstream_names: Callable[[], list[str]]) -> None:
        self._circuits = circuits
        self._names = upstream_names

    def describe(self) -> Iterator[Metric]:
        yield self._family()

    def collect(self) -> Iterator[Metric]:
        family = self._family()
        for name, view in self._circuits.views(self._names()).items():
            family.add_metric([name], view.state.value)
        yield family

    def _family(self) -> GaugeMetricFamily:
        return GaugeMetricFamily(
            "oaproxy_upstream_state",
            "Each upstream's circuit: 0 closed, 1 half-open, 2 open.",
            labels=["upstream"],
        )
