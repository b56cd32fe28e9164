"""The SQL record store (``dbtype`` ``sqlite`` or ``postgres``), table ``oaproxy_records``.

Besides ``SQLSink``, this module is the one place that knows the schema, for
the CLI too: ``open_database`` (a plain DB-API connection, synchronous),
``connection_pool`` (an adbapi pool), ``migrate``, ``placeholder``, ``COLUMNS``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

from twisted.enterprise.adbapi import ConnectionPool
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime

from oaproxy.config import DBTYPES, POSTGRES, SQLITE
from oaproxy.dashboard.sessiontables import add_session_tables
from oaproxy.record import Record, encode_record
from oaproxy.sinks.queue import QueuedSink
from oaproxy.sinks.rollup import add_rollups

#: Columns of ``records``, in insert order.
COLUMNS = (
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
    "upstream",
    "status",
    "outcome",
    "ttfb",
    "duration",
    "bytes_in",
    "bytes_out",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "cost",
    "record",
    # Added by migration 3: the worker process that served the request.
    "pid",
)

#: Serialises concurrent migrations of several processes (PostgreSQL).
_MIGRATION_LOCK = 0x6F617072  # "oapr"
#: Serialises the record batches of several processes (PostgreSQL): each
#: batch's rows update the sums (``rollup``) in the order of its records,
#: so two at once could each hold a row the other waits for - a deadlock.
_BATCH_LOCK = 0x6F617062  # "oapb"

_INT64 = 2**63 - 1


def _check(dbtype: str) -> None:
    if dbtype not in DBTYPES:
        raise ValueError(f"dbtype must be one of {', '.join(DBTYPES)}, not {dbtype!r}")


def placeholder(dbtype: str) -> str:
    """The DB-API parameter marker of the driver behind ``dbtype``."""
    _check(dbtype)
    return "?" if dbtype == SQLITE else "%s"


# Named for oaproxy: openai-api-route (whose db.sqlite a user may point
# dbaddr at) keeps its own table called "records".
TABLE = "oaproxy_records"
VERSION_TABLE = "oaproxy_schema_version"


def _migration_1(cursor: Any, dbtype: str) -> None:
    real = "DOUBLE PRECISION" if dbtype == POSTGRES else "REAL"
    boolean = "BOOLEAN" if dbtype == POSTGRES else "INTEGER"
    # BIGINT in PostgreSQL where a value can pass 2**31 (sqlite's INTEGER
    # is 64-bit anyway).
    big = "BIGINT" if dbtype == POSTGRES else "INTEGER"
    cursor.execute(
        f"""CREATE TABLE IF NOT EXISTS {TABLE} (
            id TEXT PRIMARY KEY,
            time {real} NOT NULL,
            hostname TEXT,
            client_ip TEXT,
            key_name TEXT,
            user_agent TEXT,
            method TEXT,
            path TEXT,
            model TEXT,
            stream {boolean},
            upstream TEXT,
            status INTEGER,
            outcome TEXT,
            ttfb {real},
            duration {real},
            bytes_in {big},
            bytes_out {big},
            prompt_tokens {big},
            completion_tokens {big},
            total_tokens {big},
            cost {real},
            record TEXT
        )"""
    )
    cursor.execute(f"CREATE INDEX IF NOT EXISTS {TABLE}_time ON {TABLE} (time)")
    cursor.execute(f"CREATE INDEX IF NOT EXISTS {TABLE}_key_time ON {TABLE} (key_name, time)")
    cursor.execute(f"CREATE INDEX IF NOT EXISTS {TABLE}_model_time ON {TABLE} (model, time)")


#: The settings the admin API and the CLI store (``oaproxy.admin``), overlaid
#: on the config file: upstreams, client keys, the audit log of every change.
UPSTREAMS_TABLE = "oaproxy_upstreams"
KEYS_TABLE = "oaproxy_keys"
AUDIT_TABLE = "oaproxy_audit"
#: One row, one number, raised by triggers on every change of the two
#: tables, by oaproxy or by hand: what a daemon looks at every few seconds.
STORE_VERSION_TABLE = "oaproxy_store_version"


def _migration_2(cursor: Any, dbtype: str) -> None:
    real = "DOUBLE PRECISION" if dbtype == POSTGRES else "REAL"
    boolean, true = ("BOOLEAN", "TRUE") if dbtype == POSTGRES else ("INTEGER", "1")
    serial = "BIGSERIAL PRIMARY KEY" if dbtype == POSTGRES else "INTEGER PRIMARY KEY AUTOINCREMENT"
    # settings: the upstream's keys as the config file names them, as a JSON
    # object (for source 'config': only those that differ from the file);
    # sealed: the secret ones (sk), a JSON object encrypted with store_key.
    cursor.execute(
        f"""CREATE TABLE {UPSTREAMS_TABLE} (
            id {serial},
            name TEXT NOT NULL UNIQUE,
            source TEXT NOT NULL DEFAULT 'admin',
            enabled {boolean} NOT NULL DEFAULT {true},
            settings TEXT NOT NULL DEFAULT '{{}}',
            sealed TEXT,
            updated {real}
        )"""
    )
    # A key is kept as the SHA-256 of its secret (hex); upstreams: a JSON
    # list of the upstream names it may use, NULL for those open to all keys.
    cursor.execute(
        f"""CREATE TABLE {KEYS_TABLE} (
            id {serial},
            name TEXT NOT NULL UNIQUE,
            sha256 TEXT NOT NULL UNIQUE,
            settings TEXT NOT NULL DEFAULT '{{}}',
            upstreams TEXT,
            created {real}
        )"""
    )
    cursor.execute(
        f"""CREATE TABLE {AUDIT_TABLE} (
            id {serial},
            time {real} NOT NULL,
            actor TEXT NOT NULL,
            action TEXT NOT NULL,
            target TEXT NOT NULL,
            changes TEXT NOT NULL
        )"""
    )
    cursor.execute(f"CREATE INDEX {AUDIT_TABLE}_time ON {AUDIT_TABLE} (time)")
    cursor.execute(f"CREATE TABLE {STORE_VERSION_TABLE} (version BIGINT NOT NULL)")
    cursor.execute(f"INSERT INTO {STORE_VERSION_TABLE} (version) VALUES (0)")
    bump = f"UPDATE {STORE_VERSION_TABLE} SET version = version + 1"
    if dbtype == POSTGRES:
        cursor.execute(
            f"""CREATE FUNCTION oaproxy_store_changed() RETURNS trigger AS $$
                BEGIN {bump}; RETURN NULL; END $$ LANGUAGE plpgsql"""
        )
        for table in (UPSTREAMS_TABLE, KEYS_TABLE):
            cursor.execute(
                f"CREATE TRIGGER {table}_changed"
                f" AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON {table}"
                " FOR EACH STATEMENT EXECUTE PROCEDURE oaproxy_store_changed()"
            )
        return
    for table in (UPSTREAMS_TABLE, KEYS_TABLE):
        for event in ("INSERT", "UPDATE", "DELETE"):
            cursor.execute(
                f"CREATE TRIGGER {table}_after_{event.lower()} AFTER {event} ON {table}"
                f" BEGIN {bump}; END"
            )


def _migration_3(cursor: Any, dbtype: str) -> None:
    # NULL in the rows stored before: their pid was never kept.
    cursor.execute(f"ALTER TABLE {TABLE} ADD COLUMN pid INTEGER")


def _migration_5(cursor: Any, dbtype: str) -> None:
    # The Requests page's key or model filter with an outcome: each index
    # read in time order, where (key_name, time) alone scans every record
    # of the key for the few of that outcome.
    for column in ("key_name", "model"):
        cursor.execute(
            f"CREATE INDEX {TABLE}_{column}_outcome_time ON {TABLE} ({column}, outcome, time)"
        )


#: Schema migrations: entry N brings version N to N + 1.  Append, never edit.
MIGRATIONS: Sequence[Callable[[Any, str], None]] = (
    _migration_1,
    _migration_2,
    _migration_3,
    add_rollups,
    _migration_5,
    add_session_tables,
)

#: The schema version this code writes.
SCHEMA_VERSION = len(MIGRATIONS)


def migrate(cursor: Any, dbtype: str) -> int:
    """Bring the schema to ``SCHEMA_VERSION``, inside the caller's transaction
    (commit afterwards).  Returns the version found before.

    Raises ``RuntimeError`` when the database is newer than this code.
    """
    _check(dbtype)
    mark = placeholder(dbtype)
    if dbtype == POSTGRES:
        cursor.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
    else:
        # sqlite3 runs DDL outside a transaction unless one is open; take
        # the write lock now so the migration is atomic and single.
        if not cursor.connection.in_transaction:
            cursor.execute("BEGIN IMMEDIATE")
    cursor.execute(f"CREATE TABLE IF NOT EXISTS {VERSION_TABLE} (version INTEGER NOT NULL)")
    cursor.execute(f"SELECT version FROM {VERSION_TABLE}")
    rows = cursor.fetchall()
    found = max(row[0] for row in rows) if rows else 0
    if found > SCHEMA_VERSION:
        raise RuntimeError(
            f"database schema version {found} is newer than this oaproxy's {SCHEMA_VERSION}"
        )
    for migration in MIGRATIONS[found:]:
        migration(cursor, dbtype)
    if not rows:
        cursor.execute(f"INSERT INTO {VERSION_TABLE} (version) VALUES ({mark})", (SCHEMA_VERSION,))
    elif found < SCHEMA_VERSION or len(rows) > 1:
        cursor.execute(f"DELETE FROM {VERSION_TABLE}")
        cursor.execute(f"INSERT INTO {VERSION_TABLE} (version) VALUES ({mark})", (SCHEMA_VERSION,))
    return found


def insert_statement(dbtype: str) -> str:
    """The idempotent insert of one row of ``COLUMNS``."""
    mark = placeholder(dbtype)
    return (
        f"INSERT INTO {TABLE} ({', '.join(COLUMNS)})"
        f" VALUES ({', '.join([mark] * len(COLUMNS))})"
        " ON CONFLICT (id) DO NOTHING"
    )


def record_row(record: Record, dbtype: str) -> tuple[object, ...]:
    """The row of ``COLUMNS`` for one record."""
    usage = record.usage
    return (
        _text(record.id, dbtype),
        record.time,
        _text(record.hostname, dbtype),
        _text(record.client_ip, dbtype),
        _text(record.key_name, dbtype),
        _text(record.user_agent, dbtype),
        _text(record.method, dbtype),
        _text(record.path, dbtype),
        _text(record.model, dbtype),
        record.stream,
        _text(record.upstream, dbtype),
        record.status,
        record.outcome.value,
        record.ttfb,
        record.duration,
        record.bytes_in,
        record.bytes_out,
        _tokens(usage.prompt_tokens) if usage is not None else None,
        _tokens(usage.completion_tokens) if usage is not None else None,
        _tokens(usage.total_tokens) if usage is not None else None,
        record.cost,
        # JSON escapes a NUL: the document needs no _text.
        encode_record(record).decode("utf-8"),
        record.pid,
    )


def _text(value: str | None, dbtype: str) -> str | None:
    # PostgreSQL text cannot hold NUL.
    if value is None or dbtype != POSTGRES:
        return value
    return value.replace("\x00", "\ufffd")


def _tokens(count: int) -> int:
    # Token counts come from upstreams: a nonsense one must not cost the row.
    return max(-_INT64 - 1, min(_INT64, count))


def _sqlite_path(dbaddr: str) -> str:
    if dbaddr != ":memory:":
        directory = os.path.dirname(os.path.abspath(dbaddr))
        os.makedirs(directory, exist_ok=True)
    return dbaddr


def _sqlite_setup(busy_timeout: float) -> Callable[[Any], None]:
    def setup(connection: Any) -> None:
        # WAL: readers (the CLI) never block the writer, nor it them.
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute(f"PRAGMA busy_timeout={int(busy_timeout * 1000)}")
        connection.execute("PRAGMA synchronous=NORMAL")

    return setup


def open_database(dbtype: str, dbaddr: str, *, busy_timeout: float = 5.0) -> Any:
    """A plain, synchronous DB-API connection (for the CLI): sqlite3 on the
    file ``dbaddr``, or psycopg2 on the DSN / ``postgresql://`` URL ``dbaddr``.
    Use ``placeholder`` for parameters; call ``migrate`` and commit first if
    the tables may not exist yet.
    """
    _check(dbtype)
    if dbtype == SQLITE:
        import sqlite3

        connection = sqlite3.connect(_sqlite_path(dbaddr), timeout=busy_timeout)
        _sqlite_setup(busy_timeout)(connection)
        return connection
    import psycopg2

    # A host that drops packets must not hang a command line for minutes.
    return psycopg2.connect(dbaddr, client_encoding="UTF8", connect_timeout=10)


def connection_pool(
    dbtype: str,
    dbaddr: str,
    *,
    reactor: Any = None,
    busy_timeout: float = 5.0,
    connect_timeout: int = 5,
    connections: int = 1,
) -> ConnectionPool:
    """An adbapi pool on the database, reconnecting after a PostgreSQL
    restart: one connection by default (the sink writes one batch at a time).
    """
    _check(dbtype)
    options: dict[str, Any] = {"cp_min": 1, "cp_max": connections}
    if reactor is not None:
        options["cp_reactor"] = reactor
    if dbtype == SQLITE:
        return ConnectionPool(
            "sqlite3",
            _sqlite_path(dbaddr),
            check_same_thread=False,
            timeout=busy_timeout,
            cp_openfun=_sqlite_setup(busy_timeout),
            **options,
        )
    return ConnectionPool(
        "psycopg2",
        dbaddr,
        connect_timeout=connect_timeout,
        # Else a SQL_ASCII database makes psycopg2 refuse non-ASCII text.
        client_encoding="UTF8",
        cp_reconnect=True,
        cp_good_sql="SELECT 1",
        **options,
    )


def _refusals(dbtype: str) -> tuple[type[BaseException], ...]:
    """The errors by which a database refuses a row itself (its data), as
    opposed to being down, locked or misconfigured: those are retried."""
    if dbtype == SQLITE:
        import sqlite3

        return (sqlite3.DataError, sqlite3.IntegrityError, sqlite3.InterfaceError, OverflowError)
    import psycopg2

    return (psycopg2.DataError, psycopg2.IntegrityError)


def _store(
    cursor: Any, records: Sequence[Record], dbtype: str, migrate_first: bool
) -> list[tuple[int, str]]:
    """Insert the records' rows; returns (index, error name) of the rows
    refused.  Runs in the pool's thread: the rows (and the JSON of each
    record) are built there, not on the reactor."""
    if migrate_first:
        migrate(cursor, dbtype)
    if not records:
        return []
    rows = [record_row(record, dbtype) for record in records]
    statement = insert_statement(dbtype)
    refusals = _refusals(dbtype)
    # PostgreSQL aborts the whole transaction on an error; savepoints keep
    # the rows before it. (sqlite undoes only the failing statement, and
    # its one writer at a time needs no lock of ours.)
    savepoints = dbtype == POSTGRES
    if savepoints:
        # Held to the commit: a batch takes a few milliseconds, so waiting
        # for another's costs little; a deadlock costs a retry seconds later.
        cursor.execute("SELECT pg_advisory_xact_lock(%s)", (_BATCH_LOCK,))
    if savepoints:
        cursor.execute("SAVEPOINT batch")
    try:
        _insert_all(cursor, statement, rows, dbtype)
        return []
    except refusals:
        if savepoints:
            cursor.execute("ROLLBACK TO SAVEPOINT batch")
    # One row the database refuses must not hold the others back forever:
    # row by row (rows already in are skipped by ON CONFLICT).
    refused = []
    for index, row in enumerate(rows):
        if savepoints:
            cursor.execute("SAVEPOINT one_row")
        try:
            cursor.execute(statement, row)
        except refusals as e:
            if savepoints:
                cursor.execute("ROLLBACK TO SAVEPOINT one_row")
            refused.append((index, type(e).__name__))
        else:
            if savepoints:
                cursor.execute("RELEASE SAVEPOINT one_row")
    return refused


def _insert_all(cursor: Any, statement: str, rows: list[tuple[object, ...]], dbtype: str) -> None:
    if dbtype == POSTGRES:
        from psycopg2.extras import execute_batch

        # psycopg2's executemany is one round trip per row; a batch of
        # statements in one is what makes a 500-record batch cheap.
        execute_batch(cursor, statement, rows, page_size=len(rows))
    else:
        cursor.executemany(statement, rows)


class SQLSink(QueuedSink):
    """Inserts records into the ``oaproxy_records`` table, one transaction per batch,
    idempotently on ``id``; creates or migrates the schema first.

    ``dbtype`` is ``"sqlite"`` or ``"postgres"``; ``dbaddr`` is the sqlite
    file, or a libpq DSN / ``postgresql://`` URL.  Further ``QueuedSink``
    options are passed on (``write_timeout`` defaults to 30 s here: a locked
    sqlite waits ``busy_timeout`` itself).  Rows and their JSON are built in
    the connection pool's thread, inside the batch's interaction.
    """

    def __init__(
        self,
        dbtype: str,
        dbaddr: str,
        *,
        spool_dir: str,
        reactor: Any = None,
        busy_timeout: float = 5.0,
        queue_size: int = 10000,
        name: str = "sql",
        **options: Any,
    ) -> None:
        _check(dbtype)
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.dbtype = dbtype
        self.dbaddr = dbaddr
        self.busy_timeout = busy_timeout
        self._reactor = reactor
        self._pool: ConnectionPool | None = None
        self._migrated = False
        options.setdefault("write_timeout", 30.0)
        clock: IReactorTime = reactor
        super().__init__(
            name=name,
            spool_dir=spool_dir,
            clock=clock,
            queue_size=queue_size,
            **options,
        )

    def open_backend(self) -> None:
        self._pool = connection_pool(
            self.dbtype,
            self.dbaddr,
            reactor=self._reactor,
            busy_timeout=self.busy_timeout,
        )
        # Create the tables now (the CLI may read them before any record
        # comes); if the database is down, the first batch retries it.
        self._interact([]).addErrback(
            lambda f: self._complain(f"schema setup failed, will retry: {f.getErrorMessage()}")
        )

    def _interact(self, records: list[Record]) -> Deferred[list[tuple[int, str]]]:
        assert self._pool is not None
        d: Deferred[list[tuple[int, str]]] = self._pool.runInteraction(
            _store, records, self.dbtype, not self._migrated
        )

        def migrated(result: list[tuple[int, str]]) -> list[tuple[int, str]]:
            self._migrated = True
            return result

        return d.addCallback(migrated)

    def write_batch(self, records: list[Record]) -> Deferred[object]:
        if self._pool is None:
            raise RuntimeError("the SQL sink is not started")

        def refused(rejected: list[tuple[int, str]]) -> None:
            if rejected:
                self.reject([records[index] for index, _ in rejected], rejected[0][1])

        return self._interact(records).addCallback(refused)

    def close_backend(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()
