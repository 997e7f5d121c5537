"""The Python API. The CLI calls exactly these functions."""

from __future__ import annotations

import logging

import torch

from losa.checkpoint import atomic_output_dir, check_output_dir, load_model, save_pretrained, write_json_atomic
from losa.config import EvalConfig, PruneConfig
from losa.data import calibration_ids, evaluation_ids
from losa.perplexity import perplexity
from losa.pruning import make_pruner
from losa.pruning.sequential import prune_model
from losa.report import Report, Timer

log = logging.getLogger(__name__)


def prune(config: PruneConfig) -> dict:
    """Prune a checkpoint one-shot and write it with ``report.json``; returns the report."""
    if config.out is not None:
        check_output_dir(config.out, config.overwrite)  # fail before the expensive part
    timer = Timer()
    with timer("load"):
        model, tokenizer = load_model(
            config.model, dtype=config.dtype, allow_pickle=config.allow_pickle, trust_remote_code=config.trust_remote_code
        )
    calib = None
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
        with timer("save"), atomic_output_dir(config.out, config.overwrite) as tmp:
            save_pretrained(model, tokenizer, tmp)
            report.timings = timer.seconds
            write_json_atomic(tmp / "report.json", report.as_dict())
    report.timings = timer.seconds
    result = report.as_dict()
    log.info("pruned %s with %s to %.4f overall sparsity", config.model, config.method, result["overall_sparsity"])
    return result


def evaluate(config: EvalConfig, model=None, tokenizer=None) -> dict:
    """Perplexity of a checkpoint (or of an in-memory model) on ``config.data``."""
    timer = Timer()
    if model is None:
        with timer("load"):
            model, tokenizer = load_model(
                config.model, dtype=config.dtype, allow_pickle=config.allow_pickle, trust_remote_code=config.trust_remote_code
            )
        model.to(config.device)
    with timer("data"):
        windows = evaluation_ids(tokenizer, config.data, config.seqlen)
        if config.max_windows is not None:
            windows = windows[: config.max_windows]
    with timer("perplexity"):
        result = perplexity(model, windows, batch_size=config.batch_size, device=config.device)
    result.update(data=config.data, seqlen=config.seqlen, model=str(config.model), timings_s=timer.seconds)
    return result
