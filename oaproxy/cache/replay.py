"""Cached answers in the form each request asks for.

An entry is a completion as a non-stream request gets it (JSON). A stream
request gets it as a well-formed SSE stream (``stream_from_completion``):
a role chunk, the content chunks, a finish chunk per choice, a usage chunk
when the client asked for one, ``data: [DONE]``. A streamed answer is stored
as the completion it amounts to (``StreamedAnswer``, from the reassembly
that records use). Chat completions and legacy completions convert both
ways; other answers (embeddings) are served as stored, to non-stream
requests only.
"""

from __future__ import annotations

import json
from typing import Any

from oaproxy.capture import StreamCapture
from oaproxy.record import usage_document
from oaproxy.sse import parse_event

CHAT = "chat.completion"
CHAT_CHUNK = "chat.completion.chunk"
TEXT = "text_completion"

# What every chunk of a replayed stream repeats from the completion.
_HEAD_FIELDS = ("id", "created", "model", "system_fingerprint", "service_tier")
# What a stream's first chunk is kept of while the stream runs.
_KEPT_OF_HEAD = (*_HEAD_FIELDS, "object")

DONE = b"data: [DONE]\n\n"
_COMPACT = (",", ":")


def stream_from_completion(completion: dict[str, Any], include_usage: bool) -> bytes | None:
    """The SSE stream of a chat or legacy completion; None for other answers."""
    kind = completion.get("object")
    choices = completion.get("choices")
    if kind not in (CHAT, TEXT) or not isinstance(choices, list):
        return None
    head = {name: completion[name] for name in _HEAD_FIELDS if name in completion}
    head["object"] = CHAT_CHUNK if kind == CHAT else TEXT
    events: list[bytes] = []
    for position, choice in enumerate(choices):
        if not isinstance(choice, dict):
            return None
        index = choice.get("index", position)
        parts = _chat_parts(choice) if kind == CHAT else _text_parts(choice)
        events.extend(_event({**head, "choices": [{"index": index, **part}]}) for part in parts)
    usage = completion.get("usage")
    if include_usage and isinstance(usage, dict):
        events.append(_event({**head, "choices": [], "usage": usage}))
    events.append(DONE)
    return b"".join(events)


def _chat_parts(choice: dict[str, Any]) -> list[dict[str, Any]]:
    """One choice of a chat completion as the choice parts of its chunks."""
    message = choice.get("message")
    if not isinstance(message, dict):
        message = {}
    deltas: list[dict[str, Any]] = [{"role": "assistant", "content": ""}]
    content = message.get("content")
    if isinstance(content, str) and content:
        deltas.append({"content": content})
    if isinstance(message.get("refusal"), str):
        deltas.append({"refusal": message["refusal"]})
    tool_calls = message.get("tool_calls")
    if isinstance(tool_calls, list) and tool_calls:
        calls = [
            {"index": n, **call} for n, call in enumerate(tool_calls) if isinstance(call, dict)
        ]
        deltas.append({"tool_calls": calls})
    if isinstance(message.get("function_call"), dict):
        deltas.append({"function_call": message["function_call"]})
    logprobs = choice.get("logprobs")
    parts = [{"delta": delta, "logprobs": None, "finish_reason": None} for delta in deltas]
    if logprobs is not None:
        # All in one chunk, with the last delta: clients join them in order anyway.
        parts[-1]["logprobs"] = logprobs
    parts.append({"delta": {}, "logprobs": None, "finish_reason": choice.get("finish_reason")})
    return parts


def _text_parts(choice: dict[str, Any]) -> list[dict[str, Any]]:
    """One choice of a legacy completion as the choice parts of its chunks."""
    text = choice.get("text")
    return [
        {
            "text": text if isinstance(text, str) else "",
            "logprobs": choice.get("logprobs"),
            "finish_reason": None,
        },
        {"text": "", "logprobs": None, "finish_reason": choice.get("finish_reason")},
    ]


def json_body(value: Any) -> bytes:
    """``value`` as a compact JSON document, UTF-8."""
    try:
        return json.dumps(value, separators=_COMPACT, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        # A lone surrogate from a "\ud800" escape cannot be UTF-8; escape all.
        return json.dumps(value, separators=_COMPACT).encode("ascii")


def _event(chunk: dict[str, Any]) -> bytes:
    return b"data: " + json_body(chunk) + b"\n\n"


class StreamedAnswer:
    """A streamed answer as it arrives (each event's data), for the completion
    it amounts to once it ended with ``[DONE]``."""

    def __init__(self, max_bytes: int) -> None:
        self._capture = StreamCapture(max_bytes)
        # Of the first chunk, the id, model and kind every chunk repeats
        # ({} when it was no JSON object): not its choices, held for as
        # long as the stream runs.
        self._head: dict[str, Any] | None = None
        self.ended = False

    def feed(self, data: bytes) -> None:
        if data == b"[DONE]":
            self.ended = True
            return
        if self._head is None:
            chunk = parse_event(data)
            fields = chunk if isinstance(chunk, dict) else {}
            self._head = {name: fields[name] for name in _KEPT_OF_HEAD if name in fields}
        self._capture.feed(data)

    def completion(self) -> bytes | None:
        """The completion (JSON), or None: the stream did not end with
        ``[DONE]``, broke off with an error, was cut at the byte limit, had
        several choices (their parts are not kept apart), held a tool call
        without an id, or is not a chat or legacy completion."""
        head = self._head
        if not self.ended or head is None:
            return None
        captured = self._capture.result()
        calls = captured.tool_calls or []
        if (
            captured.truncated
            or captured.error is not None
            or len(captured.texts) != 1
            or any(call.get("id") is None for call in calls)
        ):
            return None
        kind = head.get("object")
        if kind == CHAT_CHUNK:
            message: dict[str, Any] = {"role": "assistant", "content": captured.text}
            if captured.refusal is not None:
                message["refusal"] = captured.refusal
            if calls:
                message["tool_calls"] = calls
            choice: dict[str, Any] = {"index": 0, "message": message}
            kind = CHAT
        elif kind == TEXT:
            choice = {"index": 0, "text": captured.text or "", "logprobs": None}
        else:
            return None
        choice["finish_reason"] = captured.finish_reason
        completion = {name: head[name] for name in _HEAD_FIELDS if name in head}
        completion.update(object=kind, choices=[choice])
        if captured.usage is not None:
            completion["usage"] = usage_document(captured.usage)
        return json_body(completion)
