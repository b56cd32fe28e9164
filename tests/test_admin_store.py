"""The store's tables in sqlite and PostgreSQL: made by the migration, their
version raised by every change (by oaproxy or by hand), a change and its
audit entry written in one transaction."""

from __future__ import annotations

import os
import uuid
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from oaproxy.admin.changes import Refusal, add_key, add_upstream, new_key_secret
from oaproxy.admin.loading import read_store
from oaproxy.admin.stored import Action, StoreSnapshot
from oaproxy.admin.tables import read_audit, read_snapshot, read_version, take_change
from oaproxy.config import ConfigError
from oaproxy.sinks.sql import AUDIT_TABLE, UPSTREAMS_TABLE, migrate, open_database
from tests.doubles import make_config
from tests.live import POSTGRES_DSN, SHARED_POSTGRES, postgres_schema, reachable, unavailable
from tests.test_admin_config import FILE, context


class StoreTablesBase(SynchronousTestCase):
    """Shared checks of either database (no tests of its own)."""

    dbtype: str
    dbaddr: str
    false: str  # how the database writes false

    def connect(self) -> Any:
        connection = open_database(self.dbtype, self.dbaddr)
        self.addCleanup(connection.close)
        cursor = connection.cursor()
        migrate(cursor, self.dbtype)
        connection.commit()
        return connection

    def check_edits_by_hand_raise_the_version(self) -> None:
        connection = self.connect()
        cursor = connection.cursor()
        versions = [read_version(cursor)]
        for statement in (
            f"INSERT INTO {UPSTREAMS_TABLE} (name, settings) VALUES ('x', '{{}}')",
            f"UPDATE {UPSTREAMS_TABLE} SET enabled = {self.false} WHERE name = 'x'",
            f"DELETE FROM {UPSTREAMS_TABLE} WHERE name = 'x'",
            f"INSERT INTO {AUDIT_TABLE} (time, actor, action, target, changes)"
            " VALUES (1, 'a', 'upstream.added', 'x', '{}')",
        ):
            cursor.execute(statement)
            connection.commit()
            versions.append(read_version(cursor))
        # The audit log is no setting: it does not count.
        self.assertEqual(versions, [0, 1, 2, 3, 3])

    def check_take_change(self) -> None:
        connection = self.connect()
        cursor = connection.cursor()
        body = {"name": "extra", "endpoint": "https://x.test/v1", "sk": "sk-extra-0123456789"}
        change, version = take_change(cursor, self.dbtype, add_upstream(context(), body))
        connection.commit()
        # Raised once a statement (PostgreSQL), or once a row (sqlite).
        self.assertGreater(version, 0)
        self.assertIsNotNone(change.audit.id)
        snapshot = read_snapshot(cursor)
        self.assertEqual([row.name for row in snapshot.upstreams], ["extra"])
        self.assertNotIn("sk-extra", repr(snapshot) + str(snapshot.upstreams[0].sealed))
        secret = new_key_secret()
        take_change(cursor, self.dbtype, add_key(context(), {"name": "bob"}, secret))
        connection.commit()
        self.assertRaises(Refusal, take_change, cursor, self.dbtype, add_upstream(context(), body))
        connection.rollback()
        [entry, first] = read_audit(cursor, self.dbtype, limit=10)
        self.assertEqual((entry.action, first.action), (Action.KEY_ADDED, Action.UPSTREAM_ADDED))
        stored: StoreSnapshot = read_snapshot(cursor)
        self.assertEqual([k.name for k in stored.keys], ["bob"])
        # Not the secret: its SHA-256.
        cursor.execute("SELECT * FROM oaproxy_keys")
        self.assertNotIn(secret, repr(cursor.fetchall()))

    def check_read_store_at_start(self) -> None:
        config = make_config(FILE + f'dbtype: {self.dbtype}\ndbaddr: "{self.dbaddr}"\n')
        self.assertEqual(read_store(config, create=False).upstreams, ())
        self.assertEqual(read_store(config, create=True).version, 0)


class SQLiteStoreTests(StoreTablesBase):
    dbtype = "sqlite"
    false = "0"

    def test_edits_by_hand_raise_the_version(self) -> None:
        """Inserting, updating and deleting rows by hand raises the version each time."""
        self.check_edits_by_hand_raise_the_version()

    def test_take_change(self) -> None:
        """A change is written with its audit entry; a second of the same name is refused."""
        self.check_take_change()

    def test_read_store_at_start(self) -> None:
        """The daemon's start makes the tables; a reader finds an empty store."""
        self.check_read_store_at_start()

    def setUp(self) -> None:
        directory = self.mktemp()
        os.makedirs(directory)
        self.dbaddr = os.path.join(directory, "db.sqlite")

    def test_unreadable_store(self) -> None:
        """A store that cannot be opened stops the start with one line, naming dbaddr."""
        os.makedirs(self.dbaddr)
        config = make_config(FILE + f"dbaddr: {self.dbaddr}\n")
        with self.assertRaises(ConfigError) as caught:
            read_store(config, create=True)
        self.assertEqual(caught.exception.key, "dbaddr")
        self.assertIn("the store cannot be read", caught.exception.message)


class PostgresStoreTests(StoreTablesBase):
    dbtype = "postgres"
    false = "FALSE"

    def test_edits_by_hand_raise_the_version(self) -> None:
        """Inserting, updating and deleting rows by hand raises the version each time."""
        self.check_edits_by_hand_raise_the_version()

    def test_take_change(self) -> None:
        """A change is written with its audit entry; a second of the same name is refused."""
        self.check_take_change()

    def test_read_store_at_start(self) -> None:
        """The daemon's start makes the tables; a reader finds an empty store."""
        self.check_read_store_at_start()

    def setUp(self) -> None:
        if not reachable(*SHARED_POSTGRES):
            unavailable("PostgreSQL is not running on 127.0.0.1:5432")
        self.dbaddr = postgres_schema(self, f"oaproxy_store_{uuid.uuid4().hex[:12]}", POSTGRES_DSN)
