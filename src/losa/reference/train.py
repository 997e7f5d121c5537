"""Train and check the small reference LLaMA that the demo, tests and benchmarks prune.

A ``LlamaForCausalLM`` (or, with ``--arch opt``, an ``OPTForCausalLM``) of a few million parameters
is trained from scratch on the train split of the offline corpus (``losa.reference.corpus``) with a fixed seed: random windows of ``seq_len`` tokens,
AdamW, linear warmup then cosine decay, periodic checkpoints (resumed automatically; written as
safetensors plus JSON, never pickled, so resuming runs no code from the checkpoint). The result is
saved in float16 safetensors together with the corpus tokenizer, so plain
``AutoModelForCausalLM.from_pretrained(dir)`` / ``AutoTokenizer.from_pretrained(dir)`` load it
offline.

``--eval-only`` measures the saved model: eval-split perplexity over non-overlapping windows, the
perplexity of the train split's unigram distribution on the same tokens, and the perplexity after
70 % unstructured pruning; ``--report PATH`` writes these as markdown.

Usage::

    python -m losa.reference.train --corpus data/corpus --out models/reference-llama
    python -m losa.reference.train --corpus data/corpus --out models/reference-llama --eval-only \\
        --report benchmarks/results/reference_model.md
    python -m losa.reference.train --arch opt --corpus data/corpus --out models/reference-opt

``-q/--quiet`` shows only warnings and errors (no progress bar), ``-v/--verbose`` adds debug messages.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from losa.errors import ConfigError, DataError, LosaError, ModelError, OutputError, TrainingError

logger = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Model shape and optimisation settings of the reference model."""

    arch: str = "llama"  # or "opt" (same width and depth; its MLP is fc1/fc2 of width ffn_dim)
    hidden_size: int = 256
    intermediate_size: int = 688  # LLaMA's gated MLP
    ffn_dim: int = 1024  # OPT's MLP (4 x hidden, about the same parameters as LLaMA's 3 x 688)
    num_hidden_layers: int = 4
    num_attention_heads: int = 8
    seq_len: int = 256
    batch_size: int = 16
    # 2500 x 16 x 256 = 10.2M tokens, about two epochs of the 5.2M-token train split
    max_steps: int = 2500
    warmup_steps: int = 100
    learning_rate: float = 2e-3
    # cosine decay from the peak to min_lr_ratio x peak, reached exactly at max_steps
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    checkpoint_every: int = 50
    log_every: int = 10
    bf16_autocast: bool = True


# ----------------------------------------------------------------------------- data


def load_token_ids(text_file: Path, tokenizer, chunk_chars: int = 1_000_000) -> torch.Tensor:
    """All tokens of a text file as one 1-D int64 tensor (encoded in line-aligned chunks)."""
    if not text_file.is_file():
        raise DataError(
            f"{text_file} not found: build the corpus first with "
            f"`python -m losa.reference.corpus --out {text_file.parent}`"
        )
    text = text_file.read_text(encoding="utf-8")
    ids: list[int] = []
    start = 0
    while start < len(text):
        end = text.find("\n", start + chunk_chars)
        end = len(text) if end == -1 else end + 1
        ids += tokenizer.backend_tokenizer.encode(text[start:end], add_special_tokens=False).ids
        start = end
    return torch.tensor(ids, dtype=torch.long)


def random_windows(ids: torch.Tensor, batch_size: int, seq_len: int, generator: torch.Generator) -> torch.Tensor:
    """A (batch_size, seq_len) batch of windows starting at uniformly random offsets."""
    starts = torch.randint(0, ids.numel() - seq_len, (batch_size,), generator=generator)
    return torch.stack([ids[s : s + seq_len] for s in starts.tolist()])


# ----------------------------------------------------------------------------- model


REFERENCE_ARCHS = ("llama", "opt")


def reference_config(cfg: TrainConfig, vocab_size: int, tokenizer):
    """The transformers config of the reference model (tied input/output embeddings keep it small)."""
    from transformers import LlamaConfig, OPTConfig

    common = dict(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        max_position_embeddings=cfg.seq_len,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if cfg.arch == "llama":
        return LlamaConfig(
            intermediate_size=cfg.intermediate_size, num_key_value_heads=cfg.num_attention_heads, rms_norm_eps=1e-5,
            **common,
        )
    if cfg.arch == "opt":  # pre-LayerNorm OPT (as OPT-350m and up), no dropout for a short run
        return OPTConfig(
            ffn_dim=cfg.ffn_dim, word_embed_proj_dim=cfg.hidden_size, do_layer_norm_before=True,
            dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, **common,
        )
    raise ConfigError(f"unknown reference architecture {cfg.arch!r}; use one of {REFERENCE_ARCHS}")


def eval_perplexity(model, ids: torch.Tensor, seq_len: int = 256, batch_size: int = 16) -> float:
    """Perplexity over non-overlapping windows of ``seq_len`` tokens (the ragged tail is dropped);
    every window predicts its tokens 2..seq_len. The project's own evaluator, on a token stream."""
    from losa.data import contiguous_windows
    from losa.perplexity import perplexity

    return perplexity(model, contiguous_windows(ids, seq_len), batch_size=batch_size)["perplexity"]


def unigram_perplexity(train_ids: torch.Tensor, eval_ids: torch.Tensor, vocab_size: int) -> float:
    """Perplexity on ``eval_ids`` of the train split's add-one-smoothed unigram distribution."""
    counts = torch.bincount(train_ids, minlength=vocab_size).double() + 1.0
    log_probs = counts.log() - counts.sum().log()
    return math.exp(-log_probs[eval_ids].mean().item())


@torch.no_grad()
def magnitude_prune_(model, sparsity: float) -> None:
    """Zero the smallest-|w| fraction of every linear weight of the decoder layers, per layer
    (the usual unstructured magnitude baseline; embeddings and lm_head are kept dense)."""
    from losa.models.registry import architecture_of

    for layer in architecture_of(model).blocks(model):
        for module in layer.modules():
            if isinstance(module, torch.nn.Linear):
                w = module.weight
                k = int(w.numel() * sparsity)
                if k > 0:
                    threshold = w.abs().flatten().kthvalue(k).values
                    w[w.abs() <= threshold] = 0


# ----------------------------------------------------------------------------- training


CHECKPOINT_NAME = "checkpoint.safetensors"
LEGACY_CHECKPOINT_NAME = "checkpoint.pt"  # pickled, by older losa versions: read only with allow_pickle
_META_KEY = "losa_reference_checkpoint"


def save_checkpoint(
    path: Path, model, optimizer, scheduler, step: int, generator: torch.Generator, elapsed: float = 0.0
) -> None:
    """Atomically write the full training state (model, optimiser, schedule, sampler RNG, seconds so far)
    without pickle: every tensor in one safetensors file, everything else as JSON in its metadata."""
    from safetensors.torch import save_file

    tensors = {f"model.{k}": v.detach().clone().contiguous() for k, v in model.state_dict().items()}  # clone: tied
    optimizer_state = optimizer.state_dict()
    other_state: dict[str, dict] = {}
    for index, entries in optimizer_state["state"].items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{index}.{key}"] = value.detach().clone().contiguous()
            else:
                other_state.setdefault(str(index), {})[key] = value
    tensors["generator"] = generator.get_state()
    meta = {
        "step": step,
        "elapsed": elapsed,
        "scheduler": scheduler.state_dict(),
        "optimizer_param_groups": optimizer_state["param_groups"],
        "optimizer_other_state": other_state,
    }
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={_META_KEY: json.dumps(meta)})
    tmp.replace(path)


def load_checkpoint(path: Path) -> dict:
    """The training state ``save_checkpoint`` wrote, as the state dicts ``load_state_dict`` takes:
    ``model``, ``optimizer``, ``scheduler``, ``generator``, ``step`` and ``elapsed``."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    if _META_KEY not in metadata:
        raise DataError(f"{path} is not a reference-training checkpoint; delete it to start over")
    meta = json.loads(metadata[_META_KEY])
    tensors = load_file(str(path))
    optimizer_state: dict[int, dict] = {}
    for index, entries in meta["optimizer_other_state"].items():
        optimizer_state.setdefault(int(index), {}).update(entries)
    for name, value in tensors.items():
        if name.startswith("optimizer."):
            _, index, key = name.split(".", 2)
            optimizer_state.setdefault(int(index), {})[key] = value
    groups = meta["optimizer_param_groups"]
    for group in groups:  # JSON turned tuples into lists
        if isinstance(group.get("betas"), list):
            group["betas"] = tuple(group["betas"])
    return {
        "model": {name.removeprefix("model."): v for name, v in tensors.items() if name.startswith("model.")},
        "optimizer": {"state": optimizer_state, "param_groups": groups},
        "scheduler": meta["scheduler"],
        "generator": tensors["generator"],
        "step": meta["step"],
        "elapsed": meta.get("elapsed", 0.0),
    }


def _load_legacy_checkpoint(path: Path, allow_pickle: bool) -> dict:
    if not allow_pickle:
        raise DataError(
            f"{path} is a pickled checkpoint of an older losa; loading pickles can run arbitrary code, so it is "
            f"not read: delete it to start training over, or rerun with --allow-pickle if you wrote it yourself "
            f"(it is then converted to {CHECKPOINT_NAME})"
        )
    logger.warning("reading the pickled legacy checkpoint %s (--allow-pickle)", path)
    return torch.load(path, weights_only=False)


def train_reference_model(
    corpus: Path, out: Path, cfg: TrainConfig, checkpoint_dir: Path, allow_pickle: bool = False
) -> dict:
    """Train the reference LLaMA on ``corpus/train.txt``; save it (fp16) and its tokenizer to ``out``.

    Resumes from ``checkpoint_dir/checkpoint.safetensors`` when there is one. A pickled
    ``checkpoint.pt`` of an older losa is refused unless ``allow_pickle``."""
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer, get_cosine_with_min_lr_schedule_with_warmup

    tokenizer_dir = corpus / "tokenizer"
    if not (tokenizer_dir / "tokenizer.json").is_file():
        raise DataError(f"no tokenizer in {tokenizer_dir}: run `python -m losa.reference.corpus --out {corpus}`")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    train_ids = load_token_ids(corpus / "train.txt", tokenizer)

    torch.manual_seed(cfg.seed)
    model = AutoModelForCausalLM.from_config(reference_config(cfg, len(tokenizer), tokenizer))
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.learning_rate,
        betas=(0.9, 0.95),
    )
    # linear warmup, then a cosine annealed to min_lr_ratio x peak at the last step
    scheduler = get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, cfg.warmup_steps, cfg.max_steps, min_lr_rate=cfg.min_lr_ratio
    )
    generator = torch.Generator().manual_seed(cfg.seed)

    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = checkpoint_dir / CHECKPOINT_NAME
    legacy = checkpoint_dir / LEGACY_CHECKPOINT_NAME
    step, earlier_seconds = 0, 0.0
    state = None
    if checkpoint.is_file():
        state = load_checkpoint(checkpoint)
    elif legacy.is_file():
        state = _load_legacy_checkpoint(legacy, allow_pickle)
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        generator.set_state(state["generator"])
        step = state["step"]
        earlier_seconds = state.get("elapsed", 0.0)
        logger.info("resumed from %s at step %d", checkpoint if checkpoint.is_file() else legacy, step)
    log_file = checkpoint_dir / "log.jsonl"

    model.train()
    start_time = time.time()
    progress = tqdm(range(step, cfg.max_steps), initial=step, total=cfg.max_steps, mininterval=5)
    for step in progress:
        batch = random_windows(train_ids, cfg.batch_size, cfg.seq_len, generator)
        # bf16 autocast (fp32 master weights): ~8x faster than fp32 on CPUs with avx512_bf16
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16_autocast):
            loss = model(input_ids=batch, labels=batch).loss
        if not torch.isfinite(loss):
            raise TrainingError(
                f"loss became {loss.item()} at step {step}; the last good state is in {checkpoint}: "
                f"lower --lr and rerun to resume"
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        if step % cfg.log_every == 0:
            progress.set_postfix(loss=f"{loss.item():.3f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
            with log_file.open("a") as f:
                f.write(json.dumps({"step": step, "loss": loss.item(), "time": time.time() - start_time}) + "\n")
        if (step + 1) % cfg.checkpoint_every == 0:
            save_checkpoint(checkpoint, model, optimizer, scheduler, step + 1, generator,
                            earlier_seconds + time.time() - start_time)
    train_seconds = earlier_seconds + time.time() - start_time  # all segments of a resumed run

    save_reference_model(model, tokenizer, out)
    info = {
        "config": asdict(cfg),
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_tokens_available": train_ids.numel(),
        "tokens_seen": cfg.max_steps * cfg.batch_size * cfg.seq_len,
        "train_seconds_total": round(train_seconds, 1),
        "torch_threads": torch.get_num_threads(),
    }
    (out / "training_info.json").write_text(json.dumps(info, indent=1) + "\n")
    return info


def save_reference_model(model, tokenizer, out: Path) -> None:
    """Save the model in float16 safetensors plus its tokenizer (plain transformers layout)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(f"cannot create {out}: {err}; choose a writable --out") from err
    model.to(torch.float16).save_pretrained(out, safe_serialization=True)
    model.to(torch.float32)
    tokenizer.save_pretrained(out)


# ----------------------------------------------------------------------------- checks


def evaluate_reference_model(model_dir: Path, corpus: Path, sparsity: float = 0.7, calib_samples: int = 64) -> dict:
    """Dense and pruned (magnitude, and the project's Wanda) eval perplexity in float32, and the
    unigram baseline, of a saved model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from losa.data import sample_windows
    from losa.pruning.patterns import Pattern
    from losa.pruning.sequential import prune_model

    if not (model_dir / "config.json").is_file():
        raise ModelError(f"no model in {model_dir}: train it first with `python -m losa.reference.train`")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    eval_ids = load_token_ids(corpus / "eval.txt", tokenizer)
    train_ids = load_token_ids(corpus / "train.txt", tokenizer)
    seq_len = 256
    usable = eval_ids[: (eval_ids.numel() // seq_len) * seq_len]
    # the unigram model is scored on exactly the tokens the LM predicts
    predicted = usable.view(-1, seq_len)[:, 1:].reshape(-1)
    results = {
        "eval_tokens": int(usable.numel()),
        "dense_ppl": eval_perplexity(model, usable, seq_len),
        "unigram_ppl": unigram_perplexity(train_ids, predicted, len(tokenizer)),
        "sparsity": sparsity,
    }
    dense_state = {k: v.clone() for k, v in model.state_dict().items()}
    magnitude_prune_(model, sparsity)
    results["magnitude_pruned_ppl"] = eval_perplexity(model, usable, seq_len)
    model.load_state_dict(dense_state)  # the project's own Wanda, sequential, calibrated on the calib split
    calib = sample_windows(load_token_ids(corpus / "calib.txt", tokenizer), calib_samples, seq_len, seed=0)
    prune_model(model, calib, method="wanda", pattern=Pattern.unstructured(sparsity))
    results["wanda_calib_samples"] = calib_samples
    results["wanda_pruned_ppl"] = eval_perplexity(model, usable, seq_len)
    return results


def write_report(path: Path, model_dir: Path, results: dict, commands: list[str]) -> None:
    """Markdown summary of the reference model and its checks."""
    info_file = model_dir / "training_info.json"
    info = json.loads(info_file.read_text()) if info_file.is_file() else {}
    config = json.loads((model_dir / "config.json").read_text())

    def count(key: str) -> str:
        return f"{info[key]:,}" if key in info else "?"

    lines = [
        f"# Reference model (`{model_dir}`)",
        "",
        f"Machine: {platform.machine()} CPU ({os.cpu_count()} cores), "
        f"torch {torch.__version__}, Python {platform.python_version()}.",
        "",
        "## Model",
        "",
        f"- `{config['architectures'][0]}`: hidden {config['hidden_size']}, {config['num_hidden_layers']} layers, "
        f"MLP width {config.get('intermediate_size', config.get('ffn_dim'))}, {config['num_attention_heads']} heads, "
        f"vocab {config['vocab_size']} (byte-level BPE), tied embeddings, context {config['max_position_embeddings']}",
        f"- parameters: {count('parameters')}",
        f"- training: {json.dumps(info.get('config', {}))}",
        f"- tokens seen: {count('tokens_seen')} of {count('train_tokens_available')} train tokens",
        f"- train time: {info.get('train_seconds_total', '?')} s wall, {info.get('torch_threads', '?')} torch threads",
        "",
        "## Checks (eval split, non-overlapping windows of 256 tokens, float32)",
        "",
        f"| measure | perplexity |",
        f"|---|---|",
        f"| dense model | {results['dense_ppl']:.2f} |",
        f"| unigram baseline (train-split unigram, add-one) | {results['unigram_ppl']:.2f} |",
        f"| {results['sparsity']:.0%} unstructured magnitude (per layer, inline) | {results['magnitude_pruned_ppl']:.2f} |",
    ]
    if "wanda_pruned_ppl" in results:
        lines.append(
            f"| {results['sparsity']:.0%} unstructured Wanda (`losa.pruning`, {results['wanda_calib_samples']} "
            f"calib-split windows of 256) | {results['wanda_pruned_ppl']:.2f} |"
        )
    lines += [
        "",
        f"Eval tokens: {results['eval_tokens']:,}.",
        "",
        "## Commands",
        "",
        "```",
        "python -m losa.reference.corpus --out data/corpus",
        *commands,
        "```",
        "",
    ]
    notes = path.read_text().partition("\n## Notes\n")[2] if path.is_file() else ""
    if notes:  # hand-written notes survive a regeneration
        lines += ["## Notes", "", notes.strip("\n"), ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    defaults = TrainConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--corpus", type=Path, default=Path("data/corpus"))
    parser.add_argument("--out", type=Path, default=None, help="default: models/reference-ARCH")
    parser.add_argument("--checkpoint-dir", type=Path, default=None, help="default: runs/reference-ARCH-train")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--eval-only", action="store_true", help="only measure the saved model")
    parser.add_argument("--report", type=Path, default=None, help="write the checks as markdown here")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="resume from a pickled checkpoint.pt of an older losa (unsafe unless you wrote it)")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="debug messages")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors, no progress bar")
    for name, value in asdict(defaults).items():
        kind = (lambda v: v.lower() in {"1", "true", "yes"}) if isinstance(value, bool) else type(value)
        parser.add_argument(f"--{name.replace('_', '-')}", type=kind, default=value)
    args = parser.parse_args(argv)
    from losa.log import setup_logging

    setup_logging(args.verbose, args.quiet)
    if args.arch not in REFERENCE_ARCHS:
        parser.error(f"--arch must be one of {REFERENCE_ARCHS}")
    args.out = args.out or Path(f"models/reference-{args.arch}")
    args.checkpoint_dir = args.checkpoint_dir or Path(f"runs/reference-{args.arch}-train")
    torch.set_num_threads(args.threads)
    cfg = TrainConfig(**{name: getattr(args, name) for name in asdict(defaults)})
    try:
        if not args.eval_only:
            info = train_reference_model(args.corpus, args.out, cfg, args.checkpoint_dir, args.allow_pickle)
            logger.info("trained: %s", json.dumps(info, indent=1))
        results = evaluate_reference_model(args.out, args.corpus)
        logger.info("checks: %s", json.dumps(results, indent=1))
        if args.report:
            command = " ".join(["python -m losa.reference.train", *(argv or sys.argv[1:])])
            commands = [command]
            if args.eval_only:  # how the measured model was trained
                commands.insert(0, f"python -m losa.reference.train --arch {args.arch} --corpus {args.corpus} --out {args.out}")
            write_report(args.report, args.out, results, commands)
    except LosaError as err:
        logger.error("%s", err)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
