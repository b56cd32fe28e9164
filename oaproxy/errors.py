"""OpenAI-shaped error answers.

Clients are OpenAI SDKs: they read ``error.message``/``error.type``/``error.code``
from the body and choose their exception class from the status, so every error
oaproxy makes itself is shaped like OpenAI's own.
"""

from __future__ import annotations

import json
from http import HTTPStatus

from attrs import frozen
from twisted.web.http import RESPONSES

from oaproxy.record import LimitRefusal, Outcome


@frozen
class ErrorAnswer:
    """An error oaproxy answers by itself, before or instead of an upstream."""

    status: int
    message: str
    type: str = "invalid_request_error"
    code: str | None = None
    param: str | None = None
    # Set when a limit refused the request: its record says which.
    limit: LimitRefusal | None = None

    @property
    def content_type(self) -> bytes:
        return b"application/json"

    @property
    def outcome(self) -> Outcome:
        if self.limit is not None:
            return Outcome.RATE_LIMITED
        # A 5xx of our own (the limiter unavailable) is no fault of the client's.
        return Outcome.ERROR if self.status >= 500 else Outcome.CLIENT_ERROR

    def body(self) -> bytes:
        return error_body(self.message, self.type, self.code, self.param)

    def recorded(self) -> None:
        """The record reads the body itself (see ``oaproxy.answers.LocalAnswer``)."""
        return None


def error_body(
    message: str,
    type: str = "invalid_request_error",
    code: str | None = None,
    param: str | None = None,
) -> bytes:
    return json.dumps(
        {"error": {"message": message, "type": type, "param": param, "code": code}}
    ).encode("utf-8")


def reason_phrase(status: int) -> bytes:
    """The standard reason phrase of ``status``: Twisted's, else Python's
    (Twisted has none for 429, whose status line would say "Unknown Status").
    """
    phrase = RESPONSES.get(status)
    if phrase is not None:
        return phrase
    try:
        return HTTPStatus(status).phrase.encode("ascii")
    except ValueError:
        return b"Unknown"
