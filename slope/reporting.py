"""``slope train --report-to``: metrics to TensorBoard or Weights & Biases besides ``metrics.jsonl``.

- ``tensorboard``: event files in ``OUT/tensorboard`` (``torch.utils.tensorboard``; needs the
  ``tensorboard`` package: ``pip install 'slope[tensorboard]'``); view with
  ``tensorboard --logdir OUT/tensorboard``. A resumed run first hides the events the stopped run
  wrote after its checkpoint (``purge_step``), so the curves continue as one run.
- ``wandb``: a Weights & Biases run under ``OUT/wandb`` (``pip install 'slope[wandb]'``),
  **offline** unless ``WANDB_MODE`` says otherwise (``WANDB_MODE=online``, or ``wandb sync`` later);
  ``WANDB_PROJECT`` names the project (default ``slope``).

The reporter receives every ``metrics.jsonl`` record (:class:`slope.metrics_log.MetricsLog`) and
maps it onto scalars: ``train/loss``, ``train/lr``, ``train/grad_norm``, ``train/loss_scale``,
``train/tokens`` and ``eval/loss``, ``eval/ppl``, at the record's step. Only rank 0 reports.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

from slope.config import ConfigError, TrainConfig

__all__ = ["Reporter", "open_reporter", "scalars"]

_TRAIN = ("loss", "lr", "grad_norm", "loss_scale", "tokens")
_EVAL = {"val_loss": "eval/loss", "val_ppl": "eval/ppl"}


def scalars(record: dict) -> dict[str, float]:
    """The scalars of one metrics record, by tag (non-numeric and non-finite values left out)."""
    if "val_loss" in record:
        named = {tag: record.get(key) for key, tag in _EVAL.items()}
    elif "loss" in record and "event" not in record:
        named = {f"train/{key}": record.get(key) for key in _TRAIN}
    else:
        return {}
    return {tag: float(v) for tag, v in named.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


class Reporter:
    """Base: reports nothing (``--report-to none``)."""

    def log(self, record: dict) -> None:
        """Report one metrics record."""

    def close(self) -> None:
        """Flush and release the backend."""

    def __enter__(self) -> "Reporter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class TensorBoardReporter(Reporter):
    def __init__(self, out: Path, cfg: TrainConfig, start_step: int):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise ConfigError("report_to = 'tensorboard' needs the tensorboard package: pip install 'slope[tensorboard]' "
                              "(or pip install tensorboard), or drop --report-to") from e
        self.writer = SummaryWriter(log_dir=str(out / "tensorboard"), purge_step=start_step + 1 if start_step else None)
        if not start_step:
            self.writer.add_text("config", "    " + json.dumps(cfg.to_dict(), indent=1).replace("\n", "\n    "), 0)

    def log(self, record: dict) -> None:
        for tag, value in scalars(record).items():
            self.writer.add_scalar(tag, value, record["step"])

    def close(self) -> None:
        self.writer.close()


class WandbReporter(Reporter):
    def __init__(self, out: Path, cfg: TrainConfig, start_step: int):
        try:
            import wandb
        except ImportError as e:
            raise ConfigError("report_to = 'wandb' needs the wandb package: pip install 'slope[wandb]' (or pip install wandb), "
                              "or drop --report-to") from e
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "slope"), name=out.name, dir=str(out),
                              mode=os.environ.get("WANDB_MODE", "offline"), config={**cfg.to_dict(), "start_step": start_step})

    def log(self, record: dict) -> None:
        values = scalars(record)
        if values:
            self.run.log(values, step=record["step"])
        elif record.get("event") == "summary":
            self.run.summary.update({k: v for k, v in record.items() if isinstance(v, (int, float, bool, str))})

    def close(self) -> None:
        self.run.finish()


def open_reporter(kind: str, out: Path, cfg: TrainConfig, start_step: int = 0) -> Reporter:
    """The reporter of ``--report-to kind`` for the run in ``out`` (resumed at ``start_step``); a
    missing backend is a :class:`~slope.config.ConfigError` saying what to install."""
    if kind == "none":
        return Reporter()
    if kind == "tensorboard":
        return TensorBoardReporter(out, cfg, start_step)
    if kind == "wandb":
        return WandbReporter(out, cfg, start_step)
    raise ConfigError(f"report_to = {kind!r} is invalid: choose one of none, tensorboard, wandb")
