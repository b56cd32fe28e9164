"""The rows of the store as values, as they were read: what the settings
columns say is checked later, by ``overlay`` (a row edited by hand may say
anything)."""

from __future__ import annotations

from enum import Enum

from attrs import field, frozen


class Source(Enum):
    """Where an upstream or a client key is defined."""

    CONFIG = "config"  # the config file (a stored row only changes it)
    ADMIN = "admin"  # the store: made by the admin API or the CLI


@frozen
class StoredUpstream:
    """A row of ``oaproxy_upstreams``."""

    name: str
    # ADMIN: the row defines the upstream; CONFIG: it changes the file's
    # upstream of that name (settings then holds only the changed keys).
    source: str
    enabled: bool
    settings: str  # JSON text: the config file's keys, without secrets
    sealed: str | None = field(repr=False)  # the secret keys, encrypted (sealing)


@frozen
class StoredKey:
    """A row of ``oaproxy_keys``."""

    name: str
    sha256: str = field(repr=False)
    settings: str  # JSON text: rate_limit, token_limit, budget as in the file
    upstreams: str | None  # JSON text: a list of upstream names; None: all of them
    created: float | None


@frozen
class StoreSnapshot:
    """Everything the store holds, at one ``version`` of it."""

    version: int
    upstreams: tuple[StoredUpstream, ...] = ()
    keys: tuple[StoredKey, ...] = ()
    # The id of the newest audit entry then (0: none).
    last_audit: int = 0
    # What every process signs the dashboard's sessions with (and the admin
    # key): ``oaproxy.dashboard.sessiontables``; '' when there is none.
    session_secret: str = field(default="", repr=False)

    def upstream(self, name: str) -> StoredUpstream | None:
        return next((row for row in self.upstreams if row.name == name), None)

    def key(self, name: str) -> StoredKey | None:
        return next((row for row in self.keys if row.name == name), None)

    def changes_since(self, old: StoreSnapshot) -> str:
        """What differs from ``old``, by name only (for the log: the audit
        entries, with the settings, are in the table)."""
        parts = []
        for what, before, after in (
            ("upstream", {r.name: r for r in old.upstreams}, {r.name: r for r in self.upstreams}),
            ("key", {r.name: r for r in old.keys}, {r.name: r for r in self.keys}),
        ):
            for verb, names in (
                ("added", [n for n in after if n not in before]),
                ("changed", [n for n in after if n in before and after[n] != before[n]]),
                ("removed", [n for n in before if n not in after]),
            ):
                if names:
                    parts.append(f"{what}s {verb}: {', '.join(names)}")
        return "; ".join(parts) or "nothing that oaproxy reads"


#: No store, or one that holds nothing yet.
EMPTY = StoreSnapshot(version=0)


class Action(Enum):
    """What a change did, as the audit log names it."""

    UPSTREAM_ADDED = "upstream.added"
    UPSTREAM_CHANGED = "upstream.changed"
    UPSTREAM_REMOVED = "upstream.removed"
    UPSTREAM_ENABLED = "upstream.enabled"
    UPSTREAM_DISABLED = "upstream.disabled"
    KEY_ADDED = "key.added"
    KEY_REMOVED = "key.removed"


@frozen
class AuditEntry:
    """A row of ``oaproxy_audit``: who changed what; never a secret (a
    secret setting shows as ``"set"`` or ``"removed"``)."""

    time: float
    actor: str  # "admin API from 127.0.0.1", "cli alice@host"
    action: Action
    target: str  # the upstream's or key's name
    changes: str  # JSON text: the settings given, secrets replaced
    id: int | None = None  # set once stored
