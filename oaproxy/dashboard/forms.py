"""The Upstreams and Keys pages: the admin API's lists and its create,
enable, disable and remove forms; the fields posted turned into the bodies
``oaproxy.admin.changes`` checks (so the dashboard refuses what the API
refuses, with the same message).

A new key's secret is shown once, on the answer to the form that made it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from oaproxy.admin.changes import Refusal, RefusalKind
from oaproxy.dashboard.markup import Markup, html, join
from oaproxy.dashboard.pages import BASE, hidden, message_box, page, rate, seconds, table

__all__ = ["key_body", "keys_page", "upstream_body", "upstreams_page"]


def _words(text: str) -> list[str]:
    return [part.strip() for part in text.replace("\n", ",").split(",") if part.strip()]


def upstream_body(fields: Mapping[str, str]) -> dict[str, Any]:
    """An upstream's mapping from the form: name, endpoint, sk, allow, and
    any further settings as a JSON object."""
    body: dict[str, Any] = {}
    extra = fields.get("settings", "").strip()
    if extra:
        try:
            body = json.loads(extra)
        except ValueError:
            body = None  # type: ignore[assignment]
        if not isinstance(body, dict):
            raise Refusal(RefusalKind.INVALID, "settings: expected a JSON object", "settings")
    for name in ("name", "endpoint", "sk"):
        if fields.get(name, "").strip():
            body[name] = fields[name].strip()
    if fields.get("allow", "").strip():
        body["allow"] = _words(fields["allow"])
    if fields.get("enabled") != "on":
        body["enabled"] = False
    return body


def key_body(fields: Mapping[str, str]) -> dict[str, Any]:
    """A key's mapping from the form: name, upstreams, limits, a budget."""
    body: dict[str, Any] = {"name": fields.get("name", "").strip()}
    if fields.get("upstreams", "").strip():
        body["upstreams"] = _words(fields["upstreams"])
    for name in ("rate_limit", "token_limit"):
        if fields.get(name, "").strip():
            body[name] = fields[name].strip()
    amount = fields.get("budget", "").strip()
    if amount:
        measure = fields.get("budget_measure") or "usd"
        try:
            value: float | int = float(amount) if measure == "usd" else int(amount)
        except ValueError:
            raise Refusal(RefusalKind.INVALID, "budget: expected a number", "budget") from None
        body["budget"] = {
            "usd" if measure == "usd" else "tokens": value,
            "period": fields.get("budget_period") or "month",
        }
    return body


def _button(action: str, label: str, csrf: str, confirm: str | None = None) -> Markup:
    ask = html(' data-confirm="{}"', confirm) if confirm else Markup("")
    return html(
        '<form method="post" action="{}" class="inline"{}>{}<button type="submit">{}</button></form>',
        action,
        ask,
        hidden("csrf", csrf),
        label,
    )


def upstreams_page(
    upstreams: Sequence[Mapping[str, Any]], csrf: str, message: str | None, done: str | None
) -> Markup:
    rows = []
    for upstream in upstreams:
        name = upstream["name"]
        settings = upstream.get("settings") or {}
        state = upstream.get("state") or {}
        attempts = state.get("attempts_5m") or {}
        base = f"{BASE}upstreams/{_segment(name)}"
        actions = [
            _button(f"{base}/disable", "Disable", csrf)
            if upstream.get("enabled")
            else _button(f"{base}/enable", "Enable", csrf)
        ]
        if upstream.get("source") == "admin":
            actions.append(_button(f"{base}/remove", "Remove", csrf, f"Remove upstream {name}?"))
        rows.append(
            (
                html('<span id="u-{}">{}</span>', name, name),
                upstream.get("source"),
                "yes" if upstream.get("enabled") else "no",
                settings.get("endpoint", ""),
                ", ".join(str(m) for m in settings.get("allow") or ()) or "all",
                html(
                    '<span data-circuit="{}">{}</span>', state.get("circuit"), state.get("circuit")
                ),
                state.get("in_flight", ""),
                seconds(state.get("ttfb_average")),
                rate(attempts.get("ok", 0), attempts.get("ok", 0) + attempts.get("failed", 0)),
                join(actions),
            )
        )
    listed = table(
        (
            "Name",
            "Source",
            "Enabled",
            "Endpoint",
            "Models",
            "Circuit",
            "In flight",
            "TTFB",
            "Success 5 min",
            "",
        ),
        rows,
        "No upstream.",
    )
    form = html(
        '<h2>Add an upstream</h2><form method="post" action="{}upstreams" class="create">{}'
        '<label>Name <input type="text" name="name" required></label>'
        '<label>Endpoint <input type="url" name="endpoint" placeholder="https://api.openai.com/v1">'
        "</label>"
        '<label>Key (sk) <input type="password" name="sk" autocomplete="off"></label>'
        '<label>Models <input type="text" name="allow" placeholder="gpt-4o, gpt-4o-mini"></label>'
        '<label>More settings (JSON) <textarea name="settings" rows="2"'
        " placeholder='{{\"weight\": 2}}'></textarea></label>"
        '<label><input type="checkbox" name="enabled" checked> Enabled</label>'
        '<button type="submit">Add</button></form>'
        "<p>Upstreams of the config file can be disabled here; only those added here"
        " can be removed.</p>",
        BASE,
        hidden("csrf", csrf),
    )
    body = html("{}{}{}{}", message_box(message), message_box(done, "done"), listed, form)
    return page("Upstreams", "upstreams", body, csrf)


def keys_page(
    keys: Sequence[Mapping[str, Any]],
    csrf: str,
    message: str | None,
    new_key: tuple[str, str] | None,
    done: str | None,
) -> Markup:
    rows = []
    for key in keys:
        name = key["name"]
        settings = key.get("settings") or {}
        budget = settings.get("budget")
        actions = Markup("")
        if key.get("source") == "admin":
            actions = _button(
                f"{BASE}keys/{_segment(name)}/remove", "Remove", csrf, f"Remove key {name}?"
            )
        rows.append(
            (
                name,
                key.get("source"),
                ", ".join(key.get("upstreams") or ())
                if key.get("upstreams") is not None
                else "all",
                settings.get("rate_limit") or "",
                settings.get("token_limit") or "",
                "" if not budget else json.dumps(budget),
                actions,
            )
        )
    listed = table(
        ("Name", "Source", "Upstreams", "Rate limit", "Token limit", "Budget", ""), rows, "No key."
    )
    shown = Markup("")
    if new_key is not None:
        shown = html(
            '<div class="secret" role="status"><p>The key <strong>{}</strong> was made. Its secret,'
            " shown this once (oaproxy keeps only its SHA-256):</p>"
            '<p><code id="new-secret">{}</code></p></div>',
            new_key[0],
            new_key[1],
        )
    form = html(
        '<h2>Add a key</h2><form method="post" action="{}keys" class="create">{}'
        '<label>Name <input type="text" name="name" required></label>'
        '<label>Upstreams <input type="text" name="upstreams" placeholder="all"></label>'
        '<label>Rate limit <input type="text" name="rate_limit" placeholder="60/minute"></label>'
        '<label>Token limit <input type="text" name="token_limit" placeholder="100000/day">'
        "</label>"
        '<label>Budget <input type="text" name="budget" placeholder="50"></label>'
        '<label><select name="budget_measure"><option value="usd">usd</option>'
        '<option value="tokens">tokens</option></select></label>'
        '<label>per <select name="budget_period"><option value="month">month</option>'
        '<option value="day">day</option></select></label>'
        '<button type="submit">Add</button></form>'
        "<p>Keys of the config file are changed there; only those added here can be removed.</p>",
        BASE,
        hidden("csrf", csrf),
    )
    body = html("{}{}{}{}{}", message_box(message), message_box(done, "done"), shown, listed, form)
    return page("Keys", "keys", body, csrf)


def _segment(name: str) -> str:
    from urllib.parse import quote

    return quote(name, safe="")
