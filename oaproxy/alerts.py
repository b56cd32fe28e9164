"""Alerts to Feishu and Matrix when failover is exhausted or a stream breaks.

The forwarder calls `Notifier.alert` and goes on at once: posting is
fire-and-forget, each post under its own short deadline, never retried, so a
dead alert channel can neither delay nor fail the client's answer.  Repeats of
the same failure are folded into one message per ``notify.min_interval``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import re
import secrets
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Protocol, cast
from urllib.parse import quote, urlsplit, urlunsplit

from attrs import define, field, frozen
from treq.client import HTTPClient
from treq.content import collect
from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, ensureDeferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IBodyProducer, IResponse

from oaproxy.relay import BytesProducer

if TYPE_CHECKING:
    # Only attributes are read from the config objects, so the import is for
    # the type checker alone.
    from oaproxy.config import FeishuConfig, MatrixConfig, NotifyConfig

__all__ = [
    "Alert",
    "AlertChannel",
    "ChannelRequest",
    "FeishuChannel",
    "LegacyMatrixChannel",
    "MatrixChannel",
    "Notifier",
    "alert_channels",
    "alert_from_record",
    "feishu_sign",
    "format_alert",
]

EXHAUSTED = "exhausted"
STREAM_FAILED = "stream_failed"

# Enough of an answer to read Feishu's {"code":…,"msg":…} or Matrix's errcode;
# anything longer is read (so the connection ends cleanly) but not kept.
_MAX_ANSWER_BYTES = 64 * 1024
# A message that names every attempt of a long candidate list stays readable.
_MAX_ATTEMPTS_SHOWN = 20
_MAX_REASON_CHARS = 300
# Signatures whose suppressed repeats still wait to be reported are kept past
# min_interval; this bounds the table when many distinct failures recur.
_MAX_SIGNATURES = 1024

# Defence in depth: reasons come from upstream error text, which could echo a
# key back.  These shapes never reach a message.
_SECRET_SHAPES = re.compile(
    r"(?i)(bearer\s+)\S+"
    r"|\bsk-[A-Za-z0-9_\-]{6,}"
    r"|((?:api[_-]?key|access_token|token|key|sig|sign)=)[^&\s]+"
)


def _scrub(text: str) -> str:
    def hide(match: re.Match[str]) -> str:
        prefix = match.group(1) or match.group(2) or ""
        return prefix + "***"

    return _SECRET_SHAPES.sub(hide, text)


def _without_query(path: str) -> str:
    # A query string may carry a key (`?key=…` in some APIs).
    return path.split("?", 1)[0]


def _reason_class(reason: str) -> str:
    """
    Reduce a free-text reason to what makes two failures "the same".

    "HTTP 502" and "HTTP 503" are one kind of failure; so are "timeout after
    60s" and "timeout after 61.2s".
    """
    status = re.match(r"\s*HTTP\s+(\d)\d\d\b", reason)
    if status:
        return f"HTTP {status.group(1)}xx"
    head = reason.split(":", 1)[0]
    return re.sub(r"\d+(?:\.\d+)?", "#", head).strip().lower()[:80]


@frozen
class Alert:
    """
    One failure worth telling an operator about.

    ``attempts`` holds ``(upstream name, reason)`` pairs in the order they were
    tried; reasons are short texts such as ``"HTTP 429"`` or
    ``"timeout after 60s"`` and must not hold secrets.
    """

    kind: str  # EXHAUSTED | STREAM_FAILED
    model: str | None
    path: str
    key_name: str | None
    attempts: tuple[tuple[str, str], ...]
    record_id: str | None
    status: int | None
    method: str | None = None

    def signature(self) -> tuple[object, ...]:
        """What makes two alerts repeats of one failure (for de-duplication)."""
        return (
            self.kind,
            self.model,
            _without_query(self.path),
            tuple((upstream, _reason_class(reason)) for upstream, reason in self.attempts),
        )


def _attempt_reason(attempt: Mapping[str, Any]) -> str:
    error = attempt.get("error")
    status = attempt.get("status")
    if error and status is not None:
        return f"HTTP {status}: {error}"
    if error:
        return str(error)
    if status is not None:
        return f"HTTP {status}"
    return "unknown error"


def alert_from_record(record: Mapping[str, Any]) -> Alert | None:
    """
    The alert a finished request's record calls for, if any.

    Only the outcomes ``exhausted`` and ``stream_failed`` are alerted; the
    record is the plain dict of the ``oaproxy.record`` log event.
    """
    kind = record.get("outcome")
    if kind not in (EXHAUSTED, STREAM_FAILED):
        return None
    attempts = tuple(
        (str(attempt.get("upstream")), _attempt_reason(attempt))
        for attempt in record.get("attempts") or ()
    )
    return Alert(
        kind=kind,
        model=record.get("model"),
        path=str(record.get("path") or ""),
        key_name=record.get("key_name"),
        attempts=attempts,
        record_id=record.get("id"),
        status=record.get("status"),
        method=record.get("method"),
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
    if alert.kind == STREAM_FAILED:
        upstream = alert.attempts[-1][0] if alert.attempts else "upstream"
        headline = f"stream from {upstream} failed mid-way for {model}"
    elif alert.kind == EXHAUSTED:
        headline = f"all upstreams failed for {model}"
    else:
        headline = f"{alert.kind} for {model}"
    lines = [f"oaproxy {hostname}: {headline} ({where}, {key})"]
    shown = alert.attempts[:_MAX_ATTEMPTS_SHOWN]
    for upstream, reason in shown:
        reason = _scrub(reason)
        if len(reason) > _MAX_REASON_CHARS:
            reason = reason[:_MAX_REASON_CHARS] + "…"
        lines.append(f"- {upstream}: {reason}")
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


@frozen
class ChannelRequest:
    """One HTTP request that delivers a message; its URL may hold a token."""

    method: str
    url: str = field(repr=False)
    body: Mapping[str, Any]
    headers: Mapping[str, str] = field(factory=dict, repr=False)


class AlertChannel(Protocol):
    """A place alerts go to: builds the request for one message."""

    @property
    def name(self) -> str:
        """Counter key and log name: "feishu" or "matrix"."""

    @property
    def kind(self) -> str:
        """Either "feishu" or "matrix"; the config's channel wins over the env's."""

    @property
    def host(self) -> str:
        """The only part of the URL that is safe to log."""

    def request(self, text: str, now: float, txn_id: str) -> ChannelRequest:
        """The request that posts ``text``."""


def _host(url: str) -> str:
    try:
        return urlsplit(url).hostname or "?"
    except ValueError:
        return "?"


def feishu_sign(timestamp: int, secret: str) -> str:
    """
    Feishu's custom-bot signature: the key is "timestamp\\nsecret" and the
    message is empty, as the Feishu documentation specifies.
    """
    string_to_sign = f"{timestamp}\n{secret}".encode()
    digest = hmac.new(string_to_sign, b"", hashlib.sha256).digest()
    return base64.b64encode(digest).decode("ascii")


@frozen
class FeishuChannel:
    """A Feishu custom bot webhook (the URL's last segment is its token)."""

    webhook: str = field(repr=False)
    secret: str | None = field(default=None, repr=False)
    name: str = "feishu"
    kind: str = "feishu"

    @property
    def host(self) -> str:
        return _host(self.webhook)

    def request(self, text: str, now: float, txn_id: str) -> ChannelRequest:
        body: dict[str, Any] = {"msg_type": "text", "content": {"text": text}}
        if self.secret:
            timestamp = int(now)
            body["timestamp"] = str(timestamp)
            body["sign"] = feishu_sign(timestamp, self.secret)
        return ChannelRequest("POST", self.webhook, body)


@frozen
class MatrixChannel:
    """A room, through the Matrix client-server API's send endpoint."""

    homeserver: str
    access_token: str = field(repr=False)
    room_id: str
    name: str = "matrix"
    kind: str = "matrix"

    @property
    def host(self) -> str:
        return _host(self.homeserver)

    def request(self, text: str, now: float, txn_id: str) -> ChannelRequest:
        url = (
            f"{self.homeserver.rstrip('/')}/_matrix/client/v3/rooms/"
            f"{quote(self.room_id, safe='')}/send/m.room.message/"
            f"{quote(txn_id, safe='')}"
        )
        return ChannelRequest(
            "PUT",
            url,
            {"msgtype": "m.text", "body": text},
            {"Authorization": f"Bearer {self.access_token}"},
        )


@frozen
class LegacyMatrixChannel:
    """
    openai-api-route's ``MATRIX_API``: one full URL that already names the
    room and carries the access token (``?access_token=…``).

    The Go code POSTed the message to that URL as is; the room send endpoint
    without a transaction id is deprecated, so when the URL ends with
    ``/send/m.room.message`` a transaction id is appended and the message PUT,
    as the client-server API wants.  Any other URL (a webhook bridge) still
    gets the POST.  openai-api-route read no other Matrix variable, so neither
    does this.  The body is the proper ``m.text`` content (the Go code sent
    ``"message": "m.text"``, which Matrix ignores).
    """

    url: str = field(repr=False)
    name: str = "matrix"
    kind: str = "matrix"

    @property
    def host(self) -> str:
        return _host(self.url)

    def request(self, text: str, now: float, txn_id: str) -> ChannelRequest:
        body = {"msgtype": "m.text", "body": text}
        parts = urlsplit(self.url)
        path = parts.path.rstrip("/")
        if path.endswith("/send/m.room.message"):
            path = f"{path}/{quote(txn_id, safe='')}"
            return ChannelRequest("PUT", urlunsplit(parts._replace(path=path)), body)
        return ChannelRequest("POST", self.url, body)


def alert_channels(
    config: NotifyConfig | None, environ: Mapping[str, str]
) -> tuple[AlertChannel, ...]:
    """
    The channels of ``notify:`` plus openai-api-route's environment variables
    ``FEISHU_WEBHOOK`` and ``MATRIX_API``; the config wins over the
    environment for the same kind of channel.
    """
    channels: list[AlertChannel] = []
    feishu: FeishuConfig | None = config.feishu if config is not None else None
    matrix: MatrixConfig | None = config.matrix if config is not None else None
    if feishu is not None:
        channels.append(FeishuChannel(feishu.webhook, feishu.secret or None))
    elif environ.get("FEISHU_WEBHOOK", "").strip():
        channels.append(FeishuChannel(environ["FEISHU_WEBHOOK"].strip()))
    if matrix is not None:
        channels.append(MatrixChannel(matrix.homeserver, matrix.access_token, matrix.room_id))
    elif environ.get("MATRIX_API", "").strip():
        channels.append(LegacyMatrixChannel(environ["MATRIX_API"].strip()))
    return tuple(channels)


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
            self.log.failure("alert not sent: {kind}", kind=alert.kind)

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
            self.suppressed[alert.kind] = self.suppressed.get(alert.kind, 0) + 1
            for channel in self.channels:
                self._on_result(channel.name, "suppressed")
            self.log.debug(
                "alert suppressed: {kind} {model} (repeat within {interval}s)",
                kind=alert.kind,
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
        problem = _answer_problem(channel, code, body)
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


def _json_object(body: bytes) -> Mapping[str, Any]:
    try:
        value = json.loads(body)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _answer_problem(channel: AlertChannel, code: int, body: bytes) -> str | None:
    """Why an answer is not a success, in words safe to log; None if it is."""
    answer = _json_object(body)
    if not 200 <= code < 300:
        # Matrix errcodes (M_FORBIDDEN…) are fixed names, safe to log.
        errcode = answer.get("errcode")
        detail = f" {errcode[:64]}" if isinstance(errcode, str) else ""
        return f"HTTP {code}{detail}"
    if channel.kind == "feishu":
        # Feishu answers 200 with a non-zero code for a bad sign, an unknown
        # bot or a rate limit (older deployments used StatusCode).
        feishu_code = answer.get("code", answer.get("StatusCode", 0))
        if feishu_code not in (0, None):
            message = answer.get("msg", answer.get("StatusMessage", ""))
            return f"Feishu code {feishu_code}: {_scrub(str(message))[:200]}"
    return None
