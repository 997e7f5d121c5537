"""Allocation math of LoSA as pure functions: block importance from representation mutual
information, layer-wise sparsity rates (and mixed N:M), and reconstruction-error rank allocation."""

from losa.allocation.ranks import (
    ReconstructionError,
    allocate_ranks,
    ranks_by_sparsity,
    reconstruction_error,
)
from losa.allocation.rates import delta_for, layer_sparsity, mixed_nm
from losa.allocation.rmi import block_importance, cka, gram_matrix, rmi_matrix

__all__ = [
    "ReconstructionError",
    "allocate_ranks",
    "block_importance",
    "cka",
    "delta_for",
    "gram_matrix",
    "layer_sparsity",
    "mixed_nm",
    "ranks_by_sparsity",
    "reconstruction_error",
    "rmi_matrix",
]
