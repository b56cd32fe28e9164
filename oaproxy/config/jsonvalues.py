"""Settings given as JSON (an admin API body, a row of the store) read by
the same readers as the file, so that they are checked exactly alike.

The JSON value is turned into the YAML nodes the file would have made for
it (a JSON string is a YAML string, ``1`` an integer, ``true`` a boolean),
and read by a ``NodeReader`` that takes text literally: ``${NAME}`` in a
JSON string is those characters, never an environment variable.  Errors are
``ConfigError``s whose ``key`` is the dotted path inside the value
(``budget.usd``) and whose ``path`` names where the value came from.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import yaml

from oaproxy.config.errors import ConfigError
from oaproxy.config.loader import settle_upstream
from oaproxy.config.model import Upstream
from oaproxy.config.nodes import Item, NodeReader
from oaproxy.config.schema import file_fields, read_settings, section_items

__all__ = ["read_json_section", "read_json_upstream"]

_T = TypeVar("_T")

_TAGS = {
    bool: "tag:yaml.org,2002:bool",
    int: "tag:yaml.org,2002:int",
    float: "tag:yaml.org,2002:float",
    str: "tag:yaml.org,2002:str",
}
_NULL = "tag:yaml.org,2002:null"
_MAP = "tag:yaml.org,2002:map"
_SEQ = "tag:yaml.org,2002:seq"
# JSON has no lines: every node is "line 1" of a one-line document.
_MARK = yaml.error.Mark("json", 0, 0, 0, "", 0)


class LiteralNodeReader(NodeReader):
    """A ``NodeReader`` of values given literally: no ``${NAME}``."""

    def interpolate(self, item: Item, text: str) -> str:
        return text

    def variable(self, item: Item) -> str | None:
        return None


def _node(value: Any) -> yaml.Node:
    if value is None:
        return yaml.ScalarNode(_NULL, "null", _MARK, _MARK)
    if isinstance(value, bool):
        return yaml.ScalarNode(_TAGS[bool], "true" if value else "false", _MARK, _MARK)
    if isinstance(value, (int, float, str)):
        return yaml.ScalarNode(_TAGS[type(value)], str(value), _MARK, _MARK)
    if isinstance(value, (list, tuple)):
        return yaml.SequenceNode(_SEQ, [_node(part) for part in value], _MARK, _MARK)
    if isinstance(value, Mapping):
        pairs = [(_node(str(name)), _node(part)) for name, part in value.items()]
        return yaml.MappingNode(_MAP, pairs, _MARK, _MARK)
    raise TypeError(f"not a JSON value: {type(value).__name__}")


def _read_given(nodes: NodeReader, items: Mapping[str, Item], cls: type) -> dict[str, Any]:
    """The values of the keys given, and only those; null ones are left out."""
    values = {}
    for field, _, setting in file_fields(cls):
        given = items.get(field.name)
        if given is None or nodes.is_null(given) or setting.read is None:
            continue
        value = setting.read(nodes, given)
        if value is not None:
            values[field.name] = value
    return values


def _reading(value: Any, where: str, key: str, read: Callable[[NodeReader, Item], _T]) -> _T:
    """``read`` of the JSON ``value`` as the item ``key``, errors naming ``where``."""
    loader = yaml.SafeLoader("")
    try:
        nodes = LiteralNodeReader(where, {}, loader)
        return read(nodes, Item(key, 1, _node(value)))
    except ConfigError as e:
        # Lines mean nothing in JSON.
        raise ConfigError(where, None, e.key, e.message) from None
    finally:
        loader.dispose()


def _section(
    nodes: NodeReader,
    item: Item,
    cls: type,
    what: str,
    *,
    partial: bool,
    loader_reads: frozenset[str] = frozenset(),
) -> tuple[dict[str, Item], dict[str, Any]]:
    """The items and values of the mapping at ``item``; a key the loader
    reads is refused unless the caller reads it (``loader_reads``)."""
    items = section_items(nodes, item, cls, what)
    for field, _, setting in file_fields(cls):
        given = items.get(field.name)
        loader_only = setting.read is None and field.name not in loader_reads
        if loader_only and given is not None and not nodes.is_null(given):
            nodes.fail(given.key, None, "only the config file can set this key")
    values = _read_given(nodes, items, cls) if partial else read_settings(nodes, item, items, cls)
    return items, values


def read_json_section(
    value: Any, cls: type, what: str, *, where: str, key: str = "", partial: bool = False
) -> dict[str, Any]:
    """The values of ``cls``'s fields that the JSON ``value`` (a mapping of
    the file's keys) gives, by attribute name, read as the file is read.

    ``what`` names the mapping in messages ("a key mapping"); errors are
    ``ConfigError(where, None, key + "." + …, message)``.  With
    ``partial``, required keys may be absent (a change of some keys);
    either way a key that only the file can set (one the loader reads) is
    refused.
    """

    def read(nodes: NodeReader, item: Item) -> dict[str, Any]:
        return _section(nodes, item, cls, what, partial=partial)[1]

    return _reading(value, where, key, read)


def read_json_upstream(
    value: Any, *, where: str, key: str = "", over: Upstream | None = None
) -> dict[str, Any]:
    """An upstream mapping's values, by attribute name, read as the loader
    reads one of the file: each key, what its type asks of ``endpoint`` and
    ``sk``, and its own ``proxy`` (None for ``none``: direct); an absent
    ``proxy`` is left to the caller (the top-level one is inherited).
    ``authorization`` is the file's alone (stored keys name their upstreams).

    ``over``: the upstream of the file that ``value`` changes; then every
    key may be absent, and the type's rules see ``over``'s values where
    ``value`` gives none.  Errors as for ``read_json_section``.
    """

    def read(nodes: NodeReader, item: Item) -> dict[str, Any]:
        items, values = _section(
            nodes,
            item,
            Upstream,
            "an upstream mapping",
            partial=over is not None,
            loader_reads=frozenset({"proxy"}),
        )
        settle_upstream(nodes, item, items, values, over)
        return values

    return _reading(value, where, key, read)
