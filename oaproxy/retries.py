"""Same-upstream retries: which failures are tried again on the same
upstream before the next candidate, and how long to wait first.

A 429, 500, 502, 503 or 504, and a connection reset before any response
byte, are retried up to the upstream's ``retries`` times, after an
exponential backoff with jitter (``retry_backoff`` doubled each time, times
a random factor in [0.5, 1)). A ``Retry-After`` (seconds or an HTTP date) is
waited for instead, when it is within ``max_retry_after`` and what is left
of the upstream's deadline; a longer one leaves the upstream at once (its
attempt keeps the header, and the circuit breaker holds the circuit open as
asked). A deadline is never retried: a silent upstream is left at once, as
retrying it only multiplies the wait. Whatever the waits, no upstream gets
more than ``ATTEMPTS_PER_SECOND`` attempts of one request in a second
(``spacing``: the forwarder's other attempts again on the same upstream, a
refused prefill's restart and a request sent without ``stream_options``,
wait for it too).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

from attrs import frozen
from twisted.internet.defer import CancelledError
from twisted.web._newclient import ResponseNeverReceived

from oaproxy.circuits import retry_after
from oaproxy.config import Config, Upstream

#: Answers worth the same upstream again: it is busy or broke for a moment.
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
#: The reason of a retry after a connection reset (the others are statuses).
RESET = "reset"
ATTEMPTS_PER_SECOND = 2


@frozen
class RetryPolicy:
    """The ``retries``, ``retry_backoff`` and ``max_retry_after`` settings,
    with the randomness of the jitter and the wall clock an HTTP date is
    read on."""

    backoff: float
    max_retry_after: float
    rng: random.Random
    wall_clock: Callable[[], float]

    @classmethod
    def from_config(
        cls, config: Config, rng: random.Random, wall_clock: Callable[[], float]
    ) -> RetryPolicy:
        return cls(config.retry_backoff, config.max_retry_after, rng, wall_clock)

    def wait(
        self,
        upstream: Upstream,
        retried: int,
        header: str | None,
        remaining: float,
        starts: Sequence[float],
        now: float,
    ) -> float | None:
        """Seconds to wait before retrying ``upstream`` once more, or None
        to leave it: ``retried`` retries made so far, ``header`` its
        Retry-After (if any), ``remaining`` the seconds left of its
        deadline, ``starts`` when each of this request's attempts on it
        started."""
        if retried >= upstream.retries:
            return None
        if header is not None:
            asked = retry_after(header, self.wall_clock())
            if asked is None:
                # Junk or a past date: as if there were none.
                wait = self._backoff(retried)
            elif asked > self.max_retry_after:
                return None
            else:
                wait = asked
        else:
            wait = self._backoff(retried)
        wait = max(wait, spacing(starts, now))
        return wait if wait < remaining else None

    def _backoff(self, retried: int) -> float:
        return float(self.backoff * 2**retried * self.rng.uniform(0.5, 1.0))


def spacing(starts: Sequence[float], now: float) -> float:
    """Seconds to wait before another attempt on an upstream whose attempts
    of this request started at ``starts``, so that it gets no more than
    ``ATTEMPTS_PER_SECOND`` in a second (0: none)."""
    if len(starts) < ATTEMPTS_PER_SECOND:
        return 0.0
    return max(0.0, starts[-ATTEMPTS_PER_SECOND] + 1.0 - now)


def retry_reason(status: int | None, error: BaseException | None) -> str | None:
    """Why an attempt is worth retrying on its upstream ("429", "503",
    ``RESET``), or None when it is not."""
    if status is not None:
        return str(status) if status in RETRY_STATUSES else None
    # (Our upstream client's NoResponse is one too.)
    if isinstance(error, ResponseNeverReceived) and not any(
        reason.check(CancelledError) for reason in error.reasons
    ):
        return RESET
    return None
