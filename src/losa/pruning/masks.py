"""Keep masks from importance scores. True = the weight survives.

Scores have the shape of a linear layer's weight, (out_features, in_features); higher = more
important. `pruned` (bool, True = the weight is already zero) is always pruned again, so pruning
an already sparse layer only ever adds zeros. Ties are broken by position (stable sort), which makes
every mask deterministic.
"""

from __future__ import annotations

import torch
from torch import Tensor

from losa.pruning.patterns import Pattern


def _sort_key(scores: Tensor, pruned: Tensor | None) -> Tensor:
    """Scores as float32 with the already-pruned weights pushed below every real score."""
    key = scores.detach().float()
    if pruned is not None:
        if pruned.shape != scores.shape:
            raise ValueError(f"pruned mask shape {tuple(pruned.shape)} != scores shape {tuple(scores.shape)}")
        key = key.masked_fill(pruned.to(key.device, torch.bool), float("-inf"))
    return key


def prune_lowest(scores: Tensor, num_pruned: Tensor) -> Tensor:
    """Keep mask that prunes the `num_pruned[i]` lowest entries of every row i of `scores`."""
    order = torch.sort(scores, dim=-1, stable=True).indices
    # rank[i, j] = position of entry j in the ascending order of row i
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(scores.shape[-1], device=scores.device).expand_as(order))
    return rank >= num_pruned.to(rank.device).unsqueeze(-1)


def unstructured_keep_mask(scores: Tensor, sparsity: float, pruned: Tensor | None = None) -> Tensor:
    """Prune the `int(in_features * sparsity)` lowest scores of every output row (Wanda's group).

    Already-pruned weights are pruned first; a row that already has more zeros keeps them all.
    """
    Pattern.unstructured(sparsity)  # validates the rate
    key = _sort_key(scores, pruned)
    per_row = torch.full((key.shape[0],), int(key.shape[1] * sparsity), dtype=torch.long, device=key.device)
    if pruned is not None:
        per_row = torch.maximum(per_row, torch.isneginf(key).sum(dim=1))
    return prune_lowest(key, per_row)


def nm_keep_mask(scores: Tensor, n: int, m: int, pruned: Tensor | None = None) -> Tensor:
    """In every group of `m` consecutive input weights of a row keep the `n` highest scores.

    Already-pruned weights never survive (their group may then keep fewer than `n`).
    """
    Pattern.nm(n, m).check_width(scores.shape[1])
    key = _sort_key(scores, pruned)
    rows, cols = key.shape
    groups = key.reshape(rows, cols // m, m)
    order = torch.sort(groups, dim=-1, descending=True, stable=True).indices
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, order[..., :n], True)
    keep = keep.reshape(rows, cols)
    if pruned is not None:
        keep &= ~pruned.to(keep.device, torch.bool)
    return keep


def keep_mask(scores: Tensor, pattern: Pattern, pruned: Tensor | None = None) -> Tensor:
    """Keep mask of `pattern` (unstructured row-wise or N:M) from importance scores."""
    if pattern.is_nm:
        return nm_keep_mask(scores, pattern.n, pattern.m, pruned)
    return unstructured_keep_mask(scores, pattern.sparsity, pruned)


def meets_pattern(keep: Tensor, pattern: Pattern) -> bool:
    """Whether a keep mask is at least as sparse as ``pattern`` asks.

    N:M: no group of ``m`` keeps more than ``n``. Unstructured: at least ``numel * sparsity`` pruned,
    less at most one weight per row (the pruners round each row's, or each SparseGPT column block's,
    count down). More zeros are allowed: masks only grow, and a model may arrive already sparse.
    """
    if pattern.is_nm:
        pattern.check_width(keep.shape[1])
        return bool((keep.reshape(keep.shape[0], -1, pattern.m).sum(dim=-1) <= pattern.n).all())
    pruned = int((~keep).sum())
    return pruned >= keep.numel() * pattern.sparsity - keep.shape[0]
