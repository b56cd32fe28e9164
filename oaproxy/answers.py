"""Answers oaproxy gives by itself, instead of forwarding: what a gate returns.

A refusal (``oaproxy.errors.ErrorAnswer``: 401, 403, 413…), a cache hit
(``oaproxy.cache.lookup.CacheHit``) and a document of oaproxy's own
(``JSONAnswer``: the models list) are all whole answers held in memory: a
status, a content type and a body. The pipeline writes every one of them the
same way (``write_answer``) and records it like any other request, with the
outcome the answer says (``ok`` for a hit, ``rate_limited`` for a limit's
refusal).
"""

from __future__ import annotations

from typing import Protocol

from attrs import frozen
from twisted.web import server

from oaproxy.errors import reason_phrase
from oaproxy.record import LimitRefusal, Outcome


class LocalAnswer(Protocol):
    """An answer made by oaproxy, not by an upstream."""

    @property
    def status(self) -> int: ...

    @property
    def content_type(self) -> bytes: ...

    @property
    def outcome(self) -> Outcome:
        """How the request ended, for its record and metrics."""
        ...

    @property
    def limit(self) -> LimitRefusal | None:
        """The limit that refused the request (outcome ``rate_limited``);
        None for every other answer."""
        ...

    def body(self) -> bytes: ...

    def recorded(self) -> bytes | None:
        """What the record reads as the answer (a JSON document) when that is
        not ``body()`` itself: a stream replayed from a cached completion
        records the completion."""
        ...


@frozen
class JSONAnswer:
    """A JSON document oaproxy answers with itself, as a success."""

    document: bytes
    status: int = 200

    @property
    def content_type(self) -> bytes:
        return b"application/json"

    @property
    def outcome(self) -> Outcome:
        return Outcome.OK

    @property
    def limit(self) -> None:
        return None

    def body(self) -> bytes:
        return self.document

    def recorded(self) -> None:
        return None


def write_answer(request: server.Request, answer: LocalAnswer) -> bytes:
    """Set the status and headers of ``answer`` on ``request``; its body."""
    body = answer.body()
    request.setResponseCode(answer.status, reason_phrase(answer.status))
    request.setHeader(b"content-type", answer.content_type)
    request.setHeader(b"content-length", b"%d" % len(body))
    return body
