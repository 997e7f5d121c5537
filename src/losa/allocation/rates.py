"""Layer-wise sparsity rates from block importances (ALGORITHM.md section 2, Eq. 5; section 5).

Given importances ``I_i`` (higher = more important, see ``rmi.block_importance``) and the mean
target ``S_t`` of this step, the rates solve the linear program

    minimise sum_i I_i * S_i   s.t.  mean_i S_i = S_t,   S_t - delta <= S_i <= S_t + delta

so important blocks are pruned less. During DSA a block's mask only grows, so a block that is
already sparser than ``S_t - delta`` cannot go below what it has: its lower bound is raised to its
current sparsity (``floor``), otherwise the model would end sparser than the target. It is solved
exactly with HiGHS (``scipy.optimize.linprog``);
the authors used SLSQP from an infeasible start, which only approximates the optimum and can leave
the mean off target. The mixed N:M variant picks an integer N per block with the same objective.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import numpy as np
from scipy.optimize import linprog
from torch import Tensor

from losa.errors import ConfigError

# (upper end of the S_t range, delta) from the paper; see delta_for for rates above 0.7.
DELTA_TABLE = ((0.5, 0.01), (0.6, 0.02), (0.7, 0.03))
DELTA_ABOVE_TABLE = 0.03


def _check_target(target: float) -> None:
    if not (isinstance(target, numbers.Real) and 0.0 <= target < 1.0):
        raise ConfigError(f"target sparsity must be in [0, 1), got {target!r}; e.g. 0.7 for 70 %")


def delta_for(target: float) -> float:
    """Half-width of the allowed per-block range around the mean sparsity ``target``.

    Paper: 0.01 for ``S_t <= 0.5``, 0.02 for ``<= 0.6``, 0.03 for ``<= 0.7``. Above 0.7 the paper
    gives none; we keep 0.03. Reasons: at high sparsity the kept fraction ``1 - S`` is small, so a
    delta that kept growing would multiply the spread of *kept* weights between blocks (at 90 %,
    +-0.05 means 5 % to 15 % kept, a 3x ratio; +-0.03 already gives 7 % to 13 %); and the authors'
    code, which sets no value above 0.7, carries the previous step's delta over, which is 0.03 for
    a final 80 % (and, accidentally, 0.01 for 90 %). In addition delta never exceeds half the kept
    fraction, ``(1 - S_t) / 2``, so no block is pruned beyond ``1 - (1 - S_t) / 2`` and the bounds
    stay inside ``[0, 1)``; this only binds above ``S_t = 0.94``.
    """
    _check_target(target)
    target = float(target)
    delta = next((d for upper, d in DELTA_TABLE if target <= upper), DELTA_ABOVE_TABLE)
    return min(delta, (1.0 - target) / 2)


def _as_vector(importance: Tensor | Sequence[float]) -> np.ndarray:
    if isinstance(importance, Tensor):
        importance = importance.detach().cpu().double().numpy()
    values = np.asarray(importance, dtype=np.float64)
    if values.ndim != 1 or values.size == 0:
        raise ConfigError(
            f"importance must be a non-empty 1-D sequence (one per block), got shape {values.shape}"
        )
    if not np.isfinite(values).all():
        raise ConfigError("importance contains NaN or inf; check the block features / RMI matrix")
    return values


def _fix_mean(rates: np.ndarray, lower: np.ndarray, upper: np.ndarray, target: float) -> np.ndarray:
    """Move the solver's rounding residual onto the blocks with room, so mean == target exactly."""
    total = len(rates) * target
    for _ in range(4):
        residual = total - math.fsum(rates)
        if residual == 0:
            break
        room = (upper - rates) if residual > 0 else (rates - lower)
        k = int(np.argmax(room))
        rates[k] = min(max(rates[k] + residual, lower[k]), upper[k])
    return rates


def _floors(floor: Sequence[float] | None, n_blocks: int) -> np.ndarray:
    if floor is None:
        return np.zeros(n_blocks)
    values = np.asarray(floor, dtype=np.float64)
    if values.shape != (n_blocks,) or not np.isfinite(values).all() or (values < 0).any() or (values >= 1).any():
        raise ConfigError(f"floor must hold one sparsity in [0, 1) per block ({n_blocks}), got {list(floor)!r}")
    return values


def layer_sparsity(
    importance: Tensor | Sequence[float], target: float, delta: float | None = None,
    floor: Sequence[float] | None = None,
) -> list[float]:
    """Per-block sparsity rates solving Eq. 5 exactly; their mean equals ``target``.

    ``delta`` defaults to :func:`delta_for`; the bounds are clipped to ``[0, 1)``. ``floor`` (per
    block, optional) is the sparsity each block already has: no rate goes below it (masks only
    grow), the upper bound widening to it where it lies above ``target + delta``; where the floors
    alone reach the target, the rates are the lower bounds and their mean exceeds it. Blocks with
    exactly equal importance and bounds get equal rates (the LP is indifferent between them; we
    take the average of the solver's choice, which keeps optimality, the mean and the bounds).
    """
    _check_target(target)
    target = float(target)
    weights = _as_vector(importance)
    n_blocks = len(weights)
    if delta is None:
        delta = delta_for(target)
    if not (math.isfinite(delta) and delta >= 0):
        raise ConfigError(f"delta must be a finite number >= 0, got {delta!r}")
    floors = _floors(floor, n_blocks)
    lower = np.maximum(max(0.0, target - delta), floors)
    upper = np.maximum(min(target + delta, math.nextafter(1.0, 0.0)), floors)
    if math.fsum(lower) >= n_blocks * target:
        # already as sparse as asked (e.g. fine-tuning a model pruned beyond an early DSA step):
        # masks only grow, so every block stays where it is
        return [float(r) for r in lower]
    if floor is None and (n_blocks == 1 or delta == 0):
        return [float(target)] * n_blocks

    # The solution only depends on the order of the importances, not their scale (the sum of the
    # rates is fixed), but HiGHS does: importances of ~1e-11 (large beta) fall below its tolerances
    # and it returns an arbitrary feasible point. So the objective is centred and scaled to [-1, 1].
    spread = float(np.ptp(weights))
    objective = (weights - weights.mean()) / spread if spread > 0 else np.zeros_like(weights)
    result = linprog(
        c=objective,
        A_eq=np.ones((1, n_blocks)),
        b_eq=[n_blocks * target],
        bounds=list(zip(lower, upper)),
        method="highs",
    )
    # infeasible is impossible (sum(lower) <= L * target <= sum(upper)); this guards against solver trouble
    if result.status != 0:
        raise RuntimeError(f"linprog failed on the layer-wise sparsity LP: {result.message}")
    rates = np.clip(result.x, lower, upper)
    for key in set(zip(weights, lower, upper)):
        tied = (weights == key[0]) & (lower == key[1]) & (upper == key[2])
        if tied.sum() > 1:
            rates[tied] = rates[tied].mean()
    return [float(r) for r in _fix_mean(rates, lower, upper, target)]


def mixed_nm(importance: Tensor | Sequence[float], n: int, m: int, spread: int = 1) -> list[int]:
    """Per-block N for mixed N:M sparsity (paper section 3.4), same overall sparsity as ``n:m``.

    Each ``n_i`` lies in ``[n - spread, n + spread]`` intersected with ``[1, m - 1]`` and
    ``sum n_i = L * n``. The choice solves Eq. 5 over integers: minimise
    ``sum I_i * S_i`` with ``S_i = 1 - n_i / m``, i.e. give the spare non-zeros to the blocks with
    the highest importance first, so more important blocks keep more weights (larger ``n_i``) and
    the sign convention matches :func:`layer_sparsity`. (The paper's sentence "lower N values to
    more important layers" contradicts its own Eq. 5, where higher importance means lower sparsity.)
    This greedy filling is the exact optimum of that integer program; ties keep block order.
    """
    weights = _as_vector(importance)
    if not (isinstance(m, numbers.Integral) and m >= 2):
        raise ConfigError(f"M of the N:M pattern must be an integer >= 2, got {m!r}")
    if not (isinstance(n, numbers.Integral) and 1 <= n <= m - 1):
        raise ConfigError(
            f"N of the N:M pattern must be an integer in [1, M-1] = [1, {m - 1}], got {n!r}"
        )
    if not (isinstance(spread, numbers.Integral) and spread >= 0):
        raise ConfigError(f"spread must be an integer >= 0, got {spread!r}")
    n, m, spread = int(n), int(m), int(spread)
    low, high = max(1, n - spread), min(m - 1, n + spread)
    counts = [low] * len(weights)
    spare = len(weights) * (n - low)
    for block in np.argsort(-weights, kind="stable"):
        if spare == 0:
            break
        extra = min(high - low, spare)
        counts[int(block)] += extra
        spare -= extra
    return counts
