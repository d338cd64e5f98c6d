"""Regenerate slope/data/corpus.jsonl.gz: the embedded training corpus.

The corpus is the source code of the top-level modules of the Python standard library (CPython 3.11,
PSF License, redistributable with its notice: slope/data/CORPUS.txt). It is shipped in the
repository so that every machine trains on the same text without a download; this script only
documents (and repeats) how it was made:

    python scripts/build_corpus.py [--stdlib DIR]

One JSON record per module, sorted by file name: {"source": "argparse.py", "text": "..."}.
"""
from __future__ import annotations

import argparse
import gzip
import json
import sysconfig
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "slope" / "data" / "corpus.jsonl.gz"
# Generated or obfuscated files that are not representative text.
EXCLUDE = {"this.py", "antigravity.py", "__hello__.py", "__phello__.py"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stdlib", default=sysconfig.get_paths()["stdlib"], help="the Lib/ directory to read")
    args = parser.parse_args()
    files = sorted(
        p for p in Path(args.stdlib).glob("*.py") if p.name not in EXCLUDE and not p.name.startswith("_sysconfigdata")
    )
    with gzip.GzipFile(OUT, "wb", mtime=0) as raw:  # mtime=0: byte-identical output on every run
        for path in files:
            record = {"source": path.name, "text": path.read_text(encoding="utf-8")}
            raw.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
    print(f"wrote {OUT} ({len(files)} modules, {OUT.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
