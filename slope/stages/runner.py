"""``slope.apply``: every stage of a recipe in one run, in the recipe's order (SparseML's ``apply``,
llm-compressor's ``run_stages``).

::

    apply("llama-dense", "recipe.yaml", "embedded", output_dir="out", distill_teacher="llama-dense",
          num_calibration_samples=512, max_steps=200, bf16=True)

Each stage runs as its own command would, on the model the stage before it wrote: a ``oneshot``
stage with :func:`slope.oneshot`, a ``train`` stage with :func:`slope.finetune`. Stage ``<name>``
writes ``output_dir/stage_<name>/`` (llm-compressor's layout: the model folder, its tokenizer and
that stage's ``recipe.yaml``, plus the command's report or metrics); ``output_dir/apply.json``
(:mod:`slope.stages.record`) holds each stage's settings and whether it is done. Checked before the
first stage runs: every stage's modifiers and name, the training arguments, the teacher that a
distilling stage needs, the model / teacher / tokenizer folders, and the output folder.

Calling ``apply`` again on that ``output_dir`` continues the run: finished stages are kept, a train
stage that wrote a ``checkpoint-<step>/`` (``save_steps``) resumes from its newest, and an unfinished
stage without one starts again. Settings may change for the stages not finished (a failed run
continues with corrected ones); a change that would lose a finished stage is a one-line error.
SIGINT / SIGTERM during a train stage end the run after the current step with that stage's
``checkpoint-<step>/``: the next call continues from it.

Under ``torchrun`` / ``accelerate launch`` a oneshot stage runs on rank 0 while the other ranks
wait (calibration goes block by block in one process), and a train stage runs data-parallel on
every rank, with DDP or FSDP2 as :func:`slope.finetune` does.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import time
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import torch.distributed as dist
import torch.nn as nn

from slope.config import absolute_if_local
from slope.notes import said_once
from slope.pruning.modifiers import RecipeError
from slope.pruning.recipe import RecipeStage, parse_recipe, recipe_stages, recipe_yaml, stage_recipe
from slope.stages.record import StageRecord, stage_finished, stage_folder_name

__all__ = ["apply"]

#: Training arguments that do not change a stage's result: a continued run may change them.
_FREE_ARGS = ("progress", "logging_steps", "device", "eval_steps", "eval_batches", "save_steps", "save_total_limit",
              "resume_from_checkpoint",
              "fsdp")  # (the engine: a train stage's checkpoints resume under DDP, FSDP or in one process alike)


# ---------------------------------------------------------------------- checks before any stage runs
def _checked_stages(recipe, teacher) -> tuple[list[RecipeStage], list[bool], list[str]]:
    """The recipe's stages, every modifier checked; per stage whether it distils, and its recipe with
    defaults filled in (YAML)."""
    from slope.recovery.finetune import plan_recipe

    stages = recipe_stages(recipe)
    for s in stages:
        if s.unsupported:
            warnings.warn(f"recipe stage {s.name} is left out: {s.unsupported}; run it with another tool on the model the "
                          "last stage writes", UserWarning, stacklevel=3)
    stages = [s for s in stages if not s.unsupported]
    if not stages:
        raise RecipeError("the recipe holds no stages slope runs; add e.g. `pruning_stage: {pruning_modifiers: "
                          "{SparseGPTModifier: {sparsity: 0.5}}}`")
    for s in stages:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", s.name) or set(s.name) == {"."}:
            raise RecipeError(f"stage name {s.name!r} cannot name its folder ({stage_folder_name(s.name)}); name stages with "
                              "letters, digits, '_', '-' and '.'")
    if len({s.name for s in stages}) < len(stages):
        raise RecipeError(f"two stages share a name ({', '.join(s.name for s in stages)}; YAML reads 1 and '1' alike); "
                          "give each stage a name of its own")
    # every modifier checked (a train stage also for two of a kind), parsed once: its distillation and its text
    parsed = [plan_recipe(recipe, s.name) if s.run_type == "train" else (None, None, parse_recipe(recipe, stage=s.name))
              for s in stages]
    distils = [distill is not None for _, distill, _ in parsed]
    if any(distils) and teacher is None:
        names = ", ".join(s.name for s, d in zip(stages, distils) if d)
        raise ValueError(f"stage {names} distils (OutputDistillationModifier) and needs distill_teacher (the dense model, "
                         "e.g. the one the recipe prunes)")
    if teacher is not None and not any(distils):
        raise ValueError("distill_teacher is given but no stage of the recipe has an OutputDistillationModifier; add one "
                         "(e.g. comparison: square_head) or drop the teacher")
    return stages, distils, [recipe_yaml(entries) for _, _, entries in parsed]


def _check_folder(name: str, source) -> None:
    """A model, teacher or tokenizer given as a folder must be there, and be one slope loads (before any stage runs)."""
    if not isinstance(source, (str, os.PathLike)):
        return
    from slope.serialization.folders import describe_folder, folder_kind

    kind = folder_kind(Path(source).expanduser())
    if kind in ("missing", "unknown", "slope-apply", "slope-finetune-checkpoint", "checkpoints-only", "peft-adapter") and not (
            name == "tokenizer" and (Path(source).expanduser() / "tokenizer_config.json").is_file()):
        raise FileNotFoundError(f"{name} {describe_folder(Path(source).expanduser(), kind)}")


def _source_name(source) -> str | None:
    """A model, teacher or tokenizer as the record compares it: a resolved path, a tokenizer's own
    path, or the class of one in memory."""
    if source is None:
        return None
    if isinstance(source, (str, os.PathLike)):
        return absolute_if_local(os.fspath(source))
    own = getattr(source, "name_or_path", None)
    return str(own) if isinstance(own, str) and own else f"<{type(source).__name__} in memory>"


def _data_name(dataset) -> str:
    """The data as the record compares it: a file's resolved path, a dataset's name, a hash of documents."""
    if isinstance(dataset, (str, os.PathLike)):
        return absolute_if_local(os.fspath(dataset))
    if isinstance(dataset, (list, tuple)) and all(isinstance(d, str) for d in dataset):
        digest = hashlib.sha256("\0".join(dataset).encode("utf-8")).hexdigest()[:16]
        return f"{len(dataset)} documents, sha256 {digest}"
    return f"<{type(dataset).__name__} in memory>"


def _plan(stages, distils, texts, model, dataset, teacher, calibration: tuple[int, int], args) -> list[dict[str, Any]]:
    """Per stage: its name, run type and the settings that decide its result (:mod:`slope.stages.record`)."""
    from slope import parallel
    from slope.finetune_run import plain_config

    common = {"dataset": _data_name(dataset), "tokenizer": _source_name(args["tokenizer"]), "text_field": args["text_field"],
              "precision": args["precision"]}
    training = {k: v for k, v in plain_config(args).items() if k not in _FREE_ARGS and k not in common}
    # the global batch decides the run, not how it is split: a run continues on another number of ranks
    training["global_batch"] = training.pop("per_device_train_batch_size") * parallel.launched_rank()[1]
    planned = []
    for k, (s, distils_here, text) in enumerate(zip(stages, distils, texts)):
        settings = {"recipe": text, **common}
        if k == 0:
            settings["model"] = _source_name(model)
        if s.run_type == "oneshot":
            settings.update(num_calibration_samples=calibration[0], max_seq_len=calibration[1])
        else:
            settings.update(training, distill_teacher=_source_name(teacher) if distils_here else None)
        planned.append({"name": s.name, "run_type": s.run_type, "settings": settings})
    return planned


# ---------------------------------------------------------------------- ranks
class _Leader:
    """Work rank 0 does alone while the other ranks wait for its outcome. The wait runs on a gloo
    group of its own with a day's timeout: a oneshot stage can outlast the training group's."""

    def __init__(self, env):
        self.is_main = env.is_main
        self.group = dist.new_group(backend="gloo", timeout=timedelta(days=1)) if env.distributed else None

    def run(self, fn: Callable[[], Any]) -> Any:
        """``fn()`` on rank 0; its (picklable) result on every rank. Its error is raised on rank 0 and
        said on the others as a ``ValueError`` (the commands print rank 0's line only)."""
        if self.group is None:
            return fn()
        payload: list[Any] = [None]
        if self.is_main:
            try:
                payload[0] = (True, fn())
            except Exception as e:
                dist.broadcast_object_list([(False, f"{type(e).__name__}: {e}")], src=0, group=self.group)
                raise
        dist.broadcast_object_list(payload, src=0, group=self.group)
        ok, value = payload[0]
        if not ok:
            raise ValueError(f"rank 0 stopped: {value}")
        return value

    def close(self) -> None:
        if self.group is not None and dist.is_initialized():
            dist.destroy_process_group(self.group)


# ---------------------------------------------------------------------- stages
def _result(folder: Path, run_type: str) -> dict[str, Any]:
    """What the record keeps of a finished stage, read from its folder."""
    from slope.pruning.oneshot import REPORT_NAME
    from slope.serialization.jsonfile import read_json_object

    if run_type == "oneshot":
        report = read_json_object(folder / REPORT_NAME) or {}
        return {"pruned_layers": report.get("pruned_layers"), "zero_fraction": report.get("zero_fraction")}
    summary = read_json_object(folder / "summary.json") or {}
    return {"steps": summary.get("steps"), "final_val_loss": summary.get("final_val_loss"),
            "resumed_from": summary.get("resumed_from")}


def _prune(source, recipe: dict, dataset, folder: Path, args: dict[str, Any], calibration, device, verbose: bool) -> nn.Module:
    """A oneshot stage (rank 0): load ``source``, prune it with ``recipe`` (one stage), save it into ``folder``."""
    from slope.dynamic.data import resolve_tokenizer
    from slope.pruning import oneshot
    from slope.pruning.loading import load_model

    if isinstance(source, nn.Module):
        model, tokenizer = source.to(device), None
    else:
        model, tokenizer = load_model(source, device, args["precision"])
    tokenizer = resolve_tokenizer(args["tokenizer"] if args["tokenizer"] is not None else tokenizer, model_source=None)
    return oneshot(model, recipe, dataset, tokenizer, calibration[0], calibration[1], folder, text_field=args["text_field"],
                   verbose=verbose)


def _train_resume(folder: Path) -> bool | None:
    """How an unfinished train stage starts (rank 0): from its newest complete checkpoint (``True``),
    or afresh (``None``; what it left without one is removed)."""
    from slope.finetune_checkpoints import checkpoint_steps

    if checkpoint_steps(folder, complete=True):
        return True
    if folder.exists():
        shutil.rmtree(folder)
    return None


def _say(leader: _Leader, verbose: bool, line: str) -> None:
    if verbose and leader.is_main:
        print(line, flush=True)


def _run_stage(leader, stage: RecipeStage, index: str, source, recipe, dataset, teacher, folder: Path, args, training_args,
               calibration, device, verbose) -> nn.Module | None:
    """Run one unfinished stage into ``folder`` (``teacher``: for a stage that distils, else ``None``); its
    model (``None`` on ranks > 0 after a oneshot stage)."""
    _say(leader, verbose, f"apply: stage {index} {stage.name} ({stage.run_type}) -> {folder}")
    one = stage_recipe(recipe, stage.name)
    if stage.run_type == "oneshot":
        pruned: list[nn.Module] = []
        leader.run(lambda: pruned.append(_prune(source, one, dataset, folder, args, calibration, device, verbose)))
        return pruned[0] if pruned else None
    from slope.recovery.finetune import finetune

    resume = leader.run(lambda: _train_resume(folder))
    if resume:
        _say(leader, verbose, f"apply: stage {stage.name} resumes from its newest checkpoint in {folder}")
    return finetune(source, one, dataset, distill_teacher=teacher, output_dir=folder, resume_from_checkpoint=resume,
                    **training_args)


def _calibration(num_calibration_samples, max_seq_len, args) -> tuple[int, int]:
    from slope.finetune_run import check_int

    check_int("num_calibration_samples", num_calibration_samples, 1)
    if max_seq_len is not None:
        check_int("max_seq_len", max_seq_len, 2)
    return num_calibration_samples, max_seq_len or args["max_seq_length"]


def _open_record(record: list, out: Path, planned: list[dict[str, Any]]) -> list[bool]:
    """Open the run's record (rank 0) into ``record``; per stage whether it is done (a stage found
    finished that the record missed, stopped in between, is recorded now)."""
    opened = StageRecord.open(out, planned)
    record.append(opened)
    for p in planned:
        entry = opened.entry(p["name"])
        if not entry["done"] and stage_finished(out / entry["folder"], p["run_type"]):
            opened.finish(p["name"], None, _result(out / entry["folder"], p["run_type"]))
    return [opened.done(p["name"]) for p in planned]


def _checked_call(model, recipe, output_dir, teacher, training_args) -> tuple[list[RecipeStage], list[bool], list[str],
                                                                              dict[str, Any]]:
    """``apply``'s arguments checked before anything runs: ``(stages, distils, recipe texts, training args)``
    (:func:`_checked_stages`)."""
    from slope.recovery.finetune import checked_training_args

    if output_dir is None:
        raise ValueError("apply writes each stage's model to output_dir/stage_<name>/: give output_dir (--output-dir)")
    if "resume_from_checkpoint" in training_args:
        raise ValueError("apply continues an unfinished run itself: call it again with the same settings and output_dir "
                         "(a train stage resumes from its newest checkpoint-<step>, written every save_steps)")
    stages, distils, texts = _checked_stages(recipe, teacher)
    args = checked_training_args(dict(training_args), caller="apply")
    for name, source in (("model", model), ("distill_teacher", teacher), ("tokenizer", args["tokenizer"])):
        _check_folder(name, source)
    return stages, distils, texts, args


@said_once()
def apply(model, recipe, dataset="embedded", output_dir=None, distill_teacher=None, *, num_calibration_samples: int = 512,
          max_seq_len: int | None = None, verbose: bool = True, **training_args) -> nn.Module:
    """Run every stage of ``recipe`` in order, each on the model the previous one wrote (module docstring).

    Args:
        model: the model the first stage starts from: a model or a folder (as :func:`slope.oneshot`
            and :func:`slope.finetune` take).
        recipe: a YAML path, YAML text or dict with one or more stages (``run_type: oneshot`` / ``train``,
            or given by their modifiers), in any order.
        dataset: the data of every stage: calibration samples of oneshot stages, training data of
            train stages (``"embedded"``, a ``.txt`` / ``.jsonl`` file, a list of strings, or an HF name).
        output_dir: the run's folder (required): ``stage_<name>/`` per stage and ``apply.json``.
        distill_teacher: the teacher (model or folder) of the stages with an ``OutputDistillationModifier``.
        num_calibration_samples / max_seq_len: calibration windows of oneshot stages and their length
            (default: ``max_seq_length``).
        verbose: print a line per stage, the oneshot reports and a closing table. Each warning (note) is said
            once per call, not once per stage, unless its text differs between stages.
        training_args: :data:`slope.recovery.finetune.TRAINING_DEFAULTS`, for every train stage
            (``resume_from_checkpoint`` is not one: call ``apply`` again to continue). Those that change no
            result (``save_steps``, ``save_total_limit``, logging, evaluation, device) may change between calls.

    Returns the last stage's model as its command returns it (loaded from its folder when this call
    did not run it, or on ranks > 0 after a oneshot stage), with ``apply_summary``: the record
    (``apply.json``) plus ``final_model`` (the last stage's folder) and ``ran_now`` (the stages this call ran).
    ``apply_summary["stopped"]`` is ``None``, unless SIGINT / SIGTERM stopped a train stage: then the run
    ends there and the model is that stage's as it stands (``final_model`` ``None``), and ``stopped`` holds
    the ``stage``, ``stopped_by`` (the signal), ``stopped_at`` of ``steps`` and ``stop_checkpoint`` (its
    ``checkpoint-<step>/``, which the next call continues from). A signal during a oneshot stage, or during
    the last step of a train stage, lets that stage finish; the run then stops before the next one
    (``stopped``: ``stage``, ``stopped_by`` and ``after_stage`` True; the model is that stage's).
    """
    from slope import parallel
    from slope.evaluate import resolve_device
    from slope.interrupt import GracefulStop

    stages, distils, texts, args = _checked_call(model, recipe, output_dir, distill_teacher, training_args)
    calibration = _calibration(num_calibration_samples, max_seq_len, args)
    planned = _plan(stages, distils, texts, model, dataset, distill_teacher, calibration, args)
    out = Path(output_dir).expanduser()
    env = parallel.init_distributed(device=resolve_device(args["device"]))
    leader = _Leader(env)
    try:
        with GracefulStop() as signals:  # (SIGINT / SIGTERM: the stage under way ends, then the run)
            record: list[StageRecord] = []  # rank 0's
            done = leader.run(lambda: _open_record(record, out, planned))
            kept = max((k for k, d in enumerate(done) if d), default=-1)  # the stages up to the last one done stay
            if args["save_steps"] is None and any(s.run_type == "train" for s in stages[kept + 1:]):
                _say(leader, verbose, "note: without save_steps a train stage killed mid-run starts again when apply continues the run "
                     "(a SIGINT / SIGTERM stops it with a checkpoint)")
            if kept >= 0 and isinstance(model, nn.Module):
                _say(leader, verbose, f"note: stage {stages[0].name} is kept from the earlier run; the model given in memory is not "
                     "used (and cannot be checked to be the same): pass a new output_dir to start from it")
            source = model if kept < 0 else out / stage_folder_name(stages[kept].name)

            def run_one(k: int, index: str, source, folder: Path):
                return _run_stage(leader, stages[k], index, source, recipe, dataset, distill_teacher if distils[k] else None, folder,
                                  args, training_args, calibration, env.device, verbose)

            last, ran, source, stopped = _run_stages(leader, record, stages, done, kept, source, out, verbose, run_one,
                                                     signals.agreed)
            summary = leader.run(lambda: record[0].data)
    finally:
        leader.close()
        parallel.destroy_distributed(env)
    if stopped is not None:  # a train stage stopped by a signal: its checkpoint continues it when apply is called again
        last.apply_summary = {**summary, "final_model": None, "ran_now": ran, "stopped": stopped}
        return last
    if last is None:
        from slope.pruning.loading import load_model

        last = load_model(source, env.device, args["precision"])[0]
    last.apply_summary = {**summary, "final_model": str(source), "ran_now": ran, "stopped": None}
    if verbose and env.is_main:
        print(format_stages(last.apply_summary))
    return last


def _run_stages(leader, record, stages, done, kept: int, source, out: Path, verbose: bool, run_one: Callable[..., Any],
                stop: Callable[[], str | None]):
    """Run the stages after ``kept`` in turn (``run_one(k, index, source, folder)``: :func:`_run_stage` of
    stage ``k``), each on the folder the stage before wrote; ``(last model, the stages run, the last folder,
    stopped)``: ``stopped`` is ``None`` unless a signal stopped the run — inside a train stage (that stage
    unfinished: its name and its summary's ``stopped_by``, ``stopped_at``, ``steps`` and ``stop_checkpoint``)
    or at the end of a stage (``stop()``, collective, asked after each stage but the last: the stage's name,
    ``stopped_by`` and ``after_stage`` True)."""
    last, ran = None, []
    for k, stage in enumerate(stages):
        folder, index = out / stage_folder_name(stage.name), f"{k + 1}/{len(stages)}"
        if k <= kept:
            _say(leader, verbose, f"apply: stage {index} {stage.name} ({stage.run_type}): " + (
                 f"done earlier, kept in {folder}" if done[k] else f"its folder is gone; stage {stages[kept].name} after it is kept"))
            continue
        start = time.perf_counter()
        last = run_one(k, index, source, folder)
        summary = getattr(last, "finetune_summary", None) if stage.run_type == "train" else None
        if summary is not None and summary.get("stopped_by"):  # (every rank stopped at the same step)
            return last, ran, source, {"stage": stage.name, **{key: summary[key] for key in (
                "stopped_by", "stopped_at", "steps", "stop_checkpoint")}}
        leader.run(lambda: record[0].finish(stage.name, time.perf_counter() - start, _result(folder, stage.run_type)))
        ran.append(stage.name)
        source = folder
        signal_name = stop() if k < len(stages) - 1 else None
        if signal_name:
            return last, ran, source, {"stage": stage.name, "stopped_by": signal_name, "after_stage": True}
    return last, ran, source, None


def format_stages(summary: dict[str, Any]) -> str:
    """The closing table of a run (``apply_summary``): per stage its run type, time and result."""
    lines = [f"{'stage':<24} {'run type':<8} {'seconds':>15}  result"]
    for s in summary["stages"]:
        seconds = "-" if s["seconds"] is None else f"{s['seconds']:.1f}"
        seconds += "" if s["name"] in summary["ran_now"] else " (kept)"
        result = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in (s["result"] or {}).items()
                           if v is not None)
        lines.append(f"{s['name']:<24} {s['run_type']:<8} {seconds:>15}  {result}")
    lines.append(f"final model: {summary['final_model']}")
    return "\n".join(lines)
