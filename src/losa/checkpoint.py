"""Loading models safely and writing outputs atomically.

Outputs are built in a temporary sibling directory and moved into place only when complete, so an
interrupted or failed run never leaves a half-written checkpoint, and an existing output is only
replaced (with ``overwrite``) after the new one is fully written.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

from losa.errors import ModelError, OutputError
from losa.models.registry import architecture_for_type, supported_model_types

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "auto": "auto"}
LORA_ADAPTER_SUBDIR = "lora-adapter"  # where api.finetune keeps the LoRA baseline's unmerged adapter
# files of which a Hugging Face tokenizer needs at least one
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")


def _one_line(error: BaseException) -> str:
    """``Type: message`` of an exception on one line (library messages often span several)."""
    return f"{type(error).__name__}: {' '.join(str(error).split())}"


def _needs_remote_code(path: Path) -> ModelError:
    return ModelError(
        f"{path} ships its own model code (auto_map in config.json), which runs only when you allow it: "
        "pass --trust-remote-code (trust_remote_code: true in a run config) if you trust its source"
    )


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
        if "trust_remote_code" in str(e):
            raise _needs_remote_code(Path(path)) from None
        raise ModelError(f"cannot read the model config in {path} ({_one_line(e)}); is config.json intact?") from None


def load_tokenizer(path: str | Path, trust_remote_code: bool = False):
    """The tokenizer saved beside a checkpoint; ModelError (one line) if there is none or it is broken."""
    from transformers import AutoTokenizer

    path = Path(path).expanduser()
    save_hint = f"save the model's own tokenizer beside it (tokenizer.save_pretrained({str(path)!r}))"
    if not any((path / name).exists() for name in _TOKENIZER_FILES):
        raise ModelError(f"{path} holds no tokenizer (no tokenizer.json or tokenizer_config.json); {save_hint}")
    try:
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except Exception as e:
        if "trust_remote_code" in str(e):
            raise _needs_remote_code(path) from None
        raise ModelError(f"cannot load the tokenizer in {path} ({_one_line(e)}); {save_hint}") from None


def _token_ids(*configs, name: str) -> set[int]:
    """Every value of ``name`` (int, list of ints or None) in the given configs."""
    ids: set[int] = set()
    for config in configs:
        value = getattr(config, name, None) if config is not None else None
        if value is None:
            continue
        ids.update(value if isinstance(value, (list, tuple)) else [value])
    return ids


def check_tokenizer_matches(model, tokenizer, path) -> None:
    """A tokenizer that clearly belongs to another model: more tokens than the embedding, or other
    EOS / BOS ids than config.json (or generation_config.json) gives. Unset ids are not compared."""
    fix = "save the model's own tokenizer beside it"
    embeddings = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > embeddings:
        raise ModelError(
            f"the tokenizer in {path} has {len(tokenizer)} tokens but the model embeds only {embeddings}: "
            f"tokenizer and model do not match; {fix}"
        )
    for which in ("eos", "bos"):
        token_id = getattr(tokenizer, f"{which}_token_id", None)
        expected = _token_ids(model.config, getattr(model, "generation_config", None), name=f"{which}_token_id")
        if token_id is None or not expected or token_id in expected:
            continue
        shown = sorted(expected)[0] if len(expected) == 1 else sorted(expected)
        raise ModelError(
            f"the tokenizer in {path} does not match the model: its {which.upper()} token "
            f"{getattr(tokenizer, f'{which}_token')!r} has id {token_id}, but config.json has {which}_token_id {shown}; "
            f"{fix} (or correct {which}_token_id in config.json if this tokenizer is the right one)"
        )


def _shape_mismatches(path: Path, config, trust_remote_code: bool) -> list[tuple[str, tuple, tuple]]:
    """(name, shape in the checkpoint, shape config.json implies) of tensors that differ; [] if unknown."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
        expected = {name: tuple(t.shape) for name, t in skeleton.state_dict().items()}
        found = []
        for file in sorted(path.glob("*.safetensors")):
            with safe_open(str(file), "pt") as f:
                for name in f.keys():
                    shape = tuple(f.get_slice(name).get_shape())
                    if name in expected and expected[name] != shape:
                        found.append((name, shape, expected[name]))
        return found
    except Exception:  # best effort: only to name a tensor in the message
        return []


def load_model(
    path: str | Path,
    *,
    dtype: str = "float32",
    device: str | torch.device = "cpu",
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
):
    """(model, tokenizer) from a local checkpoint; safetensors only unless ``allow_pickle``."""
    from transformers import AutoModelForCausalLM

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
    tokenizer = load_tokenizer(path, trust_remote_code)  # before the weights: a missing one fails fast
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(path),
            dtype=DTYPES[dtype],
            use_safetensors=None if allow_pickle else True,
            trust_remote_code=trust_remote_code,
        )
    except Exception as e:
        if "trust_remote_code" in str(e):
            raise _needs_remote_code(path) from None
        if "ignore_mismatched_sizes" in str(e) or "size mismatch" in str(e):
            mismatches = _shape_mismatches(path, config, trust_remote_code)
            example = ""
            if mismatches:
                name, found, wanted = mismatches[0]
                example = (f" ({len(mismatches)} tensor(s), e.g. {name} is {list(found)} in the weights but "
                           f"{list(wanted)} by config.json)")
            raise ModelError(
                f"the weights in {path} do not have the shapes its config.json describes{example}: "
                "config.json belongs to another model; restore the checkpoint's own config.json"
            ) from None
        raise ModelError(f"cannot load the model in {path} ({_one_line(e)}); is the checkpoint complete?") from None
    check_tokenizer_matches(model, tokenizer, path)
    model.config.use_cache = False
    return model.to(device), tokenizer


def check_output_dir(out: str | Path, overwrite: bool, flag: str = "--out") -> Path:
    """Fail early (before any work) if ``out`` cannot be written (``flag``: how the user names it)."""
    out = Path(out).expanduser().resolve()
    if out.exists() and not overwrite:
        raise OutputError(f"output directory {out} already exists; pass --overwrite to replace it or choose another {flag}")
    if out.exists() and not out.is_dir():
        raise OutputError(f"output path {out} is a file, not a directory; choose another {flag}")
    existing = out.parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(f"cannot create {out}: {existing} is a file, not a directory; choose another {flag}")
    try:  # a real write catches read-only file systems too (os.access does not, for root)
        probe = tempfile.NamedTemporaryFile(dir=existing, prefix=".losa-write-probe-")
        probe.close()
    except OSError:
        raise OutputError(f"cannot write to {existing} (read-only or no permission); choose another {flag}") from None
    return out


def lora_adapter_dir(path: str | Path) -> Path | None:
    """The unmerged LoRA adapter a LoRA-baseline checkpoint keeps beside its sparse base, if any."""
    adapter = Path(path).expanduser() / LORA_ADAPTER_SUBDIR
    return adapter if adapter.is_dir() else None


def load_evaluation_model(path: str | Path, *, device: str | torch.device = "cpu", **load_options):
    """(model, tokenizer) as it is evaluated: ``load_model(path, **load_options)``, plus the unmerged
    LoRA adapter in ``path/lora-adapter/`` when there is one (the LoRA baseline: merging it would destroy the
    sparsity, and the base alone lacks what LoRA learned)."""
    model, tokenizer = load_model(path, **load_options)
    adapter = lora_adapter_dir(path)
    if adapter is not None:
        from peft import PeftModel

        log.info("%s: evaluating with the unmerged LoRA adapter in %s/", path, LORA_ADAPTER_SUBDIR)
        try:
            model = PeftModel.from_pretrained(model, str(adapter))
        except Exception as e:
            raise ModelError(
                f"cannot load the LoRA adapter in {adapter} ({_one_line(e)}); remove that directory to evaluate "
                "the sparse base alone"
            ) from None
        model.eval()
    return model.to(device), tokenizer


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
