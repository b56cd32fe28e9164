"""``oaproxy.textruns``: a streamed text kept in joined runs."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from oaproxy.textruns import RUN, TextRuns


class TextRunsTests(SynchronousTestCase):
    def test_empty(self) -> None:
        self.assertEqual(TextRuns().joined(), "")

    def test_every_length_joins_to_the_pieces_in_order(self) -> None:
        # Across a run's end, and across the merges of runs.
        for count in (1, RUN - 1, RUN, RUN + 1, RUN * 2, RUN * 3 + 1, RUN * RUN * 3 + 5):
            runs = TextRuns()
            pieces = [f"{i}," for i in range(count)]
            for piece in pieces:
                runs.append(piece)
            self.assertEqual(runs.joined(), "".join(pieces), count)

    def test_holds_few_objects(self) -> None:
        """A 100,000 pieces are kept in under RUN pieces and 20 runs."""
        runs = TextRuns()
        for _ in range(100_000):
            runs.append("abcde")
        self.assertLess(len(runs._runs), 20)
        self.assertLess(len(runs._pieces), RUN)
        self.assertEqual(runs.joined(), "abcde" * 100_000)
