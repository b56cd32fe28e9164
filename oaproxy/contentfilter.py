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

The texts are read by ``oaproxy.inspection`` (``model_read_items``) one
item at a time, without the body parsed whole: a large body's walk runs a
step at a time on the cooperator, and the filter answers later. A body with
more in it than a walk reads counts as a match.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any, cast

import re2
from attrs import frozen
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from oaproxy.config import Config, ContentFilterConfig, Upstream
from oaproxy.errors import ErrorAnswer
from oaproxy.exchange import Exchange
from oaproxy.inspection import content_texts, parsed_items
from oaproxy.jsonscan import NotAnObject
from oaproxy.pipeline import Candidates

# What is read of each item: a message's content, a part's text.
_KEEP = frozenset({"content", "text"})

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

    def first_match(self, texts: Iterable[str], before: int | None = None) -> str | None:
        """The name of the first rule (in config order; of the first ``before``
        only, when given) that some text matches."""
        # Lone surrogates ("\ud800" in JSON) cannot be UTF-8: replaced, not raised.
        encoded = [text.encode("utf-8", "replace") for text in texts]
        for rule in self._rules[:before]:
            if any(rule.regex.search(text) is not None for text in encoded):
                return rule.name
        return None

    def __call__(
        self, exchange: Exchange, candidates: list[Upstream]
    ) -> Candidates | Deferred[Candidates]:
        """The candidate filter: all candidates, only the exempt ones, or a 400."""
        if all(not u.content_filter for u in candidates):
            return candidates
        matching = _Matching(self)
        try:
            read = exchange.call.inspected.model_read_items(_KEEP, matching)
        except NotAnObject as e:
            return _too_complex(e, candidates)
        if isinstance(read, Deferred):

            def failed(failure: Failure) -> Candidates:
                failure.trap(NotAnObject)
                return _too_complex(cast(NotAnObject, failure.value), candidates)

            return read.addCallbacks(lambda _: _matched(matching.rule, candidates), failed)
        return _matched(matching.rule, candidates)


class _Matching:
    """Reads a request's items one at a time (``Inspected.model_read_items``),
    keeping the first rule, in config order, that a text of any matched."""

    def __init__(self, content_filter: ContentFilter) -> None:
        self._filter = content_filter
        self._positions = {rule.name: n for n, rule in enumerate(content_filter._rules)}
        self.rule: str | None = None

    def __call__(self, name: str, item: Any, listed: bool) -> bool:
        texts = list(item_texts(name, item, listed))
        before = None if self.rule is None else self._positions[self.rule]
        found = self._filter.first_match(texts, before) if texts else None
        if found is not None:
            self.rule = found
        # The first rule matched: no other can come before it.
        return self.rule is not None and self._positions[self.rule] == 0


def _matched(rule: str | None, candidates: list[Upstream]) -> Candidates:
    if rule is None:
        return candidates
    return _exempt_only(candidates, f"The request was refused by the content filter (rule {rule}).")


def _too_complex(error: NotAnObject, candidates: list[Upstream]) -> Candidates:
    """A body with more to read than a walk reads is taken as matching: only
    exempt upstreams are sent what was not checked."""
    message = f"The request body {error.problem.value}: the content filter cannot check it."
    return _exempt_only(candidates, message)


def _exempt_only(candidates: list[Upstream], refusal: str) -> Candidates:
    """The exempt candidates; 400 ``content_filter`` saying ``refusal`` when there are none."""
    exempt = [u for u in candidates if not u.content_filter]
    return exempt or ErrorAnswer(400, refusal, code="content_filter")


def model_texts(body: Mapping[str, Any]) -> Iterator[str]:
    """The texts of a parsed request body that a model would read."""
    for name, item, listed in parsed_items(body):
        yield from item_texts(name, item, listed)


def item_texts(name: str, item: Any, listed: bool) -> Iterator[str]:
    """The texts of one item of a member a model reads (``name``, one of
    ``MODEL_READS``): an element of its list (``listed``), or its value.

    Chat messages have content (a string or parts); a prompt is a string or
    a list of them (prompts as token ids are no text); embeddings and
    moderations take strings for ``input``, the Responses API items
    (messages with content, or bare content parts); instructions are a
    string."""
    if name == "messages":
        if listed and isinstance(item, dict):
            yield from content_texts(item.get("content"))
    elif name == "input":
        if isinstance(item, str):
            yield item
        elif isinstance(item, dict):
            if "content" in item:
                yield from content_texts(item["content"])
            elif isinstance(item.get("text"), str):
                yield item["text"]
    elif isinstance(item, str) and (name == "prompt" or not listed):
        yield item
