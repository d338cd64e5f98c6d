"""Every stage of a recipe in one run (seed 002's prune → recover flow as one command): ``slope apply``.

::

    from slope import apply
    apply("llama-dense", "recipe.yaml", "embedded", output_dir="out", distill_teacher="llama-dense", max_steps=200)

- :func:`apply` (:mod:`slope.stages.runner`): oneshot stages with :func:`slope.oneshot`, train stages
  with :func:`slope.finetune`, in the recipe's order, each on the model the previous one wrote;
- :mod:`slope.stages.record`: ``apply.json``, the settings and finished stages that let a second
  call continue an interrupted run;
- :mod:`slope.stages.cli`: the ``slope apply`` command.
"""
from slope.stages.record import RECORD_NAME, StageRecord
from slope.stages.runner import apply, format_stages

__all__ = ["RECORD_NAME", "StageRecord", "apply", "format_stages"]
