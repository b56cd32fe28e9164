"""What one limiter step costs, in process: the acquisition of a request's
counters (a global, a per-key and a token limit, as ``run.py --limits``
sets them) and its settlement, in memory and in Redis, one at a time and
16 at once.

    python bench/limiter.py [--calls N] [--redis URL]

The Redis rows use the proxy's own client (``SharedRedis``, txredisapi) on
a key prefix of this run's, deleted at the end. "cpu" is this process's
CPU time per step: what the proxy spends, apart from Redis's own work.
"""

from __future__ import annotations

import argparse
import time
import uuid
from collections.abc import Callable
from typing import Any

from twisted.internet import defer, task

from oaproxy.sharedredis import SharedRedis
from oaproxy.traffic.counters import Admission, Charge, Counter, Counters, Held, MovingWindow
from oaproxy.traffic.memory import MemoryCounters
from oaproxy.traffic.rediscounters import RedisCounters

CHARGES = (
    Charge(Counter("limits:requests:global:100000000/60s", 100_000_000, MovingWindow(60)), 1),
    Charge(
        Counter("limits:requests:key:key=bench:100000000/60s", 100_000_000, MovingWindow(60)), 1
    ),
    Charge(Counter("limits:tokens:key:key=bench:10000000000/60s", 10**10, MovingWindow(60)), 300),
)
SETTLED = (1, 1, 11)


async def measure(step: Callable[[], Any], calls: int, concurrency: int) -> tuple[float, float]:
    """Microseconds of wall and CPU time per step."""

    async def worker(count: int) -> None:
        for _ in range(count):
            result = step()
            if isinstance(result, defer.Deferred):
                await result

    wall, cpu = time.perf_counter(), time.process_time()
    await defer.gatherResults(
        [defer.Deferred.fromCoroutine(worker(calls // concurrency)) for _ in range(concurrency)]
    )
    done = calls // concurrency * concurrency
    return (
        (time.perf_counter() - wall) / done * 1e6,
        (time.process_time() - cpu) / done * 1e6,
    )


async def rows(counters: Counters, calls: int) -> list[tuple[str, int, float, float]]:
    held: list[Held] = []

    def admitted(admission: Admission) -> None:
        assert admission.held is not None
        held.append(admission.held)

    def acquire() -> Any:
        result = counters.acquire(CHARGES)
        if isinstance(result, defer.Deferred):
            return result.addCallback(admitted)
        admitted(result)
        return None

    def settle() -> Any:
        return counters.settle(held.pop(), SETTLED)

    out = []
    for concurrency in (1, 16):
        out.append(("acquire", concurrency, *await measure(acquire, calls, concurrency)))
        out.append(("settle", concurrency, *await measure(settle, calls, concurrency)))
    return out


async def main(reactor: Any, args: argparse.Namespace) -> None:
    table = [("memory", *row) for row in await rows(MemoryCounters(reactor), args.calls)]
    redis = SharedRedis(args.redis, f"oaproxy-bench:{uuid.uuid4().hex}:", reactor)
    redis.startService()
    for _ in range(500):
        if redis.connected:
            break
        await task.deferLater(reactor, 0.01, lambda: None)
    else:
        raise SystemExit(f"bench: no Redis at {args.redis}")
    try:
        table += [("redis", *row) for row in await rows(RedisCounters(redis, reactor), args.calls)]
    finally:
        keys = await redis.command("KEYS", redis.prefix + "*")
        if keys:
            await redis.command("DEL", *keys)
        stopped = redis.stopService()
        if stopped is not None:
            await stopped
    print(f"{'backend':8} {'step':8} {'concurrent':>10} {'wall us':>9} {'cpu us':>8}")
    for backend, step, concurrency, wall, cpu in table:
        print(f"{backend:8} {step:8} {concurrency:>10} {wall:>9.1f} {cpu:>8.1f}")


def run() -> None:
    parser = argparse.ArgumentParser(description="the limiter's cost per step")
    parser.add_argument("--calls", type=int, default=5000, help="steps per row")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    args = parser.parse_args()
    task.react(lambda reactor: defer.Deferred.fromCoroutine(main(reactor, args)))


if __name__ == "__main__":
    run()
