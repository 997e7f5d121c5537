import pytest
import torch

from losa.models.registry import architecture_of
from losa.pruning.patterns import Pattern
from losa.pruning.sequential import layer_sparsities, prune_model
from losa.pruning.wanda import wanda_scores
from losa.errors import ConfigError

from conftest import ARCHS, tiny_model


def calib(n=4, seq=16, seed=0):
    return torch.randint(0, 256, (n, seq), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_every_prunable_layer_reaches_the_rate(arch, method):
    model = tiny_model(arch)
    layers = prune_model(model, calib(), method=method, pattern=Pattern.unstructured(0.5), batch_size=3)
    assert len(layers) == len(architecture_of(model).linear_names) * model.config.num_hidden_layers
    for layer in layers:
        assert layer.sparsity == pytest.approx(0.5, abs=1e-9)


def test_per_block_rates_and_nm():
    model = tiny_model("llama")
    rates = [Pattern.unstructured(s) for s in (0.25, 0.5, 0.75)]
    for layer in prune_model(model, calib(), method="wanda", pattern=rates):
        assert layer.sparsity == pytest.approx([0.25, 0.5, 0.75][layer.block])
    model = tiny_model("qwen2")
    prune_model(model, calib(), method="sparsegpt", pattern=Pattern.nm(2, 4))
    for block in architecture_of(model).blocks(model):
        for lin in architecture_of(model).linears(block).values():
            groups = (lin.weight != 0).view(lin.out_features, -1, 4).sum(-1)
            assert (groups == 2).all()


def test_block_inputs_are_outputs_of_already_pruned_blocks():
    """Wanda on block 1 must see activations produced by the pruned block 0 (sequential)."""
    model = tiny_model("llama")
    ids = calib()
    reference = tiny_model("llama")
    arch = architecture_of(model)
    prune_model(model, ids, method="wanda", pattern=Pattern.unstructured(0.5))
    # build the reference by hand: prune block 0, then compute block-1 q_proj inputs from the pruned model
    prune_model(reference, ids, method="wanda", pattern=[Pattern.unstructured(0.5), Pattern.unstructured(0.0), Pattern.unstructured(0.0)])
    seen = []
    q = arch.blocks(reference)[1].self_attn.q_proj
    h = q.register_forward_hook(lambda m, a, o: seen.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        reference(ids, use_cache=False)
    h.remove()
    x = torch.cat(seen)
    expected_keep = torch.zeros_like(q.weight, dtype=torch.bool)
    scores = wanda_scores(q.weight, (x.float() ** 2).sum(0))
    k = int(q.in_features * 0.5)
    idx = torch.sort(scores, dim=1, stable=True)[1][:, k:]
    expected_keep.scatter_(1, idx, True)
    got = arch.blocks(model)[1].self_attn.q_proj.weight != 0
    assert (got == expected_keep).float().mean() > 0.99  # ties aside, the same mask


def test_pruning_a_sparse_model_only_adds_zeros():
    model = tiny_model("opt")
    prune_model(model, calib(), method="wanda", pattern=Pattern.unstructured(0.3))
    before = {l.name: (dict(model.named_modules())[l.name].weight == 0).clone() for l in layer_sparsities(model)}
    prune_model(model, calib(seed=1), method="sparsegpt", pattern=Pattern.unstructured(0.6))
    for name, zeros in before.items():
        assert (dict(model.named_modules())[name].weight[zeros] == 0).all()


def test_bad_patterns_fail_before_work():
    model = tiny_model("llama")
    with pytest.raises(ConfigError, match="divide"):
        prune_model(model, calib(), method="wanda", pattern=Pattern.nm(2, 5))
    with pytest.raises(ConfigError, match="per-block"):
        prune_model(model, calib(), method="wanda", pattern=[Pattern.unstructured(0.5)] * 2)
    with pytest.raises(ConfigError, match="magnitude"):
        prune_model(model, calib(), method="obs", pattern=Pattern.unstructured(0.5))
    assert all(l.sparsity == 0 for l in layer_sparsities(model))


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_block_statistics_match_a_dense_forward_and_the_last_layer_is_not_run(arch):
    """Every layer of block 0 (shared-input layers and the last one, whose statistics are taken
    before the pass stops) is pruned from the inputs a plain dense forward gives it; the
    statistics pass never runs the last layer (only the propagation pass does, once per batch)."""
    ids = calib(n=5)
    dense = tiny_model(arch)
    arch_ = architecture_of(dense)
    inputs = {name: [] for name in arch_.linear_names}
    hooks = [
        lin.register_forward_hook(lambda m, a, o, name=name: inputs[name].append(a[0].reshape(-1, a[0].shape[-1])))
        for name, lin in arch_.linears(arch_.blocks(dense)[0]).items()
    ]
    with torch.no_grad():
        dense(ids, use_cache=False)
    for h in hooks:
        h.remove()

    model = tiny_model(arch)
    last = list(arch_.linears(arch_.blocks(model)[0]).values())[-1]
    calls = []
    last.register_forward_hook(lambda m, a, o: calls.append(a[0].numel() // a[0].shape[-1]))
    patterns = [Pattern.unstructured(0.5)] + [Pattern.unstructured(0.0)] * (model.config.num_hidden_layers - 1)
    prune_model(model, ids, method="wanda", pattern=patterns, batch_size=2)
    # the propagation pass's three batches (2, 2, 1 sequences), nothing from the statistics pass
    assert calls == [2 * ids.shape[1], 2 * ids.shape[1], ids.shape[1]]

    for name, lin in arch_.linears(arch_.blocks(model)[0]).items():
        x = torch.cat(inputs[name]).double()
        scores = wanda_scores(lin.weight.double(), (x**2).sum(0))
        keep = torch.zeros_like(lin.weight, dtype=torch.bool)
        keep.scatter_(1, torch.sort(scores, dim=1, stable=True)[1][:, lin.in_features // 2 :], True)
        dense_weight = arch_.linears(arch_.blocks(dense)[0])[name].weight
        assert torch.equal(lin.weight, dense_weight * keep), name


def test_pruning_never_runs_the_last_layer_of_the_last_block():
    """Its output feeds nothing: the statistics pass stops before it, and no propagation pass
    follows the last block."""
    model = tiny_model("llama")
    arch = architecture_of(model)
    last = list(arch.linears(arch.blocks(model)[-1]).values())[-1]
    calls = []
    last.register_forward_hook(lambda m, a, o: calls.append(1))
    prune_model(model, calib(), method="sparsegpt", pattern=Pattern.unstructured(0.5), batch_size=2)
    assert calls == []
    assert (last.weight == 0).float().mean().item() == pytest.approx(0.5)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_mixed_n_of_8_per_block_through_the_sequential_driver(arch, method):
    """A different N:8 pattern per block (LoSA's mixed N:M): in every prunable layer of block i,
    every row's groups of 8 consecutive input weights keep exactly N_i of the (all non-zero)
    dense weights; magnitude and Wanda keep them unchanged."""
    model = tiny_model(arch)
    entry = architecture_of(model)
    keeps = [1, 3, 2]
    assert len(keeps) == model.config.num_hidden_layers
    dense = {
        (i, name): lin.weight.detach().clone()
        for i, block in enumerate(entry.blocks(model))
        for name, lin in entry.linears(block).items()
    }
    assert all((w != 0).all() for w in dense.values())  # so "zero" can only mean "pruned"

    prune_model(model, calib(), method=method, pattern=[Pattern.nm(n, 8) for n in keeps], batch_size=3)
    for (i, name), before in dense.items():
        weight = entry.linears(entry.blocks(model)[i])[name].weight
        nonzeros = (weight != 0).view(weight.shape[0], -1, 8).sum(-1)
        assert (nonzeros == keeps[i]).all(), f"block {i} {name}: {nonzeros.unique().tolist()} kept, not {keeps[i]}"
        if method != "sparsegpt":  # SparseGPT updates the weights it keeps
            assert torch.equal(weight, before * (weight != 0)), f"block {i} {name}"
