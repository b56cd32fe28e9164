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

from collections.abc import Mapping
from typing import Any

import yaml

from oaproxy.config.errors import ConfigError
from oaproxy.config.nodes import Item, NodeReader
from oaproxy.config.schema import file_fields, read_settings, section_items

__all__ = ["read_json_section"]

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


def read_json_section(
    value: Any, cls: type, what: str, *, where: str, key: str = "", partial: bool = False
) -> dict[str, Any]:
    """The values of ``cls``'s fields that the JSON ``value`` (a mapping of
    the file's keys) gives, by attribute name, read as the file is read.

    ``what`` names the mapping in messages ("an upstream mapping"); errors
    are ``ConfigError(where, None, key + "." + …, message)``.  With
    ``partial``, required keys may be absent (a change of some keys);
    either way a key that only the file can set (one the loader reads, such
    as an upstream's ``authorization``) is refused.
    """
    loader = yaml.SafeLoader("")
    try:
        nodes = LiteralNodeReader(where, {}, loader)
        item = Item(key, 1, _node(value))
        items = section_items(nodes, item, cls, what)
        for field, _, setting in file_fields(cls):
            given = items.get(field.name)
            if setting.read is None and given is not None and not nodes.is_null(given):
                nodes.fail(given.key, None, "only the config file can set this key")
        if partial:
            return _read_given(nodes, items, cls)
        return read_settings(nodes, item, items, cls)
    except ConfigError as e:
        # Lines mean nothing in JSON.
        raise ConfigError(where, None, e.key, e.message) from None
    finally:
        loader.dispose()
