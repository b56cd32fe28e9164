"""The counters of what the attempt chain did beyond failing over: the
resumes of broken streams and the retries on one upstream, counted from a
finished request's record (``oaproxy.metrics``)."""

from __future__ import annotations

from collections.abc import Callable

from oaproxy.record import Attempt, FailureKind, Record
from oaproxy.tallies import Tallies

#: The ``result`` of a resume: it finished the answer; its upstream refused
#: the prefill (then restarted); the restart said something else; it failed
#: (before its first event, or it broke too).
RESUME_RESULTS = ("ok", "refused", "diverged", "failed")


def resume_result(attempt: Attempt) -> str:
    """The ``result`` label of an attempt that continued a broken stream."""
    if attempt.failure is None:
        return "ok"
    if attempt.failure is FailureKind.DIVERGED:
        return "diverged"
    if attempt.resumed == "prefill" and attempt.status in (400, 422):
        return "refused"
    return "failed"


class AttemptCounters:
    """``oaproxy_stream_resumes_total{upstream, how, result}`` and
    ``oaproxy_retries_total{upstream, reason}``, labelled by
    ``upstream_label`` (configured names, else "other")."""

    def __init__(self, tallies: Tallies, upstream_label: Callable[[str], str]) -> None:
        self._upstream_label = upstream_label
        self._resumes = tallies.tally(
            "oaproxy_stream_resumes",
            "Attempts that continued a broken stream, by upstream, how and result.",
            ["upstream", "how", "result"],
        )
        self._retries = tallies.tally(
            "oaproxy_retries",
            "Attempts followed by a retry on the same upstream, by upstream and reason.",
            ["upstream", "reason"],
        )

    def count(self, record: Record) -> None:
        """Count the resumes and retries among a finished request's attempts."""
        for attempt in record.attempts:
            if attempt.resumed is None and attempt.retried is None:
                continue
            upstream = self._upstream_label(attempt.upstream)
            if attempt.resumed is not None:
                self._resumes.inc((upstream, attempt.resumed, resume_result(attempt)))
            if attempt.retried is not None:
                self._retries.inc((upstream, attempt.retried))
