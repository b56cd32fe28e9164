"""``GET /v1/models`` and ``GET /v1/models/{id}`` (under any route prefix too),
answered by oaproxy for each client key: the models that key may use.

For each upstream of the route the key may use: its allow list's model
names (paths are not models) and its aliases; for an upstream without an
allow list, its own ``/v1/models`` answer, fetched when a client asks and
the copy kept is older than 5 minutes (never in the background nor at
start: an upstream sees no request it was not sent for), with a 5 s
deadline; an upstream that fails keeps its last good list. Then denied
names are taken out, aliases shown instead of the names they stand for,
and each name listed once, in OpenAI's shape.

These fetches are oaproxy's own requests: they are no attempts, so they
never count for circuit breakers, readiness or metrics.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any, NoReturn

from attrs import frozen
from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers

from oaproxy.answers import JSONAnswer, LocalAnswer
from oaproxy.config import Upstream, UpstreamType
from oaproxy.credentials import upstream_authorization
from oaproxy.errors import ErrorAnswer
from oaproxy.pipeline import Arrival
from oaproxy.relay import describe, small_body
from oaproxy.routing import Router
from oaproxy.upstreams import UpstreamClient

#: How long an upstream's own list is kept before a client's ask fetches it again.
LIST_LIFETIME = 300.0
# After a failed fetch the last good list is shown this long before the next
# ask tries again: a down upstream does not slow every listing by FETCH_TIMEOUT.
RETRY_LIFETIME = 30.0
FETCH_TIMEOUT = 5.0
# A models list is small; anything this big is not one.
MAX_LIST_BYTES = 8 * 1024 * 1024
# Who "owns" the names oaproxy lists from its config.
OWNER = "oaproxy"

_LIST = "/v1/models"


@frozen
class ModelEntry:
    id: str
    created: int = 0
    owned_by: str = OWNER

    def document(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "model",
            "created": self.created,
            "owned_by": self.owned_by,
        }


def parse_list(body: bytes) -> tuple[ModelEntry, ...]:
    """The entries of an OpenAI-shaped models list; ValueError when it is none."""
    document = json.loads(body)
    data = document.get("data") if isinstance(document, dict) else None
    if not isinstance(data, list):
        raise ValueError("not a models list")
    entries = []
    for item in data:
        if not isinstance(item, dict) or not isinstance(item.get("id"), str):
            continue
        created, owner = item.get("created"), item.get("owned_by")
        entries.append(
            ModelEntry(
                item["id"],
                created if isinstance(created, int) and not isinstance(created, bool) else 0,
                owner if isinstance(owner, str) else OWNER,
            )
        )
    return tuple(entries)


@frozen
class _Kept:
    entries: tuple[ModelEntry, ...]
    until: float  # on the reactor's clock


class ModelLists:
    """Each upstream's own models list, kept until it is due again; it
    outlives a reload. Concurrent asks share one fetch."""

    log = Logger()

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self._lists: dict[tuple[str, str | None], _Kept] = {}
        self._fetching: dict[tuple[str, str | None], list[Deferred[tuple[ModelEntry, ...]]]] = {}

    def get(
        self, upstream: Upstream, fetch: Callable[[], Deferred[tuple[ModelEntry, ...]]]
    ) -> Deferred[tuple[ModelEntry, ...]]:
        """The list, fetched again when due; never fails. Cancelling the
        result leaves the fetch to whoever else waits."""
        key = (upstream.name, upstream.endpoint)
        kept = self._lists.get(key)
        if kept is not None and self._clock.seconds() < kept.until:
            return succeed(kept.entries)
        mine: Deferred[tuple[ModelEntry, ...]] = Deferred()
        waiting = self._fetching.get(key)
        if waiting is not None:
            waiting.append(mine)
            return mine
        waiting = self._fetching[key] = [mine]

        def fetched(entries: tuple[ModelEntry, ...]) -> tuple[ModelEntry, ...]:
            self._lists[key] = _Kept(entries, self._clock.seconds() + LIST_LIFETIME)
            return entries

        def failed(failure: Failure) -> tuple[ModelEntry, ...]:
            self.log.warn(
                "upstream {upstream}: its models list could not be fetched ({error});"
                " its last good list stays",
                upstream=upstream.name,
                error=failure.getErrorMessage(),
            )
            entries = kept.entries if kept is not None else ()
            self._lists[key] = _Kept(entries, self._clock.seconds() + RETRY_LIFETIME)
            return entries

        def tell(entries: tuple[ModelEntry, ...]) -> None:
            del self._fetching[key]
            for waiter in waiting:
                if not waiter.called:
                    waiter.callback(entries)

        fetch().addCallbacks(fetched, failed).addCallback(tell)
        return mine


class ListUnavailable(Exception):
    """An upstream's own list could not be fetched; the text says why, fit for the log."""


def fetch_list(
    upstream: Upstream,
    client: UpstreamClient,
    clock: IReactorTime,
    authorization: bytes | None,
    words: Callable[[str], str],
) -> Deferred[tuple[ModelEntry, ...]]:
    """An upstream's own ``/v1/models`` answer, under ``FETCH_TIMEOUT``; a
    failure is a ``ListUnavailable`` whose text (from outside: an
    upstream's, a proxy's) ``words`` made fit to repeat."""

    async def fetch() -> tuple[ModelEntry, ...]:
        headers = Headers({b"accept": [b"application/json"]})
        if authorization is not None:
            headers.setRawHeaders(b"authorization", [authorization])
        response = await client.agent.request(b"GET", upstream.url(b"/models"), headers, None)
        body = await small_body(response, MAX_LIST_BYTES)
        if response.code != 200:
            raise ValueError(f"status {response.code}")
        return parse_list(body)

    def unavailable(failure: Failure) -> NoReturn:
        raise ListUnavailable(describe(failure, words)[1])

    return Deferred.fromCoroutine(fetch()).addTimeout(FETCH_TIMEOUT, clock).addErrback(unavailable)


def allowed(upstream: Upstream) -> list[ModelEntry]:
    """What an upstream with an allow list serves: its model names (already
    the names clients use) and its aliases, minus the denied."""
    names = [name for name in upstream.allow if not name.startswith("/")]
    names += [alias for alias in upstream.models if alias not in names]
    return [ModelEntry(name) for name in names if name not in upstream.deny]


def shown(upstream: Upstream, own: Iterable[ModelEntry]) -> list[ModelEntry]:
    """What an upstream's own list offers, by the names clients use: aliases
    instead of the names they stand for, minus the denied."""
    standing_for: dict[str, list[str]] = {}
    for alias, target in upstream.models.items():
        standing_for.setdefault(target, []).append(alias)
    entries: list[ModelEntry] = []
    for entry in own:
        for name in standing_for.get(entry.id, [entry.id]):
            entries.append(ModelEntry(name, entry.created, entry.owned_by))
    listed = {entry.id for entry in entries}
    entries.extend(ModelEntry(alias) for alias in upstream.models if alias not in listed)
    return [entry for entry in entries if entry.id not in upstream.deny]


class ModelsAnswer:
    """The own answer for ``GET /v1/models`` and ``/v1/models/{id}``."""

    def __init__(
        self,
        router: Router,
        clients: Callable[[Upstream], UpstreamClient],
        lists: ModelLists,
        clock: IReactorTime,
        words: Callable[[str], str],
    ) -> None:
        self._router = router
        self._clients = clients
        self._lists = lists
        self._clock = clock
        self._words = words

    def __call__(self, arrival: Arrival) -> Deferred[LocalAnswer] | None:
        path = arrival.path
        if arrival.request.method != b"GET" or path is None:
            return None
        if path == _LIST:
            wanted = None
        elif path.startswith(_LIST + "/"):
            wanted = path[len(_LIST) + 1 :]
        else:
            return None
        upstreams = self._router.usable(arrival.caller, arrival.route) or []
        client_auth = arrival.request.getHeader(b"authorization")
        gathered = gatherResults(
            [self._entries(u, client_auth) for u in upstreams], consumeErrors=True
        )
        return gathered.addCallback(lambda lists: _reply(lists, wanted))

    def _entries(self, upstream: Upstream, client_auth: bytes | None) -> Deferred[list[ModelEntry]]:
        if upstream.allow or upstream.type is UpstreamType.REPLICATE:
            # Replicate has no OpenAI-shaped list: its allow list is the list.
            return succeed(allowed(upstream))
        client = self._clients(upstream)
        if upstream.sk == "asis":
            # Its list is the asking client's key's: asked each time, kept for no one.
            d = fetch_list(upstream, client, self._clock, client_auth, self._words)
            d.addErrback(lambda _: ())
        else:
            auth = upstream_authorization(upstream, None)
            d = self._lists.get(
                upstream, lambda: fetch_list(upstream, client, self._clock, auth, self._words)
            )
        return d.addCallback(lambda own: shown(upstream, own))


def _reply(lists: list[list[ModelEntry]], wanted: str | None) -> LocalAnswer:
    merged: dict[str, ModelEntry] = {}
    for entries in lists:
        for entry in entries:
            merged.setdefault(entry.id, entry)
    if wanted is None:
        document: dict[str, Any] = {
            "object": "list",
            "data": [entry.document() for entry in merged.values()],
        }
        return JSONAnswer(json.dumps(document).encode("utf-8"))
    found = merged.get(wanted)
    if found is None:
        return ErrorAnswer(
            404,
            f"The model `{wanted}` does not exist or you do not have access to it.",
            code="model_not_found",
            param="model",
        )
    return JSONAnswer(json.dumps(found.document()).encode("utf-8"))
