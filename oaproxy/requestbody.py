"""A client's request body as every attempt sends it: held once (in memory,
or in twisted.web's spool file), and edited for an upstream by splices of
the client's bytes, never copied (``oaproxy.inspection`` makes them)."""

from __future__ import annotations

import os
from typing import IO, BinaryIO, cast

from attrs import evolve, field, frozen
from twisted.internet.task import Cooperator
from twisted.web.client import FileBodyProducer
from twisted.web.iweb import IBodyProducer

from oaproxy.relay import BytesProducer


@frozen
class Splice:
    """Bytes put in place of the body's ``[start, end)`` (an edit of a JSON body)."""

    start: int
    end: int
    insert: bytes


# A piece of a body as it is sent: a range of the client's bytes, or new ones.
_Piece = tuple[int, int] | bytes


@frozen
class RequestBody:
    """The client's request body, replayable for every attempt.

    Small bodies are held as bytes; large ones stay in the spool file that
    twisted.web wrote them to and are read again for each attempt. Either
    way it is the only copy: an edited body (``edited``) is the client's
    bytes with splices, read from the same bytes or file as it is sent.
    """

    size: int  # as the client sent it
    data: bytes | None
    file: IO[bytes] | None = None
    splices: tuple[Splice, ...] = ()
    # The first bytes the client sent: all of a body held in memory, the
    # start of one in its file (kept for the record, made once twisted.web
    # has closed the file).
    head: bytes = field()

    @head.default
    def _whole(self) -> bytes:
        return self.data or b""

    @property
    def length(self) -> int:
        """The bytes that are sent: the client's, edited."""
        return self.size + sum(len(s.insert) - (s.end - s.start) for s in self.splices)

    def edited(self, *splices: Splice) -> RequestBody:
        """The body with ``splices`` too; they must not overlap (an insertion
        where a cut starts goes before the cut)."""
        if not splices:
            return self
        ordered = sorted((*self.splices, *splices), key=lambda s: (s.start, s.end))
        return evolve(self, splices=tuple(ordered))

    def producer(self, cooperator: Cooperator) -> IBodyProducer | None:
        if self.length == 0:
            return None
        if self.data is not None:
            if not self.splices:
                return BytesProducer(self.data)
            data = self.data
            return BytesProducer(
                *(p if isinstance(p, bytes) else data[p[0] : p[1]] for p in self._pieces())
            )
        assert self.file is not None
        reader = _SpoolReader(self.file, self._pieces())
        return FileBodyProducer(cast(BinaryIO, reader), cooperator, readSize=2**16)

    def _pieces(self) -> tuple[_Piece, ...]:
        pieces: list[_Piece] = []
        position = 0
        for splice in self.splices:
            pieces += [(position, splice.start), splice.insert]
            position = splice.end
        pieces.append((position, self.size))
        return tuple(piece for piece in pieces if isinstance(piece, bytes) or piece[1] > piece[0])


class _SpoolReader:
    """One attempt's reading of the shared spool file (its ``pieces``).

    ``FileBodyProducer`` closes its file at the end and when stopped, which
    would leave nothing to fail over with; and an upstream that answers
    before reading the whole body may still be sent the rest while the next
    attempt reads: so each reader keeps its own position and never closes.
    """

    def __init__(self, file: IO[bytes], pieces: tuple[_Piece, ...]) -> None:
        self._file = file
        self._pieces = pieces
        self._length = sum(len(p) if isinstance(p, bytes) else p[1] - p[0] for p in pieces)
        self._position = 0

    def read(self, size: int = -1) -> bytes:
        wanted = self._length - self._position if size < 0 else size
        out: list[bytes] = []
        offset = 0  # where the current piece starts, in what is sent
        for piece in self._pieces:
            piece_length = len(piece) if isinstance(piece, bytes) else piece[1] - piece[0]
            skip = self._position - offset
            offset += piece_length
            if wanted <= 0 or skip >= piece_length:
                continue
            take = min(piece_length - skip, wanted)
            if isinstance(piece, bytes):
                out.append(piece[skip : skip + take])
            else:
                self._file.seek(piece[0] + skip)
                out.append(self._file.read(take))
            self._position += take
            wanted -= take
        return b"".join(out)

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        if whence == os.SEEK_END:
            self._position = self._length + offset
        elif whence == os.SEEK_CUR:
            self._position += offset
        else:
            self._position = offset
        return self._position

    def tell(self) -> int:
        return self._position

    def close(self) -> None:
        pass
