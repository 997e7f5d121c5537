"""Layer pruners: magnitude, Wanda and SparseGPT behind one interface.

The sequential driver creates one pruner per linear layer, feeds it that layer's calibration
inputs with `add_batch` (if `needs_inputs`), then calls `prune(weight, pattern)` and writes the
returned weight back. Every pruner computes in float32 and returns the weight's own dtype and
device; weights that are already zero stay zero, so repeated pruning only adds zeros.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor

from losa.errors import ConfigError
from losa.pruning.magnitude import magnitude_scores
from losa.pruning.masks import keep_mask, nm_keep_mask, unstructured_keep_mask
from losa.pruning.patterns import Pattern
from losa.pruning.sparsegpt import HessianStats, sparsegpt_prune
from losa.pruning.wanda import InputNormStats, wanda_scores

__all__ = [
    "HessianStats",
    "InputNormStats",
    "LayerPruner",
    "MagnitudePruner",
    "PRUNERS",
    "Pattern",
    "SparseGPTPruner",
    "WandaPruner",
    "keep_mask",
    "magnitude_scores",
    "make_pruner",
    "nm_keep_mask",
    "sparsegpt_prune",
    "unstructured_keep_mask",
    "wanda_scores",
]


class LayerPruner(ABC):
    """Prunes one linear layer; sees the layer's inputs first if `needs_inputs`."""

    needs_inputs: bool = True

    def __init__(self, in_features: int, device: torch.device | str | None = None) -> None:
        self.in_features = in_features
        self.device = device

    @abstractmethod
    def add_batch(self, x: Tensor) -> None:
        """Record a batch of the layer's inputs, shape (..., in_features)."""

    @abstractmethod
    def prune(self, weight: Tensor, pattern: Pattern) -> Tensor:
        """Return the pruned weight (same shape, dtype and device as `weight`)."""

    def _check(self, weight: Tensor, pattern: Pattern, seen_tokens: int | None = None) -> None:
        if weight.dim() != 2 or weight.shape[1] != self.in_features:
            raise ValueError(f"expected a weight of shape (out, {self.in_features}), got {tuple(weight.shape)}")
        pattern.check_width(self.in_features)
        if seen_tokens == 0:
            raise RuntimeError(f"{type(self).__name__}.prune called before any add_batch")


def _apply_mask(weight: Tensor, keep: Tensor) -> Tensor:
    """A new weight tensor with zeros where `keep` is False."""
    return weight.detach().masked_fill(~keep.to(weight.device), 0)


class MagnitudePruner(LayerPruner):
    """Prune the smallest |W| of every row (unstructured) or group (N:M)."""

    needs_inputs = False

    def add_batch(self, x: Tensor) -> None:
        """Magnitude pruning ignores the inputs."""

    def prune(self, weight: Tensor, pattern: Pattern) -> Tensor:
        self._check(weight, pattern)
        keep = keep_mask(magnitude_scores(weight), pattern, pruned=weight == 0)
        return _apply_mask(weight, keep)


class WandaPruner(LayerPruner):
    """Prune the lowest |W_ij| * ||X_j||_2 of every row (unstructured) or group (N:M)."""

    needs_inputs = True

    def __init__(self, in_features: int, device: torch.device | str | None = None) -> None:
        super().__init__(in_features, device)
        self.stats = InputNormStats(in_features, device)

    def add_batch(self, x: Tensor) -> None:
        self.stats.add_batch(x)

    def prune(self, weight: Tensor, pattern: Pattern) -> Tensor:
        self._check(weight, pattern, self.stats.num_tokens)
        keep = keep_mask(wanda_scores(weight, self.stats.sq_norm), pattern, pruned=weight == 0)
        return _apply_mask(weight, keep)


class SparseGPTPruner(LayerPruner):
    """OBS pruning with reconstruction of the surviving weights (blocks of 128, 1 % dampening)."""

    needs_inputs = True

    def __init__(
        self,
        in_features: int,
        device: torch.device | str | None = None,
        blocksize: int = 128,
        percdamp: float = 0.01,
    ) -> None:
        super().__init__(in_features, device)
        self.stats = HessianStats(in_features, device)
        self.blocksize = blocksize
        self.percdamp = percdamp

    def add_batch(self, x: Tensor) -> None:
        self.stats.add_batch(x)

    def prune(self, weight: Tensor, pattern: Pattern) -> Tensor:
        self._check(weight, pattern, self.stats.num_tokens)
        return sparsegpt_prune(weight, self.stats.hessian, pattern, self.blocksize, self.percdamp)


PRUNERS: dict[str, type[LayerPruner]] = {
    "magnitude": MagnitudePruner,
    "wanda": WandaPruner,
    "sparsegpt": SparseGPTPruner,
}


def make_pruner(name: str, in_features: int, device: torch.device | str | None = None) -> LayerPruner:
    """A fresh pruner by name: one of PRUNERS."""
    try:
        cls = PRUNERS[name.lower().strip()]
    except (KeyError, AttributeError):
        raise ConfigError(f"unknown pruner {name!r}; choose one of: {', '.join(PRUNERS)}") from None
    return cls(in_features, device)
