"""An answer's head, written in one pass (``oaproxy.web.ProxyRequest``).

twisted.web sets ``Server`` and a freshly formatted ``Date`` on every
request's ``Headers``, and an answer's headers pass through several
``Headers`` (the upstream's, the request's, oaproxy's own), each copy
canonicalizing names and sanitizing values again. Here the lines that do
not change are made once (``Server``; ``Date`` once a second), and the
head is put together from the three sources as they are: the upstream's
headers passed on (``passed``, whose values are made single lines once, as
they come from outside), then those set on the request, then oaproxy's
``answer_headers``, each replacing the same name where it stands. The
lines are those twisted.web writes, in its order but for one: the
``Connection: close`` it sets as a request begins came before ``Server``
and ``Date``, and comes after them here (the order of header fields of
different names means nothing to HTTP).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from twisted.internet.interfaces import IReactorTime
from twisted.web.http import NO_BODY_CODES, NO_CONTENT, NOT_MODIFIED, datetimeToString
from twisted.web.server import version

Fields = Iterable[tuple[bytes, Sequence[bytes]]]

#: What twisted.web says it is, on the answers that are not oaproxy's own.
TWISTED_SERVER = b"Server: " + version + b"\r\n"
OAPROXY_SERVER = b"Server: oaproxy\r\n"


class DateLine:
    """The ``Date`` line of the clock's current second, formatted at most
    once a second."""

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self._second = -1
        self._line = b""

    def line(self) -> bytes:
        second = int(self._clock.seconds())
        if second != self._second:
            self._second = second
            self._line = b"Date: " + datetimeToString(second) + b"\r\n"
        return self._line


def single_lines(passed: Sequence[tuple[bytes, Sequence[bytes]]]) -> Fields:
    """``passed`` with CR and LF in values made spaces, as twisted's
    ``Headers`` does: a value from outside cannot end the head or add a
    line to it. One look at all the values first: an ordinary answer's have
    none."""
    joined = b"".join(value for _, values in passed for value in values)
    if b"\r" not in joined and b"\n" not in joined:
        return passed
    return [(name, [b" ".join(value.splitlines()) for value in values]) for name, values in passed]


def head_parts(
    status_line: Sequence[bytes],
    server: bytes,
    date: bytes,
    sources: Sequence[Fields],
    *,
    chunkable: bool,
    code: int,
    default_type: bytes | None,
    extra: Fields = (),
) -> tuple[list[bytes], bool]:
    """The parts of the head (to ``writeSequence``) and whether the body is
    chunked: twisted.web's ``Request.write`` rules. ``sources`` are merged
    by name in order (a later one's value wins, where the earlier stood);
    a ``Server`` or ``Date`` among them replaces the ready-made line;
    ``chunkable``: HTTP/1.1 and not HEAD; ``extra`` come last (Last-Modified,
    ETag, cookies)."""
    fields: dict[bytes, Sequence[bytes]] = {}
    for source in sources:
        fields.update(source)
    set_server = fields.pop(b"Server", None)
    set_date = fields.pop(b"Date", None)
    length = fields.get(b"Content-Length")
    if (
        code not in (NOT_MODIFIED, NO_CONTENT)
        and not fields.get(b"Content-Type")
        and default_type is not None
        and not (length and length[0] == b"0")
    ):
        fields[b"Content-Type"] = [default_type]
    chunked = chunkable and not length and code not in NO_BODY_CODES
    if chunked:
        fields[b"Transfer-Encoding"] = [b"chunked"]
    fields.update(extra)
    parts = [*status_line]
    _add(parts, b"Server", set_server, server)
    _add(parts, b"Date", set_date, date)
    for name, values in fields.items():
        for value in values:
            parts += (name, b": ", value, b"\r\n")
    parts.append(b"\r\n")
    return parts, chunked


def _add(parts: list[bytes], name: bytes, values: Sequence[bytes] | None, line: bytes) -> None:
    if values is None:
        parts.append(line)
        return
    for value in values:
        parts += (name, b": ", value, b"\r\n")
