import pytest
import torch
from torch import nn

from losa.calibration import capture_block_inputs, run_block, sequential_pass
from losa.errors import ModelError
from losa.models.registry import architecture_for_type, architecture_of

from conftest import ARCHS, tiny_model


@pytest.mark.parametrize("arch", ARCHS)
def test_registry_finds_blocks_and_linears(arch):
    model = tiny_model(arch)
    entry = architecture_of(model)
    blocks = entry.blocks(model)
    assert len(blocks) == model.config.num_hidden_layers
    linears = entry.linears(blocks[0])
    assert len(linears) == len(entry.linear_names)
    assert all(isinstance(l, nn.Linear) for l in linears.values())
    names = entry.linear_module_names(model)
    modules = dict(model.named_modules())
    assert all(isinstance(modules[n], nn.Linear) for n in names)


# (architecture, config overrides): every architecture as is, plus sliding-window attention
# narrower than the 16-token test sequences. Sliding Qwen2 mixes full-attention and
# sliding-attention blocks (``config.layer_types``), which get different masks.
CASES = {arch: (arch, {}) for arch in ARCHS} | {
    "qwen2-sliding": ("qwen2", dict(use_sliding_window=True, sliding_window=4, max_window_layers=1)),
    "mistral-sliding": ("mistral", dict(sliding_window=4)),
}


def _block_outputs_of_forward(model, arch, ids) -> list[torch.Tensor]:
    """Every block's output in the model's own forward: the intermediate hidden states, and the
    last block's via a hook (the model's last hidden state has the final norm applied)."""
    captured = []
    final = model.model.norm if arch != "opt" else model.model.decoder.final_layer_norm
    h = final.register_forward_pre_hook(lambda m, a: captured.append(a[0]))
    with torch.no_grad():
        ref = model(ids, output_hidden_states=True, use_cache=False).hidden_states
    h.remove()
    assert len(ref) == model.config.num_hidden_layers + 1
    return [*ref[1:-1], captured[0]]


@pytest.mark.parametrize("case", list(CASES))
def test_blocks_run_on_captured_inputs_reproduce_the_model(case):
    """Running the blocks one by one on captured inputs gives the model's own hidden states after
    every block, also when blocks need different masks (sliding-window attention)."""
    arch, overrides = CASES[case]
    model = tiny_model(arch, **overrides)
    if case == "qwen2-sliding":
        assert set(model.config.layer_types) == {"full_attention", "sliding_attention"}
    ids = torch.randint(0, 256, (3, 16), generator=torch.Generator().manual_seed(0))
    expected = _block_outputs_of_forward(model, arch, ids)

    acts = capture_block_inputs(model, ids, device=torch.device("cpu"), batch_size=2)
    assert acts.num_samples == 3
    by_run_block = []
    for block in architecture_of(model).blocks(model):
        acts = run_block(block, acts)
        by_run_block.append(torch.cat(acts.hidden))
    by_pass = []
    sequential_pass(model, ids, batch_size=2, after_block=lambda i, block, out: by_pass.append(torch.cat(out.hidden)))

    for i, want in enumerate(expected):
        torch.testing.assert_close(by_run_block[i], want, rtol=1e-5, atol=1e-5, msg=f"block {i} (run_block)")
        torch.testing.assert_close(by_pass[i], want, rtol=1e-5, atol=1e-5, msg=f"block {i} (sequential_pass)")


def test_capture_keeps_each_blocks_own_side_arguments_without_copies():
    """Blocks of the same kind share the model's mask / rotary tensors; the forwards come back."""
    model = tiny_model("qwen2", **CASES["qwen2-sliding"][1])
    blocks = architecture_of(model).blocks(model)
    ids = torch.randint(0, 256, (3, 16), generator=torch.Generator().manual_seed(0))
    acts = capture_block_inputs(model, ids, device=torch.device("cpu"), batch_size=2)
    assert [len(per_batch) for per_batch in acts.side] == [2, 2, 2]
    for batch in range(2):
        full, sliding, sliding_too = (acts.side[i][batch] for i in range(3))
        assert sliding["attention_mask"] is sliding_too["attention_mask"]
        assert sliding["attention_mask"] is not full["attention_mask"]
        assert sliding["position_embeddings"] is full["position_embeddings"]
    assert all("forward" not in vars(block) for block in blocks)


def test_unsupported_model_type_names_supported_ones():
    with pytest.raises(ModelError, match="llama.*mistral.*qwen2.*opt"):
        architecture_for_type("gpt2")
