"""A bounded soak: does oaproxy's memory settle under mixed load?

    python bench/soak.py [--minutes 3] [--clients 250] [--warmup 75]

One oaproxy (configured as ``run.py``'s full case: keys, records to sqlite
and a file, metrics, limiter, cache) in front of two fakes: ``fake-a``, which
answers 502 to the model ``bench-fail`` (so those requests fail over), and
``fake-b``, which answers everything. ``--clients`` clients at once, each in
a loop, pick one of:

- a non-stream completion (every body differs: cache misses, records grow);
- a stream of 20 events sent at once;
- a request for ``bench-fail``: fails on fake-a, served by fake-b;
- a paced stream (an event every 50 ms for 2 s) read whole;
- a paced stream the client walks away from after its first events;
- a request the client closes before the answer comes.

It prints oaproxy's RSS every ``--every`` seconds, at the end of the warm-up
and at the end, with the growth between those two; growth over 5 % is
marked ``GROWTH``. The exit status is non-zero when oaproxy died or no
request succeeded.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from procs import (
    CLIENT_KEY,
    PATH,
    UPSTREAM_KEY,
    Children,
    free_port,
    oaproxy_argv,
    rss_kib,
    start_fake_upstream,
    tail,
    wait_ready,
    with_children,
)
from run import FULL_CONFIG

FAIL_MODEL = "bench-fail"
PACED_MODEL = "bench-paced"
GROWTH_LIMIT = 0.05
# (kind, weight)
MIX = (
    ("completion", 40),
    ("stream", 20),
    ("failover", 15),
    ("paced", 10),
    ("walk-away", 10),
    ("abandon", 5),
)

# run.py's full case, its cache full within the warm-up (growth after it is
# then not the cache filling up).
CONFIG = FULL_CONFIG.replace("  default: true\n", "  default: true\n  max_entries: 2000\n")


def request(port: int, model: str, stream: bool, serial: int) -> bytes:
    message: dict[str, object] = {
        "model": model,
        "messages": [{"role": "user", "content": f"Soak request #{serial}."}],
    }
    if stream:
        message["stream"] = True
    body = json.dumps(message).encode()
    head = (
        f"POST {PATH} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Authorization: Bearer {CLIENT_KEY}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


async def one(port: int, kind: str, serial: int) -> str:
    """One request of ``kind`` on its own connection; what became of it."""
    model = {"failover": FAIL_MODEL, "paced": PACED_MODEL, "walk-away": PACED_MODEL}.get(
        kind, "gpt-bench"
    )
    stream = kind in ("stream", "paced", "walk-away")
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request(port, model, stream, serial))
        if kind == "abandon":
            await asyncio.sleep(0)
            return "abandoned"
        if kind == "walk-away":
            await reader.readexactly(600)  # the head and a few events
            return "walked away"
        answer = await reader.read(-1)  # Connection: close
        status = answer[9:12]
        if status != b"200":
            return f"status {status.decode(errors='replace')}"
        if stream and b"data: [DONE]" not in answer:
            return "stream without [DONE]"
        return "ok"
    finally:
        writer.close()


async def client(port: int, stop: float, tally: Counter[str], rng: random.Random) -> None:
    kinds = [k for k, _ in MIX]
    weights = [w for _, w in MIX]
    while time.monotonic() < stop:
        kind = rng.choices(kinds, weights)[0]
        try:
            outcome = await asyncio.wait_for(one(port, kind, sum(tally.values())), 30)
        except (OSError, TimeoutError, asyncio.IncompleteReadError) as e:
            outcome = f"{kind}: {type(e).__name__}"
        tally[f"{kind} {outcome}" if outcome != "ok" else f"{kind} ok"] += 1


async def soak(args: argparse.Namespace, port: int, pid: int) -> tuple[int, int, Counter[str]]:
    start = time.monotonic()
    warm_end = start + args.warmup
    stop = start + args.minutes * 60
    tally: Counter[str] = Counter()
    rng = random.Random(12)
    tasks = [
        asyncio.create_task(client(port, stop, tally, random.Random(rng.random())))
        for _ in range(args.clients)
    ]
    warm_rss = 0
    while time.monotonic() < stop:
        await asyncio.sleep(min(args.every, max(0.0, stop - time.monotonic())))
        now = time.monotonic()
        rss = rss_kib(pid) or 0
        if not warm_rss and now >= warm_end:
            warm_rss = rss
            print(f"{now - start:6.0f} s  RSS {rss} KiB  (end of warm-up)", flush=True)
        else:
            print(
                f"{now - start:6.0f} s  RSS {rss} KiB  {sum(tally.values())} requests", flush=True
            )
    await asyncio.gather(*tasks)
    return warm_rss, rss_kib(pid) or 0, tally


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="oaproxy's memory under a mixed load")
    parser.add_argument("--minutes", type=float, default=3.0, help="how long in all")
    # The limiter's one-minute moving windows hold an entry per request
    # until they are a minute old: full only after the first minute.
    parser.add_argument("--warmup", type=float, default=75.0, help="seconds before the first RSS")
    parser.add_argument("--clients", type=int, default=250, help="clients at once (>= 200)")
    parser.add_argument("--every", type=float, default=15.0, help="seconds between RSS lines")
    args = parser.parse_args(argv)
    return with_children("soak", lambda children, tmp: run(args, children, tmp))


def run(args: argparse.Namespace, children: Children, directory: Path) -> int:
    lifetime = args.minutes * 60 + 120
    paced = ("--paced-chunks", "40")  # 2 s streams
    _a, failing = start_fake_upstream(
        children, 20, lifetime, core=1, more=(*paced, "--fail-model", FAIL_MODEL)
    )
    _b, healthy = start_fake_upstream(children, 20, lifetime, core=1, more=paced)
    config = directory / "config.yaml"
    config.write_text(
        CONFIG.format(key=CLIENT_KEY, port_a=failing, port_b=healthy, sk=UPSTREAM_KEY)
    )
    port = free_port()
    log = directory / "oaproxy.log"
    with log.open("wb") as out:
        proxy = children.start(
            oaproxy_argv(config, port),
            0,
            cwd=directory,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    wait_ready(port, proxy, log)
    print(
        f"soak: {args.clients} clients for {args.minutes:g} min (warm-up {args.warmup:g} s),"
        f" oaproxy pid {proxy.pid}; RSS at start {rss_kib(proxy.pid)} KiB",
        flush=True,
    )
    warm, end, tally = asyncio.run(soak(args, port, proxy.pid))
    if proxy.poll() is not None:
        print(f"soak: oaproxy died:\n{tail(log)}")
        return 1
    growth = (end - warm) / warm if warm else 0.0
    mark = "GROWTH" if growth > GROWTH_LIMIT else "ok"
    print("outcomes: " + ", ".join(f"{k}: {v}" for k, v in sorted(tally.items())))
    print(
        f"RSS at warm-up end {warm} KiB, at the end {end} KiB:"
        f" {growth * 100:+.1f} % ({mark}; limit +{GROWTH_LIMIT * 100:.0f} %)"
    )
    served = sum(v for k, v in tally.items() if k.endswith(" ok"))
    return 0 if served else 1


if __name__ == "__main__":
    sys.exit(main())
