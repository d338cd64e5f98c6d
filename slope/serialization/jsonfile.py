"""Read a JSON file that must hold an object: one place for the parse, the type check and the reason.

Callers keep their own messages: ``fail(why)`` builds the exception to raise (``why`` is
``"not valid JSON: <the parser's message>"`` or ``"expected a JSON object, got <type>"``), e.g.
``read_json_object(path, lambda why: ValueError(f"{path} is corrupt ({why}); re-save it"))``.
Without ``fail`` the reader is lenient (a lock file, a manifest probed while looking for the newest
checkpoint): anything but an object, or a file that cannot be read, is None.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable

__all__ = ["read_json_object"]


def read_json_object(path: str | os.PathLike, fail: Callable[[str], Exception] | None = None) -> dict | None:
    """The JSON object (a dict) in the UTF-8 file at ``path``.

    A file that is not valid JSON or holds another type: ``raise fail(why)``, or None without
    ``fail``. A file that cannot be read (missing, permissions): its ``OSError`` propagates with
    ``fail``, None without."""
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except OSError:
        if fail is None:
            return None
        raise
    except ValueError as e:  # json.JSONDecodeError, UnicodeDecodeError
        if fail is None:
            return None
        raise fail(f"not valid JSON: {e}") from e
    if isinstance(value, dict):
        return value
    if fail is None:
        return None
    raise fail(f"expected a JSON object, got {type(value).__name__}")
