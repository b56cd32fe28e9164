"""The block of log lines that says, at start and at each reload, what runs.

Like openai-forward's banner, but as plain lines journald keeps. Names only:
no key, token or URL credentials ever appear.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from twisted.logger import Logger

from oaproxy.config import (
    Config,
    Rate,
    Upstream,
    UpstreamType,
    all_client_keys,
    is_loopback_endpoint,
)
from oaproxy.credentials import public_text
from oaproxy.descriptors import connection_cap
from oaproxy.traffic.budgets import describe_budget

if TYPE_CHECKING:
    from oaproxy.generation import Generation


def _where(upstream: Upstream) -> str:
    if upstream.endpoint is None:
        return "built-in echo, answers locally"
    where = public_text(upstream.endpoint)
    return f"replicate at {where}" if upstream.type is UpstreamType.REPLICATE else where


def _upstream_line(upstream: Upstream) -> str:
    models = ", ".join(upstream.allow) if upstream.allow else "all"
    parts = [f"upstream {upstream.name}: {_where(upstream)}"]
    if upstream.route is not None:
        parts.append(f"route {upstream.route}")
    parts.append(f"models {models}")
    if upstream.models:
        parts.append(
            "aliases " + ", ".join(f"{alias} -> {name}" for alias, name in upstream.models.items())
        )
    if upstream.deny:
        parts.append("denied " + ", ".join(upstream.deny))
    if upstream.proxy is not None:
        parts.append(f"through proxy {upstream.proxy.url}")
    parts.append(f"timeout {upstream.timeout:g}s, stream {upstream.stream_timeout:g}s")
    if upstream.backup:
        parts.append("backup")
    if upstream.weight != 1:
        parts.append(f"weight {upstream.weight:g}")
    if upstream.endpoint is not None and urlsplit(upstream.endpoint).path in ("", "/"):
        # openai-api-route dropped the endpoint's path; oaproxy appends to it.
        parts.append("WARNING: the endpoint has no path (most APIs want one ending in /v1)")
    if upstream.noauth:
        parts.append("no client key needed")
    elif upstream.keys is not None:
        parts.append("keys " + ", ".join(k.name for k in upstream.keys))
    if upstream.sk == "asis":
        parts.append("client's Authorization passed on")
    elif not upstream.sk and upstream.type is not UpstreamType.ECHO:
        parts.append("no upstream key")
    return "; ".join(parts)


def _clients_line(config: Config) -> str:
    cap = connection_cap(config.max_connections)
    allowed = f"at most {cap} connections"
    if cap < config.max_connections:
        allowed += f" (max_connections {config.max_connections}: the descriptor limit allows fewer)"
    return (
        f"clients: {allowed}; request head within {config.header_timeout:g}s;"
        f" bodies at least {config.body_min_rate} bytes/s over {config.body_rate_window:g}s"
    )


def warnings(config: Config) -> list[str]:
    """What the operator should know before the first answer."""
    return [
        f"WARNING: answers from upstream {u.name} come from the built-in echo upstream:"
        " it repeats the last user message, no model writes them"
        for u in config.upstreams
        if u.type is UpstreamType.ECHO
    ]


def _rates(rates: Iterable[Rate]) -> str:
    return ";".join(rate.text for rate in rates)


def _limits_line(config: Config) -> str:
    limits = config.limits
    parts = [
        f"{name} {_rates(rates)}"
        for name, rates in (
            ("global", limits.global_),
            ("per key", limits.per_key),
            ("tokens per key", limits.tokens_per_key),
        )
        if rates
    ]
    parts += [f"route {route} {_rates(rates)}" for route, rates in limits.routes.items()]
    for key in all_client_keys(config):
        own = [
            f"{what} {_rates(rates)}"
            for what, rates in (("requests", key.rate_limit), ("tokens", key.token_limit))
            if rates is not None
        ]
        if key.budget is not None:
            own.append(f"budget {describe_budget(key.budget)}")
        if own:
            parts.append(f"key {key.name}: " + ", ".join(own))
    parts += [f"pace {route} {rate.text}" for route, rate in limits.stream_pace.items()]
    if not parts:
        return "limits: none"
    return (
        f"limits ({limits.backend.value}, {limits.strategy.value},"
        f" on backend error {limits.on_backend_error.value}): " + "; ".join(parts)
    )


def _admin_line(config: Config, listen: Iterable[str]) -> str:
    if not config.admin_key:
        return "admin API: off (no admin_key)"
    line = f"admin API: on, at /admin/; store_key {'set' if config.store_key else 'not set'}"
    plain = [
        endpoint
        for endpoint in listen
        if not endpoint.startswith("ssl:") and not is_loopback_endpoint(endpoint)
    ]
    if plain:
        # The admin key travels with every request.
        line += (
            f"; WARNING: served without TLS on {', '.join(plain)}: reach it through TLS"
            " or an SSH tunnel only"
        )
    return line


def summary(
    config: Config, listen: Iterable[str], sinks: Iterable[str], alerts: Iterable[str]
) -> list[str]:
    listen = list(listen)
    keys = ", ".join(k.name for k in all_client_keys(config)) or "none, the proxy is open"
    sink_list = ", ".join(sinks) or "none"
    alert_list = ", ".join(alerts) or "none"
    if alert_list != "none" and config.proxy is not None:
        alert_list += f"; through proxy {config.proxy.url}"
    lines = [
        f"config {config.path} (hostname {config.hostname})",
        "listening on " + ", ".join(listen),
        f"client keys: {keys}; lb_policy {config.lb_policy.value};"
        f" stream idle timeout {config.stream_idle_timeout:g}s;"
        f" max body {config.max_body_bytes} bytes",
    ]
    lines.append(_clients_line(config))
    breaker = config.breaker
    lines.append(
        f"circuit breakers: open after {breaker.failures} failed attempts in a row,"
        f" one probe after {breaker.cooldown:g}s;"
        f" state {'shared through redis' if breaker.shared else 'kept by this process'}"
    )
    for route in sorted(config.route_prefixes):
        served = ", ".join(u.name for u in config.upstreams if u.route == route)
        lines.append(
            f"route {route}/v1: upstreams {served}; lb_policy {config.lb_policy_for(route).value}"
        )
    lines.extend(_upstream_line(u) for u in config.upstreams)
    # Disabled by the file's enabled: false or by the store: the same thing.
    lines.extend(f"upstream {u.name}: disabled (enabled: false)" for u in config.disabled_upstreams)
    lines.append(_admin_line(config, listen))
    policy = config.records
    lines.append(
        f"records: body {policy.body}, response {policy.response}, headers {policy.headers};"
        f" sinks {sink_list}"
    )
    lines.append(_limits_line(config))
    lines.append(f"alerts: {alert_list}")
    return lines


def log_summary(log: Logger, headline: str, generation: Generation, listen: Iterable[str]) -> None:
    """Log ``headline`` and the summary of what ``generation`` runs."""
    config = generation.config
    alerts = [f"{c.name} ({c.host})" for c in generation.notifier.channels]
    where = {
        # A postgres DSN may hold a password; a sqlite path does not.
        "sql": "postgres" if config.dbtype == "postgres" else config.dbaddr,
        "file": config.records.file,
        "redis": public_text(config.redis) if config.redis else None,
    }
    sinks = [f"{name} ({where[name]})" for name in generation.sinks]
    log.info(headline)
    for line in summary(config, listen, sinks, alerts):
        log.info("  {line}", line=line)
    for line in warnings(config):
        log.warn("  {line}", line=line)
