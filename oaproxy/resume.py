"""Mid-stream resume: a committed chat or completion stream that broke
before its finish chunk is continued on the next candidate, and the client
sees one stream.

``ResumeState`` is what one stream relayed so far, across its attempts: the
text (and refusal, and tool-call arguments), whether tool calls or a
refusal were seen (such a stream resumes only with ``restart``), the first
upstream's ``id``, whether the finish chunk went out, the usage each attempt
reported. A ``StreamFollower`` per attempt reads each event on its way to
the client (``oaproxy.relay.StreamRelay``) and, on a continuation, rewrites
it into the first stream: the first ``id``, no second role, a restarted
answer's prefix skipped (and compared: a restart that says something else
ends the stream, never splices two answers), usage summed over attempts.

How a continuation asks is ``oaproxy.resumebody``'s.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from enum import Enum
from typing import Any

from attrs import define, field

from oaproxy.config import ResumeMode, Upstream
from oaproxy.sse import event_json, parse_event
from oaproxy.textruns import TextRuns


class StreamKind(Enum):
    """The streams that can be resumed, by what their chunks carry."""

    CHAT = "/v1/chat/completions"  # choices[].delta
    COMPLETION = "/v1/completions"  # choices[].text


#: A part of an answer that is compared when a restart skips it: the text,
#: a refusal, one tool call's (or the legacy function call's) arguments.
Channel = tuple[str, int]
CONTENT: Channel = ("content", 0)
REFUSAL: Channel = ("refusal", 0)
FUNCTION: Channel = ("function_call", 0)
#: The reasoning deltas: vLLM's and DeepSeek's, and OpenRouter's.
REASONING: tuple[Channel, ...] = (("reasoning_content", 0), ("reasoning", 0))
#: A chat delta's members as text channels, compared and skipped by name.
_TEXTS: tuple[tuple[str, Channel], ...] = (
    ("content", CONTENT),
    ("refusal", REFUSAL),
    *((channel[0], channel) for channel in REASONING),
)
#: The delta members a continuation knows how to carry on (others: see
#: ``ResumeState.untracked``).
_TRACKED = frozenset({"role", "tool_calls", "function_call", *(name for name, _ in _TEXTS)})
_USAGE_COUNTS = ("prompt_tokens", "completion_tokens", "total_tokens")
#: Characters of text (all channels) a stream is followed for; past them
#: it is not resumed (and the first attempt's events are no longer read).
MAX_FOLLOWED_TEXT = 1024 * 1024


class UpstreamErrorEvent(Exception):
    """The upstream sent an ``{"error": …}`` event mid-stream."""


class Diverged(Exception):
    """A restarted answer is not the one already relayed."""

    def __init__(self) -> None:
        super().__init__("the restarted answer differs from the text already sent")


def stream_kind(api_path: str) -> StreamKind | None:
    """The kind of stream a request path asks for, if it can be resumed."""
    try:
        return StreamKind(api_path)
    except ValueError:
        return None


@define(eq=False)
class ResumeState:
    """What one client's stream carried so far, over all its attempts."""

    kind: StreamKind
    # Whether a candidate is left that would continue it (the forwarder's).
    continuable: Callable[[ResumeState], bool] = field(default=lambda state: False)
    # The record's observer of the stream's events (the forwarder's
    # ``on_event``), kept for the continuations: the record sees one answer.
    observer: Callable[[bytes], bool] | None = None
    relayed: dict[Channel, TextRuns] = field(factory=dict)
    # Characters kept in ``relayed``; past ``MAX_FOLLOWED_TEXT`` the stream
    # is ``over``: too long to be resumed.
    kept: int = 0
    over: bool = False
    # Characters of text relayed (an attempt's ``resumed_at``).
    chars: int = 0
    tools_or_refusal: bool = False
    # A delta member it does not follow carried something (audio, say): a
    # continuation could neither skip nor repeat it, so none is made.
    untracked: bool = False
    several_choices: bool = False
    first_id: str | None = None
    finished: bool = False
    # The tool calls (by index) whose id and name the client has.
    tool_heads: set[int] = field(factory=set)
    # The last usage each earlier attempt reported.
    usages: list[Mapping[str, Any]] = field(factory=list)

    @property
    def resumable(self) -> bool:
        """Whether a break now can be continued: one choice, not finished,
        and a candidate left to do it."""
        return (
            not self.several_choices
            and not self.finished
            and not self.untracked
            and not self.over
            and self.continuable(self)
        )

    @property
    def text(self) -> str:
        content = self.relayed.get(CONTENT)
        return content.joined() if content is not None else ""

    def how(self, upstream: Upstream) -> ResumeMode:
        """How ``upstream`` continues this stream (OFF: it does not)."""
        thinking = CONTENT not in self.relayed and any(c in self.relayed for c in REASONING)
        if upstream.resume is ResumeMode.PREFILL and (self.tools_or_refusal or thinking):
            # A prefill carries the answer's text only: the rest (a break
            # before the answer, in its reasoning) is asked for again.
            return ResumeMode.RESTART
        return upstream.resume

    def summed(self, usage: Mapping[str, Any]) -> dict[str, Any]:
        """``usage`` (the final attempt's) plus what earlier ones reported."""
        total = dict(usage)
        for earlier in self.usages:
            for name in _USAGE_COUNTS:
                value, more = total.get(name), earlier.get(name)
                if isinstance(value, int) and isinstance(more, int):
                    total[name] = value + more
        return total


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class StreamFollower:
    """Reads one attempt's events for its stream's ``ResumeState``; on a
    continuation (``how`` set) rewrites them into the first attempt's stream.

    Only when a break would be continued (``can_resume``) is an upstream's
    error event a break; else it is passed on as it came.

    A first attempt's events are only read, from the parse the record's
    capture reads too (``parse_event``: one parse per event, and the texts
    kept here are the capture's own strings, not copies); a continuation's
    are parsed afresh, as they are rewritten.
    """

    # One per attempt of every open stream.
    __slots__ = ("_how", "_skip", "_state", "usage")

    def __init__(self, state: ResumeState, how: ResumeMode | None) -> None:
        self._state = state
        self._how = how
        self._skip: dict[Channel, str] = (
            {channel: text.joined() for channel, text in state.relayed.items()}
            if how is ResumeMode.RESTART
            else {}
        )
        self.usage: Mapping[str, Any] | None = None

    @property
    def can_resume(self) -> bool:
        return self._state.resumable

    def ended(self) -> None:
        """The attempt broke: what it reported counts in the summed usage."""
        if self.usage is not None:
            self._state.usages.append(self.usage)
            self.usage = None

    def done(self) -> None:
        """The attempt sent ``[DONE]``: the stream is over, whatever broke
        after it. Raises ``Diverged`` for a restart that ends before it
        said what the client has."""
        if any(self._skip.values()):
            raise Diverged()
        self._state.finished = True

    def rewrite(self, event: bytes, data: bytes) -> tuple[bytes, bytes] | None:
        """The event (and its data) to pass on for ``event``; None to leave
        it out. Raises ``UpstreamErrorEvent`` or ``Diverged``."""
        if self._state.over and self._how is None:
            # Too long to be resumed: the first attempt's events need not be read.
            return event, data
        # A continuation's chunk is changed: a parse of its own.
        chunk = parse_event(data) if self._how is None else event_json(data)
        if not isinstance(chunk, dict):
            return event, data
        error = chunk.get("error")
        if error and self.can_resume:
            message = error.get("message") if isinstance(error, dict) else error
            raise UpstreamErrorEvent(f"upstream sent an error event: {message}")
        state = self._state
        continuing = self._how is not None
        if not continuing and state.first_id is None and isinstance(chunk.get("id"), str):
            state.first_id = chunk["id"]
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            self.usage = usage
        choices = chunk.get("choices")
        if not continuing:
            # The first attempt's bytes go as they came: its choices are only followed.
            if isinstance(choices, list):
                for choice in choices:
                    if isinstance(choice, dict):
                        self._choice(choice)
            return event, data
        kept = choices
        if isinstance(choices, list):
            kept = [c for c in choices if not isinstance(c, dict) or self._choice(c)]
        if choices and not kept and not isinstance(usage, dict):
            return None
        if isinstance(kept, list):
            chunk["choices"] = kept
        if state.first_id is not None and "id" in chunk:
            chunk["id"] = state.first_id
        if isinstance(usage, dict):
            chunk["usage"] = state.summed(usage)
        rewritten = json.dumps(chunk, separators=(",", ":")).encode("utf-8")
        return b"data: " + rewritten + b"\n\n", rewritten

    def _choice(self, choice: dict[str, Any]) -> bool:
        """Follow one choice; whether it still carries anything."""
        state = self._state
        index = choice.get("index", 0)
        if index != 0:
            state.several_choices = True
            return True
        carries = False
        if state.kind is StreamKind.CHAT:
            delta = choice.get("delta")
            if isinstance(delta, dict):
                carries = self._delta(delta)
        else:
            text = choice.get("text")
            if isinstance(text, str):
                taken = self._take(CONTENT, text)
                if self._how is not None:
                    choice["text"] = taken
                carries = bool(taken)
        finish = choice.get("finish_reason")
        if finish is not None:
            if any(self._skip.values()):
                # Finished before saying what the client already has.
                raise Diverged()
            state.finished = True
            carries = True
        return carries

    def _delta(self, delta: dict[str, Any]) -> bool:
        state = self._state
        if self._how is not None:
            delta.pop("role", None)
        # (The usual delta has only tracked members: checked at C speed.)
        if not _TRACKED.issuperset(delta) and any(
            value not in (None, "", [], {}) for name, value in delta.items() if name not in _TRACKED
        ):
            state.untracked = True
        for name, channel in _TEXTS:
            piece = delta.get(name)
            if not isinstance(piece, str):
                continue
            if channel is REFUSAL:
                state.tools_or_refusal = True
            taken = self._take(channel, piece)
            if self._how is None:
                continue
            if taken:
                delta[name] = taken
            else:
                del delta[name]
        calls = delta.get("tool_calls")
        if isinstance(calls, list):
            state.tools_or_refusal = True
            kept = [
                call
                for position, call in enumerate(calls)
                if not isinstance(call, dict) or self._call(call, position)
            ]
            if self._how is not None:
                if kept:
                    delta["tool_calls"] = kept
                else:
                    del delta["tool_calls"]
        function = delta.get("function_call")
        if isinstance(function, dict):
            state.tools_or_refusal = True
            if not self._arguments(function, FUNCTION, -1) and self._how is not None:
                del delta["function_call"]
        return bool(delta)

    def _call(self, call: dict[str, Any], position: int) -> bool:
        index = call.get("index", position)
        index = index if _count(index) else position
        function = call.get("function")
        if not isinstance(function, dict):
            function = {}
        return self._arguments(function, ("tool", index), index, call) or self._how is None

    def _arguments(
        self,
        function: dict[str, Any],
        channel: Channel,
        index: int,
        call: dict[str, Any] | None = None,
    ) -> bool:
        """Follow a tool call's (or function call's) head and arguments;
        whether anything of it is left to pass on."""
        state = self._state
        head = call if call is not None else function
        if index in state.tool_heads and self._how is not None:
            # The client has this call's id and name from the first attempt.
            for name in ("id", "type"):
                head.pop(name, None)
            function.pop("name", None)
        elif "name" in function or "id" in head:
            state.tool_heads.add(index)
        arguments = function.get("arguments")
        if isinstance(arguments, str):
            taken = self._take(channel, arguments)
            if self._how is not None:
                if taken:
                    function["arguments"] = taken
                else:
                    del function["arguments"]
        if call is not None and self._how is not None and not function and "function" in call:
            del call["function"]
        left = set(head) - {"index"}
        return bool(left) or bool(function)

    def _take(self, channel: Channel, piece: str) -> str:
        """What of ``piece`` is new to the client (a restart skips what it
        has, and raises ``Diverged`` where it differs); it is kept."""
        skip = self._skip.get(channel)
        if skip:
            n = min(len(skip), len(piece))
            if piece[:n] != skip[:n]:
                raise Diverged()
            self._skip[channel] = skip[n:]
            piece = piece[n:]
        state = self._state
        if piece and not state.over:
            state.kept += len(piece)
            state.over = state.kept > MAX_FOLLOWED_TEXT
            state.relayed.setdefault(channel, TextRuns()).append(piece)
        if channel == CONTENT:
            state.chars += len(piece)
        return piece
