"""Alerts to Feishu and Matrix when failover is exhausted or a stream breaks.

The ``Alerting`` observer (``oaproxy.observers``) calls ``Notifier.alert``
with each finished request's alert, and goes on at once: posting is
fire-and-forget, each post under its own short deadline, never retried, so a
dead alert channel can neither delay nor fail the client's answer.  Repeats of
the same failure are folded into one message per ``notify.min_interval``.
The channels themselves are in ``oaproxy.channels``.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Protocol, cast

from attrs import define, frozen
from treq.client import HTTPClient
from treq.content import collect
from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, ensureDeferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IBodyProducer, IResponse

from oaproxy.channels import AlertChannel, ChannelRequest, alert_channels, answer_problem
from oaproxy.credentials import hide_key_shapes
from oaproxy.record import Attempt, FailureKind, Outcome, Record
from oaproxy.relay import BytesProducer

if TYPE_CHECKING:
    # Only attributes are read from the config objects, so the import is for
    # the type checker alone.
    from oaproxy.config import NotifyConfig

__all__ = [
    "Alert",
    "Notifier",
    "alert_from_record",
    "format_alert",
]

#: The outcomes an operator is told of.
ALERTED = frozenset({Outcome.EXHAUSTED, Outcome.STREAM_FAILED})

# Enough of an answer to read Feishu's {"code":…,"msg":…} or Matrix's errcode;
# anything longer is read (so the connection ends cleanly) but not kept.
_MAX_ANSWER_BYTES = 64 * 1024
# A message that names every attempt of a long candidate list stays readable.
_MAX_ATTEMPTS_SHOWN = 20
_MAX_REASON_CHARS = 300
# Signatures whose suppressed repeats still wait to be reported are kept past
# min_interval; this bounds the table when many distinct failures recur.
_MAX_SIGNATURES = 1024


def _without_query(path: str) -> str:
    # A query string may carry a key (`?key=…` in some APIs).
    return path.split("?", 1)[0]


def _failure_class(attempt: Attempt) -> tuple[FailureKind | None, int | None]:
    """What makes two attempts' failures "the same": their kind and, for
    answers, the hundreds of the status (HTTP 502 and 503 are one failure;
    so are timeouts after 60s and after 61.2s)."""
    status = attempt.status // 100 if attempt.status is not None else None
    return attempt.failure, status


@frozen
class Alert:
    """
    One failure worth telling an operator about.

    ``attempts`` are the request's attempts in the order they were tried;
    their error texts come from records, where they are already redacted.
    """

    kind: Outcome  # one of ALERTED
    model: str | None
    path: str
    key_name: str | None
    attempts: tuple[Attempt, ...]
    record_id: str | None
    status: int | None
    method: str | None = None

    def signature(self) -> tuple[object, ...]:
        """What makes two alerts repeats of one failure (for de-duplication)."""
        return (
            self.kind,
            self.model,
            _without_query(self.path),
            tuple((attempt.upstream, _failure_class(attempt)) for attempt in self.attempts),
        )


def _attempt_reason(attempt: Attempt) -> str:
    error = attempt.error
    status = attempt.status
    if error and status is not None:
        return f"HTTP {status}: {error}"
    if error:
        return error
    if status is not None:
        return f"HTTP {status}"
    return "unknown error"


def alert_from_record(record: Record) -> Alert | None:
    """The alert a finished request's record calls for, if any."""
    if record.outcome not in ALERTED:
        return None
    return Alert(
        kind=record.outcome,
        model=record.model,
        path=record.path,
        key_name=record.key_name,
        attempts=record.attempts,
        record_id=record.id,
        status=record.status,
        method=record.method,
    )


def format_alert(
    alert: Alert, hostname: str, suppressed: int = 0, since: float | None = None
) -> str:
    """The plain-text message for ``alert``: what failed, never a secret."""
    model = alert.model or "(no model)"
    where = _without_query(alert.path)
    if alert.method:
        where = f"{alert.method} {where}"
    key = f"key {alert.key_name}" if alert.key_name else "no client key"
    if alert.kind is Outcome.STREAM_FAILED:
        upstream = alert.attempts[-1].upstream if alert.attempts else "upstream"
        headline = f"stream from {upstream} failed mid-way for {model}"
    elif alert.kind is Outcome.EXHAUSTED:
        headline = f"all upstreams failed for {model}"
    else:
        headline = f"{alert.kind.value} for {model}"
    lines = [f"oaproxy {hostname}: {headline} ({where}, {key})"]
    shown = alert.attempts[:_MAX_ATTEMPTS_SHOWN]
    for attempt in shown:
        # Defence in depth: reasons come from upstream error text, which
        # could echo a key oaproxy does not know back.
        reason = hide_key_shapes(_attempt_reason(attempt))
        if len(reason) > _MAX_REASON_CHARS:
            reason = reason[:_MAX_REASON_CHARS] + "…"
        lines.append(f"- {attempt.upstream}: {reason}")
    if len(alert.attempts) > len(shown):
        lines.append(f"- … and {len(alert.attempts) - len(shown)} more attempts")
    tail = []
    if alert.status is not None:
        tail.append(f"status {alert.status}")
    if alert.record_id:
        tail.append(f"record {alert.record_id}")
    if tail:
        lines.append(", ".join(tail))
    if suppressed:
        plural = "alert" if suppressed == 1 else "alerts"
        window = f" in the last {since:.0f}s" if since is not None else ""
        lines.append(f"({suppressed} similar {plural} suppressed{window})")
    return "\n".join(lines)


class _Seconds(Protocol):
    def seconds(self) -> float: ...


@define
class _Seen:
    sent_at: float
    suppressed: int = 0


class _AlertChannelError(Exception):
    """A channel answered, but not with success."""


class _AlertTimeout(_AlertChannelError):
    """The channel did not answer within ``notify.timeout``."""


def _no_answer(result: object, timeout: float | None) -> Failure:
    # The cancelled request surfaces as ResponseNeverReceived or the like;
    # the operator wants to read that the deadline struck.
    return Failure(_AlertTimeout(f"no answer within {timeout}s"))


def _error_name(failure: Failure) -> str:
    """
    A failure's class names, never its text: connection errors can quote the
    URL, and a Feishu or legacy Matrix URL holds a token.
    """
    value = failure.value
    name = type(value).__name__
    inner = getattr(value, "reasons", None)
    if isinstance(inner, list) and inner:
        names = ", ".join(type(f.value).__name__ for f in inner if isinstance(f, Failure))
        return f"{name}({names})"
    return name


class Notifier(Service):
    """
    Posts alerts to the configured channels; a child service of the daemon.

    Counters (by channel name): ``sent``, ``failed``; ``suppressed`` counts
    de-duplicated alerts by alert kind.
    """

    log = Logger()

    def __init__(
        self,
        config: NotifyConfig,
        channels: Iterable[AlertChannel],
        agent: IAgent,
        clock: IReactorTime,
        hostname: str,
        on_result: Callable[[str, str], None] = lambda channel, result: None,
    ) -> None:
        self._config = config
        # Told (channel name, "ok" | "error" | "timeout" | "suppressed") of
        # every alert, for the metrics.
        self._on_result = on_result
        self.channels = tuple(channels)
        # treq's default producer would read through the global reactor's
        # cooperator, bypassing the injected one; the body is small anyway.
        producer = cast(Callable[[Any], IBodyProducer], BytesProducer)
        self._http = HTTPClient(agent, data_to_body_producer=producer)
        self._clock = clock
        # Same object; the Protocol lets mypy without the zope plugin call it.
        self._seconds = cast(_Seconds, clock)
        self.hostname = hostname
        self.sent: dict[str, int] = {c.name: 0 for c in self.channels}
        self.failed: dict[str, int] = {c.name: 0 for c in self.channels}
        self.suppressed: dict[str, int] = {}
        self._seen: dict[tuple[object, ...], _Seen] = {}
        self._in_flight: set[Deferred[None]] = set()
        self._counter = 0
        # Matrix transaction ids are scoped to the access token; several
        # instances may share one, so the process adds its own nonce.
        self._nonce = secrets.token_hex(4)

    @classmethod
    def from_config(
        cls,
        config: NotifyConfig,
        agent: IAgent,
        clock: IReactorTime,
        hostname: str,
        environ: Mapping[str, str] | None = None,
        on_result: Callable[[str, str], None] = lambda channel, result: None,
    ) -> Notifier:
        """A notifier for ``notify:`` plus the legacy environment variables."""
        env = os.environ if environ is None else environ
        return cls(config, alert_channels(config, env), agent, clock, hostname, on_result)

    def startService(self) -> None:
        super().startService()
        names = ", ".join(f"{c.name} ({c.host})" for c in self.channels) or "none"
        self.log.info("alert channels: {channels}", channels=names)

    def stopService(self) -> Deferred[None]:
        """Wait for posts under way; each ends by its own deadline."""
        super().stopService()
        return self.drained()

    def drained(self) -> Deferred[None]:
        """Fires once the posts under way now have ended, however they ended."""
        if not self._in_flight:
            return succeed(None)
        pending = DeferredList(list(self._in_flight), consumeErrors=True)
        return pending.addCallback(lambda _: None)

    def alert(self, alert: Alert) -> None:
        """
        Post ``alert`` unless it repeats one sent within ``min_interval``.

        Returns at once and never raises: the caller is answering a client.
        """
        try:
            self._alert(alert)
        except Exception:  # noqa: BLE001 - an alert must never fail a request
            self.log.failure("alert not sent: {kind}", kind=alert.kind.value)

    def _alert(self, alert: Alert) -> None:
        if not self.channels:
            return
        now = self._seconds.seconds()
        self._forget_old(now)
        signature = alert.signature()
        seen = self._seen.get(signature)
        interval = self._config.min_interval
        if seen is not None and now - seen.sent_at < interval:
            seen.suppressed += 1
            kind = alert.kind.value
            self.suppressed[kind] = self.suppressed.get(kind, 0) + 1
            for channel in self.channels:
                self._on_result(channel.name, "suppressed")
            self.log.debug(
                "alert suppressed: {kind} {model} (repeat within {interval}s)",
                kind=alert.kind.value,
                model=alert.model,
                interval=interval,
            )
            return
        suppressed = seen.suppressed if seen is not None else 0
        since = now - seen.sent_at if seen is not None else None
        self._seen[signature] = _Seen(sent_at=now)
        text = format_alert(alert, self.hostname, suppressed, since)
        for channel in self.channels:
            try:
                self._post(channel, text, now)
            except Exception:  # noqa: BLE001 - one broken channel spares the others
                self.failed[channel.name] = self.failed.get(channel.name, 0) + 1
                self._on_result(channel.name, "error")
                self.log.failure("alert to {channel} not sent", channel=channel.name)

    def _forget_old(self, now: float) -> None:
        interval = self._config.min_interval
        for signature, seen in list(self._seen.items()):
            # Entries with suppressed repeats stay: their count goes into the
            # next message of that signature.
            if now - seen.sent_at >= interval and not seen.suppressed:
                del self._seen[signature]
        excess = len(self._seen) - _MAX_SIGNATURES
        if excess > 0:
            oldest = sorted(self._seen.items(), key=lambda item: item[1].sent_at)
            lost = 0
            for signature, seen in oldest[:excess]:
                lost += seen.suppressed
                del self._seen[signature]
            # twisted's Logger has warn(), which linters take for logging's.
            self.log.emit(
                LogLevel.warn,
                "alert de-duplication table full: forgot {count} signatures"
                " ({lost} suppressed alerts go unreported)",
                count=excess,
                lost=lost,
            )

    def _txn_id(self, now: float) -> str:
        self._counter += 1
        return f"oaproxy.{int(now * 1000)}.{self._nonce}.{self._counter}"

    def _post(self, channel: AlertChannel, text: str, now: float) -> None:
        request = channel.request(text, now, self._txn_id(now))
        delivering = ensureDeferred(self._deliver(request))
        delivering.addTimeout(self._config.timeout, self._clock, onTimeoutCancel=_no_answer)
        # A refusal raised by _delivered is counted by _not_delivered too.
        posting: Deferred[None] = delivering.addCallback(self._delivered, channel)
        posting.addErrback(self._not_delivered, channel)
        self._in_flight.add(posting)
        posting.addBoth(self._settled, posting)

    async def _deliver(self, request: ChannelRequest) -> tuple[int, bytes]:
        headers = Headers({name: [value] for name, value in request.headers.items()})
        headers.setRawHeaders("Content-Type", ["application/json; charset=utf-8"])
        body = json.dumps(request.body, ensure_ascii=False, separators=(",", ":"))
        response: IResponse = await self._http.request(
            request.method,
            request.url,
            headers=headers,
            data=body.encode("utf-8"),
            allow_redirects=False,
            unbuffered=True,
        )
        kept: list[bytes] = []
        room = [_MAX_ANSWER_BYTES]

        def keep(data: bytes) -> None:
            if room[0] > 0:
                kept.append(data[: room[0]])
                room[0] -= len(data)

        await collect(response, keep)
        return cast(int, response.code), b"".join(kept)

    def _delivered(self, answer: tuple[int, bytes], channel: AlertChannel) -> None:
        code, body = answer
        problem = answer_problem(channel, code, body)
        if problem is not None:
            raise _AlertChannelError(problem)
        self.sent[channel.name] = self.sent.get(channel.name, 0) + 1
        self._on_result(channel.name, "ok")
        self.log.info("alert sent to {channel} ({host})", channel=channel.name, host=channel.host)

    def _not_delivered(self, failure: Failure, channel: AlertChannel) -> None:
        self.failed[channel.name] = self.failed.get(channel.name, 0) + 1
        self._on_result(channel.name, "timeout" if failure.check(_AlertTimeout) else "error")
        if failure.check(_AlertChannelError):
            reason = str(failure.value)
        else:
            reason = _error_name(failure)
        self.log.emit(
            LogLevel.warn,
            "alert to {channel} ({host}) failed: {reason}; not retried",
            channel=channel.name,
            host=channel.host,
            reason=reason,
        )

    def _settled(self, result: None, posting: Deferred[None]) -> None:
        self._in_flight.discard(posting)
