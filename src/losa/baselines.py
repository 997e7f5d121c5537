"""The paper's baselines (ALGORITHM.md section 6), sharing losa's pruner, data and trainer.

- ``lora``: PEFT LoRA (r = 8, alpha 16, dropout 0.1) on the one-shot pruned model. Its dense
  update cannot be merged without destroying sparsity, so it is kept (and saved) unmerged, and the
  density a merge would have is reported.
- ``sparse-lora``: losa's masked adapter at a fixed uniform rank on the one-shot pruned model,
  trained once (static final sparsity); returned unmerged, ``api.finetune`` merges it like LoSA's.
- ``ft-then-sparsify``: LoRA on the dense model, merged, then pruned one-shot.
"""

from __future__ import annotations

import torch
from torch import nn

from losa.adapters import inject_adapters, trainable_parameters
from losa.config import FinetuneConfig
from losa.models.registry import architecture_of
from losa.pruning.sequential import prune_model
from losa.train import train


def _peft_lora(model: nn.Module, cfg: FinetuneConfig):
    from peft import LoraConfig, get_peft_model

    targets = architecture_of(model).linear_module_names(model)
    lc = cfg.losa
    config = LoraConfig(r=lc.lora_rank, lora_alpha=lc.alpha, lora_dropout=lc.dropout, target_modules=targets,
                        bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, config)


@torch.no_grad()
def merged_density(peft_model) -> dict:
    """Density of every adapted weight if the LoRA update were merged into it (it is not)."""
    from peft.tuners.lora import LoraLayer

    kept = total = 0
    for module in peft_model.modules():
        if isinstance(module, LoraLayer) and "default" in module.lora_A:
            merged = module.base_layer.weight + module.get_delta_weight("default")
            kept += int((merged != 0).sum())
            total += merged.numel()
    return {"merged_density": kept / total, "merged_sparsity": 1 - kept / total}


def lora(model, tokenizer, calib_ids, samples, cfg: FinetuneConfig) -> tuple[nn.Module, dict]:
    """Returns the PEFT model (adapters active, unmerged) and a summary."""
    prune_model(model, calib_ids, method=cfg.pruner, pattern=cfg.target(), device=cfg.device, batch_size=cfg.batch_size)
    peft_model = _peft_lora(model, cfg)
    params = trainable_parameters(peft_model)
    training = train(peft_model, samples, tokenizer, cfg.training, seed=cfg.seed, device=cfg.device, desc="LoRA")
    return peft_model, {"training": training, "trainable_parameters": params, **merged_density(peft_model)}


def sparse_lora(model, tokenizer, calib_ids, samples, cfg: FinetuneConfig) -> tuple[nn.Module, dict]:
    prune_model(model, calib_ids, method=cfg.pruner, pattern=cfg.target(), device=cfg.device, batch_size=cfg.batch_size)
    names = architecture_of(model).linear_module_names(model)
    inject_adapters(model, {n: cfg.losa.lora_rank for n in names}, cfg.losa.alpha, cfg.losa.dropout)
    params = trainable_parameters(model)
    training = train(model, samples, tokenizer, cfg.training, seed=cfg.seed, device=cfg.device, desc="Sparse LoRA")
    return model, {"training": training, "trainable_parameters": params}  # the caller merges (and checks) it


def ft_then_sparsify(model, tokenizer, calib_ids, samples, cfg: FinetuneConfig) -> tuple[nn.Module, dict]:
    peft_model = _peft_lora(model, cfg)
    params = trainable_parameters(peft_model)
    training = train(peft_model, samples, tokenizer, cfg.training, seed=cfg.seed, device=cfg.device, desc="dense LoRA")
    model = peft_model.merge_and_unload()
    prune_model(model, calib_ids, method=cfg.pruner, pattern=cfg.target(), device=cfg.device, batch_size=cfg.batch_size)
    return model, {"training": training, "trainable_parameters": params}


BASELINES = {"lora": lora, "sparse-lora": sparse_lora, "ft-then-sparsify": ft_then_sparsify}
