"""Limit strings and API routes, as the ``limits:`` section and the per-key
``rate_limit``/``token_limit`` give them.

A limit string is ``N/second|minute|hour|day`` or ``N/K units``
(``100/2minutes``), several joined with ``;``: the syntax of openai-forward
and of the ``limits`` library, which parses it here (and only here: the
strategies are oaproxy's own, on the reactor's clock).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from attrs import frozen
from limits import parse_many

from oaproxy.config.nodes import Item, NodeReader
from oaproxy.config.values import strings

_RATE_EXAMPLE = "a limit such as 10/minute, 100/2minutes or 60/minute;1000/day"


@frozen
class Rate:
    """At most ``amount`` per ``seconds``: one part of a limit string."""

    amount: int
    seconds: int
    text: str  # for messages and records: "100/2minutes" (also when written "100 per 2 minute")

    @property
    def name(self) -> str:
        """What counter keys call it: ``100/120s`` (the amount is part of it,
        so ``10/minute;100/minute`` are two counters)."""
        return f"{self.amount}/{self.seconds}s"


def parse_rates(text: str) -> tuple[Rate, ...]:
    """The rates of a limit string; ``ValueError`` for anything else."""
    try:
        items = parse_many(text)
    except ValueError:
        raise ValueError(f"expected {_RATE_EXAMPLE}") from None
    rates = []
    for item in items:
        if item.amount <= 0:
            raise ValueError("a limit's amount must be greater than 0")
        rates.append(
            Rate(
                amount=item.amount,
                seconds=item.get_expiry(),
                text=f"{item.amount}/{_period_text(item.multiples, item.GRANULARITY.name)}",
            )
        )
    if not rates:
        raise ValueError(f"expected {_RATE_EXAMPLE}")
    return tuple(rates)


def _period_text(multiples: int, unit: str) -> str:
    return unit if multiples == 1 else f"{multiples}{unit}s"


def rates(nodes: NodeReader, item: Item) -> tuple[Rate, ...]:
    """A limit string (see the module)."""
    text = nodes.required_string(item)
    try:
        return parse_rates(text)
    except ValueError as e:
        nodes.fail(item.key, item.line, str(e))


def one_rate(nodes: NodeReader, item: Item) -> Rate:
    """A limit string of one rate (a pace has one speed)."""
    parsed = rates(nodes, item)
    if len(parsed) != 1:
        nodes.fail(item.key, item.line, "expected one rate, such as 60/second")
    return parsed[0]


def api_route(nodes: NodeReader, item: Item, name: str) -> str:
    """An API path such as ``/v1/chat/completions`` (no trailing ``/``)."""
    route = "/" + "/".join(part for part in name.split("/") if part)
    if route != "/v1" and not route.startswith("/v1/"):
        nodes.fail(
            item.key,
            item.line,
            f"{name!r} is not an API path; routes are paths such as /v1/chat/completions",
        )
    return route


def api_paths(nodes: NodeReader, item: Item) -> tuple[str, ...]:
    """A list of API paths (``cache.routes``)."""
    paths = strings(nodes, item)
    return tuple(api_route(nodes, part, path) for part, path in zip(nodes.as_list(item), paths))


def route_rates(nodes: NodeReader, item: Item) -> Mapping[str, tuple[Rate, ...]]:
    """``{API path: limit string}``."""
    return MappingProxyType(
        {
            api_route(nodes, value, name): rates(nodes, value)
            for name, value in nodes.entries(item, "a mapping of API paths to limits")
        }
    )


def route_paces(nodes: NodeReader, item: Item) -> Mapping[str, Rate]:
    """``{API path: one rate}``."""
    return MappingProxyType(
        {
            api_route(nodes, value, name): one_rate(nodes, value)
            for name, value in nodes.entries(item, "a mapping of API paths to rates")
        }
    )
