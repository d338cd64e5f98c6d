"""``cusparselt`` and ``cutlass``: PyTorch's semi-structured sparse tensors as backends.

Both wrap ``torch.sparse.SparseSemiStructuredTensorCUSPARSELT`` / ``...CUTLASS`` and multiply with
``F.linear(x, W_sparse)`` (PyTorch's documented path; it pads the *dense* operand itself).

- **Minimum shapes.** PyTorch needs the sparse operand's rows and cols to be multiples of a
  per-dtype minimum (cuSPARSELt fp16/bf16: 16×16; CUTLASS fp16/bf16: 32×64). The operand is
  zero-padded up to those multiples (padding rows/cols are pruned-away zeros, so still 2:4); the
  input gets matching zero columns and the result is sliced back to ``rows``.
- **cutlass** builds its tensor straight from :func:`slope.kernels.compress_2to4` (our values +
  metadata are bit-identical to PyTorch's CUTLASS layout), without PyTorch's converter; for
  unpadded shapes a layer's kept values *are* its packed values (``operand_from_values``).
  PyTorch builds its CUTLASS 2:4 kernels for sm8x only, so this backend is unavailable elsewhere.
- **cusparselt** compresses with ``torch._cslt_compress`` (via ``from_dense``) and uses the
  default ``alg_id`` 0 (some searched ids gave wrong results, pytorch#155333). cuSPARSELt
  handles must not cross threads (pytorch#113776: autograd runs backward on another thread);
  PyTorch keeps its handle thread-local since pytorch#114273, and this backend holds no handle or
  other cuSPARSELt state of its own — the operand is plain tensor data, safe on any thread.

Neither prunes: operands must already be 2:4 (``to_sparse_semi_structured`` silently gives
garbage otherwise); :class:`slope.layer.SparseLinear` only hands over masked operands.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from slope.kernels import compress_2to4, pattern_2to4

from . import register_backend
from .base import SparseBackend

# Used when PyTorch does not expose its per-dtype constraints (private attribute).
_FALLBACK_MIN_SHAPE = (32, 64)


@dataclass
class SemiStructuredOperand:
    """A padded PyTorch semi-structured tensor for an operand of ``rows × cols``."""

    sparse: torch.Tensor  # SparseSemiStructuredTensor (rows + pad_rows, cols + pad_cols)
    rows: int
    cols: int
    pad_cols: int


class _SemiStructuredBackend(SparseBackend):
    """Shared padding / matmul logic; subclasses name the PyTorch class and build the tensor."""

    dtypes = (torch.float16, torch.bfloat16)
    torch_class_name: ClassVar[str] = ""

    @classmethod
    def _torch_class(cls):
        return getattr(torch.sparse, cls.torch_class_name)

    @classmethod
    def _capability_reason(cls, capability: tuple[int, int]) -> str | None:
        raise NotImplementedError

    @classmethod
    def unavailable_reason(cls, device: torch.device, dtype: torch.dtype) -> str | None:
        reason = super().unavailable_reason(device, dtype)
        if reason is not None:
            return reason
        if device.type != "cuda" or not torch.cuda.is_available():
            return f"backend {cls.name!r} needs a CUDA device, got {device}"
        if getattr(torch.sparse, cls.torch_class_name, None) is None:
            return f"this PyTorch ({torch.__version__}) has no torch.sparse.{cls.torch_class_name}"
        return cls._capability_reason(torch.cuda.get_device_capability(device))

    @classmethod
    def min_shape(cls, dtype: torch.dtype) -> tuple[int, int]:
        """(row multiple, col multiple) PyTorch requires of the sparse operand in ``dtype``."""
        constraints = getattr(cls._torch_class(), "_DTYPE_SHAPE_CONSTRAINTS", {}).get(dtype)
        if constraints is None:
            return _FALLBACK_MIN_SHAPE
        return constraints.sparse_min_rows, constraints.sparse_min_cols

    def _build(self, padded: torch.Tensor, padded_mask: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def make_operand(self, dense: torch.Tensor, mask: torch.Tensor) -> SemiStructuredOperand:
        rows, cols = dense.shape
        row_mult, col_mult = self.min_shape(dense.dtype)
        pad_rows, pad_cols = -rows % row_mult, -cols % col_mult
        if pad_rows or pad_cols:
            padded = dense.new_zeros(rows + pad_rows, cols + pad_cols)
            padded[:rows, :cols] = dense
            padded_mask = mask.new_zeros(rows + pad_rows, cols + pad_cols)
            padded_mask[:rows, :cols] = mask
        else:
            padded, padded_mask = dense.contiguous(), mask.contiguous()
        return SemiStructuredOperand(self._build(padded, padded_mask), rows, cols, pad_cols)

    def matmul(self, x: torch.Tensor, operand: SemiStructuredOperand) -> torch.Tensor:
        x2 = x.reshape(-1, operand.cols)
        if operand.pad_cols:
            x2 = F.pad(x2, (0, operand.pad_cols))
        y = F.linear(x2.contiguous(), operand.sparse)
        if y.shape[-1] != operand.rows:
            y = y[:, : operand.rows]
        return y.reshape(*x.shape[:-1], operand.rows)


@register_backend
class CuSparseLtBackend(_SemiStructuredBackend):
    """PyTorch's cuSPARSELt 2:4 GEMM (Ampere and Hopper)."""

    name = "cusparselt"
    torch_class_name = "SparseSemiStructuredTensorCUSPARSELT"

    @classmethod
    def _capability_reason(cls, capability: tuple[int, int]) -> str | None:
        backend = getattr(torch.backends, "cusparselt", None)
        if backend is None or not backend.is_available():
            return "backend 'cusparselt' needs PyTorch built with cuSPARSELt (torch.backends.cusparselt.is_available() is False)"
        if capability < (8, 0):
            return f"backend 'cusparselt' needs compute capability >= 8.0 (sparse tensor cores), got {capability}"
        return None

    def _build(self, padded: torch.Tensor, padded_mask: torch.Tensor) -> torch.Tensor:
        return self._torch_class().from_dense(padded)


@register_backend
class CutlassBackend(_SemiStructuredBackend):
    """PyTorch's CUTLASS 2:4 GEMM (built for sm8x only), fed our own compressed format."""

    name = "cutlass"
    torch_class_name = "SparseSemiStructuredTensorCUTLASS"

    @classmethod
    def _capability_reason(cls, capability: tuple[int, int]) -> str | None:
        if capability[0] != 8:
            return (
                f"backend 'cutlass' uses PyTorch's CUTLASS 2:4 kernels, built for sm8x (Ampere/Ada) only; "
                f"this GPU is sm{capability[0]}{capability[1]} (use 'cusparselt', 'cutlass-sm90' or 'triton')"
            )
        return None

    def _build(self, padded: torch.Tensor, padded_mask: torch.Tensor) -> torch.Tensor:
        # Padding made rows % 32 == 0 and cols % 64 == 0, so the CUTLASS layout always fits.
        values, meta = compress_2to4(padded, padded_mask, layout="cutlass")
        return self._tensor(values, meta)

    def _tensor(self, values: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
        rows, cols = values.shape[0], 2 * values.shape[1]
        return self._torch_class()(
            (rows, cols), packed=values, meta=meta, packed_t=None, meta_t=None, compressed_swizzled_bitmask=None
        )

    def operand_structure(self, mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
        """The CUTLASS metadata of ``mask`` (exactly 2 of every 4 kept along cols), or None when
        the shape needs padding to PyTorch's minimum (then :meth:`make_operand` pads)."""
        rows, cols = mask.shape
        row_mult, col_mult = self.min_shape(dtype)
        if rows % row_mult or cols % col_mult or dtype not in self.dtypes:
            return None
        return compress_2to4(mask.to(dtype), mask, layout="cutlass")[1]

    def operand_from_values(self, values: torch.Tensor, structure: torch.Tensor) -> SemiStructuredOperand:
        rows, cols = values.shape[0], 2 * values.shape[1]
        if structure.shape != (rows, cols // 16):
            raise ValueError(f"{self.name}: values {tuple(values.shape)} do not match metadata {tuple(structure.shape)}")
        return SemiStructuredOperand(self._tensor(values.contiguous(), structure), rows, cols, 0)

    def operand_values(self, operand: SemiStructuredOperand) -> torch.Tensor | None:
        return getattr(operand.sparse, "packed", None)

    def operand_mask(self, operand: SemiStructuredOperand) -> torch.Tensor | None:
        meta = getattr(operand.sparse, "meta", None)
        if meta is None:
            return None
        rows, cols = operand.sparse.shape
        return pattern_2to4(meta, rows, cols)[: operand.rows, : operand.cols]
