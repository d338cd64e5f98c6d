"""slope's warnings as the commands show them: one ``note: ...`` line on stderr.

The ``slope`` commands install :func:`warnings_as_notes` for their whole run, so what the library
warns about (a setting that has no effect, layers left dense, a precision change) reads as one line,
said once under a launcher (by rank 0: every rank warns alike); other packages' warnings keep
Python's format.
"""
from __future__ import annotations

import sys
import warnings
from contextlib import contextmanager
from pathlib import Path

__all__ = ["report_error", "said_once", "warnings_as_notes"]


def report_error(command: str, error: BaseException) -> None:
    """``slope <command>: error: ...`` in one line on stderr, said once under a launcher (by the first
    rank: every rank meets the same bad input). Every rank also records it in torchrun's error file
    (``TORCHELASTIC_ERROR_FILE``, when set), so that the launcher's failure summary names the cause
    of a rank that failed alone (a path missing on one node, a full local disk)."""
    import json
    import os
    import time

    from slope.parallel import launched_rank

    line = f"slope {command}: error: {' '.join(str(error).split())}"
    if launched_rank()[0] == 0:
        sys.stderr.write(line + "\n")
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:  # torchrun's format (torch.distributed.elastic ErrorHandler), with the line in place of a traceback
        record = {"message": {"message": f"{type(error).__name__}: {error}",
                              "extraInfo": {"py_callstack": line, "timestamp": str(int(time.time()))}}}
        try:
            Path(path).write_text(json.dumps(record), encoding="utf-8")
        except OSError:
            pass  # (the line above, or the launcher's own summary, still says what failed)


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


@contextmanager
def said_once():
    """Within it (or a function it decorates, each call afresh), a warning shown once is not shown
    again: one of the same category and text is dropped, so that a run of several stages says each
    note once (a note whose text differs between stages is still said)."""
    seen: set[tuple[type, str]] = set()
    with warnings.catch_warnings():
        show = warnings.showwarning

        def showwarning(message, category, filename, lineno, file=None, line=None):
            key = (category, str(message))
            if key not in seen:
                seen.add(key)
                show(message, category, filename, lineno, file, line)

        warnings.showwarning = showwarning
        yield
