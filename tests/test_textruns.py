"""``oaproxy.textruns``: a streamed text kept in joined runs."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from oaproxy.textruns import RUN, TextRuns


class TextRunsTests(SynchronousTestCase):
    def test_empty(self) -> None:
        self.assertEqual(TextRuns().joined(), "")

    def test_every_length_joins_to_the_pieces_in_order(self) -> None:
        # Across a run's end, and across the runs' own merge (RUN * RUN).
        for count in (1, RUN - 1, RUN, RUN + 1, RUN * RUN - 1, RUN * RUN, RUN * RUN * 3 + 5):
            runs = TextRuns()
            pieces = [f"{i}," for i in range(count)]
            for piece in pieces:
                runs.append(piece)
            self.assertEqual(runs.joined(), "".join(pieces), count)

    def test_holds_few_objects(self) -> None:
        """However many pieces, at most RUN - 1 of them and RUN - 1 runs are kept."""
        runs = TextRuns()
        for i in range(RUN * RUN * 5 + 7):
            runs.append(str(i))
        self.assertLess(len(runs._runs), RUN)
        self.assertLess(len(runs._pieces), RUN)
