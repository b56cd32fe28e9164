"""Stream pacing (``limits.stream_pace``, openai-forward's TOKEN_RATE_LIMIT):
a stream's content events go to the client at most at the route's rate,
evenly spaced (a bucket of one: the first at once, each next one an
interval after the one before).

Only content events take a turn: the role chunk, the finish chunk, the
usage chunk and ``[DONE]`` wait behind the content before them (the order
never changes) but are not spaced. The ``Pacer`` delays writes with the
reactor's clock and, while it holds events back, asks the relay to keep
the upstream paused (the relay's own backpressure), so at most one
upstream read is ever held in memory.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

from twisted.internet.interfaces import IDelayedCall, IReactorTime

from oaproxy.config import Rate
from oaproxy.sse import event_data
from oaproxy.traffic.routes import RouteTable


class StreamPace:
    """The seconds between two content events, per route."""

    def __init__(self, paces: Mapping[str, Rate]) -> None:
        self._routes = RouteTable(
            {route: rate.seconds / rate.amount for route, rate in paces.items()}
        )

    def __bool__(self) -> bool:
        return bool(self._routes)

    def interval(self, api_path: str) -> float | None:
        """For a request's API path; None when its route is not paced."""
        matched = self._routes.match(api_path) if self._routes else None
        return matched[1] if matched is not None else None


def is_content_event(data: bytes) -> bool:
    """Whether an SSE event's data carries content: text, a tool call, a
    refusal (chat and completions chunks), or a Responses API ``*.delta``."""
    try:
        chunk = json.loads(data)
    except ValueError:
        return False
    if not isinstance(chunk, dict):
        return False
    kind = chunk.get("type")
    if isinstance(kind, str):
        return kind.endswith(".delta")
    choices = chunk.get("choices")
    if not isinstance(choices, list):
        return False
    return any(_has_content(choice) for choice in choices)


def _has_content(choice: Any) -> bool:
    if not isinstance(choice, dict):
        return False
    if choice.get("text"):
        return True
    delta = choice.get("delta")
    if not isinstance(delta, dict):
        return False
    return any(value for name, value in delta.items() if name != "role")


class Pacer:
    """Writes events in order, content events one ``interval`` apart.

    ``hold(True)`` is called when events start waiting (pause the upstream),
    ``hold(False)`` once none waits; ``drained`` callbacks run then too.
    """

    def __init__(
        self,
        clock: IReactorTime,
        interval: float,
        write: Callable[[bytes], None],
        hold: Callable[[bool], None],
    ) -> None:
        self._clock = clock
        self._interval = interval
        self._write = write
        self._hold = hold
        self._queue: deque[tuple[bytes, bool]] = deque()
        self._next_content = -float("inf")
        self._timer: IDelayedCall | None = None
        self._drained: list[Callable[[], None]] = []

    def feed(self, events: list[bytes]) -> None:
        """Events to write, each whole (SSE framing included)."""
        was_idle = not self._queue
        for event in events:
            data = event_data(event)
            self._queue.append((event, data is not None and is_content_event(data)))
        if was_idle and self._timer is None:
            self._drain()

    def when_drained(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` once every event fed so far is written."""
        if not self._queue:
            callback()
        else:
            self._drained.append(callback)

    def stop(self) -> None:
        """Forget what waits (the stream is over, or the client left)."""
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._queue.clear()
        self._drained.clear()

    def _drain(self) -> None:
        self._timer = None
        now = self._clock.seconds()
        out: list[bytes] = []
        while self._queue:
            event, content = self._queue[0]
            if content:
                wait = self._next_content - now
                if wait > 0:
                    self._timer = self._clock.callLater(wait, self._drain)
                    break
                self._next_content = now + self._interval
            out.append(event)
            self._queue.popleft()
        if out:
            self._write(b"".join(out))
        self._hold(bool(self._queue))
        if not self._queue:
            drained, self._drained = self._drained, []
            for callback in drained:
                callback()
