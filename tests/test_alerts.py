"""Tests for oaproxy.alerts: Feishu and Matrix alerts, de-duplication, deadlines."""

from __future__ import annotations

import json
from collections.abc import Generator
from typing import Any, cast
from urllib.parse import parse_qs, unquote, urlsplit

import attrs
from attrs import define, field
from treq.testing import RequestTraversalAgent
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import Clock
from twisted.logger import formatEvent
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web import http
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from oaproxy.alerts import Alert, Notifier, alert_from_record, format_alert
from oaproxy.channels import (
    AlertChannel,
    ChannelRequest,
    FeishuChannel,
    LegacyMatrixChannel,
    MatrixChannel,
    alert_channels,
    feishu_sign,
)
from oaproxy.config import FeishuConfig, MatrixConfig, NotifyConfig
from oaproxy.credentials import REDACTED
from oaproxy.outbound import alert_agents
from oaproxy.record import Attempt, FailureKind, Outcome
from tests.doubles import EventList, RecordingAgent, capture_log
from tests.payloads import feishu_signature
from tests.records import attempt, record

FEISHU_TOKEN = "0f1e2d3c-feishu-hook-token"
FEISHU_SECRET = "feishu-signing-secret-XYZ"
MATRIX_TOKEN = "syt_matrix_access_token_ABC"
ROOM = "!room:example.org"


def timed_out(upstream: str, seconds: float = 60) -> Attempt:
    """An attempt whose deadline passed."""
    error = f"timeout after {seconds:g}s"
    return attempt(upstream, None, error, None, seconds, failure=FailureKind.TIMEOUT)


def refused(upstream: str, status: int, error: str | None = None) -> Attempt:
    """An attempt answered with a status worth another upstream."""
    return attempt(upstream, status, error, failure=FailureKind.STATUS)


EXHAUSTED = Alert(
    kind=Outcome.EXHAUSTED,
    model="gpt-4o-mini",
    path="/v1/chat/completions",
    key_name="alice",
    attempts=(timed_out("openai-main"), refused("openrouter", 429)),
    record_id="3f2a9c0d4e5b6a7f8091a2b3c4d5e6f7",
    status=429,
    method="POST",
)


# Casts: without the mypy-zope plugin mypy cannot see that these objects
# provide the interfaces.
_reactor: Any = reactor


def as_agent(agent: object) -> IAgent:
    return cast(IAgent, agent)


def as_time(clock: object) -> IReactorTime:
    return cast(IReactorTime, clock)


def _config(
    feishu: FeishuConfig | None = None,
    matrix: MatrixConfig | None = None,
    min_interval: float = 60.0,
    timeout: float = 10.0,
) -> NotifyConfig:
    return NotifyConfig(feishu=feishu, matrix=matrix, min_interval=min_interval, timeout=timeout)


@define
class Seen:
    """One request as the fake endpoint got it."""

    method: str
    path: str
    headers: Headers
    body: Any


class FakeEndpoint(Resource):
    """
    A Feishu or Matrix stand-in: records each request and answers with
    ``code``/``answer``, or never answers when ``hang`` is set.
    """

    isLeaf = True

    def __init__(self, code: int = 200, answer: Any = None, hang: bool = False):
        super().__init__()
        self.code = code
        self.answer = {"code": 0, "msg": "success"} if answer is None else answer
        self.hang = hang
        self.seen: list[Seen] = []
        self.arrived: list[Deferred[None]] = []
        self.gone: list[Deferred[None]] = []

    def render(self, request: Request) -> bytes | int:
        assert request.method is not None and request.uri is not None
        assert request.content is not None
        self.seen.append(
            Seen(
                request.method.decode(),
                request.uri.decode(),
                request.requestHeaders,
                json.loads(request.content.read()),
            )
        )
        if self.hang:
            finished: Deferred[None] = request.notifyFinish()
            finished.addErrback(lambda _: None)
            self.gone.append(finished)
            for waiting in self.arrived:
                waiting.callback(None)
            self.arrived.clear()
            return NOT_DONE_YET
        request.setResponseCode(self.code)
        request.setHeader("content-type", "application/json")
        return json.dumps(self.answer).encode()

    def next_arrival(self) -> Deferred[None]:
        waiting: Deferred[None] = Deferred()
        self.arrived.append(waiting)
        return waiting


class QuietSite(Site):
    # The fake's access log would show the webhook token path; it is the
    # fake's log, not oaproxy's, so keep it out of the captured events.
    def log(self, request: http.Request) -> None:
        pass


class CapturesLog:
    """Collects every log event of a test, to prove no secret is in one."""

    events: EventList

    def capture_log(self, test: SynchronousTestCase) -> None:
        self.events = capture_log(test)

    def logged_text(self) -> str:
        return "\n".join((formatEvent(event) or "") + " " + repr(event) for event in self.events)

    def assert_no_secrets(self, test: SynchronousTestCase, *secrets: str) -> None:
        text = self.logged_text()
        for secret in secrets:
            test.assertNotIn(secret, text)


def _answer_of(notifier: Notifier) -> tuple[dict[str, int], dict[str, int]]:
    return dict(notifier.sent), dict(notifier.failed)


class RealEndpointTests(TestCase, CapturesLog):
    """Alerts over real sockets to fake endpoints on 127.0.0.1."""

    def setUp(self) -> None:
        self.capture_log(self)
        # The daemon's own alert agent, direct (it keeps no connection open).
        self.agent = alert_agents(_reactor)(None)

    def listen(self, resource: Resource) -> str:
        site: Any = QuietSite(resource)
        port = _reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return f"http://127.0.0.1:{cast(IPv4Address, port.getHost()).port}"

    def notifier(self, config: NotifyConfig, clock: Any = _reactor) -> Notifier:
        notifier = Notifier.from_config(config, self.agent, as_time(clock), "edge-1", environ={})
        notifier.startService()
        self.addCleanup(notifier.stopService)
        return notifier

    @inlineCallbacks
    def test_feishu_signed_text_message(self) -> Generator[Deferred[Any], Any, None]:
        """
        A Feishu alert is a signed text message whose signature Feishu's own
        recipe verifies.
        """
        fake = FakeEndpoint()
        base = self.listen(fake)
        webhook = f"{base}/open-apis/bot/v2/hook/{FEISHU_TOKEN}"
        notifier = self.notifier(_config(feishu=FeishuConfig(webhook, FEISHU_SECRET)))

        notifier.alert(EXHAUSTED)
        yield notifier.drained()

        self.assertEqual(_answer_of(notifier), ({"feishu": 1}, {"feishu": 0}))
        [seen] = fake.seen
        self.assertEqual(seen.method, "POST")
        self.assertEqual(seen.path, f"/open-apis/bot/v2/hook/{FEISHU_TOKEN}")
        self.assertEqual(
            seen.headers.getRawHeaders("content-type"),
            ["application/json; charset=utf-8"],
        )
        self.assertEqual(sorted(seen.body), ["content", "msg_type", "sign", "timestamp"])
        self.assertEqual(seen.body["msg_type"], "text")
        timestamp = seen.body["timestamp"]
        self.assertIsInstance(timestamp, str)
        self.assertLess(abs(int(timestamp) - _reactor.seconds()), 5)
        self.assertEqual(seen.body["sign"], feishu_signature(int(timestamp), FEISHU_SECRET))

        text = seen.body["content"]["text"]
        self.assertEqual(
            text,
            "oaproxy edge-1: all upstreams failed for gpt-4o-mini"
            " (POST /v1/chat/completions, key alice)\n"
            "- openai-main: timeout after 60s\n"
            "- openrouter: HTTP 429\n"
            "status 429, record 3f2a9c0d4e5b6a7f8091a2b3c4d5e6f7",
        )
        self.assertNotIn(FEISHU_SECRET, text)
        self.assert_no_secrets(self, FEISHU_TOKEN, FEISHU_SECRET)
        self.assertIn("127.0.0.1", self.logged_text())

    @inlineCallbacks
    def test_feishu_without_secret(self) -> Generator[Deferred[Any], Any, None]:
        """Without a signing secret the body carries no timestamp or sign."""
        fake = FakeEndpoint()
        base = self.listen(fake)
        notifier = self.notifier(
            _config(feishu=FeishuConfig(f"{base}/open-apis/bot/v2/hook/{FEISHU_TOKEN}"))
        )
        notifier.alert(EXHAUSTED)
        yield notifier.drained()
        [seen] = fake.seen
        self.assertEqual(sorted(seen.body), ["content", "msg_type"])

    @inlineCallbacks
    def test_matrix_put_to_room(self) -> Generator[Deferred[Any], Any, None]:
        """
        A Matrix alert is an m.text message PUT to the room's send endpoint
        with a fresh transaction id and the access token as a bearer.
        """
        fake = FakeEndpoint(answer={"event_id": "$abc"})
        base = self.listen(fake)
        notifier = self.notifier(_config(matrix=MatrixConfig(base + "/", MATRIX_TOKEN, ROOM)))
        notifier.alert(EXHAUSTED)
        notifier.alert(
            Alert(
                kind=Outcome.STREAM_FAILED,
                model="gpt-4o",
                path="/v1/chat/completions",
                key_name=None,
                attempts=(
                    attempt(
                        "openai-main",
                        None,
                        "idle timeout after 120s",
                        failure=FailureKind.STREAM_IDLE,
                    ),
                ),
                record_id="r2",
                status=200,
            )
        )
        yield notifier.drained()

        self.assertEqual(_answer_of(notifier), ({"matrix": 2}, {"matrix": 0}))
        prefix = "/_matrix/client/v3/rooms/%21room%3Aexample.org/send/m.room.message/"
        txn_ids = []
        for seen in fake.seen:
            self.assertEqual(seen.method, "PUT")
            self.assertTrue(seen.path.startswith(prefix), seen.path)
            txn_ids.append(unquote(seen.path[len(prefix) :]))
            self.assertEqual(
                seen.headers.getRawHeaders("authorization"), [f"Bearer {MATRIX_TOKEN}"]
            )
            self.assertEqual(sorted(seen.body), ["body", "msgtype"])
            self.assertEqual(seen.body["msgtype"], "m.text")
        self.assertEqual(len(set(txn_ids)), 2)
        self.assertTrue(all(txn.startswith("oaproxy.") for txn in txn_ids))
        self.assertNotIn("/", "".join(txn_ids))
        bodies = sorted(seen.body["body"] for seen in fake.seen)
        self.assertIn("all upstreams failed for gpt-4o-mini", bodies[0])
        self.assertEqual(
            bodies[1],
            "oaproxy edge-1: stream from openai-main failed mid-way for gpt-4o"
            " (/v1/chat/completions, no client key)\n"
            "- openai-main: idle timeout after 120s\n"
            "status 200, record r2",
        )
        self.assert_no_secrets(self, MATRIX_TOKEN)

    @inlineCallbacks
    def test_both_channels(self) -> Generator[Deferred[Any], Any, None]:
        """One alert goes to every configured channel."""
        feishu, matrix = FakeEndpoint(), FakeEndpoint(answer={"event_id": "$e"})
        feishu_base, matrix_base = self.listen(feishu), self.listen(matrix)
        notifier = self.notifier(
            _config(
                feishu=FeishuConfig(f"{feishu_base}/hook/{FEISHU_TOKEN}", FEISHU_SECRET),
                matrix=MatrixConfig(matrix_base, MATRIX_TOKEN, ROOM),
            )
        )
        notifier.alert(EXHAUSTED)
        yield notifier.drained()
        self.assertEqual(
            _answer_of(notifier),
            ({"feishu": 1, "matrix": 1}, {"feishu": 0, "matrix": 0}),
        )
        self.assertEqual(feishu.seen[0].body["content"]["text"], matrix.seen[0].body["body"])

    @inlineCallbacks
    def test_channel_refusals_counted(self) -> Generator[Deferred[Any], Any, None]:
        """
        A Matrix error status and Feishu's 200-with-error-code both count as
        failures, logged by their codes, never retried.
        """
        feishu = FakeEndpoint(answer={"code": 19021, "msg": "sign match fail"})
        matrix = FakeEndpoint(403, {"errcode": "M_FORBIDDEN", "error": "not in room"})
        feishu_base, matrix_base = self.listen(feishu), self.listen(matrix)
        notifier = self.notifier(
            _config(
                feishu=FeishuConfig(f"{feishu_base}/hook/{FEISHU_TOKEN}", FEISHU_SECRET),
                matrix=MatrixConfig(matrix_base, MATRIX_TOKEN, ROOM),
            )
        )
        notifier.alert(EXHAUSTED)
        yield notifier.drained()
        self.assertEqual(
            _answer_of(notifier),
            ({"feishu": 0, "matrix": 0}, {"feishu": 1, "matrix": 1}),
        )
        self.assertEqual((len(feishu.seen), len(matrix.seen)), (1, 1))
        logged = self.logged_text()
        self.assertIn("HTTP 403 M_FORBIDDEN", logged)
        self.assertIn("Feishu code 19021", logged)
        self.assert_no_secrets(self, FEISHU_TOKEN, FEISHU_SECRET, MATRIX_TOKEN)

    @inlineCallbacks
    def test_nothing_listening(self) -> Generator[Deferred[Any], Any, None]:
        """
        An alert endpoint that refuses connections: alert() returns at once,
        the failure is counted and logged without the token, no retry.
        """
        site: Any = QuietSite(Resource())
        port = _reactor.listenTCP(0, site, interface="127.0.0.1")
        number = cast(IPv4Address, port.getHost()).port
        stopped = port.stopListening()
        if stopped is not None:
            yield stopped
        webhook = f"http://127.0.0.1:{number}/open-apis/bot/v2/hook/{FEISHU_TOKEN}"
        notifier = self.notifier(_config(feishu=FeishuConfig(webhook, FEISHU_SECRET)))

        notifier.alert(EXHAUSTED)
        self.assertEqual(_answer_of(notifier), ({"feishu": 0}, {"feishu": 0}))
        yield notifier.drained()
        self.assertEqual(_answer_of(notifier), ({"feishu": 0}, {"feishu": 1}))
        yield notifier.drained()  # nothing left under way: no retry pending
        self.assertIn("ConnectionRefusedError", self.logged_text())
        self.assert_no_secrets(self, FEISHU_TOKEN, FEISHU_SECRET)

    @inlineCallbacks
    def test_silent_endpoint_deadline(self) -> Generator[Deferred[Any], Any, None]:
        """
        An endpoint that never answers is cut off at notify.timeout on the
        notifier's clock; the failure is counted, the connection closed.
        """
        fake = FakeEndpoint(hang=True)
        base = self.listen(fake)
        clock = Clock()
        notifier = self.notifier(
            _config(matrix=MatrixConfig(base, MATRIX_TOKEN, ROOM), timeout=5),
            clock=clock,
        )
        arrived = fake.next_arrival()
        notifier.alert(EXHAUSTED)
        yield arrived
        stopped = notifier.stopService()
        self.assertNoResult(stopped)
        clock.advance(4.9)
        self.assertEqual(_answer_of(notifier), ({"matrix": 0}, {"matrix": 0}))
        clock.advance(0.1)
        yield stopped
        self.assertEqual(_answer_of(notifier), ({"matrix": 0}, {"matrix": 1}))
        self.assertEqual(len(fake.seen), 1)
        self.assertEqual(clock.getDelayedCalls(), [])
        self.assertIn("failed: no answer within 5s; not retried", self.logged_text())
        yield fake.gone[0]  # the server saw the connection go
        self.assert_no_secrets(self, MATRIX_TOKEN)

    @inlineCallbacks
    def test_legacy_environment(self) -> Generator[Deferred[Any], Any, None]:
        """
        openai-api-route's FEISHU_WEBHOOK and MATRIX_API still work when the
        config has no notify channels.
        """
        feishu, matrix = FakeEndpoint(), FakeEndpoint(answer={"event_id": "$e"})
        feishu_base, matrix_base = self.listen(feishu), self.listen(matrix)
        environ = {
            "FEISHU_WEBHOOK": f"{feishu_base}/open-apis/bot/v2/hook/{FEISHU_TOKEN}",
            "MATRIX_API": f"{matrix_base}/_matrix/client/r0/rooms/{ROOM}"
            f"/send/m.room.message?access_token={MATRIX_TOKEN}",
        }
        notifier = Notifier.from_config(_config(), self.agent, _reactor, "edge-1", environ=environ)
        notifier.startService()
        self.addCleanup(notifier.stopService)
        notifier.alert(EXHAUSTED)
        yield notifier.drained()

        self.assertEqual(
            _answer_of(notifier),
            ({"feishu": 1, "matrix": 1}, {"feishu": 0, "matrix": 0}),
        )
        [hook] = feishu.seen
        self.assertEqual(hook.method, "POST")
        self.assertEqual(hook.body["msg_type"], "text")
        self.assertNotIn("sign", hook.body)
        [send] = matrix.seen
        self.assertEqual(send.method, "PUT")
        url = urlsplit(send.path)
        prefix = f"/_matrix/client/r0/rooms/{ROOM}/send/m.room.message/"
        self.assertTrue(unquote(url.path).startswith(prefix), url.path)
        self.assertEqual(parse_qs(url.query), {"access_token": [MATRIX_TOKEN]})
        self.assertEqual(send.body["msgtype"], "m.text")
        self.assertIn("gpt-4o-mini", send.body["body"])
        self.assert_no_secrets(self, FEISHU_TOKEN, MATRIX_TOKEN)


class Recorder(Resource):
    """In-memory endpoint for the de-duplication tests."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.bodies: list[Any] = []

    def render(self, request: Request) -> bytes:
        assert request.content is not None
        self.bodies.append(json.loads(request.content.read()))
        return b'{"code":0}'


@define
class InMemory:
    clock: Clock = field(factory=Clock)
    recorder: Recorder = field(factory=Recorder)
    agent: RequestTraversalAgent = field(init=False)

    def __attrs_post_init__(self) -> None:
        self.agent = RequestTraversalAgent(self.recorder)

    def notifier(self, min_interval: float = 60.0) -> Notifier:
        config = _config(
            feishu=FeishuConfig("http://feishu.test/hook/" + FEISHU_TOKEN),
            min_interval=min_interval,
        )
        return Notifier.from_config(
            config, as_agent(self.agent), as_time(self.clock), "edge-1", environ={}
        )

    def texts(self) -> list[str]:
        self.agent.flush()
        return [body["content"]["text"] for body in self.recorder.bodies]


def _exhausted(model: str = "gpt-4o-mini", *attempts: Attempt) -> Alert:
    tried = attempts or (refused("up0", 502),)
    return Alert(Outcome.EXHAUSTED, model, "/v1/chat/completions", "bob", tried, "r", 502)


class DeduplicationTests(SynchronousTestCase, CapturesLog):
    """The same failure is posted at most once per min_interval."""

    def setUp(self) -> None:
        self.capture_log(self)
        self.memory = InMemory()

    def test_repeats_suppressed_then_counted(self) -> None:
        """
        N alerts in the interval post one message; the first after the
        interval says N-1 were suppressed.
        """
        notifier = self.memory.notifier()
        for _ in range(5):
            notifier.alert(_exhausted())
            self.memory.clock.advance(10)
        self.assertEqual(len(self.memory.texts()), 1)
        self.assertEqual(notifier.suppressed, {"exhausted": 4})
        self.assertEqual(notifier.sent, {"feishu": 1})

        self.memory.clock.advance(10)  # 60s after the first
        notifier.alert(_exhausted())
        texts = self.memory.texts()
        self.assertEqual(len(texts), 2)
        self.assertNotIn("suppressed", texts[0])
        self.assertTrue(
            texts[1].endswith("(4 similar alerts suppressed in the last 60s)"),
            texts[1],
        )

        # The count starts over with the message that reported it.
        self.memory.clock.advance(60)
        notifier.alert(_exhausted())
        texts = self.memory.texts()
        self.assertEqual(len(texts), 3)
        self.assertNotIn("suppressed", texts[2])

    def test_signature_ignores_numbers_in_reasons(self) -> None:
        """
        Timeouts of different lengths and 5xx statuses are one failure; a
        429 or another model is a different one.
        """
        notifier = self.memory.notifier()
        notifier.alert(_exhausted("m", timed_out("up0", 60), refused("up1", 502)))
        notifier.alert(_exhausted("m", timed_out("up0", 61.5), refused("up1", 503)))
        notifier.alert(
            Alert(
                Outcome.EXHAUSTED,
                "m",
                "/v1/chat/completions?x=1",
                "eve",
                (timed_out("up0", 9), refused("up1", 500)),
                "r9",
                500,
            )
        )
        self.assertEqual(len(self.memory.texts()), 1)
        notifier.alert(_exhausted("m", timed_out("up0", 60), refused("up1", 429)))
        notifier.alert(_exhausted("other", timed_out("up0", 60), refused("up1", 502)))
        notifier.alert(
            Alert(
                Outcome.STREAM_FAILED,
                "m",
                "/v1/chat/completions",
                "bob",
                (timed_out("up0", 60), refused("up1", 502)),
                "r",
                200,
            )
        )
        self.assertEqual(len(self.memory.texts()), 4)

    def test_zero_interval_sends_all(self) -> None:
        """With min_interval 0 every alert is posted."""
        notifier = self.memory.notifier(min_interval=0)
        for _ in range(3):
            notifier.alert(_exhausted())
        self.assertEqual(len(self.memory.texts()), 3)

    def test_table_bounded(self) -> None:
        """
        Old signatures without pending repeats are forgotten; the table never
        grows past its cap.
        """
        clock = Clock()
        notifier = Notifier(
            _config(min_interval=60, timeout=1),
            [FeishuChannel("http://feishu.test/hook/" + FEISHU_TOKEN)],
            as_agent(RecordingAgent()),
            as_time(clock),
            "edge-1",
        )
        for i in range(50):
            notifier.alert(_exhausted(f"model-{i}"))
        clock.advance(61)
        notifier.alert(_exhausted("fresh"))
        self.assertEqual(len(notifier._seen), 1)

        for i in range(1100):
            notifier.alert(_exhausted(f"again-{i}"))
            notifier.alert(_exhausted(f"again-{i}"))  # one pending repeat each
        self.assertEqual(len(notifier._seen), 1024)
        self.assertIn("de-duplication table full", self.logged_text())
        clock.advance(1)
        self.assertIsNone(self.successResultOf(notifier.drained()))

    def test_failing_channel_never_retried(self) -> None:
        """
        A post that hangs ends at the deadline, counted once; the next repeat
        inside the interval is suppressed, not a retry.
        """
        agent = RecordingAgent()
        notifier = Notifier(
            _config(min_interval=60, timeout=10),
            [FeishuChannel("http://feishu.test/hook/" + FEISHU_TOKEN)],
            as_agent(agent),
            as_time(self.memory.clock),
            "edge-1",
        )
        notifier.alert(_exhausted())
        self.assertEqual(len(agent.calls), 1)
        self.memory.clock.advance(10)
        self.assertEqual(
            (sum(call.cancelled for call in agent.calls), notifier.failed), (1, {"feishu": 1})
        )
        self.assertEqual(self.memory.clock.getDelayedCalls(), [])
        notifier.alert(_exhausted())
        self.memory.clock.advance(49)
        self.assertEqual(len(agent.calls), 1)
        self.assertEqual(self.memory.clock.getDelayedCalls(), [])
        self.assert_no_secrets(self, FEISHU_TOKEN)

    def test_stop_waits_for_posts(self) -> None:
        """Stopping the notifier waits for the posts under way, which end at
        their deadline and are counted as failed."""
        agent = RecordingAgent()
        notifier = Notifier(
            _config(timeout=3),
            [MatrixChannel("http://m.test", MATRIX_TOKEN, ROOM)],
            as_agent(agent),
            as_time(self.memory.clock),
            "edge-1",
        )
        notifier.startService()
        notifier.alert(_exhausted())
        stopped = notifier.stopService()
        self.assertNoResult(stopped)
        self.memory.clock.advance(3)
        self.assertIsNone(self.successResultOf(stopped))
        self.assertEqual(notifier.failed, {"matrix": 1})

    def test_alert_never_raises(self) -> None:
        """A broken channel is logged; the caller sees nothing."""

        @define
        class Broken:
            name: str = "broken"
            kind: str = "feishu"
            host: str = "broken.test"

            def request(self, text: str, now: float, txn_id: str) -> ChannelRequest:
                raise RuntimeError("bug")

        agent = RecordingAgent()
        channels: list[AlertChannel] = [
            Broken(),
            MatrixChannel("http://m.test", MATRIX_TOKEN, ROOM),
        ]
        notifier = Notifier(_config(), channels, as_agent(agent), as_time(Clock()), "h")
        notifier.alert(_exhausted())
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(notifier.failed, {"broken": 1, "matrix": 0})
        self.assertEqual(len(agent.calls), 1)  # the other channel still posts

    def test_no_channels(self) -> None:
        """Without channels an alert posts nothing and leaves nothing to wait for."""
        agent = RecordingAgent()
        notifier = Notifier(_config(), [], as_agent(agent), as_time(Clock()), "h")
        notifier.alert(_exhausted())
        self.assertEqual(agent.calls, [])
        self.assertIsNone(self.successResultOf(notifier.drained()))


class ChannelTests(SynchronousTestCase):
    """Request shapes and the legacy environment variables."""

    def test_feishu_sign_matches_recipe(self) -> None:
        """feishu_sign gives what Feishu's documented recipe gives."""
        self.assertEqual(feishu_sign(1700000000, "secret"), feishu_signature(1700000000, "secret"))

    def test_feishu_request_uses_clock(self) -> None:
        """A Feishu request is signed for the whole second of the clock it is
        given, and its repr hides the webhook."""
        request = FeishuChannel("https://open.feishu.cn/hook/t", "s").request(
            "hi", 1700000000.9, "txn"
        )
        self.assertEqual(request.body["timestamp"], "1700000000")
        self.assertEqual(request.body["sign"], feishu_sign(1700000000, "s"))
        self.assertNotIn("open.feishu.cn/hook/t", repr(request))

    def test_matrix_url(self) -> None:
        """A Matrix request is a PUT to the room's send URL, room id escaped,
        with the token as a bearer that no repr shows."""
        request = MatrixChannel("https://m.example.org/", "tok", ROOM).request(
            "hi", 0, "oaproxy.1.a.2"
        )
        self.assertEqual(request.method, "PUT")
        self.assertEqual(
            request.url,
            "https://m.example.org/_matrix/client/v3/rooms/%21room%3Aexample.org"
            "/send/m.room.message/oaproxy.1.a.2",
        )
        self.assertEqual(request.headers, {"Authorization": "Bearer tok"})
        self.assertNotIn("tok", repr(request))
        self.assertNotIn("tok", repr(MatrixChannel("https://m", "tok", ROOM)))

    def test_legacy_matrix_other_url_posted(self) -> None:
        """A legacy MATRIX_API URL that is no send endpoint is POSTed the message as it stands."""
        request = LegacyMatrixChannel("https://bridge.test/notify?token=t").request("hi", 0, "txn")
        self.assertEqual(
            (request.method, request.url),
            ("POST", "https://bridge.test/notify?token=t"),
        )
        self.assertEqual(request.body, {"msgtype": "m.text", "body": "hi"})

    def test_legacy_matrix_send_endpoint_put(self) -> None:
        """A legacy MATRIX_API send endpoint gets a PUT with the transaction id
        in its path, before the query."""
        request = LegacyMatrixChannel(
            "https://m.test/_matrix/client/r0/rooms/!r:m.test/send/m.room.message/?access_token=t"
        ).request("hi", 0, "txn.1")
        self.assertEqual(request.method, "PUT")
        self.assertEqual(
            request.url,
            "https://m.test/_matrix/client/r0/rooms/!r:m.test/send/m.room.message/"
            "txn.1?access_token=t",
        )

    def test_environment_channels(self) -> None:
        """FEISHU_WEBHOOK and MATRIX_API make channels when the config has none,
        trimmed; empty or absent ones make none."""
        environ = {
            "FEISHU_WEBHOOK": " https://f.test/hook/t ",
            "MATRIX_API": "https://m",
        }
        channels = alert_channels(_config(), environ)
        self.assertEqual(
            channels,
            (FeishuChannel("https://f.test/hook/t"), LegacyMatrixChannel("https://m")),
        )
        self.assertEqual(alert_channels(_config(), {}), ())
        self.assertEqual(alert_channels(None, {"MATRIX_API": ""}), ())

    def test_config_wins_over_environment(self) -> None:
        """A channel in the config replaces the environment's of its kind; the
        other kind may still come from the environment."""
        environ = {"FEISHU_WEBHOOK": "https://env/hook", "MATRIX_API": "https://env/m"}
        config = _config(
            feishu=FeishuConfig("https://conf/hook", "s"),
            matrix=MatrixConfig("https://conf", "tok", ROOM),
        )
        self.assertEqual(
            alert_channels(config, environ),
            (
                FeishuChannel("https://conf/hook", "s"),
                MatrixChannel("https://conf", "tok", ROOM),
            ),
        )
        only_feishu = _config(feishu=FeishuConfig("https://conf/hook"))
        self.assertEqual(
            alert_channels(only_feishu, environ),
            (FeishuChannel("https://conf/hook"), LegacyMatrixChannel("https://env/m")),
        )


class MessageTests(SynchronousTestCase):
    """What an alert says."""

    def test_suppressed_line(self) -> None:
        """An alert that follows suppressed ones ends by saying how many, and over how long."""
        text = format_alert(EXHAUSTED, "h", suppressed=1, since=75.4)
        self.assertTrue(text.endswith("(1 similar alert suppressed in the last 75s)"))

    def test_no_query_or_key_shapes(self) -> None:
        """An alert shows no query string and nothing shaped like a key; a
        missing model or key is said so."""
        alert = Alert(
            Outcome.EXHAUSTED,
            None,
            "/v1/embeddings?key=AIzaSECRET",
            None,
            (
                refused("up", 401, "Incorrect API key provided: sk-proj-abcdefSECRET"),
                attempt("up2", None, "upstream said Bearer abc.SECRET", failure=FailureKind.OTHER),
            ),
            None,
            None,
        )
        text = format_alert(alert, "h")
        self.assertNotIn("SECRET", text)
        self.assertIn("all upstreams failed for (no model) (/v1/embeddings, no client key)", text)
        self.assertIn(f"- up: HTTP 401: Incorrect API key provided: {REDACTED}", text)

    def test_long_attempt_lists_cut(self) -> None:
        """A long list of attempts is cut to twenty lines, each line shortened,
        with a line saying how many more."""
        alert = Alert(
            Outcome.EXHAUSTED,
            "m",
            "/v1/x",
            "k",
            tuple(attempt(f"u{i}", None, "x" * 1000, failure=FailureKind.OTHER) for i in range(30)),
            "r",
            502,
        )
        lines = format_alert(alert, "h").splitlines()
        self.assertEqual(len(lines), 1 + 20 + 1 + 1)
        self.assertIn("10 more attempts", lines[21])
        self.assertLess(len(lines[1]), 320)

    def test_from_record(self) -> None:
        """Exhausted failover and broken streams are alerted, with the
        record's attempts; other outcomes are not."""
        attempts = (
            timed_out("a", 60),
            refused("b", 429),
            refused("c", 502, "bad gateway"),
        )
        exhausted = record(
            id="abc",
            key_name="alice",
            status=504,
            outcome=Outcome.EXHAUSTED,
            attempts=attempts,
        )
        alert = alert_from_record(exhausted)
        self.assertEqual(
            alert,
            Alert(
                Outcome.EXHAUSTED,
                "gpt-4o-mini",
                "/v1/chat/completions",
                "alice",
                attempts,
                "abc",
                504,
                "POST",
            ),
        )
        assert alert is not None
        self.assertEqual(
            format_alert(alert, "h").splitlines()[1:4],
            ["- a: timeout after 60s", "- b: HTTP 429", "- c: HTTP 502: bad gateway"],
        )
        others = set(Outcome) - {Outcome.EXHAUSTED, Outcome.STREAM_FAILED}
        for outcome in others:
            self.assertIsNone(alert_from_record(attrs.evolve(exhausted, outcome=outcome)))
        stream_failed = alert_from_record(attrs.evolve(exhausted, outcome=Outcome.STREAM_FAILED))
        self.assertEqual(stream_failed.kind, Outcome.STREAM_FAILED)  # type: ignore[union-attr]
