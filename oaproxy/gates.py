"""The head gates every config has: method, body cap, body budget, path,
content encoding, client key (in this order; a config's IP rules go right
after the method).

Each looks at the ``Arrival`` only: none of them reads or parses the body.
"""

from __future__ import annotations

from oaproxy.errors import ErrorAnswer
from oaproxy.pipeline import Arrival, HeadGate, Verdict
from oaproxy.routing import Router
from oaproxy.web import API_METHODS, BodyRefusal, declared_size

_ALLOW = b", ".join(API_METHODS)
# Seconds: bodies in flight are forwarded and let go within seconds.
RETRY_BUSY = b"2"


def method_check(arrival: Arrival) -> Verdict:
    """405 for a method the API does not use: ``TRACE`` would echo the
    upstream's key back, ``CONNECT`` would ask the upstream for a tunnel."""
    method = arrival.request.method
    if method in API_METHODS:
        return None
    arrival.answer_headers.setRawHeaders(b"allow", [_ALLOW])
    # Any token is a method to twisted.web: only its head is shown back.
    shown = method[:32].decode("latin-1")
    return ErrorAnswer(
        405,
        f"Method {shown} is not allowed; the API uses {_ALLOW.decode()}.",
        code="method_not_allowed",
    )


def body_cap(arrival: Arrival) -> Verdict:
    """413 for a body over ``max_body_bytes`` (it was thrown away as it came)."""
    if getattr(arrival.request, "refused", None) is BodyRefusal.TOO_LARGE:
        return ErrorAnswer(
            413,
            f"Request body too large: the limit is {arrival.config.max_body_bytes} bytes.",
            code="request_too_large",
        )
    return None


def body_budget(arrival: Arrival) -> Verdict:
    """503 for a large body while the bodies held are at
    ``max_inflight_body_bytes`` (it was thrown away as it came)."""
    if getattr(arrival.request, "refused", None) is not BodyRefusal.BUSY:
        return None
    arrival.answer_headers.setRawHeaders(b"retry-after", [RETRY_BUSY])
    return ErrorAnswer(
        503,
        "The proxy holds as many request bodies as it may right now; retry shortly.",
        type="server_error",
        code="server_busy",
    )


def path_check(arrival: Arrival) -> Verdict:
    """400 for a path no API has (``.`` or ``..`` segments, ``/v1`` spelled with escapes)."""
    if arrival.path is None:
        return ErrorAnswer(
            400,
            "Invalid path: the API is under /v1/, spelled plainly, with no '.' or '..' segments.",
            code="invalid_path",
        )
    return None


def content_encoding_check(arrival: Arrival) -> Verdict:
    """415 for a body in a ``Content-Encoding`` (gzip...): its model could not
    be read, and a proxy must not decompress what a client chose the size of."""
    request = arrival.request
    encodings = request.requestHeaders.getRawHeaders(b"content-encoding") or ()
    codings = {coding.strip().lower() for value in encodings for coding in value.split(b",")}
    if not codings - {b"", b"identity"} or not declared_size(request):
        return None
    return ErrorAnswer(
        415,
        "Request bodies with a Content-Encoding are not accepted: send the body as it is.",
        code="unsupported_content_encoding",
    )


def client_key(router: Router) -> HeadGate:
    """401 for a caller without a valid key whom no ``noauth`` upstream would serve."""

    def check(arrival: Arrival) -> Verdict:
        return router.unauthorized(arrival.caller)

    return check


def builtin_head_gates(router: Router, ip_rules: HeadGate | None = None) -> tuple[HeadGate, ...]:
    """The built-in head gates in their order, with ``ip_rules`` (if any)
    after the method: a method the API has no use for is refused whoever
    sends it."""
    return (
        method_check,
        *(() if ip_rules is None else (ip_rules,)),
        body_cap,
        body_budget,
        path_check,
        content_encoding_check,
        client_key(router),
    )
