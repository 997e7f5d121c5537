"""SparseGPT: Hessian statistics, OBS exactness, reconstruction quality, sparsity bookkeeping."""

import pytest
import torch

from losa.pruning import MagnitudePruner, SparseGPTPruner, WandaPruner, make_pruner
from losa.pruning.patterns import Pattern
from losa.pruning.sparsegpt import HessianStats, add_upper_gram_, sparsegpt_prune, symmetrize_upper


def correlated_inputs(tokens, d, rank=6, seed=0):
    """x = z @ R with a low-rank-ish mixing R and per-feature scales: strongly correlated features."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(rank, d, generator=g) @ torch.randn(d, d, generator=g) / d**0.5
    mix = torch.cat([mix, 0.1 * torch.eye(d)])  # a little full-rank noise keeps H invertible
    z = torch.randn(tokens, rank + d, generator=g)
    return (z @ mix) * (0.5 + torch.rand(d, generator=g) * 3)


def hessian_of(X):
    return 2.0 / X.shape[0] * X.double().T @ X.double()


def recon_error(X, w, w_pruned):
    return (X @ w.T - X @ w_pruned.T).norm().item()


def test_hessian_stats_equal_direct_formula():
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(3, 7, 20, generator=g), torch.randn(11, 20, generator=g), torch.randn(1, 2, 5, 20, generator=g)]
    stats = HessianStats(20)
    for x in batches:
        stats.add_batch(x)
    X = torch.cat([x.reshape(-1, 20) for x in batches])
    assert stats.num_tokens == X.shape[0] == 42
    assert stats.hessian.dtype == torch.float32
    torch.testing.assert_close(stats.hessian.double(), hessian_of(X), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("width,panel", [(10, 64), (130, 64), (200, 48), (64, 64), (7, 1)])
def test_upper_gram_panels_give_the_full_symmetric_product(width, panel):
    """Panels cover every entry on and above the diagonal exactly once, ragged last panel included,
    never write below the diagonal blocks, and symmetrize back to X^T X."""
    g = torch.Generator().manual_seed(width)
    x = torch.randn(50, width, generator=g, dtype=torch.float64)
    gram = torch.full((width, width), 7.0, dtype=torch.float64).tril(-1)  # 7 below the diagonal, 0 above
    add_upper_gram_(gram, x, panel)
    torch.testing.assert_close(symmetrize_upper(gram), x.T @ x)
    left_of_panels = torch.zeros(width, width, dtype=torch.bool)
    for i in range(0, width, panel):
        left_of_panels[i : i + panel, :i] = True
    assert (gram[left_of_panels] == 7.0).all()  # never computed, never written


def test_hessian_stats_with_several_panels_equal_direct_formula():
    X = correlated_inputs(300, 150, seed=3)
    stats = HessianStats(150)
    assert stats.panel < 150  # the multi-panel path is what this test exercises
    for chunk in X.split(70):
        stats.add_batch(chunk)
    H = stats.hessian
    assert torch.equal(H, H.T)
    torch.testing.assert_close(H.double(), hessian_of(X), rtol=1e-5, atol=1e-4)


def test_single_pruned_weight_gets_exact_obs_update():
    """Pruning one weight per row: survivors after it are the damped least-squares optimum."""
    torch.manual_seed(1)
    rows, d, p = 3, 16, 5
    X = correlated_inputs(200, d, seed=1)
    H = hessian_of(X)
    w = torch.randn(rows, d, dtype=torch.float64)
    w = w.sign() * (1.0 + w.abs())
    w[:, p] = 0.05  # by far the smallest saliency: the only weight pruned in each row
    pattern = Pattern.unstructured((rows + 0.5) / (rows * d))
    out = sparsegpt_prune(w.float(), H.float(), pattern, blocksize=128).double()

    Hd = H + 0.01 * H.diagonal().mean() * torch.eye(d, dtype=torch.float64)
    expected = w.clone()
    expected[:, p] = 0.0
    # columns before p are fixed; columns after p minimise (w' - w)^T Hd (w' - w)
    after = slice(p + 1, d)
    expected[:, after] += torch.linalg.solve(Hd[after, after], Hd[after, p : p + 1] * w[:, p]).T
    assert ((out == 0).sum(1) == 1).all() and (out[:, p] == 0).all()
    assert (out - w)[:, after].abs().max() > 0.01  # the update is substantial, not a no-op
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("text", ["0.5", "2:4"])
def test_reconstruction_beats_wanda_and_magnitude(text):
    torch.manual_seed(2)
    d, out = 64, 32
    X = correlated_inputs(512, d, seed=2)
    w = torch.randn(out, d)
    pattern = Pattern.parse(text)
    errors = {}
    for name in ("magnitude", "wanda", "sparsegpt"):
        pruner = make_pruner(name, d)
        for chunk in X.split(100):
            pruner.add_batch(chunk)
        pruned = pruner.prune(w, pattern)
        assert (pruned == 0).sum() == w.numel() // 2
        errors[name] = recon_error(X, w, pruned)
    assert errors["sparsegpt"] < 0.8 * errors["wanda"], errors
    assert errors["sparsegpt"] < 0.8 * errors["magnitude"], errors


def test_obs_updates_improve_on_the_same_mask_without_updates():
    torch.manual_seed(3)
    X = correlated_inputs(300, 48, seed=3)
    w = torch.randn(16, 48)
    pruned = sparsegpt_prune(w, hessian_of(X).float(), Pattern.unstructured(0.6))
    same_mask_only = w * (pruned != 0)
    assert recon_error(X, w, pruned) < 0.8 * recon_error(X, w, same_mask_only)


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.7])
@pytest.mark.parametrize("blocksize", [128, 64, 7])
def test_layer_sparsity_equals_request(sparsity, blocksize):
    torch.manual_seed(4)
    d, out = 200, 9
    X = correlated_inputs(300, d, seed=4)
    w = torch.randn(out, d)
    pruned = sparsegpt_prune(w, hessian_of(X).float(), Pattern.unstructured(sparsity), blocksize=blocksize)
    assert (pruned == 0).sum().item() == int(w.numel() * sparsity)


@pytest.mark.parametrize("n, m, blocksize", [(2, 4, 128), (4, 8, 128), (2, 4, 6), (4, 8, 12)])
def test_nm_exactly_n_per_group(n, m, blocksize):
    torch.manual_seed(5)
    d, out = 64, 10
    X = correlated_inputs(200, d, seed=5)
    w = torch.randn(out, d)
    pruned = sparsegpt_prune(w, hessian_of(X).float(), Pattern.nm(n, m), blocksize=blocksize)
    assert ((pruned != 0).reshape(out, d // m, m).sum(-1) == n).all()


def test_lazy_block_updates_equal_one_big_block():
    torch.manual_seed(6)
    d = 32
    X = correlated_inputs(200, d, seed=6)
    H = hessian_of(X).float()
    w = torch.randn(8, d)
    small = sparsegpt_prune(w, H, Pattern.nm(2, 4), blocksize=8)
    big = sparsegpt_prune(w, H, Pattern.nm(2, 4), blocksize=d)
    assert torch.equal(small == 0, big == 0)
    torch.testing.assert_close(small, big, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("first, second", [("0.3", "0.6"), ("0.5", "2:4")])
def test_zeros_stay_zero_and_second_pruning_only_adds(first, second):
    torch.manual_seed(7)
    d, out = 64, 12
    X = correlated_inputs(300, d, seed=7)
    w = torch.randn(out, d)
    w[torch.rand(out, d) < 0.1] = 0.0
    pruner = SparseGPTPruner(d)
    pruner.add_batch(X)
    once = pruner.prune(w, Pattern.parse(first))
    assert ((w == 0) <= (once == 0)).all()
    twice = pruner.prune(once, Pattern.parse(second))
    assert ((once == 0) <= (twice == 0)).all()
    if second == "0.6":
        assert (twice == 0).sum().item() == int(w.numel() * 0.6)


def test_already_sparser_than_requested_keeps_all_zeros():
    torch.manual_seed(8)
    X = correlated_inputs(200, 32, seed=8)
    w = torch.randn(6, 32)
    w[:, ::2] = 0.0  # 50 % zeros, then ask for 30 %
    out = sparsegpt_prune(w, hessian_of(X).float(), Pattern.unstructured(0.3))
    assert torch.equal(out == 0, w == 0)


def test_dead_inputs_are_pruned_first_and_cost_nothing():
    torch.manual_seed(9)
    d, out = 32, 8
    X = correlated_inputs(200, d, seed=9)
    X[:, :4] = 0.0  # inputs that never fire
    w = torch.randn(out, d)
    pruned = sparsegpt_prune(w, hessian_of(X).float(), Pattern.unstructured(0.5))
    assert torch.isfinite(pruned).all()
    assert (pruned[:, :4] == 0).all()
    assert (pruned == 0).sum().item() == w.numel() // 2
    wanda = WandaPruner(d)
    wanda.add_batch(X)
    assert recon_error(X, w, pruned) < recon_error(X, w, wanda.prune(w, Pattern.unstructured(0.5)))


def test_dtypes_inputs_untouched_and_deterministic():
    torch.manual_seed(10)
    d = 32
    X = correlated_inputs(200, d, seed=10)
    pruner = make_pruner("sparsegpt", d)
    with pytest.raises(RuntimeError, match="add_batch"):
        pruner.prune(torch.randn(4, d), Pattern.unstructured(0.5))
    pruner.add_batch(X.to(torch.bfloat16))
    H_before = pruner.stats.hessian.clone()
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        w = torch.randn(6, d).to(dtype)
        w_before = w.clone()
        out = pruner.prune(w, Pattern.nm(2, 4))
        assert out.dtype == dtype and out.shape == w.shape
        assert ((out != 0).reshape(6, -1, 4).sum(-1) == 2).all()
        assert torch.equal(w, w_before)
        assert torch.equal(out, pruner.prune(w, Pattern.nm(2, 4)))
    assert torch.equal(pruner.stats.hessian, H_before)


def test_zero_sparsity_on_dense_layer_is_identity():
    X = correlated_inputs(100, 16, seed=11)
    w = torch.randn(4, 16)
    assert torch.equal(sparsegpt_prune(w, hessian_of(X).float(), Pattern.unstructured(0.0)), w)


def test_magnitude_pruner_is_not_fed():
    assert not MagnitudePruner.needs_inputs and SparseGPTPruner.needs_inputs
