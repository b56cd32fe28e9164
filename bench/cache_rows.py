"""What the response cache costs and saves, and with ``--limits`` what the
limiter costs; direct-to-upstream versus through oaproxy as the baseline.

    python bench/cache_rows.py [--requests N] [--concurrency C] [--chunks K]
                               [--limits] [--redis URL]

(``bench/run.py`` is the benchmark of issue 12: oaproxy against the
minimal proxy and openai-forward.)

It starts the fake upstream (``bench/fake_upstream.py``) and oaproxy through
the real ``twistd`` of the same virtualenv as ``sys.executable``, on loopback
ports, with a temporary config (``dbtype: none``, one client key, one
upstream: the fake; records policy left at its defaults). Two more oaproxy
instances have a cache: one in memory, one in Redis. Once ``/healthz``
answers it runs ``bench/load.py`` once per scenario and prints a table.
Children are stopped at the end, on an error and on Ctrl-C. All traffic
stays on 127.0.0.1.

With ``--limits`` it also measures what the limiter costs on the hot path:
the same load through two more oaproxy processes whose every request passes
a global, a per-key and a per-token limit (set high enough never to refuse),
one keeping its counters in memory, one in Redis.

Redis is a private ``redis-server`` started for the run (without one the
Redis rows are left out), or ``--redis URL``; each instance that uses it
has a key prefix of its own, so nothing of another run (or deployment) is
read or counted.

The machine may be noisy: compare the ratios within one run, not absolute
numbers across runs.
"""

from __future__ import annotations

import argparse
import http.client
import json
import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, NamedTuple

from procs import (
    CLIENT_KEY,
    HERE,
    PATH,
    READY_INTERVAL,
    READY_TRIES,
    UPSTREAM_KEY,
    Children,
    cpu_seconds,
    fmt,
    free_port,
    oaproxy_argv,
    rss_kib,
    run_driver,
    start_fake_upstream,
    tail,
    wait_ready,
    with_children,
)
from procs import minus as _minus
from procs import ratio as _ratio

# Every request passes all three (and a token reservation settled by the
# answer's usage); none of them ever refuses.
LIMITS = (
    "limits:\n"
    "  backend: {backend}\n"
    '  global: "100000000/minute"\n'
    '  per_key: "100000000/minute"\n'
    '  tokens_per_key: "100000000000/minute"\n'
)


def redis_config(redis_url: str) -> str:
    # A prefix of its own: nothing of another run (or deployment) is counted.
    return f"redis: {redis_url}\nredis_prefix: 'oaproxy-bench:{uuid.uuid4().hex}:'\n"


def write_config(directory: Path, name: str, upstream_port: int, more: str = "") -> Path:
    path = directory / f"{name}.yaml"
    path.write_text(
        "# Written by bench/run.py for one run.\n"
        f"authorization:\n  bench: {CLIENT_KEY}\n"
        "dbtype: none\n"
        f"records: {{spool_dir: ./spool-{name}}}\n"
        f"{more}"
        "upstreams:\n"
        "  - name: fake\n"
        f"    endpoint: http://127.0.0.1:{upstream_port}/v1\n"
        f"    sk: {UPSTREAM_KEY}\n"
    )
    return path


class Proxy(NamedTuple):
    proc: subprocess.Popen[bytes]
    port: int
    log: Path


def start_proxy(children: Children, directory: Path, config: Path) -> Proxy:
    """An oaproxy on ``config``, once it answers."""
    port = free_port()
    log = directory / f"{config.stem}.log"
    with log.open("wb") as log_file:
        proxy = children.start(
            oaproxy_argv(config, port),
            cwd=directory,  # anything relative (./log, spools) lands in the temp dir
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    wait_ready(port, proxy, log)
    return Proxy(proxy, port, log)


def start_redis(children: Children, directory: Path) -> int | None:
    """A private redis-server, once it listens; None when there is none."""
    binary = shutil.which("redis-server")
    if binary is None:
        return None
    port = free_port()
    children.start(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        cwd=directory,
        stdout=subprocess.DEVNULL,
    )
    for _ in range(READY_TRIES):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return port
        except OSError:
            time.sleep(READY_INTERVAL)
    raise SystemExit("bench: redis-server did not start")


def wait_limited(proxy: Proxy) -> None:
    """Until answers carry the limiter's headers: its Redis connection is up
    (before that, on_backend_error: open serves without counting)."""
    body = json.dumps({"model": "bench", "messages": [{"role": "user", "content": "hi"}]})
    for _ in range(READY_TRIES):
        conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=5)
        headers = {"Authorization": f"Bearer {CLIENT_KEY}", "Content-Type": "application/json"}
        conn.request("POST", PATH, body, headers)
        response = conn.getresponse()
        response.read()
        conn.close()
        if response.getheader("x-ratelimit-limit-requests"):
            return
        time.sleep(READY_INTERVAL)
    raise SystemExit(f"bench: the limiter never answered (is Redis up?):\n{tail(proxy.log)}")


def load(
    port: int,
    *,
    stream: bool,
    args: argparse.Namespace,
    key: str | None,
    caching: bool = False,
    unique: bool = False,
    requests: int | None = None,
    concurrency: int | None = None,
) -> dict[str, Any]:
    argv = [
        sys.executable,
        str(HERE / "load.py"),
        "--url",
        f"http://127.0.0.1:{port}{PATH}",
        "--requests",
        str(requests or args.requests),
        "--concurrency",
        str(concurrency or args.concurrency),
        "--max-seconds",
        str(args.max_seconds),
    ]
    if stream:
        argv.append("--stream")
    if caching:
        argv.append("--caching")
    if unique:
        argv.append("--unique")
    if key:
        argv += ["--key", key]
    # Bounded twice: the driver stops itself, and is killed a little later.
    return run_driver(argv, args.max_seconds + 30)


def report(
    results: dict[str, dict[str, Any]],
    rss: dict[str, int | None],
    backends: list[str],
    upstream_ms: float,
    concurrency: int,
) -> str:
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
            "proxy cpu ms/req",
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
                fmt(r.get("proxy_cpu_ms"), 3),
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
        ratio = _ratio(proxied["rps"], direct["rps"])
        lines.append(f"{mode:<10}  {_added(proxied, direct)}; oaproxy/direct rate {fmt(ratio, 3)}")
    for mode in ("non-stream", "stream"):
        plain = results[f"oaproxy {mode}"]
        for backend in ("memory", "redis"):
            limited = results.get(f"oaproxy {mode}, limits in {backend}")
            if limited is None:
                continue
            ratio = _ratio(limited["rps"], plain["rps"])
            lines.append(
                f"{mode:<10}  limits in {backend:<6}: {_added(limited, plain)};"
                f" limited/unlimited rate {fmt(ratio, 3)}"
            )
    for name, kib in rss.items():
        lines.append(f"oaproxy RSS {name}: {kib or '?'} KiB")
    lines.append(
        f"cache rows: one request at a time (but x{concurrency}), to an upstream that answers"
        f" after {upstream_ms:g} ms"
    )
    forwarded_rate = results["oaproxy non-stream"]["rps"]
    for backend in backends:
        row = {kind: results[f"cache {backend} {kind}"] for kind in ("bypass", "miss", "hit")}
        p50 = {kind: r["latency_ms"]["p50"] for kind, r in row.items()}
        cpu = {kind: r.get("proxy_cpu_ms") for kind, r in row.items()}
        loaded = results[f"cache {backend} hit x{concurrency}"]["rps"]
        lines.append(
            f"cache {backend:<6}  a hit answers in {fmt(p50['hit'])} ms p50,"
            f" {fmt(_ratio(p50['bypass'], p50['hit']), 1)}x faster than forwarded"
            f" ({fmt(p50['bypass'])} ms); {concurrency} connections get {fmt(loaded, 0)} hits/s,"
            f" {fmt(_ratio(loaded, forwarded_rate), 1)}x the forwarded rate to the instant upstream;"
            f" a miss (looked up, forwarded, stored) adds {fmt(_minus(p50['miss'], p50['bypass']))}"
            f" ms p50 and {fmt(_minus(cpu['miss'], cpu['bypass']), 3)} ms of proxy CPU"
        )
    return "\n".join(lines)


def _added(row: dict[str, Any], base: dict[str, Any]) -> str:
    """The latency ``row`` adds to ``base``, at p50 and p99."""
    p50 = _minus(row["latency_ms"]["p50"], base["latency_ms"]["p50"])
    p99 = _minus(row["latency_ms"]["p99"], base["latency_ms"]["p99"])
    return f"added latency p50 {fmt(p50)} ms, p99 {fmt(p99)} ms"


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
        "--cache-requests", type=int, default=300, help="measured requests per cache scenario"
    )
    parser.add_argument(
        "--upstream-ms",
        type=float,
        default=50.0,
        help="how long the upstream of the cache rows takes to answer (real models: 300+)",
    )
    parser.add_argument(
        "--limits",
        action="store_true",
        help="also measure the limiter: counters in memory and in Redis",
    )
    parser.add_argument(
        "--redis", help="the Redis of the Redis rows (default: a private redis-server)"
    )
    parser.add_argument("--json", action="store_true", help="also print the raw results as JSON")
    args = parser.parse_args(argv)

    return with_children("bench", lambda children, tmp: run(args, children, tmp))


def run(args: argparse.Namespace, children: Children, directory: Path) -> int:
    # The children outlive no run: the fake stops itself after the longest one could take.
    runs = 4 + 10 + (4 if args.limits else 0)
    lifetime = runs * (args.max_seconds + 30) + 60
    _fake, upstream_port = start_fake_upstream(children, args.chunks, lifetime)
    plain = start_proxy(children, directory, write_config(directory, "plain", upstream_port))
    proxies = [plain]
    redis_url = args.redis
    if redis_url is None:
        redis_port = start_redis(children, directory)
        if redis_port is not None:
            redis_url = f"redis://127.0.0.1:{redis_port}/0"
        else:
            print("bench: no redis-server and no --redis, no Redis rows", file=sys.stderr)
    backends = ["memory"] if redis_url is None else ["memory", "redis"]
    # (name, proxy): the load is sent to proxy as "oaproxy {mode}{name}".
    limited: list[tuple[str, Proxy]] = []
    if args.limits:
        for backend in backends:
            more = LIMITS.format(backend=backend)
            if backend == "redis":
                assert redis_url is not None
                more += redis_config(redis_url)
            config = write_config(directory, f"limits-{backend}", upstream_port, more)
            proxy = start_proxy(children, directory, config)
            wait_limited(proxy)
            limited.append((f", limits in {backend}", proxy))
            proxies.append(proxy)
    # The cache rows: an upstream that takes time, as models do.
    _slow, slow_port = start_fake_upstream(children, args.chunks, lifetime, args.upstream_ms)
    cached: dict[str, Proxy] = {}
    for backend in backends:
        more = f"cache: {{backend: {backend}}}\n"
        if backend == "redis":
            assert redis_url is not None
            more += redis_config(redis_url)
        config = write_config(directory, f"cache-{backend}", slow_port, more)
        cached[backend] = start_proxy(children, directory, config)
        proxies.append(cached[backend])
    rss = {"after start": rss_kib(plain.proc.pid)}
    print(
        f"fake upstream 127.0.0.1:{upstream_port}, oaproxy 127.0.0.1:{plain.port}"
        f" (pid {plain.proc.pid}); {args.requests} requests x {args.concurrency} connections,"
        f" {args.chunks} chunks per stream",
        flush=True,
    )
    results: dict[str, dict[str, Any]] = {}

    def scenario(name: str, port: int, pid: int | None, **how: Any) -> None:
        print(f"  running {name} ...", file=sys.stderr, flush=True)
        before = cpu_seconds(pid) if pid is not None else None
        result = load(port, args=args, **how)
        after = cpu_seconds(pid) if pid is not None else None
        if before is not None and after is not None:
            sent = result["requests"] + result["warmup_requests"]
            result["proxy_cpu_ms"] = (after - before) * 1000 / sent
        results[name] = result

    for mode, stream in (("non-stream", False), ("stream", True)):
        scenario(f"direct {mode}", upstream_port, None, stream=stream, key=None)
        for what, proxy in [("", plain), *limited]:
            scenario(
                f"oaproxy {mode}{what}", proxy.port, proxy.proc.pid, stream=stream, key=CLIENT_KEY
            )
    # One request at a time: how fast one is answered, not how many queue.
    # Bypass: not looked up, forwarded. Misses: every request differs, so each
    # is looked up, forwarded and stored. Hits: the same request every time
    # (the warm-up stores it).
    one_by_one = {"key": CLIENT_KEY, "requests": args.cache_requests, "concurrency": 1}
    for backend, proxy in cached.items():
        port, pid = proxy.port, proxy.proc.pid
        for name, caching, unique in (
            ("bypass", False, False),
            ("miss", True, True),
            ("hit", True, False),
        ):
            scenario(
                f"cache {backend} {name}",
                port,
                pid,
                stream=False,
                caching=caching,
                unique=unique,
                **one_by_one,
            )
        scenario(f"cache {backend} hit stream", port, pid, stream=True, caching=True, **one_by_one)
        # And as many at once as the rows above: how many hits one process serves.
        hits = f"cache {backend} hit x{args.concurrency}"
        scenario(hits, port, pid, stream=False, key=CLIENT_KEY, caching=True)
    rss["after the run"] = rss_kib(plain.proc.pid)
    for what, proxy in limited:
        rss[f"after the run{what}"] = rss_kib(proxy.proc.pid)
    for proxy in proxies:
        if proxy.proc.poll() is not None:
            raise SystemExit(f"bench: oaproxy died during the run:\n{tail(proxy.log)}")
    print(report(results, rss, list(cached), args.upstream_ms, args.concurrency))
    if args.json:
        print(json.dumps({"results": results, "rss_kib": rss}, indent=2))
    failed = any(r["errors"] or not r["requests"] for r in results.values())
    # A cache row that did not get what it measures measured something else.
    wrong = [
        name
        for name, r in results.items()
        if name.startswith("cache ") and set(r["cache"]) != {name.split()[2]}
    ]
    if wrong:
        print(f"bench: cache rows with other results than named: {wrong}", file=sys.stderr)
    return 1 if failed or wrong else 0


if __name__ == "__main__":
    sys.exit(main())
