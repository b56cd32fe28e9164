"""Same-upstream retries (``oaproxy.retries``) and context-length failover
(``oaproxy.errorcodes``), on a ``Clock`` with recording agents."""

from __future__ import annotations

import calendar
import os
import random
import time
from email.utils import formatdate

from prometheus_client import generate_latest
from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers

from oaproxy.circuits import CircuitState
from oaproxy.circuits import retry_after as circuit_retry_after
from oaproxy.config import ConfigError, ResumeMode
from oaproxy.errorcodes import CONTEXT_LENGTH_EXCEEDED, CONTEXT_LENGTH_MESSAGES, error_code
from oaproxy.record import FailureKind
from oaproxy.upstreamclient import NoResponse
from tests.doubles import WALL_TIME, Harness, Scrape, make_config
from tests.payloads import compact

CONFIG = """
retries: 2
timeout: 30
upstreams:
  - {name: a, endpoint: "https://a.test/v1", sk: sk-a}
  - {name: b, endpoint: "https://b.test/v1", sk: sk-b, retries: 0}
"""


def retry_after(value: str) -> Headers:
    return Headers({b"retry-after": [value.encode("ascii")]})


class RetryCase(SynchronousTestCase):
    config = CONFIG

    def setUp(self) -> None:
        self.h = Harness(self.config, rng=random.Random(7))
        self.calls = self.h.agent.calls

    def hosts(self) -> list[str]:
        return [call.host for call in self.calls]


class RetryAfterTests(RetryCase):
    def test_retry_after_seconds_waited_for(self) -> None:
        """A 429 with Retry-After: 3 is tried again on the same upstream no
        sooner than 3 s later; the circuit is not held open for it."""
        client = self.h.chat()
        self.calls[0].respond(429, body=b"{}", headers=retry_after("3"))
        self.h.clock.advance(2.99)
        self.assertEqual(self.hosts(), ["a"])
        self.h.clock.advance(0.01)
        self.assertEqual(self.hosts(), ["a", "a"])
        self.calls[1].respond(200, body=b"{}")
        self.assertEqual(client.reply().status, 200)
        [record] = self.h.records
        self.assertEqual(
            [(a.upstream, a.status, a.retried) for a in record.attempts],
            [("a", 429, "429"), ("a", 200, None)],
        )
        self.assertEqual(self.h.exchanges[0].attempts[1].started, 3.0)
        self.assertEqual(self.h.shared.circuits.state("a"), CircuitState.CLOSED)

    def test_retry_after_http_date(self) -> None:
        """A Retry-After given as an HTTP date is waited for too."""
        self.h.chat()
        date = formatdate(WALL_TIME + 2, usegmt=True)
        self.calls[0].respond(503, body=b"{}", headers=retry_after(date))
        self.h.clock.advance(1.9)
        self.assertEqual(self.hosts(), ["a"])
        self.h.clock.advance(0.1)
        self.assertEqual(self.hosts(), ["a", "a"])

    def test_retry_after_date_without_zone_is_gmt(self) -> None:
        """An HTTP date without a zone (or with -0000) is read as GMT, not
        as the machine's local time."""
        before = os.environ.get("TZ")

        def restore() -> None:
            if before is None:
                os.environ.pop("TZ", None)
            else:
                os.environ["TZ"] = before
            time.tzset()

        self.addCleanup(restore)
        os.environ["TZ"] = "Asia/Tokyo"
        time.tzset()
        at = calendar.timegm((2026, 1, 1, 0, 0, 0))
        for value in ("Thu, 01 Jan 2026 00:00:03", "Thu, 01 Jan 2026 00:00:03 -0000"):
            self.assertEqual(circuit_retry_after(value, at), 3.0)

    def test_retry_after_too_long_leaves_and_tells_the_breaker(self) -> None:
        """A Retry-After over max_retry_after leaves the upstream at once,
        and its circuit is held open: the next request starts at b."""
        client = self.h.chat()
        self.calls[0].respond(429, body=b"{}", headers=retry_after("10"))
        self.assertEqual(self.hosts(), ["a", "b"])
        self.calls[1].respond(200, body=b"{}")
        self.assertEqual(client.reply().status, 200)
        self.assertEqual(self.h.shared.circuits.state("a"), CircuitState.OPEN)
        self.h.chat()
        self.assertEqual(self.hosts()[2], "b")

    def test_retry_after_past_the_deadline_leaves(self) -> None:
        """A Retry-After within max_retry_after but past what is left of
        the upstream's deadline leaves it too."""
        self.h = Harness(CONFIG.replace("timeout: 30", "timeout: 30\nmax_retry_after: 60"))
        self.calls = self.h.agent.calls
        self.h.chat()
        self.h.clock.advance(25)
        self.calls[0].respond(503, body=b"{}", headers=retry_after("6"))
        self.assertEqual(self.hosts(), ["a", "b"])

    def test_retry_has_what_is_left_of_the_deadline(self) -> None:
        """A retry is under what is left of its upstream's deadline: a 503
        at 29 s of a 30 s timeout, a silent retry, and b is tried at 30 s."""
        client = self.h.chat()
        self.h.clock.advance(29)
        self.calls[0].respond(503, body=b"{}")
        self.h.clock.advance(0.5)
        self.assertEqual(self.hosts(), ["a", "a"])
        self.h.clock.advance(0.49)
        self.assertEqual(self.hosts(), ["a", "a"])
        self.h.clock.advance(0.01)
        self.assertEqual(self.hosts(), ["a", "a", "b"])
        self.calls[2].respond(200, body=b"{}")
        self.assertEqual(client.reply().status, 200)
        [record] = self.h.records
        self.assertEqual(record.attempts[1].failure, FailureKind.TIMEOUT)


class BackoffTests(RetryCase):
    def test_backoff_with_jitter_then_failover(self) -> None:
        """Without Retry-After the wait is retry_backoff doubled each time,
        with jitter ([0.5, 1) of it); after `retries` retries the next
        candidate is tried and its answer is the client's."""
        client = self.h.chat()
        self.calls[0].respond(502, body=b"{}")
        self.h.clock.advance(0.249)
        self.assertEqual(self.hosts(), ["a"])
        self.h.clock.advance(0.251)
        self.assertEqual(self.hosts(), ["a", "a"])
        self.calls[1].respond(500, body=b"{}")
        # Never more than two attempts on one upstream in a second.
        self.h.clock.advance(0.99 - self.h.clock.seconds())
        self.assertEqual(self.hosts(), ["a", "a"])
        self.h.clock.advance(1.0)
        self.assertEqual(self.hosts(), ["a", "a", "a"])
        self.calls[2].respond(500, body=b"{}")
        self.assertEqual(self.hosts(), ["a", "a", "a", "b"])
        self.calls[3].respond(200, body=b"{}")
        self.assertEqual(client.reply().status, 200)
        [record] = self.h.records
        self.assertEqual([a.retried for a in record.attempts], ["502", "500", None, None])
        scrape = Scrape(generate_latest(self.h.shared.metrics.registry).decode())
        self.assertEqual(scrape.value("oaproxy_retries_total", upstream="a", reason="500"), 1.0)
        self.assertEqual(scrape.value("oaproxy_retries_total", upstream="a", reason="502"), 1.0)

    def test_reset_before_any_byte_retried(self) -> None:
        """A connection reset before any response byte (on a new
        connection: no stale pooled one) is retried after the backoff."""
        client = self.h.chat()
        reset = NoResponse([Failure(ConnectionDone())], reused=False, request_sent=True)
        self.calls[0].fail(reset)
        self.assertEqual(self.hosts(), ["a"])
        self.h.clock.advance(0.5)
        self.assertEqual(self.hosts(), ["a", "a"])
        self.calls[1].respond(200, body=b"{}")
        self.assertEqual(client.reply().status, 200)
        self.assertEqual(self.h.exchanges[0].attempts[0].retried, "reset")

    def test_deadline_never_retried(self) -> None:
        """A silent upstream is left at once: its deadline is no reason to
        try it again."""
        self.h.chat()
        self.h.clock.advance(30)
        self.assertEqual(self.hosts(), ["a", "b"])

    def test_other_statuses_not_retried(self) -> None:
        """A 400 is the request's fault and a 404 the next candidate's
        business: neither is retried."""
        client = self.h.chat()
        self.calls[0].respond(404, body=b"{}")
        self.assertEqual(self.hosts(), ["a", "b"])
        self.calls[1].respond(400, body=b"{}")
        self.assertEqual(client.reply().status, 400)

    def test_no_retries_by_default(self) -> None:
        """retries defaults to 0: a 503 fails over at once."""
        self.h = Harness(CONFIG.replace("retries: 2\n", ""))
        self.calls = self.h.agent.calls
        self.h.chat()
        self.calls[0].respond(503, body=b"{}")
        self.assertEqual(self.hosts(), ["a", "b"])

    def test_client_gone_while_waiting(self) -> None:
        """A client that leaves during the wait ends the request there."""
        client = self.h.chat()
        self.calls[0].respond(503, body=b"{}", headers=retry_after("2"))
        client.disconnect()
        self.h.clock.advance(5)
        self.assertEqual(self.hosts(), ["a"])
        [record] = self.h.records
        self.assertEqual(record.outcome.value, "client_disconnected")


CONTEXT_ANSWERS = {
    "OpenAI": {"error": {"message": "too long", "code": CONTEXT_LENGTH_EXCEEDED}},
    "vLLM": {
        "object": "error",
        "message": "ignored",
        "error": {
            "message": "This model's maximum context length is 4096 tokens. However, you "
            "requested 5000 tokens (4000 in the messages, 1000 in the completion).",
            "type": "BadRequestError",
            "code": 400,
        },
    },
    "OpenRouter": {
        "error": {
            "message": "This endpoint's maximum context length is 8192 tokens. However, you "
            "requested about 9000 tokens.",
            "code": 400,
        }
    },
    "Ollama": {"error": "the input length exceeds the context length"},
}


class ContextLengthTests(RetryCase):
    def test_context_length_fails_over(self) -> None:
        """A 400 saying the context is exceeded, in OpenAI's code or in the
        words of vLLM, OpenRouter or Ollama, fails over to the next
        candidate."""
        for server, answer in CONTEXT_ANSWERS.items():
            h = Harness(CONFIG)
            client = h.chat()
            h.agent.calls[0].respond(400, body=compact(answer))
            self.assertEqual([c.host for c in h.agent.calls], ["a", "b"], server)
            h.agent.calls[1].respond(200, body=b'{"id": "big"}')
            self.assertEqual(client.reply().body, b'{"id": "big"}', server)

    def test_every_wording_in_the_table_is_tested(self) -> None:
        """Each row of CONTEXT_LENGTH_MESSAGES has an answer above in its
        server's words, recognised."""
        for server, _ in CONTEXT_LENGTH_MESSAGES:
            self.assertEqual(error_code(compact(CONTEXT_ANSWERS[server])), CONTEXT_LENGTH_EXCEEDED)

    def test_other_400_answers_at_once(self) -> None:
        """Any other 400 is the client's answer: no other candidate is tried."""
        client = self.h.chat()
        body = compact({"error": {"message": "bad temperature", "code": "invalid_value"}})
        self.calls[0].respond(400, body=body)
        self.assertEqual(self.hosts(), ["a"])
        self.assertEqual(client.reply().body, body)

    def test_failover_codes_configurable(self) -> None:
        """failover_codes says which codes fail over: with it empty a
        context-length 400 is answered; with another code, that one fails
        over."""
        h = Harness(CONFIG + "failover_codes: []\n")
        client = h.chat()
        h.agent.calls[0].respond(400, body=compact(CONTEXT_ANSWERS["OpenAI"]))
        self.assertEqual(len(h.agent.calls), 1)
        self.assertEqual(client.reply().status, 400)
        h = Harness(CONFIG + "failover_codes: [model_overloaded]\n")
        h.chat()
        h.agent.calls[0].respond(400, body=b'{"error": {"code": "model_overloaded"}}')
        self.assertEqual(len(h.agent.calls), 2)

    def test_exhausted_answers_the_last_400(self) -> None:
        """When every candidate is too small, the client gets the last 400."""
        client = self.h.chat()
        body = compact(CONTEXT_ANSWERS["OpenAI"])
        self.calls[0].respond(400, body=body)
        self.calls[1].respond(400, body=body)
        reply = client.reply()
        self.assertEqual((reply.status, reply.body), (400, body))

    def test_error_code_of_junk(self) -> None:
        """Bodies that are no error document have no code."""
        for body in (b"", b"[]", b"not json", b'{"error": 3}', b'{"error": {"code": 400}}'):
            self.assertIsNone(error_code(body), body)


class ConfigTests(SynchronousTestCase):
    def test_per_upstream_settings(self) -> None:
        """resume defaults to prefill for openai upstreams and restart for
        others; retries is inherited unless an upstream gives its own;
        resume_body keeps JSON values."""
        config = make_config(
            """
retries: 3
upstreams:
  - {name: a, endpoint: "https://a.test/v1", resume_body: {x: [1, null, {y: 2.5}]}}
  - {name: b, endpoint: "https://b.test/v1", resume: off, retries: 0}
  - {type: echo}
"""
        )
        a, b, echo = config.upstreams
        self.assertEqual((a.resume, a.retries), (ResumeMode.PREFILL, 3))
        self.assertEqual(dict(a.resume_body), {"x": [1, None, {"y": 2.5}]})
        self.assertEqual((b.resume, b.retries), (ResumeMode.OFF, 0))
        self.assertEqual(echo.resume, ResumeMode.RESTART)

    def test_bad_values_named(self) -> None:
        """A resume that is no choice, a negative retries and a resume_body
        that is no mapping are refused, naming the key and line."""
        for text, key in [
            ('upstreams:\n  - {endpoint: "https://a.test/v1", resume: sideways}\n', "resume"),
            ('retries: -1\nupstreams:\n  - {endpoint: "https://a.test/v1"}\n', "retries"),
            ('upstreams:\n  - {endpoint: "https://a.test/v1", resume_body: [1]}\n', "resume_body"),
        ]:
            error = self.assertRaises(ConfigError, make_config, text)
            self.assertIn(key, error.key)
            self.assertIsNotNone(error.line)
