"""One attempt of the attempt chain (``oaproxy.forward``): what is tried
(``Try``), how long it may take (``Deadline``), and what ends it early.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any, TypeVar

from attrs import frozen
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure
from twisted.web._newclient import RequestNotSent

from oaproxy.config import ResumeMode, Upstream
from oaproxy.requestbody import Splice
from oaproxy.upstreamclient import NoResponse, retry_on_new_connection

# Statuses worth another upstream: the upstream (its key, its quota, its
# health) is the problem. Other 4xx mean the request itself is wrong.
FAILOVER_STATUSES = frozenset({401, 403, 404, 408, 409, 429})

_T = TypeVar("_T")


def fails_over(status: int) -> bool:
    return status >= 500 or status in FAILOVER_STATUSES


@frozen
class Try:
    """One attempt to make: on which upstream, and how."""

    upstream: Upstream
    # Whether oaproxy may add stream_options for usage.
    with_usage: bool = True
    # Retries already made on this upstream.
    retried: int = 0
    # Why it goes on a new connection (the pooled one was closed); None: pooled.
    resent: str | None = None
    # How it continues a broken stream (None: it is no continuation), with
    # the edits that make its body.
    how: ResumeMode | None = None
    splices: tuple[Splice, ...] = ()


class StaleConnection(Exception):
    """The request met a pooled connection the upstream had closed."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class AttemptTimeout(Exception):
    def __init__(self, deadline: float) -> None:
        super().__init__(f"timeout after {deadline:g}s")
        self.deadline = deadline


class Deadline:
    """One attempt's deadline: one reactor timer that, when it fires,
    cancels the Deferred the attempt awaits then (``watch``: its upstream
    request, its body, its stream's first event).

    So the attempt runs in the request's own coroutine: no coroutine of its
    own to cancel, no ``addTimeout`` around it. Whatever the attempt ends
    with once the deadline passed (the cancel's own error, or a canceller
    that made it succeed) it timed out: ``expired`` says so, and a cancel
    while it has not passed is the client's.
    """

    __slots__ = ("_awaited", "_timer", "expired", "seconds")

    def __init__(self, clock: IReactorTime, seconds: float) -> None:
        self.seconds = seconds
        self.expired = False
        self._awaited: Deferred[Any] | None = None
        self._timer = clock.callLater(seconds, self._expire)

    async def run(self, attempt: Awaitable[_T]) -> _T:
        """What ``attempt`` (awaiting through ``watch``) ends with, but
        ``AttemptTimeout`` once the deadline passed; then the timer is gone."""
        try:
            result = await attempt
        except Exception:
            if self.expired:
                raise AttemptTimeout(self.seconds) from None
            raise
        finally:
            self.stop()
        if self.expired:
            raise AttemptTimeout(self.seconds)
        return result

    def watch(self, awaited: Deferred[_T]) -> Deferred[_T]:
        """``awaited``, which the attempt awaits now, cancelled when the
        deadline passes (at once when it has passed: the attempt is over)."""
        self._awaited = awaited
        if self.expired:
            awaited.cancel()
        return awaited

    def stop(self) -> None:
        self._awaited = None
        if self._timer.active():
            self._timer.cancel()

    def _expire(self) -> None:
        self.expired = True
        if self._awaited is not None:
            self._awaited.cancel()


def attempt_deadline(upstream: Upstream, stream: bool, last: bool) -> float:
    """How long one attempt may take before the next upstream is tried."""
    if not stream:
        return upstream.timeout
    if last:
        # Nothing left to fail over to: waiting longer beats failing early.
        return max(upstream.stream_timeout, upstream.timeout)
    return upstream.stream_timeout


def stale_connection(error: Exception) -> bool:
    """A pooled connection that was dead before this request, not a cancel."""
    if isinstance(error, NoResponse):
        # Our upstream client says whether the connection had been reused.
        return retry_on_new_connection(error)
    # Another agent cannot tell: any connection may have come from a pool.
    if isinstance(error, RequestNotSent):
        return True
    reasons: list[Failure] = getattr(error, "reasons", [])
    return not any(r.check(CancelledError) for r in reasons)
