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
from oaproxy.config.rates import Rate, rates, route_paces, route_rates
from oaproxy.config.schema import named_sections, read, read_by_loader, section
from oaproxy.config.values import (
    boolean,
    choice,
    deadline,
    endpoint_url,
    homeserver_url,
    http_url,
    integer,
    networks,
    non_negative,
    number,
    one_of,
    optional_text,
    redis_url,
    rotation,
    strings,
    text,
)

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

OPENAI = "openai"
UPSTREAM_TYPES = (OPENAI,)
_LATER_UPSTREAM_TYPES = ("replicate",)
LB_POLICIES = ("order", "random")
_LATER_LB_POLICIES = ("round_robin", "weighted", "least_latency")


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
    period: BudgetPeriod = field(default=BudgetPeriod.MONTH, metadata=read(choice(BudgetPeriod)))


def _one_measure(nodes: NodeReader, item: Item, budget: Budget) -> None:
    if (budget.usd is None) == (budget.tokens is None):
        nodes.fail(item.key, item.line, "a budget needs either usd or tokens (not both)")


@frozen
class ClientKey:
    """A client key; given as ``{name: {key: ..., rate_limit: ...}}`` it has
    limits of its own (None: the ``limits:`` section's apply)."""

    name: str  # the name given in {name: key}, else key_fingerprint(secret); set by the loader
    secret: str = field(
        repr=False, metadata=read(text, key="key", missing="a client key mapping needs key")
    )
    rate_limit: tuple[Rate, ...] | None = field(default=None, metadata=read(rates))
    token_limit: tuple[Rate, ...] | None = field(default=None, metadata=read(rates))
    budget: Budget | None = field(
        default=None,
        metadata=section(Budget, "a mapping with usd or tokens, and period", _one_measure),
    )


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
    # The type first: openai-api-route's replicate upstreams have no
    # endpoint, and "not supported yet" is the message that helps there.
    type: str = field(
        default=OPENAI,
        metadata=read(one_of(UPSTREAM_TYPES, _LATER_UPSTREAM_TYPES, noun="type")),
    )
    endpoint: str = field(metadata=read(endpoint_url, missing="upstream has no endpoint"))
    # Default (set by the loader, as defaults must differ): the endpoint's
    # host (host:port), made unique with "#2"…
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

    @stream_usage.default
    def _stream_usage_default(self) -> bool:
        # Asking for usage in the stream is an OpenAI API option.
        return self.type == OPENAI


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
        default=LimiterBackend.MEMORY, metadata=read(choice(LimiterBackend))
    )
    strategy: WindowStrategy = field(
        default=WindowStrategy.MOVING, metadata=read(choice(WindowStrategy))
    )
    on_backend_error: BackendErrorPolicy = field(
        default=BackendErrorPolicy.OPEN, metadata=read(choice(BackendErrorPolicy))
    )
    global_: tuple[Rate, ...] = field(default=(), metadata=read(rates, key="global"))
    per_key: tuple[Rate, ...] = field(default=(), metadata=read(rates))
    routes: Mapping[str, tuple[Rate, ...]] = field(factory=_no_routes, metadata=read(route_rates))
    tokens_per_key: tuple[Rate, ...] = field(default=(), metadata=read(rates))
    default_max_tokens: int = field(default=1024, metadata=read(integer))
    stream_pace: Mapping[str, Rate] = field(factory=_no_routes, metadata=read(route_paces))


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
    metrics_key: str | None = field(default=None, repr=False, metadata=read(optional_text))
    timeout: float = field(default=120.0, metadata=read(deadline))
    stream_timeout: float = field(default=10.0, metadata=read(deadline))
    stream_idle_timeout: float = field(default=120.0, metadata=read(number))
    # The longest SSE event an upstream may send (and what a stream may hold
    # before its first): past it the attempt fails.
    max_event_bytes: int = field(default=16 * 1024 * 1024, metadata=read(integer))
    lb_policy: str = field(default="order", metadata=read(one_of(LB_POLICIES, _LATER_LB_POLICIES)))
    dbtype: str = field(default=SQLITE, metadata=read(one_of((*DBTYPES, NO_DATABASE))))
    # A file, or for postgres a DSN, which may hold a password.
    dbaddr: str = field(default="./db.sqlite", repr=False, metadata=read_by_loader())
    redis: str | None = field(default=None, repr=False, metadata=read(redis_url))
    # Starts every Redis key of state shared between processes (limits,
    # budgets, cache, breakers); records keep their own ``records.redis_key``.
    redis_prefix: str = field(default="oaproxy:", metadata=read(text))
    max_body_bytes: int = field(default=64 * 1024 * 1024, metadata=read(integer))
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = field(
        default=DEFAULT_TRUSTED_PROXIES, metadata=read(networks)
    )
    shutdown_timeout: float = field(default=30.0, metadata=read(non_negative))
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
    upstreams: tuple[Upstream, ...] = field(metadata=read_by_loader(section=Upstream))


def all_client_keys(config: Config) -> tuple[ClientKey, ...]:
    """Every client key the config knows, global and per-upstream, each once.
    A bearer token is valid when it is one of these; which upstreams it may
    use is then decided by ``Upstream.keys``.
    """
    seen: dict[str, ClientKey] = {}
    for key in config.keys:
        seen.setdefault(key.secret, key)
    for upstream in config.upstreams:
        for key in upstream.keys or ():
            seen.setdefault(key.secret, key)
    return tuple(seen.values())
