"""A streamed answer's text as it grows: ``TextRuns``."""

from __future__ import annotations

# Pieces (a delta's few characters each, a str object of ~55 bytes) joined
# into one string at a time. The record's capture, the cache's and the
# resume follower keep the same pieces: with one run size for all, each
# piece is let go by all of them at once, and an open stream holds about its
# text once per keeper, not a string object per event.
RUN = 16


class TextRuns:
    """Text kept in joined runs of pieces, for a stream held open for long.

    A new run is joined with the one before while that one is not longer:
    the runs halve in length from the first, so there are few of them (a
    MiB of text is under 20), and each character is copied only a few times
    (as often as its run doubled)."""

    __slots__ = ("_pieces", "_runs")

    def __init__(self) -> None:
        self._runs: list[str] = []
        self._pieces: list[str] = []

    def append(self, piece: str) -> None:
        pieces = self._pieces
        pieces.append(piece)
        if len(pieces) >= RUN:
            run = "".join(pieces)
            pieces.clear()
            runs = self._runs
            while runs and len(runs[-1]) <= len(run):
                run = runs.pop() + run
            runs.append(run)

    def joined(self) -> str:
        return "".join(self._runs) + "".join(self._pieces)
