"""Tests for ``oaproxy.cli`` and ``oaproxy.recordstore``: ``records export`` and
``usage`` against records stored by the SQL module, in sqlite and in
PostgreSQL (a fresh schema of the shared server at 127.0.0.1:5432; skipped
when it is down, except under ``CI=true``, where that fails).
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import uuid
from datetime import datetime, timezone
from functools import partial
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from oaproxy import recordstore
from oaproxy.cli import chat_item, parse_time
from oaproxy.record import Outcome, Record, decode_record, encode_record
from oaproxy.sinks.sql import (
    SCHEMA_VERSION,
    VERSION_TABLE,
    insert_statement,
    migrate,
    open_database,
    record_row,
)
from tests.doubles import run_cli
from tests.live import POSTGRES_DSN, free_port, postgres_schema, unavailable
from tests.records import record, usage

UTC = timezone.utc

PROJECT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: 2026-11-01T00:00:00Z.
T0 = datetime(2026, 11, 1, tzinfo=UTC).timestamp()
DAY = 86400.0
#: "now" for relative times: a second after the last record.
NOW = T0 + 3 * DAY + 1

SHARED_POSTGRES = f"{POSTGRES_DSN} connect_timeout=3"

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
WEATHER_CALL = {
    "id": "call_1",
    "type": "function",
    "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
}


#: The records here: answered by ``up``, from 10.0.0.1, with neither key nor model.
_record = partial(
    record,
    client_ip="10.0.0.1",
    key_name=None,
    model=None,
    attempts=[],
    upstream="up",
    ttfb=0.1,
    duration=0.2,
    bytes_in=10,
    bytes_out=20,
)


#: A chat answer (01:00 on day 0).
CHAT = _record(
    id="r1-chat",
    time=T0 + 3600,
    key_name="alice",
    model="gpt-4o-mini",
    request_body=json.dumps(
        {
            "model": "gpt-4o-mini",
            "messages": [{"role": "user", "content": "héllo 你好"}],
        }
    ),
    response_text="Hello! 你好",
    finish_reason="stop",
    usage=usage(10, 5),
    cost=0.0015,
)
#: A tool call (exactly 00:00 on day 1).
TOOL = _record(
    id="r2-tool",
    time=T0 + DAY,
    key_name="alice",
    model="gpt-4o-mini",
    request_body=json.dumps(
        {
            "model": "gpt-4o-mini",
            "messages": [
                {"role": "system", "content": "You are terse."},
                {"role": "user", "content": "Weather in Paris?"},
            ],
            "tools": [WEATHER_TOOL],
            "temperature": 0.2,
        }
    ),
    tool_calls=[WEATHER_CALL],
    finish_reason="tool_calls",
    usage=usage(20, 10),
    cost=0.003,
)
#: Embeddings, no cost known (exactly 00:00 on day 2).
EMBEDDING = _record(
    id="r3-embedding",
    time=T0 + 2 * DAY,
    key_name="bob",
    path="/v1/embeddings",
    model="text-embedding-3-small",
    request_body=json.dumps({"model": "text-embedding-3-small", "input": "hi"}),
    usage=usage(8, 0),
)
#: A multipart upload that failed.
AUDIO = _record(
    id="r4-audio",
    time=T0 + 2 * DAY + 60,
    key_name="bob",
    path="/v1/audio/transcriptions",
    model="/v1/audio/transcriptions",
    request_body={
        "content_type": "multipart/form-data",
        "size": 1234,
        "fields": [{"name": "file", "filename": "a.mp3", "size": 1000}],
    },
    status=500,
    outcome=Outcome.EXHAUSTED,
)
#: A rate-limited chat without a key (noauth upstream).
LIMITED = _record(
    id="r5-limited",
    time=T0 + 3 * DAY,
    model="gpt-4o-mini",
    request_body=json.dumps(
        {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "again"}]}
    ),
    status=429,
    outcome=Outcome.EXHAUSTED,
)

RECORDS = [CHAT, TOOL, EMBEDDING, AUDIO, LIMITED]

CHAT_ITEM = {
    "datetime": "2026-11-01 01:00:00",
    "ip": "10.0.0.1",
    "model": "gpt-4o-mini",
    "temperature": 1,
    "messages": [{"user": "héllo 你好"}],
    "functions": None,
    "tools": None,
    "is_function_call": False,
    "is_tool_calls": False,
    "assistant": "Hello! 你好",
    "tool_calls": None,
}
TOOL_ITEM = {
    "datetime": "2026-11-02 00:00:00",
    "ip": "10.0.0.1",
    "model": "gpt-4o-mini",
    "temperature": 0.2,
    "messages": [{"system": "You are terse."}, {"user": "Weather in Paris?"}],
    "functions": None,
    "tools": [WEATHER_TOOL],
    "is_function_call": False,
    "is_tool_calls": True,
    "assistant": None,
    "tool_calls": [WEATHER_CALL],
}
LIMITED_ITEM = {
    "datetime": "2026-11-04 00:00:00",
    "ip": "10.0.0.1",
    "model": "gpt-4o-mini",
    "temperature": 1,
    "messages": [{"user": "again"}],
    "functions": None,
    "tools": None,
    "is_function_call": False,
    "is_tool_calls": False,
    "assistant": None,
    "tool_calls": None,
}


def jsonl(*records: Record) -> str:
    return "".join(encode_record(record).decode("utf-8") + "\n" for record in records)


def chat_json(*items: dict[str, Any]) -> str:
    if not items:
        return "[]\n"
    return "[\n" + ",\n".join(json.dumps(i, ensure_ascii=False) for i in items) + "\n]\n"


#: The command line in process, at ``NOW`` unless told another time.
run = partial(run_cli, now=NOW)


def store(dbtype: str, dbaddr: str, records: list[Record]) -> None:
    """Insert ``records`` the way the SQL sink does."""
    connection = open_database(dbtype, dbaddr)
    try:
        cursor = connection.cursor()
        migrate(cursor, dbtype)
        cursor.executemany(insert_statement(dbtype), [record_row(r, dbtype) for r in records])
        connection.commit()
    finally:
        connection.close()


class StoreMixin:
    """The commands against a database holding ``RECORDS``; subclasses set
    ``dbtype`` and ``dbaddr`` in ``setUp`` and store the records.
    """

    dbtype: str
    dbaddr: str

    def command(self, *argv: str, now: float = NOW) -> tuple[int, str, str]:
        return run(*argv, "--dbtype", self.dbtype, "--dbaddr", self.dbaddr, now=now)

    def export(self, *argv: str, now: float = NOW) -> tuple[int, str, str]:
        return self.command("records", "export", *argv, now=now)

    def assertOutput(self, result: tuple[int, str, str], stdout: str, stderr: str = "") -> None:
        case: Any = self
        case.assertEqual(result, (0, stdout, stderr))

    # records export --format jsonl

    def test_export_jsonl(self) -> None:
        """Every record, in time order, one JSON document a line: the stored
        text, equal to the inserted record; read a few rows at a time.
        """
        case: Any = self
        case.patch(recordstore, "FETCH_SIZE", 2)
        status, out, err = self.export()
        self.assertOutput((status, out, err), jsonl(*RECORDS))
        case.assertEqual([decode_record(line) for line in out.splitlines()], RECORDS)

    def test_export_since_until(self) -> None:
        """``--since`` is inclusive, ``--until`` exclusive; dates are UTC."""
        self.assertOutput(
            self.export("--since", "2026-11-02", "--until", "2026-11-03"), jsonl(TOOL)
        )
        self.assertOutput(
            self.export("--since", "2026-11-01T01:00", "--until", "2026-11-02T00:00Z"),
            jsonl(CHAT),
        )
        # 2026-11-02T08:00+08:00 is 00:00 UTC.
        self.assertOutput(self.export("--until", "2026-11-02T08:00+08:00"), jsonl(CHAT))

    def test_export_relative(self) -> None:
        """Relative times count back from now."""
        self.assertOutput(self.export("--since", "24h"), jsonl(AUDIO, LIMITED))
        self.assertOutput(self.export("--since", "1d"), jsonl(AUDIO, LIMITED))
        self.assertOutput(self.export("--since", "3d", "--until", "2d"), jsonl(CHAT, TOOL))
        self.assertOutput(self.export("--since", "30m"), jsonl(LIMITED))
        self.assertOutput(self.export("--since", "30m", now=NOW + 3600), "")

    def test_export_key_model(self) -> None:
        """``--key`` and ``--model`` select, and may be repeated."""
        self.assertOutput(self.export("--key", "bob"), jsonl(EMBEDDING, AUDIO))
        self.assertOutput(self.export("--model", "gpt-4o-mini"), jsonl(CHAT, TOOL, LIMITED))
        self.assertOutput(
            self.export("--key", "alice", "--key", "bob", "--model", "gpt-4o-mini"),
            jsonl(CHAT, TOOL),
        )
        self.assertOutput(self.export("--key", "nobody"), "")

    def test_export_chat(self) -> None:
        """``--format chat`` is openai-forward's ``chat_openai.json``: chat
        records only, one item a line; the others are counted on stderr.
        """
        case: Any = self
        result = self.export("--format", "chat")
        self.assertOutput(
            result,
            chat_json(CHAT_ITEM, TOOL_ITEM, LIMITED_ITEM),
            "oaproxy: left out 2 records without chat messages\n",
        )
        case.assertEqual(json.loads(result[1]), [CHAT_ITEM, TOOL_ITEM, LIMITED_ITEM])

    def test_export_chat_filtered(self) -> None:
        """The chat format obeys --since and --key, says how many records it
        left out for having no chat messages, and gives an empty list when
        nothing matches."""
        self.assertOutput(
            self.export("--format", "chat", "--since", "2026-11-02", "--key", "alice"),
            chat_json(TOOL_ITEM),
        )
        self.assertOutput(
            self.export("--format", "chat", "--key", "bob"),
            chat_json(),
            "oaproxy: left out 2 records without chat messages\n",
        )
        self.assertOutput(self.export("--format", "chat", "--key", "nobody"), "[]\n")

    def test_export_to_file(self) -> None:
        """``--output FILE`` writes the file (replacing it), nothing on stdout."""
        case: Any = self
        path = os.path.join(case.mktemp())
        os.makedirs(path)
        target = os.path.join(path, "export.jsonl")
        with open(target, "w") as f:
            f.write("old\n")
        self.assertOutput(self.export("--model", "gpt-4o-mini", "-o", target), "")
        with open(target, encoding="utf-8") as f:
            case.assertEqual(f.read(), jsonl(CHAT, TOOL, LIMITED))
        case.assertEqual(os.listdir(path), ["export.jsonl"])

    def test_export_to_missing_directory(self) -> None:
        """Exporting into a directory that does not exist fails with one line
        naming the file, and writes nothing to stdout."""
        case: Any = self
        target = os.path.join(case.mktemp(), "export.jsonl")
        status, out, err = self.export("-o", target)
        case.assertEqual(
            (status, out, err),
            (1, "", f"oaproxy: cannot write {target}: No such file or directory\n"),
        )

    # usage

    def test_usage_table(self) -> None:
        """By key and model (the default): sums per group, ``-`` for no key and
        no cost, a total line, columns aligned.
        """
        self.assertOutput(
            self.command("usage"),
            "key    model                     requests  ok  prompt_tokens"
            "  completion_tokens  total_tokens    cost\n"
            "alice  gpt-4o-mini                      2   2             30"
            "                 15            45  0.0045\n"
            "bob    /v1/audio/transcriptions         1   0              0"
            "                  0             0       -\n"
            "bob    text-embedding-3-small           1   1              8"
            "                  0             8       -\n"
            "-      gpt-4o-mini                      1   0              0"
            "                  0             0       -\n"
            "total                                   5   3             38"
            "                 15            53  0.0045\n",
        )

    def test_usage_by_key(self) -> None:
        """usage --by key sums each key's requests, tokens and cost up to
        --until (exclusive), '-' for an unknown cost, with a total line."""
        self.assertOutput(
            self.command("usage", "--by", "key", "--until", "2026-11-03T00:01"),
            "key    requests  ok  prompt_tokens  completion_tokens  total_tokens    cost\n"
            "alice         2   2             30                 15            45  0.0045\n"
            "bob           1   1              8                  0             8       -\n"
            "total         3   3             38                 15            53  0.0045\n",
        )

    def test_usage_empty(self) -> None:
        """A usage table over no records has only its header and a zero total."""
        self.assertOutput(
            self.command("usage", "--by", "model", "--since", "2027-01-01"),
            "model  requests  ok  prompt_tokens  completion_tokens  total_tokens  cost\n"
            "total         0   0              0                  0             0     -\n",
        )

    def test_usage_json(self) -> None:
        """``--format json``: a list of objects, ``null`` for no model or cost."""
        case: Any = self
        status, out, err = self.command(
            "usage", "--by", "model", "--format", "json", "--since", "2026-11-02"
        )
        case.assertEqual((status, err), (0, ""))
        case.assertEqual(
            json.loads(out),
            [
                {
                    "model": "/v1/audio/transcriptions",
                    "requests": 1,
                    "ok": 0,
                    "prompt_tokens": 0,
                    "completion_tokens": 0,
                    "total_tokens": 0,
                    "cost": None,
                },
                {
                    "model": "gpt-4o-mini",
                    "requests": 2,
                    "ok": 1,
                    "prompt_tokens": 20,
                    "completion_tokens": 10,
                    "total_tokens": 30,
                    "cost": 0.003,
                },
                {
                    "model": "text-embedding-3-small",
                    "requests": 1,
                    "ok": 1,
                    "prompt_tokens": 8,
                    "completion_tokens": 0,
                    "total_tokens": 8,
                    "cost": None,
                },
            ],
        )

    def test_usage_filters(self) -> None:
        """usage --key and --model keep only their records, grouped in the order
        --by names, a keyless request under a null key."""
        case: Any = self
        status, out, _ = self.command(
            "usage", "--by", "key,model", "--format", "json", "--key", "alice"
        )
        case.assertEqual(status, 0)
        rows = json.loads(out)
        case.assertEqual(
            [(r["key"], r["model"], r["requests"], r["total_tokens"]) for r in rows],
            [("alice", "gpt-4o-mini", 2, 45)],
        )
        case.assertAlmostEqual(rows[0]["cost"], 0.0045)
        status, out, _ = self.command(
            "usage", "--by", "model,key", "--format", "json", "--model", "gpt-4o-mini"
        )
        case.assertEqual(status, 0)
        case.assertEqual(
            [(r["model"], r["key"], r["requests"], r["ok"]) for r in json.loads(out)],
            [("gpt-4o-mini", "alice", 2, 2), ("gpt-4o-mini", None, 1, 0)],
        )


class SQLiteTests(StoreMixin, SynchronousTestCase):
    dbtype = "sqlite"

    def setUp(self) -> None:
        directory = self.mktemp()
        os.makedirs(directory)
        self.dbaddr = os.path.join(directory, "db.sqlite")
        # Stored out of order: the export sorts by time.
        store(self.dbtype, self.dbaddr, [LIMITED, TOOL, CHAT, AUDIO, EMBEDDING])

    def config(self, text: str) -> str:
        path = os.path.join(os.path.dirname(self.dbaddr), "config.yaml")
        with open(path, "w") as f:
            f.write("upstreams:\n  - endpoint: http://127.0.0.1:9/v1\n" + text)
        return path

    def test_config(self) -> None:
        """Without --dbtype/--dbaddr the config file names the database."""
        path = self.config(f"dbtype: sqlite\ndbaddr: {self.dbaddr}\n")
        self.assertEqual(
            run("records", "export", "--config", path, "--key", "bob"),
            (0, jsonl(EMBEDDING, AUDIO), ""),
        )

    def test_config_dbaddr_override(self) -> None:
        """--dbaddr overrides the config file's dbaddr."""
        path = self.config("dbtype: sqlite\ndbaddr: /nonexistent/db.sqlite\n")
        self.assertEqual(
            run(
                "records",
                "export",
                "--config",
                path,
                "--dbaddr",
                self.dbaddr,
                "--key",
                "bob",
            ),
            (0, jsonl(EMBEDDING, AUDIO), ""),
        )

    def test_config_error(self) -> None:
        """A config problem is its one-line message, exit status 2."""
        path = self.config("dbtype: sqlite\nbogus: 1\n")
        self.assertEqual(
            run("usage", "--config", path),
            (2, "", f"oaproxy: {path}:4: bogus: unknown key 'bogus'\n"),
        )
        missing = path + ".missing"
        self.assertEqual(
            run("usage", "--config", missing),
            (
                2,
                "",
                f"oaproxy: {missing}: cannot read the config file: No such file or directory\n",
            ),
        )

    def test_dbtype_none(self) -> None:
        """A config with dbtype none is refused with one line saying there is no
        store to read and what to set."""
        path = self.config("dbtype: none\n")
        status, out, err = run("usage", "--config", path)
        self.assertEqual((status, out), (2, ""))
        self.assertEqual(
            err,
            f"oaproxy: {path}: dbtype is none: there is no SQL record store to read "
            f"(set dbtype to sqlite or postgres there, or give --dbtype and --dbaddr)\n",
        )

    def test_dbtype_override_needs_dbaddr(self) -> None:
        """A --dbtype other than the config's, without a --dbaddr, is refused
        with one line saying so."""
        path = self.config(f"dbtype: sqlite\ndbaddr: {self.dbaddr}\n")
        self.assertEqual(
            run("usage", "--config", path, "--dbtype", "postgres"),
            (
                2,
                "",
                (
                    f"oaproxy: --dbtype postgres differs from dbtype sqlite in {path}: "
                    f"give --dbaddr too\n"
                ),
            ),
        )

    def test_postgres_error_hides_dsn(self) -> None:
        """A postgres failure is one line that names the config, never the DSN
        or its password.
        """
        port = free_port()
        path = self.config(
            f"dbtype: postgres\n"
            f"dbaddr: host=127.0.0.1 port={port} user=u password=hunter2 dbname=x\n"
        )
        status, out, err = run("usage", "--config", path)
        self.assertEqual((status, out), (1, ""))
        self.assertTrue(
            err.startswith(f"oaproxy: cannot open the postgres database in {path}: "),
            err,
        )
        self.assertEqual(err.count("\n"), 1, err)
        self.assertNotIn("hunter2", err)
        self.assertNotIn("port=", err)
        status, out, err = run(
            "usage",
            "--dbtype",
            "postgres",
            "--dbaddr",
            "host=127.0.0.1 password=hunter2 junk",
        )
        self.assertEqual(
            (status, out, err),
            (
                1,
                "",
                (
                    "oaproxy: cannot open the postgres database given by --dbaddr: "
                    "the DSN is neither libpq key=value pairs nor a postgresql:// URL\n"
                ),
            ),
        )

    def test_missing_database(self) -> None:
        """A sqlite file that does not exist is an error, and is not created."""
        missing = os.path.join(os.path.dirname(self.dbaddr), "new", "db.sqlite")
        self.assertEqual(
            run("usage", "--dbtype", "sqlite", "--dbaddr", missing),
            (
                1,
                "",
                (
                    f"oaproxy: the sqlite database {missing} does not exist "
                    f"(has oaproxy stored any record yet?)\n"
                ),
            ),
        )
        self.assertFalse(os.path.exists(os.path.dirname(missing)))

    def test_no_table(self) -> None:
        """A database without oaproxy's table is refused with one line asking
        whether oaproxy stored anything there."""
        empty = os.path.join(os.path.dirname(self.dbaddr), "empty.sqlite")
        sqlite3.connect(empty).close()
        self.assertEqual(
            run("records", "export", "--dbtype", "sqlite", "--dbaddr", empty),
            (
                1,
                "",
                (
                    f"oaproxy: the sqlite database {empty} has no oaproxy records table "
                    f"(has oaproxy stored any record there yet?)\n"
                ),
            ),
        )

    def test_database_error(self) -> None:
        """A file that is not a database: one line, status 1, no traceback."""
        bad = os.path.join(os.path.dirname(self.dbaddr), "bad.sqlite")
        with open(bad, "wb") as f:
            f.write(b"not a database at all" * 100)
        status, out, err = run("usage", "--dbtype", "sqlite", "--dbaddr", bad)
        self.assertEqual((status, out), (1, ""))
        self.assertEqual(err.count("\n"), 1, err)
        self.assertIn(f"the sqlite database {bad}", err)
        self.assertIn("not a database", err)

    def test_newer_schema(self) -> None:
        """A database of a newer schema version is refused with one line asking
        for a newer oaproxy."""
        connection = sqlite3.connect(self.dbaddr)
        connection.execute(f"UPDATE {VERSION_TABLE} SET version = 99")
        connection.commit()
        connection.close()
        self.assertEqual(
            run("usage", "--dbtype", "sqlite", "--dbaddr", self.dbaddr),
            (
                1,
                "",
                (
                    f"oaproxy: the sqlite database {self.dbaddr} has schema version 99, "
                    f"newer than this oaproxy's {SCHEMA_VERSION}: upgrade oaproxy to read it\n"
                ),
            ),
        )

    def test_module_entry(self) -> None:
        """``python -m oaproxy`` runs the command."""
        environ = dict(os.environ)
        environ["PYTHONPATH"] = os.pathsep.join(
            [PROJECT, *filter(None, [environ.get("PYTHONPATH")])]
        )
        process = subprocess.run(
            [sys.executable, "-m", "oaproxy", "usage", "--by", "key"]
            + ["--dbtype", "sqlite", "--dbaddr", self.dbaddr, "--format", "json"],
            capture_output=True,
            env=environ,
            timeout=60,
            check=False,
        )
        self.assertEqual((process.returncode, process.stderr), (0, b""))
        rows = json.loads(process.stdout)
        self.assertEqual(
            [(r["key"], r["requests"]) for r in rows],
            [("alice", 2), ("bob", 2), (None, 1)],
        )


class PostgresTests(StoreMixin, SynchronousTestCase):
    dbtype = "postgres"

    def setUp(self) -> None:
        import psycopg2

        schema = f"oaproxy_cli_{uuid.uuid4().hex[:12]}"
        try:
            self.dbaddr = postgres_schema(self, schema, SHARED_POSTGRES)
        except psycopg2.OperationalError as e:
            unavailable(f"PostgreSQL is not reachable at 127.0.0.1:5432: {e}")
        store(self.dbtype, self.dbaddr, [LIMITED, TOOL, CHAT, AUDIO, EMBEDDING])

    def test_no_table(self) -> None:
        """A schema without the tables: one clear line, status 1."""
        dbaddr = postgres_schema(self, f"oaproxy_cli_{uuid.uuid4().hex[:12]}", SHARED_POSTGRES)
        self.assertEqual(
            run("usage", "--dbtype", "postgres", "--dbaddr", dbaddr),
            (
                1,
                "",
                (
                    "oaproxy: the postgres database given by --dbaddr has no oaproxy "
                    "records table (has oaproxy stored any record there yet?)\n"
                ),
            ),
        )


class ArgumentTests(SynchronousTestCase):
    """Option and time parsing, before any database."""

    def test_bad_time(self) -> None:
        """A time that is neither ISO 8601 nor relative is a usage error naming
        the argument, with the command's usage line."""
        status, out, err = run(
            "usage", "--dbtype", "sqlite", "--dbaddr", "x", "--since", "2026-13-01"
        )
        self.assertEqual((status, out), (2, ""))
        self.assertIn(
            "oaproxy usage: error: argument --since: '2026-13-01' is not a time: "
            "expected an ISO 8601 date or date-time",
            err,
        )
        self.assertTrue(err.startswith("usage: oaproxy usage "), err)
        status, _, err = run("records", "export", "--until", "yesterday")
        self.assertEqual(status, 2)
        self.assertIn("argument --until: 'yesterday' is not a time", err)

    def test_since_not_before_until(self) -> None:
        """A --since not before --until is refused with both times shown in UTC."""
        self.assertEqual(
            run("usage", "--since", "2026-11-02", "--until", "2026-11-01"),
            (
                2,
                "",
                (
                    "oaproxy: --since (2026-11-02T00:00:00+00:00) is not before "
                    "--until (2026-11-01T00:00:00+00:00)\n"
                ),
            ),
        )

    def test_bad_choices(self) -> None:
        """Unknown groupings, repeated ones, unknown formats, a missing command
        and dbtype none on the command line are usage errors (status 2, nothing
        on stdout)."""
        for argv in (
            ["usage", "--by", "upstream"],
            ["usage", "--by", "key,key"],
            ["usage", "--format", "csv"],
            ["records", "export", "--format", "csv"],
            ["records"],
            [],
            ["usage", "--dbtype", "none"],
        ):
            status, out, err = run(*argv)
            self.assertEqual((status, out), (2, ""), argv)
            self.assertIn("error:", err, argv)

    def test_help(self) -> None:
        """records export --help shows its formats and says that times without a zone are UTC."""
        status, out, err = run("records", "export", "--help")
        self.assertEqual((status, err), (0, ""))
        self.assertIn("--format {jsonl,chat}", out)
        self.assertIn("without a zone they are UTC", out)

    def test_parse_time(self) -> None:
        """Times are ISO 8601 dates or date-times (UTC unless zoned), 'now', or
        a number of minutes, hours, days or weeks ago; anything else is
        refused."""
        now = 2_000_000_000.0
        self.assertEqual(parse_time("2026-11-01", now), T0)
        self.assertEqual(parse_time("2026-11-01T12:00", now), T0 + 12 * 3600)
        self.assertEqual(parse_time("2026-11-01 12:00:30", now), T0 + 12 * 3600 + 30)
        self.assertEqual(parse_time("2026-11-01T12:00Z", now), T0 + 12 * 3600)
        self.assertEqual(parse_time("2026-11-01T12:00+02:00", now), T0 + 10 * 3600)
        self.assertEqual(parse_time("30m", now), now - 1800)
        self.assertEqual(parse_time("24h", now), now - DAY)
        self.assertEqual(parse_time("7d", now), now - 7 * DAY)
        self.assertEqual(parse_time("1.5h", now), now - 5400)
        self.assertEqual(parse_time("2w", now), now - 14 * DAY)
        self.assertEqual(parse_time("now", now), now)
        for bad in ("", "7", "7y", "-7d", "d", "2026-11-01T25:00", "tomorrow"):
            self.assertRaises(ValueError, parse_time, bad, now)


class ChatItemTests(SynchronousTestCase):
    """``chat_item`` on record shapes the database tests do not cover."""

    def test_function_call(self) -> None:
        """A legacy ``functions`` request answered with a function call."""
        functions = [{"name": "f", "parameters": {"type": "object"}}]
        record = _record(
            id="x",
            time=T0,
            request_body={
                "model": "m",
                "messages": [{"role": "user", "content": "x"}],
                "functions": functions,
            },
            tool_calls=[
                {
                    "id": None,
                    "type": "function",
                    "function": {"name": "f", "arguments": "{}"},
                }
            ],
        )
        item = chat_item(record)
        assert item is not None
        self.assertEqual(
            (
                item["model"],
                item["functions"],
                item["is_function_call"],
                item["is_tool_calls"],
            ),
            ("m", functions, True, False),
        )

    def test_no_messages(self) -> None:
        """A record whose body holds no chat messages (none, cut short, another
        API's, odd shapes, a form) gives no chat item."""
        for body in (
            None,
            '{"model": "m", "messages": [{"role": "user", "content": "cut sh',  # truncated
            '{"model": "m", "input": "x"}',
            '{"messages": []}',
            '{"messages": "x"}',
            "[1, 2]",
            {"content_type": "multipart/form-data", "size": 3, "fields": []},
        ):
            self.assertIsNone(chat_item(_record(id="x", time=T0, request_body=body)), body)

    def test_odd_messages(self) -> None:
        """Messages without a role are left out; content is kept as sent
        (parts lists, ``None`` beside tool calls).
        """
        parts = [
            {"type": "text", "text": "look"},
            {"type": "image_url", "image_url": {"url": "u"}},
        ]
        body = {
            "messages": [
                {"role": "user", "content": parts},
                {"role": "assistant", "content": None, "tool_calls": [WEATHER_CALL]},
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
                {"content": "no role"},
                "junk",
            ]
        }
        item = chat_item(_record(id="x", time=T0, request_body=json.dumps(body)))
        assert item is not None
        self.assertEqual(
            item["messages"], [{"user": parts}, {"assistant": None}, {"tool": "sunny"}]
        )
