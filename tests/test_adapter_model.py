"""Adapters in a tiny random LlamaForCausalLM (no downloads), against merged-weight copies."""

import copy

import pytest
import torch
import torch.nn as nn
from transformers import LlamaConfig, LlamaForCausalLM

from losa.adapters import (
    MaskedLoraLinear,
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
from losa.errors import ConfigError

PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def tiny_sparse_llama(seed: int = 0) -> LlamaForCausalLM:
    """hidden 32, 2 layers, random init; every projection 50 % pruned by magnitude per row."""
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=64, max_position_embeddings=64)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and name != "lm_head":
                weight = module.weight
                threshold = weight.abs().median(dim=1, keepdim=True).values
                weight[weight.abs() <= threshold] = 0.0
    return model


def layer_ranks(model) -> dict[str, int]:
    """Different ranks per block, one of them above 8."""
    return {f"model.layers.{i}.{p}": (12 if i == 0 else 3) for i in range(model.config.num_hidden_layers) for p in PROJECTIONS}


def randomise_B(model, seed: int = 1) -> None:
    """Non-zero B so that the adapters change the model (fresh adapters are no-ops)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in adapter_layers(model).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=generator) * 0.05)


def merged_reference(original: nn.Module, adapted: nn.Module) -> nn.Module:
    """A copy of the original model whose weights are W + s (B A) ⊙ (W != 0), computed here."""
    reference = copy.deepcopy(original)
    with torch.no_grad():
        for name, layer in adapter_layers(adapted).items():
            linear = reference.get_submodule(name)
            weight = linear.weight
            linear.weight += (layer.alpha / layer.rank) * (layer.lora_B @ layer.lora_A) * (weight != 0)
    return reference


def tokens(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(seed))


def test_inject_gives_logits_of_merged_weights_and_freezes_the_rest():
    original = tiny_sparse_llama()
    model = copy.deepcopy(original)
    layers = inject_adapters(model, layer_ranks(model), dropout=0.0)
    assert set(layers) == set(layer_ranks(model)) and set(adapter_layers(model)) == set(layers)
    randomise_B(model)
    input_ids = tokens()
    with torch.no_grad():
        logits = model(input_ids).logits
        expected = merged_reference(original, model)(input_ids).logits
        assert not torch.allclose(original(input_ids).logits, expected, atol=1e-4)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-5)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(name.endswith(("lora_A", "lora_B")) for name in trainable)
    expected_count = sum(r * (layer.in_features + layer.out_features)
                         for r, layer in ((layers[n].rank, layers[n]) for n in layers))
    assert trainable_parameters(model) == expected_count


def test_remove_adapters_puts_plain_linears_with_exact_sparsity():
    original = tiny_sparse_llama()
    model = copy.deepcopy(original)
    inject_adapters(model, layer_ranks(model), dropout=0.0)
    randomise_B(model)
    input_ids = tokens()
    with torch.no_grad():
        expected = merged_reference(original, model)(input_ids).logits
    remove_adapters(model)
    assert not adapter_layers(model)
    for name in layer_ranks(model):
        linear = model.get_submodule(name)
        assert type(linear) is nn.Linear
        assert torch.equal(linear.weight == 0, original.get_submodule(name).weight == 0)
    assert set(model.state_dict()) == set(original.state_dict())  # a standard checkpoint layout
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids).logits, expected, rtol=1e-4, atol=1e-5)


def test_training_step_only_moves_adapters():
    model = tiny_sparse_llama()
    frozen = {name: p.detach().clone() for name, p in model.named_parameters()}
    inject_adapters(model, layer_ranks(model), dropout=0.1)
    model.train()
    optimiser = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    input_ids = tokens()
    losses = []
    for _ in range(3):
        loss = model(input_ids, labels=input_ids).loss
        loss.backward()
        optimiser.step()
        optimiser.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for name, parameter in model.named_parameters():
        if not name.endswith(("lora_A", "lora_B")):
            assert parameter.grad is None
            assert torch.equal(parameter, frozen[name.replace(".base.", ".")])


def test_merge_prune_unmerge_keeps_pruned_zeros():
    model = tiny_sparse_llama()
    inject_adapters(model, layer_ranks(model), dropout=0.0)
    randomise_B(model)
    originals = {name: layer.base.weight.clone() for name, layer in adapter_layers(model).items()}
    merge_adapters(model)
    with torch.no_grad():  # prune the merged weights further: one more column each
        for layer in adapter_layers(model).values():
            layer.base.weight[:, 0] = 0.0
    refresh_masks(model)
    unmerge_adapters(model)
    for name, layer in adapter_layers(model).items():
        expected = originals[name].clone()
        expected[:, 0] = 0.0
        assert torch.equal(layer.base.weight == 0, expected == 0)
        torch.testing.assert_close(layer.base.weight, expected, rtol=0, atol=1e-6)
        assert torch.equal(layer.mask, expected != 0)


def test_set_ranks_grow_keeps_logits():
    model = tiny_sparse_llama()
    inject_adapters(model, layer_ranks(model), dropout=0.0)
    randomise_B(model)
    input_ids = tokens()
    with torch.no_grad():
        before = model(input_ids).logits
    set_ranks(model, {name: 16 for name in layer_ranks(model)})
    assert all(layer.rank == 16 for layer in adapter_layers(model).values())
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids).logits, before, rtol=1e-4, atol=1e-5)


def test_adapter_state_round_trip_restores_ranks_and_logits():
    model = tiny_sparse_llama()
    inject_adapters(model, layer_ranks(model), dropout=0.0)
    randomise_B(model)
    input_ids = tokens()
    state = adapter_state(model)
    with torch.no_grad():
        expected = model(input_ids).logits
    # a resumed run: the same pruned model with freshly injected adapters of other ranks
    resumed = tiny_sparse_llama()
    inject_adapters(resumed, {name: 5 for name in layer_ranks(resumed)}, dropout=0.0)
    load_adapter_state(resumed, state)
    for name, layer in adapter_layers(resumed).items():
        assert layer.rank == layer_ranks(resumed)[name]
        assert layer.lora_A.requires_grad and layer.lora_B.requires_grad
    with torch.no_grad():
        torch.testing.assert_close(resumed(input_ids).logits, expected)
    # the saved state is a copy, not a view of live parameters
    with torch.no_grad():
        adapter_layers(model)["model.layers.0.mlp.up_proj"].lora_B.add_(1.0)
    assert not torch.equal(state["model.layers.0.mlp.up_proj.lora_B"],
                           adapter_layers(model)["model.layers.0.mlp.up_proj"].lora_B)


def test_load_adapter_state_rejects_a_mismatch():
    model = tiny_sparse_llama()
    inject_adapters(model, layer_ranks(model), dropout=0.0)
    state = adapter_state(model)
    del state["model.layers.1.mlp.up_proj.lora_A"]
    with pytest.raises(ConfigError):
        load_adapter_state(model, state)
    state = adapter_state(model)
    state["model.layers.1.mlp.up_proj.lora_A"] = torch.zeros(3, 7)
    with pytest.raises(ConfigError):
        load_adapter_state(model, state)


def test_inject_rejects_bad_names():
    model = tiny_sparse_llama()
    with pytest.raises(ConfigError):
        inject_adapters(model, {"model.layers.9.mlp.up_proj": 4})
    with pytest.raises(ConfigError):
        inject_adapters(model, {"model.embed_tokens": 4})
    inject_adapters(model, {"model.layers.0.mlp.up_proj": 4})
    assert isinstance(model.get_submodule("model.layers.0.mlp.up_proj"), MaskedLoraLinear)
    with pytest.raises(ConfigError):
        inject_adapters(model, {"model.layers.0.mlp.up_proj": 4})
    with pytest.raises(ConfigError):
        set_ranks(model, {"model.layers.1.mlp.up_proj": 4})
