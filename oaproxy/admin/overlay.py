"""The config file and the store together: the ``Config`` a daemon runs.

- The file's upstreams keep their place; a stored row of source ``config``
  changes the keys it holds, and may disable the upstream (one the file
  gives ``enabled: false`` stays disabled: the store cannot enable it).  A
  row for a name the file no longer has is left alone (it applies again if
  the name comes back).
- Upstreams of source ``admin`` follow the file's, in the order they were
  stored, each read from its row exactly as the file's are read (the
  top-level deadlines and proxy inherited the same way).
- An upstream disabled either way has ``enabled`` false and leaves
  ``Config.upstreams`` for ``Config.disabled_upstreams``, as the file's
  ``enabled: false`` does: nothing is routed to it, its keys stay valid.
- Stored client keys, known by their SHA-256, join the global keys, or with
  a list of upstreams, those upstreams' keys (an upstream open to the global
  keys then lists them beside the new one); all are in
  ``Config.stored_keys``, valid keys even when their upstreams are gone.

Every problem is a ``ConfigError`` naming the table, the row and the key
(``the store: oaproxy_upstreams[fast].timeout: must be greater than 0``): a
daemon refuses such a store as it refuses a bad file.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from typing import Any, NoReturn

import attrs

from oaproxy.admin.sealing import Sealer, SealingError, secret_keys
from oaproxy.admin.stored import Source, StoredKey, StoredUpstream, StoreSnapshot
from oaproxy.config import ClientKey, Config, ConfigError, Upstream, all_client_keys
from oaproxy.config.jsonvalues import read_json_section, read_json_upstream
from oaproxy.config.loader import INHERITED
from oaproxy.sinks.sql import KEYS_TABLE, UPSTREAMS_TABLE

__all__ = [
    "STORE",
    "Unsealer",
    "key_upstreams",
    "overlay",
    "overlay_with",
    "running_config",
    "settings_of",
]

#: How messages name the store (never its DSN, which may hold a password).
STORE = "the store"

_SHA256 = re.compile(r"[0-9a-f]{64}\Z")

#: Reads the secret settings of a row: decrypts them, or (for a command
#: that only lists) stands in for them.
Unsealer = Callable[[str], Mapping[str, str]]


def running_config(file: Config, stored: StoreSnapshot) -> Config:
    """The config the file and the store's rows make together: what runs
    (the store's secrets unsealed with the file's ``store_key``)."""
    return overlay(file, stored, Sealer.from_config(file))


def overlay(file: Config, stored: StoreSnapshot, sealer: Sealer) -> Config:
    """``file`` with what ``stored`` changes; ``ConfigError`` for a bad row."""
    if not stored.upstreams and not stored.keys:
        return file
    return overlay_with(file, stored, sealer.unseal)


def overlay_with(file: Config, stored: StoreSnapshot, unseal: Unsealer) -> Config:
    """``overlay``, with the secret settings read by ``unseal``."""
    rows = {row.name: row for row in stored.upstreams}
    enabled: list[Upstream] = []
    disabled: list[Upstream] = []
    for upstream in (*file.upstreams, *file.disabled_upstreams):
        row = rows.get(upstream.name)
        if row is not None:
            if _source(row) is Source.ADMIN:
                _fail(row.name, "name", "this upstream is in the config file too: remove one")
            values = _upstream_values(row, unseal, over=upstream)
            # Disabled by the file or by the store: either says enabled: false.
            upstream = attrs.evolve(upstream, **values, enabled=upstream.enabled and row.enabled)
        (enabled if upstream.enabled else disabled).append(upstream)
    for row in stored.upstreams:
        if _source(row) is Source.ADMIN:
            upstream = _stored_upstream(file, row, unseal)
            (enabled if upstream.enabled else disabled).append(upstream)

    file_keys = all_client_keys(file)
    names = {key.name for key in file_keys}
    digests = {key.sha256 for key in file_keys}
    global_keys = list(file.keys)
    scoped: dict[str, list[ClientKey]] = {}
    stored_keys = []
    for key_row in stored.keys:
        key = _stored_key(key_row)
        stored_keys.append(key)
        where = f"{KEYS_TABLE}[{key_row.name}]"
        if key.name in names:
            raise ConfigError(STORE, None, f"{where}.name", "a key of the config file has it")
        if key.sha256 in digests:
            raise ConfigError(STORE, None, f"{where}.sha256", "this key is in the config file too")
        names.add(key.name)
        digests.add(key.sha256)
        upstreams = key_upstreams(key_row)
        if upstreams is None:
            global_keys.append(key)
        for name in upstreams or ():
            scoped.setdefault(name, []).append(key)

    def with_keys(upstream: Upstream) -> Upstream:
        extra = scoped.get(upstream.name)
        if not extra:
            return upstream
        keys = upstream.keys if upstream.keys is not None else tuple(global_keys)
        return attrs.evolve(upstream, keys=(*keys, *extra))

    return attrs.evolve(
        file,
        keys=tuple(global_keys),
        upstreams=tuple(map(with_keys, enabled)),
        disabled_upstreams=tuple(map(with_keys, disabled)),
        stored_keys=tuple(stored_keys),
    )


def _stored_upstream(file: Config, row: StoredUpstream, unseal: Unsealer) -> Upstream:
    """The upstream a row of source ``admin`` defines."""
    values = _upstream_values(row, unseal, over=None)
    # As the loader does: the top-level settings for those not given.
    inherited = {name: getattr(file, name) for name in INHERITED}
    return Upstream(
        **{**inherited, **values, "name": row.name, "keys": None, "enabled": row.enabled}
    )


def _upstream_values(
    row: StoredUpstream, unseal: Unsealer, *, over: Upstream | None
) -> dict[str, Any]:
    """The fields a row gives, by attribute name (``over``: the file's
    upstream the row changes)."""
    settings = settings_of(row.settings, f"{UPSTREAMS_TABLE}[{row.name}]")
    given = secret_keys(Upstream) & settings.keys()
    if given:
        _fail(row.name, min(given), "a secret is stored sealed, never in settings (see README)")
    for key, what in (("name", "the name"), ("enabled", "whether it is enabled")):
        if key in settings:
            _fail(row.name, key, f"{what} is the row's {key} column")
    if row.sealed is not None:
        try:
            settings.update(unseal(row.sealed))
        except SealingError as e:
            _fail(row.name, "sealed", str(e))
    return read_json_upstream(
        settings, where=STORE, key=f"{UPSTREAMS_TABLE}[{row.name}]", over=over
    )


def _stored_key(row: StoredKey) -> ClientKey:
    """The client key a row of ``oaproxy_keys`` holds."""
    where = f"{KEYS_TABLE}[{row.name}]"
    if not row.name.strip():
        raise ConfigError(STORE, None, f"{where}.name", "must not be empty")
    if not _SHA256.match(row.sha256):
        raise ConfigError(STORE, None, f"{where}.sha256", "expected 64 lower-case hex digits")
    settings = settings_of(row.settings, where)
    if "key" in settings:
        raise ConfigError(STORE, None, f"{where}.key", "only the key's sha256 is stored")
    values = read_json_section(
        settings, ClientKey, "a client key's settings", where=STORE, key=where, partial=True
    )
    return ClientKey(name=row.name, secret=None, sha256=row.sha256, **values)


def key_upstreams(row: StoredKey) -> tuple[str, ...] | None:
    """The upstream names a stored key may use; None: every upstream open to all keys."""
    if row.upstreams is None:
        return None
    where = f"{KEYS_TABLE}[{row.name}].upstreams"
    try:
        names = json.loads(row.upstreams)
    except ValueError:
        raise ConfigError(STORE, None, where, "not JSON") from None
    if names is None:
        return None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ConfigError(STORE, None, where, "expected a JSON list of upstream names, or null")
    return tuple(names)


def settings_of(text: str, where: str) -> dict[str, Any]:
    """A row's settings column: a JSON object."""
    try:
        settings = json.loads(text)
    except ValueError:
        raise ConfigError(STORE, None, f"{where}.settings", "not JSON") from None
    if not isinstance(settings, dict):
        raise ConfigError(STORE, None, f"{where}.settings", "expected a JSON object")
    return settings


def _source(row: StoredUpstream) -> Source:
    try:
        return Source(row.source)
    except ValueError:
        _fail(row.name, "source", "expected 'admin' or 'config'")


def _fail(name: str, key: str, message: str) -> NoReturn:
    raise ConfigError(STORE, None, f"{UPSTREAMS_TABLE}[{name}].{key}", message)
