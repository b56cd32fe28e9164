"""Limits in the service on real sockets: the official SDK retrying after
``Retry-After`` on its own, Redis stopped mid-run (``open`` and ``closed``),
and a budget that survives a restart through the SQL store's records."""

from __future__ import annotations

import json
import os
import time
from typing import Any, cast

import openai
from twisted.internet.threads import deferToThread
from twisted.logger import ILogObserver, formatEvent, globalLogPublisher
from twisted.web.client import Agent, HTTPConnectionPool

from tests.fakeupstream import FAKE_MODEL, Chat
from tests.live import (
    EndToEndCase,
    PrivateRedis,
    RunningProxy,
    chat,
    post_json,
    reactor,
    read_body,
    wait_for,
)
from tests.payloads import CLIENT_KEY, chat_body, proxy_config, upstream


class LiveLimitsCase(EndToEndCase):
    timeout = 40

    def setUp(self) -> None:
        self.agent = Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False))
        self.spool = os.path.abspath(self.mktemp())

    async def post(self, proxy: RunningProxy, key: str = CLIENT_KEY) -> tuple[int, Any, Any]:
        """One chat request: status, headers, JSON body."""
        response = await post_json(
            self.agent, f"{proxy.base_url}/chat/completions", key, chat_body()
        )
        body = await read_body(response)
        return response.code, response.headers, json.loads(body)

    def sample(self, proxy: RunningProxy, name: str, labels: dict[str, str] | None = None) -> float:
        value = proxy.service.shared.metrics.registry.get_sample_value(name, labels or {})
        return value or 0.0


class SDKRetryTests(LiveLimitsCase):
    async def test_the_sdk_retries_after_retry_after(self) -> None:
        """Over a 1/second limit the official SDK gets 429 with Retry-After: 1,
        waits that long by itself (max_retries) and then succeeds."""
        fake = await self.fake()
        proxy = await self.proxy([upstream("main", fake.endpoint)], limits={"per_key": "1/second"})

        def twice() -> tuple[Any, float]:
            with openai.OpenAI(
                base_url=proxy.base_url,
                api_key=CLIENT_KEY,
                max_retries=2,
                timeout=15,
                http_client=openai.DefaultHttpxClient(trust_env=False),
            ) as client:
                chat(client)
                started = time.monotonic()
                raw = client.chat.completions.with_raw_response.create(
                    model=FAKE_MODEL, messages=[{"role": "user", "content": "hi"}]
                )
                return raw, time.monotonic() - started

        raw, waited = await deferToThread(twice)
        self.assertEqual(raw.http_response.status_code, 200)
        self.assertEqual(raw.retries_taken, 1)
        self.assertGreaterEqual(waited, 0.9)
        outcomes = [(r["status"], r["outcome"]) for r in proxy.records.seen]
        self.assertEqual(outcomes, [(200, "ok"), (429, "rate_limited"), (200, "ok")])
        self.assertEqual(len(fake.requests), 2)

        def refused() -> Any:
            with openai.OpenAI(
                base_url=proxy.base_url,
                api_key=CLIENT_KEY,
                max_retries=0,
                http_client=openai.DefaultHttpxClient(trust_env=False),
            ) as client:
                chat(client)

        error = await self.assertFailure(deferToThread(refused), openai.RateLimitError)
        self.assertEqual(error.code, "rate_limit_exceeded")
        self.assertEqual(error.response.headers["retry-after"], "1")
        self.assertEqual(error.response.headers["x-ratelimit-limit-requests"], "1")


class RedisDownTests(LiveLimitsCase):
    async def start(self, policy: str) -> tuple[PrivateRedis, RunningProxy, list[str]]:
        redis = PrivateRedis(self.mktemp())
        await redis.start()
        self.addCleanup(redis.kill)
        fake = await self.fake()
        proxy = await self.proxy(
            [upstream("main", fake.endpoint)],
            redis=f"redis://127.0.0.1:{redis.port}/0",
            records={"spool_dir": self.spool},
            limits={"backend": "redis", "per_key": "100/minute", "on_backend_error": policy},
        )
        await wait_for(lambda: proxy.service.generation.shared_redis.connected, timeout=10)
        logged: list[str] = []

        def observe(event: dict[str, Any]) -> None:
            text = formatEvent(event)
            if "limiter backend failed" in text:
                logged.append(text)

        observer = cast(ILogObserver, observe)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        return redis, proxy, logged

    async def test_open_serves_and_counts(self) -> None:
        """on_backend_error: open: with Redis gone requests are served (without
        rate headers), each failure counted, one log line per minute."""
        redis, proxy, logged = await self.start("open")
        status, headers, _ = await self.post(proxy)
        self.assertEqual(status, 200)
        self.assertEqual(headers.getRawHeaders(b"x-ratelimit-remaining-requests"), [b"99"])
        redis.kill()
        await wait_for(lambda: not proxy.service.generation.shared_redis.connected)
        for _ in range(3):
            status, headers, _ = await self.post(proxy)
            self.assertEqual(status, 200)
            self.assertIsNone(headers.getRawHeaders(b"x-ratelimit-remaining-requests"))
        self.assertEqual(self.sample(proxy, "oaproxy_limiter_backend_errors_total"), 3)
        self.assertEqual(len(logged), 1, logged)
        self.assertIn("requests are served", logged[0])
        self.assertIn("(RedisUnavailable: redis is not connected)", logged[0])

    async def test_closed_refuses_with_503_then_recovers(self) -> None:
        """on_backend_error: closed: with Redis gone requests get 503
        limiter_unavailable at once; when Redis is back they are served again."""
        redis, proxy, logged = await self.start("closed")
        self.assertEqual((await self.post(proxy))[0], 200)
        redis.kill()
        await wait_for(lambda: not proxy.service.generation.shared_redis.connected)
        started = time.monotonic()
        status, _, body = await self.post(proxy)
        self.assertLess(time.monotonic() - started, 1.0)
        self.assertEqual(status, 503)
        self.assertEqual(body["error"]["code"], "limiter_unavailable")
        self.assertEqual(proxy.records.seen[-1]["outcome"], "error")
        self.assertIn("refused with 503", logged[0])
        await redis.start()
        await wait_for(lambda: proxy.service.generation.shared_redis.connected, timeout=20)
        status, headers, _ = await self.post(proxy)
        self.assertEqual(status, 200)
        # The new server is empty: its count starts again.
        self.assertEqual(headers.getRawHeaders(b"x-ratelimit-remaining-requests"), [b"99"])


class BudgetRestartTests(LiveLimitsCase):
    async def test_a_budget_survives_a_restart(self) -> None:
        """In memory, a budget's spending is read back from the SQL store's
        records at start: a restart does not give the key its budget again."""
        fake = await self.fake(
            default=Chat(usage={"prompt_tokens": 7, "completion_tokens": 4, "total_tokens": 11})
        )
        dbaddr = os.path.abspath(self.mktemp() + ".sqlite")
        keys = {"alice": {"key": CLIENT_KEY, "budget": {"tokens": 25, "period": "day"}}}
        config = {
            "dbtype": "sqlite",
            "dbaddr": dbaddr,
            "records": {"spool_dir": self.spool},
            # Each request reserves 2 + 5 tokens and then counts its 11.
            "limits": {"default_max_tokens": 5},
        }

        async def start() -> RunningProxy:
            return await self.start_proxy(
                proxy_config("e2e", keys, [upstream("main", fake.endpoint)], **config),
                self.mktemp() + ".yaml",
            )

        first = await start()
        self.assertEqual((await self.post(first))[0], 200)
        self.assertEqual((await self.post(first))[0], 200)
        status, _, body = await self.post(first)
        self.assertEqual((status, body["error"]["code"]), (429, "budget_exceeded"))
        self.assertIn("22 tokens of it is used", body["error"]["message"])
        await first.service.stopService()

        second = await start()
        status, _, body = await self.post(second)
        self.assertEqual((status, body["error"]["code"]), (429, "budget_exceeded"))
        self.assertIn("22 tokens of it is used", body["error"]["message"])
        self.assertEqual(len(fake.requests), 2)
