"""The config a daemon starts with: the file and the store, read before the
reactor runs (by ``twistd`` and by ``oaproxy check-config``), checked alike.

The store is part of the config: a row that does not read is refused as a
line of the file is.  A store that cannot be read at all (PostgreSQL down)
is not: the daemon serves the file alone, as it did before it had a store,
and its follower applies the store once it can be read
(``StoreUnreadable``, ``UNREAD``); ``check-config`` says so and fails.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from contextlib import suppress

from attrs import frozen

from oaproxy.admin.overlay import running_config
from oaproxy.admin.stored import EMPTY, StoreSnapshot
from oaproxy.admin.tables import read_snapshot
from oaproxy.config import DBTYPES, SQLITE, Config, ConfigError, load_config
from oaproxy.recordstore import Database, driver_error_text, missing_table
from oaproxy.sinks.sql import migrate, open_database

__all__ = ["UNREAD", "Loaded", "StoreUnreadable", "load", "read_store"]

#: What a daemon holds of a store it could not read at start: a version no
#: store has, so that the first look that succeeds applies the store.
UNREAD = StoreSnapshot(version=-1)


class StoreUnreadable(ConfigError):
    """The store could not be read (a down database, a bad path); the
    message says why, on one line, never the DSN."""


@frozen
class Loaded:
    file: Config  # what the config file says
    stored: StoreSnapshot  # what the store holds
    config: Config  # the two together: what runs


def load(
    path: str,
    environ: Mapping[str, str] | None = None,
    *,
    create_store: bool,
    without_store: bool = False,
) -> Loaded:
    """Read the file at ``path`` and its store; ``ConfigError`` for any
    problem (``StoreUnreadable`` for a store that cannot be read, unless
    ``without_store``: the file alone is then loaded, with ``UNREAD``).
    With ``create_store`` the store's tables are made or migrated (the
    daemon's start), else a store not made yet holds nothing."""
    file = load_config(path, environ)
    try:
        stored = read_store(file, create=create_store)
    except StoreUnreadable:
        if not without_store:
            raise
        stored = UNREAD
    return Loaded(file, stored, running_config(file, stored))


def read_store(config: Config, *, create: bool) -> StoreSnapshot:
    """The rows of ``config``'s SQL store, on a connection of its own."""
    if config.dbtype not in DBTYPES:
        return EMPTY
    if not create and config.dbtype == SQLITE and not os.path.isfile(config.dbaddr):
        return EMPTY
    database = Database(config.dbtype, config.dbaddr, where="the store")
    try:
        connection = open_database(config.dbtype, config.dbaddr)
    except Exception as e:  # noqa: BLE001 - any driver's error, said on one line
        raise _unreadable(config, e, database) from None
    try:
        cursor = connection.cursor()
        if create:
            migrate(cursor, config.dbtype)
            connection.commit()
        try:
            return read_snapshot(cursor)
        except Exception as e:
            if create or not missing_table(e):
                raise
            return EMPTY
    except Exception as e:  # noqa: BLE001 - any driver's error, said on one line
        raise _unreadable(config, e, database) from None
    finally:
        with suppress(Exception):
            connection.close()


def _unreadable(config: Config, error: BaseException, database: Database) -> StoreUnreadable:
    return StoreUnreadable(
        config.path,
        None,
        "dbaddr",
        f"the store cannot be read: {driver_error_text(error, database)}",
    )
