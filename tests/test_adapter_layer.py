"""MaskedLoraLinear against the naive formula y = x (W + s (B A) ⊙ M)^T + b on small tensors."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from losa.adapters.layer import MaskedLoraFunction, MaskedLoraLinear, resize_factors
from losa.errors import ConfigError

IN, OUT = 12, 10


def sparse_linear(seed: int = 0, bias: bool = True, dtype=torch.float32, sparsity: float = 0.5) -> nn.Linear:
    """A random nn.Linear whose weight has `sparsity` exact zeros."""
    generator = torch.Generator().manual_seed(seed)
    linear = nn.Linear(IN, OUT, bias=bias)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(OUT, IN, generator=generator))
        linear.weight[torch.rand(OUT, IN, generator=generator) < sparsity] = 0.0
        if bias:
            linear.bias.copy_(torch.randn(OUT, generator=generator))
    return linear.to(dtype)


def adapter(rank: int = 4, seed: int = 0, dropout: float = 0.0, bias: bool = True, dtype=torch.float32) -> MaskedLoraLinear:
    """An adapter with a non-zero B, so that the delta actually matters."""
    layer = MaskedLoraLinear(sparse_linear(seed, bias, dtype), rank, alpha=16.0, dropout=dropout)
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(OUT, rank, generator=torch.Generator().manual_seed(seed + 1)) * 0.1)
    return layer


def naive_forward(layer: MaskedLoraLinear, x: torch.Tensor, A=None, B=None, dropped=None) -> torch.Tensor:
    """x W^T + b + s drop(x) ((B A) ⊙ M)^T with plain autograd ops (dropped = drop(x) or x)."""
    A = layer.lora_A if A is None else A
    B = layer.lora_B if B is None else B
    weight = layer.base.weight
    mask = (weight != 0).to(weight.dtype)
    delta = (layer.alpha / A.shape[0]) * (B @ A) * mask
    out = x @ weight.T + (x if dropped is None else dropped) @ delta.T
    return out if layer.base.bias is None else out + layer.base.bias


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(7, IN), (2, 3, IN), (2, 1, 3, IN)])
def test_forward_equals_naive_formula(bias, shape):
    layer = adapter(bias=bias)
    x = torch.randn(*shape)
    out = layer(x)
    assert out.shape == (*shape[:-1], OUT)
    torch.testing.assert_close(out, naive_forward(layer, x), rtol=1e-5, atol=1e-5)


def test_gradients_equal_naive_autograd():
    layer = adapter(rank=5)
    x = torch.randn(3, 4, IN, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    A_ref = layer.lora_A.detach().clone().requires_grad_(True)
    B_ref = layer.lora_B.detach().clone().requires_grad_(True)
    upstream = torch.randn(3, 4, OUT)
    (layer(x) * upstream).sum().backward()
    (naive_forward(layer, x_ref, A_ref, B_ref) * upstream).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.lora_A.grad, A_ref.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.lora_B.grad, B_ref.grad, rtol=1e-5, atol=1e-5)
    assert layer.base.weight.grad is None and layer.base.bias.grad is None


def test_gradient_of_pruned_positions_does_not_reach_factors():
    """Only masked entries of g^T x feed A and B: a weight-sized check via a one-entry mask."""
    layer = adapter(rank=3)
    with torch.no_grad():
        layer.base.weight.zero_()
        layer.base.weight[2, 5] = 1.0
    layer.refresh_mask()
    x = torch.randn(6, IN)
    layer(x).sum().backward()
    grad_delta = torch.zeros(OUT, IN)
    grad_delta[2, 5] = layer.scale * x[:, 5].sum()
    torch.testing.assert_close(layer.lora_B.grad, grad_delta @ layer.lora_A.detach().T)
    torch.testing.assert_close(layer.lora_A.grad, layer.lora_B.detach().T @ grad_delta)


def test_gradcheck_one_matmul_path():
    layer = adapter(rank=3).double()
    x = torch.randn(5, IN, dtype=torch.float64, requires_grad=True)
    A = layer.lora_A.detach().clone().requires_grad_(True)
    B = layer.lora_B.detach().clone().requires_grad_(True)
    bias = layer.base.bias.detach().clone().requires_grad_(True)

    def function(x, bias, A, B):
        return MaskedLoraFunction.apply(x, None, layer.base.weight, bias, A, B, layer.scale)

    assert torch.autograd.gradcheck(function, (x, bias, A, B))


def test_gradcheck_two_path_form():
    layer = adapter(rank=3).double()
    x = torch.randn(5, IN, dtype=torch.float64, requires_grad=True)
    dropped = torch.randn(5, IN, dtype=torch.float64, requires_grad=True)
    A = layer.lora_A.detach().clone().requires_grad_(True)
    B = layer.lora_B.detach().clone().requires_grad_(True)

    def function(x, dropped, A, B):
        return MaskedLoraFunction.apply(x, dropped, layer.base.weight, None, A, B, layer.scale)

    assert torch.autograd.gradcheck(function, (x, dropped, A, B))


def test_dropout_acts_on_adapter_input_only():
    layer = adapter(dropout=0.5)
    x = torch.randn(4, 6, IN, requires_grad=True)
    torch.manual_seed(3)
    out = layer(x)
    torch.manual_seed(3)
    dropped = F.dropout(x, 0.5, training=True)
    torch.testing.assert_close(out, naive_forward(layer, x, dropped=dropped), rtol=1e-5, atol=1e-5)
    # and the gradients of that form
    x_ref = x.detach().clone().requires_grad_(True)
    A_ref = layer.lora_A.detach().clone().requires_grad_(True)
    B_ref = layer.lora_B.detach().clone().requires_grad_(True)
    out.sum().backward()
    torch.manual_seed(3)
    naive_forward(layer, x_ref, A_ref, B_ref, F.dropout(x_ref, 0.5, training=True)).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.lora_A.grad, A_ref.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.lora_B.grad, B_ref.grad, rtol=1e-5, atol=1e-5)
    # eval mode: no dropout, the one-matmul path
    layer.eval()
    torch.testing.assert_close(layer(x), naive_forward(layer, x), rtol=1e-5, atol=1e-5)


def test_effective_weight_is_not_saved_for_backward():
    """Saved tensors are only x and the layer's own tensors: no weight-sized temporary is kept."""
    layer = adapter(rank=4)
    x = torch.randn(8, IN, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer(x)
    own = {t.data_ptr() for t in (x, layer.base.weight, layer.lora_A, layer.lora_B)}
    assert saved and all(t.data_ptr() in own for t in saved)


def test_no_weight_sized_state_besides_the_base():
    """A, B are the only added tensors: the mask is read from W, not stored (1 byte per weight)."""
    layer = adapter(rank=4)
    assert list(layer.buffers()) == []
    assert {name for name, _ in layer.named_parameters()} == {"lora_A", "lora_B", "base.weight", "base.bias"}
    assert torch.equal(layer.mask, layer.base.weight != 0)


def test_merge_keeps_exact_zero_pattern_and_output():
    layer = adapter(rank=4)
    x = torch.randn(5, IN)
    before = layer(x)
    zeros_before = layer.base.weight == 0
    layer.merge()
    assert layer.merged
    assert torch.equal(layer.base.weight == 0, zeros_before)
    torch.testing.assert_close(layer(x), before, rtol=1e-5, atol=1e-5)
    merged_weight = layer.base.weight.clone()
    layer.merge()  # idempotent
    assert torch.equal(layer.base.weight, merged_weight)


def test_merge_then_unmerge_restores_weight():
    layer = adapter(rank=4)
    original = layer.base.weight.clone()
    layer.merge()
    layer.unmerge()
    assert not layer.merged
    torch.testing.assert_close(layer.base.weight, original, rtol=0, atol=1e-6)
    assert torch.equal(layer.base.weight == 0, original == 0)
    layer.unmerge()  # idempotent
    torch.testing.assert_close(layer.base.weight, original, rtol=0, atol=1e-6)


def test_unmerge_after_pruning_uses_the_new_mask():
    layer = adapter(rank=4)
    original = layer.base.weight.clone()
    layer.merge()
    with torch.no_grad():  # prune the merged weight: the smallest half of its non-zeros
        weight = layer.base.weight
        threshold = weight[weight != 0].abs().median()
        weight[weight.abs() <= threshold] = 0.0
    new_mask = layer.base.weight != 0
    layer.unmerge()
    assert torch.equal(layer.mask, new_mask)
    assert torch.equal(layer.base.weight == 0, ~new_mask)
    torch.testing.assert_close(layer.base.weight, original * new_mask, rtol=0, atol=1e-6)


def test_refresh_mask_follows_pruning():
    layer = adapter(rank=2)
    with torch.no_grad():
        layer.base.weight[:, :3] = 0.0
    layer.refresh_mask()
    assert torch.equal(layer.mask, layer.base.weight != 0)
    assert torch.all(layer.delta()[:, :3] == 0)


def test_delta_is_the_masked_scaled_product():
    layer = adapter(rank=4, dtype=torch.bfloat16)
    delta = layer.delta()
    assert delta.dtype == torch.bfloat16
    expected = layer.scale * (layer.lora_B @ layer.lora_A) * (layer.base.weight != 0)
    torch.testing.assert_close(delta, expected.detach().to(torch.bfloat16))


@pytest.mark.parametrize("method", ["keep", "svd"])
def test_grow_rank_leaves_output_unchanged(method):
    layer = adapter(rank=3)
    x = torch.randn(4, IN)
    before = layer(x).detach()
    old_A = layer.lora_A.detach().clone()
    old_param = layer.lora_A
    layer.set_rank(7, method)
    assert layer.rank == 7 and layer.lora_A.shape == (7, IN) and layer.lora_B.shape == (OUT, 7)
    assert layer.lora_A is not old_param and layer.lora_A.requires_grad
    assert torch.equal(layer.lora_A[:3], old_A)
    assert torch.all(layer.lora_B[:, 3:] == 0) and torch.any(layer.lora_A[3:] != 0)
    torch.testing.assert_close(layer(x), before, rtol=1e-5, atol=1e-5)


def test_shrink_keep_keeps_leading_rows():
    layer = adapter(rank=6)
    old_A, old_B, old_scale = layer.lora_A.detach().clone(), layer.lora_B.detach().clone(), layer.scale
    layer.set_rank(2, "keep")
    assert torch.equal(layer.lora_A, old_A[:2])
    # s' B' A' equals the old scale times the leading part of the old product
    expected = old_scale * old_B[:, :2] @ old_A[:2]
    torch.testing.assert_close(layer.scale * layer.lora_B @ layer.lora_A, expected)


def test_shrink_svd_is_the_best_rank_r_approximation():
    layer = adapter(rank=6)
    with torch.no_grad():
        layer.lora_B.normal_()
    product = (layer.scale * layer.lora_B @ layer.lora_A).detach()
    u, s, vh = torch.linalg.svd(product.double())
    best = (u[:, :2] * s[:2]) @ vh[:2]
    keep_A, keep_B = resize_factors(layer.lora_A.detach(), layer.lora_B.detach(), 2, "keep")
    layer.set_rank(2, "svd")
    svd_product = (layer.scale * layer.lora_B @ layer.lora_A).detach().double()
    torch.testing.assert_close(svd_product, best, rtol=1e-4, atol=1e-4)
    keep_product = (layer.alpha / 2) * (keep_B @ keep_A).double()
    assert (svd_product - product).norm() <= (keep_product - product).norm()
    # sqrt(S) split: both factors carry the same singular values
    torch.testing.assert_close(layer.lora_A.norm(dim=1), layer.lora_B.norm(dim=0), rtol=1e-4, atol=1e-5)


def test_shrink_svd_of_a_fresh_adapter_keeps_trainable_rows():
    layer = MaskedLoraLinear(sparse_linear(), 8, dropout=0.0)  # B = 0: B A has no direction at all
    layer.set_rank(4, "svd")
    assert torch.all(layer.lora_B == 0) and torch.all(layer.lora_A.norm(dim=1) > 0)


def test_ranks_above_eight_are_real():
    layer = adapter(rank=16)
    assert layer.lora_A.numel() == 16 * IN and layer.lora_B.numel() == OUT * 16
    x = torch.randn(9, IN)
    layer(x).square().sum().backward()
    assert torch.all(layer.lora_A.grad.norm(dim=1) > 0)  # every one of the 16 rows learns
    assert torch.all(layer.lora_B.grad.norm(dim=0) > 0)
    before = layer(x).detach()
    with torch.no_grad():
        layer.lora_A[12] += 1.0  # a row beyond 8 changes the output
    assert not torch.allclose(layer(x), before)


def test_bf16_base_weight():
    layer = adapter(rank=4, dtype=torch.bfloat16)
    assert layer.lora_A.dtype == torch.float32 and layer.lora_B.dtype == torch.float32
    x = torch.randn(2, 5, IN)
    out = layer(x.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    weight = layer.base.weight.float()
    delta = layer.scale * (layer.lora_B @ layer.lora_A) * (weight != 0)
    reference = x @ (weight + delta).T + layer.base.bias.float()
    torch.testing.assert_close(out.float(), reference.detach(), rtol=3e-2, atol=3e-2)
    out.float().sum().backward()
    assert layer.lora_A.grad.dtype == torch.float32 and layer.lora_B.grad.dtype == torch.float32


def test_autocast_runs_in_autocast_dtype():
    layer = adapter(rank=4)
    x = torch.randn(3, IN)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), naive_forward(layer, x).detach(), rtol=3e-2, atol=5e-2)


def test_merged_layer_runs_the_plain_base_and_to_linear():
    layer = adapter(rank=4)
    x = torch.randn(3, IN)
    expected = naive_forward(layer, x).detach()
    linear = layer.to_linear()
    assert type(linear) is nn.Linear and layer.merged
    torch.testing.assert_close(linear(x), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_invalid_settings_raise():
    with pytest.raises(ConfigError):
        MaskedLoraLinear(sparse_linear(), 0)
    with pytest.raises(ConfigError):
        MaskedLoraLinear(sparse_linear(), 4, dropout=1.0)
    layer = adapter(rank=4)
    with pytest.raises(ConfigError):
        layer.set_rank(2, "random")
    with pytest.raises(ConfigError):
        layer.set_rank(0)
    layer.merge()
    with pytest.raises(RuntimeError):
        layer.set_rank(6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_cpu(dtype):
    layer = adapter(rank=4, dtype=dtype)
    x = torch.randn(2, 3, IN).to(dtype)
    expected = layer(x)
    expected.float().sum().backward()
    grad_A = layer.lora_A.grad.clone()
    layer.lora_A.grad = layer.lora_B.grad = None
    layer.cuda()
    out = layer(x.cuda())
    out.float().sum().backward()
    tolerance = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(out.cpu(), expected, rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(layer.lora_A.grad.cpu(), grad_A, rtol=tolerance, atol=tolerance)
