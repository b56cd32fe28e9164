"""How many tokens a request will use, guessed before it is forwarded.

- Prompt: the characters of the body's text, divided by 4 (rounded up),
  OpenAI's rule of thumb for English. The text is every string in the JSON
  body (messages, prompt, input, tool definitions...) except ``model`` and
  inline media (``data:`` URLs: images and audio are not billed by their
  base64 characters).
- Completion: ``max_completion_tokens``, ``max_tokens`` or
  ``max_output_tokens`` when the request sets one, else
  ``limits.default_max_tokens``; times ``n`` when it asks for several
  choices; 0 for embeddings, which complete nothing.

The guess is only held until the answer's real usage replaces it. Both
are the record's ``Usage``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from oaproxy.record import Usage

_MAX_FIELDS = ("max_completion_tokens", "max_tokens", "max_output_tokens")
_NO_COMPLETION = frozenset({"/v1/embeddings"})


NOTHING = Usage(0, 0, 0)


def tokens(prompt: int, completion: int) -> Usage:
    return Usage(prompt, completion, prompt + completion)


def estimate(body: Mapping[str, Any], api_path: str, default_max_tokens: int) -> Usage:
    """The guess for a request's JSON body sent to ``api_path``."""
    return tokens(
        math.ceil(text_characters(body) / 4), _completion(body, api_path, default_max_tokens)
    )


def text_characters(body: Mapping[str, Any]) -> int:
    """The characters of the strings a model would read in a JSON body."""
    count = 0
    pending: list[Any] = [value for name, value in body.items() if name != "model"]
    # A loop, not recursion: a deeply nested body must not exhaust the stack.
    while pending:
        value = pending.pop()
        if isinstance(value, str):
            if not value.startswith("data:"):
                count += len(value)
        elif isinstance(value, Mapping):
            pending.extend(value.values())
        elif isinstance(value, list):
            pending.extend(value)
    return count


def _completion(body: Mapping[str, Any], api_path: str, default_max_tokens: int) -> int:
    if api_path in _NO_COMPLETION:
        return 0
    most = next(
        (_count(body.get(name)) for name in _MAX_FIELDS if _count(body.get(name))),
        default_max_tokens,
    )
    return most * max(1, _count(body.get("n")))


def billed(usage: Usage) -> Usage:
    """A record's usage as limits count it: a server that reports only a
    total (prompt and completion 0) has it counted as prompt tokens."""
    if usage.prompt_tokens + usage.completion_tokens == 0 and usage.total_tokens > 0:
        return tokens(usage.total_tokens, 0)
    return usage


def _count(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0
