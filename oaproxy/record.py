"""The record of one client request: its vocabulary, and its one stored form.

A ``Record`` is made once per request (``oaproxy.records.RecordMaker``) and
read as it is by metrics, readiness and alerts. It becomes JSON only where a
sink stores it: ``record_document`` is the stored schema (the field names
the records file, Redis, the SQL ``record`` column and ``oaproxy records
export`` have always had), and ``record_from_document`` its inverse for
records read back (a spool line, a database row), the one place that checks
what storage hands back.
"""

from __future__ import annotations

import enum
import json
import math
from collections.abc import Mapping
from typing import Any, Protocol

from attrs import frozen

#: A body, header set or tool call list as the record keeps it: JSON values.
JSONObject = dict[str, Any]


class Outcome(enum.Enum):
    """How a client request ended; the value is what the record stores."""

    OK = "ok"
    #: An error answer that is the request's fault (oaproxy's own 4xx, or
    #: an upstream's that is not worth another upstream).
    CLIENT_ERROR = "client_error"
    #: Every candidate failed (the alert-worthy failover failure).
    EXHAUSTED = "exhausted"
    #: A committed stream broke after the client saw its start.
    STREAM_FAILED = "stream_failed"
    CLIENT_DISCONNECTED = "client_disconnected"
    #: Cut off by the proxy: still in flight after ``shutdown_timeout``.
    SHUTDOWN = "shutdown"
    #: oaproxy itself failed (a bug, or a limiter that cannot be asked and
    #: refuses, 503); the client got a 5xx of oaproxy's own.
    ERROR = "error"
    #: Refused by a request or token limit or a budget (a 429;
    #: ``Record.limit`` says which).
    RATE_LIMITED = "rate_limited"


class FailureKind(enum.Enum):
    """Why one attempt did not serve the request (not stored: in-process only)."""

    #: The upstream answered with a status worth another upstream.
    STATUS = "status"
    #: The attempt's deadline (headers, body or first event) passed.
    TIMEOUT = "timeout"
    CONNECT_ERROR = "connect_error"
    DNS_ERROR = "dns_error"
    TLS_ERROR = "tls_error"
    #: The client went away (the attempt was cancelled).
    CANCELLED = "cancelled"
    #: The client held a committed stream paused past the idle timeout.
    CLIENT_STOPPED_READING = "client_stopped_reading"
    #: The upstream closed a response before it was complete.
    UPSTREAM_ENDED_EARLY = "upstream_ended_early"
    #: A non-stream answer over the buffering limit.
    BODY_TOO_LARGE = "body_too_large"
    #: One SSE event (or what a stream held before its first) over ``max_event_bytes``.
    EVENT_TOO_LARGE = "event_too_large"
    #: A committed stream fell silent past the idle timeout.
    STREAM_IDLE = "stream_idle"
    #: A stream's upstream sent an error event (and it was resumed elsewhere).
    STREAM_ERROR = "stream_error"
    #: A restarted stream said something else than what the client had.
    DIVERGED = "diverged"
    #: A pooled connection the upstream had closed: sent again on a new one.
    STALE_CONNECTION = "stale_connection"
    #: Anything else that went wrong on the way (its text says what).
    OTHER = "other"

    @property
    def caused_by_client(self) -> bool:
        """Whether the client, not the upstream, ended the attempt."""
        return self in _CLIENT_CAUSED


_CLIENT_CAUSED = frozenset({FailureKind.CANCELLED, FailureKind.CLIENT_STOPPED_READING})

# What no request can make happen: the upstream cannot be reached, is too
# slow, or breaks its own answer.
_UPSTREAM_FAULTS = frozenset(
    {
        FailureKind.TIMEOUT,
        FailureKind.CONNECT_ERROR,
        FailureKind.DNS_ERROR,
        FailureKind.TLS_ERROR,
        FailureKind.UPSTREAM_ENDED_EARLY,
        FailureKind.EVENT_TOO_LARGE,
        FailureKind.STREAM_IDLE,
        FailureKind.STREAM_ERROR,
        FailureKind.OTHER,
    }
)


def upstream_at_fault(
    failure: FailureKind | None, status: int | None, *, client_key_sent: bool
) -> bool:
    """Whether a failed attempt says something is wrong with the upstream
    itself: what readiness and circuit breakers count against it.

    It is: no connection (connect, DNS, TLS), a deadline, a broken answer,
    a 5xx, and a 401 or 403 to the upstream's own key (``sk``, or none).
    It is not: what the client did (went away, stopped reading) or asked
    for (404 for a model the upstream lacks, 408, 409, 429, an answer over
    the buffering limit), nor a 401 or 403 to the client's key passed on
    with ``sk: asis``.
    """
    if failure is FailureKind.STATUS:
        if status is None:
            return False
        return status >= 500 or (status in (401, 403) and not client_key_sent)
    return failure in _UPSTREAM_FAULTS


class Evidence(enum.Enum):
    """What one attempt says of its upstream's health."""

    #: It answered, and the answer is no fault of its own: it works.
    ANSWERED = "answered"
    #: ``upstream_at_fault``.
    FAILED = "failed"
    #: Nothing either way: the client went away, the answer was too large.
    NOTHING = "nothing"


class JudgedAttempt(Protocol):
    """An attempt as it runs (``exchange.AttemptLog``) or as recorded (``Attempt``)."""

    @property
    def status(self) -> int | None: ...

    @property
    def failure(self) -> FailureKind | None: ...

    @property
    def upstream_at_fault(self) -> bool: ...


def evidence(attempt: JudgedAttempt) -> Evidence:
    """What ``attempt`` says of its upstream: the one judgement readiness
    and the circuit breakers both follow (failures in a row count, an
    answer resets them)."""
    if attempt.upstream_at_fault:
        return Evidence.FAILED
    if attempt.status is not None and attempt.failure in (None, FailureKind.STATUS):
        return Evidence.ANSWERED
    return Evidence.NOTHING


class LimitKind(enum.Enum):
    """What a limit counts (``oaproxy.traffic``)."""

    REQUESTS = "requests"
    TOKENS = "tokens"
    BUDGET = "budget"


class LimitScope(enum.Enum):
    """Whom a limit counts."""

    GLOBAL = "global"  # all requests together
    KEY = "key"  # one client key (or client IP, without a key)
    ROUTE = "route"  # one key (or IP) on one API route


class CacheResult(enum.Enum):
    """What the response cache did with a request (``oaproxy.cache``)."""

    HIT = "hit"  # answered from the cache
    MISS = "miss"  # looked up, not found; stored if the answer is complete
    BYPASS = "bypass"  # not looked up: "caching": false, or not asked while default: false


@frozen
class LimitRefusal:
    """The limit that refused a request: e.g. requests, key, ``10/minute``."""

    kind: LimitKind
    scope: LimitScope
    limit: str  # as the config gives it: "10/minute", "50 usd/month"


@frozen
class Usage:
    """Token counts as the upstream reported them."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


@frozen
class Attempt:
    """One try of one upstream."""

    upstream: str
    status: int | None
    #: What went wrong, in words (redacted); None when nothing did.
    error: str | None
    ttfb: float | None
    duration: float | None
    #: Why it failed, when it did: None when the upstream served (a 2xx, or
    #: a 4xx that is the request's fault), and for an attempt read back
    #: from storage, whose schema keeps the text alone.
    failure: FailureKind | None = None
    #: The upstream was sent the client's own key (``sk: asis``), so a 401
    #: or 403 is about that key (not stored either).
    client_key_sent: bool = False
    #: How this attempt continued a stream that broke ("prefill", "restart").
    resumed: str | None = None
    #: The characters of text the client had when it broke.
    resumed_at: int | None = None
    #: Why it was followed by a retry on the same upstream ("429", "reset").
    retried: str | None = None
    #: Why the request went out again, on a new connection: the attempt
    #: before found the pooled connection closed.
    resent: str | None = None

    @property
    def upstream_at_fault(self) -> bool:
        """Whether this attempt counts against its upstream (see ``upstream_at_fault``)."""
        return upstream_at_fault(self.failure, self.status, client_key_sent=self.client_key_sent)


@frozen
class Record:
    """One client request, as the record policy keeps it."""

    id: str
    time: float  # wall clock, seconds since the epoch
    hostname: str
    client_ip: str
    key_name: str | None
    user_agent: str | None
    method: str
    path: str
    model: str | None
    stream: bool
    attempts: tuple[Attempt, ...]
    upstream: str | None
    status: int
    outcome: Outcome
    error: str | None
    ttfb: float | None
    duration: float
    bytes_in: int
    bytes_out: int
    request_body: str | JSONObject | None
    request_headers: dict[str, str] | None
    response_text: str | None
    tool_calls: list[JSONObject] | None
    finish_reason: str | None
    truncated: tuple[str, ...]
    usage: Usage | None
    cost: float | None
    #: The route prefix the request came under ("/ollama"); None for /v1.
    route: str | None = None
    #: The model name the answering upstream was sent: ``model``, or what an
    #: alias stands for there.
    upstream_model: str | None = None
    #: Set when a limit refused the request (outcome ``rate_limited``).
    limit: LimitRefusal | None = None
    #: What the response cache did; None on a route it does not serve.
    cache: CacheResult | None = None


def record_document(record: Record) -> JSONObject:
    """The stored form of a record: a JSON object, in the schema every store
    and export has always used."""
    usage = record.usage
    document: JSONObject = {
        "id": record.id,
        "time": record.time,
        "hostname": record.hostname,
        "client_ip": record.client_ip,
        "key_name": record.key_name,
        "user_agent": record.user_agent,
        "method": record.method,
        "path": record.path,
        "model": record.model,
        "stream": record.stream,
        "attempts": [_attempt_document(attempt) for attempt in record.attempts],
        "upstream": record.upstream,
        "status": record.status,
        "outcome": record.outcome.value,
        "error": record.error,
        "ttfb": record.ttfb,
        "duration": record.duration,
        "bytes_in": record.bytes_in,
        "bytes_out": record.bytes_out,
        "request_body": record.request_body,
        "request_headers": record.request_headers,
        "response_text": record.response_text,
        "tool_calls": record.tool_calls,
        "finish_reason": record.finish_reason,
        "truncated": list(record.truncated),
        "usage": None if usage is None else usage_document(usage),
        "cost": record.cost,
        "route": record.route,
        "upstream_model": record.upstream_model,
    }
    if record.limit is not None:
        # Only refusals have it: every other record is stored without it.
        document["limit"] = {
            "kind": record.limit.kind.value,
            "scope": record.limit.scope.value,
            "limit": record.limit.limit,
        }
    if record.cache is not None:
        # Likewise only requests the cache looked at (or bypassed) have it.
        document["cache"] = record.cache.value
    return document


def _attempt_document(attempt: Attempt) -> JSONObject:
    document: JSONObject = {
        "upstream": attempt.upstream,
        "status": attempt.status,
        "error": attempt.error,
        "ttfb": attempt.ttfb,
        "duration": attempt.duration,
    }
    # Stored only when set, as most attempts are none of these.
    for name in _ATTEMPT_LATER:
        value = getattr(attempt, name)
        if value is not None:
            document[name] = value
    return document


# The keys added to an attempt's stored form later, with their types.
_ATTEMPT_LATER: dict[str, type] = {"resumed": str, "resumed_at": int, "retried": str, "resent": str}


def usage_document(usage: Usage) -> JSONObject:
    """Usage as records store it, in OpenAI's own field names."""
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
    }


def encode_record(record: Record) -> bytes:
    """A record's stored form as compact UTF-8 JSON (no newline).

    ``backslashreplace`` turns a lone surrogate (from a body decoded with
    ``surrogateescape``) into a ``\\udcXX`` escape, which is still valid JSON,
    instead of failing the whole record.
    """
    text = json.dumps(
        record_document(record), ensure_ascii=False, separators=(",", ":"), default=str
    )
    return text.encode("utf-8", "backslashreplace")


class BadRecord(ValueError):
    """Stored data that is not a record of this schema."""


def record_from_document(document: object) -> Record:
    """The record a stored form holds; ``BadRecord`` when it holds none."""
    if not isinstance(document, dict):
        raise BadRecord("a record is a JSON object")
    fields = _Fields(document)
    attempts = fields.get("attempts", list)
    return Record(
        id=fields.text("id"),
        time=fields.number("time"),
        hostname=fields.text("hostname"),
        client_ip=fields.text("client_ip"),
        key_name=fields.optional_text("key_name"),
        user_agent=fields.optional_text("user_agent"),
        method=fields.text("method"),
        path=fields.text("path"),
        model=fields.optional_text("model"),
        stream=fields.get("stream", bool),
        attempts=tuple(_attempt(attempt) for attempt in attempts),
        upstream=fields.optional_text("upstream"),
        status=fields.integer("status"),
        outcome=_outcome(fields.text("outcome")),
        error=fields.optional_text("error"),
        ttfb=fields.optional_number("ttfb"),
        duration=fields.number("duration"),
        bytes_in=fields.integer("bytes_in"),
        bytes_out=fields.integer("bytes_out"),
        request_body=fields.optional("request_body", (str, dict)),
        request_headers=_headers(fields.optional("request_headers", dict)),
        response_text=fields.optional_text("response_text"),
        tool_calls=_tool_calls(fields.optional("tool_calls", list)),
        finish_reason=fields.optional_text("finish_reason"),
        truncated=_texts(fields.get("truncated", list)),
        usage=_usage(fields.optional("usage", dict)),
        cost=fields.optional_number("cost"),
        # Added later: records stored before them have none of these.
        route=fields.later("route", str),
        upstream_model=fields.later("upstream_model", str),
        limit=_limit(fields.later("limit", dict)),
        cache=_cache(fields.later("cache", str)),
    )


def decode_record(data: bytes | str) -> Record:
    """The record of one stored JSON text; ``BadRecord`` when it is none."""
    try:
        document = json.loads(data)
    except (ValueError, TypeError, RecursionError) as e:
        # ValueError covers JSONDecodeError and UnicodeDecodeError; TypeError
        # is no text at all (a NULL column).
        raise BadRecord(f"not JSON: {e}") from None
    return record_from_document(document)


class _Fields:
    """Typed reads of one JSON object's keys, each a ``BadRecord`` when wrong."""

    def __init__(self, document: Mapping[str, Any]) -> None:
        self._document = document

    def get(self, key: str, kind: type[Any] | tuple[type[Any], ...]) -> Any:
        try:
            value = self._document[key]
        except KeyError:
            raise BadRecord(f"no {key!r}") from None
        # bool is an int: True is no status, and 1 is no stream flag.
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
            raise BadRecord(f"{key!r} is {type(value).__name__}")
        return value

    def optional(self, key: str, kind: type[Any] | tuple[type[Any], ...]) -> Any:
        if self._document.get(key, 0) is None:
            return None
        return self.get(key, kind)

    def text(self, key: str) -> str:
        value: str = self.get(key, str)
        return value

    def optional_text(self, key: str) -> str | None:
        value: str | None = self.optional(key, str)
        return value

    def later(self, key: str, kind: type[Any]) -> Any:
        """A key added to the schema later, or stored only when set: absent
        means None, as null does."""
        return self.optional(key, kind) if key in self._document else None

    def integer(self, key: str) -> int:
        value: int = self.get(key, int)
        return value

    def optional_integer(self, key: str) -> int | None:
        value: int | None = self.optional(key, int)
        return value

    def number(self, key: str) -> float:
        value = self.get(key, (int, float))
        if not math.isfinite(value):
            raise BadRecord(f"{key!r} is not finite")
        return float(value)

    def optional_number(self, key: str) -> float | None:
        if self._document.get(key, 0) is None:
            return None
        return self.number(key)


def _attempt(document: object) -> Attempt:
    if not isinstance(document, dict):
        raise BadRecord("an attempt is a JSON object")
    fields = _Fields(document)
    return Attempt(
        upstream=fields.text("upstream"),
        status=fields.optional_integer("status"),
        error=fields.optional_text("error"),
        ttfb=fields.optional_number("ttfb"),
        duration=fields.optional_number("duration"),
        **{name: fields.later(name, kind) for name, kind in _ATTEMPT_LATER.items()},
    )


def _outcome(value: str) -> Outcome:
    try:
        return Outcome(value)
    except ValueError:
        raise BadRecord(f"no outcome {value!r}") from None


def _limit(document: dict[str, Any] | None) -> LimitRefusal | None:
    if document is None:
        return None
    fields = _Fields(document)
    try:
        kind, scope = LimitKind(fields.text("kind")), LimitScope(fields.text("scope"))
    except ValueError:
        raise BadRecord(f"no limit {document!r}") from None
    return LimitRefusal(kind, scope, fields.text("limit"))


def _cache(value: str | None) -> CacheResult | None:
    if value is None:
        return None
    try:
        return CacheResult(value)
    except ValueError:
        raise BadRecord(f"no cache result {value!r}") from None


def _usage(document: dict[str, Any] | None) -> Usage | None:
    if document is None:
        return None
    fields = _Fields(document)
    return Usage(
        prompt_tokens=fields.integer("prompt_tokens"),
        completion_tokens=fields.integer("completion_tokens"),
        total_tokens=fields.integer("total_tokens"),
    )


def _headers(document: dict[str, Any] | None) -> dict[str, str] | None:
    if document is not None and not all(isinstance(v, str) for v in document.values()):
        raise BadRecord("header values are strings")
    return document


def _tool_calls(calls: list[Any] | None) -> list[JSONObject] | None:
    if calls is not None and not all(isinstance(call, dict) for call in calls):
        raise BadRecord("tool calls are JSON objects")
    return calls


def _texts(values: list[Any]) -> tuple[str, ...]:
    if not all(isinstance(value, str) for value in values):
        raise BadRecord("'truncated' names fields")
    return tuple(values)
