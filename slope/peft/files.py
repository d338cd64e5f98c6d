"""Reading the tensors of a saved delta folder with one-line errors that name the file."""
from __future__ import annotations

import os

import torch

__all__ = ["read_tensors", "tensor_at"]


def read_tensors(path: str | os.PathLike, remedy: str) -> dict[str, torch.Tensor]:
    """The tensors of the safetensors file ``path`` (on the CPU).

    A missing file is ``FileNotFoundError``, an unreadable one (truncated, not safetensors)
    ``ValueError``; both name ``path`` and end with ``remedy`` (what to do)."""
    from safetensors.torch import load_file

    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: {remedy}")
    try:
        return load_file(path)
    except Exception as e:  # safetensors raises its own SafetensorError (and OSError, ValueError)
        raise ValueError(f"{path} is not a readable safetensors file ({e}); {remedy}") from e


def tensor_at(tensors: dict[str, torch.Tensor], key: str, path, remedy: str, integer: bool = False) -> torch.Tensor:
    """``tensors[key]``, or ``ValueError`` naming ``path`` when it is missing (or, with
    ``integer``, when it is not an integer tensor: indices must not be rounded floats)."""
    if key not in tensors:
        raise ValueError(f"{path} lacks the tensor {key!r} (corrupt or incomplete file); {remedy}")
    tensor = tensors[key]
    if integer and (tensor.dtype.is_floating_point or tensor.dtype.is_complex or tensor.dtype == torch.bool):
        raise ValueError(f"{path}: {key} holds {tensor.dtype} values, not integer indices (corrupt file); {remedy}")
    return tensor
