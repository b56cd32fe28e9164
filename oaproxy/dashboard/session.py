"""Who may see the dashboard: the admin key, a signed expiring session
cookie, and CSRF tokens bound to the session.

A session cookie is ``<id>.<expires>.<mac>``: an HMAC-SHA256 of the first
two under a key made from a secret and the admin key, so a new
``admin_key`` ends every session.  The secret is the SQL store's, shared by
every process and machine on it (``sessiontables``); without a store, the
one a ``workers:`` parent gives its children, or one of this process.
Logging out forgets the id (here, and in the store: ``DashboardResource``)
until it would have expired anyway.  The CSRF token of a form is an
HMAC of the session id; the login form's, of a nonce kept in a cookie of its
own (a double submit: another site can neither read nor set it).

Every comparison is of SHA-256 digests or MACs, with ``hmac.compare_digest``:
the time taken says nothing of what was wrong.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Callable

from attrs import frozen

__all__ = ["Session", "Sessions", "admin_key_matches"]

_MAC_BYTES = 32


def admin_key_matches(presented: bytes | None, admin_key: str) -> bool:
    """Whether ``presented`` is the admin key, in a time that depends on neither."""
    given = hashlib.sha256(presented or b"").digest()
    wanted = hashlib.sha256(admin_key.encode("utf-8")).digest()
    # Both digests compared even when nothing was presented: the same work.
    return hmac.compare_digest(given, wanted) and presented is not None


@frozen
class Session:
    id: str
    expires: float


class Sessions:
    """Opens, checks and closes the sessions of one daemon (kept over reloads)."""

    def __init__(self, clock: Callable[[], float], secret: Callable[[], bytes]) -> None:
        self._clock = clock
        # Asked at each use: the store's secret once the store is read.
        self._secret = secret
        # Closed (logged out) session id -> when it would have expired.
        self._closed: dict[str, float] = {}

    def _key(self, admin_key: str) -> bytes:
        return hmac.new(self._secret(), admin_key.encode("utf-8"), hashlib.sha256).digest()

    def _mac(self, admin_key: str, text: str) -> str:
        return hmac.new(self._key(admin_key), text.encode("ascii"), hashlib.sha256).hexdigest()

    def open(self, admin_key: str, lifetime: float) -> tuple[Session, str]:
        """A new session and its cookie value."""
        session = Session(secrets.token_hex(16), float(int(self._clock() + lifetime)))
        signed = f"{session.id}.{int(session.expires)}"
        return session, f"{signed}.{self._mac(admin_key, signed)}"

    def check(self, cookie: bytes | None, admin_key: str) -> Session | None:
        """The session of a cookie: signed with this secret for this admin
        key, not expired, not closed here; else None."""
        try:
            text = (cookie or b"").decode("ascii")
        except UnicodeDecodeError:
            text = ""
        session_id, _, rest = text.partition(".")
        expires, _, mac = rest.partition(".")
        signed = f"{session_id}.{expires}"
        good = hmac.compare_digest(
            self._mac(admin_key, signed).encode("ascii"), mac.encode("ascii", "replace")
        )
        if not good or not expires.isdigit():
            return None
        now = self._clock()
        if float(expires) <= now or session_id in self._closed:
            return None
        return Session(session_id, float(expires))

    def close(self, session: Session) -> None:
        """Log out: the cookie is worth nothing from now on."""
        now = self._clock()
        for old in [i for i, until in self._closed.items() if until <= now]:
            del self._closed[old]
        self._closed[session.id] = session.expires

    def csrf_token(self, admin_key: str, binding: str) -> str:
        """The token a form posted within ``binding`` (a session id, or
        ``login:`` and a nonce) must carry."""
        return self._mac(admin_key, f"csrf:{binding}")

    def csrf_good(self, admin_key: str, binding: str, token: bytes | None) -> bool:
        wanted = self.csrf_token(admin_key, binding).encode("ascii")
        return hmac.compare_digest(wanted, token or b"")

    @staticmethod
    def nonce() -> str:
        return secrets.token_hex(16)
