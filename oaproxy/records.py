"""One record per client request, emitted as a ``twisted.logger`` event.

Records go to their own ``LogPublisher`` (namespace ``oaproxy.record``), not
the global one: the sinks observe it, and the daemon's text log on stdout is
not flooded with one event per request.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any, overload

import attrs
from twisted.logger import ILogObserver, Logger, LogLevel, LogPublisher

from oaproxy.capture import (
    CapturedResponse,
    StreamCapture,
    capture_json_document,
    cost,
    describe_body,
    keeps_text,
    truncate_text,
)
from oaproxy.config import Config, Upstream
from oaproxy.credentials import Redactor, config_secrets, redact_headers
from oaproxy.exchange import Exchange
from oaproxy.largeanswer import MAX_PARSED_ANSWER, USAGE_WINDOW, AnswerEnds
from oaproxy.record import Attempt, CacheResult, JSONObject, LimitRefusal, Record

# The namespace the sinks observe.
from oaproxy.sinks.queue import RECORD_NAMESPACE
from oaproxy.web import API_METHODS

# A version 4 UUID's fixed bits: its variant (RFC 4122) and its version.
_UUID4_KEPT = ~(0xC000 << 48 | 0xF000 << 64) & (1 << 128) - 1
_UUID4_SET = 0x8000 << 48 | 4 << 76


def record_id() -> str:
    """A new record's id: ``uuid.uuid4().hex``, without the ``UUID`` object
    (its checks took most of the time)."""
    return "%032x" % (int.from_bytes(os.urandom(16), "big") & _UUID4_KEPT | _UUID4_SET)


#: What the text of a record's event says.
RECORD_FORMAT = "{record.method} {record.path} {record.status}"


class RecordEmitter:
    """Emits records to whichever sinks observe ``publisher``."""

    def __init__(self) -> None:
        self.publisher = LogPublisher()
        self._log = Logger(namespace=RECORD_NAMESPACE, observer=self.publisher)

    def add_observer(self, observer: ILogObserver) -> None:
        self.publisher.addObserver(observer)

    def remove_observer(self, observer: ILogObserver) -> None:
        self.publisher.removeObserver(observer)

    def emit(self, record: Record) -> None:
        # The event ``self._log.info(RECORD_FORMAT, record=record)`` makes,
        # made here: Logger.emit checks its level against every level first,
        # once per request for a level that is always the same.
        self.publisher(
            {
                "record": record,
                "log_logger": self._log,
                "log_level": LogLevel.info,
                "log_namespace": RECORD_NAMESPACE,
                "log_source": None,
                "log_format": RECORD_FORMAT,
                "log_time": time.time(),
            }
        )


class RecordMaker:
    """Turns a finished exchange into a record, per the ``records`` policy."""

    def __init__(self, config: Config, *, pid: int | None = None) -> None:
        self._policy = config.records
        self._hostname = config.hostname
        # Which process served the request: one of several workers
        # (oaproxy.workers) shares the port, and the stores, with the others.
        self._pid = os.getpid() if pid is None else pid
        self._prices = config.prices
        # Also what the forwarder hides in the answers it passes on.
        self.redactor = Redactor(config_secrets(config))

    def reach(self, own_token: str | None) -> int:
        """How much of a text is read for a field of ``max_field_bytes``: a
        little more, so that a secret (or the request's ``own_token``) cut at
        the field's end is still found."""
        return self._policy.max_field_bytes + self.redactor.span(own_token)

    def _text_bytes(self, reach: int) -> int:
        """What the answer's capture keeps of each field, of ``reach``."""
        return reach if self._policy.response else 0

    def stream_observer(self, exchange: Exchange, upstream: Upstream) -> Callable[[bytes], bool]:
        """What the relay calls with each SSE event's data: capture, and say
        whether to pass the event on (not the usage chunk oaproxy asked for)."""
        capture = StreamCapture(self._text_bytes(self.reach(exchange.call.own_token)))
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
        # Text from upstreams and clients may quote a key (an upstream's "Incorrect
        # API key provided: sk-…", a client's ?api_key=…, a key sent as the
        # model or in X-Forwarded-For): none is kept, and no field is longer
        # than max_field_bytes. (Texts about failures were redacted as they
        # came in: see Forwarder._words.)
        own_token = call.own_token
        reach = self.reach(own_token)
        texts = _FieldTexts(self.redactor.for_texts(own_token), reach, policy.max_field_bytes)
        answer = self._answer(exchange, self._text_bytes(reach))
        if policy.response:
            texts.truncated.extend(answer.truncated)
        request_body: str | JSONObject | None = None
        body = call.inspected.body
        content_type = request.getHeader(b"content-type")
        response_text = texts.text("response_text", answer.text) if policy.response else None
        tool_calls = texts.value("tool_calls", answer.tool_calls) if policy.response else None
        if policy.body:
            if body.data is not None or (body.file is not None and keeps_text(content_type)):
                # A JSON or text body in its spool file: its head is all a record
                # reads (the pipeline keeps reach() and a byte more of it).
                request_body, cut = describe_body(body.head, content_type, reach)
                if cut:
                    texts.truncated.append("request_body")
            else:
                request_body = {
                    "content_type": (content_type or b"").decode("latin-1") or None,
                    "size": body.size,
                }
        finished = exchange.finished if exchange.finished is not None else exchange.started
        usage = answer.usage
        model = call.model if call.model is not None else _form_model(request_body)
        model_text = texts.text("model", model)
        upstream_model = exchange.upstream_model
        cache = exchange.cache.result if exchange.cache is not None else None
        method = call.method.decode("ascii", "replace")
        return Record(
            id=record_id(),
            time=exchange.time,
            hostname=self._hostname,
            client_ip=texts.text("client_ip", exchange.client_ip),
            key_name=exchange.key_name,
            user_agent=texts.text("user_agent", exchange.user_agent),
            # One of the API's methods is no text from outside; any other is.
            method=(
                texts.cut("method", method)
                if call.method in API_METHODS
                else texts.text("method", method)
            ),
            path=texts.text("path", call.path.decode("utf-8", "replace")),
            model=model_text,
            stream=call.stream,
            attempts=tuple(
                Attempt(
                    upstream=attempt.upstream,
                    status=attempt.status,
                    error=texts.cut("attempts", attempt.error),
                    ttfb=attempt.ttfb,
                    duration=attempt.duration,
                    failure=attempt.failure,
                    client_key_sent=attempt.client_key_sent,
                    resumed=attempt.resumed.value if attempt.resumed is not None else None,
                    resumed_at=attempt.resumed_at,
                    retried=attempt.retried,
                    resent=attempt.resent,
                )
                for attempt in exchange.attempts
            ),
            upstream=exchange.upstream,
            status=exchange.status if exchange.status is not None else 499,
            outcome=exchange.outcome,
            error=texts.cut("error", exchange.error),
            ttfb=exchange.ttfb,
            duration=finished - exchange.started,
            bytes_in=body.size,
            bytes_out=exchange.bytes_out,
            request_body=texts.value("request_body", request_body),
            request_headers=(
                texts.value("request_headers", redact_headers(call.headers.getAllRawHeaders()))
                if policy.headers
                else None
            ),
            response_text=response_text,
            tool_calls=tool_calls,
            finish_reason=texts.text("finish_reason", answer.finish_reason),
            # A cache hit keeps the usage of the answer it replays, at no cost.
            usage=usage,
            # The price is looked up by the model as the client sent it.
            cost=0.0 if cache is CacheResult.HIT else cost(usage, self._prices.get(model or "")),
            # The config's words: a route prefix, an alias (or the model the
            # client sent, already redacted above).
            route=texts.cut("route", call.route),
            upstream_model=(
                texts.again("upstream_model", "model", model_text)
                if upstream_model == model
                else texts.cut("upstream_model", upstream_model)
            ),
            limit=texts.limit(exchange.limit),
            cache=cache,
            pid=self._pid,
            # Last: the fields above name themselves in it as they are cut.
            truncated=texts.names(),
        )

    def _answer(self, exchange: Exchange, text_bytes: int) -> CapturedResponse:
        if exchange.capture is not None and exchange.response_body is None:
            result: CapturedResponse = exchange.capture.result()
            return result
        body = exchange.response_body
        if body and len(body) > MAX_PARSED_ANSWER:
            # Not parsed either: a cache hit's entry (a stream stored as its
            # completion, up to cache.max_entry_bytes).
            return AnswerEnds(body[:USAGE_WINDOW], body[-USAGE_WINDOW:]).result()
        if body:
            return capture_json_document(exchange.answer_document(), text_bytes)
        return CapturedResponse()


class _FieldTexts:
    """The texts of one record's fields as it keeps them: redacted, then cut
    to ``max_field_bytes``; the fields cut are named in ``truncated``."""

    def __init__(self, redact: Callable[[str], str], reach: int, max_bytes: int) -> None:
        # The redactor of the request's texts (its own token among the secrets).
        self._redact = redact
        self._max_bytes = max_bytes
        # Redacted before the cut, and a little past it (RecordMaker.reach): a
        # secret cut in two is no longer found (nor is a 10 MiB model name
        # read whole).
        self._reach = reach
        self.truncated: list[str] = []

    @overload
    def text(self, name: str, value: str) -> str: ...
    @overload
    def text(self, name: str, value: str | None) -> str | None: ...

    def text(self, name: str, value: str | None) -> str | None:
        """A text from outside, redacted and cut."""
        if value is None:
            return None
        head, cut = truncate_text(value, self._reach)
        return self._cut(name, self._redact(head), cut)

    @overload
    def cut(self, name: str, value: str) -> str: ...
    @overload
    def cut(self, name: str, value: str | None) -> str | None: ...

    def cut(self, name: str, value: str | None) -> str | None:
        """A text already redacted, cut."""
        return None if value is None else self._cut(name, value, False)

    def again(self, name: str, first: str, kept: str | None) -> str | None:
        """The field ``first`` kept as ``kept``, again as field ``name`` (cut
        when that one was)."""
        if first in self.truncated:
            self.truncated.append(name)
        return kept

    def value(self, name: str, value: Any) -> Any:
        """A JSON value with each string in it, mapping keys too, as ``text``
        keeps one."""
        if isinstance(value, str):
            return self.text(name, value)
        if isinstance(value, dict):
            return {self.text(name, k): self.value(name, v) for k, v in value.items()}
        if isinstance(value, list):
            return [self.value(name, v) for v in value]
        return value

    def limit(self, refusal: LimitRefusal | None) -> LimitRefusal | None:
        """A limit's refusal, its words kept as ``text`` keeps them."""
        if refusal is None:
            return None
        return attrs.evolve(refusal, limit=self.text("limit", refusal.limit))

    def names(self) -> tuple[str, ...]:
        """The fields cut, each once, in the order they were cut."""
        return tuple(dict.fromkeys(self.truncated))

    def _cut(self, name: str, text: str, cut: bool) -> str:
        kept, cut_again = truncate_text(text, self._max_bytes)
        if cut or cut_again:
            self.truncated.append(name)
        return kept


def _form_model(request_body: Any) -> str | None:
    """The ``model`` field of a described multipart body (audio uploads)."""
    if not isinstance(request_body, dict):
        return None
    for part in request_body.get("fields", ()):
        if part.get("name") == "model" and isinstance(part.get("value"), str):
            value: str = part["value"]
            return value
    return None
