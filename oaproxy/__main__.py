"""``python -m oaproxy …``: the query and export command (see ``oaproxy.cli``).

The ``oaproxy`` console script calls ``main`` from here too.
"""

from oaproxy.cli import main

__all__ = ["main"]

if __name__ == "__main__":
    raise SystemExit(main())
