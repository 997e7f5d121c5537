"""RMI (linear CKA) and block importance against direct formulas on small random features."""

import math

import numpy as np
import pytest
import torch

from losa.allocation.rmi import block_importance, cka, gram_matrix, rmi_matrix
from losa.errors import ConfigError, DataError


def naive_centred_gram(features: torch.Tensor) -> np.ndarray:
    """H K H with an explicit centring matrix H = I - 1/n, all in float64 numpy."""
    flat = features.reshape(features.shape[0], -1).double().numpy()
    n = flat.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n
    return h @ (flat @ flat.T) @ h


def hsic_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """CKA = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)) with HSIC(K, L) = tr(K H L H) / (n-1)^2."""
    fx = x.reshape(x.shape[0], -1).double().numpy()
    fy = y.reshape(y.shape[0], -1).double().numpy()
    n = fx.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n
    k, l = fx @ fx.T, fy @ fy.T

    def hsic(a, b):
        return np.trace(a @ h @ b @ h) / (n - 1) ** 2

    return hsic(k, l) / math.sqrt(hsic(k, k) * hsic(l, l))


@pytest.fixture
def features():
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(8, 3, 5, generator=gen) for _ in range(4)]


def test_gram_matrix_chunked_equals_naive_float64(features):
    x = features[0]
    expected = naive_centred_gram(x)
    for chunk in (1, 4, 7, 15, 10_000):
        got = gram_matrix(x, chunk_columns=chunk)
        assert got.dtype == torch.float64 and got.shape == (8, 8)
        np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12, atol=1e-12)


def test_gram_matrix_low_precision_input_is_accumulated_in_float64(features):
    x = features[0].to(torch.bfloat16)
    got = gram_matrix(x, chunk_columns=2).numpy()
    np.testing.assert_allclose(got, naive_centred_gram(x), rtol=1e-12, atol=1e-12)


def test_centred_gram_rows_and_columns_sum_to_zero(features):
    kc = gram_matrix(features[1])
    assert torch.allclose(kc.sum(dim=0), torch.zeros(8, dtype=torch.float64), atol=1e-10)
    assert torch.allclose(kc.sum(dim=1), torch.zeros(8, dtype=torch.float64), atol=1e-10)


def test_cka_equals_hsic_trace_formula(features):
    gen = torch.Generator().manual_seed(1)
    y = torch.randn(8, 4, 6, generator=gen)  # a different feature width is fine: only n must match
    x = features[0]
    assert cka(gram_matrix(x), gram_matrix(y)) == pytest.approx(hsic_cka(x, y), rel=1e-12)
    # and the feature-space form ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F) of Kornblith et al.
    xc = x.reshape(8, -1).double() - x.reshape(8, -1).double().mean(0)
    yc = y.reshape(8, -1).double() - y.reshape(8, -1).double().mean(0)
    feature_space = (yc.T @ xc).norm() ** 2 / ((xc.T @ xc).norm() * (yc.T @ yc).norm())
    assert cka(gram_matrix(x), gram_matrix(y)) == pytest.approx(float(feature_space), rel=1e-12)


def test_cka_of_a_representation_with_itself_is_one(features):
    kc = gram_matrix(features[2])
    assert cka(kc, kc) == pytest.approx(1.0, abs=1e-14)


def test_cka_is_invariant_to_isotropic_scaling_and_orthogonal_transforms(features):
    x, y = features[0], features[1]
    flat = x.reshape(8, -1).double()
    gen = torch.Generator().manual_seed(2)
    q, _ = torch.linalg.qr(torch.randn(flat.shape[1], flat.shape[1], generator=gen, dtype=torch.float64))
    transformed = 7.3 * flat @ q
    reference = cka(gram_matrix(x), gram_matrix(y))
    assert cka(gram_matrix(transformed), gram_matrix(y)) == pytest.approx(reference, rel=1e-10)
    assert cka(gram_matrix(0.01 * x.double()), gram_matrix(y)) == pytest.approx(reference, rel=1e-10)


def test_cka_is_not_invariant_to_anisotropic_scaling(features):
    """Sanity check that the invariance test can fail: stretching one axis changes CKA."""
    x, y = features[0].reshape(8, -1).double(), features[1]
    stretched = x.clone()
    stretched[:, 0] *= 50
    assert abs(cka(gram_matrix(stretched), gram_matrix(y)) - cka(gram_matrix(x), gram_matrix(y))) > 1e-3


def test_rmi_matrix_matches_pairwise_cka(features):
    grams = [gram_matrix(f) for f in features]
    rmi = rmi_matrix(grams)
    assert rmi.shape == (4, 4) and rmi.dtype == torch.float64
    for i in range(4):
        for j in range(4):
            assert rmi[i, j].item() == pytest.approx(hsic_cka(features[i], features[j]), rel=1e-12)
    assert torch.allclose(rmi, rmi.T)
    assert torch.allclose(rmi.diagonal(), torch.ones(4, dtype=torch.float64))
    assert (rmi >= 0).all() and (rmi <= 1 + 1e-12).all()


def test_block_importance_matches_hand_computation():
    rmi = torch.tensor([[1.0, 0.5, 0.2], [0.5, 1.0, 0.4], [0.2, 0.4, 1.0]], dtype=torch.float64)
    # m = (0.7, 0.9, 0.6), sum 2.2
    expected = [math.exp(-0.7 / 2.2), math.exp(-0.9 / 2.2), math.exp(-0.6 / 2.2)]
    np.testing.assert_allclose(block_importance(rmi).numpy(), expected, rtol=1e-12)
    expected_100 = [math.exp(-100 * 0.7 / 2.2), math.exp(-100 * 0.9 / 2.2), math.exp(-100 * 0.6 / 2.2)]
    np.testing.assert_allclose(block_importance(rmi, beta=100).numpy(), expected_100, rtol=1e-12)


def test_redundant_blocks_are_less_important_than_an_independent_one():
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(16, 10, generator=gen)
    redundant = [base + 0.05 * torch.randn(16, 10, generator=gen) for _ in range(3)]
    independent = torch.randn(16, 10, generator=gen)
    importance = block_importance(rmi_matrix([gram_matrix(f) for f in [*redundant, independent]]))
    assert importance[3] > importance[:3].max()


def test_single_block_and_zero_redundancy_give_uniform_importance():
    assert block_importance(torch.ones(1, 1)).tolist() == [1.0]
    assert block_importance(torch.eye(3)).tolist() == [1.0, 1.0, 1.0]


def test_bad_inputs_raise_project_errors(features):
    with pytest.raises(ConfigError, match="at least 2"):
        gram_matrix(torch.randn(1, 4))
    with pytest.raises(DataError, match="identical"):
        rmi_matrix([gram_matrix(torch.ones(4, 3)), gram_matrix(features[0][:4])])
    with pytest.raises(DataError, match="identical"):
        cka(gram_matrix(torch.ones(4, 3)), gram_matrix(features[0][:4]))
    with pytest.raises(DataError, match="NaN"):
        gram_matrix(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]))
    with pytest.raises(ConfigError, match="beta"):
        block_importance(torch.eye(2), beta=-1.0)
