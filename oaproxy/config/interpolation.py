"""``${…}`` in the config's strings: the shell's parameter expansion, in part.

What is supported, and nothing else:

  - ``${NAME}``: the environment variable NAME; unset, it is an error.
  - ``${NAME:-word}``: NAME, or ``word`` when NAME is unset or empty.
  - ``${NAME:+word}``: ``word`` when NAME is set and not empty, else nothing.
  - ``word`` may hold further ``${…}`` (as in the shell), and a ``${…}`` may
    stand where NAME does (as in zsh), so that one value can choose between
    two words: ``${${OPENAI_API_KEY:+true}:-false}`` is ``true`` when
    OPENAI_API_KEY is set, else ``false``.
  - ``$${`` is a literal ``${``; any other ``$`` is itself.

A variable's content is never expanded again, nor parsed as YAML. Messages
name variables, never their values (they may be secrets).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from attrs import frozen

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

BAD_REFERENCE = (
    "bad '${NAME}' reference: NAME must be letters, digits and '_' closed by '}', "
    "optionally with ':-word' or ':+word' (write '$${' for a literal '${')"
)


class InterpolationError(ValueError):
    """Text whose ``${…}`` cannot be expanded; the message names no value."""


@frozen
class _Expanded:
    value: str
    end: int  # index just after the closing "}"


def interpolate(text: str, environ: Mapping[str, str]) -> str:
    """``text`` with every ``${…}`` expanded from ``environ``."""
    value, end = _Scanner(text, environ).text(0, inside=False, expand=True)
    assert end == len(text)
    return value


def is_one_reference(text: str) -> bool:
    """Whether ``text`` is one ``${…}`` and nothing else (how a number or a
    boolean is taken from the environment, which only ever holds text)."""
    if not text.startswith("${"):
        return False
    try:
        return _Scanner(text, {}).reference(0, expand=False).end == len(text)
    except InterpolationError:
        return False


class _Scanner:
    """Reads ``${…}`` references; without ``expand`` only their shape is
    checked (a word the shell would not expand is not looked up either)."""

    def __init__(self, text: str, environ: Mapping[str, str]) -> None:
        self._text = text
        self._environ = environ

    def text(self, position: int, *, inside: bool, expand: bool) -> tuple[str, int]:
        """Literal text and references from ``position`` up to the end, or
        (``inside`` a word) up to its closing ``}``, which is not consumed."""
        text = self._text
        parts: list[str] = []
        while position < len(text):
            if text.startswith("$${", position):
                parts.append("${")
                position += 3
            elif text.startswith("${", position):
                expanded = self.reference(position, expand=expand)
                parts.append(expanded.value)
                position = expanded.end
            elif inside and text[position] == "}":
                return "".join(parts), position
            else:
                parts.append(text[position])
                position += 1
        if inside:
            raise InterpolationError(BAD_REFERENCE)
        return "".join(parts), position

    def reference(self, position: int, *, expand: bool) -> _Expanded:
        """The ``${…}`` starting at ``position``."""
        text = self._text
        position += 2
        name: str | None = None
        if text.startswith("${", position):
            inner = self.reference(position, expand=expand)
            value: str | None = inner.value
            position = inner.end
        else:
            match = _NAME.match(text, position)
            if match is None:
                raise InterpolationError(BAD_REFERENCE)
            name = match.group()
            value = self._environ.get(name) if expand else None
            position = match.end()
        operator = text[position : position + 2]
        if operator in (":-", ":+"):
            # The colon forms: an empty variable counts as unset.
            uses_word = not value if operator == ":-" else bool(value)
            word, position = self.text(position + 2, inside=True, expand=expand and uses_word)
            position += 1  # the closing "}"
            if uses_word:
                return _Expanded(word, position)
            # ":-" keeps the variable's own value; ":+" leaves nothing.
            return _Expanded((value or "") if operator == ":-" else "", position)
        if text[position : position + 1] != "}":
            raise InterpolationError(BAD_REFERENCE)
        if value is None and name is not None and expand:
            raise InterpolationError(f"environment variable {name} is not set")
        return _Expanded(value or "", position + 1)
