"""``TrainConfig``: every setting of ``slope train`` (the CLI flags are its fields, ``-`` for ``_``).

Precedence: dataclass defaults < ``--config FILE`` (YAML or JSON with the same keys) < flags.
On ``--resume`` the checkpoint's config takes the place of the defaults.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from slope.masks import MASK_TYPES, parse_sparsity

__all__ = ["ConfigError", "TrainConfig", "load_config_file", "STRUCTURAL_KEYS"]

PRECISIONS = ("fp32", "bf16", "fp16")
#: ``--report-to``: where metrics go besides ``metrics.jsonl`` (:mod:`slope.reporting`).
REPORT_TO = ("none", "tensorboard", "wandb")
#: Keys that set the model's size; a ``model_config`` file sets them itself.
SIZE_KEYS = ("hidden_size", "intermediate_size", "num_layers", "num_heads")

#: Keys that define the model, its sparsity or the data (the seed fixes the data order): a
#: checkpoint only resumes with equal values, so that the resumed run is the run that stopped.
STRUCTURAL_KEYS = (
    "dataset", "text_field", "tokenizer", "seq_len", "model_config", "hidden_size", "intermediate_size", "num_layers",
    "num_heads", "dense", "sparsity", "compress", "backend", "lora_rank", "precision", "mask_type", "double_pruning",
    "seed",
)


#: Keys that may name a local file or folder (else: a built-in name, e.g. ``embedded``, ``qwen2``).
PATH_KEYS = ("dataset", "tokenizer", "model_config")


def absolute_if_local(value: str) -> str:
    """``value`` as an absolute path when it names an existing local file or folder (so that it
    names the same one from any working directory), else as given: a built-in name (the shipped
    corpus ``embedded``, a model type such as ``qwen2``) or a Hugging Face dataset name."""
    path = Path(value).expanduser()
    return str(path.resolve()) if value and value != "embedded" and path.exists() else value


class ConfigError(ValueError):
    """A bad setting; the message names the key, the value and what is allowed."""


@dataclass
class TrainConfig:
    """Settings of one training run (defaults: the ~3-minute CPU job on the embedded corpus)."""

    # outputs and control
    out: str = "runs/default"
    max_steps: int = 300  # defines the LR schedule and the lazy-LoRA start
    stop_after: int | None = None  # stop (and checkpoint) after this step, as if interrupted
    resume: bool = False
    seed: int = 0
    device: str = "auto"  # "auto": cuda if available, else cpu
    log_every: int = 10
    eval_every: int = 50
    eval_batches: int = 8
    save_every: int = 100  # periodic checkpoints (0: only at the end / at --stop-after)
    keep_checkpoints: int = 1  # complete checkpoints kept: checkpoint/ plus K-1 older checkpoint-stepN/
    nonfinite_patience: int = 25  # consecutive steps with a non-finite loss/gradients before the run stops
    report_to: str = "none"  # also log metrics to "tensorboard" (OUT/tensorboard) or "wandb" (offline by default)
    # data
    dataset: str = "embedded"  # "embedded", a .txt/.jsonl(.gz) file, or a Hugging Face dataset name
    text_field: str = "text"
    tokenizer: str = ""  # an HF tokenizer folder or a tokenizer.json file; "" = the shipped byte-level BPE
    seq_len: int = 128
    batch_size: int = 16
    grad_accum: int = 1
    # model (random init): a small Llama, or any HF causal LM (a config file/folder, or a model type
    # built with the sizes below); its vocabulary is the tokenizer's
    model_config: str = ""  # "" = Llama
    hidden_size: int = 128
    intermediate_size: int = 384
    num_layers: int = 4
    num_heads: int = 4
    # optimization
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_fraction: float = 0.05
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # joint norm of sparse and dense gradients (0: no clipping)
    precision: str = "fp32"  # fp32, bf16 (autocast) or fp16 (autocast + dynamic loss scaling)
    gradient_checkpointing: bool = False  # activation checkpointing of the model's layers: recomputed in the backward
    fp16_init_scale: float = 2.0**16
    fp16_growth_interval: int = 200
    fp16_min_scale: float = 1.0  # the loss scale never halves below this
    # sparsity (SLoPe)
    dense: bool = False  # dense baseline: no pruning, same loop
    sparsity: str = "2:4"
    compress: bool = True  # compressed 2:4 storage (reference backend on CPU); False simulates
    backend: str = "auto"
    mask_change_freq: int = 100
    lazy_lora_fraction: float = 0.01
    lora_rank: int = 8
    mask_type: str = "nm"  # "nm" or "transposable" (each MxM block N:M along both dimensions)
    double_pruning: bool = True  # False: exact backward dx = dy (W⊙M) (not 2:4 sparse: simulation only)
    dense_tail_fraction: float = 0.0  # last fraction of steps trained dense (W⊙M in nn.Linear), 0: never
    # distribution (torchrun: DDP by default; a DeepSpeed config: ZeRO-1/2)
    deepspeed: str = ""  # DeepSpeed config JSON; "" = off
    shard_sparse_optimizer: bool = False  # under DDP: each SLoPe layer's AdamW moments on one rank (DeepSpeed ZeRO: always)
    fsdp: bool = False  # under torchrun: shard with FSDP2 (dense weights row-wise, each SLoPe layer's values on one rank)

    # ------------------------------------------------------------------ helpers
    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    def to_dict(self) -> dict:
        return asdict(self)

    def updated(self, values: dict) -> "TrainConfig":
        """A copy with ``values`` applied (unknown keys are an error), validated."""
        unknown = sorted(set(values) - set(self.keys()))
        if unknown:
            raise ConfigError(f"unknown config key(s) {unknown}; valid keys: {', '.join(self.keys())}")
        merged = {**self.to_dict(), **values}
        cfg = TrainConfig(**merged)
        cfg.validate()
        return cfg

    @property
    def lora_start(self) -> int:
        """Adapters are attached after this step: ``ceil((1 - F) · max_steps)`` (``max_steps``: never)."""
        return math.ceil(round((1.0 - self.lazy_lora_fraction) * self.max_steps, 6))

    @property
    def dense_tail_start(self) -> int:
        """The SLoPe layers become dense after this step: ``ceil((1 - F) · max_steps)`` (``max_steps``: never)."""
        return math.ceil(round((1.0 - self.dense_tail_fraction) * self.max_steps, 6))

    @property
    def warmup_steps(self) -> int:
        return round(self.warmup_fraction * self.max_steps)

    def _check_engines(self, check) -> None:
        """The settings DeepSpeed (``--deepspeed``) and FSDP (``--fsdp``) cannot honour."""
        if self.deepspeed:
            check(Path(self.deepspeed).is_file(), "deepspeed", "no such file (a DeepSpeed config JSON)")
            check(self.precision != "fp16", "deepspeed", "DeepSpeed runs support fp32 and bf16, not fp16 (its loss scaler ignores the sparse gradients)")
            check(self.dense_tail_fraction == 0, "deepspeed", "the dense tail (--dense-tail-fraction) is not supported with DeepSpeed")
        if self.fsdp:
            check(not self.deepspeed, "fsdp", "FSDP (--fsdp, a resumed run's setting, or an accelerate FSDP config) and DeepSpeed "
                  "both shard the model: choose one (--no-fsdp, or --deepspeed '')")
            check(self.precision != "fp16", "fsdp", "FSDP runs support fp32 and bf16, not fp16 (the loss scaling does not cover "
                  "sharded gradients): use --precision bf16")
            check(self.dense_tail_fraction == 0, "fsdp", "the dense tail (--dense-tail-fraction) is not supported with FSDP: set it to 0")

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first bad value."""

        def check(ok: bool, key: str, allowed: str) -> None:
            if not ok:
                raise ConfigError(f"{key} = {getattr(self, key)!r} is invalid: {allowed}")

        types = {f.name: f.type for f in fields(self)}
        for key, value in self.to_dict().items():
            kind = types[key]
            if kind == "int" or kind == "int | None":
                check((value is None and kind != "int") or (isinstance(value, int) and not isinstance(value, bool)), key, "expected an integer")
            elif kind == "float":
                if isinstance(value, str):  # YAML reads 1e-3 (no dot) as a string
                    try:
                        value = float(value)
                    except ValueError:
                        pass
                check(isinstance(value, (int, float)) and not isinstance(value, bool), key, "expected a number")
                check(math.isfinite(value), key, "expected a finite number")
                setattr(self, key, float(value))
            elif kind == "bool":
                check(isinstance(value, bool), key, "expected true or false")
            elif kind == "str":
                check(isinstance(value, str), key, "expected a string")
        for key in ("max_steps", "log_every", "eval_every", "eval_batches", "seq_len", "batch_size", "grad_accum",
                    "num_layers", "num_heads", "mask_change_freq", "lora_rank", "fp16_growth_interval", "keep_checkpoints"):
            check(getattr(self, key) >= 1, key, "must be >= 1")
        check(self.nonfinite_patience >= 0, "nonfinite_patience", "must be >= 0 (0: stop at the first non-finite step)")
        check(self.save_every >= 0, "save_every", "must be >= 0 (0: save only at the end)")
        if self.stop_after is not None:
            check(1 <= self.stop_after <= self.max_steps, "stop_after", f"must be between 1 and max_steps ({self.max_steps})")
        check(0.0 <= self.lazy_lora_fraction <= 1.0, "lazy_lora_fraction", "must be in [0, 1]")
        check(0.0 <= self.dense_tail_fraction <= 1.0, "dense_tail_fraction", "must be in [0, 1]")
        check(not (self.dense and self.dense_tail_fraction > 0), "dense_tail_fraction", "applies to sparse runs; drop it or --dense")
        check(self.mask_type in MASK_TYPES, "mask_type", f"choose one of {', '.join(MASK_TYPES)}")
        check(0.0 <= self.warmup_fraction < 1.0, "warmup_fraction", "must be in [0, 1)")
        check(0.0 <= self.min_lr_ratio <= 1.0, "min_lr_ratio", "must be in [0, 1]")
        check(self.lr > 0, "lr", "must be > 0")
        check(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        check(0.0 <= self.beta1 < 1.0, "beta1", "must be in [0, 1)")
        check(0.0 <= self.beta2 < 1.0, "beta2", "must be in [0, 1)")
        check(self.grad_clip >= 0, "grad_clip", "must be >= 0 (0 disables clipping)")
        check(self.fp16_init_scale > 0, "fp16_init_scale", "must be > 0")
        check(self.fp16_min_scale > 0, "fp16_min_scale", "must be > 0")
        check(self.precision in PRECISIONS, "precision", f"choose one of {', '.join(PRECISIONS)}")
        check(self.report_to in REPORT_TO, "report_to", f"choose one of {', '.join(REPORT_TO)}")
        check(self.device == "auto" or self.device.split(":")[0] in ("cpu", "cuda"), "device", "use auto, cpu, cuda or cuda:N")
        try:
            n, m = parse_sparsity(self.sparsity)
        except ValueError as e:
            raise ConfigError(f"sparsity = {self.sparsity!r} is invalid: {e}") from None
        if not self.dense and self.compress and (n, m) != (2, 4):
            raise ConfigError(f"sparsity = {self.sparsity!r}: compressed storage is 2:4 only; add --no-compress to simulate {self.sparsity}")
        if not self.dense and self.compress and not self.double_pruning:
            raise ConfigError("double_pruning = False (an exact backward) is not 2:4 sparse, so it needs --no-compress (simulation)")
        if self.backend != "auto" and (self.dense or not self.compress):
            raise ConfigError(f"backend = {self.backend!r} applies to compressed storage; drop --backend or --no-compress/--dense")
        if self.backend != "auto":  # (compressed, not dense: checked above)
            from slope.prune import check_backend_runs_here

            try:
                check_backend_runs_here(self.backend)
            except ValueError as e:
                raise ConfigError(f"backend = {self.backend!r} is invalid here: {e}") from None
        self._check_engines(check)
        check(self.hidden_size % self.num_heads == 0, "hidden_size", f"must be divisible by num_heads ({self.num_heads})")
        for key in ("hidden_size", "intermediate_size"):
            size = getattr(self, key)
            check(size > 0, key, "must be > 0")
            if not self.dense and self.compress:
                check(size % 64 == 0, key, "must be a positive multiple of 64 (the compressed 2:4 layouts tile by 64; "
                      "--no-compress simulates any multiple of M, --dense takes any size)")
            elif not self.dense:
                check(size % m == 0, key, f"must be a multiple of {m} (the {self.sparsity} groups run along each layer's input)")


def load_config_file(path: str | Path) -> dict:
    """Read a YAML (``.yaml``/``.yml``) or JSON config file into a dict of TrainConfig keys."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config {path}: no such file")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as e:  # noqa: BLE001 (yaml and json raise different types)
        raise ConfigError(f"--config {path}: cannot parse ({e})") from e
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a mapping of keys to values, got {type(data).__name__}")
    data = {str(k).replace("-", "_"): v for k, v in data.items()}
    if isinstance(data.get("sparsity"), int):
        raise ConfigError(f"--config {path}: sparsity {data['sparsity']!r} is a number; quote it, e.g. sparsity: \"2:4\" "
                          "(YAML reads an unquoted 2:4 as the base-60 number 124)")
    unknown = sorted(set(data) - set(TrainConfig.keys()))
    if unknown:
        raise ConfigError(f"--config {path}: unknown key(s) {unknown}; valid keys: {', '.join(TrainConfig.keys())}")
    return data
