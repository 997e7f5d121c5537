"""Reconstruction error (authors' normalisation) and Eq. 7 rank allocation."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from losa.allocation.ranks import ReconstructionError, allocate_ranks, ranks_by_sparsity, reconstruction_error
from losa.errors import ConfigError


def direct_error(dense: torch.Tensor, sparse: torch.Tensor) -> float:
    """E = sum(((D - O) / c)^2) / d with c the per-channel L2 norm of D over samples and tokens."""
    d = dense.double()
    c = d.reshape(-1, d.shape[-1]).norm(dim=0)
    return float((((d - sparse.double()) / c) ** 2).sum() / d.shape[-1])


@pytest.fixture
def outputs():
    gen = torch.Generator().manual_seed(0)
    # channels of very different scale, so the per-channel normalisation matters
    dense = torch.randn(6, 5, 8, generator=gen) * torch.linspace(0.1, 10, 8)
    sparse = dense + 0.3 * torch.randn(6, 5, 8, generator=gen)
    return dense, sparse


def test_one_shot_error_equals_direct_formula(outputs):
    dense, sparse = outputs
    assert reconstruction_error(dense, sparse) == pytest.approx(direct_error(dense, sparse), rel=1e-12)
    assert reconstruction_error(dense, dense) == 0.0


def test_streaming_over_chunks_equals_one_shot(outputs):
    dense, sparse = outputs
    accumulator = ReconstructionError()
    for lo, hi in [(0, 1), (1, 4), (4, 6)]:  # uneven batch sizes
        accumulator.add(dense[lo:hi], sparse[lo:hi])
    assert accumulator.value() == pytest.approx(reconstruction_error(dense, sparse), rel=1e-12)
    # token-level chunks (2-D) give the same value too
    token_wise = ReconstructionError()
    for row_d, row_s in zip(dense.reshape(-1, 8).split(7), sparse.reshape(-1, 8).split(7)):
        token_wise.add(row_d, row_s)
    assert token_wise.value() == pytest.approx(direct_error(dense, sparse), rel=1e-12)


def test_bf16_outputs_are_accumulated_in_float64(outputs):
    dense, sparse = (t.to(torch.bfloat16) for t in outputs)
    assert reconstruction_error(dense, sparse) == pytest.approx(direct_error(dense, sparse), rel=1e-12)


def test_all_zero_dense_channel_is_skipped_not_nan(outputs):
    dense, sparse = outputs[0].clone(), outputs[1].clone()
    dense[..., 3] = 0.0
    value = reconstruction_error(dense, sparse)
    keep = [c for c in range(8) if c != 3]
    assert value == pytest.approx(direct_error(dense[..., keep], sparse[..., keep]) * 7 / 8, rel=1e-12)


def test_accumulator_misuse_raises(outputs):
    dense, sparse = outputs
    with pytest.raises(RuntimeError):
        ReconstructionError().value()
    with pytest.raises(ValueError):
        reconstruction_error(dense, sparse[..., :4])
    accumulator = ReconstructionError()
    accumulator.add(dense, sparse)
    with pytest.raises(ValueError, match="hidden size"):
        accumulator.add(dense[..., :4], sparse[..., :4])


def test_equal_errors_give_uniform_ranks():
    assert allocate_ranks([0.3] * 6, 8) == [8] * 6
    assert allocate_ranks([0.0] * 4, 6) == [6] * 4  # all-zero errors: uniform, not a division by zero


def test_hand_computed_allocations():
    # mean error 2: ratios (0.5, 1, 1.5, 1) x 4 = (2, 4, 6, 4), already on budget 16
    assert allocate_ranks([1.0, 2.0, 3.0, 2.0], 4) == [2, 4, 6, 4]
    # ratios x 4 = (1.23, 1.23, 1.23, 12.3) -> (1, 1, 1, 12) = 15; one unit to the highest error
    assert allocate_ranks([1.0, 1.0, 1.0, 10.0], 4) == [1, 1, 1, 13]
    # a dominant error clips at r_max = 16 and the rest is spread over several passes:
    # (1, 1, 1, 1, 16) = 20, budget 40 -> five passes of +1 to the four layers below r_max
    assert allocate_ranks([0.0, 0.0, 0.0, 0.0, 100.0], 8) == [6, 6, 6, 6, 16]
    # surplus: (0.1, 0.2, 4.7) / 1.667 x 4 -> (0.24, 0.48, 11.28) -> (1, 1, 11) = 13 > 12
    assert allocate_ranks([0.1, 0.2, 4.7], 4) == [1, 1, 10]


def test_dominant_error_clips_at_r_max():
    ranks = allocate_ranks([1e-3] * 7 + [50.0], 10)
    assert ranks[-1] == 16 and sum(ranks) == 80


@settings(max_examples=300, deadline=None)
@given(
    errors=st.lists(st.floats(min_value=0.0, max_value=1e6, allow_nan=False), min_size=1, max_size=40),
    mean_rank=st.floats(min_value=1.0, max_value=16.0),
    r_min=st.integers(min_value=1, max_value=4),
    r_span=st.integers(min_value=0, max_value=16),
)
def test_allocation_properties(errors, mean_rank, r_min, r_span):
    r_max = r_min + r_span
    n = len(errors)
    budget = round(n * mean_rank)
    if not n * r_min <= budget <= n * r_max:
        with pytest.raises(ConfigError, match="budget"):
            allocate_ranks(errors, mean_rank, r_min, r_max)
        return
    ranks = allocate_ranks(errors, mean_rank, r_min, r_max)
    assert sum(ranks) == budget
    assert all(isinstance(r, int) and r_min <= r <= r_max for r in ranks)
    for i in range(n):
        for j in range(n):
            if errors[i] > errors[j]:
                assert ranks[i] >= ranks[j]  # a higher error never gets a lower rank


def test_infeasible_budget_and_bad_errors_raise():
    with pytest.raises(ConfigError, match="budget"):
        allocate_ranks([1.0, 2.0], 20)
    with pytest.raises(ConfigError, match="budget"):
        allocate_ranks([1.0, 2.0], 0.4)
    with pytest.raises(ConfigError, match="finite and >= 0"):
        allocate_ranks([1.0, -2.0], 4)
    with pytest.raises(ConfigError, match="finite and >= 0"):
        allocate_ranks([1.0, math.nan], 4)
    with pytest.raises(ConfigError, match="non-empty"):
        allocate_ranks([], 4)
    with pytest.raises(ConfigError, match="rank bounds"):
        allocate_ranks([1.0], 4, r_min=5, r_max=3)


def test_ranks_by_sparsity_uses_the_rates_as_errors():
    rates = [0.67, 0.70, 0.73, 0.70]
    assert ranks_by_sparsity(rates, 8) == allocate_ranks(rates, 8)
    # near-uniform rates -> near-uniform ranks that still meet the budget
    assert sum(ranks_by_sparsity(np.linspace(0.4, 0.9, 32), 6)) == 192
    with pytest.raises(ConfigError, match="sparsity rates"):
        ranks_by_sparsity([0.5, 1.2], 8)
