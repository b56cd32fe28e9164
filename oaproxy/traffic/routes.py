"""Which configured route a request is on, and whom a limit counts.

Routes (``limits.routes``, ``limits.stream_pace``) are API paths; a
request's API path (``oaproxy.paths``: what follows its route prefix, if
any) matches the longest route that is a whole-segment prefix of it, so
routes keep matching under a route prefix (``/ollama/v1/chat/completions``
is on ``/v1/chat/completions``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Generic, TypeVar

_T = TypeVar("_T")


class RouteTable(Generic[_T]):
    """Configured routes and what each one has (its limits, its pace)."""

    def __init__(self, routes: Mapping[str, _T]) -> None:
        # Longest first: the first match is the most specific.
        self._routes = sorted(routes.items(), key=lambda item: len(item[0]), reverse=True)

    def __bool__(self) -> bool:
        return bool(self._routes)

    def match(self, api_path: str) -> tuple[str, _T] | None:
        """The route an API path (``RequestPath.api_path``) is on and its
        value, or None."""
        for route, value in self._routes:
            if api_path == route or api_path.startswith(route + "/"):
                return route, value
        return None


def who(key_name: str | None, client_ip: str) -> str:
    """Whom a per-key limit counts: the key's name (never the key), or,
    for a request without one, its client IP."""
    return key_named(key_name) if key_name is not None else address(client_ip)


def key_named(name: str) -> str:
    return f"key={name}"


def address(client_ip: str) -> str:
    return f"ip={client_ip}"
