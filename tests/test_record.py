"""oaproxy.record: the record's vocabulary and its one stored form."""

from __future__ import annotations

import json
import math
import uuid
from typing import cast

import attrs
from twisted.logger import ILogObserver, Logger, LogPublisher, formatEvent
from twisted.logger import _logger as logger_module
from twisted.trial.unittest import SynchronousTestCase

from oaproxy import records as records_module
from oaproxy.record import (
    Attempt,
    BadRecord,
    CacheResult,
    FailureKind,
    LimitKind,
    LimitRefusal,
    LimitScope,
    Outcome,
    Record,
    Usage,
    decode_record,
    encode_record,
    record_document,
    record_from_document,
)
from oaproxy.records import RECORD_FORMAT, RecordEmitter, record_id
from oaproxy.sinks.queue import RECORD_NAMESPACE
from tests.records import attempt, record, usage

#: A spool line as oaproxy wrote it before records were typed (a failover
#: from a refused connection to a tool-calling answer; non-ASCII text).
OLD_SPOOL_LINE = (
    b'{"id":"id0","time":1700000000.0,"hostname":"vm","client_ip":"10.1.2.3",'
    b'"key_name":"alice","user_agent":null,"method":"POST","path":"/v1/chat/completions",'
    b'"model":"gpt-4o-mini","stream":false,"attempts":[{"upstream":"a","status":null,'
    b'"error":"connect error: ConnectionRefusedError: Connection was refused by other side.",'
    b'"ttfb":null,"duration":0.0},{"upstream":"b","status":200,"error":null,"ttfb":0.25,'
    b'"duration":0.25}],"upstream":"b","status":200,"outcome":"ok","error":null,'
    b'"ttfb":0.25,"duration":0.25,"bytes_in":94,"bytes_out":337,'
    b'"request_body":"{\\"model\\": \\"gpt-4o-mini\\", \\"messages\\": [{\\"role\\": \\"user\\", \\"content\\": \\"h\\\\u00e9llo \\\\u4f60\\\\u597d\\"}]}",'
    b'"request_headers":{"host":"proxy.test","content-type":"application/json",'
    b'"authorization":"[redacted]","content-length":"94"},'
    b'"response_text":"Bonjour \xe2\x9c\x93","tool_calls":[{"id":"call_1",'
    b'"type":"function","function":{"name":"f","arguments":"{}"}}],'
    b'"finish_reason":"tool_calls","truncated":[],"usage":{"prompt_tokens":12,'
    b'"completion_tokens":7,"total_tokens":19},"cost":6e-06}'
)

#: The stored schema's fields, in their order: what the records file, Redis,
#: the SQL ``record`` column and ``oaproxy records export`` hold.
FIELDS = [
    "id",
    "time",
    "hostname",
    "client_ip",
    "key_name",
    "user_agent",
    "method",
    "path",
    "model",
    "stream",
    "attempts",
    "upstream",
    "status",
    "outcome",
    "error",
    "ttfb",
    "duration",
    "bytes_in",
    "bytes_out",
    "request_body",
    "request_headers",
    "response_text",
    "tool_calls",
    "finish_reason",
    "truncated",
    "usage",
    "cost",
    "route",
    "upstream_model",
]


def without_failures(rec: Record) -> Record:
    """What a record read back from storage holds: the kinds are not stored."""
    return attrs.evolve(rec, attempts=tuple(attrs.evolve(a, failure=None) for a in rec.attempts))


def full_record() -> Record:
    """A record with every optional field filled in."""
    return record(
        stream=True,
        attempts=[
            attempt("alpha", None, "timeout after 30s", None, 30.0, FailureKind.TIMEOUT),
            attempt("beta", 503, None, 0.2, 0.3, FailureKind.STATUS),
            attempt(
                "gamma", 200, "stream idle for more than 120s", 0.1, 200.0, FailureKind.STREAM_IDLE
            ),
        ],
        upstream="gamma",
        outcome=Outcome.STREAM_FAILED,
        error="stream idle for more than 120s",
        request_body={"content_type": "multipart/form-data", "size": 3, "fields": []},
        request_headers={"authorization": "[redacted]", "x-trace": "t"},
        response_text="héllo \ud800",
        tool_calls=[{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
        finish_reason="stop",
        truncated=["response_text"],
        usage=usage(3, 4),
        cost=0.5,
    )


class VocabularyTests(SynchronousTestCase):
    def test_outcome_values(self) -> None:
        """Each outcome is stored as the string records always had."""
        self.assertEqual(
            {outcome.name: outcome.value for outcome in Outcome},
            {
                "OK": "ok",
                "CLIENT_ERROR": "client_error",
                "EXHAUSTED": "exhausted",
                "STREAM_FAILED": "stream_failed",
                "CLIENT_DISCONNECTED": "client_disconnected",
                "SHUTDOWN": "shutdown",
                "ERROR": "error",
                "RATE_LIMITED": "rate_limited",
            },
        )

    def test_client_caused_failures(self) -> None:
        """Only a client that went away or stopped reading is the client's doing."""
        self.assertEqual(
            {kind for kind in FailureKind if kind.caused_by_client},
            {FailureKind.CANCELLED, FailureKind.CLIENT_STOPPED_READING},
        )


class DocumentTests(SynchronousTestCase):
    def test_fields(self) -> None:
        """The stored form has exactly the schema's fields, in order, and
        attempts and usage as the plain objects they always were."""
        document = record_document(full_record())
        self.assertEqual(list(document), FIELDS)
        self.assertEqual(
            document["attempts"][1],
            {"upstream": "beta", "status": 503, "error": None, "ttfb": 0.2, "duration": 0.3},
        )
        self.assertEqual(
            document["usage"], {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
        )
        self.assertEqual(
            (document["outcome"], document["truncated"]), ("stream_failed", ["response_text"])
        )
        json.dumps(document)

    def test_round_trip(self) -> None:
        """A record read back is the record that was stored, but for the
        failure kinds (not in the schema), and it is stored the same again."""
        for rec in (record(), full_record()):
            stored = encode_record(rec)
            again = decode_record(stored)
            self.assertEqual(again, without_failures(rec))
            self.assertEqual(encode_record(again), stored)
            self.assertEqual(record_from_document(record_document(rec)), without_failures(rec))

    def test_cache_only_where_the_cache_looked(self) -> None:
        """``cache`` is stored last, and only for a request the cache decided
        on: every other record is stored without it."""
        self.assertNotIn("cache", record_document(record()))
        for result in CacheResult:
            rec = record(cache=result, upstream=None, attempts=(), cost=0.0)
            document = record_document(rec)
            self.assertEqual((list(document)[-1], document["cache"]), ("cache", result.value))
            self.assertEqual(decode_record(encode_record(rec)), rec)

    def test_fields_added_later_together(self) -> None:
        """route and upstream_model (always stored), limit and cache (stored
        when set) read back together; a record stored before them all reads
        back with none of them."""
        rec = record(
            route="/ollama",
            upstream_model="llama3:70b",
            limit=LimitRefusal(LimitKind.TOKENS, LimitScope.KEY, "1000/minute"),
            cache=CacheResult.BYPASS,
            status=429,
            outcome=Outcome.RATE_LIMITED,
            upstream=None,
            attempts=(),
        )
        document = record_document(rec)
        later = ["route", "upstream_model", "limit", "cache"]
        self.assertEqual(list(document)[-4:], later)
        self.assertEqual(decode_record(encode_record(rec)), rec)
        before = {name: value for name, value in document.items() if name not in later}
        self.assertEqual(
            record_from_document(before),
            attrs.evolve(rec, route=None, upstream_model=None, limit=None, cache=None),
        )

    def test_pid(self) -> None:
        """The worker's pid is stored last when known, read back as it was; a
        record stored without it reads back with None; a pid that is no
        integer is refused."""
        rec = record(pid=4321)
        document = record_document(rec)
        self.assertEqual((list(document)[-1], document["pid"]), ("pid", 4321))
        self.assertEqual(decode_record(encode_record(rec)), rec)
        self.assertNotIn("pid", record_document(record()))
        self.assertIsNone(record_from_document(record_document(record())).pid)
        with self.assertRaises(BadRecord):
            record_from_document({**document, "pid": "4321"})

    def test_old_spool_line(self) -> None:
        """A line the untyped records wrote reads as a record, and is stored
        again byte for byte, with the fields every record has since added."""
        rec = decode_record(OLD_SPOOL_LINE)
        self.assertEqual(
            rec.attempts,
            (
                Attempt(
                    "a",
                    None,
                    "connect error: ConnectionRefusedError: Connection was refused by other side.",
                    None,
                    0.0,
                ),
                Attempt("b", 200, None, 0.25, 0.25),
            ),
        )
        self.assertEqual((rec.outcome, rec.usage), (Outcome.OK, Usage(12, 7, 19)))
        self.assertEqual(rec.response_text, "Bonjour ✓")
        self.assertEqual((rec.route, rec.upstream_model), (None, None))
        # Stored again, it has the fields added since, as null.
        self.assertEqual(
            encode_record(rec), OLD_SPOOL_LINE[:-1] + b',"route":null,"upstream_model":null}'
        )

    def test_lone_surrogate(self) -> None:
        """Text with a lone surrogate is stored as an escape, not refused."""
        stored = encode_record(record(response_text="a\udcff"))
        self.assertIn(b"\\udcff", stored)
        self.assertEqual(decode_record(stored).response_text, "a\udcff")


class BadRecordTests(SynchronousTestCase):
    """Storage that hands back no record of the schema says so, by BadRecord."""

    def assertBad(self, data: bytes | str | None, why: str) -> None:
        with self.assertRaises(BadRecord) as caught:
            decode_record(data)  # type: ignore[arg-type]
        self.assertIn(why, str(caught.exception))

    def changed(self, **fields: object) -> bytes:
        document = record_document(record())
        document.update(fields)
        return json.dumps(document).encode()

    def test_not_a_record(self) -> None:
        """Damaged JSON, no text at all, and JSON that is no object."""
        self.assertBad(OLD_SPOOL_LINE[:40], "not JSON")
        self.assertBad(None, "not JSON")
        self.assertBad(b"[1, 2]", "a record is a JSON object")

    def test_missing_field(self) -> None:
        """Every field of the schema is there (records always had them all)."""
        document = record_document(record())
        del document["outcome"]
        self.assertBad(json.dumps(document), "no 'outcome'")

    def test_wrong_types(self) -> None:
        """Each field has its type; a bool is no number, a number no bool."""
        self.assertBad(self.changed(status="200"), "'status' is str")
        self.assertBad(self.changed(status=True), "'status' is bool")
        self.assertBad(self.changed(stream=1), "'stream' is int")
        self.assertBad(self.changed(time="now"), "'time' is str")
        self.assertBad(self.changed(request_body=3), "'request_body' is int")
        self.assertBad(self.changed(request_headers={"a": 1}), "header values are strings")
        self.assertBad(self.changed(tool_calls=["x"]), "tool calls are JSON objects")
        self.assertBad(self.changed(truncated=[1]), "'truncated' names fields")
        self.assertBad(self.changed(usage={"prompt_tokens": 1}), "no 'completion_tokens'")
        self.assertBad(self.changed(attempts=[{"upstream": "a"}]), "no 'status'")
        self.assertBad(self.changed(attempts=["a"]), "an attempt is a JSON object")

    def test_unknown_outcome(self) -> None:
        """A stored outcome oaproxy does not know is refused as a bad record, naming it."""
        self.assertBad(self.changed(outcome="upstream_error"), "no outcome 'upstream_error'")

    def test_unknown_cache_result(self) -> None:
        """``cache`` is one of the cache's results, as text."""
        self.assertBad(self.changed(cache="stale"), "no cache result 'stale'")
        self.assertBad(self.changed(cache=1), "'cache' is int")

    def test_numbers_are_finite(self) -> None:
        """Python's JSON reads NaN and Infinity; a record holds neither."""
        self.assertBad(self.changed(duration=math.inf), "'duration' is not finite")
        self.assertBad(self.changed(cost=math.nan), "'cost' is not finite")

    def test_integral_times_read_as_floats(self) -> None:
        """Another writer's integral time is still a time."""
        self.assertEqual(decode_record(self.changed(time=1700000000)).time, 1700000000.0)


class RecordEmitterTests(SynchronousTestCase):
    def test_the_event_is_the_one_a_logger_makes(self) -> None:
        """The sinks (and any observer) see the event ``Logger.info`` would
        make of a record: the same keys, in the same order, and values."""
        emitter = RecordEmitter()
        seen: list[dict[str, object]] = []
        emitter.add_observer(cast(ILogObserver, seen.append))
        made = record()
        self.patch(records_module.time, "time", lambda: 1234.5)
        emitter.emit(made)
        publisher = LogPublisher()
        publisher.addObserver(cast(ILogObserver, seen.append))
        logger = Logger(namespace=RECORD_NAMESPACE, observer=publisher)
        self.patch(logger_module, "time", lambda: 1234.5)
        logger.info(RECORD_FORMAT, record=made)
        ours, theirs = seen
        self.assertIs(ours.pop("log_logger").observer, emitter.publisher)  # type: ignore[attr-defined]
        self.assertIs(theirs.pop("log_logger"), logger)
        self.assertEqual(list(ours.items()), list(theirs.items()))
        self.assertEqual(formatEvent(ours), "POST /v1/chat/completions 200")


class RecordIdTests(SynchronousTestCase):
    def test_ids_are_uuid4_hex(self) -> None:
        """A record's id is a version 4 UUID's hex, as ``uuid.uuid4().hex``
        writes it, and one of its own each time."""
        ids = [record_id() for _ in range(2000)]
        self.assertEqual(len(set(ids)), len(ids))
        for made in ids:
            parsed = uuid.UUID(hex=made)
            self.assertEqual((parsed.version, parsed.variant), (4, uuid.RFC_4122))
            self.assertEqual(parsed.hex, made)
        self.patch(records_module.os, "urandom", lambda size: bytes(range(size)))
        self.assertEqual(record_id(), uuid.UUID(bytes=bytes(range(16)), version=4).hex)
