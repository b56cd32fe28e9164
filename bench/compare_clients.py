"""Twisted's Agent versus oaproxy's lean upstream client, in the minimal proxy.

    python bench/compare_clients.py [--requests N] [--rounds 2] [--concurrency 16 1]

Starts ``fake_upstream.py``, then for each round and client (``agent``,
``lean``) a ``minimal_proxy.py`` in front of it, and drives it with
``load.py`` (non-stream and stream). With ``taskset`` on the machine the
proxy is pinned to core 0 and the fake upstream and the driver to core 1.
The proxy's CPU time per request comes from ``/proc/PID/stat`` around each
measured run (warm-up excluded), so it is the proxy's cost whichever process
limits the rate. All traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
PATH = "/v1/chat/completions"
CLIENTS = ("agent", "lean")


def pinned(core: int) -> list[str]:
    return ["taskset", "-c", str(core)] if shutil.which("taskset") else []


def start(argv: list[str], core: int) -> tuple[subprocess.Popen[bytes], int]:
    proc = subprocess.Popen(pinned(core) + argv, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    line = proc.stdout.readline().decode().strip()
    if not line.startswith("listening 127.0.0.1:"):
        proc.kill()
        raise SystemExit(f"bench: {argv[1]} did not start (said {line!r})")
    return proc, int(line.rsplit(":", 1)[1])


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    # utime and stime, fields 14 and 15 of proc(5), counted after the name.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def load_argv(port: int, requests: int, concurrency: int, stream: bool) -> list[str]:
    return [
        *pinned(1),
        sys.executable,
        str(HERE / "load.py"),
        "--url",
        f"http://127.0.0.1:{port}{PATH}",
        "--requests",
        str(requests),
        "--concurrency",
        str(concurrency),
        # One unmeasured request per connection: the proxy's CPU counts it,
        # a few dozen in tens of thousands.
        "--warmup",
        "1",
        *(["--stream"] if stream else []),
    ]


def drive(port: int, requests: int, concurrency: int, stream: bool, proxy: int) -> dict[str, Any]:
    # Warm the proxy (pools filled, code paths run) outside the measurement.
    warm = load_argv(port, 500, concurrency, stream)
    subprocess.run(warm, check=True, capture_output=True, timeout=300)
    before = cpu_seconds(proxy)
    done = subprocess.run(
        load_argv(port, requests, concurrency, stream),
        check=False,
        capture_output=True,
        timeout=300,
    )
    after = cpu_seconds(proxy)
    result: dict[str, Any] = json.loads(done.stdout)
    result["proxy_cpu_us"] = (after - before) * 1e6 / max(1, result["requests"])
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[16, 1])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    fake, upstream = start(
        [sys.executable, str(HERE / "fake_upstream.py"), "--port", "0", "--max-seconds", "3600"], 1
    )
    rows: list[dict[str, Any]] = []
    try:
        for round_ in range(1, args.rounds + 1):
            for client in CLIENTS:
                proxy, port = start(
                    [
                        sys.executable,
                        str(HERE / "minimal_proxy.py"),
                        "--upstream",
                        f"http://127.0.0.1:{upstream}",
                        "--client",
                        client,
                    ],
                    0,
                )
                try:
                    for stream in (False, True):
                        for concurrency in args.concurrency:
                            r = drive(port, args.requests, concurrency, stream, proxy.pid)
                            r.update(round=round_, client=client)
                            rows.append(r)
                            print(line(r), flush=True)
                finally:
                    proxy.terminate()
                    proxy.wait()
                time.sleep(0.2)
    finally:
        fake.terminate()
        fake.wait()
    if args.json:
        print(json.dumps(rows, indent=2))
    return 1 if any(r["errors"] for r in rows) else 0


def line(r: dict[str, Any]) -> str:
    mode = "stream" if r["stream"] else "non-stream"
    latency = r["latency_ms"]
    return (
        f"round {r['round']}  {r['client']:<5}  {mode:<10}  c={r['concurrency']:<3}"
        f"  {r['rps']:>8.0f} req/s  p50 {latency['p50']:.2f} ms  p99 {latency['p99']:.2f} ms"
        f"  proxy {r['proxy_cpu_us']:6.1f} µs/req  driver cpu {r['driver_cpu']:.2f}"
        f"  errors {r['errors']}"
    )


if __name__ == "__main__":
    sys.exit(main())
