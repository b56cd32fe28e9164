"""The daemon's own log as JSON lines in ``log_file``.

The observer only appends to a bounded deque; the lines are written in a
batch on the next reactor turn, so a burst of log events (an upstream
outage logging one failure per request) costs one write, not one per event.
"""

from __future__ import annotations

import os
import sys
from collections import deque
from typing import IO, Any

from twisted.application.service import Service
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import ILogObserver, LogPublisher, eventAsJSON, globalLogPublisher
from zope.interface import implementer

# The logger and the object that logged: no JSON has them, and each would
# be written as {"unpersistable": true} on every line (log_namespace says
# who logged).
_NOT_WRITTEN = ("log_logger", "log_source")

# Lines held while the disk is slow; past this the oldest are let go (and
# counted on stderr): the daemon's log must never grow its memory.
MAX_PENDING_LINES = 10000


@implementer(ILogObserver)
class JSONLogFile(Service):
    """Appends every log event of ``publisher`` to ``path`` as a JSON line."""

    def __init__(
        self, path: str, clock: IReactorTime, publisher: LogPublisher = globalLogPublisher
    ) -> None:
        self.path = path
        self._clock = clock
        self._publisher = publisher
        self._pending: deque[str] = deque(maxlen=MAX_PENDING_LINES)
        self._lost = 0
        self._flush_call: IDelayedCall | None = None
        self._file: IO[str] | None = None

    def __call__(self, event: dict[str, Any]) -> None:
        if len(self._pending) == MAX_PENDING_LINES:
            self._lost += 1
        written = {key: value for key, value in event.items() if key not in _NOT_WRITTEN}
        self._pending.append(eventAsJSON(written))
        if self._flush_call is None and self._file is not None:
            self._flush_call = self._clock.callLater(0, self._flush)

    def startService(self) -> None:
        super().startService()
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed at stop
        self._publisher.addObserver(self)

    def stopService(self) -> None:
        super().stopService()
        self._publisher.removeObserver(self)
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self._flush()
        if self._file is not None:
            self._file.close()
            self._file = None

    def _flush(self) -> None:
        self._flush_call = None
        if self._file is None or not self._pending:
            return
        lines, self._pending = self._pending, deque(maxlen=MAX_PENDING_LINES)
        try:
            self._file.write("".join(line + "\n" for line in lines))
            self._file.flush()
        except OSError as e:
            # Never back through the logger: that would feed this observer.
            print(f"oaproxy: cannot write the log file {self.path}: {e}", file=sys.stderr)
        if self._lost:
            print(f"oaproxy: {self._lost} log lines lost (log file too slow)", file=sys.stderr)
            self._lost = 0
