"""Inference throughput of Llama-style models: prefill and decode tokens/s and weights memory, dense vs merged sparse.

The sparse model is pruned with adapters (``lora_rank``), merged (``merge_lora``, fold ``auto``)
and frozen (``slope.lora.freeze_for_inference``: the inference-only form); where merging fails it
runs unmerged (``sparse_form`` says which, ``merge_error`` why).

- prefill: a no-grad forward over ``batch × prompt`` tokens (median of timed calls, alternating
  with the dense model), for each adapter fold (``auto``, ``stacked``, ``extended``:
  ``slope.inference.fold``; each fold timed after its own warm-up, operands rebuilt in between);
- decode: ``slope.inference.decode.static_decode`` (static KV cache, greedy, tokens chosen on the
  device) of ``new_tokens`` after a ``decode_prompt`` prefill, batch ``decode_batch``, eager and
  (CUDA) under a CUDA graph, median over ``decode_repeats`` after one untimed decode of each model
  (``auto``'s choices and Triton autotuning happen there, never in the timed region);
- weights memory: bytes of parameters, buffers and cached operands after the warm-up (every
  storage once: ``models.state_bytes``; by part in ``weights_parts``: ``models.weight_parts``),
  and on CUDA the allocator's growth while building and warming the model. ``--memory-only``
  counts these alone (no timing), e.g. Llama-1B with rank-64 adapters on a CPU.

Ratios: ``prefill_speedup`` (fold ``auto``), ``prefill_stacked_speedup``,
``prefill_extended_speedup``, ``decode_speedup`` (eager), ``decode_graphs_speedup`` (both models
under CUDA graphs), ``decode_fused_graphs_speedup`` (the sparse model's decode on the one-launch
Triton kernel, ``slope.lora.set_decode_kernel(model, "fused")``, under CUDA graphs) — dense time /
sparse time — and ``weights_memory_ratio`` (sparse / dense bytes).

    python performance_experiments/inference.py --budget-s 60
    python performance_experiments/inference.py --smoke
    python performance_experiments/inference.py --device cpu --memory-only --models llama-1b --lora-rank 64 --precision bf16 --backends reference
"""
from __future__ import annotations

import statistics
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from performance_experiments.common import (
    Budget,
    Recorder,
    available_backends,
    backends_used,
    base_parser,
    default_backends,
    environment,
    error_text,
    free_memory,
    make_record,
    pick_device,
    ratio,
    time_interleaved,
)
from performance_experiments.models import build_model, describe, random_tokens, state_bytes, weight_parts

SCRIPT = "inference"


FOLDS = ("auto", "stacked", "extended")


def _allocated(device) -> int:
    free_memory(device)
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def _build_sparse(name, backend, device, precision, rank):
    """``(model, form, merge_error)``: merged sparse+LoRA in its inference-only form when possible,
    else unmerged."""
    try:
        from slope.lora import freeze_for_inference

        model = build_model(name, backend, device, precision, lora_rank=rank, merge_lora=True)
        freeze_for_inference(model)
        return model, "merged-lora", None
    except Exception as exc:  # noqa: BLE001 (recorded; the unmerged form still gets measured)
        merge_error = error_text(exc)
    free_memory(device)
    return build_model(name, backend, device, precision, lora_rank=rank).eval(), "unmerged-lora", merge_error


def _decode_ms(model, short: torch.Tensor, new_tokens: int, graphs: bool) -> float:
    """Milliseconds per decode step (static KV cache, greedy), after the prefill of ``short``."""
    from slope.inference.decode import static_decode

    run = static_decode(model, short, new_tokens, cuda_graphs=graphs)
    return run.decode_s * 1e3 / max(new_tokens - 1, 1)


def _decode_figures(models: dict, short, args, graphs: bool) -> dict:
    for m in models.values():  # untimed: auto's choices, Triton autotuning, graph capture paths warmed
        _decode_ms(m, short, min(args.new_tokens, 4), graphs)
    times = {k: [] for k in models}
    for _ in range(args.decode_repeats):
        for k, m in models.items():
            times[k].append(_decode_ms(m, short, args.new_tokens, graphs))
    return {k: statistics.median(v) for k, v in times.items()}


def _weights(model, device, before: int) -> dict:
    counted = state_bytes(model)
    figures = {"weights_bytes": counted["weights"] + counted["operands"], "operand_bytes": counted["operands"],
               "weights_parts": weight_parts(model)}
    if device.type == "cuda":
        figures["allocated_bytes"] = _allocated(device) - before
    return figures


@torch.no_grad()
def measure_pair(models: dict, device, args, timing, vocab, sparse_is_merged: bool, progress=None) -> dict:
    """Prefill (per fold), decode (eager and, on CUDA, CUDA graphs) figures of ``{"dense": model,
    "sparse": model}``, their calls alternated (same clocks and machine load for both).
    ``progress(figures)`` (optional) receives the figures measured so far after each stage, so a
    run killed from outside keeps them."""
    prompt = random_tokens(vocab, args.batch, args.prompt, device)
    short = random_tokens(vocab, args.decode_batch, args.decode_prompt, device)
    figures = {k: {} for k in models}
    progress = progress or (lambda figures: None)
    _prefill_figures(models, figures, prompt, device, timing, sparse_is_merged)
    progress(figures)
    for k, ms in _decode_figures(models, short, args, graphs=False).items():
        figures[k]["decode_ms_per_token"] = round(ms, 4)
    progress(figures)
    if device.type == "cuda":
        _graph_figures(models, figures, short, args, sparse_is_merged, progress)
    for k, m in models.items():
        f = figures[k]
        f["prefill_tokens_per_s"] = round(args.batch * args.prompt / f["prefill_ms"] * 1e3, 1)
        f["decode_tokens_per_s"] = round(args.decode_batch / f["decode_ms_per_token"] * 1e3, 1)
        if "decode_ms_per_token_graphs" in f:
            f["decode_tokens_per_s_graphs"] = round(args.decode_batch / f["decode_ms_per_token_graphs"] * 1e3, 1)
        f["backends_used"] = backends_used(m)
    return figures


def _prefill_figures(models: dict, figures: dict, prompt, device, timing, sparse_is_merged: bool) -> None:
    """``prefill_ms`` of each model and, merged, ``prefill_ms_<fold>`` of the sparse one per fold."""
    from slope.lora import set_lora_fold

    for fold in (FOLDS if sparse_is_merged else ("auto",)):
        if sparse_is_merged:
            set_lora_fold(models["sparse"], fold)
        prefill = time_interleaved({k: (lambda m=m: m(input_ids=prompt, use_cache=False)) for k, m in models.items()},
                                   device, **timing)
        for k in models:
            if k == "sparse" or fold == "auto":
                figures[k][f"prefill_ms{'' if fold == 'auto' else '_' + fold}"] = prefill[k]["ms"]
    if sparse_is_merged:
        set_lora_fold(models["sparse"], "auto")


def _graph_figures(models: dict, figures: dict, short, args, sparse_is_merged: bool, progress) -> None:
    """Decode under CUDA graphs, both models, then (merged) the sparse one on the fused decode kernel."""
    try:
        graphs = _decode_figures(models, short, args, graphs=True)
    except Exception as exc:  # noqa: BLE001 (recorded; prefill and eager decode figures stand)
        figures["sparse"]["decode_graphs_error"] = error_text(exc)
        return
    for k, ms in graphs.items():
        figures[k]["decode_ms_per_token_graphs"] = round(ms, 4)
    progress(figures)
    if not sparse_is_merged:
        return
    from slope.lora import set_decode_kernel

    set_decode_kernel(models["sparse"], "fused")  # the one-launch Triton decode kernel
    try:
        fused = _decode_figures({"sparse": models["sparse"]}, short, args, graphs=True)["sparse"]
        figures["sparse"]["decode_ms_per_token_fused_graphs"] = round(fused, 4)
    except Exception as exc:  # noqa: BLE001 (recorded; the other figures stand)
        figures["sparse"]["decode_fused_error"] = error_text(exc)
    set_decode_kernel(models["sparse"], "gemm")


def _ratios(dense: dict, sparse: dict) -> dict:
    return {
        "prefill_speedup": ratio(dense.get("prefill_ms"), sparse.get("prefill_ms")),
        "prefill_stacked_speedup": ratio(dense.get("prefill_ms"), sparse.get("prefill_ms_stacked")),
        "prefill_extended_speedup": ratio(dense.get("prefill_ms"), sparse.get("prefill_ms_extended")),
        "decode_speedup": ratio(dense.get("decode_ms_per_token"), sparse.get("decode_ms_per_token")),
        "decode_graphs_speedup": ratio(dense.get("decode_ms_per_token_graphs"), sparse.get("decode_ms_per_token_graphs")),
        "decode_fused_graphs_speedup": ratio(dense.get("decode_ms_per_token_graphs"),
                                             sparse.get("decode_ms_per_token_fused_graphs")),
        "weights_memory_ratio": ratio(sparse["weights_bytes"], dense["weights_bytes"]),
    }


def _folds(model) -> dict:
    from slope import sparse_modules

    counts: dict[str, int] = {}
    for _, layer in sparse_modules(model):
        fold = getattr(layer, "fold", "unmerged")
        counts[fold] = counts.get(fold, 0) + 1
    return counts


def run_model(name, backends, device, env, budget, args, timing, emit) -> None:
    vocab = describe(name)["vocab"]
    config = {**describe(name), "batch": args.batch, "prompt": args.prompt, "decode_batch": args.decode_batch,
              "decode_prompt": args.decode_prompt, "new_tokens": args.new_tokens, "precision": args.precision,
              "lora_rank": args.lora_rank}
    before = _allocated(device)
    dense_model = build_model(name, "dense", device, args.precision).eval()
    with torch.no_grad():
        dense_model(input_ids=random_tokens(vocab, 1, 8, device))
    dense_weights = _weights(dense_model, device, before)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.precision]
    names, skipped = available_backends(backends, device, dtype)
    none = {key: None for key in _ratios({"prefill_ms": 1, "decode_ms_per_token": 1, "weights_bytes": 1},
                                         {"prefill_ms": 1, "decode_ms_per_token": 1, "weights_bytes": 1})}
    for n, why in skipped.items():
        emit(make_record(SCRIPT, env, config, None, None, backend=n, error=f"unavailable: {why}", **none))
    for backend in names:
        if budget.expired():
            emit(make_record(SCRIPT, env, config, None, None, backend=backend, error="skipped: budget", **none))
            continue
        published = []  # this backend's record, once emitted (later emits replace it)
        try:
            before = _allocated(device)
            model, form, merge_error = _build_sparse(name, backend, device, args.precision, args.lora_rank)
            with torch.no_grad():
                model(input_ids=random_tokens(vocab, 1, 8, device))  # operands built (and weights shared)
            sparse_weights = {**_weights(model, device, before), "folds": _folds(model)}

            def publish(figures: dict, done: bool) -> None:
                dense, sparse = {**figures["dense"], **dense_weights}, {**figures["sparse"], **sparse_weights}
                record = make_record(SCRIPT, env, config, dense, sparse, backend=backend, sparse_form=form,
                                     merge_error=merge_error, error=None, **_ratios(dense, sparse))
                if not done:  # rewritten as each stage ends; stays so if the run is killed before the last
                    record["incomplete"] = "measurement stopped before every figure (the run was killed)"
                emit(record, replace_last=bool(published))
                published.append(True)

            figures = ({"dense": {}, "sparse": {"backends_used": backends_used(model)}} if args.memory_only else
                       measure_pair({"dense": dense_model, "sparse": model}, device, args, timing, vocab,
                                    form == "merged-lora", progress=lambda f: publish(f, done=False)))
            del model
            publish(figures, done=True)
        except Exception as exc:  # noqa: BLE001 (recorded; the next backend still runs)
            if published:  # the figures measured before it stay in the record
                kept = {k: v for k, v in emit.records[-1].items() if k != "incomplete"}
                emit({**kept, "error": error_text(exc)}, replace_last=True)
            else:
                emit(make_record(SCRIPT, env, config, None, None, backend=backend, error=error_text(exc), **none))
        free_memory(device)


def main(argv=None) -> list[dict]:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--backends", default=None, help="comma list (default: GPU backends on CUDA, simulated+reference on CPU)")
    parser.add_argument("--models", default=None)
    parser.add_argument("--batch", type=int, default=None, help="prefill batch")
    parser.add_argument("--prompt", type=int, default=None, help="prefill length")
    parser.add_argument("--decode-batch", type=int, default=None)
    parser.add_argument("--decode-prompt", type=int, default=None)
    parser.add_argument("--new-tokens", type=int, default=None)
    parser.add_argument("--decode-repeats", type=int, default=None, help="timed decodes per model (default: 5 on GPU, 2 on CPU)")
    parser.add_argument("--lora-rank", type=int, default=None)
    parser.add_argument("--precision", default=None, choices=("bf16", "fp16", "fp32"))
    parser.add_argument("--memory-only", action="store_true",
                        help="count the weights memory only (no prefill or decode timing): Llama-1B on a CPU in minutes")
    args = parser.parse_args(argv)
    device = pick_device(args)
    backends = args.backends.split(",") if args.backends else default_backends(device)
    if args.decode_repeats is None:
        args.decode_repeats = 5 if device.type == "cuda" else 2
    if args.smoke:
        defaults = ("llama-smoke", 2, 32, 2, 4, 2, 8, "fp32")
        timing = {"warmup": 1, "reps": 1}
        args.decode_repeats = 1
    elif device.type == "cpu":
        defaults = ("llama-cpu-20m", 4, 128, 4, 32, 16, 16, "fp32")
        timing = {"warmup": 1, "reps": 5}
    else:
        defaults = ("llama-1b,llama2-7b-4L", 8, 1024, 8, 128, 32, 64, "bf16")
        timing = {"warmup": 3, "reps": 10}
    names = ("models", "batch", "prompt", "decode_batch", "decode_prompt", "new_tokens", "lora_rank", "precision")
    for key, value in zip(names, defaults):
        if getattr(args, key) is None:
            setattr(args, key, value)
    env, budget = environment(device), Budget(args.budget_s)
    models = args.models.split(",")
    emit = Recorder(SCRIPT, args.out_dir, device, vars(args))
    skipped = 0
    for name in models:
        if budget.expired():
            skipped += 1
            continue
        try:
            run_model(name, backends, device, env, budget, args, timing, emit)
        except Exception as exc:  # noqa: BLE001 (the dense baseline failed, e.g. out of memory)
            emit(make_record(SCRIPT, env, describe(name), None, None, backend="dense", prefill_speedup=None,
                               decode_speedup=None, error=error_text(exc)))
        free_memory(device)
    if skipped:
        print(f"[inference] budget reached: {skipped} of {len(models)} models not measured")
    return emit.finish(models_not_measured=skipped)


if __name__ == "__main__":
    main()
