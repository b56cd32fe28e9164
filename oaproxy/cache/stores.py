"""Where cache entries live: ``MemoryStore`` (one process) or ``RedisStore``
(the shared Redis, for every process and machine using it).

Both hold entries (bytes) under a key for ``ttl`` seconds. A memory lookup
answers at once; a Redis one is a ``Deferred`` that fails when Redis is down
or slow, which the cache takes as a miss.
"""

from __future__ import annotations

import zlib
from collections import OrderedDict
from typing import Protocol

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime

from oaproxy.sharedredis import SharedRedis

# A Redis command slower than this is given up (a lookup is then a miss): a
# sick Redis must not hold requests.
REDIS_TIMEOUT = 1.0

# Starts every Redis value: our format, version 1. 0xFF is never UTF-8, so
# txredisapi hands the value back as bytes, untouched.
_FORMAT = b"\xff\x01"


class AnswerStore(Protocol):
    def get(self, key: str) -> bytes | Deferred[bytes | None] | None:
        """The entry under ``key``, or None."""

    def put(self, key: str, value: bytes) -> Deferred[None] | None:
        """Store ``value`` under ``key`` for the store's ttl: at once (None),
        or when the Deferred fires."""


class MemoryStore:
    """An LRU of entries bounded by their number and their bytes, each
    expiring ``ttl`` seconds after it was stored (on ``clock``)."""

    def __init__(self, clock: IReactorTime, ttl: float, max_entries: int, max_bytes: int) -> None:
        self._clock = clock
        self._ttl = ttl
        self._max_entries = max_entries
        self._max_bytes = max_bytes
        # key -> (expiry time, value), least recently used first.
        self._entries: OrderedDict[str, tuple[float, bytes]] = OrderedDict()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> bytes | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        expires, value = entry
        if expires <= self._clock.seconds():
            self._remove(key)
            return None
        self._entries.move_to_end(key)
        return value

    def put(self, key: str, value: bytes) -> None:
        if len(value) <= self._max_bytes:
            if key in self._entries:
                self._remove(key)
            self._entries[key] = (self._clock.seconds() + self._ttl, value)
            self.bytes += len(value)
            while len(self._entries) > self._max_entries or self.bytes > self._max_bytes:
                self._remove(next(iter(self._entries)))

    def _remove(self, key: str) -> None:
        _, value = self._entries.pop(key)
        self.bytes -= len(value)


class RedisStore:
    """Entries in the shared Redis: ``SET key value EX ttl``, compressed."""

    def __init__(
        self, redis: SharedRedis, clock: IReactorTime, ttl: int, max_entry_bytes: int
    ) -> None:
        self._redis = redis
        self._clock = clock
        self._ttl = ttl
        self._max_entry_bytes = max_entry_bytes

    def _key(self, key: str) -> str:
        return self._redis.key("cache", key)

    def get(self, key: str) -> Deferred[bytes | None]:
        found: Deferred[object] = self._redis.command("GET", self._key(key))
        found.addTimeout(REDIS_TIMEOUT, self._clock)
        return found.addCallback(self._decode)

    def put(self, key: str, value: bytes) -> Deferred[None]:
        stored: Deferred[object] = self._redis.command(
            "SET", self._key(key), _FORMAT + zlib.compress(value), "EX", self._ttl
        )
        stored.addTimeout(REDIS_TIMEOUT, self._clock)
        return stored.addCallback(lambda _: None)

    def _decode(self, value: object) -> bytes | None:
        """An entry as stored; None for anything else found under the key."""
        if not isinstance(value, bytes) or not value.startswith(_FORMAT):
            return None
        inflate = zlib.decompressobj()
        try:
            # Bounded: what was stored was at most max_entry_bytes.
            entry = inflate.decompress(value[len(_FORMAT) :], self._max_entry_bytes + 1)
        except zlib.error:
            return None
        if len(entry) > self._max_entry_bytes or not inflate.eof:
            return None
        return entry
