"""Operating the real daemon: ``twistd -n --pidfile= oaproxy --config FILE``.

Each test runs the installed twistd as a subprocess (``reactor.spawnProcess``)
in a temporary working directory, against ``FakeUpstream``s in the test's
reactor, and drives it with signals: SIGHUP reloads, SIGTERM drains and
stops. Waiting is bounded polling on real sockets and on the daemon's
output (``deferLater``); every child is killed in cleanup.
"""

from __future__ import annotations

import json
import os
import signal
import socket
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, serverFromString
from twisted.internet.error import ConnectError, ConnectionRefusedError, ProcessTerminated
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool, ResponseNeverReceived

from tests.fakeupstream import Chat, Stream
from tests.live import (
    POLL,
    Daemon,
    IncomingBody,
    LiveCase,
    child_env,
    free_port,
    post_json,
    reactor,
    read_body,
    run_twistd,
    spawn_daemon,
    twistd_args,
    write_yaml,
)
from tests.payloads import chat_body, proxy_config, upstream
from tests.records import read_json_lines

OLD_KEY = "ck-old-0123456789abcdef"
NEW_KEY = "ck-new-0123456789abcdef"
SK_A = "sk-upstream-a-0123456789"
SK_B = "sk-upstream-b-0123456789"
MATRIX_TOKEN = "syt-matrix-daemon-0123456789"
FEISHU_SECRET = "fs-daemon-secret-0123"
FEISHU_TOKEN = "hook-daemon-token-0123"
# A slow stream: one chunk every 0.2 s, about 2 s in all.
SLOW_CHUNKS = tuple(f"c{i} " for i in range(10))
SLOW = Stream(chunks=SLOW_CHUNKS, delay=0.2)
#: How twistd is run: in the foreground, without a pidfile, on config.yaml.
TWISTD_ARGS = twistd_args("config.yaml")


def base_config(
    port: int | None, keys: dict[str, Any], upstreams: list[dict[str, Any]], **more: Any
) -> dict[str, Any]:
    if port is not None:
        more.setdefault("listen", f"tcp:{port}:interface=127.0.0.1")
    return proxy_config("daemon-test", keys, upstreams, **more)


class DaemonCase(LiveCase):
    timeout = 30

    def setUp(self) -> None:
        self.cwd = os.path.abspath(self.mktemp())
        os.makedirs(self.cwd)
        self.config_path = os.path.join(self.cwd, "config.yaml")
        self.agent = Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False))

    def spawn(
        self,
        config: dict[str, Any],
        *,
        env: dict[str, str] | None = None,
        child_fds: dict[int, Any] | None = None,
        prefix: list[str] | None = None,
    ) -> Daemon:
        write_yaml(self.config_path, config)
        return spawn_daemon(
            self, TWISTD_ARGS, self.cwd, env=env, child_fds=child_fds, prefix=prefix
        )

    async def serving(self, daemon: Daemon, port: int, attempts: int = 300) -> None:
        """Until ``/healthz`` answers 200 on ``port`` (about 15 s at most)."""
        for _ in range(attempts):
            if not daemon.running:
                self.fail(f"twistd exited before serving:\n{daemon.text}")
            try:
                response = await self.agent.request(
                    b"GET", f"http://127.0.0.1:{port}/healthz".encode()
                )
                await read_body(response)
                if response.code == 200:
                    return
            except (ConnectError, ResponseNeverReceived):
                pass
            await deferLater(reactor, POLL, lambda: None)
        self.fail(f"twistd did not answer /healthz on {port}:\n{daemon.text}")

    async def chat(self, port: int, key: str) -> tuple[int, bytes]:
        response = await post_json(
            self.agent, f"http://127.0.0.1:{port}/v1/chat/completions", key, chat_body()
        )
        return response.code, await read_body(response)

    async def start_stream(self, port: int, key: str) -> IncomingBody:
        """A stream request, once its first bytes have arrived."""
        response = await post_json(
            self.agent, f"http://127.0.0.1:{port}/v1/chat/completions", key, chat_body(stream=True)
        )
        self.assertEqual(response.code, 200)
        incoming = IncomingBody()
        response.deliverBody(incoming)
        await incoming.first
        return incoming

    async def refused(self, port: int) -> bool:
        """Whether a new connection to ``port`` is refused now."""
        try:
            protocol = await connectProtocol(
                TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=2), Protocol()
            )
        except ConnectionRefusedError:
            return True
        assert protocol.transport is not None
        protocol.transport.abortConnection()
        return False

    def assert_stream_complete(self, incoming: tuple[bytes, bool]) -> None:
        body, clean = incoming
        text = body.decode()
        self.assertTrue(clean, text)
        deltas = []
        for line in text.splitlines():
            if line.startswith("data: {"):
                for choice in json.loads(line[len("data: ") :])["choices"]:
                    deltas.append(choice["delta"].get("content") or "")
        self.assertEqual("".join(deltas), "".join(SLOW_CHUNKS))
        self.assertTrue(text.rstrip().endswith("data: [DONE]"), text[-200:])
        self.assertNotIn("error", text)

    def assert_stopped_by_sigterm(self, reason: Failure, daemon: Daemon) -> None:
        # twistd stops its services, then re-raises the signal on itself
        # (twisted.application.app._exitWithSignal): a clean SIGTERM stop
        # ends "by signal 15", not with status 0 (see tests.test_twistd).
        self.assertTrue(reason.check(ProcessTerminated), f"{reason.value}\n{daemon.text}")
        ended: Any = reason.value
        self.assertEqual((ended.exitCode, ended.signal), (None, signal.SIGTERM), daemon.text)
        self.assertIn("Server Shut Down", daemon.text)
        self.assertNotIn("Traceback", daemon.text)


class ReloadTests(DaemonCase):
    async def test_sighup_reload(self) -> None:
        """SIGHUP swaps keys and upstreams for new requests while a stream in
        flight finishes on the old ones; a bad config is refused in one log line
        and the last good one stays; a changed listener is bound and the old one
        closed; no secret reaches the output."""
        a = await self.fake(default=SLOW)
        b = await self.fake(default=Chat(text="from B"))
        first_port = free_port()
        second_port = free_port()
        old = base_config(first_port, {"old": OLD_KEY}, [upstream("a", a.endpoint, SK_A)])
        daemon = self.spawn(old)
        await self.serving(daemon, first_port)
        await daemon.wait_for("oaproxy started")

        # A slow stream from A is in flight during the reload.
        incoming = await self.start_stream(first_port, OLD_KEY)
        new = base_config(first_port, {"new": NEW_KEY}, [upstream("b", b.endpoint, SK_B)])
        write_yaml(self.config_path, new)
        daemon.signal("HUP")
        await daemon.wait_for("config reloaded")
        self.assertFalse(incoming.done.called, "the stream ended before the reload was done")

        # New requests: the new key, served by B; the old key is gone.
        code, body = await self.chat(first_port, NEW_KEY)
        self.assertEqual(code, 200, body)
        self.assertEqual(json.loads(body)["choices"][0]["message"]["content"], "from B")
        self.assertEqual(b.requests[0].header(b"authorization"), b"Bearer " + SK_B.encode())
        code, body = await self.chat(first_port, OLD_KEY)
        self.assertEqual(code, 401, body)
        self.assertEqual(json.loads(body)["error"]["code"], "invalid_api_key")

        # The stream in flight finishes normally, from A, the only request A got.
        self.assert_stream_complete(await incoming.done)
        self.assertEqual(len(a.requests), 1)
        self.assertEqual(len(b.requests), 1)

        # An invalid config is refused with a log line; the last good one stays.
        with open(self.config_path, "w", encoding="utf-8") as f:
            f.write(
                "dbtype: none\nupstreams:\n  - endpoint: http://127.0.0.1:1/v1\n    stream_timout: 3\n"
            )
        daemon.signal("HUP")
        await daemon.wait_for("reload refused")
        refusal = [line for line in daemon.text.splitlines() if "reload refused" in line]
        self.assertEqual(len(refusal), 1, refusal)
        self.assertIn("stream_timout", refusal[0])
        code, body = await self.chat(first_port, NEW_KEY)
        self.assertEqual(code, 200, body)
        self.assertEqual(len(b.requests), 2)
        self.assertEqual((await self.chat(first_port, OLD_KEY))[0], 401)

        # A changed listener is re-bound: the new port answers, the old one is closed.
        write_yaml(self.config_path, {**new, "listen": f"tcp:{second_port}:interface=127.0.0.1"})
        daemon.signal("HUP")
        await daemon.wait_for("config reloaded", count=2)
        await self.serving(daemon, second_port, attempts=40)
        code, body = await self.chat(second_port, NEW_KEY)
        self.assertEqual(code, 200, body)
        self.assertTrue(await self.refused(first_port))
        self.assertTrue(daemon.running)
        self.assertNotIn("Traceback", daemon.text)
        for secret in (OLD_KEY, NEW_KEY, SK_A, SK_B):
            self.assertNotIn(secret, daemon.text)

    async def test_reload_onto_a_busy_port_keeps_serving(self) -> None:
        """A new listen address that cannot be bound must not leave the daemon
        listening nowhere: the old listener stays until the new one is bound."""
        b = await self.fake()
        port = free_port()
        busy = await serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(
            Factory.forProtocol(Protocol)
        )
        self.addCleanup(busy.stopListening)
        config = base_config(port, {"new": NEW_KEY}, [upstream("b", b.endpoint, SK_B)])
        daemon = self.spawn(config)
        await self.serving(daemon, port)
        await daemon.wait_for("oaproxy started")
        write_yaml(
            self.config_path, {**config, "listen": f"tcp:{busy.getHost().port}:interface=127.0.0.1"}
        )
        daemon.signal("HUP")
        await daemon.wait_for("config reloaded")
        # Some line names the address that could not be bound.
        await daemon.wait_for(f"tcp:{busy.getHost().port}:interface=127.0.0.1")
        await self.serving(daemon, port, attempts=20)
        code, body = await self.chat(port, NEW_KEY)
        self.assertEqual(code, 200, body)


class StopTests(DaemonCase):
    async def stopped_mid_stream(
        self, stream: Stream, **more: Any
    ) -> tuple[Daemon, int, IncomingBody, float]:
        """A daemon serving a stream from ``stream``, sent SIGTERM once the
        stream began: the daemon, its port, the stream, when SIGTERM was sent."""
        a = await self.fake(default=stream)
        port = free_port()
        records = {"file": "records.jsonl", "spool_dir": "spool"}
        upstreams = [upstream("a", a.endpoint, SK_A)]
        config = base_config(port, {"old": OLD_KEY}, upstreams, records=records, **more)
        daemon = self.spawn(config)
        await self.serving(daemon, port)
        incoming = await self.start_stream(port, OLD_KEY)
        daemon.signal("TERM")
        return daemon, port, incoming, reactor.seconds()

    async def test_sigterm_drains_a_stream_in_flight(self) -> None:
        """SIGTERM closes the listener at once and lets the stream in flight
        finish before the daemon exits; its record is written whole."""
        daemon, port, incoming, sent = await self.stopped_mid_stream(SLOW)

        # New connections are refused promptly, while the stream goes on.
        for _ in range(40):
            if await self.refused(port):
                break
            await deferLater(reactor, POLL, lambda: None)
        else:
            self.fail(f"still accepting 2 s after SIGTERM:\n{daemon.text}")
        self.assertLess(reactor.seconds() - sent, 1.5)
        self.assertFalse(incoming.done.called, "the stream ended before the listener closed")
        self.assertTrue(daemon.running)

        self.assert_stream_complete(await incoming.done)
        self.assert_stopped_by_sigterm(await daemon.end(), daemon)
        self.assertIn("stopping: waiting up to 30.0s for 1 requests in flight", daemon.text)

        [record] = read_json_lines(os.path.join(self.cwd, "records.jsonl"))
        self.assertEqual((record["stream"], record["status"], record["outcome"]), (True, 200, "ok"))
        self.assertEqual(record["upstream"], "a")
        self.assertEqual(record["response_text"], "".join(SLOW_CHUNKS))
        self.assertEqual(record["key_name"], "old")

    async def test_shutdown_timeout_cuts_a_long_stream(self) -> None:
        """A stream still running at shutdown_timeout is cut: the daemon exits
        about then, the client's stream does not look complete, and the record
        says the proxy cut it."""
        # About 8 s of stream, against a 1 s shutdown_timeout.
        long_stream = Stream(chunks=tuple(f"c{i} " for i in range(40)), delay=0.2)
        daemon, _, incoming, sent = await self.stopped_mid_stream(long_stream, shutdown_timeout=1)
        reason = await daemon.end()
        assert daemon.ended_at is not None
        took = daemon.ended_at - sent
        self.assertGreaterEqual(took, 0.9, daemon.text)
        self.assertLess(took, 3.5, daemon.text)
        self.assert_stopped_by_sigterm(reason, daemon)
        self.assertIn("cutting 1 requests still in flight", daemon.text)

        body, clean = await incoming.done
        self.assertFalse(clean, "a cut stream must not look complete")
        self.assertNotIn(b"[DONE]", body)

        [record] = read_json_lines(os.path.join(self.cwd, "records.jsonl"))
        self.assertEqual(record["stream"], True)
        # The proxy cut it, the client did not go away; the record says so.
        self.assertEqual(record["error"], "cut off when the proxy shut down")
        self.assertEqual(record["outcome"], "shutdown")
        self.assertNotEqual(record["response_text"], "".join(f"c{i} " for i in range(40)))
        self.assertLess(record["duration"], 3.5)


class SocketActivationTests(DaemonCase):
    def test_listen_on_an_inherited_socket(self) -> Deferred[None]:
        """Given a listening socket as systemd passes it (fd 3, LISTEN_FDS,
        LISTEN_PID), the daemon serves on it by index."""
        return Deferred.fromCoroutine(self._inherited("systemd:domain=INET:index=0"))

    def test_listen_on_an_inherited_socket_by_name(self) -> Deferred[None]:
        """The inherited socket may be named by its socket unit's name instead of its index."""
        return Deferred.fromCoroutine(self._inherited("systemd:domain=INET:name=oaproxy.socket"))

    async def _inherited(self, listen: str) -> None:
        fake = await self.fake()
        listening = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.addCleanup(listening.close)
        listening.bind(("127.0.0.1", 0))
        listening.listen(16)
        port = listening.getsockname()[1]
        config = base_config(
            None, {"old": OLD_KEY}, [upstream("a", fake.endpoint, SK_A)], listen=listen
        )
        env = {k: v for k, v in child_env().items() if k != "LISTEN_PID"}
        # As systemd (>= 227) does: fd 3, its count, its name (the socket
        # unit's, by default; Twisted ignores descriptors without names) and
        # LISTEN_PID naming the process that execs twistd, known only after
        # the fork, hence the shell.
        env.update(LISTEN_FDS="1", LISTEN_FDNAMES="oaproxy.socket")
        daemon = self.spawn(
            config,
            env=env,
            child_fds={0: "w", 1: "r", 2: "r", 3: listening.fileno()},
            prefix=["/bin/sh", "-c", 'LISTEN_PID=$$; export LISTEN_PID; exec "$@"', "sh"],
        )
        # Only the daemon holds the socket now.
        listening.close()
        await self.serving(daemon, port)
        code, body = await self.chat(port, OLD_KEY)
        self.assertEqual(code, 200, body)
        self.assertEqual(json.loads(body)["choices"][0]["message"]["content"], "Hello, world!")
        self.assertEqual(len(fake.requests), 1)
        await daemon.wait_for(f"listening on {listen}")
        self.assertNotIn("Traceback", daemon.text)

    async def test_no_inherited_socket_is_one_clear_line(self) -> None:
        """Started by hand, without the .socket unit: a one-line refusal, as
        for any config error, not a traceback."""
        upstreams = [upstream("a", "http://127.0.0.1:9/v1", SK_A)]
        config = base_config(
            None, {"old": OLD_KEY}, upstreams, listen="systemd:domain=INET:index=0"
        )
        write_yaml(self.config_path, config)
        env = {k: v for k, v in child_env().items() if not k.startswith("LISTEN_")}
        out, err, code = await run_twistd(TWISTD_ARGS, self.cwd, env)
        self.assertNotEqual(code, 0)
        self.assertNotIn(b"Traceback", out + err)
        lines = err.decode().splitlines()
        self.assertEqual(len(lines), 1, err)
        self.assertTrue(lines[0].startswith("oaproxy: "), lines[0])
        self.assertIn("systemd:domain=INET:index=0", lines[0])


class SummaryTests(DaemonCase):
    async def test_startup_summary(self) -> None:
        """The startup block names the listener, the client keys by name, each
        upstream with its models and deadlines, the sinks and the alert
        channels' hosts, and no secret."""
        main = await self.fake()
        spare = await self.fake()
        port = free_port()
        config = base_config(
            port,
            {"alice": OLD_KEY, "bob": NEW_KEY},
            [
                upstream(
                    "main",
                    main.endpoint,
                    SK_A,
                    allow=["gpt-4o-mini", "gpt-4o"],
                    timeout=30,
                    stream_timeout=7,
                ),
                upstream("spare", spare.endpoint, SK_B),
            ],
            records={"file": "log/records.jsonl", "spool_dir": "spool"},
            notify={
                "feishu": {
                    "webhook": f"http://127.0.0.1:9/open-apis/bot/v2/hook/{FEISHU_TOKEN}",
                    "secret": FEISHU_SECRET,
                },
                "matrix": {
                    "homeserver": "http://127.0.0.1:9",
                    "access_token": MATRIX_TOKEN,
                    "room_id": "!ops:example.org",
                },
            },
        )
        daemon = self.spawn(config)
        await self.serving(daemon, port)
        await daemon.wait_for("oaproxy started")
        lines = daemon.text.splitlines()
        start = next(i for i, line in enumerate(lines) if line.endswith("oaproxy started"))
        # The block: the headline's following lines, each "  "-indented.
        block = []
        for line in lines[start + 1 :]:
            _, _, message = line.partition("] ")
            if not message.startswith("  "):
                break
            block.append(message.strip())
        self.assertIn(f"listening on tcp:{port}:interface=127.0.0.1", block)
        self.assertTrue(any(line.startswith("client keys: alice, bob;") for line in block), block)
        # How many connections depends on this machine's descriptor limit.
        clients = [line for line in block if line.startswith("clients: at most ")]
        self.assertEqual(len(clients), 1, block)
        self.assertTrue(
            clients[0].endswith("; request head within 10s; bodies at least 1024 bytes/s over 10s"),
            clients,
        )
        self.assertIn(
            f"upstream main: {main.endpoint}; models gpt-4o-mini, gpt-4o; timeout 30s, stream 7s",
            block,
        )
        self.assertIn(
            f"upstream spare: {spare.endpoint}; models all; timeout 10s, stream 10s", block
        )
        records = [line for line in block if line.startswith("records:")]
        self.assertEqual(len(records), 1, block)
        self.assertIn("sinks file (", records[0])
        self.assertIn("alerts: feishu (127.0.0.1), matrix (127.0.0.1)", block)
        for secret in (OLD_KEY, NEW_KEY, SK_A, SK_B, MATRIX_TOKEN, FEISHU_SECRET, FEISHU_TOKEN):
            self.assertNotIn(secret, daemon.text)
        self.assertNotIn("Traceback", daemon.text)
