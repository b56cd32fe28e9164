"""The twistd plugin, and the installed ``twistd`` run for real.

Subprocesses run with the environment of the tests minus ``PYTHONPATH`` (the
package is installed, so nothing must depend on it) and a temporary
directory as their working directory. They are driven by the reactor
(``getProcessOutputAndValue``, ``spawnProcess``), never waited on by blocking.
"""

from __future__ import annotations

import json
import os
import signal
from typing import Any, cast

from twisted.application.service import IServiceMaker
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectError, ProcessTerminated
from twisted.internet.task import deferLater
from twisted.plugin import getPlugins
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, HTTPConnectionPool, ResponseNeverReceived
from twisted.web.iweb import IResponse

from tests.live import (
    LiveCase,
    free_port,
    post_json,
    reactor,
    read_body,
    run_twistd,
    spawn_daemon,
    twistd_args,
    write_yaml,
)
from tests.payloads import chat_body, upstream

CLIENT_KEY = "ck-smoke-0123456789"
UPSTREAM_SK = "sk-smoke-upstream"
# How long the smoke test waits for the daemon to answer: 150 polls, 0.1 s apart.
POLLS = 150
POLL_INTERVAL = 0.1


def write_file(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


class PluginTests(SynchronousTestCase):
    def test_plugin_is_found(self) -> None:
        """getPlugins finds the oaproxy service maker, with its description and Options."""
        makers: dict[str, Any] = {str(m.tapname): m for m in getPlugins(IServiceMaker)}
        self.assertIn("oaproxy", makers)
        maker = makers["oaproxy"]
        self.assertEqual(maker.description, "OpenAI-compatible reverse proxy with failover")
        from oaproxy.tap import Options

        self.assertIs(maker.options, Options)


class TwistdTests(TestCase):
    timeout = 30

    def workdir(self) -> str:
        path = os.path.abspath(self.mktemp())
        os.makedirs(path)
        return path

    async def test_help_lists_oaproxy(self) -> None:
        """The installed twistd lists oaproxy among its commands."""
        out, err, code = await run_twistd(["--help"], self.workdir())
        self.assertEqual(code, 0, err)
        lines = [line.split() for line in out.decode().splitlines()]
        self.assertIn(
            ["oaproxy", "OpenAI-compatible", "reverse", "proxy", "with", "failover"], lines
        )

    async def _refused(self, text: str, line: int, key: str | None, reason: str) -> None:
        cwd = self.workdir()
        write_file(os.path.join(cwd, "bad.yaml"), text)
        started = reactor.seconds()
        out, err, code = await run_twistd(twistd_args("bad.yaml"), cwd)
        self.assertLess(reactor.seconds() - started, 20)
        self.assertNotEqual(code, 0)
        self.assertEqual(out, b"")
        lines = err.decode().splitlines()
        self.assertEqual(len(lines), 1, err)
        [message] = lines
        self.assertTrue(message.startswith(f"oaproxy: bad.yaml:{line}: "), message)
        if key is not None:
            self.assertIn(f": {key}: ", message)
        self.assertIn(reason, message)
        self.assertNotIn("Traceback", message)
        self.assertNotIn("starting up", message)

    def test_malformed_yaml(self) -> Deferred[None]:
        """twistd on a file that is not YAML exits at once with one line naming
        the file and the line, no traceback."""
        text = "dbtype: none\nupstreams:\n  - endpoint: [http://127.0.0.1:1/v1\n"
        return Deferred.fromCoroutine(self._refused(text, 4, None, "not valid YAML"))

    def test_unknown_key(self) -> Deferred[None]:
        """twistd on a config with a misspelt key exits with one line naming the
        file, the line and the key."""
        text = (
            "dbtype: none\nupstreams:\n  - endpoint: http://127.0.0.1:1/v1\n    stream_timout: 3\n"
        )
        return Deferred.fromCoroutine(
            self._refused(text, 4, "upstreams[0].stream_timout", "unknown key")
        )

    def test_wrong_type(self) -> Deferred[None]:
        """twistd on a config with a value of the wrong type exits with one line
        naming the key and what was expected."""
        text = "dbtype: none\ntimeout: soon\nupstreams:\n  - endpoint: http://127.0.0.1:1/v1\n"
        return Deferred.fromCoroutine(self._refused(text, 2, "timeout", "expected a number"))

    def test_missing_environment_variable(self) -> Deferred[None]:
        """twistd on a config naming an unset environment variable exits with
        one line naming the key and the variable."""
        text = (
            "dbtype: none\nupstreams:\n  - endpoint: http://127.0.0.1:1/v1\n"
            "    sk: ${OAPROXY_TEST_UNSET_VARIABLE}\n"
        )
        return Deferred.fromCoroutine(
            self._refused(text, 4, "upstreams[0].sk", "OAPROXY_TEST_UNSET_VARIABLE is not set")
        )

    def test_upstream_without_endpoint(self) -> Deferred[None]:
        """twistd on an upstream without an endpoint exits with one line naming
        the upstream's key."""
        text = "dbtype: none\nupstreams:\n  - name: nowhere\n    sk: sk-x\n"
        return Deferred.fromCoroutine(
            self._refused(text, 3, "upstreams[0].endpoint", "no endpoint")
        )


class SmokeTests(LiveCase):
    timeout = 40

    async def test_twistd_serves_and_stops_cleanly(self) -> None:
        """The installed twistd serves /healthz and a chat completion through
        its upstream with that upstream's key, and stops on SIGTERM as every
        twistd plugin does, closing its port, without a traceback or a key in
        its output."""
        fake = await self.fake()
        cwd = os.path.abspath(self.mktemp())
        os.makedirs(cwd)
        config = {
            "dbtype": "none",
            "authorization": {"smoke": CLIENT_KEY},
            "upstreams": [upstream("fake", fake.endpoint, UPSTREAM_SK)],
        }
        write_yaml(os.path.join(cwd, "good.yaml"), config)
        port = free_port()
        daemon = spawn_daemon(
            self,
            twistd_args("good.yaml", "--listen", f"tcp:{port}:interface=127.0.0.1"),
            cwd,
        )

        pool = HTTPConnectionPool(reactor, persistent=True)
        self.addCleanup(pool.closeCachedConnections)
        agent = Agent(reactor, pool=pool)
        base = f"http://127.0.0.1:{port}".encode()

        health: IResponse | None = None
        for _ in range(POLLS):
            if not daemon.running:
                self.fail(f"twistd exited before serving:\n{daemon.output.decode()}")
            try:
                health = await agent.request(b"GET", base + b"/healthz")
                break
            except (ConnectError, ResponseNeverReceived):
                await deferLater(reactor, POLL_INTERVAL, lambda: None)
        if health is None:
            self.fail(f"twistd did not answer /healthz:\n{daemon.output.decode()}")
        self.assertEqual(health.code, 200)
        self.assertEqual(json.loads(await read_body(health)), {"status": "ok"})

        response = await post_json(
            agent, f"http://127.0.0.1:{port}/v1/chat/completions", CLIENT_KEY, chat_body()
        )
        answer = json.loads(await read_body(response))
        self.assertEqual(response.code, 200, answer)
        self.assertEqual(answer["choices"][0]["message"]["content"], "Hello, world!")
        [seen] = fake.requests
        self.assertEqual(seen.header(b"authorization"), b"Bearer " + UPSTREAM_SK.encode())
        await pool.closeCachedConnections()

        daemon.signal("TERM")
        [reason] = await daemon.ended
        output = daemon.output.decode()
        # twistd stops the services, then re-raises the signal on itself
        # (twisted.application.app._exitWithSignal), so that its parent sees
        # how it ended: a clean SIGTERM shutdown ends "by signal 15", never 0,
        # for every twistd plugin (systemd counts SIGTERM as a clean exit).
        self.assertTrue(reason.check(ProcessTerminated), f"{reason.value}\n{output}")
        ended = cast(ProcessTerminated, reason.value)
        self.assertEqual((ended.exitCode, ended.signal), (None, signal.SIGTERM), output)
        self.assertIn("Received SIGTERM, shutting down.", output)
        self.assertIn(f"(TCP Port {port} Closed)", output)
        self.assertIn("Main loop terminated.", output)
        self.assertIn("Server Shut Down", output)
        self.assertNotIn("Traceback", output)
        self.assertNotIn(CLIENT_KEY, output)
        self.assertNotIn(UPSTREAM_SK, output)
