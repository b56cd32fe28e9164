"""How fast the dashboard's pages answer on a big record store, in sqlite and
in PostgreSQL::

    python bench/dashboard.py [--records 1000000] [--days 30] [--runs 7]
                              [--postgres "host=127.0.0.1 port=5432 dbname=test user=postgres"]
                              [--no-postgres]

Fills ``--records`` records spread over ``--days`` days (50 keys, 8 models,
3 upstreams, 2 % errors, a few hundred bytes of record document each) into a
new sqlite file, and into a schema of its own in PostgreSQL (dropped at the
end): bulk inserts (``executemany`` in one transaction; ``COPY``) into the
schema at version 3, then migrations 4 on sum and index them once, as for
a store that upgrades.  Then oaproxy runs as ``twistd`` on each store and
every page is asked ``--runs`` times over HTTP with the admin key (Bearer),
the first unmeasured; the table gives the median and the slowest, in ms.
Last, what the records' trigger costs on insert: 20,000 more records
inserted without it, then 20,000 with it.
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import random
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from oaproxy.record import Attempt, Outcome, Record, Usage
from oaproxy.sinks.rollup import TRIGGER, create_trigger
from oaproxy.sinks.sql import (
    COLUMNS,
    MIGRATIONS,
    TABLE,
    VERSION_TABLE,
    insert_statement,
    record_row,
)

ADMIN_KEY = "adm-bench-0123456789"
KEYS = [f"key-{n:02d}" for n in range(50)]
MODELS = [
    "gpt-4o",
    "gpt-4o-mini",
    "o3-mini",
    "claude-3-5",
    "llama-3-70b",
    "qwen-72b",
    "mistral-large",
    "text-embedding-3-small",
]
UPSTREAMS = ["openai", "azure", "backup"]
PROMPT = "Summarise the following text in three sentences: " + "lorem ipsum " * 12
ANSWER = "Here is a summary of the text in three sentences. " * 3


def rows(count: int, days: int, now: float, seed: int = 1) -> Iterator[tuple[Any, ...]]:
    """``count`` rows of ``COLUMNS``, newest first, over the last ``days`` days."""
    rng = random.Random(seed)
    span = days * 86400
    for n in range(count):
        moment = now - span * n / count - rng.random()
        key, model = rng.choice(KEYS), rng.choice(MODELS)
        upstream = rng.choice(UPSTREAMS)
        failed = rng.random() < 0.02
        status = 502 if failed else 200
        prompt, completion = rng.randint(20, 2000), 0 if failed else rng.randint(5, 800)
        cost = None if failed else (prompt * 2.5 + completion * 10) / 1e6
        record_id = f"{n:08x}{rng.getrandbits(64):016x}"
        # A whole Record, as the sink stores it: the dashboard reads it back.
        record = Record(
            id=record_id,
            time=moment,
            hostname="bench",
            client_ip="10.0.0.1",
            key_name=key,
            user_agent="OpenAI/Python",
            method="POST",
            path="/v1/chat/completions",
            model=model,
            stream=False,
            attempts=(Attempt(upstream, status, "502 Bad Gateway" if failed else None, 0.3, 1.2),),
            upstream=upstream,
            status=status,
            outcome=Outcome.EXHAUSTED if failed else Outcome.OK,
            error="every upstream failed" if failed else None,
            ttfb=0.3,
            duration=1.2,
            bytes_in=900,
            bytes_out=700,
            request_body={"model": model, "messages": [{"role": "user", "content": PROMPT}]},
            request_headers=None,
            response_text=None if failed else ANSWER,
            tool_calls=None,
            finish_reason=None if failed else "stop",
            truncated=(),
            usage=Usage(prompt, completion, prompt + completion),
            cost=cost,
            pid=4242,
        )
        yield record_row(record, "sqlite")


def _before_sums(cursor: Any, dbtype: str) -> None:
    for migration in MIGRATIONS[:3]:
        migration(cursor, dbtype)
    cursor.execute(f"CREATE TABLE {VERSION_TABLE} (version INTEGER NOT NULL)")
    cursor.execute(f"INSERT INTO {VERSION_TABLE} (version) VALUES (3)")


def _with_sums(cursor: Any, dbtype: str) -> None:
    # The sums (4), the outcome indexes (5), the sessions' tables (6)...
    for migration in MIGRATIONS[3:]:
        migration(cursor, dbtype)
    cursor.execute(f"UPDATE {VERSION_TABLE} SET version = {len(MIGRATIONS)}")


def fill_sqlite(path: str, count: int, days: int, now: float) -> tuple[float, float]:
    """(seconds to insert, seconds to migrate) for a new sqlite store."""
    connection = sqlite3.connect(path)
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA synchronous=OFF")
    cursor = connection.cursor()
    _before_sums(cursor, "sqlite")
    connection.commit()
    started = time.perf_counter()
    statement = insert_statement("sqlite")
    cursor.executemany(statement, ((*r[:9], int(r[9]), *r[10:]) for r in rows(count, days, now)))
    connection.commit()
    inserted = time.perf_counter()
    _with_sums(cursor, "sqlite")
    connection.commit()
    migrated = time.perf_counter()
    connection.close()
    return inserted - started, migrated - inserted


def _copy_text(value: Any) -> str:
    if value is None:
        return "\\N"
    if isinstance(value, bool):
        return "t" if value else "f"
    text = str(value)
    return text.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


def fill_postgres(dsn: str, count: int, days: int, now: float) -> tuple[float, float]:
    import psycopg2

    connection = psycopg2.connect(dsn)
    cursor = connection.cursor()
    _before_sums(cursor, "postgres")
    connection.commit()
    started = time.perf_counter()
    buffer = io.StringIO()
    batch = 0
    for row in rows(count, days, now):
        buffer.write("\t".join(_copy_text(v) for v in row) + "\n")
        batch += 1
        if batch == 50000:
            buffer.seek(0)
            cursor.copy_expert(f"COPY {TABLE} ({', '.join(COLUMNS)}) FROM STDIN", buffer)
            buffer, batch = io.StringIO(), 0
    buffer.seek(0)
    cursor.copy_expert(f"COPY {TABLE} ({', '.join(COLUMNS)}) FROM STDIN", buffer)
    connection.commit()
    inserted = time.perf_counter()
    _with_sums(cursor, "postgres")
    connection.commit()
    connection.autocommit = True
    cursor.execute(f"ANALYZE {TABLE}")
    migrated = time.perf_counter()
    connection.close()
    return inserted - started, migrated - inserted


def trigger_cost(connect: Any, dbtype: str, now: float, count: int = 20000) -> tuple[float, float]:
    """Seconds to insert ``count`` more records without the trigger, and
    ``count`` others with it (the sink's own ``executemany``)."""
    connection = connect()
    cursor = connection.cursor()
    fresh = [
        (*row[1:9], row[9] if dbtype == "postgres" else int(row[9]), *row[10:])
        for row in rows(count * 2, 1, now + 86400, seed=2)
    ]
    batches = [
        [(f"new{n:08d}", *row) for n, row in enumerate(fresh[:count])],
        [(f"new{n:08d}", *row) for n, row in enumerate(fresh[count:], count)],
    ]
    times = []
    for with_trigger, batch in zip((False, True), batches):
        if dbtype == "postgres":
            switch = "ENABLE" if with_trigger else "DISABLE"
            cursor.execute(f"ALTER TABLE {TABLE} {switch} TRIGGER {TRIGGER}")
        elif with_trigger:
            create_trigger(cursor, dbtype)
        else:
            cursor.execute(f"DROP TRIGGER {TRIGGER}")
        connection.commit()
        started = time.perf_counter()
        cursor.executemany(insert_statement(dbtype), batch)
        connection.commit()
        times.append(time.perf_counter() - started)
    connection.close()
    return times[0], times[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def get(port: int, path: str) -> tuple[int, float, bytes]:
    started = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("GET", path, headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    response = conn.getresponse()
    body = response.read()
    conn.close()
    return response.status, time.perf_counter() - started, body


def pages(port: int) -> list[tuple[str, str]]:
    """(what, path) of each page asked; a record id and a cursor found on the way."""
    _, _, listing = get(port, "/admin/ui/requests")
    text = listing.decode("utf-8")
    record_id = text.split('href="/admin/ui/requests/', 1)[1].split('"', 1)[0]
    older = text.split('class="next" href="', 1)[1].split('"', 1)[0].replace("&amp;", "&")
    return [
        ("Overview", "/admin/ui/"),
        ("Usage, today", "/admin/ui/usage?period=day"),
        ("Usage, 7 days by key", "/admin/ui/usage?period=week"),
        ("Usage, 30 days by model", "/admin/ui/usage?period=month&stack=model"),
        ("Requests", "/admin/ui/requests"),
        ("Requests, older page", older),
        ("Requests, one key", "/admin/ui/requests?key=key-07"),
        ("Requests, key+model", "/admin/ui/requests?key=key-07&model=o3-mini"),
        ("Requests, exhausted", "/admin/ui/requests?outcome=exhausted"),
        ("Requests, key+exhausted", "/admin/ui/requests?key=key-07&outcome=exhausted"),
        ("Requests, model+shutdown", "/admin/ui/requests?model=o3-mini&outcome=shutdown"),
        ("Requests, 2 models", "/admin/ui/requests?model=o3-mini,gpt-4o"),
        ("Requests, 2 outcomes", "/admin/ui/requests?outcome=ok,exhausted"),
        ("Requests, a day 20 d ago", "/admin/ui/requests?since=20d&until=19d"),
        ("Requests, shutdown (none)", "/admin/ui/requests?outcome=shutdown"),
        ("One record", f"/admin/ui/requests/{record_id}"),
        ("Upstreams", "/admin/ui/upstreams"),
        ("Keys", "/admin/ui/keys"),
    ]


def time_pages(dbtype: str, dbaddr: str, runs: int, directory: str) -> dict[str, list[float]]:
    config = Path(directory) / f"{dbtype}.yaml"
    keys = ", ".join(f"{k}: sk-bench-{k}-0123456789" for k in KEYS)
    upstreams = ", ".join(f"{{name: {u}, endpoint: 'http://127.0.0.1:9/v1'}}" for u in UPSTREAMS)
    config.write_text(
        f"admin_key: {ADMIN_KEY}\ndbtype: {dbtype}\ndbaddr: {json.dumps(dbaddr)}\n"
        f"authorization: {{{keys}}}\nupstreams: [{upstreams}]\n"
    )
    port = free_port()
    twistd = str(Path(sys.executable).parent / "twistd")
    command = [twistd, "-n", "--pidfile=", "oaproxy", "--config", str(config)]
    command += ["--listen", f"tcp:{port}:interface=127.0.0.1"]
    log_path = Path(directory) / f"{dbtype}.log"
    with open(log_path, "wb") as log:
        proxy = subprocess.Popen(command, cwd=directory, stdout=log, stderr=subprocess.STDOUT)
        try:
            return _timed(proxy, port, runs, dbtype, log_path)
        finally:
            proxy.terminate()
            proxy.wait(timeout=30)


def _timed(
    proxy: subprocess.Popen[bytes], port: int, runs: int, dbtype: str, log: Path
) -> dict[str, list[float]]:
    """Each page's times, once the daemon answers ``/healthz``."""
    for _ in range(600):
        try:
            if get(port, "/healthz")[0] == 200:
                break
        except OSError:
            if proxy.poll() is not None:
                tail = log.read_text()[-3000:]
                raise RuntimeError(f"oaproxy on {dbtype} ended:\n{tail}") from None
            time.sleep(0.1)
    else:
        raise RuntimeError(f"oaproxy did not start on {dbtype}")
    times: dict[str, list[float]] = {}
    for what, path in pages(port):
        seen = []
        for run in range(runs + 1):
            status, elapsed, body = get(port, path)
            if status != 200:
                raise RuntimeError(f"{what}: {path} answered {status}: {body[:300]!r}")
            if run:
                seen.append(elapsed)
        times[what] = seen
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--postgres", default="host=127.0.0.1 port=5432 dbname=test user=postgres")
    parser.add_argument("--no-postgres", action="store_true")
    args = parser.parse_args(argv)
    now = time.time()
    results: dict[str, dict[str, list[float]]] = {}
    notes = []
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "db.sqlite")
        inserted, migrated = fill_sqlite(path, args.records, args.days, now)
        size = os.path.getsize(path) / 2**20
        notes.append(
            f"sqlite: {args.records:,} records inserted in {inserted:.1f} s,"
            f" summed and indexed by migrations 4+ in {migrated:.1f} s, {size:.0f} MiB"
        )
        results["sqlite"] = time_pages("sqlite", path, args.runs, directory)
        bare, summed = trigger_cost(lambda: sqlite3.connect(path), "sqlite", now)
        notes.append(
            f"sqlite: 20,000 more records inserted: {bare:.2f} s, with the trigger {summed:.2f} s"
        )
        if not args.no_postgres:
            import psycopg2

            schema = f"oaproxy_bench_{os.getpid()}"
            admin = psycopg2.connect(args.postgres)
            admin.autocommit = True
            admin.cursor().execute(f"CREATE SCHEMA {schema}")
            dsn = f"{args.postgres} options='-c search_path={schema}'"
            try:
                inserted, migrated = fill_postgres(dsn, args.records, args.days, now)
                notes.append(
                    f"postgres: {args.records:,} records copied in {inserted:.1f} s,"
                    f" summed and indexed by migrations 4+ (and ANALYZE) in {migrated:.1f} s"
                )
                results["postgres"] = time_pages("postgres", dsn, args.runs, directory)
                bare, summed = trigger_cost(lambda: psycopg2.connect(dsn), "postgres", now)
                notes.append(
                    f"postgres: 20,000 more records inserted: {bare:.2f} s,"
                    f" with the trigger {summed:.2f} s"
                )
            finally:
                admin.cursor().execute(f"DROP SCHEMA {schema} CASCADE")
                admin.close()
    stores = list(results)
    header = f"{'page':<28}" + "".join(f"{s + ' median':>17}{'max':>8}" for s in stores)
    print(header)
    print("-" * len(header))
    worst = 0.0
    for what in results[stores[0]]:
        line = f"{what:<28}"
        for store in stores:
            seen = results[store][what]
            worst = max(worst, max(seen))
            line += f"{statistics.median(seen) * 1000:>14.1f} ms{max(seen) * 1000:>5.0f} ms"
        print(line)
    print()
    for note in notes:
        print(note)
    print(f"slowest answer of all: {worst * 1000:.0f} ms (target: under 200 ms)")
    return 0 if worst < 0.2 else 1


if __name__ == "__main__":
    sys.exit(main())
