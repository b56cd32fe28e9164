"""One client request as the forwarder handles it: what the client asked
for (``Call``), each attempt on an upstream (``AttemptLog``), and the state
from which its record is made (``Exchange``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from attrs import define, field, frozen
from twisted.web.http_headers import Headers

from oaproxy.cache.ticket import CacheTicket
from oaproxy.capture import StreamCapture
from oaproxy.config import ResumeMode, Upstream
from oaproxy.credentials import token_text
from oaproxy.inspection import Inspected, parse_json
from oaproxy.largeanswer import AnswerEnds
from oaproxy.metrics import ActiveRequest
from oaproxy.record import FailureKind, LimitRefusal, Outcome, upstream_at_fault
from oaproxy.relay import CollectedBody, StreamRelay
from oaproxy.resume import ResumeState

if TYPE_CHECKING:
    # It imports this module.
    from oaproxy.traffic.tokens import Reservation


@frozen
class Call:
    """What the client asked for, parsed once, shared by every attempt."""

    method: bytes
    path: bytes  # as the client sent it, e.g. b"/v1/chat/completions?x=1"
    upstream_path: bytes  # the part after "/v1", appended to each endpoint
    headers: Headers
    inspected: Inspected = field(eq=False)
    authorization: bytes | None  # the client's own header, for ``sk: asis``
    forwarded_for: bytes
    api_path: str  # decoded, e.g. "/v1/chat/completions" (see oaproxy.paths)
    route: str | None = None  # the route prefix, e.g. "/ollama"; None for /v1

    @property
    def model(self) -> str | None:
        return self.inspected.model

    @property
    def stream(self) -> bool:
        return self.inspected.stream

    @property
    def own_token(self) -> str | None:
        """The client's bearer token as text: hidden wherever it is echoed."""
        return token_text(self.authorization)


@frozen
class Answer:
    """A whole upstream response, read before anything reached the client."""

    upstream: Upstream
    status: int
    phrase: bytes
    headers: Headers
    body: CollectedBody


@frozen
class Committed:
    """An upstream response that is being relayed to the client."""

    upstream: Upstream
    status: int
    relay: StreamRelay


@define
class AttemptLog:
    """One attempt while it runs; the record keeps it as an ``Attempt``."""

    upstream: str
    started: float
    status: int | None = None
    error: str | None = None
    failure: FailureKind | None = None
    ttfb: float | None = None
    duration: float | None = None
    # The Retry-After of a 429 or 503 answer, as the upstream sent it.
    retry_after: str | None = None
    # Why the request went out again, on a new connection: the attempt
    # before found its pooled connection closed (``STALE_CONNECTION``).
    resent: str | None = None
    # How it continued a stream that broke, and the characters of text the
    # client had then.
    resumed: ResumeMode | None = None
    resumed_at: int | None = None
    # Why the same upstream was tried again after it ("429", "reset").
    retried: str | None = None
    # With ``sk: asis`` a 401 or 403 refuses the client's key, not the
    # upstream's (and a 429's Retry-After speaks of that key).
    client_key_sent: bool = False

    def failed(self, failure: FailureKind, error: str) -> None:
        self.failure = failure
        self.error = error

    @property
    def upstream_at_fault(self) -> bool:
        """Whether this attempt counts against its upstream (readiness, breakers)."""
        return upstream_at_fault(self.failure, self.status, client_key_sent=self.client_key_sent)


@define(eq=False)
class Exchange:
    """The state of one client request, from which its record is made."""

    call: Call
    started: float  # on the reactor's clock, for durations
    time: float  # wall-clock time the request arrived, for the record
    key_name: str | None
    client_ip: str
    user_agent: str | None = None
    # Whether the current attempt's body asks for usage the client did not.
    usage_added: bool = False
    # Set by the stream observer: what the record says of a streamed answer
    # (or by the forwarder, of one too large to parse).
    capture: StreamCapture | AnswerEnds | None = None
    # The metrics' handle on this request while it is active.
    active: ActiveRequest | None = None
    attempts: list[AttemptLog] = field(factory=list)
    upstream: str | None = None
    # The model name the answering upstream was sent (an alias's target).
    upstream_model: str | None = None
    status: int | None = None
    _outcome: Outcome = field(default=Outcome.OK, alias="outcome")
    ttfb: float | None = None
    finished: float | None = None
    bytes_out: int = 0
    response_body: bytes | None = None  # a non-stream answer, for the record
    error: str | None = None  # why a committed stream ended badly
    client_gone: bool = False
    # The proxy cut the request off at shutdown.
    cut: bool = False
    # Headers for the answer, whatever it is, over the upstream's (see
    # oaproxy.web.ProxyRequest); the pipeline gives the request's own.
    answer_headers: Headers = field(factory=Headers)
    # The tokens and budget a gate reserved, settled when the request is
    # over (oaproxy.traffic.tokens).
    reservation: Reservation | None = None
    # The limit that refused the request, for its record.
    limit: LimitRefusal | None = None
    # What the response cache decided; None when it was not asked.
    cache: CacheTicket | None = None
    # What a committed stream relayed so far, when it can be resumed.
    resume: ResumeState | None = None
    # response_body parsed (by answer_document), and the body it was.
    _answer_parsed: tuple[bytes, object] | None = field(default=None, init=False, repr=False)

    @property
    def outcome(self) -> Outcome:
        # After a cut the client's side closes too: that is not why it ended.
        return Outcome.SHUTDOWN if self.cut else self._outcome

    @outcome.setter
    def outcome(self, outcome: Outcome) -> None:
        self._outcome = outcome

    def answer_document(self) -> object:
        """``response_body`` parsed (``parse_json``: None for no JSON),
        once for all that read it (the record, the response cache)."""
        body = self.response_body
        if body is None:
            return None
        parsed = self._answer_parsed
        if parsed is None or parsed[0] is not body:
            parsed = self._answer_parsed = (body, parse_json(body))
        return parsed[1]

    def client_disconnected(
        self,
        attempt: AttemptLog | None = None,
        failure: FailureKind = FailureKind.CANCELLED,
        why: str = "client disconnected",
    ) -> None:
        """The client went away (or was let go): the request ends here, and
        the attempt under way, if any, was cancelled rather than failed."""
        self.client_gone = True
        self.outcome = Outcome.CLIENT_DISCONNECTED
        if attempt is not None:
            attempt.failed(failure, f"cancelled: {why}")

    def all_failed(self) -> tuple[int, str]:
        """No candidate gave an answer to pass on: the status (504 when every
        attempt timed out, else 502) and the message saying why each failed."""
        attempts = self.attempts
        timeouts = all(a.failure is FailureKind.TIMEOUT for a in attempts)
        reasons = "; ".join(f"{a.upstream}: {a.error}" for a in attempts)
        return 504 if timeouts else 502, f"All upstreams failed: {reasons}"

    def resuming_failed(self, error: str) -> str:
        """``error``, why a committed stream broke, with why each attempt
        to continue it failed."""
        reasons = "; ".join(
            # An answer's status is its failure (the record keeps no error for it).
            f"{a.upstream}: {a.error or f'status {a.status}'}"
            for a in self.attempts
            if a.resumed is not None
        )
        return f"{error}; resuming failed ({reasons})" if reasons else error

    def cut_at_shutdown(self) -> None:
        """Mark the request as cut off by the proxy (still in flight after
        ``shutdown_timeout``), before its connection is aborted."""
        self.cut = True
        self.error = "cut off when the proxy shut down"
