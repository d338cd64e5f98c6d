"""Pruned models as Hugging Face folders: the dense form of their state dicts, the ``save_pretrained``
that writes it, the kind of a model folder (for error advice), and ``slope export``.

- :mod:`slope.serialization.dense_form`: ``W⊙M`` under the ordinary ``weight`` keys, slope's masks beside them.
- :mod:`slope.serialization.hf_save`: ``model.save_pretrained`` of a pruned model (installed by ``prune_model``).
- :mod:`slope.serialization.folders`: which kind of folder a path is, and how to load it.
- :mod:`slope.serialization.export`: ``slope export`` (a ``slope train`` checkpoint → a Hugging Face folder).

``slope.save_pretrained`` / ``slope.from_pretrained`` (:mod:`slope.io`) are the public entry points.
"""
