"""Records for the tests that feed records to metrics, readiness, alerts,
sinks and the CLI: one builder each, overridden per test.

- ``attempt``, ``usage``, ``record``: the typed values, a served non-stream
  chat completion through ``alpha`` unless told otherwise; ``numbered``, the
  n-th record of a run.
- ``stored_attempt``: an attempt in its stored form, written out by hand.
- ``record_event`` and ``emit``: a record as the log event the sinks observe.
- ``read_json_lines``: what a JSON-lines file (records, spool, log) holds.
"""

from __future__ import annotations

import json
from typing import Any

import attrs

from oaproxy.record import Attempt, FailureKind, Outcome, Record, Usage
from oaproxy.sinks.queue import RECORD_NAMESPACE


def attempt(
    upstream: str = "alpha",
    status: int | None = 200,
    error: str | None = None,
    ttfb: float | None = 0.1,
    duration: float | None = 0.2,
    failure: FailureKind | None = None,
) -> Attempt:
    """One attempt: a served 200 unless told otherwise."""
    return Attempt(upstream, status, error, ttfb, duration, failure)


def usage(prompt: int, completion: int = 0, total: int | None = None) -> Usage:
    return Usage(prompt, completion, prompt + completion if total is None else total)


_BASE = Record(
    id="0" * 32,
    time=1700000000.0,
    hostname="edge-1",
    client_ip="127.0.0.1",
    key_name="k1",
    user_agent="test",
    method="POST",
    path="/v1/chat/completions",
    model="gpt-4o-mini",
    stream=False,
    attempts=(attempt(),),
    upstream="alpha",
    status=200,
    outcome=Outcome.OK,
    error=None,
    ttfb=0.5,
    duration=0.6,
    bytes_in=0,
    bytes_out=0,
    request_body=None,
    request_headers=None,
    response_text=None,
    tool_calls=None,
    finish_reason=None,
    truncated=(),
    usage=None,
    cost=None,
)


def record(**overrides: Any) -> Record:
    """A record as the proxy makes it, of a served non-stream chat completion
    through ``alpha`` unless overridden (``attempts`` may be any iterable)."""
    if "attempts" in overrides:
        overrides["attempts"] = tuple(overrides["attempts"])
    if "truncated" in overrides:
        overrides["truncated"] = tuple(overrides["truncated"])
    return attrs.evolve(_BASE, **overrides)


def numbered(number: int, **overrides: Any) -> Record:
    """The ``number``-th record of a run: its id says its number, its time is
    ``number`` seconds after the base record's."""
    fields: dict[str, Any] = {"id": f"r{number:04d}", "time": _BASE.time + number}
    fields.update(overrides)
    return record(**fields)


def stored_attempt(
    upstream: str,
    status: int | None = None,
    error: str | None = None,
    ttfb: float | None = None,
    duration: float = 0.0,
    **later: Any,
) -> dict[str, Any]:
    """One attempt as the stores hold it (no failure kind), written out by
    hand rather than through ``oaproxy.record``; ``later``: the keys stored
    only when set (``resumed``, ``resumed_at``, ``retried``, ``resent``)."""
    return {
        "upstream": upstream,
        "status": status,
        "error": error,
        "ttfb": ttfb,
        "duration": duration,
        **later,
    }


def record_event(record: Record) -> dict[str, Any]:
    """The log event by which a record reaches the sinks."""
    return {"log_namespace": RECORD_NAMESPACE, "record": record}


def emit(sink: Any, record: Record) -> None:
    """Give a sink's log observer the event of one record."""
    sink.observer(record_event(record))


def read_json_lines(path: str) -> list[Any]:
    """Every JSON document of a JSON-lines file, one a line."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]
