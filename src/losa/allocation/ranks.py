"""Sparsity-aware rank allocation from reconstruction errors (ALGORITHM.md section 3, Eq. 7).

Error of block ``l`` (the authors' normalisation): with ``c`` the per-channel L2 norm of the dense
block output ``D`` over all samples and tokens, ``E = sum(((D - O) / c)^2) / d``. Because ``c``
is per channel, the error splits exactly into per-channel sums,

    E = (1/d) * sum_ch  sum(D_ch - O_ch)^2 / sum(D_ch^2)

so it can be streamed over calibration chunks without keeping every dense output in memory.

Defects of the authors' code (``lib/prune.py``) fixed here: the error is computed in the model's
dtype (bf16/fp16 squares summed over 10^8 terms), here in float64; a channel whose dense output is
zero everywhere divides by zero (NaN/inf poisons the allocation), here it is left out of the sum
(its relative error is undefined; the divisor stays ``d``); and the rank correction makes a single
pass over the layers, so when clipping moved the sum by more than ``L`` the budget is not met, here
passes repeat until the sum is exact.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from losa.errors import ConfigError

R_MIN, R_MAX = 1, 16


class ReconstructionError:
    """Streaming accumulator of the normalised reconstruction error of ONE block.

    Feed ``add(dense_out, sparse_out)`` with chunks of shape ``(..., d)`` (any batch size, any
    number of calls), then read ``value()``. Sums are kept per channel in float64.
    """

    def __init__(self) -> None:
        self.squared_error: Tensor | None = None  # (d,) sum over samples and tokens of (D - O)^2
        self.squared_dense: Tensor | None = None  # (d,) sum over samples and tokens of D^2

    @torch.no_grad()
    def add(self, dense_out: Tensor, sparse_out: Tensor) -> None:
        if dense_out.shape != sparse_out.shape or dense_out.dim() < 1:
            raise ValueError(
                f"dense and sparse outputs must have the same shape (..., d): "
                f"{tuple(dense_out.shape)} vs {tuple(sparse_out.shape)}"
            )
        dense = dense_out.reshape(-1, dense_out.shape[-1]).to(torch.float64)
        sparse = sparse_out.reshape(-1, sparse_out.shape[-1])
        sparse = sparse.to(device=dense.device, dtype=torch.float64)
        squared_error = (dense - sparse).square().sum(dim=0)
        squared_dense = dense.square().sum(dim=0)
        if self.squared_error is None:
            self.squared_error, self.squared_dense = squared_error, squared_dense
            return
        if squared_error.shape != self.squared_error.shape:
            raise ValueError(
                f"hidden size changed between chunks: "
                f"{self.squared_error.shape[0]} then {squared_error.shape[0]}"
            )
        self.squared_error += squared_error.to(self.squared_error.device)
        self.squared_dense += squared_dense.to(self.squared_dense.device)

    def value(self) -> float:
        """``sum_ch err_ch / dense_ch / d``; channels with an all-zero dense output are skipped."""
        if self.squared_error is None or self.squared_dense is None:
            raise RuntimeError("ReconstructionError.value() called before any outputs were added")
        live = self.squared_dense > 0
        ratio = self.squared_error[live] / self.squared_dense[live]
        return float(ratio.sum() / self.squared_error.shape[0])


def reconstruction_error(dense_out: Tensor, sparse_out: Tensor) -> float:
    """One-shot :class:`ReconstructionError` of a single pair of ``(..., d)`` tensors."""
    accumulator = ReconstructionError()
    accumulator.add(dense_out, sparse_out)
    return accumulator.value()


def _check_budget(n_layers: int, mean_rank: float, r_min: int, r_max: int) -> int:
    integral = isinstance(r_min, numbers.Integral) and isinstance(r_max, numbers.Integral)
    if not (integral and 1 <= r_min <= r_max):
        raise ConfigError(
            f"rank bounds must be integers with 1 <= r_min <= r_max, got [{r_min}, {r_max}]"
        )
    if not (isinstance(mean_rank, numbers.Real) and math.isfinite(mean_rank)):
        raise ConfigError(f"mean rank must be a finite number, got {mean_rank!r}")
    budget = round(n_layers * mean_rank)
    if not n_layers * r_min <= budget <= n_layers * r_max:
        raise ConfigError(
            f"rank budget {n_layers} layers x mean rank {mean_rank} = {budget} cannot be met with "
            f"ranks in [{r_min}, {r_max}]; choose a mean rank between {r_min} and {r_max}"
        )
    return budget


def allocate_ranks(
    errors: Sequence[float], mean_rank: float, r_min: int = R_MIN, r_max: int = R_MAX
) -> list[int]:
    """Eq. 7: ``r_l = round(E_l / mean(E) * mean_rank)`` clipped to ``[r_min, r_max]``, then
    corrected one unit at a time until ``sum r_l == round(L * mean_rank)`` exactly.

    Too many units: the layers above ``r_min`` give one each, lowest error first; too few: the
    layers below ``r_max`` get one each, highest error first; passes repeat until the sum is met.
    Rounding is half-to-even (numpy's, as in the authors' code). All-zero errors give uniform ranks.
    A higher error never gets a lower rank.
    """
    values = np.asarray(errors, dtype=np.float64)
    if values.ndim != 1 or values.size == 0:
        raise ConfigError(
            f"errors must be a non-empty 1-D sequence (one per block), got shape {values.shape}"
        )
    if not np.isfinite(values).all() or (values < 0).any():
        raise ConfigError(
            "reconstruction errors must be finite and >= 0; check the block outputs for NaN/inf"
        )
    budget = _check_budget(len(values), mean_rank, r_min, r_max)

    mean_error = values.mean()
    relative = values / mean_error if mean_error > 0 else np.ones_like(values)
    ranks = np.clip(np.rint(relative * mean_rank), r_min, r_max).astype(int)

    surplus = int(ranks.sum()) - budget
    ascending = np.argsort(values, kind="stable")
    order = ascending if surplus > 0 else ascending[::-1]
    step = -1 if surplus > 0 else 1
    while surplus != 0:
        for layer in order:
            if surplus == 0:
                break
            if r_min <= ranks[layer] + step <= r_max:
                ranks[layer] += step
                surplus += step
    return [int(r) for r in ranks]


def ranks_by_sparsity(
    rates: Sequence[float], mean_rank: float, r_min: int = R_MIN, r_max: int = R_MAX
) -> list[int]:
    """Ablation of paper Table 7: Eq. 7 with the layer sparsity rates in place of the errors."""
    values = np.asarray(rates, dtype=np.float64)
    if values.ndim == 1 and ((values < 0) | (values >= 1)).any():  # NaN is left to allocate_ranks
        raise ConfigError("sparsity rates must lie in [0, 1)")
    return allocate_ranks(rates, mean_rank, r_min, r_max)
