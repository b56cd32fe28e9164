"""What the cache decided for one request, carried on its exchange: the
``X-Oaproxy-Cache`` value, the record's ``cache``, the entry a miss fills."""

from __future__ import annotations

from attrs import define

from oaproxy.cache.replay import StreamedAnswer
from oaproxy.record import CacheResult


@define
class CacheTicket:
    result: CacheResult
    # The entry a miss fills.
    key: str | None = None
    # A streamed answer on its way (one per attempt: the last is the answer).
    stream: StreamedAnswer | None = None
