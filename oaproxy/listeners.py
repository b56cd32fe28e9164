"""The daemon's listening endpoints: checked at start, replaced on reload."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from twisted.application import strports
from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IService, MultiService
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.web.server import Site

from oaproxy.config import ConfigError
from oaproxy.workers import InheritedListener


def check_endpoint(reactor: Any, endpoint: str, path: str) -> None:
    """Build a listen endpoint once, so that a bad one is a ConfigError.

    Twisted raises IndexError or KeyError from a ``systemd:`` endpoint when
    no socket was inherited; a traceback at start says nothing useful.
    """
    try:
        serverFromString(reactor, endpoint)
    except (IndexError, KeyError, ValueError) as e:
        if endpoint.startswith("systemd:"):
            reason = (
                "no socket inherited from systemd (LISTEN_FDS, LISTEN_FDNAMES);"
                " start oaproxy through oaproxy.socket"
            )
        else:
            reason = str(e) or type(e).__name__
        raise ConfigError(path, None, "listen", f"{endpoint}: {reason}") from None


class Listeners:
    """One ``strports`` child service of ``parent`` per endpoint, all serving ``site``.

    A worker (``oaproxy.workers``) is handed its parent's sockets,
    ``inherited`` by endpoint: it adopts those instead of binding them, and
    keeps them across reloads.
    """

    log = Logger()

    def __init__(
        self,
        parent: MultiService,
        site: Site,
        reactor: Any,
        inherited: Mapping[str, InheritedListener] | None = None,
    ) -> None:
        self._parent = parent
        self._site = site
        self._reactor = reactor
        self._inherited = dict(inherited or {})
        self.services: dict[str, IService] = {}

    def __iter__(self) -> Iterator[str]:
        return iter(self.services)

    def add(self, endpoint: str) -> None:
        """Listen on ``endpoint``; while the parent runs, it binds now or raises."""
        self.services[endpoint] = self._bind(endpoint)

    def _bind(self, endpoint: str) -> IService:
        inherited = self._inherited.get(endpoint)
        listener: IService
        if inherited is not None:
            listener = StreamServerEndpointService(inherited.endpoint(self._reactor), self._site)
        else:
            listener = strports.service(endpoint, self._site, reactor=self._reactor)
        try:
            listener.setServiceParent(self._parent)
        except Exception:
            # addService keeps a child whose start failed: take it back out.
            listener.disownServiceParent()
            raise
        return listener

    async def replace(self, wanted: tuple[str, ...]) -> None:
        """Bind the new listeners first; only when all bound, close the old."""
        if self._inherited and set(wanted) != set(self.services):
            # The sockets are the parent's, bound for all the workers at once.
            self.log.error(
                "reload: listen changed, but a worker keeps the listeners its parent"
                " bound ({endpoints}); restart oaproxy to listen elsewhere",
                endpoints=", ".join(self.services),
            )
            return
        added: dict[str, IService] = {}
        for endpoint in wanted:
            if endpoint in self.services:
                continue
            try:
                added[endpoint] = self._bind(endpoint)
            except Exception as e:  # noqa: BLE001 - a reload must not stop the daemon
                self.log.error(
                    "reload: cannot listen on {endpoint}: {error}; the listeners stay as they were",
                    endpoint=endpoint,
                    error=str(e),
                )
                await settle([service.disownServiceParent() for service in added.values()])
                return
        gone = [endpoint for endpoint in self.services if endpoint not in wanted]
        await settle([self.services.pop(endpoint).disownServiceParent() for endpoint in gone])
        self.services.update(added)

    async def close(self) -> None:
        """Stop accepting connections (those open stay open)."""
        services, self.services = self.services, {}
        await settle([service.disownServiceParent() for service in services.values()])


async def settle(stopping: list[Any]) -> None:
    """Wait for services to stop, whatever each stop's outcome."""
    pending = [d for d in stopping if isinstance(d, Deferred)]
    if pending:
        await DeferredList(pending, consumeErrors=True)
