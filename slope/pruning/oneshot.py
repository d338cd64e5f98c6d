"""``slope.oneshot``: prune a pretrained model in one shot with a recipe (DESIGN §8.1).

Order of work, so that a failure leaves nothing half done:

1. everything is validated first: the recipe, every modifier's targets against the model, the
   calibration data, ``max_seq_length`` and the output folder;
2. modifiers run in recipe order. A calibrated one (Wanda, SparseGPT) records how the model calls
   its blocks, then goes block by block: hooks on the block's targeted linears gather statistics
   while the block runs on every sample, the block's new weights are computed, then written, and
   the block's outputs become the next block's inputs (from the pruned block when the modifier
   propagates pruned activations: Wanda, SparseGPT with ``sequential_update``). Every write is
   journaled: on any error the original weights come back;
3. the report is printed, and with ``output_dir`` the model is saved (``save_pretrained``, its
   tokenizer, ``recipe.yaml``, ``sparsity_report.json``) into a temporary folder renamed into place.
"""
from __future__ import annotations

import json
import os
import shutil
import time
import warnings
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn as nn

from slope.pruning.calibration import BlockRunner, CalibrationError, attach_stats, calibration_samples, capture_block_calls
from slope.pruning.layers import LayerPlan, WeightJournal, find_blocks, read_weight, select_layers
from slope.pruning.modifiers import MagnitudePruningModifier, PruningModifier, RecipeError
from slope.pruning.owl import outlier_ratio, owl_sparsities
from slope.pruning.recipe import RecipeEntry, parse_recipe, recipe_yaml, skipped_stages
from slope.pruning.report import LayerResult, format_table, progress, report_dict, zero_fraction
from slope.pruning.wanda import wanda_scores
from slope.serialization.folders import check_new_output_dir

__all__ = ["oneshot", "REPORT_NAME", "RECIPE_NAME"]

REPORT_NAME = "sparsity_report.json"
RECIPE_NAME = "recipe.yaml"


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _prune_layers(modifier: PruningModifier, layers: list[LayerPlan], stats, sparsity: dict, journal: WeightJournal
                  ) -> list[LayerResult]:
    """Compute every layer's new weight first, then write them all. A layer that no calibration
    token reached (e.g. an expert the router never chose) has no statistics to prune by (SparseGPT
    would zero it whole, Wanda pick an arbitrary mask): it is pruned by magnitude, and said."""
    new, pruned_by = {}, {}
    unreached = [layer.name for layer in layers if stats and stats[layer.name].tokens == 0]
    if unreached:
        warnings.warn(f"{modifier.name}: no calibration token reached {', '.join(unreached)}; pruned by magnitude "
                      "(more calibration samples may reach them)", UserWarning, stacklevel=2)
    for layer in layers:
        pruner = MagnitudePruningModifier(sparsity[layer.name], modifier.mask_structure) if layer.name in unreached else modifier
        weight, _ = pruner.prune(read_weight(layer.module), stats.get(layer.name) if stats else None, sparsity[layer.name])
        new[layer.name], pruned_by[layer.name] = weight, pruner.name
    results = []
    for layer in layers:
        journal.write(layer.module, new[layer.name])
        results.append(LayerResult(layer.name, layer.shape, pruned_by[layer.name], modifier.structure_name,
                                   sparsity[layer.name], zero_fraction(read_weight(layer.module))))
    return results


def _owl_profile(modifier, runner: BlockRunner, hidden, by_block, last: int, device, verbose: bool) -> dict[str, float]:
    """Per-layer sparsities from OWL: one dense pass over the blocks for the outlier ratios."""
    ratios = {}
    for k in progress(range(last + 1), f"{modifier.name} OWL outlier ratios", verbose):
        stats, handles = attach_stats(by_block.get(k, []), "norms", device)
        try:
            hidden = runner.run(k, hidden)
        finally:
            for h in handles:
                h.remove()
        if k in by_block:
            scores = [wanda_scores(read_weight(l.module), stats[l.name].squared_norms()) for l in by_block[k]]
            ratios[k] = outlier_ratio(scores, modifier.owl_m)
    try:
        per_block = dict(zip(sorted(ratios), owl_sparsities([ratios[k] for k in sorted(ratios)], modifier.sparsity, modifier.owl_lmbda)))
    except ValueError as e:
        raise RecipeError(f"{modifier.name}: {e}") from None
    return {layer.name: per_block[k] for k, layers in by_block.items() for layer in layers}


def _run_calibrated(model, modifier, layers, samples, journal, verbose) -> list[LayerResult]:
    _, blocks = find_blocks(model)
    device = _device(model)
    hidden, calls = capture_block_calls(model, blocks, samples, device)
    runner = BlockRunner(blocks, calls)
    by_block: dict[int, list[LayerPlan]] = defaultdict(list)
    for layer in layers:
        by_block[layer.block].append(layer)
    last = max(by_block)
    sparsity = {layer.name: modifier.sparsity for layer in layers}
    if modifier.sparsity_profile == "owl":
        sparsity = _owl_profile(modifier, runner, hidden, by_block, last, device, verbose)
    results = []
    for k in progress(range(last + 1), modifier.name, verbose):
        rerun = k in by_block and modifier.propagate_pruned and k < last  # the next block reads the pruned block's outputs
        stats, handles = attach_stats(by_block.get(k, []), modifier.statistics, device)
        try:  # dense outputs are kept only when the next block reads them: one block's activations in memory
            outputs = runner.run(k, hidden, keep=k < last and not rerun)
        finally:
            for h in handles:
                h.remove()
        if k in by_block:
            results += _prune_layers(modifier, by_block[k], stats, sparsity, journal)
            if rerun:
                outputs = runner.run(k, hidden)
        hidden = outputs
    return results


def _calibration_windows(model, dataset, tokenizer, num_samples: int, max_seq_length: int, text_field: str) -> list[torch.Tensor]:
    """:func:`calibration_samples` checked against ``model``: the windows' length against its positions,
    their token ids against its vocabulary (a tokenizer not the model's); fewer windows than asked are said."""
    samples = calibration_samples(dataset, tokenizer, num_samples, max_seq_length, text_field)
    if len(samples) < num_samples:
        length = max(x.shape[1] for x in samples)  # (token ids given as (n, L) windows: their L)
        warnings.warn(f"the data gives {len(samples)} calibration windows of {length} tokens, fewer than the "
                      f"{num_samples} asked: pruning calibrates on those (more text, or a shorter "
                      "max_seq_length (--max-seq-len), gives more)", UserWarning, stacklevel=3)
    from slope.finetune_run import check_positions

    check_positions(model, max(x.shape[1] for x in samples), "max_seq_length (--max-seq-len, the calibration window)")
    try:
        vocab = model.get_input_embeddings().num_embeddings
    except (AttributeError, NotImplementedError):  # not a Hugging Face model, or one without an input embedding
        vocab = None
    low, high = min(int(x.min()) for x in samples), max(int(x.max()) for x in samples)
    if vocab is not None and (low < 0 or high >= vocab):
        raise CalibrationError(f"calibration token id {high if high >= vocab else low} is outside the model's vocabulary "
                               f"(ids 0 to {vocab - 1}): the tokenizer is not the model's; pass the model's tokenizer "
                               "(slope oneshot --tokenizer DIR)")
    return samples


def _save(model, tokenizer, path: Path, entries: list[RecipeEntry], report: dict) -> None:
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    from slope.serialization.export import drop_export_record

    drop_export_record(model)  # pruned from an export: no longer that export
    try:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / RECIPE_NAME).write_text(recipe_yaml(entries), encoding="utf-8")
        (tmp / REPORT_NAME).write_text(json.dumps(report, indent=1), encoding="utf-8")
        if path.exists():
            path.rmdir()  # checked empty before pruning
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def oneshot(model, recipe, dataset=None, tokenizer=None, num_calibration_samples: int = 512, max_seq_length: int = 512,
            output_dir=None, *, text_field: str = "text", verbose: bool = True, stage: str | None = None) -> nn.Module:
    """Prune ``model`` in place with ``recipe`` and return it (DESIGN §8.1).

    Args:
        model: a Hugging Face model (``PreTrainedModel``), or a path: an HF folder (``config.json``)
            or a ``slope train`` checkpoint (see :func:`slope.pruning.loading.load_model`).
        recipe: a YAML file path, YAML text or a dict (:func:`slope.pruning.recipe.parse_recipe`).
        dataset: calibration data for Wanda / SparseGPT: ``"embedded"``, a ``.txt`` / ``.jsonl`` file,
            a Hugging Face dataset name (needs internet), a list of strings, or int64 token ids
            (:func:`slope.pruning.calibration.calibration_samples`). Magnitude pruning needs none.
        tokenizer: tokenizes text datasets and is saved with the model (a path ``model`` brings its own).
        num_calibration_samples / max_seq_length: calibration windows and their length in tokens.
        output_dir: save the pruned model there (must not exist, or be empty).
        verbose: print the report table and progress (tqdm on a terminal, plain lines otherwise), and
            a line per recipe stage left to ``slope finetune``.
        stage: run only this stage of a multi-stage recipe (default: its ``oneshot`` stages).

    The model runs on its own device (move it to CUDA first to calibrate there) in its dtype
    (statistics and SparseGPT's algebra in fp32). The report is kept in ``model.slope_oneshot_report``.
    """
    out = None if output_dir is None else check_new_output_dir(output_dir)  # before the model loads
    if isinstance(model, (str, os.PathLike)):
        from slope.pruning.loading import load_model

        model, own_tokenizer = load_model(model)
        tokenizer = tokenizer if tokenizer is not None else own_tokenizer
    if not isinstance(model, nn.Module):
        raise TypeError(f"oneshot needs a torch model (e.g. a transformers PreTrainedModel) or a model folder, got {type(model).__name__}")
    entries = parse_recipe(recipe, stage=stage)
    if out is not None and tokenizer is not None and not hasattr(tokenizer, "save_pretrained"):
        raise TypeError(f"output_dir saves the tokenizer with save_pretrained, which {type(tokenizer).__name__} lacks; pass a "
                        "transformers tokenizer (e.g. PreTrainedTokenizerFast(tokenizer_object=tok))")
    planned = [(entry, *select_layers(model, entry.modifier)) for entry in entries]
    samples = None
    if any(entry.modifier.statistics for entry in entries):
        samples = _calibration_windows(model, dataset, tokenizer, num_calibration_samples, max_seq_length, text_field)
    journal, results, timings = WeightJournal(), {}, []
    was_training = model.training
    model.eval()
    try:
        for entry, layers, _ in planned:
            start = time.perf_counter()
            mod = entry.modifier
            if mod.statistics is None:
                done = _prune_layers(mod, layers, None, {layer.name: mod.sparsity for layer in layers}, journal)
            else:
                done = _run_calibrated(model, mod, layers, samples, journal, verbose)
            results.update({r.name: r for r in done})
            timings.append({"modifier": entry.where, "seconds": time.perf_counter() - start})
    except BaseException:
        journal.rollback()
        raise
    finally:
        model.train(was_training)
    journal.commit()
    skipped = {s.name: s for _, _, skip in planned for s in skip if s.name not in results}
    report = report_dict(
        list(results.values()), list(skipped.values()), model=type(model).__name__,
        calibration_samples=0 if samples is None else len(samples),
        calibration_tokens=0 if samples is None else sum(s.numel() for s in samples),
        timings=timings, recipe=recipe_yaml(entries),
    )
    model.slope_oneshot_report = report
    if verbose:
        for note in skipped_stages(recipe, "oneshot", stage):
            print(note)
        print(format_table(list(results.values()), list(skipped.values())))
    if out is not None:
        _save(model, tokenizer, out, entries, report)
        if verbose:
            print(f"saved the pruned model to {out} ({REPORT_NAME}, {RECIPE_NAME} beside it)")
    return model

