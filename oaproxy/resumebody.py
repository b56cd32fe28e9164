"""How a continuation of a broken stream asks its upstream (``oaproxy.resume``).

``prefill`` sends the request again with the text so far as a last
assistant message (a completion's string prompt with the text appended),
plus the upstream's ``resume_body`` members, edited into the client's bytes
like every other change (``oaproxy.requestbody``), whatever the body's size;
``restart`` sends the request as it was.
"""

from __future__ import annotations

import json

from oaproxy.config import Upstream
from oaproxy.inspection import Inspected, parse_json
from oaproxy.jsonscan import Member
from oaproxy.requestbody import RequestBody, Splice
from oaproxy.resume import StreamKind

# How far from a value's end its closing bracket is looked for.
_TAIL = 4096
# A completion's prompt longer than this is not read to be prefilled.
_MAX_PROMPT = 1024 * 1024


def prefill_splices(
    inspected: Inspected, kind: StreamKind, text: str, upstream: Upstream
) -> tuple[Splice, ...] | None:
    """The edits that make a prefill request of the client's body: the text
    so far as the last assistant message (a completion's string prompt with
    it appended), and ``upstream``'s ``resume_body`` members; None when the
    body cannot say it (no messages list, a prompt that is no string)."""
    body = inspected.body
    members = {m.key: m for m in inspected.fields.read_by_model}
    if kind is StreamKind.CHAT:
        messages = members.get("messages")
        if messages is None or _read(body, messages.value_start, messages.value_start + 1) != b"[":
            return None
        message = json.dumps({"role": "assistant", "content": text}).encode("ascii")
        at = messages.value_end - 1
        empty = _empty_array(body, messages)
        splices = [Splice(at, at, message if empty else b"," + message)]
    else:
        prompt = members.get("prompt")
        if prompt is None or prompt.value_end - prompt.value_start > _MAX_PROMPT:
            return None
        value = parse_json(_read(body, prompt.value_start, prompt.value_end))
        if not isinstance(value, str):
            return None
        continued = json.dumps(value + text).encode("ascii")
        splices = [Splice(prompt.value_start, prompt.value_end, continued)]
    if upstream.resume_body:
        close = _object_close(body)
        if close is None:
            return None
        added = b"".join(
            b"," + json.dumps(name).encode("ascii") + b":" + json.dumps(value).encode("ascii")
            for name, value in upstream.resume_body.items()
        )
        # Last, so that they win over a member of the same name the client gave.
        splices.append(Splice(close, close, added))
    return tuple(splices)


def _read(body: RequestBody, start: int, end: int) -> bytes:
    if body.data is not None:
        return body.data[start:end]
    assert body.file is not None
    # Each attempt's reader seeks before it reads: sharing the file is safe.
    body.file.seek(start)
    return body.file.read(end - start)


def _empty_array(body: RequestBody, member: Member) -> bool:
    start = max(member.value_start, member.value_end - _TAIL)
    tail = _read(body, start, member.value_end - 1).rstrip()
    # No element of a list ends with "[": only its opening bracket does.
    return tail.endswith(b"[")


def _object_close(body: RequestBody) -> int | None:
    """Where the body's top-level ``}`` is."""
    start = max(0, body.size - _TAIL)
    tail = _read(body, start, body.size)
    at = tail.rfind(b"}")
    return None if at < 0 else start + at
