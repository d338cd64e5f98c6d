"""Inference throughput of Llama-style models: prefill and decode tokens/s, dense vs sparse.

The sparse model is pruned with adapters (``lora_rank``) and, where ``slope.lora.merge_lora``
exists, merged (``prune_model(add_lora=True, merge_lora=True)``: one 2:4 GEMM for ``[W; A]`` then
the fused add-mm); otherwise it runs unmerged. Each record says which in ``sparse_form`` (and the
merge error, if merging failed).

- prefill: a no-grad forward over ``batch × prompt`` tokens (median of timed calls);
- decode: after a prefill of ``decode_prompt`` tokens, ``new_tokens`` greedy steps with the KV
  cache, timed from the first to the last step (median over ``decode_repeats``, 5 on GPU, after
  one untimed decode of each model: every choice of ``auto`` and every Triton autotuning for the
  decode shapes happens there, never in the timed region).

Dense and sparse models are kept side by side and their calls alternate (same clocks and machine
load for both).

Ratios: ``prefill_speedup``, ``decode_speedup`` (dense time / sparse time).

    python performance_experiments/inference.py --budget-s 60
    python performance_experiments/inference.py --smoke
"""
from __future__ import annotations

import statistics
import sys
import time
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
    synchronize,
    time_interleaved,
)
from performance_experiments.models import build_model, describe, random_tokens

SCRIPT = "inference"


def _build_sparse(name, backend, device, precision, rank):
    """``(model, form, merge_error)``: merged sparse+LoRA when possible, else unmerged."""
    try:
        import slope.lora  # noqa: F401 (merged inference lands there)

        return build_model(name, backend, device, precision, lora_rank=rank, merge_lora=True), "merged-lora", None
    except Exception as exc:  # noqa: BLE001 (recorded; the unmerged form still gets measured)
        merge_error = error_text(exc)
    free_memory(device)
    return build_model(name, backend, device, precision, lora_rank=rank), "unmerged-lora", merge_error


def _decode_ms(model, short: torch.Tensor, new_tokens: int, device) -> float:
    """Milliseconds of ``new_tokens`` greedy steps with the KV cache, after an untimed prefill."""
    out = model(input_ids=short, use_cache=True)
    cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(new_tokens):
        out = model(input_ids=token, past_key_values=cache, use_cache=True)
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    synchronize(device)
    return (time.perf_counter() - t0) * 1e3


@torch.no_grad()
def measure_pair(models: dict, device, args, timing, vocab) -> dict:
    """Prefill and decode figures of ``{"dense": model, "sparse": model}``, their calls alternated
    (same clocks and machine load for both)."""
    prompt = random_tokens(vocab, args.batch, args.prompt, device)
    short = random_tokens(vocab, args.decode_batch, args.decode_prompt, device)
    prefill = time_interleaved({k: (lambda m=m: m(input_ids=prompt, use_cache=False)) for k, m in models.items()},
                               device, **timing)
    for m in models.values():  # untimed: auto's choices and Triton autotuning for these shapes happen here
        _decode_ms(m, short, args.new_tokens, device)
    decode = {k: [] for k in models}
    for _ in range(args.decode_repeats):
        for k, m in models.items():
            decode[k].append(_decode_ms(m, short, args.new_tokens, device))
    figures = {}
    for k, m in models.items():
        decode_ms = statistics.median(decode[k])
        figures[k] = {
            "prefill_ms": prefill[k]["ms"],
            "prefill_tokens_per_s": round(args.batch * args.prompt / prefill[k]["ms"] * 1e3, 1),
            "decode_ms_per_token": round(decode_ms / args.new_tokens, 4),
            "decode_tokens_per_s": round(args.decode_batch * args.new_tokens / decode_ms * 1e3, 1),
            "backends_used": backends_used(m),
        }
    return figures


def run_model(name, backends, device, env, budget, args, timing, emit) -> None:
    vocab = describe(name)["vocab"]
    config = {**describe(name), "batch": args.batch, "prompt": args.prompt, "decode_batch": args.decode_batch,
              "decode_prompt": args.decode_prompt, "new_tokens": args.new_tokens, "precision": args.precision,
              "lora_rank": args.lora_rank}
    dense_model = build_model(name, "dense", device, args.precision).eval()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.precision]
    names, skipped = available_backends(backends, device, dtype)
    none = {"prefill_speedup": None, "decode_speedup": None}
    for n, why in skipped.items():
        emit(make_record(SCRIPT, env, config, None, None, backend=n, error=f"unavailable: {why}", **none))
    for backend in names:
        if budget.expired():
            emit(make_record(SCRIPT, env, config, None, None, backend=backend, error="skipped: budget", **none))
            continue
        try:
            model, form, merge_error = _build_sparse(name, backend, device, args.precision, args.lora_rank)
            figures = measure_pair({"dense": dense_model, "sparse": model.eval()}, device, args, timing, vocab)
            del model
            dense, sparse = figures["dense"], figures["sparse"]
            emit(make_record(
                SCRIPT, env, config, dense, sparse, backend=backend, sparse_form=form, merge_error=merge_error,
                prefill_speedup=ratio(dense["prefill_ms"], sparse["prefill_ms"]),
                decode_speedup=ratio(dense["decode_ms_per_token"], sparse["decode_ms_per_token"]),
                error=None,
            ))
        except Exception as exc:  # noqa: BLE001 (recorded; the next backend still runs)
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
        defaults = ("llama-1b,llama2-7b-4L", 4, 2048, 8, 128, 32, 32, "bf16")
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
