"""The Python API. The CLI calls exactly these functions."""

from __future__ import annotations

import dataclasses
import logging

import torch

from losa.checkpoint import (LORA_ADAPTER_SUBDIR, atomic_output_dir, check_context_length, check_output_dir,
                             load_evaluation_model, load_model, lora_adapter_dir, save_pretrained, write_json_atomic)
from losa.config import EvalConfig, PruneConfig, check_device_available
from losa.data import calibration_ids, check_data_available, evaluation_ids
from losa.distributed import local_device, main_process_writes
from losa.perplexity import perplexity
from losa.models.registry import architecture_of
from losa.pruning import make_pruner
from losa.pruning.masks import meets_pattern
from losa.pruning.patterns import Pattern
from losa.pruning.sequential import expand_patterns, layer_sparsities, prune_model
from losa.report import Report, Timer

log = logging.getLogger(__name__)


def prune(config: PruneConfig) -> dict:
    """Prune a checkpoint one-shot and write it with ``report.json``; returns the report."""
    check_device_available(config.device)
    config = dataclasses.replace(config, device=local_device(config.device))
    if config.out is not None:
        check_output_dir(config.out, config.overwrite)  # fail before the expensive part
    if make_pruner(config.method, 8).needs_inputs:
        check_data_available(config.calib, "train")  # a missing file / no network fails before the model loads
    timer = Timer()
    with timer("load"):
        model, tokenizer = load_model(
            config.model, dtype=config.dtype, allow_pickle=config.allow_pickle, trust_remote_code=config.trust_remote_code
        )
    calib = None
    check_context_length(model, config.seqlen)
    if make_pruner(config.method, 8).needs_inputs:
        with timer("calibration_data"):
            calib = calibration_ids(tokenizer, config.calib, config.nsamples, config.seqlen, config.seed)
    torch.manual_seed(config.seed)
    with timer("prune"):
        layers = prune_model(
            model, calib, method=config.method, pattern=config.target(), device=config.device, batch_size=config.batch_size
        )
    report = Report("prune", config.as_dict(), layers=layers)
    if config.out is not None:
        with timer("save"), main_process_writes() as writer:
            if writer:
                _write_output(config.out, config.overwrite, report, timer, lambda tmp: save_pretrained(model, tokenizer, tmp))
    report.timings = timer.seconds
    result = report.as_dict()
    log.info("pruned %s with %s to %.4f overall sparsity", config.model, config.method, result["overall_sparsity"])
    return result


def evaluate(config: EvalConfig, model=None, tokenizer=None) -> dict:
    """Perplexity of a checkpoint (or of an in-memory model) on ``config.data``.

    A checkpoint with an unmerged LoRA adapter beside it (``lora-adapter/``, the LoRA baseline) is
    evaluated with the adapter, as ``losa run`` does.
    """
    check_device_available(config.device)
    timer = Timer()
    adapter = None
    if model is None:
        check_data_available(config.data, "eval")  # a missing file / no network fails before the model loads
        with timer("load"):
            model, tokenizer = load_evaluation_model(
                config.model, dtype=config.dtype, device=config.device, allow_pickle=config.allow_pickle,
                trust_remote_code=config.trust_remote_code,
            )
        adapter = lora_adapter_dir(config.model)
    check_context_length(model, config.seqlen)
    with timer("data"):
        windows = evaluation_ids(tokenizer, config.data, config.seqlen)
        if config.max_windows is not None and config.max_windows < windows.shape[0]:
            # evenly spread over the whole text, so a quick estimate is not biased to its beginning
            windows = windows[torch.linspace(0, windows.shape[0] - 1, config.max_windows).round().long()]
    with timer("perplexity"):
        result = perplexity(model, windows, batch_size=config.batch_size, device=config.device)
    result.update(data=config.data, seqlen=config.seqlen, model=str(config.model), timings_s=timer.seconds)
    if adapter is not None:
        result["lora_adapter"] = str(adapter)
    return result


def check_evaluation_text(tokenizer, spec: str, seqlen: int, what: str = "--seqlen") -> None:
    """Before the expensive part: the perplexity text loads (a hub dataset is fetched now) and holds
    at least one window of ``seqlen`` tokens (``what``: how the user sets that length)."""
    from losa.data import load_documents, tokenize_documents
    from losa.errors import DataError

    tokens = tokenize_documents(tokenizer, load_documents(spec, "eval")).numel()
    if tokens < seqlen:
        raise DataError(f"evaluation text {spec} has {tokens} tokens, fewer than one window of {seqlen}; "
                        f"lower {what} or give more text")


def _state_dir(config: FinetuneConfig):
    from pathlib import Path

    out = Path(config.out).expanduser().resolve()
    return out.with_name(out.name + ".state")


def finetune(config: FinetuneConfig, stop_after: int | None = None) -> dict:
    """Prune and recover: LoSA (default) or a baseline; writes a standard checkpoint + report.json.

    LoSA saves its state after every step beside the output (``<out>.state``); rerunning the same
    call after an interruption continues from the last finished step. ``stop_after`` interrupts
    after that step (for tests of resumption).
    """
    import tempfile

    from losa.adapters import adapter_layers, remove_adapters
    from losa.algorithm import run_losa
    from losa.baselines import BASELINES
    from losa.plots import plot_run
    from losa.state import RunState
    from losa.train import training_samples

    check_device_available(config.device)
    config = dataclasses.replace(config, device=local_device(config.device))
    if config.out is not None:
        check_output_dir(config.out, config.overwrite)
    for spec, split in ((config.calib, "train"), (config.train, "train"), (config.eval, "eval")):
        if spec:  # a missing file / no network fails before the model loads
            check_data_available(spec, split)
    timer = Timer()
    with timer("load"):
        model, tokenizer = load_model(config.model, dtype=config.dtype, allow_pickle=config.allow_pickle,
                                      trust_remote_code=config.trust_remote_code)
    check_context_length(model, config.seqlen)
    check_context_length(model, config.train_seqlen, "--train-seqlen")
    if config.eval and config.eval_seqlen is not None:
        check_context_length(model, config.eval_seqlen, "--eval-seqlen")
    with timer("data"):
        calib = calibration_ids(tokenizer, config.calib, config.nsamples, config.seqlen, config.seed)
        samples = training_samples(tokenizer, config.train, config.train_samples, config.train_seqlen, config.seed)
        if config.eval:  # the evaluation text too (hub download, at least one window): not after training
            check_evaluation_text(tokenizer, config.eval, config.eval_seqlen or config.seqlen, "--eval-seqlen")
    torch.manual_seed(config.seed)
    extra: dict = {}
    records = []
    scratch = None
    if config.method == "losa":
        if config.out is not None:
            state = RunState(_state_dir(config), config.as_dict())
        else:  # each process's own
            scratch = tempfile.TemporaryDirectory(prefix="losa-state-")
            state = RunState(scratch.name, config.as_dict(), shared=False)
        if not config.resume:
            state.remove()
        state.start()
        with timer("losa"):
            records = run_losa(model, tokenizer, calib, samples, config, state, stop_after=stop_after)
        final_patterns = [Pattern.parse(p) for p in records[-1].block_patterns]
        extra["steps"] = [r.as_dict() for r in records]
        extra["trainable_parameters"] = records[-1].trainable_parameters
    else:
        with timer(config.method):
            model, summary = BASELINES[config.method](model, tokenizer, calib, samples, config)
        extra.update(summary)
    base = model.get_base_model() if config.method == "lora" else model
    if config.method != "losa":  # the baselines prune one shot to the target
        final_patterns = expand_patterns(config.target(), len(architecture_of(base).blocks(base)))
    masks = {name: layer.mask.clone() for name, layer in adapter_layers(model).items()}
    if masks:  # masked adapters (LoSA, Sparse LoRA): merged away, the sparsity checked exactly
        remove_adapters(model)
        _check_merged_sparsity(model, masks, final_patterns)
    report = Report("finetune", config.as_dict(), extra=extra)
    report.layers = layer_sparsities(base, final_patterns)
    if config.eval:
        with timer("eval"):
            ev = evaluate(EvalConfig(model=config.model, data=config.eval,
                                     seqlen=config.seqlen if config.eval_seqlen is None else config.eval_seqlen,
                                     device=config.device, max_windows=config.eval_max_windows), model=model, tokenizer=tokenizer)
        report.metrics["perplexity"] = ev["perplexity"]
        report.metrics["eval_tokens"] = ev["tokens"]
    if config.out is not None:
        def write_model(tmp):
            saved = base
            if config.method == "lora":  # kept unmerged: sparse base + adapter beside it
                model.save_pretrained(str(tmp / LORA_ADAPTER_SUBDIR))
                saved = model.unload()
            save_pretrained(saved, tokenizer, tmp)
            if records:
                report.extra["plots"] = plot_run([r.as_dict() for r in records], tmp / "plots")

        with timer("save"), main_process_writes() as writer:
            if writer:
                _write_output(config.out, config.overwrite, report, timer, write_model)
        if config.method == "losa":
            state.remove()
    if scratch is not None:
        scratch.cleanup()
    report.timings = timer.seconds
    return report.as_dict()


def _write_output(out, overwrite: bool, report: Report, timer: Timer, write_model) -> None:
    """The checkpoint (``write_model(tmp)``) and report.json, all or nothing."""
    with atomic_output_dir(out, overwrite) as tmp:
        write_model(tmp)
        report.timings = timer.snapshot()
        write_json_atomic(tmp / "report.json", report.as_dict())


@torch.no_grad()
def _check_merged_sparsity(model, masks: dict, patterns: list) -> None:
    """The merged model must be exactly as sparse as the step-T masks (zeros wherever pruned), and
    every layer's mask as sparse as its block's step-T pattern asks."""
    arch = architecture_of(model)
    for i, block in enumerate(arch.blocks(model)):
        for short, linear in arch.linears(block).items():
            name, keep = f"{arch.blocks_path}.{i}.{short}", masks[f"{arch.blocks_path}.{i}.{short}"]
            if (linear.weight[~keep] != 0).any():
                raise RuntimeError(f"merging broke the sparsity of {name}: a pruned weight became non-zero")
            if not meets_pattern(keep, patterns[i]):
                raise RuntimeError(f"{name} is less sparse than its step-T pattern {patterns[i]} "
                                   f"({float((~keep).float().mean()):.4f} pruned)")
