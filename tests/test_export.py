"""compressed-tensors sparse export: bit-exact round trips, format detection, sizes, bad inputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from losa.errors import ConfigError, ModelError, OutputError
from losa.export import export_compressed, is_two_four, load_compressed_state_dict, two_four_keep_mask
from losa.models.registry import architecture_of
from losa.pruning.patterns import Pattern
from losa.pruning.sequential import layer_sparsities, prune_model

from conftest import tiny_model

# (arch, pattern, dtype): unstructured 50 % in fp32 and fp16, 2:4 in fp16 (qwen2 has q/k/v biases)
CASES = {
    "llama-u50-fp32": ("llama", Pattern.unstructured(0.5), torch.float32),
    "opt-u50-fp16": ("opt", Pattern.unstructured(0.5), torch.float16),
    "qwen2-2:4-fp16": ("qwen2", Pattern.nm(2, 4), torch.float16),
}


def save_pruned(directory: Path, tokenizer, arch: str, pattern: Pattern, dtype: torch.dtype, **save_kwargs):
    model = tiny_model(arch, seed=1).to(dtype)
    prune_model(model, None, method="magnitude", pattern=pattern)
    model.save_pretrained(directory, safe_serialization=True, **save_kwargs)
    tokenizer.save_pretrained(directory)
    return model


@pytest.fixture(scope="module")
def pruned(tmp_path_factory, tokenizer):
    """case -> (checkpoint dir, in-memory pruned model)."""
    root = tmp_path_factory.mktemp("pruned")
    return {case: (root / case.replace(":", ""), save_pruned(root / case.replace(":", ""), tokenizer, *spec)) for case, spec in CASES.items()}


def weights_of(directory: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for f in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(f))
    return tensors


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bit patterns of a float tensor (bit-identity, not just value equality)."""
    return t.contiguous().view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def independent_decode(stored: dict[str, torch.Tensor], fmt: str) -> dict[str, torch.Tensor]:
    """Decode an export straight from the documented layout with numpy (no losa / compressed-tensors code)."""
    dense = {}
    prefixes = {k.rsplit(".", 1)[0] for k in stored if k.endswith(".bitmask")}
    for prefix in prefixes:
        rows, cols = stored[f"{prefix}.shape"].flatten().tolist()
        packed = stored[f"{prefix}.bitmask"].numpy()
        assert packed.dtype == np.uint8 and packed.shape == (rows, (cols + 7) // 8)
        keep = np.unpackbits(packed, axis=1, count=cols, bitorder="little").astype(bool)
        values = stored[f"{prefix}.compressed"]
        if fmt == "sparse-24-bitmask":
            assert values.shape == (rows, cols // 2)
            assert (keep.reshape(rows, -1, 4).sum(-1) == 2).all()  # exactly two per group of four
        else:
            offsets = stored[f"{prefix}.row_offsets"].tolist()
            assert offsets == np.concatenate([[0], np.cumsum(keep.sum(1))[:-1]]).tolist()
        w = torch.zeros(rows, cols, dtype=values.dtype)
        w[torch.from_numpy(keep)] = values.flatten()
        dense[f"{prefix}.weight"] = w
    params = ("shape", "compressed", "bitmask", "row_offsets")
    dense.update({k: v for k, v in stored.items() if not (k.rsplit(".", 1)[0] in prefixes and k.rsplit(".", 1)[1] in params)})
    return dense


@pytest.mark.parametrize("case", list(CASES))
def test_round_trip_is_bit_identical_and_smaller(case, pruned, tmp_path):
    src, model = pruned[case]
    out = tmp_path / "export"
    report = export_compressed(src, out)

    two_four = CASES[case][1].is_nm
    fmt = "sparse-24-bitmask" if two_four else "sparse-bitmask"
    assert report["format"] == fmt
    source = weights_of(src)
    stored = weights_of(out)
    for decoded in (independent_decode(stored, fmt), load_compressed_state_dict(out)):
        assert set(decoded) == set(source)
        for name, tensor in source.items():
            assert decoded[name].dtype == tensor.dtype and decoded[name].shape == tensor.shape, name
            assert torch.equal(bits(decoded[name]), bits(tensor)), name

    # per-layer sparsity detected from the files agrees with the in-memory model
    expected = {row.name: row.sparsity for row in layer_sparsities(model)}
    assert [layer["name"] for layer in report["layers"]] == architecture_of(model).linear_module_names(model)
    assert {layer["name"]: layer["sparsity"] for layer in report["layers"]} == pytest.approx(expected)
    assert all(layer["two_four"] == two_four for layer in report["layers"])

    # config: the original plus compressed-tensors' block; tokenizer files copied byte for byte
    config = json.loads((out / "config.json").read_text())
    block = config.pop("quantization_config")
    assert config == json.loads((src / "config.json").read_text())
    assert block["quant_method"] == "compressed-tensors"
    sparsity = block["sparsity_config"]
    assert sparsity["format"] == fmt and sparsity["sparsity_structure"] == ("2:4" if two_four else "unstructured")
    assert sparsity["targets"] == [layer["name"] for layer in report["layers"]]
    numel = {row.name: row.numel for row in layer_sparsities(model)}
    assert sparsity["global_sparsity"] == pytest.approx(sum(expected[n] * numel[n] for n in numel) / sum(numel.values()))
    for f in src.iterdir():
        if f.suffix != ".safetensors" and f.name != "config.json":
            assert (out / f.name).read_bytes() == f.read_bytes(), f.name

    # sizes are the real on-disk sizes; 50 % sparse exports are smaller than dense
    def du(d):
        return sum(p.stat().st_size for p in d.iterdir())

    assert report["dense_bytes"] == du(src) and report["export_bytes"] == du(out)
    assert report["export_weight_bytes"] == sum(p.stat().st_size for p in out.glob("*.safetensors"))
    assert report["ratio"] == pytest.approx(report["export_bytes"] / report["dense_bytes"])
    assert report["ratio"] < 1 and report["weight_ratio"] < 1
    # every compressed layer costs exactly its kept values + 1 bit per weight (+ row offsets, shape)
    for layer in report["layers"]:
        rows, cols = layer["shape"]
        dense_w = source[layer["name"] + ".weight"]
        kept = rows * cols // 2 if two_four else int((dense_w != 0).sum())
        expected_bytes = kept * dense_w.element_size() + rows * ((cols + 7) // 8) + 2 * 8 + (0 if two_four else rows * 8)
        params = ("shape", "compressed", "bitmask") + (() if two_four else ("row_offsets",))
        assert sum(stored[f"{layer['name']}.{p}"].nbytes for p in params) == expected_bytes
    # the prunable weights alone vs the whole checkpoint: both ratios are reported
    params = ("shape", "compressed", "bitmask") + (() if two_four else ("row_offsets",))
    names = [layer["name"] for layer in report["layers"]]
    assert report["prunable_dense_bytes"] == sum(source[f"{n}.weight"].nbytes for n in names)
    assert report["prunable_export_bytes"] == sum(stored[f"{n}.{p}"].nbytes for n in names for p in params)
    assert report["prunable_ratio"] == pytest.approx(report["prunable_export_bytes"] / report["prunable_dense_bytes"])
    assert report["prunable_ratio"] < report["weight_ratio"] < 1  # the dense embeddings dilute the saving
    # timings: every stage measured, the total covers them
    timings = report["timings_s"]
    assert set(timings) == {"scan", "read", "compress", "write", "total"}
    assert all(t >= 0 for t in timings.values()) and timings["compress"] > 0
    assert timings["total"] >= sum(timings[k] for k in ("scan", "read", "compress", "write")) - 1e-3


def test_sharded_checkpoint_keeps_shards_and_index(tmp_path, tokenizer, monkeypatch):
    import io

    import tqdm

    src = tmp_path / "sharded"
    save_pruned(src, tokenizer, "llama", Pattern.unstructured(0.6), torch.float32, max_shard_size="40KB")
    assert (src / "model.safetensors.index.json").exists()
    out = tmp_path / "export"
    bars = []

    class Recorder(tqdm.tqdm):  # the progress bar counts every compressed tensor, across all shards
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "file": io.StringIO(), "disable": False})
            bars.append(self)

    monkeypatch.setattr(tqdm, "tqdm", Recorder)
    report = export_compressed(src, out)
    assert len(bars) == 1 and bars[0].total == len(report["layers"]) == bars[0].n
    assert len(list(src.glob("*.safetensors"))) > 1
    index = json.loads((out / "model.safetensors.index.json").read_text())
    stored_by_file = {f.name: set(load_file(f)) for f in out.glob("*.safetensors")}
    assert set(stored_by_file) == {f.name for f in src.glob("*.safetensors")}
    assert {name: shard for shard, names in stored_by_file.items() for name in names} == index["weight_map"]
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in weights_of(out).values())
    source = weights_of(src)
    decoded = load_compressed_state_dict(out)
    assert set(decoded) == set(source)
    assert all(torch.equal(bits(decoded[n]), bits(t)) for n, t in source.items())


def test_signed_zeros_come_back_as_positive_zeros(tmp_path, tokenizer):
    """A pruned -0.0 (e.g. from w * mask) is stored as a zero; all other bits survive."""
    model = tiny_model("llama", seed=2)
    prune_model(model, None, method="magnitude", pattern=Pattern.nm(2, 4))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.where(p == 0, torch.full_like(p, -0.0), p))
    model.save_pretrained(tmp_path / "src", safe_serialization=True)
    source = weights_of(tmp_path / "src")
    assert any(torch.signbit(t[t == 0]).any() for t in source.values())
    report = export_compressed(tmp_path / "src", tmp_path / "out")
    assert report["format"] == "sparse-24-bitmask"
    targets = {layer["name"] + ".weight" for layer in report["layers"]}
    decoded = load_compressed_state_dict(tmp_path / "out")
    for name, tensor in source.items():
        if name in targets:
            assert torch.equal(decoded[name], tensor)  # equal values (-0.0 == 0.0)
            assert not torch.signbit(decoded[name][decoded[name] == 0]).any()
            assert torch.equal(bits(decoded[name])[tensor != 0], bits(tensor)[tensor != 0])
        else:
            assert torch.equal(bits(decoded[name]), bits(tensor))  # non-target tensors are stored as is


def test_two_four_helpers_against_brute_force():
    torch.manual_seed(0)
    for _ in range(20):
        w = torch.randn(6, 12)
        w[torch.rand_like(w) < 0.6] = 0
        groups = w.reshape(6, 3, 4)
        assert is_two_four(w) == all((g == 0).sum().item() >= 2 for row in groups for g in row)
        if is_two_four(w):
            keep = two_four_keep_mask(w).reshape(6, 3, 4)
            assert (keep.sum(-1) == 2).all()
            assert keep[groups != 0].all()  # every non-zero is kept
    assert not is_two_four(torch.zeros(4, 6))  # width not a multiple of 4


def test_format_choice_and_bad_inputs_leave_nothing_behind(pruned, tmp_path, caplog):
    u50, _ = pruned["llama-u50-fp32"]
    nm24, _ = pruned["qwen2-2:4-fp16"]

    def listing():
        return sorted(p.name for p in tmp_path.iterdir())

    before = listing()
    with pytest.raises(ConfigError, match="unknown export format 'gguf'"):
        export_compressed(u50, tmp_path / "a", format="gguf")
    with pytest.raises(ConfigError, match="sparse-24-bitmask needs every prunable layer 2:4"):
        export_compressed(u50, tmp_path / "a", format="sparse-24-bitmask")
    with pytest.raises(ModelError, match="does not exist"):
        export_compressed(tmp_path / "missing", tmp_path / "a")
    with pytest.raises(ModelError, match="no config.json"):
        export_compressed(tmp_path, tmp_path / "a")
    assert listing() == before  # no output, no temp directories

    out = tmp_path / "b"
    assert export_compressed(nm24, out, format="sparse-bitmask")["format"] == "sparse-bitmask"  # explicit choice wins
    first = (out / "model.safetensors").read_bytes()
    with pytest.raises(OutputError, match="--overwrite"):
        export_compressed(u50, out)
    assert (out / "model.safetensors").read_bytes() == first  # untouched
    assert export_compressed(u50, out, overwrite=True)["format"] == "sparse-bitmask"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(before + ["b"])
    with pytest.raises(ModelError, match="already a compressed-tensors checkpoint"):
        export_compressed(out, tmp_path / "c")

    dense = tmp_path / "dense"
    tiny_model("llama").save_pretrained(dense, safe_serialization=True)
    with caplog.at_level("WARNING", logger="losa.export"):
        report = export_compressed(dense, tmp_path / "dense_out")
    assert report["format"] == "sparse-bitmask" and report["global_sparsity"] == 0
    assert "no zeros" in caplog.text


@pytest.mark.skipif(
    not os.environ.get("LOSA_LEGACY_COMPRESSED_TENSORS"),
    reason="set LOSA_LEGACY_COMPRESSED_TENSORS to an unpacked compressed-tensors<=0.14 (the last with sparse compressors); make test does",
)
@pytest.mark.parametrize("case", ["llama-u50-fp32", "qwen2-2:4-fp16"])
def test_legacy_compressed_tensors_decompresses_exports(case, pruned, tmp_path):
    """compressed-tensors' own ModelCompressor (<=0.14) reads the export back bit for bit, and its
    compressor writes exactly the tensors we wrote (same names, dtypes, shapes and bytes)."""
    src, _ = pruned[case]
    out = tmp_path / "export"
    export_compressed(src, out)
    script = """
import sys, torch
from safetensors.torch import load_file
import compressed_tensors
from compressed_tensors.compressors import ModelCompressor
src, out = sys.argv[1], sys.argv[2]
compressor = ModelCompressor.from_pretrained(out)
dense = dict(compressor.sparsity_compressor.decompress(out))
ref = load_file(src + "/model.safetensors")
assert set(dense) == set(ref), set(dense) ^ set(ref)
def raw(t):
    return t.contiguous().view(-1).view(torch.uint8)
for k, v in ref.items():
    assert dense[k].dtype == v.dtype and dense[k].shape == v.shape and torch.equal(raw(dense[k]), raw(v)), k
ours = load_file(out + "/model.safetensors")
targets = {k[: -len(".bitmask")] for k in ours if k.endswith(".bitmask")}
theirs = compressor.sparsity_compressor.compress(dict(ref), compression_targets=targets)
assert set(theirs) == set(ours), set(theirs) ^ set(ours)
for k, v in theirs.items():
    assert v.dtype == ours[k].dtype and v.shape == ours[k].shape and torch.equal(raw(v), raw(ours[k])), k
print("legacy", compressed_tensors.__version__, type(compressor.sparsity_compressor).__name__, len(ref), len(targets))
"""
    env = dict(os.environ, PYTHONPATH=os.environ["LOSA_LEGACY_COMPRESSED_TENSORS"])
    done = subprocess.run([sys.executable, "-c", script, str(src), str(out)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "legacy 0." in done.stdout


def test_losa_refuses_to_load_an_export(tmp_path, model_dirs):
    """transformers would silently load the compressed layers as random weights."""
    from losa.checkpoint import load_model
    from losa.errors import ModelError
    from losa.export import export_compressed

    from losa.pruning.patterns import Pattern
    from losa.pruning.sequential import prune_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dirs["llama"])
    prune_model(model, None, method="magnitude", pattern=Pattern.unstructured(0.5))
    src = tmp_path / "sparse"
    model.save_pretrained(src)
    AutoTokenizer.from_pretrained(model_dirs["llama"]).save_pretrained(src)
    export_compressed(src, tmp_path / "ct")
    with pytest.raises(ModelError, match="compressed-tensors export"):
        load_model(tmp_path / "ct")


def test_api_export_of_pickled_weights_names_its_own_fix(tmp_path):
    """The API and the CLI share the check: no --allow-pickle is suggested (export has none)."""
    p = tmp_path / "pickled"
    model = tiny_model("llama")
    model.config.save_pretrained(p)
    torch.save(model.state_dict(), p / "pytorch_model.bin")
    with pytest.raises(ModelError, match="reads safetensors only") as err:
        export_compressed(p, tmp_path / "ct")
    assert "pass --allow-pickle" not in str(err.value) and not (tmp_path / "ct").exists()
