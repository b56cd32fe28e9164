"""The configuration file: YAML in, frozen attrs objects out.

The file is a superset of openai-api-route's ``config.yaml``: a file written
for it loads here and means the same (``authorization`` as a comma string,
upstream ``authorization`` scoping, inherited timeouts, ``address`` as the
listen address).  Every problem is a ``ConfigError`` naming the file, the line
of the offending key and the key's dotted path, on one line, so that
``twistd`` can refuse to start with a message that points at the mistake.

Conventions that hold everywhere in the file:

  - An explicit ``null`` (``key:`` with nothing after it) means the same as
    leaving the key out: the default applies.
  - ``${NAME}`` in any string value is replaced by the environment variable
    ``NAME``; ``$${`` stands for a literal ``${``.  Replacement happens on the
    scalar's text after YAML parsing, so a variable's content is never parsed
    as YAML.  Mapping keys are not interpolated.
  - Number and boolean settings take YAML numbers and booleans.  A string is
    accepted for them only when the whole value is one ``${NAME}``: an
    environment variable can only ever hold text, and refusing
    ``timeout: ${TIMEOUT}`` would make interpolation useless for numbers.
  - String settings take any non-null scalar as its text (``sk: 123456``,
    ``authorization: 12345678``), as openai-api-route's Go YAML decoder does.
    List settings (``allow``, ``deny``, ``listen``, ``trusted_proxies``) are
    stricter: their items must be YAML strings, so ``allow: 3`` is an error.
    Inside YAML flow collections (``[…]``, ``{…}``) a ``${NAME}`` must be quoted,
    because ``{`` is YAML syntax there.
  - Keys are counted from 0 in paths: ``upstreams[0]`` is the first upstream.
  - Secret values (keys, ``sk``, tokens, DSNs, URLs) never appear in messages;
    only the key that holds them does.
"""

from __future__ import annotations

import hashlib
import ipaddress
import math
import os
import re
import socket
from collections.abc import Callable, Iterable, Mapping, Sequence
from difflib import get_close_matches
from types import MappingProxyType
from typing import NoReturn, TypeVar
from urllib.parse import urlsplit

import yaml
from attrs import evolve, field, frozen

__all__ = [
    "DEFAULT_LISTEN",
    "ClientKey",
    "Config",
    "ConfigError",
    "FeishuConfig",
    "MatrixConfig",
    "NotifyConfig",
    "Price",
    "RecordsPolicy",
    "Upstream",
    "all_client_keys",
    "check_listeners",
    "is_loopback_endpoint",
    "key_fingerprint",
    "load_config",
    "parse_config",
    "parse_listen",
    "parse_size",
]


@frozen
class ClientKey:
    name: str  # the name given in {name: key}, else "key-" + sha256(key)[:8]
    secret: str = field(repr=False)


@frozen
class Price:
    input: float  # per million tokens
    output: float


@frozen
class Upstream:
    name: str  # default: endpoint host (host:port), made unique with "#2"…
    endpoint: str  # URL, trailing "/" stripped
    sk: str | None = field(repr=False)  # None = no Authorization; "asis" = the client's
    type: str  # "openai"
    timeout: float  # inherited from the top-level timeout
    stream_timeout: float  # inherited from the top-level stream_timeout
    allow: tuple[str, ...]  # model names, or paths starting with "/"
    deny: tuple[str, ...]
    keys: tuple[ClientKey, ...] | None  # None = the global keys apply
    noauth: bool
    keep_header: bool
    weight: float
    stream_usage: bool


@frozen
class FeishuConfig:
    webhook: str
    secret: str | None = field(default=None, repr=False)


@frozen
class MatrixConfig:
    homeserver: str
    access_token: str = field(repr=False)
    room_id: str


@frozen
class NotifyConfig:
    feishu: FeishuConfig | None
    matrix: MatrixConfig | None
    min_interval: float = 60.0
    timeout: float = 10.0  # deadline of one alert post


@frozen
class RecordsPolicy:
    body: bool = True
    response: bool = True
    headers: bool = False
    max_field_bytes: int = 65536  # per field; longer fields truncated and marked
    file: str | None = None  # JSON-lines file path; None = no file sink
    rotate: str = "daily"  # "daily" | a size like "100MB" (see parse_size)
    redis_key: str = "oaproxy:records"
    redis_maxlen: int = 100000
    spool_dir: str = "./log/spool"
    queue_size: int = 10000


@frozen
class Config:
    path: str
    listen: tuple[str, ...]  # Twisted endpoint strings
    hostname: str
    keys: tuple[ClientKey, ...]  # global client keys
    admin_key: str | None = field(repr=False)
    metrics_key: str | None = field(repr=False)
    timeout: float
    stream_timeout: float
    stream_idle_timeout: float
    lb_policy: str  # order | random
    dbtype: str  # sqlite | postgres | none
    dbaddr: str = field(repr=False)  # a postgres DSN may hold a password
    redis: str | None = field(repr=False)
    max_body_bytes: int
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
    shutdown_timeout: float
    log_file: str | None
    records: RecordsPolicy
    notify: NotifyConfig
    prices: Mapping[str, Price]  # model -> Price (read-only mapping)
    upstreams: tuple[Upstream, ...]


class ConfigError(Exception):
    """A configuration problem, located as precisely as the file allows.

    Attributes:

    - ``path``: the configuration file's path.
    - ``line``: 1-based line of the offending key, or ``None`` when unknown
      (a required key that is missing, a ``--listen`` override).
    - ``key``: dotted path of the offending key, e.g.
      ``upstreams[1].timeout``; ``""`` for problems of the file as a whole.
    - ``message``: what is wrong, one line, never a secret value.
    """

    def __init__(self, path: str, line: int | None, key: str, message: str) -> None:
        # YAML's own messages may span lines; ours are one line by contract.
        message = " ".join(message.split())
        super().__init__(path, line, key, message)
        self.path = path
        self.line = line
        self.key = key
        self.message = message

    def __str__(self) -> str:
        where = self.path if self.line is None else f"{self.path}:{self.line}"
        if self.key:
            return f"{where}: {self.key}: {self.message}"
        return f"{where}: {self.message}"


DEFAULT_LISTEN: tuple[str, ...] = ("tcp:8888:interface=127.0.0.1",)
DEFAULT_TRUSTED_PROXIES: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = (
    ipaddress.ip_network("127.0.0.1/32"),
    ipaddress.ip_network("::1/128"),
)

_TOP_KEYS = frozenset(
    {
        "listen",
        "address",  # openai-api-route's name for a single listen address
        "hostname",
        "authorization",
        "admin_key",
        "metrics_key",
        "timeout",
        "stream_timeout",
        "stream_idle_timeout",
        "lb_policy",
        "dbtype",
        "dbaddr",
        "redis",
        "max_body_bytes",
        "trusted_proxies",
        "shutdown_timeout",
        "log_file",
        "records",
        "notify",
        "prices",
        "upstreams",
    }
)
_UPSTREAM_KEYS = frozenset(
    {
        "name",
        "endpoint",
        "sk",
        "type",
        "timeout",
        "stream_timeout",
        "allow",
        "deny",
        "authorization",
        "noauth",
        "keep_header",
        "weight",
        "stream_usage",
    }
)
_RECORDS_KEYS = frozenset(
    {
        "body",
        "response",
        "headers",
        "max_field_bytes",
        "file",
        "rotate",
        "redis_key",
        "redis_maxlen",
        "spool_dir",
        "queue_size",
    }
)
_NOTIFY_KEYS = frozenset({"feishu", "matrix", "min_interval", "timeout"})
_FEISHU_KEYS = frozenset({"webhook", "secret"})
_MATRIX_KEYS = frozenset({"homeserver", "access_token", "room_id"})
_PRICE_KEYS = frozenset({"input", "output"})

_UPSTREAM_TYPES = ("openai",)
_LATER_UPSTREAM_TYPES = ("replicate",)
_LB_POLICIES = ("order", "random")
_LATER_LB_POLICIES = ("round_robin", "weighted", "least_latency")
_DBTYPES = ("sqlite", "postgres", "none")

_TAG_NULL = "tag:yaml.org,2002:null"
_TAG_BOOL = "tag:yaml.org,2002:bool"
_TAG_INT = "tag:yaml.org,2002:int"
_TAG_FLOAT = "tag:yaml.org,2002:float"
_TAG_STR = "tag:yaml.org,2002:str"
_TAG_TIMESTAMP = "tag:yaml.org,2002:timestamp"
_TAG_MERGE = "tag:yaml.org,2002:merge"
# Scalars whose text a string setting takes as is (see the module docstring).
_TEXT_TAGS = frozenset({_TAG_STR, _TAG_INT, _TAG_FLOAT, _TAG_BOOL, _TAG_TIMESTAMP})
_STR_ONLY = frozenset({_TAG_STR})

_VAR_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_WHOLE_VAR = re.compile(r"\$\{[A-Za-z_][A-Za-z0-9_]*\}\Z")
_INTERPOLATION = re.compile(r"\$\$\{|\$\{(?P<name>[^}]*)(?P<close>\}?)")

_TRUE_WORDS = frozenset({"true", "yes", "on", "1"})
_FALSE_WORDS = frozenset({"false", "no", "off", "0"})

_SIZE = re.compile(r"(?P<number>[0-9]+)\s*(?P<unit>[kmgt]?i?b?)\Z", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}

# Server endpoint types Twisted ships a parser for (twisted.internet.endpoints
# and its plugins); anything else is far more likely a typo than a plugin.
_ENDPOINT_TYPES = ("tcp", "tcp6", "ssl", "unix", "systemd")
# openai-api-route's Go listen address: ":8888", "0.0.0.0:8080", "[::1]:80".
_HOST_PORT = re.compile(r"(?P<host>\[[^\]]*\]|[^:\[\]]*):(?P<port>[0-9]+)\Z")


def key_fingerprint(secret: str) -> str:
    """The name of a client key given without one: ``"key-"`` and the first 8
    hex digits of its SHA-256, stable across restarts and safe to log.
    """
    return "key-" + hashlib.sha256(secret.encode("utf-8")).hexdigest()[:8]


def parse_size(text: str) -> int:
    """A byte count such as ``"100MB"``, ``"10KB"``, ``"1G"``, ``"512KiB"`` or
    ``"1048576"``.  Units are binary (1KB = 1024 bytes), as in logrotate.

    Raises ``ValueError`` when ``text`` is not a positive size.
    """
    match = _SIZE.match(text.strip())
    if match is None:
        raise ValueError("expected a size such as 100MB, 10KB or a number of bytes")
    unit = match.group("unit").lower()
    if unit in ("ib", "i"):
        raise ValueError("expected a size such as 100MB, 10KB or a number of bytes")
    size = int(match.group("number")) * _SIZE_UNITS[unit[:1] if unit != "b" else ""]
    if size <= 0:
        raise ValueError("a size must be greater than 0")
    return size


def _split_endpoint(description: str) -> tuple[list[str], dict[str, str]]:
    """Split a Twisted endpoint string the way
    ``twisted.internet.endpoints._tokenize`` does: ``:`` separates arguments,
    the first ``=`` of an argument makes it a keyword, ``\\`` escapes.
    """
    args: list[str] = []
    kwargs: dict[str, str] = {}
    current = ""
    keyword: str | None = None
    chars = iter(description)
    for char in chars:
        if char == ":":
            if keyword is None:
                args.append(current)
            else:
                kwargs[keyword] = current
            current, keyword = "", None
        elif char == "=" and keyword is None:
            keyword, current = current, ""
        elif char == "\\":
            escaped = next(chars, None)
            if escaped is None:
                raise ValueError("endpoint ends with a lone backslash")
            current += escaped
        else:
            current += char
    if keyword is None:
        args.append(current)
    else:
        kwargs[keyword] = current
    return args, kwargs


def _escape_endpoint(value: str) -> str:
    return value.replace("\\", "\\\\").replace(":", "\\:").replace("=", "\\=")


def parse_listen(description: str) -> str:
    """Check a listen address and return it as a Twisted endpoint string.

    Twisted endpoint strings (``tcp:8888:interface=127.0.0.1``,
    ``unix:/run/oaproxy.sock``, ``systemd:domain=INET:index=0``, ``ssl:…``,
    ``tcp6:…``) are checked lightly and returned unchanged.  For
    openai-api-route compatibility, ``HOST:PORT`` becomes
    ``tcp:PORT:interface=HOST`` (``localhost`` becoming 127.0.0.1),
    ``[V6]:PORT`` becomes ``tcp6:PORT:interface=V6`` and ``:PORT`` (all
    interfaces) becomes ``tcp:PORT``.  Nothing is built or bound here.

    Raises ``ValueError``, with a one-line reason, when the address is not
    valid.
    """
    description = description.strip()
    if not description:
        raise ValueError("empty listen address")
    compat = _HOST_PORT.match(description)
    if compat is not None and _is_compat_host(compat.group("host")):
        port = _port(compat.group("port"))
        host = compat.group("host")
        if host == "":
            return f"tcp:{port}"
        if host.startswith("["):
            inner = host[1:-1]
            try:
                ipaddress.IPv6Address(inner.split("%", 1)[0])
            except ValueError:
                raise ValueError(f"{description!r}: bad IPv6 address in brackets") from None
            return f"tcp6:{port}:interface={_escape_endpoint(inner)}"
        if host.lower() == "localhost":
            host = "127.0.0.1"
        return f"tcp:{port}:interface={_escape_endpoint(host)}"

    args, kwargs = _split_endpoint(description)
    kind, positional = args[0], args[1:]
    if kind not in _ENDPOINT_TYPES:
        raise ValueError(
            f"{description!r}: unknown endpoint type {kind!r}; expected one of "
            f"{', '.join(_ENDPOINT_TYPES)}, or host:port"
        )
    if kind in ("tcp", "tcp6", "ssl"):
        if positional:
            if "port" in kwargs:
                raise ValueError(f"{description!r}: the port is given twice")
            port_text = positional[0]
        elif "port" in kwargs:
            port_text = kwargs["port"]
        else:
            raise ValueError(f"{description!r}: no port")
        try:
            _port(port_text)
        except ValueError as e:
            raise ValueError(f"{description!r}: {e}") from None
    elif kind == "unix":
        if not (positional and positional[0]) and not kwargs.get("address"):
            raise ValueError(f"{description!r}: no socket path")
    elif kind == "systemd" and (
        "domain" not in kwargs or not ("index" in kwargs or "name" in kwargs)
    ):
        raise ValueError(f"{description!r}: systemd endpoints need domain= and index= or name=")
    return description


def _is_compat_host(host: str) -> bool:
    """Whether ``host`` in ``host:port`` is a listen host rather than an endpoint
    type: empty, bracketed, an IP, ``localhost`` or a dotted name.  A bare
    word (``tpc:8080``) is taken for a mistyped endpoint type, not a host.
    """
    if host in ("", "localhost") or host.startswith("["):
        return True
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return "." in host
    return True


def _port(text: str) -> int:
    if not text.isdigit() or int(text) > 65535:
        raise ValueError("the port must be a number from 0 to 65535")
    return int(text)


def is_loopback_endpoint(desc: str) -> bool:
    """Whether a listen address (endpoint string or host:port form) accepts
    connections from this host only.

    TCP and TLS endpoints are loopback when their interface is 127.0.0.0/8,
    ::1 or ``localhost``; without an interface they listen on every
    interface.  UNIX sockets are local by nature.  Socket activation
    (``systemd:``) is treated as public: the socket's address is set in a unit
    file we cannot see.  Anything unparseable counts as public, so a mistake
    can only make the open-relay check stricter.
    """
    try:
        description = parse_listen(desc)
        args, kwargs = _split_endpoint(description)
    except ValueError:
        return False
    kind = args[0]
    if kind == "unix":
        return True
    if kind not in ("tcp", "tcp6", "ssl"):
        return False
    interface = kwargs.get("interface", "").strip()
    if interface.lower() == "localhost":
        return True
    try:
        address = ipaddress.ip_address(interface.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


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


def check_listeners(
    config: Config,
    listen: Sequence[str],
    *,
    key: str = "listen",
    line: int | None = None,
) -> None:
    """Refuse to run an open relay: with no client key anywhere and no
    ``noauth: true`` upstream, every listener must be loopback.

    Run at load time on ``listen:``, and again by the caller on a ``--listen``
    override (then ``key`` can name the option).

    Raises ``ConfigError``, naming the first public listener, otherwise.
    """
    if all_client_keys(config):
        return
    if any(upstream.noauth for upstream in config.upstreams):
        return
    for description in listen:
        if not is_loopback_endpoint(description):
            raise ConfigError(
                config.path,
                line,
                key,
                f"refusing to start an open relay: no client keys are configured "
                f"(authorization) and {description!r} is not a loopback listener; "
                f"add client keys, mark the upstreams meant to be public with "
                f"'noauth: true', or listen on 127.0.0.1",
            )


def load_config(path: str, environ: Mapping[str, str] | None = None) -> Config:
    """Read and check the configuration file at ``path``.

    ``environ`` holds the variables ``${NAME}`` refers to; ``os.environ`` by
    default.  Raises ``ConfigError`` for any problem, the file's
    unreadability included.
    """
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(
            path, None, "", f"cannot read the config file: {e.strerror or e}"
        ) from None
    except UnicodeDecodeError:
        raise ConfigError(path, None, "", "the config file is not UTF-8 text") from None
    return parse_config(text, path, environ)


def parse_config(text: str, path: str, environ: Mapping[str, str] | None = None) -> Config:
    """Check the configuration ``text``, read from ``path`` (used in messages and
    kept as ``Config.path``).  ``environ`` as for ``load_config``.

    Raises ``ConfigError`` for any problem.
    """
    if environ is None:
        environ = os.environ
    try:
        # The reader checks every character as it is built: inside the try.
        loader = yaml.SafeLoader(text)
    except yaml.YAMLError as e:
        raise _reader_error(path, text, e) from None
    try:
        try:
            root = loader.get_single_node()
        except yaml.MarkedYAMLError as e:
            raise _yaml_error(path, e) from None
        except yaml.YAMLError as e:
            raise _reader_error(path, text, e) from None
        if root is None:
            raise ConfigError(path, None, "", "the config file is empty")
        return _Parser(path, environ, loader).config(root)
    finally:
        loader.dispose()


def _reader_error(path: str, text: str, e: yaml.YAMLError) -> ConfigError:
    # Reader errors (forbidden characters) carry a position, not a mark.
    position = getattr(e, "position", None)
    line = None if position is None else text.count("\n", 0, position) + 1
    character = getattr(e, "character", None)
    reason = "a character YAML does not allow"
    if isinstance(character, int):
        reason += f" (#x{character:04x})"
    return ConfigError(path, line, "", f"not valid YAML: {reason}")


def _yaml_reason(e: yaml.YAMLError) -> str:
    # Only the problem texts: str(mark) would quote the line, maybe a secret.
    problem = getattr(e, "problem", None)
    context = getattr(e, "context", None)
    if problem is None:
        return type(e).__name__
    if context:
        return f"{problem} ({context})"
    return str(problem)


def _yaml_error(path: str, e: yaml.MarkedYAMLError) -> ConfigError:
    mark = e.problem_mark or e.context_mark
    line = None if mark is None else mark.line + 1
    return ConfigError(path, line, "", f"not valid YAML: {_yaml_reason(e)}")


@frozen
class _Item:
    """A YAML node with the path and line errors about it name."""

    key: str
    line: int
    node: yaml.Node


_T = TypeVar("_T")


@frozen
class _RawKey:
    """A client key as written, before its name is settled."""

    name: str | None
    secret: str = field(repr=False)
    key: str
    line: int


@frozen
class _ParsedUpstream:
    """An upstream before its name and keys can be settled."""

    upstream: Upstream
    keys: list[_RawKey] | None
    name: str | None
    name_item: _Item | None
    line: int


def _line(node: yaml.Node) -> int:
    return int(node.start_mark.line) + 1


def _child(parent: str, name: str) -> str:
    return f"{parent}.{name}" if parent else name


def _kind(node: yaml.Node) -> str:
    if isinstance(node, yaml.MappingNode):
        return "a mapping"
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    return {
        _TAG_NULL: "null",
        _TAG_BOOL: "a boolean",
        _TAG_INT: "an integer",
        _TAG_FLOAT: "a number",
        _TAG_STR: "a string",
        _TAG_TIMESTAMP: "a date",
    }.get(node.tag, f"a {node.tag} value")


class _Parser:
    def __init__(self, path: str, environ: Mapping[str, str], loader: yaml.SafeLoader) -> None:
        self.path = path
        self.environ = environ
        self.loader = loader

    # -- generic readers ---------------------------------------------------

    def fail(self, key: str, line: int | None, message: str) -> NoReturn:
        raise ConfigError(self.path, line, key, message)

    def is_null(self, item: _Item) -> bool:
        return isinstance(item.node, yaml.ScalarNode) and item.node.tag == _TAG_NULL

    def entries(self, item: _Item, what: str = "a mapping") -> list[tuple[str, _Item]]:
        """The (name, value) pairs of a mapping, refusing duplicate keys."""
        node = item.node
        if not isinstance(node, yaml.MappingNode):
            self.fail(item.key, item.line, f"expected {what}, got {_kind(node)}")
        # Duplicates among the keys written here are mistakes (PyYAML would
        # silently keep the last); keys brought in by a "<<" merge are meant
        # to be overridden, so the check comes before merging.
        seen: dict[str, int] = {}
        for key_node, _ in node.value:
            line = _line(key_node)
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == _TAG_NULL:
                self.fail(item.key, line, "mapping keys must be plain strings")
            if key_node.tag == _TAG_MERGE:
                continue
            name = str(key_node.value)
            if name in seen:
                self.fail(
                    _child(item.key, name),
                    line,
                    f"duplicate key (first given on line {seen[name]})",
                )
            seen[name] = line
        try:
            # Resolves "<<: *anchor" merges in place, keeping every mark.
            self.loader.flatten_mapping(node)
        except yaml.MarkedYAMLError as e:
            raise _yaml_error(self.path, e) from None
        result: dict[str, _Item] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == _TAG_NULL:
                self.fail(item.key, _line(key_node), "mapping keys must be plain strings")
            name = str(key_node.value)
            # After flattening, a later pair overrides an earlier one.
            result[name] = _Item(_child(item.key, name), _line(key_node), value_node)
        return list(result.items())

    def mapping(
        self, item: _Item, allowed: frozenset[str], what: str = "a mapping"
    ) -> dict[str, _Item]:
        result = {}
        for name, value in self.entries(item, what):
            if name not in allowed:
                message = f"unknown key {name!r}"
                close = get_close_matches(name, sorted(allowed), n=1)
                if close:
                    message += f" (did you mean {close[0]!r}?)"
                self.fail(value.key, value.line, message)
            result[name] = value
        return result

    def sequence(self, item: _Item, what: str = "a list") -> list[_Item]:
        node = item.node
        if not isinstance(node, yaml.SequenceNode):
            self.fail(item.key, item.line, f"expected {what}, got {_kind(node)}")
        return [_Item(f"{item.key}[{i}]", _line(sub), sub) for i, sub in enumerate(node.value)]

    def interpolate(self, item: _Item, text: str) -> str:
        def replace(match: re.Match[str]) -> str:
            if match.group(0) == "$${":
                return "${"
            name = match.group("name")
            if not match.group("close") or not _VAR_NAME.match(name):
                self.fail(
                    item.key,
                    item.line,
                    "bad '${NAME}' reference: NAME must be letters, digits and '_' "
                    "closed by '}' (write '$${' for a literal '${')",
                )
            try:
                return self.environ[name]
            except KeyError:
                self.fail(item.key, item.line, f"environment variable {name} is not set")

        return _INTERPOLATION.sub(replace, text)

    def string(
        self, item: _Item, what: str = "a string", tags: frozenset[str] = _TEXT_TAGS
    ) -> str | None:
        """A string setting, interpolated; None for null."""
        node = item.node
        if self.is_null(item):
            return None
        if not isinstance(node, yaml.ScalarNode) or node.tag not in tags:
            self.fail(item.key, item.line, f"expected {what}, got {_kind(node)}")
        return self.interpolate(item, str(node.value))

    def required_string(
        self, item: _Item, what: str = "a string", tags: frozenset[str] = _TEXT_TAGS
    ) -> str:
        value = self.string(item, what, tags)
        if value is None or not value.strip():
            self.fail(item.key, item.line, "must not be empty")
        return value

    def _from_variable(self, item: _Item) -> str | None:
        """The interpolated text when the whole scalar is one ${NAME}."""
        node = item.node
        if (
            isinstance(node, yaml.ScalarNode)
            and node.tag == _TAG_STR
            and _WHOLE_VAR.match(node.value)
        ):
            return self.interpolate(item, node.value).strip()
        return None

    def boolean(self, item: _Item) -> bool:
        node = item.node
        if isinstance(node, yaml.ScalarNode) and node.tag == _TAG_BOOL:
            return bool(self.loader.construct_object(node))
        text = self._from_variable(item)
        if text is not None:
            if text.lower() in _TRUE_WORDS:
                return True
            if text.lower() in _FALSE_WORDS:
                return False
            self.fail(
                item.key,
                item.line,
                "expected true or false in the environment variable",
            )
        self.fail(item.key, item.line, f"expected true or false, got {_kind(node)}")

    def number(self, item: _Item, *, positive: bool = True) -> float:
        """A finite number, > 0 (or >= 0 when not ``positive``)."""
        node = item.node
        value: float
        if isinstance(node, yaml.ScalarNode) and node.tag in (_TAG_INT, _TAG_FLOAT):
            value = float(self.loader.construct_object(node))
        else:
            text = self._from_variable(item)
            if text is None:
                self.fail(item.key, item.line, f"expected a number, got {_kind(node)}")
            try:
                value = float(text)
            except ValueError:
                self.fail(item.key, item.line, "expected a number in the environment variable")
        if not math.isfinite(value):
            self.fail(item.key, item.line, "must be a finite number")
        if positive and value <= 0:
            self.fail(item.key, item.line, "must be greater than 0")
        if value < 0:
            self.fail(item.key, item.line, "must not be negative")
        return value

    def deadline(self, item: _Item) -> float:
        """A deadline in seconds; 0 means "not set", as in openai-api-route,
        whose zero value let the default (or the top-level value) apply."""
        return self.number(item, positive=False)

    def integer(self, item: _Item) -> int:
        """An integer > 0."""
        node = item.node
        value: int
        if isinstance(node, yaml.ScalarNode) and node.tag == _TAG_INT:
            value = int(self.loader.construct_object(node))
        else:
            text = self._from_variable(item)
            if text is None:
                self.fail(item.key, item.line, f"expected an integer, got {_kind(node)}")
            try:
                value = int(text, 10)
            except ValueError:
                self.fail(
                    item.key,
                    item.line,
                    "expected an integer in the environment variable",
                )
        if value <= 0:
            self.fail(item.key, item.line, "must be greater than 0")
        return value

    def strings(self, item: _Item) -> tuple[str, ...]:
        """A list of non-empty strings; one string is a one-item list."""
        if self.is_null(item):
            return ()
        if isinstance(item.node, yaml.SequenceNode):
            parts = self.sequence(item)
        else:
            parts = [item]
        result = []
        for part in parts:
            # Strict here: "allow: 3" is far likelier a slip than a model named 3.
            value = self.required_string(part, "a string or a list of strings", _STR_ONLY)
            result.append(value.strip())
        return tuple(result)

    def choice(self, item: _Item, allowed: Sequence[str], later: Sequence[str] = ()) -> str:
        value = self.required_string(item).strip()
        if value in later:
            self.fail(item.key, item.line, f"{value!r} is not supported yet")
        if value not in allowed:
            self.fail(
                item.key,
                item.line,
                f"unknown value {value!r}; expected one of: {', '.join(allowed)}",
            )
        return value

    def url(self, item: _Item, schemes: Sequence[str]) -> str:
        value = self.required_string(item).strip()
        try:
            parts = urlsplit(value)
            parts.port  # noqa: B018 -- raises ValueError on a bad port
        except ValueError:
            self.fail(item.key, item.line, "not a valid URL")
        if parts.scheme.lower() not in schemes:
            self.fail(
                item.key,
                item.line,
                f"must be a URL starting with {' or '.join(s + '://' for s in schemes)}",
            )
        if not parts.hostname:
            self.fail(item.key, item.line, "the URL has no host")
        return value

    def get(
        self,
        section: Mapping[str, _Item],
        name: str,
        read: Callable[[_Item], _T],
        default: _T,
    ) -> _T:
        item = section.get(name)
        if item is None or self.is_null(item):
            return default
        return read(item)

    # -- the sections ------------------------------------------------------

    def config(self, root: yaml.Node) -> Config:
        top_item = _Item("", _line(root), root)
        top = self.mapping(top_item, _TOP_KEYS, "a mapping of settings at the top level")

        def optional_secret(item: _Item) -> str | None:
            # An empty admin or metrics key would be a guessable credential:
            # empty means off, like an absent one.
            return self.string(item) or None

        listen, listen_item = self.listen(top)
        hostname = self.get(top, "hostname", self.required_string, None)
        global_keys = self.get(top, "authorization", lambda i: self.raw_keys(i, scoped=False), None)

        timeout = self.get(top, "timeout", self.deadline, 0.0) or 120.0
        stream_timeout = self.get(top, "stream_timeout", self.deadline, 0.0) or 10.0
        stream_idle_timeout = self.get(top, "stream_idle_timeout", self.number, 120.0)
        shutdown_timeout = self.get(
            top, "shutdown_timeout", lambda i: self.number(i, positive=False), 30.0
        )
        lb_policy = self.get(
            top,
            "lb_policy",
            lambda i: self.choice(i, _LB_POLICIES, _LATER_LB_POLICIES),
            "order",
        )
        dbtype = self.get(top, "dbtype", lambda i: self.choice(i, _DBTYPES), "sqlite")
        dbaddr = self.dbaddr(top, dbtype)
        redis = self.get(top, "redis", self.redis_url, None)
        max_body_bytes = self.get(top, "max_body_bytes", self.integer, 64 * 1024 * 1024)
        trusted_proxies = self.get(top, "trusted_proxies", self.networks, DEFAULT_TRUSTED_PROXIES)
        records = self.get(top, "records", self.records, RecordsPolicy())
        notify = self.get(top, "notify", self.notify, NotifyConfig(None, None))
        prices: dict[str, Price] = self.get(top, "prices", self.prices, {})

        upstreams_item = top.get("upstreams")
        if upstreams_item is None:
            self.fail("upstreams", None, "no upstreams are configured")
        if self.is_null(upstreams_item):
            self.fail("upstreams", upstreams_item.line, "no upstreams are configured")
        upstream_items = self.sequence(upstreams_item, "a list of upstreams")
        if not upstream_items:
            self.fail("upstreams", upstreams_item.line, "no upstreams are configured")
        parsed = [self.upstream(item, timeout, stream_timeout) for item in upstream_items]

        names = self.resolve_keys([global_keys or []] + [p.keys or [] for p in parsed])

        def client_keys(raw: list[_RawKey]) -> tuple[ClientKey, ...]:
            seen: dict[str, ClientKey] = {}
            for r in raw:
                seen.setdefault(r.secret, ClientKey(names[r.secret], r.secret))
            return tuple(seen.values())

        upstreams = tuple(
            evolve(
                p.upstream,
                name=name,
                keys=None if p.keys is None else client_keys(p.keys),
            )
            for p, name in zip(parsed, self.upstream_names(parsed))
        )

        config = Config(
            path=self.path,
            listen=listen,
            hostname=(hostname or "").strip() or socket.gethostname(),
            keys=client_keys(global_keys or []),
            admin_key=self.get(top, "admin_key", optional_secret, None),
            metrics_key=self.get(top, "metrics_key", optional_secret, None),
            timeout=timeout,
            stream_timeout=stream_timeout,
            stream_idle_timeout=stream_idle_timeout,
            lb_policy=lb_policy,
            dbtype=dbtype,
            dbaddr=dbaddr,
            redis=redis,
            max_body_bytes=max_body_bytes,
            trusted_proxies=trusted_proxies,
            shutdown_timeout=shutdown_timeout,
            log_file=self.get(top, "log_file", self.string, None) or None,
            records=records,
            notify=notify,
            prices=MappingProxyType(prices),
            upstreams=upstreams,
        )
        if listen_item is None:
            check_listeners(config, config.listen)
        else:
            check_listeners(config, config.listen, key=listen_item.key, line=listen_item.line)
        return config

    def listen(self, top: Mapping[str, _Item]) -> tuple[tuple[str, ...], _Item | None]:
        if "listen" in top and "address" in top:
            second = max(top["listen"], top["address"], key=lambda item: item.line)
            self.fail(
                second.key,
                second.line,
                "give either 'listen' or 'address' (openai-api-route's name for it), not both",
            )
        item = top.get("listen") or top.get("address")
        if item is None or self.is_null(item):
            return DEFAULT_LISTEN, item
        descriptions = self.strings(item)
        if not descriptions:
            self.fail(item.key, item.line, "no listen address")
        parts = self.sequence(item) if isinstance(item.node, yaml.SequenceNode) else [item]
        result = []
        for part, description in zip(parts, descriptions):
            try:
                result.append(parse_listen(description))
            except ValueError as e:
                self.fail(part.key, part.line, str(e))
        return tuple(result), item

    def dbaddr(self, top: Mapping[str, _Item], dbtype: str) -> str:
        item = top.get("dbaddr")
        value = None if item is None else self.string(item)
        if dbtype != "postgres":
            return value.strip() if value and value.strip() else "./db.sqlite"
        if not value or not value.strip():
            self.fail(
                "dbaddr",
                item.line if item is not None else top["dbtype"].line,
                "dbtype postgres needs a dbaddr (a libpq DSN or a postgresql:// URL)",
            )
        value = value.strip()
        assert item is not None
        if value.startswith(("postgres://", "postgresql://")):
            return value
        # libpq keyword/value form: "host=… port=… dbname=…".
        if not re.match(r"[A-Za-z_]+\s*=", value):
            self.fail(
                item.key,
                item.line,
                "expected a libpq DSN (host=… dbname=…) or a postgresql:// URL",
            )
        return value

    def redis_url(self, item: _Item) -> str:
        value = self.url(item, ("redis",))
        path = urlsplit(value).path
        if path not in ("", "/") and not re.fullmatch(r"/[0-9]+", path):
            self.fail(
                item.key,
                item.line,
                "the database after the host must be a number, e.g. redis://127.0.0.1:6379/0",
            )
        return value

    def networks(self, item: _Item) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        parts = self.sequence(item) if isinstance(item.node, yaml.SequenceNode) else [item]
        result = []
        for part in parts:
            value = self.required_string(part, "an address or a CIDR network", _STR_ONLY).strip()
            try:
                result.append(ipaddress.ip_network(value, strict=False))
            except ValueError:
                self.fail(
                    part.key,
                    part.line,
                    f"{value!r} is not an IP address or CIDR network",
                )
        return tuple(result)

    def raw_keys(self, item: _Item, *, scoped: bool) -> list[_RawKey] | None:
        """Client keys as written: a comma string (openai-api-route), a list, or
        {name: key}.  None when there are none: for an upstream that means
        "the global keys apply", as in openai-api-route.
        """
        node = item.node
        if self.is_null(item):
            return None
        result: list[_RawKey] = []
        if isinstance(node, yaml.MappingNode):
            for name, value in self.entries(item, "client keys"):
                if not name.strip():
                    self.fail(value.key, value.line, "a key name must not be empty")
                secret = self.required_string(value).strip()
                result.append(_RawKey(name.strip(), secret, value.key, value.line))
        elif isinstance(node, yaml.SequenceNode):
            for part in self.sequence(item):
                secret = self.required_string(part).strip()
                result.append(_RawKey(None, secret, part.key, part.line))
        else:
            text = self.string(item, "a comma-separated string, a list or a mapping of client keys")
            assert text is not None
            for secret in (s.strip() for s in text.split(",")):
                if secret:
                    result.append(_RawKey(None, secret, item.key, item.line))
            if not result:
                if scoped and str(node.value).strip():
                    # Written but empty after ${…}: silently widening the
                    # upstream to the global keys would be a surprise.
                    self.fail(item.key, item.line, "no client key left after interpolation")
                return None
        return result or None

    def resolve_keys(self, groups: Iterable[list[_RawKey]]) -> dict[str, str]:
        """Give each secret its one name; refuse one key under two names."""
        by_secret: dict[str, _RawKey] = {}
        by_name: dict[str, _RawKey] = {}
        everything = [r for group in groups for r in group]
        for r in everything:
            if r.name is None:
                continue
            other = by_secret.get(r.secret)
            if other is not None and other.name != r.name:
                self.fail(
                    r.key,
                    r.line,
                    f"this key is already named {other.name!r} on line {other.line}",
                )
            other = by_name.get(r.name)
            if other is not None and other.secret != r.secret:
                self.fail(
                    r.key,
                    r.line,
                    f"the name {r.name!r} is already used for another key on line {other.line}",
                )
            by_secret.setdefault(r.secret, r)
            by_name.setdefault(r.name, r)
        names: dict[str, str] = {}
        for r in everything:
            if r.secret in names:
                continue
            named = by_secret.get(r.secret)
            if named is not None and named.name is not None:
                names[r.secret] = named.name
                continue
            name = key_fingerprint(r.secret)
            if name in by_name:
                self.fail(
                    r.key,
                    r.line,
                    f"this key's fingerprint name {name!r} is used as a name on line {by_name[name].line}",
                )
            names[r.secret] = name
        return names

    def upstream(self, item: _Item, timeout: float, stream_timeout: float) -> _ParsedUpstream:
        section = self.mapping(item, _UPSTREAM_KEYS, "an upstream mapping")

        # The type first: openai-api-route's replicate upstreams have no
        # endpoint, and "not supported yet" is the message that helps there.
        upstream_type = self.get(section, "type", self.upstream_type, "openai")

        endpoint_item = section.get("endpoint")
        if endpoint_item is None:
            self.fail(_child(item.key, "endpoint"), item.line, "upstream has no endpoint")
        if self.is_null(endpoint_item):
            self.fail(endpoint_item.key, endpoint_item.line, "upstream has no endpoint")
        endpoint = self.url(endpoint_item, ("http", "https"))
        parts = urlsplit(endpoint)
        if parts.query or parts.fragment or endpoint.endswith(("?", "#")):
            # The request path is appended to the endpoint: a query would break it.
            self.fail(
                endpoint_item.key,
                endpoint_item.line,
                "the endpoint must not have a query or fragment",
            )
        endpoint = endpoint.rstrip("/")

        name_item = section.get("name")
        if name_item is not None and self.is_null(name_item):
            name_item = None
        explicit_name = None if name_item is None else self.required_string(name_item).strip()

        upstream = Upstream(
            name="",  # set once every upstream is known (defaults must be unique)
            endpoint=endpoint,
            sk=self.get(section, "sk", self.string, None) or None,
            type=upstream_type,
            timeout=self.get(section, "timeout", self.deadline, 0.0) or timeout,
            stream_timeout=self.get(section, "stream_timeout", self.deadline, 0.0)
            or stream_timeout,
            allow=self.get(section, "allow", self.strings, ()),
            deny=self.get(section, "deny", self.strings, ()),
            keys=None,  # set once every key is known (names must agree)
            noauth=self.get(section, "noauth", self.boolean, False),
            keep_header=self.get(section, "keep_header", self.boolean, False),
            weight=self.get(section, "weight", self.number, 1.0),
            stream_usage=self.get(section, "stream_usage", self.boolean, upstream_type == "openai"),
        )
        keys = self.get(section, "authorization", lambda i: self.raw_keys(i, scoped=True), None)
        return _ParsedUpstream(upstream, keys, explicit_name, name_item, item.line)

    def upstream_type(self, item: _Item) -> str:
        value = self.required_string(item).strip()
        if value in _LATER_UPSTREAM_TYPES:
            self.fail(item.key, item.line, f"type {value!r} is not supported yet")
        if value not in _UPSTREAM_TYPES:
            self.fail(
                item.key,
                item.line,
                f"unknown type {value!r}; expected one of: {', '.join(_UPSTREAM_TYPES)}",
            )
        return value

    def upstream_names(self, parsed: Sequence[_ParsedUpstream]) -> list[str]:
        used: dict[str, int] = {}
        for p in parsed:
            if p.name is None or p.name_item is None:
                continue
            if p.name in used:
                self.fail(
                    p.name_item.key,
                    p.name_item.line,
                    f"upstream name {p.name!r} is already used on line {used[p.name]}",
                )
            used[p.name] = p.name_item.line
        result = []
        for p in parsed:
            name = p.name
            if name is None:
                # netloc keeps an explicit port and IPv6 brackets; drop userinfo.
                base = urlsplit(p.upstream.endpoint).netloc.rpartition("@")[2].lower()
                name, n = base, 1
                while name in used:
                    n += 1
                    name = f"{base}#{n}"
                used[name] = p.line
            result.append(name)
        return result

    def records(self, item: _Item) -> RecordsPolicy:
        section = self.mapping(item, _RECORDS_KEYS, "a mapping of record settings")
        default = RecordsPolicy()

        def text(i: _Item) -> str:
            return self.required_string(i).strip()

        return RecordsPolicy(
            body=self.get(section, "body", self.boolean, default.body),
            response=self.get(section, "response", self.boolean, default.response),
            headers=self.get(section, "headers", self.boolean, default.headers),
            max_field_bytes=self.get(
                section, "max_field_bytes", self.integer, default.max_field_bytes
            ),
            file=self.get(section, "file", self.string, None) or None,
            rotate=self.get(section, "rotate", self.rotate, default.rotate),
            redis_key=self.get(section, "redis_key", text, default.redis_key),
            redis_maxlen=self.get(section, "redis_maxlen", self.integer, default.redis_maxlen),
            spool_dir=self.get(section, "spool_dir", text, default.spool_dir),
            queue_size=self.get(section, "queue_size", self.integer, default.queue_size),
        )

    def rotate(self, item: _Item) -> str:
        value = self.required_string(item).strip()
        if value.lower() == "daily":
            return "daily"
        try:
            parse_size(value)
        except ValueError as e:
            self.fail(item.key, item.line, f"expected 'daily' or a size: {e}")
        return value

    def notify(self, item: _Item) -> NotifyConfig:
        section = self.mapping(item, _NOTIFY_KEYS, "a mapping of alert settings")
        feishu = None
        if "feishu" in section and not self.is_null(section["feishu"]):
            sub = self.mapping(section["feishu"], _FEISHU_KEYS, "a mapping with webhook and secret")
            if "webhook" not in sub:
                self.fail(
                    _child(section["feishu"].key, "webhook"),
                    section["feishu"].line,
                    "feishu needs a webhook",
                )
            secret = self.string(sub["secret"]) if "secret" in sub else None
            feishu = FeishuConfig(self.url(sub["webhook"], ("http", "https")), secret or None)
        matrix = None
        if "matrix" in section and not self.is_null(section["matrix"]):
            matrix_item = section["matrix"]
            sub = self.mapping(
                matrix_item,
                _MATRIX_KEYS,
                "a mapping with homeserver, access_token and room_id",
            )
            for name in ("homeserver", "access_token", "room_id"):
                if name not in sub:
                    self.fail(
                        _child(matrix_item.key, name),
                        matrix_item.line,
                        f"matrix needs {name}",
                    )
            matrix = MatrixConfig(
                homeserver=self.url(sub["homeserver"], ("http", "https")).rstrip("/"),
                access_token=self.required_string(sub["access_token"]).strip(),
                room_id=self.required_string(sub["room_id"]).strip(),
            )
        return NotifyConfig(
            feishu=feishu,
            matrix=matrix,
            min_interval=self.get(
                section, "min_interval", lambda i: self.number(i, positive=False), 60.0
            ),
            timeout=self.get(section, "timeout", self.number, 10.0),
        )

    def prices(self, item: _Item) -> dict[str, Price]:
        result = {}
        for model, entry in self.entries(item, "a mapping of model names to prices"):
            section = self.mapping(entry, _PRICE_KEYS, "a mapping with input and output")
            values = {}
            for name in ("input", "output"):
                if name not in section or self.is_null(section[name]):
                    self.fail(
                        _child(entry.key, name),
                        entry.line,
                        f"the price needs {name} (per million tokens)",
                    )
                values[name] = self.number(section[name], positive=False)
            result[model] = Price(**values)
        return result
