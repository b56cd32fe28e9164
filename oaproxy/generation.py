"""What one config makes, built in one place: for the daemon, at start and
at each reload, and for the tests, which run the same wiring in memory.

``Shared`` is what outlives a reload (the upstream agents, the record
publisher, metrics, readiness, the in-flight ledger, the limits' counters
in memory, circuit states, upstream load, recent attempts and models
lists); a
``Generation`` is everything one config makes on top of it (router,
forwarder, the request pipeline and its resource tree, sinks, notifier, log
file, cache). A reload builds a whole new generation before anything is
swapped, reusing the previous one's sinks, notifier, shared Redis, log
file and cache where what they are made of did not change: each such part
is made from a settings value (``SinkSettings``, ``NotifySettings``,
``RedisSettings``) holding the config fields of its names, so what a part
reads is exactly what a reload compares.  ``swap_in`` runs a generation's
services and points what outlives a reload (record publisher, metrics,
readiness, recent attempts) at it.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar, cast

import attrs
from attrs import frozen
from twisted.application.service import IService, MultiService
from twisted.internet.task import Cooperator
from twisted.web.resource import Resource

from oaproxy.activity import RecentAttempts
from oaproxy.alerts import Notifier
from oaproxy.balancing import Balancer, LoadFollowing, UpstreamLoad
from oaproxy.bodyrules import form_model_filter
from oaproxy.breaker import Breakers
from oaproxy.cache.lookup import ResponseCache, StreamObserver
from oaproxy.circuits import Circuits
from oaproxy.config import Config, NotifyConfig, RecordsPolicy
from oaproxy.contentfilter import ContentFilter
from oaproxy.cors import CorsPolicy
from oaproxy.forward import Forwarder
from oaproxy.gates import builtin_head_gates
from oaproxy.health import Readiness, ReadyResource
from oaproxy.inspection import Inspector
from oaproxy.iprules import IPRules
from oaproxy.ledger import RequestLedger
from oaproxy.listeners import settle
from oaproxy.logfile import JSONLogFile
from oaproxy.metrics import Metrics
from oaproxy.models import ModelLists, ModelsAnswer
from oaproxy.observers import Alerting, MetricsCounting, ReadinessFollowing, RecordPublishing
from oaproxy.outbound import AgentFor
from oaproxy.pipeline import CandidateFilter, Gate, HeadGate, Observer, Observers, Pipeline
from oaproxy.records import RecordEmitter, RecordMaker
from oaproxy.retries import RetryPolicy
from oaproxy.routing import Router
from oaproxy.scrape import MetricsResource
from oaproxy.sharedredis import SharedRedis
from oaproxy.sinks import FileSink, QueuedSink, SQLSink
from oaproxy.traffic.control import MemoryTraffic, build_traffic
from oaproxy.upstreamclient.proxy import HTTPProxy
from oaproxy.upstreams import UpstreamClients
from oaproxy.web import ProxyResource, RootResource


@frozen
class Shared:
    """What every generation of one daemon uses, and a reload keeps."""

    reactor: Any
    # Each asked for per way out (direct, or a proxy), as each config says.
    agents: AgentFor
    # For the one retry after a stale pooled connection: a new connection.
    fresh_agents: AgentFor
    # Alerts go out on agents of their own, not through the upstream pool.
    alert_agents: AgentFor
    cooperator: Cooperator
    records: RecordEmitter
    metrics: Metrics
    readiness: Readiness
    ledger: RequestLedger
    environ: Mapping[str, str]
    # Wall-clock time for records (the reactor's clock may be a test Clock).
    wall_clock: Callable[[], float]
    # Spreading load needs no cryptographic randomness; tests seed it.
    rng: random.Random
    # The limits' counters of limits.backend: memory.
    traffic: MemoryTraffic
    # Each upstream's circuit: what metrics, /readyz and the log show.
    circuits: Circuits
    # Attempts in flight and latencies, for least_busy and least_latency.
    load: UpstreamLoad
    # Upstreams' own /v1/models answers.
    model_lists: ModelLists
    # Each upstream's attempts of the last five minutes (the admin API's).
    recent_attempts: RecentAttempts

    @classmethod
    def create(
        cls,
        reactor: Any,
        config: Config,
        *,
        agents: AgentFor,
        fresh_agents: AgentFor,
        alert_agents: AgentFor,
        environ: Mapping[str, str],
        wall_clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> Shared:
        circuits = Circuits(reactor)
        metrics = Metrics(known_models(config), upstream_names(config))
        metrics.add_circuits(circuits)
        return cls(
            reactor=reactor,
            agents=agents,
            fresh_agents=fresh_agents,
            alert_agents=alert_agents,
            cooperator=Cooperator(scheduler=lambda work: reactor.callLater(0, work)),
            records=RecordEmitter(),
            metrics=metrics,
            readiness=Readiness(reactor, circuits),
            ledger=RequestLedger(reactor),
            environ=environ,
            wall_clock=wall_clock,
            rng=rng or random.Random(),
            traffic=MemoryTraffic.create(reactor),
            circuits=circuits,
            load=UpstreamLoad(),
            model_lists=ModelLists(reactor),
            recent_attempts=RecentAttempts(reactor),
        )

    def follow(self, generation: Generation) -> None:
        """Point what outlives a reload at ``generation``'s config: the
        metrics' labels, readiness, the upstreams recent attempts are kept for."""
        config = generation.config
        self.metrics.update_labels(known_models(config), upstream_names(config))
        self.readiness.configure(upstream_names(config), generation.sinks)
        self.recent_attempts.keep_only(
            [u.name for u in (*config.upstreams, *config.disabled_upstreams)]
        )


@frozen
class Generation:
    """Everything one config makes; none of it started yet."""

    config: Config
    router: Router
    forwarder: Forwarder
    pipeline: Pipeline
    root: Resource
    sinks: Mapping[str, QueuedSink]
    notifier: Notifier
    log_file: JSONLogFile | None
    # The top-level redis: for state shared between processes; None without one.
    shared_redis: SharedRedis | None
    # None without a cache: section.
    response_cache: ResponseCache | None


def build_generation(
    config: Config,
    shared: Shared,
    previous: Generation | None = None,
    *,
    observers: Sequence[Observer] = (),
    admin: Resource | None = None,
) -> Generation:
    """Build what ``config`` makes; raises whatever stops a part being made.
    ``observers`` watch requests beside the built-in ones; ``admin`` is
    served at ``/admin/`` (it outlives the generations: see oaproxy.admin)."""
    reactor = shared.reactor
    sinks = _part(
        previous, config, SinkSettings, lambda g: g.sinks, lambda s: make_sinks(s, reactor)
    )
    notifier = _part(
        previous,
        config,
        NotifySettings,
        lambda g: g.notifier,
        lambda s: Notifier.from_config(
            s.notify,
            shared.alert_agents(s.proxy),
            reactor,
            s.hostname,
            environ=shared.environ,
            on_result=shared.metrics.alert_sent,
        ),
    )
    shared_redis = _part(
        previous,
        config,
        RedisSettings,
        lambda g: g.shared_redis,
        lambda s: SharedRedis(s.redis, s.redis_prefix, reactor) if s.redis else None,
    )
    if (
        previous is not None
        and previous.config.cache == config.cache
        and previous.shared_redis is shared_redis
    ):
        # Entries in memory outlive a reload that leaves the cache as it was.
        response_cache = previous.response_cache
    else:
        response_cache = ResponseCache.from_config(
            config.cache, shared_redis, reactor, shared.metrics
        )
    if previous is not None and previous.config.log_file == config.log_file:
        log_file = previous.log_file
    else:
        log_file = JSONLogFile(config.log_file, reactor) if config.log_file else None
    traffic = build_traffic(
        config,
        reactor=reactor,
        wall_clock=shared.wall_clock,
        memory=shared.traffic,
        shared_redis=shared_redis,
        count_backend_error=shared.metrics.limiter_backend_error,
    )
    breakers = Breakers(
        config.breaker,
        shared.circuits,
        wall_clock=shared.wall_clock,
        rng=shared.rng,
        redis=shared_redis if config.breaker.shared else None,
    )
    records = RecordMaker(config)
    stream_observer: StreamObserver = records.stream_observer
    router = Router(config)
    clients = UpstreamClients(
        config.upstreams,
        shared.agents,
        shared.fresh_agents,
        clock=reactor,
        wall_clock=shared.wall_clock,
        max_event_bytes=config.max_event_bytes,
        words=records.redactor.words,
    )
    # IP rules right after the method: a denied address gets 403 whatever
    # it sends; request limits after the client key.
    head_gates: list[HeadGate] = [
        *builtin_head_gates(router, IPRules.from_config(config)),
        *traffic.head_gates,
    ]
    # The content filter first: it narrows the candidates to the exempt
    # ones, so the policy orders (and rotates over) the upstreams that will
    # really be tried, and a breaker lets a request probe only an upstream
    # it may send to; its 400 costs no Redis round trip. Forms are routed by
    # path: their model may still be denied.
    content_filter = ContentFilter.from_config(config)
    candidate_filters: list[CandidateFilter] = [] if content_filter is None else [content_filter]
    candidate_filters += [form_model_filter, Balancer(config, shared.load, shared.rng)]
    candidate_filters.append(breakers.order)
    gates: list[Gate] = []
    watchers: list[Observer] = [
        RecordPublishing(shared.records),
        MetricsCounting(shared.metrics),
        ReadinessFollowing(shared.readiness),
        LoadFollowing(shared.load),
        shared.recent_attempts,
        breakers,
        Alerting(notifier),
        *observers,
    ]
    if response_cache is not None:
        # First of the gates, before the token limits: a hit costs no tokens.
        gates.append(response_cache)
        watchers.append(response_cache)
        stream_observer = response_cache.following(stream_observer)
    gates += traffic.gates
    watchers += traffic.observers
    # Last: a stop waiting for the last request goes on only once its
    # record is on its way.
    watchers.append(shared.ledger)
    watching = Observers(watchers)
    forwarder = Forwarder(
        reactor,
        clients,
        shared.cooperator,
        stream_idle_timeout=config.stream_idle_timeout,
        max_event_bytes=config.max_event_bytes,
        redactor=records.redactor,
        on_event=stream_observer,
        on_attempt_started=watching.attempt_started,
        on_attempt=watching.attempt_finished,
        stream_pace=traffic.stream_pace,
        retries=RetryPolicy.from_config(config, shared.rng, shared.wall_clock),
        failover_codes=config.failover_codes,
    )
    pipeline = Pipeline(
        config,
        router,
        forwarder,
        records,
        clock=reactor,
        wall_clock=shared.wall_clock,
        inspect=Inspector(shared.cooperator),
        head_gates=head_gates,
        own_answers=[
            ModelsAnswer(router, clients, shared.model_lists, reactor, records.redactor.words)
        ],
        candidate_filters=candidate_filters,
        gates=gates,
        observers=watching,
    )
    root = RootResource(
        ProxyResource(pipeline, CorsPolicy.from_config(config)),
        metrics=MetricsResource(shared.metrics, config.metrics_key),
        ready=ReadyResource(shared.readiness.state),
        routes=config.route_prefixes,
        admin=admin,
    )
    return Generation(
        config=config,
        router=router,
        forwarder=forwarder,
        pipeline=pipeline,
        root=root,
        sinks=sinks,
        notifier=notifier,
        log_file=log_file,
        shared_redis=shared_redis,
        response_cache=response_cache,
    )


@frozen
class SinkSettings:
    """What the record sinks are made of: the config values of these names."""

    dbtype: str
    dbaddr: str
    redis: str | None
    records: RecordsPolicy


@frozen
class NotifySettings:
    """What the notifier is made of."""

    notify: NotifyConfig
    hostname: str
    proxy: HTTPProxy | None


@frozen
class RedisSettings:
    """What the shared Redis connection is made of."""

    redis: str | None
    redis_prefix: str


_S = TypeVar("_S")
_P = TypeVar("_P")


def settings_of(cls: type[_S], config: Config) -> _S:
    """``cls``'s fields, each the config's value of the same name.  A part
    is made of these alone, so what it reads is what a reload compares."""
    return cls(
        **{field.name: getattr(config, field.name) for field in attrs.fields(cast(Any, cls))}
    )


def _part(
    previous: Generation | None,
    config: Config,
    cls: type[_S],
    kept: Callable[[Generation], _P],
    make: Callable[[_S], _P],
) -> _P:
    """The previous generation's part when its settings did not change, else a new one."""
    wanted = settings_of(cls, config)
    if previous is not None and settings_of(cls, previous.config) == wanted:
        return kept(previous)
    return make(wanted)


def make_sinks(settings: SinkSettings, reactor: Any) -> dict[str, QueuedSink]:
    """The sinks the settings ask for, not yet observing nor started."""
    policy = settings.records
    common: dict[str, Any] = {"spool_dir": policy.spool_dir, "queue_size": policy.queue_size}
    sinks: dict[str, QueuedSink] = {}
    if settings.dbtype != "none":
        sinks["sql"] = SQLSink(settings.dbtype, settings.dbaddr, reactor=reactor, **common)
    if policy.file:
        sinks["file"] = FileSink(policy.file, rotate=policy.rotate, clock=reactor, **common)
    if settings.redis:
        # Imported here: txredisapi installs the global reactor on import.
        from oaproxy.sinks.redis import RedisSink

        sinks["redis"] = RedisSink(
            settings.redis,
            key=policy.redis_key,
            maxlen=policy.redis_maxlen,
            usage_prefix=usage_prefix(policy.redis_key),
            reactor=reactor,
            **common,
        )
    return sinks


async def swap_in(
    parent: MultiService, shared: Shared, old: Generation | None, new: Generation
) -> None:
    """Run ``new``'s services under ``parent`` in place of those of ``old``
    that differ, and point what outlives a reload at ``new``."""
    if old is None or new.log_file is not old.log_file:
        await _replace(parent, old.log_file if old else None, None)
        if new.log_file is not None:
            new.log_file.setServiceParent(parent)
            # The first child: children stop in reverse order, so it
            # sees the others' last words.
            parent.services.remove(new.log_file)
            parent.services.insert(0, new.log_file)
    await _replace(parent, old.notifier if old else None, new.notifier)
    await _replace(parent, old.shared_redis if old else None, new.shared_redis)
    if old is None or new.sinks is not old.sinks:
        # The old sinks keep observing until they have stopped (records
        # that come meanwhile are queued or spooled by them); the new ones
        # read the spool at their start, so none is written by two at once.
        for name, sink in (old.sinks if old else {}).items():
            await settle([sink.disownServiceParent()])
            shared.records.remove_observer(sink.observer)
            shared.metrics.remove_sink(name)
        for name, sink in new.sinks.items():
            sink.setServiceParent(parent)
            shared.records.add_observer(sink.observer)
            shared.metrics.add_sink(name, sink)
    shared.follow(new)


async def _replace(parent: MultiService, old: IService | None, new: IService | None) -> None:
    """Start ``new``, then stop ``old``, unless they are one."""
    if new is old:
        return
    if new is not None:
        new.setServiceParent(parent)
    if old is not None:
        await settle([old.disownServiceParent()])


def known_models(config: Config) -> list[str]:
    """Model names worth their own metrics label (client-facing: aliases too)."""
    names = [name for u in config.upstreams for name in u.allow if not name.startswith("/")]
    aliases = [alias for u in config.upstreams for alias in u.models]
    return names + aliases + list(config.prices)


def upstream_names(config: Config) -> list[str]:
    return [u.name for u in config.upstreams]


def usage_prefix(redis_key: str) -> str:
    """Where the daily usage counters go: beside the records stream
    (``oaproxy:records`` -> ``oaproxy:usage``), so that deployments sharing a
    Redis with their own keys keep their own counters."""
    namespace, colon, _ = redis_key.rpartition(":")
    return f"{namespace}:usage" if colon else f"{redis_key}:usage"
