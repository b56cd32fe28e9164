"""The command line: query and export the SQL record store.

    oaproxy records export [--format jsonl|chat] [FILTERS] [--output FILE|-]
    oaproxy usage [--by key|model|key,model] [--format table|json] [FILTERS]

(and the store's ``upstreams``, ``keys`` and ``check-config``: see
``oaproxy.admin.commands``).

FILTERS are ``--since T``, ``--until T`` (exclusive), ``--key NAME`` and
``--model M`` (both repeatable).  The database comes from the config file
(``--config``, default ``etc/config.yaml``: its ``dbtype`` and ``dbaddr``), or
from ``--dbtype`` and ``--dbaddr``, which override it; given both, the config
file is not read.  A relative sqlite path is taken from the current
directory.

Times are ISO 8601 dates or date-times (``2026-11-01``,
``2026-11-01T12:00``, ``2026-11-01T12:00+08:00``, ``…Z``); one without a zone
is UTC.  Or relative to now: ``30m``, ``24h``, ``7d``, ``2w``, ``90s``, ``now``.

This is a plain synchronous DB-API client (no reactor, the database side
in ``oaproxy.recordstore``): a command reads, prints and exits.  Exit status: 0 done, 1 database (or output) error, 2 bad
usage or configuration; errors are one line on stderr, never a traceback
and never the DSN (it may hold a password).

Output:
  - ``records export --format jsonl``: each record's JSON as stored, one a
    line, in time order.
  - ``records export --format chat``: a JSON array in the shape of
    openai-forward's ``aifd convert`` (``chat_openai.json``), one item a line:
    ``datetime`` (UTC, ``YYYY-MM-DD HH:MM:SS``), ``ip``, ``model``,
    ``temperature`` (1 when the request had none), ``messages`` as
    ``[{role: content}, …]``, ``functions``, ``tools``, ``is_function_call``,
    ``is_tool_calls``, ``assistant`` (the answer text) and ``tool_calls`` (the
    calls the answer made).  Records whose request body is not JSON with
    ``messages`` (embeddings, audio, bodies not kept or truncated) are left
    out; their count goes to stderr.
  - ``usage``: requests, ok requests (status below 400), prompt, completion
    and total tokens and cost, summed by the database over the period, per
    key and/or model; a table with a total line, or a JSON list of objects.
"""

from __future__ import annotations

import argparse
import codecs
import io
import json
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import (
    closing,
    contextmanager,
    redirect_stderr,
    redirect_stdout,
    suppress,
)
from datetime import datetime, timezone
from typing import Any, TextIO

from oaproxy.admin.commands import add_commands
from oaproxy.record import BadRecord, Record, decode_record
from oaproxy.recordstore import (
    EXIT_DATABASE,
    EXIT_OK,
    EXIT_USAGE,
    GROUP_COLUMNS,
    CommandError,
    Filters,
    UsageRow,
    fetch_rows,
    resolve_database,
    usage_rows,
    with_database,
)
from oaproxy.sinks.sql import DBTYPES, TABLE, placeholder

__all__ = [
    "build_parser",
    "chat_item",
    "main",
    "parse_time",
    "usage_table",
    "usage_total",
]


DEFAULT_CONFIG = "etc/config.yaml"

_UTC = timezone.utc

_TIMES_HELP = """\
times (--since, --until):
  ISO 8601 dates or date-times: 2026-11-01, 2026-11-01T12:00,
  "2026-11-01 12:00:30", 2026-11-01T12:00+08:00, 2026-11-01T04:00Z;
  without a zone they are UTC.  Relative to now: 90s, 30m, 24h, 7d, 2w;
  "now".  --since is inclusive, --until exclusive.

exit status: 0 done, 1 database or output error, 2 bad usage or config.
"""

_RELATIVE = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")
_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}


def parse_time(text: str, now: float) -> float:
    """A ``--since``/``--until`` value as a unix time.

    Raises ``ValueError``, with a message that shows the accepted forms, when
    ``text`` is not a time.
    """
    value = text.strip()
    if value == "now":
        return now
    relative = _RELATIVE.fullmatch(value)
    if relative:
        return now - float(relative[1]) * _UNITS[relative[2]]
    # Python 3.10's fromisoformat knows no "Z".
    if value[-1:] in ("Z", "z"):
        value = value[:-1] + "+00:00"
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(
            f"{text!r} is not a time: expected an ISO 8601 date or date-time "
            f"(2026-11-01, 2026-11-01T12:00, 2026-11-01T12:00+08:00) "
            f"or a time ago (30m, 24h, 7d)"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=_UTC)
    return moment.timestamp()


def _iso(moment: float) -> str:
    return datetime.fromtimestamp(moment, _UTC).isoformat()


# -- the chat shape -------------------------------------------------------


def chat_item(record: Record) -> dict[str, Any] | None:
    """One record in the shape of openai-forward's ``chat_openai.json`` items,
    or ``None`` when its request body has no chat ``messages``.
    """
    body: Any = record.request_body
    if isinstance(body, str):
        try:
            body = json.loads(body)
        except ValueError:
            # Not JSON, or cut at max_field_bytes: no messages to show.
            return None
    if not isinstance(body, dict):
        return None
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return None
    pairs = [
        {message["role"]: message.get("content")}
        for message in messages
        if isinstance(message, dict) and isinstance(message.get("role"), str)
    ]
    calls = record.tool_calls or []
    # The capture gives legacy function_call answers the tool-call shape;
    # which kind it was shows in what the request offered.
    legacy = "functions" in body and "tools" not in body
    return {
        "datetime": datetime.fromtimestamp(record.time, _UTC).strftime("%Y-%m-%d %H:%M:%S"),
        "ip": record.client_ip,
        "model": record.model or body.get("model"),
        "temperature": body.get("temperature", 1),
        "messages": pairs,
        "functions": body.get("functions"),
        "tools": body.get("tools"),
        "is_function_call": bool(calls) and legacy,
        "is_tool_calls": bool(calls) and not legacy,
        "assistant": record.response_text,
        "tool_calls": calls or None,
    }


def _filters(args: argparse.Namespace) -> Filters:
    since: float | None = args.since
    until: float | None = args.until
    if since is not None and until is not None and since >= until:
        raise CommandError(
            f"--since ({_iso(since)}) is not before --until ({_iso(until)})",
            EXIT_USAGE,
        )
    return Filters(since=since, until=until, keys=tuple(args.key), models=tuple(args.model))


# -- records export -------------------------------------------------------


@contextmanager
def _output(path: str, stdout: TextIO) -> Iterator[TextIO]:
    """Where an export goes: ``stdout`` for ``-``, else ``path``, written to a
    temporary file that replaces it only once the export is complete.
    """
    if path == "-":
        yield stdout
        stdout.flush()
        return
    directory = os.path.dirname(os.path.abspath(path))
    try:
        # mkstemp's mode 0600 suits a file of prompts and answers.
        descriptor, temporary = tempfile.mkstemp(
            prefix=".oaproxy-export-", suffix=".tmp", dir=directory
        )
    except OSError as e:
        raise CommandError(f"cannot write {path}: {e.strerror or e}", EXIT_DATABASE) from None
    try:
        with open(descriptor, "w", encoding="utf-8", newline="\n") as f:
            yield f
        os.replace(temporary, path)
    except BaseException:
        with suppress(OSError):
            os.unlink(temporary)
        raise


def _export(args: argparse.Namespace, stdout: TextIO, stderr: TextIO) -> int:
    filters = _filters(args)
    database = resolve_database(args)
    where, parameters = filters.where(placeholder(database.dbtype))
    sql = f"SELECT record FROM {TABLE}{where} ORDER BY time, id"
    chat = args.format == "chat"

    def work(connection: Any) -> int:
        # closing(): the cursor goes before the connection, whatever happens.
        rows = fetch_rows(connection, database.dbtype, sql, parameters)
        with closing(rows), _output(args.output, stdout) as out:
            return _write_chat(rows, out) if chat else _write_jsonl(rows, out)

    if args.output == "-" and stdout is sys.stdout:
        _utf8(sys.stdout)
    try:
        skipped = with_database(database, work)
    except OSError as e:
        if isinstance(e, BrokenPipeError):
            raise
        raise CommandError(
            f"cannot write {args.output}: {e.strerror or e}", EXIT_DATABASE
        ) from None
    if skipped:
        print(
            f"oaproxy: left out {skipped} record{'s' if skipped != 1 else ''} "
            f"without chat messages",
            file=stderr,
        )
    return EXIT_OK


def _write_jsonl(rows: Iterator[tuple[Any, ...]], out: TextIO) -> int:
    for (document,) in rows:
        if document is not None:
            out.write(document)
            out.write("\n")
    return 0


def _write_chat(rows: Iterator[tuple[Any, ...]], out: TextIO) -> int:
    skipped = 0
    first = True
    out.write("[")
    for (document,) in rows:
        try:
            item = chat_item(decode_record(document))
        except BadRecord:
            item = None
        if item is None:
            skipped += 1
            continue
        out.write("\n" if first else ",\n")
        out.write(json.dumps(item, ensure_ascii=False))
        first = False
    out.write("]\n" if first else "\n]\n")
    return skipped


def _utf8(stream: TextIO) -> None:
    # JSON is UTF-8, whatever the locale says.
    if isinstance(stream, io.TextIOWrapper) and codecs.lookup(stream.encoding).name != "utf-8":
        stream.reconfigure(encoding="utf-8")


# -- usage ----------------------------------------------------------------


def usage_total(rows: Sequence[UsageRow], by: Sequence[str]) -> UsageRow:
    """The sum of the groups (which the same query counted, so they agree)."""
    costs = [row.cost for row in rows if row.cost is not None]
    return UsageRow(
        group={name: None for name in by},
        requests=sum(row.requests for row in rows),
        ok=sum(row.ok for row in rows),
        prompt_tokens=sum(row.prompt_tokens for row in rows),
        completion_tokens=sum(row.completion_tokens for row in rows),
        total_tokens=sum(row.total_tokens for row in rows),
        cost=sum(costs) if costs else None,
    )


_COUNTS = (
    "requests",
    "ok",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "cost",
)


def usage_table(rows: Sequence[UsageRow], by: Sequence[str]) -> str:
    """The groups and a total line as aligned columns: names left, numbers
    right; ``-`` for no key / no model / no cost.
    """

    def cells(row: UsageRow, names: list[str]) -> list[str]:
        return [
            *names,
            str(row.requests),
            str(row.ok),
            str(row.prompt_tokens),
            str(row.completion_tokens),
            str(row.total_tokens),
            "-" if row.cost is None else f"{row.cost:.4f}",
        ]

    lines = [[*by, *_COUNTS]]
    for row in rows:
        lines.append(cells(row, ["-" if v is None else v for v in row.group.values()]))
    total = usage_total(rows, by)
    lines.append(cells(total, ["total"] + [""] * (len(by) - 1)))
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    text = []
    for line in lines:
        padded = [
            cell.ljust(width) if i < len(by) else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(line, widths))
        ]
        text.append("  ".join(padded).rstrip())
    return "\n".join(text) + "\n"


def _by(text: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in text.split(","))
    if not names or any(n not in GROUP_COLUMNS for n in names) or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"{text!r}: expected key, model or key,model")
    return names


def _usage(args: argparse.Namespace, stdout: TextIO, stderr: TextIO) -> int:
    filters = _filters(args)
    database = resolve_database(args)
    by: tuple[str, ...] = args.by
    rows = with_database(
        database,
        lambda connection: usage_rows(connection, database.dbtype, by, filters),
    )
    if args.format == "json":
        stdout.write(json.dumps([row.as_dict() for row in rows], indent=2) + "\n")
    else:
        stdout.write(usage_table(rows, by))
    stdout.flush()
    return EXIT_OK


# -- the parser -----------------------------------------------------------


def _time_argument(now: float) -> Callable[[str], float]:
    def convert(text: str) -> float:
        try:
            return parse_time(text, now)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return convert


def build_parser(now: float) -> argparse.ArgumentParser:
    """The argument parser; relative times count back from ``now``."""
    database = argparse.ArgumentParser(add_help=False)
    group = database.add_argument_group("database")
    group.add_argument(
        "--config",
        default=DEFAULT_CONFIG,
        metavar="FILE",
        help="the oaproxy config file whose dbtype and dbaddr to use (default: %(default)s)",
    )
    group.add_argument("--dbtype", choices=DBTYPES, help="overrides the config's dbtype")
    group.add_argument(
        "--dbaddr",
        metavar="ADDR",
        help="overrides the config's dbaddr: a sqlite file, or a libpq DSN or "
        "postgresql:// URL; with --dbtype too, records and usage do not read the config",
    )
    filters = argparse.ArgumentParser(add_help=False)
    group = filters.add_argument_group("filters")
    time_argument = _time_argument(now)
    group.add_argument(
        "--since", type=time_argument, metavar="T", help="from this time on (inclusive)"
    )
    group.add_argument(
        "--until", type=time_argument, metavar="T", help="before this time (exclusive)"
    )
    group.add_argument(
        "--key",
        action="append",
        default=[],
        metavar="NAME",
        help="only this client key name (repeatable)",
    )
    group.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="M",
        help="only this model (repeatable)",
    )

    parser = argparse.ArgumentParser(
        prog="oaproxy",
        description="Query and export oaproxy's SQL record store; manage the upstreams "
        "and client keys it stores; check a config.",
        epilog=_TIMES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    records = commands.add_parser("records", help="the request records")
    records_commands = records.add_subparsers(
        dest="records_command", metavar="COMMAND", required=True
    )
    export = records_commands.add_parser(
        "export",
        parents=[database, filters],
        help="write records as JSON lines or openai-forward chat JSON",
        description="Write the records in time order, as JSON lines (each "
        "record as stored) or as a JSON array in the shape of openai-forward's "
        "`aifd convert` (chat records only).",
        epilog=_TIMES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    export.add_argument(
        "--format", choices=("jsonl", "chat"), default="jsonl", help="(default: jsonl)"
    )
    export.add_argument(
        "--output",
        "-o",
        default="-",
        metavar="FILE",
        help="where to write; - is stdout (default); a file is replaced only "
        "when the export is complete",
    )
    export.set_defaults(run=_export)
    usage = commands.add_parser(
        "usage",
        parents=[database, filters],
        help="requests, tokens and cost by key and model",
        description="Sum requests, ok requests (status below 400), tokens and "
        "cost over a period, by client key and/or model.",
        epilog=_TIMES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    usage.add_argument(
        "--by",
        type=_by,
        default=("key", "model"),
        metavar="key|model|key,model",
        help="what to group by (default: key,model)",
    )
    usage.add_argument(
        "--format", choices=("table", "json"), default="table", help="(default: table)"
    )
    usage.set_defaults(run=_usage)
    config_only = argparse.ArgumentParser(add_help=False)
    config_only.add_argument(
        "--config",
        default=DEFAULT_CONFIG,
        metavar="FILE",
        help="the oaproxy config file (default: %(default)s)",
    )
    add_commands(commands, database, config_only)
    return parser


def main(
    argv: Sequence[str] | None = None,
    *,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
    clock: Callable[[], float] = time.time,
) -> int:
    """Run one command; returns the exit status.

    ``argv`` is the arguments after the program name (``sys.argv[1:]`` by
    default); output goes to ``stdout`` and errors to ``stderr``
    (``sys.stdout`` and ``sys.stderr`` by default); ``clock`` gives the time
    relative ``--since``/``--until`` count back from.
    """
    out = sys.stdout if stdout is None else stdout
    err = sys.stderr if stderr is None else stderr
    parser = build_parser(clock())
    try:
        # argparse prints to sys.stdout/sys.stderr itself.
        with redirect_stdout(out), redirect_stderr(err):
            args = parser.parse_args(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (EXIT_OK if e.code is None else EXIT_USAGE)
    run: Callable[[argparse.Namespace, TextIO, TextIO], int] = args.run
    try:
        return run(args, out, err)
    except CommandError as e:
        print(f"oaproxy: {e.message}", file=err)
        return e.status
    except BrokenPipeError:
        # The reader (| head) has gone: stop quietly, and keep the
        # interpreter's final flush from complaining too.
        if out is sys.stdout:
            with suppress(OSError, ValueError):
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, sys.stdout.fileno())
        return EXIT_DATABASE
    except KeyboardInterrupt:
        return 130
