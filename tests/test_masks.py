"""Keep masks against brute-force per-row / per-group references, plus the magnitude pruner."""

import pytest
import torch

from losa.errors import ConfigError
from losa.pruning import MagnitudePruner, make_pruner
from losa.pruning.magnitude import magnitude_scores
from losa.pruning.masks import keep_mask, nm_keep_mask, unstructured_keep_mask
from losa.pruning.patterns import Pattern


def reference_unstructured(scores, sparsity):
    """Brute force: per row, argsort and drop the first int(cols * sparsity)."""
    rows, cols = scores.shape
    keep = torch.ones(rows, cols, dtype=torch.bool)
    for i in range(rows):
        drop = scores[i].argsort()[: int(cols * sparsity)]
        keep[i, drop] = False
    return keep


def reference_nm(scores, n, m):
    """Brute force: per row and group of m, keep the n largest."""
    rows, cols = scores.shape
    keep = torch.zeros(rows, cols, dtype=torch.bool)
    for i in range(rows):
        for g in range(0, cols, m):
            top = scores[i, g : g + m].argsort(descending=True)[:n]
            keep[i, g + top] = True
    return keep


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.7, 0.9])
def test_unstructured_matches_reference(sparsity):
    torch.manual_seed(0)
    scores = torch.rand(7, 50)
    keep = unstructured_keep_mask(scores, sparsity)
    assert torch.equal(keep, reference_unstructured(scores, sparsity))
    assert (keep.sum(1) == 50 - int(50 * sparsity)).all()


@pytest.mark.parametrize("n, m", [(2, 4), (4, 8), (1, 4)])
def test_nm_matches_reference(n, m):
    torch.manual_seed(1)
    scores = torch.rand(6, 32)
    keep = nm_keep_mask(scores, n, m)
    assert torch.equal(keep, reference_nm(scores, n, m))
    assert (keep.reshape(6, -1, m).sum(-1) == n).all()


def test_already_pruned_are_pruned_first():
    torch.manual_seed(2)
    scores = torch.rand(4, 20)
    pruned = torch.zeros(4, 20, dtype=torch.bool)
    pruned[0, :3] = True  # fewer than requested: the rest come from the lowest scores
    pruned[1, :15] = True  # more than requested: the row keeps all of its zeros
    scores[pruned] = 10.0  # high scores must not save an already-pruned weight
    keep = unstructured_keep_mask(scores, 0.5, pruned)
    assert not (keep & pruned).any()
    assert keep[0].sum() == 10 and keep[1].sum() == 5 and keep[2].sum() == 10
    # row 0: the 7 extra prunes are the 7 lowest scores among the not-yet-pruned weights
    free = torch.arange(3, 20)
    expected_drop = free[scores[0, 3:].argsort()[:7]]
    assert not keep[0, expected_drop].any()


def test_nm_forced_out():
    scores = torch.tensor([[9.0, 8.0, 1.0, 2.0, 9.0, 8.0, 7.0, 6.0]])
    pruned = torch.tensor([[True, False, False, False, True, True, True, False]])
    keep = nm_keep_mask(scores, 2, 4, pruned)
    assert keep.tolist() == [[False, True, False, True, False, False, False, True]]


def test_keep_mask_dispatch_and_width_check():
    scores = torch.rand(3, 16)
    assert torch.equal(keep_mask(scores, Pattern.nm(2, 4)), nm_keep_mask(scores, 2, 4))
    assert torch.equal(keep_mask(scores, Pattern.unstructured(0.25)), unstructured_keep_mask(scores, 0.25))
    with pytest.raises(ConfigError, match="multiple of M=8"):
        nm_keep_mask(torch.rand(3, 12), 4, 8)


def test_ties_are_deterministic():
    scores = torch.ones(3, 8)
    a = unstructured_keep_mask(scores, 0.5)
    assert torch.equal(a, unstructured_keep_mask(scores.clone(), 0.5))
    assert (a.sum(1) == 4).all()


def test_magnitude_scores():
    w = torch.tensor([[-3.0, 2.0], [0.5, -0.25]], dtype=torch.bfloat16)
    s = magnitude_scores(w)
    assert s.dtype == torch.float32 and torch.equal(s, w.float().abs())


def test_magnitude_pruner_against_reference():
    torch.manual_seed(3)
    w = torch.randn(8, 40)
    pruner = make_pruner("magnitude", 40)
    assert isinstance(pruner, MagnitudePruner) and not pruner.needs_inputs
    pruned = pruner.prune(w, Pattern.unstructured(0.6))
    keep = reference_unstructured(w.abs(), 0.6)
    assert torch.equal(pruned, w * keep)
    pruned_nm = pruner.prune(w, Pattern.nm(2, 4))
    assert torch.equal(pruned_nm, w * reference_nm(w.abs(), 2, 4))


def test_magnitude_keeps_zeros_and_only_adds_zeros():
    torch.manual_seed(4)
    w = torch.randn(6, 32)
    w[torch.rand(6, 32) < 0.2] = 0.0
    pruner = MagnitudePruner(32)
    first = pruner.prune(w, Pattern.unstructured(0.3))
    assert ((w == 0) <= (first == 0)).all()
    second = pruner.prune(first, Pattern.unstructured(0.6))
    assert ((first == 0) <= (second == 0)).all()
    assert ((second == 0).sum(1) >= int(32 * 0.6)).all()
    surviving = second != 0
    assert torch.equal(second[surviving], w[surviving])  # magnitude pruning never changes survivors


def test_magnitude_bf16_round_trip():
    w = torch.randn(4, 16).to(torch.bfloat16)
    out = MagnitudePruner(16).prune(w, Pattern.nm(2, 4))
    assert out.dtype == torch.bfloat16 and out.shape == w.shape
    assert ((out != 0).reshape(4, 4, 4).sum(-1) == 2).all()


def test_meets_pattern_on_masks_the_pruners_make():
    from losa.pruning.masks import keep_mask, meets_pattern

    gen = torch.Generator().manual_seed(0)
    scores = torch.rand(16, 64, generator=gen)
    for pattern in (Pattern.unstructured(0.7), Pattern.unstructured(0.55), Pattern.nm(2, 4), Pattern.nm(3, 8)):
        keep = keep_mask(scores, pattern)
        assert meets_pattern(keep, pattern)
        assert meets_pattern(keep & (torch.rand(16, 64, generator=gen) > 0.2), pattern)  # sparser still meets it
    # one weight per row short is rounding; more is not
    keep = keep_mask(scores, Pattern.unstructured(0.5))
    assert meets_pattern(keep, Pattern.unstructured(0.5 + 0.9 / 64))
    assert not meets_pattern(keep, Pattern.unstructured(0.5 + 2 / 64))
    # a group keeping three of four breaks 2:4
    keep = keep_mask(scores, Pattern.nm(2, 4))
    keep[0, :4] = torch.tensor([True, True, True, False])
    assert not meets_pattern(keep, Pattern.nm(2, 4))
