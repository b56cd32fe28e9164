"""The configuration as frozen attrs objects: the one statement of its keys
and defaults.

Each field's metadata (see ``schema``) says how the file gives it; its attrs
default is the default.  The loader fills in the fields whose value depends
on other settings (upstream names, keys and inherited timeouts).
"""

from __future__ import annotations

import hashlib
import ipaddress
import socket
from collections.abc import Mapping
from enum import Enum
from types import MappingProxyType
from typing import Any

from attrs import field, frozen

from oaproxy.config.listen import listen_addresses
from oaproxy.config.nodes import Item, NodeReader
from oaproxy.config.rates import Rate, api_paths, rates, route_paces, route_rates
from oaproxy.config.schema import named_sections, read, read_by_loader, section
from oaproxy.config.values import (
    aliases,
    boolean,
    count,
    deadline,
    endpoint_url,
    homeserver_url,
    http_url,
    integer,
    json_members,
    member_of,
    networks,
    non_negative,
    number,
    one_of,
    optional_text,
    origins,
    proxy_url,
    re2_patterns,
    redis_url,
    rotation,
    route_prefix,
    strings,
    text,
)
from oaproxy.upstreamclient.proxy import HTTPProxy

DEFAULT_LISTEN: tuple[str, ...] = ("tcp:8888:interface=127.0.0.1",)
DEFAULT_TRUSTED_PROXIES: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = (
    ipaddress.ip_network("127.0.0.1/32"),
    ipaddress.ip_network("::1/128"),
)

SQLITE = "sqlite"
POSTGRES = "postgres"
#: The dbtypes of an SQL record store (``oaproxy.sinks.sql``).
DBTYPES = (SQLITE, POSTGRES)
#: The dbtype that keeps no SQL record store.
NO_DATABASE = "none"


class Word(str, Enum):
    """An enum whose members are the words the file gives, and read as them."""

    def __str__(self) -> str:
        return str(self.value)


class UpstreamType(Word):
    OPENAI = "openai"
    #: Chat completions translated to Replicate's predictions.
    REPLICATE = "replicate"
    #: Built in: answers locally, without network or key.
    ECHO = "echo"


class ResumeMode(Word):
    """How a committed stream that broke is continued on the next candidate
    (``oaproxy.resume``); the continuing candidate's choice."""

    #: The request again with the text so far as an assistant message.
    PREFILL = "prefill"
    #: The request again; the text already relayed is skipped.
    RESTART = "restart"
    #: Not continued: the stream ends with an SSE error event.
    OFF = "off"


#: Where a replicate upstream without an endpoint goes.
REPLICATE_ENDPOINT = "https://api.replicate.com/v1"


class LbPolicy(Word):
    """How the upstreams that may serve a request are ordered."""

    ORDER = "order"
    RANDOM = "random"
    ROUND_ROBIN = "round_robin"
    WEIGHTED = "weighted"
    LEAST_LATENCY = "least_latency"
    LEAST_BUSY = "least_busy"


def key_fingerprint(secret: str) -> str:
    """The name of a client key given without one: ``"key-"`` and the first 8
    hex digits of its SHA-256, stable across restarts and safe to log.
    """
    return "key-" + hashlib.sha256(secret.encode("utf-8")).hexdigest()[:8]


class BudgetPeriod(Enum):
    """The calendar period a budget covers, in UTC."""

    DAY = "day"
    MONTH = "month"


@frozen
class Budget:
    """What one client key may spend per period: dollars or tokens."""

    usd: float | None = field(default=None, metadata=read(number))
    tokens: int | None = field(default=None, metadata=read(integer))
    period: BudgetPeriod = field(default=BudgetPeriod.MONTH, metadata=read(member_of(BudgetPeriod)))


def _one_measure(nodes: NodeReader, item: Item, budget: Budget) -> None:
    if (budget.usd is None) == (budget.tokens is None):
        nodes.fail(item.key, item.line, "a budget needs either usd or tokens (not both)")


def key_digest(secret: str | bytes) -> str:
    """The SHA-256 of a client key, in hex: all the store keeps of a key."""
    if isinstance(secret, str):
        secret = secret.encode("utf-8")
    return hashlib.sha256(secret).hexdigest()


@frozen
class ClientKey:
    """A client key; given as ``{name: {key: ..., rate_limit: ...}}`` it has
    limits of its own (None: the ``limits:`` section's apply).

    A key of the config file has its ``secret``; a key the admin API or the
    CLI made is known by its ``sha256`` only (``secret`` None).
    """

    name: str  # the name given in {name: key}, else key_fingerprint(secret); set by the loader
    secret: str | None = field(
        repr=False, metadata=read(text, key="key", missing="a client key mapping needs key")
    )
    rate_limit: tuple[Rate, ...] | None = field(default=None, metadata=read(rates))
    token_limit: tuple[Rate, ...] | None = field(default=None, metadata=read(rates))
    budget: Budget | None = field(
        default=None,
        metadata=section(Budget, "a mapping with usd or tokens, and period", _one_measure),
    )
    # Not a key of the file: how a presented key is recognised.
    sha256: str = field(repr=False)

    @sha256.default
    def _sha256_default(self) -> str:
        if self.secret is None:
            raise ValueError("a client key needs its secret or its sha256")
        return key_digest(self.secret)


@frozen
class Price:
    """What a model's tokens cost, per million."""

    input: float = field(
        metadata=read(non_negative, missing="the price needs input (per million tokens)")
    )
    output: float = field(
        metadata=read(non_negative, missing="the price needs output (per million tokens)")
    )


@frozen(kw_only=True)
class Upstream:
    # The type first: whether an endpoint is needed depends on it.
    type: UpstreamType = field(
        default=UpstreamType.OPENAI, metadata=read(member_of(UpstreamType, noun="type"))
    )
    # Required for openai; replicate's default is REPLICATE_ENDPOINT; echo
    # has none (set by the loader).
    endpoint: str | None = field(default=None, metadata=read(endpoint_url))
    # Default (set by the loader, as defaults must differ): the endpoint's
    # host (host:port), or "echo", made unique with "#2"…
    name: str = field(metadata=read(text))
    # None = no Authorization; "asis" = the client's.
    sk: str | None = field(default=None, repr=False, metadata=read(optional_text))
    # Inherited from the top-level timeout and stream_timeout.
    timeout: float = field(metadata=read(deadline))
    stream_timeout: float = field(metadata=read(deadline))
    allow: tuple[str, ...] = field(default=(), metadata=read(strings))  # models, or "/" paths
    deny: tuple[str, ...] = field(default=(), metadata=read(strings))
    # None = the global keys apply.
    keys: tuple[ClientKey, ...] | None = field(
        default=None, metadata=read_by_loader(key="authorization")
    )
    noauth: bool = field(default=False, metadata=read(boolean))
    keep_header: bool = field(default=False, metadata=read(boolean))
    weight: float = field(default=1.0, metadata=read(number))
    stream_usage: bool = field(metadata=read(boolean))
    # None: serves /v1/*; "/ollama": serves /ollama/v1/* only.
    route: str | None = field(default=None, metadata=read(route_prefix))
    # Tried only after every other candidate.
    backup: bool = field(default=False, metadata=read(boolean))
    # Client-facing model name -> this upstream's own name for it.
    models: Mapping[str, str] = field(default=MappingProxyType({}), metadata=read(aliases))
    # False: configured, but left out (the loader keeps it aside).
    enabled: bool = field(default=True, metadata=read(boolean))
    # False: exempt from the content filter (e.g. an internal model).
    content_filter: bool = field(default=True, metadata=read(boolean))
    # How a broken stream is continued here; prefill for openai upstreams.
    resume: ResumeMode = field(metadata=read(member_of(ResumeMode)))
    # Body members added to a prefill request, e.g. vLLM's
    # {continue_final_message: true, add_generation_prompt: false}.
    resume_body: Mapping[str, Any] = field(
        default=MappingProxyType({}), metadata=read(json_members)
    )
    # Inherited from the top-level retries.
    retries: int = field(default=0, metadata=read(count))
    # The way out, set by the loader: the top-level proxy unless the
    # upstream gives its own (``none``: direct, None here).
    proxy: HTTPProxy | None = field(default=None, metadata=read_by_loader())

    @stream_usage.default
    def _stream_usage_default(self) -> bool:
        # Asking for usage in the stream is an OpenAI API option (echo has it too).
        return self.type in (UpstreamType.OPENAI, UpstreamType.ECHO)

    @resume.default
    def _resume_default(self) -> ResumeMode:
        # A prefilled assistant message is an OpenAI API idiom; others restart.
        return ResumeMode.PREFILL if self.type is UpstreamType.OPENAI else ResumeMode.RESTART

    def url(self, upstream_path: bytes) -> bytes:
        """Where an API path (the part after ``/v1``) goes on this upstream;
        an echo upstream, which has no endpoint, takes the path alone."""
        return (self.endpoint or "").encode("utf-8") + upstream_path

    def upstream_model(self, model: str | None) -> str | None:
        """This upstream's own name for the client's ``model``."""
        return self.models.get(model, model) if model is not None else None


@frozen
class BreakerConfig:
    """When an upstream's circuit opens, and where its state is kept."""

    # Consecutive failed attempts that open the circuit.
    failures: int = field(default=5, metadata=read(integer))
    # Seconds before one probe request is let through (half-open).
    cooldown: float = field(default=30.0, metadata=read(number))
    # True: kept in the top-level redis:, seen by every process.
    shared: bool = field(default=False, metadata=read(boolean))


@frozen
class RouteSettings:
    """What a route prefix does differently from ``/v1``."""

    # None: the top-level lb_policy.
    lb_policy: LbPolicy | None = field(default=None, metadata=read(member_of(LbPolicy)))


@frozen
class FeishuConfig:
    webhook: str = field(metadata=read(http_url, missing="feishu needs a webhook"))
    secret: str | None = field(default=None, repr=False, metadata=read(optional_text))


@frozen
class MatrixConfig:
    homeserver: str = field(metadata=read(homeserver_url, missing="matrix needs homeserver"))
    access_token: str = field(repr=False, metadata=read(text, missing="matrix needs access_token"))
    room_id: str = field(metadata=read(text, missing="matrix needs room_id"))


@frozen
class NotifyConfig:
    feishu: FeishuConfig | None = field(
        default=None, metadata=section(FeishuConfig, "a mapping with webhook and secret")
    )
    matrix: MatrixConfig | None = field(
        default=None,
        metadata=section(MatrixConfig, "a mapping with homeserver, access_token and room_id"),
    )
    min_interval: float = field(default=60.0, metadata=read(non_negative))
    timeout: float = field(default=10.0, metadata=read(number))  # of one alert post


@frozen
class RecordsPolicy:
    body: bool = field(default=True, metadata=read(boolean))
    response: bool = field(default=True, metadata=read(boolean))
    headers: bool = field(default=False, metadata=read(boolean))
    # Per field; longer fields are truncated and marked.
    max_field_bytes: int = field(default=65536, metadata=read(integer))
    file: str | None = field(default=None, metadata=read(optional_text))  # None = no file sink
    rotate: str = field(default="daily", metadata=read(rotation))  # "daily" | a size
    redis_key: str = field(default="oaproxy:records", metadata=read(text))
    redis_maxlen: int = field(default=100000, metadata=read(integer))
    spool_dir: str = field(default="./log/spool", metadata=read(text))
    queue_size: int = field(default=10000, metadata=read(integer))


class LimiterBackend(Enum):
    MEMORY = "memory"  # this process only
    REDIS = "redis"  # the top-level redis:, shared by every process using it


class WindowStrategy(Enum):
    MOVING = "moving-window"
    FIXED = "fixed-window"


class BackendErrorPolicy(Enum):
    """What a request gets while the limiter's backend cannot be asked."""

    OPEN = "open"  # served, and the failure counted
    CLOSED = "closed"  # 503 limiter_unavailable


def _no_routes() -> Mapping[str, Any]:
    return MappingProxyType({})


@frozen
class Limits:
    """Request and token limits (``oaproxy.traffic``); every rate is a tuple
    of ``Rate``s, empty when not limited."""

    backend: LimiterBackend = field(
        default=LimiterBackend.MEMORY, metadata=read(member_of(LimiterBackend))
    )
    strategy: WindowStrategy = field(
        default=WindowStrategy.MOVING, metadata=read(member_of(WindowStrategy))
    )
    on_backend_error: BackendErrorPolicy = field(
        default=BackendErrorPolicy.OPEN, metadata=read(member_of(BackendErrorPolicy))
    )
    global_: tuple[Rate, ...] = field(default=(), metadata=read(rates, key="global"))
    per_key: tuple[Rate, ...] = field(default=(), metadata=read(rates))
    routes: Mapping[str, tuple[Rate, ...]] = field(factory=_no_routes, metadata=read(route_rates))
    tokens_per_key: tuple[Rate, ...] = field(default=(), metadata=read(rates))
    default_max_tokens: int = field(default=1024, metadata=read(integer))
    stream_pace: Mapping[str, Rate] = field(factory=_no_routes, metadata=read(route_paces))


class CacheBackend(Enum):
    MEMORY = "memory"  # an LRU in this process
    REDIS = "redis"  # the top-level redis:, shared by every process using it


@frozen
class CacheConfig:
    """The response cache; see ``oaproxy.cache``."""

    backend: CacheBackend = field(
        default=CacheBackend.MEMORY, metadata=read(member_of(CacheBackend))
    )
    ttl: int = field(default=3600, metadata=read(integer))  # seconds
    max_entries: int = field(default=10000, metadata=read(integer))  # memory backend
    # All entries together (memory backend): entries alone would allow
    # max_entries x max_entry_bytes.
    max_bytes: int = field(default=256 * 1024 * 1024, metadata=read(integer))
    max_entry_bytes: int = field(default=1024 * 1024, metadata=read(integer))
    routes: tuple[str, ...] = field(
        default=("/v1/chat/completions", "/v1/completions", "/v1/embeddings"),
        metadata=read(api_paths),
    )
    # False: only requests with "caching": true; true: all but "caching": false.
    default: bool = field(default=False, metadata=read(boolean))
    # False: one namespace per client key; true: one for all.
    shared: bool = field(default=False, metadata=read(boolean))


@frozen
class ContentFilterConfig:
    """Requests refused for what they ask a model to read; see ``oaproxy.contentfilter``."""

    patterns: tuple[str, ...] = field(default=(), metadata=read(re2_patterns))
    words: tuple[str, ...] = field(default=(), metadata=read(strings))


@frozen(kw_only=True)
class Config:
    path: str  # the file it was read from; not a key
    listen: tuple[str, ...] = field(
        default=DEFAULT_LISTEN, metadata=read(listen_addresses, alias="address")
    )
    hostname: str = field(factory=socket.gethostname, metadata=read(text))
    keys: tuple[ClientKey, ...] = field(
        default=(), metadata=read_by_loader(key="authorization", section=ClientKey)
    )
    admin_key: str | None = field(default=None, repr=False, metadata=read(optional_text))
    # Encrypts the upstream keys the admin API and the CLI store (a Fernet
    # key, checked where it is used: see oaproxy.admin.sealing).
    store_key: str | None = field(default=None, repr=False, metadata=read(optional_text))
    # Seconds between two looks at the SQL store for changes made elsewhere.
    store_poll_interval: float = field(default=5.0, metadata=read(number))
    metrics_key: str | None = field(default=None, repr=False, metadata=read(optional_text))
    timeout: float = field(default=120.0, metadata=read(deadline))
    stream_timeout: float = field(default=10.0, metadata=read(deadline))
    # Silence after the commit that counts as a stall (keep-alive comments
    # are silence): long enough for a model thinking before its next token,
    # short enough that a resumed answer does not keep a client waiting.
    stream_idle_timeout: float = field(default=30.0, metadata=read(number))
    # Same-upstream retries (429, 5xx, a reset before any byte) before failing over.
    retries: int = field(default=0, metadata=read(count))
    retry_backoff: float = field(default=0.5, metadata=read(non_negative))
    # The longest Retry-After waited for; a longer one leaves the upstream.
    max_retry_after: float = field(default=5.0, metadata=read(non_negative))
    # The error codes of a 400 that fail over (oaproxy.errorcodes).
    failover_codes: tuple[str, ...] = field(
        default=("context_length_exceeded",), metadata=read(strings)
    )
    # The longest SSE event an upstream may send (and what a stream may hold
    # before its first): past it the attempt fails.
    max_event_bytes: int = field(default=16 * 1024 * 1024, metadata=read(integer))
    lb_policy: LbPolicy = field(default=LbPolicy.ORDER, metadata=read(member_of(LbPolicy)))
    breaker: BreakerConfig = field(
        factory=BreakerConfig,
        metadata=section(BreakerConfig, "a mapping of circuit breaker settings"),
    )
    # Route prefix -> its settings, read-only; every prefix is some upstream's route.
    routes: Mapping[str, RouteSettings] = field(
        default=MappingProxyType({}), metadata=read_by_loader(section=RouteSettings)
    )
    dbtype: str = field(default=SQLITE, metadata=read(one_of((*DBTYPES, NO_DATABASE))))
    # A file, or for postgres a DSN, which may hold a password.
    dbaddr: str = field(default="./db.sqlite", repr=False, metadata=read_by_loader())
    redis: str | None = field(default=None, repr=False, metadata=read(redis_url))
    # Starts every Redis key of state shared between processes (limits,
    # budgets, cache, breakers); records keep their own ``records.redis_key``.
    redis_prefix: str = field(default="oaproxy:", metadata=read(text))
    max_body_bytes: int = field(default=64 * 1024 * 1024, metadata=read(integer))
    # All the request bodies held at once (oaproxy.bodybudget).
    max_inflight_body_bytes: int = field(default=512 * 1024 * 1024, metadata=read(integer))
    # Client connections (oaproxy.channel): seconds for a request head, the
    # bytes per second a body must average over body_rate_window seconds,
    # and how many may be open at once.
    header_timeout: float = field(default=10.0, metadata=read(number))
    body_min_rate: int = field(default=1024, metadata=read(integer))
    body_rate_window: float = field(default=10.0, metadata=read(number))
    max_connections: int = field(default=10000, metadata=read(integer))
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = field(
        default=DEFAULT_TRUSTED_PROXIES, metadata=read(networks)
    )
    # Browser origins let in by CORS; None: "*" when every request needs a
    # client key, else none (oaproxy.cors).
    cors_origins: tuple[str, ...] | None = field(default=None, metadata=read(origins))
    shutdown_timeout: float = field(default=30.0, metadata=read(non_negative))
    # Where upstream requests and alert posts go out; None: straight to them.
    # HTTP_PROXY and the like are not read: the config says where traffic goes.
    proxy: HTTPProxy | None = field(default=None, metadata=read(proxy_url))
    log_file: str | None = field(default=None, metadata=read(optional_text))
    records: RecordsPolicy = field(
        factory=RecordsPolicy, metadata=section(RecordsPolicy, "a mapping of record settings")
    )
    notify: NotifyConfig = field(
        factory=NotifyConfig, metadata=section(NotifyConfig, "a mapping of alert settings")
    )
    limits: Limits = field(factory=Limits, metadata=section(Limits, "a mapping of limit settings"))
    prices: Mapping[str, Price] = field(  # model -> Price, read-only
        default=MappingProxyType({}),
        metadata=named_sections(
            Price, "a mapping of model names to prices", "a mapping with input and output"
        ),
    )
    cache: CacheConfig | None = field(  # None: no cache
        default=None, metadata=section(CacheConfig, "a mapping of cache settings")
    )
    ip_allow: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = field(
        default=(), metadata=read(networks)
    )
    ip_deny: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = field(
        default=(), metadata=read(networks)
    )
    content_filter: ContentFilterConfig | None = field(  # None: no filter
        default=None,
        metadata=section(ContentFilterConfig, "a mapping with patterns and words"),
    )
    upstreams: tuple[Upstream, ...] = field(metadata=read_by_loader(section=Upstream))
    # Not keys of the file. The upstreams with enabled: false, given so in
    # the file or disabled in the store (oaproxy.admin.overlay): nothing is
    # routed to them, but their keys stay valid, so that disabling the
    # upstream that named the only keys never opens the proxy. And the
    # store's client keys, valid whatever upstreams they name (one that
    # names only gone ones gets 403, not 401).
    disabled_upstreams: tuple[Upstream, ...] = ()
    stored_keys: tuple[ClientKey, ...] = ()

    def lb_policy_for(self, route: str | None) -> LbPolicy:
        """The balancing policy of a route prefix (None: ``/v1`` itself)."""
        settings = self.routes.get(route) if route is not None else None
        if settings is not None and settings.lb_policy is not None:
            return settings.lb_policy
        return self.lb_policy

    @property
    def route_prefixes(self) -> tuple[str, ...]:
        """The route prefixes some upstream serves, longest first (as
        ``oaproxy.paths.route_of`` tries them: ``/team/a`` before ``/team``)."""
        routes = {u.route for u in self.upstreams if u.route is not None}
        return tuple(sorted(routes, key=lambda route: (-len(route), route)))


def all_client_keys(config: Config) -> tuple[ClientKey, ...]:
    """Every client key the config knows, global and per-upstream, each once.
    A bearer token is valid when it is one of these; which upstreams it may
    use is then decided by ``Upstream.keys``.
    """
    seen: dict[str, ClientKey] = {}
    for key in config.keys:
        seen.setdefault(key.sha256, key)
    for upstream in (*config.upstreams, *config.disabled_upstreams):
        for key in upstream.keys or ():
            seen.setdefault(key.sha256, key)
    for key in config.stored_keys:
        seen.setdefault(key.sha256, key)
    return tuple(seen.values())
