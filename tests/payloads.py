"""What the tests send and what their upstreams answer, built in one place.

- Requests: ``chat_body`` (a chat completions body), ``http_request`` (the
  bytes of one HTTP/1.1 request), ``raw_chat_request`` (a chat request as
  those bytes).
- SSE: ``sse`` (``data:`` events), ``sse_event`` (one event of compact JSON),
  ``stream_chunk`` (a ``chat.completion.chunk``).
- Configs: ``upstream`` (one upstream's entry), ``proxy_config`` (a whole
  config as a dict, for YAML), and the keys they use.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

#: The model the fakes answer for unless asked another.
FAKE_MODEL = "gpt-4o-mini"

# The keys of EndToEndCase's config.
CLIENT_KEY = "ck-alice-0123456789"
OTHER_KEY = "ck-bob-0123456789"
SK_MAIN = "sk-main-upstream"
SK_BACKUP = "sk-backup-upstream"


# -- requests ---------------------------------------------------------------------


def chat_body(
    model: str = FAKE_MODEL, *, stream: bool = False, include_usage: bool = False
) -> bytes:
    """A chat completions request body: one user message, "hi"."""
    payload: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
    if stream:
        payload["stream"] = True
    if include_usage:
        payload["stream_options"] = {"include_usage": True}
    return json.dumps(payload).encode()


def http_request(
    method: bytes,
    path: bytes,
    body: bytes = b"",
    header_lines: Iterable[tuple[bytes, bytes]] = (),
    *,
    chunked: bool = False,
    chunk_size: int = 4096,
) -> bytes:
    """The bytes of one HTTP/1.1 request."""
    lines = [method + b" " + path + b" HTTP/1.1", b"Host: proxy.test"]
    lines.extend(name + b": " + value for name, value in header_lines)
    if chunked:
        lines.append(b"Transfer-Encoding: chunked")
        framed = b"".join(
            b"%x\r\n" % len(body[i : i + chunk_size]) + body[i : i + chunk_size] + b"\r\n"
            for i in range(0, len(body), chunk_size)
        )
        payload = framed + b"0\r\n\r\n"
    else:
        if body or method in (b"POST", b"PUT", b"PATCH"):
            lines.append(b"Content-Length: %d" % len(body))
        payload = body
    return b"\r\n".join(lines) + b"\r\n\r\n" + payload


def raw_chat_request(body: dict[str, Any], key: str) -> bytes:
    """A chat completions request as the bytes of HTTP/1.1."""
    data = json.dumps(body).encode()
    return (
        b"POST /v1/chat/completions HTTP/1.1\r\n"
        b"Host: 127.0.0.1\r\n"
        b"Authorization: Bearer " + key.encode() + b"\r\n"
        b"Content-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % len(data)
    ) + data


# -- SSE --------------------------------------------------------------------------


def sse(*datas: str | bytes) -> bytes:
    """SSE events, one ``data:`` line each, LF-terminated as OpenAI sends them."""
    out = b""
    for data in datas:
        if isinstance(data, str):
            data = data.encode("utf-8")
        out += b"data: " + data + b"\n\n"
    return out


def sse_event(payload: Any) -> bytes:
    """One SSE event carrying ``payload`` as compact JSON."""
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode("utf-8") + b"\n\n"


def stream_chunk(
    index: int,
    delta: dict[str, Any],
    finish: str | None,
    model: str,
    chunk_id: str = "chatcmpl-fake",
) -> dict[str, Any]:
    """A ``chat.completion.chunk`` with one choice."""
    return {
        "id": chunk_id,
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": model,
        "choices": [{"index": index, "delta": delta, "finish_reason": finish, "logprobs": None}],
    }


# -- configs ----------------------------------------------------------------------


def upstream(name: str, endpoint: str, sk: str | None = SK_MAIN, **more: Any) -> dict[str, Any]:
    return {"name": name, "endpoint": endpoint, "sk": sk, **more}


def proxy_config(
    hostname: str, keys: dict[str, str], upstreams: list[dict[str, Any]], **more: Any
) -> dict[str, Any]:
    """A config without a database and with 10 s deadlines, and ``more``."""
    config: dict[str, Any] = {
        "dbtype": "none",
        "hostname": hostname,
        "authorization": keys,
        "timeout": 10,
        "stream_timeout": 10,
        "stream_idle_timeout": 10,
        "upstreams": upstreams,
    }
    config.update(more)
    return config
