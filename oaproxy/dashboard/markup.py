"""HTML escaped by default: text becomes markup only through ``html``.

``Markup`` is text known to be HTML; ``html(template, *values)`` fills a
template's ``{}`` with each value escaped, unless it already is ``Markup``
(so pieces built by ``html`` nest).  Every string a user controls (a
prompt, an answer, a key or model name) reaches a page through it.
"""

from __future__ import annotations

from collections.abc import Iterable
from html import escape

__all__ = ["Markup", "html", "join"]


class Markup(str):
    """A string that is HTML already (never built from unchecked text)."""

    __slots__ = ()


def _escaped(value: object) -> object:
    if isinstance(value, Markup):
        return value
    if isinstance(value, (int, float)):
        # Numbers are safe as they are, and keep their format specs ("{:.1f}").
        return value
    if value is None:
        return ""
    return escape(str(value), quote=True)


def html(template: str, *values: object, **named: object) -> Markup:
    """``template`` (a literal of the code) with its fields escaped."""
    return Markup(
        template.format(
            *[_escaped(v) for v in values], **{k: _escaped(v) for k, v in named.items()}
        )
    )


def join(pieces: Iterable[object], separator: str = "") -> Markup:
    """The pieces, each escaped unless ``Markup``, one after another."""
    return Markup(separator.join(str(_escaped(piece)) for piece in pieces))
