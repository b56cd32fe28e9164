"""The daemon: one ``MultiService`` owning the upstream pool, the listeners,
the requests in flight, and the current ``Generation`` (what the config
makes: see ``oaproxy.generation``).

- SIGHUP re-reads the file and its SQL store (``oaproxy.admin``); a store
  change (the admin API's at once, others' within ``store_poll_interval``
  seconds) does the same with the store alone. A whole new generation is
  built first (refused with a log line, the old one stays), then swapped
  in: new requests use it, those in flight finish on the old one.
- Stopping (SIGTERM) stops accepting first, lets requests and streams in
  flight finish for up to ``shutdown_timeout`` seconds, then flushes the
  record sinks and closes the upstream pool.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Awaitable, Mapping
from typing import Any

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, DeferredLock, ensureDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from oaproxy.admin.follower import ConfigSources, StoreFollower
from oaproxy.admin.overlay import running_config
from oaproxy.admin.resource import AdminResource
from oaproxy.admin.stored import EMPTY, StoreSnapshot
from oaproxy.config import Config, ConfigError, check_listeners, load_config
from oaproxy.descriptors import raise_descriptor_limit
from oaproxy.generation import Shared, build_generation, swap_in
from oaproxy.listeners import Listeners, check_endpoint
from oaproxy.outbound import alert_agents, upstream_agents, upstream_pool
from oaproxy.sinks import QueuedSink
from oaproxy.summary import log_summary
from oaproxy.web import ProxySite


class ProxyService(MultiService):
    """The daemon's lifecycle: start, swap generations, stop in order."""

    log = Logger()

    def __init__(
        self,
        config: Config,
        reactor: Any,
        listen: tuple[str, ...] = (),
        *,
        signals: bool = False,
        environ: Mapping[str, str] | None = None,
        stored: StoreSnapshot = EMPTY,
    ) -> None:
        """``config`` is the file's; ``stored``, what its store held at start."""
        super().__init__()
        self._reactor = reactor
        self._listen_override = tuple(listen)
        self._signals = signals
        self._previous_hup: Any = None
        self.pool = upstream_pool(reactor)
        # Builds and swaps one generation at a time (a SIGHUP, a store change).
        self._swapping = DeferredLock()
        self.sources = ConfigSources(config, stored, reactor, apply=self._apply_stored)
        self.sources.setServiceParent(self)
        running = self.sources.combined()
        self.shared = Shared.create(
            reactor,
            running,
            agents=upstream_agents(self.pool),
            fresh_agents=upstream_agents(self.pool, fresh=True),
            alert_agents=alert_agents(reactor),
            environ=os.environ if environ is None else environ,
        )
        self.admin = AdminResource(self)
        self.generation = build_generation(running, self.shared, admin=self.admin)
        # More client connections, and never EMFILE under them (see oaproxy.descriptors).
        raise_descriptor_limit()
        self.site = ProxySite(self.generation.root, running, self.shared.metrics, reactor=reactor)
        # Nothing runs yet, so nothing is waited for: done at once.
        failed: list[Failure] = []
        ensureDeferred(swap_in(self, self.shared, None, self.generation)).addErrback(failed.append)
        if failed:
            failed[0].raiseException()
        self.listeners = Listeners(self, self.site, reactor)
        for endpoint in self._listen_for(config):
            self.listeners.add(endpoint)

    @property
    def config(self) -> Config:
        return self.generation.config

    @property
    def sinks(self) -> Mapping[str, QueuedSink]:
        return self.generation.sinks

    def _listen_for(self, config: Config) -> tuple[str, ...]:
        return self._listen_override or config.listen

    def startService(self) -> None:
        super().startService()
        if self._signals:
            self._previous_hup = signal.signal(signal.SIGHUP, self._on_sighup)
        log_summary(self.log, "oaproxy started", self.generation, self.listeners)

    # -- reload ----------------------------------------------------------------

    def _on_sighup(self, signum: int, frame: Any) -> None:
        self._reactor.callFromThread(self._reload_logged)

    def _reload_logged(self) -> None:
        self.reload().addErrback(lambda failure: self.log.failure("reload failed", failure=failure))

    def reload(self) -> Deferred[bool]:
        """Re-read the config file and its store; fires True when the new config is in use."""
        return ensureDeferred(self._reload())

    async def _reload(self) -> bool:
        async with self._swapping:
            if not await self._rebuild("reload", self._read_file(self.config.path)):
                return False
            await self.listeners.replace(self._listen_for(self.sources.file_config))
            log_summary(self.log, "config reloaded", self.generation, self.listeners)
            return True

    async def _read_file(self, path: str) -> tuple[Config, StoreSnapshot]:
        config = load_config(path, self.shared.environ)
        if self._listen_override:
            check_listeners(config, self._listen_override, key="--listen")
        for endpoint in self._listen_for(config):
            if endpoint not in self.listeners.services:
                check_endpoint(self._reactor, endpoint, config.path)
        return config, await self.sources.read(config)

    async def _apply_stored(self, follower: StoreFollower, stored: StoreSnapshot) -> bool:
        """Run the config the file and ``stored`` make; False when refused."""
        async with self._swapping:
            before = self.sources.stored
            # Not from a store a reload has stopped following meanwhile.
            if follower is not self.sources.store or not await self._rebuild(
                "store change", _given(self.sources.file_config, stored)
            ):
                return False
            self.log.info(
                "store version {version} applied: {changes}",
                version=stored.version,
                changes=stored.changes_since(before),
            )
            log_summary(self.log, "store changes applied", self.generation, self.listeners)
            return True

    async def _rebuild(self, what: str, read: Awaitable[tuple[Config, StoreSnapshot]]) -> bool:
        """Build the generation of the file and store ``read`` gives, then
        swap it in; refused (logged), the running one stays: False."""
        try:
            config, stored = await read
            # Everything the new config makes is made before anything is
            # swapped: a failure here leaves the running config untouched.
            new = build_generation(
                running_config(config, stored),
                self.shared,
                previous=self.generation,
                admin=self.admin,
            )
        except (ConfigError, OSError) as e:
            error = f"{self.config.path}: {e.strerror}" if isinstance(e, OSError) else str(e)
            self.log.error(
                "{what} refused, the running config stays: {error}", what=what, error=error
            )
            return False
        except Exception:  # noqa: BLE001 - a reload must not stop the daemon
            self.log.failure("{what} refused, the running config stays", what=what)
            return False
        self.sources.now_running(config, stored)
        old, self.generation = self.generation, new
        self.site.serve(new.root, new.config)
        await swap_in(self, self.shared, old, new)
        return True

    # -- stop ------------------------------------------------------------------

    def stopService(self) -> Deferred[None]:
        return ensureDeferred(self._stop())

    async def _stop(self) -> None:
        if self._signals and self._previous_hup is not None:
            signal.signal(signal.SIGHUP, self._previous_hup)
        # Stop accepting first, then let what is in flight finish.
        await self.listeners.close()
        await self.shared.ledger.drain(self.config.shutdown_timeout)
        # The remaining children stop in reverse order: the log file last.
        await super().stopService()
        self.shared.cooperator.stop()
        await self.pool.closeCachedConnections()


async def _given(config: Config, stored: StoreSnapshot) -> tuple[Config, StoreSnapshot]:
    return config, stored
