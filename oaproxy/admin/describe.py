"""Upstreams and client keys as the admin API shows them, and the CLI lists
them: JSON, generic over the model's fields (a key added to ``Upstream``
shows up here by itself), never a secret.

A setting is shown under the config file's name for it, as the file writes
it (``"60/minute"`` for a rate, ``"month"`` for a period, key names for an
upstream's ``authorization``); a secret one (a field kept out of ``repr``:
an upstream's ``sk``) only as ``<key>_set``: true or false.  Text is shown
without the passwords of URLs and without anything shaped like a key.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from enum import Enum
from typing import Any

import attrs

from oaproxy.activity import UpstreamState
from oaproxy.admin.overlay import key_upstreams, settings_of
from oaproxy.admin.sealing import secret_keys
from oaproxy.admin.stored import Source, StoreSnapshot
from oaproxy.config import ClientKey, Config, Rate, Upstream
from oaproxy.config.schema import file_fields
from oaproxy.credentials import public_text
from oaproxy.upstreamclient.proxy import HTTPProxy

__all__ = ["describe_key", "describe_upstream", "json_value", "public_text", "settings_json"]


def json_value(value: Any) -> Any:
    """A setting's value as the config file would write it, in JSON."""
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, str):
        return public_text(value)
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, ClientKey):
        return value.name
    if isinstance(value, Rate):
        return value.text
    if isinstance(value, HTTPProxy):
        return value.url
    if isinstance(value, tuple) and value and all(isinstance(v, Rate) for v in value):
        # A limit string: "10/minute;100/hour".
        return ";".join(rate.text for rate in value)
    if isinstance(value, (tuple, list, frozenset)):
        return [json_value(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): json_value(v) for k, v in value.items()}
    if attrs.has(type(value)):
        return settings_json(value)
    if isinstance(value, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
        return str(value)
    return public_text(str(value))


def settings_json(instance: Any, *, show_secrets_set: bool = True) -> dict[str, Any]:
    """The file's keys of an attrs section instance, with their values."""
    result: dict[str, Any] = {}
    for field, key, _ in file_fields(type(instance)):
        value = getattr(instance, field.name)
        if not field.repr:
            if show_secrets_set:
                result[f"{key}_set"] = bool(value)
            continue
        result[key] = json_value(value)
        if isinstance(value, HTTPProxy):
            # Its URL without them; of its credentials, only whether there are any.
            result[f"{key}_credentials_set"] = value.credentials is not None
    return result


def describe_upstream(
    upstream: Upstream, *, stored: StoreSnapshot, state: UpstreamState | None
) -> dict[str, Any]:
    """``{"object": "upstream", "name", "source", "enabled", "settings",
    "overridden", "state"}``; ``overridden``: the keys the store changes of an
    upstream of the config file; ``state`` None where no daemon runs (the CLI).
    ``enabled`` false: disabled by the file (``enabled: false``) or the store."""
    row = stored.upstream(upstream.name)
    source = Source.ADMIN if row is not None and row.source == Source.ADMIN.value else Source.CONFIG
    overridden: list[str] = []
    if row is not None and source is Source.CONFIG:
        overridden = sorted(settings_of(row.settings, row.name))
        if row.sealed is not None:
            # Which of them the row seals is sealed too.
            overridden += sorted(secret_keys(Upstream))
    settings = settings_json(upstream)
    settings.pop("name", None)
    return {
        "object": "upstream",
        "name": upstream.name,
        "source": source.value,
        "enabled": upstream.enabled,
        "settings": settings,
        "overridden": overridden,
        "state": None if state is None else state_json(state),
    }


def state_json(state: UpstreamState) -> dict[str, Any]:
    circuit = state.circuit
    return {
        "circuit": circuit.state.label,
        # Failed attempts in a row, and when an open circuit lets a probe
        # through (the reactor's clock: wall time in the daemon).
        "circuit_failures": circuit.failures,
        "circuit_open_until": circuit.open_until,
        "failing": state.failing,
        "in_flight": state.in_flight,
        "ttfb_average": state.ttfb_average,
        "attempts_5m": {"ok": state.recent_ok, "failed": state.recent_failed},
    }


def describe_key(key: ClientKey, config: Config, stored: StoreSnapshot) -> dict[str, Any]:
    """``{"object": "client_key", "name", "source", "settings", "upstreams",
    "created"}``; ``upstreams`` None: every upstream open to all keys."""
    row = stored.key(key.name)
    upstreams: list[str] | None
    if row is not None:
        names = key_upstreams(row)
        upstreams = None if names is None else list(names)
    elif any(k.sha256 == key.sha256 for k in config.keys):
        upstreams = None
    else:
        upstreams = [
            u.name
            for u in (*config.upstreams, *config.disabled_upstreams)
            if any(k.sha256 == key.sha256 for k in u.keys or ())
        ]
    return {
        "object": "client_key",
        "name": key.name,
        "source": (Source.ADMIN if row is not None else Source.CONFIG).value,
        "settings": settings_json(key, show_secrets_set=False),
        "upstreams": upstreams,
        "created": None if row is None else row.created,
    }
