"""How an upstream request fails, in Twisted's own exception types.

The failures are those of ``twisted.web.client`` (``ResponseFailed``,
``ResponseNeverReceived``, ``RequestGenerationFailed``), so code written for
Twisted's ``Agent`` reads them unchanged; where the client knows more, a
subclass says it.
"""

from __future__ import annotations

from collections.abc import Sequence

from twisted.internet.error import ConnectError
from twisted.python.failure import Failure
from twisted.web.client import ResponseNeverReceived


class NoResponse(ResponseNeverReceived):
    """The connection ended before the first byte of a response.

    ``reused`` says whether the request went out on a connection that had
    served an earlier request (a pooled one the upstream may have closed
    while it was idle); ``request_sent`` whether all of it was written.
    """

    def __init__(self, reasons: Sequence[Failure], *, reused: bool, request_sent: bool) -> None:
        super().__init__(list(reasons))
        self.reused = reused
        self.request_sent = request_sent


class ProxyError(ConnectError):
    """The outbound proxy did not get the request to the upstream.

    A ``ConnectError``, as the upstream was never reached. The text names the
    proxy by its ``url`` (never its credentials) and says what happened, in
    words of ours: nothing the proxy sent is quoted.
    """

    def __init__(self, proxy_url: str, what: str) -> None:
        super().__init__(string=f"proxy {proxy_url} {what}")

    def __str__(self) -> str:
        return str(self.args[0])


class ProxyUnreachable(ProxyError):
    """The proxy could not be reached, or hung up before it answered."""


class ProxyRefused(ProxyError):
    """The proxy answered a ``CONNECT`` (or an absolute-form request, with
    407) with a status that is not success; ``status`` is None when its
    answer was not HTTP."""

    def __init__(self, proxy_url: str, what: str, status: int | None) -> None:
        super().__init__(proxy_url, what)
        self.status = status


class IncompleteBody(Exception):
    """The connection ended inside a body framed by length or by chunks."""

    def __init__(self, received: int, announced: int | None) -> None:
        of = f" of {announced}" if announced is not None else ""
        super().__init__(f"body cut after {received}{of} bytes")
        self.received = received
        self.announced = announced


class ResponseHeadTooLarge(Exception):
    """A response head (status line and headers) over the client's limit."""


class UnexpectedStatus(Exception):
    """A status no request of this client can get (101: it asks for no upgrade)."""


def retry_on_new_connection(error: BaseException) -> bool:
    """Whether a failed request is worth sending once more on a new connection.

    Only when it went out on a reused pooled connection that ended before any
    byte of a response: that connection was most likely closed by the upstream
    while idle, before the request reached it. On a new connection the same
    failure is the upstream's own doing (it may have acted on the request), so
    the request is never sent twice; nor after a cancel, which is no failure
    of the connection (cancelling fails with ``CancelledError`` instead).
    """
    return isinstance(error, NoResponse) and error.reused
