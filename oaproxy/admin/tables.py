"""The store's SQL, on a DB-API cursor: run by the daemon in adbapi's threads
(``runInteraction``) and by the CLI on its own connection, the same code.

A change is read, decided and written in one transaction (``take_change``),
so two processes changing the store at once cannot both take a name; the
tables' triggers raise ``oaproxy_store_version`` for every change, made here
or by hand, which is what a daemon polls.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import attrs
from attrs import frozen

from oaproxy.admin.stored import (
    Action,
    AuditEntry,
    StoredKey,
    StoredUpstream,
    StoreSnapshot,
)
from oaproxy.config import POSTGRES, SQLITE
from oaproxy.dashboard.sessiontables import read_session_secret
from oaproxy.sinks.sql import (
    AUDIT_TABLE,
    KEYS_TABLE,
    STORE_VERSION_TABLE,
    UPSTREAMS_TABLE,
    placeholder,
)


@frozen
class PutUpstream:
    """Write this row (in place, keeping its order, when the name exists)."""

    row: StoredUpstream


@frozen
class DropUpstream:
    name: str


@frozen
class PutKey:
    row: StoredKey


@frozen
class DropKey:
    name: str


Write = PutUpstream | DropUpstream | PutKey | DropKey


@frozen
class Change:
    """What one change writes, and its audit entry."""

    writes: tuple[Write, ...]
    audit: AuditEntry


def read_version(cursor: Any) -> int:
    cursor.execute(f"SELECT version FROM {STORE_VERSION_TABLE}")
    row = cursor.fetchone()
    return int(row[0]) if row else 0


def read_snapshot(cursor: Any) -> StoreSnapshot:
    """Every row, at the version read first (a change made meanwhile raises
    the version again, so it is read at the next look)."""
    version = read_version(cursor)
    cursor.execute(
        f"SELECT name, source, enabled, settings, sealed FROM {UPSTREAMS_TABLE} ORDER BY id"
    )
    upstreams = tuple(
        StoredUpstream(
            name=name, source=source, enabled=bool(enabled), settings=settings, sealed=sealed
        )
        for name, source, enabled, settings, sealed in cursor.fetchall()
    )
    cursor.execute(
        f"SELECT name, sha256, settings, upstreams, created FROM {KEYS_TABLE} ORDER BY id"
    )
    keys = tuple(
        StoredKey(name=name, sha256=sha256, settings=settings, upstreams=names, created=created)
        for name, sha256, settings, names, created in cursor.fetchall()
    )
    return StoreSnapshot(
        version, upstreams, keys, last_audit_id(cursor), read_session_secret(cursor)
    )


def begin_write(cursor: Any, dbtype: str) -> None:
    """Take the write lock before reading what a change depends on."""
    if dbtype == SQLITE and not cursor.connection.in_transaction:
        # Else sqlite3 opens a deferred transaction at the first write, after
        # the reads a second process may have made too.
        cursor.execute("BEGIN IMMEDIATE")
    elif dbtype == POSTGRES:
        cursor.execute(f"LOCK TABLE {UPSTREAMS_TABLE}, {KEYS_TABLE} IN SHARE ROW EXCLUSIVE MODE")


def take_change(
    cursor: Any, dbtype: str, decide: Callable[[StoreSnapshot], Change]
) -> tuple[Change, int]:
    """Read the store, ``decide`` the change (which may refuse by raising),
    write it and its audit entry; returns the change, with the audit entry's
    id, and the version it made.  The caller commits."""
    begin_write(cursor, dbtype)
    change = decide(read_snapshot(cursor))
    apply_writes(cursor, dbtype, change.writes, change.audit.time)
    entry_id = insert_audit(cursor, dbtype, change.audit)
    audit = attrs.evolve(change.audit, id=entry_id)
    return attrs.evolve(change, audit=audit), read_version(cursor)


def apply_writes(cursor: Any, dbtype: str, writes: Sequence[Write], now: float) -> None:
    mark = placeholder(dbtype)
    for write in writes:
        if isinstance(write, PutUpstream):
            row = write.row
            values = (row.source, row.enabled, row.settings, row.sealed, now, row.name)
            cursor.execute(
                f"UPDATE {UPSTREAMS_TABLE} SET source = {mark}, enabled = {mark},"
                f" settings = {mark}, sealed = {mark}, updated = {mark} WHERE name = {mark}",
                values,
            )
            if cursor.rowcount == 0:
                cursor.execute(
                    f"INSERT INTO {UPSTREAMS_TABLE}"
                    " (source, enabled, settings, sealed, updated, name)"
                    f" VALUES ({', '.join([mark] * 6)})",
                    values,
                )
        elif isinstance(write, DropUpstream):
            cursor.execute(f"DELETE FROM {UPSTREAMS_TABLE} WHERE name = {mark}", (write.name,))
        elif isinstance(write, PutKey):
            key = write.row
            cursor.execute(
                f"INSERT INTO {KEYS_TABLE} (name, sha256, settings, upstreams, created)"
                f" VALUES ({', '.join([mark] * 5)})",
                (key.name, key.sha256, key.settings, key.upstreams, key.created),
            )
        else:
            cursor.execute(f"DELETE FROM {KEYS_TABLE} WHERE name = {mark}", (write.name,))


def insert_audit(cursor: Any, dbtype: str, entry: AuditEntry) -> int:
    mark = placeholder(dbtype)
    statement = (
        f"INSERT INTO {AUDIT_TABLE} (time, actor, action, target, changes)"
        f" VALUES ({', '.join([mark] * 5)})"
    )
    values = (entry.time, entry.actor, entry.action.value, entry.target, entry.changes)
    if dbtype == POSTGRES:
        cursor.execute(statement + " RETURNING id", values)
        return int(cursor.fetchone()[0])
    cursor.execute(statement, values)
    return int(cursor.lastrowid)


def read_audit(
    cursor: Any, dbtype: str, *, limit: int, before: int | None = None
) -> list[AuditEntry]:
    """The latest entries, newest first; ``before``: only older than that id."""
    mark = placeholder(dbtype)
    where, parameters = (
        ("", [limit]) if before is None else (f" WHERE id < {mark}", [before, limit])
    )
    cursor.execute(
        f"SELECT id, time, actor, action, target, changes FROM {AUDIT_TABLE}{where}"
        f" ORDER BY id DESC LIMIT {mark}",
        tuple(parameters),
    )
    return _entries(cursor.fetchall())


def audit_after(cursor: Any, dbtype: str, after: int, *, limit: int) -> list[AuditEntry]:
    """The entries newer than id ``after``, oldest first."""
    mark = placeholder(dbtype)
    cursor.execute(
        f"SELECT id, time, actor, action, target, changes FROM {AUDIT_TABLE}"
        f" WHERE id > {mark} ORDER BY id LIMIT {mark}",
        (after, limit),
    )
    return _entries(cursor.fetchall())


def last_audit_id(cursor: Any) -> int:
    cursor.execute(f"SELECT MAX(id) FROM {AUDIT_TABLE}")
    row = cursor.fetchone()
    return int(row[0]) if row and row[0] is not None else 0


def _entries(rows: Sequence[tuple[Any, ...]]) -> list[AuditEntry]:
    entries = []
    for entry_id, time, actor, action, target, changes in rows:
        try:
            kind = Action(action)
        except ValueError:
            # A row written by hand, or by a newer oaproxy: shown as it is not.
            continue
        entries.append(AuditEntry(time, actor, kind, target, changes, int(entry_id)))
    return entries
