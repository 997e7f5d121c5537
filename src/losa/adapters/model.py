"""Put masked adapters into a model, resize, merge and remove them, save and restore their state.

Layers are named by their full module names from `model.named_modules()` (e.g.
"model.layers.0.self_attn.q_proj"); an adapted layer keeps its name and holds the original
nn.Linear as `.base`.
"""

import torch.nn as nn
from torch import Tensor

from losa.adapters.layer import MaskedLoraLinear
from losa.errors import ConfigError


def _replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _get_module(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError as error:
        raise ConfigError(f"the model has no module named {name!r}; use names from model.named_modules()") from error


def inject_adapters(
    model: nn.Module, ranks: dict[str, int], alpha: float = 16.0, dropout: float = 0.1
) -> dict[str, MaskedLoraLinear]:
    """Replace each named nn.Linear with a MaskedLoraLinear of the given rank; freeze everything else.

    Returns the new adapter layers by name. Only the adapters' A and B are left trainable.
    """
    targets = {}
    for name, rank in ranks.items():
        module = _get_module(model, name)
        if isinstance(module, MaskedLoraLinear):
            raise ConfigError(f"{name!r} already has an adapter; use set_ranks to change its rank")
        if not isinstance(module, nn.Linear):
            raise ConfigError(f"{name!r} is a {type(module).__name__}, not an nn.Linear; only linear layers can be adapted")
        targets[name] = (module, rank)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    layers = {}
    for name, (module, rank) in targets.items():
        layers[name] = MaskedLoraLinear(module, rank, alpha=alpha, dropout=dropout)
        _replace_module(model, name, layers[name])
    return layers


def adapter_layers(model: nn.Module) -> dict[str, MaskedLoraLinear]:
    """All adapter layers of the model by full module name."""
    return {name: module for name, module in model.named_modules() if isinstance(module, MaskedLoraLinear)}


def _layers_named(model: nn.Module, names) -> dict[str, MaskedLoraLinear]:
    layers = adapter_layers(model)
    unknown = sorted(set(names) - set(layers))
    if unknown:
        raise ConfigError(f"no adapter on {unknown[:3]}{' ...' if len(unknown) > 3 else ''}; inject_adapters first")
    return layers


def set_ranks(model: nn.Module, ranks: dict[str, int], method: str = "keep") -> None:
    """Resize the named adapters (grow: output unchanged; shrink: "keep" leading or "svd" best)."""
    layers = _layers_named(model, ranks)
    for name, rank in ranks.items():
        layers[name].set_rank(rank, method)


def merge_adapters(model: nn.Module) -> None:
    """Merge every adapter into its base weight (sparsity pattern kept)."""
    for layer in adapter_layers(model).values():
        layer.merge()


def unmerge_adapters(model: nn.Module) -> None:
    """Subtract every merged adapter with its current mask (the merged weight's zeros)."""
    for layer in adapter_layers(model).values():
        layer.unmerge()


def refresh_masks(model: nn.Module) -> None:
    """Recompute every adapter's mask from its base weight's zeros (after pruning)."""
    for layer in adapter_layers(model).values():
        layer.refresh_mask()


def remove_adapters(model: nn.Module) -> nn.Module:
    """Merge every adapter and put its plain nn.Linear back (a standard model to save)."""
    for name, layer in adapter_layers(model).items():
        _replace_module(model, name, layer.to_linear())
    return model


def adapter_state(model: nn.Module) -> dict[str, Tensor]:
    """Copies of every adapter's factors: "<layer>.lora_A" (r x in) and "<layer>.lora_B" (out x r)."""
    state = {}
    for name, layer in adapter_layers(model).items():
        state[f"{name}.lora_A"] = layer.lora_A.detach().clone()
        state[f"{name}.lora_B"] = layer.lora_B.detach().clone()
    return state


def load_adapter_state(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Restore adapter factors saved by adapter_state; each layer's rank comes from the shapes."""
    layers = adapter_layers(model)
    expected = {f"{name}.lora_{part}" for name in layers for part in "AB"}
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ConfigError(
            f"adapter state does not match the model (missing {missing[:3]}, unexpected {unexpected[:3]}); "
            "load it into the model it was saved from, with the same adapted layers"
        )
    for name, layer in layers.items():
        if layer.merged:
            raise ConfigError(f"adapter {name!r} is merged; unmerge_adapters before loading adapter state")
        layer.set_factors(state[f"{name}.lora_A"], state[f"{name}.lora_B"])


def trainable_parameters(model: nn.Module) -> int:
    """Number of parameter elements with requires_grad."""
    return sum(parameter.numel() for parameter in model.parameters() if parameter.requires_grad)
