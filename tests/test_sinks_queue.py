"""Tests for ``oaproxy.sinks.queue``: the bounded queue, backoff, spill and replay."""

from __future__ import annotations

import io
import json
import os
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from oaproxy.record import Record, encode_record
from oaproxy.sinks.queue import RECORD_NAMESPACE, QueuedSink
from tests.records import emit, numbered


def number_of(record_id: str) -> int:
    return int(record_id[1:])


class RecordingSink(QueuedSink):
    """A sink whose backend is a list; ``mode`` says how writes end."""

    def __init__(self, **options: Any) -> None:
        options.setdefault("name", "test")
        super().__init__(**options)
        self.mode = "ok"
        self.stored: list[int] = []
        self.batches: list[list[int]] = []
        self.pending: list[tuple[list[Record], Deferred[object]]] = []

    def write_batch(self, records: list[Record]) -> Deferred[object]:
        numbers = [number_of(record.id) for record in records]
        self.batches.append(numbers)
        if self.mode == "ok":
            self.stored.extend(numbers)
            return succeed(None)
        if self.mode == "fail":
            return fail(ConnectionError("backend down"))
        d: Deferred[object] = Deferred()
        self.pending.append((records, d))
        return d

    def succeed_pending(self) -> None:
        records, d = self.pending.pop(0)
        self.stored.extend(number_of(record.id) for record in records)
        d.callback(None)


class QueuedSinkTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.stderr = io.StringIO()
        self.spool_dir = self.mktemp()

    def sink(self, **options: Any) -> RecordingSink:
        # The state machine's tests write on the next turn (flush_interval 0,
        # records of one turn still share a batch); the timer's own tests
        # (BatchTimerTests) run the default.
        options.setdefault("flush_interval", 0)
        options.setdefault("clock", self.clock)
        options.setdefault("spool_dir", self.spool_dir)
        options.setdefault("stderr", self.stderr)
        return RecordingSink(**options)

    def next_delay(self) -> float:
        (call,) = self.clock.calls
        return call.getTime() - self.clock.seconds()

    def feed(self, sink: QueuedSink, numbers: range) -> None:
        for number in numbers:
            emit(sink, numbered(number))

    def write_spool(self, *lines: bytes) -> None:
        """A spool file left by an earlier run, holding these lines."""
        os.makedirs(self.spool_dir)
        with open(os.path.join(self.spool_dir, "test.jsonl"), "wb") as f:
            f.writelines(line + b"\n" for line in lines)

    def spool_lines(self, name: str = "test") -> list[int]:
        path = os.path.join(self.spool_dir, f"{name}.jsonl")
        if not os.path.exists(path):
            return []
        with open(path, "rb") as f:
            return [number_of(json.loads(line)["id"]) for line in f]

    def test_observer_picks_record_events(self) -> None:
        """Only ``oaproxy.record`` events with a ``Record`` are queued."""
        sink = self.sink()
        sink.observer({"log_namespace": "oaproxy.web", "record": {"id": "x"}})
        sink.observer({"log_namespace": RECORD_NAMESPACE})
        sink.observer({"log_namespace": RECORD_NAMESPACE, "record": "nope"})
        self.assertEqual(sink.queued, 0)
        emit(sink, numbered(1))
        self.assertEqual(sink.queued, 1)

    def test_observer_never_raises(self) -> None:
        """Trouble inside the observer goes to stderr, not to the caller."""
        sink = self.sink()
        sink.observer(None)  # type: ignore[arg-type]
        self.assertIn("observer error", self.stderr.getvalue())

    def test_batches(self) -> None:
        """Records queued in one reactor turn are written in order, in batches."""
        sink = self.sink(batch_size=100)
        sink.startService()
        self.feed(sink, range(250))
        self.assertEqual(sink.stored, [])
        self.clock.advance(0)
        self.assertEqual(sink.stored, list(range(250)))
        self.assertEqual([len(b) for b in sink.batches], [100, 100, 50])
        self.assertEqual((sink.written, sink.queued, sink.failures), (250, 0, 0))

    def test_queued_before_start(self) -> None:
        """Records observed before the service starts are written once it does."""
        sink = self.sink()
        self.feed(sink, range(3))
        self.clock.advance(1)
        self.assertEqual(sink.stored, [])
        sink.startService()
        self.clock.advance(0)
        self.assertEqual(sink.stored, [0, 1, 2])

    def test_backoff(self) -> None:
        """A failing backend is retried after 0.5 s, doubling up to 10 s; the
        records wait in the queue, and are written when it is back.
        """
        sink = self.sink()
        sink.mode = "fail"
        sink.startService()
        self.feed(sink, range(3))
        self.clock.advance(0)
        delays = []
        for _ in range(8):
            delay = self.next_delay()
            delays.append(delay)
            self.clock.advance(delay)
        self.assertEqual(delays, [0.5, 1, 2, 4, 8, 10, 10, 10])
        self.assertEqual(sink.failures, 9)
        self.assertEqual(sink.queued, 3)
        self.assertEqual(self.stderr.getvalue().count("write failed"), 1)
        sink.mode = "ok"
        self.clock.advance(10)
        self.assertEqual(sink.stored, [0, 1, 2])
        self.assertIn("backend is back", self.stderr.getvalue())
        # The backoff starts over after a success.
        sink.mode = "fail"
        self.feed(sink, range(3, 4))
        self.clock.advance(0)
        self.assertEqual(self.next_delay(), 0.5)

    def test_write_timeout(self) -> None:
        """A write that never answers fails after ``write_timeout``."""
        sink = self.sink(write_timeout=5)
        sink.mode = "hang"
        sink.startService()
        self.feed(sink, range(2))
        self.clock.advance(0)
        self.assertEqual(sink.failures, 0)
        self.clock.advance(5)
        self.assertEqual(sink.failures, 1)
        self.assertEqual(sink.queued, 2)

    def test_spill_and_replay_in_order(self) -> None:
        """A full queue spills its oldest records to the spool; when the backend
        is back the spool is replayed first, then deleted.
        """
        sink = self.sink(queue_size=10, batch_size=7)
        sink.mode = "fail"
        sink.startService()
        self.feed(sink, range(35))
        self.clock.advance(0)
        self.assertEqual((sink.queued, sink.spilled), (10, 25))
        self.assertEqual(self.spool_lines(), list(range(25)))
        self.assertGreater(sink.spool_bytes, 0)
        sink.mode = "ok"
        self.clock.advance(0.5)
        self.assertEqual(sink.stored, list(range(35)))
        self.assertEqual((sink.written, sink.replayed, sink.dropped), (35, 25, 0))
        self.assertFalse(os.path.exists(os.path.join(self.spool_dir, "test.jsonl")))
        self.assertEqual(sink.spool_bytes, 0)

    def test_spill_during_replay(self) -> None:
        """Records spilled while the spool is replayed go after it."""
        sink = self.sink(queue_size=2, batch_size=3)
        sink.mode = "fail"
        sink.startService()
        self.feed(sink, range(8))
        self.clock.advance(0)
        sink.mode = "hang"
        self.clock.advance(0.5)
        self.assertEqual(sink.batches[-1], [0, 1, 2])
        self.feed(sink, range(8, 12))
        sink.mode = "ok"
        sink.succeed_pending()
        self.assertEqual(sink.stored, list(range(12)))

    def test_inflight_spill_then_success(self) -> None:
        """Records spilled while their batch is being written are not written a
        second time when that write succeeds.
        """
        sink = self.sink(queue_size=5)
        sink.mode = "hang"
        sink.startService()
        self.feed(sink, range(5))
        self.clock.advance(0)
        self.assertEqual(sink.batches, [[0, 1, 2, 3, 4]])
        self.feed(sink, range(5, 12))
        self.assertEqual(self.spool_lines(), list(range(7)))
        sink.mode = "ok"
        sink.succeed_pending()
        self.assertEqual(sink.stored, list(range(12)))
        self.assertEqual(sink.written, 12)

    def test_inflight_spill_then_failure(self) -> None:
        """When the batch fails instead, its spilled records are replayed from
        the spool, before the rest of the queue.
        """
        sink = self.sink(queue_size=5)
        sink.mode = "hang"
        sink.startService()
        self.feed(sink, range(5))
        self.clock.advance(0)
        self.feed(sink, range(5, 12))
        sink.pending.pop()[1].errback(ConnectionError("lost"))
        sink.mode = "ok"
        self.clock.advance(0.5)
        self.assertEqual(sink.stored, list(range(12)))
        self.assertEqual((sink.written, sink.failures), (12, 1))

    def test_stop_flushes(self) -> None:
        """Stopping writes what is queued."""
        sink = self.sink()
        sink.startService()
        self.feed(sink, range(5))
        d = sink.stopService()
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(sink.stored, list(range(5)))

    def test_stop_spools_the_rest_and_next_run_replays(self) -> None:
        """What the backend did not take within ``flush_timeout`` goes to the
        spool; the next sink on that spool replays it first, in order.
        """
        sink = self.sink(queue_size=10, flush_timeout=10)
        sink.mode = "fail"
        sink.startService()
        self.feed(sink, range(30))
        self.clock.advance(0)
        d = sink.stopService()
        self.assertNoResult(d)
        self.clock.advance(10)
        self.successResultOf(d)
        self.assertEqual(self.spool_lines(), list(range(30)))
        self.assertEqual(sink.queued, 0)
        # Records arriving after the stop go straight to the spool.
        self.feed(sink, range(30, 32))
        self.assertEqual(self.spool_lines(), list(range(32)))

        again = self.sink(queue_size=10)
        again.startService()
        # The spool is read at start (a sink it replaces may write it till then).
        self.assertGreater(again.spool_bytes, 0)
        self.feed(again, range(32, 40))
        self.clock.advance(0)
        self.assertEqual(again.stored, list(range(40)))
        self.assertEqual(again.replayed, 32)
        self.assertEqual(self.spool_lines(), [])

    def test_stop_keeps_replay_offset(self) -> None:
        """A spool replayed in part at stop is resumed where it stopped."""
        first = self.sink(queue_size=1)
        self.feed(first, range(30))
        self.assertEqual(len(self.spool_lines()), 29)
        first.spool.close()

        second = self.sink(batch_size=10, flush_timeout=3)
        second.mode = "hang"
        second.startService()
        self.clock.advance(0)
        second.succeed_pending()
        self.assertEqual(second.batches, [list(range(10)), list(range(10, 20))])
        d = second.stopService()
        self.clock.advance(3)
        self.successResultOf(d)
        self.assertEqual(second.failures, 1)

        third = self.sink()
        third.startService()
        self.clock.advance(0)
        # The rest of the spool; record 29 only ever lived in the memory of
        # the first sink, which was never started nor stopped.
        self.assertEqual(third.stored, list(range(10, 29)))
        self.assertEqual(self.spool_lines(), [])

    def test_dropped_when_spool_fails(self) -> None:
        """A record that not even the spool takes is counted and reported."""
        blocker = self.mktemp()
        with open(blocker, "w") as f:
            f.write("a file, not a directory")
        sink = self.sink(queue_size=2, spool_dir=os.path.join(blocker, "spool"))
        self.feed(sink, range(5))
        self.assertEqual((sink.queued, sink.spilled, sink.dropped), (2, 0, 3))
        self.assertIn("records dropped", self.stderr.getvalue())

    def test_undecodable_spool_line(self) -> None:
        """A damaged spool line (e.g. a crash mid-write) is skipped and counted."""
        self.write_spool(
            encode_record(numbered(1)), encode_record(numbered(2))[:40], encode_record(numbered(3))
        )
        sink = self.sink()
        sink.startService()
        self.clock.advance(0)
        self.assertEqual(sink.stored, [1, 3])
        self.assertEqual(sink.dropped, 1)

    def test_spool_line_that_is_no_record(self) -> None:
        """A JSON line that is not a record of the schema is skipped and
        counted like a damaged one (the sinks never see it)."""
        self.write_spool(encode_record(numbered(1)), b'{"n": 2}', encode_record(numbered(3)))
        sink = self.sink()
        sink.startService()
        self.clock.advance(0)
        self.assertEqual(sink.stored, [1, 3])
        self.assertEqual(sink.dropped, 1)
        self.assertIn("undecodable line", self.stderr.getvalue())


class BatchTimerTests(SynchronousTestCase):
    """The default triggers: every 50 ms, or at once when 500 records wait."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.sink = RecordingSink(clock=self.clock, spool_dir=self.mktemp(), stderr=io.StringIO())
        self.sink.startService()

    def feed(self, numbers: range) -> None:
        for number in numbers:
            emit(self.sink, numbered(number))

    def test_defaults(self) -> None:
        """A sink flushes every 50 ms or every 500 records unless told otherwise."""
        self.assertEqual((self.sink.flush_interval, self.sink.batch_size), (0.05, 500))

    def test_interval(self) -> None:
        """Records short of a batch are written together once 50 ms have passed
        since the first of them, not on the next reactor turn."""
        self.feed(range(3))
        self.clock.advance(0.03)
        self.feed(range(3, 5))
        self.clock.advance(0.0199)
        self.assertEqual(self.sink.batches, [])
        self.clock.advance(0.0001)
        self.assertEqual(self.sink.batches, [[0, 1, 2, 3, 4]])
        self.assertEqual(self.clock.getDelayedCalls(), [])
        # The next record starts a new interval.
        self.feed(range(5, 6))
        self.clock.advance(0.049)
        self.assertEqual(len(self.sink.batches), 1)
        self.clock.advance(0.001)
        self.assertEqual(self.sink.batches[1:], [[5]])

    def test_full_batch_at_once(self) -> None:
        """The 500th record has its batch written on the next turn; the rest
        waits for the timer."""
        self.feed(range(499))
        self.clock.advance(0)
        self.assertEqual(self.sink.batches, [])
        self.feed(range(499, 1203))
        self.clock.advance(0)
        self.assertEqual([len(batch) for batch in self.sink.batches], [500, 500])
        self.clock.advance(0.05)
        self.assertEqual([len(batch) for batch in self.sink.batches], [500, 500, 203])
        self.assertEqual(self.sink.stored, list(range(1203)))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_interval_passes_during_a_write(self) -> None:
        """Records that came during a write, and whose 50 ms passed meanwhile,
        are written as soon as that write ends."""
        self.sink.mode = "hang"
        self.feed(range(2))
        self.clock.advance(0.05)
        self.assertEqual(self.sink.batches, [[0, 1]])
        self.feed(range(2, 4))
        self.clock.advance(0.05)
        self.assertEqual(len(self.sink.batches), 1)
        self.sink.succeed_pending()
        self.assertEqual(self.sink.batches, [[0, 1], [2, 3]])
        # Still hanging: the third write waits its turn, nothing else does.
        self.feed(range(4, 5))
        self.sink.succeed_pending()
        self.assertEqual(len(self.sink.batches), 2)
        self.clock.advance(0.05)
        self.assertEqual(self.sink.batches[2:], [[4]])

    def test_retry_writes_at_once(self) -> None:
        """After a backoff the waiting records are written without another 50 ms."""
        self.sink.mode = "fail"
        self.feed(range(2))
        self.clock.advance(0.05)
        self.assertEqual(self.sink.failures, 1)
        self.sink.mode = "ok"
        self.clock.advance(0.5)
        self.assertEqual(self.sink.stored, [0, 1])

    def test_stop_writes_without_waiting(self) -> None:
        """Stopping (SIGTERM) writes a part batch at once and leaves no timer."""
        self.feed(range(3))
        d = self.sink.stopService()
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(self.sink.stored, [0, 1, 2])
        self.assertEqual(self.clock.getDelayedCalls(), [])
