"""The limit counters (``oaproxy.traffic.counters``), the same behaviour
asked of both stores: in memory, and in the real Redis through Lua scripts.
Both are driven by a ``Clock``: the Redis store sends the clock's time with
each script."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from oaproxy.sharedredis import SharedRedis
from oaproxy.traffic.counters import (
    Admission,
    Charge,
    Counter,
    Counters,
    FixedWindow,
    Held,
    MovingWindow,
)
from oaproxy.traffic.memory import SWEEP_INTERVAL, MemoryCounters
from oaproxy.traffic.rediscounters import RedisCounters
from tests.live import SHARED_REDIS, reachable, reactor, unavailable, wait_for


def moving(key: str, limit: int, seconds: float = 60) -> Counter:
    return Counter(key, limit, MovingWindow(seconds))


def fixed(key: str, limit: int, ends_in: float) -> Counter:
    return Counter(key, limit, FixedWindow(ends_in))


async def start_shared_redis(
    case: TestCase, port: int = SHARED_REDIS[1], prefix: str | None = None
) -> SharedRedis:
    """A started ``SharedRedis`` on its own key prefix, connected; its keys
    are deleted and it is stopped in cleanup."""
    if not reachable("127.0.0.1", port):
        unavailable(f"no Redis on 127.0.0.1:{port}")
    shared = SharedRedis(
        f"redis://127.0.0.1:{port}/0", prefix or f"oaproxy-test:{uuid.uuid4().hex}:", reactor
    )
    shared.startService()

    async def clean() -> None:
        if shared.connected:
            keys = await shared.command("KEYS", shared.prefix + "*")
            if keys:
                await shared.command("DEL", *keys)
        stopped = shared.stopService()
        if stopped is not None:
            await stopped

    case.addCleanup(lambda: Deferred.fromCoroutine(clean()))
    await wait_for(lambda: shared.connected, timeout=10)
    return shared


class CounterBehaviour:
    """The tests every store passes; ``counters`` is made by ``setUp``."""

    clock: Clock
    counters: Counters

    async def acquire(self, *charges: Charge) -> Admission:
        result = self.counters.acquire(charges)
        return await result if isinstance(result, Deferred) else result

    async def settle(self, held: Held | None, amounts: Sequence[int]) -> None:
        assert held is not None
        result = self.counters.settle(held, amounts)
        if result is not None:
            await result

    async def test_moving_window_admits_the_limit(self: Any) -> None:
        """A moving window admits its limit, then refuses until the oldest use ages out."""
        counter = moving("m", 3)
        for second in range(3):
            admission = await self.acquire(Charge(counter, 1))
            self.assertTrue(admission.admitted)
            self.assertEqual(admission.readings[0].remaining, 2 - second)
            self.assertEqual(admission.readings[0].reset, 60)
            self.clock.advance(10)
        refused = await self.acquire(Charge(counter, 1))
        self.assertFalse(refused.admitted)
        self.assertIsNone(refused.held)
        reading = refused.readings[0]
        self.assertEqual((reading.used, reading.remaining), (3, 0))
        # The first use was made 30 s ago: it leaves the window in 30 s; the
        # last one (20 s after it) in 50 s.
        self.assertAlmostEqual(reading.wait, 30)
        self.assertAlmostEqual(reading.reset, 50)
        self.clock.advance(30)
        self.assertTrue((await self.acquire(Charge(counter, 1))).admitted)
        self.assertFalse((await self.acquire(Charge(counter, 1))).admitted)

    async def test_weighted_moving_window(self: Any) -> None:
        """Weighted charges wait for enough of the oldest ones to age out."""
        counter = moving("w", 100)
        self.assertTrue((await self.acquire(Charge(counter, 40))).admitted)
        self.clock.advance(5)
        self.assertTrue((await self.acquire(Charge(counter, 40))).admitted)
        self.clock.advance(5)
        refused = await self.acquire(Charge(counter, 50))
        self.assertFalse(refused.admitted)
        self.assertEqual(refused.readings[0].used, 80)
        # 30 more are needed: the first charge (40) must age out, in 50 s.
        self.assertAlmostEqual(refused.readings[0].wait, 50)
        self.assertTrue((await self.acquire(Charge(counter, 20))).admitted)

    async def test_larger_than_the_limit_never_fits(self: Any) -> None:
        """A charge larger than the whole limit is refused with no wait that helps."""
        admission = await self.acquire(Charge(moving("big", 10), 11))
        self.assertFalse(admission.admitted)
        self.assertIsNone(admission.readings[0].wait)
        admission = await self.acquire(Charge(fixed("big-f", 10, 30), 11))
        self.assertIsNone(admission.readings[0].wait)

    async def test_fixed_window(self: Any) -> None:
        """A fixed window counts until it ends, and says so in reset and wait."""
        admission = await self.acquire(Charge(fixed("f:0", 2, 45), 1))
        self.assertEqual(admission.readings[0].reset, 45)
        await self.acquire(Charge(fixed("f:0", 2, 45), 1))
        refused = await self.acquire(Charge(fixed("f:0", 2, 45), 1))
        self.assertFalse(refused.admitted)
        self.assertEqual(refused.readings[0].wait, 45)
        # The next window is another key.
        self.assertTrue((await self.acquire(Charge(fixed("f:1", 2, 60), 1))).admitted)

    async def test_all_or_nothing(self: Any) -> None:
        """When one charge does not fit, none of the others is counted."""
        roomy, full = moving("roomy", 10), moving("full", 1)
        self.assertTrue((await self.acquire(Charge(full, 1))).admitted)
        refused = await self.acquire(Charge(roomy, 1), Charge(full, 1))
        self.assertFalse(refused.admitted)
        self.assertEqual([r.fits for r in refused.readings], [True, False])
        admitted = await self.acquire(Charge(roomy, 1))
        self.assertEqual(admitted.readings[0].used, 1)

    async def test_settle_replaces_the_estimate(self: Any) -> None:
        """Settling replaces a reservation by the real amount, in both kinds of window."""
        log, count = moving("log", 100), fixed("count:0", 100, 60)
        admission = await self.acquire(Charge(log, 60), Charge(count, 60))
        await self.settle(admission.held, [25, 25])
        after = await self.acquire(Charge(log, 1), Charge(count, 1))
        self.assertEqual([r.used for r in after.readings], [26, 26])

    async def test_settle_to_nothing_is_a_refund(self: Any) -> None:
        """Settling with 0 gives the whole reservation back."""
        counter = moving("refund", 10)
        admission = await self.acquire(Charge(counter, 10))
        self.assertFalse((await self.acquire(Charge(counter, 1))).admitted)
        await self.settle(admission.held, [0])
        self.assertTrue((await self.acquire(Charge(counter, 10))).admitted)

    async def test_wait_when_weights_add_up_to_their_number(self: Any) -> None:
        """A window whose charges weigh 0 (an empty estimate, a refund) and 2
        in all, as many as there are charges, still waits for the charge
        that frees enough, not for the one at that index."""
        empty, refunded = moving("empty", 3), moving("refunded", 3)
        await self.acquire(Charge(empty, 0))
        refund = await self.acquire(Charge(refunded, 1))
        await self.settle(refund.held, [0])
        self.clock.advance(5)
        for counter in (empty, refunded):
            self.assertTrue((await self.acquire(Charge(counter, 2))).admitted)
        self.clock.advance(5)
        for counter in (empty, refunded):
            refused = await self.acquire(Charge(counter, 2))
            self.assertFalse(refused.admitted)
            # 1 more is needed: only the charge of 2, made 5 s ago, frees it, in 55 s.
            self.assertAlmostEqual(refused.readings[0].wait, 55)

    async def test_settle_after_the_window_changes_nothing(self: Any) -> None:
        """A reservation settled after its window passed does not count in the next."""
        counter = moving("late", 10, seconds=10)
        admission = await self.acquire(Charge(counter, 5))
        self.clock.advance(11)
        fresh = await self.acquire(Charge(counter, 1))
        await self.settle(admission.held, [9])
        self.assertEqual(fresh.readings[0].used, 1)
        again = await self.acquire(Charge(counter, 1))
        self.assertEqual(again.readings[0].used, 2)


class MemoryCountersTests(CounterBehaviour, TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.memory = MemoryCounters(self.clock)
        self.counters = self.memory

    def test_acquire_is_synchronous(self) -> None:
        """The memory store answers at once: a request pays for no Deferred."""
        self.assertIsInstance(self.memory.acquire([Charge(moving("x", 1), 1)]), Admission)

    def test_quiet_counters_are_swept(self) -> None:
        """Counters per client IP do not pile up: quiet ones are dropped."""
        for n in range(100):
            self.memory.acquire([Charge(moving(f"ip={n}", 5, seconds=10), 1)])
        self.memory.acquire([Charge(fixed("f:0", 5, 10), 1)])
        self.assertEqual(len(self.memory), 101)
        self.clock.advance(SWEEP_INTERVAL)
        self.memory.acquire([Charge(moving("busy", 5), 1)])
        self.assertEqual(len(self.memory), 1)


class RedisCountersTests(CounterBehaviour, TestCase):
    timeout = 30

    async def setUp(self) -> None:  # type: ignore[override]
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.redis = await start_shared_redis(self)
        self.counters = RedisCounters(self.redis, self.clock)

    async def test_keys_expire_with_their_window(self) -> None:
        """Every key the scripts write expires when its window has passed."""
        await self.acquire(Charge(moving("ttl", 5, seconds=30), 1), Charge(fixed("f:9", 5, 20), 1))
        keys = await self.redis.command("KEYS", self.redis.prefix + "*")
        self.assertEqual(len(keys), 3)
        for key in keys:
            ttl = await self.redis.command("PTTL", key)
            self.assertTrue(0 < ttl <= 31_000, (key, ttl))
