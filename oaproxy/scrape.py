"""``/v1/metrics`` and ``/metrics``: the registry of ``Metrics`` for scrapers."""

from __future__ import annotations

import hmac
from typing import cast

from prometheus_client.exposition import choose_encoder
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource
from twisted.web.server import Request

from oaproxy.credentials import bearer_token
from oaproxy.errors import error_body
from oaproxy.metrics import Metrics
from oaproxy.routing import NOT_BEARER, WRONG_KEY


class MetricsResource(Resource):
    """Serves the metrics in the Prometheus text format (or OpenMetrics when the
    scraper asks for it), optionally behind a bearer key.

    ``metrics_key`` is the key scrapers must send as
    ``Authorization: Bearer <key>``, or ``None`` for an open endpoint; each
    generation builds its own resource with the config's key.
    """

    isLeaf = True

    def __init__(self, metrics: Metrics, metrics_key: str | None = None) -> None:
        super().__init__()
        self._metrics = metrics
        self.metrics_key = metrics_key

    def render(self, request: IRequest) -> bytes:
        # Site hands us a server.Request; the cast lets mypy see its methods
        # with or without the mypy-zope plugin.
        return self._render(cast(Request, request))

    def _render(self, request: Request) -> bytes:
        # Our own 405: Resource.render's goes through a deprecated error page.
        if request.method not in (b"GET", b"HEAD"):
            request.setResponseCode(405)
            request.setHeader(b"allow", b"GET, HEAD")
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            return b"Method Not Allowed\n"
        return self._render_get(request)

    def _render_get(self, request: Request) -> bytes:
        refusal = self._refusal(request)
        if refusal is not None:
            request.setResponseCode(401)
            request.setHeader(b"content-type", b"application/json")
            request.setHeader(b"www-authenticate", b"Bearer")
            return error_body(refusal, code="invalid_api_key")
        accept = request.getHeader(b"accept")
        encoder, content_type = choose_encoder(accept.decode("latin-1") if accept else "")
        output = encoder(self._metrics.registry)
        request.setHeader(b"content-type", content_type.encode("ascii"))
        request.setHeader(b"cache-control", b"no-store")
        return output

    def _refusal(self, request: Request) -> str | None:
        key = self.metrics_key
        if not key:
            return None
        given = bearer_token(request.getHeader(b"authorization"))
        if given is None:
            return NOT_BEARER
        if not hmac.compare_digest(given, key.encode("utf-8")):
            return WRONG_KEY
        return None
