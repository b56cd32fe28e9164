"""The garbage collector after start-up and reloads: ``freeze_heap``."""

from __future__ import annotations

import gc

#: Allocations between two young collections (CPython's default is 700).
#: With a thousand streams open each young collection keeps many survivors,
#: and every tenth of those collections walks the middle generation, every
#: hundredth the whole heap (~100 ms each with 1,000 streams): at 700 the
#: collector took about a quarter of the CPU of relaying them; at 10,000 its
#: share falls to a tenth, for a few MB more of young garbage held at most.
YOUNG_COLLECTION = 10_000


def freeze_heap() -> None:
    """Move every object alive now out of the collector's sight (``gc.freeze``).

    What start-up (or a reload) made lives as long as the daemon, yet every
    full collection would walk it again: tens of milliseconds per
    collection, paid by the requests of that moment.  Frozen, the
    collections see only what requests make.  Unfrozen and collected first,
    so that what a reload replaced is freed rather than frozen for good.
    The young generation is collected every ``YOUNG_COLLECTION``
    allocations from then on.
    """
    gc.unfreeze()
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_COLLECTION, middle, old)
