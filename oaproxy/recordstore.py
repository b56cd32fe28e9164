"""The SQL record store as the command line reads it (``oaproxy.cli``).

Which database (``--dbtype``/``--dbaddr`` over the config's), a read-only
connection whose schema is checked first, rows fetched a few at a time, and
the usage sums the database computes. ``oaproxy.sinks.sql`` writes the store
and knows its schema. Failures are ``CommandError``s: one line, an exit
status, never the DSN (it may hold a password).
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import uuid
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from contextlib import suppress
from typing import Any, TypeVar

from attrs import field, frozen

from oaproxy.config import Config, ConfigError, load_config
from oaproxy.credentials import Redactor
from oaproxy.sinks.sql import (
    DBTYPES,
    POSTGRES,
    SCHEMA_VERSION,
    SQLITE,
    TABLE,
    VERSION_TABLE,
    open_database,
    placeholder,
)

EXIT_OK = 0
EXIT_DATABASE = 1
EXIT_USAGE = 2

#: Rows fetched per round trip while streaming an export.
FETCH_SIZE = 500

_T = TypeVar("_T")

#: The columns ``usage --by`` may group on.
GROUP_COLUMNS = {"key": "key_name", "model": "model"}


class CommandError(Exception):
    """A failure to report as one line on stderr, with an exit status."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message, status)
        self.message = message
        self.status = status


class _ReadingEnviron(Mapping[str, str]):
    """The environment, where unset variables stand in as placeholders.

    Reading records needs only ``dbtype`` and ``dbaddr``; the daemon's other
    secrets (an upstream's ``sk``) need not be set in an operator's shell.
    """

    def __init__(self, environ: Mapping[str, str]) -> None:
        self._environ = environ

    def __getitem__(self, name: str) -> str:
        return self._environ.get(name, f"unset-{name}")

    def __iter__(self) -> Iterator[str]:
        return iter(self._environ)

    def __len__(self) -> int:
        return len(self._environ)


@frozen
class Database:
    """Where the records are.

    ``where`` is how messages name the database; never the DSN, which may
    hold a password.
    """

    dbtype: str
    dbaddr: str = field(repr=False)
    where: str


@frozen
class Filters:
    """The records a command looks at: ``since <= time < until``, and one of
    ``keys`` / ``models`` when given; with ``answered``, only those an
    upstream answered (not refusals, nor the cache's hits).
    """

    since: float | None = None
    until: float | None = None
    keys: tuple[str, ...] = ()
    models: tuple[str, ...] = ()
    answered: bool = False

    def where(self, mark: str) -> tuple[str, list[object]]:
        """The ``WHERE`` clause (empty, or with a leading space) and its
        parameters, with ``mark`` as the parameter marker.
        """
        conditions: list[str] = []
        parameters: list[object] = []
        if self.since is not None:
            conditions.append(f"time >= {mark}")
            parameters.append(self.since)
        if self.until is not None:
            conditions.append(f"time < {mark}")
            parameters.append(self.until)
        for column, values in (("key_name", self.keys), ("model", self.models)):
            if values:
                conditions.append(f"{column} IN ({', '.join([mark] * len(values))})")
                parameters.extend(values)
        if self.answered:
            conditions.append("upstream IS NOT NULL")
        if not conditions:
            return "", parameters
        return " WHERE " + " AND ".join(conditions), parameters


@frozen
class UsageRow:
    """One group of ``usage``: ``group`` maps each ``--by`` name (``key``,
    ``model``) to its value, ``None`` for records without one.  ``cost`` is
    ``None`` when no record of the group had a cost.
    """

    group: dict[str, str | None]
    requests: int
    ok: int
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cost: float | None

    def as_dict(self) -> dict[str, Any]:
        return {
            **self.group,
            "requests": self.requests,
            "ok": self.ok,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
            "cost": self.cost,
        }


def _database_errors(dbtype: str) -> tuple[type[BaseException], ...]:
    if dbtype == POSTGRES:
        import psycopg2

        return (psycopg2.Error,)
    return (sqlite3.Error,)


def driver_error_text(error: BaseException, database: Database) -> str:
    """The first line of a driver's message, with any password taken out."""
    lines = str(error).strip().splitlines()
    text = lines[0].strip() if lines else type(error).__name__
    if database.dbtype != POSTGRES:
        return text
    import psycopg2
    from psycopg2.extensions import parse_dsn

    try:
        password = parse_dsn(database.dbaddr).get("password")
    except psycopg2.Error:
        # libpq's parse errors quote pieces of the DSN, maybe the password.
        return "the DSN is neither libpq key=value pairs nor a postgresql:// URL"
    if password:
        # Hidden whatever its length: in a driver's message it is no word.
        text = Redactor([password], min_length=1)(text)
    return text


def missing_table(error: BaseException) -> bool:
    """Whether a driver's error says the records table is not there (yet)."""
    if getattr(error, "pgcode", None) == "42P01":  # undefined_table
        return True
    return isinstance(error, sqlite3.OperationalError) and "no such table" in str(error)


def _check_schema(connection: Any, database: Database) -> None:
    cursor = connection.cursor()
    try:
        cursor.execute(f"SELECT version FROM {VERSION_TABLE}")
        versions = [row[0] for row in cursor.fetchall()]
    except _database_errors(database.dbtype) as e:
        if not missing_table(e):
            raise
        raise CommandError(
            f"{database.where} has no oaproxy records table "
            f"(has oaproxy stored any record there yet?)",
            EXIT_DATABASE,
        ) from None
    finally:
        cursor.close()
    found = max(versions, default=0)
    if found > SCHEMA_VERSION:
        raise CommandError(
            f"{database.where} has schema version {found}, newer than this "
            f"oaproxy's {SCHEMA_VERSION}: upgrade oaproxy to read it",
            EXIT_DATABASE,
        )


def with_database(database: Database, work: Callable[[Any], _T]) -> _T:
    """Run ``work(connection)`` on a read-only connection to ``database``;
    driver errors become ``CommandError``s.
    """
    errors = _database_errors(database.dbtype)
    # sqlite would create an empty database, and a reader must not.
    if (
        database.dbtype == SQLITE
        and database.dbaddr != ":memory:"
        and not os.path.isfile(database.dbaddr)
    ):
        raise CommandError(
            f"{database.where} does not exist (has oaproxy stored any record yet?)",
            EXIT_DATABASE,
        )
    try:
        connection = open_database(database.dbtype, database.dbaddr)
    except errors + (OSError,) as e:
        raise CommandError(
            f"cannot open {database.where}: {driver_error_text(e, database)}", EXIT_DATABASE
        ) from None
    try:
        if database.dbtype == POSTGRES:
            connection.readonly = True
        _check_schema(connection, database)
        return work(connection)
    except errors as e:
        raise CommandError(
            f"{database.where}: {driver_error_text(e, database)}", EXIT_DATABASE
        ) from None
    finally:
        with suppress(*errors):
            connection.close()


def fetch_rows(
    connection: Any, dbtype: str, sql: str, parameters: Sequence[object]
) -> Generator[tuple[Any, ...], None, None]:
    """The rows of a query, ``FETCH_SIZE`` at a time."""
    if dbtype == POSTGRES:
        # A named (server-side) cursor: a plain psycopg2 cursor would hold
        # the whole result in memory before the first fetchmany.
        cursor = connection.cursor(name=f"oaproxy_cli_{uuid.uuid4().hex[:12]}")
    else:
        cursor = connection.cursor()
    try:
        cursor.execute(sql, tuple(parameters))
        while True:
            batch = cursor.fetchmany(FETCH_SIZE)
            if not batch:
                return
            yield from batch
    finally:
        cursor.close()


def read_config(path: str) -> Config:
    """The config file as a command reads it: its ``${NAME}``s need not be
    set (a placeholder stands in), and a problem is a ``CommandError``."""
    try:
        return load_config(path, _ReadingEnviron(os.environ))
    except ConfigError as e:
        raise CommandError(str(e), EXIT_USAGE) from None


def resolve_database(args: argparse.Namespace) -> Database:
    """The database the options name: ``--dbtype``/``--dbaddr`` over the config."""
    dbtype: str | None = args.dbtype
    dbaddr: str | None = args.dbaddr
    config_path: str = args.config
    from_config = False
    if dbtype is None or dbaddr is None:
        config = read_config(config_path)
        if config.dbtype not in DBTYPES and dbtype is None:
            raise CommandError(
                f"{config_path}: dbtype is {config.dbtype}: there is no SQL record "
                f"store to read (set dbtype to sqlite or postgres there, or give "
                f"--dbtype and --dbaddr)",
                EXIT_USAGE,
            )
        if dbaddr is None:
            if dbtype is not None and dbtype != config.dbtype:
                raise CommandError(
                    f"--dbtype {dbtype} differs from dbtype {config.dbtype} in "
                    f"{config_path}: give --dbaddr too",
                    EXIT_USAGE,
                )
            dbaddr = config.dbaddr
            from_config = True
        dbtype = dbtype or config.dbtype
    if dbtype == POSTGRES:
        where = (
            f"the postgres database in {config_path}"
            if from_config
            else "the postgres database given by --dbaddr"
        )
    else:
        where = f"the sqlite database {dbaddr}"
    return Database(dbtype=dbtype, dbaddr=dbaddr, where=where)


def _number(value: Any) -> int:
    # PostgreSQL's SUM of BIGINT is NUMERIC: Decimal here.
    return int(value) if value is not None else 0


def usage_rows(connection: Any, dbtype: str, by: Sequence[str], filters: Filters) -> list[UsageRow]:
    """The usage groups, summed by the database, in order of their names
    (records without a key or model last).
    """
    columns = [GROUP_COLUMNS[name] for name in by]
    where, parameters = filters.where(placeholder(dbtype))
    sql = (
        f"SELECT {', '.join(columns)}, COUNT(*),"
        " SUM(CASE WHEN status < 400 THEN 1 ELSE 0 END),"
        " SUM(prompt_tokens), SUM(completion_tokens), SUM(total_tokens), SUM(cost)"
        f" FROM {TABLE}{where} GROUP BY {', '.join(columns)}"
    )
    cursor = connection.cursor()
    try:
        cursor.execute(sql, tuple(parameters))
        fetched = cursor.fetchall()
    finally:
        cursor.close()
    groups = len(columns)
    rows = [
        UsageRow(
            group=dict(zip(by, row[:groups])),
            requests=_number(row[groups]),
            ok=_number(row[groups + 1]),
            prompt_tokens=_number(row[groups + 2]),
            completion_tokens=_number(row[groups + 3]),
            total_tokens=_number(row[groups + 4]),
            cost=None if row[groups + 5] is None else float(row[groups + 5]),
        )
        for row in fetched
    ]
    # Sorted here, not by ORDER BY: the two databases collate text and
    # place NULLs differently, and the groups are few.
    rows.sort(key=lambda row: [(value is None, value or "") for value in row.group.values()])
    return rows
