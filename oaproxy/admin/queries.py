"""What ``/admin/records``, ``/admin/usage`` and ``/admin/audit`` read from the
SQL store: the query string checked into a frozen value, then one indexed
query run in a database thread (``StoreFollower.query``).

Records come newest first, a page at a time: a page ends with the cursor
of its last record (``next``), and ``before=<next>`` asks for the page
after it, by (time, id), so that paging stays one index range scan (on
``time``, or ``key_name, time`` and ``model, time`` with a filter) however
many records there are.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from attrs import frozen

from oaproxy.admin.changes import Refusal, RefusalKind
from oaproxy.admin.stored import AuditEntry
from oaproxy.admin.tables import read_audit
from oaproxy.cli import parse_time, usage_total
from oaproxy.record import Outcome, decode_record, record_document
from oaproxy.recordstore import GROUP_COLUMNS, Filters, usage_rows
from oaproxy.sinks.sql import TABLE, placeholder

__all__ = [
    "AuditQuery",
    "RecordsQuery",
    "UsageQuery",
    "audit_page",
    "audit_query",
    "record_by_id",
    "records_page",
    "records_query",
    "usage",
    "usage_query",
]

MAX_LIMIT = 1000
DEFAULT_LIMIT = 100

#: The columns of a record in a list; the whole record is at /admin/records/{id}.
SUMMARY_COLUMNS = (
    "id",
    "time",
    "key_name",
    "model",
    "method",
    "path",
    "stream",
    "upstream",
    "status",
    "outcome",
    "ttfb",
    "duration",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "cost",
)


@frozen
class RecordsQuery:
    filters: Filters
    limit: int
    # The (time, id) of the last record of the previous page.
    before: tuple[float, str] | None = None
    outcomes: tuple[Outcome, ...] = ()


@frozen
class UsageQuery:
    filters: Filters
    by: tuple[str, ...]


@frozen
class AuditQuery:
    limit: int
    before: int | None = None


# -- the query string ------------------------------------------------------------


def _invalid(message: str, param: str) -> Refusal:
    return Refusal(RefusalKind.INVALID, message, param, "invalid_value")


def _one(args: Mapping[bytes, Sequence[bytes]], name: str) -> str | None:
    values = args.get(name.encode("ascii"))
    if not values:
        return None
    try:
        return values[-1].decode("utf-8")
    except UnicodeDecodeError:
        raise _invalid(f"{name} is not UTF-8 text", name) from None


def _many(args: Mapping[bytes, Sequence[bytes]], name: str) -> tuple[str, ...]:
    """Repeated, or comma-separated: ``key=a&key=b``, ``key=a,b``."""
    values = []
    for raw in args.get(name.encode("ascii"), ()):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise _invalid(f"{name} is not UTF-8 text", name) from None
        values += [part.strip() for part in text.split(",") if part.strip()]
    return tuple(values)


def _time(args: Mapping[bytes, Sequence[bytes]], name: str, now: float) -> float | None:
    text = _one(args, name)
    if text is None or not text.strip():
        return None
    try:
        return float(text)
    except ValueError:
        pass
    try:
        return parse_time(text, now)
    except ValueError as e:
        raise _invalid(f"{name}: {e} (or unix seconds)", name) from None


def _limit(args: Mapping[bytes, Sequence[bytes]]) -> int:
    text = _one(args, "limit")
    if text is None:
        return DEFAULT_LIMIT
    try:
        limit = int(text)
    except ValueError:
        raise _invalid("limit: expected an integer", "limit") from None
    if not 1 <= limit <= MAX_LIMIT:
        raise _invalid(f"limit: from 1 to {MAX_LIMIT}", "limit")
    return limit


def _filters(args: Mapping[bytes, Sequence[bytes]], now: float) -> Filters:
    since, until = _time(args, "since", now), _time(args, "until", now)
    if since is not None and until is not None and since >= until:
        raise _invalid("since is not before until", "since")
    return Filters(since=since, until=until, keys=_many(args, "key"), models=_many(args, "model"))


def records_query(args: Mapping[bytes, Sequence[bytes]], now: float) -> RecordsQuery:
    before = None
    cursor = _one(args, "before")
    if cursor:
        stamp, comma, record_id = cursor.partition(",")
        try:
            before = (float(stamp), record_id)
        except ValueError:
            comma = ""
        if not comma:
            raise _invalid("before: expected the next of a page", "before")
    try:
        outcomes = tuple(Outcome(word) for word in _many(args, "outcome"))
    except ValueError:
        words = ", ".join(o.value for o in Outcome)
        raise _invalid(f"outcome: expected some of {words}", "outcome") from None
    return RecordsQuery(_filters(args, now), _limit(args), before, outcomes)


def usage_query(args: Mapping[bytes, Sequence[bytes]], now: float) -> UsageQuery:
    by = _many(args, "by") or ("key", "model")
    if any(name not in GROUP_COLUMNS for name in by) or len(set(by)) != len(by):
        raise _invalid("by: expected key, model or key,model", "by")
    return UsageQuery(_filters(args, now), by)


def audit_query(args: Mapping[bytes, Sequence[bytes]]) -> AuditQuery:
    before = _one(args, "before")
    try:
        return AuditQuery(_limit(args), None if before is None else int(before))
    except ValueError:
        raise _invalid("before: expected an audit entry's id", "before") from None


# -- the queries, on a DB-API connection ---------------------------------------


def _rows(connection: Any, sql: str, parameters: Sequence[object]) -> list[tuple[Any, ...]]:
    cursor = connection.cursor()
    try:
        cursor.execute(sql, tuple(parameters))
        return list(cursor.fetchall())
    finally:
        cursor.close()


def records_page(connection: Any, dbtype: str, query: RecordsQuery) -> dict[str, Any]:
    """``{"object": "list", "data": [record summaries], "has_more", "next"}``."""
    mark = placeholder(dbtype)
    where, parameters = query.filters.where(mark)
    conditions = []
    if query.before is not None:
        stamp, record_id = query.before
        # "time <= t" first: the range the index scans; then the tie on id.
        conditions.append(f"time <= {mark} AND (time < {mark} OR id < {mark})")
        parameters += [stamp, stamp, record_id]
    if query.outcomes:
        conditions.append(f"outcome IN ({', '.join([mark] * len(query.outcomes))})")
        parameters += [outcome.value for outcome in query.outcomes]
    for condition in conditions:
        where = f"{where} AND {condition}" if where else f" WHERE {condition}"
    sql = (
        f"SELECT {', '.join(SUMMARY_COLUMNS)} FROM {TABLE}{where}"
        f" ORDER BY time DESC, id DESC LIMIT {mark}"
    )
    rows = _rows(connection, sql, [*parameters, query.limit + 1])
    more = len(rows) > query.limit
    data = []
    for row in rows[: query.limit]:
        summary = dict(zip(SUMMARY_COLUMNS, row))
        summary["stream"] = None if summary["stream"] is None else bool(summary["stream"])
        data.append({"object": "record", **summary})
    last = data[-1] if data else None
    return {
        "object": "list",
        "data": data,
        "has_more": more,
        "next": f"{last['time']!r},{last['id']}" if more and last else None,
    }


def record_by_id(connection: Any, dbtype: str, record_id: str) -> dict[str, Any] | None:
    """The whole record, in the one stored form (``record_document``), or
    None; ``BadRecord`` for a row that holds none."""
    mark = placeholder(dbtype)
    rows = _rows(connection, f"SELECT record FROM {TABLE} WHERE id = {mark}", [record_id])
    if not rows:
        return None
    return {"object": "record", **record_document(decode_record(rows[0][0]))}


def usage(connection: Any, dbtype: str, query: UsageQuery) -> dict[str, Any]:
    """``{"object": "list", "data": [groups], "total"}``, summed by the database."""
    groups = usage_rows(connection, dbtype, query.by, query.filters)
    total = usage_total(groups, query.by)
    return {
        "object": "list",
        "data": [{"object": "usage", **row.as_dict()} for row in groups],
        "total": {"object": "usage", **total.as_dict()},
    }


def audit_page(connection: Any, dbtype: str, query: AuditQuery) -> dict[str, Any]:
    cursor = connection.cursor()
    try:
        entries = read_audit(cursor, dbtype, limit=query.limit + 1, before=query.before)
    finally:
        cursor.close()
    more = len(entries) > query.limit
    return {
        "object": "list",
        "data": [audit_json(entry) for entry in entries[: query.limit]],
        "has_more": more,
    }


def audit_json(entry: AuditEntry) -> dict[str, Any]:
    try:
        changes = json.loads(entry.changes)
    except ValueError:
        changes = None
    return {
        "object": "audit_entry",
        "id": entry.id,
        "time": entry.time,
        "actor": entry.actor,
        "action": entry.action.value,
        "target": entry.target,
        "changes": changes,
    }
