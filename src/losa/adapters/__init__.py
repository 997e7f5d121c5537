"""Masked dynamic-rank low-rank adapters (ALGORITHM.md section 1)."""

from losa.adapters.layer import MaskedLoraLinear, masked_lora_linear, resize_factors
from losa.adapters.model import (
    adapter_layers,
    adapter_state,
    inject_adapters,
    load_adapter_state,
    merge_adapters,
    refresh_masks,
    remove_adapters,
    set_ranks,
    trainable_parameters,
    unmerge_adapters,
)

__all__ = [
    "MaskedLoraLinear",
    "adapter_layers",
    "adapter_state",
    "inject_adapters",
    "load_adapter_state",
    "masked_lora_linear",
    "merge_adapters",
    "refresh_masks",
    "remove_adapters",
    "resize_factors",
    "set_ranks",
    "trainable_parameters",
    "unmerge_adapters",
]
