"""Who may use which upstream: client keys, route prefixes, allow/deny lists
and aliases. The order of the candidates is for the candidate filters
(``oaproxy.balancing``, ``oaproxy.breaker``).

Everything derived from the config is computed once, in ``Router.__init__``;
a request pays for a hash, a dict lookup and a walk over the upstreams.
"""

from __future__ import annotations

import hashlib
import hmac

from attrs import frozen

from oaproxy.config import ClientKey, Config, Upstream, all_client_keys
from oaproxy.credentials import bearer_token
from oaproxy.errors import ErrorAnswer

# openai-api-route's texts, kept so that existing clients see what they know.
NOT_BEARER = "authorization header should start with 'Bearer'"
WRONG_KEY = "wrong authorization header"


@frozen
class Caller:
    """The client as far as routing is concerned."""

    key: ClientKey | None
    # Why no key was accepted (one of the texts above), for the 401.
    refusal: str | None = None


def _digest(secret: str | bytes) -> bytes:
    if isinstance(secret, str):
        secret = secret.encode("utf-8")
    return hashlib.sha256(secret).digest()


class Router:
    """Authenticates callers and finds the upstreams that may serve them."""

    def __init__(self, config: Config) -> None:
        self.upstreams = config.upstreams
        global_keys = frozenset(k.sha256 for k in config.keys)
        # Looked up by the SHA-256 of the presented key, so the lookup's timing
        # says nothing about the secret; compare_digest then confirms it.
        # A key the store made is known by its SHA-256 alone.
        every_key: dict[bytes, ClientKey] = {
            bytes.fromhex(key.sha256) if key.secret is None else _digest(key.secret): key
            for key in all_client_keys(config)
        }
        self._keys = every_key
        # Without any client key configured the operator chose an open proxy
        # (the config refuses that on a non-loopback listener).
        self.auth_required = bool(every_key)
        self._open_upstreams = any(u.noauth for u in config.upstreams)
        self._permitted: dict[str, frozenset[str] | None] = {}
        for upstream in config.upstreams:
            if upstream.noauth:
                self._permitted[upstream.name] = None
            elif upstream.keys is not None:
                self._permitted[upstream.name] = frozenset(k.sha256 for k in upstream.keys)
            else:
                self._permitted[upstream.name] = global_keys

    def authenticate(self, authorization: bytes | None) -> Caller:
        """The caller behind an ``Authorization`` header value."""
        if not self.auth_required:
            return Caller(key=None)
        presented = bearer_token(authorization)
        if presented is None:
            return Caller(key=None, refusal=NOT_BEARER)
        digest = _digest(presented)
        key = self._keys.get(digest)
        if key is None:
            return Caller(key=None, refusal=WRONG_KEY)
        if key.secret is None:
            known, given = bytes.fromhex(key.sha256), digest
        else:
            known, given = key.secret.encode("utf-8"), presented
        if not hmac.compare_digest(known, given):
            return Caller(key=None, refusal=WRONG_KEY)
        return Caller(key=key)

    def candidates(
        self, caller: Caller, model: str | None, path: str, route: str | None = None
    ) -> list[Upstream] | ErrorAnswer:
        """The upstreams that may serve a request, in config order, or the
        error to answer instead.

        ``model`` is the JSON body's model; without one the API path stands
        in for it, so ``allow: [/v1/audio/transcriptions]`` works. Only the
        upstreams of the request's ``route`` prefix serve it.
        """
        name = model if model is not None else path
        serving = [u for u in self.upstreams if u.route == route and serves(u, name)]
        usable = self._usable(caller, serving)
        if usable is None:
            return _unauthorized(caller)
        if not usable:
            if not serving:
                what = f"The model `{model}`" if model is not None else f"The path `{path}`"
                return ErrorAnswer(
                    404,
                    f"{what} does not exist or is not served by this proxy.",
                    code="model_not_found",
                    param="model" if model is not None else None,
                )
            return ErrorAnswer(
                403,
                f"This key is not allowed to use {model or path}.",
                type="permission_error",
                code="model_not_allowed",
            )
        return usable

    def usable(self, caller: Caller, route: str | None = None) -> list[Upstream] | None:
        """The upstreams of ``route`` this caller may use, whatever the model;
        None when a caller without a valid key may use none."""
        return self._usable(caller, [u for u in self.upstreams if u.route == route])

    def _usable(self, caller: Caller, upstreams: list[Upstream]) -> list[Upstream] | None:
        if not self.auth_required:
            return upstreams
        if caller.key is None:
            return [u for u in upstreams if u.noauth] or None
        digest = caller.key.sha256
        return [u for u in upstreams if self._may_use(u, digest)]

    def unauthorized(self, caller: Caller) -> ErrorAnswer | None:
        """The 401 for a caller no upstream would serve, whatever the model."""
        if self.auth_required and caller.key is None and not self._open_upstreams:
            return _unauthorized(caller)
        return None

    def _may_use(self, upstream: Upstream, digest: str) -> bool:
        permitted = self._permitted[upstream.name]
        return permitted is None or digest in permitted


def _unauthorized(caller: Caller) -> ErrorAnswer:
    return ErrorAnswer(401, caller.refusal or WRONG_KEY, code="invalid_api_key")


def serves(upstream: Upstream, name: str) -> bool:
    """Whether an upstream serves a model (or path): allow first, then deny.
    Both name client-facing names; an alias is allowed by being one."""
    if upstream.allow and name not in upstream.allow and name not in upstream.models:
        return False
    return name not in upstream.deny
