"""One client connection: twisted.web's ``HTTPChannel``, saying what it does
to its clients through the site's rate-limited log (``oaproxy.logthrottle``).

Twisted writes one line for each idle connection it times out; a proxy with
thousands of clients (or one client opening thousands of connections) would
fill its journal with them.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import connectionDone
from twisted.python.failure import Failure
from twisted.web import http


class ProxyChannel(http.HTTPChannel):
    """An HTTP/1.1 client connection of a ``ProxySite``."""

    site: Any  # the ProxySite, set by Site.buildProtocol
    _abort_later: IDelayedCall | None = None

    def timeoutConnection(self) -> None:
        self.site.client_log.info(
            "closing client connections idle too long, such as {peer}", peer=self._peer()
        )
        self._close()

    def _close(self) -> None:
        """Close, and abort the connection if it is still open after
        ``abortTimeout`` (a client that does not read what is left to send)."""
        self._abort_later = self.callLater(self.abortTimeout, self._abort)
        self.loseConnection()

    def _abort(self) -> None:
        self._abort_later = None
        self.site.client_log.info(
            "aborting client connections that did not close, such as {peer}", peer=self._peer()
        )
        self.transport.abortConnection()  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._abort_later is not None:
            self._abort_later.cancel()
            self._abort_later = None
        super().connectionLost(reason)

    def _peer(self) -> str:
        address = self.transport.getPeer()  # type: ignore[union-attr]
        return getattr(address, "host", None) or "unix"
