"""Charts as inline SVG: stacked bars, one column per minute or day.

Drawn with attributes only (no ``style``: the pages' Content-Security-Policy
allows no inline style); every label goes through ``html``, and a bar's
``<title>`` is what a browser shows on hover.
"""

from __future__ import annotations

from collections.abc import Sequence

from attrs import frozen

from oaproxy.dashboard.markup import Markup, html, join

__all__ = ["ERROR", "PALETTE", "Column", "color", "legend", "stacked_bars"]

#: Series colors, in order (an error series is given ERROR).
PALETTE = ("#4e79a7", "#f28e2b", "#59a14f", "#b07aa1", "#76b7b2", "#edc948", "#9c755f", "#bab0ac")
ERROR = "#e15759"

_WIDTH = 720
_HEIGHT = 180
_LEFT = 48
_BOTTOM = 20


@frozen
class Column:
    label: str  # under the column, when there is room
    # (series name, value), bottom first
    parts: tuple[tuple[str, float], ...]


def color(index: int) -> str:
    return PALETTE[index % len(PALETTE)]


def _number(value: float) -> str:
    if value >= 100 or value == int(value):
        return f"{value:,.0f}"
    return f"{value:.2g}" if value < 1 else f"{value:.1f}"


def stacked_bars(
    columns: Sequence[Column],
    colors: dict[str, str],
    *,
    unit: str,
    title: str,
    label_every: int = 1,
) -> Markup:
    """An SVG of ``columns``, each part a rectangle of its series' color."""
    top = max((sum(v for _, v in c.parts) for c in columns), default=0.0) or 1.0
    plot_width = _WIDTH - _LEFT
    plot_height = _HEIGHT - _BOTTOM
    step = plot_width / max(len(columns), 1)
    bar = max(step * 0.8, 1.0)
    shapes = []
    for index, column in enumerate(columns):
        x = _LEFT + index * step + (step - bar) / 2
        y = float(plot_height)
        for name, value in column.parts:
            if value <= 0:
                continue
            height = value / top * (plot_height - 4)
            y -= height
            shapes.append(
                html(
                    '<rect x="{:.1f}" y="{:.1f}" width="{:.1f}" height="{:.1f}" fill="{}">'
                    "<title>{} {}: {} {}</title></rect>",
                    x,
                    y,
                    bar,
                    height,
                    colors.get(name, PALETTE[0]),
                    column.label,
                    name,
                    _number(value),
                    unit,
                )
            )
        if index % label_every == 0:
            shapes.append(
                html(
                    '<text x="{:.1f}" y="{}" font-size="10" text-anchor="middle">{}</text>',
                    x + bar / 2,
                    _HEIGHT - 6,
                    column.label,
                )
            )
    axis = html(
        '<line x1="{l}" y1="{b}" x2="{r}" y2="{b}" stroke="#888"/>'
        '<text x="2" y="12" font-size="10">{top}</text>'
        '<text x="{t}" y="{b}" font-size="10" text-anchor="end">0</text>',
        l=_LEFT,
        r=_WIDTH,
        b=plot_height,
        t=_LEFT - 4,
        top=f"{_number(top)} {unit}",
    )
    return html(
        '<svg class="chart" viewBox="0 0 {} {}" role="img" aria-label="{}"'
        ' xmlns="http://www.w3.org/2000/svg">{}{}</svg>',
        _WIDTH,
        _HEIGHT,
        title,
        axis,
        join(shapes),
    )


def legend(colors: dict[str, str]) -> Markup:
    """The series' names beside their colors."""
    items = [
        html(
            '<li><svg width="10" height="10" aria-hidden="true"><rect width="10" height="10"'
            ' fill="{}"/></svg> {}</li>',
            value,
            name or "(none)",
        )
        for name, value in colors.items()
    ]
    return html('<ul class="legend">{}</ul>', join(items))
