"""Output distillation from a teacher: the comparisons and the capture of the targets' outputs.

Comparisons of a student output ``f_s`` with the teacher's ``f_t`` (same shape, any float dtype;
computed in fp32; ``mask (b, L)`` bool, when given, keeps the positions of outputs shaped
``(b, L, ...)``):

- :func:`square_head` — ``MSE(f_s, f_t) / MSE(f_t, 0)``: the squared error normalised by the
  teacher output's mean square, so every target weighs alike whatever its scale (SquareHead,
  Kurtic et al. 2023, "Sparse Fine-tuning for Inference Acceleration of Large Language Models");
- :func:`kl_divergence` — ``KL(softmax f_t ‖ softmax f_s)`` over the last dimension, averaged over
  positions (logit distillation when the target is the vocabulary projection);
- :func:`mse` — ``MSE(f_s, f_t)``.

:class:`Distiller` hooks the named modules of student and teacher. The teacher runs in eval mode
under ``torch.no_grad()``; its hooks keep only the targets' outputs (detached), and its forward
stops as soon as the last target has produced its output (a teacher whose targets end before the
vocabulary projection never computes its logits). The student's outputs are captured only during
its training forward (not during activation-checkpointing recomputation). Both are dropped right
after the loss: ``loss = orig_scale · task + distill_scale · mean over targets``.

A teacher sharded by FSDP2 runs its whole forward (every rank must meet every unit's collectives);
when no target needs its logits it is asked for none (``logits_to_keep`` of no position), so its
vocabulary projection still costs neither the logits' memory nor their matmul.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from slope.pruning.layers import matching_modules
from slope.recovery.modifiers import OutputDistillationModifier

__all__ = ["COMPARISON_FUNCTIONS", "Distiller", "DistillationError", "OutputCapture", "check_teacher", "kl_divergence", "mse",
           "square_head"]


class DistillationError(ValueError):
    """A teacher or targets that cannot be compared with the student; the message says what to change."""


def _positions(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    x = x.float()
    if mask is not None and x.dim() >= 2 and tuple(x.shape[:2]) == tuple(mask.shape):
        return x[mask.to(device=x.device, dtype=torch.bool)]
    return x


def square_head(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``MSE(f_s, f_t) / MSE(f_t, 0)`` over every entry (of the positions ``mask`` keeps); fp32 scalar."""
    s, t = _positions(student, mask), _positions(teacher, mask)
    return (s - t).pow(2).mean() / t.pow(2).mean().clamp_min(1e-30)


def kl_divergence(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``Σ_k p_t,k (log p_t,k − log p_s,k)`` over the last dimension (softmax of each), averaged over
    the other positions (those ``mask`` keeps); fp32 scalar."""
    s, t = _positions(student, mask), _positions(teacher, mask)
    log_s, log_t = F.log_softmax(s, dim=-1), F.log_softmax(t, dim=-1)
    return (log_t.exp() * (log_t - log_s)).sum(-1).mean()


def mse(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error over every entry (of the positions ``mask`` keeps); fp32 scalar."""
    return (_positions(student, mask) - _positions(teacher, mask)).pow(2).mean()


#: ``comparison`` name → function ``(student, teacher, mask) -> scalar``.
COMPARISON_FUNCTIONS = {"square_head": square_head, "kl": kl_divergence, "mse": mse}


def _first_tensor(output, name: str) -> torch.Tensor:
    """The compared tensor of a module output: the tensor itself, else the first tensor of a tuple or
    ``ModelOutput`` (hidden states of a decoder layer, ``last_hidden_state``, ``logits``)."""
    if torch.is_tensor(output):
        return output
    values = output.values() if isinstance(output, dict) else output if isinstance(output, (tuple, list)) else ()
    for value in values:
        if torch.is_tensor(value):
            return value
    raise DistillationError(f"distillation target {name!r} returns {type(output).__name__}, which holds no tensor to compare")


class _AllCaptured(Exception):
    """Raised by the teacher's last hook: the rest of its forward is not needed."""


class OutputCapture:
    """Forward hooks keeping the outputs of ``names`` (modules of ``model``) while :meth:`capture` is open.

    ``detach``: keep them detached (the teacher); ``stop``: end the forward once every target has
    produced its output. A module called twice in one forward keeps its first output.
    """

    def __init__(self, model: nn.Module, names: list[str], *, detach: bool = False, stop: bool = False):
        self.names, self.detach, self.stop = list(names), detach, stop
        self.outputs: dict[str, torch.Tensor] = {}
        self.active = False
        modules = dict(model.named_modules())
        self._handles = [modules[n].register_forward_hook(functools.partial(self._hook, n)) for n in self.names]

    def _hook(self, name, module, args, output):  # noqa: ARG002
        if not self.active or name in self.outputs:
            return
        tensor = _first_tensor(output, name)
        self.outputs[name] = tensor.detach() if self.detach else tensor
        if self.stop and len(self.outputs) == len(self.names):
            raise _AllCaptured

    @contextlib.contextmanager
    def capture(self) -> Iterator[dict[str, torch.Tensor]]:
        """Collect the outputs of one forward into the yielded dict (emptied when entered)."""
        self.outputs = {}
        self.active = True
        try:
            yield self.outputs
        finally:
            self.active = False

    def nbytes(self) -> int:
        """Bytes held by the captured outputs."""
        return sum(t.numel() * t.element_size() for t in self.outputs.values())

    def clear(self) -> None:
        self.outputs = {}

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def _skip_logits(model: nn.Module, names: list[str]) -> bool:
    """Whether ``model``'s forward can be asked for no logits: it takes ``logits_to_keep`` (transformers'
    causal LMs) and no target is, or holds, its vocabulary projection."""
    if "logits_to_keep" not in inspect.signature(model.forward).parameters or not hasattr(model, "get_output_embeddings"):
        return False
    head = model.get_output_embeddings()
    head_name = next((n for n, m in model.named_modules() if m is head), None)
    if head_name is None:
        return False
    return not any(n == "" or head_name == n or head_name.startswith(n + ".") for n in names)


def _config(model: nn.Module, key: str):
    return getattr(getattr(model, "config", None), key, None)


def check_teacher(student: nn.Module, teacher: nn.Module, names: list[str]) -> None:
    """Clear errors for a teacher of another architecture or vocabulary, or lacking a target module."""
    if not isinstance(teacher, nn.Module):
        raise DistillationError(f"distill_teacher must be a model or a model folder, got {type(teacher).__name__}")
    kinds = _config(student, "model_type"), _config(teacher, "model_type")
    if None not in kinds and kinds[0] != kinds[1]:
        raise DistillationError(f"the teacher is a {kinds[1]} model and the student a {kinds[0]} model; distil from a teacher "
                                "of the student's architecture (e.g. the dense model it was pruned from)")
    vocab = []
    for model in (student, teacher):
        embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        vocab.append(getattr(embed, "num_embeddings", None) or _config(model, "vocab_size"))
    if None not in vocab and vocab[0] != vocab[1]:
        raise DistillationError(f"the teacher's vocabulary has {vocab[1]} entries, the student's {vocab[0]}; the teacher must "
                                "share the student's tokenizer (distil from the dense model it was pruned from)")
    modules = dict(teacher.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        raise DistillationError(f"the teacher ({type(teacher).__name__}) has no module {missing[0]!r} (a distillation target "
                                f"of the student); distil from a teacher of the student's architecture")


class Distiller:
    """The distillation term of an :class:`OutputDistillationModifier` (module docstring).

    Args:
        student / teacher: the models (the teacher is put in eval mode with gradients off).
        modifier: the recipe's modifier (targets, comparison, scales, start).
        start_step: the first optimizer step that distils (``modifier.start`` epochs, in steps).
        stop_early: end the teacher's forward after its last target (``False`` for a teacher
            sharded by FSDP2: an interrupted forward would leave its layer's weights gathered).

    Raises :class:`DistillationError` (or a :class:`slope.pruning.RecipeError` for targets that
    name no module) when the teacher cannot be compared with the student.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, modifier: OutputDistillationModifier, start_step: int = 0,
                 stop_early: bool = True):
        self.student, self.modifier, self.start_step = student, modifier, int(start_step)
        self.names = matching_modules(student, modifier.targets, modifier.name)
        check_teacher(student, teacher, self.names)
        self.teacher = teacher.eval().requires_grad_(False)
        self.compare = COMPARISON_FUNCTIONS[modifier.comparison]
        self.student_capture = OutputCapture(student, self.names)
        self.teacher_capture = OutputCapture(teacher, self.names, detach=True, stop=stop_early)
        self.teacher_bytes = 0  # largest captured teacher output size so far (bytes)
        self.skip_logits = not stop_early and _skip_logits(teacher, self.names)

    def active(self, step: int) -> bool:
        return step >= self.start_step

    @torch.no_grad()
    def teacher_outputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The teacher's target outputs for ``input_ids (b, L)`` (detached; the forward stops after the last target
        unless ``stop_early=False``, which asks for no logits when no target needs them)."""
        kwargs = {} if attention_mask is None else {"attention_mask": attention_mask}
        if self.skip_logits:
            kwargs["logits_to_keep"] = torch.zeros(0, dtype=torch.long, device=input_ids.device)
        with self.teacher_capture.capture() as outputs:
            try:
                self.teacher(input_ids=input_ids, use_cache=False, **kwargs)
            except _AllCaptured:
                pass
        missing = [n for n in self.names if n not in outputs]
        if missing:
            raise DistillationError(f"the teacher's forward never ran target {missing[0]!r}; distil modules the forward uses")
        self.teacher_bytes = max(self.teacher_bytes, self.teacher_capture.nbytes())
        return outputs

    def loss(self, student_outputs: dict[str, torch.Tensor], teacher_outputs: dict[str, torch.Tensor],
             mask: torch.Tensor | None = None) -> torch.Tensor:
        """Mean over targets of the comparison (fp32 scalar); frees both captures."""
        terms = []
        for name in self.names:
            if name not in student_outputs:
                raise DistillationError(f"the student's forward never ran target {name!r}; distil modules the forward uses")
            s, t = student_outputs[name], teacher_outputs[name]
            if s.shape != t.shape:
                raise DistillationError(f"target {name!r}: the student's output is {tuple(s.shape)}, the teacher's "
                                        f"{tuple(t.shape)}; distil from a teacher of the student's architecture and widths")
            terms.append(self.compare(s, t, mask))
        self.student_capture.clear()
        self.teacher_capture.clear()
        return torch.stack(terms).mean()

    def combine(self, task: torch.Tensor, distill: torch.Tensor) -> torch.Tensor:
        """``orig_scale · task + distill_scale · distill``."""
        return self.modifier.orig_scale * task + self.modifier.distill_scale * distill

    def check(self, input_ids: torch.Tensor) -> None:
        """One forward of both models on ``input_ids`` (no gradients): every target's outputs must match in shape."""
        with torch.no_grad(), self.student_capture.capture() as outputs:
            self.student(input_ids=input_ids, use_cache=False)
        self.loss(outputs, self.teacher_outputs(input_ids))

    def remove(self) -> None:
        """Detach every hook."""
        self.student_capture.remove()
        self.teacher_capture.remove()
