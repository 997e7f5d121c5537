"""Sequential, block-by-block propagation of a calibration set (ALGORITHM.md section 5).

What every block receives is captured in one pass that computes no block: block 0's hidden states
and each block's own side arguments (masks, rotary embeddings), which differ between blocks when
some use sliding-window attention. Then every block is processed in turn and its outputs become
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

from losa.errors import ModelError
from losa.models.registry import Architecture, architecture_of

# what a block receives but must not get again when we call it: the hidden states are passed
# positionally, and the calibration passes run without a KV cache
_NOT_SIDE_ARGUMENTS = ("hidden_states", "cache", "past_key_values")


@dataclass
class BlockInputs:
    """The calibration activations entering block ``block``: per batch the hidden states, and the
    side arguments transformers passes that block (attention mask, position ids / rotary
    embeddings, ...).

    ``side[i][b]`` holds block ``i``'s side arguments for batch ``b``, for every block: they are
    not the same for all blocks (a sliding-window block gets a banded mask, a full-attention block
    a causal one). They reference the tensors the model built, so blocks of the same kind share
    one mask rather than each holding a copy.
    """

    hidden: list[torch.Tensor]
    side: list[list[dict]]
    block: int = 0

    @property
    def kwargs(self) -> list[dict]:
        """Per batch, the side arguments of the block these hidden states enter."""
        if self.block >= len(self.side):
            raise IndexError(f"these are the outputs of the last block ({len(self.side) - 1}); no block takes them")
        return self.side[self.block]

    @property
    def num_samples(self) -> int:
        return sum(h.shape[0] for h in self.hidden)


class _Captured(Exception):
    """Raised by the last block's recorder to stop the forward pass before the final norm and head."""


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


def _recorder(index: int, last: bool, hidden: list, side: list[list[dict]]) -> Callable:
    """A stand-in for block ``index``'s forward: keeps what the block was given and passes the
    hidden states through unchanged (transformers 5 decoder loops take a block's return value as
    the next hidden states), so capturing costs no block computation."""

    def record(*args, **kwargs):
        states = args[0] if args else kwargs["hidden_states"]
        if index == 0:
            hidden.append(states)
        side[index].append({k: v for k, v in kwargs.items() if k not in _NOT_SIDE_ARGUMENTS})
        if last:
            raise _Captured
        return states

    return record


@contextlib.contextmanager
def _recording(blocks: nn.ModuleList, hidden: list, side: list[list[dict]]) -> Iterator[None]:
    """Replace every block's ``forward`` by a recorder for the duration of the capture pass.

    The recorder is an instance attribute, which ``nn.Module.__call__`` prefers over the class's
    method; whatever instance attribute was there before (an accelerate wrapper) is put back.
    """
    saved = [block.__dict__.get("forward") for block in blocks]
    for i, block in enumerate(blocks):
        block.forward = _recorder(i, i == len(blocks) - 1, hidden, side)
    try:
        yield
    finally:
        for block, forward in zip(blocks, saved):
            if forward is None:
                del block.forward
            else:
                block.forward = forward


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module, input_ids: torch.Tensor, *, device: torch.device, batch_size: int = 8
) -> BlockInputs:
    """Run the model's forward on every calibration batch with each block replaced by a recorder:
    keep block 0's hidden states and every block's own side arguments."""
    arch = architecture_of(model)
    _move_except_blocks(model, arch, device)
    blocks = arch.blocks(model)
    hidden: list[torch.Tensor] = []
    side: list[list[dict]] = [[] for _ in blocks]
    with _recording(blocks, hidden, side):
        for start in range(0, input_ids.shape[0], batch_size):
            with contextlib.suppress(_Captured):
                model(input_ids[start : start + batch_size].to(device), use_cache=False)
    skipped = [i for i, calls in enumerate(side) if len(calls) != len(hidden)]
    if skipped:
        raise ModelError(f"{type(model).__name__}'s forward did not call decoder block(s) {skipped} once per batch")
    return BlockInputs(hidden, side)


@torch.no_grad()
def run_block(block: nn.Module, inputs: BlockInputs) -> BlockInputs:
    """The block's outputs on every calibration batch, which enter the next block (with that
    block's own side arguments)."""
    outputs = []
    for hidden, kw in zip(inputs.hidden, inputs.kwargs):
        out = block(hidden, **kw)
        outputs.append(out[0] if isinstance(out, (tuple, list)) else out)
    return BlockInputs(outputs, inputs.side, inputs.block + 1)


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
    ``inputs`` (the hidden states with block ``i``'s own side arguments) and
    ``after_block(i, block, outputs)`` sees what it produced, which is also what block ``i + 1``
    receives. Block ``i``'s inputs are thus the outputs of the already-processed block ``i - 1``
    (SparseGPT / Wanda sequential calibration). Without ``after_block`` the last block is not run
    at all.
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
