"""Helpers of the tests that run for real: sockets, subprocesses, servers.

(The fast, in-memory doubles are in ``tests.doubles``; request bodies and
configs in ``tests.payloads``; the scripted upstream is ``tests.fakeupstream``.)

- External services: ``unavailable`` (skip, or fail under ``CI=true``),
  ``reachable``, ``free_port``, ``wait_for``; the shared Redis and
  PostgreSQL, a ``PrivateRedis`` of a test's own, ``postgres_schema`` (a
  fresh schema, dropped in cleanup), ``sql_rows``.
- The service in process, built as twistd builds it (``Options`` then
  ``makeService``) on ``tcp:0:interface=127.0.0.1``: ``ProxyCase.start_proxy``
  gives a ``RunningProxy`` whose ``RecordLog`` sees every record;
  ``ProxyCase.sdk`` runs the official (synchronous) SDK in a thread, ``chat``
  and ``collect_stream`` being what it most often runs; ``RawClient`` is an
  HTTP/1.1 client that hangs up mid-stream.
  ``EndToEndCase`` is that case with the keys and defaults most tests use.
- The installed twistd as a subprocess: ``twistd_args``, ``twistd_command``,
  ``child_env``, ``run_twistd``, ``spawn_daemon``, ``Daemon`` (its output and
  its end); ``post_json``, ``read_body`` and ``IncomingBody`` for talking to
  it with twisted.web's ``Agent``.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable, Generator
from io import BytesIO
from typing import Any, NoReturn, TypeVar

import openai
import yaml
from attrs import frozen
from twisted.application.internet import StreamServerEndpointService
from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.internet.protocol import ProcessProtocol, Protocol, connectionDone
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.internet.utils import getProcessOutputAndValue
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase
from twisted.web.client import FileBodyProducer, ResponseDone
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse

from oaproxy.record import record_document
from oaproxy.sinks.sql import COLUMNS, TABLE, open_database
from oaproxy.tap import Options, makeService
from tests.fakeupstream import ConnectionTracker, FakeUpstream
from tests.payloads import CLIENT_KEY, FAKE_MODEL, HI, OTHER_KEY, proxy_config

reactor: Any = _reactor
T = TypeVar("T")

# -- external services -------------------------------------------------------------

SHARED_REDIS = ("127.0.0.1", 6379)
SHARED_POSTGRES = ("127.0.0.1", 5432)
#: The shared PostgreSQL's test database (tests work in a fresh schema of it).
POSTGRES_DSN = "host=127.0.0.1 port=5432 dbname=test user=postgres"


def unavailable(message: str) -> NoReturn:
    """A needed service is missing: fail under CI, skip elsewhere."""
    if os.environ.get("CI") == "true":
        raise AssertionError(f"{message} (CI=true: a missing service is a failure)")
    raise SkipTest(message)


def reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def free_port() -> int:
    """A local port nothing listens on now (bound by the OS, then released):
    connections to it are refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def refused_endpoint() -> str:
    """An upstream endpoint URL on which nothing listens."""
    return f"http://127.0.0.1:{free_port()}/v1"


@inlineCallbacks
def wait_for(
    condition: Callable[[], bool], timeout: float = 60.0, step: float = 0.05
) -> Generator[Deferred[Any], Any, None]:
    """Poll ``condition`` on the real reactor (only for real services)."""
    waited = 0.0
    while not condition():
        if waited >= timeout:
            raise AssertionError(f"condition not met within {timeout} s")
        yield deferLater(reactor, step, lambda: None)
        waited += step


class PrivateRedis:
    """A ``redis-server`` of our own on a free port, stopped by PID.

    With ``persistent`` it keeps its data over a SIGKILL and restart
    (append-only file, fsync on every write); with ``password`` it asks for one.
    """

    def __init__(
        self, directory: str, password: str | None = None, persistent: bool = False
    ) -> None:
        self.directory = directory
        self.password = password
        self.persistent = persistent
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @inlineCallbacks
    def start(self) -> Generator[Deferred[Any], Any, None]:
        binary = shutil.which("redis-server")
        if binary is None:
            unavailable("redis-server is not installed")
        os.makedirs(self.directory, exist_ok=True)
        arguments = ["--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        if self.password is not None:
            arguments += ["--requirepass", self.password]
        if self.persistent:
            arguments += ["--appendonly", "yes", "--appendfsync", "always"]
        else:
            arguments += ["--appendonly", "no"]
        self.process = subprocess.Popen(
            [binary, *arguments, "--dir", self.directory],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        yield wait_for(lambda: reachable("127.0.0.1", self.port), timeout=10)

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None


@inlineCallbacks
def redis_client(port: int, password: str | None = None) -> Generator[Deferred[Any], Any, Any]:
    import txredisapi

    client = yield txredisapi.Connection("127.0.0.1", port, reconnect=False, password=password)
    return client


def postgres_schema(case: SynchronousTestCase, schema: str, dsn: str = POSTGRES_DSN) -> str:
    """Create ``schema`` (dropped in ``case``'s cleanup); the dbaddr that works in it."""

    def execute(statement: str) -> None:
        connection = open_database("postgres", dsn)
        connection.autocommit = True
        connection.cursor().execute(statement)
        connection.close()

    execute(f"CREATE SCHEMA {schema}")
    case.addCleanup(execute, f"DROP SCHEMA {schema} CASCADE")
    return f"{dsn} options='-c search_path={schema}'"


def sql_rows(dbtype: str, dbaddr: str, order_by: str = "time") -> list[dict[str, Any]]:
    """Every row of the records table, as a dict of its columns."""
    connection = open_database(dbtype, dbaddr)
    try:
        cursor = connection.cursor()
        cursor.execute(f"SELECT {', '.join(COLUMNS)} FROM {TABLE} ORDER BY {order_by}")
        return [dict(zip(COLUMNS, row, strict=True)) for row in cursor.fetchall()]
    finally:
        connection.close()


# -- the service in process ---------------------------------------------------------


def write_yaml(path: str, content: Any) -> str:
    # Written whole to a new file, then renamed: a running daemon never reads half.
    with open(path + ".new", "w", encoding="utf-8") as f:
        yaml.safe_dump(content, f)
    os.replace(path + ".new", path)
    return path


class RecordLog:
    """The records the service emits, observed on its record publisher, in
    their stored form."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []
        self._waiting: list[tuple[int, Deferred[dict[str, Any]]]] = []

    def __call__(self, event: dict[str, Any]) -> None:
        self.seen.append(record_document(event["record"]))
        ready = [(n, d) for n, d in self._waiting if n <= len(self.seen)]
        self._waiting = [(n, d) for n, d in self._waiting if n > len(self.seen)]
        for n, d in ready:
            d.callback(self.seen[n - 1])

    def nth(self, count: int = 1) -> Deferred[dict[str, Any]]:
        """Fires with the ``count``-th record (1-based) once it was emitted."""
        if len(self.seen) >= count:
            return succeed(self.seen[count - 1])
        d: Deferred[dict[str, Any]] = Deferred()
        self._waiting.append((count, d))
        return d


@frozen
class RunningProxy:
    service: Any  # the ProxyService, an IService
    port: int
    connections: ConnectionTracker
    records: RecordLog
    config_path: str

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"


def listening_port(service: Any) -> Deferred[Any]:
    """The port a started service's listener bound.

    ``strports.service`` makes a ``StreamServerEndpointService`` child whose
    ``_waitingForPort`` Deferred fires with the ``IListeningPort``; there is
    no public accessor. The result is passed through untouched, because the
    service's own ``stopService`` chains on that Deferred to stop listening.
    """
    listeners = [c for c in service if isinstance(c, StreamServerEndpointService)]
    assert len(listeners) == 1, listeners
    waiting = listeners[0]._waitingForPort
    assert waiting is not None
    got: Deferred[Any] = Deferred()

    def tee(port: Any) -> Any:
        got.callback(port)
        return port

    waiting.addCallback(tee)
    return got


class LiveCase(TestCase):
    """A test on the real reactor, with ``FakeUpstream``s stopped in cleanup."""

    async def start_fake(self, fake: FakeUpstream) -> FakeUpstream:
        await fake.start()
        self.addCleanup(fake.stop)
        return fake

    async def fake(self, **kwargs: Any) -> FakeUpstream:
        return await self.start_fake(FakeUpstream(reactor, **kwargs))


class ProxyCase(LiveCase):
    """Runs the service in the test's reactor; stops it in cleanup."""

    #: The key ``sdk`` calls with unless told another.
    client_key = ""

    async def start_proxy(self, config: dict[str, Any], path: str) -> RunningProxy:
        """The service of ``config`` (written to ``path``), once it listens."""
        write_yaml(path, config)
        options = Options()
        options.parseOptions(["--config", path, "--listen", "tcp:0:interface=127.0.0.1"])
        service: Any = makeService(options, reactor)
        # Server-side connections stay open after stopListening (keep-alive):
        # they are followed so that cleanup closes them and waits.
        tracker = ConnectionTracker(service.site)
        records = RecordLog()
        service.shared.records.add_observer(records)
        service.startService()
        self.addCleanup(tracker.close_all)

        def stop() -> Deferred[None] | None:
            # A test may have stopped it already, to flush the sinks.
            return service.stopService() if service.running else None

        self.addCleanup(stop)
        port = await listening_port(service)
        return RunningProxy(service, port.getHost().port, tracker, records, path)

    def sdk(
        self, proxy: RunningProxy, call: Callable[[openai.OpenAI], T], key: str | None = None
    ) -> Deferred[T]:
        """Run ``call(client)`` in a thread with a client that is closed after it."""
        api_key = self.client_key if key is None else key

        def run() -> T:
            with openai.OpenAI(
                base_url=proxy.base_url,
                api_key=api_key,
                max_retries=0,
                timeout=15,
                http_client=openai.DefaultHttpxClient(trust_env=False),
            ) as client:
                return call(client)

        return deferToThread(run)


class RawClient(Protocol):
    """A raw HTTP/1.1 client; ``enough`` fires once ``events`` SSE events arrived."""

    def __init__(self, request: bytes, events: int = 1) -> None:
        self.request = request
        self.events = events
        self.received = b""
        self.enough: Deferred[None] = Deferred()
        self.lost: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        transport: Any = self.transport
        transport.write(self.request)

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if self.received.count(b"data:") >= self.events and not self.enough.called:
            self.enough.callback(None)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost.callback(None)

    def hang_up(self) -> Deferred[None]:
        """Abort the connection; fires once it is lost."""
        transport: Any = self.transport
        transport.abortConnection()
        return self.lost


def chat(client: openai.OpenAI, model: str = FAKE_MODEL) -> Any:
    """A chat completion through the SDK: one user message, "hi"."""
    return client.chat.completions.create(model=model, messages=HI)


def collect_stream(
    client: openai.OpenAI,
    include_usage: bool = False,
    model: str = FAKE_MODEL,
    messages: list[Any] = HI,
) -> tuple[list[str], list[Any]]:
    """A streamed chat through the SDK: its content deltas and its usage objects."""
    extra: dict[str, Any] = {"stream_options": {"include_usage": True}} if include_usage else {}
    deltas: list[str] = []
    usages: list[Any] = []
    stream = client.chat.completions.create(model=model, messages=messages, stream=True, **extra)
    for chunk in stream:
        if chunk.usage is not None:
            usages.append(chunk.usage)
        for choice in chunk.choices:
            if choice.delta.content:
                deltas.append(choice.delta.content)
    return deltas, usages


class EndToEndCase(ProxyCase):
    """The service with two client keys (alice, bob) and 10 s deadlines."""

    timeout = 20
    client_key = CLIENT_KEY

    async def proxy(self, upstreams: list[dict[str, Any]], **top: Any) -> RunningProxy:
        config = proxy_config("e2e", {"alice": CLIENT_KEY, "bob": OTHER_KEY}, upstreams, **top)
        return await self.start_proxy(config, self.mktemp() + ".yaml")

    async def sdk_error(
        self,
        proxy: RunningProxy,
        call: Callable[[openai.OpenAI], Any],
        error: type[BaseException],
        key: str = CLIENT_KEY,
    ) -> Any:
        result = await self.assertFailure(self.sdk(proxy, call, key), error)
        return result


# -- the installed twistd -----------------------------------------------------------

#: How often a test looks again at a daemon's output or port.
POLL = 0.05


def twistd_args(config: str, *more: str) -> list[str]:
    """twistd's arguments for oaproxy on ``config``: in the foreground,
    without a pidfile, then ``more`` of oaproxy's options."""
    return ["-n", "--pidfile=", "oaproxy", "--config", config, *more]


def twistd_command() -> list[str]:
    """The installed twistd, run by this interpreter.

    ``python -m twisted`` runs ``twist`` (no plugins of this kind) and
    ``twisted.scripts.twistd`` has no ``__main__`` guard, so without the
    console script next to the interpreter twistd is started by its ``run``.
    """
    script = os.path.join(os.path.dirname(sys.executable), "twistd")
    if os.path.exists(script):
        return [sys.executable, script]
    return [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


def child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.pop("OAPROXY_TEST_UNSET_VARIABLE", None)
    return env


def run_twistd(
    args: list[str], cwd: str, env: dict[str, str] | None = None
) -> Deferred[tuple[bytes, bytes, int]]:
    """twistd with ``args``, to its end: its stdout, stderr and exit status."""
    command = twistd_command()
    return getProcessOutputAndValue(
        command[0],
        command[1:] + args,
        env=env if env is not None else child_env(),
        path=cwd,
        reactor=reactor,
    )


class Daemon(ProcessProtocol):
    """One twistd child: its output, and a Deferred for its end."""

    def __init__(self) -> None:
        self.output = b""
        # Fires with the reason in a list: a Failure given to callback()
        # would errback the Deferred instead.
        self.ended: Deferred[list[Failure]] = Deferred()
        self.ended_at: float | None = None
        self.running = True
        self.process: Any = None

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        self.output += data

    def processEnded(self, reason: Failure) -> None:
        self.running = False
        self.ended_at = reactor.seconds()
        self.ended.callback([reason])

    @property
    def text(self) -> str:
        return self.output.decode("utf-8", "replace")

    def signal(self, name: str) -> None:
        self.process.signalProcess(name)

    async def wait_for(self, text: str, count: int = 1, timeout: float = 10.0) -> None:
        """Until ``text`` appeared ``count`` times in the output."""
        for _ in range(int(timeout / POLL)):
            if self.text.count(text) >= count:
                return
            if not self.running:
                break
            await deferLater(reactor, POLL, lambda: None)
        raise AssertionError(f"{text!r} x{count} not in the daemon's output:\n{self.text}")

    async def end(self) -> Failure:
        [reason] = await self.ended
        return reason

    async def kill(self) -> None:
        """SIGKILL it if it still runs, and wait for its end (for cleanup)."""
        if self.running:
            self.signal("KILL")
            await self.ended


def spawn_daemon(
    case: TestCase,
    args: list[str],
    cwd: str,
    *,
    env: dict[str, str] | None = None,
    child_fds: dict[int, Any] | None = None,
    prefix: list[str] | None = None,
) -> Daemon:
    """twistd with ``args`` as a child of the reactor, killed in ``case``'s cleanup."""
    daemon = Daemon()
    command = [*(prefix or []), *twistd_command(), *args]
    daemon.process = reactor.spawnProcess(
        daemon,
        command[0],
        command,
        env=env if env is not None else child_env(),
        path=cwd,
        childFDs=child_fds if child_fds is not None else {0: "w", 1: "r", 2: "r"},
    )
    case.addCleanup(lambda: Deferred.fromCoroutine(daemon.kill()))
    return daemon


class IncomingBody(Protocol):
    """A response body as it arrives: ``first`` fires at its first bytes (or
    its end), ``done`` with the whole body and whether it ended cleanly."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.first: Deferred[None] = Deferred()
        self.done: Deferred[tuple[bytes, bool]] = Deferred()
        self.reason: Failure | None = None

    def dataReceived(self, data: bytes) -> None:
        self.parts.append(data)
        if not self.first.called:
            self.first.callback(None)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        # Not twisted.web.client.readBody: it warns (DeprecationWarning) when a
        # body that already arrived is delivered through a proxy transport.
        self.reason = reason
        if not self.first.called:
            self.first.callback(None)
        self.done.callback((b"".join(self.parts), bool(reason.check(ResponseDone))))


def read_body(response: Any) -> Deferred[bytes]:
    """The whole body of ``response``; fails with the reason if it did not end cleanly."""
    body = IncomingBody()
    response.deliverBody(body)

    def whole(result: tuple[bytes, bool]) -> bytes | Failure:
        data, clean = result
        if clean:
            return data
        assert body.reason is not None
        return body.reason

    return body.done.addCallback(whole)


def post_json(agent: Any, url: str, key: str, body: bytes) -> Deferred[IResponse]:
    """POST ``body`` as JSON to ``url`` with a bearer ``key``."""
    producer: Any = FileBodyProducer(BytesIO(body), readSize=len(body))
    headers = Headers(
        {b"authorization": [b"Bearer " + key.encode()], b"content-type": [b"application/json"]}
    )
    result: Deferred[IResponse] = agent.request(b"POST", url.encode(), headers, producer)
    return result
