"""``/admin/``: the admin API, JSON in and out.

Served only when the running config has an ``admin_key`` (else 404, as for
any unknown path); every request needs ``Authorization: Bearer <admin_key>``,
compared in constant time (401 otherwise).  Errors are OpenAI-shaped
(``{"error": {"message", "type", "param", "code"}}``), lists are
``{"object": "list", "data": [...]}``.  No CORS headers: a page of another
origin cannot read the answers; none is cached (``Cache-Control: no-store``:
a new key's secret is in one).

One ``AdminResource`` serves every generation: it reads the daemon's state
(``AdminHost``) at each request.  A change goes to the store through the
daemon's ``StoreFollower``, which applies it before the answer is written.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Awaitable, Callable
from typing import IO, TYPE_CHECKING, Any, Protocol, cast

from twisted.internet.defer import ensureDeferred
from twisted.logger import Logger
from twisted.web import server
from twisted.web.resource import Resource

from oaproxy.activity import upstream_state
from oaproxy.admin.changes import (
    ChangeContext,
    Decide,
    Refusal,
    RefusalKind,
    add_key,
    add_upstream,
    change_upstream,
    new_key_secret,
    remove_key,
    remove_upstream,
    set_enabled,
)
from oaproxy.admin.describe import describe_key, describe_upstream
from oaproxy.admin.follower import ConfigSources, StoreFollower
from oaproxy.admin.queries import (
    audit_page,
    audit_query,
    record_by_id,
    records_page,
    records_query,
    usage,
    usage_query,
)
from oaproxy.admin.sealing import Sealer
from oaproxy.answers import JSONAnswer, write_answer
from oaproxy.config import ConfigError, all_client_keys
from oaproxy.credentials import bearer_token
from oaproxy.errors import ErrorAnswer
from oaproxy.record import BadRecord
from oaproxy.web import NotFoundResource, client_ip, declared_size

if TYPE_CHECKING:
    from oaproxy.generation import Generation, Shared

#: Admin bodies are a few settings: anything bigger is a mistake.
MAX_BODY = 1024 * 1024

_CODES = {
    RefusalKind.INVALID: "invalid_value",
    RefusalKind.NOT_FOUND: "not_found",
    RefusalKind.CONFLICT: "conflict",
}


class AdminHost(Protocol):
    """What the admin API reads of the daemon (``ProxyService``)."""

    @property
    def generation(self) -> Generation: ...

    sources: ConfigSources  # the config file alone, the store's rows in use
    shared: Shared


class _Refused(Exception):
    """An error answer, raised from inside a handler."""

    def __init__(self, error: ErrorAnswer) -> None:
        super().__init__(error)
        self.error = error


Handler = Callable[[server.Request, list[str]], Awaitable[tuple[int, Any]]]


class AdminResource(Resource):
    """Every route under ``/admin/`` (a leaf: it reads the path itself)."""

    isLeaf = True
    log = Logger()

    def __init__(self, host: AdminHost) -> None:
        super().__init__()
        self._host = host
        # (method, path with "*" for a name) -> handler.
        self._routes: dict[tuple[bytes, tuple[str, ...]], Handler] = {
            (b"GET", ("upstreams",)): self.list_upstreams,
            (b"POST", ("upstreams",)): self.add_upstream,
            (b"GET", ("upstreams", "*")): self.get_upstream,
            (b"PATCH", ("upstreams", "*")): self.change_upstream,
            (b"DELETE", ("upstreams", "*")): self.remove_upstream,
            (b"POST", ("upstreams", "*", "enable")): self.enable_upstream,
            (b"POST", ("upstreams", "*", "disable")): self.disable_upstream,
            (b"GET", ("keys",)): self.list_keys,
            (b"POST", ("keys",)): self.add_key,
            (b"GET", ("keys", "*")): self.get_key,
            (b"DELETE", ("keys", "*")): self.remove_key,
            (b"GET", ("records",)): self.list_records,
            (b"GET", ("records", "*")): self.get_record,
            (b"GET", ("usage",)): self.usage,
            (b"GET", ("audit",)): self.audit,
            (b"GET", ("status",)): self.status,
        }

    # -- the door ------------------------------------------------------------

    def render(self, request: server.Request) -> bytes | int:
        admin_key = self._host.generation.config.admin_key
        if admin_key is None:
            # As for any path oaproxy does not serve.
            return NotFoundResource().render(request)
        request.setHeader(b"server", b"oaproxy")
        request.setHeader(b"cache-control", b"no-store")
        presented = bearer_token(request.getHeader(b"authorization"))
        # Digests compared: the time taken says nothing of the key's length.
        if presented is None or not hmac.compare_digest(
            hashlib.sha256(presented).digest(), hashlib.sha256(admin_key.encode("utf-8")).digest()
        ):
            return write_answer(
                request, ErrorAnswer(401, "wrong admin key", code="invalid_api_key")
            )
        try:
            handler, names = self._route(request)
        except _Refused as e:
            return write_answer(request, e.error)
        work = ensureDeferred(self._run(handler, request, names))
        work.addErrback(lambda failure: self.log.failure("admin answer failed", failure=failure))
        return server.NOT_DONE_YET

    def _route(self, request: server.Request) -> tuple[Handler, list[str]]:
        try:
            segments = [s.decode("utf-8") for s in request.postpath or []]
        except UnicodeDecodeError:
            raise _Refused(_not_found(request)) from None
        if segments and segments[-1] == "":
            segments.pop()
        allowed = []
        for (method, pattern), handler in self._routes.items():
            if len(pattern) != len(segments) or any(
                p not in ("*", s) for p, s in zip(pattern, segments)
            ):
                continue
            if method == request.method:
                names = [s for p, s in zip(pattern, segments) if p == "*"]
                return handler, names
            allowed.append(method)
        if allowed:
            request.setHeader(b"allow", b", ".join(allowed))
            raise _Refused(ErrorAnswer(405, "method not allowed here", code="method_not_allowed"))
        raise _Refused(_not_found(request))

    async def _run(self, handler: Handler, request: server.Request, names: list[str]) -> None:
        try:
            status, value = await handler(request, names)
        except _Refused as e:
            body = write_answer(request, e.error)
        except Refusal as e:
            error = ErrorAnswer(
                e.kind.value, e.message, code=e.code or _CODES[e.kind], param=e.param
            )
            body = write_answer(request, error)
        except ConfigError as e:
            # A row of the store that does not read (edited by hand).
            body = write_answer(request, ErrorAnswer(409, str(e), code="store_invalid"))
        except Exception:  # noqa: BLE001 - bad input never stops the daemon
            self.log.failure("admin request failed")
            body = write_answer(
                request,
                ErrorAnswer(500, "internal error (see the log)", type="server_error"),
            )
        else:
            document = json.dumps(value, ensure_ascii=False).encode("utf-8")
            body = write_answer(request, JSONAnswer(document, status))
        if not request._disconnected:
            request.write(body)
            request.finish()

    # -- upstreams -------------------------------------------------------------

    async def list_upstreams(self, request: server.Request, names: list[str]) -> tuple[int, Any]:
        config = self._host.generation.config
        upstreams = [self._upstream(u.name) for u in config.upstreams]
        upstreams += [self._upstream(u.name) for u in config.disabled_upstreams]
        return 200, {"object": "list", "data": upstreams}

    async def get_upstream(self, request: server.Request, names: list[str]) -> tuple[int, Any]:
        return 200, self._upstream(names[0])

    async def add_upstream(self, request: server.Request, names: list[str]) -> tuple[int, Any]:
        body = _body(request)
        await self._take(add_upstream(self._context(request), body))
        return 201, self._upstream(body["name"].strip())

    async def change_upstream(self, request: server.Request, names: list[str]) -> tuple[int, Any]:
        await self._take(change_upstream(self._context(request), names[0], _body(request)))
        return 200, self._upstream(names[0])

    async def remove_upstream(self, request: server.Request, names: list[str]) -> tuple[int, Any]:
        await self._take(remove_upstream(self._context(request), names[0]))
        return 200, {"object": "upstream", "name": names[0], "deleted": True}

    async def enable_upstream(self, request: server.Request, names: list[str]) -> tuple[int, Any]:
        await self._take(set_enabled(self._context(request), names[0], True))
        return 200, self._upstream(names[0])

    async def disable_upstream(self, request: server.Request, names: list[str]) -> tuple[int, Any]:
        await self._take(set_enabled(self._context(request), names[0], False))
        return 200, self._upstream(names[0])

    def _upstream(self, name: str) -> dict[str, Any]:
        config = self._host.generation.config
        shared = self._host.shared
        for upstream in (*config.upstreams, *config.disabled_upstreams):
            if upstream.name == name:
                state = upstream_state(
                    name,
                    recent=shared.recent_attempts,
                    load=shared.load,
                    circuits=shared.circuits,
                    readiness=shared.readiness,
                )
                return describe_upstream(upstream, stored=self._host.sources.stored, state=state)
        raise _Refused(ErrorAnswer(404, f"no upstream {name!r}", code="not_found"))

    # -- keys ----------------------------------------------------------------------

    async def list_keys(self, request: server.Request, names: list[str]) -> tuple[int, Any]:
        config = self._host.generation.config
        keys = [
            describe_key(key, config, self._host.sources.stored) for key in all_client_keys(config)
        ]
        return 200, {"object": "list", "data": keys}

    async def get_key(self, request: server.Request, names: list[str]) -> tuple[int, Any]:
        return 200, self._key(names[0])

    async def add_key(self, request: server.Request, names: list[str]) -> tuple[int, Any]:
        body = _body(request)
        secret = new_key_secret()
        await self._take(add_key(self._context(request), body, secret))
        # The one time the secret is shown: the store keeps its SHA-256 only.
        return 201, {**self._key(body["name"].strip()), "key": secret}

    async def remove_key(self, request: server.Request, names: list[str]) -> tuple[int, Any]:
        await self._take(remove_key(self._context(request), names[0]))
        return 200, {"object": "client_key", "name": names[0], "deleted": True}

    def _key(self, name: str) -> dict[str, Any]:
        config = self._host.generation.config
        for key in all_client_keys(config):
            if key.name == name:
                return describe_key(key, config, self._host.sources.stored)
        raise _Refused(ErrorAnswer(404, f"no client key {name!r}", code="not_found"))

    # -- the records -----------------------------------------------------------------

    async def list_records(self, request: server.Request, names: list[str]) -> tuple[int, Any]:
        query = records_query(request.args, self._now())
        store = self._store()
        return 200, await store.query(lambda c: records_page(c, store.dbtype, query))

    async def get_record(self, request: server.Request, names: list[str]) -> tuple[int, Any]:
        store = self._store()
        try:
            record = await store.query(lambda c: record_by_id(c, store.dbtype, names[0]))
        except BadRecord as e:
            self.log.error("record {id} in the store cannot be read: {error}", id=names[0], error=e)
            raise _Refused(
                ErrorAnswer(
                    500,
                    "The stored record cannot be read; the proxy's log says why.",
                    type="server_error",
                    code="bad_record",
                )
            ) from None
        if record is None:
            raise _Refused(ErrorAnswer(404, f"no record {names[0]!r}", code="not_found"))
        return 200, record

    async def usage(self, request: server.Request, names: list[str]) -> tuple[int, Any]:
        query = usage_query(request.args, self._now())
        store = self._store()
        return 200, await store.query(lambda c: usage(c, store.dbtype, query))

    async def audit(self, request: server.Request, names: list[str]) -> tuple[int, Any]:
        query = audit_query(request.args)
        store = self._store()
        return 200, await store.query(lambda c: audit_page(c, store.dbtype, query))

    async def status(self, request: server.Request, names: list[str]) -> tuple[int, Any]:
        """``/readyz``'s view (sinks' queues included), and which store version runs."""
        ready, details = self._host.shared.readiness.state()
        config = self._host.generation.config
        return 200, {
            "object": "status",
            "hostname": config.hostname,
            "ready": ready,
            **details,
            "store_version": None
            if self._host.sources.store is None
            else self._host.sources.stored.version,
        }

    # -- the parts -------------------------------------------------------------------

    def _now(self) -> float:
        return self._host.shared.wall_clock()

    def _store(self) -> StoreFollower:
        store = self._host.sources.store
        if store is None:
            raise _Refused(
                ErrorAnswer(
                    409,
                    "this proxy has no SQL store (dbtype: none): set dbtype to sqlite or postgres",
                    code="no_store",
                )
            )
        return store

    def _context(self, request: server.Request) -> ChangeContext:
        file = self._host.sources.file_config
        address = client_ip(request, file.trusted_proxies)
        return ChangeContext(
            file, Sealer.from_config(file), f"admin API from {address}", self._now()
        )

    async def _take(self, decide: Decide) -> None:
        _, in_use = await self._store().take(decide)
        if not in_use:
            raise _Refused(
                ErrorAnswer(
                    500,
                    "the change is stored, but the store as a whole is refused (see the log)",
                    type="server_error",
                    code="store_refused",
                )
            )


def _body(request: server.Request) -> Any:
    if getattr(request, "too_large", False) or declared_size(request) > MAX_BODY:
        raise _Refused(ErrorAnswer(413, f"the body is over {MAX_BODY} bytes", code="too_large"))
    data = cast(IO[bytes], request.content).read()
    try:
        return json.loads(
            data or b"null", parse_constant=_no_constant, object_pairs_hook=_no_duplicates
        )
    except _Duplicate as e:
        raise _Refused(ErrorAnswer(400, f"duplicate key {e}", code="invalid_json")) from None
    except (ValueError, RecursionError):
        raise _Refused(ErrorAnswer(400, "the body is not JSON", code="invalid_json")) from None


class _Duplicate(Exception):
    """A key given twice in one object: the config file refuses it too."""


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _Duplicate(repr(key))
        result[key] = value
    return result


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _not_found(request: server.Request) -> ErrorAnswer:
    path = request.path.decode("utf-8", "replace")
    return ErrorAnswer(404, f"Unknown path {path}.", code="not_found")
