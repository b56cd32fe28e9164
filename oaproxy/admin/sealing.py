"""Upstream keys at rest: the secret settings of a stored upstream (its
``sk``, and a ``proxy`` URL that holds credentials) are kept as one JSON
object encrypted with ``store_key`` (Fernet: AES-128-CBC with an
HMAC-SHA256, from ``cryptography``).  Without a ``store_key`` nothing secret
can be stored, and oaproxy says so."""

from __future__ import annotations

import binascii
import json
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from cryptography.fernet import Fernet, InvalidToken

from oaproxy.config import Config, ConfigError, Upstream
from oaproxy.config.schema import file_fields

#: How README and the messages say to make a key.
MAKE_KEY = (
    "python3 -c 'from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())'"
)


class SealingError(Exception):
    """A secret that cannot be stored or read back; the message says why."""


class Sealer:
    """Encrypts and decrypts the secret settings of stored upstreams."""

    def __init__(self, fernet: Fernet | None) -> None:
        self._fernet = fernet

    @classmethod
    def from_config(cls, config: Config) -> Sealer:
        """The sealer of ``config.store_key``; ``ConfigError`` for a key
        that is not a Fernet key."""
        if config.store_key is None:
            return cls(None)
        try:
            return cls(Fernet(config.store_key.strip().encode("ascii")))
        except (ValueError, UnicodeEncodeError, binascii.Error):
            raise ConfigError(
                config.path,
                None,
                "store_key",
                f"must be a Fernet key (32 bytes in url-safe base64); make one with {MAKE_KEY}",
            ) from None

    def seal(self, secrets: Mapping[str, str]) -> str:
        if self._fernet is None:
            raise SealingError(
                "the config has no store_key, so upstream keys cannot be stored "
                "(set store_key: ${OAPROXY_STORE_KEY} in the config file)"
            )
        return self._fernet.encrypt(json.dumps(dict(secrets)).encode("utf-8")).decode("ascii")

    def unseal(self, sealed: str) -> dict[str, str]:
        if self._fernet is None:
            raise SealingError("a stored upstream key needs the config's store_key to be read")
        try:
            opened = json.loads(self._fernet.decrypt(sealed.encode("ascii")))
        except (InvalidToken, UnicodeEncodeError, ValueError):
            raise SealingError(
                "a stored upstream key cannot be decrypted with this store_key "
                "(was it stored with another one?)"
            ) from None
        if not isinstance(opened, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in opened.items()
        ):
            raise SealingError("a stored upstream key is not what oaproxy seals")
        return opened


def secret_keys(cls: type) -> frozenset[str]:
    """The file's keys of ``cls`` whose values are secret (its fields kept
    out of ``repr``: an upstream's ``sk``): sealed in the store, never shown."""
    return frozenset(key for field, key, _ in file_fields(cls) if not field.repr)


#: Upstream keys whose value is secret when it holds credentials (a proxy
#: URL's user:password): sealed then, like an sk.
CREDENTIALED = frozenset({"proxy"})


def secret_setting(key: str, value: Any) -> bool:
    """Whether an upstream setting is sealed in the store: an ``sk``, or a
    proxy URL with credentials."""
    if key in secret_keys(Upstream):
        return True
    return key in CREDENTIALED and isinstance(value, str) and _has_credentials(value)


def _has_credentials(url: str) -> bool:
    try:
        return "@" in urlsplit(url.strip()).netloc
    except ValueError:
        # Not a URL: its reader says why.
        return False
