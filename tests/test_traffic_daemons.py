"""Two real oaproxy processes (``twistd`` subprocesses) sharing one Redis
(``limits.backend: redis``): their limits and budgets are one."""

from __future__ import annotations

import json
import os
import uuid
from typing import Any

from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import deferLater

from tests.fakeupstream import Wait
from tests.live import (
    POLL,
    SHARED_REDIS,
    Daemon,
    free_port,
    post_json,
    reactor,
    read_body,
    spawn_daemon,
    wait_for,
    write_yaml,
)
from tests.payloads import upstream
from tests.test_daemon import TWISTD_ARGS, DaemonCase, base_config
from tests.test_traffic_counters import start_shared_redis

ALICE = "ck-alice-shared-0123456789"
BOB = "ck-bob-shared-0123456789"
WARM = "ck-warm-shared-0123456789"
SK = "sk-shared-upstream-0123"


class SharedRedisDaemonsTests(DaemonCase):
    timeout = 60

    async def two_daemons(
        self, fake: Any, cache: dict[str, Any] | None = None, **limits: Any
    ) -> list[int]:
        """Two daemons on one Redis and prefix, both serving, both connected to it."""
        prefix = f"oaproxy-test:{uuid.uuid4().hex}:"
        # Deletes the prefix's keys in cleanup.
        self.redis = await start_shared_redis(self, prefix=prefix)
        ports = [free_port(), free_port()]
        keys = {
            "alice": ALICE,
            "bob": {"key": BOB, "budget": {"tokens": 500, "period": "day"}},
            "warm": WARM,
        }
        for n, port in enumerate(ports):
            cwd = os.path.join(self.cwd, f"daemon-{n}")
            os.makedirs(cwd)
            config = base_config(
                port,
                keys,
                [upstream("fake", fake.endpoint, SK)],
                redis=f"redis://{SHARED_REDIS[0]}:{SHARED_REDIS[1]}/0",
                redis_prefix=prefix,
                records={"spool_dir": os.path.join(cwd, "spool")},
                limits={"backend": "redis", "on_backend_error": "closed", **limits},
                **({} if cache is None else {"cache": cache}),
            )
            write_yaml(os.path.join(cwd, "config.yaml"), config)
            daemon: Daemon = spawn_daemon(self, TWISTD_ARGS, cwd)
            await self.serving(daemon, port)
        for port in ports:
            # Closed: a 503 until the daemon's Redis connection is up.
            await self.until_connected(port)
        return ports

    async def until_connected(self, port: int) -> None:
        answers: list[int] = []

        async def ask() -> None:
            answers.append((await self.chat(port, WARM))[0])

        for _ in range(100):
            await ask()
            if answers[-1] != 503:
                return
            await deferLater(reactor, POLL, lambda: None)
        self.fail(f"daemon on {port} never reached Redis: {answers}")

    async def test_a_request_limit_is_shared(self) -> None:
        """5/minute per key admits exactly 5 of 12 concurrent requests in
        total across both processes."""
        fake = await self.fake()
        ports = await self.two_daemons(fake, per_key="5/minute")
        before = len(fake.requests)
        answers = await gatherResults(
            [Deferred.fromCoroutine(self.chat(ports[n % 2], ALICE)) for n in range(12)],
            consumeErrors=True,
        )
        statuses = sorted(status for status, _ in answers)
        self.assertEqual(statuses, [200] * 5 + [429] * 7)
        self.assertEqual(len(fake.requests) - before, 5)

    async def test_a_budget_holds_under_concurrency(self) -> None:
        """20 concurrent requests against a token budget that fits 5 (each
        reserves 100 of 500) admit at most 5 + 1 across both processes."""
        fake = await self.fake()
        ports = await self.two_daemons(fake, default_max_tokens=98)
        before = len(fake.requests)
        fake.default = Wait()
        url = "http://127.0.0.1:{}/v1/chat/completions"
        body = b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}'
        done: list[int] = []

        async def ask(port: int) -> int:
            response = await post_json(self.agent, url.format(port), BOB, body)
            await read_body(response)
            done.append(response.code)
            return response.code

        pending = gatherResults(
            [Deferred.fromCoroutine(ask(ports[n % 2])) for n in range(20)], consumeErrors=True
        )
        # Everything decided: each request refused, or held by the upstream.
        await wait_for(lambda: len(done) + len(fake.requests) - before == 20, timeout=30)
        admitted = len(fake.requests) - before
        fake.release()
        statuses = await pending
        self.assertLessEqual(admitted, 6)
        # Reservations are strict: not even the one request of slack is used.
        self.assertEqual(admitted, 5)
        self.assertEqual(sorted(statuses), [200] * 5 + [429] * 15)

    async def test_an_answer_cached_by_one_is_a_hit_for_the_other(self) -> None:
        """With cache.backend: redis, what one process stored the other
        serves (for the same key only), and the upstream is asked once."""
        fake = await self.fake()
        ports = await self.two_daemons(
            fake, cache={"backend": "redis", "default": True}, per_key="1000/minute"
        )
        before = len(fake.requests)
        url = "http://127.0.0.1:{}/v1/chat/completions"
        body = b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "shared?"}]}'

        async def ask(port: int, key: str) -> tuple[int, list[bytes] | None, bytes]:
            response = await post_json(self.agent, url.format(port), key, body)
            answer = await read_body(response)
            return response.code, response.headers.getRawHeaders(b"x-oaproxy-cache"), answer

        first = await ask(ports[0], ALICE)

        async def stored() -> bool:
            return bool(await self.redis.command("KEYS", self.redis.key("cache", "*")))

        # The entry is written once the first request is over: wait for it.
        for _ in range(100):
            if await stored():
                break
            await deferLater(reactor, POLL, lambda: None)
        second = await ask(ports[1], ALICE)
        other_key = await ask(ports[1], WARM)
        self.assertEqual(
            [(status, cached) for status, cached, _ in (first, second, other_key)],
            [(200, [b"miss"]), (200, [b"hit"]), (200, [b"miss"])],
        )
        self.assertEqual(json.loads(second[2])["choices"], json.loads(first[2])["choices"])
        self.assertEqual(len(fake.requests) - before, 2)
