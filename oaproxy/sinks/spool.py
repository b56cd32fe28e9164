"""The spool of a record sink: records waiting on disk to be replayed, in order.

One file of lines, ``{name}.jsonl`` in the spool directory, appended to at
its end and replayed from its start; ``{name}.offset`` keeps how far a
replay had got when the sink stopped, so the next run resumes there.  Once
everything in it is replayed, both files are removed.

The spool deals in encoded lines: the sink encodes what it spills and hands
over a ``decode`` for what is read back, so what a record is can change
without the spool knowing.  Its trouble goes to two callables of the sink,
``drop`` (a record lost) and ``complain`` (anything else), never to the
logger.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import IO, Generic, TypeVar

from attrs import frozen

_T = TypeVar("_T")

#: Upper bound of one read, so a spool of huge records is never read whole.
_CHUNK_BYTES = 4 * 1024 * 1024


@frozen
class SpoolBatch(Generic[_T]):
    """Records read back from the spool, and how many bytes of it they took
    (undecodable lines included): what ``Spool.advance`` is given once the
    records are written."""

    records: list[_T]
    size: int


class Spool(Generic[_T]):
    """The spool file ``{name}.jsonl`` in ``directory``, and its saved offset.

    ``decode`` turns one line (without its newline) back into a record and
    raises ``ValueError`` for a line that holds none; ``drop`` is told of
    each record lost, ``complain`` of other trouble.
    """

    def __init__(
        self,
        directory: str,
        name: str,
        *,
        decode: Callable[[bytes], _T],
        drop: Callable[[str], None],
        complain: Callable[[str], None],
    ) -> None:
        self._directory = directory
        self.path = os.path.join(directory, f"{name}.jsonl")
        self._offset_path = os.path.join(directory, f"{name}.offset")
        self._decode = decode
        self._drop = drop
        self._complain = complain
        self._writer: IO[bytes] | None = None
        self._reader: IO[bytes] | None = None
        # Bytes of the file known to be whole lines, and how many of those
        # are replayed; a torn append is cut back to _size.
        self._size = 0
        self._offset = 0
        self._closed = False

    @property
    def has_records(self) -> bool:
        """Whether spooled records wait to be replayed."""
        return self._offset < self._size

    @property
    def unreplayed_bytes(self) -> int:
        """Bytes of spooled records not yet replayed."""
        return max(0, self._size - self._offset)

    def load(self) -> None:
        """Take up what an earlier sink left in the file: its size, and the
        offset its replay had got to (from the start when that is unreadable
        or does not fit the file)."""
        self._closed = False
        try:
            self._size = os.stat(self.path).st_size
        except FileNotFoundError:
            return
        except OSError as e:
            self._complain(f"cannot read spool {self.path}: {e}")
            return
        try:
            with open(self._offset_path, "rb") as f:
                offset = int(f.read().strip() or b"0")
        except (OSError, ValueError):
            offset = 0
        self._offset = offset if 0 <= offset <= self._size else 0

    def spill(self, line: bytes) -> int:
        """Append one encoded record (``line``, without newline); the bytes it
        took in the file.

        Raises what the disk raised, with the file cut back to whole lines.
        """
        data = line + b"\n"
        try:
            if self._writer is None:
                os.makedirs(self._directory, exist_ok=True)
                # Kept open across spills, until the spool is closed.
                self._writer = open(self.path, "ab")  # noqa: SIM115
            self._writer.write(data)
            self._writer.flush()
        except BaseException:
            self._cut_torn_line()
            raise
        finally:
            if self._closed:
                self._close_files()
        self._size += len(data)
        return len(data)

    def read_batch(self, limit: int) -> SpoolBatch[_T] | None:
        """The next records to replay: at most ``limit`` of them, from at most
        about 4 MiB of the file.

        ``None`` when the file cannot be read (reported): it may be readable
        on a later try; if it vanished, its records are counted as dropped and
        the spool is empty.
        """
        try:
            return self._read(limit)
        except OSError as e:
            self._close_files()
            if isinstance(e, FileNotFoundError):
                self._drop(f"spool {self.path} vanished, its unreplayed records are lost")
                self._offset = self._size = 0
            else:
                self._complain(f"cannot read spool {self.path}: {e}")
            return None

    def _read(self, limit: int) -> SpoolBatch[_T]:
        if self._reader is None:
            self._reader = open(self.path, "rb")  # noqa: SIM115
        reader = self._reader
        reader.seek(self._offset)
        records: list[_T] = []
        position = self._offset
        while len(records) < limit and position - self._offset < _CHUNK_BYTES:
            if position >= self._size:
                break
            line = reader.readline()
            if not line:
                break
            position += len(line)
            try:
                records.append(self._decode(line.removesuffix(b"\n")))
            except ValueError:
                self._drop(f"undecodable line in {self.path} at byte {position - len(line)}")
        if position == self._offset:
            # The file is shorter than we thought (cut by someone else).
            position = self._size
        return SpoolBatch(records, position - self._offset)

    def advance(self, size: int) -> bool:
        """Count the next ``size`` bytes as replayed; ``True`` when that was the
        last of them and the file is removed."""
        self._offset += size
        if self._offset < self._size:
            return False
        self._close_files()
        try:
            for path in (self.path, self._offset_path):
                if os.path.exists(path):
                    os.remove(path)
        except OSError as e:
            # Keep offset == size: appends continue after the written part.
            self._complain(f"cannot remove spool {self.path}: {e}")
            return False
        self._offset = self._size = 0
        return True

    def close(self) -> None:
        """Save the replay's offset and close the file.

        Records spilled after this still reach the file, which is closed
        again after each of them: nobody here replays them, the next run's
        sink does.
        """
        self._save_offset()
        self._close_files()
        self._closed = True

    def _save_offset(self) -> None:
        if self._offset <= 0 or self._offset >= self._size:
            return
        temporary = self._offset_path + ".tmp"
        try:
            with open(temporary, "w") as f:
                f.write(f"{self._offset}\n")
            os.replace(temporary, self._offset_path)
        except OSError as e:
            # Replaying from the start repeats some records; not a loss.
            self._complain(f"cannot save spool offset {self._offset_path}: {e}")

    def _cut_torn_line(self) -> None:
        # A failed append may have left part of a line: cut the file back to
        # what we know is whole, so the next line starts cleanly.
        self._close_files()
        try:
            if os.path.exists(self.path):
                os.truncate(self.path, self._size)
        except OSError:
            pass

    def _close_files(self) -> None:
        for handle in (self._writer, self._reader):
            if handle is not None:
                try:
                    handle.close()
                except OSError:
                    pass
        self._writer = self._reader = None
