"""What the tests send and what their upstreams answer, built in one place.

- Requests: ``chat_payload`` and ``chat_body`` (a chat completions body, as a
  dict and as bytes: ``FAKE_MODEL`` told ``HI``), ``http_request`` (the bytes of one HTTP/1.1 request),
  ``raw_chat_request`` (a chat request as those bytes), ``multipart`` (a
  multipart/form-data body by hand), ``bearer`` (a client key's header
  line), ``api_path`` (what oaproxy reads in a request path).
- Answers: ``CHAT_ANSWER`` (a chat completion saying "hi"), ``error_body``
  (OpenAI's error object), ``feishu_signature`` (what a Feishu bot with a
  signing secret checks).
- SSE: ``sse`` (``data:`` events), ``sse_event`` (one event of compact JSON),
  ``stream_chunk``, ``chunk_data``, ``content_chunk`` and ``usage_chunk`` (the
  chunks of a chat completion stream), ``compact`` (JSON as OpenAI streams
  it), ``cut`` (bytes split as they may arrive), ``sse_events`` (a stream
  read back).
- Configs: ``upstream`` (one upstream's entry), ``proxy_config`` (a whole
  config as a dict, for YAML), and the keys they use.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Iterable, Sequence
from itertools import pairwise
from typing import Any

from oaproxy.paths import request_path

#: The model the fakes answer for unless asked another.
FAKE_MODEL = "gpt-4o-mini"
#: The conversation of every chat request unless a test says another.
HI: list[Any] = [{"role": "user", "content": "hi"}]

# The keys of EndToEndCase's config.
CLIENT_KEY = "ck-alice-0123456789"
OTHER_KEY = "ck-bob-0123456789"
SK_MAIN = "sk-main-upstream"
SK_BACKUP = "sk-backup-upstream"


# -- requests ---------------------------------------------------------------------


def chat_payload(
    model: str = FAKE_MODEL,
    *,
    stream: bool = False,
    include_usage: bool = False,
    messages: list[Any] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """A chat completions request body, as a dict: one user message, "hi",
    unless ``messages`` says otherwise; ``extra`` fields last."""
    payload: dict[str, Any] = {
        "model": model,
        "messages": [dict(message) for message in HI] if messages is None else messages,
    }
    if stream:
        payload["stream"] = True
    if include_usage:
        payload["stream_options"] = {"include_usage": True}
    payload.update(extra)
    return payload


def chat_body(
    model: str = FAKE_MODEL, *, stream: bool = False, include_usage: bool = False, **extra: Any
) -> bytes:
    """A chat completions request body, as the bytes an SDK sends."""
    return json.dumps(
        chat_payload(model, stream=stream, include_usage=include_usage, **extra)
    ).encode()


def http_request(
    method: bytes,
    path: bytes,
    body: bytes = b"",
    header_lines: Iterable[tuple[bytes, bytes]] = (),
    *,
    chunked: bool = False,
    chunk_size: int = 4096,
    host: bytes = b"proxy.test",
) -> bytes:
    """The bytes of one HTTP/1.1 request."""
    lines = [method + b" " + path + b" HTTP/1.1", b"Host: " + host]
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
    """A chat completions request with a bearer ``key``, as the bytes of HTTP/1.1."""
    return http_request(
        b"POST",
        b"/v1/chat/completions",
        json.dumps(body).encode(),
        [(b"Authorization", b"Bearer " + key.encode()), (b"Content-Type", b"application/json")],
        host=b"127.0.0.1",
    )


def bearer(key: str) -> tuple[bytes, bytes]:
    """The ``Authorization`` header line of a client key."""
    return (b"Authorization", b"Bearer " + key.encode())


def api_path(uri: bytes, routes: Sequence[str] = ()) -> str | None:
    """The API path oaproxy reads in ``uri`` under the route prefixes
    ``routes`` (``oaproxy.paths``); None for a path no API has."""
    where = request_path(uri, routes)
    return None if where is None else where.api_path


def multipart(boundary: bytes, parts: Iterable[tuple[bytes, bytes]]) -> bytes:
    """A multipart/form-data body of (part headers, content) pairs, by hand."""
    out = b""
    for headers, content in parts:
        out += b"--" + boundary + b"\r\n" + headers + b"\r\n\r\n" + content + b"\r\n"
    return out + b"--" + boundary + b"--\r\n"


# -- answers ----------------------------------------------------------------------


def error_body(
    message: str, code: str | None, type: str = "invalid_request_error", param: str | None = None
) -> dict[str, Any]:
    """OpenAI's error object, as oaproxy and the fake upstreams answer it."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


#: A chat completion's answer, as small as an SDK accepts.
CHAT_ANSWER = b'{"choices": [{"message": {"content": "hi"}}]}'


def feishu_signature(timestamp: int, secret: str) -> str:
    """Feishu's documented custom-bot signature, written here independently
    of ``oaproxy.channels``."""
    key = f"{timestamp}\n{secret}".encode()
    return base64.b64encode(hmac.new(key, b"", hashlib.sha256).digest()).decode()


# -- SSE --------------------------------------------------------------------------


def sse(*datas: str | bytes) -> bytes:
    """SSE events, one ``data:`` line each, LF-terminated as OpenAI sends them."""
    out = b""
    for data in datas:
        if isinstance(data, str):
            data = data.encode("utf-8")
        out += b"data: " + data + b"\n\n"
    return out


def sse_events(body: bytes) -> list[Any]:
    """The data of each SSE event of a body, JSON decoded (``[DONE]`` as is)."""
    datas = [e.removeprefix(b"data: ") for e in body.split(b"\n\n") if e]
    return [d.decode() if d == b"[DONE]" else json.loads(d) for d in datas]


def sse_event(payload: Any) -> bytes:
    """One SSE event carrying ``payload`` as compact JSON."""
    return sse(compact(payload))


def stream_chunk(
    index: int,
    delta: dict[str, Any],
    finish: str | None,
    model: str,
    chunk_id: str = "chatcmpl-fake",
    *,
    created: int = 1700000000,
    **extra: Any,
) -> dict[str, Any]:
    """A ``chat.completion.chunk`` with one choice; ``extra`` fields last
    (``usage=None``, ``system_fingerprint=...``, as some upstreams send)."""
    return {
        "id": chunk_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": index, "delta": delta, "finish_reason": finish, "logprobs": None}],
        **extra,
    }


def chunk_data(
    delta: dict[str, Any],
    finish: str | None = None,
    *,
    index: int = 0,
    model: str = FAKE_MODEL,
    **extra: Any,
) -> bytes:
    """The data of one stream event: a chunk as compact JSON."""
    return compact(stream_chunk(index, delta, finish, model, **extra))


def content_chunk(text: str) -> bytes:
    """The data of one stream event whose chunk carries ``text``."""
    return chunk_data({"content": text})


def usage_chunk(
    usage: dict[str, Any], model: str = FAKE_MODEL, chunk_id: str = "chatcmpl-fake", **extra: Any
) -> dict[str, Any]:
    """The last chunk of a stream asked with ``include_usage``: no choices, the usage."""
    return {**stream_chunk(0, {}, None, model, chunk_id, **extra), "choices": [], "usage": usage}


def cut(data: bytes, offsets: list[int]) -> list[bytes]:
    """``data`` split at ``offsets`` (taken modulo its length + 1), in order."""
    points = sorted({0, len(data), *(o % (len(data) + 1) for o in offsets)})
    return [data[a:b] for a, b in pairwise(points)]


def compact(payload: Any) -> bytes:
    """``payload`` as compact JSON, as OpenAI streams it."""
    return json.dumps(payload, separators=(",", ":")).encode("utf-8")


# -- configs ----------------------------------------------------------------------


def upstream(name: str, endpoint: str, sk: str | None = SK_MAIN, **more: Any) -> dict[str, Any]:
    """One entry of a config's ``upstreams``."""
    return {"name": name, "endpoint": endpoint, "sk": sk, **more}


def proxy_config(
    hostname: str, keys: dict[str, Any], upstreams: list[dict[str, Any]], **more: Any
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
