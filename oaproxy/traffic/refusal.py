"""What refused a request: the limit named in its record and counted in
``oaproxy_rate_limited_total{kind, scope}``."""

from __future__ import annotations

from enum import Enum
from typing import Any

from attrs import frozen


class LimitKind(Enum):
    REQUESTS = "requests"
    TOKENS = "tokens"
    BUDGET = "budget"


class LimitScope(Enum):
    GLOBAL = "global"  # all requests together
    KEY = "key"  # one client key (or client IP, without a key)
    ROUTE = "route"  # one key (or IP) on one API route


@frozen
class LimitRefusal:
    """The limit that refused a request: e.g. requests, key, ``10/minute``."""

    kind: LimitKind
    scope: LimitScope
    limit: str  # the rate or budget as the config gives it: "10/minute", "50 usd/month"

    def as_record(self) -> dict[str, Any]:
        return {"kind": self.kind.value, "scope": self.scope.value, "limit": self.limit}
