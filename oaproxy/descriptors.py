"""File descriptors: how many client connections the process can hold.

Every client connection is a descriptor, and one being served may hold two
more (its upstream connection, its body's spool file): past the limit,
``accept`` fails and so do upstream connections, spool files and logs. So
the client connections are capped below what the limit allows, whatever
``max_connections`` says.
"""

from __future__ import annotations

import resource

# Listeners, log files, the databases, Redis, the reactor's own.
RESERVED = 64
# A client connection, and what serving it may hold besides (see above).
PER_CONNECTION = 3


def raise_descriptor_limit() -> int:
    """Raise the soft descriptor limit to the hard one (as Go programs do at
    start); the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    return soft


def connection_cap(max_connections: int) -> int:
    """The client connections allowed at once: ``max_connections``, or fewer
    when the descriptor limit could not serve them all."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return max_connections
    return max(1, min(max_connections, (soft - RESERVED) // PER_CONNECTION))
