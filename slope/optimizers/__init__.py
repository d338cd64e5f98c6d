"""Sparse optimizers (``slope.optimizers``)."""
from .adamw_sparse import ADAMWSparse

__all__ = ["ADAMWSparse"]
