"""Listen addresses: Twisted endpoint strings, openai-api-route's
``HOST:PORT`` form, which of them are loopback, and the open-relay check.

Nothing here builds or binds an endpoint: ``strports.service`` does that in
the service, with the strings checked here.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

from oaproxy.config.errors import ConfigError
from oaproxy.config.nodes import Item, NodeReader
from oaproxy.config.values import strings

if TYPE_CHECKING:
    # Only a type here: model imports this module (listen_addresses).
    from oaproxy.config.model import Config

# Server endpoint types Twisted ships a parser for (twisted.internet.endpoints
# and its plugins); anything else is far more likely a typo than a plugin.
_ENDPOINT_TYPES = ("tcp", "tcp6", "ssl", "unix", "systemd")
# openai-api-route's Go listen address: ":8888", "0.0.0.0:8080", "[::1]:80".
_HOST_PORT = re.compile(r"(?P<host>\[[^\]]*\]|[^:\[\]]*):(?P<port>[0-9]+)\Z")


def split_endpoint(description: str) -> tuple[list[str], dict[str, str]]:
    """Split a Twisted endpoint string the way
    ``twisted.internet.endpoints._tokenize`` does: ``:`` separates arguments,
    the first ``=`` of an argument makes it a keyword, ``\\`` escapes.
    """
    args: list[str] = []
    kwargs: dict[str, str] = {}
    current = ""
    keyword: str | None = None
    chars = iter(description)
    for char in chars:
        if char == ":":
            if keyword is None:
                args.append(current)
            else:
                kwargs[keyword] = current
            current, keyword = "", None
        elif char == "=" and keyword is None:
            keyword, current = current, ""
        elif char == "\\":
            escaped = next(chars, None)
            if escaped is None:
                raise ValueError("endpoint ends with a lone backslash")
            current += escaped
        else:
            current += char
    if keyword is None:
        args.append(current)
    else:
        kwargs[keyword] = current
    return args, kwargs


def _escape_endpoint(value: str) -> str:
    return value.replace("\\", "\\\\").replace(":", "\\:").replace("=", "\\=")


def parse_listen(description: str) -> str:
    """Check a listen address and return it as a Twisted endpoint string.

    Twisted endpoint strings (``tcp:8888:interface=127.0.0.1``,
    ``unix:/run/oaproxy.sock``, ``systemd:domain=INET:index=0``, ``ssl:…``,
    ``tcp6:…``) are checked lightly and returned unchanged.  For
    openai-api-route compatibility, ``HOST:PORT`` becomes
    ``tcp:PORT:interface=HOST`` (``localhost`` becoming 127.0.0.1),
    ``[V6]:PORT`` becomes ``tcp6:PORT:interface=V6`` and ``:PORT`` (all
    interfaces) becomes ``tcp:PORT``.  Nothing is built or bound here.

    Raises ``ValueError``, with a one-line reason, when the address is not
    valid.
    """
    description = description.strip()
    if not description:
        raise ValueError("empty listen address")
    compat = _HOST_PORT.match(description)
    if compat is not None and _is_compat_host(compat.group("host")):
        port = _port(compat.group("port"))
        host = compat.group("host")
        if host == "":
            return f"tcp:{port}"
        if host.startswith("["):
            inner = host[1:-1]
            try:
                ipaddress.IPv6Address(inner.split("%", 1)[0])
            except ValueError:
                raise ValueError(f"{description!r}: bad IPv6 address in brackets") from None
            return f"tcp6:{port}:interface={_escape_endpoint(inner)}"
        if host.lower() == "localhost":
            host = "127.0.0.1"
        return f"tcp:{port}:interface={_escape_endpoint(host)}"

    args, kwargs = split_endpoint(description)
    kind, positional = args[0], args[1:]
    if kind not in _ENDPOINT_TYPES:
        raise ValueError(
            f"{description!r}: unknown endpoint type {kind!r}; expected one of "
            f"{', '.join(_ENDPOINT_TYPES)}, or host:port"
        )
    if kind in ("tcp", "tcp6", "ssl"):
        if positional:
            if "port" in kwargs:
                raise ValueError(f"{description!r}: the port is given twice")
            port_text = positional[0]
        elif "port" in kwargs:
            port_text = kwargs["port"]
        else:
            raise ValueError(f"{description!r}: no port")
        try:
            _port(port_text)
        except ValueError as e:
            raise ValueError(f"{description!r}: {e}") from None
    elif kind == "unix":
        if not (positional and positional[0]) and not kwargs.get("address"):
            raise ValueError(f"{description!r}: no socket path")
    elif kind == "systemd" and (
        "domain" not in kwargs or not ("index" in kwargs or "name" in kwargs)
    ):
        raise ValueError(f"{description!r}: systemd endpoints need domain= and index= or name=")
    return description


def _is_compat_host(host: str) -> bool:
    """Whether ``host`` in ``host:port`` is a listen host rather than an endpoint
    type: empty, bracketed, an IP, ``localhost`` or a dotted name.  A bare
    word (``tpc:8080``) is taken for a mistyped endpoint type, not a host.
    """
    if host in ("", "localhost") or host.startswith("["):
        return True
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return "." in host
    return True


def _port(text: str) -> int:
    if not text.isdigit() or int(text) > 65535:
        raise ValueError("the port must be a number from 0 to 65535")
    return int(text)


def is_loopback_endpoint(desc: str) -> bool:
    """Whether a listen address (endpoint string or host:port form) accepts
    connections from this host only.

    TCP and TLS endpoints are loopback when their interface is 127.0.0.0/8,
    ::1 or ``localhost``; without an interface they listen on every
    interface.  UNIX sockets are local by nature.  Socket activation
    (``systemd:``) is treated as public: the socket's address is set in a unit
    file we cannot see.  Anything unparseable counts as public, so a mistake
    can only make the open-relay check stricter.
    """
    try:
        description = parse_listen(desc)
        args, kwargs = split_endpoint(description)
    except ValueError:
        return False
    kind = args[0]
    if kind == "unix":
        return True
    if kind not in ("tcp", "tcp6", "ssl"):
        return False
    interface = kwargs.get("interface", "").strip()
    if interface.lower() == "localhost":
        return True
    try:
        address = ipaddress.ip_address(interface.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


def check_listeners(
    config: Config,
    listen: Sequence[str],
    *,
    key: str = "listen",
    line: int | None = None,
) -> None:
    """Refuse to run an open relay: with no client key anywhere and no
    ``noauth: true`` upstream, every listener must be loopback.

    Run at load time on ``listen:``, and again by the caller on a ``--listen``
    override (then ``key`` can name the option).

    Raises ``ConfigError``, naming the first public listener, otherwise.
    """
    if config.keys or any(upstream.keys or upstream.noauth for upstream in config.upstreams):
        return
    for description in listen:
        if not is_loopback_endpoint(description):
            raise ConfigError(
                config.path,
                line,
                key,
                f"refusing to start an open relay: no client keys are configured "
                f"(authorization) and {description!r} is not a loopback listener; "
                f"add client keys, mark the upstreams meant to be public with "
                f"'noauth: true', or listen on 127.0.0.1",
            )


def listen_addresses(nodes: NodeReader, item: Item) -> tuple[str, ...]:
    """The ``listen`` setting: one address or a list, each as ``parse_listen``
    returns it."""
    descriptions = strings(nodes, item)
    if not descriptions:
        nodes.fail(item.key, item.line, "no listen address")
    result = []
    for part, description in zip(nodes.as_list(item), descriptions):
        try:
            result.append(parse_listen(description))
        except ValueError as e:
            nodes.fail(part.key, part.line, str(e))
    return tuple(result)
