"""The pages' frame (navigation, logout), the login form, Overview and Usage.

Each function returns ``Markup``; what it is given (names, models, text of
the records) is escaped on the way in by ``html``.  Times are shown in UTC.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

from attrs import frozen

from oaproxy.activity import UpstreamState
from oaproxy.config import ClientKey
from oaproxy.dashboard.charts import ERROR, Column, color, legend, stacked_bars
from oaproxy.dashboard.data import Minute, Period, Totals, UsageReport
from oaproxy.dashboard.markup import Markup, html, join

__all__ = [
    "NAV",
    "Overview",
    "UpstreamRow",
    "login_page",
    "overview_page",
    "page",
    "stamp",
    "usage_page",
]

#: (path under /admin/ui/, title) of each page of the navigation.
NAV = (
    ("", "Overview"),
    ("usage", "Usage"),
    ("requests", "Requests"),
    ("upstreams", "Upstreams"),
    ("keys", "Keys"),
)
BASE = "/admin/ui/"


def stamp(moment: float | None) -> str:
    """A time as UTC text, to the second."""
    if moment is None:
        return ""
    return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(moment))


def seconds(value: float | None) -> str:
    return "" if value is None else f"{value * 1000:.0f} ms"


def rate(ok: int, total: int) -> str:
    return "–" if total == 0 else f"{ok / total * 100:.1f}% of {total:,}"


def money(value: float | None) -> str:
    if value is None:
        return ""
    # Cents for sums, more digits for one request's fraction of a cent.
    return f"${value:,.2f}" if value >= 1 else f"${value:.6f}"


def page(title: str, active: str | None, body: Markup, csrf: str | None) -> Markup:
    """A whole document: ``csrf`` None for the login page (no navigation)."""
    nav = Markup("")
    if csrf is not None:
        links = [
            html(
                '<a href="{}{}"{}>{}</a>',
                BASE,
                path,
                Markup(' aria-current="page"') if path == active else Markup(""),
                name,
            )
            for path, name in NAV
        ]
        nav = html(
            '<nav>{}<form method="post" action="{}logout" class="logout">'
            '<input type="hidden" name="csrf" value="{}">'
            '<button type="submit">Log out</button></form></nav>',
            join(links),
            BASE,
            csrf,
        )
    return html(
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        '<title>{} · oaproxy</title><link rel="stylesheet" href="{}static/dashboard.css">'
        '<script src="{}static/dashboard.js" defer></script></head>'
        "<body><header><strong>oaproxy</strong>{}</header><main><h1>{}</h1>{}</main></body></html>",
        title,
        BASE,
        BASE,
        nav,
        title,
        body,
    )


def login_page(token: str, message: str | None) -> Markup:
    notice = html('<p class="error" role="alert">{}</p>', message) if message else Markup("")
    form = html(
        '{}<form method="post" action="{}login" class="login">'
        '<input type="hidden" name="csrf" value="{}">'
        '<label>Admin key <input type="password" name="admin_key" autocomplete="current-password"'
        " required autofocus></label>"
        '<button type="submit">Log in</button></form>',
        notice,
        BASE,
        token,
    )
    return page("Log in", None, form, None)


def table(headings: Sequence[str], rows: Sequence[Sequence[object]], empty: str) -> Markup:
    """A table; a cell that is not ``Markup`` is escaped."""
    if not rows:
        return html('<p class="empty">{}</p>', empty)
    head = Markup("")
    if headings:
        head = html("<thead><tr>{}</tr></thead>", join(html("<th>{}</th>", h) for h in headings))
    body = join(html("<tr>{}</tr>", join(html("<td>{}</td>", c) for c in row)) for row in rows)
    return html("<table>{}<tbody>{}</tbody></table>", head, body)


# -- Overview ----------------------------------------------------------------


@frozen
class UpstreamRow:
    name: str
    enabled: bool
    state: UpstreamState
    day: tuple[int, int]  # (requests, ok) of the last 24 hours


@frozen
class Overview:
    upstreams: tuple[UpstreamRow, ...]
    minutes: tuple[Minute, ...]
    active_streams: int
    ready: bool
    # sink name -> {"queued", "spilled", "dropped"}
    sinks: Mapping[str, Mapping[str, int]]
    # channel -> (sent, failed)
    alerts: Mapping[str, tuple[int, int]]
    suppressed: int


def _circuit(row: UpstreamRow) -> Markup:
    if not row.enabled:
        return Markup('<span class="state off">disabled</span>')
    label = row.state.circuit.state.label
    css = {"closed": "good", "open": "bad"}.get(label, "warn")
    failing = Markup(' <span class="state bad">failing</span>') if row.state.failing else ""
    return html('<span class="state {}" data-circuit="{}">{}</span>{}', css, label, label, failing)


def overview_page(overview: Overview, csrf: str) -> Markup:
    upstreams = table(
        (
            "Upstream",
            "Circuit",
            "In flight",
            "TTFB average",
            "Attempts ok, 5 min",
            "Requests answered ok, 24 h",
        ),
        [
            (
                html('<a href="{}upstreams#u-{}">{}</a>', BASE, row.name, row.name),
                _circuit(row),
                row.state.in_flight,
                seconds(row.state.ttfb_average),
                rate(row.state.recent_ok, row.state.recent_ok + row.state.recent_failed),
                rate(row.day[1], row.day[0]),
            )
            for row in overview.upstreams
        ],
        "No upstream is configured.",
    )
    minutes = overview.minutes
    requests = sum(m.requests for m in minutes)
    errors = sum(m.errors for m in minutes)
    columns = [
        Column(
            time.strftime("%H:%M", time.gmtime(m.start)),
            (("answered", m.requests - m.errors), ("errors", m.errors)),
        )
        for m in minutes
    ]
    chart = stacked_bars(
        columns,
        {"answered": color(0), "errors": ERROR},
        unit="requests",
        title="Requests per minute, last hour",
        label_every=10,
    )
    hour = html(
        "<p>{} requests in the last hour ({:.2f}/s), error rate {}.</p>{}{}",
        f"{requests:,}",
        requests / 3600,
        "–" if not requests else f"{errors / requests * 100:.1f}%",
        chart,
        legend({"answered": color(0), "errors (4xx, 5xx)": ERROR}),
    )
    sinks = table(
        ("Record sink", "Queued", "Spooled to disk", "Dropped"),
        [
            (name, s.get("queued", 0), s.get("spilled", 0), s.get("dropped", 0))
            for name, s in overview.sinks.items()
        ],
        "No record sink.",
    )
    alerts = table(
        ("Alert channel", "Sent", "Failed"),
        [(name, sent, failed) for name, (sent, failed) in overview.alerts.items()],
        "No alert channel.",
    )
    ready = "ready" if overview.ready else "not ready (see /readyz)"
    body = html(
        '<p class="summary">This proxy is <strong>{}</strong>; {} active streams.</p>'
        "<h2>Upstreams</h2>{}<h2>The last hour</h2>{}<h2>Record sinks</h2>{}"
        "<h2>Alerts</h2>{}<p>{} repeated alerts suppressed.</p>",
        ready,
        overview.active_streams,
        upstreams,
        hour,
        sinks,
        alerts,
        overview.suppressed,
    )
    return page("Overview", "", body, csrf)


# -- Usage -----------------------------------------------------------------------


def _usage_rows(groups: Mapping[str, Totals]) -> list[tuple[object, ...]]:
    return [
        (
            name or "(none)",
            f"{t.requests:,}",
            rate(t.ok, t.requests),
            f"{t.prompt_tokens:,}",
            f"{t.completion_tokens:,}",
            f"{t.total_tokens:,}",
            money(t.cost),
        )
        for name, t in sorted(groups.items(), key=lambda item: (-item[1].requests, item[0]))
    ]


_USAGE_HEADINGS = ("Requests", "Answered", "Prompt tokens", "Completion tokens", "Tokens", "Cost")


def _budgets(keys: Sequence[ClientKey], used: Mapping[str, tuple[float, int]]) -> Markup:
    rows: list[tuple[object, ...]] = []
    for key in keys:
        budget = key.budget
        if budget is None:
            continue
        usd, tokens = used.get(key.name, (0.0, 0))
        if budget.usd is not None:
            spent, limit, text = usd, budget.usd, f"${usd:,.2f} of ${budget.usd:,.2f}"
        else:
            limit = float(budget.tokens or 0)
            spent, text = float(tokens), f"{tokens:,} of {budget.tokens:,} tokens"
        share = 0.0 if limit <= 0 else min(spent / limit, 1.0)
        meter = html(
            '<meter min="0" max="1" value="{:.3f}" high="0.8">{:.0f}%</meter> {:.0f}%',
            share,
            share * 100,
            share * 100,
        )
        rows.append((key.name, f"per {budget.period.value}", text, meter))
    return table(("Key", "Period", "Used", ""), rows, "No key has a budget.")


def usage_page(
    report: UsageReport,
    period: Period,
    stack: str,
    keys: Sequence[ClientKey],
    used: Mapping[str, tuple[float, int]],
    csrf: str,
) -> Markup:
    choices = join(
        html(
            '<a href="?period={}&amp;stack={}"{}>{}</a>',
            p.value,
            stack,
            Markup(' aria-current="page"') if p is period else Markup(""),
            {"day": "Today", "week": "7 days", "month": "30 days"}[p.value],
        )
        for p in Period
    )
    stacks = join(
        html(
            '<a href="?period={}&amp;stack={}"{}>by {}</a>',
            period.value,
            s,
            Markup(' aria-current="page"') if s == stack else Markup(""),
            s,
        )
        for s in ("key", "model")
    )
    by_day = report.day_key if stack == "key" else report.day_model
    names = sorted(report.by_key if stack == "key" else report.by_model)
    colors = {name: color(index) for index, name in enumerate(names)}
    columns = [
        Column(
            time.strftime("%m-%d", time.gmtime(day)),
            tuple(
                (name, float(by_day[(day, name)].requests))
                for name in names
                if (day, name) in by_day
            ),
        )
        for day in report.days
    ]
    chart = stacked_bars(columns, colors, unit="requests", title=f"Requests per day by {stack}")
    total = report.total
    body = html(
        '<p class="choices">{}</p><p class="choices">Chart: {}</p>'
        "<p>{} requests, {} tokens, {} since {} (UTC days).</p>"
        "{}{}<h2>By key</h2>{}<h2>By model</h2>{}<h2>Budgets</h2>{}",
        choices,
        stacks,
        f"{total.requests:,}",
        f"{total.total_tokens:,}",
        money(total.cost) or "no cost",
        stamp(report.days[0]),
        chart,
        legend(colors),
        table(("Key", *_USAGE_HEADINGS), _usage_rows(report.by_key), "No request."),
        table(("Model", *_USAGE_HEADINGS), _usage_rows(report.by_model), "No request."),
        _budgets(keys, used),
    )
    return page("Usage", "usage", body, csrf)


def message_box(message: str | None, kind: str = "error") -> Markup:
    if not message:
        return Markup("")
    return html('<p class="{}" role="alert">{}</p>', kind, message)


def hidden(name: str, value: Any) -> Markup:
    return html('<input type="hidden" name="{}" value="{}">', name, value)
