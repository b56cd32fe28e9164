"""The request bodies the process holds at once: ``max_inflight_body_bytes``.

Every body counts from its head to the end of its request (in memory or in
its spool file, it is held for failover until then). A body of more than
``SMALL_BODY`` bytes is taken only while the total stays within the budget:
past it, the client gets 503 ``server_busy`` with ``Retry-After``, and the
rest of its body is read and thrown away. Small bodies always pass (and
count), so that an upload storm cannot stop ordinary requests.
"""

from __future__ import annotations

from collections.abc import Callable

#: Bodies up to this size are always taken.
SMALL_BODY = 1024 * 1024


class BodyBudget:
    """The bytes of the request bodies held now, against a limit."""

    def __init__(self, limit: int, on_change: Callable[[int], None]) -> None:
        self.limit = limit
        self.held = 0
        self._on_change = on_change

    def take(self, size: int, body_size: int) -> bool:
        """Count ``size`` more bytes of a body of ``body_size`` (so far, when
        its length is unknown), unless it is large and they do not fit."""
        if body_size > SMALL_BODY and self.held + size > self.limit:
            return False
        self.held += size
        self._on_change(self.held)
        return True

    def give_back(self, size: int) -> None:
        self.held -= size
        self._on_change(self.held)
