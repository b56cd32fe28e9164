"""The Requests page (the records, filtered, newest first, a page at a time)
and one record: its attempts as a timeline, its request and answer as the
records policy kept them (redacted before they were stored).

The list is ``oaproxy.admin.queries.records_page``'s: one index range
scan, paged by (time, id).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import urlencode

from oaproxy.dashboard.markup import Markup, html, join
from oaproxy.dashboard.pages import BASE, money, page, seconds, stamp, table
from oaproxy.record import Outcome

__all__ = ["record_page", "requests_page"]

#: The filters the page's form has, as the admin API's query string names them.
FILTERS = ("key", "model", "outcome", "since", "until")


def _field(name: str, label: str, value: str, hint: str) -> Markup:
    return html(
        '<label>{} <input type="text" name="{}" value="{}" placeholder="{}"></label>',
        label,
        name,
        value,
        hint,
    )


def _filter_form(filters: Mapping[str, str], keys: Sequence[str]) -> Markup:
    options = join(
        html(
            '<option value="{}"{}>{}</option>',
            o,
            Markup(" selected") if filters.get("outcome") == o else Markup(""),
            o or "any",
        )
        for o in ("", *(outcome.value for outcome in Outcome))
    )
    key_options = join(
        html(
            '<option value="{}"{}>{}</option>',
            k,
            Markup(" selected") if filters.get("key") == k else Markup(""),
            k or "any",
        )
        for k in ("", *keys)
    )
    return html(
        '<form method="get" action="{}requests" class="filters">'
        '<label>Key <select name="key">{}</select></label>{}'
        '<label>Outcome <select name="outcome">{}</select></label>{}{}'
        '<button type="submit">Filter</button> <a href="{}requests">Clear</a></form>',
        BASE,
        key_options,
        _field("model", "Model", filters.get("model", ""), "gpt-4o-mini"),
        options,
        _field("since", "Since", filters.get("since", ""), "1h, 7d, 2026-11-01"),
        _field("until", "Until", filters.get("until", ""), "now"),
        BASE,
    )


def requests_page(
    listing: Mapping[str, Any],
    filters: Mapping[str, str],
    keys: Sequence[str],
    csrf: str,
    error: str | None = None,
) -> Markup:
    rows = []
    for record in listing.get("data", ()):
        tokens = record.get("total_tokens")
        rows.append(
            (
                html(
                    '<a href="{}requests/{}">{}</a>',
                    BASE,
                    record["id"],
                    stamp(record["time"]),
                ),
                record.get("key_name") or "",
                record.get("model") or "",
                f"{record.get('method') or ''} {record.get('path') or ''}",
                record.get("upstream") or "",
                record.get("status"),
                html('<span class="outcome {}">{}</span>', record["outcome"], record["outcome"]),
                seconds(record.get("ttfb")),
                seconds(record.get("duration")),
                "" if tokens is None else f"{tokens:,}",
                money(record.get("cost")),
            )
        )
    listed = table(
        (
            "Time (UTC)",
            "Key",
            "Model",
            "Request",
            "Upstream",
            "Status",
            "Outcome",
            "TTFB",
            "Duration",
            "Tokens",
            "Cost",
        ),
        rows,
        "No record matches.",
    )
    more = Markup("")
    if listing.get("next"):
        query = {k: v for k, v in filters.items() if v}
        query["before"] = listing["next"]
        more = html(
            '<p><a class="next" href="{}requests?{}">Older records</a></p>',
            BASE,
            urlencode(query),
        )
    notice = html('<p class="error" role="alert">{}</p>', error) if error else Markup("")
    body = html("{}{}{}{}", _filter_form(filters, keys), notice, listed, more)
    return page("Requests", "requests", body, csrf)


def _timeline(attempts: Sequence[Mapping[str, Any]]) -> Markup:
    """The attempts one after another on one time axis, each bar its
    duration, a tick at its time to first byte."""
    spans = [float(a.get("duration") or 0) for a in attempts]
    total = sum(spans) or 1.0
    width, row = 720.0, 22
    shapes = []
    start = 0.0
    for index, (attempt, span) in enumerate(zip(attempts, spans)):
        x = 160 + start / total * (width - 170)
        w = max(span / total * (width - 170), 2.0)
        y = index * row + 4
        failed = attempt.get("error") is not None or (attempt.get("status") or 0) >= 400
        outcome = attempt.get("error") or attempt.get("status")
        shapes.append(
            html(
                '<text x="0" y="{}" font-size="11">{}</text>'
                '<rect x="{:.1f}" y="{}" width="{:.1f}" height="14" fill="{}">'
                "<title>{}: {} in {}</title></rect>",
                y + 11,
                attempt.get("upstream") or "",
                x,
                y,
                w,
                "#e15759" if failed else "#59a14f",
                attempt.get("upstream") or "",
                outcome,
                seconds(span),
            )
        )
        ttfb = attempt.get("ttfb")
        if ttfb is not None:
            tick = x + float(ttfb) / total * (width - 170)
            shapes.append(
                html(
                    '<line x1="{:.1f}" y1="{}" x2="{:.1f}" y2="{}" stroke="#222"/>',
                    tick,
                    y - 2,
                    tick,
                    y + 16,
                )
            )
        start += span
    return html(
        '<svg class="timeline" viewBox="0 0 {} {}" role="img" aria-label="attempts"'
        ' xmlns="http://www.w3.org/2000/svg">{}</svg>',
        int(width),
        max(len(attempts), 1) * row + 8,
        join(shapes),
    )


def _text_block(value: Any) -> Markup:
    if value is None:
        return Markup('<p class="empty">Not kept (see the records policy).</p>')
    if isinstance(value, str):
        try:
            # A JSON body kept as text reads better indented.
            value = json.loads(value)
        except ValueError:
            return html('<pre class="body">{}</pre>', value)
    text = value if isinstance(value, str) else json.dumps(value, indent=2, ensure_ascii=False)
    return html('<pre class="body">{}</pre>', text)


def record_page(record: Mapping[str, Any], csrf: str) -> Markup:
    attempts = list(record.get("attempts") or ())
    usage = record.get("usage") or {}
    facts = table(
        (),
        [
            ("Id", record.get("id")),
            ("Time (UTC)", stamp(record.get("time"))),
            ("Key", record.get("key_name") or ""),
            ("Client", f"{record.get('client_ip') or ''} {record.get('user_agent') or ''}"),
            ("Request", f"{record.get('method')} {record.get('path')}"),
            ("Model", record.get("model") or ""),
            ("Stream", "yes" if record.get("stream") else "no"),
            ("Upstream", record.get("upstream") or ""),
            ("Status", record.get("status")),
            ("Outcome", record.get("outcome")),
            ("Error", record.get("error") or ""),
            ("TTFB", seconds(record.get("ttfb"))),
            ("Duration", seconds(record.get("duration"))),
            ("Tokens", f"{usage.get('prompt_tokens', '')} + {usage.get('completion_tokens', '')}"),
            ("Cost", money(record.get("cost"))),
            ("Finish reason", record.get("finish_reason") or ""),
            ("Truncated", ", ".join(record.get("truncated") or ())),
        ],
        "",
    )
    attempt_rows = table(
        ("#", "Upstream", "Status", "Error", "TTFB", "Duration"),
        [
            (
                index + 1,
                a.get("upstream") or "",
                a.get("status") if a.get("status") is not None else "",
                a.get("error") or "",
                seconds(a.get("ttfb")),
                seconds(a.get("duration")),
            )
            for index, a in enumerate(attempts)
        ],
        "No upstream was tried.",
    )
    answer = record.get("response_text")
    tools = record.get("tool_calls")
    body = html(
        '<p><a href="{}requests">All requests</a></p>{}'
        "<h2>Attempts</h2>{}{}<h2>Request body</h2>{}<h2>Request headers</h2>{}"
        "<h2>Answer</h2>{}{}",
        BASE,
        facts,
        _timeline(attempts) if attempts else Markup(""),
        attempt_rows,
        _text_block(record.get("request_body")),
        _text_block(record.get("request_headers")),
        _text_block(answer),
        _text_block(tools) if tools else Markup(""),
    )
    return page("Request", "requests", body, csrf)
