"""Perplexity over non-overlapping windows (the Wanda / SparseGPT protocol)."""

from __future__ import annotations

import math

import torch
from torch import nn
from tqdm.auto import tqdm

from losa.errors import ConfigError


@torch.no_grad()
def perplexity(model: nn.Module, windows: torch.Tensor, *, batch_size: int = 4, device: torch.device | str | None = None) -> dict:
    """exp(mean next-token NLL) over every predicted token of every window.

    ``windows`` is (n, seqlen); each window is scored independently (no context carried over), so
    every window contributes seqlen - 1 predictions.
    """
    if windows.dim() != 2 or windows.shape[0] < 1 or windows.shape[1] < 2:
        raise ConfigError(
            f"perplexity needs at least one window of at least 2 tokens (a window of n tokens scores n - 1 "
            f"predictions), got windows of shape {tuple(windows.shape)}; use seqlen >= 2"
        )
    if batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    total_nll, total_tokens = 0.0, 0
    for start in tqdm(range(0, windows.shape[0], batch_size), desc="perplexity", leave=False, unit="batch"):
        batch = windows[start : start + batch_size].to(device)
        logits = model(batch, use_cache=False).logits.float()
        nll = nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
        )
        total_nll += nll.item()
        total_tokens += batch[:, 1:].numel()
    model.train(was_training)
    mean_nll = total_nll / total_tokens
    return {"perplexity": math.exp(mean_nll), "nll": mean_nll, "tokens": total_tokens, "windows": int(windows.shape[0])}
