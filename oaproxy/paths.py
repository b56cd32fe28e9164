"""Where a request goes: its route prefix and its API path.

``/v1/chat/completions`` is the API path ``/v1/chat/completions`` on no
route; ``/ollama/v1/chat/completions`` is the same API path on the route
``/ollama`` (served by the upstreams with ``route: /ollama`` only). What
matches API paths (allow and deny lists, limits, the cache) matches them
under any route prefix: ``RequestPath.api_path`` is what they compare.
"""

from __future__ import annotations

from collections.abc import Sequence
from urllib.parse import unquote_to_bytes

from attrs import frozen


@frozen
class RequestPath:
    """A request's path, as routing and the upstream URL need it."""

    #: The route prefix (``/ollama``), or None for ``/v1`` itself.
    route: str | None
    #: Percent-decoded, without empty segments: ``/v1/chat/completions``.
    api_path: str
    #: The raw bytes after ``<route>/v1``, query included: what is appended
    #: to an upstream's endpoint.
    upstream_path: bytes


def route_of(uri: bytes, routes: Sequence[str]) -> str | None:
    """The route prefix ``uri`` is under: the first of ``routes`` (longest
    first, as ``Config.route_prefixes`` gives them, so that /team/a wins
    over /team) followed by ``/v1``, spelled plainly; None when there is
    none (``/v1`` itself, or a path no route serves)."""
    raw = uri.split(b"?", 1)[0]
    for route in routes:
        prefix = route.encode("ascii")
        if raw.startswith(prefix) and _is_api_path(raw[len(prefix) :]):
            return route
    return None


def request_path(uri: bytes, routes: Sequence[str] = ()) -> RequestPath | None:
    """Where ``uri`` goes; None for a path no API has.

    The API path is percent-decoded and without empty segments (so
    ``/v1//files`` or ``/v1/%66iles`` cannot slip past ``deny:
    [/v1/files]``). None for a path with ``.`` or ``..`` segments, which
    would climb out of an upstream's base path, and unless the raw path is
    a route (or nothing) followed by the bytes ``/v1``: the upstream URL is
    the endpoint plus the raw path after those bytes, which must not be
    anything else (``/%761/x`` would make ``https://10.0.0.1`` ``…161/x``).
    """
    route = route_of(uri, routes)
    rest = uri[len(route) :] if route is not None else uri
    raw = rest.split(b"?", 1)[0]
    if not _is_api_path(raw):
        return None
    decoded = unquote_to_bytes(raw).decode("utf-8", "replace")
    segments = [segment for segment in decoded.split("/") if segment]
    if any(segment in (".", "..") for segment in segments):
        return None
    return RequestPath(route=route, api_path="/" + "/".join(segments), upstream_path=rest[3:])


def _is_api_path(raw: bytes) -> bool:
    return raw.startswith(b"/v1") and raw[3:4] in (b"", b"/")
