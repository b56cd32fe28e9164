"""The stream driver of the benchmark: a thousand streams at once.

Two ways to use them, each printing one JSON object:

``--mode rate``
    ``--streams`` keep-alive connections each ask for a stream, read it
    whole, and ask again, for ``--seconds``: how many SSE events per second
    the server relays with that many streams open (the fake sends each
    answer at once, so the server is the limit).

``--mode hold``
    ``--streams`` connections are opened at once, each asking for one paced
    stream (the model ``bench-paced``: an event every 50 ms for 10 s, see
    ``fake_upstream.py``). Measured: each stream's time to its first event
    from the moment all were started, each stream's whole duration, and,
    with ``--pid``, that process's RSS before the streams and while all are
    open (halfway through), so the memory each open stream holds.

Every request differs (a serial number in its message), so a response
cache in front looks each up and misses; ``--same`` sends one request.
A raw ``asyncio.Protocol`` client with ``httptools`` framing: the driver must
stay cheaper than the servers it measures::

    python bench/streams.py --url http://127.0.0.1:PORT/v1/chat/completions \\
        --key sk-... --mode hold --streams 1000 [--pid PID]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import math
import resource
import sys
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import httptools
from procs import raise_open_files, rss_kib

PACED_MODEL = "bench-paced"
FAST_MODEL = "gpt-bench"
CONNECT_TIMEOUT = 30.0


def build_request(
    url: str, key: str | None, model: str, serial: int | None = None
) -> tuple[str, int, bytes]:
    parts = urlsplit(url)
    if parts.scheme != "http" or parts.hostname is None:
        raise SystemExit(f"streams: only http:// URLs are supported, not {url!r}")
    port = parts.port or 80
    body = json.dumps(
        {
            "model": model,
            "stream": True,
            "messages": [{"role": "user", "content": f"Tell a short story. #{serial}"}],
        }
    ).encode()
    lines = [
        f"POST {parts.path} HTTP/1.1",
        f"Host: {parts.hostname}:{port}",
        "Content-Type: application/json",
        "Accept: text/event-stream",
        f"Content-Length: {len(body)}",
    ]
    if key:
        lines.append(f"Authorization: Bearer {key}")
    return parts.hostname, port, ("\r\n".join(lines) + "\r\n\r\n").encode() + body


class StreamClient(asyncio.Protocol):
    """One connection: sends a stream request, counts its events, and when
    ``again`` says so sends the next on the same connection."""

    def __init__(self, request: Callable[[], bytes], started: float, again: Any) -> None:
        self._request = request
        self._again = again
        self._parser = httptools.HttpResponseParser(self)
        self._tail = b""
        self.started = started
        self.first: float | None = None
        self.ended: float | None = None
        self.events = 0
        self.streams = 0
        self.status = 0
        self.failed: str | None = None
        self.done = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(self._request())

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as e:
            self._finish(f"parse error {e}")

    def on_status(self, status: bytes) -> None:
        self.status = self._parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        if self.first is None:
            self.first = time.perf_counter()
        # An event ends with a blank line; one may be split across reads.
        self.events += (self._tail + body).count(b"\n\n")
        self._tail = body[-1:]

    def on_message_complete(self) -> None:
        self.streams += 1
        self._tail = b""
        if self.status != 200:
            self._finish(f"status {self.status}")
        elif self._again() and self.transport is not None:
            self.transport.write(self._request())
        else:
            self.ended = time.perf_counter()
            self._finish(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self._finish("closed early" if self.ended is None else None)

    def _finish(self, failure: str | None) -> None:
        if self.done.done():
            return
        self.failed = failure
        if self.transport is not None:
            self.transport.close()
        self.done.set_result(None)


async def open_all(
    host: str, port: int, request: Callable[[], bytes], count: int, again: Any
) -> tuple[float, list[StreamClient]]:
    """``count`` connections started at once; returns when each is connected
    (or failed to be)."""
    loop = asyncio.get_running_loop()
    started = time.perf_counter()

    async def one() -> StreamClient:
        client = StreamClient(request, started, again)
        try:
            await asyncio.wait_for(
                loop.create_connection(lambda: client, host, port), CONNECT_TIMEOUT
            )
        except (OSError, TimeoutError) as e:
            client._finish(f"connect: {type(e).__name__}")
        return client

    clients = await asyncio.gather(*(one() for _ in range(count)))
    return started, list(clients)


def quantiles(values: list[float]) -> dict[str, float | None]:
    ordered = sorted(values)

    def rank(fraction: float) -> float | None:
        if not ordered:
            return None
        index = max(0, min(len(ordered) - 1, math.ceil(fraction * len(ordered)) - 1))
        return round(ordered[index], 4)

    return {"p50": rank(0.5), "p99": rank(0.99), "max": rank(1.0)}


def failures(clients: list[StreamClient]) -> dict[str, int]:
    kinds: dict[str, int] = {}
    for c in clients:
        if c.failed is not None:
            kinds[c.failed] = kinds.get(c.failed, 0) + 1
    return kinds


def requests(args: argparse.Namespace, model: str) -> tuple[str, int, Callable[[], bytes]]:
    """Where to connect, and what makes each request: every one different
    (so a response cache never has it), unless ``--same``."""
    host, port, same = build_request(args.url, args.key, model)
    if args.same:
        return host, port, lambda: same
    serial = itertools.count()
    return host, port, lambda: build_request(args.url, args.key, model, next(serial))[2]


async def rate(args: argparse.Namespace) -> dict[str, Any]:
    host, port, request = requests(args, FAST_MODEL)
    stop = time.perf_counter() + args.seconds
    cpu_before = resource.getrusage(resource.RUSAGE_SELF)
    started, clients = await open_all(
        host, port, request, args.streams, lambda: time.perf_counter() < stop
    )
    await asyncio.wait([c.done for c in clients], timeout=args.seconds + 30)
    elapsed = time.perf_counter() - started
    cpu_after = resource.getrusage(resource.RUSAGE_SELF)
    events = sum(c.events for c in clients)
    return {
        "mode": "rate",
        "streams": args.streams,
        "seconds": round(elapsed, 3),
        "events": events,
        "events_per_s": round(events / elapsed, 1),
        "streams_done": sum(c.streams for c in clients),
        "failures": failures(clients),
        "driver_cpu": round(_cpu(cpu_before, cpu_after) / elapsed, 2),
    }


async def hold(args: argparse.Namespace) -> dict[str, Any]:
    host, port, request = requests(args, PACED_MODEL)
    rss_before = rss_kib(args.pid) if args.pid else None
    started, clients = await open_all(host, port, request, args.streams, lambda: False)
    # Halfway through a paced stream every one of them is open.
    await asyncio.sleep(max(0.0, started + args.stream_seconds / 2 - time.perf_counter()))
    rss_open = rss_kib(args.pid) if args.pid else None
    opened = sum(1 for c in clients if c.first is not None and c.ended is None)
    await asyncio.wait([c.done for c in clients], timeout=args.stream_seconds + 30)
    ok = [c for c in clients if c.failed is None and c.ended is not None]
    per_stream = None
    if rss_before is not None and rss_open is not None and opened:
        per_stream = round((rss_open - rss_before) / opened, 2)
    return {
        "mode": "hold",
        "streams": args.streams,
        "ok": len(ok),
        "open_halfway": opened,
        "failures": failures(clients),
        "first_event_s": quantiles([c.first - started for c in ok if c.first is not None]),
        "duration_s": quantiles([c.ended - c.first for c in ok if c.ended and c.first]),
        "events": sum(c.events for c in clients),
        "rss_before_kib": rss_before,
        "rss_open_kib": rss_open,
        "kib_per_stream": per_stream,
    }


def _cpu(before: Any, after: Any) -> float:
    return float((after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="many concurrent SSE streams")
    parser.add_argument("--url", required=True, help="http://127.0.0.1:PORT/v1/chat/completions")
    parser.add_argument("--key", default=None, help="client key sent as Authorization: Bearer")
    parser.add_argument("--mode", choices=("rate", "hold"), required=True)
    parser.add_argument("--streams", type=int, default=1000, help="streams open at once")
    parser.add_argument("--seconds", type=float, default=5.0, help="--mode rate: how long")
    parser.add_argument(
        "--stream-seconds",
        type=float,
        default=10.0,
        help="--mode hold: how long a paced stream lasts (the fake's chunks x interval)",
    )
    parser.add_argument("--pid", type=int, default=0, help="--mode hold: the server's pid")
    parser.add_argument(
        "--same", action="store_true", help="the same request every time (default: all differ)"
    )
    args = parser.parse_args(argv)
    raise_open_files()
    run = rate if args.mode == "rate" else hold
    result = asyncio.run(run(args))
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
