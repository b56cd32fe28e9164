"""An outbound HTTP proxy: where it is, and the credentials it is given.

A plain value (no Twisted in it): the config reads ``proxy:`` into one, the
pool keys its routes by it. Its ``repr`` and ``url`` never show the
credentials; they leave the process only as ``Proxy-Authorization``.
"""

from __future__ import annotations

import base64

from attrs import field, frozen


@frozen
class HTTPProxy:
    """A proxy spoken to in plain HTTP: absolute-form requests for http
    origins, a ``CONNECT`` tunnel for https ones."""

    host: str
    port: int
    #: ``user:password`` as given (percent-decoded); None without credentials.
    credentials: str | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        """``http://host:port``: what logs, summaries and error texts name."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def authorization(self) -> bytes | None:
        """The ``Proxy-Authorization`` value (Basic), if there are credentials."""
        if self.credentials is None:
            return None
        return b"Basic " + base64.b64encode(self.credentials.encode("utf-8"))

    @property
    def secrets(self) -> tuple[str, ...]:
        """The texts that would give the credentials away, for redaction."""
        if self.credentials is None:
            return ()
        password = self.credentials.partition(":")[2]
        token = base64.b64encode(self.credentials.encode("utf-8")).decode("ascii")
        return tuple(s for s in (password, self.credentials, token) if s)
