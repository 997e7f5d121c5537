"""Masked low-rank adapter of one linear layer (ALGORITHM.md section 1).

    y = x (W + s * (B A) ⊙ M)^T + b        M = (W != 0),  s = alpha / r

W (and b) stay frozen; A (r x in) and B (out x r) are trained. Because the update is masked by
the sparsity pattern of W, it can be merged into W without destroying that pattern.

Efficiency: with dropout off (or in eval mode) the layer runs ONE matmul with the effective
weight W_eff = W + s (B A) ⊙ M, through a custom autograd function that does not keep W_eff for
backward (it is rebuilt there from W, M, A, B; keeping it would hold a copy of every adapted
weight matrix until backward). Per layer and step that is three large matmuls (x W_eff^T,
g W_eff, g^T x) against two for unmasked LoRA (x W^T, g W) and five for the authors' form
(base matmul plus a second matmul with the dense masked delta). LoRA dropout acts on the adapter
input only, y = x W^T + s drop(x) ((B A) ⊙ M)^T, which cannot be folded into one matmul; when
training with dropout > 0 the layer runs that exact two-path form (forward x W^T and
drop(x) Delta^T, backward g W, g Delta and g^T drop(x): five large matmuls).

The mask is not stored: it is read from W's zeros whenever needed (a compare per use, transient).
A stored bool mask would cost one byte per weight for the whole run, half the size of a bf16 base
model, while W's zeros are the mask by construction: W is frozen, pruning writes exact zeros, and
unmerge writes exact zeros off the mask.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from losa.errors import ConfigError

RESIZE_METHODS = ("keep", "svd")


# ----------------------------------------------------------------------------------------------
# pure tensor functions


def masked_delta(lora_A: Tensor, lora_B: Tensor, mask: Tensor, scale: float) -> Tensor:
    """s * (B A) ⊙ M as a new (out x in) tensor in the dtype of A and B."""
    # Scale the small factor, not the big product; multiply by the mask viewed as uint8: on CPU
    # a bool operand is first materialised as a float copy (about 3x slower, one more temporary).
    return torch.mm(lora_B * scale, lora_A).mul_(mask.view(torch.uint8))


def effective_weight(weight: Tensor, mask: Tensor, lora_A: Tensor, lora_B: Tensor, scale: float) -> Tensor:
    """W + s * (B A) ⊙ M as a new tensor (one out x in temporary, built in place)."""
    return masked_delta(lora_A, lora_B, mask, scale).add_(weight)


def masked_factor_grads(
    grad_out: Tensor, adapter_input: Tensor, mask: Tensor, lora_A: Tensor, lora_B: Tensor, scale: float,
    need_A: bool, need_B: bool,
) -> tuple[Tensor | None, Tensor | None]:
    """Gradients of A and B from 2-D grad_out (n x out) and adapter input (n x in).

    grad_delta = s (g^T x) ⊙ M; grad_A = B^T grad_delta; grad_B = grad_delta A^T. The dense
    g^T x is one (out x in) temporary; s is folded into the small factor.
    """
    grad_delta = torch.mm(grad_out.t(), adapter_input).mul_(mask.view(torch.uint8))
    grad_A = torch.mm(lora_B.t() * scale, grad_delta) if need_A else None
    grad_B = torch.mm(grad_delta, lora_A.t() * scale) if need_B else None
    return grad_A, grad_B


class MaskedLoraFunction(torch.autograd.Function):
    """Autograd function of the masked adapter; saves only tensors that already exist.

    Inputs: x (n x in), adapter_input (None: the adapter sees x itself, one-matmul path; else the
    dropped-out x, two-path form), frozen weight (out x in; its non-zeros are the mask), bias
    (out or None), A (r x in), B (out x r), scale. All floating tensors share one dtype.
    """

    @staticmethod
    def forward(ctx, x, adapter_input, weight, bias, lora_A, lora_B, scale):
        mask = weight != 0
        if adapter_input is None:
            w_eff = effective_weight(weight, mask, lora_A, lora_B, scale)
            out = torch.mm(x, w_eff.t()) if bias is None else torch.addmm(bias, x, w_eff.t())
            del w_eff
            ctx.save_for_backward(x, weight, lora_A, lora_B)
        else:
            out = torch.mm(x, weight.t()) if bias is None else torch.addmm(bias, x, weight.t())
            out.addmm_(adapter_input, masked_delta(lora_A, lora_B, mask, scale).t())
            ctx.save_for_backward(adapter_input, weight, lora_A, lora_B)
        ctx.two_path = adapter_input is not None
        ctx.scale = scale
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    def backward(ctx, grad_out):
        adapter_input, weight, lora_A, lora_B = ctx.saved_tensors
        mask = weight != 0
        need = ctx.needs_input_grad
        if need[2]:
            raise RuntimeError("MaskedLoraFunction: the base weight must be frozen (requires_grad False)")
        scale = ctx.scale
        grad_x = grad_adapter_input = grad_bias = None
        if ctx.two_path:
            if need[0]:
                grad_x = torch.mm(grad_out, weight)
            if need[1]:
                grad_adapter_input = torch.mm(grad_out, masked_delta(lora_A, lora_B, mask, scale))
        elif need[0]:
            grad_x = torch.mm(grad_out, effective_weight(weight, mask, lora_A, lora_B, scale))
        if ctx.has_bias and need[3]:
            grad_bias = grad_out.sum(0)
        grad_A, grad_B = None, None
        if need[4] or need[5]:
            grad_A, grad_B = masked_factor_grads(
                grad_out, adapter_input, mask, lora_A, lora_B, scale, need[4], need[5]
            )
        return grad_x, grad_adapter_input, None, grad_bias, grad_A, grad_B, None


def masked_lora_linear(
    x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor, scale: float,
    adapter_input: Tensor | None = None,
) -> Tensor:
    """x (W + s (B A) ⊙ M)^T + b, M = (W != 0), for x of any leading dims (adapter_input: see MaskedLoraFunction)."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    a2 = None if adapter_input is None else adapter_input.reshape(-1, x.shape[-1])
    out = MaskedLoraFunction.apply(x2, a2, weight, bias, lora_A, lora_B, scale)
    return out.reshape(*lead, weight.shape[0])


def init_lora_A_rows(rows: int, in_features: int, device, generator: torch.Generator | None = None) -> Tensor:
    """Gaussian rows for A with the variance of LoRA's kaiming-uniform(a=sqrt 5) init, 1/(3 in)."""
    std = 1.0 / math.sqrt(3.0 * in_features)
    return torch.randn(rows, in_features, device=device, generator=generator) * std


def resize_factors(
    lora_A: Tensor, lora_B: Tensor, rank: int, method: str = "keep"
) -> tuple[Tensor, Tensor]:
    """New (A, B) of `rank` such that (alpha/rank) B'A' equals (or best approximates) (alpha/r) B A.

    grow: append fresh Gaussian rows to A and zero columns to B (the product is unchanged).
    shrink "keep": the leading rows/columns (paper). shrink "svd": the best rank-`rank`
    approximation of B A (truncated SVD via QR of the thin factors, sqrt(S) split to both sides);
    directions with zero singular value are re-initialised like grown ones so they can train.
    The factor rank/r compensates the change of s = alpha/r.
    """
    if method not in RESIZE_METHODS:
        raise ConfigError(f"unknown rank resize method {method!r}; use one of {RESIZE_METHODS}")
    if rank < 1:
        raise ConfigError(f"adapter rank must be >= 1, got {rank}")
    old_rank, in_features = lora_A.shape
    ratio = rank / old_rank
    if rank >= old_rank:
        new_rows = init_lora_A_rows(rank - old_rank, in_features, lora_A.device).to(lora_A.dtype)
        new_cols = torch.zeros(lora_B.shape[0], rank - old_rank, device=lora_B.device, dtype=lora_B.dtype)
        return torch.cat([lora_A, new_rows]), torch.cat([lora_B * ratio, new_cols], dim=1)
    if method == "keep":
        return lora_A[:rank].clone(), lora_B[:, :rank] * ratio
    # B A = Qb (Rb Ra^T) Qa^T: only an r x r SVD is needed.
    q_b, r_b = torch.linalg.qr(lora_B.double())
    q_a, r_a = torch.linalg.qr(lora_A.double().t())
    u, s, vh = torch.linalg.svd(r_b @ r_a.t())
    root = (s[:rank] * ratio).sqrt()
    new_B = (q_b @ u[:, :rank]) * root
    new_A = root[:, None] * (vh[:rank] @ q_a.t())
    dead = s[:rank] <= s[0] * 1e-6 if s[0] > 0 else torch.ones(rank, dtype=torch.bool, device=s.device)
    if dead.any():
        new_A[dead] = init_lora_A_rows(int(dead.sum()), in_features, lora_A.device).double()
        new_B[:, dead] = 0.0
    return new_A.to(lora_A.dtype), new_B.to(lora_B.dtype)


# ----------------------------------------------------------------------------------------------
# the module


class MaskedLoraLinear(nn.Module):
    """y = x (W + s * (B A) ⊙ M)^T with M = (W != 0); W frozen; A (r x in), B (out x r) trainable; s = alpha / r.

    A and B are float32 whatever the base dtype; the matmuls run in the base weight's dtype (or
    the autocast dtype when autocast is on), so the output has that dtype. A merged layer runs the
    plain base layer (no gradient reaches A, B): merge for pruning/inference, unmerge to train.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float = 16.0, dropout: float = 0.1):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise ConfigError(f"MaskedLoraLinear adapts nn.Linear layers, got {type(base).__name__}")
        if rank < 1:
            raise ConfigError(f"adapter rank must be >= 1, got {rank}")
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"adapter dropout must be in [0, 1), got {dropout}")
        self.base = base
        base.weight.requires_grad_(False)
        if base.bias is not None:
            base.bias.requires_grad_(False)
        self.alpha = float(alpha)
        self.dropout = float(dropout)
        device = base.weight.device
        # LoRA's init: A kaiming-uniform (a = sqrt 5), B zero, so the adapter starts as a no-op.
        lora_A = torch.empty(rank, base.in_features, device=device)
        nn.init.kaiming_uniform_(lora_A, a=math.sqrt(5))
        self.lora_A = nn.Parameter(lora_A)
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=device))
        self.merged = False

    @property
    def rank(self) -> int:
        return self.lora_A.shape[0]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def mask(self) -> Tensor:
        """M = (W != 0), read from the base weight (merged or not: the delta is zero off M)."""
        return self.base.weight.detach() != 0

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def extra_repr(self) -> str:
        density = torch.count_nonzero(self.base.weight).item() / self.base.weight.numel()
        return f"rank={self.rank}, alpha={self.alpha}, dropout={self.dropout}, density={density:.3f}, merged={self.merged}"

    def refresh_mask(self) -> None:
        """M = (W != 0) after the base weight was pruned: nothing to do, M is always read from W."""

    def forward(self, x: Tensor) -> Tensor:
        if self.merged:
            return self.base(x)
        weight = self.base.weight
        if weight.requires_grad:
            raise RuntimeError("the base weight of a MaskedLoraLinear must stay frozen")
        device_type = x.device.type
        if torch.is_autocast_enabled(device_type):
            dtype = torch.get_autocast_dtype(device_type)
        else:
            dtype = weight.dtype
        bias = None if self.base.bias is None else self.base.bias.to(dtype)
        x = x.to(dtype)
        adapter_input = None
        if self.training and self.dropout > 0:
            adapter_input = F.dropout(x, self.dropout, training=True)
        with torch.autocast(device_type, enabled=False):
            return masked_lora_linear(
                x, weight.to(dtype), bias, self.lora_A.to(dtype), self.lora_B.to(dtype), self.scale,
                adapter_input,
            )

    def set_rank(self, rank: int, method: str = "keep") -> None:
        """Resize A, B to `rank` (see resize_factors); new Parameters replace the old ones."""
        if self.merged:
            raise RuntimeError("unmerge the adapter before changing its rank")
        if rank == self.rank:
            return
        with torch.no_grad():
            new_A, new_B = resize_factors(self.lora_A, self.lora_B, rank, method)
        self.set_factors(new_A, new_B)

    def set_factors(self, lora_A: Tensor, lora_B: Tensor) -> None:
        """Install new factors (their rank becomes the layer's rank), keeping requires_grad."""
        if lora_A.shape[1] != self.in_features or lora_B.shape[0] != self.out_features or lora_A.shape[0] != lora_B.shape[1]:
            raise ConfigError(
                f"adapter factors of shapes {tuple(lora_A.shape)} and {tuple(lora_B.shape)} do not fit a "
                f"{self.out_features} x {self.in_features} layer"
            )
        requires_grad = self.lora_A.requires_grad
        device = self.lora_A.device
        self.lora_A = nn.Parameter(lora_A.detach().to(device, torch.float32).clone(), requires_grad=requires_grad)
        self.lora_B = nn.Parameter(lora_B.detach().to(device, torch.float32).clone(), requires_grad=requires_grad)

    @torch.no_grad()
    def delta(self) -> Tensor:
        """s * (B A) ⊙ M, in the base weight's dtype (computed in float32)."""
        return masked_delta(self.lora_A.float(), self.lora_B.float(), self.mask, self.scale).to(self.base.weight.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """W += s (B A) ⊙ M, rounded once to W's dtype; zeros of W off the mask stay exact zeros."""
        if self.merged:
            return
        weight = self.base.weight
        delta = masked_delta(self.lora_A.float(), self.lora_B.float(), self.mask, self.scale)
        weight.copy_(delta.add_(weight))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W -= s (B A) ⊙ M with the CURRENT mask (the merged weight's non-zeros, so right after
        pruning the merged weight the pruned entries are left out), then exact zeros where M is False.
        """
        if not self.merged:
            return
        weight = self.base.weight
        mask = self.mask
        delta = masked_delta(self.lora_A.float(), self.lora_B.float(), mask, self.scale)
        weight.copy_(delta.neg_().add_(weight).mul_(mask.view(torch.uint8)))
        self.merged = False

    def to_linear(self) -> nn.Linear:
        """The base nn.Linear with the adapter merged in (this layer is left merged)."""
        self.merge()
        return self.base
