import pytest
import torch
from torch import nn

from losa.calibration import capture_block_inputs, run_block
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


@pytest.mark.parametrize("arch", ARCHS)
def test_blocks_run_on_captured_inputs_reproduce_the_model(arch):
    """Running the blocks one by one on captured inputs gives the model's own final hidden state."""
    model = tiny_model(arch)
    ids = torch.randint(0, 256, (3, 16), generator=torch.Generator().manual_seed(0))
    acts = capture_block_inputs(model, ids, device=torch.device("cpu"), batch_size=2)
    assert acts.num_samples == 3
    for block in architecture_of(model).blocks(model):
        acts = run_block(block, acts)
    with torch.no_grad():
        ref = model(ids, output_hidden_states=True, use_cache=False).hidden_states
    # the model's last hidden state has the final norm applied; compare the pre-norm one via a hook
    captured = []
    final = model.model.norm if arch != "opt" else model.model.decoder.final_layer_norm
    h = final.register_forward_pre_hook(lambda m, a: captured.append(a[0]))
    with torch.no_grad():
        model(ids, use_cache=False)
    h.remove()
    torch.testing.assert_close(torch.cat(acts.hidden), captured[0], rtol=1e-5, atol=1e-5)
    assert len(ref) == model.config.num_hidden_layers + 1


def test_unsupported_model_type_names_supported_ones():
    with pytest.raises(ModelError, match="llama.*mistral.*qwen2.*opt"):
        architecture_for_type("gpt2")
