"""``/admin/ui/``: the dashboard's routes and its door.

Served by ``AdminResource`` (so only with an ``admin_key``).  A page needs
a session cookie from the login form, or ``Authorization: Bearer
<admin_key>``; without either a page sends the browser to the login form.
Every POST (login and logout included) needs the CSRF token of its form.
Every answer is ``no-store``, with a Content-Security-Policy that lets in
only this package's script and style sheet (no inline script, no other
origin, no framing).
"""

from __future__ import annotations

import ipaddress
import secrets
from collections.abc import Awaitable, Callable
from importlib.resources import files
from typing import IO, TYPE_CHECKING, Any, cast
from urllib.parse import parse_qs

from twisted.internet.defer import ensureDeferred
from twisted.logger import Logger
from twisted.web import server

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
from oaproxy.admin.queries import record_by_id, records_page, records_query
from oaproxy.admin.sealing import Sealer
from oaproxy.config import ConfigError, all_client_keys
from oaproxy.credentials import bearer_token
from oaproxy.dashboard import data
from oaproxy.dashboard.forms import key_body, keys_page, upstream_body, upstreams_page
from oaproxy.dashboard.markup import Markup, html
from oaproxy.dashboard.pages import (
    BASE,
    Overview,
    UpstreamRow,
    login_page,
    overview_page,
    page,
    usage_page,
)
from oaproxy.dashboard.requests import FILTERS, record_page, requests_page
from oaproxy.dashboard.session import Session, Sessions, admin_key_matches
from oaproxy.dashboard.sessiontables import close_session, session_closed
from oaproxy.record import BadRecord
from oaproxy.web import client_ip, declared_size, peer
from oaproxy.workers import SESSION_SECRET_VARIABLE

if TYPE_CHECKING:
    from oaproxy.admin.resource import AdminResource

__all__ = ["CSP", "DashboardResource"]

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self';"
    " form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
SESSION_COOKIE = b"oaproxy_session"
LOGIN_COOKIE = b"oaproxy_login"
_STATIC = {"dashboard.css": b"text/css; charset=utf-8", "dashboard.js": b"text/javascript"}
PAGE_SIZE = 50
#: The forms are a few fields: anything bigger is a mistake.
MAX_FORM = 64 * 1024
EMPTY = Markup("")

Page = Callable[[server.Request, list[str], str], Awaitable[tuple[int, Markup]]]


class _Answer(Exception):
    """An answer other than the page asked for (a redirect, a refusal)."""

    def __init__(self, status: int, body: Markup = EMPTY, location: str | None = None):
        super().__init__(status)
        self.status, self.body, self.location = status, body, location


class DashboardResource:
    """Renders ``/admin/ui/...`` for ``AdminResource`` (which checks the admin key is set)."""

    log = Logger()

    def __init__(self, admin: AdminResource) -> None:
        self._admin = admin
        self._host = admin.host
        # The secret of this process, when no store holds one: the same in
        # every worker of one parent.
        self._own_secret = self._host.shared.environ.get(
            SESSION_SECRET_VARIABLE
        ) or secrets.token_hex(32)
        self.sessions = Sessions(self._host.shared.wall_clock, self._session_secret)
        self._gets: dict[tuple[str, ...], Page] = {
            (): self.overview,
            ("usage",): self.usage,
            ("requests",): self.requests,
            ("requests", "*"): self.record,
            ("upstreams",): self.upstreams,
            ("keys",): self.keys,
        }
        self._posts: dict[tuple[str, ...], Page] = {
            ("upstreams",): self.add_upstream,
            ("upstreams", "*", "enable"): self.enable_upstream,
            ("upstreams", "*", "disable"): self.disable_upstream,
            ("upstreams", "*", "remove"): self.remove_upstream,
            ("keys",): self.add_key,
            ("keys", "*", "remove"): self.remove_key,
        }

    # -- the door ------------------------------------------------------------------

    def _session_secret(self) -> bytes:
        """The store's secret (every process on it signs alike), else our own."""
        stored = self._host.sources.stored.session_secret if self._host.sources.store else ""
        return (stored or self._own_secret).encode("ascii")

    def render(self, request: server.Request, segments: list[str], admin_key: str) -> bytes | int:
        request.setHeader(b"content-security-policy", CSP.encode("ascii"))
        request.setHeader(b"x-content-type-options", b"nosniff")
        request.setHeader(b"referrer-policy", b"no-referrer")
        request.setHeader(b"x-frame-options", b"DENY")
        if segments[:1] == ["static"] and len(segments) == 2 and request.method == b"GET":
            return self._static(request, segments[1])
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        if request.method == b"POST":
            if getattr(request, "too_large", False) or declared_size(request) > MAX_FORM:
                return _answer(request, _Answer(413, _refused("The form is too large.")))
            _read_form(request)
        if segments == ["login"]:
            return self._login(request, admin_key)
        try:
            session = self._session(request, admin_key)
            # What the CSRF token is bound to: the session, or the admin key alone.
            binding = "bearer" if session is None else session.id
            if request.method == b"POST":
                if not self.sessions.csrf_good(admin_key, binding, self._field(request, "csrf")):
                    raise _Answer(403, _refused("The form expired or came from another page."))
                if segments == ["logout"]:
                    ensureDeferred(self._finish(request, self._logout(request, session)))
                    return server.NOT_DONE_YET
            handler, names = self._route(request, segments)
        except _Answer as answer:
            return _answer(request, answer)
        csrf = self.sessions.csrf_token(admin_key, binding)
        ensureDeferred(self._finish(request, self._run(handler, request, names, csrf, session)))
        return server.NOT_DONE_YET

    def _session(self, request: server.Request, admin_key: str) -> Session | None:
        """The request's session; None for one with the admin key as Bearer.
        Another kind of ``Authorization`` (an auth proxy's ``Basic``) is not
        ours: the cookie decides."""
        token = bearer_token(request.getHeader(b"authorization"))
        if token is not None:
            if admin_key_matches(token, admin_key):
                return None
            raise _Answer(401, self._login_form(request, admin_key, "Wrong admin key."))
        session = self.sessions.check(request.getCookie(SESSION_COOKIE), admin_key)
        if session is None:
            raise _Answer(303, location=f"{BASE}login")
        return session

    def _secure(self, request: server.Request) -> bool:
        """Whether the browser reached us over TLS: ours, or a proxy's in front
        (``X-Forwarded-Proto: https`` from one of ``trusted_proxies``; a
        client that forges it only keeps its own cookie off plain HTTP)."""
        if request.isSecure():
            return True
        trusted = self._host.generation.config.trusted_proxies
        try:
            address = ipaddress.ip_address(peer(request))
        except ValueError:
            return False
        if not any(address in network for network in trusted):
            return False
        schemes = request.requestHeaders.getRawHeaders(b"x-forwarded-proto") or []
        return any(
            part.strip().lower() == b"https" for value in schemes for part in value.split(b",")
        )

    def _login_form(self, request: server.Request, admin_key: str, message: str | None) -> Markup:
        nonce = Sessions.nonce()
        request.addCookie(
            LOGIN_COOKIE,
            nonce.encode("ascii"),
            path=BASE,
            max_age="3600",
            secure=self._secure(request) or None,
            httpOnly=True,
            sameSite="strict",
        )
        return login_page(self.sessions.csrf_token(admin_key, f"login:{nonce}"), message)

    def _login(self, request: server.Request, admin_key: str) -> bytes:
        if request.method == b"GET":
            return self._login_form(request, admin_key, None).encode("utf-8")
        if request.method != b"POST":
            request.setHeader(b"allow", b"GET, POST")
            return _answer(request, _Answer(405, _refused("Not a method of this page.")))
        nonce = (request.getCookie(LOGIN_COOKIE) or b"").decode("ascii", "replace")
        token_good = self.sessions.csrf_good(
            admin_key, f"login:{nonce}", self._field(request, "csrf")
        )
        # Checked whatever the token said: the same work for every wrong answer.
        key_good = admin_key_matches(self._field(request, "admin_key"), admin_key)
        if not token_good:
            body = self._login_form(request, admin_key, "The form expired: log in again.")
            return _answer(request, _Answer(403, body))
        if not key_good:
            body = self._login_form(request, admin_key, "Wrong admin key.")
            return _answer(request, _Answer(401, body))
        lifetime = self._host.generation.config.dashboard_session
        _, cookie = self.sessions.open(admin_key, lifetime)
        request.addCookie(
            SESSION_COOKIE,
            cookie.encode("ascii"),
            path="/admin/",
            max_age=str(int(lifetime)),
            secure=self._secure(request) or None,
            httpOnly=True,
            sameSite="strict",
        )
        request.addCookie(
            LOGIN_COOKIE, b"", path=BASE, max_age="0", httpOnly=True, sameSite="strict"
        )
        return _answer(request, _Answer(303, location=BASE))

    async def _logout(self, request: server.Request, session: Session | None) -> bytes:
        request.addCookie(
            SESSION_COOKIE, b"", path="/admin/", max_age="0", httpOnly=True, sameSite="strict"
        )
        if session is not None:
            self.sessions.close(session)
            store = self._host.sources.store
            if store is not None:
                # For every process on the store: the cookie may be sent to any.
                dbtype, now = store.dbtype, self._host.shared.wall_clock()
                try:
                    await store.query(
                        lambda c: close_session(c, dbtype, session.id, session.expires, now)
                    )
                except Exception:  # noqa: BLE001 - said, and answered
                    self.log.failure("dashboard logout could not be stored")
                    raise _Answer(
                        503,
                        _refused(
                            "Logged out of this process only: the store could not be"
                            " written (the proxy's log says why)."
                        ),
                    ) from None
        return _answer(request, _Answer(303, location=f"{BASE}login"))

    async def _logged_out(self, session: Session | None) -> bool:
        """Whether another process (on the store) logged the session out."""
        store = self._host.sources.store
        if session is None or store is None:
            return False
        dbtype = store.dbtype
        closed: bool = await store.query(lambda c: session_closed(c, dbtype, session.id))
        return closed

    def _route(self, request: server.Request, segments: list[str]) -> tuple[Page, list[str]]:
        routes = self._posts if request.method == b"POST" else self._gets
        if request.method not in (b"GET", b"POST"):
            raise _Answer(405, _refused("Not a method of this page."))
        for pattern, handler in routes.items():
            if len(pattern) == len(segments) and all(
                p in ("*", s) for p, s in zip(pattern, segments)
            ):
                return handler, [s for p, s in zip(pattern, segments) if p == "*"]
        raise _Answer(404, _refused("No such page."))

    async def _run(
        self,
        handler: Page,
        request: server.Request,
        names: list[str],
        csrf: str,
        session: Session | None,
    ) -> bytes:
        if await self._logged_out(session):
            raise _Answer(303, location=f"{BASE}login")
        status, body = await handler(request, names, csrf)
        request.setResponseCode(status)
        return body.encode("utf-8")

    async def _finish(self, request: server.Request, work: Awaitable[bytes]) -> None:
        """Answer with what ``work`` makes of the request."""
        try:
            document = await work
        except _Answer as answer:
            document = _answer(request, answer)
        except Exception:  # noqa: BLE001 - a page that fails never stops the daemon
            self.log.failure("dashboard page failed")
            document = _answer(request, _Answer(500, _refused("Internal error (see the log).")))
        if not request._disconnected:
            request.write(document)
            request.finish()

    def _static(self, request: server.Request, name: str) -> bytes:
        kind = _STATIC.get(name)
        if kind is None:
            return _answer(request, _Answer(404, _refused("No such file.")))
        request.setHeader(b"content-type", kind)
        return (files("oaproxy.dashboard") / "static" / name).read_bytes()

    @staticmethod
    def _field(request: server.Request, name: str) -> bytes | None:
        values = (request.args or {}).get(name.encode("ascii"))
        return values[-1] if values else None

    def _text(self, request: server.Request, name: str) -> str:
        return (self._field(request, name) or b"").decode("utf-8", "replace")

    # -- the pages ---------------------------------------------------------------------

    async def overview(
        self, request: server.Request, names: list[str], csrf: str
    ) -> tuple[int, Markup]:
        host = self._host
        now = host.shared.wall_clock()
        minutes: list[data.Minute] = []
        day: dict[str, tuple[int, int]] = {}
        store = host.sources.store
        if store is not None:
            dbtype = store.dbtype

            def read(connection: Any) -> tuple[list[data.Minute], dict[str, tuple[int, int]]]:
                return data.last_hour(connection, dbtype, now), data.upstreams_day(
                    connection, dbtype, now
                )

            minutes, day = await store.query(read)
        config = host.generation.config
        rows = tuple(
            UpstreamRow(
                u.name, u.enabled, self._admin.upstream_state(u.name), day.get(u.name, (0, 0))
            )
            for u in (*config.upstreams, *config.disabled_upstreams)
        )
        ready, details = host.shared.readiness.state()
        notifier = host.generation.notifier
        overview = Overview(
            upstreams=rows,
            minutes=tuple(minutes),
            active_streams=host.shared.metrics.active_streams(),
            ready=ready,
            sinks=details.get("sinks", {}),
            alerts={n: (notifier.sent.get(n, 0), notifier.failed.get(n, 0)) for n in notifier.sent},
            suppressed=sum(notifier.suppressed.values()),
        )
        return 200, overview_page(overview, csrf)

    async def usage(
        self, request: server.Request, names: list[str], csrf: str
    ) -> tuple[int, Markup]:
        store = self._store_or_notice("Usage", "usage", csrf)
        try:
            period = data.Period(self._text(request, "period") or "week")
        except ValueError:
            period = data.Period.WEEK
        stack = "model" if self._text(request, "stack") == "model" else "key"
        now = self._host.shared.wall_clock()
        keys = all_client_keys(self._host.generation.config)
        dbtype = store.dbtype

        def read(connection: Any) -> tuple[data.UsageReport, dict[str, tuple[float, int]]]:
            return (
                data.usage_report(connection, dbtype, period, now, stack),
                data.budget_used(connection, dbtype, keys, now),
            )

        report, used = await store.query(read)
        return 200, usage_page(report, period, stack, keys, used, csrf)

    async def requests(
        self, request: server.Request, names: list[str], csrf: str
    ) -> tuple[int, Markup]:
        store = self._store_or_notice("Requests", "requests", csrf)
        filters = {name: self._text(request, name).strip() for name in FILTERS}
        keys = [key.name for key in all_client_keys(self._host.generation.config)]
        args = dict(request.args or {})
        args.setdefault(b"limit", [str(PAGE_SIZE).encode("ascii")])
        try:
            query = records_query(args, self._host.shared.wall_clock())
        except Refusal as e:
            return 400, requests_page({}, filters, keys, csrf, e.message)
        dbtype = store.dbtype
        listing = await store.query(lambda c: records_page(c, dbtype, query))
        return 200, requests_page(listing, filters, keys, csrf)

    async def record(
        self, request: server.Request, names: list[str], csrf: str
    ) -> tuple[int, Markup]:
        store = self._store_or_notice("Request", "requests", csrf)
        dbtype = store.dbtype
        try:
            found = await store.query(lambda c: record_by_id(c, dbtype, names[0]))
        except BadRecord as e:
            self.log.error("record {id} in the store cannot be read: {error}", id=names[0], error=e)
            raise _Answer(
                500, _refused("The stored record cannot be read; the proxy's log says why.")
            ) from None
        if found is None:
            raise _Answer(404, _refused(f"No record {names[0]}."))
        return 200, record_page(found, csrf)

    async def upstreams(
        self,
        request: server.Request,
        names: list[str],
        csrf: str,
        message: str | None = None,
        done: str | None = None,
    ) -> tuple[int, Markup]:
        return (400 if message else 200), upstreams_page(
            self._admin.upstreams_json(), csrf, message, done
        )

    async def keys(
        self,
        request: server.Request,
        names: list[str],
        csrf: str,
        message: str | None = None,
        new_key: tuple[str, str] | None = None,
        done: str | None = None,
    ) -> tuple[int, Markup]:
        return (400 if message else 200), keys_page(
            self._admin.keys_json(), csrf, message, new_key, done
        )

    # -- the forms -------------------------------------------------------------------------

    async def add_upstream(
        self, request: server.Request, names: list[str], csrf: str
    ) -> tuple[int, Markup]:
        fields = {
            n: self._text(request, n)
            for n in ("name", "endpoint", "sk", "allow", "settings", "enabled")
        }
        problem = await self._change(
            request, lambda context: add_upstream(context, upstream_body(fields))
        )
        done = None if problem else f"Upstream {fields['name'].strip()} added."
        return await self.upstreams(request, names, csrf, problem, done)

    async def _set(
        self, request: server.Request, names: list[str], csrf: str, on: bool
    ) -> tuple[int, Markup]:
        problem = await self._change(request, lambda context: set_enabled(context, names[0], on))
        done = None if problem else f"Upstream {names[0]} {'enabled' if on else 'disabled'}."
        return await self.upstreams(request, names, csrf, problem, done)

    async def enable_upstream(
        self, request: server.Request, names: list[str], csrf: str
    ) -> tuple[int, Markup]:
        return await self._set(request, names, csrf, True)

    async def disable_upstream(
        self, request: server.Request, names: list[str], csrf: str
    ) -> tuple[int, Markup]:
        return await self._set(request, names, csrf, False)

    async def remove_upstream(
        self, request: server.Request, names: list[str], csrf: str
    ) -> tuple[int, Markup]:
        problem = await self._change(request, lambda context: remove_upstream(context, names[0]))
        done = None if problem else f"Upstream {names[0]} removed."
        return await self.upstreams(request, names, csrf, problem, done)

    async def add_key(
        self, request: server.Request, names: list[str], csrf: str
    ) -> tuple[int, Markup]:
        fields = {
            n: self._text(request, n)
            for n in (
                "name",
                "upstreams",
                "rate_limit",
                "token_limit",
                "budget",
                "budget_measure",
                "budget_period",
            )
        }
        secret = new_key_secret()
        problem = await self._change(
            request, lambda context: add_key(context, key_body(fields), secret)
        )
        new_key = None if problem else (fields["name"].strip(), secret)
        return await self.keys(request, names, csrf, problem, new_key)

    async def remove_key(
        self, request: server.Request, names: list[str], csrf: str
    ) -> tuple[int, Markup]:
        problem = await self._change(request, lambda context: remove_key(context, names[0]))
        done = None if problem else f"Key {names[0]} removed."
        return await self.keys(request, names, csrf, problem, None, done)

    async def _change(
        self, request: server.Request, decide: Callable[[ChangeContext], Decide]
    ) -> str | None:
        """Make the change through the store; its refusal's message, or None."""
        store = self._host.sources.store
        if store is None:
            return "This proxy has no SQL store (dbtype: none): set dbtype to sqlite or postgres."
        file = self._host.sources.file_config
        context = ChangeContext(
            file,
            Sealer.from_config(file),
            f"dashboard from {client_ip(request, file.trusted_proxies)}",
            self._host.shared.wall_clock(),
        )
        try:
            _, in_use = await store.take(decide(context))
        except Refusal as e:
            return e.message
        except ConfigError as e:
            return str(e)
        if not in_use:
            return "The change is stored, but the store as a whole is refused (see the log)."
        return None

    def _store_or_notice(self, title: str, active: str, csrf: str) -> Any:
        store = self._host.sources.store
        if store is None:
            raise _Answer(
                409,
                page(
                    title,
                    active,
                    Markup(
                        '<p class="error">This proxy has no SQL store (dbtype: none):'
                        " set dbtype to sqlite or postgres to keep records.</p>"
                    ),
                    csrf,
                ),
            )
        return store


def _read_form(request: server.Request) -> None:
    """The posted fields into ``request.args``, as twisted.web would (the
    proxy's requests do not parse bodies: see ``oaproxy.web.ProxyRequest``)."""
    content = cast(IO[bytes], request.content)
    content.seek(0)
    # Latin-1 both ways keeps each byte as sent: a field that is not UTF-8
    # is decoded (with replacement) where it is read, like any other.
    fields = parse_qs(content.read().decode("latin-1"), keep_blank_values=True, encoding="latin-1")
    request.args = {
        **(request.args or {}),
        **{k.encode("latin-1"): [v.encode("latin-1") for v in vs] for k, vs in fields.items()},
    }


def _refused(message: str) -> Markup:
    return html('<p class="error" role="alert">{}</p>', message)


def _answer(request: server.Request, answer: _Answer) -> bytes:
    request.setResponseCode(answer.status)
    if answer.location is not None:
        request.setHeader(b"location", answer.location.encode("ascii"))
    body = answer.body
    if not body.startswith("<!DOCTYPE"):
        body = page("oaproxy", None, body, None) if body else Markup("")
    return body.encode("utf-8")
