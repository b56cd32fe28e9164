"""The benchmark of issue 12: oaproxy against the floor and the alternative.

    python bench/run.py [--quick] [--rounds 2] [--json] [--only CASE ...]

One command, one table. Each case is a server in front of the same fast fake
upstream (``fake_upstream.py``), measured the same way, each round in a fresh
process:

``direct``        the fake itself (what the others add to)
``oaproxy``       as issue 12 configures it: client keys, two upstreams,
                  records to sqlite and to a file, metrics, the limiter (memory
                  backend, limits that never refuse), the response cache on for
                  every request (``default: true``) and missing (every request
                  differs)
``no-records``    the same without records (``dbtype: none``, no file)
``minimal``       ``minimal_proxy.py``: twisted.web and ``Agent``, the floor
``openai-fwd``    openai-forward (``uvicorn openai_forward.app:app``), from a
                  virtualenv of its own under the cache directory, made on the
                  first run (``pip install openai-forward``); left out, saying
                  so, when that fails
``nginx``         nginx as a keep-alive reverse proxy, when installed
``before``        with ``--before DIR``: the full case again, with the oaproxy of
                  the checkout DIR (say a worktree at main): a change's
                  before and after from one run

With ``taskset`` the server runs on core 0, the fake and the drivers on core 1.
Per case: ``load.py`` at 1, 16 and 64 keep-alive connections (requests/s,
latency; the server's CPU per request from ``/proc`` at 16), then
``streams.py``: SSE events per second with 1,000 streams open, and 1,000
paced streams (an event every 50 ms for 10 s) opened at once: median time to
the first event, the longest stream, and the server's RSS per open stream.
The table gives the median of the rounds; the targets below it are checked
from the same run, the rate ratios also by CPU per request (``cpu x minimal``:
the minimal proxy's CPU per request over the case's), which a shared machine
disturbs less than the rates. Children are stopped at the end, on an error and on
Ctrl-C; everything stays on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from profile import py_spy, record, summary
from typing import Any, NamedTuple

from procs import (
    CLIENT_KEY,
    HERE,
    PATH,
    UPSTREAM_KEY,
    Children,
    fmt,
    free_port,
    minus,
    oaproxy_argv,
    pinned,
    ratio,
    run_driver,
    start_fake_upstream,
    tail,
    tree_cpu_seconds,
    wait_ready,
    with_children,
)

SERVER_CORE = 0
DRIVER_CORE = 1
CONNECTIONS = (1, 16, 64)
STREAMS = 1000
PACED_SECONDS = 10.0
CASES = ("direct", "oaproxy", "no-records", "minimal", "openai-fwd", "nginx")

FULL_CONFIG = """\
# Written by bench/run.py: oaproxy as issue 12 measures it.
authorization:
  bench: {key}
dbtype: sqlite
dbaddr: ./records.sqlite
records:
  file: ./records.jsonl
  spool_dir: ./spool
limits:
  backend: memory
  global: "100000000/minute"
  per_key: "100000000/minute"
  tokens_per_key: "100000000000/minute"
cache:
  backend: memory
  default: true
upstreams:
  - name: fake-a
    endpoint: http://127.0.0.1:{port_a}/v1
    sk: {sk}
  - name: fake-b
    endpoint: http://127.0.0.1:{port_b}/v1
    sk: {sk}
"""

NO_RECORDS = (
    FULL_CONFIG.replace("dbtype: sqlite\ndbaddr: ./records.sqlite\n", "dbtype: none\n")
    .replace("  file: ./records.jsonl\n", "")
    .replace("as issue 12 measures it", "issue 12's, without records")
)

NGINX_CONFIG = """\
worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/nginx-error.log warn;
events {{ worker_connections 8192; }}
http {{
  access_log off;
  client_body_temp_path {dir}/nginx-body;
  proxy_temp_path {dir}/nginx-proxy;
  upstream fake {{ server 127.0.0.1:{upstream}; keepalive 128; }}
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    location / {{
      proxy_pass http://fake;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
      proxy_read_timeout 60s;
    }}
  }}
}}
"""


class Server(NamedTuple):
    port: int
    proc: subprocess.Popen[bytes] | None  # None: the fake itself
    key: str | None


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "oaproxy-bench"


def profile_path() -> Path:
    """Where ``--profile`` keeps py-spy's samples (kept after the run, for a
    flame graph): the raw stacks of the 16-connection load, and beside them
    (``.streams``) those of the 1,000-stream run."""
    where = cache_dir() / "profiles"
    where.mkdir(parents=True, exist_ok=True)
    return where / "oaproxy.pyspy"


def openai_forward_venv(say: Callable[[str], None]) -> Path | None:
    """The virtualenv with openai-forward and uvicorn, made once; None
    (said why) when it cannot be made."""
    venv = cache_dir() / "openai-forward"
    python = venv / "bin" / "python"
    ready = venv / "oaproxy-bench-ready"
    if ready.exists():
        return venv
    say(f"bench: installing openai-forward into {venv} (once) ...")
    try:
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
        subprocess.run(
            # openai-forward 0.8 imports yaml without depending on PyYAML.
            [str(python), "-m", "pip", "install", "-q", "openai-forward", "pyyaml", "uvicorn"],
            check=True,
            timeout=600,
            capture_output=True,
        )
    except (OSError, subprocess.SubprocessError) as e:
        say(f"bench: openai-forward left out: could not install it ({e})")
        return None
    ready.touch()
    return venv


class Starter:
    """Starts each case's server for a round, on the server core."""

    def __init__(
        self, children: Children, directory: Path, upstream: int, say: Callable[[str], None]
    ) -> None:
        self.children = children
        self.directory = directory
        self.upstream = upstream
        self.say = say
        self.nginx = shutil.which("nginx") or next(
            (p for p in ("/usr/sbin/nginx",) if Path(p).exists()), None
        )
        self.ofwd: Path | None = None
        self.before: Path | None = None

    def available(self, case: str) -> bool:
        if case == "nginx" and self.nginx is None:
            self.say("bench: nginx left out: not installed (apt-get install nginx-light)")
            return False
        if case == "openai-fwd":
            self.ofwd = self.ofwd or openai_forward_venv(self.say)
            return self.ofwd is not None
        return True

    def start(self, case: str, round_: int) -> Server:
        where = self.directory / f"{case}-{round_}"
        where.mkdir()
        log = where / "server.log"
        if case == "direct":
            return Server(self.upstream, None, None)
        if case in ("oaproxy", "no-records", "before"):
            text = NO_RECORDS if case == "no-records" else FULL_CONFIG
            config = where / "config.yaml"
            ports = {"port_a": self.upstream, "port_b": self.upstream}
            config.write_text(text.format(key=CLIENT_KEY, sk=UPSTREAM_KEY, **ports))
            port = free_port()
            argv = oaproxy_argv(config, port)
            env = None
            if case == "before":
                # Another checkout's oaproxy, with this virtualenv's packages.
                env = {**os.environ, "PYTHONPATH": str(self.before)}
            return self._serve(argv, where, log, port, CLIENT_KEY, env=env)
        if case == "minimal":
            upstream = f"http://127.0.0.1:{self.upstream}"
            argv = [sys.executable, str(HERE / "minimal_proxy.py"), "--upstream", upstream]
            proc, port = self.children.start_listening(argv, SERVER_CORE)
            return Server(port, proc, None)
        if case == "openai-fwd":
            assert self.ofwd is not None
            port = free_port()
            argv = [
                str(self.ofwd / "bin" / "uvicorn"),
                "openai_forward.app:app",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--backlog",
                "4096",
                "--log-level",
                "warning",
                "--no-access-log",
            ]
            env = {
                **os.environ,
                "FORWARD_CONFIG": json.dumps(
                    [
                        {
                            "base_url": f"http://127.0.0.1:{self.upstream}",
                            "route": "/",
                            "type": "openai",
                        }
                    ]
                ),
                "TIMEOUT": "60",
                "TZ": "UTC",
            }
            return self._serve(argv, where, log, port, CLIENT_KEY, env=env)
        assert case == "nginx" and self.nginx is not None
        port = free_port()
        config = where / "nginx.conf"
        config.write_text(NGINX_CONFIG.format(dir=where, upstream=self.upstream, port=port))
        argv = [self.nginx, "-p", str(where), "-c", str(config)]
        return self._serve(argv, where, log, port, None)

    def _serve(
        self,
        argv: list[str],
        where: Path,
        log: Path,
        port: int,
        key: str | None,
        env: dict[str, str] | None = None,
    ) -> Server:
        with log.open("wb") as out:
            proc = self.children.start(
                argv, SERVER_CORE, cwd=where, stdout=out, stderr=subprocess.STDOUT, env=env
            )
        wait_ready(port, proc, log)
        return Server(port, proc, key)


def drive(argv: list[str], timeout: float) -> dict[str, Any]:
    """Run a driver on the driver core; its one JSON line."""
    return run_driver(pinned(DRIVER_CORE) + [sys.executable, *argv], timeout)


def measure(server: Server, args: argparse.Namespace, profile: Path | None) -> dict[str, Any]:
    """Every figure of one case in one round; with ``profile``, py-spy's
    samples of the server during the 16-connection load go there (and
    those during the 1,000-stream rate run beside it, ``.streams``)."""
    url = f"http://127.0.0.1:{server.port}{PATH}"
    key = ["--key", server.key] if server.key else []
    pid = server.proc.pid if server.proc is not None else None
    figures: dict[str, Any] = {}
    for connections in CONNECTIONS:
        sampler = None
        if profile is not None and pid and connections == 16:
            sampler = record(pid, args.seconds, profile)
        before = tree_cpu_seconds(pid) if pid else None
        result = drive(
            [
                str(HERE / "load.py"),
                "--url",
                url,
                *key,
                "--unique",  # the cache looks every request up and misses
                "--requests",
                "10000000",
                "--concurrency",
                str(connections),
                "--max-seconds",
                str(args.seconds),
            ],
            args.seconds + 60,
        )
        after = tree_cpu_seconds(pid) if pid else None
        if sampler is not None:
            sampler.wait(timeout=60)
        sent = result["requests"] + result["warmup_requests"]
        if before is not None and after is not None and sent:
            result["server_cpu_us"] = (after - before) * 1e6 / sent
        figures[f"c{connections}"] = result
    streams = [str(HERE / "streams.py"), "--url", url, *key, "--streams", str(STREAMS)]
    # The paced streams first: their RSS growth is then not hidden in the
    # memory that the rate run would have left allocated.
    hold = [*streams, "--mode", "hold", "--stream-seconds", str(PACED_SECONDS)]
    figures["hold"] = drive([*hold, "--pid", str(pid or 0)], PACED_SECONDS + 120)
    sampler = None
    if profile is not None and pid:
        sampler = record(pid, args.seconds, profile.with_suffix(".streams"))
    figures["rate"] = drive([*streams, "--mode", "rate", "--seconds", str(args.seconds)], 120)
    if sampler is not None:
        sampler.wait(timeout=60)
    if server.proc is not None and server.proc.poll() is not None:
        raise SystemExit(
            f"bench: a server died during its measurement (code {server.proc.returncode})"
        )
    return figures


class Row(NamedTuple):
    """One case's figures: the median of its rounds."""

    rps: dict[int, float | None]
    p50_1: float | None
    p99_16: float | None
    cpu_us: float | None
    events_s: float | None
    kib_stream: float | None
    first_event: float | None
    longest: float | None
    rounds_rps16: list[float]
    errors: int


def median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def summarize(rounds: list[dict[str, Any]]) -> Row:
    def each(get: Callable[[dict[str, Any]], float | None]) -> float | None:
        return median([get(r) for r in rounds])

    errors = 0
    for r in rounds:
        errors += sum(r[f"c{c}"]["errors"] for c in CONNECTIONS)
        errors += sum(r["rate"]["failures"].values()) + sum(r["hold"]["failures"].values())
    return Row(
        rps={c: median([r[f"c{c}"]["rps"] for r in rounds]) for c in CONNECTIONS},
        p50_1=each(lambda r: r["c1"]["latency_ms"]["p50"]),
        p99_16=each(lambda r: r["c16"]["latency_ms"]["p99"]),
        cpu_us=each(lambda r: r["c16"].get("server_cpu_us")),
        events_s=each(lambda r: r["rate"]["events_per_s"]),
        kib_stream=each(lambda r: r["hold"]["kib_per_stream"]),
        first_event=each(lambda r: r["hold"]["first_event_s"]["p50"]),
        longest=each(lambda r: r["hold"]["duration_s"]["max"]),
        rounds_rps16=[r["c16"]["rps"] for r in rounds],
        errors=errors,
    )


def table(rows: dict[str, Row]) -> str:
    direct = rows.get("direct")
    floor = rows.get("minimal")
    ofwd = rows.get("openai-fwd")
    header = (
        "case",
        "r/s c1",
        "r/s c16",
        "r/s c64",
        "+p50 c1 ms",
        "p99 c16 ms",
        "+p99 c16",
        "cpu µs/req",
        "events/s 1k",
        "KiB/stream",
        "1st event s",
        "10s stream s",
        "x minimal",
        "x openai-fwd",
        "cpu x minimal",
        "errors",
        "r/s c16 rounds",
    )
    lines = [header]
    for name, row in rows.items():
        lines.append(
            (
                name,
                fmt(row.rps[1], 0),
                fmt(row.rps[16], 0),
                fmt(row.rps[64], 0),
                fmt(minus(row.p50_1, direct.p50_1) if direct else None, 3),
                fmt(row.p99_16),
                fmt(minus(row.p99_16, direct.p99_16) if direct else None),
                fmt(row.cpu_us, 0),
                fmt(row.events_s, 0),
                fmt(row.kib_stream, 1),
                fmt(row.first_event, 3),
                fmt(row.longest, 2),
                fmt(ratio(row.rps[16], floor.rps[16]) if floor else None),
                fmt(ratio(row.rps[16], ofwd.rps[16]) if ofwd else None),
                fmt(ratio(floor.cpu_us, row.cpu_us) if floor else None),
                str(row.errors),
                " ".join(fmt(v, 0) for v in row.rounds_rps16),
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = [
        "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths)))
        for line in lines
    ]
    text.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(text)


def targets(rows: dict[str, Row]) -> list[str]:
    """Issue 12's targets for the full daemon, each met or not, from this run."""
    full, floor, ofwd, direct = (
        rows.get(n) for n in ("oaproxy", "minimal", "openai-fwd", "direct")
    )
    if full is None:
        return []
    checks: list[tuple[str, float | None, str, bool | None]] = []

    def check(what: str, value: float | None, goal: str, ok: Callable[[float], bool]) -> None:
        checks.append((what, value, goal, None if value is None else ok(value)))

    if floor:
        check("r/s c16 / minimal", ratio(full.rps[16], floor.rps[16]), ">= 1.5", lambda v: v >= 1.5)
        # The same target by CPU per request: what the rate would be with a
        # core each, less noisy on a shared machine than the rates.
        by_cpu = ratio(floor.cpu_us, full.cpu_us)
        check("minimal's cpu/req / oaproxy's", by_cpu, ">= 1.5", lambda v: v >= 1.5)
        p99 = ratio(full.p99_16, floor.p99_16)
        check("p99 c16 / minimal's", p99, "< 3", lambda v: v < 3)
        events = ratio(full.events_s, floor.events_s)
        check("events/s 1k streams / minimal", events, ">= 1", lambda v: v >= 1)
    if ofwd:
        check("r/s c16 / openai-fwd", ratio(full.rps[16], ofwd.rps[16]), ">= 5", lambda v: v >= 5)
        by_cpu = ratio(ofwd.cpu_us, full.cpu_us)
        check("openai-fwd's cpu/req / oaproxy's", by_cpu, ">= 5", lambda v: v >= 5)
    if direct:
        added = minus(full.p50_1, direct.p50_1)
        check("added p50 c1 (ms)", added, "<= 0.35", lambda v: v <= 0.35)
    # 25 KB (decimal) of RSS per open stream.
    check("KiB per open stream", full.kib_stream, "<= 24.4", lambda v: v <= 25000 / 1024)
    check("median 1st event, 1k at once (s)", full.first_event, "<= 1", lambda v: v <= 1)
    check("longest 10 s stream of 1k (s)", full.longest, "< 10.5", lambda v: v < 10.5)
    lines = ["targets (oaproxy, this run):"]
    for what, value, goal, ok in checks:
        verdict = "?" if ok is None else ("met" if ok else "NOT MET")
        lines.append(f"  {what:<34} {fmt(value, 3):>9}  (goal {goal:<7}) {verdict}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="oaproxy against the minimal proxy and openai-forward"
    )
    parser.add_argument("--quick", action="store_true", help="one round of 1 s loads (~2 min)")
    parser.add_argument("--rounds", type=int, default=2, help="fresh servers per case (default 2)")
    parser.add_argument("--seconds", type=float, default=3.0, help="length of each load (s)")
    parser.add_argument("--only", nargs="+", choices=CASES, help="just these cases")
    parser.add_argument("--json", action="store_true", help="also print every round's figures")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="sample the full oaproxy case with py-spy (16 connections, 1,000 streams): where time goes",
    )
    parser.add_argument(
        "--before",
        type=Path,
        help="also run the full case from this checkout of oaproxy (e.g. a worktree at main)",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.seconds = 1, 1.0
    return with_children("bench", lambda children, tmp: run(args, children, tmp))


def run(args: argparse.Namespace, children: Children, directory: Path) -> int:
    def say(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    if shutil.which("taskset") is None:
        say("bench: no taskset: servers and drivers are not pinned to cores")
    cases = [c for c in (args.only or CASES)]
    per_case = len(CONNECTIONS) * (args.seconds + 5) + args.seconds + PACED_SECONDS + 30
    lifetime = per_case * len(cases) * args.rounds + 600
    _fake, upstream = start_fake_upstream(children, 20, lifetime, core=DRIVER_CORE)
    starter = Starter(children, directory, upstream, say)
    if args.before is not None:
        starter.before = args.before.resolve()
        cases.insert(cases.index("oaproxy") + 1 if "oaproxy" in cases else 0, "before")
    cases = [c for c in cases if starter.available(c)]
    rounds: dict[str, list[dict[str, Any]]] = {c: [] for c in cases}
    started = time.monotonic()
    for round_ in range(1, args.rounds + 1):
        for case in cases:
            say(f"  round {round_}: {case} ...")
            server = starter.start(case, round_)
            try:
                profile = None
                if args.profile and case == "oaproxy" and round_ == 1:
                    profile = profile_path()
                rounds[case].append(measure(server, args, profile))
            except SystemExit:
                if server.proc is not None:
                    say(tail(directory / f"{case}-{round_}" / "server.log"))
                raise
            finally:
                if server.proc is not None:
                    children.stop(server.proc)
    rows = {case: summarize(r) for case, r in rounds.items()}
    print(
        f"{args.rounds} round(s), {args.seconds:g} s per load, {STREAMS} streams;"
        f" server on core {SERVER_CORE}, fake upstream and drivers on core {DRIVER_CORE};"
        f" {time.monotonic() - started:.0f} s"
    )
    print(table(rows))
    print("\n".join(targets(rows)))
    if args.profile:
        raw = profile_path()
        if py_spy() is None:
            print("profile: no py-spy (pip install py-spy into this virtualenv)")
        for what, path in (("16 connections", raw), ("1,000 streams", raw.with_suffix(".streams"))):
            if path.exists():
                print(f"profile of oaproxy at {what} (py-spy's raw samples: {path}):")
                print("\n".join(summary(path)))
    if args.json:
        print(json.dumps(rounds, indent=1))
    return 1 if any(row.errors for row in rows.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
