"""One record per client request, emitted as a ``twisted.logger`` event.

Records go to their own ``LogPublisher`` (namespace ``oaproxy.record``), not
the global one: the sinks observe it, and the daemon's text log on stdout is
not flooded with one event per request.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

from twisted.logger import ILogObserver, Logger, LogPublisher

from oaproxy.capture import (
    CapturedResponse,
    StreamCapture,
    capture_json_response,
    cost,
    describe_body,
)
from oaproxy.config import Config, Upstream
from oaproxy.credentials import Redactor, config_secrets, redact_headers
from oaproxy.forward import Exchange
from oaproxy.record import Attempt, JSONObject, Record

NAMESPACE = "oaproxy.record"


class RecordEmitter:
    """Emits records to whichever sinks observe ``publisher``."""

    def __init__(self) -> None:
        self.publisher = LogPublisher()
        self._log = Logger(namespace=NAMESPACE, observer=self.publisher)

    def add_observer(self, observer: ILogObserver) -> None:
        self.publisher.addObserver(observer)

    def remove_observer(self, observer: ILogObserver) -> None:
        self.publisher.removeObserver(observer)

    def emit(self, record: Record) -> None:
        self._log.info("{record.method} {record.path} {record.status}", record=record)


class RecordMaker:
    """Turns a finished exchange into a record, per the ``records`` policy."""

    def __init__(self, config: Config) -> None:
        self._policy = config.records
        self._hostname = config.hostname
        self._prices = config.prices
        self._text_bytes = config.records.max_field_bytes if config.records.response else 0
        # Also what the forwarder hides in the answers it passes on.
        self.redactor = Redactor(config_secrets(config))

    def stream_observer(self, exchange: Exchange, upstream: Upstream) -> Callable[[bytes], bool]:
        """What the relay calls with each SSE event's data: capture, and say
        whether to pass the event on (not the usage chunk oaproxy asked for)."""
        capture = StreamCapture(self._text_bytes)
        exchange.capture = capture
        feed = capture.feed
        if exchange.usage_added:
            return lambda data: not feed(data)

        def keep(data: bytes) -> bool:
            feed(data)
            return True

        return keep

    def make(self, exchange: Exchange, request: Any) -> Record:
        call = exchange.call
        policy = self._policy
        truncated: list[str] = []
        answer = self._answer(exchange)
        if policy.response:
            truncated.extend(answer.truncated)
        request_body: str | JSONObject | None = None
        body = call.inspected.body
        content_type = request.getHeader(b"content-type")
        if policy.body:
            if body.data is not None:
                request_body, cut = describe_body(body.data, content_type, policy.max_field_bytes)
                if cut:
                    truncated.append("request_body")
            else:
                request_body = {
                    "content_type": (content_type or b"").decode("latin-1") or None,
                    "size": body.size,
                }
        finished = exchange.finished if exchange.finished is not None else exchange.started
        usage = answer.usage
        model = call.model if call.model is not None else _form_model(request_body)
        # Text from upstreams and clients may quote a key (an upstream's "Incorrect
        # API key provided: sk-…", a client's ?api_key=…, a key sent as the
        # model or in X-Forwarded-For): none is kept. (Texts about failures
        # were redacted as they came in: see Forwarder._words.)
        redact = self.redactor
        own_token = call.own_token
        return Record(
            id=uuid.uuid4().hex,
            time=exchange.time,
            hostname=self._hostname,
            client_ip=redact(exchange.client_ip, own_token),
            key_name=exchange.key_name,
            user_agent=redact(exchange.user_agent, own_token),
            method=redact(call.method.decode("ascii", "replace"), own_token),
            path=redact(call.path.decode("utf-8", "replace"), own_token),
            model=redact(model, own_token),
            stream=call.stream,
            attempts=tuple(
                Attempt(
                    upstream=attempt.upstream,
                    status=attempt.status,
                    error=attempt.error,
                    ttfb=attempt.ttfb,
                    duration=attempt.duration,
                    failure=attempt.failure,
                    client_key_sent=attempt.client_key_sent,
                )
                for attempt in exchange.attempts
            ),
            upstream=exchange.upstream,
            status=exchange.status if exchange.status is not None else 499,
            outcome=exchange.outcome,
            error=exchange.error,
            ttfb=exchange.ttfb,
            duration=finished - exchange.started,
            bytes_in=body.size,
            bytes_out=exchange.bytes_out,
            request_body=redact(request_body, own_token),
            request_headers=(
                redact(redact_headers(call.headers.getAllRawHeaders()), own_token)
                if policy.headers
                else None
            ),
            response_text=redact(answer.text, own_token) if policy.response else None,
            tool_calls=redact(answer.tool_calls, own_token) if policy.response else None,
            finish_reason=redact(answer.finish_reason, own_token),
            truncated=tuple(truncated),
            usage=usage,
            cost=cost(usage, self._prices.get(model or "")),
            limit=exchange.limit,
        )

    def _answer(self, exchange: Exchange) -> CapturedResponse:
        if exchange.capture is not None and exchange.response_body is None:
            result: CapturedResponse = exchange.capture.result()
            return result
        if exchange.response_body:
            return capture_json_response(exchange.response_body, self._text_bytes)
        return CapturedResponse()


def _form_model(request_body: Any) -> str | None:
    """The ``model`` field of a described multipart body (audio uploads)."""
    if not isinstance(request_body, dict):
        return None
    for part in request_body.get("fields", ()):
        if part.get("name") == "model" and isinstance(part.get("value"), str):
            value: str = part["value"]
            return value
    return None
