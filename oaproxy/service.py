"""The daemon: one ``MultiService`` owning listeners, the upstream pool, the
record sinks, the notifier, and the ``Runtime`` that requests read.

- SIGHUP re-reads the config: new requests use the new one at once, requests
  in flight finish on the old one; an invalid config is refused with a log
  line and the old one stays. Changed listeners, sinks and alert channels
  are replaced.
- Stopping (SIGTERM) stops accepting first, lets requests and streams in
  flight finish for up to ``shutdown_timeout`` seconds, then flushes the
  record sinks and closes the upstream pool.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Mapping
from typing import Any, cast

from twisted.application import strports
from twisted.application.service import IService, MultiService
from twisted.internet.defer import Deferred, DeferredList, TimeoutError, ensureDeferred, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import ITCPTransport
from twisted.internet.task import Cooperator
from twisted.logger import Logger
from twisted.web.server import Request

from oaproxy.alerts import Notifier, alert_from_record
from oaproxy.config import Config, ConfigError, check_listeners, load_config
from oaproxy.forward import Exchange, Forwarder
from oaproxy.health import Readiness, ReadyResource
from oaproxy.inspection import inspect_request
from oaproxy.logfile import JSONLogFile
from oaproxy.metrics import Metrics, MetricsResource
from oaproxy.outbound import alert_agent, upstream_agent, upstream_pool
from oaproxy.records import RecordEmitter, RecordMaker
from oaproxy.routing import Router
from oaproxy.sinks import FileSink, QueuedSink, SQLSink
from oaproxy.summary import public_url, summary
from oaproxy.web import ProxyResource, ProxySite, RootResource, Runtime

# After shutdown_timeout, how long the requests that were cut get to record.
CUT_GRACE = 2.0
CUT_AT_SHUTDOWN = "cut at shutdown"


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


def known_models(config: Config) -> list[str]:
    """Model names worth their own metrics label."""
    names = [name for u in config.upstreams for name in u.allow if not name.startswith("/")]
    return names + list(config.prices)


def usage_prefix(redis_key: str) -> str:
    """Where the daily usage counters go: beside the records stream
    (``oaproxy:records`` -> ``oaproxy:usage``), so that deployments sharing a
    Redis with their own keys keep their own counters."""
    namespace, colon, _ = redis_key.rpartition(":")
    return f"{namespace}:usage" if colon else f"{redis_key}:usage"


def _sink_settings(config: Config) -> tuple[Any, ...]:
    """What the sinks are made of (not what records keep: that is the runtime's)."""
    policy = config.records
    return (
        config.dbtype,
        config.dbaddr,
        config.redis,
        policy.file,
        policy.rotate,
        policy.redis_key,
        policy.redis_maxlen,
        policy.spool_dir,
        policy.queue_size,
    )


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
        self._environ = os.environ if environ is None else environ
        self.pool = upstream_pool(reactor)
        self.agent = upstream_agent(self.pool)
        # For the one retry after a stale pooled connection: a new connection.
        self.fresh_agent = upstream_agent(self.pool, fresh=True)
        self.alert_agent = alert_agent(reactor)
        self.cooperator = Cooperator(scheduler=lambda work: reactor.callLater(0, work))
        self.records = RecordEmitter()
        self.metrics = Metrics(known_models(config), [u.name for u in config.upstreams])
        self.readiness = Readiness(reactor)
        self._metrics_resource = MetricsResource(self.metrics, config.metrics_key)
        self.listeners: dict[str, IService] = {}
        self._inflight: dict[Exchange, Request] = {}
        self._idle: list[Deferred[None]] = []
        self._log_file: JSONLogFile | None = None
        self._previous_hup: Any = None
        self.config = config
        self.runtime = self.build_runtime(config)
        root = RootResource(
            ProxyResource(lambda: self.runtime, reactor),
            metrics=self._metrics_resource,
            ready=ReadyResource(self.readiness.state),
        )
        self.site = ProxySite(root, lambda: self.runtime, reactor=reactor)
        self.sinks: dict[str, QueuedSink] = self._make_sinks(config)
        # Observed before they start: they queue until then.
        self._observe(self.sinks)
        self.notifier = self._make_notifier(config)
        self.readiness.configure([u.name for u in config.upstreams], self.sinks)
        for endpoint in self._listen_for(config):
            self.listeners[endpoint] = self._add_listener(endpoint)

    # -- what one config makes ------------------------------------------------

    def build_runtime(self, config: Config) -> Runtime:
        records = RecordMaker(config)
        forwarder = Forwarder(
            self._reactor,
            self.agent,
            self.fresh_agent,
            self.cooperator,
            stream_idle_timeout=config.stream_idle_timeout,
            on_event=records.stream_observer,
        )

        def finished(exchange: Exchange, request: Request) -> None:
            self._finished(records, exchange, request)

        return Runtime(
            config=config,
            router=Router(config),
            forwarder=forwarder,
            started=self._started,
            finished=finished,
            inspect=inspect_request,
            wall_clock=time.time,
        )

    def _started(self, exchange: Exchange, request: Request) -> None:
        exchange.active = self.metrics.request_started(exchange.call.stream)
        self._inflight[exchange] = request

    def _finished(self, maker: RecordMaker, exchange: Exchange, request: Request) -> None:
        if exchange.error == CUT_AT_SHUTDOWN:
            # The client did not go away: the proxy cut it off.
            exchange.outcome = "shutdown"
        try:
            record = maker.make(exchange, request)
            self.records.emit(record)
            self.metrics.request_finished(record, exchange.active)
            self.readiness.observe(record)
            alert = alert_from_record(record)
            if alert is not None:
                self.notifier.alert(alert)
        except Exception:  # noqa: BLE001 - the client has its answer; only bookkeeping failed
            self.log.failure("recording a finished request failed")
        finally:
            if exchange.active is not None:
                exchange.active.finish()  # idempotent; exact gauges even after a failure above
            self._inflight.pop(exchange, None)
            if not self._inflight:
                waiting, self._idle = self._idle, []
                for d in waiting:
                    d.callback(None)

    def _listen_for(self, config: Config) -> tuple[str, ...]:
        return self._listen_override or config.listen

    def _add_listener(self, endpoint: str) -> IService:
        """A listener child; when running, it binds now or raises."""
        listener = strports.service(endpoint, self.site, reactor=self._reactor)
        try:
            listener.setServiceParent(self)
        except Exception:
            # addService keeps a child whose start failed: take it back out.
            listener.disownServiceParent()
            raise
        return listener

    def _make_sinks(self, config: Config) -> dict[str, QueuedSink]:
        """The sinks a config asks for, not yet observing nor started."""
        policy = config.records
        common: dict[str, Any] = {"spool_dir": policy.spool_dir, "queue_size": policy.queue_size}
        sinks: dict[str, QueuedSink] = {}
        if config.dbtype != "none":
            sinks["sql"] = SQLSink(config.dbtype, config.dbaddr, reactor=self._reactor, **common)
        if policy.file:
            sinks["file"] = FileSink(
                policy.file, rotate=policy.rotate, clock=self._reactor, **common
            )
        if config.redis:
            # Imported here: txredisapi installs the global reactor on import.
            from oaproxy.sinks.redis import RedisSink

            sinks["redis"] = RedisSink(
                config.redis,
                key=policy.redis_key,
                maxlen=policy.redis_maxlen,
                usage_prefix=usage_prefix(policy.redis_key),
                reactor=self._reactor,
                **common,
            )
        return sinks

    def _observe(self, sinks: dict[str, QueuedSink]) -> None:
        for name, sink in sinks.items():
            self.records.add_observer(sink.observer)
            self.metrics.add_sink(name, sink)

    async def _swap_sinks(self, sinks: dict[str, QueuedSink]) -> None:
        """Stop the old sinks, then start the new ones.

        The old ones keep observing until they have stopped (records that come
        meanwhile are queued or spooled by them); the new ones read the spool
        at their start, so none is written by two sinks at once.
        """
        old = self.sinks
        await _settle([sink.disownServiceParent() for sink in old.values()])
        for name, sink in old.items():
            self.records.remove_observer(sink.observer)
            self.metrics.remove_sink(name)
        self.sinks = sinks
        for sink in sinks.values():
            sink.setServiceParent(self)
        self._observe(sinks)
        self.readiness.configure([u.name for u in self.config.upstreams], self.sinks)

    def _make_notifier(self, config: Config) -> Notifier:
        return Notifier.from_config(
            config.notify,
            self.alert_agent,
            self._reactor,
            config.hostname,
            environ=self._environ,
            on_result=self.metrics.alert_sent,
        )

    # -- start, reload, stop ---------------------------------------------------

    def startService(self) -> None:
        self._open_log_file(self.config)
        for sink in self.sinks.values():
            sink.setServiceParent(self)
        self.notifier.setServiceParent(self)
        super().startService()
        if self._signals:
            self._previous_hup = signal.signal(signal.SIGHUP, self._on_sighup)
        self._log_summary("oaproxy started")

    def _on_sighup(self, signum: int, frame: Any) -> None:
        self._reactor.callFromThread(self._reload_logged)

    def _reload_logged(self) -> None:
        self.reload().addErrback(lambda failure: self.log.failure("reload failed", failure=failure))

    def reload(self) -> Deferred[bool]:
        """Re-read the config file; fires True when the new config is in use."""
        return ensureDeferred(self._reload())

    async def _reload(self) -> bool:
        path = self.config.path
        old = self.config
        try:
            config = load_config(path, self._environ)
            if self._listen_override:
                check_listeners(config, self._listen_override, key="--listen")
            for endpoint in self._listen_for(config):
                if endpoint not in self.listeners:
                    check_endpoint(self._reactor, endpoint, config.path)
            # Everything the new config makes is made before anything is
            # swapped: a failure here leaves the running config untouched.
            runtime = self.build_runtime(config)
            sinks = None
            if _sink_settings(old) != _sink_settings(config):
                sinks = self._make_sinks(config)
            notifier = None
            if (old.notify, old.hostname) != (config.notify, config.hostname):
                notifier = self._make_notifier(config)
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
        self.metrics.update_labels(known_models(config), [u.name for u in config.upstreams])
        self._metrics_resource.metrics_key = config.metrics_key
        self.config = config
        self.runtime = runtime
        self.readiness.configure([u.name for u in config.upstreams], self.sinks)
        if notifier is not None:
            retired, self.notifier = self.notifier, notifier
            notifier.setServiceParent(self)
            await _settle([retired.disownServiceParent()])
        if sinks is not None:
            await self._swap_sinks(sinks)
        await self._replace_listeners(self._listen_for(config))
        if old.log_file != config.log_file:
            self._close_log_file()
            self._open_log_file(config)
        self._log_summary("config reloaded")
        return True

    async def _replace_listeners(self, wanted: tuple[str, ...]) -> None:
        """Bind the new listeners first; only when all bound, close the old."""
        added: dict[str, IService] = {}
        for endpoint in wanted:
            if endpoint in self.listeners:
                continue
            try:
                added[endpoint] = self._add_listener(endpoint)
            except Exception as e:  # noqa: BLE001 - a reload must not stop the daemon
                self.log.error(
                    "reload: cannot listen on {endpoint}: {error}; the listeners stay as they were",
                    endpoint=endpoint,
                    error=str(e),
                )
                await _settle([listener.disownServiceParent() for listener in added.values()])
                return
        gone = [endpoint for endpoint in self.listeners if endpoint not in wanted]
        await _settle([self.listeners.pop(endpoint).disownServiceParent() for endpoint in gone])
        self.listeners.update(added)

    def stopService(self) -> Deferred[None]:
        return ensureDeferred(self._stop())

    async def _stop(self) -> None:
        if self._signals and self._previous_hup is not None:
            signal.signal(signal.SIGHUP, self._previous_hup)
        # Stop accepting first, then let what is in flight finish.
        await _settle([listener.disownServiceParent() for listener in self.listeners.values()])
        self.listeners = {}
        if self._inflight:
            timeout = self.config.shutdown_timeout
            self.log.info(
                "stopping: waiting up to {timeout}s for {count} requests in flight",
                timeout=timeout,
                count=len(self._inflight),
            )
            if not await self._wait_idle(timeout):
                self._cut_inflight()
                await self._wait_idle(CUT_GRACE)
        await super().stopService()
        self.cooperator.stop()
        await self.pool.closeCachedConnections()
        self._close_log_file()

    def _wait_idle(self, timeout: float) -> Deferred[bool]:
        if not self._inflight:
            return succeed(True)
        d: Deferred[None] = Deferred()
        self._idle.append(d)

        def timed_out(failure: Any) -> bool:
            failure.trap(TimeoutError)
            if d in self._idle:
                self._idle.remove(d)
            return False

        return d.addTimeout(timeout, self._reactor).addCallbacks(lambda _: True, timed_out)

    def _cut_inflight(self) -> None:
        self.log.warn(
            "stopping: cutting {count} requests still in flight after shutdown_timeout",
            count=len(self._inflight),
        )
        for exchange, request in list(self._inflight.items()):
            exchange.error = CUT_AT_SHUTDOWN
            if request.channel is not None and request.channel.transport is not None:
                cast(ITCPTransport, request.channel.transport).abortConnection()

    # -- logging ---------------------------------------------------------------

    def _open_log_file(self, config: Config) -> None:
        if config.log_file:
            self._log_file = JSONLogFile(config.log_file, self._reactor)
            self._log_file.startService()

    def _close_log_file(self) -> None:
        if self._log_file is not None:
            self._log_file.stopService()
            self._log_file = None

    def _log_summary(self, headline: str) -> None:
        alerts = [f"{c.name} ({c.host})" for c in self.notifier.channels]
        sinks = []
        where = {
            # A postgres DSN may hold a password; a sqlite path does not.
            "sql": "postgres" if self.config.dbtype == "postgres" else self.config.dbaddr,
            "file": self.config.records.file,
            "redis": public_url(self.config.redis) if self.config.redis else None,
        }
        for name in self.sinks:
            sinks.append(f"{name} ({where[name]})")
        self.log.info(headline)
        for line in summary(self.config, self.listeners, sinks, alerts):
            self.log.info("  {line}", line=line)


async def _settle(stopping: list[Deferred[Any] | None]) -> None:
    """Wait for services to stop, whatever each stop's outcome."""
    pending = [d for d in stopping if isinstance(d, Deferred)]
    if pending:
        await DeferredList(pending, consumeErrors=True)
