"""The daemon's JSON log file: written in batches, never holding more than
its bound, flushed at stop."""

from __future__ import annotations

import io
import os
from contextlib import redirect_stderr
from typing import Any, cast

from twisted.internet.task import Clock
from twisted.logger import ILogObserver, Logger, LogPublisher
from twisted.trial.unittest import SynchronousTestCase

from oaproxy import logfile
from oaproxy.logfile import JSONLogFile
from tests.records import read_json_lines


class JSONLogFileTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.publisher = LogPublisher()
        self.path = os.path.join(self.mktemp(), "log", "oaproxy.jsonl")
        self.log = Logger(namespace="test", observer=self.publisher)
        self.service = JSONLogFile(self.path, self.clock, self.publisher)
        self.service.startService()
        self.addCleanup(self.stop)

    def stop(self) -> None:
        if self.service.running:
            self.service.stopService()

    def lines(self) -> list[dict[str, Any]]:
        return read_json_lines(self.path)

    def test_batched_on_the_next_turn(self) -> None:
        """Log events reach the file as JSON lines on the next reactor turn, not
        while they are logged."""
        self.log.info("first {n}", n=1)
        self.log.warn("second {n}", n=2)
        self.assertEqual(self.lines(), [])
        self.clock.advance(0)
        events = self.lines()
        self.assertEqual(
            [(e["log_format"], e["n"]) for e in events], [("first {n}", 1), ("second {n}", 2)]
        )
        self.assertEqual(events[1]["log_level"]["name"], "warn")

    def test_no_unpersistable_noise(self) -> None:
        """A line holds what was logged, not the logger and its source as
        ``{"unpersistable": true}``; other observers still get the whole event."""
        seen: list[dict[str, Any]] = []
        self.publisher.addObserver(cast(ILogObserver, seen.append))

        class Source:
            log = Logger(namespace="test", observer=self.publisher)

        Source().log.info("from {who}", who="a source")
        self.clock.advance(0)
        with open(self.path, encoding="utf-8") as f:
            text = f.read()
        self.assertNotIn("unpersistable", text)
        self.assertEqual(self.lines()[0]["who"], "a source")
        self.assertIn("log_source", seen[0])

    def test_stop_flushes_and_unsubscribes(self) -> None:
        """Stopping writes what is pending and stops listening: later events
        never reach the file."""
        self.log.info("last words")
        self.service.stopService()
        self.assertEqual([e["log_format"] for e in self.lines()], ["last words"])
        self.log.info("after stop")
        self.clock.advance(0)
        self.assertEqual(len(self.lines()), 1)

    def test_bounded(self) -> None:
        """Past its bound the pending queue drops the oldest lines and says on
        stderr how many were lost."""
        self.patch(logfile, "MAX_PENDING_LINES", 3)
        self.service.stopService()
        self.service = JSONLogFile(self.path, self.clock, self.publisher)
        self.service.startService()
        for n in range(5):
            self.log.info("line {n}", n=n)
        stderr = io.StringIO()
        with redirect_stderr(stderr):
            self.clock.advance(0)
        self.assertEqual([e["n"] for e in self.lines()], [2, 3, 4])
        self.assertIn("2 log lines lost", stderr.getvalue())
