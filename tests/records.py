"""Typed records for the tests that feed records to metrics, readiness,
alerts, sinks and the CLI: one builder each, overridden per test."""

from __future__ import annotations

from typing import Any

import attrs

from oaproxy.record import Attempt, FailureKind, Outcome, Record, Usage


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
