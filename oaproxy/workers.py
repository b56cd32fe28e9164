"""Several oaproxy processes on one port: ``workers: N`` (or ``--workers N``).

The parent process serves no request.  It binds the listeners (or takes
those systemd handed it), starts N children - each a whole oaproxy, run by
twistd like the parent - and hands each the sockets as inherited
descriptors, which the child adopts (``reactor.adoptStreamPort``) instead of
binding.  A TCP listener is bound once per child with ``SO_REUSEPORT``, so
that the kernel spreads new connections over the children evenly; a UNIX
or systemd socket is one, shared by all.  The parent keeps every socket open
for as long as it runs: connections that come while a child restarts wait in
its backlog instead of being refused.

A child that ends is started again (after 0.5 s, doubling to 30 s while
it keeps dying young; logged).  SIGHUP is passed on to every child (each
reloads its config); SIGTERM too, and the parent ends once every child has
drained its requests and flushed its records (killed after
``shutdown_timeout`` and a minute more).

Each child knows its slot (1..N) from ``OAPROXY_WORKER`` and its sockets from
``OAPROXY_WORKER_LISTENERS``; what must not be shared between processes -
the records file, the spool - it keeps per slot (``worker_records_policy``).
What they must share without a store to share it through - the secret the
dashboard signs its sessions with - the parent gives them all alike
(``OAPROXY_WORKER_SESSION_SECRET``).
"""

from __future__ import annotations

import ctypes
import json
import os
import secrets
import signal
import socket
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs
from attrs import frozen
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import AdoptedStreamServerEndpoint, serverFromString
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from oaproxy.config import ConfigError, RecordsPolicy
from oaproxy.config.listen import split_endpoint

#: The child's slot, 1..N.
SLOT_VARIABLE = "OAPROXY_WORKER"
#: The child's sockets: JSON ``{endpoint: [descriptor, family]}``.
LISTENERS_VARIABLE = "OAPROXY_WORKER_LISTENERS"
#: The parent's pid: a worker whose parent is gone stops.
PARENT_VARIABLE = "OAPROXY_WORKER_PARENT"
#: A random value of the parent's, the same for every child: what the
#: dashboard signs its sessions with when no SQL store holds one.
SESSION_SECRET_VARIABLE = "OAPROXY_WORKER_SESSION_SECRET"

#: Restart delays of a child that keeps dying: from MIN, doubling, up to MAX;
#: one that lived STABLE seconds starts over from MIN.
MIN_RESTART_DELAY = 0.5
MAX_RESTART_DELAY = 30.0
STABLE_SECONDS = 30.0
#: After SIGTERM, how much longer than shutdown_timeout children get to
#: flush their records before they are killed.
FLUSH_GRACE = 60.0

# The first descriptor a child gets its sockets on (after stdin, out, err).
_FIRST_FD = 3
_FAMILIES = {"INET": socket.AF_INET, "INET6": socket.AF_INET6, "UNIX": socket.AF_UNIX}
_TWISTD = "from twisted.scripts.twistd import run; run()"
_PR_SET_PDEATHSIG = 1
_log = Logger()


@frozen
class InheritedListener:
    """A listening socket a worker got from its parent: descriptor and family."""

    fd: int
    family: str  # a key of _FAMILIES

    def endpoint(self, reactor: Any) -> AdoptedStreamServerEndpoint:
        """The endpoint that adopts it (once: it closes ``fd`` then)."""
        return AdoptedStreamServerEndpoint(reactor, self.fd, _FAMILIES[self.family])


def inherited_listeners(environ: Mapping[str, str]) -> dict[str, InheritedListener]:
    """What this process's parent handed it, by endpoint; empty unless a worker."""
    text = environ.get(LISTENERS_VARIABLE)
    if not text:
        return {}
    return {
        endpoint: InheritedListener(int(fd), str(family))
        for endpoint, (fd, family) in json.loads(text).items()
    }


def worker_slot(environ: Mapping[str, str]) -> int | None:
    """This process's slot among the workers; None unless it is one."""
    text = environ.get(SLOT_VARIABLE)
    return int(text) if text else None


def follow_parent(environ: Mapping[str, str]) -> None:
    """In a worker: be sent SIGTERM when the parent dies, even by SIGKILL
    (Linux's ``PR_SET_PDEATHSIG``), so that no worker outlives it serving a
    port nobody supervises; one whose parent is gone already stops now.

    A process group of its own, too: a terminal's Ctrl-C reaches the parent
    alone, which passes SIGTERM on, rather than each worker twice.
    """
    parent = environ.get(PARENT_VARIABLE)
    if not parent:
        return
    os.setpgid(0, 0)
    # Its log lines mingle with its siblings': this one says which is which.
    _log.info(
        "worker {slot} of oaproxy {parent} runs as pid {pid}",
        slot=worker_slot(environ),
        parent=parent,
        pid=os.getpid(),
    )
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        # Not Linux: a stopped parent still sends SIGTERM itself.
        pass
    if os.getppid() != int(parent):
        os.kill(os.getpid(), signal.SIGTERM)


def worker_records_policy(policy: RecordsPolicy, slot: int | None) -> RecordsPolicy:
    """The records policy as worker ``slot`` follows it: its own spool
    directory and records file (two processes must not append to one
    rotating file, nor replay one spool), ``spool/worker1`` and
    ``records.worker1.jsonl``.  Unchanged outside workers."""
    if slot is None:
        return policy
    name = f"worker{slot}"
    records_file = policy.file
    if records_file:
        stem, extension = os.path.splitext(records_file)
        records_file = f"{stem}.{name}{extension}"
    return attrs.evolve(policy, spool_dir=os.path.join(policy.spool_dir, name), file=records_file)


@frozen
class BoundListener:
    """One listen endpoint as the parent holds it: a socket per child
    (``SO_REUSEPORT``), or one socket all the children share."""

    endpoint: str
    family: str
    sockets: tuple[socket.socket, ...]

    def for_child(self, index: int) -> socket.socket:
        return self.sockets[index % len(self.sockets)]

    def close(self) -> None:
        for each in self.sockets:
            each.close()


def bind_listeners(
    reactor: Any, endpoints: Sequence[str], count: int, path: str
) -> list[BoundListener]:
    """Bind ``endpoints`` for ``count`` children; a ``ConfigError`` (of the
    config file ``path``) for one that workers cannot share, an ``OSError``
    for one that cannot be bound."""
    bound: list[BoundListener] = []
    try:
        for endpoint in endpoints:
            bound.append(_bind(reactor, endpoint, count, path))
    except BaseException:
        for listener in bound:
            listener.close()
        raise
    return bound


def _bind(reactor: Any, endpoint: str, count: int, path: str) -> BoundListener:
    args, kwargs = split_endpoint(endpoint)
    kind = args[0]
    backlog = int(kwargs.get("backlog", "50"))
    if kind in ("tcp", "tcp6"):
        port = int(args[1] if len(args) > 1 else kwargs["port"])
        family = "INET" if kind == "tcp" else "INET6"
        interface = kwargs.get("interface", "" if kind == "tcp" else "::")
        sockets: list[socket.socket] = []
        try:
            for _ in range(count):
                sockets.append(_tcp_socket(_FAMILIES[family], interface, port, backlog))
                # Port 0: the others take the port the first one was given.
                port = sockets[0].getsockname()[1]
        except BaseException:
            for each in sockets:
                each.close()
            raise
        return BoundListener(endpoint, family, tuple(sockets))
    if kind == "unix":
        address = args[1] if len(args) > 1 else kwargs["address"]
        return BoundListener(endpoint, "UNIX", (_unix_socket(address, kwargs, backlog),))
    if kind == "systemd":
        # Twisted took the descriptors from LISTEN_FDS when it was imported.
        adopted = serverFromString(reactor, endpoint)
        assert isinstance(adopted, AdoptedStreamServerEndpoint)
        family = socket.AddressFamily(adopted.addressFamily).name.removeprefix("AF_")
        shared = socket.socket(fileno=os.dup(adopted.fileno))
        return BoundListener(endpoint, family, (shared,))
    raise ConfigError(
        path,
        None,
        "workers",
        f"{endpoint}: workers share tcp:, tcp6:, unix: and systemd: listeners only"
        " (terminate TLS in front of oaproxy)",
    )


def _tcp_socket(family: int, interface: str, port: int, backlog: int) -> socket.socket:
    listener = socket.socket(family, socket.SOCK_STREAM)

    def bind() -> None:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        listener.bind((interface, port))

    return _listening(listener, bind, backlog)


def _unix_socket(address: str, options: Mapping[str, str], backlog: int) -> socket.socket:
    if os.path.exists(address):
        # A socket file left by a process that is gone; one that still
        # answers is someone's, and in use.
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(address)
        except OSError:
            os.unlink(address)
        else:
            raise OSError(f"{address}: address in use")
        finally:
            probe.close()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)

    def bind() -> None:
        listener.bind(address)
        os.chmod(address, int(options.get("mode", "666"), 8))

    return _listening(listener, bind, backlog)


def _listening(listener: socket.socket, bind: Callable[[], None], backlog: int) -> socket.socket:
    """``listener`` bound (by ``bind``), listening and non-blocking; closed
    again if any of that fails."""
    try:
        bind()
        listener.listen(backlog)
        listener.setblocking(False)
    except BaseException:
        listener.close()
        raise
    return listener


class _Worker(ProcessProtocol):
    """One child process: the supervisor hears of its end."""

    def __init__(self, supervisor: WorkerSupervisor, slot: int, started: float) -> None:
        self.supervisor = supervisor
        self.slot = slot
        self.started = started
        self.process: Any = None
        # Kept: the process forgets its pid once it has ended.
        self.pid: int | None = None

    def processEnded(self, reason: Failure) -> None:
        self.supervisor.worker_ended(self, reason)


class WorkerSupervisor(Service):
    """The parent of ``count`` oaproxy workers on ``listen``.

    ``arguments`` are the oaproxy options each child is started with
    (``--config``, ``--listen``…: ``--workers 1`` is added); ``environ`` is
    the environment they get, with their slot and sockets added.
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        *,
        count: int,
        listen: Sequence[str],
        arguments: Sequence[str],
        config_path: str,
        shutdown_timeout: float,
        environ: Mapping[str, str],
        signals: bool = True,
    ) -> None:
        self._reactor = reactor
        self.count = count
        self.listen = tuple(listen)
        self._arguments = tuple(arguments)
        self._config_path = config_path
        self._kill_after = shutdown_timeout + FLUSH_GRACE
        self._environ = {
            name: value
            for name, value in environ.items()
            # systemd's, meant for this process alone.
            if name not in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES")
        }
        # One for the parent's whole life: a restarted child keeps the sessions.
        self._environ[SESSION_SECRET_VARIABLE] = secrets.token_hex(32)
        self._signals = signals
        self._previous_hup: Any = None
        self._listeners: list[BoundListener] = []
        self.workers: dict[int, _Worker] = {}
        # Restarts in a row of each slot's child that died young.
        self._failures: dict[int, int] = {}
        self._restarts: dict[int, Any] = {}
        self._stopping = False
        self._all_ended: Deferred[None] | None = None

    @property
    def pids(self) -> list[int]:
        """The pids of the children running now."""
        return [pid for worker in self.workers.values() if (pid := worker.pid) is not None]

    def bind(self) -> None:
        """Bind the listeners (before the reactor runs: twistd's caller sees
        a ``ConfigError`` or ``OSError`` at once)."""
        if not self._listeners:
            self._listeners = bind_listeners(
                self._reactor, self.listen, self.count, self._config_path
            )

    def startService(self) -> None:
        super().startService()
        self.bind()
        if self._signals:
            self._previous_hup = signal.signal(signal.SIGHUP, self._on_sighup)
        for slot in range(1, self.count + 1):
            self._spawn(slot)
        self.log.info(
            "oaproxy started {count} workers on {listen}: pids {pids}",
            count=self.count,
            listen=", ".join(self.listen),
            pids=" ".join(str(pid) for pid in self.pids),
        )

    def _spawn(self, slot: int) -> None:
        self._restarts.pop(slot, None)
        child_fds: dict[int, Any] = {0: 0, 1: 1, 2: 2}
        inherited: dict[str, tuple[int, str]] = {}
        for offset, listener in enumerate(self._listeners):
            fd = _FIRST_FD + offset
            child_fds[fd] = listener.for_child(slot - 1).fileno()
            inherited[listener.endpoint] = (fd, listener.family)
        environ = dict(self._environ)
        environ[SLOT_VARIABLE] = str(slot)
        environ[LISTENERS_VARIABLE] = json.dumps(inherited)
        environ[PARENT_VARIABLE] = str(os.getpid())
        command = [
            sys.executable,
            "-c",
            _TWISTD,
            "-n",
            "--pidfile=",
            "oaproxy",
            *self._arguments,
            "--workers",
            "1",
        ]
        worker = _Worker(self, slot, self._reactor.seconds())
        worker.process = self._reactor.spawnProcess(
            worker, sys.executable, command, env=environ, childFDs=child_fds
        )
        worker.pid = worker.process.pid
        self.workers[slot] = worker

    def worker_ended(self, worker: _Worker, reason: Failure) -> None:
        if self.workers.get(worker.slot) is worker:
            del self.workers[worker.slot]
        how = _how_it_ended(reason)
        if self._stopping:
            self.log.info(
                "worker {slot} (pid {pid}) ended: {how}",
                slot=worker.slot,
                pid=worker.pid,
                how=how,
            )
            if not self.workers and self._all_ended is not None:
                done, self._all_ended = self._all_ended, None
                done.callback(None)
            return
        lived = self._reactor.seconds() - worker.started
        failures = 0 if lived >= STABLE_SECONDS else self._failures.get(worker.slot, 0)
        delay = min(MAX_RESTART_DELAY, MIN_RESTART_DELAY * 2**failures)
        self._failures[worker.slot] = failures + 1
        self.log.error(
            "worker {slot} (pid {pid}) ended after {lived:.1f}s: {how}; restarting it in {delay}s",
            slot=worker.slot,
            pid=worker.pid,
            lived=lived,
            how=how,
            delay=delay,
        )
        self._restarts[worker.slot] = self._reactor.callLater(delay, self._spawn, worker.slot)

    def _on_sighup(self, signum: int, frame: Any) -> None:
        self._reactor.callFromThread(self._forward, "HUP")

    def _forward(self, name: str) -> None:
        self.log.info(
            "SIG{name}: passed on to workers {pids}",
            name=name,
            pids=" ".join(str(pid) for pid in self.pids),
        )
        for worker in list(self.workers.values()):
            try:
                worker.process.signalProcess(name)
            except Exception:  # noqa: BLE001 - it ended meanwhile: processEnded follows
                pass

    def stopService(self) -> Deferred[None]:
        super().stopService()
        self._stopping = True
        if self._signals and self._previous_hup is not None:
            signal.signal(signal.SIGHUP, self._previous_hup)
        for call in self._restarts.values():
            if call.active():
                call.cancel()
        self._restarts.clear()
        done: Deferred[None] = Deferred()
        if self.workers:
            self._all_ended = done
            self._forward("TERM")
            killing = self._reactor.callLater(self._kill_after, self._kill_all)
            done.addBoth(lambda result: killing.cancel() if killing.active() else None)
        else:
            done.callback(None)
        done.addBoth(lambda _: self._close_listeners())
        return done

    def _kill_all(self) -> None:
        self.log.error(
            "workers still running after {seconds}s: killing them", seconds=self._kill_after
        )
        self._forward("KILL")

    def _close_listeners(self) -> None:
        listeners, self._listeners = self._listeners, []
        for listener in listeners:
            listener.close()


def _how_it_ended(reason: Failure) -> str:
    error = reason.value
    if isinstance(error, ProcessDone):
        return "exit status 0"
    if isinstance(error, ProcessTerminated):
        if error.signal is not None:
            return f"killed by signal {error.signal}"
        return f"exit status {error.exitCode}"
    return reason.getErrorMessage()
