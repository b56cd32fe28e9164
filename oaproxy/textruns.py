"""A streamed answer's text as it grows: ``TextRuns``."""

from __future__ import annotations

# Pieces (a delta's few characters each, a str object of ~55 bytes) joined
# into one string at a time; runs joined into one once there are as many.
# The record's capture, the cache's and the resume follower keep the same
# pieces: with one run size for all, each piece is let go by all of them at
# once, and an open stream holds about its text once per keeper, not a
# string object per event.
RUN = 16


class TextRuns:
    """Text kept in joined runs of pieces, for a stream held open for long."""

    __slots__ = ("_pieces", "_runs")

    def __init__(self) -> None:
        self._runs: list[str] = []
        self._pieces: list[str] = []

    def append(self, piece: str) -> None:
        pieces = self._pieces
        pieces.append(piece)
        if len(pieces) >= RUN:
            runs = self._runs
            runs.append("".join(pieces))
            pieces.clear()
            if len(runs) >= RUN:
                # A copy of the text so far every RUN * RUN pieces (a MiB of
                # 5-character deltas: ~0.4 GB over its 200,000 events).
                runs[:] = ["".join(runs)]

    def joined(self) -> str:
        return "".join(self._runs) + "".join(self._pieces)
