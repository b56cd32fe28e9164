"""Operating the daemon, in process: metrics, alerts, readiness.

The service is built as twistd builds it (``tests.live.EndToEndCase``)
and listens on ``tcp:0:interface=127.0.0.1``; upstreams and the alert
endpoints (Feishu webhook, Matrix homeserver) are ``FakeUpstream``s in the
same reactor. Requests go over real sockets with twisted.web's ``Agent``.
"""

from __future__ import annotations

import json
import os
from typing import Any

import yaml
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers

from oaproxy import generation
from oaproxy.record import Record
from tests.doubles import Scrape
from tests.fakeupstream import Chat, FakeUpstream, Hang, Status, Stream
from tests.live import (
    EndToEndCase,
    RunningProxy,
    post_json,
    reactor,
    read_body,
    refused_endpoint,
    write_yaml,
)
from tests.payloads import (
    CLIENT_KEY,
    SK_BACKUP,
    SK_MAIN,
    chat_body,
    feishu_signature,
    upstream,
)
from tests.records import record

METRICS_KEY = "mk-scraper-0123456789"
FEISHU_SECRET = "fs-signing-secret-0123"
FEISHU_TOKEN = "hook-token-0123456789"
MATRIX_TOKEN = "syt-matrix-token-0123456789"
ROOM = "!ops:example.org"
CHAT_ROUTE = "/v1/chat/completions"


class Answer:
    def __init__(self, code: int, headers: Headers, body: bytes) -> None:
        self.code = code
        self.headers = headers
        self.body = body

    def json(self) -> Any:
        return json.loads(self.body)


class OperateCase(EndToEndCase):
    timeout = 20

    def setUp(self) -> None:
        # Not persistent: each answer closes its connection, so nothing is
        # left open between the test's client and the proxy.
        self.agent = Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False))

    async def get(self, proxy: RunningProxy, path: str, key: str | None = None) -> Answer:
        headers = Headers()
        if key is not None:
            headers.setRawHeaders(b"authorization", [b"Bearer " + key.encode()])
        url = f"http://127.0.0.1:{proxy.port}{path}".encode()
        response = await self.agent.request(b"GET", url, headers)
        return Answer(response.code, response.headers, await read_body(response))

    async def chat(
        self,
        proxy: RunningProxy,
        model: str,
        *,
        stream: bool = False,
        key: str = CLIENT_KEY,
        include_usage: bool = False,
    ) -> Answer:
        body = chat_body(model, stream=stream, include_usage=include_usage)
        url = f"http://127.0.0.1:{proxy.port}{CHAT_ROUTE}"
        response = await post_json(self.agent, url, key, body)
        return Answer(response.code, response.headers, await read_body(response))


class MetricsTests(OperateCase):
    async def _traffic(self) -> tuple[RunningProxy, str]:
        good = await self.fake()
        other = await self.fake()
        failing = await self.fake(default=Status(503, "overloaded"))
        open_ = await self.fake()
        records = os.path.abspath(self.mktemp()) + ".jsonl"
        proxy = await self.proxy(
            [
                upstream("main", good.endpoint, allow=["gpt-4o"]),
                upstream("flaky", failing.endpoint, allow=["gpt-4o-mini", "gpt-4.1"]),
                upstream("backup", other.endpoint, sk=SK_BACKUP, allow=["gpt-4o-mini"]),
                # No allow list: serves any model the others do not.
                upstream("open", open_.endpoint, deny=["gpt-4o", "gpt-4o-mini", "gpt-4.1"]),
            ],
            metrics_key=METRICS_KEY,
            records={"file": records, "spool_dir": os.path.abspath(self.mktemp())},
        )
        # Two plain chats.
        for _ in range(2):
            answer = await self.chat(proxy, "gpt-4o")
            self.assertEqual(answer.code, 200, answer.body)
        # A failover: flaky answers 503, backup answers.
        answer = await self.chat(proxy, "gpt-4o-mini")
        self.assertEqual(answer.code, 200, answer.body)
        # Exhausted: flaky is the only candidate; the client gets its 503.
        answer = await self.chat(proxy, "gpt-4.1")
        self.assertEqual(answer.code, 503, answer.body)
        # A stream with usage.
        answer = await self.chat(proxy, "gpt-4o", stream=True, include_usage=True)
        self.assertEqual(answer.code, 200, answer.body)
        self.assertIn(b"data: [DONE]", answer.body)
        # A model nobody lists, served by the upstream without allow list.
        answer = await self.chat(proxy, "my-local-model-7b")
        self.assertEqual(answer.code, 200, answer.body)
        await proxy.records.nth(6)
        self.assertEqual(len(failing.requests), 2)
        self.assertEqual((len(good.requests), len(other.requests), len(open_.requests)), (3, 1, 1))
        return proxy, records

    async def test_values_after_known_traffic(self) -> None:
        """After known traffic through real sockets, /metrics and /v1/metrics
        agree on the exact counts of requests, attempts, failovers, tokens and
        latencies, and show the file sink's counters."""
        proxy, _ = await self._traffic()
        scraped = []
        for path in ("/metrics", "/v1/metrics"):
            answer = await self.get(proxy, path, key=METRICS_KEY)
            self.assertEqual(answer.code, 200, answer.body)
            self.assertTrue(
                (answer.headers.getRawHeaders(b"content-type") or [b""])[0].startswith(
                    b"text/plain"
                ),
                answer.headers,
            )
            scraped.append(Scrape(answer.body.decode()))
        for samples in scraped:
            self._check(samples)

    def _check(self, s: Scrape) -> None:
        requests = "oaproxy_requests_total"
        self.assertEqual(
            s.count(requests, route=CHAT_ROUTE, status_class="2xx", upstream="main"), 3
        )
        self.assertEqual(
            s.count(requests, route=CHAT_ROUTE, status_class="2xx", upstream="backup"), 1
        )
        self.assertEqual(
            s.count(requests, route=CHAT_ROUTE, status_class="2xx", upstream="open"), 1
        )
        # The exhausted request: the client got flaky's own 503.
        self.assertEqual(
            s.count(requests, route=CHAT_ROUTE, status_class="5xx", upstream="flaky"), 1
        )
        self.assertEqual(s.total(requests), 6)

        attempts = "oaproxy_attempts_total"
        self.assertEqual(s.count(attempts, upstream="main", outcome="ok"), 3)
        self.assertEqual(s.count(attempts, upstream="flaky", outcome="5xx"), 2)
        self.assertEqual(s.count(attempts, upstream="backup", outcome="ok"), 1)
        self.assertEqual(s.count(attempts, upstream="open", outcome="ok"), 1)
        self.assertEqual(s.total(attempts), 7)

        # Only the failover moved on from flaky; the exhausted request had
        # nowhere to go.
        self.assertEqual(s.count("oaproxy_failovers_total", upstream="flaky"), 1)
        self.assertEqual(s.total("oaproxy_failovers_total"), 1)
        self.assertEqual(s.count("oaproxy_failover_exhausted_total", route=CHAT_ROUTE), 1)

        tokens = "oaproxy_tokens_total"
        # Fake usage: 7 prompt, 4 completion tokens per answer (streams too).
        self.assertEqual(s.count(tokens, upstream="main", model="gpt-4o", kind="prompt"), 21)
        self.assertEqual(s.count(tokens, upstream="main", model="gpt-4o", kind="completion"), 12)
        self.assertEqual(s.count(tokens, upstream="backup", model="gpt-4o-mini", kind="prompt"), 7)
        self.assertEqual(s.count(tokens, upstream="open", model="other", kind="prompt"), 7)
        self.assertEqual(s.count(tokens, upstream="open", model="other", kind="completion"), 4)
        self.assertNotIn("my-local-model-7b", s.label_values(tokens, "model"))

        ttfb = "oaproxy_time_to_first_byte_seconds_count"
        self.assertEqual(s.count(ttfb, route=CHAT_ROUTE, stream="true"), 1)
        self.assertEqual(s.count(ttfb, route=CHAT_ROUTE, stream="false"), 5)
        self.assertEqual(s.count("oaproxy_request_duration_seconds_count", route=CHAT_ROUTE), 6)

        self.assertEqual(s.count("oaproxy_active_requests"), 0)
        self.assertEqual(s.count("oaproxy_active_streams"), 0)
        self.assertGreater(s.count("oaproxy_bytes_in_total"), 0)
        self.assertGreater(s.count("oaproxy_bytes_out_total"), 0)

        # The file sink is configured: its gauges and counters are there.
        self.assertIsNotNone(s.value("oaproxy_records_queued", sink="file"))
        for name in (
            "oaproxy_records_written_total",
            "oaproxy_records_spilled_total",
            "oaproxy_records_dropped_total",
            "oaproxy_sink_failures_total",
        ):
            self.assertIsNotNone(s.value(name, sink="file"), name)
        self.assertEqual(s.count("oaproxy_records_dropped_total", sink="file"), 0)

    async def test_records_written_count(self) -> None:
        """The file sink's written counter follows the JSON lines it wrote."""
        proxy, path = await self._traffic()
        # The file sink writes from its queue: poll the scrape, bounded.
        for _ in range(50):
            s = Scrape((await self.get(proxy, "/metrics", key=METRICS_KEY)).body.decode())
            if s.count("oaproxy_records_written_total", sink="file") == 6:
                break
            await self.wait(0.05)
        self.assertEqual(s.count("oaproxy_records_written_total", sink="file"), 6)
        with open(path, encoding="utf-8") as f:
            self.assertEqual(len(f.readlines()), 6)

    def wait(self, seconds: float) -> Deferred[None]:
        return deferLater(reactor, seconds, lambda: None)

    async def test_metrics_key(self) -> None:
        """With metrics_key set, a scrape without it, with a wrong one or with a
        client key is a 401 that never shows the key; the right key gets the
        metrics."""
        fake = await self.fake()
        proxy = await self.proxy([upstream("main", fake.endpoint)], metrics_key=METRICS_KEY)
        for path in ("/metrics", "/v1/metrics"):
            missing = await self.get(proxy, path)
            self.assertEqual(missing.code, 401, path)
            self.assertEqual(missing.json()["error"]["code"], "invalid_api_key")
            wrong = await self.get(proxy, path, key=METRICS_KEY + "x")
            self.assertEqual(wrong.code, 401, path)
            # A client key is not a metrics key.
            client = await self.get(proxy, path, key=CLIENT_KEY)
            self.assertEqual(client.code, 401, path)
            right = await self.get(proxy, path, key=METRICS_KEY)
            self.assertEqual(right.code, 200, path)
            self.assertIn(
                "oaproxy_requests",
                {f.name for f in text_string_to_metric_families(right.body.decode())},
            )
            self.assertNotIn(METRICS_KEY.encode(), missing.body + wrong.body + right.body)


FEISHU_OK = Status(200, body=b'{"code":0,"msg":"success","data":{}}')
MATRIX_OK = Status(200, body=b'{"event_id":"$event:example.org"}')


class AlertTests(OperateCase):
    async def _setup(
        self, **notify: Any
    ) -> tuple[RunningProxy, FakeUpstream, FakeUpstream, FakeUpstream]:
        feishu = await self.fake(default=FEISHU_OK)
        matrix = await self.fake(default=MATRIX_OK)
        failing = await self.fake(default=Status(500, "boom"))
        breaking = await self.fake(default=Stream(chunks=("a", "b", "c", "d"), close_after=2))
        settings: dict[str, Any] = {
            "feishu": {
                "webhook": f"http://127.0.0.1:{feishu.port}/open-apis/bot/v2/hook/{FEISHU_TOKEN}",
                "secret": FEISHU_SECRET,
            },
            "matrix": {
                "homeserver": f"http://127.0.0.1:{matrix.port}",
                "access_token": MATRIX_TOKEN,
                "room_id": ROOM,
            },
            "min_interval": 60,
            "timeout": 5,
        }
        settings.update(notify)
        proxy = await self.proxy(
            [
                upstream("down", failing.endpoint, allow=["gpt-4o"]),
                upstream("breaks", breaking.endpoint, sk=SK_BACKUP, allow=["gpt-4o-mini"]),
            ],
            notify=settings,
        )
        return proxy, feishu, matrix, breaking

    def _secrets(self) -> list[str]:
        return [CLIENT_KEY, SK_MAIN, SK_BACKUP, MATRIX_TOKEN, FEISHU_SECRET, FEISHU_TOKEN]

    def _check_feishu(self, seen: Any) -> str:
        self.assertEqual(seen.method, b"POST")
        self.assertEqual(seen.path, f"/open-apis/bot/v2/hook/{FEISHU_TOKEN}".encode())
        body = seen.json()
        self.assertEqual(body["msg_type"], "text")
        timestamp = int(body["timestamp"])
        self.assertLess(abs(timestamp - reactor.seconds()), 60)
        self.assertEqual(body["sign"], feishu_signature(timestamp, FEISHU_SECRET))
        text: str = body["content"]["text"]
        return text

    def _check_matrix(self, seen: Any) -> str:
        self.assertEqual(seen.method, b"PUT")
        prefix = b"/_matrix/client/v3/rooms/%21ops%3Aexample.org/send/m.room.message/"
        self.assertTrue(seen.path.startswith(prefix), seen.path)
        self.assertGreater(len(seen.path), len(prefix))
        self.assertEqual(seen.header(b"authorization"), b"Bearer " + MATRIX_TOKEN.encode())
        body = seen.json()
        self.assertEqual(body["msgtype"], "m.text")
        text: str = body["body"]
        return text

    def _check_text(
        self, text: str, record: dict[str, Any], model: str, upstream_name: str
    ) -> None:
        self.assertIn(model, text)
        self.assertIn(CHAT_ROUTE, text)
        self.assertIn("alice", text)  # the key's name
        self.assertIn(upstream_name, text)  # the attempt
        self.assertIn(record["id"], text)
        for secret in self._secrets():
            self.assertNotIn(secret, text)

    async def test_exhausted_and_stream_failure_alerts(self) -> None:
        """An exhausted request and a stream that breaks each post one signed
        Feishu message and one Matrix message with the same text, naming model,
        route, key, upstream and record, and no secret; the alerts are counted
        in the metrics."""
        proxy, feishu, matrix, _ = await self._setup()

        answer = await self.chat(proxy, "gpt-4o")
        self.assertEqual(answer.code, 500)
        exhausted = await proxy.records.nth(1)
        self.assertEqual(exhausted["outcome"], "exhausted")
        text = self._check_feishu(await feishu.received(1))
        self._check_text(text, exhausted, "gpt-4o", "down")
        self.assertIn("HTTP 500", text)
        self.assertEqual(self._check_matrix(await matrix.received(1)), text)

        answer = await self.chat(proxy, "gpt-4o-mini", stream=True)
        self.assertEqual(answer.code, 200)
        broken = await proxy.records.nth(2)
        self.assertEqual(broken["outcome"], "stream_failed")
        text = self._check_feishu(await feishu.received(2))
        self._check_text(text, broken, "gpt-4o-mini", "breaks")
        self.assertIn("stream", text)
        self._check_matrix(await matrix.received(2))

        notifier = proxy.service.generation.notifier
        await notifier.drained()
        self.assertEqual((len(feishu.requests), len(matrix.requests)), (2, 2))
        self.assertEqual(notifier.sent, {"feishu": 2, "matrix": 2})
        scrape = Scrape((await self.get(proxy, "/metrics")).body.decode())
        self.assertEqual(scrape.count("oaproxy_alerts_total", channel="feishu", result="ok"), 2)
        self.assertEqual(scrape.count("oaproxy_alerts_total", channel="matrix", result="ok"), 2)

    async def test_repeat_within_min_interval_is_not_posted(self) -> None:
        """The same failure again within min_interval is suppressed, not posted,
        and counted as suppressed."""
        proxy, feishu, matrix, _ = await self._setup()
        for count in (1, 2):
            answer = await self.chat(proxy, "gpt-4o")
            self.assertEqual(answer.code, 500)
            await proxy.records.nth(count)
        notifier = proxy.service.generation.notifier
        # The second alert was decided (suppressed) when its record was made.
        await notifier.drained()
        self.assertEqual((len(feishu.requests), len(matrix.requests)), (1, 1))
        self.assertEqual(notifier.suppressed, {"exhausted": 1})
        scrape = Scrape((await self.get(proxy, "/metrics")).body.decode())
        self.assertEqual(
            scrape.count("oaproxy_alerts_total", channel="feishu", result="suppressed"), 1
        )
        self.assertEqual(scrape.count("oaproxy_alerts_total", channel="feishu", result="ok"), 1)

    async def test_dead_alert_endpoints_do_not_slow_the_answer(self) -> None:
        """Refused and hanging alert endpoints do not delay the client's answer;
        each post ends on its own, by refusal or deadline, and is counted as
        such."""
        deadline = 2.0
        hanging = await self.fake(default=Hang())
        refused = refused_endpoint()
        proxy, _, _, _ = await self._setup(
            feishu={"webhook": refused + "/hook/" + FEISHU_TOKEN, "secret": FEISHU_SECRET},
            matrix={
                "homeserver": f"http://127.0.0.1:{hanging.port}",
                "access_token": MATRIX_TOKEN,
                "room_id": ROOM,
            },
            timeout=deadline,
        )
        started = reactor.seconds()
        answer = await self.chat(proxy, "gpt-4o")
        elapsed = reactor.seconds() - started
        self.assertEqual(answer.code, 500)
        self.assertEqual(answer.json()["error"]["message"], "boom")
        self.assertLess(elapsed, deadline / 2)
        # The Matrix post is still hanging when the client has its answer.
        seen = await hanging.received(1)
        self.assertIsNone(seen.ended_as)
        notifier = proxy.service.generation.notifier
        self.assertEqual(notifier.sent, {"feishu": 0, "matrix": 0})
        # Then each post ends on its own: refused at once, the other by its deadline.
        await notifier.drained()
        self.assertGreaterEqual(reactor.seconds() - started, deadline - 0.1)
        self.assertEqual(notifier.failed, {"feishu": 1, "matrix": 1})
        scrape = Scrape((await self.get(proxy, "/metrics")).body.decode())
        self.assertEqual(scrape.count("oaproxy_alerts_total", channel="feishu", result="error"), 1)
        self.assertEqual(
            scrape.count("oaproxy_alerts_total", channel="matrix", result="timeout"), 1
        )
        self.assertEqual(await seen.ended(), "lost")


class ReadinessTests(OperateCase):
    async def test_readyz_follows_the_only_upstream(self) -> None:
        """/readyz turns 503 after the only upstream failed three times in a row
        while /healthz stays 200, and back to 200 once the upstream answers
        again."""
        fake = await self.fake()
        proxy = await self.proxy([upstream("only", fake.endpoint)])
        health = await self.get(proxy, "/healthz")
        self.assertEqual((health.code, health.json()), (200, {"status": "ok"}))
        ready = await self.get(proxy, "/readyz")
        self.assertEqual(ready.code, 200, ready.body)
        self.assertEqual(ready.json()["usable_upstreams"], ["only"])

        fake.script(*[Status(500, "down")] * 3)
        for count in (1, 2, 3):
            answer = await self.chat(proxy, "gpt-4o")
            self.assertEqual(answer.code, 500)
            await proxy.records.nth(count)
            ready = await self.get(proxy, "/readyz")
            self.assertEqual(ready.code, 200 if count < 3 else 503, (count, ready.body))
        self.assertEqual(ready.json()["failing_upstreams"], ["only"])
        self.assertEqual(ready.json()["status"], "unready")
        # The process still serves.
        self.assertEqual((await self.get(proxy, "/healthz")).code, 200)

        # The upstream answers again (it is still tried: readiness is no circuit).
        fake.default = Chat()
        answer = await self.chat(proxy, "gpt-4o")
        self.assertEqual(answer.code, 200, answer.body)
        await proxy.records.nth(4)
        ready = await self.get(proxy, "/readyz")
        self.assertEqual(ready.code, 200, ready.body)
        self.assertEqual(ready.json()["usable_upstreams"], ["only"])


class ReloadTests(OperateCase):
    async def test_sinks_replaced_without_losing_spooled_records(self) -> None:
        """A reload that changes the sinks hands their spool over whole: the
        old sink flushes and stops before the new one reads the spool."""
        fake = await self.fake()
        directory = os.path.abspath(self.mktemp())
        records_file = os.path.join(directory, "records.jsonl")
        top: dict[str, Any] = {
            "records": {
                "file": records_file,
                "spool_dir": os.path.join(directory, "spool"),
                # One record in memory: the rest of a burst spills to the spool.
                "queue_size": 1,
            }
        }
        proxy = await self.proxy([upstream("main", fake.endpoint)], **top)
        service = proxy.service
        old_sink = service.sinks["file"]

        def emit(n: int) -> Record:
            emitted = record(id=f"r{n}", time=1.0, path=CHAT_ROUTE)
            service.shared.records.emit(emitted)
            return emitted

        burst = [emit(n) for n in range(5)]  # one turn: 4 spill before any write
        self.assertGreater(old_sink.spilled, 0)
        with open(proxy.config_path, encoding="utf-8") as f:
            config = yaml.safe_load(f)
        config["records"]["queue_size"] = 2
        write_yaml(proxy.config_path, config)
        self.assertTrue(await service.reload())
        new_sink = service.sinks["file"]
        self.assertIsNot(new_sink, old_sink)
        later = [emit(n) for n in range(5, 8)]
        await service.stopService()
        with open(records_file, encoding="utf-8") as f:
            written = [json.loads(line)["id"] for line in f]
        self.assertEqual(written, [r.id for r in burst + later])
        self.assertEqual((old_sink.dropped, new_sink.dropped), (0, 0))
        self.assertEqual(os.listdir(os.path.join(directory, "spool")), [])

    async def test_a_config_the_sinks_refuse_is_refused_whole(self) -> None:
        """Whatever fails while a new config's parts are made leaves the
        running config untouched: no half-applied reload."""
        fake = await self.fake()
        proxy = await self.proxy(
            [upstream("main", fake.endpoint)],
            records={"file": os.path.abspath(self.mktemp()) + ".jsonl"},
        )
        service = proxy.service
        before = (service.generation, service.sinks, service.config)
        with open(proxy.config_path, encoding="utf-8") as f:
            config = yaml.safe_load(f)
        config["records"]["queue_size"] = 5
        config["authorization"] = {"carol": "ck-carol-0123456789"}
        write_yaml(proxy.config_path, config)

        def broken(settings: Any, reactor: Any) -> Any:
            raise ValueError("a sink cannot be made of this")

        self.patch(generation, "make_sinks", broken)
        refused = await service.reload()
        self.assertEqual(
            (refused, (service.generation, service.sinks, service.config)), (False, before)
        )
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)
        # Nothing of the new config is in use: the old key still works.
        # Still served, still recorded.
        self.assertEqual((await self.chat(proxy, "gpt-4o-mini")).code, 200)
