"""The daemon: one ``MultiService`` owning the upstream pool, the listeners,
the requests in flight, and the current ``Generation`` (what the config
makes: see ``oaproxy.generation``).

- SIGHUP re-reads the config: a whole new generation is built first (an
  invalid config, or a part that cannot be made, is refused with a log line
  and the old one stays), then swapped in: new requests use it at once,
  requests in flight finish on the old one. Listeners, sinks, alert channels
  and the log file that changed are replaced.
- The SQL store's upstreams and keys (``oaproxy.admin``) are overlaid on the
  file: a change there (the admin API's, at once; the CLI's or another
  process's, within ``store_poll_interval`` seconds) builds and swaps a
  generation the same way, and so does a SIGHUP, which reads both again.
- Stopping (SIGTERM) stops accepting first, lets requests and streams in
  flight finish for up to ``shutdown_timeout`` seconds, then flushes the
  record sinks and closes the upstream pool.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Mapping
from typing import Any

from twisted.application.service import IService, MultiService
from twisted.internet.defer import Deferred, DeferredLock, ensureDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from oaproxy.admin.follower import StoreFollower, read_store_once
from oaproxy.admin.overlay import overlay
from oaproxy.admin.resource import AdminResource
from oaproxy.admin.sealing import Sealer
from oaproxy.admin.stored import EMPTY, StoreSnapshot
from oaproxy.config import DBTYPES, Config, ConfigError, check_listeners, load_config
from oaproxy.descriptors import raise_descriptor_limit
from oaproxy.generation import Generation, Shared, build_generation, known_models, upstream_names
from oaproxy.heap import freeze_heap
from oaproxy.listeners import Listeners, check_endpoint, settle
from oaproxy.outbound import alert_agents, upstream_agents, upstream_pool
from oaproxy.sinks import QueuedSink
from oaproxy.summary import log_summary
from oaproxy.web import ProxySite
from oaproxy.workers import InheritedListener


class ProxyService(MultiService):
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
        inherited: Mapping[str, InheritedListener] | None = None,
        freeze: bool = False,
    ) -> None:
        """``config`` is the file's; ``stored``, what its store held at start;
        ``inherited``, a worker's sockets (``oaproxy.workers``); ``freeze``:
        ``gc.freeze`` after start and each swap (``oaproxy.heap``)."""
        super().__init__()
        self._reactor = reactor
        self._listen_override = tuple(listen)
        self._signals = signals
        self._freeze = freeze
        self._previous_hup: Any = None
        self.pool = upstream_pool(reactor)
        running = overlay(config, stored, Sealer.from_config(config))
        self.shared = Shared.create(
            reactor,
            running,
            agents=upstream_agents(self.pool),
            fresh_agents=upstream_agents(self.pool, fresh=True),
            alert_agents=alert_agents(reactor),
            environ=os.environ if environ is None else environ,
        )
        # The file and the store apart, as the admin API shows them; the
        # generation runs the two together.
        self.file_config = config
        self.stored = stored
        # Builds and swaps one generation at a time (a SIGHUP, a store change).
        self._swapping = DeferredLock()
        self.admin = AdminResource(self)
        self.generation = build_generation(running, self.shared, admin=self.admin)
        self.store: StoreFollower | None = None
        self._follow(config, stored)
        # More client connections, and never EMFILE under them (see oaproxy.descriptors).
        raise_descriptor_limit()
        self.site = ProxySite(self.generation.root, running, self.shared.metrics, reactor=reactor)
        # Nothing runs yet, so nothing is waited for: done at once.
        failed: list[Failure] = []
        ensureDeferred(self._adopt(None, self.generation)).addErrback(failed.append)
        if failed:
            failed[0].raiseException()
        self.listeners = Listeners(self, self.site, reactor, inherited)
        for endpoint in self._listen_for(config):
            self.listeners.add(endpoint)

    @property
    def config(self) -> Config:
        return self.generation.config

    @property
    def sinks(self) -> Mapping[str, QueuedSink]:
        return self.generation.sinks

    def _follow(self, config: Config, stored: StoreSnapshot) -> None:
        """Follow ``config``'s SQL store, unless that one is followed already."""
        store = self.store
        if store is not None and (store.dbtype, store.dbaddr) == (config.dbtype, config.dbaddr):
            store.follow_every(config.store_poll_interval)
            store.now_in_use(stored.version)
            return
        if store is not None:
            store.disownServiceParent()
        self.store = None
        if config.dbtype in DBTYPES:
            self.store = StoreFollower(
                config.dbtype,
                config.dbaddr,
                self._reactor,
                interval=config.store_poll_interval,
                stored=stored,
                apply=self._apply_stored,
            )
            self.store.setServiceParent(self)

    def _listen_for(self, config: Config) -> tuple[str, ...]:
        return self._listen_override or config.listen

    def startService(self) -> None:
        super().startService()
        if self._signals:
            self._previous_hup = signal.signal(signal.SIGHUP, self._on_sighup)
        log_summary(self.log, "oaproxy started", self.generation, self.listeners)
        self._freeze_heap()

    # -- reload ----------------------------------------------------------------

    def _on_sighup(self, signum: int, frame: Any) -> None:
        self._reactor.callFromThread(self._reload_logged)

    def _reload_logged(self) -> None:
        self.reload().addErrback(lambda failure: self.log.failure("reload failed", failure=failure))

    def reload(self) -> Deferred[bool]:
        """Re-read the config file; fires True when the new config is in use."""
        return ensureDeferred(self._reload())

    async def _reload(self) -> bool:
        await self._swapping.acquire()
        try:
            return await self._reload_file()
        finally:
            self._swapping.release()

    async def _reload_file(self) -> bool:
        path = self.config.path
        try:
            config = load_config(path, self.shared.environ)
            if self._listen_override:
                check_listeners(config, self._listen_override, key="--listen")
            for endpoint in self._listen_for(config):
                if endpoint not in self.listeners.services:
                    check_endpoint(self._reactor, endpoint, config.path)
            sealer = Sealer.from_config(config)
            stored = await self._read_store(config)
            # Everything the new config makes is made before anything is
            # swapped: a failure here leaves the running config untouched.
            new = build_generation(
                overlay(config, stored, sealer),
                self.shared,
                previous=self.generation,
                admin=self.admin,
            )
        except ConfigError as e:
            self.log.error("reload refused, the running config stays: {error}", error=str(e))
            return False
        except OSError as e:
            self.log.error(
                "reload refused, the running config stays: {path}: {error}",
                path=path,
                error=e.strerror,
            )
            return False
        except Exception:  # noqa: BLE001 - a reload must not stop the daemon
            self.log.failure("reload refused, the running config stays")
            return False
        self.file_config, self.stored = config, stored
        self._follow(config, stored)
        await self._swap(new)
        await self.listeners.replace(self._listen_for(config))
        log_summary(self.log, "config reloaded", self.generation, self.listeners)
        return True

    async def _read_store(self, config: Config) -> StoreSnapshot:
        """What ``config``'s store holds now (its follower reads it)."""
        store = self.store
        if config.dbtype not in DBTYPES:
            return EMPTY
        if store is not None and (store.dbtype, store.dbaddr) == (config.dbtype, config.dbaddr):
            return await store.read()
        # Another store (dbaddr changed): followed only once the reload is done.
        return await read_store_once(config.dbtype, config.dbaddr, self._reactor)

    async def _apply_stored(self, follower: StoreFollower, stored: StoreSnapshot) -> bool:
        """Run the config the file and ``stored`` make; False when refused."""
        await self._swapping.acquire()
        try:
            if follower is not self.store:
                # Read from a store a reload has stopped following meanwhile.
                return False
            config = self.file_config
            try:
                new = build_generation(
                    overlay(config, stored, Sealer.from_config(config)),
                    self.shared,
                    previous=self.generation,
                    admin=self.admin,
                )
            except ConfigError as e:
                self.log.error(
                    "store change refused, the running config stays: {error}", error=str(e)
                )
                return False
            except Exception:  # noqa: BLE001 - a store change must not stop the daemon
                self.log.failure("store change refused, the running config stays")
                return False
            self.log.info(
                "store version {version} applied: {changes}",
                version=stored.version,
                changes=stored.changes_since(self.stored),
            )
            self.stored = stored
            await self._swap(new)
            log_summary(self.log, "store changes applied", self.generation, self.listeners)
            return True
        finally:
            self._swapping.release()

    async def _swap(self, new: Generation) -> None:
        old, self.generation = self.generation, new
        self.shared.metrics.update_labels(known_models(new.config), upstream_names(new.config))
        self.site.serve(new.root, new.config)
        await self._adopt(old, new)
        self._freeze_heap()

    def _freeze_heap(self) -> None:
        if self._freeze:
            freeze_heap()

    async def _adopt(self, old: Generation | None, new: Generation) -> None:
        """Run ``new``'s services in place of those of ``old`` that differ."""
        shared = self.shared
        if old is None or new.log_file is not old.log_file:
            await self._replace(old.log_file if old else None, None)
            if new.log_file is not None:
                new.log_file.setServiceParent(self)
                # The first child: children stop in reverse order, so it
                # sees the others' last words.
                self.services.remove(new.log_file)
                self.services.insert(0, new.log_file)
        await self._replace(old.notifier if old else None, new.notifier)
        await self._replace(old.shared_redis if old else None, new.shared_redis)
        if old is None or new.sinks is not old.sinks:
            # The old sinks keep observing until they have stopped (records
            # that come meanwhile are queued or spooled by them); the new ones
            # read the spool at their start, so none is written by two at once.
            for name, sink in (old.sinks if old else {}).items():
                await settle([sink.disownServiceParent()])
                shared.records.remove_observer(sink.observer)
                shared.metrics.remove_sink(name)
            for name, sink in new.sinks.items():
                sink.setServiceParent(self)
                shared.records.add_observer(sink.observer)
                shared.metrics.add_sink(name, sink)
        shared.readiness.configure(upstream_names(new.config), new.sinks)
        shared.recent_attempts.keep_only(
            [u.name for u in (*new.config.upstreams, *new.config.disabled_upstreams)]
        )

    async def _replace(self, old: IService | None, new: IService | None) -> None:
        """Start ``new``, then stop ``old``, unless they are one."""
        if new is old:
            return
        if new is not None:
            new.setServiceParent(self)
        if old is not None:
            await settle([old.disownServiceParent()])

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
