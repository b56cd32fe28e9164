"""Traffic control: request limits, token limits and budgets with
reservations, stream pacing (``limits:`` and the per-key settings).

How it plugs into the request pipeline (``oaproxy.pipeline``):

- ``request_limits.RequestLimits`` is a head gate, after the client-key
  gate: global, per-key (or per client IP without a key) and per-route
  request rates, checked and counted in one step before the body is read.
- ``tokens.TokenLimits`` is the last gate: once the body is parsed it
  estimates the request's tokens (and dollars) and reserves them against the
  key's token rates and budget in one atomic step;
  ``tokens.TokenSettlement``, an observer, replaces the reservation by the
  real usage when the request is over (nothing, when no answer came).
- Both give the answer OpenAI's ``x-ratelimit-*`` headers (and
  ``Retry-After`` on a refusal) through the request's answer headers
  (``oaproxy.web.answer_headers``), which win over an upstream's own.
- ``pacing`` spaces a stream's content events out (the relay asks
  ``StreamPace`` for the route's interval).

Counters live in a ``counters.Counters`` store: ``memory.MemoryCounters``
(one process, on the reactor's clock) or ``rediscounters.RedisCounters``
(Lua scripts through ``SharedRedis``, shared by every process). ``control``
builds all of it from a config.
"""
