"""slope's warnings as the commands show them: one ``note: ...`` line on stderr.

The ``slope`` commands install :func:`warnings_as_notes` for their whole run, so what the library
warns about (a setting that has no effect, layers left dense, a precision change) reads as one line,
said once under a launcher (by rank 0: every rank warns alike); other packages' warnings keep
Python's format.
"""
from __future__ import annotations

import sys
from pathlib import Path

__all__ = ["warnings_as_notes"]


def warnings_as_notes(show):
    """A ``warnings.showwarning`` that prints slope's own warnings as ``note: ...`` (on the first
    rank only) and hands the others to ``show``."""
    from slope.parallel import launched_rank

    package = Path(__file__).resolve().parent
    main = launched_rank()[0] == 0

    def showwarning(message, category, filename, lineno, file=None, line=None):
        if package in Path(filename).resolve().parents:
            if main:
                sys.stderr.write(f"note: {' '.join(str(message).split())}\n")
        else:
            show(message, category, filename, lineno, file, line)

    return showwarning
