"""Representation mutual information between decoder blocks (ALGORITHM.md section 2).

RMI is estimated by normalised HSIC with a linear kernel, i.e. linear CKA (Kornblith et al.,
2019): flatten each block's input hidden states per calibration sample to ``F_i`` of shape
``(n, seq*d)``, form the Gram matrix ``K_i = F_i F_i^T`` and centre it, ``Kc_i = H K_i H`` with
``H = I - 1/n``. Then

    RMI(i, j) = <Kc_i, Kc_j>_F / (||Kc_i||_F ||Kc_j||_F)

A block whose representation is strongly correlated with the others is redundant, so its
importance ``I_i = exp(-beta * m_i / sum_k m_k)`` (Eq. 4, ``m_i = sum_{j != i} RMI(i, j)``) is low.

Everything is computed in float64: at LLaMA-7B scale one Gram entry sums 2048 * 4096 products, and
the RMI values of neighbouring blocks differ only in the third or fourth decimal.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from losa.errors import ConfigError, DataError

# Columns of the flattened features converted to float64 at once; bounds the float64 working copy
# to n * 2**18 * 8 bytes (128 MiB for n = 64) instead of n * seq * d * 8 (4 GiB for LLaMA-7B).
DEFAULT_CHUNK_COLUMNS = 1 << 18


def center_gram(gram: Tensor) -> Tensor:
    """``H K H`` with ``H = I - 1/n``: subtract row and column means, add back the grand mean."""
    row_mean = gram.mean(dim=0, keepdim=True)
    col_mean = gram.mean(dim=1, keepdim=True)
    return gram - row_mean - col_mean + gram.mean()


@torch.no_grad()
def gram_matrix(features: Tensor, chunk_columns: int = DEFAULT_CHUNK_COLUMNS) -> Tensor:
    """Centred linear-kernel Gram matrix ``H F F^T H`` (float64, shape ``(n, n)``) of one block.

    ``features`` has shape ``(n, ...)``: the block's input hidden states for ``n`` calibration
    samples, flattened per sample. ``F F^T`` is accumulated over column chunks of
    ``chunk_columns`` so the float64 copy of the features is never materialised at once.
    """
    if features.dim() < 2:
        raise ConfigError(
            f"block features must have shape (n_samples, ...), got {tuple(features.shape)}; "
            "pass one row per calibration sample"
        )
    n = features.shape[0]
    if n < 2:
        raise ConfigError(
            f"CKA needs at least 2 calibration samples to centre the Gram matrix, got {n}; "
            "increase the number of calibration samples used for the layer-wise sparsity"
        )
    if chunk_columns < 1:
        raise ConfigError(f"chunk_columns must be >= 1, got {chunk_columns}")
    flat = features.reshape(n, -1)
    gram = torch.zeros(n, n, dtype=torch.float64, device=features.device)
    for start in range(0, flat.shape[1], chunk_columns):
        chunk = flat[:, start : start + chunk_columns].to(torch.float64)
        gram.addmm_(chunk, chunk.T)
    if not torch.isfinite(gram).all():
        raise DataError(
            "block features contain NaN or inf; the model produced non-finite hidden states on "
            "the calibration data (check the model weights and dtype)"
        )
    return center_gram(gram)


def cka(kc_i: Tensor, kc_j: Tensor) -> float:
    """Linear CKA of two centred Gram matrices: ``<Kc_i, Kc_j>_F / (||Kc_i||_F ||Kc_j||_F)``."""
    if kc_i.shape != kc_j.shape or kc_i.dim() != 2:
        raise ValueError(
            f"Gram matrices must be square and of equal shape: {kc_i.shape} vs {kc_j.shape}"
        )
    a, b = kc_i.to(torch.float64), kc_j.to(torch.float64)
    norm_a, norm_b = torch.linalg.matrix_norm(a), torch.linalg.matrix_norm(b)
    if norm_a == 0 or norm_b == 0:
        raise DataError(
            "a block's features are identical across all calibration samples, so CKA is "
            "undefined; use distinct calibration sequences"
        )
    return float((a * b).sum() / (norm_a * norm_b))


def rmi_matrix(centred_grams: list[Tensor]) -> Tensor:
    """``(L, L)`` float64 matrix of ``RMI(i, j)`` = linear CKA between every pair of blocks.

    ``centred_grams`` are the outputs of :func:`gram_matrix`, one per block (each computed once
    by the caller). All pairwise inner products come from one ``(L, n^2) @ (n^2, L)`` product.
    """
    if not centred_grams:
        raise ConfigError("rmi_matrix needs the Gram matrix of at least one block")
    shape = centred_grams[0].shape
    if any(g.shape != shape for g in centred_grams) or len(shape) != 2 or shape[0] != shape[1]:
        raise ValueError("all Gram matrices must be square with the same number of samples")
    flat = torch.stack([g.reshape(-1).to(torch.float64) for g in centred_grams])
    norms = flat.norm(dim=1)
    if (norms == 0).any():
        blocks = torch.nonzero(norms == 0).flatten().tolist()
        raise DataError(
            f"the features of block(s) {blocks} are identical across all calibration samples, "
            "so CKA is undefined; use distinct calibration sequences"
        )
    return (flat @ flat.T) / torch.outer(norms, norms)


def block_importance(rmi: Tensor, beta: float = 1.0) -> Tensor:
    """Eq. 4: ``I_i = exp(-beta * m_i / sum_k m_k)`` with ``m_i = sum_{j != i} RMI(i, j)``.

    ``beta`` = 1 is the authors' setting with Wanda, 100 with SparseGPT. If no block shares any
    information with another (all ``m_i`` = 0, e.g. a single block) every block is equally
    important and the result is all ones.
    """
    if rmi.dim() != 2 or rmi.shape[0] != rmi.shape[1]:
        raise ValueError(f"rmi must be a square (L, L) matrix, got shape {tuple(rmi.shape)}")
    if not math.isfinite(beta) or beta < 0:
        raise ConfigError(f"beta must be a finite number >= 0, got {beta}")
    rmi = rmi.to(torch.float64)
    if not torch.isfinite(rmi).all():
        raise DataError("the RMI matrix contains NaN or inf; check the block features")
    redundancy = rmi.sum(dim=1) - rmi.diagonal()
    total = redundancy.sum()
    if total == 0:
        return torch.ones_like(redundancy)
    return torch.exp(-beta * redundancy / total)
