"""What the dashboard's sessions keep in the SQL store, for every process
and machine that shares it (schema migration 6):

- ``oaproxy_dashboard_secret``: one random value, made by the migration,
  from which (with the admin key) every process signs and checks session
  cookies and CSRF tokens: a cookie one worker issued is good on all;
- ``oaproxy_dashboard_logouts``: the sessions logged out, until they would
  have expired anyway: a logout on one worker ends the session on all.
"""

from __future__ import annotations

import secrets
from typing import Any

__all__ = [
    "LOGOUTS_TABLE",
    "SECRET_TABLE",
    "add_session_tables",
    "close_session",
    "read_session_secret",
    "session_closed",
]

SECRET_TABLE = "oaproxy_dashboard_secret"
LOGOUTS_TABLE = "oaproxy_dashboard_logouts"


def _mark(dbtype: str) -> str:
    return "%s" if dbtype == "postgres" else "?"


def add_session_tables(cursor: Any, dbtype: str) -> None:
    """The two tables, and the secret (made once: migrations are serialised)."""
    real = "DOUBLE PRECISION" if dbtype == "postgres" else "REAL"
    cursor.execute(f"CREATE TABLE {SECRET_TABLE} (secret TEXT NOT NULL)")
    cursor.execute(
        f"INSERT INTO {SECRET_TABLE} (secret) VALUES ({_mark(dbtype)})", (secrets.token_hex(32),)
    )
    cursor.execute(
        f"CREATE TABLE {LOGOUTS_TABLE} (session TEXT PRIMARY KEY, expires {real} NOT NULL)"
    )


def read_session_secret(cursor: Any) -> str:
    """The store's secret; ``''`` when its row was deleted by hand."""
    cursor.execute(f"SELECT secret FROM {SECRET_TABLE}")
    row = cursor.fetchone()
    return str(row[0]) if row else ""


def session_closed(connection: Any, dbtype: str, session_id: str) -> bool:
    """Whether the session was logged out (by any process)."""
    cursor = connection.cursor()
    try:
        cursor.execute(
            f"SELECT 1 FROM {LOGOUTS_TABLE} WHERE session = {_mark(dbtype)}", (session_id,)
        )
        return cursor.fetchone() is not None
    finally:
        cursor.close()


def close_session(
    connection: Any, dbtype: str, session_id: str, expires: float, now: float
) -> None:
    """Log the session out for every process; forget the logouts of sessions
    that have expired since (their cookies are refused anyway)."""
    mark = _mark(dbtype)
    cursor = connection.cursor()
    try:
        cursor.execute(f"DELETE FROM {LOGOUTS_TABLE} WHERE expires <= {mark}", (now,))
        cursor.execute(
            f"INSERT INTO {LOGOUTS_TABLE} (session, expires) VALUES ({mark}, {mark})"
            " ON CONFLICT (session) DO NOTHING",
            (session_id, expires),
        )
    finally:
        cursor.close()
