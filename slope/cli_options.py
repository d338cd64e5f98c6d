"""Argument helpers the subcommands share (``slope finetune`` / ``slope sparse-finetune``: the
SparseML guide's spellings)."""
from __future__ import annotations

import argparse

__all__ = ["add_flag", "bool_text"]


def bool_text(text: str) -> bool:
    """``True`` / ``False`` (also ``1``/``yes``, ``0``/``no``) as SparseML's flags take them: ``--flag False``."""
    value = text.strip().lower()
    if value in ("true", "1", "yes"):
        return True
    if value in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {text!r}")


def add_flag(p: argparse.ArgumentParser, name: str, **kw) -> None:
    """``--name-with-dashes`` and, as the SparseML guide writes them, ``--name_with_underscores``."""
    dashed = "--" + name.replace("_", "-")
    p.add_argument(*[dashed] + (["--" + name] if "_" in name else []), dest=name, **kw)
