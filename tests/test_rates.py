"""Layer-wise sparsity LP (Eq. 5) and mixed N:M against brute-force enumeration."""

import itertools
import math

import numpy as np
import pytest
import torch

from losa.allocation.rates import delta_for, layer_sparsity, mixed_nm
from losa.errors import ConfigError


def brute_force_lp_optimum(weights, target, lower, upper):
    """Minimum of sum w_i S_i over the vertices of {lower <= S <= upper, sum S = L * target}.

    A vertex of a box cut by one hyperplane has all coordinates but one at a bound; that one is
    fixed by the equality. The LP optimum is attained at a vertex.
    """
    n = len(weights)
    best = math.inf
    for free in range(n):
        others = [i for i in range(n) if i != free]
        for choice in itertools.product((lower, upper), repeat=n - 1):
            value = n * target - sum(choice)
            if lower - 1e-12 <= value <= upper + 1e-12:
                rates = np.empty(n)
                rates[others], rates[free] = choice, value
                best = min(best, float(np.dot(weights, rates)))
    return best


@pytest.mark.parametrize(
    "target, delta",
    [(0.0, 0.01), (0.3, 0.01), (0.5, 0.01), (0.55, 0.02), (0.6, 0.02), (0.65, 0.03), (0.7, 0.03),
     (0.75, 0.03), (0.8, 0.03), (0.9, 0.03), (0.94, 0.03), (0.96, 0.02), (0.99, 0.005)],
)
def test_delta_table(target, delta):
    assert delta_for(target) == pytest.approx(delta, abs=1e-15)


@pytest.mark.parametrize("target", [-0.1, 1.0, 1.5, float("nan")])
def test_bad_target_is_a_config_error(target):
    with pytest.raises(ConfigError, match="target sparsity"):
        delta_for(target)
    with pytest.raises(ConfigError, match="target sparsity"):
        layer_sparsity([1.0, 2.0], target)


@pytest.mark.parametrize("seed, n_blocks, target", [(0, 6, 0.5), (1, 7, 0.6), (2, 8, 0.7), (3, 5, 0.9)])
def test_lp_mean_bounds_order_and_optimality(seed, n_blocks, target):
    weights = np.random.default_rng(seed).uniform(0.3, 1.0, n_blocks)
    rates = layer_sparsity(weights, target)
    delta = delta_for(target)
    assert all(isinstance(r, float) for r in rates)
    assert math.fsum(rates) / n_blocks == pytest.approx(target, abs=1e-15)
    assert all(target - delta - 1e-15 <= r <= target + delta + 1e-15 for r in rates)
    # higher importance weight => lower (or equal) sparsity; the extremes differ strictly
    for i, j in itertools.permutations(range(n_blocks), 2):
        if weights[i] > weights[j]:
            assert rates[i] <= rates[j]
    assert rates[int(np.argmax(weights))] < rates[int(np.argmin(weights))]
    objective = float(np.dot(weights, rates))
    best = brute_force_lp_optimum(weights, target, target - delta, target + delta)
    assert objective == pytest.approx(best, abs=1e-12)


def test_lp_accepts_a_tensor_and_an_explicit_delta():
    importance = torch.tensor([0.9, 0.5, 0.7, 0.6], dtype=torch.float64)
    rates = layer_sparsity(importance, 0.5, delta=0.1)
    # two least important blocks take the upper bound, two most important the lower bound
    assert rates == pytest.approx([0.4, 0.6, 0.4, 0.6], abs=1e-12)


def test_equal_importances_give_uniform_rates():
    assert layer_sparsity([0.8] * 5, 0.6) == pytest.approx([0.6] * 5, abs=1e-15)
    # tie groups are averaged: blocks 1 and 2 share a value
    rates = layer_sparsity([0.9, 0.5, 0.5, 0.7], 0.5, delta=0.1)
    assert rates[1] == rates[2]
    assert math.fsum(rates) / 4 == pytest.approx(0.5, abs=1e-15)


def test_bounds_are_clipped_to_the_unit_interval():
    rates = layer_sparsity([1.0, 0.5, 0.2], 0.005, delta=0.01)
    assert min(rates) >= 0.0
    assert math.fsum(rates) / 3 == pytest.approx(0.005, abs=1e-15)
    rates = layer_sparsity([1.0, 0.5, 0.2], 0.98)  # default delta keeps every block below 1
    assert max(rates) < 1.0 and math.fsum(rates) / 3 == pytest.approx(0.98, abs=1e-15)
    rates = layer_sparsity([1.0, 0.5, 0.2], 0.95, delta=0.2)
    assert max(rates) < 1.0 and math.fsum(rates) / 3 == pytest.approx(0.95, abs=1e-15)


def test_single_block_and_zero_delta_return_the_target():
    assert layer_sparsity([0.4], 0.7) == [0.7]
    assert layer_sparsity([0.4, 0.9], 0.7, delta=0.0) == [0.7, 0.7]


def test_bad_importance_or_delta_is_a_config_error():
    with pytest.raises(ConfigError, match="importance"):
        layer_sparsity([], 0.5)
    with pytest.raises(ConfigError, match="importance"):
        layer_sparsity([1.0, float("nan")], 0.5)
    with pytest.raises(ConfigError, match="delta"):
        layer_sparsity([1.0, 2.0], 0.5, delta=-0.1)


def brute_force_mixed_nm(weights, n, m, spread):
    """Best objective sum w_i (1 - n_i / m) over all integer assignments with the constraints."""
    low, high = max(1, n - spread), min(m - 1, n + spread)
    best = math.inf
    for counts in itertools.product(range(low, high + 1), repeat=len(weights)):
        if sum(counts) == len(weights) * n:
            best = min(best, sum(w * (1 - c / m) for w, c in zip(weights, counts)))
    return best


@pytest.mark.parametrize(
    "seed, n, m, spread", [(0, 2, 8, 1), (1, 2, 4, 1), (2, 4, 8, 2), (3, 1, 8, 1), (4, 6, 8, 3)]
)
def test_mixed_nm_sum_bounds_order_and_optimality(seed, n, m, spread):
    weights = np.random.default_rng(seed).uniform(0.3, 1.0, 6)
    counts = mixed_nm(weights, n, m, spread)
    assert all(isinstance(c, int) for c in counts)
    assert sum(counts) == 6 * n  # same overall sparsity as uniform n:m
    assert all(max(1, n - spread) <= c <= min(m - 1, n + spread) for c in counts)
    for i, j in itertools.permutations(range(6), 2):
        if weights[i] > weights[j]:
            assert counts[i] >= counts[j]  # more important blocks keep more weights
    objective = sum(w * (1 - c / m) for w, c in zip(weights, counts))
    assert objective == pytest.approx(brute_force_mixed_nm(weights, n, m, spread), abs=1e-12)


def test_mixed_nm_agrees_with_the_lp_in_sign():
    weights = [0.9, 0.5, 0.7, 0.6]
    counts = mixed_nm(weights, 2, 8)
    rates = layer_sparsity(weights, 0.75, delta=1 / 8)
    assert counts == [3, 1, 3, 1]
    assert [1 - c / 8 for c in counts] == pytest.approx(rates, abs=1e-12)


def test_mixed_nm_zero_spread_is_uniform_and_bad_patterns_raise():
    assert mixed_nm([0.2, 0.9, 0.5], 2, 4, spread=0) == [2, 2, 2]
    with pytest.raises(ConfigError, match="N of the N:M"):
        mixed_nm([0.2, 0.9], 4, 4)
    with pytest.raises(ConfigError, match="N of the N:M"):
        mixed_nm([0.2, 0.9], 0, 4)
    with pytest.raises(ConfigError, match="M of the N:M"):
        mixed_nm([0.2, 0.9], 1, 1)
    with pytest.raises(ConfigError, match="spread"):
        mixed_nm([0.2, 0.9], 2, 4, spread=-1)


@pytest.mark.parametrize("target", [0.3416, 0.5488, 0.6552, 0.6944, 0.7, 0.8])
def test_lp_at_llama_scale_matches_the_greedy_optimum(target):
    """32 blocks (LLaMA-7B): the optimum of this LP is greedy - the most important blocks take the
    lower bound until the mean is met - so compare objective and mean with that construction."""
    weights = np.random.default_rng(7).uniform(0.9, 1.0, 32)
    delta = delta_for(target)
    lower, upper = target - delta, target + delta
    greedy = np.full(32, upper)
    to_remove = 32 * (upper - target)
    for block in np.argsort(-weights):
        step = min(upper - lower, to_remove)
        greedy[block] -= step
        to_remove -= step
    rates = layer_sparsity(weights, target)
    assert math.fsum(rates) / 32 == pytest.approx(target, abs=1e-15)
    assert float(np.dot(weights, rates)) == pytest.approx(float(np.dot(weights, greedy)), abs=1e-12)


def test_floor_keeps_blocks_that_are_already_sparser():
    """DSA masks only grow: a block already above S_t - delta keeps at least what it has, and the
    others make up for it so the mean is still exactly the target."""
    importance = [0.9, 0.1, 0.5, 0.4]  # block 0 most important: the LP wants it lowest
    free = layer_sparsity(importance, 0.7, delta=0.03)
    assert free[0] == pytest.approx(0.67)
    floor = [0.72, 0.0, 0.0, 0.0]
    rates = layer_sparsity(importance, 0.7, delta=0.03, floor=floor)
    assert math.fsum(rates) == pytest.approx(4 * 0.7, abs=1e-12)
    assert rates[0] == pytest.approx(0.72)
    assert all(r >= f - 1e-12 for r, f in zip(rates, floor))
    assert all(0.67 - 1e-12 <= r <= 0.73 + 1e-12 for r in rates)
    # brute force over a grid: no feasible choice has a lower objective
    best = min(
        sum(i * s for i, s in zip(importance, (0.72, a, b, 2.8 - 0.72 - a - b)))
        for a in np.linspace(0.67, 0.73, 61) for b in np.linspace(0.67, 0.73, 61)
        if 0.67 - 1e-9 <= 2.8 - 0.72 - a - b <= 0.73 + 1e-9
    )
    assert sum(i * s for i, s in zip(importance, rates)) <= best + 1e-9


def test_floor_above_the_upper_bound_and_above_the_target():
    # a block beyond target + delta stays there; the others still bring the mean to the target
    rates = layer_sparsity([0.9, 0.1, 0.5, 0.3], 0.5, delta=0.01, floor=[0.52, 0.0, 0.0, 0.0])
    assert rates[0] == pytest.approx(0.52) and math.fsum(rates) == pytest.approx(2.0, abs=1e-12)
    assert rates[1:] == pytest.approx([0.50, 0.49, 0.49])  # the least important block takes the rest
    # floors alone above the target: nothing is pruned further, every block at its lower bound
    rates = layer_sparsity([0.9, 0.1, 0.5], 0.5, delta=0.01, floor=[0.6, 0.0, 0.0])
    assert rates == pytest.approx([0.6, 0.49, 0.49])


def test_floor_must_be_one_rate_per_block():
    with pytest.raises(ConfigError, match="one sparsity in"):
        layer_sparsity([0.9, 0.1], 0.5, floor=[0.1])


def test_solution_does_not_depend_on_the_importance_scale():
    """SparseGPT's beta = 100 gives importances of ~1e-11 (seen in the benchmark sweep); the LP's
    answer must be the same as for the same importances at a normal scale."""
    importance = np.array([2.518e-11, 1.334e-11, 1.046e-11, 1.059e-11])
    floor = [0.6644, 0.6644, 0.7244, 0.7244]
    for kw in ({}, {"floor": floor}):
        tiny = layer_sparsity(importance, 0.7, **kw)
        assert tiny == pytest.approx(layer_sparsity(importance * 1e11, 0.7, **kw), abs=1e-12)
        assert tiny == pytest.approx([0.67, 0.67, 0.73, 0.73], abs=1e-12)  # most important lowest
