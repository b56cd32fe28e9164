"""Large request bodies for a real daemon, from processes of their own (so
that the test's reactor only watches): ``python -m tests.bodyload``

- ``sink``: an OpenAI-ish upstream that reads each request body whole,
  keeping none of it, and answers a chat completion (an SSE stream when the
  body asks for one) with ``X-Received: <bytes>``; prints ``listening PORT``.
- ``send PORT KEY COUNT MIB``: COUNT concurrent chat requests to the proxy
  on PORT, each a body of MIB MiB (every other one a stream), written as
  fast as the proxy reads; prints one JSON line: each answer's status,
  ``error.code``, ``Retry-After`` and the bytes the sink received.
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

_CHUNK = 1 << 20
_COMPLETION = json.dumps(
    {
        "id": "chatcmpl-load",
        "object": "chat.completion",
        "model": "gpt-4o-mini",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }
).encode()
_STREAM = b'data: {"choices":[{"index":0,"delta":{"content":"ok"}}]}\n\ndata: [DONE]\n\n'


def _headers(head: bytes) -> dict[str, str]:
    lines = head.decode("latin-1").split("\r\n")[1:]
    return {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}


async def _serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            headers = _headers((await reader.readuntil(b"\r\n\r\n"))[:-4])
            left = int(headers.get("content-length", "0"))
            received = 0
            start = b""
            while left:
                data = await reader.read(min(_CHUNK, left))
                if not data:
                    return
                if len(start) < 256:
                    start += data[:256]
                received += len(data)
                left -= len(data)
            stream = b'"stream": true' in start
            body, kind = (
                (_STREAM, b"text/event-stream") if stream else (_COMPLETION, b"application/json")
            )
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: %s\r\nContent-Length: %d\r\n"
                b"X-Received: %d\r\n\r\n%s" % (kind, len(body), received, body)
            )
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def sink() -> None:
    server = await asyncio.start_server(_serve, "127.0.0.1", 0)
    print("listening", server.sockets[0].getsockname()[1], flush=True)
    async with server:
        await server.serve_forever()


async def _one(port: int, key: str, index: int, size: int) -> dict[str, Any]:
    stream = b', "stream": true' if index % 2 else b""
    opening = b'{"model": "gpt-4o-mini"' + stream + b', "messages": [{"role": "user", "content": "'
    closing = b'"}]}'
    length = len(opening) + size + len(closing)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: proxy\r\nConnection: close\r\n"
        b"Content-Type: application/json\r\nAuthorization: Bearer %s\r\n"
        b"Content-Length: %d\r\n\r\n" % (key.encode(), length) + opening
    )
    chunk = b"x" * _CHUNK
    for offset in range(0, size, _CHUNK):
        writer.write(chunk[: min(_CHUNK, size - offset)])
        await writer.drain()
    writer.write(closing)
    answer = await reader.read()
    writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1]) if head else 0
    headers = _headers(head)
    code = None
    if status >= 400:
        code = json.loads(body).get("error", {}).get("code")
    return {
        "status": status,
        "code": code,
        "retry_after": headers.get("retry-after"),
        "received": int(headers.get("x-received", "0")),
        "sent": length,
    }


async def send(port: int, key: str, count: int, mib: int) -> None:
    answers = await asyncio.gather(*(_one(port, key, i, mib << 20) for i in range(count)))
    print(json.dumps(answers), flush=True)


def main(argv: list[str]) -> None:
    if argv[0] == "sink":
        asyncio.run(sink())
    else:
        port, key, count, mib = argv[1:]
        asyncio.run(send(int(port), key, int(count), int(mib)))


if __name__ == "__main__":
    main(sys.argv[1:])
