"""The per-layer sparsity report of a one-shot run (JSON + printed table), and progress output."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from slope.pruning.layers import Skipped

__all__ = ["LayerResult", "format_table", "progress", "report_dict", "zero_fraction"]


@dataclass
class LayerResult:
    """One pruned linear: ``target`` sparsity (the modifier's, or OWL's for its block) and the
    measured fraction of exact zeros in the written weight."""

    name: str
    shape: tuple[int, int]
    modifier: str
    structure: str
    target: float
    zeros: float


def zero_fraction(weight: torch.Tensor) -> float:
    """Fraction of entries of ``weight`` that are exactly zero."""
    return float((weight == 0).sum()) / weight.numel()


def format_table(results: list[LayerResult], skipped: list[Skipped]) -> str:
    """Plain-text table: one row per pruned layer (the last modifier that wrote it) and per skipped one."""
    width = max([len(r.name) for r in results] + [len(s.name) for s in skipped] + [5])
    lines = [f"{'layer':<{width}}  {'out x in':>13}  {'modifier':<26} {'structure':<12} {'target':>7} {'zeros':>7}"]
    for r in results:
        lines.append(f"{r.name:<{width}}  {r.shape[0]:>6}x{r.shape[1]:<6}  {r.modifier:<26} {r.structure:<12} "
                     f"{r.target:>7.2%} {r.zeros:>7.2%}")
    for s in skipped:
        lines.append(f"{s.name:<{width}}  {s.shape[0]:>6}x{s.shape[1]:<6}  left as is: {s.reason}")
    numel = sum(r.shape[0] * r.shape[1] for r in results)
    zeros = sum(r.zeros * r.shape[0] * r.shape[1] for r in results) / max(numel, 1)
    lines.append(f"{len(results)} linear layers pruned ({zeros:.2%} of their weights are zero), {len(skipped)} left as they were")
    return "\n".join(lines)


def report_dict(results: list[LayerResult], skipped: list[Skipped], **info) -> dict:
    """The JSON-able report: ``info`` (run settings, timings) plus ``layers`` and ``skipped``."""
    numel = sum(r.shape[0] * r.shape[1] for r in results)
    return {
        **info,
        "pruned_layers": len(results),
        "pruned_weights": numel,
        "zero_fraction": sum(r.zeros * r.shape[0] * r.shape[1] for r in results) / max(numel, 1),
        "layers": [asdict(r) for r in results],
        "skipped": [asdict(s) for s in skipped],
    }


def progress(items, desc: str, enabled: bool = True):
    """Iterate ``items`` (calibration blocks) with a tqdm bar on a terminal, one plain line per
    block with rate and ETA otherwise (logs, CI): :func:`slope.progress.iterate`."""
    from slope.progress import iterate

    return iterate(items, desc, unit="block", display="auto" if enabled else "off", interval_s=0)
