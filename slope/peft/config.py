"""``SftConfig``: the settings of sparse fine-tuning (PEFT-SFT's names), saved beside the deltas."""
from __future__ import annotations

import enum
import json
import os
from dataclasses import asdict, dataclass, field, fields

__all__ = ["CONFIG_NAME", "SftConfig", "TaskType", "WEIGHTS_NAME", "get_peft_config"]

CONFIG_NAME = "adapter_config.json"  # PEFT's file names, so the folder looks like any adapter
WEIGHTS_NAME = "adapter_model.safetensors"
SELECTION_ALGORITHMS = ("rigl", "sm3")


class TaskType(str, enum.Enum):
    """PEFT's task types (same values as ``peft.TaskType``, which is accepted too)."""

    SEQ_CLS = "SEQ_CLS"
    SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"
    CAUSAL_LM = "CAUSAL_LM"
    TOKEN_CLS = "TOKEN_CLS"
    QUESTION_ANS = "QUESTION_ANS"
    FEATURE_EXTRACTION = "FEATURE_EXTRACTION"


TASK_TYPES = tuple(t.value for t in TaskType)
# The task heads PEFT trains and saves besides the adapter (its PeftModelFor<Task> classes).
TASK_HEADS = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score"), "QUESTION_ANS": ("qa_outputs",)}


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class SftConfig:
    """Sparse fine-tuning of a frozen model (SpIEL, Ansell et al. 2024).

    - ``density`` / ``num_tunable_weights``: the number of trainable delta entries, as a fraction of
      all the model's parameters / as a number (it wins when given). They are shared among the
      target weights in proportion to their sizes, and each weight keeps its count for the run.
    - ``target_modules``: ``nn.Linear`` / ``Conv1D`` modules to tune: a list of names (a module
      matches when its qualified name equals an entry or ends with ``"." + entry``) or one regular
      expression (full match), as in PEFT.
    - ``selection_algorithm``: ``"rigl"`` (accumulated gradients, SpIEL-AG; optimizer
      :class:`slope.peft.SftAdamW`) or ``"sm3"`` (moment approximation, SpIEL-MA; :class:`SftSM3`).
    - ``reselection_steps``: optimizer steps between reselections; ``selection_accumulation_steps``:
      ``rigl`` accumulates candidate gradients over this many steps before each reselection (and
      picks the initial indices after the first that many steps); ``initial_reselection_rate``:
      the fraction of each delta reselected at the start, decaying linearly to 0 at the end.
    - ``seed``: the initial (random) indices, identical on every rank.
    - ``modules_to_save``: modules trained densely (all their parameters) and saved with the deltas,
      matched like a ``target_modules`` list (PEFT's name). ``task_type`` ``SEQ_CLS`` / ``TOKEN_CLS``
      add the task heads ``classifier`` and ``score``, ``QUESTION_ANS`` adds ``qa_outputs``, as PEFT
      does (a head the model lacks is skipped).
    """

    task_type: str | None = None
    inference_mode: bool = False
    density: float = 0.01
    num_tunable_weights: int | None = None
    selection_algorithm: str = "rigl"
    target_modules: list[str] | str | None = None
    reselection_steps: int = 20
    selection_accumulation_steps: int = 5
    initial_reselection_rate: float = 0.2
    seed: int = 0
    modules_to_save: list[str] | None = None
    peft_type: str = field(default="SFT", init=False)

    def __post_init__(self):
        if isinstance(self.task_type, enum.Enum):
            self.task_type = self.task_type.value
        if isinstance(self.target_modules, (tuple, set)):
            self.target_modules = sorted(self.target_modules) if isinstance(self.target_modules, set) else list(self.target_modules)
        if isinstance(self.modules_to_save, (tuple, set)):
            self.modules_to_save = sorted(self.modules_to_save) if isinstance(self.modules_to_save, set) else list(self.modules_to_save)
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad setting."""
        if self.task_type is not None and self.task_type not in TASK_TYPES:
            raise ValueError(f"task_type must be one of {TASK_TYPES} (or None), got {self.task_type!r}")
        if self.num_tunable_weights is None:
            if not isinstance(self.density, (int, float)) or not 0.0 < float(self.density) <= 1.0:
                raise ValueError(f"density must be in (0, 1] (the fraction of weights to tune), got {self.density!r}")
        elif not _is_int(self.num_tunable_weights) or self.num_tunable_weights <= 0:
            raise ValueError(f"num_tunable_weights must be a positive whole number of weights, got {self.num_tunable_weights!r}")
        if self.selection_algorithm not in SELECTION_ALGORITHMS:
            raise ValueError(f"selection_algorithm must be one of {SELECTION_ALGORITHMS}, got {self.selection_algorithm!r}")
        if not self.target_modules:
            raise ValueError("target_modules must name the linear modules to tune, e.g. ['q_proj', 'v_proj'] (or a regex)")
        if self.modules_to_save is not None and (isinstance(self.modules_to_save, str)
                                                 or not all(isinstance(m, str) and m for m in self.modules_to_save)):
            raise ValueError(f"modules_to_save must be a list of module names, e.g. ['classifier'], got {self.modules_to_save!r}")
        if not _is_int(self.reselection_steps) or self.reselection_steps <= 0:
            raise ValueError(f"reselection_steps must be a positive number of steps, got {self.reselection_steps!r}")
        if self.selection_algorithm == "rigl" and not (
                _is_int(self.selection_accumulation_steps) and 0 < self.selection_accumulation_steps <= self.reselection_steps):
            raise ValueError(
                f"selection_accumulation_steps (default 5) must be in [1, reselection_steps={self.reselection_steps}], "
                f"got {self.selection_accumulation_steps!r}; set it to at most {self.reselection_steps}"
            )
        if not 0.0 <= float(self.initial_reselection_rate) <= 1.0:
            raise ValueError(f"initial_reselection_rate must be in [0, 1], got {self.initial_reselection_rate!r}")

    def all_modules_to_save(self) -> list[str]:
        """``modules_to_save`` plus the heads that ``task_type`` trains (PEFT's defaults)."""
        names = list(self.modules_to_save or [])
        return names + [m for m in TASK_HEADS.get(self.task_type, ()) if m not in names]

    def to_dict(self) -> dict:
        return asdict(self)

    def save_pretrained(self, directory: str | os.PathLike, extra: dict | None = None) -> None:
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, CONFIG_NAME), "w") as f:
            json.dump({**self.to_dict(), **(extra or {})}, f, indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, values: dict) -> "SftConfig":
        names = {f.name for f in fields(cls) if f.init}
        if values.get("peft_type", "SFT") != "SFT":
            raise ValueError(f"this adapter config is for PEFT method {values.get('peft_type')!r}, not sparse fine-tuning (SFT)")
        return cls(**{k: v for k, v in values.items() if k in names})


def get_peft_config(config_dict: dict) -> SftConfig:
    """PEFT's ``get_peft_config``: the :class:`SftConfig` that ``config_dict`` describes
    (``peft_type`` ``"SFT"`` or absent). Unlike :meth:`SftConfig.from_dict`, which reads saved
    folders, an unknown key is an error here: it is the user's own dict, and a misspelt setting
    must not be dropped silently."""
    values = dict(config_dict)
    kind = values.pop("peft_type", "SFT")
    kind = getattr(kind, "value", kind)
    if str(kind).upper() != "SFT":
        raise ValueError(f"peft_type {kind!r}: slope.peft builds sparse fine-tuning configs (peft_type 'SFT'); "
                         f"for {kind} use peft's own get_peft_config")
    names = sorted(f.name for f in fields(SftConfig) if f.init)
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ValueError(f"unknown SftConfig key(s) {unknown}; valid keys: {', '.join(names)}")
    return SftConfig(**values)
