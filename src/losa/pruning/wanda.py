"""Wanda (Sun et al., 2023): prune by |weight| x input-feature norm, compared within each output row."""

from __future__ import annotations

import torch
from torch import Tensor


class InputNormStats:
    """Per-input-feature squared L2 norm ||X_j||^2, summed over every calibration token seen."""

    def __init__(self, in_features: int, device: torch.device | str | None = None) -> None:
        self.in_features = in_features
        self.num_tokens = 0
        self._sq_norm = torch.zeros(in_features, dtype=torch.float32, device=device)

    @torch.no_grad()
    def add_batch(self, x: Tensor) -> None:
        """Accumulate a batch of layer inputs of shape (..., in_features)."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input width {x.shape[-1]} != in_features {self.in_features}")
        x = x.detach().reshape(-1, self.in_features).to(self._sq_norm.device, torch.float32)
        self._sq_norm += x.square().sum(dim=0)
        self.num_tokens += x.shape[0]

    @property
    def sq_norm(self) -> Tensor:
        """(in_features,) float32."""
        return self._sq_norm


def wanda_scores(weight: Tensor, input_sq_norm: Tensor) -> Tensor:
    """|W_ij| * ||X_j||_2 in float32, shape of `weight`."""
    norm = input_sq_norm.detach().to(weight.device, torch.float32).sqrt()
    return weight.detach().float().abs() * norm.unsqueeze(0)
