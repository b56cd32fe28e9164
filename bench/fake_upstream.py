"""A fast fake OpenAI upstream for the benchmark.

A raw ``asyncio.Protocol`` HTTP/1.1 server with keep-alive: it must never be
the bottleneck, so it does as little as an HTTP server can. Every answer is
built once at start; a request costs a header scan and one ``json.loads`` of
its (small) body.

- ``POST /v1/chat/completions``: a fixed JSON completion with ``usage``.
- With ``"stream": true``: SSE, N content chunks (``--chunks``, no delays),
  a usage chunk when ``stream_options.include_usage`` is true, then
  ``data: [DONE]``; sent chunked, one HTTP chunk per event.
- Anything else: 404 with an OpenAI-shaped error.
- With ``--delay-ms D`` every answer leaves D milliseconds after its request
  arrived, like a model that takes time to answer (real ones take hundreds of
  milliseconds to seconds).
- A stream for the model ``bench-paced`` is paced like a model generating:
  its head and first event leave at once, then one event every
  ``--paced-interval-ms`` (50: 20 tokens/s) until ``--paced-chunks`` (200:
  a 10 s stream). One timer paces every such stream, so a thousand of them
  cost the fake a write each per tick, not a timer each.
- With ``--fail-model M`` a request for the model M gets a 502 with an
  OpenAI-shaped error: an upstream a proxy fails over from.

Run as its own process::

    python bench/fake_upstream.py --port 0 --chunks 20 [--delay-ms 50]

It prints ``listening 127.0.0.1:PORT`` on stdout once it accepts connections
and runs until killed (or for ``--max-seconds``, so it never outlives a run).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from typing import Any

from attrs import define, field

MODEL = "gpt-bench"
PACED_MODEL = "bench-paced"
COMPLETION_ID = "chatcmpl-bench"
CREATED = 1700000000
CONTENT = "The quick brown fox jumps over the lazy dog."
USAGE = {"prompt_tokens": 12, "completion_tokens": 20, "total_tokens": 32}

# Any single request head above this is refused (a broken client, not a load).
MAX_HEAD = 64 * 1024


def _response(status: bytes, headers: list[tuple[bytes, bytes]], body: bytes) -> bytes:
    lines = [b"HTTP/1.1 " + status]
    lines.extend(name + b": " + value for name, value in headers)
    lines.append(b"content-length: %d" % len(body))
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def completion_response() -> bytes:
    body = json.dumps(
        {
            "id": COMPLETION_ID,
            "object": "chat.completion",
            "created": CREATED,
            "model": MODEL,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": CONTENT},
                    "finish_reason": "stop",
                }
            ],
            "usage": USAGE,
        }
    ).encode()
    return _response(b"200 OK", [(b"content-type", b"application/json")], body)


def _event(data: dict[str, Any] | str) -> bytes:
    text = data if isinstance(data, str) else json.dumps(data)
    payload = b"data: " + text.encode() + b"\n\n"
    # One HTTP chunk per SSE event, as real upstreams flush them.
    return b"%x\r\n" % len(payload) + payload + b"\r\n"


def stream_response(chunks: int, include_usage: bool) -> bytes:
    head = (
        b"HTTP/1.1 200 OK\r\n"
        b"content-type: text/event-stream\r\n"
        b"cache-control: no-cache\r\n"
        b"transfer-encoding: chunked\r\n\r\n"
    )
    words = CONTENT.split(" ")
    parts = [head]
    base = {
        "id": COMPLETION_ID,
        "object": "chat.completion.chunk",
        "created": CREATED,
        "model": MODEL,
    }
    for i in range(chunks):
        delta: dict[str, Any] = {"content": words[i % len(words)] + " "}
        if i == 0:
            delta["role"] = "assistant"
        choice = {
            "index": 0,
            "delta": delta,
            "finish_reason": "stop" if i == chunks - 1 else None,
        }
        event: dict[str, Any] = {**base, "choices": [choice]}
        if include_usage:
            event["usage"] = None
        parts.append(_event(event))
    if include_usage:
        parts.append(_event({**base, "choices": [], "usage": USAGE}))
    parts.append(_event("[DONE]"))
    parts.append(b"0\r\n\r\n")
    return b"".join(parts)


def error_response(status: bytes, message: str) -> bytes:
    body = json.dumps(
        {
            "error": {
                "message": message,
                "type": "invalid_request_error" if status.startswith(b"4") else "server_error",
                "param": None,
                "code": None,
            }
        }
    ).encode()
    return _response(status, [(b"content-type", b"application/json")], body)


def stream_parts(chunks: int, include_usage: bool) -> list[bytes]:
    """``stream_response`` cut where a paced model would pause: the head
    with the first event, then one part per event (the last with the end)."""
    whole = stream_response(chunks, include_usage)
    head, _, body = whole.partition(b"\r\n\r\n")
    events = [e + b"\r\n" for e in body.split(b"\r\n")[1::2][:-1]]
    # Each HTTP chunk is "size\r\npayload\r\n": rebuild them whole.
    sized = [b"%x\r\n" % (len(e) - 2) + e for e in events]
    parts = [head + b"\r\n\r\n" + sized[0], *sized[1:]]
    parts[-1] += b"0\r\n\r\n"
    return parts


@define
class Paced:
    """Streams being paced: each a transport and the parts it has yet to get."""

    interval: float
    streams: list[tuple[asyncio.Transport, list[bytes]]] = field(factory=list)
    ticking: bool = False
    # When the next tick is due: ticks keep to this schedule, so the time a
    # tick takes does not stretch every stream.
    due: float = 0.0

    def start(self, transport: asyncio.Transport, parts: list[bytes]) -> None:
        transport.write(parts[0])
        self.streams.append((transport, list(reversed(parts[1:]))))
        if not self.ticking:
            self.ticking = True
            loop = asyncio.get_running_loop()
            self.due = loop.time() + self.interval
            loop.call_at(self.due, self.tick)

    def tick(self) -> None:
        alive = []
        for transport, left in self.streams:
            if transport.is_closing():
                continue
            transport.write(left.pop())
            if left:
                alive.append((transport, left))
        self.streams = alive
        if alive:
            self.due += self.interval
            asyncio.get_running_loop().call_at(self.due, self.tick)
        else:
            self.ticking = False


class Answers:
    """Every response this server can give, built once."""

    def __init__(
        self, chunks: int, paced_chunks: int, paced_interval: float, fail_model: str | None
    ) -> None:
        self.completion = completion_response()
        self.fail_model = fail_model
        self.failure = error_response(b"502 Bad Gateway", "the model is overloaded")
        self.stream = stream_response(chunks, include_usage=False)
        self.stream_usage = stream_response(chunks, include_usage=True)
        self.paced = stream_parts(paced_chunks, include_usage=False)
        self.paced_usage = stream_parts(paced_chunks, include_usage=True)
        self.pacer = Paced(paced_interval)
        self.not_found = error_response(b"404 Not Found", "not found")
        self.bad_request = _response(b"400 Bad Request", [(b"connection", b"close")], b"")

    def for_request(self, method: bytes, target: bytes, body: bytes) -> bytes | list[bytes]:
        """The answer's bytes, or for a paced stream its parts."""
        if method != b"POST" or not target.startswith(b"/v1/chat/completions"):
            return self.not_found
        try:
            request = json.loads(body)
        except ValueError:
            return self.bad_request
        if not isinstance(request, dict):
            return self.bad_request
        if self.fail_model is not None and request.get("model") == self.fail_model:
            return self.failure
        if not request.get("stream"):
            return self.completion
        options = request.get("stream_options") or {}
        usage = isinstance(options, dict) and options.get("include_usage")
        if request.get("model") == PACED_MODEL:
            return self.paced_usage if usage else self.paced
        return self.stream_usage if usage else self.stream


class UpstreamProtocol(asyncio.Protocol):
    """One keep-alive connection; pipelined requests are answered in order."""

    def __init__(self, answers: Answers, delay: float) -> None:
        self._answers = answers
        self._delay = delay
        self._buffer = bytearray()
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        out: list[bytes] = []
        while True:
            parsed = self._parse_one()
            if parsed is None:
                break
            if isinstance(parsed, list):
                # A paced stream: the rest of this connection's answers
                # would wait for it; clients send one request at a time.
                assert self._transport is not None
                if out:
                    self._transport.write(b"".join(out))
                self._answers.pacer.start(self._transport, parsed)
                return
            out.append(parsed)
        if out and self._transport is not None:
            if self._delay:
                # One delay for all: answers still leave in request order.
                asyncio.get_running_loop().call_later(
                    self._delay, self._transport.write, b"".join(out)
                )
            else:
                self._transport.write(b"".join(out))

    def _parse_one(self) -> bytes | list[bytes] | None:
        buf = self._buffer
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            if len(buf) > MAX_HEAD:
                self._fail()
            return None
        head = bytes(buf[:end]).split(b"\r\n")
        try:
            method, target, _version = head[0].split(b" ", 2)
        except ValueError:
            self._fail()
            return None
        length = 0
        chunked = False
        for line in head[1:]:
            name, _, value = line.partition(b":")
            lname = name.strip().lower()
            if lname == b"content-length":
                try:
                    length = int(value.strip())
                except ValueError:
                    self._fail()
                    return None
            elif lname == b"transfer-encoding" and b"chunked" in value.lower():
                chunked = True
        start = end + 4
        if chunked:
            decoded = self._dechunk(start)
            if decoded is None:
                return None
            body, consumed = decoded
        else:
            if len(buf) - start < length:
                return None
            body = bytes(buf[start : start + length])
            consumed = start + length
        del buf[:consumed]
        return self._answers.for_request(method, target, body)

    def _dechunk(self, pos: int) -> tuple[bytes, int] | None:
        """A whole chunked body from ``pos``, or None until all of it is here."""
        buf = self._buffer
        body = bytearray()
        while True:
            line_end = buf.find(b"\r\n", pos)
            if line_end < 0:
                return None
            try:
                size = int(bytes(buf[pos:line_end]).split(b";", 1)[0], 16)
            except ValueError:
                self._fail()
                return None
            pos = line_end + 2
            if size == 0:
                # No trailers from the clients we serve: just the final CRLF.
                if len(buf) < pos + 2:
                    return None
                return bytes(body), pos + 2
            if len(buf) < pos + size + 2:
                return None
            body += buf[pos : pos + size]
            pos += size + 2

    def _fail(self) -> None:
        if self._transport is not None:
            self._transport.write(self._answers.bad_request)
            self._transport.close()
        self._buffer.clear()


async def serve(
    port: int,
    chunks: int,
    max_seconds: float,
    delay: float,
    paced: tuple[int, float],
    fail_model: str | None,
) -> None:
    loop = asyncio.get_running_loop()
    answers = Answers(chunks, *paced, fail_model)
    server = await loop.create_server(
        lambda: UpstreamProtocol(answers, delay), "127.0.0.1", port, backlog=4096
    )
    bound = server.sockets[0].getsockname()[1]
    print(f"listening 127.0.0.1:{bound}", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        # Bounded: a forgotten fake upstream goes away by itself.
        await asyncio.wait_for(stop.wait(), timeout=max_seconds)
    except TimeoutError:
        pass
    server.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--port", type=int, default=0, help="TCP port on 127.0.0.1 (0: any free)")
    parser.add_argument("--chunks", type=int, default=20, help="content chunks per stream")
    parser.add_argument(
        "--max-seconds",
        type=float,
        default=600.0,
        help="exit after this long in any case",
    )
    parser.add_argument(
        "--delay-ms", type=float, default=0.0, help="milliseconds before each answer leaves"
    )
    parser.add_argument(
        "--paced-chunks", type=int, default=200, help=f"events of a {PACED_MODEL} stream"
    )
    parser.add_argument(
        "--paced-interval-ms",
        type=float,
        default=50.0,
        help=f"milliseconds between two events of a {PACED_MODEL} stream",
    )
    parser.add_argument("--fail-model", default=None, help="answer 502 to this model")
    args = parser.parse_args(argv)
    paced = (args.paced_chunks, args.paced_interval_ms / 1000)
    delay = args.delay_ms / 1000
    asyncio.run(serve(args.port, args.chunks, args.max_seconds, delay, paced, args.fail_model))
    return 0


if __name__ == "__main__":
    sys.exit(main())
