"""The child processes of a benchmark run, and what is read from them.

Shared by ``run.py``, ``soak.py`` and ``cache_rows.py``: starting children
(pinned to a core with ``taskset`` when asked and available, stopped in
reverse order whatever happens, and on Linux even when the parent is
killed), waiting until they answer, and reading their CPU time and RSS
from ``/proc``. Everything listens and connects on 127.0.0.1 only.
"""

from __future__ import annotations

import ctypes
import http.client
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
CLIENT_KEY = "sk-bench-client-0123456789"
UPSTREAM_KEY = "sk-bench-upstream-0123456789"
PATH = "/v1/chat/completions"

# Bounded waits: a child that never comes up fails the run, never hangs it.
READY_TRIES = 150
READY_INTERVAL = 0.1
STOP_GRACE = 10.0
# <linux/prctl.h>
PR_SET_PDEATHSIG = 1


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def twistd_path() -> str:
    """The ``twistd`` installed next to this interpreter (same virtualenv)."""
    candidate = Path(sys.executable).parent / "twistd"
    if not candidate.exists():
        raise SystemExit(
            f"bench: no twistd beside {sys.executable}; install oaproxy in that environment"
        )
    return str(candidate)


def oaproxy_argv(config: Path, port: int) -> list[str]:
    """The ``twistd`` command of an oaproxy on ``config``, on 127.0.0.1:``port``
    (a backlog for a thousand connections opened at once)."""
    return [
        twistd_path(),
        "-n",
        "--pidfile=",
        "oaproxy",
        "--config",
        str(config),
        "--listen",
        f"tcp:{port}:interface=127.0.0.1:backlog=4096",
    ]


def run_driver(argv: list[str], timeout: float) -> dict[str, Any]:
    """Run a driver (``load.py``, ``streams.py``: its full command) to its
    end, bounded by ``timeout``; the one JSON object it prints."""
    done = subprocess.run(
        argv, check=False, capture_output=True, timeout=timeout, preexec_fn=die_with_parent
    )
    try:
        result: dict[str, Any] = json.loads(done.stdout)
    except ValueError:
        raise SystemExit(
            f"bench: {' '.join(argv[:3])} failed ({done.returncode}):"
            f" {done.stderr.decode(errors='replace')}"
        ) from None
    return result


def raise_open_files() -> None:
    """Raise this process's descriptor limit to its hard limit: thousands of
    streams need thousands of sockets, and children inherit the limit."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def die_with_parent() -> None:
    """In the child: SIGTERM when the parent dies, even by SIGKILL (Linux only)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass  # elsewhere the children are still stopped on every normal exit


def pinned(core: int | None) -> list[str]:
    """The ``taskset`` prefix that keeps a child on ``core`` (none without taskset)."""
    if core is None or shutil.which("taskset") is None:
        return []
    return ["taskset", "-c", str(core)]


class Children:
    """The processes a run started, stopped in reverse order whatever happens."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(
        self, argv: list[str], core: int | None = None, **kwargs: Any
    ) -> subprocess.Popen[bytes]:
        # The runs start no threads, so preexec_fn is safe here.
        proc = subprocess.Popen(pinned(core) + argv, preexec_fn=die_with_parent, **kwargs)
        self.procs.append(proc)
        return proc

    def start_listening(
        self, argv: list[str], core: int | None = None, **kwargs: Any
    ) -> tuple[subprocess.Popen[bytes], int]:
        """Start a child that prints ``listening 127.0.0.1:PORT`` once it
        accepts connections; return it and its port."""
        proc = self.start(argv, core, stdout=subprocess.PIPE, **kwargs)
        assert proc.stdout is not None
        # readline is bounded by the child's exit.
        line = proc.stdout.readline().decode().strip()
        if not line.startswith("listening 127.0.0.1:"):
            raise SystemExit(f"bench: {' '.join(argv[:2])} did not start (said {line!r})")
        return proc, int(line.rsplit(":", 1)[1])

    def stop(self, proc: subprocess.Popen[bytes]) -> None:
        """Stop one child now (SIGTERM, then SIGKILL after a grace)."""
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_GRACE)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc in self.procs:
            self.procs.remove(proc)

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE
        for proc in reversed(self.procs):
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs.clear()


def start_fake_upstream(
    children: Children,
    chunks: int,
    max_seconds: float,
    delay_ms: float = 0.0,
    core: int | None = None,
    more: tuple[str, ...] = (),
) -> tuple[subprocess.Popen[bytes], int]:
    """``fake_upstream.py`` on a free port; ``more`` are further arguments."""
    argv = [
        sys.executable,
        str(HERE / "fake_upstream.py"),
        "--port",
        "0",
        "--chunks",
        str(chunks),
        "--max-seconds",
        str(max_seconds),
        "--delay-ms",
        str(delay_ms),
        *more,
    ]
    return children.start_listening(argv, core)


def wait_ready(port: int, proc: subprocess.Popen[bytes], log: Path, path: str = "/healthz") -> None:
    """Until ``GET path`` answers (any status below 500) or ``proc`` exits."""
    for _ in range(READY_TRIES):
        if proc.poll() is not None:
            raise SystemExit(f"bench: a server exited with {proc.returncode}:\n{tail(log)}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            conn.request("GET", path)
            status = conn.getresponse().status
            conn.close()
            if status < 500:
                return
        except OSError:
            pass
        time.sleep(READY_INTERVAL)
    raise SystemExit(f"bench: a server not ready after {READY_TRIES} tries:\n{tail(log)}")


def tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def cpu_seconds(pid: int) -> float | None:
    """User and system CPU time a process used so far (Linux)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    # utime and stime: fields 14 and 15 of proc(5), counted after "(comm)".
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(pid: int) -> float | None:
    """``cpu_seconds`` of ``pid`` and its live children (nginx's and
    uvicorn's workers), so a server that forks is measured whole."""
    total = cpu_seconds(pid)
    if total is None:
        return None
    for child in _children(pid):
        total += cpu_seconds(child) or 0.0
    return total


def rss_kib(pid: int) -> int | None:
    """The resident set of ``pid`` and its live children, in KiB."""
    total = _own_rss(pid)
    if total is None:
        return None
    for child in _children(pid):
        total += _own_rss(child) or 0
    return total


def _own_rss(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _children(pid: int) -> list[int]:
    """Every descendant of ``pid`` (taskset execs in place, so the pid is the server's)."""
    found: list[int] = []
    todo = [pid]
    while todo:
        parent = todo.pop()
        try:
            text = Path(f"/proc/{parent}/task/{parent}/children").read_text()
        except OSError:
            continue
        kids = [int(p) for p in text.split()]
        found += kids
        todo += kids
    return found


def fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def ratio(a: float | None, b: float | None) -> float | None:
    return None if not a or not b else a / b


def minus(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def interrupt(signum: int, frame: Any) -> None:
    """SIGTERM (e.g. from a CI timeout) takes the same way out as Ctrl-C."""
    raise KeyboardInterrupt


def with_children(name: str, run: Callable[[Children, Path], int]) -> int:
    """``run(children, directory)`` in a temporary directory; every child it
    started is stopped at the end, on an error, on Ctrl-C and on SIGTERM
    (exit status 130 then)."""
    raise_open_files()
    children = Children()
    signal.signal(signal.SIGTERM, interrupt)
    try:
        with tempfile.TemporaryDirectory(prefix=f"oaproxy-{name}-") as tmp:
            try:
                return run(children, Path(tmp))
            finally:
                # Before the directory goes: the servers may still write there.
                children.stop_all()
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        return 130
