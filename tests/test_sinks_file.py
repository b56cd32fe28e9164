"""Tests for ``oaproxy.sinks.file``: the JSON-lines record file."""

from __future__ import annotations

import io
import json
import os
from functools import partial
from typing import Any

from twisted.internet.task import Clock
from twisted.python.logfile import DailyLogFile, LogFile
from twisted.trial.unittest import SynchronousTestCase, TestCase

from oaproxy.record import record_document
from oaproxy.sinks import file
from oaproxy.sinks.file import FileSink
from tests.live import wait_for
from tests.records import calls_on_main_thread, emit, numbered, read_json_lines, usage

#: The records here: a served chat completion, with its usage.
served = partial(numbered, usage=usage(3, 4))

#: The sink's default flush_interval: what the Clock is advanced by to write.
FLUSH = 0.05


class FileSinkTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.base = self.mktemp()
        self.path = os.path.join(self.base, "deep", "records.jsonl")

    def sink(self, **options: Any) -> FileSink:
        clock: Any = self.clock
        sink = FileSink(
            self.path,
            spool_dir=os.path.join(self.base, "spool"),
            clock=clock,
            stderr=io.StringIO(),
            in_thread=False,  # on the test's Clock
            **options,
        )
        sink.startService()
        self.addCleanup(sink.stopService)
        return sink

    def lines(self, path: str | None = None) -> list[bytes]:
        with open(path or self.path, "rb") as f:
            return f.read().splitlines(keepends=True)

    def test_records_as_json_lines(self) -> None:
        """Each record is one compact UTF-8 JSON line, with non-ASCII text kept
        as is; the directory is created.
        """
        sink = self.sink()
        emit(sink, served(1))
        emit(sink, served(2, response_text="你好 ✓"))
        sink.observer({"log_namespace": "other", "record": served(3)})
        self.clock.advance(FLUSH)
        lines = self.lines()
        self.assertEqual(len(lines), 2)
        self.assertTrue(all(line.endswith(b"\n") for line in lines))
        self.assertNotIn(b" ", lines[0])
        self.assertIn("你好 ✓".encode(), lines[1])
        self.assertEqual(json.loads(lines[0]), record_document(served(1)))
        self.assertEqual(json.loads(lines[1])["response_text"], "你好 ✓")
        self.assertEqual(sink.written, 2)

    def test_appends(self) -> None:
        """A new sink appends to the existing file."""
        first = self.sink()
        emit(first, served(1))
        self.clock.advance(FLUSH)
        self.successResultOf(first.stopService())
        second = self.sink()
        emit(second, served(2))
        self.clock.advance(FLUSH)
        self.assertEqual(
            [json.loads(line)["id"] for line in self.lines()], [served(1).id, served(2).id]
        )

    def test_daily(self) -> None:
        """``rotate="daily"`` writes through a ``DailyLogFile``."""
        sink = self.sink(rotate="daily")
        self.assertIsInstance(sink._open(), DailyLogFile)

    def test_size_rotation(self) -> None:
        """A size rotates the file once it is reached."""
        # 30 records of some 600 bytes: a few files, fewer than ten (sorted
        # by name below).
        sink = self.sink(rotate="4KB")
        logfile = sink._open()
        self.assertIsInstance(logfile, LogFile)
        self.assertNotIsInstance(logfile, DailyLogFile)
        for number in range(30):
            emit(sink, served(number))
        self.clock.advance(FLUSH)
        self.assertTrue(os.path.exists(self.path + ".1"))
        ids = [
            json.loads(line)["id"]
            for path in sorted(
                (p for p in os.listdir(os.path.dirname(self.path)) if p != "records.jsonl"),
                reverse=True,
            )
            + ["records.jsonl"]
            for line in self.lines(os.path.join(os.path.dirname(self.path), path))
        ]
        self.assertEqual(ids, [served(n).id for n in range(30)])

    def test_unwritable_file_waits(self) -> None:
        """When the file cannot be opened the records wait (and spill), and are
        written once it can.
        """
        os.makedirs(os.path.dirname(self.path))
        os.mkdir(self.path)  # a directory where the file should be
        sink = self.sink(queue_size=2)
        for number in range(5):
            emit(sink, served(number))
        self.clock.advance(FLUSH)
        self.assertEqual((sink.failures, sink.queued, sink.spilled), (1, 2, 3))
        os.rmdir(self.path)
        self.clock.advance(0.5)
        self.assertEqual(
            [json.loads(line)["id"] for line in self.lines()],
            [served(n).id for n in range(5)],
        )


class FileSinkThreadTests(TestCase):
    async def test_encoded_in_the_writer_thread(self) -> None:
        """On the reactor, each record's JSON is made in the writer thread,
        which writes the batch; the pid is in each line."""
        on_main = calls_on_main_thread(self, file, "encode_record")
        base = self.mktemp()
        path = os.path.join(base, "records.jsonl")
        sink = FileSink(path, spool_dir=os.path.join(base, "spool"), stderr=io.StringIO())
        sink.startService()
        for number in range(3):
            emit(sink, served(number, pid=99))
        await wait_for(lambda: sink.written == 3, timeout=10)
        await sink.stopService()
        self.assertEqual(on_main, [False] * 3)
        self.assertEqual([line["pid"] for line in read_json_lines(path)], [99] * 3)
