"""``ResponseCache``: the cache's gate, its stream hook and its observer.

- The gate runs after routing (a key that may not use the model never gets
  this far) and before the other gates (a hit costs no tokens). It answers a
  hit itself (``CacheHit``, a ``LocalAnswer``) or marks the exchange a miss
  or a bypass; every answer of an eligible request then says which in
  ``X-Oaproxy-Cache``, whoever writes it.
- The stream hook wraps the records' one on the forwarder: it follows the
  streamed answer of a miss, attempt by attempt.
- The observer stores the answer of a miss once it is complete (a 200 JSON
  object, or a stream that ended with ``[DONE]``), up to ``max_entry_bytes``.

With Redis down or slow a lookup is a miss and a store is dropped (logged at
most once a minute): the cache never fails a request, nor holds one.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence

from attrs import field, frozen
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from oaproxy.cache.keys import cache_key, namespace
from oaproxy.cache.replay import StreamedAnswer, stream_from_completion
from oaproxy.cache.stores import AnswerStore, MemoryStore, RedisStore
from oaproxy.cache.ticket import CacheTicket
from oaproxy.config import CacheBackend, CacheConfig, Upstream
from oaproxy.exchange import Exchange
from oaproxy.inspection import Inspected
from oaproxy.metrics import Metrics
from oaproxy.pipeline import Observer, Verdict
from oaproxy.record import CacheResult, LimitRefusal, Outcome, Record
from oaproxy.relay import describe
from oaproxy.sharedredis import SharedRedis

HEADER = b"x-oaproxy-cache"
JSON = b"application/json"
SSE = b"text/event-stream"

# Redis trouble is said once a minute at most, not once a request.
COMPLAINT_INTERVAL = 60.0

StreamObserver = Callable[[Exchange, Upstream], Callable[[bytes], bool]]


@frozen
class CacheHit:
    """An answer from the cache: a whole JSON completion, or a whole SSE stream."""

    content_type: bytes
    _body: bytes = field(alias="body")
    # A stream replayed from a completion records the completion.
    _recorded: bytes | None = field(default=None, alias="recorded")

    @property
    def status(self) -> int:
        return 200

    @property
    def outcome(self) -> Outcome:
        return Outcome.OK

    @property
    def limit(self) -> LimitRefusal | None:
        return None

    def body(self) -> bytes:
        return self._body

    def recorded(self) -> bytes | None:
        return self._recorded


class ResponseCache(Observer):
    """The cache of one ``cache:`` section, on its store."""

    log = Logger()

    def __init__(
        self, config: CacheConfig, store: AnswerStore, clock: IReactorTime, metrics: Metrics
    ) -> None:
        self.store = store
        self._routes = frozenset(config.routes)
        self._default = config.default
        self._shared = config.shared
        self._max_entry_bytes = config.max_entry_bytes
        self._clock = clock
        self._metrics = metrics
        self._complained: float | None = None

    @classmethod
    def from_config(
        cls,
        section: CacheConfig | None,
        shared_redis: SharedRedis | None,
        clock: IReactorTime,
        metrics: Metrics,
    ) -> ResponseCache | None:
        """The cache ``section`` (``cache:``) asks for; None without one."""
        if section is None:
            return None
        store: AnswerStore
        if section.backend is CacheBackend.REDIS:
            # The loader refuses the redis backend without a redis: URL.
            assert shared_redis is not None
            store = RedisStore(shared_redis, clock, section.ttl, section.max_entry_bytes)
        else:
            store = MemoryStore(clock, section.ttl, section.max_entries, section.max_bytes)
        return cls(section, store, clock, metrics)

    # -- the gate ------------------------------------------------------------

    def __call__(
        self, exchange: Exchange, candidates: Sequence[Upstream]
    ) -> Verdict | Deferred[Verdict]:
        """Look the request up: a hit answers it; a miss or bypass goes on."""
        call = exchange.call
        if call.method != b"POST" or call.api_path not in self._routes:
            return None
        inspected = call.inspected
        wanted = self._default if inspected.caching is None else inspected.caching
        # A body too large to parse at once (oaproxy.inspection.WALK_AT_ONCE)
        # is not looked up: a bypass.
        body = inspected.parsed()
        key = None
        if wanted and body is not None:
            # A route prefix has upstreams of its own: entries of its own too.
            where = (call.route or "") + call.api_path
            key = cache_key(namespace(exchange.key_name, self._shared), where, body)
        if key is None:
            self._decided(exchange, CacheTicket(CacheResult.BYPASS))
            return None
        found = self.store.get(key)
        if not isinstance(found, Deferred):
            return self._found(found, exchange, key)

        def failed(failure: Failure) -> Verdict:
            if not failure.check(CancelledError):  # not the client going away
                self._complain("a cache lookup failed (served as a miss)", failure)
            return self._found(None, exchange, key)

        return found.addCallbacks(lambda entry: self._found(entry, exchange, key), failed)

    def _found(self, entry: bytes | None, exchange: Exchange, key: str) -> Verdict:
        hit = None if entry is None else _hit(entry, exchange.call.inspected)
        if hit is None:
            self._decided(exchange, CacheTicket(CacheResult.MISS, key))
        else:
            self._decided(exchange, CacheTicket(CacheResult.HIT))
        return hit

    def _decided(self, exchange: Exchange, ticket: CacheTicket) -> None:
        exchange.cache = ticket
        exchange.answer_headers.setRawHeaders(HEADER, [ticket.result.value.encode("ascii")])

    # -- the stream hook -----------------------------------------------------

    def following(self, inner: StreamObserver) -> StreamObserver:
        """The forwarder's stream observer: ``inner``'s, and for a miss's
        stream a ``StreamedAnswer`` that the observer may store."""

        def observe(exchange: Exchange, upstream: Upstream) -> Callable[[bytes], bool]:
            feed = inner(exchange, upstream)
            ticket = exchange.cache
            if ticket is None or ticket.result is not CacheResult.MISS or not exchange.call.stream:
                return feed
            parsed = exchange.call.inspected.parsed()
            if parsed is not None and parsed.get("logprobs"):
                # A streamed answer's logprobs are not reassembled: not stored.
                return feed
            answer = ticket.stream = StreamedAnswer(self._max_entry_bytes)

            def fed(data: bytes) -> bool:
                answer.feed(data)
                return feed(data)

            return fed

        return observe

    # -- the observer --------------------------------------------------------

    def request_finished(self, exchange: Exchange, record: Record | None) -> None:
        """Store a miss's answer if it is complete."""
        ticket = exchange.cache
        if ticket is None or ticket.result is not CacheResult.MISS or ticket.key is None:
            return
        if exchange.status != 200 or exchange.outcome is not Outcome.OK:
            return
        entry = self._entry(exchange, ticket)
        if entry is None or len(entry) > self._max_entry_bytes:
            return

        stored = self.store.put(ticket.key, entry)
        if stored is None:
            # In memory: stored already, with no Deferred to wait for.
            self._metrics.cache_stored()
            return

        def failed(failure: Failure) -> None:
            self._complain("storing a cache entry failed", failure)

        stored.addCallbacks(lambda _: self._metrics.cache_stored(), failed)

    def _entry(self, exchange: Exchange, ticket: CacheTicket) -> bytes | None:
        """What a finished miss stores: its completion, or None."""
        if exchange.call.stream:
            return None if ticket.stream is None else ticket.stream.completion()
        body = exchange.response_body
        # None for an answer over largeanswer.MAX_PARSED_ANSWER (1 MiB): it is
        # never joined nor parsed (either holds the reactor), so never stored,
        # whatever max_entry_bytes allows.
        if body is None or len(body) > self._max_entry_bytes:
            return None
        answer = exchange.answer_document()
        # Some OpenAI-compatible servers say 200 with an error body.
        return body if isinstance(answer, dict) and "error" not in answer else None

    def _complain(self, message: str, failure: Failure) -> None:
        now = self._clock.seconds()
        if self._complained is not None and now - self._complained < COMPLAINT_INTERVAL:
            return
        self._complained = now
        self.log.warn("{message}: {reason}", message=message, reason=describe(failure)[1])


def _hit(entry: bytes, inspected: Inspected) -> CacheHit | None:
    """The answer an entry gives this request; None when it cannot give one
    (a stream request, and an entry that is no chat or legacy completion)."""
    if not inspected.stream:
        return CacheHit(JSON, body=entry)
    try:
        completion = json.loads(entry)
    except (ValueError, RecursionError):
        return None
    stream = None
    if isinstance(completion, dict):
        stream = stream_from_completion(completion, inspected.include_usage)
    return None if stream is None else CacheHit(SSE, body=stream, recorded=entry)
