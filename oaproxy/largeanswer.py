"""What a record keeps of a non-stream answer too large to parse.

Parsing holds the reactor: ``json.loads`` takes about 2 ms per MiB of text
and 30 ms per MiB of numbers (embeddings), and a thread would not help, as
the parser never lets go of the GIL (a 256 MiB embeddings answer parsed in a
thread still stopped the reactor for 6 s). So an answer over
``MAX_PARSED_ANSWER`` is only looked at near its ends: the record keeps its
usage, found there, and marks its text truncated.
"""

from __future__ import annotations

import json
import re

from attrs import frozen

from oaproxy.capture import CapturedResponse, normalise_usage
from oaproxy.record import Usage

#: Non-stream answers up to this size are parsed for the record.
MAX_PARSED_ANSWER = 1024 * 1024
#: How far from each end of a larger answer its usage is looked for.
USAGE_WINDOW = 64 * 1024

_USAGE_KEY = re.compile(r'"usage"\s*:\s*(?=\{)')


@frozen
class AnswerEnds:
    """The first and last ``USAGE_WINDOW`` bytes of a large answer; a capture
    (``result()``) as the record reads one."""

    head: bytes
    tail: bytes

    def result(self) -> CapturedResponse:
        return CapturedResponse(usage=self._usage(), truncated=("response_text",))

    def _usage(self) -> Usage | None:
        """From a ``"usage"`` key's object near the end (where
        OpenAI-compatible servers put it, after the data) or the start,
        decoded alone: a bounded look, whatever the answer's size."""
        for window in (self.tail, self.head):
            usage = _usage_in(window.decode("utf-8", "replace"))
            if usage is not None:
                return usage
        return None


def _usage_in(window: str) -> Usage | None:
    """The usage of the last ``"usage"`` key in ``window`` that has one."""
    decoder = json.JSONDecoder()
    for match in reversed(list(_USAGE_KEY.finditer(window))):
        quote = before = match.start()
        while before and window[before - 1] == "\\":
            before -= 1
        if (quote - before) % 2:
            continue  # \"usage\" inside a string: text, not a key
        try:
            value, _ = decoder.raw_decode(window, match.end())
        except (ValueError, RecursionError):
            continue
        usage = normalise_usage(value)
        if usage is not None:
            return usage
    return None
