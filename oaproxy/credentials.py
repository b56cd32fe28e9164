"""Secrets: reading a bearer token, and keeping secrets out of what oaproxy writes.

An upstream may quote its key in an error ("Incorrect API key provided:
sk-…"), a client may paste a key into a prompt: such text is kept in records
and passed on to clients, so every configured secret is replaced first, by
``REDACTED``, the one marker of hidden text. ``Redactor`` does it for
content (bodies, answer texts: ``__call__``, ``redact_bytes``) and for words
about a failure (exception texts, status phrases: ``words``), which lose the
shapes of keys oaproxy does not know too.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from oaproxy.config import Config, all_client_keys

REDACTED = "[redacted]"
_REDACTED_BYTES = REDACTED.encode("ascii")

# Shorter values (a client key like "guest") are ordinary words in answers;
# replacing them would maim text and protect nothing.
MIN_SECRET_LENGTH = 8

#: Header names (lower case) whose values never reach a record.
REDACTED_HEADERS = frozenset(
    {
        "authorization",
        "proxy-authorization",
        "api-key",
        "x-api-key",
        "x-goog-api-key",
        "cookie",
        "set-cookie",
    }
)

# Defence in depth for text whose secrets oaproxy cannot know (an alert's
# reasons, from upstream error text): the shapes of keys and tokens.
_KEY_SHAPES = re.compile(
    r"(?i)(bearer\s+)\S+"
    r"|\bsk-[A-Za-z0-9_\-]{6,}"
    r"|((?:api[_-]?key|access_token|token|key|sig|sign)=)[^&\s]+"
)


def bearer_token(authorization: bytes | None) -> bytes | None:
    """The token of an ``Authorization`` value, None unless it is a bearer.

    As openai-api-route reads it: the value starts with ``Bearer``, and the
    spaces after it (none is needed) and at the end are not the token's.
    """
    if authorization is None or not authorization.startswith(b"Bearer"):
        return None
    return authorization[len(b"Bearer") :].strip()


def config_secrets(config: Config) -> list[str]:
    """Every secret value a config holds."""
    values = [key.secret for key in all_client_keys(config)]
    values += [u.sk for u in config.upstreams if u.sk and u.sk != "asis"]
    values += [v for v in (config.admin_key, config.metrics_key) if v]
    notify = config.notify
    if notify.feishu is not None and notify.feishu.secret:
        values.append(notify.feishu.secret)
    if notify.matrix is not None:
        values.append(notify.matrix.access_token)
    return values


class Redactor:
    """Replaces known secrets in text, in bytes, and in the strings of JSON values."""

    def __init__(self, secrets: Iterable[str], *, min_length: int = MIN_SECRET_LENGTH) -> None:
        self._min_length = min_length
        unique = sorted({s for s in secrets if len(s) >= min_length}, key=len, reverse=True)
        if unique:
            self._pattern: re.Pattern[str] | None = re.compile("|".join(map(re.escape, unique)))
            self._bytes_pattern: re.Pattern[bytes] | None = re.compile(
                b"|".join(re.escape(s.encode("utf-8")) for s in unique)
            )
        else:
            self._pattern = self._bytes_pattern = None

    def __call__(self, value: Any, extra: str | None = None) -> Any:
        """``value`` (text or a JSON value) with the secrets, and ``extra``
        (a request's own bearer token), replaced."""
        if extra is not None and len(extra) < self._min_length:
            extra = None
        if self._pattern is None and extra is None:
            return value
        return self._scrub(value, extra)

    def redact_bytes(self, data: bytes, extra: str | None = None) -> bytes:
        """``data`` with the secrets, and ``extra``, replaced (an answer passed
        on as it came)."""
        if self._bytes_pattern is not None:
            data = self._bytes_pattern.sub(_REDACTED_BYTES, data)
        if extra is not None and len(extra) >= self._min_length:
            data = data.replace(extra.encode("utf-8"), _REDACTED_BYTES)
        return data

    def words(self, text: str, extra: str | None = None) -> str:
        """Words from outside about a failure (an exception's text, a status
        phrase) as they may be repeated to a client, in a record, an alert or
        the log: the secrets and ``extra`` replaced, and anything shaped like
        a key hidden."""
        return hide_key_shapes(self(text, extra))

    def _scrub(self, value: Any, extra: str | None) -> Any:
        if isinstance(value, str):
            if self._pattern is not None:
                value = self._pattern.sub(REDACTED, value)
            if extra is not None and extra in value:
                value = value.replace(extra, REDACTED)
            return value
        if isinstance(value, dict):
            return {k: self._scrub(v, extra) for k, v in value.items()}
        if isinstance(value, list):
            return [self._scrub(v, extra) for v in value]
        return value


def hide_key_shapes(text: str) -> str:
    """``text`` without anything shaped like a key or token (``sk-…``,
    ``Bearer …``, ``key=…``), for text whose secrets are not known."""

    def hide(match: re.Match[str]) -> str:
        prefix = match.group(1) or match.group(2) or ""
        return prefix + REDACTED

    return _KEY_SHAPES.sub(hide, text)


def redact_headers(
    headers: Iterable[tuple[bytes | str, bytes | str | Iterable[bytes | str]]] | Mapping[Any, Any],
) -> dict[str, str]:
    """Headers as a record keeps them: lower-case names, credentials replaced.

    Takes ``(name, value)`` pairs, ``(name, [values])`` pairs as Twisted's
    ``Headers.getAllRawHeaders()`` yields them, or a mapping of either.
    Repeated headers are joined with ", ".
    """
    items = headers.items() if isinstance(headers, Mapping) else headers
    result: dict[str, str] = {}
    for raw_name, raw_value in items:
        name = (
            raw_name.decode("latin-1") if isinstance(raw_name, bytes) else str(raw_name)
        ).lower()
        if name in REDACTED_HEADERS:
            result[name] = REDACTED
            continue
        if isinstance(raw_value, (bytes, str)):
            value = (
                raw_value.decode("utf-8", "replace") if isinstance(raw_value, bytes) else raw_value
            )
        else:
            value = ", ".join(
                v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in raw_value
            )
        previous = result.get(name)
        result[name] = value if previous is None else previous + ", " + value
    return result
