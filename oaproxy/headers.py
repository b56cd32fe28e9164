"""Header hygiene, in one place, for both directions of the proxy."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from twisted.web.http_headers import Headers

from oaproxy.credentials import SECRET_HEADERS

# RFC 9110 section 7.6.1, plus the proxy-era names that still appear.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)

# Never forwarded from the client: credentials (replaced by the upstream's own),
# and headers the agent or oaproxy set for itself.
CLIENT_ONLY = SECRET_HEADERS | frozenset(
    {
        b"host",
        b"content-length",
        b"accept-encoding",
        b"x-forwarded-for",
        b"expect",
    }
)

# Without keep_header an upstream sees only what the API itself needs.
ESSENTIAL = frozenset(
    {
        b"content-type",
        b"accept",
        b"user-agent",
        b"openai-beta",
        b"idempotency-key",
    }
)

# Our body to the client is re-framed by twisted.web.
RESPONSE_DROPPED = frozenset({b"content-length", b"date", b"server"})

# An upstream's cookies would be set on the proxy's origin, for every client
# of it: only an upstream that gets the clients' own headers (keep_header)
# may set them.
COOKIES = frozenset({b"set-cookie", b"set-cookie2"})

# Which pages may read the answers is oaproxy's to say (oaproxy.cors).
_CORS_PREFIX = b"access-control-"

#: Names, on every proxied answer, the upstream it came from.
UPSTREAM_HEADER = b"x-oaproxy-upstream"


def _connection_tokens(headers: Headers) -> frozenset[bytes]:
    tokens: set[bytes] = set()
    for value in headers.getRawHeaders(b"connection", ()):
        tokens.update(t.strip().lower() for t in value.split(b","))
    return frozenset(tokens)


_NOT_TO_UPSTREAM = HOP_BY_HOP | CLIENT_ONLY
_NOT_TO_CLIENT = HOP_BY_HOP | RESPONSE_DROPPED


def _dropped(headers: Headers, fixed: frozenset[bytes]) -> frozenset[bytes]:
    """The fixed names, and those listed in ``Connection`` (rarely any)."""
    if not headers.hasHeader(b"connection"):
        return fixed
    return fixed | _connection_tokens(headers)


def upstream_headers(
    client: Headers,
    *,
    keep_header: bool,
    authorization: bytes | None,
    forwarded_for: bytes,
) -> Headers:
    """The headers of one attempt's request to an upstream."""
    out = Headers()
    dropped = _dropped(client, _NOT_TO_UPSTREAM)
    for name, values in client.getAllRawHeaders():
        lname = name.lower()
        if lname in dropped:
            continue
        if keep_header or lname in ESSENTIAL:
            out.setRawHeaders(name, values)
    if authorization is not None:
        out.setRawHeaders(b"authorization", [authorization])
    # Ask for identity so that records can read every body as it is, and no
    # stale Content-Length or Content-Encoding reaches the client.
    out.setRawHeaders(b"accept-encoding", [b"identity"])
    out.setRawHeaders(b"x-forwarded-for", [forwarded_for])
    return out


def forwarded_for(client: Headers, peer: str) -> bytes:
    """``X-Forwarded-For`` with this client's address appended."""
    previous = client.getRawHeaders(b"x-forwarded-for")
    if previous:
        return b", ".join([*previous, peer.encode("ascii", "replace")])
    return peer.encode("ascii", "replace")


def response_headers(
    upstream: Headers, *, keep_header: bool
) -> Iterable[tuple[bytes, Sequence[bytes]]]:
    """The upstream's response headers that are passed on to the client."""
    dropped = _dropped(upstream, _NOT_TO_CLIENT if keep_header else _NOT_TO_CLIENT | COOKIES)
    for name, values in upstream.getAllRawHeaders():
        lname = name.lower()
        if lname not in dropped and not lname.startswith(_CORS_PREFIX):
            yield name, values
