"""When the limiter's backend cannot be asked (Redis down or too slow):
``limits.on_backend_error`` says what the request gets, every failure is
counted in ``oaproxy_limiter_backend_errors_total``, and the log says so at
most once per ``LOG_INTERVAL`` (with how many failed meanwhile), so an
outage does not flood it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from oaproxy.config import BackendErrorPolicy
from oaproxy.errors import ErrorAnswer
from oaproxy.pipeline import Verdict
from oaproxy.relay import describe

LOG_INTERVAL = 60.0

_T = TypeVar("_T")

UNAVAILABLE = ErrorAnswer(
    503,
    "The rate limiter is unavailable; try again shortly.",
    type="server_error",
    code="limiter_unavailable",
)


class BackendTrouble:
    """Counts, logs and decides about the backend's failures."""

    log = Logger()

    def __init__(
        self,
        policy: BackendErrorPolicy,
        clock: IReactorTime,
        count: Callable[[], None],
    ) -> None:
        self._policy = policy
        self._clock = clock
        self._count = count
        self._logged_at: float | None = None
        self._unlogged = 0

    def checked(
        self, result: _T | Deferred[_T], decide: Callable[[_T], Verdict]
    ) -> Verdict | Deferred[Verdict]:
        """``decide`` on an acquisition's result, or what the policy says
        when the backend failed."""
        if isinstance(result, Deferred):
            return result.addCallbacks(decide, self.unavailable)
        return decide(result)

    def unavailable(self, failure: Failure) -> Verdict | Failure:
        """The answer while the backend fails: none (serve) or a 503."""
        if failure.check(CancelledError):
            # The client went away while we waited: not the backend's fault.
            return failure
        self.failed(failure, "checking a limit")
        return None if self._policy is BackendErrorPolicy.OPEN else UNAVAILABLE

    def failed(self, failure: Failure, doing: str) -> None:
        """Count one failure; log it unless one was logged within the interval."""
        self._count()
        now = self._clock.seconds()
        if self._logged_at is not None and now - self._logged_at < LOG_INTERVAL:
            self._unlogged += 1
            return
        _, error = describe(failure)
        self.log.warn(
            "limiter backend failed {doing} ({error}); requests are {treated}"
            " ({unlogged} more failures since the last message)",
            doing=doing,
            error=error,
            treated="served" if self._policy is BackendErrorPolicy.OPEN else "refused with 503",
            unlogged=self._unlogged,
        )
        self._logged_at = now
        self._unlogged = 0
