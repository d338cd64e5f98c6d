"""``metrics.jsonl`` of ``slope train``: one JSON object per line, appended line-atomically.

Each record is one ``write`` of a whole line (:func:`slope.durable.append_line`), so a crash or
a full disk never leaves half a record behind us. A resumed run keeps the records up to its
checkpoint's step and rewrites the file atomically (a kill during the rewrite keeps the old file);
a torn last line that something else left (a full disk under another writer, a copy cut short)
is dropped with a note instead of blocking the resume.
"""
from __future__ import annotations

import json
from pathlib import Path

from slope.durable import append_line, replace_file

__all__ = ["MetricsLog", "read_records"]


def read_records(path: str | Path, note=None) -> list[dict]:
    """The records of ``path``; lines that are not JSON objects are skipped and reported through
    ``note`` (one line), a torn last line included."""
    path = Path(path)
    text = path.read_text(encoding="utf-8", errors="replace") if path.exists() else ""
    records, bad = [], []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if isinstance(record, dict) and "step" in record:
            records.append(record)
        else:
            bad.append(lineno)
    if bad and note is not None:
        torn = bad == [len(text.splitlines())] and not text.endswith("\n")
        what = f"a torn last line (line {bad[0]})" if torn else f"{len(bad)} unreadable line(s) (line {', '.join(map(str, bad[:5]))})"
        note(f"note: {path}: dropped {what}, left by an interrupted write")
    return records


class MetricsLog:
    """``enabled=False`` (ranks other than 0) writes nothing. A resumed run (``keep_until_step > 0``)
    keeps the records up to that step (summaries dropped); a new run starts an empty file.
    ``reporter``: also gets every record written (``--report-to``: :mod:`slope.reporting`)."""

    def __init__(self, path: Path, keep_until_step: int, enabled: bool = True, note=print, reporter=None):
        self.path = path
        self.enabled = enabled
        self.reporter = reporter
        if not enabled:
            return
        kept = []
        if keep_until_step > 0:
            kept = [r for r in read_records(path, note) if r["step"] <= keep_until_step and r.get("event") != "summary"]
        replace_file(path, "".join(json.dumps(r) + "\n" for r in kept).encode("utf-8"))

    def write(self, record: dict) -> None:
        if self.enabled:
            append_line(self.path, json.dumps(record))
            if self.reporter is not None:
                self.reporter.log(record)

