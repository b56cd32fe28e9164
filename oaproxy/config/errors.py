"""``ConfigError``: every problem with the configuration, located."""

from __future__ import annotations


class ConfigError(Exception):
    """A configuration problem, located as precisely as the file allows.

    Attributes:

    - ``path``: the configuration file's path.
    - ``line``: 1-based line of the offending key, or ``None`` when unknown
      (a required key that is missing, a ``--listen`` override).
    - ``key``: dotted path of the offending key, e.g.
      ``upstreams[1].timeout``; ``""`` for problems of the file as a whole.
    - ``message``: what is wrong, one line, never a secret value.
    """

    def __init__(self, path: str, line: int | None, key: str, message: str) -> None:
        # YAML's own messages may span lines; ours are one line by contract.
        message = " ".join(message.split())
        super().__init__(path, line, key, message)
        self.path = path
        self.line = line
        self.key = key
        self.message = message

    def __str__(self) -> str:
        where = self.path if self.line is None else f"{self.path}:{self.line}"
        if self.key:
            return f"{where}: {self.key}: {self.message}"
        return f"{where}: {self.message}"
