"""The loader: a file's text in, a checked ``Config`` out.

The sections are read from the model (``schema.read_section``); what is
left here depends on more than one key: the client keys and their names
across all upstreams, upstream names, what an upstream inherits (timeouts,
proxy) and what its type asks (``settle_upstream``, which the store's
upstreams are read with too), ``dbaddr``'s dependence on ``dbtype``, and the
open-relay check once all is known.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping, Sequence
from types import MappingProxyType
from typing import Any
from urllib.parse import urlsplit

import attrs
import yaml
from attrs import frozen

from oaproxy.config.errors import ConfigError
from oaproxy.config.listen import check_listeners
from oaproxy.config.model import (
    POSTGRES,
    REPLICATE_ENDPOINT,
    CacheBackend,
    CacheConfig,
    ClientKey,
    Config,
    LimiterBackend,
    Limits,
    RouteSettings,
    Upstream,
    UpstreamType,
    key_fingerprint,
)
from oaproxy.config.nodes import Item, NodeReader, child_key, read_document
from oaproxy.config.schema import read_section, read_settings, section_items
from oaproxy.config.values import checked_route, proxy_url

__all__ = ["INHERITED", "load_config", "parse_config", "settle_upstream"]

#: The top-level settings an upstream without its own takes (its deadlines,
#: its retries and its way out).
INHERITED = ("timeout", "stream_timeout", "retries", "proxy")


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
    return read_document(text, path, os.environ if environ is None else environ, _config)


@frozen
class _RawKey:
    """A client key as written, before its name is settled."""

    name: str | None
    secret: str = attrs.field(repr=False)
    key: str
    line: int
    # The key's own limits, given as {name: {key: ..., rate_limit: ...}};
    # None when it was given as plain text.
    limits: dict[str, Any] | None = None


@frozen
class _ParsedUpstream:
    """An upstream before its name, keys and inherited timeouts are settled."""

    values: dict[str, Any]  # the fields the file gives, by attribute name
    items: dict[str, Item]  # the keys given, by attribute name
    keys: list[_RawKey] | None
    line: int


def _default(cls: type, name: str) -> Any:
    """The default the model declares for field ``name`` of ``cls``."""
    return attrs.fields_dict(cls)[name].default


def _config(nodes: NodeReader, root: Item) -> Config:
    items = section_items(nodes, root, Config, "a mapping of settings at the top level")
    values = read_settings(nodes, root, items, Config)
    global_keys = _raw_keys(nodes, items["keys"], scoped=False) if "keys" in items else None
    dbaddr = _dbaddr(nodes, items, values.get("dbtype"))
    if dbaddr is not None:
        values["dbaddr"] = dbaddr

    parsed = [_upstream(nodes, item) for item in _upstream_items(nodes, items.get("upstreams"))]
    groups = [global_keys or []] + [p.keys or [] for p in parsed]
    names = _key_names(nodes, groups)
    limits = _key_limits(nodes, groups)

    def client_keys(raw: list[_RawKey]) -> tuple[ClientKey, ...]:
        seen: dict[str, ClientKey] = {}
        for r in raw:
            seen.setdefault(
                r.secret, ClientKey(names[r.secret], r.secret, **limits.get(r.secret, {}))
            )
        return tuple(seen.values())

    inherited = {name: values.get(name, _default(Config, name)) for name in INHERITED}
    every_upstream = [
        Upstream(
            **{
                **inherited,
                **p.values,
                "name": name,
                "keys": None if p.keys is None else client_keys(p.keys),
            }
        )
        for p, name in zip(parsed, _upstream_names(nodes, parsed))
    ]
    upstreams = tuple(u for u in every_upstream if u.enabled)
    if not upstreams:
        nodes.fail("upstreams", items["upstreams"].line, "every upstream has enabled: false")
    if "routes" in items:
        values["routes"] = _routes(nodes, items["routes"], {u.route for u in every_upstream})
    _check_redis_backends(nodes, items, values)
    config = Config(
        path=nodes.path,
        keys=client_keys(global_keys or []),
        upstreams=upstreams,
        disabled_upstreams=tuple(u for u in every_upstream if not u.enabled),
        **values,
    )
    listen_item = items.get("listen")
    if listen_item is None:
        check_listeners(config, config.listen)
    else:
        check_listeners(config, config.listen, key=listen_item.key, line=listen_item.line)
    return config


def _check_redis_backends(
    nodes: NodeReader, items: Mapping[str, Item], values: Mapping[str, Any]
) -> None:
    """``limits.backend: redis``, ``cache.backend: redis`` and ``breaker.shared``
    keep their counters, entries and circuits in the top-level ``redis:``."""
    if values.get("redis"):
        return
    breaker = values.get("breaker")
    if breaker is not None and breaker.shared:
        nodes.fail(
            "breaker.shared",
            items["breaker"].line,
            "shared breakers keep their state in the top-level redis:, which is not set",
        )
    sections = (
        ("limits", Limits, LimiterBackend.REDIS, "a mapping of limit settings"),
        ("cache", CacheConfig, CacheBackend.REDIS, "a mapping of cache settings"),
    )
    for name, cls, redis, what in sections:
        settings = values.get(name)
        if settings is None or settings.backend is not redis:
            continue
        backend = section_items(nodes, items[name], cls, what)["backend"]
        nodes.fail(backend.key, backend.line, "backend redis needs the top-level redis: URL")


def _dbaddr(nodes: NodeReader, items: Mapping[str, Item], dbtype: str | None) -> str | None:
    """``dbaddr`` as ``dbtype`` needs it; None for the default."""
    item = items.get("dbaddr")
    value = None if item is None else nodes.string(item)
    if dbtype != POSTGRES:
        return value.strip() if value and value.strip() else None
    if not value or not value.strip():
        nodes.fail(
            "dbaddr",
            item.line if item is not None else items["dbtype"].line,
            "dbtype postgres needs a dbaddr (a libpq DSN or a postgresql:// URL)",
        )
    value = value.strip()
    assert item is not None
    if value.startswith(("postgres://", "postgresql://")):
        return value
    # libpq keyword/value form: "host=… port=… dbname=…".
    if not re.match(r"[A-Za-z_]+\s*=", value):
        nodes.fail(
            item.key,
            item.line,
            "expected a libpq DSN (host=… dbname=…) or a postgresql:// URL",
        )
    return value


def _raw_keys(nodes: NodeReader, item: Item, *, scoped: bool) -> list[_RawKey] | None:
    """Client keys as written: a comma string (openai-api-route), a list, or
    {name: key}.  None when there are none: for an upstream that means
    "the global keys apply", as in openai-api-route.
    """
    node = item.node
    if nodes.is_null(item):
        return None
    result: list[_RawKey] = []
    if isinstance(node, yaml.MappingNode):
        for name, value in nodes.entries(item, "client keys"):
            if not name.strip():
                nodes.fail(value.key, value.line, "a key name must not be empty")
            if isinstance(value.node, yaml.MappingNode):
                result.append(_key_with_limits(nodes, name.strip(), value))
                continue
            secret = nodes.required_string(value).strip()
            result.append(_RawKey(name.strip(), secret, value.key, value.line))
    elif isinstance(node, yaml.SequenceNode):
        for part in nodes.sequence(item):
            secret = nodes.required_string(part).strip()
            result.append(_RawKey(None, secret, part.key, part.line))
    else:
        text = nodes.string(item, "a comma-separated string, a list or a mapping of client keys")
        assert text is not None
        for secret in (s.strip() for s in text.split(",")):
            if secret:
                result.append(_RawKey(None, secret, item.key, item.line))
        if not result:
            if scoped and str(node.value).strip():
                # Written but empty after ${…}: silently widening the
                # upstream to the global keys would be a surprise.
                nodes.fail(item.key, item.line, "no client key left after interpolation")
            return None
    return result or None


def _key_with_limits(nodes: NodeReader, name: str, item: Item) -> _RawKey:
    """``{key: ..., rate_limit: ..., token_limit: ..., budget: ...}``."""
    given = section_items(
        nodes, item, ClientKey, "a client key mapping (key, rate_limit, token_limit, budget)"
    )
    settings = read_settings(nodes, item, given, ClientKey)
    secret = settings.pop("secret").strip()
    return _RawKey(name, secret, item.key, item.line, settings)


def _key_limits(nodes: NodeReader, groups: Iterable[list[_RawKey]]) -> dict[str, dict[str, Any]]:
    """Each secret's own limits; refuse two different sets for one key (a
    key may be listed under several upstreams, its limits only once)."""
    given: dict[str, _RawKey] = {}
    for r in (r for group in groups for r in group):
        if r.limits is None:
            continue
        other = given.get(r.secret)
        if other is not None and other.limits != r.limits:
            nodes.fail(r.key, r.line, f"this key's limits are already given on line {other.line}")
        given.setdefault(r.secret, r)
    return {secret: r.limits for secret, r in given.items() if r.limits is not None}


def _key_names(nodes: NodeReader, groups: Iterable[list[_RawKey]]) -> dict[str, str]:
    """Give each secret its one name; refuse one key under two names."""
    by_secret: dict[str, _RawKey] = {}
    by_name: dict[str, _RawKey] = {}
    everything = [r for group in groups for r in group]
    for r in everything:
        if r.name is None:
            continue
        other = by_secret.get(r.secret)
        if other is not None and other.name != r.name:
            nodes.fail(
                r.key,
                r.line,
                f"this key is already named {other.name!r} on line {other.line}",
            )
        other = by_name.get(r.name)
        if other is not None and other.secret != r.secret:
            nodes.fail(
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
            nodes.fail(
                r.key,
                r.line,
                f"this key's fingerprint name {name!r} is used as a name on line {by_name[name].line}",
            )
        names[r.secret] = name
    return names


def _upstream_items(nodes: NodeReader, item: Item | None) -> list[Item]:
    """The items of ``upstreams``, refusing a config without any."""
    if item is None:
        nodes.fail("upstreams", None, "no upstreams are configured")
    if nodes.is_null(item):
        nodes.fail("upstreams", item.line, "no upstreams are configured")
    items = nodes.sequence(item, "a list of upstreams")
    if not items:
        nodes.fail("upstreams", item.line, "no upstreams are configured")
    return items


def _upstream(nodes: NodeReader, item: Item) -> _ParsedUpstream:
    items = section_items(nodes, item, Upstream, "an upstream mapping")
    values = read_settings(nodes, item, items, Upstream)
    settle_upstream(nodes, item, items, values)
    keys = _raw_keys(nodes, items["keys"], scoped=True) if "keys" in items else None
    return _ParsedUpstream(values, items, keys, item.line)


def settle_upstream(
    nodes: NodeReader,
    item: Item,
    items: Mapping[str, Item],
    values: dict[str, Any],
    over: Upstream | None = None,
) -> None:
    """What an upstream mapping says beyond each key alone, into ``values``
    (its settings by attribute name): its own ``proxy`` (None for ``none``:
    direct), and what its type asks of ``endpoint`` and ``sk`` (replicate's
    endpoint has a default).  ``over``: the upstream these values change
    (the store's change of an upstream of the file), whose type, endpoint
    and sk stand where the values give none.
    """
    given = items.get("proxy")
    if given is not None and not nodes.is_null(given):
        values["proxy"] = proxy_url(nodes, given)
    base = {} if over is None else {"type": over.type, "endpoint": over.endpoint, "sk": over.sk}

    def current(name: str) -> Any:
        return values.get(name, base.get(name))

    kind = current("type") or UpstreamType.OPENAI
    if kind is UpstreamType.ECHO:
        # Given, they would say the answers come from somewhere: they do not.
        for key in ("endpoint", "sk"):
            if current(key) is not None:
                # The key given, or the type that makes it wrong.
                wrong = items.get(key) or items.get("type") or item
                nodes.fail(
                    wrong.key, wrong.line, f"an echo upstream answers by itself: it has no {key}"
                )
    elif current("endpoint") is None:
        if kind is not UpstreamType.REPLICATE:
            # Absent, the mapping is what lacks it; null, the key itself.
            endpoint = items.get("endpoint")
            line = item.line if endpoint is None else endpoint.line
            nodes.fail(child_key(item.key, "endpoint"), line, "upstream has no endpoint")
        values["endpoint"] = REPLICATE_ENDPOINT


def _routes(nodes: NodeReader, item: Item, served: set[str | None]) -> Mapping[str, RouteSettings]:
    """``routes:``, each prefix checked and served by some upstream."""
    result = {}
    for prefix, entry in nodes.entries(item, "a mapping of route prefixes to their settings"):
        route = checked_route(nodes, entry, prefix)
        if route not in served:
            nodes.fail(entry.key, entry.line, f"no upstream has route: {route}")
        result[route] = read_section(nodes, entry, RouteSettings, "a mapping of route settings")
    return MappingProxyType(result)


def _upstream_names(nodes: NodeReader, parsed: Sequence[_ParsedUpstream]) -> list[str]:
    """Each upstream's name: as given, else its endpoint's host, made unique."""
    used: dict[str, int] = {}
    for p in parsed:
        name = p.values.get("name")
        if name is None:
            continue
        item = p.items["name"]
        if name in used:
            nodes.fail(
                item.key, item.line, f"upstream name {name!r} is already used on line {used[name]}"
            )
        used[name] = item.line
    result = []
    for p in parsed:
        name = p.values.get("name")
        if name is None:
            endpoint = p.values.get("endpoint")
            # netloc keeps an explicit port and IPv6 brackets (and has no
            # user information: endpoint_url refuses it); echo has no endpoint.
            base = urlsplit(endpoint).netloc.lower() if endpoint else "echo"
            name, n = base, 1
            while name in used:
                n += 1
                name = f"{base}#{n}"
            used[name] = p.line
        result.append(name)
    return result
