"""The command line of the store (``oaproxy upstreams …``, ``oaproxy keys …``)
and ``oaproxy check-config``, for openai-api-route's ``-add``/``-list`` users.

    oaproxy upstreams list [--format table|json]
    oaproxy upstreams add NAME [--endpoint URL] [--sk-env VAR | --sk-stdin]
                          [--allow m1,m2] [--type T] [--set KEY=VALUE ...]
    oaproxy upstreams remove|enable|disable NAME
    oaproxy keys list [--format table|json]
    oaproxy keys add NAME [--upstreams a,b] [--rate-limit R] [--token-limit R]
                     [--set KEY=VALUE ...]
    oaproxy keys remove NAME
    oaproxy check-config

Each takes ``--config`` (and ``--dbtype``/``--dbaddr``) as the record commands
do, and changes the store exactly as the admin API does (``changes``), in
one transaction with its audit entry; running daemons notice within
``store_poll_interval`` seconds.  A secret never comes from the command
line, where ``ps`` and the shell's history keep it: an upstream key from an
environment variable or stdin, a new client key printed once, on stdout.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import socket
import sys
import time
from collections.abc import Callable
from contextlib import suppress
from typing import Any, TextIO

import attrs

from oaproxy.admin.changes import (
    ChangeContext,
    Decide,
    Refusal,
    add_key,
    add_upstream,
    new_key_secret,
    remove_key,
    remove_upstream,
    set_enabled,
)
from oaproxy.admin.describe import describe_key, describe_upstream
from oaproxy.admin.loading import load, read_store
from oaproxy.admin.overlay import overlay_with
from oaproxy.admin.sealing import Sealer, secret_keys, secret_setting
from oaproxy.admin.stored import StoreSnapshot
from oaproxy.admin.tables import Change, take_change
from oaproxy.config import Config, ConfigError, Upstream, all_client_keys
from oaproxy.recordstore import (
    EXIT_DATABASE,
    EXIT_OK,
    EXIT_USAGE,
    CommandError,
    Database,
    driver_error_text,
    read_config,
    resolve_database,
)
from oaproxy.sinks.sql import migrate, open_database

__all__ = ["add_commands"]

#: What a listing shows in place of a sealed secret: it is never decrypted.
_SEALED = "[sealed]"


def add_commands(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
    database: argparse.ArgumentParser,
    config_only: argparse.ArgumentParser,
) -> None:
    """Add ``upstreams``, ``keys`` and ``check-config`` to the parser's
    ``commands``; ``database`` holds ``--config``/``--dbtype``/``--dbaddr``,
    ``config_only`` just ``--config``."""
    output = argparse.ArgumentParser(add_help=False)
    output.add_argument(
        "--format", choices=("table", "json"), default="table", help="(default: table)"
    )
    setting = argparse.ArgumentParser(add_help=False)
    setting.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any other setting, as in the config file (VALUE is JSON, or else text): "
        "--set timeout=30 --set deny='[\"gpt-4\"]' (repeatable)",
    )

    upstreams = commands.add_parser("upstreams", help="the upstreams, of the file and the store")
    sub = upstreams.add_subparsers(dest="upstreams_command", metavar="COMMAND", required=True)
    listing = sub.add_parser("list", parents=[database, output], help="list every upstream")
    listing.set_defaults(run=_list_upstreams)
    add = sub.add_parser(
        "add",
        parents=[database, setting],
        help="add an upstream to the store",
        description="Add an upstream to the store; its key comes from an environment "
        "variable or stdin, never from the command line (needs store_key).",
    )
    add.add_argument("name", metavar="NAME")
    add.add_argument(
        "--endpoint",
        metavar="URL",
        help="its base URL, e.g. https://host/v1 (type echo has none; replicate's has a default)",
    )
    secret = add.add_mutually_exclusive_group()
    secret.add_argument("--sk-env", metavar="VAR", help="the upstream key is in $VAR")
    secret.add_argument(
        "--sk-stdin", action="store_true", help="read the upstream key from stdin (one line)"
    )
    add.add_argument("--allow", metavar="M1,M2", help="only these models (or /v1/… paths)")
    add.add_argument("--type", metavar="T", help="the upstream's type (default: openai)")
    add.set_defaults(run=_add_upstream)
    for verb, run in (
        ("remove", _remove_upstream),
        ("enable", _enable_upstream),
        ("disable", _disable_upstream),
    ):
        command = sub.add_parser(verb, parents=[database], help=f"{verb} an upstream")
        command.add_argument("name", metavar="NAME")
        command.set_defaults(run=run)

    keys = commands.add_parser("keys", help="the client keys, of the file and the store")
    sub = keys.add_subparsers(dest="keys_command", metavar="COMMAND", required=True)
    listing = sub.add_parser("list", parents=[database, output], help="list every client key")
    listing.set_defaults(run=_list_keys)
    add = sub.add_parser(
        "add",
        parents=[database, setting],
        help="make a client key; its secret is printed once, on stdout",
    )
    add.add_argument("name", metavar="NAME")
    add.add_argument("--upstreams", metavar="A,B", help="only these upstreams (default: all)")
    add.add_argument("--rate-limit", metavar="R", help="this key's request limit: 10/minute")
    add.add_argument("--token-limit", metavar="R", help="this key's token limit: 20000/minute")
    add.set_defaults(run=_add_key)
    remove = sub.add_parser("remove", parents=[database], help="remove a client key")
    remove.add_argument("name", metavar="NAME")
    remove.set_defaults(run=_remove_key)

    check = commands.add_parser(
        "check-config",
        parents=[config_only],
        help="check the config file and its store as twistd would",
        description="Check the config file (its ${NAME}s from this environment) and the "
        "store's upstreams and keys as twistd does at start; the same one-line errors.",
    )
    check.set_defaults(run=_check_config)


# -- reading -----------------------------------------------------------------------


def _store_config(args: argparse.Namespace) -> tuple[Config, Database]:
    """The config file, with the database the options name."""
    file = read_config(args.config)
    database = resolve_database(args)
    return attrs.evolve(file, dbtype=database.dbtype, dbaddr=database.dbaddr), database


def _stored(args: argparse.Namespace) -> tuple[Config, StoreSnapshot, Config]:
    """The file, the store and the two together (secrets left sealed)."""
    file, database = _store_config(args)
    try:
        stored = read_store(file, create=False)
        sealed = dict.fromkeys(secret_keys(Upstream), _SEALED)
        return file, stored, overlay_with(file, stored, lambda _: sealed)
    except ConfigError as e:
        raise CommandError(_message(e, database), EXIT_USAGE) from None


def _message(error: ConfigError, database: Database) -> str:
    # The store's errors name "the store": say which.
    return str(error).replace("the store", database.where, 1)


def _list_upstreams(args: argparse.Namespace, stdout: TextIO, stderr: TextIO) -> int:
    _, stored, config = _stored(args)
    rows = [
        describe_upstream(upstream, stored=stored, state=None)
        for upstream in (*config.upstreams, *config.disabled_upstreams)
    ]
    if args.format == "json":
        stdout.write(json.dumps(rows, indent=2) + "\n")
        return EXIT_OK
    table = [["name", "source", "enabled", "type", "endpoint", "models", "sk"]]
    for row in rows:
        settings = row["settings"]
        table.append(
            [
                row["name"],
                row["source"],
                "yes" if row["enabled"] else "no",
                str(settings.get("type", "")),
                settings.get("endpoint") or "-",
                ",".join(settings.get("allow") or []) or "all",
                "set" if settings.get("sk_set") else "-",
            ]
        )
    stdout.write(_table(table))
    return EXIT_OK


def _list_keys(args: argparse.Namespace, stdout: TextIO, stderr: TextIO) -> int:
    _, stored, config = _stored(args)
    rows = [describe_key(key, config, stored) for key in all_client_keys(config)]
    if args.format == "json":
        stdout.write(json.dumps(rows, indent=2) + "\n")
        return EXIT_OK
    table = [["name", "source", "upstreams", "rate_limit", "token_limit", "budget"]]
    for row in rows:
        settings = row["settings"]
        budget = settings.get("budget")
        table.append(
            [
                row["name"],
                row["source"],
                "all" if row["upstreams"] is None else ",".join(row["upstreams"]) or "none",
                settings.get("rate_limit") or "-",
                settings.get("token_limit") or "-",
                "-" if budget is None else json.dumps(budget, sort_keys=True),
            ]
        )
    stdout.write(_table(table))
    return EXIT_OK


def _table(lines: list[list[str]]) -> str:
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    return "".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() + "\n"
        for line in lines
    )


def _check_config(args: argparse.Namespace, stdout: TextIO, stderr: TextIO) -> int:
    try:
        # As twistd reads it: this environment's variables, the store not made yet.
        loaded = load(args.config, create_store=False)
    except ConfigError as e:
        raise CommandError(str(e), EXIT_USAGE) from None
    config = loaded.config
    stdout.write(
        f"{args.config}: ok; {len(config.upstreams)} upstreams"
        f" ({len(config.disabled_upstreams)} more disabled),"
        f" {len(all_client_keys(config))} client keys;"
        f" the store holds {len(loaded.stored.upstreams)} upstream rows"
        f" and {len(loaded.stored.keys)} keys\n"
    )
    return EXIT_OK


# -- changing ----------------------------------------------------------------------


def _actor() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    return f"cli {user}@{socket.gethostname()}"


def _take(
    args: argparse.Namespace, make: Callable[[ChangeContext], Decide], sealer_needed: bool = False
) -> Change:
    """Make the change in the store, in one transaction; refusals and the
    database's errors are ``CommandError``s."""
    file, database = _store_config(args)
    try:
        # Only a command that stores a secret needs store_key (set in this shell).
        sealer = Sealer.from_config(file) if sealer_needed else Sealer(None)
        decide = make(ChangeContext(file, sealer, _actor(), time.time()))
    except ConfigError as e:
        raise CommandError(f"{e} (is its environment variable set here?)", EXIT_USAGE) from None
    except Refusal as e:
        raise CommandError(e.message, EXIT_USAGE) from None
    try:
        connection = open_database(database.dbtype, database.dbaddr)
    except Exception as e:  # noqa: BLE001 - any driver's error, on one line
        raise CommandError(
            f"cannot open {database.where}: {driver_error_text(e, database)}", EXIT_DATABASE
        ) from None
    try:
        cursor = connection.cursor()
        migrate(cursor, database.dbtype)
        connection.commit()
        change, _ = take_change(cursor, database.dbtype, decide)
        connection.commit()
        return change
    except Refusal as e:
        raise CommandError(e.message, EXIT_USAGE) from None
    except ConfigError as e:
        raise CommandError(_message(e, database), EXIT_USAGE) from None
    except Exception as e:  # noqa: BLE001 - any driver's error, on one line
        raise CommandError(
            f"{database.where}: {driver_error_text(e, database)}", EXIT_DATABASE
        ) from None
    finally:
        with suppress(Exception):
            connection.close()


def _settings(pairs: list[str]) -> dict[str, Any]:
    settings: dict[str, Any] = {}
    for pair in pairs:
        key, equals, text = pair.partition("=")
        if not equals or not key.strip():
            raise CommandError(f"--set {pair}: expected KEY=VALUE", EXIT_USAGE)
        try:
            value = json.loads(text)
        except ValueError:
            value = text
        settings[key.strip()] = value
    return settings


def _names(text: str | None) -> list[str] | None:
    return None if text is None else [n.strip() for n in text.split(",") if n.strip()]


def _done(stderr: TextIO, change: Change) -> int:
    print(f"oaproxy: {change.audit.action.value} {change.audit.target}", file=stderr)
    return EXIT_OK


def _add_upstream(args: argparse.Namespace, stdout: TextIO, stderr: TextIO) -> int:
    body: dict[str, Any] = {**_settings(args.set), "name": args.name}
    given = sorted(key for key, value in body.items() if secret_setting(key, value))
    if given:
        instead = "use --sk-env or --sk-stdin" if given[0] == "sk" else "give it through /admin/"
        raise CommandError(
            f"--set {given[0]}: a secret is never given on the command line, where ps and the "
            f"shell's history keep it ({instead})",
            EXIT_USAGE,
        )
    if args.endpoint is not None:
        body["endpoint"] = args.endpoint
    if args.allow is not None:
        body["allow"] = _names(args.allow)
    if args.type is not None:
        body["type"] = args.type
    if args.sk_env is not None:
        value = os.environ.get(args.sk_env)
        if not value:
            raise CommandError(f"--sk-env {args.sk_env}: that variable is not set", EXIT_USAGE)
        body["sk"] = value
    elif args.sk_stdin:
        body["sk"] = sys.stdin.readline().strip()
        if not body["sk"]:
            raise CommandError("--sk-stdin: no key on stdin", EXIT_USAGE)
    needs_key = "sk" in body
    return _done(stderr, _take(args, lambda c: add_upstream(c, body), sealer_needed=needs_key))


def _remove_upstream(args: argparse.Namespace, stdout: TextIO, stderr: TextIO) -> int:
    return _done(stderr, _take(args, lambda c: remove_upstream(c, args.name)))


def _enable_upstream(args: argparse.Namespace, stdout: TextIO, stderr: TextIO) -> int:
    return _done(stderr, _take(args, lambda c: set_enabled(c, args.name, True)))


def _disable_upstream(args: argparse.Namespace, stdout: TextIO, stderr: TextIO) -> int:
    return _done(stderr, _take(args, lambda c: set_enabled(c, args.name, False)))


def _add_key(args: argparse.Namespace, stdout: TextIO, stderr: TextIO) -> int:
    body: dict[str, Any] = {**_settings(args.set), "name": args.name}
    if args.upstreams is not None:
        body["upstreams"] = _names(args.upstreams)
    if args.rate_limit is not None:
        body["rate_limit"] = args.rate_limit
    if args.token_limit is not None:
        body["token_limit"] = args.token_limit
    secret = new_key_secret()
    change = _take(args, lambda c: add_key(c, body, secret))
    _done(stderr, change)
    print("oaproxy: the key is shown this once; the store keeps its SHA-256 only", file=stderr)
    stdout.write(secret + "\n")
    return EXIT_OK


def _remove_key(args: argparse.Namespace, stdout: TextIO, stderr: TextIO) -> int:
    return _done(stderr, _take(args, lambda c: remove_key(c, args.name)))
