"""Server-sent events on the hot path: split a byte stream into events, read their data.

The relay writes every event exactly as it arrived, so the splitter never
rewrites bytes: the concatenation of all returned events plus ``pending()``
is always the input.  Line ends follow the SSE spec: CRLF, LF or a bare CR,
in any mix; an event ends at a blank line. An event longer than the
splitter's cap (whole, or still unfinished) is refused: an upstream that never
sends a blank line cannot make it hold more.
"""

from __future__ import annotations

import json
import re
from typing import Any

# A blank line is a line terminator right after another one.  "\r(?!\n)"
# keeps a CRLF from being read as CR + LF, which would invent a blank line.
_BLANK_LINE = re.compile(rb"(?:\r\n|\r(?!\n)|\n)(?:\r\n|\r(?!\n)|\n)")
_LINE_END = re.compile(rb"\r\n|\r|\n")

# The longest blank line ("\r\n\r\n") is 4 bytes, so a match that crosses the
# end of what was already searched starts at most 3 bytes before it.
_RESCAN = 3

_CR = 0x0D
_CR_BYTE = b"\r"
_LF = 0x0A
_COLON = 0x3A


class EventTooLarge(Exception):
    """An SSE event longer than the splitter's ``max_event_bytes``."""

    def __init__(self, max_event_bytes: int) -> None:
        super().__init__(f"SSE event over {max_event_bytes} bytes")


class SSESplitter:
    """Incremental SSE event splitter.

    ``feed`` returns each complete event as raw bytes including its
    terminating blank line.  The search resumes where the previous one
    stopped, so a stream fed one byte at a time costs linear time.

    An event whose blank line is a bare CR at the very end of the data fed so
    far stays pending until the next byte shows whether it is the first half
    of a CRLF (which belongs to the same event).  At the end of the stream,
    ``end()`` releases such an event.
    """

    __slots__ = ("_buf", "_max_event_bytes", "_scan")

    def __init__(self, max_event_bytes: int | None = None) -> None:
        self._buf = bytearray()
        # Offset in _buf where the next blank-line search starts.
        self._scan = 0
        self._max_event_bytes = max_event_bytes

    def feed(self, data: bytes) -> list[bytes]:
        """Add received bytes; return the events they complete (maybe none).

        Raises ``EventTooLarge`` when an event, or the one not finished yet,
        is longer than ``max_event_bytes``.
        """
        if self._buf:
            self._buf += data
            return self._split(self._buf, final=False)
        n = len(data)
        if n > 2 and data.find(b"\n") == n - 2 and data[-1] == _LF and _CR_BYTE not in data:
            # One line and the blank line after it (an upstream's usual
            # write): that one event, as the search would find it.
            if self._max_event_bytes is not None and n > self._max_event_bytes:
                raise EventTooLarge(self._max_event_bytes)
            return [data]
        # Nothing pending (the usual read: whole events): split ``data``
        # itself, an event that is all of it without a copy.
        return self._split(data, final=False)

    def end(self) -> list[bytes]:
        """The stream ended: return an event still held back by a trailing CR.

        Whatever stays in ``pending()`` afterwards is an unterminated tail.
        """
        return self._split(self._buf, final=True)

    def pending(self) -> bytes:
        """The bytes received after the last complete event."""
        return bytes(self._buf)

    def _split(self, buf: bytes | bytearray, final: bool) -> list[bytes]:
        """Split the events off ``buf`` (the pending bytes, or a read when
        none were pending); what is left of it is pending after."""
        n = len(buf)
        events: list[bytes] = []
        start = 0
        scan = self._scan
        limit = self._max_event_bytes if self._max_event_bytes is not None else n
        # Without a CR (the usual stream) a blank line is just LF LF, which
        # bytes.find looks for several times faster than the regex.
        lf_only = _CR_BYTE not in buf
        while start < n:
            first = buf[start]
            # A blank line at the start of an event is an event of its own.
            if first == _LF:
                end = start + 1
            elif first == _CR:
                if start + 1 < n:
                    end = start + 2 if buf[start + 1] == _LF else start + 1
                elif final:
                    end = n
                else:
                    break
            elif lf_only:
                found = buf.find(b"\n\n", max(start, scan))
                if found < 0:
                    scan = max(start, n - _RESCAN)
                    break
                end = found + 2
            else:
                match = _BLANK_LINE.search(buf, max(start, scan))
                if match is None:
                    scan = max(start, n - _RESCAN)
                    break
                end = match.end()
                if end == n and buf[end - 1] == _CR and not final:
                    scan = max(start, n - _RESCAN)
                    break
            if end - start > limit:
                raise EventTooLarge(limit)
            events.append(bytes(buf[start:end]))
            start = scan = end
        if n - start > limit:
            raise EventTooLarge(limit)
        if start == n:
            if buf is self._buf:
                # A fresh buffer: the old one keeps the room it grew to.
                self._buf = bytearray()
        elif buf is not self._buf:
            self._buf = bytearray(buf[start:])
        elif start:
            del self._buf[:start]
        self._scan = max(0, scan - start)
        return events


def event_data(event: bytes) -> bytes | None:
    """The event's data: its ``data`` field values joined with LF.

    One space after the colon is removed, comment lines and other fields are
    ignored, and None means the event had no data field at all (a comment or
    keep-alive).
    """
    # The usual event, one "data: " line and the blank line, read at once.
    if event[:6] == b"data: " and event.find(b"\n") == len(event) - 2 and _CR_BYTE not in event:
        return event[6:-2]
    lines = _LINE_END.split(event) if _CR in event else event.split(b"\n")
    values: list[bytes] | None = None
    for line in lines:
        # Cheap rejection of comments, blank lines and other fields.
        if line[:4] != b"data":
            continue
        if len(line) == 4:
            value = b""
        elif line[4] == _COLON:
            value = line[6:] if line[5:6] == b" " else line[5:]
        else:
            continue
        if values is None:
            values = [value]
        else:
            values.append(value)
    if values is None:
        return None
    return values[0] if len(values) == 1 else b"\n".join(values)


# The last event's data and what it parsed to. An event's data is read by
# up to three on its way: a first attempt's resume follower, the record's
# capture and, on a cache miss, the cache's, each given the same bytes object
# in turn: the later ones find its parse here, and one parse serves all.
# Only the reactor's thread reads events; the parsed values are read, never
# changed, by them.
_last_event: list[Any] = [None, None]
_DECODE = json.JSONDecoder().decode


def parse_event(data: bytes | str) -> Any:
    """The JSON of one SSE event's data (None where it is not JSON), parsed
    once for consecutive readers of the same event."""
    last = _last_event
    if data is last[0]:
        return last[1]
    parsed = event_json(data)
    last[0], last[1] = data, parsed
    return parsed


def event_json(data: bytes | str) -> Any:
    """The JSON of an event's data, None where it is not JSON: a parse of
    the caller's own, to change."""
    try:
        if data[:1] == b"{" and data[1:2] != b"\x00":
            # What json.loads does with these bytes (its encoding sniffing
            # says UTF-8 for them), without its checks per call.
            return _DECODE(data.decode("utf-8", "surrogatepass"))  # type: ignore[union-attr]
        return json.loads(data)
    except (ValueError, RecursionError):
        # ValueError covers JSONDecodeError and UnicodeDecodeError.
        return None


def sse_error_event(message: str, type: str = "upstream_error", code: str | None = None) -> bytes:
    """An SSE ``error`` event that OpenAI SDKs turn into an exception.

    The openai Python SDK raises ``APIError`` for any stream chunk whose JSON
    has a truthy ``error`` key (taking ``error.message`` as the message),
    whatever the event name; ``event: error`` is there for generic SSE
    clients.  Ending a broken stream with this makes the client raise instead
    of taking a truncated answer as complete.
    """
    payload = {"error": {"message": message, "type": type, "code": code}}
    # json.dumps escapes CR and LF, so the data stays on one line.
    return (
        b"event: error\ndata: "
        + json.dumps(payload, separators=(",", ":")).encode("ascii")
        + b"\n\n"
    )
