"""
C{python -m oaproxy …}: the query and export command (see L{oaproxy.cli}).

The C{oaproxy} console script calls L{main} from here too.
"""

from oaproxy.cli import main

__all__ = ["main"]

if __name__ == "__main__":
    raise SystemExit(main())
