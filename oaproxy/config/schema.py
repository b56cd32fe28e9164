"""How the model's attrs classes map to the file: field metadata, the keys
each section allows (derived from ``attrs.fields``), and the reading of a
section from its fields.

A field of a section class is a key of the file when its metadata says how
it is read: ``read(reader)`` (a function of ``values``), ``section(cls, …)``
for a nested mapping, ``named_sections(cls, …)`` for ``{name: mapping}``,
or ``read_by_loader()`` for a key whose value depends on other settings and
is read by the loader itself.  A field without such metadata (``Config.path``)
is not a key.  The file's name for a field is its attribute name unless
``key=`` says otherwise; ``alias=`` adds openai-api-route's name for it.

Fields are read in the order the class declares them, so a class lists first
what makes later messages helpful (``Upstream.type`` before ``endpoint``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, TypeVar

import attrs
from attrs import frozen

from oaproxy.config.nodes import Item, NodeReader, child_key
from oaproxy.config.values import Reader

_T = TypeVar("_T")

#: The key of a field's attrs metadata under which its ``Setting`` is kept.
_METADATA = "oaproxy.config"


@frozen
class Setting:
    """How one field of a section class is given in the file."""

    read: Reader | None  # None: the loader reads it (it depends on other settings)
    key: str | None = None  # the file's name, when not the attribute's
    alias: str | None = None  # openai-api-route's name for the same key
    missing: str | None = None  # set for a required key: the message when it is absent
    section: type | None = None  # the section class the key holds, if any


def read(
    reader: Reader,
    *,
    missing: str | None = None,
    key: str | None = None,
    alias: str | None = None,
) -> dict[str, Setting]:
    """Field metadata: the key is read by ``reader``.  With ``missing``, the
    key is required (absent or null, it is refused with that message);
    without it, the field's default applies when the key is not set."""
    return {_METADATA: Setting(reader, key=key, alias=alias, missing=missing)}


def read_by_loader(*, key: str | None = None, section: type | None = None) -> dict[str, Setting]:
    """Field metadata: a key of the file that the loader reads itself."""
    return {_METADATA: Setting(None, key=key, section=section)}


def section(
    cls: type, what: str, check: Callable[[NodeReader, Item, Any], None] | None = None
) -> dict[str, Setting]:
    """Field metadata: the key holds a mapping of ``cls``'s keys; ``what``
    names it in messages ("a mapping of record settings").  ``check`` sees
    the value read, for what depends on more than one of its keys."""

    def read_nested(nodes: NodeReader, item: Item) -> Any:
        value: Any = read_section(nodes, item, cls, what)
        if check is not None:
            check(nodes, item, value)
        return value

    return {_METADATA: Setting(read_nested, section=cls)}


def named_sections(cls: type, what: str, each: str) -> dict[str, Setting]:
    """Field metadata: the key holds ``{name: mapping of cls's keys}``, read
    into a read-only mapping; ``what`` and ``each`` name the whole and one
    entry in messages."""

    def read_named(nodes: NodeReader, item: Item) -> Mapping[str, Any]:
        return MappingProxyType(
            {
                name: read_section(nodes, entry, cls, each)
                for name, entry in nodes.entries(item, what)
            }
        )

    return {_METADATA: Setting(read_named, section=cls)}


def _setting(field: attrs.Attribute[Any]) -> Setting | None:
    setting = field.metadata.get(_METADATA)
    return setting if isinstance(setting, Setting) else None


def _file_key(field: attrs.Attribute[Any], setting: Setting) -> str:
    return setting.key or field.name


def file_fields(cls: type) -> list[tuple[attrs.Attribute[Any], str, Setting]]:
    """The fields of ``cls`` that are keys of the file: each with the file's
    name for it and its ``Setting``, in the order the class declares them."""
    result = []
    for field in attrs.fields(cls):
        setting = _setting(field)
        if setting is not None:
            result.append((field, _file_key(field, setting), setting))
    return result


@functools.cache
def _attributes_by_key(cls: type) -> Mapping[str, str]:
    """The file's names of ``cls``'s keys, aliases included -> attribute."""
    result = {}
    for field in attrs.fields(cls):
        setting = _setting(field)
        if setting is None:
            continue
        result[_file_key(field, setting)] = field.name
        if setting.alias is not None:
            result[setting.alias] = field.name
    return MappingProxyType(result)


def every_key(cls: type) -> frozenset[str]:
    """The keys of ``cls`` and of every section nested in it."""
    keys = set(_attributes_by_key(cls))
    for field in attrs.fields(cls):
        setting = _setting(field)
        if setting is not None and setting.section is not None:
            keys |= every_key(setting.section)
    return frozenset(keys)


def section_items(nodes: NodeReader, item: Item, cls: type, what: str) -> dict[str, Item]:
    """The keys given in the mapping at ``item``, by attribute name.
    Refuses keys ``cls`` does not have and a key given under both its names.
    """
    by_key = _attributes_by_key(cls)
    given = nodes.mapping(item, frozenset(by_key), what)
    for field in attrs.fields(cls):
        setting = _setting(field)
        if setting is None or setting.alias is None:
            continue
        key = _file_key(field, setting)
        if key in given and setting.alias in given:
            # The later of the two is named (on one line, ours).
            second = max(given[key], given[setting.alias], key=lambda i: i.line)
            nodes.fail(
                second.key,
                second.line,
                f"give either {key!r} or {setting.alias!r} (openai-api-route's name for it), "
                f"not both",
            )
    return {by_key[name]: value for name, value in given.items()}


def read_settings(
    nodes: NodeReader, item: Item, items: Mapping[str, Item], cls: type
) -> dict[str, Any]:
    """The values of ``cls``'s fields given in ``items`` (the mapping at
    ``item``), each read by its reader, by attribute name.  Keys not set
    are left out, so that attrs applies the field's default; a required key
    not set is refused.  Fields the loader reads are left to it.
    """
    values = {}
    for field in attrs.fields(cls):
        setting = _setting(field)
        if setting is None or setting.read is None:
            continue
        given = items.get(field.name)
        if given is None or nodes.is_null(given):
            if setting.missing is not None:
                # Absent, the mapping is what lacks it; null, the key itself.
                line = item.line if given is None else given.line
                nodes.fail(child_key(item.key, _file_key(field, setting)), line, setting.missing)
            continue
        value = setting.read(nodes, given)
        if value is not None:
            values[field.name] = value
    return values


def read_section(nodes: NodeReader, item: Item, cls: type[_T], what: str) -> _T:
    """An instance of ``cls`` from the mapping at ``item``."""
    items = section_items(nodes, item, cls, what)
    return cls(**read_settings(nodes, item, items, cls))
