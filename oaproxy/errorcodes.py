"""The OpenAI error code of an upstream's error answer, for the servers that
give none: which 400s fail over (``failover_codes``) rather than answer.

OpenAI says ``"code": "context_length_exceeded"``; vLLM, Ollama and
OpenRouter say it in words only. Their words are in ``CONTEXT_LENGTH_MESSAGES``,
the one table of them.
"""

from __future__ import annotations

import re

from oaproxy.inspection import parse_json

CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"

#: What servers that give no code say of a request longer than the model's
#: context, by server (matched case-insensitively in ``error.message``).
CONTEXT_LENGTH_MESSAGES: tuple[tuple[str, re.Pattern[str]], ...] = (
    # "This model's maximum context length is 4096 tokens. However, you
    # requested 5000 tokens" (and newer: "... is 4096 tokens and your request
    # has 4200 input tokens").
    ("vLLM", re.compile(r"model.s maximum context length is \d+", re.IGNORECASE)),
    # "This endpoint's maximum context length is 8192 tokens. However, you
    # requested about 9000 tokens" (the wording of the provider it routes to
    # otherwise).
    ("OpenRouter", re.compile(r"endpoint.s maximum context length is \d+", re.IGNORECASE)),
    # "input length exceeds the context length", "input length exceeds
    # maximum context length", "prompt too long; exceeded max context length
    # by 12 tokens".
    (
        "Ollama",
        re.compile(
            r"exceeds (?:the |maximum )?context length|exceeded max context length",
            re.IGNORECASE,
        ),
    ),
)


def error_code(body: bytes) -> str | None:
    """The error code an error answer's body means: its ``error.code`` when
    it has one, ``context_length_exceeded`` when its message says so in
    one of the known wordings; None otherwise (not JSON, no error object)."""
    document = parse_json(body)
    if not isinstance(document, dict):
        return None
    error = document.get("error")
    if isinstance(error, str):
        # Some servers give the message alone: {"error": "..."}.
        return _said(error)
    if not isinstance(error, dict):
        return None
    code = error.get("code")
    if isinstance(code, str) and code:
        return code
    message = error.get("message")
    return _said(message) if isinstance(message, str) else None


def _said(message: str) -> str | None:
    if any(pattern.search(message) for _, pattern in CONTEXT_LENGTH_MESSAGES):
        return CONTEXT_LENGTH_EXCEEDED
    return None
