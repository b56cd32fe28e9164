"""What one config makes, built in one place: for the daemon, at start and
at each reload, and for the tests, which run the same wiring in memory.

``Shared`` is what outlives a reload (the upstream agents, the record
publisher, metrics, readiness, the in-flight ledger, the limits' counters
in memory, circuit states, upstream load, recent attempts and models
lists); a
``Generation`` is everything one config makes on top of it (router,
forwarder, the request pipeline and its resource tree, sinks, notifier, log
file, cache). A reload builds a whole new generation before anything is
swapped, reusing the previous one's sinks, notifier, log file and cache
where their config sections did not change.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from attrs import frozen
from twisted.internet.task import Cooperator
from twisted.web.resource import Resource

from oaproxy.activity import RecentAttempts
from oaproxy.alerts import Notifier
from oaproxy.balancing import Balancer, LoadFollowing, UpstreamLoad
from oaproxy.bodyrules import form_model_filter
from oaproxy.breaker import Breakers
from oaproxy.cache.lookup import ResponseCache, StreamObserver
from oaproxy.circuits import Circuits
from oaproxy.config import Config
from oaproxy.contentfilter import ContentFilter
from oaproxy.cors import CorsPolicy
from oaproxy.forward import Forwarder
from oaproxy.gates import builtin_head_gates
from oaproxy.health import Readiness, ReadyResource
from oaproxy.inspection import Inspector
from oaproxy.iprules import IPRules
from oaproxy.ledger import RequestLedger
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
    if previous is not None and _sink_section(previous.config) == _sink_section(config):
        sinks = previous.sinks
    else:
        sinks = make_sinks(config, reactor)
    if previous is not None and _notify_section(previous.config) == _notify_section(config):
        notifier = previous.notifier
    else:
        notifier = Notifier.from_config(
            config.notify,
            shared.alert_agents(config.proxy),
            reactor,
            config.hostname,
            environ=shared.environ,
            on_result=shared.metrics.alert_sent,
        )
    if previous is not None and _redis_section(previous.config) == _redis_section(config):
        shared_redis = previous.shared_redis
    else:
        shared_redis = (
            SharedRedis(config.redis, config.redis_prefix, reactor) if config.redis else None
        )
    if previous is not None and _cache_section(previous.config) == _cache_section(config):
        # Entries in memory outlive a reload that leaves the cache as it was.
        response_cache = previous.response_cache
    else:
        response_cache = ResponseCache.from_config(config, shared_redis, reactor, shared.metrics)
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


def make_sinks(config: Config, reactor: Any) -> dict[str, QueuedSink]:
    """The sinks a config asks for, not yet observing nor started."""
    policy = config.records
    common: dict[str, Any] = {"spool_dir": policy.spool_dir, "queue_size": policy.queue_size}
    sinks: dict[str, QueuedSink] = {}
    if config.dbtype != "none":
        sinks["sql"] = SQLSink(config.dbtype, config.dbaddr, reactor=reactor, **common)
    if policy.file:
        sinks["file"] = FileSink(policy.file, rotate=policy.rotate, clock=reactor, **common)
    if config.redis:
        # Imported here: txredisapi installs the global reactor on import.
        from oaproxy.sinks.redis import RedisSink

        sinks["redis"] = RedisSink(
            config.redis,
            key=policy.redis_key,
            maxlen=policy.redis_maxlen,
            usage_prefix=usage_prefix(policy.redis_key),
            reactor=reactor,
            **common,
        )
    return sinks


def _sink_section(config: Config) -> tuple[Any, ...]:
    """What the sinks are made of: a change anywhere in it makes new ones."""
    return (config.dbtype, config.dbaddr, config.redis, config.records)


def _redis_section(config: Config) -> tuple[Any, ...]:
    return (config.redis, config.redis_prefix)


def _cache_section(config: Config) -> tuple[Any, ...]:
    return (config.cache, *_redis_section(config))


def _notify_section(config: Config) -> tuple[Any, ...]:
    return (config.notify, config.hostname, config.proxy)


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
