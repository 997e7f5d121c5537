"""Export a pruned checkpoint in the compressed-tensors sparse formats (smaller on disk).

Every prunable linear weight is stored as a packed bitmask of its non-zeros plus the non-zero values:

- ``sparse-bitmask`` (any sparsity): ``<layer>.shape``, ``.compressed`` (non-zeros, row-major, 1-D),
  ``.bitmask`` (uint8, bits packed little-endian along the input dimension), ``.row_offsets``
  (index into ``compressed`` where each row starts).
- ``sparse-24-bitmask`` (every layer 2:4): ``.shape`` (2 x 1), ``.compressed`` (rows x cols/2: exactly
  two kept values per group of four, zeros included where a group has more than two), ``.bitmask``.

Everything else (embeddings, norms, lm_head) is stored dense under its own name. ``config.json`` gets
the ``quantization_config`` block compressed-tensors writes for a sparse-only model (quant_method
"compressed-tensors" and a ``sparsity_config`` built with compressed-tensors' own config classes),
with ``targets`` = the prunable linear layers.

compressed-tensors 0.15+ (installed: 0.20) keeps these config classes and the bitmask packing helpers
but dropped the sparse compressors themselves, so the few lines that lay the tensors out live here,
written to the layout of compressed-tensors <= 0.14 (whose decompressor reads these exports; see
tests/test_export.py). The sparse layout stores zeros without their sign: a pruned ``-0.0`` comes
back as ``+0.0``; every other bit is preserved.

Serving: vLLM loaded sparse-24-bitmask checkpoints (CUTLASS 2:4 kernels, fp16/bf16, Hopper) from about
0.7.2 until it removed sparse support in 2026 (vllm-project/vllm#36799); unstructured sparse-bitmask was
never served by vLLM, and current vLLM / transformers do not decompress either format (transformers
silently leaves such weights uninitialised). Read exports back with ``load_compressed_state_dict``.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
import time
from pathlib import Path

import torch
from torch import Tensor

from losa.checkpoint import check_model_dir, lora_adapter_dir
from losa.errors import ConfigError, ModelError

logger = logging.getLogger(__name__)

FORMATS = ("compressed-tensors", "sparse-bitmask", "sparse-24-bitmask")  # the first picks one of the others
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_INDEX_NAME = "model.safetensors.index.json"
_PARAMS = {"sparse-bitmask": ("shape", "compressed", "bitmask", "row_offsets"), "sparse-24-bitmask": ("shape", "compressed", "bitmask")}


# ---------------------------------------------------------------- tensor layouts


def _canonical_zeros(weight: Tensor) -> Tensor:
    """``weight`` with every zero as +0.0 (the sparse layouts cannot store a zero's sign)."""
    return torch.where(weight == 0, torch.zeros((), dtype=weight.dtype), weight)


def is_two_four(weight: Tensor) -> bool:
    """Whether every group of 4 consecutive input weights of every row holds at least 2 zeros."""
    if weight.dim() != 2 or weight.shape[1] % 4 != 0:
        return False
    zeros_per_group = (weight == 0).reshape(weight.shape[0], -1, 4).sum(-1)
    return bool((zeros_per_group >= 2).all())


def bitmask_compress(weight: Tensor) -> dict[str, Tensor]:
    """sparse-bitmask tensors (local names) of a 2-D weight: non-zeros, packed mask, row offsets."""
    from compressed_tensors.utils import pack_bitmasks

    weight = _canonical_zeros(weight.detach().cpu())
    keep = weight != 0
    row_counts = keep.sum(dim=1)
    return {
        "shape": torch.tensor(list(weight.shape)),
        "compressed": weight[keep],
        "bitmask": pack_bitmasks(keep),
        "row_offsets": torch.cumsum(row_counts, 0) - row_counts,
    }


def two_four_keep_mask(weight: Tensor) -> Tensor:
    """Exactly 2 kept positions in every group of 4: the non-zeros, topped up with the earliest zeros."""
    groups = weight.reshape(weight.shape[0], -1, 4)
    # non-zeros first, then lower positions first: a deterministic choice among the zeros
    key = (groups != 0).to(torch.int8) * 8 - torch.arange(4, dtype=torch.int8)
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, key.topk(2, dim=-1).indices, True)
    return keep.reshape(weight.shape)


def sparse24_compress(weight: Tensor) -> dict[str, Tensor]:
    """sparse-24-bitmask tensors (local names) of a 2:4-sparse 2-D weight."""
    from compressed_tensors.utils import pack_bitmasks

    if not is_two_four(weight):
        raise ConfigError(f"a weight of shape {tuple(weight.shape)} is not 2:4 sparse; use format sparse-bitmask")
    weight = _canonical_zeros(weight.detach().cpu())
    keep = two_four_keep_mask(weight)
    return {
        "shape": torch.tensor(list(weight.shape)).reshape(-1, 1),
        "compressed": weight[keep].reshape(weight.shape[0], weight.shape[1] // 2),
        "bitmask": pack_bitmasks(keep),
    }


def bitmask_decompress(params: dict[str, Tensor]) -> Tensor:
    """The dense weight of either layout (both scatter the stored values in row-major mask order)."""
    from compressed_tensors.utils import unpack_bitmasks

    shape = [int(s) for s in params["shape"].flatten().tolist()]
    keep = unpack_bitmasks(params["bitmask"], shape)
    dense = torch.zeros(shape, dtype=params["compressed"].dtype)
    dense[keep] = params["compressed"].flatten()
    return dense


# ---------------------------------------------------------------- checkpoint files


def _weight_files(model_dir: Path) -> list[str]:
    """The safetensors shard names of a checkpoint, in index order if sharded."""
    index = model_dir / _INDEX_NAME
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return sorted(set(weight_map.values()))
    return sorted(p.name for p in model_dir.glob("*.safetensors"))


def _dir_bytes(directory: Path, names: list[str] | None = None) -> int:
    """Bytes of the named files of ``directory``, or of all its top-level files."""
    files = [directory / n for n in names] if names is not None else [p for p in directory.iterdir() if p.is_file()]
    return sum(p.stat().st_size for p in files)


def _check_source(model_dir: Path) -> None:
    check_model_dir(model_dir, allow_pickle=True)  # pickled weights get export's own message just below
    if not any(model_dir.glob("*.safetensors")):
        if any(model_dir.glob("*.bin")) or any(model_dir.glob("*.pt")):
            raise ModelError(
                f"{model_dir} holds only pickled weights (*.bin) and losa export reads safetensors only (it has no "
                "--allow-pickle); re-save the checkpoint as safetensors (AutoModelForCausalLM.from_pretrained(DIR)"
                ".save_pretrained(NEW_DIR) writes them) and export that"
            )
        raise ModelError(f"{model_dir} holds no *.safetensors weights; export reads safetensors checkpoints (re-save with losa prune)")
    if lora_adapter_dir(model_dir) is not None:
        logger.warning("%s keeps an unmerged LoRA adapter in lora-adapter/; the export holds the sparse base only", model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    if (config.get("quantization_config") or {}).get("quant_method") == "compressed-tensors":
        raise ModelError(f"{model_dir} is already a compressed-tensors checkpoint; export the dense pruned checkpoint instead")


def prunable_weight_names(model_dir: Path, names) -> list[str]:
    """Tensor names of the prunable linear weights (losa's registry) among ``names``, block by block."""
    from losa.checkpoint import load_config
    from losa.models.registry import architecture_for_type

    arch = architecture_for_type(load_config(model_dir).model_type)
    linears = "|".join(re.escape(n) for n in arch.linear_names)
    pattern = re.compile(rf"^{re.escape(arch.blocks_path)}\.(\d+)\.({linears})\.weight$")
    found = {}
    for name in names:
        match = pattern.match(name)
        if match:
            found[name] = (int(match.group(1)), arch.linear_names.index(match.group(2)))
    if not found:
        raise ModelError(f"no prunable linear weights ({arch.blocks_path}.N.<{'|'.join(arch.linear_names)}>.weight) in {model_dir}")
    return sorted(found, key=found.get)


def layer_report(name: str, weight: Tensor) -> dict:
    """One prunable layer: name, shape, dtype, achieved sparsity and whether it is 2:4."""
    return {
        "name": name.removesuffix(".weight"),
        "shape": list(weight.shape),
        "dtype": str(weight.dtype).removeprefix("torch."),
        "sparsity": float((weight == 0).sum().item() / weight.numel()),
        "two_four": is_two_four(weight),
    }


def choose_format(requested: str, layers: list[dict]) -> str:
    """sparse-24-bitmask when every prunable layer is 2:4 (or when asked), else sparse-bitmask."""
    if requested not in FORMATS:
        raise ConfigError(f"unknown export format {requested!r}; choose one of {', '.join(FORMATS)}")
    all_two_four = all(layer["two_four"] for layer in layers)
    if requested == "sparse-24-bitmask" and not all_two_four:
        bad = next(layer["name"] for layer in layers if not layer["two_four"])
        raise ConfigError(f"format sparse-24-bitmask needs every prunable layer 2:4 sparse, but {bad} is not; use sparse-bitmask")
    if requested == "compressed-tensors":
        return "sparse-24-bitmask" if all_two_four else "sparse-bitmask"
    return requested


def sparsity_config(fmt: str, layers: list[dict]) -> dict:
    """The ``sparsity_config`` block, built with compressed-tensors' own config classes."""
    from compressed_tensors.config import SparsityCompressionConfig

    zeros = sum(layer["sparsity"] * math.prod(layer["shape"]) for layer in layers)
    total = sum(math.prod(layer["shape"]) for layer in layers)
    config = SparsityCompressionConfig.load_from_registry(
        fmt,
        targets=[layer["name"] for layer in layers],
        ignore=[],
        global_sparsity=zeros / total,
        sparsity_structure="2:4" if fmt == "sparse-24-bitmask" else "unstructured",
    )
    return config.model_dump()


def compression_config(fmt: str, layers: list[dict]) -> dict:
    """config.json's ``quantization_config`` for a sparse-only compressed-tensors checkpoint."""
    import importlib

    import compressed_tensors

    base = importlib.import_module("compressed_tensors.base")  # the package re-exports config.base as .base

    return {
        base.COMPRESSION_VERSION_NAME: compressed_tensors.__version__,
        base.QUANTIZATION_METHOD_NAME: getattr(base, "QUANTIZATION_METHOD", "compressed-tensors"),
        base.SPARSITY_CONFIG_NAME: sparsity_config(fmt, layers),
        base.TRANSFORM_CONFIG_NAME: {},
    }


def _compress_shard(tensors: dict[str, Tensor], targets: set[str], fmt: str, progress=None) -> tuple[dict[str, Tensor], int, int]:
    """The shard's tensors with every target compressed, and the tensor bytes of the targets before and
    after compression. ``progress`` (a tqdm bar) advances by one per compressed tensor."""
    compress = sparse24_compress if fmt == "sparse-24-bitmask" else bitmask_compress
    out, dense_bytes, compressed_bytes = {}, 0, 0
    for name, tensor in tensors.items():
        if name in targets:
            prefix = name.removesuffix(".weight")
            params = {f"{prefix}.{key}": value.contiguous() for key, value in compress(tensor).items()}
            out.update(params)
            dense_bytes += tensor.nbytes
            compressed_bytes += sum(t.nbytes for t in params.values())
            if progress is not None:
                progress.update()
        else:
            out[name] = tensor
    return out, dense_bytes, compressed_bytes


def export_compressed(model_dir: str | Path, out_dir: str | Path, format: str = "compressed-tensors", overwrite: bool = False) -> dict:
    """Write ``model_dir`` (a dense pruned safetensors checkpoint) to ``out_dir`` in a sparse format.

    ``format`` "compressed-tensors" picks sparse-24-bitmask when every prunable layer is 2:4 and
    sparse-bitmask otherwise; the two can also be named directly. The output appears atomically
    (nothing is left behind on failure). Returns the format, per-layer sparsity, sizes and timings:

    - ``dense_bytes`` / ``export_bytes`` / ``ratio``: the whole checkpoint directories on disk (weights,
      config, tokenizer): what a user downloads or stores;
    - ``dense_weight_bytes`` / ``export_weight_bytes`` / ``weight_ratio``: the safetensors files alone
      (the dense embeddings, norms and lm_head included);
    - ``prunable_dense_bytes`` / ``prunable_export_bytes`` / ``prunable_ratio``: the tensor bytes of the
      prunable linear weights alone (dense vs their compressed tensors): the part sparsity shrinks;
    - ``timings_s``: seconds spent on ``scan`` (reading every prunable weight for its sparsity), ``read``
      (loading the shards), ``compress``, ``write`` (shards, index, config and other files) and ``total``.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    from tqdm import tqdm

    from losa.checkpoint import atomic_output_dir, check_output_dir

    if format not in FORMATS:
        raise ConfigError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")
    start = time.perf_counter()
    timings = {"scan": 0.0, "read": 0.0, "compress": 0.0, "write": 0.0}
    model_dir = Path(model_dir).expanduser().resolve()
    _check_source(model_dir)
    check_output_dir(out_dir, overwrite)  # fail before reading any weights
    shards = _weight_files(model_dir)
    if not shards:
        raise ModelError(f"{model_dir} holds no *.safetensors weights")

    # Pass 1: detect the sparsity of every prunable layer (reads one tensor at a time).
    names_by_shard = {}
    for shard in shards:
        with safe_open(str(model_dir / shard), framework="pt") as f:
            names_by_shard[shard] = list(f.keys())
    targets = prunable_weight_names(model_dir, [n for names in names_by_shard.values() for n in names])
    target_set = set(targets)
    reports = {}
    for shard, names in names_by_shard.items():
        with safe_open(str(model_dir / shard), framework="pt") as f:
            reports.update({n: layer_report(n, f.get_tensor(n)) for n in names if n in target_set})
    layers = [reports[n] for n in targets]
    timings["scan"] = time.perf_counter() - start
    fmt = choose_format(format, layers)
    config_block = compression_config(fmt, layers)
    dense_layers = [layer["name"] for layer in layers if layer["sparsity"] == 0]
    if dense_layers:
        logger.warning("%d prunable layers have no zeros (e.g. %s); the export stores them larger than dense", len(dense_layers), dense_layers[0])
    if fmt == "sparse-24-bitmask" and any(layer["dtype"] == "float32" for layer in layers):
        logger.warning("2:4 sparse kernels run fp16/bf16 weights; this float32 export keeps float32")
    logger.info("exporting %s as %s (global sparsity %.4f of %d prunable layers)", model_dir, fmt, config_block["sparsity_config"]["global_sparsity"], len(layers))

    # Pass 2: write every shard compressed, then config, tokenizer and the other small files.
    with atomic_output_dir(out_dir, overwrite) as tmp, tqdm(total=len(targets), desc=f"export {fmt}", unit="tensor") as progress:
        weight_map, tensor_bytes, prunable_dense_bytes, prunable_export_bytes = {}, 0, 0, 0
        for shard in shards:
            t0 = time.perf_counter()
            tensors = load_file(str(model_dir / shard))
            t1 = time.perf_counter()
            compressed, dense_part, export_part = _compress_shard(tensors, target_set, fmt, progress)
            t2 = time.perf_counter()
            save_file(compressed, str(tmp / shard), metadata={"format": "pt"})
            t3 = time.perf_counter()
            timings["read"] += t1 - t0
            timings["compress"] += t2 - t1
            timings["write"] += t3 - t2
            prunable_dense_bytes += dense_part
            prunable_export_bytes += export_part
            weight_map.update({name: shard for name in compressed})
            tensor_bytes += sum(t.nbytes for t in compressed.values())
            logger.info("wrote %s (%d tensors)", shard, len(compressed))
            del tensors, compressed
        t0 = time.perf_counter()
        if (model_dir / _INDEX_NAME).exists():
            index = json.loads((model_dir / _INDEX_NAME).read_text())
            index["weight_map"] = dict(sorted(weight_map.items()))
            index.setdefault("metadata", {})["total_size"] = tensor_bytes  # HF's meaning: bytes of all tensors
            (tmp / _INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        for item in sorted(model_dir.iterdir()):
            if item.is_file() and not item.name.endswith(_WEIGHT_SUFFIXES) and item.name not in (_INDEX_NAME, "config.json"):
                shutil.copy2(item, tmp / item.name)
            elif item.is_dir():
                logger.info("not copying subdirectory %s", item.name)
        config = json.loads((model_dir / "config.json").read_text())
        config["quantization_config"] = config_block
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        export_weight_bytes = _dir_bytes(tmp, shards)
        export_bytes = _dir_bytes(tmp)
        timings["write"] += time.perf_counter() - t0

    dense_weight_bytes = _dir_bytes(model_dir, shards)
    dense_bytes = _dir_bytes(model_dir)
    report = {
        "format": fmt,
        "model_dir": str(model_dir),
        "out_dir": str(Path(out_dir).expanduser().resolve()),
        "global_sparsity": config_block["sparsity_config"]["global_sparsity"],
        "layers": layers,
        "dense_bytes": dense_bytes,
        "export_bytes": export_bytes,
        "ratio": export_bytes / dense_bytes,
        "dense_weight_bytes": dense_weight_bytes,
        "export_weight_bytes": export_weight_bytes,
        "weight_ratio": export_weight_bytes / dense_weight_bytes,
        "prunable_dense_bytes": prunable_dense_bytes,
        "prunable_export_bytes": prunable_export_bytes,
        "prunable_ratio": prunable_export_bytes / prunable_dense_bytes,
        "compressed_tensors_version": config_block["version"],
    }
    timings["total"] = time.perf_counter() - start  # includes the atomic move into place
    report["timings_s"] = {k: round(v, 4) for k, v in timings.items()}
    logger.info(
        "export %d bytes vs dense %d bytes: %.3fx the whole checkpoint, %.3fx its prunable weights (%.1f s)",
        export_bytes, dense_bytes, report["ratio"], report["prunable_ratio"], timings["total"],
    )
    return report


def load_compressed_state_dict(export_dir: str | Path) -> dict[str, Tensor]:
    """The dense state dict of an export (compressed layers decompressed, the rest as stored).

    A reader for exports losa wrote (the installed compressed-tensors can no longer decompress
    sparse formats), e.g. to evaluate an export or convert it back to a dense checkpoint.
    """
    from safetensors.torch import load_file

    export_dir = Path(export_dir).expanduser()
    if not (export_dir / "config.json").exists():
        raise ModelError(f"{export_dir} has no config.json: not an exported checkpoint directory")
    block = json.loads((export_dir / "config.json").read_text()).get("quantization_config") or {}
    fmt = (block.get("sparsity_config") or {}).get("format")
    if fmt not in _PARAMS:
        raise ModelError(f"{export_dir} is not a sparse compressed-tensors export (sparsity format {fmt!r})")
    stored = {}
    for shard in _weight_files(export_dir):
        stored.update(load_file(str(export_dir / shard)))
    params = _PARAMS[fmt]
    prefixes = {name.rsplit(".", 1)[0] for name in stored if name.endswith(".bitmask")}
    state = {}
    for prefix in sorted(prefixes):
        state[f"{prefix}.weight"] = bitmask_decompress({p: stored.pop(f"{prefix}.{p}") for p in params})
    state.update(stored)
    return state
