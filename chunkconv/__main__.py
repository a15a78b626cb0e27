"""``python -m chunkconv``: runs the command line of :mod:`chunkconv.cli`."""

import sys

from .cli import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
