"""What the cache decided for one request, carried on its exchange: the
``X-Oaproxy-Cache`` value, the record's ``cache``, the entry a miss fills."""

from __future__ import annotations

import enum

from attrs import define

from oaproxy.cache.replay import StreamedAnswer


class CacheResult(enum.Enum):
    HIT = "hit"  # answered from the cache
    MISS = "miss"  # looked up, not found; stored if the answer is complete
    BYPASS = "bypass"  # not looked up: "caching": false, or not asked while default: false


@define
class CacheTicket:
    result: CacheResult
    # The entry a miss fills.
    key: str | None = None
    # A streamed answer on its way (one per attempt: the last is the answer).
    stream: StreamedAnswer | None = None
