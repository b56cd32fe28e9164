"""The records summed as they are stored: what the dashboard's pages read
instead of scanning ``oaproxy_records`` (schema migration 4).

- ``oaproxy_usage_daily``: per UTC day, key and model, the requests, those
  answered below 400, the tokens and the cost (NULL while no record of the
  group had one);
- ``oaproxy_upstream_minutely``: per minute and answering upstream, the
  requests and those answered below 400 (the Overview's last hour and 24
  hours: a few thousand rows, however busy the proxy);
- an index on ``(outcome, time)``, for the Requests page's outcome filter.

A trigger on the records table keeps both sums: it fires only for a row
really inserted, so the sink's idempotent retries (``ON CONFLICT DO
NOTHING``) never count a record twice.  A record without a key, model or
upstream is summed under ``''`` (a primary key column cannot be NULL).
The migration sums the records already there once.  In PostgreSQL the
sink's batches of several processes take turns (``sql._BATCH_LOCK``): two
at once would update the same sums in different orders and deadlock.
"""

from __future__ import annotations

from typing import Any

__all__ = ["DAILY_TABLE", "MINUTELY_TABLE", "TRIGGER", "add_rollups", "bucket", "create_trigger"]

DAILY_TABLE = "oaproxy_usage_daily"
MINUTELY_TABLE = "oaproxy_upstream_minutely"

_RECORDS = "oaproxy_records"
_DAY = 86400
_MINUTE = 60


def bucket(dbtype: str, column: str, span: int) -> str:
    """SQL for ``column`` (seconds) rounded down to a multiple of ``span``."""
    if dbtype == "postgres":
        return f"(floor({column} / {span}) * {span})::bigint"
    return f"(CAST({column} / {span} AS INTEGER) * {span})"


def _upserts(dbtype: str, row: str) -> list[str]:
    """The two upserts adding the record ``row`` (``NEW``) to the sums."""
    ok = f"CASE WHEN {row}.status < 400 THEN 1 ELSE 0 END"
    daily = (
        f"INSERT INTO {DAILY_TABLE} (day, key_name, model, requests, ok,"
        " prompt_tokens, completion_tokens, total_tokens, cost)"
        f" VALUES ({bucket(dbtype, f'{row}.time', _DAY)}, COALESCE({row}.key_name, ''),"
        f" COALESCE({row}.model, ''), 1, {ok}, COALESCE({row}.prompt_tokens, 0),"
        f" COALESCE({row}.completion_tokens, 0), COALESCE({row}.total_tokens, 0), {row}.cost)"
        " ON CONFLICT (day, key_name, model) DO UPDATE SET"
        f" requests = {DAILY_TABLE}.requests + 1,"
        f" ok = {DAILY_TABLE}.ok + excluded.ok,"
        f" prompt_tokens = {DAILY_TABLE}.prompt_tokens + excluded.prompt_tokens,"
        f" completion_tokens = {DAILY_TABLE}.completion_tokens + excluded.completion_tokens,"
        f" total_tokens = {DAILY_TABLE}.total_tokens + excluded.total_tokens,"
        f" cost = COALESCE({DAILY_TABLE}.cost + excluded.cost, {DAILY_TABLE}.cost, excluded.cost)"
    )
    minutely = (
        f"INSERT INTO {MINUTELY_TABLE} (minute, upstream, requests, ok)"
        f" VALUES ({bucket(dbtype, f'{row}.time', _MINUTE)}, COALESCE({row}.upstream, ''), 1, {ok})"
        " ON CONFLICT (minute, upstream) DO UPDATE SET"
        f" requests = {MINUTELY_TABLE}.requests + 1, ok = {MINUTELY_TABLE}.ok + excluded.ok"
    )
    return [daily, minutely]


def _backfill(cursor: Any, dbtype: str) -> None:
    ok = "SUM(CASE WHEN status < 400 THEN 1 ELSE 0 END)"
    day = bucket(dbtype, "time", _DAY)
    cursor.execute(
        f"INSERT INTO {DAILY_TABLE} (day, key_name, model, requests, ok,"
        " prompt_tokens, completion_tokens, total_tokens, cost)"
        f" SELECT {day}, COALESCE(key_name, ''), COALESCE(model, ''), COUNT(*), {ok},"
        " COALESCE(SUM(prompt_tokens), 0), COALESCE(SUM(completion_tokens), 0),"
        f" COALESCE(SUM(total_tokens), 0), SUM(cost) FROM {_RECORDS}"
        f" GROUP BY {day}, COALESCE(key_name, ''), COALESCE(model, '')"
    )
    minute = bucket(dbtype, "time", _MINUTE)
    cursor.execute(
        f"INSERT INTO {MINUTELY_TABLE} (minute, upstream, requests, ok)"
        f" SELECT {minute}, COALESCE(upstream, ''), COUNT(*), {ok} FROM {_RECORDS}"
        f" GROUP BY {minute}, COALESCE(upstream, '')"
    )


def add_rollups(cursor: Any, dbtype: str) -> None:
    """The sums, their trigger, the outcome index; the records so far summed."""
    real = "DOUBLE PRECISION" if dbtype == "postgres" else "REAL"
    big = "BIGINT" if dbtype == "postgres" else "INTEGER"
    cursor.execute(
        f"""CREATE TABLE {DAILY_TABLE} (
            day {big} NOT NULL,
            key_name TEXT NOT NULL,
            model TEXT NOT NULL,
            requests {big} NOT NULL,
            ok {big} NOT NULL,
            prompt_tokens {big} NOT NULL,
            completion_tokens {big} NOT NULL,
            total_tokens {big} NOT NULL,
            cost {real},
            PRIMARY KEY (day, key_name, model)
        )"""
    )
    cursor.execute(
        f"""CREATE TABLE {MINUTELY_TABLE} (
            minute {big} NOT NULL,
            upstream TEXT NOT NULL,
            requests {big} NOT NULL,
            ok {big} NOT NULL,
            PRIMARY KEY (minute, upstream)
        )"""
    )
    cursor.execute(f"CREATE INDEX {_RECORDS}_outcome_time ON {_RECORDS} (outcome, time)")
    _backfill(cursor, dbtype)
    create_trigger(cursor, dbtype)


#: The trigger's name (on the records table).
TRIGGER = f"{_RECORDS}_rollup"


def create_trigger(cursor: Any, dbtype: str) -> None:
    """The trigger that adds each record inserted to the sums."""
    body = "; ".join(_upserts(dbtype, "NEW"))
    if dbtype == "postgres":
        cursor.execute(
            f"""CREATE OR REPLACE FUNCTION oaproxy_records_rollup() RETURNS trigger AS $$
                BEGIN {body}; RETURN NULL; END $$ LANGUAGE plpgsql"""
        )
        cursor.execute(
            f"CREATE TRIGGER {TRIGGER} AFTER INSERT ON {_RECORDS}"
            " FOR EACH ROW EXECUTE PROCEDURE oaproxy_records_rollup()"
        )
        return
    cursor.execute(f"CREATE TRIGGER {TRIGGER} AFTER INSERT ON {_RECORDS} BEGIN {body}; END")
