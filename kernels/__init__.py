"""Kernel entry points of slope (installed as ``slope.kernels``).

The functions here are the pure-PyTorch references (see :mod:`slope.kernels.reference`); they run
on every device and are the oracles the GPU kernels are tested against.
"""
from .reference import (
    COMPRESSIBLE_DTYPES,
    addmm,
    compress_2to4,
    cutlass_layout_supported,
    decompress_2to4,
    matvec_add,
    metadata_dtype,
    prune_2to4,
)

__all__ = [
    "COMPRESSIBLE_DTYPES",
    "addmm",
    "compress_2to4",
    "cutlass_layout_supported",
    "decompress_2to4",
    "matvec_add",
    "metadata_dtype",
    "prune_2to4",
]
