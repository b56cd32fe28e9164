"""Tests for ``oaproxy.workers``: the supervisor on a ``Clock`` with fake
processes, and the real ``twistd -n oaproxy`` with ``workers: 2`` on a real
port (served by both, a killed worker restarted, SIGHUP and SIGTERM passed
on, a limit shared through Redis)."""

from __future__ import annotations

import json
import os
import signal
import socket
import uuid
from collections import Counter
from typing import Any

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.resource import Resource
from twisted.web.server import Site

from oaproxy.config import ConfigError, RecordsPolicy
from oaproxy.listeners import Listeners
from oaproxy.tap import Options
from oaproxy.workers import (
    LISTENERS_VARIABLE,
    SLOT_VARIABLE,
    InheritedListener,
    WorkerSupervisor,
    bind_listeners,
    inherited_listeners,
    worker_records_policy,
    worker_slot,
)
from tests.doubles import capture_log, make_config
from tests.live import (
    SHARED_REDIS,
    free_port,
    reactor,
    read_body,
    sql_rows,
    wait_for,
)
from tests.records import read_json_lines
from tests.test_daemon import DaemonCase, base_config
from tests.test_traffic_counters import start_shared_redis

KEY = "ck-workers-0123456789"


class SlotTests(SynchronousTestCase):
    def test_outside_workers(self) -> None:
        """A process that is no worker has no slot, no sockets, and its records
        policy as the config says."""
        self.assertIsNone(worker_slot({}))
        self.assertEqual(inherited_listeners({}), {})
        policy = RecordsPolicy(file="log/records.jsonl")
        self.assertIs(worker_records_policy(policy, None), policy)

    def test_a_worker(self) -> None:
        """A worker reads its slot and sockets from its environment, and keeps
        a records file and spool of its own."""
        environ = {
            SLOT_VARIABLE: "2",
            LISTENERS_VARIABLE: json.dumps({"tcp:8888": [3, "INET"], "unix:/s": [4, "UNIX"]}),
        }
        self.assertEqual(worker_slot(environ), 2)
        self.assertEqual(
            inherited_listeners(environ),
            {"tcp:8888": InheritedListener(3, "INET"), "unix:/s": InheritedListener(4, "UNIX")},
        )
        policy = worker_records_policy(
            RecordsPolicy(file="log/records.jsonl", spool_dir="log/spool"), 2
        )
        self.assertEqual(
            (policy.file, policy.spool_dir), ("log/records.worker2.jsonl", "log/spool/worker2")
        )


class OptionTests(SynchronousTestCase):
    UPSTREAMS = "upstreams:\n  - name: echo\n    type: echo\n"

    def test_config(self) -> None:
        """``workers`` is 1 unless set; 0 is refused on its line."""
        self.assertEqual(make_config(self.UPSTREAMS).workers, 1)
        self.assertEqual(make_config("workers: 4\n" + self.UPSTREAMS).workers, 4)
        error = self.assertRaises(ConfigError, make_config, "workers: 0\n" + self.UPSTREAMS)
        self.assertEqual((error.line, error.key), (1, "workers"))

    def test_option(self) -> None:
        """``--workers`` takes a count of 1 or more."""
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write(self.UPSTREAMS)
        options = Options()
        options.parseOptions(["--config", path, "--workers", "3"])
        self.assertEqual(options["workers"], 3)
        with self.assertRaises(SystemExit) as caught:
            Options().parseOptions(["--config", path, "--workers", "0"])
        self.assertIn("--workers", str(caught.exception))


class BindTests(SynchronousTestCase):
    def test_tcp_one_socket_per_worker(self) -> None:
        """A TCP listener is bound once per worker, all on one port
        (SO_REUSEPORT: the kernel spreads connections over them)."""
        [bound] = bind_listeners(reactor, ["tcp:0:interface=127.0.0.1"], 3, "c.yaml")
        self.addCleanup(bound.close)
        ports = {each.getsockname() for each in bound.sockets}
        self.assertEqual(len(bound.sockets), 3)
        self.assertEqual(len(ports), 1)
        self.assertEqual(bound.family, "INET")
        client = socket.create_connection(next(iter(ports)), timeout=5)
        client.close()

    def test_unix_one_shared_socket(self) -> None:
        """A UNIX socket is one, shared; a stale socket file is replaced."""
        path = os.path.abspath(self.mktemp())
        stale = socket.socket(socket.AF_UNIX)
        stale.bind(path)
        stale.close()
        [bound] = bind_listeners(reactor, [f"unix:{path}"], 2, "c.yaml")
        self.addCleanup(bound.close)
        self.assertEqual((len(bound.sockets), bound.family), (1, "UNIX"))
        self.assertIs(bound.for_child(1), bound.sockets[0])

    def test_tls_refused(self) -> None:
        """TLS listeners cannot be shared: a ConfigError naming workers, and
        nothing stays bound."""
        port = free_port()
        with self.assertRaises(ConfigError) as caught:
            bind_listeners(
                reactor,
                [f"tcp:{port}:interface=127.0.0.1", "ssl:8443:privateKey=k.pem"],
                2,
                "c.yaml",
            )
        self.assertIn("workers", str(caught.exception))
        self.assertIn("c.yaml", str(caught.exception))
        # The TCP sockets bound before it were closed again.
        again = socket.socket()
        self.addCleanup(again.close)
        again.bind(("127.0.0.1", port))


class Adopted(Resource):
    """What the adopted socket serves: one word, on every path."""

    isLeaf = True

    def render_GET(self, request: Any) -> bytes:
        return b"adopted"


class AdoptionTests(TestCase):
    async def test_a_worker_adopts_and_keeps_its_listeners(self) -> None:
        """A worker serves on the socket it was handed rather than binding
        the endpoint, and a reload that changes ``listen`` leaves it as it is
        (logged: the sockets are the parent's)."""
        [bound] = bind_listeners(reactor, ["tcp:0:interface=127.0.0.1"], 1, "c.yaml")
        self.addCleanup(bound.close)
        address = bound.sockets[0].getsockname()
        fd = os.dup(bound.sockets[0].fileno())
        parent = MultiService()
        parent.startService()
        self.addCleanup(parent.stopService)
        site = Site(Adopted())
        endpoint = "tcp:9:interface=127.0.0.1"
        listeners = Listeners(parent, site, reactor, {endpoint: InheritedListener(fd, "INET")})
        listeners.add(endpoint)
        events = capture_log(self)
        agent = Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False))
        url = f"http://127.0.0.1:{address[1]}/".encode()
        self.assertEqual(await read_body(await agent.request(b"GET", url)), b"adopted")
        await listeners.replace(("tcp:10:interface=127.0.0.1",))
        self.assertEqual(list(listeners), [endpoint])
        self.assertTrue(any("restart oaproxy" in str(e.get("log_format")) for e in events))
        response = await agent.request(b"GET", url)
        self.assertEqual(await read_body(response), b"adopted")
        await listeners.close()


class FakeProcess:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.signals: list[str] = []

    def signalProcess(self, name: str) -> None:
        self.signals.append(name)


class ProcessReactor(Clock):
    """A Clock that records spawnProcess calls instead of running anything."""

    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[tuple[Any, list[str], dict[str, str], dict[int, Any], FakeProcess]] = []

    def spawnProcess(
        self, protocol: Any, executable: str, args: list[str], env: Any, childFDs: Any
    ) -> FakeProcess:
        process = FakeProcess(1000 + len(self.spawned))
        self.spawned.append((protocol, args, env, childFDs, process))
        return process


def ended(code: int | None = 1, by_signal: int | None = None) -> Failure:
    if code == 0:
        return Failure(ProcessDone(0))
    return Failure(ProcessTerminated(code, by_signal))


class SupervisorTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = ProcessReactor()
        self.supervisor = WorkerSupervisor(
            self.reactor,
            count=2,
            listen=["tcp:0:interface=127.0.0.1"],
            arguments=["--config", "c.yaml"],
            config_path="c.yaml",
            shutdown_timeout=5,
            environ={"PATH": "/bin", "LISTEN_FDS": "1", "LISTEN_PID": "1"},
            signals=False,
        )
        self.supervisor.startService()
        self.addCleanup(self.supervisor._close_listeners)

    def end(self, index: int, reason: Failure) -> None:
        protocol = self.reactor.spawned[index][0]
        protocol.processEnded(reason)

    def test_children(self) -> None:
        """Each child is twistd running oaproxy with one worker, its slot and
        its own socket on fd 3; systemd's variables are not passed on."""
        self.assertEqual(len(self.reactor.spawned), 2)
        for slot, (_, args, env, fds, _) in enumerate(self.reactor.spawned, start=1):
            self.assertEqual(
                args[3:], ["-n", "--pidfile=", "oaproxy", "--config", "c.yaml", "--workers", "1"]
            )
            self.assertEqual(env[SLOT_VARIABLE], str(slot))
            self.assertEqual(
                json.loads(env[LISTENERS_VARIABLE]), {"tcp:0:interface=127.0.0.1": [3, "INET"]}
            )
            self.assertNotIn("LISTEN_FDS", env)
            self.assertEqual((fds[0], fds[1], fds[2]), (0, 1, 2))
        first, second = (spawned[3][3] for spawned in self.reactor.spawned)
        self.assertNotEqual(first, second)
        self.assertEqual(self.supervisor.pids, [1000, 1001])

    def test_restart_with_backoff(self) -> None:
        """A child that dies young is restarted after 0.5 s, 1 s, 2 s…; one
        that lived 30 s starts over at 0.5 s.  Logged each time."""
        delays = []
        for index in range(4):
            # The second slot's child, then each of its successors.
            self.end(1 + index, ended(1))
            (call,) = self.reactor.getDelayedCalls()
            delays.append(call.getTime() - self.reactor.seconds())
            self.reactor.advance(delays[-1])
        self.assertEqual(delays, [0.5, 1, 2, 4])
        self.assertEqual(len(self.reactor.spawned), 6)
        self.assertEqual(self.supervisor.pids, [1000, 1005])
        self.reactor.advance(30)
        self.end(5, ended(None, signal.SIGKILL))
        (call,) = self.reactor.getDelayedCalls()
        self.assertEqual(call.getTime() - self.reactor.seconds(), 0.5)
        self.flushLoggedErrors()

    def test_sighup_passed_on(self) -> None:
        """SIGHUP goes to every running child."""
        self.supervisor._forward("HUP")
        self.assertEqual([spawned[4].signals for spawned in self.reactor.spawned], [["HUP"]] * 2)

    def test_stop(self) -> None:
        """Stopping sends SIGTERM to each child, restarts none, and ends once
        all have ended; the sockets are closed then."""
        self.end(0, ended(1))
        self.flushLoggedErrors()
        d = self.supervisor.stopService()
        self.assertEqual(self.reactor.spawned[1][4].signals, ["TERM"])
        self.assertEqual(self.reactor.getDelayedCalls()[0].getTime(), 65)
        self.assertNoResult(d)
        self.end(1, ended(None, signal.SIGTERM))
        self.successResultOf(d)
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        self.assertEqual(len(self.reactor.spawned), 2)

    def test_killed_after_the_deadline(self) -> None:
        """A child still running shutdown_timeout + 60 s after SIGTERM is killed."""
        d = self.supervisor.stopService()
        self.reactor.advance(65)
        self.assertEqual(
            [spawned[4].signals for spawned in self.reactor.spawned], [["TERM", "KILL"]] * 2
        )
        self.end(0, ended(None, signal.SIGKILL))
        self.end(1, ended(None, signal.SIGKILL))
        self.successResultOf(d)
        self.flushLoggedErrors()


class LiveWorkersTests(DaemonCase):
    """``twistd -n oaproxy`` with ``workers: 2``, for real."""

    timeout = 120

    def config(self, port: int, **more: Any) -> dict[str, Any]:
        return base_config(
            port,
            {"t": KEY},
            [{"name": "echo", "type": "echo"}],
            workers=2,
            dbtype="sqlite",
            dbaddr=os.path.join(self.cwd, "db.sqlite"),
            records={
                "file": os.path.join(self.cwd, "records.jsonl"),
                "spool_dir": os.path.join(self.cwd, "spool"),
            },
            **more,
        )

    async def many(self, port: int, count: int) -> list[int]:
        """``count`` chat requests at once, each on a connection of its own."""
        answers = await gatherResults(
            [Deferred.fromCoroutine(self.chat(port, KEY)) for _ in range(count)],
            consumeErrors=True,
        )
        return [status for status, _ in answers]

    def stored_pids(self) -> Counter[int]:
        return Counter(
            row["pid"] for row in sql_rows("sqlite", os.path.join(self.cwd, "db.sqlite"))
        )

    async def worker_pids(self, daemon: Any) -> list[int]:
        await daemon.wait_for("oaproxy started 2 workers")
        line = next(line for line in daemon.text.splitlines() if "started 2 workers" in line)
        return [int(pid) for pid in line.split("pids ")[1].split()]

    async def test_two_workers_one_port(self) -> None:
        """Both workers serve the port (their pids in the records, in SQL and
        in each worker's records file); a worker killed with SIGKILL is
        restarted and serves; SIGHUP reaches both; SIGTERM drains both, every
        record is stored, and the parent ends."""
        port = free_port()
        daemon = self.spawn(self.config(port))
        await self.serving(daemon, port)
        pids = await self.worker_pids(daemon)
        await daemon.wait_for("oaproxy started\n", count=2, timeout=30)
        self.assertEqual(await self.many(port, 40), [200] * 40)
        await wait_for(lambda: sum(self.stored_pids().values()) == 40, timeout=30)
        self.assertEqual(set(self.stored_pids()), set(pids))
        for slot in (1, 2):
            lines = read_json_lines(os.path.join(self.cwd, f"records.worker{slot}.jsonl"))
            self.assertEqual(len({line["pid"] for line in lines}), 1)

        os.kill(pids[0], signal.SIGKILL)
        await daemon.wait_for("restarting it in 0.5s")
        await daemon.wait_for("oaproxy started\n", count=3, timeout=30)
        self.assertEqual(await self.many(port, 40), [200] * 40)
        await wait_for(lambda: sum(self.stored_pids().values()) == 80, timeout=30)
        after = set(self.stored_pids()) - set(pids)
        self.assertEqual(len(after), 1, self.stored_pids())

        daemon.signal("HUP")
        await daemon.wait_for("config reloaded", count=2, timeout=30)

        daemon.signal("TERM")
        reason = await daemon.end()
        self.assertTrue(reason.check(ProcessTerminated), daemon.text)
        self.assertEqual(daemon.text.count("ended: killed by signal 15"), 2, daemon.text)
        self.assertNotIn("Traceback", daemon.text)
        self.assertEqual(sum(self.stored_pids().values()), 80)
        self.assertTrue(await self.refused(port))

    async def test_a_limit_shared_through_redis(self) -> None:
        """limits.backend: redis makes the two workers' limit one: 5/minute
        admits 5 of 12 requests in all, spread over both workers."""
        prefix = f"oaproxy-test:{uuid.uuid4().hex}:"
        await start_shared_redis(self, prefix=prefix)
        port = free_port()
        config = self.config(
            port,
            redis=f"redis://{SHARED_REDIS[0]}:{SHARED_REDIS[1]}/0",
            redis_prefix=prefix,
            limits={"backend": "redis", "on_backend_error": "closed", "global": "5/minute"},
        )
        config["records"]["redis_key"] = prefix + "records"
        daemon = self.spawn(config)
        await self.serving(daemon, port)
        await daemon.wait_for("oaproxy started\n", count=2, timeout=30)
        # Closed: a 503 while a worker's Redis connection is not up yet.
        await daemon.wait_for("shared Redis connected at", count=2, timeout=30)
        statuses = await self.many(port, 12)
        self.assertEqual(sorted(statuses), [200] * 5 + [429] * 7, daemon.text)
        await wait_for(lambda: sum(self.stored_pids().values()) == 12, timeout=30)
        self.assertEqual(len(self.stored_pids()), 2, self.stored_pids())
