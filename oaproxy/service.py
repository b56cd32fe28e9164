"""The daemon: one ``MultiService`` owning listeners, the upstream pool and the runtime."""

from __future__ import annotations

import time
from typing import Any

from twisted.application import strports
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.task import Cooperator
from twisted.logger import Logger
from twisted.web.client import Agent, HTTPConnectionPool, _HTTP11ClientFactory
from twisted.web.server import Request

from oaproxy.config import Config
from oaproxy.forward import Exchange, Forwarder
from oaproxy.inspection import inspect_request
from oaproxy.records import RecordEmitter, RecordMaker
from oaproxy.routing import Router
from oaproxy.web import ProxyResource, ProxySite, RootResource, Runtime

# A proxy talks to few hosts over many concurrent requests.
MAX_PERSISTENT_PER_HOST = 64
# Below the idle timeout of common upstreams and load balancers (60 s), so a
# connection is dropped by us before the far end drops it under a request.
CACHED_CONNECTION_TIMEOUT = 50


class _QuietClientFactory(_HTTP11ClientFactory):
    # One log line per upstream connection is noise in a proxy's journal.
    noisy = False


class ProxyPool(HTTPConnectionPool):
    _factory = _QuietClientFactory
    # Whether the last getConnection() handed out a cached connection; the
    # forwarder reads it right after Agent.request(), which calls us at once.
    reused = False

    def getConnection(self, key: Any, endpoint: Any) -> Any:
        self.reused = bool(self._connections.get(key))
        return super().getConnection(key, endpoint)


class ProxyService(MultiService):
    log = Logger()

    def __init__(self, config: Config, reactor: Any, listen: tuple[str, ...]) -> None:
        super().__init__()
        self._reactor = reactor
        self.pool = ProxyPool(reactor, persistent=True)
        self.pool.maxPersistentPerHost = MAX_PERSISTENT_PER_HOST
        self.pool.cachedConnectionTimeout = CACHED_CONNECTION_TIMEOUT
        # Agent's default TLS policy verifies certificates (service-identity)
        # and it follows no redirects.
        self.agent = Agent(reactor, pool=self.pool)
        # For the one retry after a stale pooled connection: a new connection.
        self.fresh_agent = Agent(reactor, pool=ProxyPool(reactor, persistent=False))
        self.cooperator = Cooperator(scheduler=lambda work: reactor.callLater(0, work))
        self.records = RecordEmitter()
        self.runtime = self.build_runtime(config)
        root = RootResource(ProxyResource(lambda: self.runtime, reactor))
        self.site = ProxySite(root, lambda: self.runtime, reactor=reactor)
        for endpoint in listen:
            strports.service(endpoint, self.site, reactor=reactor).setServiceParent(self)

    def build_runtime(self, config: Config) -> Runtime:
        records = RecordMaker(config)
        forwarder = Forwarder(
            self._reactor,
            self.agent,
            self.fresh_agent,
            self.cooperator,
            stream_idle_timeout=config.stream_idle_timeout,
            on_event=records.stream_observer,
            pooled=lambda: self.pool.reused,
        )

        def finished(exchange: Exchange, request: Request) -> None:
            self.records.emit(records.make(exchange, request))

        return Runtime(
            config=config,
            router=Router(config),
            forwarder=forwarder,
            finished=finished,
            inspect=inspect_request,
            wall_clock=time.time,
        )

    def stopService(self) -> Deferred[Any]:
        d = Deferred.fromCoroutine(self._stop())
        return d

    async def _stop(self) -> None:
        await super().stopService()
        self.cooperator.stop()
        await DeferredList([self.pool.closeCachedConnections()])
