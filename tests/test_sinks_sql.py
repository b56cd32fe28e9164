"""Tests for ``oaproxy.sinks.sql``: sqlite in a temporary directory, the shared
PostgreSQL (database ``test``, a fresh schema per test) and a private
PostgreSQL instance that the fault test stops and starts.
"""

from __future__ import annotations

import glob
import io
import json
import os
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Generator
from functools import partial
from typing import Any

import attrs
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SynchronousTestCase, TestCase

from oaproxy.record import record_document
from oaproxy.sinks import sql
from oaproxy.sinks.sql import (
    COLUMNS,
    SCHEMA_VERSION,
    TABLE,
    VERSION_TABLE,
    SQLSink,
    insert_statement,
    migrate,
    open_database,
    placeholder,
    record_row,
)
from tests.live import (
    SHARED_POSTGRES,
    free_port,
    postgres_schema,
    reachable,
    sql_rows,
    unavailable,
    wait_for,
)
from tests.records import attempt, calls_on_main_thread, emit, record, usage
from tests.records import numbered as nth_record

#: The records here: streamed chat completions of alice's, with usage and cost.
numbered = partial(
    nth_record,
    key_name="alice",
    user_agent="OpenAI/Python 1.0",
    stream=True,
    attempts=[attempt("a", 200, ttfb=0.1, duration=0.5)],
    upstream="a",
    ttfb=0.125,
    duration=0.5,
    bytes_in=120,
    bytes_out=3000,
    response_text="héllo",
    usage=usage(10, 5),
    cost=0.25,
)


class HelperTests(SynchronousTestCase):
    def test_migrate_sqlite(self) -> None:
        """``migrate`` creates the schema once, at ``SCHEMA_VERSION``."""
        path = os.path.join(self.mktemp(), "db.sqlite")
        connection = open_database("sqlite", path)
        self.addCleanup(connection.close)
        self.assertEqual(migrate(connection.cursor(), "sqlite"), 0)
        connection.commit()
        self.assertEqual(migrate(connection.cursor(), "sqlite"), SCHEMA_VERSION)
        connection.commit()
        cursor = connection.cursor()
        cursor.execute(f"SELECT version FROM {VERSION_TABLE}")
        self.assertEqual(cursor.fetchall(), [(SCHEMA_VERSION,)])
        cursor.execute("SELECT name FROM sqlite_master WHERE type = 'index' ORDER BY name")
        self.assertEqual(
            [name for (name,) in cursor.fetchall() if not name.startswith("sqlite_")],
            [
                "oaproxy_audit_time",
                "oaproxy_records_key_name_outcome_time",
                "oaproxy_records_key_time",
                "oaproxy_records_model_outcome_time",
                "oaproxy_records_model_time",
                "oaproxy_records_outcome_time",
                "oaproxy_records_time",
            ],
        )

    def test_pid_column_added_to_a_version_2_table(self) -> None:
        """A table made before the pid column (schema version 2) gets it, NULL
        in the rows it held, and takes new rows with it."""
        path = os.path.join(self.mktemp(), "db.sqlite")
        connection = open_database("sqlite", path)
        self.addCleanup(connection.close)
        cursor = connection.cursor()
        for migration in sql.MIGRATIONS[:2]:
            migration(cursor, "sqlite")
        cursor.execute(f"CREATE TABLE {VERSION_TABLE} (version INTEGER NOT NULL)")
        cursor.execute(f"INSERT INTO {VERSION_TABLE} (version) VALUES (2)")
        cursor.execute(f"INSERT INTO {TABLE} (id, time, record) VALUES ('old', 1, '{{}}')")
        connection.commit()
        self.assertEqual(migrate(connection.cursor(), "sqlite"), 2)
        cursor.execute(insert_statement("sqlite"), record_row(numbered(1, pid=77), "sqlite"))
        connection.commit()
        cursor.execute(f"SELECT id, pid FROM {TABLE} ORDER BY time")
        self.assertEqual(cursor.fetchall(), [("old", None), (numbered(1).id, 77)])

    def test_beside_an_openai_api_route_database(self) -> None:
        """dbaddr may be openai-api-route's own db.sqlite, with its table
        called "records": oaproxy's tables are its own."""
        path = os.path.join(self.mktemp(), "db.sqlite")
        os.makedirs(os.path.dirname(path))
        connection = open_database("sqlite", path)
        self.addCleanup(connection.close)
        connection.execute("CREATE TABLE records (id INTEGER PRIMARY KEY, body TEXT)")
        connection.commit()
        migrate(connection.cursor(), "sqlite")
        connection.commit()
        cursor = connection.cursor()
        cursor.execute(insert_statement("sqlite"), record_row(numbered(1), "sqlite"))
        connection.commit()
        cursor.execute(f"SELECT count(*) FROM {TABLE}")
        self.assertEqual(cursor.fetchone(), (1,))
        cursor.execute("SELECT count(*) FROM records")
        self.assertEqual(cursor.fetchone(), (0,))
        cursor.execute("PRAGMA journal_mode")
        self.assertEqual(cursor.fetchone(), ("wal",))

    def test_placeholder(self) -> None:
        """Each database gets its parameter placeholder; another database is refused."""
        self.assertEqual(placeholder("sqlite"), "?")
        self.assertEqual(placeholder("postgres"), "%s")
        self.assertRaises(ValueError, placeholder, "mysql")

    def test_record_row(self) -> None:
        """The columns are the record's attributes; PostgreSQL text loses its
        NULs (the JSON document keeps them, escaped)."""
        rec = record(path="/a\x00b", stream=False)
        row: dict[str, Any] = dict(zip(COLUMNS, record_row(rec, "postgres"), strict=True))
        self.assertEqual(row["id"], rec.id)
        self.assertEqual(row["time"], 1700000000.0)
        self.assertEqual(row["path"], "/a\ufffdb")
        self.assertEqual((row["status"], row["outcome"]), (200, "ok"))
        self.assertIs(row["stream"], False)
        self.assertEqual(json.loads(row["record"]), record_document(rec))
        sqlite_row = dict(zip(COLUMNS, record_row(rec, "sqlite"), strict=True))
        self.assertEqual(sqlite_row["path"], "/a\x00b")

    def test_record_row_bounds_tokens(self) -> None:
        """An upstream's nonsense token count is cut to what a BIGINT holds,
        so the row is still stored."""
        rec = record(usage=usage(2**70, -(2**70), 5))
        row = dict(zip(COLUMNS, record_row(rec, "sqlite"), strict=True))
        self.assertEqual(
            (row["prompt_tokens"], row["completion_tokens"], row["total_tokens"]),
            (2**63 - 1, -(2**63), 5),
        )


class SQLSinkBase(TestCase):
    """Shared checks of the SQL sink tests (no tests of its own)."""

    dbtype: str
    dbaddr: str

    def sink(self, spool_dir: str, **options: Any) -> SQLSink:
        options.setdefault("stderr", io.StringIO())
        return SQLSink(self.dbtype, self.dbaddr, spool_dir=spool_dir, **options)

    @inlineCallbacks
    def check_records_arrive(self) -> Generator[Deferred[Any], Any, None]:
        sink = self.sink(self.mktemp())
        sink.startService()
        records = [numbered(n) for n in range(5)]
        records[4] = attrs.evolve(
            records[4], usage=None, cost=None, stream=False, ttfb=None, key_name=None
        )
        for rec in records:
            emit(sink, rec)
        yield wait_for(lambda: sink.written == 5, timeout=30)
        emit(sink, records[0])  # replayed: ignored by the primary key
        yield wait_for(lambda: sink.written == 6, timeout=30)
        yield sink.stopService()
        rows = sql_rows(self.dbtype, self.dbaddr)
        self.assertEqual([row["id"] for row in rows], [r.id for r in records])
        first = rows[0]
        expected = {
            "time": 1700000000.0,
            "hostname": "edge-1",
            "client_ip": "127.0.0.1",
            "key_name": "alice",
            "user_agent": "OpenAI/Python 1.0",
            "method": "POST",
            "path": "/v1/chat/completions",
            "model": "gpt-4o-mini",
            "upstream": "a",
            "status": 200,
            "outcome": "ok",
            "ttfb": 0.125,
            "duration": 0.5,
            "bytes_in": 120,
            "bytes_out": 3000,
            "prompt_tokens": 10,
            "completion_tokens": 5,
            "total_tokens": 15,
            "cost": 0.25,
        }
        self.assertEqual({k: first[k] for k in expected}, expected)
        self.assertTrue(first["stream"])
        self.assertEqual(json.loads(first["record"]), record_document(records[0]))
        last = rows[4]
        self.assertEqual(
            (
                last["prompt_tokens"],
                last["cost"],
                bool(last["stream"]),
                last["key_name"],
            ),
            (None, None, False, None),
        )

    @inlineCallbacks
    def check_refused_record_does_not_block(self) -> Generator[Deferred[Any], Any, None]:
        """A record the database refuses for its data is set aside; the
        records around it, and after it, are written."""
        # Every record makes a row; a rule of the database's own (an
        # operator's constraint, say) is what refuses one.
        connection = open_database(self.dbtype, self.dbaddr)
        try:
            migrate(connection.cursor(), self.dbtype)
            if self.dbtype == "sqlite":
                connection.execute(
                    f"CREATE TRIGGER refuse BEFORE INSERT ON {TABLE}"
                    " WHEN NEW.hostname = 'refuse-me' BEGIN SELECT RAISE(ABORT, 'refused'); END"
                )
            else:
                connection.cursor().execute(
                    f"ALTER TABLE {TABLE} ADD CONSTRAINT refuse CHECK (hostname <> 'refuse-me')"
                )
            connection.commit()
        finally:
            connection.close()
        spool = self.mktemp()
        stderr = io.StringIO()
        sink = self.sink(spool, stderr=stderr)
        sink.startService()
        records = [numbered(n) for n in range(3)]
        records[1] = attrs.evolve(records[1], hostname="refuse-me")
        for rec in records:
            emit(sink, rec)
        yield wait_for(lambda: sink.written + sink.dropped == 3, timeout=30)
        later = numbered(3)
        emit(sink, later)
        yield wait_for(lambda: sink.written == 3, timeout=30)
        yield sink.stopService()
        self.assertEqual(
            [row["id"] for row in sql_rows(self.dbtype, self.dbaddr)],
            [records[0].id, records[2].id, later.id],
        )
        self.assertEqual((sink.written, sink.dropped, sink.queued), (3, 1, 0))
        with open(os.path.join(spool, "sql.rejected.jsonl"), encoding="utf-8") as kept:
            self.assertEqual([json.loads(line) for line in kept], [record_document(records[1])])
        error = "IntegrityError" if self.dbtype == "sqlite" else "CheckViolation"
        self.assertIn(f"the backend refused a record ({error}); kept in", stderr.getvalue())

    @inlineCallbacks
    def check_rows_built_in_the_pool(self) -> Generator[Deferred[Any], Any, None]:
        on_main = calls_on_main_thread(self, sql, "record_row")
        sink = self.sink(self.mktemp())
        sink.startService()
        for n in range(7):
            emit(sink, numbered(n, pid=4242 + n % 2))
        yield wait_for(lambda: sink.written == 7, timeout=30)
        yield sink.stopService()
        self.assertEqual(on_main, [False] * 7)
        rows = sql_rows(self.dbtype, self.dbaddr)
        self.assertEqual([row["pid"] for row in rows], [4242, 4243] * 3 + [4242])
        self.assertEqual(json.loads(rows[1]["record"])["pid"], 4243)


class SQLiteSinkTests(SQLSinkBase):
    dbtype = "sqlite"

    def setUp(self) -> None:
        self.dbaddr = os.path.join(self.mktemp(), "sub", "db.sqlite")

    def test_records_arrive(self) -> Deferred[None]:
        """Records are inserted with their columns and whole JSON, once."""
        return self.check_records_arrive()

    def test_rows_built_in_the_pool(self) -> Deferred[None]:
        """Rows and their JSON are built in the pool's thread, not the
        reactor's; the worker's pid is a column and in the JSON."""
        return self.check_rows_built_in_the_pool()

    def test_refused_record_does_not_block(self) -> Deferred[None]:
        """A record sqlite refuses for its data is set aside in the spool's
        rejected file; the records around it and after it are written."""
        return self.check_refused_record_does_not_block()

    @inlineCallbacks
    def test_database_locked(self) -> Generator[Deferred[Any], Any, None]:
        """While another connection holds the write lock, records wait; they are
        written once it is released.
        """
        sink = self.sink(self.mktemp(), busy_timeout=0.1, queue_size=5, batch_size=5)
        sink.startService()
        yield wait_for(lambda: os.path.exists(self.dbaddr), timeout=10)
        blocker = open_database("sqlite", self.dbaddr, busy_timeout=5)
        self.addCleanup(blocker.close)
        migrate(blocker.cursor(), "sqlite")  # the sink may not have yet
        blocker.commit()
        blocker.execute("BEGIN EXCLUSIVE")
        records = [numbered(n) for n in range(20)]
        for rec in records:
            emit(sink, rec)
        yield wait_for(lambda: sink.failures >= 2, timeout=30)
        self.assertEqual(sink.written, 0)
        self.assertGreaterEqual(sink.spilled, 15)
        blocker.rollback()
        yield wait_for(lambda: sink.written == 20, timeout=30)
        yield sink.stopService()
        self.assertEqual(
            [row["id"] for row in sql_rows("sqlite", self.dbaddr)],
            [r.id for r in records],
        )


class PostgresSinkTests(SQLSinkBase):
    dbtype = "postgres"

    def setUp(self) -> None:
        if not reachable(*SHARED_POSTGRES):
            unavailable("PostgreSQL is not running at 127.0.0.1:5432")
        self.dbaddr = postgres_schema(self, f"oaproxy_test_{uuid.uuid4().hex[:12]}")

    def test_records_arrive(self) -> Deferred[None]:
        """Records are inserted with their columns and whole JSON, once."""
        return self.check_records_arrive()

    def test_rows_built_in_the_pool(self) -> Deferred[None]:
        """Rows and their JSON are built in the pool's thread, not the
        reactor's; the worker's pid is a column and in the JSON."""
        return self.check_rows_built_in_the_pool()

    def test_refused_record_does_not_block(self) -> Deferred[None]:
        """A record PostgreSQL refuses for its data is set aside in the spool's
        rejected file; the records around it and after it are written."""
        return self.check_refused_record_does_not_block()

    def test_schema_version(self) -> None:
        """In PostgreSQL, migrate creates the schema once and then reports its version."""
        connection = open_database("postgres", self.dbaddr)
        try:
            self.assertEqual(migrate(connection.cursor(), "postgres"), 0)
            connection.commit()
            self.assertEqual(migrate(connection.cursor(), "postgres"), SCHEMA_VERSION)
            connection.commit()
        finally:
            connection.close()

    def test_concurrent_batches_never_deadlock(self) -> None:
        """Two workers' batches touching the same sums (a day's key, a
        minute's upstream) in opposite orders: the second waits for the
        first instead of PostgreSQL ending one with a deadlock."""
        setup = open_database("postgres", self.dbaddr)
        migrate(setup.cursor(), "postgres")
        setup.commit()
        setup.close()
        first, second = (open_database("postgres", self.dbaddr) for _ in range(2))
        self.addCleanup(first.close)
        self.addCleanup(second.close)

        def batch(n: int, key: str, upstream: str) -> list[Any]:
            return [nth_record(n, key_name=key, upstream=upstream, time=1796323400.0)]

        errors: list[BaseException] = []

        def second_batch() -> None:
            try:
                # key k2 first, then k1 (which the first holds until it commits).
                sql._store(
                    second.cursor(), batch(2, "k2", "u2") + batch(3, "k1", "u9"), "postgres", False
                )
                second.commit()
            except Exception as e:
                errors.append(e)

        sql._store(first.cursor(), batch(1, "k1", "u1"), "postgres", False)
        thread = threading.Thread(target=second_batch)
        thread.start()
        watch = open_database("postgres", self.dbaddr)
        self.addCleanup(watch.close)
        watch.autocommit = True
        pid = second.get_backend_pid()
        cursor = watch.cursor()
        for _ in range(1000):
            cursor.execute("SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s", (pid,))
            if cursor.fetchone() == ("Lock",) or not thread.is_alive():
                break
            time.sleep(0.01)
        try:
            # key k2 now, which the second took first before the fix.
            sql._store(first.cursor(), batch(4, "k2", "u9"), "postgres", False)
            first.commit()
        except Exception as e:
            errors.append(e)
            first.rollback()
        thread.join(30)
        self.assertEqual(errors, [])
        cursor.execute("SELECT key_name, requests FROM oaproxy_usage_daily ORDER BY key_name")
        self.assertEqual(cursor.fetchall(), [("k1", 2), ("k2", 2)])


def _postgres_bin() -> str | None:
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    return os.path.dirname(candidates[-1]) if candidates else None


class PrivatePostgres:
    """A PostgreSQL instance of our own (as user ``postgres`` when we are root)."""

    def __init__(self) -> None:
        self.bin = _postgres_bin()
        self.port = free_port()
        self.directory = tempfile.mkdtemp(prefix="oaproxy-pg-")
        self.data = os.path.join(self.directory, "data")
        self.dsn = (
            f"host=127.0.0.1 port={self.port} dbname=postgres user=postgres connect_timeout=3"
        )

    def _command(self, program: str, *arguments: str) -> Deferred[tuple[bytes, bytes, int]]:
        assert self.bin is not None
        executable = os.path.join(self.bin, program)
        if os.geteuid() == 0:
            runuser = shutil.which("runuser") or "/usr/sbin/runuser"
            return getProcessOutputAndValue(
                runuser, ["-u", "postgres", "--", executable, *arguments]
            )
        return getProcessOutputAndValue(executable, list(arguments))

    @inlineCallbacks
    def _run(self, program: str, *arguments: str) -> Generator[Deferred[Any], Any, None]:
        out, err, code = yield self._command(program, *arguments)
        if code != 0:
            raise AssertionError(f"{program} failed ({code}): {out!r} {err!r}")

    @inlineCallbacks
    def init(self) -> Generator[Deferred[Any], Any, None]:
        if self.bin is None:
            unavailable("PostgreSQL server binaries are not installed")
        if os.geteuid() == 0:
            import pwd

            try:
                user = pwd.getpwnam("postgres")
            except KeyError:
                unavailable("running as root and there is no postgres user for initdb")
            os.chown(self.directory, user.pw_uid, user.pw_gid)
        yield self._run("initdb", "-D", self.data, "--username=postgres", "--auth=trust", "-N")

    def start(self) -> Deferred[None]:
        options = f"-p {self.port} -k {self.directory} -c listen_addresses=127.0.0.1 -c fsync=off"
        return self._run(
            "pg_ctl",
            "-D",
            self.data,
            "-o",
            options,
            "-l",
            os.path.join(self.directory, "log"),
            "-w",
            "start",
        )

    def stop(self, mode: str = "immediate") -> Deferred[None]:
        return self._run("pg_ctl", "-D", self.data, "-m", mode, "-w", "stop")

    @inlineCallbacks
    def cleanup(self) -> Generator[Deferred[Any], Any, None]:
        if os.path.exists(os.path.join(self.data, "postmaster.pid")):
            yield self._command("pg_ctl", "-D", self.data, "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.directory, ignore_errors=True)


class PostgresOutageTests(SQLSinkBase):
    dbtype = "postgres"
    timeout = 180

    @inlineCallbacks
    def test_postgres_restart(self) -> Generator[Deferred[Any], Any, None]:
        """PostgreSQL stopped mid-run: records wait and spill; after it is back
        every record is stored exactly once.
        """
        server = PrivatePostgres()
        self.addCleanup(server.cleanup)
        yield server.init()
        yield server.start()
        self.dbaddr = server.dsn
        sink = self.sink(self.mktemp(), queue_size=20, batch_size=10, write_timeout=10.0)
        sink.startService()
        records = [numbered(n) for n in range(80)]
        for rec in records[:20]:
            emit(sink, rec)
        yield wait_for(lambda: sink.written == 20, timeout=30)

        yield server.stop()
        for rec in records[20:]:
            emit(sink, rec)
        self.assertGreaterEqual(sink.spilled, 40)
        yield wait_for(lambda: sink.failures >= 1, timeout=30)

        yield server.start()
        yield wait_for(lambda: sink.written == 80, timeout=60)
        yield sink.stopService()
        self.assertEqual(
            [row["id"] for row in sql_rows("postgres", server.dsn)],
            [r.id for r in records],
        )
        self.assertEqual(sink.dropped, 0)
        # adbapi reports the dead connection's failed rollback itself.
        self.flushLoggedErrors()
