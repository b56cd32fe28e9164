"""A load driver for the benchmark: C keep-alive connections, R requests.

A raw asyncio HTTP/1.1 client (no third-party client, so the driver costs the
same whichever server it measures). Responses are framed properly: by
``Content-Length``, by chunked transfer coding, or by the connection closing.

Each of ``--concurrency`` connections first sends ``--warmup`` requests that
are not measured (connections opened, the proxy's upstream pool filled), then
all of them share ``--requests`` measured requests. The run stops by itself at
``--max-seconds`` whatever is left.

Per request it measures the full time (request written to last byte read) and,
for streams, the time to the first body byte. It prints one JSON object::

    python bench/load.py --url http://127.0.0.1:8000/v1/chat/completions \\
        --key sk-... --requests 2000 --concurrency 16 [--stream]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import resource
import sys
import time
from typing import Any
from urllib.parse import urlsplit

from attrs import define, field

# Bounded so a server that never answers cannot hold the driver forever.
CONNECT_TIMEOUT = 5.0
READ_LIMIT = 1024 * 1024


class ProtocolError(Exception):
    pass


@define
class Sample:
    latency: float
    ttfb: float | None


@define
class Tally:
    samples: list[Sample] = field(factory=list)
    errors: int = 0
    error_kinds: dict[str, int] = field(factory=dict)
    bytes_in: int = 0
    # X-Oaproxy-Cache values seen ("none" when absent).
    cache: dict[str, int] = field(factory=dict)

    def fail(self, kind: str) -> None:
        self.errors += 1
        self.error_kinds[kind] = self.error_kinds.get(kind, 0) + 1


@define
class Response:
    status: int
    body_bytes: int
    ttfb: float | None
    close: bool
    tail: bytes  # the last bytes of the body, to check a stream ended with [DONE]
    cache: str | None = None  # oaproxy's X-Oaproxy-Cache


class Requests:
    """The bytes of each request: the same every time, or with ``unique``
    one that differs from all others (so a cache never has it)."""

    def __init__(
        self, url: str, key: str | None, stream: bool, model: str, caching: bool, unique: bool
    ) -> None:
        self.host, self.port, self._same = build_request(url, key, stream, model, caching)
        self._args = (url, key, stream, model, caching)
        self._unique = unique
        self._made = 0

    def next(self) -> bytes:
        if not self._unique:
            return self._same
        self._made += 1
        return build_request(*self._args, content=f"Say something short. #{self._made}")[2]


def build_request(
    url: str,
    key: str | None,
    stream: bool,
    model: str,
    caching: bool = False,
    content: str = "Say something short.",
) -> tuple[str, int, bytes]:
    parts = urlsplit(url)
    if parts.scheme != "http" or parts.hostname is None:
        raise SystemExit(f"load: only http:// URLs are supported, not {url!r}")
    port = parts.port or 80
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    message: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": content}],
    }
    if stream:
        message["stream"] = True
    if caching:
        message["caching"] = True
    body = json.dumps(message).encode()
    lines = [
        f"POST {target} HTTP/1.1",
        f"Host: {parts.hostname}:{port}",
        "Content-Type: application/json",
        "Accept: application/json, text/event-stream",
        "User-Agent: oaproxy-bench/1",
        f"Content-Length: {len(body)}",
    ]
    if key:
        lines.append(f"Authorization: Bearer {key}")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode()
    return parts.hostname, port, head + body


async def read_response(reader: asyncio.StreamReader, started: float) -> Response:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head[:-4].split(b"\r\n")
    status_line = lines[0].split(b" ", 2)
    if len(status_line) < 2 or not status_line[0].startswith(b"HTTP/1."):
        raise ProtocolError(f"bad status line {lines[0][:80]!r}")
    status = int(status_line[1])
    length: int | None = None
    chunked = False
    close = status_line[0] == b"HTTP/1.0"
    cache: str | None = None
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        lname = name.strip().lower()
        lvalue = value.strip().lower()
        if lname == b"content-length":
            length = int(lvalue)
        elif lname == b"transfer-encoding":
            chunked = lvalue.endswith(b"chunked")
        elif lname == b"connection":
            close = b"close" in lvalue
        elif lname == b"x-oaproxy-cache":
            cache = lvalue.decode("ascii", "replace")
    ttfb: float | None = None
    if chunked:
        size_total = 0
        tail = b""
        while True:
            size_line = await reader.readuntil(b"\r\n")
            size = int(size_line.split(b";", 1)[0].strip(), 16)
            if size == 0:
                # Trailers, if any, end with an empty line.
                while await reader.readuntil(b"\r\n") != b"\r\n":
                    pass
                break
            chunk = await reader.readexactly(size + 2)
            if chunk[-2:] != b"\r\n":
                raise ProtocolError("chunk not followed by CRLF")
            if ttfb is None:
                ttfb = time.perf_counter() - started
            size_total += size
            tail = (tail + chunk[:-2])[-64:]
        return Response(status, size_total, ttfb, close, tail, cache)
    if status in (204, 304) or 100 <= status < 200:
        return Response(status, 0, None, close, b"", cache)
    if length is not None:
        body = await reader.readexactly(length)
        ttfb = time.perf_counter() - started
        return Response(status, length, ttfb, close, body[-64:], cache)
    # Neither framing: the body ends when the server closes.
    body = await reader.read(-1)
    return Response(status, len(body), time.perf_counter() - started, True, body[-64:], cache)


class Connection:
    """One keep-alive connection, reopened when the server closes it."""

    def __init__(self, host: str, port: int) -> None:
        self._host = host
        self._port = port
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self._reader is not None and self._writer is not None:
            return self._reader, self._writer
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(self._host, self._port, limit=READ_LIMIT),
            CONNECT_TIMEOUT,
        )
        self._reader, self._writer = reader, writer
        return reader, writer

    async def send(self, request: bytes, timeout: float) -> tuple[Response, float]:
        reader, writer = await self._open()
        started = time.perf_counter()
        try:
            writer.write(request)
            response = await asyncio.wait_for(read_response(reader, started), timeout)
        except BaseException:
            self.close()
            raise
        elapsed = time.perf_counter() - started
        if response.close:
            self.close()
        return response, elapsed

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None


def percentile(sorted_values: list[float], fraction: float) -> float | None:
    """Nearest-rank percentile of an already sorted list."""
    if not sorted_values:
        return None
    rank = max(0, min(len(sorted_values) - 1, math.ceil(fraction * len(sorted_values)) - 1))
    return sorted_values[rank]


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 3)


def summarize(values: list[float]) -> dict[str, float | None]:
    ordered = sorted(values)
    return {
        "p50": _ms(percentile(ordered, 0.50)),
        "p90": _ms(percentile(ordered, 0.90)),
        "p99": _ms(percentile(ordered, 0.99)),
        "max": _ms(ordered[-1] if ordered else None),
        "mean": _ms(sum(ordered) / len(ordered) if ordered else None),
    }


async def worker(
    connection: Connection,
    requests: Requests,
    stream: bool,
    budget: list[int],
    deadline: float,
    timeout: float,
    tally: Tally | None,
) -> None:
    """Send requests while the shared budget lasts and the deadline is ahead."""
    while budget[0] > 0 and time.perf_counter() < deadline:
        budget[0] -= 1
        try:
            response, elapsed = await connection.send(requests.next(), timeout)
        except (
            TimeoutError,
            OSError,
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
            ProtocolError,
            ValueError,
        ) as e:
            if tally is not None:
                tally.fail(type(e).__name__)
            continue
        if tally is None:
            continue
        if response.status != 200:
            tally.fail(f"status {response.status}")
            continue
        if stream and not response.tail.rstrip().endswith(b"data: [DONE]"):
            tally.fail("stream without [DONE]")
            continue
        tally.bytes_in += response.body_bytes
        cache = response.cache or "none"
        tally.cache[cache] = tally.cache.get(cache, 0) + 1
        tally.samples.append(Sample(elapsed, response.ttfb))


async def run(args: argparse.Namespace) -> dict[str, Any]:
    requests = Requests(args.url, args.key, args.stream, args.model, args.caching, args.unique)
    connections = [Connection(requests.host, requests.port) for _ in range(args.concurrency)]
    hard_stop = time.perf_counter() + args.max_seconds
    try:
        warm = [args.warmup * args.concurrency]
        await asyncio.gather(
            *(
                worker(c, requests, args.stream, warm, hard_stop, args.timeout, None)
                for c in connections
            )
        )
        tally = Tally()
        budget = [args.requests]
        cpu_before = resource.getrusage(resource.RUSAGE_SELF)
        started = time.perf_counter()
        await asyncio.gather(
            *(
                worker(c, requests, args.stream, budget, hard_stop, args.timeout, tally)
                for c in connections
            )
        )
        elapsed = time.perf_counter() - started
        cpu_after = resource.getrusage(resource.RUSAGE_SELF)
    finally:
        for c in connections:
            c.close()
    done = len(tally.samples)
    cpu = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
    result: dict[str, Any] = {
        "url": args.url,
        "stream": args.stream,
        "concurrency": args.concurrency,
        "requests": done,
        "errors": tally.errors,
        "error_kinds": tally.error_kinds,
        "stopped_early": budget[0] > 0,
        "seconds": round(elapsed, 3),
        "rps": round(done / elapsed, 1) if elapsed > 0 else None,
        "bytes_in": tally.bytes_in,
        "cache": tally.cache,
        "warmup_requests": args.warmup * args.concurrency,
        "latency_ms": summarize([s.latency for s in tally.samples]),
        # How busy the driver itself was: near 1.0 means it may be the limit.
        "driver_cpu": round(cpu / elapsed, 2) if elapsed > 0 else None,
    }
    if args.stream:
        result["ttfb_ms"] = summarize([s.ttfb for s in tally.samples if s.ttfb is not None])
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="HTTP/1.1 keep-alive load driver for oaproxy's benchmark"
    )
    parser.add_argument("--url", required=True, help="http://127.0.0.1:PORT/v1/chat/completions")
    parser.add_argument("--key", default=None, help="client key sent as Authorization: Bearer")
    parser.add_argument("--model", default="gpt-bench")
    parser.add_argument("--stream", action="store_true", help='send "stream": true')
    parser.add_argument("--caching", action="store_true", help='send "caching": true')
    parser.add_argument(
        "--unique", action="store_true", help="make every request differ (always a cache miss)"
    )
    parser.add_argument("--requests", type=int, default=2000, help="measured requests in all")
    parser.add_argument("--concurrency", type=int, default=16, help="keep-alive connections")
    parser.add_argument(
        "--warmup", type=int, default=5, help="unmeasured requests per connection first"
    )
    parser.add_argument("--timeout", type=float, default=10.0, help="per-request deadline (s)")
    parser.add_argument(
        "--max-seconds",
        type=float,
        default=30.0,
        help="stop the whole run after this long",
    )
    args = parser.parse_args(argv)
    if args.concurrency < 1 or args.requests < 1:
        parser.error("--requests and --concurrency must be at least 1")
    result = asyncio.run(run(args))
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0 if result["requests"] and not result["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
