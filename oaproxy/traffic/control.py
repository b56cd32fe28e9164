"""What a config's ``limits:`` and per-key settings make: the pipeline's
parts (``Traffic``), built in ``oaproxy.generation``. A config without a
limit makes none of them, so an unlimited proxy pays nothing.

``MemoryTraffic`` (the memory backend's counters and what budgets read of
their history) outlives a reload, as the metrics do: a reload must not hand
every key its limits afresh.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from attrs import frozen

from oaproxy.config import Config, LimiterBackend, all_client_keys
from oaproxy.config.model import NO_DATABASE
from oaproxy.pipeline import Gate, HeadGate, Observer
from oaproxy.sharedredis import SharedRedis
from oaproxy.traffic.backend import BackendTrouble
from oaproxy.traffic.budgets import BudgetHistory, sql_usage_reader
from oaproxy.traffic.counters import Counters
from oaproxy.traffic.memory import MemoryCounters
from oaproxy.traffic.pacing import StreamPace
from oaproxy.traffic.rediscounters import RedisCounters
from oaproxy.traffic.request_limits import RequestLimits
from oaproxy.traffic.tokens import TokenLimits, TokenSettlement


@frozen
class MemoryTraffic:
    counters: MemoryCounters
    history: BudgetHistory

    @classmethod
    def create(cls, reactor: Any) -> MemoryTraffic:
        counters = MemoryCounters(reactor)
        return cls(counters, BudgetHistory(counters))


@frozen
class Traffic:
    """The parts to plug in: a head gate after the client-key gate, a gate
    after every other gate (a cache hit must not spend tokens), an observer,
    and the relay's stream pace."""

    head_gates: tuple[HeadGate, ...]
    gates: tuple[Gate, ...]
    observers: tuple[Observer, ...]
    stream_pace: Callable[[str], float | None] | None


def build_traffic(
    config: Config,
    *,
    reactor: Any,
    wall_clock: Callable[[], float],
    memory: MemoryTraffic,
    shared_redis: SharedRedis | None,
    count_backend_error: Callable[[], None],
) -> Traffic:
    limits = config.limits
    keys = all_client_keys(config)
    limits_requests = bool(
        limits.global_ or limits.per_key or limits.routes or any(k.rate_limit for k in keys)
    )
    limits_tokens = bool(limits.tokens_per_key or any(k.token_limit or k.budget for k in keys))
    pace = StreamPace(limits.stream_pace)
    head_gates: tuple[HeadGate, ...] = ()
    gates: tuple[Gate, ...] = ()
    observers: tuple[Observer, ...] = ()
    if limits_requests or limits_tokens:
        counters: Counters
        if limits.backend is LimiterBackend.REDIS:
            assert shared_redis is not None, "the config loader requires redis: for it"
            counters = RedisCounters(shared_redis, reactor)
        else:
            counters = memory.counters
        trouble = BackendTrouble(limits.on_backend_error, reactor, count_backend_error)
        if limits_requests:
            head_gates = (RequestLimits(limits, counters, trouble, reactor),)
        if limits_tokens:
            in_memory = limits.backend is LimiterBackend.MEMORY
            stored = in_memory and config.dbtype != NO_DATABASE
            gates = (
                TokenLimits(
                    config,
                    counters,
                    trouble,
                    reactor,
                    wall_clock,
                    history=memory.history if in_memory else None,
                    read_usage=sql_usage_reader(reactor, config.dbtype, config.dbaddr)
                    if stored
                    else None,
                ),
            )
            observers = (TokenSettlement(counters, trouble),)
    return Traffic(head_gates, gates, observers, pace.interval if pace else None)
