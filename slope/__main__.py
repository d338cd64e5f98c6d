"""``python -m slope``: the same as the ``slope`` command."""
import sys

from slope.cli import main

if __name__ == "__main__":
    sys.exit(main())
