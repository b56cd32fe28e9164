"""The JSON-lines record file (``records.file``), rotated daily or by size."""

from __future__ import annotations

import os
import re
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.python.logfile import BaseLogFile, DailyLogFile, LogFile

from oaproxy.sinks.queue import QueuedSink, Record, encode_record

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1024,
    "kb": 1024,
    "kib": 1024,
    "m": 1024**2,
    "mb": 1024**2,
    "mib": 1024**2,
    "g": 1024**3,
    "gb": 1024**3,
    "gib": 1024**3,
}


def parse_size(text: str | int) -> int:
    """A size like ``"100MB"``, ``"512k"`` or ``1048576`` in bytes (units are
    binary: 1 MB = 1024 * 1024 bytes).
    """
    if isinstance(text, int):
        size = text
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
        if match is None or match.group(2).lower() not in _UNITS:
            raise ValueError(f"not a size: {text!r} (use e.g. 100MB, 512KB, daily)")
        size = int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    if size <= 0:
        raise ValueError(f"size must be positive: {text!r}")
    return size


class FileSink(QueuedSink):
    """Appends each record as one compact JSON line (UTF-8) to ``path``.

    ``rotate`` is ``"daily"`` (a ``DailyLogFile``: ``path.YYYY_M_D`` at local
    midnight), a size (``"100MB"``, or bytes as an int: a ``LogFile``
    rotating to ``path.1``, ``path.2``…), or ``None`` for no rotation.
    ``max_rotated_files`` is, for size rotation, how many old files to keep
    (``None``: all).  Further ``QueuedSink`` options (``batch_size``,
    ``write_timeout``, ``flush_timeout``, ``stderr``…) are passed on.
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
        **options: Any,
    ) -> None:
        self.path = os.path.abspath(path)
        if rotate is None or rotate == "daily":
            self._rotate_length: int | None = None
        else:
            self._rotate_length = parse_size(rotate)
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
        self._open()

    def write_batch(self, records: list[Record]) -> Deferred[object]:
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
        return succeed(None)

    def reopen(self) -> None:
        """Reopen the file, for rotation by an outside tool (logrotate)."""
        self._close()

    def _close(self) -> None:
        logfile, self._logfile = self._logfile, None
        if logfile is not None:
            try:
                logfile.close()
            except OSError:
                pass

    def close_backend(self) -> None:
        self._close()
