"""The daemon: one ``MultiService`` owning the upstream pool, the listeners,
the requests in flight, and the current ``Generation`` (what the config
makes: see ``oaproxy.generation``).

- SIGHUP re-reads the config: a whole new generation is built first (an
  invalid config, or a part that cannot be made, is refused with a log line
  and the old one stays), then swapped in: new requests use it at once,
  requests in flight finish on the old one. Listeners, sinks, alert channels
  and the log file that changed are replaced.
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
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from oaproxy.config import Config, ConfigError, check_listeners, load_config
from oaproxy.generation import Generation, Shared, build_generation, known_models, upstream_names
from oaproxy.listeners import Listeners, check_endpoint, settle
from oaproxy.outbound import alert_agents, upstream_agents, upstream_pool
from oaproxy.sinks import QueuedSink
from oaproxy.summary import log_summary
from oaproxy.web import ProxySite


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
    ) -> None:
        super().__init__()
        self._reactor = reactor
        self._listen_override = tuple(listen)
        self._signals = signals
        self._previous_hup: Any = None
        self.pool = upstream_pool(reactor)
        self.shared = Shared.create(
            reactor,
            config,
            agents=upstream_agents(self.pool),
            fresh_agents=upstream_agents(self.pool, fresh=True),
            alert_agents=alert_agents(reactor),
            environ=os.environ if environ is None else environ,
        )
        self.generation = build_generation(config, self.shared)
        self.site = ProxySite(self.generation.root, config.max_body_bytes, reactor=reactor)
        # Nothing runs yet, so nothing is waited for: done at once.
        failed: list[Failure] = []
        ensureDeferred(self._adopt(None, self.generation)).addErrback(failed.append)
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
        """Re-read the config file; fires True when the new config is in use."""
        return ensureDeferred(self._reload())

    async def _reload(self) -> bool:
        path = self.config.path
        try:
            config = load_config(path, self.shared.environ)
            if self._listen_override:
                check_listeners(config, self._listen_override, key="--listen")
            for endpoint in self._listen_for(config):
                if endpoint not in self.listeners.services:
                    check_endpoint(self._reactor, endpoint, config.path)
            # Everything the new config makes is made before anything is
            # swapped: a failure here leaves the running config untouched.
            new = build_generation(config, self.shared, previous=self.generation)
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
        await self._swap(new)
        await self.listeners.replace(self._listen_for(config))
        log_summary(self.log, "config reloaded", self.generation, self.listeners)
        return True

    async def _swap(self, new: Generation) -> None:
        old, self.generation = self.generation, new
        self.shared.metrics.update_labels(known_models(new.config), upstream_names(new.config))
        self.site.serve(new.root, new.config.max_body_bytes)
        await self._adopt(old, new)

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
