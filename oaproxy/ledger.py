"""The requests in flight, for a graceful stop: wait for them, or cut them."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, cast

from twisted.internet.defer import Deferred, TimeoutError, succeed
from twisted.internet.interfaces import IReactorTime, ITCPTransport
from twisted.logger import Logger
from twisted.web.server import Request

from oaproxy.exchange import Exchange
from oaproxy.pipeline import Observer
from oaproxy.record import Record

# After shutdown_timeout, how long the requests that were cut get to record.
CUT_GRACE = 2.0


class RequestLedger(Observer):
    """Follows every forwarded request from its start to its record.

    It outlives reloads: requests in flight on an old config are counted
    until they finish, whatever config the daemon runs by then.
    """

    log = Logger()

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self._inflight: dict[Exchange, Request] = {}
        self._idle: list[Deferred[None]] = []

    def __len__(self) -> int:
        return len(self._inflight)

    def __iter__(self) -> Iterator[Exchange]:
        return iter(self._inflight)

    def request_started(self, exchange: Exchange, request: Request) -> None:
        self._inflight[exchange] = request

    def request_finished(self, exchange: Exchange, record: Record | None) -> None:
        self._inflight.pop(exchange, None)
        if not self._inflight:
            waiting, self._idle = self._idle, []
            for d in waiting:
                d.callback(None)

    def wait_idle(self, timeout: float) -> Deferred[bool]:
        """Fires True once nothing is in flight, False after ``timeout`` seconds."""
        if not self._inflight:
            return succeed(True)
        d: Deferred[None] = Deferred()
        self._idle.append(d)

        def timed_out(failure: Any) -> bool:
            failure.trap(TimeoutError)
            if d in self._idle:
                self._idle.remove(d)
            return False

        return d.addTimeout(timeout, self._clock).addCallbacks(lambda _: True, timed_out)

    async def drain(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for the requests in flight; then cut
        those still running, and give them a moment to record."""
        if not self._inflight:
            return
        self.log.info(
            "stopping: waiting up to {timeout}s for {count} requests in flight",
            timeout=timeout,
            count=len(self._inflight),
        )
        if await self.wait_idle(timeout):
            return
        self.log.warn(
            "stopping: cutting {count} requests still in flight after shutdown_timeout",
            count=len(self._inflight),
        )
        self.cut_all()
        await self.wait_idle(CUT_GRACE)

    def cut_all(self) -> None:
        """Close every connection still in flight; their records say ``shutdown``."""
        for exchange, request in list(self._inflight.items()):
            exchange.cut_at_shutdown()
            if request.channel is not None and request.channel.transport is not None:
                cast(ITCPTransport, request.channel.transport).abortConnection()
