"""A client connection's requests read by llhttp (``httptools``), as the
upstream client reads its responses, handed to the connection one at a time.

twisted.web reads a request head line by line in Python, each header
split, canonicalized and checked on its own; llhttp reads the head (and a
chunked body's framing) in C. What it reads becomes events, handed to the
``RequestReader`` after each read, in order, and never more than one
request ahead: once a request is whole the events after it wait
(``hold``) until its answer is done (``release``), as twisted.web reads
pipelined requests in turn.

The head is held to twisted.web's limits: ``max_head_bytes`` for the
request line and headers together, ``max_headers`` headers; an unreadable
or oversized head is told as ``unreadable`` (the connection answers 400).
So are more than two empty lines before a request, a body's framing
(chunk sizes, extensions, its trailer) over 64 KiB between two of its
bytes, and more than 16 requests read ahead of the one being answered:
nothing a client sends is held unbounded or read again and again.
Header values are stripped of surrounding blanks, as twisted.web does.
llhttp is stricter than twisted.web in a few places (a folded header, a
control character in a value, a method it does not know, a
``Transfer-Encoding`` other than ``chunked``): those heads are unreadable.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Callable
from typing import Protocol

from httptools import HttpParserError, HttpParserUpgrade, HttpRequestParser

from oaproxy.upstreamclient.response import add_header

_VERSIONS = {"1.1": b"HTTP/1.1", "1.0": b"HTTP/1.0"}

# llhttp reads only the methods it knows, in capitals; twisted.web reads any
# token, and the API answers 405 to those it does not use (a record says
# which). A request whose method is none of these is read as a GET and told
# with its own method, where it starts a read (as nearly every request does;
# one pipelined after another in the same read is unreadable). CONNECT is
# read as sent: its target is a host, which a GET's may not be.
_READ_AS_SENT = frozenset(
    {b"GET", b"POST", b"PUT", b"PATCH", b"DELETE", b"HEAD", b"OPTIONS", b"CONNECT"}
)
_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+\Z")
# A method longer than this is not waited for whole: llhttp judges it.
_LONGEST_METHOD = 32
# Empty lines before a request that are ignored (RFC 9112 asks for at least
# one): past these bytes of them, what comes is no request.
_BLANK_BEFORE = 4
# What a body may carry between two of its bytes (chunk sizes, extensions,
# the trailer), as twisted.web's limit on a trailer: llhttp would hold a
# trailer's value whole, growing with every read.
_MAX_FRAMING = 64 * 1024
# Requests read ahead of the one being answered (pipelined): each is
# events and a head's objects, some 30 times its bytes; past these the
# client gets its answers, then 400.
_MAX_AHEAD = 16


class RequestReader(Protocol):
    """The connection's side: what is read, in order."""

    def request_began(self) -> None:
        """The first byte of a request."""

    def head_read(
        self, method: bytes, path: bytes, version: bytes, headers: dict[bytes, list[bytes]]
    ) -> None:
        """The whole head: its headers by canonical name, as ``Headers`` keeps them."""

    def body_read(self, data: bytes) -> None:
        """Bytes of the body, unframed."""

    def request_read(self) -> None:
        """The request is whole."""

    def unreadable(self) -> None:
        """What came is not a request to answer; nothing more is read."""


class _Unreadable(Exception):
    """A head over the limits, found in a parser callback."""


# What to tell, with what.
Event = tuple[Callable[..., None], tuple[object, ...]]


class RequestParser:
    """llhttp over one connection's bytes (``feed``), telling ``reader``."""

    def __init__(self, reader: RequestReader, *, max_head_bytes: int, max_headers: int) -> None:
        self._reader = reader
        self._max_head_bytes = max_head_bytes
        self._max_headers = max_headers
        self._parser = HttpRequestParser(self)
        self._events: deque[Event] = deque()
        self._held = False
        self._telling = False
        self._broken = False
        # The head being read: its URL, headers, size so far, and the bytes
        # of the reads after the one it began in (llhttp holds a partial
        # name or value itself: this bounds what it may hold).
        self._in_head = False
        self._url = b""
        self._headers: dict[bytes, list[bytes]] = {}
        self._header_count = 0
        self._head_size = 0
        self._head_reads = -1
        # Bytes of a body's reads since one carried body bytes.
        self._framing = 0
        self._body_in_read = False
        # Whole requests read and not told yet.
        self._ahead = 0
        # No request begun: the next byte starts one (its method is read
        # here); the empty lines before it, and a method cut by a read.
        self._between = True
        self._blank = 0
        self._method_start = b""
        self._method: bytes | None = None

    # -- the connection's side -------------------------------------------

    def feed(self, data: bytes) -> None:
        """Read ``data``; tell what can be told."""
        if self._broken:
            return
        if self._between:
            data = self._own_method(self._method_start + data)
            if not data:
                self._tell()
                return
        self._body_in_read = False
        self._read(data)
        if self._in_head and not self._broken:
            # The read the head began in counts for nothing: its part of
            # the head is what llhttp holds of it, at most the read. Its
            # line ends count too, which the head's size does not.
            if self._head_reads < 0:
                self._head_reads = 0
            else:
                self._head_reads += len(data)
            if self._head_reads > self._max_head_bytes + 2 * (self._max_headers + 2):
                self._fail()
        elif not self._between and not self._broken:
            # In a body: reads with no body byte are its framing.
            self._framing = 0 if self._body_in_read else self._framing + len(data)
            if self._framing > _MAX_FRAMING:
                self._fail()
        self._tell()

    @property
    def waiting(self) -> bool:
        """Whether anything read waits to be told."""
        return bool(self._events)

    def stop(self) -> None:
        """Read and tell nothing more (the connection is given up)."""
        self._broken = True
        self._events.clear()

    def hold(self) -> None:
        """Tell nothing more until ``release`` (a request is being answered)."""
        self._held = True

    def release(self) -> None:
        """Tell what waited, up to the next whole request."""
        self._held = False
        self._tell()

    # -- reading ---------------------------------------------------------

    def _own_method(self, data: bytes) -> bytes:
        """``data`` starting a request, with a method llhttp does not read
        put as GET (and kept, to be told); b"" while the method is cut."""
        start = data.lstrip(b"\r\n")
        self._blank += len(data) - len(start)
        if self._blank > _BLANK_BEFORE:
            self._fail()
            return b""
        end = start.find(b" ", 0, _LONGEST_METHOD)
        if end < 0 and len(start) < _LONGEST_METHOD:
            self._method_start = start
            return b""
        self._method_start = b""
        method = start[:end]
        if end < 0 or method in _READ_AS_SENT or not _TOKEN.match(method):
            return start  # llhttp's to read
        self._method = method
        return b"GET" + start[end:]

    def _read(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except HttpParserUpgrade as upgrade:
            # llhttp stops at CONNECT or an Upgrade; twisted.web reads on, as
            # HTTP (and the API refuses both): so does this.
            self._parser = HttpRequestParser(self)
            rest = data[upgrade.args[0] :]
            if rest:
                self._read(rest)
        except HttpParserError:
            self._fail()

    def _fail(self) -> None:
        self._broken = True
        self._in_head = False
        self._add(self._reader.unreadable, ())

    def _tell(self) -> None:
        # Once: a request answered at once releases from within (its
        # answer's end), and this loop tells what follows, in order.
        if self._telling:
            return
        self._telling = True
        try:
            events = self._events
            while events and not self._held:
                call, args = events.popleft()
                call(*args)
        finally:
            self._telling = False

    def _add(self, call: Callable[..., None], args: tuple[object, ...]) -> None:
        self._events.append((call, args))

    # -- llhttp's callbacks (httptools) ----------------------------------

    def on_message_begin(self) -> None:
        if self._ahead >= _MAX_AHEAD:
            raise _Unreadable
        self._between = False
        self._blank = 0
        self._framing = 0
        self._in_head = True
        self._url = b""
        self._headers = {}
        self._header_count = 0
        self._head_size = 0
        self._head_reads = -1
        self._add(self._reader.request_began, ())

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._grow(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._in_head:
            return  # a chunked body's trailer: twisted.web drops them too
        self._header_count += 1
        if self._header_count > self._max_headers:
            raise _Unreadable
        self._grow(len(name) + len(value) + 2)
        add_header(self._headers, name, value)

    def _grow(self, size: int) -> None:
        self._head_size += size
        if self._head_size > self._max_head_bytes:
            raise _Unreadable

    def on_headers_complete(self) -> None:
        self._in_head = False
        parser = self._parser
        version = _VERSIONS.get(parser.get_http_version())
        if version is None:
            raise _Unreadable  # as twisted.web: HTTP/1.0 and 1.1 only
        method, self._method = self._method or parser.get_method(), None
        head = (method, self._url, version, self._headers)
        self._add(self._reader.head_read, head)

    def on_body(self, data: bytes) -> None:
        self._body_in_read = True
        self._add(self._reader.body_read, (data,))

    def on_message_complete(self) -> None:
        self._between = True
        self._ahead += 1
        self._add(self._complete, ())

    def _complete(self) -> None:
        self._ahead -= 1
        self.hold()
        self._reader.request_read()
