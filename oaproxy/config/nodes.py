"""The YAML node reader: the file as composed nodes that keep their lines.

Values are read from nodes, never from PyYAML's constructed objects, so that
each error can name the line and dotted path of its key, duplicate keys can
be refused (PyYAML keeps the last), and ``${NAME}`` is replaced in a scalar's
text after parsing (a variable's content is never parsed as YAML).  What the
text then means (a number, a URL, a listen address) is for ``values`` to say.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from difflib import get_close_matches
from typing import Any, NoReturn, TypeVar

import yaml
from attrs import frozen

from oaproxy.config.errors import ConfigError
from oaproxy.config.interpolation import InterpolationError, interpolate, is_one_reference

_TAG_NULL = "tag:yaml.org,2002:null"
_TAG_BOOL = "tag:yaml.org,2002:bool"
_TAG_INT = "tag:yaml.org,2002:int"
_TAG_FLOAT = "tag:yaml.org,2002:float"
_TAG_STR = "tag:yaml.org,2002:str"
_TAG_TIMESTAMP = "tag:yaml.org,2002:timestamp"
_TAG_MERGE = "tag:yaml.org,2002:merge"
#: Scalars whose text a string setting takes as is (``sk: 123456``), as
#: openai-api-route's Go YAML decoder does.
TEXT_TAGS = frozenset({_TAG_STR, _TAG_INT, _TAG_FLOAT, _TAG_BOOL, _TAG_TIMESTAMP})
#: Only YAML strings: for list items, where ``allow: 3`` is likelier a slip.
STRING_TAGS = frozenset({_TAG_STR})
BOOLEAN_TAGS = frozenset({_TAG_BOOL})
NUMBER_TAGS = frozenset({_TAG_INT, _TAG_FLOAT})
INTEGER_TAGS = frozenset({_TAG_INT})

_T = TypeVar("_T")


@frozen
class Item:
    """A YAML node with the path and line errors about it name."""

    key: str  # dotted path: "upstreams[1].timeout"; "" for the whole file
    line: int  # 1-based line of the key (of the node, for list items)
    node: yaml.Node


def child_key(parent: str, name: str) -> str:
    """The dotted path of key ``name`` inside the mapping at ``parent``."""
    return f"{parent}.{name}" if parent else name


def kind(node: yaml.Node) -> str:
    """What a node is, as messages say it: "a list", "an integer"."""
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


def _line(node: yaml.Node) -> int:
    return int(node.start_mark.line) + 1


def read_document(
    text: str,
    path: str,
    environ: Mapping[str, str],
    read: Callable[[NodeReader, Item], _T],
) -> _T:
    """Compose ``text`` (read from ``path``) and give its root to ``read``.

    Raises ``ConfigError`` for text that is not one YAML document, for an
    empty one, and for whatever ``read`` finds wrong.
    """
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
        return read(NodeReader(path, environ, loader), Item("", _line(root), root))
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


class NodeReader:
    """Reads the nodes of one document: mappings, lists and scalar text,
    with ``${NAME}`` replaced from ``environ``; every refusal a
    ``ConfigError`` at the item's line."""

    def __init__(self, path: str, environ: Mapping[str, str], loader: yaml.SafeLoader) -> None:
        self.path = path
        self.environ = environ
        self.loader = loader

    def fail(self, key: str, line: int | None, message: str) -> NoReturn:
        raise ConfigError(self.path, line, key, message)

    def is_null(self, item: Item) -> bool:
        return isinstance(item.node, yaml.ScalarNode) and item.node.tag == _TAG_NULL

    def entries(self, item: Item, what: str = "a mapping") -> list[tuple[str, Item]]:
        """The (name, value) pairs of a mapping, refusing duplicate keys."""
        node = item.node
        if not isinstance(node, yaml.MappingNode):
            self.fail(item.key, item.line, f"expected {what}, got {kind(node)}")
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
                    child_key(item.key, name),
                    line,
                    f"duplicate key (first given on line {seen[name]})",
                )
            seen[name] = line
        try:
            # Resolves "<<: *anchor" merges in place, keeping every mark.
            self.loader.flatten_mapping(node)
        except yaml.MarkedYAMLError as e:
            raise _yaml_error(self.path, e) from None
        result: dict[str, Item] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == _TAG_NULL:
                self.fail(item.key, _line(key_node), "mapping keys must be plain strings")
            name = str(key_node.value)
            # After flattening, a later pair overrides an earlier one.
            result[name] = Item(child_key(item.key, name), _line(key_node), value_node)
        return list(result.items())

    def mapping(
        self, item: Item, allowed: frozenset[str], what: str = "a mapping"
    ) -> dict[str, Item]:
        """The entries of a mapping whose keys must be among ``allowed``."""
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

    def sequence(self, item: Item, what: str = "a list") -> list[Item]:
        node = item.node
        if not isinstance(node, yaml.SequenceNode):
            self.fail(item.key, item.line, f"expected {what}, got {kind(node)}")
        return [Item(f"{item.key}[{i}]", _line(sub), sub) for i, sub in enumerate(node.value)]

    def as_list(self, item: Item) -> list[Item]:
        """The items of a list; anything else is a one-item list."""
        if isinstance(item.node, yaml.SequenceNode):
            return self.sequence(item)
        return [item]

    def interpolate(self, item: Item, text: str) -> str:
        """``text`` with its ``${…}`` expanded (see ``interpolation``)."""
        try:
            return interpolate(text, self.environ)
        except InterpolationError as e:
            self.fail(item.key, item.line, str(e))

    def string(
        self, item: Item, what: str = "a string", tags: frozenset[str] = TEXT_TAGS
    ) -> str | None:
        """A scalar's text, interpolated; None for null."""
        node = item.node
        if self.is_null(item):
            return None
        if not isinstance(node, yaml.ScalarNode) or node.tag not in tags:
            self.fail(item.key, item.line, f"expected {what}, got {kind(node)}")
        return self.interpolate(item, str(node.value))

    def required_string(
        self, item: Item, what: str = "a string", tags: frozenset[str] = TEXT_TAGS
    ) -> str:
        """A scalar's text, interpolated, refusing null and blank text."""
        value = self.string(item, what, tags)
        if value is None or not value.strip():
            self.fail(item.key, item.line, "must not be empty")
        return value

    def scalar(self, item: Item, tags: frozenset[str]) -> Any:
        """The value YAML gives a scalar tagged one of ``tags``, else None."""
        node = item.node
        if isinstance(node, yaml.ScalarNode) and node.tag in tags:
            return self.loader.construct_object(node)
        return None

    def variable(self, item: Item) -> str | None:
        """The interpolated text, stripped, when the whole scalar is one
        ``${…}``: how a number or boolean comes from the environment,
        which can only ever hold text."""
        node = item.node
        if (
            isinstance(node, yaml.ScalarNode)
            and node.tag == _TAG_STR
            and is_one_reference(node.value)
        ):
            return self.interpolate(item, node.value).strip()
        return None
