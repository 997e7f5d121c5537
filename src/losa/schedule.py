"""Schedules of dynamic sparsity and adaptation (ALGORITHM.md section 4, Eqs. 8 and 9).

Step ``t`` runs from 1 to ``T``. The mean sparsity rises to the final ``S`` at ``t = T``; the cubic
schedule (Zhu & Gupta, 2017) prunes most in the first steps, the linear one (paper Table 10
ablation) evenly. The mean LoRA rank grows by one per step from ``r0``.
"""

from __future__ import annotations

import numbers

from losa.errors import ConfigError

SCHEDULES = ("cubic", "linear")


def sparsity_at(step: int, total_steps: int, final_sparsity: float, kind: str = "cubic") -> float:
    """Mean sparsity of step ``step``: cubic ``S - S (1 - t/T)^3`` (Eq. 8) or linear ``S t / T``."""
    if not (isinstance(total_steps, numbers.Integral) and total_steps >= 1):
        raise ConfigError(
            f"the number of dynamic steps T must be an integer >= 1, got {total_steps!r}"
        )
    if not (isinstance(step, numbers.Integral) and 1 <= step <= total_steps):
        raise ConfigError(f"step must be an integer in 1..{total_steps}, got {step!r}")
    if not (isinstance(final_sparsity, numbers.Real) and 0.0 <= final_sparsity < 1.0):
        raise ConfigError(
            f"final sparsity must be in [0, 1), got {final_sparsity!r}; e.g. 0.7 for 70 %"
        )
    if kind not in SCHEDULES:
        raise ConfigError(
            f"unknown sparsity schedule {kind!r}; choose one of {', '.join(SCHEDULES)}"
        )
    progress = step / total_steps
    if kind == "cubic":
        return float(final_sparsity - final_sparsity * (1.0 - progress) ** 3)
    return float(final_sparsity * progress)


def mean_rank_at(step: int, r0: int = 6) -> int:
    """Mean LoRA rank of step ``step`` (Eq. 9): ``r0 + (t - 1)``; the authors use ``r0 = 6``."""
    if not (isinstance(step, numbers.Integral) and step >= 1):
        raise ConfigError(f"step must be an integer >= 1, got {step!r}")
    if not (isinstance(r0, numbers.Integral) and r0 >= 1):
        raise ConfigError(f"initial mean rank r0 must be an integer >= 1, got {r0!r}")
    return int(r0 + step - 1)
