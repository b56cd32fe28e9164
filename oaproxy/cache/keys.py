"""Which requests the cache serves, and the key of each.

The key is the path (the API path, under its route prefix if any: each
prefix has upstreams of its own) plus a canonical form of the body: JSON with sorted
keys, without the parameters that do not change the answer's content
(``stream``, ``stream_options``: a stream and a non-stream request share an
entry; ``user``; ``caching``). It is namespaced per client key (by the
key's name, never the key) unless ``cache.shared``, and hashed, so no
client text or key name shows in a Redis key.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from oaproxy.inspection import CACHING

# "caching" asks for the cache, and is cut from what upstreams are sent.
IGNORED_PARAMETERS = frozenset({"stream", "stream_options", "user", CACHING})

# json.dumps(sort_keys=True, separators=...) as one encoder made once:
# json.dumps makes a new one per call for any non-default argument.
_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"))

SHARED = "shared"
ANONYMOUS = "anonymous"


def namespace(key_name: str | None, shared: bool) -> str:
    """Whose entries a request may be served: everyone's, or its key's."""
    if shared:
        return SHARED
    return ANONYMOUS if key_name is None else "key:" + key_name


def cache_key(space: str, path: str, body: Mapping[str, Any]) -> str | None:
    """The hex SHA-256 naming a request's entry; None for a body that has no
    canonical form (nested too deep to encode again)."""
    kept = (
        # Copied only to drop what the key leaves out.
        body
        if isinstance(body, dict) and IGNORED_PARAMETERS.isdisjoint(body)
        else {name: value for name, value in body.items() if name not in IGNORED_PARAMETERS}
    )
    try:
        canonical = _CANONICAL.encode(kept)
    except (ValueError, RecursionError):
        return None
    # Each part followed by a NUL, hashed in one go. Lone surrogates pass
    # through: the digest only needs the same bytes each time.
    named = "\0".join((space, path, canonical, ""))
    return hashlib.sha256(named.encode("utf-8", "surrogatepass")).hexdigest()
