"""Counters in the shared Redis (``limits.backend: redis``): every process
that uses the same Redis and ``redis_prefix`` counts against the same limits.

Each acquisition and each settlement is one Lua script, one round trip,
atomic on the server: two processes can never both take the last unit of a
limit. Times are the caller's clock in milliseconds (as the ``limits``
library does), so that tests can drive them with a ``Clock``; machines
sharing a Redis are expected to keep their clocks in step (NTP).

A moving window is a sorted set (member -> time of the charge) and a hash
(member -> amount, ``#total``, and ``#uneven``: how many amounts are not 1);
a fixed window is one integer. Every
key expires when its window has passed.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from itertools import count
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime

from oaproxy.sharedredis import LuaScript, SharedRedis
from oaproxy.traffic.counters import Admission, Charge, Counter, Held, MovingWindow, Reading

#: Seconds a check may wait for Redis before the backend counts as failed.
REDIS_TIMEOUT = 2.0

# KEYS: two per charge (moving: the log and its amounts; fixed: the count twice).
# ARGV: now (ms), member, then per charge: kind (m|f), limit, span (ms: the
# moving window's length, or until the fixed window ends), amount.
# Returns: admitted (1|0), then per charge: used, reset (ms), wait (ms; -1: never).
ACQUIRE = LuaScript(
    """
local now, member = tonumber(ARGV[1]), ARGV[2]
local n = #KEYS / 2
local used, resets, waits, fits = {}, {}, {}, true

local function trim(log, amounts, cutoff)
  while true do
    local old = redis.call('ZRANGEBYSCORE', log, '-inf', cutoff, 'LIMIT', 0, 256)
    if #old == 0 then return end
    local freed, uneven = 0, 0
    for _, amount in ipairs(redis.call('HMGET', amounts, unpack(old))) do
      amount = tonumber(amount) or 0
      freed = freed + amount
      if amount ~= 1 then uneven = uneven + 1 end
    end
    redis.call('ZREM', log, unpack(old))
    redis.call('HDEL', amounts, unpack(old))
    redis.call('HINCRBY', amounts, '#total', -freed)
    if uneven > 0 then redis.call('HINCRBY', amounts, '#uneven', -uneven) end
  end
end

local function moving_wait(log, amounts, total, excess, span)
  if (tonumber(redis.call('HGET', amounts, '#uneven')) or 0) == 0 then
    -- Every entry weighs 1 (request counts): the one to wait for is known.
    local entry = redis.call('ZRANGE', log, excess - 1, excess - 1, 'WITHSCORES')
    return tonumber(entry[2]) + span - now
  end
  local entries = redis.call('ZRANGE', log, 0, -1, 'WITHSCORES')
  local freed = 0
  for i = 1, #entries, 2 do
    freed = freed + (tonumber(redis.call('HGET', amounts, entries[i])) or 0)
    if freed >= excess then return tonumber(entries[i + 1]) + span - now end
  end
  return span
end

for i = 1, n do
  local at = 2 + (i - 1) * 4
  local kind, limit = ARGV[at + 1], tonumber(ARGV[at + 2])
  local span, amount = tonumber(ARGV[at + 3]), tonumber(ARGV[at + 4])
  local key, amounts = KEYS[2 * i - 1], KEYS[2 * i]
  local u, reset, wait = 0, span, 0
  if kind == 'm' then
    trim(key, amounts, now - span)
    u = tonumber(redis.call('HGET', amounts, '#total')) or 0
    local newest = redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')
    reset = #newest > 0 and (tonumber(newest[2]) + span - now) or 0
    if amount > limit then wait = -1
    elseif u + amount > limit then wait = moving_wait(key, amounts, u, u + amount - limit, span)
    end
  else
    u = tonumber(redis.call('GET', key)) or 0
    if amount > limit then wait = -1 elseif u + amount > limit then wait = span end
  end
  if wait ~= 0 then fits = false end
  used[i], resets[i], waits[i] = u, reset, wait
end

if fits then
  for i = 1, n do
    local at = 2 + (i - 1) * 4
    local kind, span, amount = ARGV[at + 1], tonumber(ARGV[at + 3]), tonumber(ARGV[at + 4])
    local key, amounts = KEYS[2 * i - 1], KEYS[2 * i]
    if kind == 'm' then
      redis.call('ZADD', key, now, member)
      redis.call('HSET', amounts, member, amount)
      redis.call('HINCRBY', amounts, '#total', amount)
      if amount ~= 1 then redis.call('HINCRBY', amounts, '#uneven', 1) end
      redis.call('PEXPIRE', key, span)
      redis.call('PEXPIRE', amounts, span)
      resets[i] = span
    else
      redis.call('SET', key, 0, 'PX', span + 1000, 'NX')
      redis.call('INCRBY', key, amount)
    end
    used[i] = used[i] + amount
  end
end

local result = {fits and 1 or 0}
for i = 1, n do
  result[#result + 1] = used[i]
  result[#result + 1] = resets[i]
  result[#result + 1] = waits[i]
end
return result
"""
)

# KEYS as for ACQUIRE. ARGV: member, then per charge: kind (m|f), counted, amount.
SETTLE = LuaScript(
    """
local member = ARGV[1]
for i = 1, #KEYS / 2 do
  local at = 1 + (i - 1) * 3
  local kind, counted, amount = ARGV[at + 1], tonumber(ARGV[at + 2]), tonumber(ARGV[at + 3])
  local key, amounts = KEYS[2 * i - 1], KEYS[2 * i]
  if kind == 'm' then
    local old = tonumber(redis.call('HGET', amounts, member))
    if old then
      local uneven = (old ~= 1) and -1 or 0
      if amount == 0 then
        redis.call('ZREM', key, member)
        redis.call('HDEL', amounts, member)
      else
        redis.call('HSET', amounts, member, amount)
        if amount ~= 1 then uneven = uneven + 1 end
      end
      redis.call('HINCRBY', amounts, '#total', amount - old)
      if uneven ~= 0 then redis.call('HINCRBY', amounts, '#uneven', uneven) end
    end
  elseif redis.call('EXISTS', key) == 1 then
    redis.call('INCRBY', key, amount - counted)
  end
end
return 1
"""
)


class RedisCounters:
    """The ``Counters`` shared through ``SharedRedis``."""

    def __init__(
        self, redis: SharedRedis, clock: IReactorTime, *, timeout: float = REDIS_TIMEOUT
    ) -> None:
        self._redis = redis
        self._clock = clock
        self._timeout = timeout
        # Members of moving windows are unique across processes.
        self._process = os.urandom(6).hex()
        self._members = count()

    def acquire(self, charges: Sequence[Charge]) -> Deferred[Admission]:
        member = f"{self._process}:{next(self._members)}"
        arguments: list[object] = [_milliseconds(self._clock.seconds()), member]
        for charge in charges:
            counter = charge.counter
            arguments += [_kind(counter), counter.limit, _span(counter), charge.amount]
        charged = tuple(charges)

        def admission(reply: Any) -> Admission:
            admitted = reply[0] == 1
            readings = tuple(
                _reading(charge.counter.limit, reply[1 + 3 * i : 4 + 3 * i])
                for i, charge in enumerate(charged)
            )
            return Admission(admitted, readings, Held(member, charged) if admitted else None)

        d = self._redis.run(ACQUIRE, self._keys(charged), arguments)
        return d.addTimeout(self._timeout, self._clock).addCallback(admission)

    def settle(self, held: Held, amounts: Sequence[int]) -> Deferred[None]:
        arguments: list[object] = [held.member]
        for charge, amount in zip(held.charges, amounts):
            arguments += [_kind(charge.counter), charge.amount, amount]
        d = self._redis.run(SETTLE, self._keys(held.charges), arguments)
        return d.addTimeout(self._timeout, self._clock).addCallback(lambda _: None)

    def _keys(self, charges: Sequence[Charge]) -> list[str]:
        keys = []
        for charge in charges:
            key = self._redis.key(charge.counter.key)
            moving = isinstance(charge.counter.window, MovingWindow)
            keys += [key, key + ":amounts" if moving else key]
        return keys


def _kind(counter: Counter) -> str:
    return "m" if isinstance(counter.window, MovingWindow) else "f"


def _span(counter: Counter) -> int:
    window = counter.window
    seconds = window.seconds if isinstance(window, MovingWindow) else window.ends_in
    # At least 1 ms: PEXPIRE 0 would delete the key at once.
    return max(1, _milliseconds(seconds))


def _milliseconds(seconds: float) -> int:
    return round(seconds * 1000)


def _reading(limit: int, values: Sequence[int]) -> Reading:
    used, reset, wait = values
    return Reading(limit, int(used), reset / 1000, None if wait < 0 else wait / 1000)
