"""Large request bodies: held once (the spool file, or one ``bytes``), never
built or copied, counted against ``max_inflight_body_bytes``; shown on the
real site in memory, and on a real twistd with its memory measured."""

from __future__ import annotations

import gc
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.trial.unittest import SynchronousTestCase

from oaproxy.relay import BytesProducer
from oaproxy.web import IN_MEMORY_BODY
from tests.doubles import Client, Harness
from tests.live import Daemon, child_env, free_port, reactor, read_body
from tests.payloads import http_request
from tests.test_daemon import DaemonCase, base_config

ROOT = Path(__file__).resolve().parent.parent
MIB = 1 << 20
KEY = "ck-alice-0123456789"

CONFIG = """
authorization: {alice: sk-client}
max_inflight_body_bytes: 3145728
upstreams:
  - {name: a, endpoint: "https://a.test/v1", sk: sk-a}
"""
AUTH = (b"Authorization", b"Bearer sk-client")
JSON = (b"Content-Type", b"application/json")


def chat_of(size: int) -> bytes:
    """A chat body of about ``size`` bytes."""
    return json.dumps({"model": "gpt-4o-mini", "input": "x" * size}).encode()


class BodyBudgetTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.h = Harness(CONFIG)

    def post(self, body: bytes, chunked: bool = False) -> Client:
        return self.h.request(b"POST", b"/v1/embeddings", body, [JSON, AUTH], chunked=chunked)

    def held(self) -> float | None:
        value: float | None = self.h.shared.metrics.registry.get_sample_value(
            "oaproxy_request_body_bytes"
        )
        return value

    def test_large_bodies_over_the_budget_get_503(self) -> None:
        """Over the budget a large body gets 503 server_busy; small ones pass."""
        first = self.post(chat_of(2 * MIB))
        self.h.clock.advance(0)
        [call] = self.h.agent.calls
        self.assertEqual(self.held(), len(chat_of(2 * MIB)))
        refused = self.post(chat_of(2 * MIB)).reply()
        self.assertEqual((refused.status, refused.header(b"retry-after")), (503, b"2"))
        self.assertEqual(refused.json()["error"]["code"], "server_busy")
        self.post(chat_of(100_000))
        self.h.clock.advance(0)
        self.assertEqual(len(self.h.agent.calls), 2)
        self.h.agent.calls[1].respond(200, body=b"{}")
        call.respond(200, body=b"{}")
        self.assertEqual(first.reply().status, 200)
        self.assertEqual(self.held(), 0)
        self.post(chat_of(2 * MIB))
        self.h.clock.advance(0)
        self.assertEqual(len(self.h.agent.calls), 3)
        records = [r.status for r in self.h.records]
        self.assertEqual(sorted(records), [200, 200, 503])

    def test_chunked_bodies_count_as_they_come(self) -> None:
        """A body of unknown length is refused when, grown large, it no longer fits."""
        self.post(chat_of(2 * MIB))
        refused = self.post(chat_of(2 * MIB), chunked=True).reply()
        self.assertEqual(refused.status, 503)
        self.h.clock.advance(0)
        self.assertEqual(len(self.h.agent.calls), 1)

    def test_a_client_gone_gives_its_share_back(self) -> None:
        """A client that leaves mid-body gives its share of the budget back."""
        client = self.h.connect()
        client.send(http_request(b"POST", b"/v1/embeddings", chat_of(2 * MIB), [JSON, AUTH])[:-100])
        self.assertGreater(self.held() or 0, 0)
        client.disconnect()
        self.assertEqual(self.held(), 0)

    def test_the_producer_lets_go_of_the_body(self) -> None:
        """Once written, a body in memory is held by its request alone."""
        data = os.urandom(IN_MEMORY_BODY)
        producer = BytesProducer(data)

        class Consumer:
            def write(self, written: bytes) -> None:
                pass

        producer.startProducing(Consumer())  # type: ignore[arg-type]
        held = [o for o in gc.get_referents(*gc.get_referents(producer)) if o is data]
        self.assertEqual(held, [])


def spawn_helper(case: DaemonCase, *args: str) -> Daemon:
    """``python -m tests.bodyload ARGS`` in the repository, killed in cleanup."""
    helper = Daemon()
    command = [sys.executable, "-m", "tests.bodyload", *args]
    helper.process = reactor.spawnProcess(
        helper, command[0], command, env=child_env(), path=str(ROOT)
    )
    case.addCleanup(lambda: Deferred.fromCoroutine(helper.kill()))
    return helper


def memory(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (the peak) of a process, in MiB."""
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        fields = dict(line.split(":", 1) for line in status)
    return {name: int(fields[name].split()[0]) // 1024 for name in ("VmRSS", "VmHWM")}


class DaemonMemoryTests(DaemonCase):
    timeout = 180

    async def healthz(self, port: int) -> float:
        """How long /healthz took to answer, in seconds."""
        started = reactor.seconds()
        response = await self.agent.request(b"GET", f"http://127.0.0.1:{port}/healthz".encode())
        await read_body(response)
        self.assertEqual(response.code, 200)
        return float(reactor.seconds() - started)

    async def test_twelve_60_mib_bodies(self) -> None:
        """12 x 60 MiB at once: peak RSS < 1 GiB, back within 50 MiB, /healthz < 100 ms.

        The probe's latency is measured from this process, on a machine the
        sender and other tests load too: a stray slow probe is this side's
        scheduling, so the median must be under 100 ms and no probe may
        reach 500 ms (a parse on the reactor stalled it for seconds).
        """
        sink = spawn_helper(self, "sink")
        await sink.wait_for("listening ")
        sink_port = int(sink.text.split("listening ", 1)[1].split()[0])
        port = free_port()
        config = base_config(
            port,
            {"alice": KEY},
            [{"name": "sink", "endpoint": f"http://127.0.0.1:{sink_port}/v1", "sk": "sk-x"}],
        )
        daemon = self.spawn(config)
        await self.serving(daemon, port)
        pid = daemon.process.pid
        await self.healthz(port)
        start = memory(pid)["VmRSS"]
        sender = spawn_helper(self, "send", str(port), KEY, "12", "60")
        latencies: list[float] = []
        peaks: list[int] = []
        while sender.running:
            latencies.append(await self.healthz(port))
            peaks.append(memory(pid)["VmRSS"])
            await deferLater(reactor, 0.02, lambda: None)
        answers: list[dict[str, Any]] = json.loads(sender.output)
        latencies.append(await self.healthz(port))
        after = memory(pid)
        figures = {
            "start": start,
            "after": after,
            "median_healthz": statistics.median(latencies),
            "slowest_healthz": max(latencies),
        }
        self.assertLess(after["VmHWM"], 1024, figures)
        self.assertLess(after["VmRSS"] - start, 50, figures)
        self.assertLess(statistics.median(latencies), 0.1, figures)
        self.assertLess(max(latencies), 0.5, figures)
        self.assertGreater(len(latencies), 10, figures)
        served = [a for a in answers if a["status"] == 200]
        self.assertGreaterEqual(len(served), 8, answers)
        for answer in served:
            # Whole; the streams with the stream_options oaproxy added.
            self.assertGreaterEqual(answer["received"], answer["sent"], answer)
        for answer in answers:
            if answer["status"] != 200:
                self.assertEqual(
                    (answer["status"], answer["code"], answer["retry_after"]),
                    (503, "server_busy", "2"),
                )
        self.assertNotIn("Traceback", daemon.text)
