"""The dashboard's parts alone: sessions and CSRF tokens on a Clock, escaping
by default, the sums the records' trigger keeps (counted once however often
a batch is retried; those of a store migrated late), and each page's
queries, in sqlite and in PostgreSQL."""

from __future__ import annotations

import ipaddress
import os
import re
import uuid
from io import BytesIO
from types import SimpleNamespace
from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.server import Request
from twisted.web.test.requesthelper import DummyChannel

from oaproxy.admin.queries import _page_select, records_page, records_query
from oaproxy.admin.tables import read_snapshot
from oaproxy.config import Budget, BudgetPeriod, ClientKey
from oaproxy.dashboard import data
from oaproxy.dashboard.markup import Markup, html, join
from oaproxy.dashboard.resource import DashboardResource
from oaproxy.dashboard.session import Session, Sessions, admin_key_matches
from oaproxy.dashboard.sessiontables import close_session, read_session_secret, session_closed
from oaproxy.record import Outcome
from oaproxy.sinks.rollup import DAILY_TABLE, MINUTELY_TABLE
from oaproxy.sinks.sql import (
    MIGRATIONS,
    VERSION_TABLE,
    insert_statement,
    migrate,
    open_database,
    record_row,
)
from tests.live import SHARED_POSTGRES, postgres_schema, reachable, unavailable
from tests.records import record, usage

KEY = "adm-0123456789abcdef"
#: 2026-12-03 12:30:00 UTC
NOW = 1796301000.0


class SessionTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)
        self.sessions = Sessions(self.clock.seconds, lambda: b"one secret")

    def test_open_and_check(self) -> None:
        """A cookie opens its session until it expires, and not after."""
        session, cookie = self.sessions.open(KEY, 60)
        self.assertEqual(self.sessions.check(cookie.encode(), KEY), session)
        self.clock.advance(59)
        self.assertIsNotNone(self.sessions.check(cookie.encode(), KEY))
        self.clock.advance(1)
        self.assertIsNone(self.sessions.check(cookie.encode(), KEY))

    def test_signed(self) -> None:
        """Another admin key, another secret, any change: no session; the same
        secret (another worker's, on the same store): the session."""
        _, cookie = self.sessions.open(KEY, 60)
        self.assertIsNone(self.sessions.check(cookie.encode(), KEY + "x"))
        other = Sessions(self.clock.seconds, lambda: b"another secret")
        self.assertIsNone(other.check(cookie.encode(), KEY))
        same = Sessions(self.clock.seconds, lambda: b"one secret")
        self.assertIsNotNone(same.check(cookie.encode(), KEY))
        session_id, expires, mac = cookie.split(".")
        for forged in (
            f"{session_id}.{int(expires) + 1}.{mac}",
            f"{session_id[::-1]}.{expires}.{mac}",
            f"{session_id}.{expires}.{mac[:-1]}",
            f"{session_id}.-1.{mac}",
            "",
            "a.b",
        ):
            self.assertIsNone(self.sessions.check(forged.encode(), KEY), forged)
        self.assertIsNone(self.sessions.check(b"\xff\xfe", KEY))
        self.assertIsNone(self.sessions.check(None, KEY))

    def test_close(self) -> None:
        """A closed session stays closed; the others open; the closed are forgotten once expired."""
        first, cookie = self.sessions.open(KEY, 60)
        _, other = self.sessions.open(KEY, 600)
        self.sessions.close(first)
        self.assertIsNone(self.sessions.check(cookie.encode(), KEY))
        self.assertIsNotNone(self.sessions.check(other.encode(), KEY))
        self.clock.advance(61)
        self.sessions.close(Session("another", NOW + 700))
        self.assertEqual(set(self.sessions._closed), {"another"})

    def test_csrf(self) -> None:
        """A token is good for its binding and admin key only."""
        token = self.sessions.csrf_token(KEY, "s1").encode()
        self.assertTrue(self.sessions.csrf_good(KEY, "s1", token))
        self.assertFalse(self.sessions.csrf_good(KEY, "s2", token))
        self.assertFalse(self.sessions.csrf_good(KEY + "x", "s1", token))
        self.assertFalse(self.sessions.csrf_good(KEY, "s1", None))
        self.assertFalse(self.sessions.csrf_good(KEY, "s1", b"\xff" + token))

    def test_admin_key_matches(self) -> None:
        """Only the admin key itself matches."""
        self.assertTrue(admin_key_matches(KEY.encode(), KEY))
        for wrong in (None, b"", KEY[:-1].encode(), KEY.encode() + b"x", b"\xff"):
            self.assertFalse(admin_key_matches(wrong, KEY), wrong)


class SecureCookieTests(SynchronousTestCase):
    def request(
        self, method: bytes, body: bytes = b"", *, tls: bool, proto: bytes | None
    ) -> Request:
        channel = DummyChannel()
        if tls:
            channel.transport = DummyChannel.SSL()
        request = Request(channel)
        request.method = method
        request.content = BytesIO(body)
        request.args = {}
        if proto is not None:
            request.requestHeaders.setRawHeaders(b"x-forwarded-proto", [proto])
        return request

    def login_cookies(
        self, *, tls: bool = False, proto: bytes | None = None, trusted: str = "192.168.1.0/24"
    ) -> list[bytes]:
        """The cookies of the login form and of the login (the peer is
        DummyChannel's, 192.168.1.1), with ``trusted`` as trusted_proxies."""
        clock = Clock()
        config = SimpleNamespace(
            dashboard_session=60.0, trusted_proxies=(ipaddress.ip_network(trusted),)
        )
        host = SimpleNamespace(
            shared=SimpleNamespace(wall_clock=clock.seconds, environ={}),
            sources=SimpleNamespace(store=None),
            generation=SimpleNamespace(config=config),
        )
        dashboard = DashboardResource(SimpleNamespace(host=host))  # type: ignore[arg-type]
        form = self.request(b"GET", tls=tls, proto=proto)
        page = dashboard.render(form, ["login"], KEY)
        assert isinstance(page, bytes)
        [nonce_cookie] = form.cookies
        nonce = nonce_cookie.split(b";")[0].split(b"=", 1)[1]
        token = re.search(rb'name="csrf" value="([0-9a-f]+)"', page)
        assert token is not None
        body = b"csrf=" + token[1] + b"&admin_key=" + KEY.encode()
        login = self.request(b"POST", body, tls=tls, proto=proto)
        login.received_cookies = {b"oaproxy_login": nonce}
        dashboard.render(login, ["login"], KEY)
        self.assertEqual(login.code, 303)
        [session] = [c for c in login.cookies if c.startswith(b"oaproxy_session=")]
        return [nonce_cookie, session]

    def test_secure_over_tls(self) -> None:
        """Over TLS both cookies of the login are Secure (and HttpOnly, SameSite=Strict)."""
        for cookie in self.login_cookies(tls=True):
            for part in (b"; Secure", b"; HttpOnly", b"; SameSite=strict"):
                self.assertIn(part, cookie)

    def test_secure_behind_a_trusted_tls_proxy(self) -> None:
        """Plain HTTP from a trusted proxy that says ``X-Forwarded-Proto:
        https``: Secure; the same header from another peer, or http: not."""
        for cookie in self.login_cookies(proto=b"https"):
            self.assertIn(b"; Secure", cookie)
        for cookie in self.login_cookies(proto=b"HTTPS, http"):
            self.assertIn(b"; Secure", cookie)
        for cookie in (
            *self.login_cookies(proto=b"https", trusted="10.0.0.0/8"),
            *self.login_cookies(proto=b"http"),
            *self.login_cookies(),
        ):
            self.assertNotIn(b"; Secure", cookie)
            self.assertIn(b"; HttpOnly", cookie)


class MarkupTests(SynchronousTestCase):
    def test_escaped_by_default(self) -> None:
        """Text is escaped, quotes too; Markup and numbers pass as they are."""
        self.assertEqual(
            html('<a title="{}">{}</a>{}', '"x"', "<script>", Markup("<b>ok</b>")),
            '<a title="&quot;x&quot;">&lt;script&gt;</a><b>ok</b>',
        )
        self.assertEqual(html("{:.1f} {}", 1.25, None), "1.2 ")
        self.assertEqual(join(["<", Markup("<br>")]), "&lt;<br>")
        self.assertIsInstance(html("{}", "x"), Markup)


def _record(n: int, **fields: Any) -> Any:
    return record(id=f"r{n:06d}", time=NOW - n, **fields)


class StoreCase(SynchronousTestCase):
    dbtype = "sqlite"

    def connect(self) -> Any:
        path = os.path.join(self.mktemp(), "db.sqlite")
        return path

    def setUp(self) -> None:
        self.dbaddr = self.connect()
        self.connection = open_database(self.dbtype, self.dbaddr)
        self.addCleanup(self.connection.close)

    def migrate(self, upto: int | None = None) -> None:
        cursor = self.connection.cursor()
        if upto is None:
            migrate(cursor, self.dbtype)
        else:
            for migration in MIGRATIONS[:upto]:
                migration(cursor, self.dbtype)
            cursor.execute(f"CREATE TABLE {VERSION_TABLE} (version INTEGER NOT NULL)")
            cursor.execute(f"INSERT INTO {VERSION_TABLE} (version) VALUES ({upto})")
        self.connection.commit()

    def insert(self, *records: Any) -> None:
        cursor = self.connection.cursor()
        cursor.executemany(
            insert_statement(self.dbtype), [record_row(r, self.dbtype) for r in records]
        )
        self.connection.commit()

    def rows(self, sql: str) -> list[tuple[Any, ...]]:
        cursor = self.connection.cursor()
        cursor.execute(sql)
        return [tuple(row) for row in cursor.fetchall()]

    def sample(self) -> list[Any]:
        return [
            _record(1, key_name="alice", model="m1", usage=usage(10, 5), cost=0.5),
            _record(2, key_name="alice", model="m1", usage=usage(1, 1), cost=None),
            _record(3, key_name="bob", model="m2", status=502, outcome=Outcome.EXHAUSTED),
            _record(4, key_name=None, model=None, upstream=None, status=429),
            _record(90000, key_name="alice", model="m1", usage=usage(7, 0), cost=0.25),
        ]

    def test_sums(self) -> None:
        """The trigger sums each record once, whatever is retried, by day and by minute."""
        self.migrate()
        records = self.sample()
        self.insert(*records)
        self.insert(*records[:2])  # a batch retried: ON CONFLICT DO NOTHING
        today = int(NOW - NOW % 86400)
        daily = sorted(self.rows(f"SELECT * FROM {DAILY_TABLE}"))
        self.assertEqual(
            daily,
            [
                (today - 86400, "alice", "m1", 1, 1, 7, 0, 7, 0.25),
                (today, "", "", 1, 0, 0, 0, 0, None),
                (today, "alice", "m1", 2, 2, 11, 6, 17, 0.5),
                (today, "bob", "m2", 1, 0, 0, 0, 0, None),
            ],
        )
        minute = int(NOW - 60)  # records 1 to 4, seconds before NOW (a minute's start)
        minutely = sorted(self.rows(f"SELECT * FROM {MINUTELY_TABLE} WHERE minute = {minute}"))
        self.assertEqual(minutely, [(minute, "", 1, 0), (minute, "alpha", 3, 2)])

    def test_migrated_late(self) -> None:
        """Records stored before migration 4 (the sums) are summed by it."""
        self.migrate(upto=3)
        records = self.sample()
        self.insert(*records)
        self.migrate()
        self.insert(_record(5, key_name="bob", model="m2"))
        today = int(NOW - NOW % 86400)
        self.assertEqual(
            self.rows(
                f"SELECT requests, ok FROM {DAILY_TABLE} WHERE day = {today} AND key_name = 'bob'"
            ),
            [(2, 1)],
        )

    def test_last_hour(self) -> None:
        """Sixty minutes, oldest first, each with its requests and errors."""
        self.migrate()
        self.insert(*self.sample())
        minutes = data.last_hour(self.connection, self.dbtype, NOW)
        self.assertEqual(len(minutes), 60)
        self.assertEqual(minutes[-1].start, NOW - NOW % 60)
        # Records 1 to 4 are seconds before NOW, a minute's start: in the minute before.
        self.assertEqual([(m.requests, m.errors) for m in minutes[-2:]], [(4, 2), (0, 0)])
        self.assertEqual(sum(m.requests for m in minutes), 4)

    def test_upstreams_day(self) -> None:
        """Each upstream's requests and answers of the last 24 hours."""
        self.migrate()
        self.insert(*self.sample())
        self.assertEqual(
            data.upstreams_day(self.connection, self.dbtype, NOW), {"alpha": (3, 2), "": (1, 0)}
        )

    def test_usage_report(self) -> None:
        """A period's sums by key, model and day; older days left out."""
        self.migrate()
        self.insert(*self.sample())
        day = data.usage_report(self.connection, self.dbtype, data.Period.DAY, NOW)
        self.assertEqual(day.days, (NOW - NOW % 86400,))
        self.assertEqual(day.by_key["alice"].requests, 2)
        self.assertEqual(day.by_key["alice"].total_tokens, 17)
        self.assertEqual(day.by_model["m2"].ok, 0)
        self.assertEqual(day.total.requests, 4)
        self.assertEqual(day.total.cost, 0.5)
        week = data.usage_report(self.connection, self.dbtype, data.Period.WEEK, NOW)
        self.assertEqual(len(week.days), 7)
        self.assertEqual(week.by_key["alice"].requests, 3)
        self.assertEqual(week.day_key[(week.days[-2], "alice")].cost, 0.25)

    def test_budget_used(self) -> None:
        """A key's spend since its period began (UTC day or month)."""
        self.migrate()
        self.insert(*self.sample())
        keys = [
            ClientKey("alice", "sk-a", budget=Budget(usd=5, period=BudgetPeriod.DAY)),
            ClientKey("bob", "sk-b", budget=Budget(tokens=100)),
            ClientKey("carol", "sk-c"),
        ]
        used = data.budget_used(self.connection, self.dbtype, keys, NOW)
        self.assertEqual(used, {"alice": (0.5, 17), "bob": (0.0, 0)})
        monthly = [ClientKey("alice", "sk-a", budget=Budget(usd=5))]
        self.assertEqual(
            data.budget_used(self.connection, self.dbtype, monthly, NOW), {"alice": (0.75, 24)}
        )
        self.assertEqual(data.budget_start(BudgetPeriod.MONTH, NOW), 1796083200.0)

    def test_records_page_of_several(self) -> None:
        """Several keys and outcomes: one query each, merged newest first, paged
        by (time, id) across them as one query would."""
        self.migrate()
        records = [
            _record(
                n,
                key_name=("alice", "bob", "carol")[n % 3],
                status=200 if n % 2 else 502,
                outcome=Outcome.OK if n % 2 else Outcome.EXHAUSTED,
            )
            for n in range(1, 31)
        ]
        self.insert(*records)
        wanted = [
            r.id
            for r in sorted(records, key=lambda r: (-r.time, r.id))
            if r.key_name in ("alice", "bob") and r.outcome in (Outcome.OK, Outcome.EXHAUSTED)
        ]
        seen: list[str] = []
        cursor = None
        while True:
            args = {b"key": [b"alice,bob"], b"outcome": [b"ok", b"exhausted"], b"limit": [b"4"]}
            if cursor:
                args[b"before"] = [cursor.encode()]
            page = records_page(self.connection, self.dbtype, records_query(args, NOW))
            seen += [r["id"] for r in page["data"]]
            cursor = page["next"]
            if not page["has_more"]:
                break
        self.assertEqual(seen, wanted)
        self.assertEqual(len(seen), 20)

    def test_session_tables(self) -> None:
        """The store's session secret is made once by the migration; a logout
        is seen by any connection, and forgotten once its session expired."""
        self.migrate()
        cursor = self.connection.cursor()
        secret = read_session_secret(cursor)
        self.assertEqual(len(secret), 64)
        self.assertEqual(read_snapshot(cursor).session_secret, secret)
        close_session(self.connection, self.dbtype, "s1", NOW + 60, NOW)
        close_session(self.connection, self.dbtype, "s1", NOW + 60, NOW)
        self.connection.commit()
        other = open_database(self.dbtype, self.dbaddr)
        self.addCleanup(other.close)
        self.assertTrue(session_closed(other, self.dbtype, "s1"))
        self.assertFalse(session_closed(other, self.dbtype, "s2"))
        close_session(self.connection, self.dbtype, "s2", NOW + 600, NOW + 60)
        self.connection.commit()
        self.assertFalse(session_closed(other, self.dbtype, "s1"))
        self.assertTrue(session_closed(other, self.dbtype, "s2"))

    def plan(self, args: dict[bytes, list[bytes]]) -> str:
        """How the database reads the Requests page of ``args``."""
        query = records_query({**args, b"limit": [b"50"]}, NOW)
        sql, parameters = _page_select(self.dbtype, query, query.filters)
        cursor = self.connection.cursor()
        if self.dbtype == "postgres":
            cursor.execute("ANALYZE oaproxy_records")
            # A small table: the plan of a big one.
            cursor.execute("SET enable_seqscan = off")
            cursor.execute("SET enable_bitmapscan = off")
            cursor.execute("EXPLAIN " + sql, parameters)
        else:
            cursor.execute("EXPLAIN QUERY PLAN " + sql, parameters)
        return "\n".join(str(row[-1]) for row in cursor.fetchall())

    def test_key_or_model_with_an_outcome_is_indexed(self) -> None:
        """A key or a model filtered by outcome reads an index of all three
        (schema migration 5), in time order: no scan of every record of the
        key or model for those of the outcome, no sort of every match."""
        self.migrate()
        outcomes = list(Outcome)
        self.insert(
            *(
                _record(
                    n,
                    key_name=f"k{n % 3}",
                    model=f"m{n % 4}",
                    outcome=outcomes[n % len(outcomes)],
                    status=200,
                )
                for n in range(1, 601)
            )
        )
        for column, field, value in (("key_name", b"key", b"k1"), ("model", b"model", b"m3")):
            plan = self.plan({field: [value], b"outcome": [b"shutdown"]})
            self.assertIn(f"oaproxy_records_{column}_outcome_time", plan)
            # Only ties of time are sorted (on id), never every match.
            self.assertNotIn("TEMP B-TREE FOR ORDER BY", plan)
            self.assertRegex(plan, r"(outcome=\?|Index Cond: .*outcome = )")
            self.assertNotIn("Filter: (outcome", plan)


class PostgresStoreTests(StoreCase):
    dbtype = "postgres"

    def connect(self) -> Any:
        if not reachable(*SHARED_POSTGRES):
            unavailable("PostgreSQL is not running at 127.0.0.1:5432")
        return postgres_schema(self, f"oaproxy_test_{uuid.uuid4().hex[:12]}")
