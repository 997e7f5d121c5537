"""Sequential, block-by-block propagation of a calibration set (ALGORITHM.md section 5).

Block 0's inputs are captured once; then every block is processed in turn and its outputs become
the next block's inputs. A caller hooks into each block before it runs (collect statistics,
prune) and sees its outputs after (reconstruction errors). Only one block at a time needs to sit
on the compute device, and only one block's activations for the calibration set are alive, so
memory stays bounded by the model plus one block's activations.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from losa.models.registry import Architecture, architecture_of


@dataclass
class BlockInputs:
    """The calibration activations entering one block: per batch the hidden states and the other
    arguments transformers passed (attention mask, position ids / rotary embeddings, ...)."""

    hidden: list[torch.Tensor]
    kwargs: list[dict]

    @property
    def num_samples(self) -> int:
        return sum(h.shape[0] for h in self.hidden)


class _Captured(Exception):
    """Raised by the pre-hook on block 0 to stop the forward pass once its inputs are captured."""


def _move_except_blocks(model: nn.Module, arch: Architecture, device: torch.device) -> None:
    """Move everything but the decoder blocks (embeddings, rotary tables, final norm, head)."""
    blocks = arch.blocks(model)
    block_params = {id(p) for p in blocks.parameters()} | {id(b) for b in blocks.buffers()}
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if id(param) not in block_params and param.device != device:
                param.data = param.data.to(device)
        for name, buf in list(module.named_buffers(recurse=False)):
            if id(buf) not in block_params and buf.device != device:
                module._buffers[name] = buf.to(device)


@contextlib.contextmanager
def on_device(module: nn.Module, device: torch.device) -> Iterator[nn.Module]:
    """Temporarily move one module (a block) to the compute device."""
    original = next(module.parameters()).device
    module.to(device)
    try:
        yield module
    finally:
        module.to(original)


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module, input_ids: torch.Tensor, *, device: torch.device, batch_size: int = 8
) -> BlockInputs:
    """Run the model up to block 0 on every calibration batch and keep what block 0 receives."""
    arch = architecture_of(model)
    _move_except_blocks(model, arch, device)
    first = arch.blocks(model)[0]
    hidden, kwargs = [], []

    def grab(module, args, kw):
        hidden.append(args[0] if args else kw.pop("hidden_states"))
        kwargs.append({k: v for k, v in kw.items() if k not in ("hidden_states", "cache", "past_key_values")})
        raise _Captured

    handle = first.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for start in range(0, input_ids.shape[0], batch_size):
            with contextlib.suppress(_Captured):
                model(input_ids[start : start + batch_size].to(device), use_cache=False)
    finally:
        handle.remove()
    return BlockInputs(hidden, kwargs)


@torch.no_grad()
def run_block(block: nn.Module, inputs: BlockInputs) -> BlockInputs:
    """The block's outputs on every calibration batch (same side arguments)."""
    outputs = []
    for hidden, kw in zip(inputs.hidden, inputs.kwargs):
        out = block(hidden, **kw)
        outputs.append(out[0] if isinstance(out, (tuple, list)) else out)
    return BlockInputs(outputs, inputs.kwargs)


BlockHook = Callable[[int, nn.Module, BlockInputs], None]


@torch.no_grad()
def sequential_pass(
    model: nn.Module,
    input_ids: torch.Tensor,
    *,
    device: torch.device | str = "cpu",
    batch_size: int = 8,
    before_block: BlockHook | None = None,
    after_block: BlockHook | None = None,
    desc: str = "blocks",
) -> None:
    """Propagate ``input_ids`` through the decoder one block at a time.

    ``before_block(i, block, inputs)`` may change the block (prune it); the block then runs on
    ``inputs`` and ``after_block(i, block, outputs)`` sees what it produced, which is also what
    block ``i + 1`` receives. Block ``i``'s inputs are thus the outputs of the already-processed
    block ``i - 1`` (SparseGPT / Wanda sequential calibration). Without ``after_block`` the last
    block is not run at all.
    """
    device = torch.device(device)
    arch = architecture_of(model)
    home = next(model.parameters()).device
    was_training = model.training
    model.eval()
    acts = capture_block_inputs(model, input_ids, device=device, batch_size=batch_size)
    blocks = arch.blocks(model)
    for i in tqdm(range(len(blocks)), desc=desc, leave=False, unit="block"):
        with on_device(blocks[i], device) as block:
            if before_block is not None:
                before_block(i, block, acts)
            if after_block is None and i == len(blocks) - 1:
                break  # nothing reads the last block's outputs: skip its forward
            acts = run_block(block, acts)
            if after_block is not None:
                after_block(i, block, acts)
    _move_except_blocks(model, arch, home)
    model.train(was_training)
