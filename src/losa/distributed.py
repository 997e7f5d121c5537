"""Multi-process runs (``torchrun`` / ``accelerate launch``): who computes, who writes.

Training is distributed by the Hugging Face Trainer (DDP). Everything around it (calibration, LSR,
pruning, SRA, merging, evaluation) is deterministic for a given seed, so every process simply runs it
on its own device and arrives at the same model; only the main process writes files (run state,
output checkpoint, report), and the others wait for it where they read what it wrote.
Outside a distributed launch all of this reduces to "one process, the main one".
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch


def _state():
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def is_distributed() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def is_main_process() -> bool:
    return not is_distributed() or _state().is_main_process


def wait_for_everyone() -> None:
    if is_distributed():
        _state().wait_for_everyone()


@contextlib.contextmanager
def main_process_writes() -> Iterator[bool]:
    """``with main_process_writes() as writer: if writer: ...``: the body's writes happen on the main
    process only, and no process leaves the block before they are done."""
    try:
        yield is_main_process()
    finally:
        wait_for_everyone()


def local_device(device: str) -> str:
    """``cuda`` means this process's own GPU (``cuda:LOCAL_RANK``) in a distributed launch."""
    if is_distributed() and device == "cuda":
        return f"cuda:{_state().local_process_index}"
    return device
