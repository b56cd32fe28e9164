"""Circuit breakers: what each attempt says of its upstream, and the
candidate filter that orders the candidates by their circuits.

The order is: closed upstreams that are not backups (in the balancing
policy's order), closed backups, then open ones, non-backup first. Open
upstreams are never dropped: when every circuit is open a request still
tries them, so a full outage heals itself. After the cooldown the first
request that has a half-open upstream among its candidates probes it in its
normal place; the others meanwhile find it among the open ones.

What an attempt says of its upstream is readiness's judgement
(``oaproxy.record.evidence``) and one failure more: it fails its upstream
on connection, DNS and TLS errors, deadlines, a stream that broke, fell
silent or sent an event over ``max_event_bytes``, a 5xx, a 401 or 403 to
the upstream's own key, and a 429 to it (the shared key is out of quota:
the next candidate is better tried first; readiness does not count it, as
an upstream out of quota still serves others); any other answer (a 400, a
404 for a model it lacks) shows the upstream works. A client that went away
says nothing. Besides, a 429 or 503 with ``Retry-After`` holds the circuit
open as long as it asks. A 429 to the client's own key (``sk: asis``) is
about that key alone and counts for nothing. Requests oaproxy makes itself (the ``/v1/models`` fetch) are not
attempts and never count.

With ``breaker.shared`` each step is one Lua script on the shared Redis, so
every process sees one state; the process's ``Circuits`` mirror what Redis
answered. While Redis is down each process goes on with its own circuits
(the mirror), and says so once in the log.
"""

from __future__ import annotations

import random
import weakref
from collections.abc import Callable, Sequence
from operator import attrgetter
from typing import Any

from attrs import define, field
from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from oaproxy.circuits import Circuits, CircuitState, failed_in_a_row, retry_after
from oaproxy.config import BreakerConfig, Upstream
from oaproxy.exchange import AttemptLog, Exchange
from oaproxy.pipeline import Observer
from oaproxy.record import Evidence, Record, evidence
from oaproxy.sharedredis import LuaScript, SharedRedis

# A probe's claim lasts its upstream's longest deadline and this much more:
# a request that never finishes cannot keep a circuit half-open for ever.
PROBE_MARGIN = 10.0
# Shared circuit keys vanish a day after their last failure.
KEY_LIFETIME = 86400

_BACKUP_LAST = attrgetter("backup")


def arranged(ready: Sequence[Upstream], opened: Sequence[Upstream]) -> list[Upstream]:
    """Ready upstreams, then open ones, each non-backup first (stable)."""
    return sorted(ready, key=_BACKUP_LAST) + sorted(opened, key=_BACKUP_LAST)


def probe_hold(upstream: Upstream) -> float:
    return max(upstream.timeout, upstream.stream_timeout) + PROBE_MARGIN


@define
class _Claim:
    """What one request may probe."""

    token: str
    probes: set[str] = field(factory=set)


# The scripts keep each circuit in a hash (failures, open_until, and the
# probe's probe_id and probe_until) and answer with state codes: 0 closed,
# 1 half-open and probed by the asking request, 2 open, 3 half-open and
# probed by another. Times go as strings: Lua numbers become integers.
#
# ORDER: for each key, [code, failures, open_until or ""]; a half-open
# circuit nobody probes is given to the asking request's token.
ORDER = LuaScript(
    """
local now, token = tonumber(ARGV[1]), ARGV[2]
local result = {}
for i, key in ipairs(KEYS) do
  local f = redis.call('HMGET', key, 'failures', 'open_until', 'probe_id', 'probe_until')
  local open_until, code = tonumber(f[2]), 0
  if open_until then
    if now < open_until then
      code = 2
    elseif f[3] and f[3] ~= token and now < (tonumber(f[4]) or 0) then
      code = 3
    else
      redis.call('HSET', key, 'probe_id', token, 'probe_until', tostring(now + tonumber(ARGV[2 + i])))
      code = 1
    end
  end
  result[#result + 1] = code
  result[#result + 1] = tonumber(f[1]) or 0
  result[#result + 1] = f[2] or ''
end
return result
"""
)
# FAILURE: one more failure; [state before, failures, open_until or ""].
FAILURE = LuaScript(
    """
local now, threshold, cooldown = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local f = redis.call('HMGET', KEYS[1], 'open_until', 'probe_id')
local open_until, before = tonumber(f[1]), 0
if open_until then
  if now < open_until then before = 2 else before = 1 end
end
local failures = redis.call('HINCRBY', KEYS[1], 'failures', 1)
if before == 1 or failures >= threshold then
  open_until = math.max(open_until or now, now + cooldown)
end
if ARGV[4] ~= '' then open_until = math.max(open_until or now, now + tonumber(ARGV[4])) end
if open_until then redis.call('HSET', KEYS[1], 'open_until', tostring(open_until)) end
if ARGV[5] ~= '' and f[2] == ARGV[5] then redis.call('HDEL', KEYS[1], 'probe_id', 'probe_until') end
redis.call('EXPIRE', KEYS[1], ARGV[6])
return {before, failures, open_until and tostring(open_until) or ''}
"""
)
# SUCCESS: the circuit is closed (forgotten); the state before.
SUCCESS = LuaScript(
    """
local open_until, before = tonumber(redis.call('HGET', KEYS[1], 'open_until')), 0
if open_until then
  if tonumber(ARGV[1]) < open_until then before = 2 else before = 1 end
end
redis.call('DEL', KEYS[1])
return before
"""
)
# RELEASE: the probes the token holds go back.
RELEASE = LuaScript(
    """
for i, key in ipairs(KEYS) do
  if redis.call('HGET', key, 'probe_id') == ARGV[1] then
    redis.call('HDEL', key, 'probe_id', 'probe_until')
  end
end
return 0
"""
)


def _number(value: Any) -> float | None:
    """A number as a Redis reply gives it (txredisapi may have converted it)."""
    if value in (None, "", b""):
        return None
    return float(value)


class Breakers(Observer):
    """The circuit breakers of one config: ``order`` is the candidate
    filter, the observer methods follow the attempts."""

    log = Logger()

    def __init__(
        self,
        config: BreakerConfig,
        circuits: Circuits,
        *,
        wall_clock: Callable[[], float],
        rng: random.Random,
        redis: SharedRedis | None = None,
    ) -> None:
        self._config = config
        self._circuits = circuits
        self._wall_clock = wall_clock
        self._rng = rng
        # Set only with breaker.shared.
        self._redis = redis
        self._redis_down = False
        # Dropped with their request, should it never finish.
        self._claims: weakref.WeakKeyDictionary[Exchange, _Claim] = weakref.WeakKeyDictionary()

    def _claim(self, exchange: Exchange) -> _Claim:
        claim = self._claims.get(exchange)
        if claim is None:
            claim = self._claims[exchange] = _Claim(f"{self._rng.getrandbits(64):016x}")
        return claim

    def _key(self, name: str) -> str:
        assert self._redis is not None
        return self._redis.key("breaker", name)

    # -- the candidate filter ----------------------------------------------------

    def order(
        self, exchange: Exchange, candidates: list[Upstream]
    ) -> list[Upstream] | Deferred[list[Upstream]]:
        if self._redis is None:
            return self._order_here(exchange, candidates)
        claim = self._claim(exchange)
        holds: list[object] = [probe_hold(u) for u in candidates]
        d = self._redis.run(
            ORDER,
            [self._key(u.name) for u in candidates],
            [self._circuits.now(), claim.token, *holds],
        )

        def ordered(reply: list[Any]) -> list[Upstream]:
            self._redis_back()
            ready: list[Upstream] = []
            opened: list[Upstream] = []
            for index, upstream in enumerate(candidates):
                code, failures, open_until = reply[3 * index : 3 * index + 3]
                self._circuits.mirror(upstream.name, int(failures), _number(open_until))
                if int(code) == 1:
                    claim.probes.add(upstream.name)
                    self._circuits.probing(upstream.name)
                (ready if int(code) in (0, 1) else opened).append(upstream)
            return arranged(ready, opened)

        def unavailable(failure: Failure) -> list[Upstream]:
            # The client went away: nothing to order, nor to say of Redis.
            if failure.check(CancelledError):
                failure.raiseException()
            self._redis_failed(failure)
            return self._order_here(exchange, candidates)

        # A reply of the wrong shape is handled like no reply.
        return d.addCallback(ordered).addErrback(unavailable)

    def _order_here(self, exchange: Exchange, candidates: list[Upstream]) -> list[Upstream]:
        ready: list[Upstream] = []
        opened: list[Upstream] = []
        for upstream in candidates:
            state = self._circuits.state(upstream.name)
            if state is CircuitState.HALF_OPEN:
                claim = self._claim(exchange)
                if self._circuits.claim(upstream.name, claim.token, probe_hold(upstream)):
                    claim.probes.add(upstream.name)
                    ready.append(upstream)
                else:
                    opened.append(upstream)
            else:
                (ready if state is CircuitState.CLOSED else opened).append(upstream)
        return arranged(ready, opened)

    # -- the observer ----------------------------------------------------------------

    def attempt_finished(self, exchange: Exchange, attempt: AttemptLog) -> None:
        found = circuit_evidence(attempt)
        claim = self._claims.get(exchange)
        probe = claim.token if claim is not None and attempt.upstream in claim.probes else None
        hold = self._hold(attempt)
        if found is Evidence.FAILED or hold is not None:
            why = attempt.error or f"status {attempt.status}"
            self._failed(attempt.upstream, hold, probe, why)
        elif found is Evidence.ANSWERED:
            self._answered(attempt.upstream)
        if probe is not None and claim is not None and found is not Evidence.NOTHING:
            claim.probes.discard(attempt.upstream)

    def _hold(self, attempt: AttemptLog) -> float | None:
        """How long the upstream asked to be left alone (a 429's or 503's
        Retry-After); a 429 to the client's own key asks it of that key.
        One the request waited for and retried here asks nothing more."""
        if attempt.retried is not None or (attempt.client_key_sent and attempt.status == 429):
            return None
        return retry_after(attempt.retry_after, self._wall_clock())

    def request_finished(self, exchange: Exchange, record: Record | None) -> None:
        claim = self._claims.pop(exchange, None)
        if claim is None or not claim.probes:
            return
        # Probes this request was given but never made: the next request's.
        if self._redis is None:
            for name in claim.probes:
                self._circuits.release(name, claim.token)
            return
        self._redis.run(
            RELEASE, [self._key(name) for name in claim.probes], [claim.token]
        ).addErrback(self._redis_failed)

    def _failed(self, name: str, hold: float | None, probe: str | None, why: str) -> None:
        config = self._config
        if hold is not None:
            why = f"Retry-After {hold:g}s; {why}"

        def count_here() -> None:
            self._circuits.failed(
                name,
                threshold=config.failures,
                cooldown=config.cooldown,
                hold=hold,
                probe_id=probe,
                why=why,
            )

        if self._redis is None:
            count_here()
            return
        arguments: list[object] = [
            self._circuits.now(),
            config.failures,
            config.cooldown,
            "" if hold is None else hold,
            probe or "",
            KEY_LIFETIME,
        ]

        def counted(reply: list[Any]) -> None:
            self._redis_back()
            before, failures, open_until = reply
            after = self._circuits.mirror(name, int(failures), _number(open_until))
            reason = failed_in_a_row(int(failures), why)
            self._circuits.transition(name, CircuitState(int(before)), after, reason)

        def unavailable(failure: Failure) -> None:
            self._redis_failed(failure)
            count_here()

        self._redis.run(FAILURE, [self._key(name)], arguments).addCallback(counted).addErrback(
            unavailable
        )

    def _answered(self, name: str) -> None:
        view = self._circuits.view(name)
        if view.state is CircuitState.CLOSED and view.failures == 0:
            return  # the common case costs nothing, here or in Redis
        if self._redis is None:
            self._circuits.succeeded(name)
            return

        def closed(before: Any) -> None:
            self._redis_back()
            self._circuits.mirror(name, 0, None)
            self._circuits.transition(
                name, CircuitState(int(before)), CircuitState.CLOSED, "it answered"
            )

        def unavailable(failure: Failure) -> None:
            self._redis_failed(failure)
            self._circuits.succeeded(name)

        self._redis.run(SUCCESS, [self._key(name)], [self._circuits.now()]).addCallback(
            closed
        ).addErrback(unavailable)

    # -- shared state ----------------------------------------------------------------

    def _redis_failed(self, failure: Failure) -> None:
        if not self._redis_down:
            self._redis_down = True
            self.log.warn(
                "shared circuit breakers: redis unavailable ({error}); this process goes on"
                " with the circuits it knows",
                error=failure.getErrorMessage(),
            )

    def _redis_back(self) -> None:
        if self._redis_down:
            self._redis_down = False
            self.log.info("shared circuit breakers: redis is back")


def circuit_evidence(attempt: AttemptLog) -> Evidence:
    """What an attempt says of its upstream's circuit: readiness's judgement,
    and a 429 to the upstream's own key as a failure too."""
    if attempt.status == 429 and not attempt.client_key_sent:
        return Evidence.FAILED
    return evidence(attempt)
