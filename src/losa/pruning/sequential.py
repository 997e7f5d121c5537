"""The sequential pruning driver: block by block, every prunable linear layer of a block."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from losa.calibration import BlockInputs, sequential_pass
from losa.errors import ConfigError
from losa.models.registry import architecture_of
from losa.pruning import make_pruner
from losa.pruning.patterns import Pattern


@dataclass
class LayerSparsity:
    name: str  # full module name
    block: int
    target: str  # requested pattern, e.g. "0.7" or "2:4"
    sparsity: float  # achieved fraction of zeros
    numel: int

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def expand_patterns(pattern: Pattern | Sequence[Pattern], num_blocks: int) -> list[Pattern]:
    """One pattern for every block: a single pattern is shared, a list must have one per block."""
    if isinstance(pattern, Pattern):
        return [pattern] * num_blocks
    patterns = list(pattern)
    if len(patterns) != num_blocks:
        raise ConfigError(
            f"got {len(patterns)} per-block sparsity patterns for a model with {num_blocks} blocks; "
            "give exactly one per block"
        )
    return patterns


def check_patterns(model: nn.Module, patterns: Sequence[Pattern]) -> None:
    """Fail before any work if an N:M pattern does not fit a layer's input width."""
    arch = architecture_of(model)
    for block, pattern in zip(arch.blocks(model), patterns):
        for linear in arch.linears(block).values():
            pattern.check_width(linear.in_features)


class _StatsDone(Exception):
    """Raised after the block's last prunable layer has seen its input: the rest is not needed."""


def prune_block(block: nn.Module, inputs: BlockInputs | None, method: str, pattern: Pattern, linear_names) -> None:
    """Prune every listed linear layer of one block from the statistics of its inputs.

    ``linear_names`` are in execution order. Layers fed the very same tensor (q/k/v, gate/up)
    share one statistics object, and each calibration forward stops at the last layer.
    """
    linears = {name: block.get_submodule(name) for name in linear_names}
    linears = {name: getattr(m, "base", m) for name, m in linears.items()}
    device = next(block.parameters()).device
    pruners = {name: make_pruner(method, lin.in_features, device=device) for name, lin in linears.items()}
    owner = {name: name for name in linears}  # whose statistics a layer uses
    if inputs is not None and any(p.needs_inputs for p in pruners.values()):
        # inputs seen in this forward, with the first layer that accumulated each; holding the
        # tensors keeps their memory from being reused, so identity (not address) decides sharing
        seen: list[tuple[torch.Tensor, str]] = []
        last = list(linears)[-1]

        def collect(name):
            # a pre-hook: raising in the last layer's hook also skips that layer's own matmul
            def hook(module, args):
                x = args[0]
                first = next((n for t, n in seen if t is x), None)
                if first is None:
                    seen.append((x, name))
                    pruners[name].add_batch(x)
                else:
                    owner[name] = first
                if name == last:
                    raise _StatsDone

            return hook

        hooks = [lin.register_forward_pre_hook(collect(name)) for name, lin in linears.items()]
        try:
            for hidden, kwargs in zip(inputs.hidden, inputs.kwargs):
                seen.clear()
                try:
                    block(hidden, **kwargs)
                except _StatsDone:
                    pass
        finally:
            for h in hooks:
                h.remove()
    for name, lin in linears.items():
        lin.weight.data = pruners[owner[name]].prune(lin.weight.data, pattern)
    del pruners  # free the Hessians


def layer_sparsities(model: nn.Module, patterns: Sequence[Pattern] | None = None) -> list[LayerSparsity]:
    """Achieved sparsity of every prunable linear layer."""
    arch = architecture_of(model)
    rows = []
    for i, block in enumerate(arch.blocks(model)):
        for name, linear in arch.linears(block).items():
            w = linear.weight
            rows.append(
                LayerSparsity(
                    name=f"{arch.blocks_path}.{i}.{name}",
                    block=i,
                    target=str(patterns[i]) if patterns is not None else "",
                    sparsity=float((w == 0).sum().item() / w.numel()),
                    numel=w.numel(),
                )
            )
    return rows


def prune_model(
    model: nn.Module,
    calib_ids: torch.Tensor | None,
    *,
    method: str,
    pattern: Pattern | Sequence[Pattern],
    device: torch.device | str = "cpu",
    batch_size: int = 8,
) -> list[LayerSparsity]:
    """Prune every block of ``model`` in place, sequentially; returns per-layer achieved sparsity.

    ``pattern`` is one pattern for all blocks or one per block (LoSA's layer-wise rates, mixed N:M).
    Magnitude pruning needs no calibration data (``calib_ids`` may be None).
    """
    arch = architecture_of(model)
    patterns = expand_patterns(pattern, len(arch.blocks(model)))
    check_patterns(model, patterns)
    needs_inputs = make_pruner(method, 8).needs_inputs  # also validates the method name before any work

    def prune(i, block, inputs):
        prune_block(block, inputs, method, patterns[i], arch.linear_names)

    if calib_ids is None:
        if needs_inputs:
            raise ConfigError(f"{method} needs calibration data; pass --calib")
        for i, block in enumerate(arch.blocks(model)):
            prune(i, block, None)
    else:
        sequential_pass(model, calib_ids, device=device, batch_size=batch_size, before_block=prune, desc=f"{method}")
    return layer_sparsities(model, patterns)
