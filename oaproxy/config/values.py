"""The kinds of value a setting holds, each read from a node.

A reader is a function ``(nodes, item) -> value``, named in the model's
field metadata (``read(boolean)``).  It is called for keys given a value
other than null; returning ``None`` means "not set": the field's default
applies, as for a key left out.
"""

from __future__ import annotations

import enum
import ipaddress
import math
import re
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any, TypeAlias, TypeVar
from urllib.parse import SplitResult, unquote, urlsplit

import yaml

from oaproxy.config.nodes import (
    BOOLEAN_TAGS,
    INTEGER_TAGS,
    NUMBER_TAGS,
    STRING_TAGS,
    Item,
    NodeReader,
    kind,
)
from oaproxy.upstreamclient.proxy import HTTPProxy

Reader: TypeAlias = Callable[[NodeReader, Item], Any]
_E = TypeVar("_E", bound=enum.Enum)

_TRUE_WORDS = frozenset({"true", "yes", "on", "1"})
_FALSE_WORDS = frozenset({"false", "no", "off", "0"})

_SIZE = re.compile(r"(?P<number>[0-9]+)\s*(?P<unit>[kmgt]?i?b?)\Z", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}

_HTTP = ("http", "https")


def text(nodes: NodeReader, item: Item) -> str:
    """Non-empty text, stripped."""
    return nodes.required_string(item).strip()


def optional_text(nodes: NodeReader, item: Item) -> str | None:
    """Text as written; empty text is not set (``sk: ""``, an empty
    ``${ADMIN}``: an empty credential would be a guessable one)."""
    return nodes.string(item) or None


def boolean(nodes: NodeReader, item: Item) -> bool:
    value = nodes.scalar(item, BOOLEAN_TAGS)
    if value is not None:
        return bool(value)
    variable = nodes.variable(item)
    if variable is not None:
        if variable.lower() in _TRUE_WORDS:
            return True
        if variable.lower() in _FALSE_WORDS:
            return False
        nodes.fail(item.key, item.line, "expected true or false in the environment variable")
    nodes.fail(item.key, item.line, f"expected true or false, got {kind(item.node)}")


def number(nodes: NodeReader, item: Item, *, positive: bool = True) -> float:
    """A finite number, > 0 (or >= 0 when not ``positive``)."""
    constructed = nodes.scalar(item, NUMBER_TAGS)
    value: float
    if constructed is not None:
        value = float(constructed)
    else:
        variable = nodes.variable(item)
        if variable is None:
            nodes.fail(item.key, item.line, f"expected a number, got {kind(item.node)}")
        try:
            value = float(variable)
        except ValueError:
            nodes.fail(item.key, item.line, "expected a number in the environment variable")
    if not math.isfinite(value):
        nodes.fail(item.key, item.line, "must be a finite number")
    if positive and value <= 0:
        nodes.fail(item.key, item.line, "must be greater than 0")
    if value < 0:
        nodes.fail(item.key, item.line, "must not be negative")
    return value


def non_negative(nodes: NodeReader, item: Item) -> float:
    """A finite number >= 0."""
    return number(nodes, item, positive=False)


def deadline(nodes: NodeReader, item: Item) -> float | None:
    """A deadline in seconds; 0 means "not set", as in openai-api-route,
    whose zero value let the default (or the top-level value) apply."""
    return non_negative(nodes, item) or None


def integer(nodes: NodeReader, item: Item) -> int:
    """An integer > 0."""
    constructed = nodes.scalar(item, INTEGER_TAGS)
    value: int
    if constructed is not None:
        value = int(constructed)
    else:
        variable = nodes.variable(item)
        if variable is None:
            nodes.fail(item.key, item.line, f"expected an integer, got {kind(item.node)}")
        try:
            value = int(variable, 10)
        except ValueError:
            nodes.fail(item.key, item.line, "expected an integer in the environment variable")
    if value <= 0:
        nodes.fail(item.key, item.line, "must be greater than 0")
    return value


def count(nodes: NodeReader, item: Item) -> int:
    """An integer >= 0 (``retries: 0``)."""
    if nodes.scalar(item, INTEGER_TAGS) == 0 or nodes.variable(item) == "0":
        return 0
    return integer(nodes, item)


def json_members(nodes: NodeReader, item: Item) -> Mapping[str, Any]:
    """A mapping whose values are JSON values (members added to a request
    body), read-only; strings are interpolated like any other."""
    result = {}
    for name, value in nodes.entries(item, "a mapping of JSON body members"):
        result[name] = _json_value(nodes, value)
    return MappingProxyType(result)


def _json_value(nodes: NodeReader, item: Item) -> Any:
    node = item.node
    if isinstance(node, yaml.MappingNode):
        return {name: _json_value(nodes, value) for name, value in nodes.entries(item)}
    if isinstance(node, yaml.SequenceNode):
        return [_json_value(nodes, part) for part in nodes.sequence(item)]
    if nodes.is_null(item):
        return None
    for tags in (BOOLEAN_TAGS, INTEGER_TAGS, NUMBER_TAGS):
        value = nodes.scalar(item, tags)
        if value is not None:
            if isinstance(value, float) and not math.isfinite(value):
                nodes.fail(item.key, item.line, "must be a finite number")
            return value
    return nodes.string(item, "a JSON value")


def strings(nodes: NodeReader, item: Item) -> tuple[str, ...]:
    """A list of non-empty strings, stripped; one string is a one-item list."""
    if nodes.is_null(item):
        return ()
    return tuple(
        nodes.required_string(part, "a string or a list of strings", STRING_TAGS).strip()
        for part in nodes.as_list(item)
    )


def one_of(allowed: Sequence[str], noun: str | None = None) -> Reader:
    """A reader of one of the words ``allowed``.  ``noun`` names the setting
    in the messages ("unknown type 'x'"); without it they say "value"."""

    def choice(nodes: NodeReader, item: Item) -> str:
        value = nodes.required_string(item).strip()
        if value not in allowed:
            nodes.fail(
                item.key,
                item.line,
                f"unknown {noun or 'value'} {value!r}; expected one of: {', '.join(allowed)}",
            )
        return value

    return choice


def member_of(kind: type[_E], noun: str | None = None) -> Callable[[NodeReader, Item], _E]:
    """A reader of one member of the enum ``kind``, given by its value (its
    word); ``noun`` as for ``one_of``."""
    word = one_of([member.value for member in kind], noun)

    def choice(nodes: NodeReader, item: Item) -> _E:
        return kind(word(nodes, item))

    return choice


def _split_url(nodes: NodeReader, item: Item, value: str) -> SplitResult:
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 -- raises ValueError on a bad port
    except ValueError:
        nodes.fail(item.key, item.line, "not a valid URL")
    return parts


def url(nodes: NodeReader, item: Item, schemes: Sequence[str]) -> str:
    """A URL with one of ``schemes`` and a host, stripped, else unchanged."""
    value = nodes.required_string(item).strip()
    parts = _split_url(nodes, item, value)
    if parts.scheme.lower() not in schemes:
        nodes.fail(
            item.key,
            item.line,
            f"must be a URL starting with {' or '.join(s + '://' for s in schemes)}",
        )
    if not parts.hostname:
        nodes.fail(item.key, item.line, "the URL has no host")
    return value


def http_url(nodes: NodeReader, item: Item, *, credentials: str = "") -> str:
    """An http(s) URL without user information: oaproxy would have to send
    it as a header, or a client would see it in an error. ``credentials``
    says where they go instead."""
    value = url(nodes, item, _HTTP)
    if "@" in urlsplit(value).netloc:
        # Never quoted: user information is a password more often than not.
        nodes.fail(
            item.key,
            item.line,
            "the URL must not hold user information (user:password@)" + credentials,
        )
    return value


def homeserver_url(nodes: NodeReader, item: Item) -> str:
    """An http(s) URL that API paths are appended to: no trailing ``/``."""
    return http_url(nodes, item).rstrip("/")


def endpoint_url(nodes: NodeReader, item: Item) -> str:
    """An upstream endpoint: an http(s) URL that the request path is
    appended to, so without a query or fragment, and no trailing ``/``."""
    value = http_url(nodes, item, credentials="; give the upstream's key as sk")
    parts = urlsplit(value)
    if parts.query or parts.fragment or value.endswith(("?", "#")):
        nodes.fail(item.key, item.line, "the endpoint must not have a query or fragment")
    return value.rstrip("/")


def proxy_url(nodes: NodeReader, item: Item) -> HTTPProxy | None:
    """An outbound proxy, ``http://[user:password@]host:port``, or ``none``
    (None): straight to the upstream."""
    value = nodes.required_string(item).strip()
    if value.lower() == "none":
        return None
    parts = _split_url(nodes, item, value)
    if parts.scheme.lower() != "http":
        nodes.fail(
            item.key,
            item.line,
            "must be none or an http://host:port URL (the proxy is spoken to in plain "
            "HTTP; https upstreams go through it in a CONNECT tunnel)",
        )
    if not parts.hostname:
        nodes.fail(item.key, item.line, "the proxy URL has no host")
    if parts.port is None:
        nodes.fail(item.key, item.line, "the proxy URL needs a port, e.g. http://127.0.0.1:3128")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        nodes.fail(item.key, item.line, "the proxy URL must not have a path, query or fragment")
    credentials = None
    if "@" in parts.netloc:
        credentials = f"{unquote(parts.username or '')}:{unquote(parts.password or '')}"
    return HTTPProxy(parts.hostname, parts.port, credentials)


def redis_url(nodes: NodeReader, item: Item) -> str:
    value = url(nodes, item, ("redis",))
    path = urlsplit(value).path
    if path not in ("", "/") and not re.fullmatch(r"/[0-9]+", path):
        nodes.fail(
            item.key,
            item.line,
            "the database after the host must be a number, e.g. redis://127.0.0.1:6379/0",
        )
    return value


def origins(nodes: NodeReader, item: Item) -> tuple[str, ...]:
    """Browser origins (``https://app.example``, ``http://localhost:3000``),
    or ``"*"`` alone for any; an empty list for none."""
    result = strings(nodes, item)
    for value in result:
        if value == "*":
            if len(result) > 1:
                nodes.fail(item.key, item.line, "'*' already lets in every origin: give it alone")
            continue
        parts = urlsplit(value)
        try:
            parts.port  # noqa: B018 -- raises ValueError on a bad port
        except ValueError:
            nodes.fail(item.key, item.line, f"{value!r} has a bad port")
        if (
            parts.scheme not in _HTTP
            or not parts.hostname
            or value != f"{parts.scheme}://{parts.netloc}"
            or value != value.lower()
        ):
            nodes.fail(
                item.key,
                item.line,
                f"{value!r} is not an origin: expected scheme://host[:port] in lower case,"
                " as browsers send it (no path, no trailing /), or '*'",
            )
    return result


def networks(
    nodes: NodeReader, item: Item
) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """IP networks in CIDR form; an address is a network of one."""
    result = []
    for part in nodes.as_list(item):
        value = nodes.required_string(part, "an address or a CIDR network", STRING_TAGS).strip()
        try:
            result.append(ipaddress.ip_network(value, strict=False))
        except ValueError:
            nodes.fail(part.key, part.line, f"{value!r} is not an IP address or CIDR network")
    return tuple(result)


def re2_patterns(nodes: NodeReader, item: Item) -> tuple[str, ...]:
    """Regular expressions in RE2 syntax, as written (not stripped: a space
    may be part of one); each is compiled here, so a bad one stops the load."""
    # Imported here: only a config with a content filter needs RE2.
    import re2

    options = re2.Options()
    options.log_errors = False
    result = []
    for part in nodes.as_list(item):
        pattern = nodes.required_string(part, "a pattern", STRING_TAGS)
        try:
            re2.compile(pattern, options)
        except re2.error as e:
            reason = e.args[0] if e.args else "invalid"
            if isinstance(reason, bytes):
                reason = reason.decode("utf-8", "replace")
            nodes.fail(part.key, part.line, f"not an RE2 pattern: {reason}")
        result.append(pattern)
    return tuple(result)


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


def rotation(nodes: NodeReader, item: Item) -> str:
    """When a file is rotated: ``daily``, or at a size (``parse_size``)."""
    value = text(nodes, item)
    if value.lower() == "daily":
        return "daily"
    try:
        parse_size(value)
    except ValueError as e:
        nodes.fail(item.key, item.line, f"expected 'daily' or a size: {e}")
    return value


# A route is one or more plain path segments; these first segments are taken.
_ROUTE_SEGMENT = re.compile(r"[A-Za-z0-9._~-]+\Z")
RESERVED_ROOTS = frozenset({"v1", "metrics", "healthz", "readyz", "admin"})


def route_prefix(nodes: NodeReader, item: Item) -> str:
    """A route prefix such as ``/ollama``: plain path segments, without a
    trailing ``/``, not starting with a path oaproxy serves itself."""
    return checked_route(nodes, item, text(nodes, item))


def checked_route(nodes: NodeReader, item: Item, value: str) -> str:
    """``value`` as a route prefix, or a failure at ``item``."""
    segments = value.rstrip("/").split("/")
    if (
        not value.startswith("/")
        or len(segments) < 2
        or not all(_ROUTE_SEGMENT.match(s) and s not in (".", "..") for s in segments[1:])
    ):
        nodes.fail(
            item.key,
            item.line,
            "a route is a path such as /ollama: '/' and segments of letters, digits, "
            "'.', '_', '~' or '-'",
        )
    if segments[1] in RESERVED_ROOTS:
        nodes.fail(item.key, item.line, f"/{segments[1]} is a path oaproxy serves itself")
    return "/".join(segments)


def aliases(nodes: NodeReader, item: Item) -> Mapping[str, str]:
    """``{client-facing model name: the upstream's own name}``."""
    result = {}
    for name, value in nodes.entries(item, "a mapping of model names to the upstream's names"):
        if not name.strip() or name.startswith("/"):
            nodes.fail(value.key, value.line, "an alias is a model name, not empty nor a path")
        result[name.strip()] = text(nodes, value)
    return MappingProxyType(result)
