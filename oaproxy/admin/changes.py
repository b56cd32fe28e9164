"""Each change of the store, as the admin API and the CLI make it.

A change is built from what was asked (``add_upstream(context, body)``…) as
a function of the store's rows (``Decide``), called by
``tables.take_change`` inside the transaction that writes it: it refuses
(``Refusal``) or says what to write and what the audit log keeps.  Settings
are checked by the config file's own readers, taken literally (no
``${NAME}``); a secret setting is sealed with ``store_key``, and the audit
log only says it was set or removed.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Callable, Mapping
from enum import Enum
from typing import Any, NoReturn

from attrs import frozen

from oaproxy.admin.describe import public_text
from oaproxy.admin.overlay import key_upstreams, settings_of
from oaproxy.admin.sealing import CREDENTIALED, Sealer, SealingError, secret_keys, secret_setting
from oaproxy.admin.stored import (
    Action,
    AuditEntry,
    Source,
    StoredKey,
    StoredUpstream,
    StoreSnapshot,
)
from oaproxy.admin.tables import Change, DropKey, DropUpstream, PutKey, PutUpstream, Write
from oaproxy.config import ClientKey, Config, ConfigError, Upstream, all_client_keys, key_digest
from oaproxy.config.jsonvalues import read_json_section, read_json_upstream

__all__ = [
    "ChangeContext",
    "Decide",
    "Refusal",
    "RefusalKind",
    "add_key",
    "add_upstream",
    "change_upstream",
    "new_key_secret",
    "remove_key",
    "remove_upstream",
    "set_enabled",
]

Decide = Callable[[StoreSnapshot], Change]

_SECRETS = secret_keys(Upstream)
# Names are path segments of /admin/upstreams/{name} and CLI arguments.
_NAME = re.compile(r"[^\x00-\x20/\x7f][^\x00-\x1f/\x7f]{0,199}\Z")
_NAME_RULE = "a name is 1 to 200 characters, without '/' or control characters"
# A change that does not give ``enabled``.
_UNCHANGED: Any = object()
#: What a key oaproxy makes starts with: shaped like a key, so that one
#: pasted into text that oaproxy cannot know is hidden all the same.
KEY_PREFIX = "sk-oaproxy-"


class RefusalKind(Enum):
    INVALID = 400  # the request itself: a bad field, a missing name
    NOT_FOUND = 404
    CONFLICT = 409  # the name is taken, or the file owns it


class Refusal(Exception):
    """A change not made, and why (one line, never a secret)."""

    def __init__(
        self, kind: RefusalKind, message: str, param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(kind, message, param, code)
        self.kind = kind
        self.message = message
        self.param = param
        self.code = code


@frozen
class ChangeContext:
    """What every change needs besides the store's rows."""

    file: Config  # the config file, without the store
    sealer: Sealer
    actor: str  # who asks, for the audit log
    now: float  # wall-clock time


def new_key_secret() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


# -- upstreams -----------------------------------------------------------------


def add_upstream(context: ChangeContext, body: Any) -> Decide:
    """A new upstream of source ``admin``: ``body`` is its mapping, as in
    the config file, ``name`` required (``enabled: false``: added disabled)."""
    given = _object(body)
    name = _new_name(given.get("name"), "upstream")
    settings = {k: v for k, v in given.items() if k != "name"}
    plain, sealed_secrets, _ = _split(settings)
    values = _check_upstream(plain, sealed_secrets, over=None)
    plain.pop("enabled", None)
    enabled = values.get("enabled", True)
    sealed = _seal(context, sealed_secrets)

    def decide(stored: StoreSnapshot) -> Change:
        row = stored.upstream(name)
        if _file_upstream(context, name) is not None:
            _refuse(RefusalKind.CONFLICT, f"upstream {name!r} is in the config file", "name")
        if row is not None and row.source == Source.ADMIN.value:
            _refuse(RefusalKind.CONFLICT, f"upstream {name!r} exists", "name")
        # Any other row of that name changed a file upstream that is gone.
        new = StoredUpstream(name, Source.ADMIN.value, enabled, _dumps(plain), sealed)
        return _change(context, [PutUpstream(new)], Action.UPSTREAM_ADDED, name, settings)

    return decide


def change_upstream(context: ChangeContext, name: str, body: Any) -> Decide:
    """Some keys of an upstream changed (null: back to the default, or to
    the config file's value); an upstream of the file is changed by a row of
    source ``config`` holding only the keys that differ.  ``enabled`` is the
    row's enabled column, as ``set_enabled`` sets it."""
    given = _object(body)
    if not given:
        _refuse(RefusalKind.INVALID, "nothing to change: give the keys to change")
    if "name" in given and given["name"] != name:
        _refuse(RefusalKind.INVALID, "an upstream's name cannot change: add another", "name")
    given.pop("name", None)
    plain, sealed_secrets, removed_secrets = _split(given)
    # The row's enabled column (null: enabled, as without a row).
    switch = plain.pop("enabled", _UNCHANGED)

    def decide(stored: StoreSnapshot) -> Change:
        row = stored.upstream(name)
        in_file = _file_upstream(context, name)
        if in_file is None and (row is None or row.source != Source.ADMIN.value):
            _refuse(RefusalKind.NOT_FOUND, f"no upstream {name!r}")
        source = Source.CONFIG if in_file is not None else Source.ADMIN
        settings = {} if row is None else settings_of(row.settings, name)
        for key, value in plain.items():
            if value is None:
                settings.pop(key, None)
            else:
                settings[key] = value
        for key in sealed_secrets:
            # A proxy with credentials now: sealed, no longer plain.
            settings.pop(key, None)
        replaced = sealed_secrets.keys() | removed_secrets | (plain.keys() & CREDENTIALED)
        # Every secret given again: the old ones need not be read.
        old_secrets = {} if replaced >= _SECRETS | CREDENTIALED else _unseal(context, row)
        kept = {k: v for k, v in old_secrets.items() if k not in replaced}
        all_secrets = {**kept, **sealed_secrets}
        checked = dict(settings)
        if switch is not _UNCHANGED and switch is not None:
            checked["enabled"] = switch
        values = _check_upstream(checked, all_secrets, over=in_file)
        enabled = True if row is None else row.enabled
        if switch is not _UNCHANGED:
            enabled = _enabling(in_file, name, values.get("enabled", True))
        new = StoredUpstream(
            name, source.value, enabled, _dumps(settings), _seal(context, all_secrets)
        )
        return _change(context, [_put_or_drop(new)], Action.UPSTREAM_CHANGED, name, given)

    return decide


def set_enabled(context: ChangeContext, name: str, enabled: bool) -> Decide:
    """Enable or disable an upstream, of the store or of the config file."""

    def decide(stored: StoreSnapshot) -> Change:
        row = stored.upstream(name)
        in_file = _file_upstream(context, name)
        if in_file is None and (row is None or row.source != Source.ADMIN.value):
            _refuse(RefusalKind.NOT_FOUND, f"no upstream {name!r}")
        if row is None or (in_file is not None and row.source != Source.CONFIG.value):
            row = StoredUpstream(name, Source.CONFIG.value, enabled, "{}", None)
        switched = _enabling(in_file, name, enabled)
        new = StoredUpstream(row.name, row.source, switched, row.settings, row.sealed)
        action = Action.UPSTREAM_ENABLED if enabled else Action.UPSTREAM_DISABLED
        return _change(context, [_put_or_drop(new)], action, name, {"enabled": enabled})

    return decide


def _enabling(in_file: Upstream | None, name: str, enabled: bool) -> bool:
    """``enabled``, unless it would enable what the config file disables."""
    if enabled and in_file is not None and not in_file.enabled:
        _refuse(
            RefusalKind.CONFLICT,
            f"upstream {name!r} has enabled: false in the config file: enable it there",
            "enabled",
        )
    return enabled


def remove_upstream(context: ChangeContext, name: str) -> Decide:
    """Remove an upstream of the store; one of the config file stays."""

    def decide(stored: StoreSnapshot) -> Change:
        if _file_upstream(context, name) is not None:
            _refuse(
                RefusalKind.CONFLICT,
                f"upstream {name!r} is in the config file: disable it, or remove it from the file",
            )
        row = stored.upstream(name)
        if row is None:
            _refuse(RefusalKind.NOT_FOUND, f"no upstream {name!r}")
        # What it was, for the audit log; of its secrets, only that they went too.
        was: dict[str, Any] = settings_of(row.settings, name)
        if row.sealed is not None:
            was.update(dict.fromkeys(_SECRETS))
        return _change(context, [DropUpstream(name)], Action.UPSTREAM_REMOVED, name, was)

    return decide


# -- client keys -----------------------------------------------------------------


def add_key(context: ChangeContext, body: Any, secret: str) -> Decide:
    """A new client key, ``secret`` (shown once to who asked), stored as its
    SHA-256: ``body`` has its ``name``, its limits as in the config file
    (``rate_limit``, ``token_limit``, ``budget``) and optionally
    ``upstreams``, the names it may use (else: all open to every key)."""
    given = _object(body)
    name = _new_name(given.get("name"), "key")
    upstreams = given.get("upstreams")
    if upstreams is not None and (
        not isinstance(upstreams, list) or not all(isinstance(n, str) for n in upstreams)
    ):
        _refuse(RefusalKind.INVALID, "expected a list of upstream names, or null", "upstreams")
    settings = {k: v for k, v in given.items() if k not in ("name", "upstreams")}
    if "key" in settings:
        _refuse(RefusalKind.INVALID, "a key's secret is made by oaproxy, not given", "key")
    _checked(
        lambda: read_json_section(settings, ClientKey, "a key mapping", where="body", partial=True)
    )
    plain = {k: v for k, v in settings.items() if v is not None}

    def decide(stored: StoreSnapshot) -> Change:
        names = {key.name for key in all_client_keys(context.file)}
        if name in names or stored.key(name) is not None:
            _refuse(RefusalKind.CONFLICT, f"a client key named {name!r} exists", "name")
        known = {u.name for u in (*context.file.upstreams, *context.file.disabled_upstreams)} | {
            row.name for row in stored.upstreams if row.source == Source.ADMIN.value
        }
        for position, upstream in enumerate(upstreams or ()):
            if upstream not in known:
                _refuse(RefusalKind.INVALID, f"no upstream {upstream!r}", f"upstreams[{position}]")
        listed = None if upstreams is None else _dumps(list(dict.fromkeys(upstreams)))
        row = StoredKey(name, key_digest(secret), _dumps(plain), listed, context.now)
        audit = {**settings, "upstreams": upstreams}
        return _change(context, [PutKey(row)], Action.KEY_ADDED, name, audit)

    return decide


def remove_key(context: ChangeContext, name: str) -> Decide:
    def decide(stored: StoreSnapshot) -> Change:
        if any(key.name == name for key in all_client_keys(context.file)):
            _refuse(
                RefusalKind.CONFLICT,
                f"client key {name!r} is in the config file: remove it from the file",
            )
        row = stored.key(name)
        if row is None:
            _refuse(RefusalKind.NOT_FOUND, f"no client key {name!r}")
        was = {**settings_of(row.settings, name), "upstreams": key_upstreams(row)}
        return _change(context, [DropKey(name)], Action.KEY_REMOVED, name, was)

    return decide


# -- the parts -------------------------------------------------------------------


def _refuse(
    kind: RefusalKind, message: str, param: str | None = None, code: str | None = None
) -> NoReturn:
    raise Refusal(kind, message, param, code)


def _object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        _refuse(RefusalKind.INVALID, "expected a JSON object")
    return dict(body)


def _new_name(value: Any, what: str) -> str:
    if value is None:
        _refuse(RefusalKind.INVALID, f"a new {what} needs a name", "name")
    if not isinstance(value, str) or not _NAME.match(value.strip()):
        _refuse(RefusalKind.INVALID, _NAME_RULE, "name")
    return value.strip()


def _split(settings: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, str], set[str]]:
    """The plain settings, the secrets given (not empty) and those removed;
    a proxy URL with credentials is a secret given."""
    plain: dict[str, Any] = {}
    given: dict[str, str] = {}
    removed: set[str] = set()
    for key, value in settings.items():
        if key in _SECRETS:
            if value is None or value == "":
                removed.add(key)
            elif not isinstance(value, str):
                _refuse(RefusalKind.INVALID, f"{key}: expected a string", key)
            else:
                given[key] = value
        elif secret_setting(key, value):
            given[key] = value
        else:
            plain[key] = value
    return plain, given, removed


def _checked(read: Callable[[], Any]) -> Any:
    """``read()``, with a config error as the refusal that names its key."""
    try:
        return read()
    except ConfigError as e:
        _refuse(RefusalKind.INVALID, f"{e.key}: {e.message}" if e.key else e.message, e.key or None)


def _check_upstream(
    plain: Mapping[str, Any], secrets: Mapping[str, str], *, over: Upstream | None
) -> dict[str, Any]:
    """The values of an upstream's settings, read as the file's are
    (``over``: the file's upstream they change)."""
    settings = {**plain, **secrets}
    values: dict[str, Any] = _checked(lambda: read_json_upstream(settings, where="body", over=over))
    return values


def _file_upstream(context: ChangeContext, name: str) -> Upstream | None:
    """The config file's upstream ``name``, enabled or not."""
    file = context.file
    return next((u for u in (*file.upstreams, *file.disabled_upstreams) if u.name == name), None)


def _seal(context: ChangeContext, given: Mapping[str, str]) -> str | None:
    if not given:
        return None
    try:
        return context.sealer.seal(given)
    except SealingError as e:
        _refuse(RefusalKind.INVALID, str(e), min(given), "store_key_missing")


def _unseal(context: ChangeContext, row: StoredUpstream | None) -> dict[str, str]:
    if row is None or row.sealed is None:
        return {}
    try:
        return context.sealer.unseal(row.sealed)
    except SealingError as e:
        _refuse(
            RefusalKind.CONFLICT,
            f"{e}; give {', '.join(sorted(_SECRETS | CREDENTIALED))} again with this change",
            code="store_key_mismatch",
        )


def _put_or_drop(row: StoredUpstream) -> Write:
    """A row that changes nothing of a file upstream is dropped, not kept."""
    if (
        row.source == Source.CONFIG.value
        and row.enabled
        and row.sealed is None
        and row.settings == "{}"
    ):
        return DropUpstream(row.name)
    return PutUpstream(row)


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, sort_keys=True)


def _audited(value: Any) -> Any:
    if isinstance(value, str):
        return public_text(value)
    if isinstance(value, list):
        return [_audited(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _audited(v) for k, v in value.items()}
    return value


def _change(
    context: ChangeContext,
    writes: list[Write],
    action: Action,
    target: str,
    given: Mapping[str, Any],
) -> Change:
    """The change, with an audit entry of what was given, secrets hidden."""
    changes = {
        key: ("removed" if value is None or value == "" else "set")
        if key in _SECRETS
        else _audited(value)
        for key, value in given.items()
    }
    entry = AuditEntry(context.now, context.actor, action, target, _dumps(changes))
    return Change(tuple(writes), entry)
