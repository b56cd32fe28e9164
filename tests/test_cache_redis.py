"""Tests for the response cache on Redis: the store against the shared Redis,
the official SDK through the real service with ``cache.backend: redis``, and
Redis gone (never started, hung, and a private ``redis-server`` stopped by
PID mid-run): the cache falls back to a miss and nothing fails or waits."""

from __future__ import annotations

import json
import uuid
from typing import Any

import openai
from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase, TestCase

from oaproxy.cache.stores import REDIS_TIMEOUT, RedisStore
from oaproxy.sharedredis import SharedRedis
from tests.doubles import Harness
from tests.fakeupstream import FakeUpstream
from tests.live import (
    SHARED_REDIS,
    EndToEndCase,
    PrivateRedis,
    RunningProxy,
    reachable,
    reactor,
    redis_client,
    unavailable,
    wait_for,
)
from tests.payloads import FAKE_MODEL, HI, OTHER_KEY, upstream
from tests.test_cache import COMPLETION

CACHING: dict[str, Any] = {"caching": True}


def shared_redis_url() -> str:
    if not reachable(*SHARED_REDIS):
        unavailable("Redis is not running at 127.0.0.1:6379")
    return f"redis://{SHARED_REDIS[0]}:{SHARED_REDIS[1]}/0"


def own_prefix(case: SynchronousTestCase) -> str:
    """A Redis prefix of the test's own; its keys are deleted in cleanup."""
    prefix = f"oaproxy-test-{uuid.uuid4().hex[:12]}:"
    case.addCleanup(lambda: Deferred.fromCoroutine(delete_keys(prefix)))
    return prefix


async def redis_keys(prefix: str) -> list[str]:
    client = await redis_client(SHARED_REDIS[1])
    try:
        found: list[str] = await client.keys(prefix + "*")
        return found
    finally:
        await client.disconnect()


async def delete_keys(prefix: str) -> None:
    keys = await redis_keys(prefix)
    if keys:
        client = await redis_client(SHARED_REDIS[1])
        try:
            await client.delete(*keys)
        finally:
            await client.disconnect()


class PrefixedCase(TestCase):
    timeout = 30

    def setUp(self) -> None:
        self.url = shared_redis_url()
        self.prefix = own_prefix(self)


class RedisStoreTests(PrefixedCase):
    async def test_round_trip_compressed_with_ttl(self) -> None:
        """SET … EX ttl of a compressed value under the prefix; GET gives it back."""
        redis = SharedRedis(self.url, self.prefix, reactor)
        redis.startService()
        self.addCleanup(redis.stopService)
        await wait_for(lambda: redis.connected, timeout=10)
        store = RedisStore(redis, reactor, ttl=30, max_entry_bytes=1 << 20)
        entry = json.dumps(COMPLETION).encode() * 20
        await store.put("k1", entry)
        self.assertEqual(await store.get("k1"), entry)
        self.assertEqual(await store.get("k2"), None)
        client = await redis_client(SHARED_REDIS[1])
        try:
            raw = await client.get(self.prefix + "cache:k1")
            ttl = await client.ttl(self.prefix + "cache:k1")
            await client.set(self.prefix + "cache:foreign", "not ours")
        finally:
            await client.disconnect()
        self.assertTrue(raw.startswith(b"\xff\x01"))
        self.assertLess(len(raw), len(entry) / 5)
        self.assertTrue(0 < ttl <= 30, ttl)
        self.assertEqual(await store.get("foreign"), None)

    async def test_oversized_value_is_no_entry(self) -> None:
        """A value that inflates past max_entry_bytes is not an entry."""
        redis = SharedRedis(self.url, self.prefix, reactor)
        redis.startService()
        self.addCleanup(redis.stopService)
        await wait_for(lambda: redis.connected, timeout=10)
        await RedisStore(redis, reactor, ttl=30, max_entry_bytes=1 << 20).put("big", b"x" * 5000)
        self.assertEqual(
            await RedisStore(redis, reactor, 30, max_entry_bytes=4999).get("big"), None
        )


def sdk_chat(client: openai.OpenAI, **more: Any) -> Any:
    raw = client.chat.completions.with_raw_response.create(
        model=FAKE_MODEL, messages=HI, extra_body=CACHING, **more
    )
    return raw.headers.get("x-oaproxy-cache"), raw.parse()


def sdk_stream(client: openai.OpenAI, **more: Any) -> tuple[str | None, str, list[Any]]:
    """The official SDK reading a stream: the cache header, the text, the usages."""
    raw = client.chat.completions.with_raw_response.create(
        model=FAKE_MODEL, messages=HI, stream=True, extra_body=CACHING, **more
    )
    text, usages = "", []
    parts: Any = raw.parse()
    for part in parts:
        if part.usage is not None:
            usages.append(part.usage)
        for choice in part.choices:
            text += choice.delta.content or ""
    return raw.headers.get("x-oaproxy-cache"), text, usages


class RedisCacheEndToEndTests(EndToEndCase):
    async def cached_proxy(self, url: str, prefix: str) -> tuple[FakeUpstream, RunningProxy]:
        fake = await self.fake()
        proxy = await self.proxy(
            [upstream("main", fake.endpoint)],
            redis=url,
            redis_prefix=prefix,
            cache={"backend": "redis", "ttl": 60},
            # The records' Redis stream goes under the prefix too.
            records={"redis_key": prefix + "records", "spool_dir": self.mktemp()},
        )
        return fake, proxy

    def stored(self, proxy: RunningProxy) -> float:
        value = proxy.service.shared.metrics.registry.get_sample_value(
            "oaproxy_cache_total", {"result": "store"}
        )
        return value or 0.0

    async def test_sdk_reads_cached_streams(self) -> None:
        """The official SDK reads a stream and a completion replayed from Redis."""
        prefix = own_prefix(self)
        fake, proxy = await self.cached_proxy(shared_redis_url(), prefix)
        first = await self.sdk(proxy, lambda c: sdk_stream(c))
        self.assertEqual(first[:2], ("miss", "Hello, world!"))
        await wait_for(lambda: self.stored(proxy) == 1, timeout=10)
        again = await self.sdk(
            proxy, lambda c: sdk_stream(c, stream_options={"include_usage": True})
        )
        self.assertEqual(again[:2], ("hit", "Hello, world!"))
        self.assertEqual([u.total_tokens for u in again[2]], [11])
        header, completion = await self.sdk(proxy, lambda c: sdk_chat(c))
        self.assertEqual((header, completion.choices[0].message.content), ("hit", "Hello, world!"))
        self.assertEqual(completion.choices[0].finish_reason, "stop")
        self.assertEqual(len(fake.requests), 1)
        self.assertNotIn("caching", fake.requests[0].json())
        # Isolation holds in Redis too: bob's first ask is his own miss.
        header, _ = await self.sdk(proxy, lambda c: sdk_chat(c), key=OTHER_KEY)
        self.assertEqual((header, len(fake.requests)), ("miss", 2))
        await wait_for(lambda: self.stored(proxy) == 2, timeout=10)
        keys = [k for k in await redis_keys(prefix) if k.startswith(prefix + "cache:")]
        self.assertEqual(len(keys), 2)
        for key in keys:
            # Hashed: neither a client key nor its name shows.
            self.assertRegex(key, "^" + prefix + "cache:[0-9a-f]{64}$")
        hit = proxy.records.seen[1]
        self.assertEqual((hit["cache"], hit["upstream"], hit["cost"]), ("hit", None, 0.0))

    async def test_redis_stopped_mid_run(self) -> None:
        """Redis stopped by PID mid-run: lookups fall back to a miss, nothing fails or waits."""
        private = PrivateRedis(self.mktemp())
        await private.start()
        self.addCleanup(private.kill)
        fake, proxy = await self.cached_proxy(f"redis://127.0.0.1:{private.port}/0", "t:")
        redis = proxy.service.generation.shared_redis
        await wait_for(lambda: redis.connected, timeout=10)
        self.assertEqual((await self.sdk(proxy, lambda c: sdk_chat(c)))[0], "miss")
        await wait_for(lambda: self.stored(proxy) == 1, timeout=10)
        self.assertEqual((await self.sdk(proxy, lambda c: sdk_chat(c)))[0], "hit")
        private.kill()
        await wait_for(lambda: not redis.connected, timeout=10)
        started = reactor.seconds()
        for _ in range(3):
            header, completion = await self.sdk(proxy, lambda c: sdk_chat(c))
            self.assertEqual(
                (header, completion.choices[0].message.content), ("miss", "Hello, world!")
            )
        header, text, _ = await self.sdk(proxy, lambda c: sdk_stream(c))
        self.assertEqual((header, text), ("miss", "Hello, world!"))
        self.assertLess(reactor.seconds() - started, 5)
        self.assertEqual(len(fake.requests), 5)
        self.assertEqual([r["outcome"] for r in proxy.records.seen], ["ok"] * 6)


class RedisDownTests(SynchronousTestCase):
    CONFIG = """
authorization: {alice: sk-alice}
redis: redis://127.0.0.1:1/0
cache: {backend: redis}
upstreams:
  - {name: a, endpoint: "https://a.test/v1", sk: sk-a}
"""

    def ask(self, h: Harness) -> Any:
        return h.chat(key="sk-alice", extra=CACHING)

    def test_not_connected_is_a_miss_at_once(self) -> None:
        """Without a connection to Redis a lookup is a miss at once and the request goes on."""
        h = Harness(self.CONFIG)
        client = self.ask(h)
        h.agent.only().respond(200, body=json.dumps(COMPLETION).encode())
        reply = client.reply()
        self.assertEqual((reply.status, reply.header(b"x-oaproxy-cache")), (200, b"miss"))
        self.assertEqual(h.record()["outcome"], "ok")

    def test_hung_redis_is_a_miss_after_the_lookup_timeout(self) -> None:
        """A Redis that never answers holds a request for the lookup timeout only."""
        h = Harness(self.CONFIG)
        cache = h.generation.response_cache
        assert cache is not None
        pending: list[Deferred[Any]] = []

        class Hung(SharedRedis):
            def command(self, *arguments: object) -> Deferred[Any]:
                pending.append(Deferred())
                return pending[-1]

        hung = Hung("redis://127.0.0.1:1/0", "oaproxy:", h.clock)
        cache.store = RedisStore(hung, h.clock, ttl=60, max_entry_bytes=1 << 20)
        client = self.ask(h)
        self.assertEqual(h.agent.calls, [])
        h.clock.advance(REDIS_TIMEOUT)
        h.agent.only().respond(200, body=json.dumps(COMPLETION).encode())
        self.assertEqual(client.reply().header(b"x-oaproxy-cache"), b"miss")
        # The GET, then the SET, given up in its turn: nothing waits on Redis.
        self.assertEqual(len(pending), 2)
        h.clock.advance(REDIS_TIMEOUT)
        self.assertTrue(all(d.called for d in pending))

    def test_client_gone_during_the_lookup(self) -> None:
        """A client that leaves while the lookup waits is let go; nothing is forwarded."""
        h = Harness(self.CONFIG)
        cache = h.generation.response_cache
        assert cache is not None

        class Hung(SharedRedis):
            def command(self, *arguments: object) -> Deferred[Any]:
                return Deferred()

        cache.store = RedisStore(Hung("redis://127.0.0.1:1/0", "p:", h.clock), h.clock, 60, 1000)
        client = self.ask(h)
        client.disconnect()
        h.clock.advance(REDIS_TIMEOUT)
        self.assertEqual(h.agent.calls, [])
        self.assertEqual(h.clock.getDelayedCalls(), [])
