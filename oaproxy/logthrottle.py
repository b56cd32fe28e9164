"""Log lines that repeat, rate-limited: what many clients (or one hostile
client) can make the daemon say must not fill its journal.

``RepeatLimit`` sits between a ``Logger`` and the observer it writes to.
Of the events of one kind (namespace and format) it passes the first of
each interval at once and only counts the others; when the interval ends,
one more event says how many there were. A thousand idle connections timing
out write two lines a minute, not a thousand.
"""

from __future__ import annotations

from typing import Any

from attrs import define
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import ILogObserver, Logger
from zope.interface import implementer

#: Seconds over which the repeats of one kind of line are counted.
REPEAT_INTERVAL = 60.0

_Kind = tuple[str | None, str | None]


@define
class _Window:
    first: dict[str, Any]
    closes: IDelayedCall
    repeats: int = 0


@implementer(ILogObserver)
class RepeatLimit:
    """Passes on the first event of each kind per ``interval``; then one
    event with the count of those held back."""

    def __init__(
        self, observer: ILogObserver, clock: IReactorTime, interval: float = REPEAT_INTERVAL
    ) -> None:
        self._clock = clock
        self._interval = interval
        self._windows: dict[_Kind, _Window] = {}
        self._log = Logger(namespace="oaproxy.logthrottle", observer=observer)
        self._observer = observer

    def __call__(self, event: dict[str, Any]) -> None:
        kind = (event.get("log_namespace"), event.get("log_format"))
        window = self._windows.get(kind)
        if window is not None:
            window.repeats += 1
            return
        closes = self._clock.callLater(self._interval, self._close, kind)
        self._windows[kind] = _Window(event, closes)
        self._observer(event)

    def _close(self, kind: _Kind) -> None:
        window = self._windows.pop(kind)
        if window.repeats:
            self._log.emit(
                window.first["log_level"],
                "{repeats} more like this in the last {interval:g}s: {line}",
                repeats=window.repeats,
                interval=self._interval,
                # The format, not a formatted event: the repeats differed.
                line=kind[1],
            )

    def flush(self) -> None:
        """Say what is held back now (at stop): no count is left unsaid."""
        for kind, window in list(self._windows.items()):
            window.closes.cancel()
            self._close(kind)
