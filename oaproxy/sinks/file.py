"""The JSON-lines record file (``records.file``), rotated daily or by size."""

from __future__ import annotations

import os
from typing import Any, cast

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorFromThreads, IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.python.logfile import BaseLogFile, DailyLogFile, LogFile
from twisted.python.threadpool import ThreadPool

from oaproxy.config import parse_size
from oaproxy.record import Record, encode_record
from oaproxy.sinks.queue import QueuedSink


class FileSink(QueuedSink):
    """Appends each record as one compact JSON line (UTF-8) to ``path``.

    ``rotate`` is ``"daily"`` (a ``DailyLogFile``: ``path.YYYY_M_D`` at local
    midnight), a size (``"100MB"``, or bytes as an int: a ``LogFile``
    rotating to ``path.1``, ``path.2``…), or ``None`` for no rotation.
    ``max_rotated_files`` is, for size rotation, how many old files to keep
    (``None``: all).  Further ``QueuedSink`` options (``batch_size``,
    ``write_timeout``, ``flush_timeout``, ``stderr``…) are passed on.

    Batches are encoded and written by one thread of the sink's own, so
    neither JSON nor a slow disk stalls the reactor (one thread keeps the lines in order; a batch
    that outlives ``write_timeout`` is retried behind it).  ``in_thread=False``
    writes on the calling thread, for tests on a ``Clock``.
    """

    def __init__(
        self,
        path: str,
        *,
        spool_dir: str,
        rotate: str | int | None = "daily",
        max_rotated_files: int | None = None,
        clock: IReactorTime | None = None,
        queue_size: int = 10000,
        name: str = "file",
        in_thread: bool = True,
        **options: Any,
    ) -> None:
        self.path = os.path.abspath(path)
        if clock is None:
            from twisted.internet import reactor as default_reactor

            clock = cast(IReactorTime, default_reactor)
        # The writer thread hands its results back through callFromThread.
        self._reactor = cast(IReactorFromThreads, clock)
        self._threads: ThreadPool | None = (
            ThreadPool(minthreads=1, maxthreads=1, name=f"oaproxy-{name}-writer")
            if in_thread
            else None
        )
        if rotate is None or rotate == "daily":
            self._rotate_length: int | None = None
        else:
            self._rotate_length = rotate if isinstance(rotate, int) else parse_size(rotate)
        self.rotate = rotate
        self.max_rotated_files = max_rotated_files
        self._logfile: BaseLogFile | None = None
        super().__init__(
            name=name,
            spool_dir=spool_dir,
            clock=clock,
            queue_size=queue_size,
            **options,
        )

    def _open(self) -> BaseLogFile:
        if self._logfile is None:
            directory, filename = os.path.split(self.path)
            os.makedirs(directory, exist_ok=True)
            if self.rotate == "daily":
                self._logfile = DailyLogFile(filename, directory)
            else:
                # rotateLength None: LogFile never rotates.
                self._logfile = LogFile(
                    filename,
                    directory,
                    rotateLength=self._rotate_length,
                    maxRotatedFiles=self.max_rotated_files,
                )
        return self._logfile

    def open_backend(self) -> None:
        if self._threads is not None:
            self._threads.start()

    def write_batch(self, records: list[Record]) -> Deferred[object]:
        if self._threads is None:
            self._append(records)
            return succeed(None)
        return deferToThreadPool(self._reactor, self._threads, self._append, records)

    def _append(self, records: list[Record]) -> None:
        """Append the records' lines (in the writer thread: their JSON too)."""
        try:
            logfile = self._open()
            for record in records:
                # bytes, so LogFile counts the size in bytes, not characters.
                logfile.write(encode_record(record) + b"\n")
            logfile.flush()
        except BaseException:
            # Reopen next time: the file may have been moved or the disk
            # remounted.  (A retried batch may repeat its first lines.)
            self._close()
            raise

    def _close(self) -> None:
        logfile, self._logfile = self._logfile, None
        if logfile is not None:
            try:
                logfile.close()
            except OSError:
                pass

    def close_backend(self) -> None:
        if self._threads is not None and self._threads.started:
            # Waits for a write under way: the last lines are on disk after.
            self._threads.stop()
        self._close()
