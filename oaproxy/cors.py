"""Which browser origins may call the API (``cors_origins``), and what their
preflights are told.

A keyless proxy on loopback is reachable from every web page its user
visits: with ``Access-Control-Allow-Origin: *`` any of them could spend the
upstream keys through the user's browser. So without ``cors_origins`` the
answers carry CORS headers only when every request needs a client key
(which a page cannot know); a list names the origins let in, ``*`` lets in
any.

A preflight is told the request headers it asked for only when they are
ones the API and the OpenAI SDKs send: never whatever a page asks. A page
let in may read which upstream answered (``X-Oaproxy-Upstream``).
"""

from __future__ import annotations

import re

from attrs import frozen
from twisted.web.http_headers import Headers

from oaproxy.config import Config, all_client_keys
from oaproxy.headers import UPSTREAM_HEADER

ANY_ORIGIN = "*"

_METHODS = b"GET, POST, PUT, PATCH, DELETE, OPTIONS"
_MAX_AGE = b"86400"
# What a preflight that names no headers is told.
_DEFAULT_HEADERS = (b"authorization", b"content-type", b"openai-beta")
# Headers OpenAI's clients send: these and the SDKs' x-stainless-* family.
_API_HEADERS = frozenset(
    {
        *_DEFAULT_HEADERS,
        b"accept",
        b"api-key",
        b"idempotency-key",
        b"openai-organization",
        b"openai-project",
        b"x-api-key",
    }
)
_SDK_PREFIX = b"x-stainless-"
_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9a-z-]+\Z")


@frozen
class CorsPolicy:
    """The origins whose pages may read the API's answers."""

    any_origin: bool
    origins: frozenset[str]

    @classmethod
    def from_config(cls, config: Config) -> CorsPolicy:
        origins = config.cors_origins
        if origins is None:
            # Every request needs a key: a page may call, it cannot spend.
            keyed = bool(all_client_keys(config)) and not any(u.noauth for u in config.upstreams)
            origins = (ANY_ORIGIN,) if keyed else ()
        return cls(any_origin=ANY_ORIGIN in origins, origins=frozenset(origins))

    def answer_headers(self, origin: bytes | None, out: Headers) -> bool:
        """Put on ``out`` what an answer to a page of ``origin`` carries;
        whether that origin is let in."""
        if self.any_origin:
            allowed = b"*"
        elif not self.origins:
            return False
        else:
            # The answer differs by Origin: caches must keep them apart.
            out.setRawHeaders(b"vary", [b"Origin"])
            if origin is None or origin.decode("latin-1") not in self.origins:
                return False
            allowed = origin
        out.setRawHeaders(b"access-control-allow-origin", [allowed])
        out.setRawHeaders(b"access-control-expose-headers", [UPSTREAM_HEADER])
        return True

    def preflight_headers(self, origin: bytes | None, asked: bytes | None, out: Headers) -> None:
        """Put on ``out`` what a preflight from ``origin`` is told."""
        if not self.answer_headers(origin, out):
            return
        out.setRawHeaders(b"access-control-allow-methods", [_METHODS])
        allowed = _allowed(asked)
        if allowed:
            out.setRawHeaders(b"access-control-allow-headers", [b", ".join(allowed)])
        out.setRawHeaders(b"access-control-max-age", [_MAX_AGE])


def _allowed(asked: bytes | None) -> list[bytes]:
    if asked is None:
        return list(_DEFAULT_HEADERS)
    names = (name.strip().lower() for name in asked.split(b","))
    return [
        name
        for name in names
        if _TOKEN.match(name) and (name in _API_HEADERS or name.startswith(_SDK_PREFIX))
    ]
