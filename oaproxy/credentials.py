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

import functools
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

from attrs import frozen

from oaproxy.config import Config, Upstream, all_client_keys

REDACTED = "[redacted]"

# Shorter values (a client key like "guest") are ordinary words in answers;
# replacing them would maim text and protect nothing.
MIN_SECRET_LENGTH = 8

#: Header names (lower case) that carry credentials: never forwarded from
#: a client (``oaproxy.headers``), never in a record.
SECRET_HEADERS = frozenset(
    {
        b"authorization",
        b"proxy-authorization",
        b"api-key",
        b"x-api-key",
        b"x-goog-api-key",
        b"cookie",
        b"set-cookie",
    }
)
_SECRET_HEADER_NAMES = frozenset(name.decode("ascii") for name in SECRET_HEADERS)

# Defence in depth for text whose secrets oaproxy cannot know (an alert's
# reasons, from upstream error text): the shapes of keys and tokens.
_KEY_SHAPES = re.compile(
    r"(?i)(bearer\s+)\S+"
    r"|\bsk-[A-Za-z0-9_\-]{6,}"
    r"|((?:api[_-]?key|access_token|token|key|sig|sign|password|secret)=)[^&\s]+"
)


class Words(Protocol):
    """``Redactor.words``: words about a failure made fit to repeat."""

    def __call__(self, text: str, extra: str | None = None) -> str: ...


def bearer_token(authorization: bytes | None) -> bytes | None:
    """The token of an ``Authorization`` value, None unless it is a bearer.

    As openai-api-route reads it: the value starts with ``Bearer``, and the
    spaces after it (none is needed) and at the end are not the token's.
    """
    if authorization is None or not authorization.startswith(b"Bearer"):
        return None
    return authorization[len(b"Bearer") :].strip()


def upstream_authorization(upstream: Upstream, client: bytes | None) -> bytes | None:
    """The ``Authorization`` an upstream is sent: its ``sk`` as a bearer, the
    client's own (``client``) for ``sk: asis``, none without a key."""
    if upstream.sk == "asis":
        return client
    return b"Bearer " + upstream.sk.encode("utf-8") if upstream.sk else None


def token_text(authorization: bytes | None) -> str | None:
    """A request's bearer token as text (hidden wherever it is echoed); None
    without one."""
    token = bearer_token(authorization)
    return token.decode("utf-8", "replace") if token else None


def config_secrets(config: Config) -> list[str]:
    """Every secret value a config holds."""
    # Keys the store made are known by their hash only: a request's own key
    # is redacted from its record all the same (the Redactor's ``extra``).
    values = [key.secret for key in all_client_keys(config) if key.secret is not None]
    upstreams = (*config.upstreams, *config.disabled_upstreams)
    values += [u.sk for u in upstreams if u.sk and u.sk != "asis"]
    values += [v for v in (config.admin_key, config.metrics_key, config.store_key) if v]
    notify = config.notify
    if notify.feishu is not None and notify.feishu.secret:
        values.append(notify.feishu.secret)
    if notify.matrix is not None:
        values.append(notify.matrix.access_token)
    # A proxy may quote the credentials it refused (a 407 page, a debug echo).
    proxies = {config.proxy, *(u.proxy for u in upstreams)}
    values += [s for proxy in proxies if proxy is not None for s in proxy.secrets]
    return values


# Escapes that may stand for an ASCII character: JSON's \u00XX (and \/), a
# URL's %XX. A secret written with some (``sk\u002d…`` in a JSON string,
# ``sk%2D…`` in a query string) is still that secret. Each pattern starts
# with a literal, which the search skips to quickly.
_JSON_ESCAPE = re.compile(r"\\u00([0-7][0-9a-fA-F])")
_URL_ESCAPE = re.compile(r"%([0-7][0-9a-fA-F])")


def _any_case(hex_digits: str) -> str:
    return "".join(f"[{d}{d.upper()}]" if d.isalpha() else d for d in hex_digits)


def _escaped_form(secret: str) -> str:
    """A pattern of ``secret`` with any of its ASCII characters escaped."""
    parts = []
    for char in secret:
        if ord(char) >= 0x80:
            parts.append(re.escape(char))
            continue
        code = _any_case(f"{ord(char):02x}")
        forms = [re.escape(char), r"\\u00" + code, "%" + code]
        if char == "/":
            forms.append(r"\\/")
        parts.append("(?:" + "|".join(forms) + ")")
    return "".join(parts)


@frozen
class _Forms:
    """The patterns of a set of secrets: as written, and escaped."""

    secrets: frozenset[str]
    literal: re.Pattern[str]
    escaped: re.Pattern[str]
    # The ASCII characters of the secrets, which an escape may stand for.
    escapable: frozenset[str]


@functools.lru_cache(maxsize=64)
def _forms(secrets: frozenset[str]) -> _Forms:
    # Longest first: a secret inside another leaves no rest of the longer one.
    ordered = sorted(secrets, key=len, reverse=True)
    return _Forms(
        secrets=secrets,
        literal=re.compile("|".join(map(re.escape, ordered))),
        escaped=re.compile("|".join(map(_escaped_form, ordered))),
        escapable=frozenset(c for secret in ordered for c in secret if c.isascii()),
    )


def _escapes_any(text: str, chars: frozenset[str]) -> bool:
    """Whether ``text`` holds an escape of one of ``chars``."""
    for escape in (_JSON_ESCAPE, _URL_ESCAPE):
        for match in escape.finditer(text):
            if chr(int(match.group(1), 16)) in chars:
                return True
    return "/" in chars and "\\/" in text


def _latin1_view(secret: str) -> str:
    # Bytes are searched as latin-1 text, one character per byte; a secret
    # is found there as its UTF-8 bytes.
    return secret.encode("utf-8").decode("latin-1")


class Redactor:
    """Replaces known secrets in text, in bytes, and in the strings of JSON
    values: as written, and with characters escaped as JSON (``\\u002d``,
    ``\\/``) or a URL (``%2D``) may write them."""

    def __init__(self, secrets: Iterable[str], *, min_length: int = MIN_SECRET_LENGTH) -> None:
        self._min_length = min_length
        unique = frozenset(s for s in secrets if len(s) >= min_length)
        self._text_forms = _forms(unique) if unique else None
        self._byte_forms = _forms(frozenset(map(_latin1_view, unique))) if unique else None
        self._longest = max(map(len, unique), default=0)

    def __call__(self, value: Any, extra: str | None = None) -> Any:
        """``value`` (text or a JSON value) with the secrets, and ``extra``
        (a request's own bearer token), replaced."""
        if extra is not None and len(extra) < self._min_length:
            extra = None
        if self._text_forms is None and extra is None:
            return value
        return self._scrub(value, extra)

    def for_texts(self, extra: str | None = None) -> Callable[[str], str]:
        """``self(text, extra)`` for one request's texts, ``extra`` checked
        once for them all."""
        if extra is not None and len(extra) < self._min_length:
            extra = None
        forms = self._text_forms
        if forms is None and extra is None:
            return _unchanged
        return lambda text: self._replace(text, forms, extra)

    def redact_bytes(self, data: bytes, extra: str | None = None) -> bytes:
        """``data`` with the secrets, and ``extra``, replaced (an answer passed
        on as it came)."""
        if extra is not None and len(extra) < self._min_length:
            extra = None
        if self._byte_forms is None and extra is None:
            return data
        view = data.decode("latin-1")
        extra_view = _latin1_view(extra) if extra is not None else None
        redacted = self._replace(view, self._byte_forms, extra_view)
        return data if redacted is view else redacted.encode("latin-1")

    def carries(self, data: bytes, extra: str | None = None) -> bool:
        """Whether ``data`` holds a secret, or ``extra``, in any of its forms."""
        return self.redact_bytes(data, extra) is not data

    def span(self, extra: str | None = None) -> int:
        """The most characters one secret (or ``extra``) may take in text,
        escaped: what a cut text must keep past the cut to find one there."""
        longest = self._longest if extra is None else max(self._longest, len(extra))
        # "\\u002d" for "-": six characters for one.
        return 6 * longest

    def words(self, text: str, extra: str | None = None) -> str:
        """Words from outside about a failure (an exception's text, a status
        phrase) as they may be repeated to a client, in a record, an alert or
        the log: the secrets and ``extra`` replaced, and anything shaped like
        a key hidden."""
        return hide_key_shapes(self(text, extra))

    def _replace(self, text: str, forms: _Forms | None, extra: str | None) -> str:
        """``text`` with the secrets of ``forms`` and ``extra`` replaced;
        ``text`` itself when it holds none."""
        if forms is not None:
            text = forms.literal.sub(REDACTED, text)
        if extra is not None and extra in text:
            text = text.replace(extra, REDACTED)
        if "\\u00" in text or "%" in text or "\\/" in text:
            # An escape of a character no secret has cannot hide one: the
            # slower search for escaped forms runs only after such an escape
            # (and a request's own token has its pattern made only then).
            secrets = forms.secrets if forms is not None else frozenset()
            chars = forms.escapable if forms is not None else frozenset()
            if extra is not None:
                secrets |= {extra}
                chars |= {c for c in extra if c.isascii()}
            if _escapes_any(text, chars):
                text = _forms(secrets).escaped.sub(REDACTED, text)
        return text

    def _scrub(self, value: Any, extra: str | None) -> Any:
        if isinstance(value, str):
            return self._replace(value, self._text_forms, extra)
        if isinstance(value, dict):
            return {k: self._scrub(v, extra) for k, v in value.items()}
        if isinstance(value, list):
            return [self._scrub(v, extra) for v in value]
        return value


def _unchanged(text: str) -> str:
    return text


def hide_key_shapes(text: str) -> str:
    """``text`` without anything shaped like a key or token (``sk-…``,
    ``Bearer …``, ``key=…``), for text whose secrets are not known."""

    def hide(match: re.Match[str]) -> str:
        prefix = match.group(1) or match.group(2) or ""
        return prefix + REDACTED

    return _KEY_SHAPES.sub(hide, text)


def public_text(text: str) -> str:
    """``text`` (a URL, a setting) fit to show: a URL's password replaced,
    and anything shaped like a key hidden (a query's ``key=…``)."""
    try:
        parts = urlsplit(text)
        password = parts.password
    except ValueError:
        password = None
    if password:
        user = parts.username or ""
        host = parts.netloc.rpartition("@")[2]
        text = urlunsplit(parts._replace(netloc=f"{user}:{REDACTED}@{host}"))
    return hide_key_shapes(text)


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
        if name in _SECRET_HEADER_NAMES:
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
