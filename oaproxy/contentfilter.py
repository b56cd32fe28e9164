"""The content filter: a candidate filter on the text a model would read.

The text is what the request asks a model to read: chat ``messages``
content (text parts included), ``prompt``, ``input`` (a string, a list of
strings, or Responses API items with their content parts) and
``instructions``. ``patterns`` are RE2 regular expressions and ``words``
whole words, both case-insensitive. RE2 matches in time linear in the
text, whatever the pattern: no request can make a pattern hang the reactor
(Python's ``re`` would backtrack for hours on ``(a+)+$``).

A request that matches is served only by the exempt candidates
(``content_filter: false``), and refused with 400 ``content_filter``,
naming the rule (``patterns[N]`` or ``words[N]``, never the text), when
none is left. A request whose every candidate is exempt is not checked.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import re2
from attrs import frozen

from oaproxy.config import Config, ContentFilterConfig, Upstream
from oaproxy.errors import ErrorAnswer
from oaproxy.forward import Exchange
from oaproxy.inspection import content_texts

# Whole words: not next to a letter, a digit or "_" (in any script).
_WORD_EDGE_BEFORE = r"(?:\A|[^\pL\pN_])"
_WORD_EDGE_AFTER = r"(?:[^\pL\pN_]|\z)"


@frozen
class _Rule:
    name: str  # as the config says it: "patterns[0]", "words[2]"
    regex: Any  # a compiled re2 expression


class ContentFilter:
    """The rules of one config's ``content_filter``, compiled once."""

    def __init__(self, config: ContentFilterConfig) -> None:
        options = re2.Options()
        options.case_sensitive = False
        # A bad pattern is a config error already; nothing for stderr.
        options.log_errors = False
        rules = [
            _Rule(f"patterns[{n}]", re2.compile(pattern, options))
            for n, pattern in enumerate(config.patterns)
        ]
        rules.extend(
            _Rule(
                f"words[{n}]",
                re2.compile(_WORD_EDGE_BEFORE + re2.escape(word) + _WORD_EDGE_AFTER, options),
            )
            for n, word in enumerate(config.words)
        )
        self._rules: tuple[_Rule, ...] = tuple(rules)

    @classmethod
    def from_config(cls, config: Config) -> ContentFilter | None:
        """The filter of ``config``; None when it has no rule."""
        section = config.content_filter
        if section is None or not (section.patterns or section.words):
            return None
        return cls(section)

    def first_match(self, texts: Iterator[str]) -> str | None:
        """The name of the first rule (in config order) that some text matches."""
        # Lone surrogates ("\ud800" in JSON) cannot be UTF-8: replaced, not raised.
        encoded = [text.encode("utf-8", "replace") for text in texts]
        for rule in self._rules:
            if any(rule.regex.search(text) is not None for text in encoded):
                return rule.name
        return None

    def __call__(
        self, exchange: Exchange, candidates: list[Upstream]
    ) -> list[Upstream] | ErrorAnswer:
        """The candidate filter: all candidates, only the exempt ones, or a 400."""
        if all(not u.content_filter for u in candidates):
            return candidates
        parsed = exchange.call.inspected.parsed
        if parsed is None:
            return candidates
        rule = self.first_match(model_texts(parsed))
        if rule is None:
            return candidates
        exempt = [u for u in candidates if not u.content_filter]
        if exempt:
            return exempt
        return ErrorAnswer(
            400,
            f"The request was refused by the content filter (rule {rule}).",
            code="content_filter",
        )


def model_texts(body: dict[str, Any]) -> Iterator[str]:
    """The texts of a request body that a model would read."""
    messages = body.get("messages")
    if isinstance(messages, list):
        for message in messages:
            if isinstance(message, dict):
                yield from content_texts(message.get("content"))
    yield from _strings(body.get("prompt"))
    yield from _input(body.get("input"))
    instructions = body.get("instructions")
    if isinstance(instructions, str):
        yield instructions


def _strings(value: object) -> Iterator[str]:
    """A string, or the strings of a list (prompts as token ids are no text)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, list):
        yield from (item for item in value if isinstance(item, str))


def _input(value: object) -> Iterator[str]:
    """Embeddings and moderations take strings; the Responses API takes items
    (messages with content, or bare content parts)."""
    items: Sequence[object] = value if isinstance(value, list) else [value]
    for item in items:
        if isinstance(item, str):
            yield item
        elif isinstance(item, dict):
            if "content" in item:
                yield from content_texts(item["content"])
            elif isinstance(item.get("text"), str):
                yield item["text"]
