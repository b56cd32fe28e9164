"""OpenAI's rate-limit headers, as oaproxy's limits give them.

``x-ratelimit-limit-requests``, ``x-ratelimit-remaining-requests`` and
``x-ratelimit-reset-requests`` (``-tokens`` likewise) describe the most
constrained of the limits that apply to a request: the one with the least
remaining (counting this request), and of those the one furthest from its
reset. Durations are written as OpenAI writes them (Go's format at
millisecond precision: ``20ms``, ``1s``, ``1m26.4s``, ``6m0s``).
``Retry-After`` is whole seconds, rounded up.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

from twisted.web.http_headers import Headers

from oaproxy.traffic.counters import Reading


def openai_duration(seconds: float) -> str:
    """``seconds`` as OpenAI's reset headers write it, rounded up to the millisecond."""
    milliseconds = max(0, math.ceil(round(seconds * 1000, 6)))
    if milliseconds == 0:
        return "0s"
    if milliseconds < 1000:
        return f"{milliseconds}ms"
    hours, rest = divmod(milliseconds, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    whole, fraction = divmod(rest, 1000)
    text = f"{whole}.{fraction:03d}".rstrip("0").rstrip(".") + "s"
    if hours:
        return f"{hours}h{minutes}m{text}"
    if minutes:
        return f"{minutes}m{text}"
    return text


def retry_after(seconds: float) -> str:
    """``Retry-After``: whole seconds, rounded up, at least 1."""
    return str(max(1, math.ceil(round(seconds, 6))))


def most_constrained(readings: Sequence[Reading]) -> Reading:
    """The reading the headers describe: least remaining, then latest reset."""
    return min(readings, key=lambda r: (r.remaining, -r.reset))


def longest_wait(readings: Sequence[Reading]) -> Reading:
    """Of refusing readings, the one that keeps the request out longest
    (one that can never fit first)."""
    return max(readings, key=lambda r: math.inf if r.wait is None else r.wait)


# The three header names of each kind of limit, made once.
_RATE_HEADERS = {
    what: tuple(f"x-ratelimit-{part}-{what}".encode() for part in ("limit", "remaining", "reset"))
    for what in ("requests", "tokens")
}


# Reset values written before: an admitted request's reset on a moving
# window is the window itself, the same value every time, so most requests
# find theirs here (fixed windows' resets change every request: bounded).
@functools.lru_cache(maxsize=1024)
def _reset_value(seconds: float) -> bytes:
    return openai_duration(seconds).encode()


def set_rate_headers(headers: Headers, what: str, reading: Reading) -> None:
    """The three ``x-ratelimit-*-{what}`` headers (``requests`` or ``tokens``)."""
    limit, remaining, reset = _RATE_HEADERS[what]
    headers.setRawHeaders(limit, [b"%d" % reading.limit])
    headers.setRawHeaders(remaining, [b"%d" % reading.remaining])
    headers.setRawHeaders(reset, [_reset_value(reading.reset)])


def set_retry_after(headers: Headers, seconds: float | None) -> None:
    """``Retry-After`` for a refusal; a request that can never fit (None)
    is told not to retry instead."""
    if seconds is None:
        set_no_retry(headers)
        return
    headers.setRawHeaders(b"retry-after", [retry_after(seconds).encode()])


def set_no_retry(headers: Headers) -> None:
    """``x-should-retry: false``, which the OpenAI SDKs obey: a retry soon
    cannot succeed (a spent budget, a request larger than a limit)."""
    headers.setRawHeaders(b"x-should-retry", [b"false"])
