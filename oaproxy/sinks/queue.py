"""The shared base of the record sinks: a bounded queue that spills to disk.

A sink's observer only appends the record to an in-memory deque; a drain
loop writes batches to the backend: every ``flush_interval`` seconds (50 ms)
or as soon as ``batch_size`` records (500) wait, whichever comes first, so
that one transaction carries many records and the reactor sees one write per
batch rather than one per request.  While the backend fails, records wait
(retried with capped exponential backoff); when the deque is full its
oldest records are appended to a spool file, which is replayed - in order,
before the deque - once the backend answers again.  Stopping the sink
flushes what it can within a deadline and spools the rest, so records
survive restarts.  This module is that state machine; the spool file is
``oaproxy.sinks.spool.Spool``'s.

Order invariant: everything in the spool is older than everything in the
deque.  Overflow always spills the oldest record, and a batch is taken from
the deque only when the spool has nothing left to replay.  A batch taken
from the deque stays at the head of the deque while it is written: if
overflow spills some of it meanwhile, those records land at the very start
of the (then empty) spool, and are skipped there if the write succeeds.
"""

from __future__ import annotations

import os
import sys
from collections import deque
from collections.abc import Callable
from itertools import islice
from typing import IO, Literal, Protocol, cast

from twisted.application.service import Service
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import ILogObserver, LogEvent
from twisted.python.failure import Failure
from zope.interface import implementer

from oaproxy.record import Record, decode_record, encode_record
from oaproxy.sinks.spool import Spool

#: The twisted.logger namespace of record events (see the forwarder).
RECORD_NAMESPACE = "oaproxy.record"

_State = Literal["new", "running", "stopping", "stopped"]


class _DelayedCall(Protocol):
    # The part of IDelayedCall used here, as a Protocol: type-checks the
    # same with or without the mypy-zope plugin.
    def active(self) -> bool: ...

    def cancel(self) -> None: ...


class _Clock(Protocol):
    def callLater(
        self,
        delay: float,
        callable: Callable[..., object],
        *args: object,
        **kwargs: object,
    ) -> _DelayedCall: ...


@implementer(ILogObserver)
class RecordObserver:
    """The log observer of one sink: hands record events to ``QueuedSink.observe``."""

    def __init__(self, sink: QueuedSink) -> None:
        self.sink = sink

    def __call__(self, event: LogEvent) -> None:
        self.sink.observe(event)

    def __repr__(self) -> str:
        return f"<RecordObserver of {self.sink.name!r}>"


class QueuedSink(Service):
    """Base of a record sink: a ``Service`` whose ``observer`` queues records and
    whose drain loop hands them to ``write_batch`` in batches.

    Subclasses implement ``write_batch``, and may override ``open_backend``
    (called from ``startService``) and ``close_backend`` (called from
    ``stopService`` after the final flush).

    A batch is written ``flush_interval`` seconds after the first of its
    records came, or on the next reactor turn once ``batch_size`` records
    wait (0 writes whenever the backend is free).  Records in memory are as
    durable as they are today: a SIGTERM (``stopService``) writes them at
    once, without waiting for the timer; only a crash (``kill -9``, power)
    loses them, at most ``flush_interval`` more than before.

    ``spool`` is the ``Spool`` that takes the records the queue has no room
    for, and those left at stop.

    Counters (read by the metrics): ``queued`` (records in memory now),
    ``written`` (records the backend confirmed), ``replayed`` (of those, read
    back from the spool), ``spilled`` (records moved to the spool),
    ``dropped`` (records lost: not even the spool took them, or a spool line
    could not be decoded), ``failures`` (failed or timed-out batch writes).

    ``observer`` is the ``ILogObserver`` to add to the log publisher.
    """

    def __init__(
        self,
        *,
        name: str,
        spool_dir: str,
        clock: IReactorTime | None = None,
        queue_size: int = 10000,
        batch_size: int = 500,
        flush_interval: float = 0.05,
        write_timeout: float = 5.0,
        flush_timeout: float = 10.0,
        min_backoff: float = 0.5,
        max_backoff: float = 10.0,
        stderr: IO[str] | None = None,
    ) -> None:
        if queue_size < 1 or batch_size < 1:
            raise ValueError("queue_size and batch_size must be positive")
        if flush_interval < 0:
            raise ValueError("flush_interval must not be negative")
        if clock is None:
            from twisted.internet import reactor

            clock = reactor
        self.setName(name)
        self.spool_dir = spool_dir
        self.queue_size = queue_size
        self.batch_size = batch_size
        self.flush_interval = flush_interval
        self.write_timeout = write_timeout
        self.flush_timeout = flush_timeout
        self.min_backoff = min_backoff
        self.max_backoff = max_backoff
        self._reactor_time = clock
        self._clock = cast(_Clock, clock)
        self._stderr = stderr
        self.observer = RecordObserver(self)

        self.written = 0
        self.replayed = 0
        self.spilled = 0
        self.dropped = 0
        # Records of the batch being written that the backend refused.
        self._refused_now = 0
        self.failures = 0

        self._state: _State = "new"
        self._queue: deque[Record] = deque()
        # The batch being written: from the spool (up to offset _pending_end)
        # or the _inflight leftmost records of the deque.
        self._pending: Deferred[object] | None = None
        self._inflight = 0
        # Bytes at the spool's read offset holding in-flight records that
        # overflow spilled; skipped if the write succeeds.
        self._inflight_spilled_bytes = 0
        # In-flight records that overflow could not spool: counted as
        # dropped, un-counted if the write succeeds after all.
        self._inflight_dropped = 0
        self._in_pump = False
        # _kick writes at once (a full batch, the spool, a stop); _timer
        # once flush_interval has passed since the first record queued.
        self._kick: _DelayedCall | None = None
        self._timer: _DelayedCall | None = None
        # The timer fired (or a retry came): what is queued is written now,
        # however few, until the queue is empty.
        self._due = False
        self._retry: _DelayedCall | None = None
        self._deadline: _DelayedCall | None = None
        self._flushed: Deferred[None] | None = None
        self._attempt = 0
        self._failing = False
        self._spill_reported = False
        self.spool: Spool[Record] = Spool(
            spool_dir, name, decode=decode_record, drop=self._drop, complain=self._complain
        )

    # -- to be provided by subclasses -------------------------------------

    def write_batch(self, records: list[Record]) -> Deferred[object]:
        """Write ``records`` to the backend, in order.

        The Deferred fires when all of them are stored, and fails (or is
        cancelled on timeout) otherwise; the whole batch is then retried, so
        writes must be idempotent per record (id) where the backend allows.
        """
        raise NotImplementedError

    def open_backend(self) -> None:
        """Open connections (called from ``startService``)."""

    def close_backend(self) -> Deferred[object] | None:
        """Close connections (called from ``stopService`` after the flush)."""
        return None

    # -- counters ---------------------------------------------------------

    @property
    def queued(self) -> int:
        """Records waiting in memory."""
        return len(self._queue)

    @property
    def spool_bytes(self) -> int:
        """Bytes of spooled records not yet replayed."""
        return self.spool.unreplayed_bytes

    # -- the observer -----------------------------------------------------

    def observe(self, event: LogEvent) -> None:
        """Queue the record of an ``oaproxy.record`` event; never blocks on the
        network, never raises, never logs through the logger.
        """
        try:
            if event.get("log_namespace") != RECORD_NAMESPACE:
                return
            record = event.get("record")
            if not isinstance(record, Record):
                return
            if self._state == "stopped":
                # Nobody drains any more: straight to disk, for the next run.
                self._spill(record)
                return
            self._queue.append(record)
            while len(self._queue) > self.queue_size:
                self._overflow()
            self._schedule_pump()
        except Exception as e:  # noqa: BLE001 - an observer must not raise
            self._complain(f"observer error {type(e).__name__}: {e}")

    # -- Service ----------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        # Read at start, not before: on a reload the sink this one replaces
        # may still be writing the same spool until it has stopped.
        self.spool.load()
        self._state = "running"
        try:
            self.open_backend()
        except Exception as e:  # noqa: BLE001 - writes retry until it works
            self._complain(f"cannot open backend: {type(e).__name__}: {e}")
        self._schedule_pump()

    def stopService(self) -> Deferred[None]:
        """Flush the queue (and spool) to the backend for at most
        ``flush_timeout`` seconds, spool what is left, close the backend.
        """
        super().stopService()
        self._state = "stopping"
        for call in (self._kick, self._retry, self._timer):
            if call is not None and call.active():
                call.cancel()
        self._kick = self._retry = self._timer = None
        # A failing backend gets one prompt attempt (then its usual backoff)
        # rather than waiting out a long retry delay.
        self._attempt = 0
        flushed: Deferred[None] = Deferred()
        self._flushed = flushed
        self._deadline = self._clock.callLater(self.flush_timeout, self._flush_deadline)
        self._pump()

        def finish(_: object) -> Deferred[object]:
            self._finish_stop()
            return maybeDeferred(self.close_backend)

        def report(failure: Failure) -> None:
            self._complain(f"error while stopping: {failure.getErrorMessage()}")

        flushed.addCallback(finish)
        flushed.addCallbacks(lambda _: None, report)
        return flushed

    def _flush_deadline(self) -> None:
        self._deadline = None
        self._state = "stopped"
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        if self._pending is not None:
            # Fails the batch through _done; its records are still queued
            # or spooled.  A write the backend completes anyway is repeated
            # on replay - harmless where writes are idempotent.
            self._pending.cancel()
        self._fire_flushed()

    def _fire_flushed(self) -> None:
        flushed, self._flushed = self._flushed, None
        if flushed is not None:
            flushed.callback(None)

    def _finish_stop(self) -> None:
        self._state = "stopped"
        self._cancel_timer()
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None
        self._inflight = 0
        self._inflight_spilled_bytes = 0
        left = len(self._queue)
        while self._queue:
            self._spill(self._queue.popleft())
        if left:
            self._complain(f"{left} records left unwritten at stop, spooled to {self.spool.path}")
        self.spool.close()

    # -- draining ---------------------------------------------------------

    def _active(self) -> bool:
        return self._state in ("running", "stopping")

    def _idle(self) -> bool:
        return self._pending is None and not self._queue and not self.spool.has_records

    def _ready(self) -> bool:
        """Whether a batch is to be written now rather than on the timer."""
        return (
            self.spool.has_records
            or len(self._queue) >= self.batch_size
            or (bool(self._queue) and (self._due or self.flush_interval == 0))
            or self._state == "stopping"
        )

    def _schedule_pump(self) -> None:
        if not self._active():
            return
        # Never two writes at once, nor one during a backoff: the end of
        # either looks again.
        if self._pending is None and self._retry is None and self._ready():
            if self._kick is None:
                # callLater(0) so records logged in the same reactor turn share a batch.
                self._kick = self._clock.callLater(0, self._pump)
        elif self._queue and self._timer is None and not self._due:
            # From the first record's arrival: a write under way meanwhile
            # does not make it wait longer.
            self._timer = self._clock.callLater(self.flush_interval, self._flush_due)

    def _flush_due(self) -> None:
        self._timer = None
        self._due = True
        self._pump()

    def _cancel_timer(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _pump(self) -> None:
        self._kick = None
        if self._in_pump:
            return
        self._in_pump = True
        try:
            while self._active() and self._pending is None and self._retry is None:
                if not self._ready() or not self._start_batch():
                    break
        finally:
            self._in_pump = False
        if self._state == "stopping" and self._idle():
            self._fire_flushed()
        else:
            # Records short of a batch: the timer writes them.
            self._schedule_pump()

    def _start_batch(self) -> bool:
        """Start writing the next batch; ``False`` if there is none."""
        if self.spool.has_records:
            batch = self.spool.read_batch(self.batch_size)
            if batch is None:
                self.failures += 1
                if not self.spool.has_records:
                    # It vanished (its records counted as dropped): on to the queue.
                    return True
                self._back_off()
                return False
            if not batch.records:
                self._advance_spool(batch.size)
                return True
            self._write(batch.records, "spool", batch.size)
            return True
        if self._queue:
            count = min(self.batch_size, len(self._queue))
            if count == len(self._queue):
                # All of it: what comes next waits for its own timer.
                self._due = False
                self._cancel_timer()
            self._inflight = count
            self._inflight_spilled_bytes = 0
            self._inflight_dropped = 0
            self._write(list(islice(self._queue, count)), "queue", 0)
            return True
        return False

    def _write(self, batch: list[Record], source: str, spool_bytes: int) -> None:
        d = maybeDeferred(self.write_batch, batch)
        d.addTimeout(self.write_timeout, self._reactor_time)
        self._pending = d
        d.addBoth(self._done, source, len(batch), spool_bytes)

    def _done(self, result: object, source: str, count: int, spool_bytes: int) -> None:
        self._pending = None
        refused, self._refused_now = self._refused_now, 0
        if isinstance(result, Failure):
            self.failures += 1
            self._inflight = 0
            self._inflight_spilled_bytes = 0
            if self._state == "stopped":
                return
            self._note_failure(result)
            return
        self.written += count - refused
        if source == "queue":
            for _ in range(self._inflight):
                self._queue.popleft()
            self._inflight = 0
            self.dropped -= self._inflight_dropped
            self._inflight_dropped = 0
            skip, self._inflight_spilled_bytes = self._inflight_spilled_bytes, 0
            if skip:
                self._advance_spool(skip)
        else:
            self.replayed += count
            self._advance_spool(spool_bytes)
        self._attempt = 0
        if self._failing:
            self._failing = False
            self._complain("backend is back, writing again")
        self._pump()

    def _note_failure(self, failure: Failure) -> None:
        if not self._failing:
            self._failing = True
            self._complain(
                f"write failed ({failure.type.__name__ if failure.type else '?'}:"
                f" {failure.getErrorMessage()}); records wait, retrying"
            )
        self._back_off()

    def _back_off(self) -> None:
        delay = min(self.max_backoff, self.min_backoff * 2 ** min(self._attempt, 30))
        self._attempt += 1
        self._retry = self._clock.callLater(delay, self._retry_now)

    def _retry_now(self) -> None:
        self._retry = None
        # What waited through the backoff has waited long enough.
        self._due = True
        self._pump()

    # -- spilling ---------------------------------------------------------

    def _overflow(self) -> None:
        record = self._queue.popleft()
        size = self._spill(record)
        if self._inflight:
            # The oldest records are those being written right now.
            self._inflight -= 1
            if size:
                self._inflight_spilled_bytes += size
            else:
                self._inflight_dropped += 1
        if not self._spill_reported:
            self._spill_reported = True
            self._complain(f"queue full ({self.queue_size}), spilling to {self.spool.path}")

    def _spill(self, record: Record) -> int:
        """Append one record to the spool; its size in bytes, 0 if dropped."""
        try:
            size = self.spool.spill(encode_record(record))
        except Exception as e:  # noqa: BLE001 - disk trouble, or a record json can't take
            self._drop(f"cannot spool a record ({type(e).__name__}: {e})")
            return 0
        self.spilled += 1
        return size

    def _advance_spool(self, size: int) -> None:
        if self.spool.advance(size):
            # A new spool: the next overflow into it is reported again.
            self._spill_reported = False

    # -- own trouble: stderr, never the logger ----------------------------

    def reject(self, records: list[Record], reason: str) -> None:
        """Records the backend refuses for good (their data, not its being
        down): kept in ``{name}.rejected.jsonl`` in the spool directory for an
        operator, counted as dropped from this sink and reported, so that the
        records behind them move on."""
        self._refused_now += len(records)
        path = os.path.join(self.spool_dir, f"{self.name}.rejected.jsonl")
        try:
            os.makedirs(self.spool_dir, exist_ok=True)
            with open(path, "ab") as kept:
                kept.writelines(encode_record(record) + b"\n" for record in records)
        except OSError as e:
            self._complain(f"cannot keep refused records in {path}: {e}")
        for _ in records:
            self._drop(f"the backend refused a record ({reason}); kept in {path}")

    def _drop(self, message: str) -> None:
        self.dropped += 1
        if self.dropped == 1 or self.dropped % 1000 == 0:
            self._complain(f"{message}; {self.dropped} records dropped so far")

    def _complain(self, message: str) -> None:
        try:
            stream = self._stderr if self._stderr is not None else sys.stderr
            print(f"oaproxy sink {self.name}: {message}", file=stream, flush=True)
        except Exception:  # noqa: BLE001 - nowhere left to report to
            pass
