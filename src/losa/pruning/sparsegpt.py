"""SparseGPT (Frantar & Alistarh, 2023): one-shot OBS pruning with weight reconstruction.

For a linear layer with inputs X (tokens x in_features) the loss of changing W to W' is
||X W^T - X W'^T||^2 = sum_rows (w - w')^T H (w - w') / 2 with H = 2/N X^T X. Columns are
processed left to right; pruning a weight w_q moves the error (w_q / [H^-1]_qq) onto the not yet
processed columns through the upper Cholesky factor of H^-1 (the OBS update), done lazily in
column blocks. The mask is chosen adaptively from w^2 / [H^-1]_qq^2 once per block (unstructured)
or once per group of M columns (N:M), using the already updated weights.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from losa.pruning.masks import nm_keep_mask, prune_lowest
from losa.pruning.patterns import Pattern


def add_upper_gram_(gram: Tensor, x: Tensor, panel: int) -> Tensor:
    """gram += x^T x on and above the diagonal only, in row panels of ``panel`` rows; returns gram.

    x^T x is symmetric, so panel i needs only the columns from i on: about half the multiply-adds
    of one full GEMM (5/8 with 4 panels, 9/16 with 8). Entries below the diagonal blocks are left
    untouched; ``symmetrize_upper`` rebuilds the full matrix.
    """
    n = gram.shape[0]
    for i in range(0, n, panel):
        gram[i : i + panel, i:].addmm_(x[:, i : i + panel].T, x[:, i:])
    return gram


def symmetrize_upper(gram: Tensor) -> Tensor:
    """The full symmetric matrix whose upper triangle (with the diagonal) is that of ``gram``."""
    full = gram.triu()
    return full.add_(full.T.tril(-1))  # one temporary besides the result (Hessians can be large)


class HessianStats:
    """H = 2/N * sum_t x_t x_t^T over all N calibration tokens, as a running float32 average.

    Only the upper triangle is accumulated (``add_upper_gram_``): SparseGPT's calibration time is
    dominated by these products, and a symmetric matrix needs about half of the work.
    """

    def __init__(self, in_features: int, device: torch.device | str | None = None) -> None:
        self.in_features = in_features
        self.num_tokens = 0
        # 8 panels at most (few kernel launches on GPUs), at least 64 rows each (efficient GEMMs)
        self.panel = max(64, math.ceil(in_features / 8))
        self._upper = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)

    @torch.no_grad()
    def add_batch(self, x: Tensor) -> None:
        """Accumulate a batch of layer inputs of shape (..., in_features)."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input width {x.shape[-1]} != in_features {self.in_features}")
        x = x.detach().reshape(-1, self.in_features).to(self._upper.device, torch.float32)
        if x.shape[0] == 0:
            return
        # Rescale the running average instead of summing raw outer products: stays O(1) in magnitude.
        total = self.num_tokens + x.shape[0]
        self._upper *= self.num_tokens / total
        self.num_tokens = total
        x = x * math.sqrt(2.0 / total)
        add_upper_gram_(self._upper, x, self.panel)

    @property
    def hessian(self) -> Tensor:
        """(in_features, in_features) float32, symmetric (a new tensor on every access)."""
        return symmetrize_upper(self._upper)


def inverse_hessian_cholesky(hessian: Tensor, percdamp: float = 0.01) -> Tensor:
    """Upper Cholesky factor U of (H + damp I)^-1, damp = percdamp * mean(diag H).

    Row q of U (from the diagonal on) is the OBS update direction of column q once the columns
    before it are fixed. If float32 round-off leaves the matrix indefinite, dampening grows tenfold.
    """
    H = hessian.float()
    diag = torch.arange(H.shape[0], device=H.device)
    damp = percdamp * H.diagonal().mean().clamp_min(torch.finfo(torch.float32).tiny)
    for _ in range(6):
        damped = H.clone()
        damped[diag, diag] += damp
        lower, info = torch.linalg.cholesky_ex(damped)
        if info.item() == 0:
            upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
            if info.item() == 0:
                return upper
        damp = damp * 10
    raise RuntimeError("SparseGPT: the Hessian is not positive definite even after heavy dampening")


@torch.no_grad()
def sparsegpt_prune(
    weight: Tensor,
    hessian: Tensor,
    pattern: Pattern,
    blocksize: int = 128,
    percdamp: float = 0.01,
) -> Tensor:
    """Prune `weight` (out_features, in_features) to `pattern` with OBS updates of the survivors.

    Weights that are already zero are pruned again (they stay zero). Inputs that never fire
    (H_jj == 0) cost nothing to prune and are pruned first. Unstructured: block b prunes the lowest
    scores of the whole block so that the layer total after it is int(rows * i2 * sparsity), i2 the
    block end; the layer ends at exactly int(numel * sparsity) zeros unless it already had more.
    Returns a new tensor of `weight`'s dtype and device with exact zeros where pruned.
    """
    rows, cols = weight.shape
    if hessian.shape != (cols, cols):
        raise ValueError(f"hessian shape {tuple(hessian.shape)} does not match in_features {cols}")
    pattern.check_width(cols)
    if pattern.is_nm:  # an N:M group must not straddle two blocks
        blocksize = max(pattern.m, blocksize // pattern.m * pattern.m)

    W = weight.detach().to(torch.float32, copy=True)
    already_pruned = W == 0
    H = hessian.detach().to(W.device, torch.float32, copy=True)
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0  # decouples the dead inputs; their weights get no updates and give none
    Hinv = inverse_hessian_cholesky(H, percdamp)

    num_pruned = 0
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()
        Hinv1 = Hinv[i1:i2, i1:i2]
        d = Hinv1.diagonal()
        forced1 = already_pruned[:, i1:i2]
        dead1 = dead[i1:i2]
        Err1 = torch.zeros_like(W1)

        if not pattern.is_nm:
            score = _obs_scores(W1, d, dead1, forced1)
            goal = int(rows * i2 * pattern.sparsity) - num_pruned
            count = min(max(goal, int(forced1.sum())), score.numel())
            keep1 = prune_lowest(score.reshape(1, -1), torch.tensor([count], device=W.device)).reshape(score.shape)
            num_pruned += count
        else:
            keep1 = torch.ones_like(W1, dtype=torch.bool)

        for i in range(i2 - i1):
            if pattern.is_nm and i % pattern.m == 0:
                g = slice(i, i + pattern.m)
                score = _obs_scores(W1[:, g], d[g], dead1[g], forced1[:, g])
                keep1[:, g] = nm_keep_mask(score, pattern.n, pattern.m, pruned=forced1[:, g])
            w = W1[:, i]
            q = w * keep1[:, i]
            err = (w - q) / d[i]
            W1[:, i:] -= err.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0)
            W1[:, i] = q  # exact zeros where pruned
            Err1[:, i] = err

        W[:, i1:i2] = W1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    return W.to(weight.dtype)


def _obs_scores(w: Tensor, d: Tensor, dead: Tensor, forced: Tensor) -> Tensor:
    """OBS saliency w^2 / [H^-1]_qq^2; dead inputs score 0, already-pruned weights -inf."""
    score = w.square() / d.square().unsqueeze(0)
    score = score.masked_fill(dead.unsqueeze(0), 0.0)
    return score.masked_fill(forced, float("-inf"))
