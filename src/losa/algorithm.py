"""LoSA, Algorithm 1 of the paper (ALGORITHM.md section 4).

``run_losa`` is the whole method; the paper's ideas each live in their own module:
LSR in ``allocation/rmi.py`` + ``allocation/rates.py``, SRA in ``allocation/ranks.py``, the
schedules in ``schedule.py``, the masked adapters in ``adapters/``, the pruners in ``pruning/``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from losa.adapters import adapter_layers, adapter_state, inject_adapters, load_adapter_state, merge_adapters, set_ranks
from losa.adapters import trainable_parameters, unmerge_adapters
from losa.allocation import (ReconstructionError, allocate_ranks, block_importance, gram_matrix, layer_sparsity,
                             mixed_nm, ranks_by_sparsity, rmi_matrix)
from losa.calibration import BlockInputs, sequential_pass
from losa.config import FinetuneConfig
from losa.models.registry import Architecture, architecture_of
from losa.pruning.patterns import Pattern
from losa.pruning.sequential import check_patterns, prune_block
from losa.report import Timer
from losa.schedule import mean_rank_at, sparsity_at
from losa.state import RunState
from losa.train import step_chunks, train

log = logging.getLogger(__name__)


@dataclass
class StepRecord:
    step: int
    target_sparsity: float  # S_t (mean over blocks)
    mean_rank: float  # r_mean_t
    block_patterns: list[str] = field(default_factory=list)  # per-block rate S_i (or N:M)
    block_sparsity: list[float] = field(default_factory=list)  # achieved, per block
    importance: list[float] = field(default_factory=list)  # LSR I_i
    errors: list[float] = field(default_factory=list)  # SRA E_l
    ranks: list[int] = field(default_factory=list)  # r_l
    trainable_parameters: int = 0
    training: dict = field(default_factory=dict)  # losses, tokens, seconds
    # lsr / prune (the pruner) / forward (the sequential pass's block forwards, whose outputs feed the
    # next block and SRA) / sra (the errors) / train; step 1 also dense_outputs (D_l, recorded once)
    seconds: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def _first(inputs: BlockInputs, count: int) -> torch.Tensor:
    return torch.cat(inputs.hidden)[:count]


def record_dense_outputs(model, calib_ids, cfg: FinetuneConfig, state: RunState) -> None:
    """D_l: block outputs of the dense model on the first ``sra_samples`` sequences, on disk."""
    ids = calib_ids[: cfg.losa.sra_samples]
    sequential_pass(model, ids, device=cfg.device, batch_size=cfg.batch_size, desc="dense outputs",
                    after_block=lambda i, block, out: state.save_dense(i, _first(out, len(ids))))
    state.mark_dense_complete()


def block_importances(model, calib_ids, cfg: FinetuneConfig) -> list[float]:
    """LSR, Eq. 4: RMI (linear CKA) between the input features of every pair of blocks."""
    grams = []
    sequential_pass(model, calib_ids[: cfg.losa.lsr_samples], device=cfg.device, batch_size=cfg.batch_size,
                    desc="RMI features", before_block=lambda i, block, inputs: grams.append(gram_matrix(_first(inputs, cfg.losa.lsr_samples))))
    return block_importance(rmi_matrix(grams), beta=cfg.beta()).tolist()


def block_patterns(target: Pattern, step_sparsity: float, importance: list[float] | None, cfg: FinetuneConfig,
                   num_blocks: int, floor: list[float] | None = None) -> list[Pattern]:
    """The per-block pattern of this step: LSR rates around S_t (Eq. 5), none below ``floor`` (the
    sparsity a block already has: its mask only grows), or N:M."""
    if target.is_nm:
        if importance is not None and cfg.losa.mixed_nm:
            return [Pattern.nm(n, target.m) for n in mixed_nm(importance, target.n, target.m)]
        return [target] * num_blocks
    if importance is None:
        return [Pattern.unstructured(step_sparsity)] * num_blocks
    return [Pattern.unstructured(s) for s in layer_sparsity(importance, step_sparsity, cfg.losa.delta, floor)]


def prune_and_measure(model, calib_ids, patterns, cfg: FinetuneConfig, state: RunState, timer: Timer) -> list[float]:
    """Prune every block sequentially; SRA's reconstruction error of each pruned block's outputs."""
    arch = architecture_of(model)
    errors = []

    def prune(i, block, inputs):
        with timer("prune"):
            prune_block(block, inputs, cfg.pruner, patterns[i], arch.linear_names)

    def measure(i, block, outputs):
        with timer("sra"):
            dense = state.load_dense(i, outputs.hidden[0].device)
            error = ReconstructionError()
            error.add(dense, _first(outputs, dense.shape[0]).to(dense.dtype))
            errors.append(error.value())

    before = timer.total("prune", "sra")
    with timer("pass"):
        sequential_pass(model, calib_ids, device=cfg.device, batch_size=cfg.batch_size, desc=f"{cfg.pruner}",
                        before_block=prune, after_block=measure)
    timer.seconds["forward"] = timer.seconds.pop("pass") - (timer.total("prune", "sra") - before)
    return errors


def block_ranks(errors: list[float], patterns: list[Pattern], mean_rank: int, cfg: FinetuneConfig) -> list[int]:
    """SRA, Eq. 7 (or uniform without SRA, or by sparsity rate for the Table 7 ablation)."""
    lc = cfg.losa
    if not lc.sra:
        return [mean_rank] * len(errors)
    if lc.rank_by == "sparsity":
        return ranks_by_sparsity([p.sparsity for p in patterns], mean_rank, lc.r_min, lc.r_max)
    return allocate_ranks(errors, mean_rank, lc.r_min, lc.r_max)


def run_losa(model: nn.Module, tokenizer, calib_ids: torch.Tensor, samples: list[list[int]], cfg: FinetuneConfig,
             state: RunState, stop_after: int | None = None) -> list[StepRecord]:
    """Algorithm 1: injects adapters into ``model`` and leaves them trained and unmerged (the caller
    merges them away with ``remove_adapters``); returns one record per step."""
    arch, lc, target = architecture_of(model), cfg.losa, cfg.target()
    num_blocks = len(arch.blocks(model))
    steps = lc.steps if lc.dsa else 1
    chunks = step_chunks(len(samples), steps)
    inject_adapters(model, {name: lc.r0 for name in arch.linear_module_names(model)}, lc.alpha, lc.dropout)
    check_patterns(model, [target] * num_blocks)
    records, first = _resume(model, arch, state)
    timer = Timer()
    if first == 1 and not state.has_dense(num_blocks):
        with timer("dense_outputs"):
            record_dense_outputs(model, calib_ids, cfg, state)
    for t in tqdm(range(first, steps + 1), desc="LoSA steps", unit="step", initial=first - 1, total=steps):
        torch.manual_seed(cfg.seed * 1000 + t)  # each step's randomness depends on (seed, t) only
        timer = timer if t == first else Timer()
        # an N:M pattern cannot be reached gradually (its groups are fixed): it applies from step 1
        gradual = lc.dsa and not target.is_nm
        s_t = sparsity_at(t, steps, target.sparsity, lc.schedule) if gradual else target.sparsity
        r_t = mean_rank_at(t, lc.r0) if lc.dsa else lc.final_mean_rank()
        merge_adapters(model)  # prune what the adapted model really is
        importance = None
        if target.is_nm and records:  # an N:M pattern is fixed after step 1: masks only grow
            patterns = [Pattern.parse(p) for p in records[-1].block_patterns]
        else:
            if lc.lsr and (not target.is_nm or lc.mixed_nm):
                with timer("lsr"):
                    importance = block_importances(model, calib_ids, cfg)
            patterns = block_patterns(target, s_t, importance, cfg, num_blocks, _sparsity_floor(model, arch))
        errors = prune_and_measure(model, calib_ids, patterns, cfg, state, timer)
        unmerge_adapters(model)  # subtract the delta with the NEW mask: W keeps its zeros
        ranks = block_ranks(errors, patterns, r_t, cfg)
        set_ranks(model, {name: ranks[_block_of(arch, name)] for name in adapter_layers(model)}, lc.shrink)
        a, b = chunks[t - 1]
        with timer("train"):
            training = train(model, samples[a:b], tokenizer, cfg.training, seed=cfg.seed * 1000 + t, device=cfg.device, desc=f"step {t}")
        record = StepRecord(step=t, target_sparsity=s_t, mean_rank=r_t, block_patterns=[str(p) for p in patterns],
                            block_sparsity=_block_sparsity(model, arch), importance=importance or [], errors=errors,
                            ranks=ranks, trainable_parameters=trainable_parameters(model), training=training,
                            seconds=dict(timer.seconds))
        records.append(record)
        log.info("step %d/%d: S_t %.4f, mean rank %d, loss %s", t, steps, s_t, r_t, training["final_loss"])
        state.save_step(t, _prunable_weights(model, arch), adapter_state(model), {"records": [r.as_dict() for r in records]})
        if stop_after is not None and t >= stop_after and t < steps:
            raise KeyboardInterrupt(f"stopped after step {t} (stop_after)")
    return records


def _block_of(arch: Architecture, name: str) -> int:
    return int(name[len(arch.blocks_path) + 1 :].split(".")[0])


def _prunable_weights(model, arch: Architecture) -> dict[str, torch.Tensor]:
    return {f"{i}.{n}": lin.weight for i, block in enumerate(arch.blocks(model)) for n, lin in arch.linears(block).items()}


def _sparsity_floor(model, arch: Architecture) -> list[float]:
    """Per block, the highest sparsity any of its prunable layers already has (a rate below it would
    leave that layer sparser than its block's rate)."""
    return [max(float((lin.weight == 0).float().mean()) for lin in arch.linears(block).values())
            for block in arch.blocks(model)]


def _block_sparsity(model, arch: Architecture) -> list[float]:
    out = []
    for block in arch.blocks(model):
        weights = [lin.weight for lin in arch.linears(block).values()]
        out.append(sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights))
    return out


def _resume(model, arch: Architecture, state: RunState) -> tuple[list[StepRecord], int]:
    """Restore the last finished step, if any: (records so far, first step to run)."""
    last = state.last_step()
    if last == 0:
        return [], 1
    weights, adapters, saved = state.load_step(last)
    with torch.no_grad():
        for key, value in _prunable_weights(model, arch).items():
            value.copy_(weights[key])
    load_adapter_state(model, adapters)
    for layer in adapter_layers(model).values():
        layer.refresh_mask()
    log.info("resuming after step %d from %s", last, state.dir)
    return [StepRecord(**r) for r in saved["records"]], last + 1
