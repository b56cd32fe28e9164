"""The garbage collector after start-up and reloads: ``freeze_heap``."""

from __future__ import annotations

import gc


def freeze_heap() -> None:
    """Move every object alive now out of the collector's sight (``gc.freeze``).

    What start-up (or a reload) made lives as long as the daemon, yet every
    full collection would walk it again: tens of milliseconds per
    collection, paid by the requests of that moment.  Frozen, the
    collections see only what requests make.  Unfrozen and collected first,
    so that what a reload replaced is freed rather than frozen for good.
    """
    gc.unfreeze()
    gc.collect()
    gc.freeze()
