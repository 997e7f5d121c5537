"""Loading models safely and writing outputs atomically.

Outputs are built in a temporary sibling directory and moved into place only when complete, so an
interrupted or failed run never leaves a half-written checkpoint, and an existing output is only
replaced (with ``overwrite``) after the new one is fully written.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

from losa.errors import ModelError, OutputError
from losa.models.registry import architecture_for_type, supported_model_types

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "auto": "auto"}


def check_model_dir(path: Path, allow_pickle: bool) -> None:
    """A local checkpoint directory with config.json and weights (safetensors unless allow_pickle)."""
    if not path.exists():
        raise ModelError(f"model path {str(path)!r} does not exist; pass a local Hugging Face checkpoint directory")
    if not path.is_dir():
        raise ModelError(f"model path {str(path)!r} is a file; pass the checkpoint directory that holds config.json")
    if not (path / "config.json").exists():
        raise ModelError(f"{path} has no config.json: it is not a Hugging Face checkpoint directory")
    has_safetensors = any(path.glob("*.safetensors"))
    has_pickle = any(path.glob("*.bin")) or any(path.glob("*.pt"))
    if not has_safetensors and has_pickle and not allow_pickle:
        raise ModelError(
            f"{path} holds only pickled weights (*.bin), which can run arbitrary code when loaded; "
            "convert them to safetensors, or pass --allow-pickle if you trust the source"
        )
    if not has_safetensors and not has_pickle:
        raise ModelError(f"{path} holds no weights (*.safetensors); is the checkpoint complete?")


def load_config(path: str | Path, trust_remote_code: bool = False):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except Exception as e:
        raise ModelError(f"cannot read the model config in {path}: {e}") from None


def load_model(
    path: str | Path,
    *,
    dtype: str = "float32",
    device: str | torch.device = "cpu",
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
):
    """(model, tokenizer) from a local checkpoint; safetensors only unless ``allow_pickle``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path).expanduser()
    check_model_dir(path, allow_pickle)
    config = load_config(path, trust_remote_code)
    architecture_for_type(config.model_type)  # unsupported families fail here, naming the supported ones
    quantization = getattr(config, "quantization_config", None) or {}
    quantization = quantization if isinstance(quantization, dict) else quantization.to_dict()
    sparsity_format = (quantization.get("sparsity_config") or {}).get("format")
    if sparsity_format:  # transformers would load the compressed layers as random weights
        raise ModelError(
            f"{path} is a compressed-tensors export ({sparsity_format}); load the uncompressed checkpoint it was "
            "exported from instead"
        )
    architectures = getattr(config, "architectures", None) or []
    if architectures and not any(a.endswith("ForCausalLM") for a in architectures):
        raise ModelError(
            f"{path} is a {', '.join(architectures)} checkpoint, not a causal language model; "
            f"losa needs a *ForCausalLM checkpoint of one of: {', '.join(supported_model_types())}"
        )
    if dtype not in DTYPES:
        raise ModelError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(path),
            dtype=DTYPES[dtype],
            use_safetensors=None if allow_pickle else True,
            trust_remote_code=trust_remote_code,
        )
    except Exception as e:
        raise ModelError(f"cannot load the model in {path}: {type(e).__name__}: {e}") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except Exception as e:
        raise ModelError(f"cannot load the tokenizer in {path} ({type(e).__name__}: {e}); save one beside the model") from None
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        raise ModelError(
            f"the tokenizer in {path} has {len(tokenizer)} tokens but the model embeds only "
            f"{model.get_input_embeddings().num_embeddings}: tokenizer and model do not match"
        )
    model.config.use_cache = False
    return model.to(device), tokenizer


def check_output_dir(out: str | Path, overwrite: bool) -> Path:
    """Fail early (before any work) if ``out`` cannot be written."""
    out = Path(out).expanduser().resolve()
    if out.exists() and not overwrite:
        raise OutputError(f"output directory {out} already exists; pass --overwrite to replace it or choose another --out")
    if out.exists() and not out.is_dir():
        raise OutputError(f"output path {out} is a file, not a directory; choose another --out")
    parent = out.parent
    existing = parent
    while not existing.exists():
        existing = existing.parent
    try:  # a real write catches read-only file systems too (os.access does not, for root)
        probe = tempfile.NamedTemporaryFile(dir=existing, prefix=".losa-write-probe-")
        probe.close()
    except OSError:
        raise OutputError(f"cannot write to {existing} (read-only or no permission); choose another --out") from None
    return out


def check_context_length(model, seqlen: int, what: str = "--seqlen") -> None:
    """Windows longer than the model's context give garbage (rotary) or crash (learned positions)."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and seqlen > limit:
        raise ModelError(f"{what} {seqlen} exceeds the model's context length of {limit} tokens; lower {what}")


@contextlib.contextmanager
def atomic_output_dir(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory; on success it replaces ``out``, on failure it is removed."""
    out = check_output_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, trash / "old")
        os.replace(tmp, out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, out)


def write_json_atomic(path: str | Path, obj) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2, default=_json_default)
        f.write("\n")
    os.replace(tmp, path)


def _json_default(obj):
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "as_dict"):
        return obj.as_dict()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def save_pretrained(model, tokenizer, directory: Path) -> None:
    """A standard Hugging Face checkpoint (safetensors + config + tokenizer)."""
    model.config.use_cache = True
    model.save_pretrained(str(directory), safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(directory))
