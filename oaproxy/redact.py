"""Secrets out of text that oaproxy did not write itself.

An upstream may quote its key in an error ("Incorrect API key provided:
sk-…"), a client may paste a key into a prompt: such text is kept in records
and passed on to clients, so every configured secret is replaced first.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from oaproxy.config import Config, all_client_keys

REDACTED = "[redacted]"
# Shorter values (a client key like "guest") are ordinary words in answers;
# replacing them would maim text and protect nothing.
MIN_SECRET_LENGTH = 8


def config_secrets(config: Config) -> list[str]:
    """Every secret value a config holds."""
    values = [key.secret for key in all_client_keys(config)]
    values += [u.sk for u in config.upstreams if u.sk and u.sk != "asis"]
    values += [v for v in (config.admin_key, config.metrics_key) if v]
    notify = config.notify
    if notify.feishu is not None and notify.feishu.secret:
        values.append(notify.feishu.secret)
    if notify.matrix is not None:
        values.append(notify.matrix.access_token)
    return values


class Redactor:
    """Replaces known secrets in strings, and in the strings of JSON values."""

    def __init__(self, secrets: Iterable[str]) -> None:
        unique = sorted({s for s in secrets if len(s) >= MIN_SECRET_LENGTH}, key=len, reverse=True)
        self._pattern = re.compile("|".join(map(re.escape, unique))) if unique else None

    def __call__(self, value: Any, extra: str | None = None) -> Any:
        """``value`` with the secrets, and ``extra`` (a request's own bearer
        token), replaced."""
        if extra is not None and len(extra) < MIN_SECRET_LENGTH:
            extra = None
        if self._pattern is None and extra is None:
            return value
        return self._scrub(value, extra)

    def _scrub(self, value: Any, extra: str | None) -> Any:
        if isinstance(value, str):
            if self._pattern is not None:
                value = self._pattern.sub(REDACTED, value)
            if extra is not None and extra in value:
                value = value.replace(extra, REDACTED)
            return value
        if isinstance(value, dict):
            return {k: self._scrub(v, extra) for k, v in value.items()}
        if isinstance(value, list):
            return [self._scrub(v, extra) for v in value]
        return value
