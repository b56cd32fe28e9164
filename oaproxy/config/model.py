"""The configuration as frozen attrs objects: the one statement of its keys
and defaults.

Each field's metadata (see ``schema``) says how the file gives it; its attrs
default is the default.  The loader fills in the fields whose value depends
on other settings (upstream names, keys and inherited timeouts).
"""

from __future__ import annotations

import enum
import hashlib
import ipaddress
import socket
from collections.abc import Mapping
from types import MappingProxyType

from attrs import field, frozen

from oaproxy.config.listen import listen_addresses
from oaproxy.config.schema import named_sections, read, read_by_loader, section
from oaproxy.config.values import (
    aliases,
    boolean,
    deadline,
    endpoint_url,
    homeserver_url,
    http_url,
    integer,
    member_of,
    networks,
    non_negative,
    number,
    one_of,
    optional_text,
    redis_url,
    rotation,
    route_prefix,
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


class Word(str, enum.Enum):
    """An enum whose members are the words the file gives, and read as them."""

    def __str__(self) -> str:
        return str(self.value)


class UpstreamType(Word):
    OPENAI = "openai"
    #: Chat completions translated to Replicate's predictions.
    REPLICATE = "replicate"
    #: Built in: answers locally, without network or key.
    ECHO = "echo"


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


@frozen
class ClientKey:
    name: str  # the name given in {name: key}, else key_fingerprint(secret)
    secret: str = field(repr=False)


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

    @stream_usage.default
    def _stream_usage_default(self) -> bool:
        # Asking for usage in the stream is an OpenAI API option (echo has it too).
        return self.type in (UpstreamType.OPENAI, UpstreamType.ECHO)

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


@frozen(kw_only=True)
class Config:
    path: str  # the file it was read from; not a key
    listen: tuple[str, ...] = field(
        default=DEFAULT_LISTEN, metadata=read(listen_addresses, alias="address")
    )
    hostname: str = field(factory=socket.gethostname, metadata=read(text))
    keys: tuple[ClientKey, ...] = field(default=(), metadata=read_by_loader(key="authorization"))
    admin_key: str | None = field(default=None, repr=False, metadata=read(optional_text))
    metrics_key: str | None = field(default=None, repr=False, metadata=read(optional_text))
    timeout: float = field(default=120.0, metadata=read(deadline))
    stream_timeout: float = field(default=10.0, metadata=read(deadline))
    stream_idle_timeout: float = field(default=120.0, metadata=read(number))
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
    prices: Mapping[str, Price] = field(  # model -> Price, read-only
        default=MappingProxyType({}),
        metadata=named_sections(
            Price, "a mapping of model names to prices", "a mapping with input and output"
        ),
    )
    upstreams: tuple[Upstream, ...] = field(metadata=read_by_loader(section=Upstream))
    # The upstreams given with ``enabled: false``; not a key.
    disabled_upstreams: tuple[Upstream, ...] = ()

    def lb_policy_for(self, route: str | None) -> LbPolicy:
        """The balancing policy of a route prefix (None: ``/v1`` itself)."""
        settings = self.routes.get(route) if route is not None else None
        if settings is not None and settings.lb_policy is not None:
            return settings.lb_policy
        return self.lb_policy

    @property
    def route_prefixes(self) -> frozenset[str]:
        """The route prefixes some upstream serves."""
        return frozenset(u.route for u in self.upstreams if u.route is not None)


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
