"""Prune a checkpoint one-shot with llm-compressor (Wanda or SparseGPT), for the peer benchmark.

Runs INSIDE benchmarks/peers/.venv-peers (``bash benchmarks/peers/setup_env.sh``), never in losa's
own environment: llm-compressor pins its own transformers. The driver
(``benchmarks/bench_pruning.py``) tokenises the calibration text once with losa and saves the
windows, so both tools calibrate on exactly the same tokens:

    .venv-peers/bin/python benchmarks/peers/llmcompressor_prune.py --model DIR --method sparsegpt \\
        --pattern 2:4 --calib-ids ids.pt --out OUT

The recipe mirrors losa's settings: every ``nn.Linear`` inside the decoder blocks (lm_head ignored),
SparseGPT with dampening 0.01 of mean(diag H) and blocks of 128 columns, the sequential pipeline
with one decoder layer per stage (llm-compressor's ``sequential_targets``). Only the ``oneshot``
call is timed (no load, no save). The pruned model is written as plain dense safetensors
(``save_compressed=False``) so losa's evaluator reads it. The last stdout line is one JSON object:
``{"seconds": ..., "cpu_seconds": ..., "sparsity": ..., ...}``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch


def load_calibration_ids(path: Path) -> torch.Tensor:
    """The (nsamples, seqlen) int64 token windows the driver saved (.pt or .safetensors)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        tensors = load_file(str(path))
        if len(tensors) != 1:
            raise SystemExit(f"{path} holds {len(tensors)} tensors; expected exactly one (the token ids)")
        ids = next(iter(tensors.values()))
    else:
        ids = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype not in (torch.int32, torch.int64):
        raise SystemExit(f"{path} must hold one integer tensor of shape (nsamples, seqlen)")
    return ids.long()


def calibration_dataset(ids: torch.Tensor):
    """A tokenised ``datasets.Dataset`` (column ``input_ids``): llm-compressor skips its own tokeniser."""
    from datasets import Dataset

    return Dataset.from_dict({"input_ids": ids.tolist()})


def make_modifier(method: str, sparsity: float | None, pattern: str | None):
    """llm-compressor's modifier for ``method`` with losa's default settings."""
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier

    if pattern is not None:
        n, m = (int(x) for x in pattern.split(":"))
        # llm-compressor's mask_structure "N:M" prunes N of every M (losa's 2:4 keeps 2): same for 2:4
        structure = f"{m - n}:{m}"
        rate = 1.0 - n / m
    else:
        structure, rate = "0:0", float(sparsity)
    common = dict(sparsity=rate, mask_structure=structure, targets=["Linear"], ignore=["re:.*lm_head"])
    if method == "sparsegpt":
        return SparseGPTModifier(block_size=128, dampening_frac=0.01, **common)
    if method == "wanda":
        return WandaPruningModifier(**common)
    raise SystemExit(f"unknown method {method!r}; choose wanda or sparsegpt")


def decoder_layer_class(model) -> str:
    """Class name of the model's decoder block, e.g. LlamaDecoderLayer (one sequential stage each)."""
    layers = model.model.layers
    return type(layers[0]).__name__


def block_linear_sparsity(model) -> float:
    """Fraction of zeros over every nn.Linear inside the decoder blocks."""
    zeros = total = 0
    for module in model.model.layers.modules():
        if isinstance(module, torch.nn.Linear):
            zeros += int((module.weight == 0).sum())
            total += module.weight.numel()
    return zeros / total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, type=Path, help="HF checkpoint directory")
    parser.add_argument("--method", required=True, choices=["wanda", "sparsegpt"])
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--sparsity", type=float, help="unstructured rate, e.g. 0.5")
    target.add_argument("--pattern", help="N:M pattern (keep N of every M), e.g. 2:4")
    parser.add_argument("--calib-ids", required=True, type=Path, help=".pt / .safetensors (nsamples, seqlen) token ids")
    parser.add_argument("--out", required=True, type=Path, help="output checkpoint directory")
    parser.add_argument("--batch-size", type=int, default=1, help="calibration batch size (llm-compressor default 1)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids = load_calibration_ids(args.calib_ids)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype))
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    dataset = calibration_dataset(ids)
    modifier = make_modifier(args.method, args.sparsity, args.pattern)
    torch.manual_seed(args.seed)

    start, cpu_start = time.perf_counter(), time.process_time()
    oneshot(
        model=model,
        tokenizer=tokenizer,
        dataset=dataset,
        recipe=modifier,
        num_calibration_samples=ids.shape[0],
        max_seq_length=ids.shape[1],
        shuffle_calibration_samples=False,  # every window is used once; keep the driver's order
        batch_size=args.batch_size,
        pipeline="sequential",
        sequential_targets=[decoder_layer_class(model)],
    )
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start

    sparsity = block_linear_sparsity(model)
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(args.out), save_compressed=False)
    tokenizer.save_pretrained(str(args.out))
    import llmcompressor
    import transformers

    result = {
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "sparsity": sparsity,
        "method": args.method,
        "target": args.pattern or str(args.sparsity),
        "nsamples": ids.shape[0],
        "seqlen": ids.shape[1],
        "batch_size": args.batch_size,
        "threads": torch.get_num_threads(),
        "accelerator": torch.accelerator.is_available(),  # llm-compressor onloads blocks to it when present
        "versions": {
            "llmcompressor": llmcompressor.__version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
    }
    sys.stdout.flush()
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
