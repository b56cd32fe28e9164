"""What a record keeps of a request body and of the answer, read on the hot path.

Everything here is pure and cheap: streams are reassembled chunk by chunk
with a byte budget, and nothing here logs.
"""

from __future__ import annotations

import json
import math
from typing import Any

from attrs import frozen

from oaproxy.config import Price
from oaproxy.inspection import content_texts, media_type, parse_json
from oaproxy.multipart import describe_multipart
from oaproxy.record import JSONObject, Usage
from oaproxy.sse import parse_event
from oaproxy.textruns import TextRuns

_COMPACT = (",", ":")

#: Joins the texts of several choices (``n > 1``) into one ``response_text``.
CHOICE_SEPARATOR = "\n\n"

_TEXT_TYPES = frozenset(
    {
        "application/json",
        "application/x-ndjson",
        "application/jsonl",
        "application/x-www-form-urlencoded",
        "application/xml",
        "application/yaml",
        "application/javascript",
    }
)


def _is_text_type(kind: str) -> bool:
    return kind.startswith("text/") or kind in _TEXT_TYPES or kind.endswith(("+json", "+xml"))


def _utf8_boundary(data: bytes | bytearray, limit: int) -> int:
    """The largest offset <= limit that does not split a UTF-8 sequence."""
    if limit >= len(data):
        return len(data)
    if limit <= 0:
        return 0
    cut = limit
    # Step back over at most three continuation bytes to the sequence start.
    while cut > 0 and limit - cut < 3 and data[cut] & 0xC0 == 0x80:
        cut -= 1
    return cut if data[cut] & 0xC0 != 0x80 else limit


def truncate_text(text: str, max_bytes: int) -> tuple[str, bool]:
    """Cut text to at most max_bytes of UTF-8 at a character boundary.

    Returns the text and whether it was cut.
    """
    # Four bytes per character is the UTF-8 worst case: no encoding needed.
    if len(text) * 4 <= max_bytes:
        return text, False
    if text.isascii():
        if len(text) <= max_bytes:
            return text, False
        return text[: max(max_bytes, 0)], True
    # surrogatepass: JSON may carry lone surrogates ("\ud800"); keep them as is.
    encoded = text.encode("utf-8", "surrogatepass")
    if len(encoded) <= max_bytes:
        return text, False
    cut = _utf8_boundary(encoded, max_bytes)
    return encoded[:cut].decode("utf-8", "surrogatepass"), True


def _decode_prefix(data: bytes, max_bytes: int) -> tuple[str, bool]:
    """Decode at most max_bytes of data as UTF-8 (errors replaced)."""
    if len(data) <= max_bytes:
        return data.decode("utf-8", "replace"), False
    cut = _utf8_boundary(data, max_bytes)
    return data[:cut].decode("utf-8", "replace"), True


def _int(value: object) -> int:
    # bool is an int subclass, but a token count of True is nonsense.
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float) and math.isfinite(value):
        return int(value)
    return 0


def normalise_usage(usage: object) -> Usage | None:
    """The record's usage: prompt, completion and total tokens as ints.

    Accepts chat/completions/embeddings usage (``prompt_tokens``…) and
    Responses API usage (``input_tokens``/``output_tokens``).  Details such
    as cached or reasoning tokens are dropped: the record and the SQL
    columns carry the three totals.  None when there are no token counts.
    """
    if not isinstance(usage, dict):
        return None
    if "prompt_tokens" in usage or "completion_tokens" in usage:
        prompt = _int(usage.get("prompt_tokens"))
        completion = _int(usage.get("completion_tokens"))
    elif "input_tokens" in usage or "output_tokens" in usage:
        prompt = _int(usage.get("input_tokens"))
        completion = _int(usage.get("output_tokens"))
    elif "total_tokens" in usage:
        prompt = completion = 0
    else:
        return None
    total = usage.get("total_tokens")
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=_int(total) if total is not None else prompt + completion,
    )


def cost(usage: Usage | None, price: Price | None) -> float | None:
    """US dollars for the usage at a per-million-tokens price; None if either is unknown."""
    if usage is None or price is None:
        return None
    return (usage.prompt_tokens * price.input + usage.completion_tokens * price.output) / 1_000_000


def keeps_text(content_type: str | bytes | None) -> bool:
    """Whether ``describe_body`` keeps a body of this type as text: then the
    head of a large one is all it needs."""
    kind = media_type(content_type)
    return kind is None or _is_text_type(kind)


def describe_body(
    body: bytes, content_type: str | bytes | None, max_bytes: int
) -> tuple[str | JSONObject | None, bool]:
    """The request body as a record keeps it, and whether it was truncated.

    JSON and text bodies become text (UTF-8, errors replaced) of at most
    max_bytes.  multipart/form-data is described field by field: files by
    name, filename, content type and size, short text fields with their
    value; file contents are never kept.  Other bodies are described by
    content type and size.  An empty body is None.
    """
    if not body:
        return None, False
    kind = media_type(content_type)
    if kind is None:
        # No content type: keep it as text only when it is text.
        head_cut = _utf8_boundary(body, max_bytes)
        try:
            body[:head_cut].decode("utf-8")
        except UnicodeDecodeError:
            return {"content_type": None, "size": len(body)}, False
        return _decode_prefix(body, max_bytes)
    if _is_text_type(kind):
        return _decode_prefix(body, max_bytes)
    if kind == "multipart/form-data":
        return describe_multipart(body, content_type or "")
    return {"content_type": kind, "size": len(body)}, False


@frozen
class CapturedResponse:
    """What a record keeps of an answer.

    ``text`` is the answer text: choice 0's text, or, when the answer had
    several choices (``n > 1``), every choice's text in index order joined
    with ``CHOICE_SEPARATOR``; ``texts`` has them one by one.  None when no
    choice had any text (tool calls only, embeddings, non-JSON bodies).
    ``tool_calls`` are whole calls ``{"id", "type", "function": {"name",
    "arguments"}}`` of every choice in order (a legacy ``function_call`` is
    given the same shape with id None).  ``finish_reason`` is choice 0's.
    ``usage`` is normalised (see ``normalise_usage``).  ``truncated`` names the
    record fields cut at the byte limit ("response_text", "tool_calls",
    "refusal").  ``error`` is the ``error`` object of an error body or chunk.
    """

    text: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    finish_reason: str | None = None
    refusal: str | None = None
    usage: Usage | None = None
    truncated: tuple[str, ...] = ()
    error: dict[str, Any] | None = None
    texts: tuple[str | None, ...] = ()


class _Budget:
    """A byte budget for one record field; pieces past it are dropped."""

    __slots__ = ("left", "truncated")

    def __init__(self, max_bytes: int) -> None:
        self.left = max_bytes
        self.truncated = False

    def take(self, piece: str) -> str | None:
        if self.truncated:
            return None
        size = len(piece) if piece.isascii() else len(piece.encode("utf-8", "surrogatepass"))
        if size <= self.left:
            self.left -= size
            return piece
        kept, _ = truncate_text(piece, self.left)
        self.left = 0
        self.truncated = True
        return kept


class _ToolCall:
    __slots__ = ("arguments", "call_id", "name", "type")

    def __init__(self) -> None:
        self.call_id: str | None = None
        self.type: str | None = None
        self.name: str | None = None
        self.arguments = TextRuns()

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.call_id,
            "type": self.type or "function",
            "function": {"name": self.name, "arguments": self.arguments.joined()},
        }


class _Choice:
    __slots__ = ("finish_reason", "function_call", "refusal", "text", "tool_calls")

    def __init__(self) -> None:
        # Kept in runs: a stream open for long holds its text, not a string per event.
        self.text: TextRuns | None = None
        self.refusal: TextRuns | None = None
        self.finish_reason: str | None = None
        self.tool_calls: dict[int, _ToolCall] = {}
        self.function_call: _ToolCall | None = None


class _Assembler:
    """Answer parts by choice, under the byte budgets of their record fields."""

    def __init__(self, max_bytes: int) -> None:
        self.choices: dict[int, _Choice] = {}
        self.usage: Usage | None = None
        self.error: dict[str, Any] | None = None
        self.text_budget = _Budget(max_bytes)
        self.refusal_budget = _Budget(max_bytes)
        self.tool_budget = _Budget(max_bytes)

    def choice(self, index: object) -> _Choice:
        key = index if isinstance(index, int) else 0
        choice = self.choices.get(key)
        if choice is None:
            choice = self.choices[key] = _Choice()
        return choice

    def add_text(self, choice: _Choice, piece: object) -> None:
        if not isinstance(piece, str):
            return
        if choice.text is None:
            choice.text = TextRuns()
        kept = self.text_budget.take(piece)
        if kept:
            choice.text.append(kept)

    def add_refusal(self, choice: _Choice, piece: object) -> None:
        if not isinstance(piece, str):
            return
        if choice.refusal is None:
            choice.refusal = TextRuns()
        kept = self.refusal_budget.take(piece)
        if kept:
            choice.refusal.append(kept)

    def add_tool_call(self, choice: _Choice, delta: object, position: int) -> None:
        if not isinstance(delta, dict):
            return
        index = delta.get("index")
        call_id = delta.get("id")
        calls = choice.tool_calls
        if not isinstance(index, int) or isinstance(index, bool):
            # Providers that omit "index": a new id starts a new call, no id
            # continues the last one, and a whole list is taken by position.
            if isinstance(call_id, str):
                index = next((k for k, c in calls.items() if c.call_id == call_id), None)
                if index is None:
                    index = max(calls, default=-1) + 1
            elif calls:
                index = max(calls)
            else:
                index = position
        call = calls.get(index)
        if call is None:
            call = calls[index] = _ToolCall()
        self._merge_call(call, delta)

    def add_function_call(self, choice: _Choice, delta: object) -> None:
        if not isinstance(delta, dict):
            return
        if choice.function_call is None:
            choice.function_call = _ToolCall()
        self._merge_call(choice.function_call, {"function": delta})

    def _merge_call(self, call: _ToolCall, delta: dict[str, Any]) -> None:
        # id, type and name come once (some providers repeat them); only the
        # arguments arrive in pieces.
        if call.call_id is None and isinstance(delta.get("id"), str):
            call.call_id = delta["id"]
        if call.type is None and isinstance(delta.get("type"), str):
            call.type = delta["type"]
        function = delta.get("function")
        if not isinstance(function, dict):
            return
        if call.name is None and isinstance(function.get("name"), str):
            call.name = function["name"]
        arguments = function.get("arguments")
        if arguments is None:
            return
        if not isinstance(arguments, str):
            # Some servers send the arguments as an object, not a JSON string.
            arguments = json.dumps(arguments, separators=_COMPACT)
        kept = self.tool_budget.take(arguments)
        if kept:
            call.arguments.append(kept)

    def result(self) -> CapturedResponse:
        order = sorted(self.choices)
        texts = tuple(
            None if (kept := self.choices[i].text) is None else kept.joined() for i in order
        )
        present = [t for t in texts if t is not None]
        if len(order) <= 1:
            text = texts[0] if texts else None
        else:
            text = CHOICE_SEPARATOR.join(present) if present else None
        tool_calls: list[dict[str, Any]] = []
        refusals: list[str] = []
        finish_reason = None
        for i in order:
            choice = self.choices[i]
            tool_calls.extend(choice.tool_calls[k].as_dict() for k in sorted(choice.tool_calls))
            if choice.function_call is not None:
                tool_calls.append(choice.function_call.as_dict())
            if choice.refusal is not None:
                refusals.append(choice.refusal.joined())
            if finish_reason is None:
                finish_reason = choice.finish_reason
        if 0 in self.choices and self.choices[0].finish_reason is not None:
            finish_reason = self.choices[0].finish_reason
        truncated = tuple(
            name
            for name, budget in (
                ("response_text", self.text_budget),
                ("tool_calls", self.tool_budget),
                ("refusal", self.refusal_budget),
            )
            if budget.truncated
        )
        return CapturedResponse(
            text=text,
            tool_calls=tool_calls or None,
            finish_reason=finish_reason,
            refusal=CHOICE_SEPARATOR.join(refusals) if refusals else None,
            usage=self.usage,
            truncated=truncated,
            error=self.error,
            texts=texts,
        )


class StreamCapture:
    """Reassembles a streamed answer from its SSE events' data.

    Understands chat completion chunks (content, refusal, tool call and
    legacy function call deltas, any number of choices), legacy completion
    chunks (``choices[i].text``), Responses API text deltas, usage chunks and
    mid-stream ``{"error": …}`` chunks.  Each record field keeps at most
    max_bytes of UTF-8; the rest is dropped and the field named in
    ``result().truncated``.
    """

    __slots__ = ("_assembler",)

    def __init__(self, max_bytes: int) -> None:
        self._assembler = _Assembler(max_bytes)

    def feed(self, data: bytes | str | None) -> bool:
        """Take one event's data (from ``event_data``).

        Returns True when the chunk is usage only (``"choices": []`` with a
        ``usage`` object): the chunk that ``include_usage`` adds, which a
        client that did not ask for it must not see.
        """
        if not data:
            return False
        if data[:6] == (b"[DONE]" if isinstance(data, bytes) else "[DONE]"):
            return False
        chunk = parse_event(data)
        if not isinstance(chunk, dict):
            return False
        assembler = self._assembler
        usage = chunk.get("usage")
        if usage is not None:
            normalised = normalise_usage(usage)
            if normalised is not None:
                assembler.usage = normalised
        choices = chunk.get("choices")
        if isinstance(choices, list):
            for choice_chunk in choices:
                if isinstance(choice_chunk, dict):
                    self._feed_choice(choice_chunk)
            return not choices and isinstance(usage, dict)
        kind = chunk.get("type")
        if isinstance(kind, str):
            self._feed_response_event(kind, chunk)
        error = chunk.get("error")
        if error and isinstance(error, dict):
            assembler.error = error
        return False

    def _feed_choice(self, chunk: dict[str, Any]) -> None:
        assembler = self._assembler
        choice = assembler.choice(chunk.get("index"))
        delta = chunk.get("delta")
        if isinstance(delta, dict):
            content = delta.get("content")
            if content is not None:
                assembler.add_text(choice, content)
            refusal = delta.get("refusal")
            if refusal is not None:
                assembler.add_refusal(choice, refusal)
            tool_calls = delta.get("tool_calls")
            if isinstance(tool_calls, list):
                for position, call in enumerate(tool_calls):
                    assembler.add_tool_call(choice, call, position)
            function_call = delta.get("function_call")
            if function_call is not None:
                assembler.add_function_call(choice, function_call)
        else:
            text = chunk.get("text")
            if text is not None:
                assembler.add_text(choice, text)
        finish_reason = chunk.get("finish_reason")
        if isinstance(finish_reason, str):
            choice.finish_reason = finish_reason

    def _feed_response_event(self, kind: str, chunk: dict[str, Any]) -> None:
        # Responses API (/v1/responses) streams: typed events, no choices.
        assembler = self._assembler
        if kind == "response.output_text.delta":
            assembler.add_text(assembler.choice(0), chunk.get("delta"))
        elif kind == "response.refusal.delta":
            assembler.add_refusal(assembler.choice(0), chunk.get("delta"))
        elif kind in ("response.completed", "response.incomplete", "response.failed"):
            response = chunk.get("response")
            if isinstance(response, dict):
                normalised = normalise_usage(response.get("usage"))
                if normalised is not None:
                    assembler.usage = normalised
                status = response.get("status")
                if isinstance(status, str):
                    assembler.choice(0).finish_reason = status
                error = response.get("error")
                if error and isinstance(error, dict):
                    assembler.error = error

    def result(self) -> CapturedResponse:
        """What was captured so far."""
        return self._assembler.result()


def capture_json_response(body: bytes, max_bytes: int) -> CapturedResponse:
    """``capture_json_document`` of a non-stream answer's bytes."""
    return capture_json_document(parse_json(body), max_bytes)


def capture_json_document(obj: object, max_bytes: int) -> CapturedResponse:
    """What a record keeps of a non-stream answer, parsed (``parse_json``).

    Chat completions (message content, refusal, tool calls, finish reason),
    legacy completions (``text``), Responses API objects, transcriptions
    (``text``), embeddings (usage only) and error bodies (``text`` is the whole body as compact JSON, cut
    at max_bytes).  A body that is not a JSON object captures nothing.  (A
    large one is not parsed at all: see ``oaproxy.largeanswer``.)
    """
    if not isinstance(obj, dict):
        return CapturedResponse()
    error = obj.get("error")
    if error:
        text, cut = truncate_text(
            json.dumps(obj, separators=_COMPACT, ensure_ascii=False), max_bytes
        )
        return CapturedResponse(
            text=text,
            truncated=("response_text",) if cut else (),
            error=error if isinstance(error, dict) else {"message": str(error)},
        )
    choices = obj.get("choices")
    if isinstance(choices, list) and len(choices) == 1 and _plain(choices[0]):
        # The common answer, kept as the assembler keeps it, without one.
        content = choices[0]["message"].get("content")
        plain, cut = (None, False) if content is None else truncate_text(content, max_bytes)
        finish = choices[0].get("finish_reason")
        return CapturedResponse(
            text=plain,
            finish_reason=finish if isinstance(finish, str) else None,
            usage=normalise_usage(obj.get("usage")),
            truncated=("response_text",) if cut else (),
            texts=(plain,),
        )
    assembler = _Assembler(max_bytes)
    assembler.usage = normalise_usage(obj.get("usage"))
    if isinstance(choices, list):
        for position, choice_obj in enumerate(choices):
            if isinstance(choice_obj, dict):
                _capture_choice(assembler, choice_obj, position)
    elif obj.get("object") == "response":
        _capture_response_object(assembler, obj)
    elif isinstance(obj.get("text"), str):
        # Transcriptions and translations: {"text": ...}.
        assembler.add_text(assembler.choice(0), obj["text"])
    return assembler.result()


def _plain(choice: object) -> bool:
    """A choice of a message of plain text (or none), without calls or refusal."""
    message = choice.get("message") if isinstance(choice, dict) else None
    return (
        isinstance(message, dict)
        and isinstance(message.get("content"), (str, type(None)))
        and message.get("refusal") is None
        and message.get("tool_calls") is None
        and message.get("function_call") is None
    )


def _capture_choice(assembler: _Assembler, obj: dict[str, Any], position: int) -> None:
    index = obj.get("index")
    choice = assembler.choice(index if isinstance(index, int) else position)
    message = obj.get("message")
    if isinstance(message, dict):
        content = message.get("content")
        if isinstance(content, list):
            # Content parts: keep the text ones.
            content = "".join(content_texts(content))
        if content is not None:
            assembler.add_text(choice, content)
        refusal = message.get("refusal")
        if refusal is not None:
            assembler.add_refusal(choice, refusal)
        tool_calls = message.get("tool_calls")
        if isinstance(tool_calls, list):
            for call_position, call in enumerate(tool_calls):
                if isinstance(call, dict):
                    assembler.add_tool_call(choice, {**call, "index": call_position}, call_position)
        function_call = message.get("function_call")
        if function_call is not None:
            assembler.add_function_call(choice, function_call)
    elif "text" in obj:
        assembler.add_text(choice, obj.get("text"))
    finish_reason = obj.get("finish_reason")
    if isinstance(finish_reason, str):
        choice.finish_reason = finish_reason


def _capture_response_object(assembler: _Assembler, obj: dict[str, Any]) -> None:
    choice = assembler.choice(0)
    status = obj.get("status")
    if isinstance(status, str):
        choice.finish_reason = status
    output = obj.get("output")
    if not isinstance(output, list):
        return
    for position, item in enumerate(output):
        if not isinstance(item, dict):
            continue
        kind = item.get("type")
        if kind == "message" and isinstance(item.get("content"), list):
            for part in item["content"]:
                if not isinstance(part, dict):
                    continue
                if part.get("type") == "output_text":
                    assembler.add_text(choice, part.get("text"))
                elif part.get("type") == "refusal":
                    assembler.add_refusal(choice, part.get("refusal"))
        elif kind == "function_call":
            call = {
                "index": position,
                "id": item.get("call_id"),
                "type": "function",
                "function": {
                    "name": item.get("name"),
                    "arguments": item.get("arguments"),
                },
            }
            assembler.add_tool_call(choice, call, position)
