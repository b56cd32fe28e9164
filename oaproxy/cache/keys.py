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

# "caching" is out of the parsed body already (see oaproxy.inspection): listed all the same.
IGNORED_PARAMETERS = frozenset({"stream", "stream_options", "user", CACHING})

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
    kept = {name: value for name, value in body.items() if name not in IGNORED_PARAMETERS}
    try:
        canonical = json.dumps(kept, sort_keys=True, separators=(",", ":"))
    except (ValueError, RecursionError):
        return None
    digest = hashlib.sha256()
    for part in (space, path, canonical):
        # Lone surrogates pass through: the digest only needs the same bytes each time.
        digest.update(part.encode("utf-8", "surrogatepass"))
        digest.update(b"\0")
    return digest.hexdigest()
