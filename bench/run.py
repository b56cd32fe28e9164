"""One command: direct-to-upstream versus through oaproxy, non-stream and stream.

    python bench/run.py [--requests N] [--concurrency C] [--chunks K]
                        [--limits [--redis URL]]

It starts the fake upstream (``bench/fake_upstream.py``) and oaproxy through
the real ``twistd`` of the same virtualenv as ``sys.executable``, on loopback
ports, with a temporary config (``dbtype: none``, one client key, one
upstream: the fake; records policy left at its defaults). Once ``/healthz``
answers it runs ``bench/load.py`` four times and prints a table. Children are
stopped at the end, on an error and on Ctrl-C. All traffic stays on 127.0.0.1.

With ``--limits`` it also measures what the limiter costs on the hot path:
the same load through two more oaproxy processes whose every request passes
a global, a per-key and a per-token limit (set high enough never to refuse),
one keeping its counters in memory, one in Redis (``--redis``, default
``redis://127.0.0.1:6379/0``, under a key prefix of its own; the keys expire
with their one-minute windows).

The machine may be noisy: compare the ratios within one run, not absolute
numbers across runs.
"""

from __future__ import annotations

import argparse
import ctypes
import http.client
import json
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
CLIENT_KEY = "sk-bench-client-0123456789"
UPSTREAM_KEY = "sk-bench-upstream-0123456789"
PATH = "/v1/chat/completions"

# Bounded waits: a child that never comes up fails the run, never hangs it.
READY_TRIES = 100
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


def _die_with_parent() -> None:
    """In the child: SIGTERM when run.py dies, even by SIGKILL (Linux only)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass  # elsewhere the children are still stopped on every normal exit


class Children:
    """The processes this run started, stopped in reverse order whatever happens."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, argv: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        # run.py starts no threads, so preexec_fn is safe here.
        proc = subprocess.Popen(argv, preexec_fn=_die_with_parent, **kwargs)
        self.procs.append(proc)
        return proc

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
    children: Children, chunks: int, max_seconds: float
) -> tuple[subprocess.Popen[bytes], int]:
    proc = children.start(
        [
            sys.executable,
            str(HERE / "fake_upstream.py"),
            "--port",
            "0",
            "--chunks",
            str(chunks),
            "--max-seconds",
            str(max_seconds),
        ],
        stdout=subprocess.PIPE,
    )
    assert proc.stdout is not None
    # The fake prints its port once it listens; readline is bounded by its exit.
    line = proc.stdout.readline().decode().strip()
    if not line.startswith("listening 127.0.0.1:"):
        raise SystemExit(f"bench: the fake upstream did not start (said {line!r})")
    return proc, int(line.rsplit(":", 1)[1])


# Every request passes all three (and a token reservation settled by the
# answer's usage); none of them ever refuses.
LIMITS = (
    "limits:\n"
    "  backend: {backend}\n"
    '  global: "100000000/minute"\n'
    '  per_key: "100000000/minute"\n'
    '  tokens_per_key: "100000000000/minute"\n'
)


def write_config(directory: Path, upstream_port: int, extra: str = "") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "config.yaml"
    path.write_text(
        "# Written by bench/run.py for one run.\n"
        f"authorization:\n  bench: {CLIENT_KEY}\n"
        "dbtype: none\n"
        "upstreams:\n"
        "  - name: fake\n"
        f"    endpoint: http://127.0.0.1:{upstream_port}/v1\n"
        f"    sk: {UPSTREAM_KEY}\n" + extra
    )
    return path


def limits_config(backend: str, redis_url: str) -> str:
    text = LIMITS.format(backend=backend)
    if backend == "redis":
        # A prefix of its own: nothing of another run (or deployment) is counted.
        text += f"redis: {redis_url}\nredis_prefix: 'oaproxy-bench:{uuid.uuid4().hex}:'\n"
    return text


def start_proxy(
    children: Children, directory: Path, config: Path
) -> tuple[subprocess.Popen[bytes], int, Path]:
    port = free_port()
    log = directory / "twistd.log"
    with log.open("wb") as log_file:
        proxy = children.start(
            [
                twistd_path(),
                "-n",
                "--pidfile=",
                "oaproxy",
                "--config",
                str(config),
                "--listen",
                f"tcp:{port}:interface=127.0.0.1",
            ],
            cwd=directory,  # anything relative (./log, spools) lands in the temp dir
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    wait_ready(port, proxy, log)
    return proxy, port, log


def wait_limited(port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    """Until answers carry the limiter's headers: its Redis connection is up
    (before that, on_backend_error: open serves without counting)."""
    body = json.dumps({"model": "bench", "messages": [{"role": "user", "content": "hi"}]})
    for _ in range(READY_TRIES):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        headers = {"Authorization": f"Bearer {CLIENT_KEY}", "Content-Type": "application/json"}
        conn.request("POST", PATH, body, headers)
        response = conn.getresponse()
        response.read()
        conn.close()
        if response.getheader("x-ratelimit-limit-requests"):
            return
        time.sleep(READY_INTERVAL)
    raise SystemExit(f"bench: the limiter never answered (is Redis up?):\n{tail(log)}")


def wait_ready(port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    for _ in range(READY_TRIES):
        if proc.poll() is not None:
            raise SystemExit(f"bench: oaproxy exited with {proc.returncode}:\n{tail(log)}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            conn.request("GET", "/healthz")
            if conn.getresponse().status == 200:
                conn.close()
                return
            conn.close()
        except OSError:
            pass
        time.sleep(READY_INTERVAL)
    raise SystemExit(f"bench: oaproxy not ready after {READY_TRIES} tries:\n{tail(log)}")


def tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def rss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def load(port: int, *, stream: bool, args: argparse.Namespace, key: str | None) -> dict[str, Any]:
    argv = [
        sys.executable,
        str(HERE / "load.py"),
        "--url",
        f"http://127.0.0.1:{port}{PATH}",
        "--requests",
        str(args.requests),
        "--concurrency",
        str(args.concurrency),
        "--max-seconds",
        str(args.max_seconds),
    ]
    if stream:
        argv.append("--stream")
    if key:
        argv += ["--key", key]
    # Bounded twice: the driver stops itself, and is killed a little later.
    done = subprocess.run(
        argv,
        check=False,
        capture_output=True,
        timeout=args.max_seconds + 30,
        preexec_fn=_die_with_parent,
    )
    try:
        result: dict[str, Any] = json.loads(done.stdout)
    except ValueError:
        raise SystemExit(
            f"bench: the load driver failed ({done.returncode}): {done.stderr.decode(errors='replace')}"
        ) from None
    return result


def fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def report(results: dict[str, dict[str, Any]], rss: dict[str, int | None]) -> str:
    rows = [
        (
            "scenario",
            "req/s",
            "p50 ms",
            "p90 ms",
            "p99 ms",
            "ttfb p50",
            "errors",
            "driver cpu",
        )
    ]
    for name, r in results.items():
        latency = r["latency_ms"]
        ttfb = r.get("ttfb_ms", {}).get("p50")
        errors = str(r["errors"]) + (" (stopped early)" if r["stopped_early"] else "")
        rows.append(
            (
                name,
                fmt(r["rps"], 0),
                fmt(latency["p50"]),
                fmt(latency["p90"]),
                fmt(latency["p99"]),
                fmt(ttfb),
                errors,
                fmt(r["driver_cpu"]),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(
            cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths))
        )
        for row in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append("")
    for mode in ("non-stream", "stream"):
        direct = results[f"direct {mode}"]
        proxied = results[f"oaproxy {mode}"]
        added = _minus(proxied["latency_ms"]["p50"], direct["latency_ms"]["p50"])
        added99 = _minus(proxied["latency_ms"]["p99"], direct["latency_ms"]["p99"])
        ratio = proxied["rps"] / direct["rps"] if direct["rps"] and proxied["rps"] else None
        lines.append(
            f"{mode:<10}  added latency p50 {fmt(added)} ms, p99 {fmt(added99)} ms;"
            f" oaproxy/direct rate {fmt(ratio, 3)}"
        )
    for mode in ("non-stream", "stream"):
        plain = results[f"oaproxy {mode}"]
        for backend in ("memory", "redis"):
            limited = results.get(f"oaproxy {mode}, limits in {backend}")
            if limited is None:
                continue
            added = _minus(limited["latency_ms"]["p50"], plain["latency_ms"]["p50"])
            added99 = _minus(limited["latency_ms"]["p99"], plain["latency_ms"]["p99"])
            ratio = limited["rps"] / plain["rps"] if plain["rps"] and limited["rps"] else None
            lines.append(
                f"{mode:<10}  limits in {backend:<6}: added latency p50 {fmt(added)} ms,"
                f" p99 {fmt(added99)} ms; limited/unlimited rate {fmt(ratio, 3)}"
            )
    for name, kib in rss.items():
        lines.append(f"oaproxy RSS {name}: {kib or '?'} KiB")
    return "\n".join(lines)


def _minus(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="oaproxy benchmark: direct versus proxied")
    parser.add_argument("--requests", type=int, default=3000, help="measured requests per scenario")
    parser.add_argument("--concurrency", type=int, default=16, help="keep-alive client connections")
    parser.add_argument(
        "--chunks", type=int, default=20, help="SSE content chunks per stream answer"
    )
    parser.add_argument(
        "--max-seconds", type=float, default=20.0, help="cap on each scenario's run"
    )
    parser.add_argument(
        "--limits",
        action="store_true",
        help="also measure the limiter: counters in memory and in Redis",
    )
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0", help="the Redis of --limits")
    parser.add_argument("--json", action="store_true", help="also print the raw results as JSON")
    args = parser.parse_args(argv)

    children = Children()
    # SIGTERM (e.g. from a CI timeout) takes the same way out as Ctrl-C.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        with tempfile.TemporaryDirectory(prefix="oaproxy-bench-") as tmp:
            try:
                return run(args, children, Path(tmp))
            finally:
                # Before the temp dir goes: twistd may still write its log there.
                children.stop_all()
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        return 130


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def run(args: argparse.Namespace, children: Children, directory: Path) -> int:
    # The children outlive no run: the fake stops itself after the longest one could take.
    runs = 8 if args.limits else 4
    lifetime = runs * (args.max_seconds + 30) + 60
    _fake, upstream_port = start_fake_upstream(children, args.chunks, lifetime)
    plain = directory / "plain"
    proxy, proxy_port, log = start_proxy(children, plain, write_config(plain, upstream_port))
    rss = {"after start": rss_kib(proxy.pid)}
    print(
        f"fake upstream 127.0.0.1:{upstream_port}, oaproxy 127.0.0.1:{proxy_port} (pid {proxy.pid}); "
        f"{args.requests} requests x {args.concurrency} connections, {args.chunks} chunks per stream",
        flush=True,
    )
    # (where, what, port, key): the load is sent to port as "{where} {mode}{what}".
    targets: list[tuple[str, str, int, str | None]] = [
        ("direct", "", upstream_port, None),
        ("oaproxy", "", proxy_port, CLIENT_KEY),
    ]
    limited: list[tuple[str, subprocess.Popen[bytes], Path]] = []
    if args.limits:
        for backend in ("memory", "redis"):
            backend_dir = directory / backend
            config = write_config(backend_dir, upstream_port, limits_config(backend, args.redis))
            process, port, backend_log = start_proxy(children, backend_dir, config)
            wait_limited(port, process, backend_log)
            targets.append(("oaproxy", f", limits in {backend}", port, CLIENT_KEY))
            limited.append((backend, process, backend_log))
    results: dict[str, dict[str, Any]] = {}
    for mode, stream in (("non-stream", False), ("stream", True)):
        for where, what, port, key in targets:
            name = f"{where} {mode}{what}"
            print(f"  running {name} ...", file=sys.stderr, flush=True)
            results[name] = load(port, stream=stream, args=args, key=key)
    rss["after the run"] = rss_kib(proxy.pid)
    for backend, process, backend_log in limited:
        rss[f"after the run, limits in {backend}"] = rss_kib(process.pid)
        if process.poll() is not None:
            raise SystemExit(f"bench: oaproxy died during the run:\n{tail(backend_log)}")
    if proxy.poll() is not None:
        raise SystemExit(f"bench: oaproxy died during the run:\n{tail(log)}")
    print(report(results, rss))
    if args.json:
        print(json.dumps({"results": results, "rss_kib": rss}, indent=2))
    failed = any(r["errors"] or not r["requests"] for r in results.values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
