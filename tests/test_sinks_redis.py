"""Tests for ``oaproxy.sinks.redis``, against real Redis servers: the shared one
at 127.0.0.1:6379, and private ``redis-server``s that the fault tests stop
and start.
"""

from __future__ import annotations

import io
import json
import os
import uuid
from collections.abc import Generator
from functools import partial
from typing import Any

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.trial.unittest import SynchronousTestCase, TestCase

from oaproxy.record import Record, encode_record, record_document
from oaproxy.sinks import redis
from oaproxy.sinks.redis import (
    RedisAddress,
    RedisSink,
    batched_arguments,
    script_arguments,
    usage_date,
)
from tests.live import (
    SHARED_REDIS,
    PrivateRedis,
    reachable,
    redis_client,
    unavailable,
    wait_for,
)
from tests.records import calls_on_main_thread, emit, record, usage
from tests.records import numbered as nth_record

#: The records here: chat completions of alice's, with usage and cost.
numbered = partial(nth_record, key_name="alice", usage=usage(10, 5), cost=0.000013)


def documents(records: list[Record]) -> list[dict[str, Any]]:
    return [record_document(r) for r in records]


class HelperTests(SynchronousTestCase):
    def test_address(self) -> None:
        """A redis: URL gives its host, port, database and credentials, with
        defaults; another scheme or a database that is no number is refused."""
        self.assertEqual(
            RedisAddress.from_url("redis://u:p%40ss@redis.example:6380/2"),
            RedisAddress("redis.example", 6380, 2, "u", "p@ss"),
        )
        self.assertEqual(
            RedisAddress.from_url("redis://127.0.0.1"),
            RedisAddress("127.0.0.1", 6379, 0, None, None),
        )
        self.assertRaises(ValueError, RedisAddress.from_url, "http://x/0")
        self.assertRaises(ValueError, RedisAddress.from_url, "redis://x/abc")

    def test_script_arguments(self) -> None:
        """The Lua script gets the dedupe key, the stream and the day's usage
        hashes (a '-' for no key), and zeros for a record without usage or
        cost."""
        rec = numbered(1, key_name=None, cost=None, usage=None)
        arguments = script_arguments(rec, key="k", maxlen=10, usage_prefix="u", dedupe_ttl=60)
        self.assertEqual(
            arguments[:5],
            [
                4,
                f"k:seen:{rec.id}",
                "k",
                "u:2023-11-14:key:-",
                "u:2023-11-14:model:gpt-4o-mini",
            ],
        )
        self.assertEqual(arguments[-3:], [0, 0, 0])
        self.assertEqual(usage_date(record(time=86400.0 * 365)), "1971-01-01")

    def test_batched_arguments(self) -> None:
        """A batch's records share an EVAL: their keys first, then their
        arguments, in order; a new EVAL starts past EVAL_BYTES of JSON."""
        each = [
            script_arguments(numbered(n), key="k", maxlen=10, usage_prefix="u", dedupe_ttl=60)
            for n in range(3)
        ]
        [one] = batched_arguments(each)
        self.assertEqual(one[0], 12)
        self.assertEqual(one[1:13], [key for args in each for key in args[1:5]])
        self.assertEqual(one[13:], [value for args in each for value in args[5:]])
        self.patch(redis, "EVAL_BYTES", len(encode_record(numbered(0))) * 2)
        self.assertEqual([batch[0] for batch in batched_arguments(each)], [8, 4])
        self.assertEqual(batched_arguments([]), [])


class RedisSinkTests(TestCase):
    timeout = 120

    def sink(self, port: int, spool_dir: str, **options: Any) -> RedisSink:
        options.setdefault("stderr", io.StringIO())
        sink = RedisSink(
            f"redis://127.0.0.1:{port}/0",
            spool_dir=spool_dir,
            key=self.key,
            usage_prefix=self.prefix,
            **options,
        )
        return sink

    def setUp(self) -> None:
        tag = uuid.uuid4().hex[:12]
        self.key = f"oaproxy-test:{tag}:records"
        self.prefix = f"oaproxy-test:{tag}:usage"

    @inlineCallbacks
    def stream(self, port: int) -> Generator[Deferred[Any], Any, list[dict[str, Any]]]:
        client: Any = yield redis_client(port)
        try:
            entries: Any = yield client.execute_command("XRANGE", self.key, "-", "+")
        finally:
            yield client.disconnect()
        return [json.loads(fields[1]) for _, fields in entries]

    @inlineCallbacks
    def test_arguments_built_in_a_thread(self) -> Generator[Deferred[Any], Any, None]:
        """Each record's script arguments (its JSON) are built in the sink's
        thread, not the reactor's; the pid is in the stream's record."""
        if not reachable(*SHARED_REDIS):
            unavailable("Redis is not running at 127.0.0.1:6379")
        on_main = calls_on_main_thread(self, redis, "script_arguments")
        sink = self.sink(SHARED_REDIS[1], self.mktemp())
        sink.startService()
        for n in range(3):
            emit(sink, numbered(n, pid=31337))
        yield wait_for(lambda: sink.written == 3, timeout=20)
        yield sink.stopService()
        self.assertEqual(on_main, [False] * 3)
        stored = yield self.stream(SHARED_REDIS[1])
        self.assertEqual([entry["pid"] for entry in stored], [31337] * 3)

    @inlineCallbacks
    def test_records_and_usage(self) -> Generator[Deferred[Any], Any, None]:
        """Each record lands in the stream (field ``record``) and in the usage
        hashes of its day, key and model, which expire.
        """
        if not reachable(*SHARED_REDIS):
            unavailable("Redis is not running at 127.0.0.1:6379")
        sink = self.sink(SHARED_REDIS[1], self.mktemp())
        sink.startService()
        records = [numbered(n) for n in range(3)]
        records.append(numbered(3, model="o3", key_name="bob", cost=1.5))
        for rec in records:
            emit(sink, rec)
        yield wait_for(lambda: sink.written == 4, timeout=20)
        # A record written again (reply lost, spool replay) counts once.
        emit(sink, records[0])
        yield wait_for(lambda: sink.written == 5, timeout=20)
        yield sink.stopService()

        client: Any = yield redis_client(SHARED_REDIS[1])
        try:
            entries: Any = yield client.execute_command("XRANGE", self.key, "-", "+")
            alice: Any = yield client.execute_command(
                "HGETALL", f"{self.prefix}:2023-11-14:key:alice"
            )
            model: Any = yield client.execute_command(
                "HGETALL", f"{self.prefix}:2023-11-14:model:gpt-4o-mini"
            )
            bob: Any = yield client.execute_command("HGETALL", f"{self.prefix}:2023-11-14:key:bob")
            ttl: Any = yield client.execute_command("TTL", f"{self.prefix}:2023-11-14:key:alice")
            keys: Any = yield client.execute_command("KEYS", f"{self.key.rsplit(':', 1)[0]}:*")
            if keys:
                yield client.execute_command("DEL", *keys)
        finally:
            yield client.disconnect()
        self.assertEqual([json.loads(f[1]) for _, f in entries], documents(records))
        self.assertEqual([f[0] for _, f in entries], ["record"] * 4)
        expected = {
            "requests": 3,
            "prompt_tokens": 30,
            "completion_tokens": 15,
            "cost_microusd": 39,
        }
        self.assertEqual(dict(zip(alice[::2], alice[1::2], strict=True)), expected)
        self.assertEqual(dict(zip(model[::2], model[1::2], strict=True)), expected)
        self.assertEqual(
            dict(zip(bob[::2], bob[1::2], strict=True)),
            {
                "requests": 1,
                "prompt_tokens": 10,
                "completion_tokens": 5,
                "cost_microusd": 1500000,
            },
        )
        self.assertTrue(34 * 86400 < ttl <= 35 * 86400)

    @inlineCallbacks
    def test_redis_goes_away_and_comes_back(
        self,
    ) -> Generator[Deferred[Any], Any, None]:
        """Redis killed mid-run: records wait, overflow spills to disk; once it
        is back on the same port every record arrives exactly once, in order.
        """
        server = PrivateRedis(self.mktemp())
        yield server.start()
        self.addCleanup(server.kill)
        spool_dir = self.mktemp()
        sink = self.sink(server.port, spool_dir, queue_size=20, batch_size=10, write_timeout=2.0)
        sink.startService()
        stopped = False

        def stop() -> Deferred[None] | None:
            return None if stopped else sink.stopService()

        self.addCleanup(stop)
        records = [numbered(n) for n in range(130)]
        for rec in records[:30]:
            emit(sink, rec)
        yield wait_for(lambda: sink.written == 30, timeout=30)
        before = yield self.stream(server.port)
        self.assertEqual(before, documents(records[:30]))

        server.kill()
        for rec in records[30:]:
            emit(sink, rec)
        self.assertGreaterEqual(sink.spilled, 80)
        yield wait_for(lambda: sink.failures >= 1, timeout=30)
        self.assertEqual(sink.written, 30)

        yield server.start()
        yield wait_for(lambda: sink.written == 130, timeout=60)
        stopped = True
        yield sink.stopService()
        # The restarted server is empty (no persistence): it holds the 100
        # records written after the restart, none of the first 30 again.
        after = yield self.stream(server.port)
        self.assertEqual(after, documents(records[30:]))
        self.assertEqual(sink.dropped, 0)
        self.assertFalse(os.path.exists(os.path.join(spool_dir, "redis.jsonl")))

    @inlineCallbacks
    def test_spool_replayed_by_next_sink(
        self,
    ) -> Generator[Deferred[Any], Any, None]:
        """A sink stopped while Redis is down spools its records; the next sink
        (Redis up again) replays them first, in order.
        """
        server = PrivateRedis(self.mktemp())
        self.addCleanup(server.kill)
        spool_dir = self.mktemp()
        first = self.sink(server.port, spool_dir, queue_size=10, flush_timeout=1.0)
        first.startService()
        records = [numbered(n) for n in range(30)]
        for rec in records[:25]:
            emit(first, rec)
        yield wait_for(lambda: first.failures >= 1, timeout=30)
        yield first.stopService()
        self.assertEqual((first.written, first.dropped), (0, 0))
        with open(os.path.join(spool_dir, "redis.jsonl"), "rb") as f:
            self.assertEqual([json.loads(line) for line in f], documents(records[:25]))

        yield server.start()
        second = self.sink(server.port, spool_dir)
        second.startService()
        self.assertGreater(second.spool_bytes, 0)
        for rec in records[25:]:
            emit(second, rec)
        yield wait_for(lambda: second.written == 30, timeout=60)
        yield second.stopService()
        self.assertEqual((yield self.stream(server.port)), documents(records))
        self.assertEqual(second.replayed, 25)
        self.assertFalse(os.path.exists(os.path.join(spool_dir, "redis.jsonl")))
