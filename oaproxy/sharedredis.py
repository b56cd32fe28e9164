"""The top-level ``redis:`` as the place for state that several oaproxy
processes (on one machine or many) share: limits, budgets, the response
cache, circuit breakers.

Every key starts with ``redis_prefix`` and never contains a client key.
``SharedRedis.run`` runs a Lua script in one round trip (``EVALSHA``, and
``EVAL`` once when the server does not know the script yet), so every
check-and-count is one atomic step on the server. While Redis is down,
calls fail at once with ``RedisUnavailable`` instead of waiting for a
connection: the caller decides what that means (serve and count the
failure, or refuse).
"""

from __future__ import annotations

import hashlib
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, ensureDeferred, fail
from twisted.internet.endpoints import HostnameEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure

from oaproxy.sinks.redis import RedisAddress


class RedisUnavailable(Exception):
    """No connection to the shared Redis right now."""


class LuaScript:
    """A Lua script with its SHA-1, as ``EVALSHA`` names it."""

    __slots__ = ("sha", "source")

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode("utf-8")).hexdigest()


class SharedRedis(Service):
    """A reconnecting connection to the shared Redis, started and stopped
    with the daemon (and replaced on a reload that changes ``redis:``)."""

    log = Logger()

    def __init__(
        self, url: str, prefix: str, reactor: Any, *, connect_timeout: float = 5.0
    ) -> None:
        self.address = RedisAddress.from_url(url)
        self.prefix = prefix
        self._reactor = reactor
        self._connect_timeout = connect_timeout
        self._factory: Any = None

    def key(self, *parts: str) -> str:
        """A key of ours: the prefix, then ``parts`` joined by ``:``."""
        return self.prefix + ":".join(parts)

    @property
    def connected(self) -> bool:
        return self._factory is not None and bool(self._factory.size)

    def startService(self) -> None:
        super().startService()
        # Imported here: txredisapi installs the global reactor on import.
        import txredisapi

        address = self.address
        factory = txredisapi.RedisFactory(
            f"{address.host}:{address.port}",
            address.db,
            1,
            isLazy=True,
            handler=txredisapi.ConnectionHandler,
            password=address.password,
            username=address.username,
        )
        factory.reconnect = True
        # Said once: when the first connection is up (what limits and the
        # cache wait for), or why there will be none (a refused AUTH/SELECT).
        factory.deferred.addCallbacks(self._connected, self._refused)
        # Reconnect within a few seconds of Redis coming back.
        factory.maxDelay = 5
        factory.startConnecting(
            HostnameEndpoint(
                self._reactor, address.host, address.port, timeout=self._connect_timeout
            )
        )
        self._factory = factory

    def _connected(self, handler: object) -> None:
        self.log.info(
            "shared Redis connected at {host}:{port}",
            host=self.address.host,
            port=self.address.port,
        )

    def _refused(self, failure: Failure) -> None:
        self.log.error(
            "shared Redis at {host}:{port} refused the connection: {why}",
            host=self.address.host,
            port=self.address.port,
            why=failure.getErrorMessage(),
        )

    def stopService(self) -> Deferred[object] | None:
        super().stopService()
        factory, self._factory = self._factory, None
        if factory is None:
            return None
        stopped: Deferred[object] = factory.disconnect()
        return stopped

    def command(self, *arguments: object) -> Deferred[Any]:
        """One Redis command; fails at once with ``RedisUnavailable`` when not connected."""
        if not self.connected:
            return fail(RedisUnavailable("redis is not connected"))
        result: Deferred[Any] = self._factory.handler.execute_command(*arguments)
        return result

    def run(self, script: LuaScript, keys: list[str], arguments: list[object]) -> Deferred[Any]:
        """Run ``script`` atomically on the server with ``keys`` and ``arguments``."""
        return ensureDeferred(self._run(script, keys, arguments))

    async def _run(self, script: LuaScript, keys: list[str], arguments: list[object]) -> Any:
        try:
            return await self.command("EVALSHA", script.sha, len(keys), *keys, *arguments)
        except Exception as e:
            if "NOSCRIPT" not in str(e):
                raise
        return await self.command("EVAL", script.source, len(keys), *keys, *arguments)
