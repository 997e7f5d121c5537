"""Zero-shot accuracy with lm-evaluation-harness (the paper's seven commonsense tasks).

Scoring is lm-eval's own: its Hugging Face model class (``HFLM``) wraps our model and tokenizer and
``simple_evaluate`` runs the tasks, so numbers are comparable with every other paper that reports
lm-eval accuracies. losa only picks the tasks, turns missing data into a clear error, and condenses
lm-eval's result dictionary into per-task ``acc`` / ``acc_norm`` (with standard errors) and the mean.

The paper's tasks download their datasets from the Hugging Face Hub on first use. Offline, point
``include_path`` at a directory of lm-eval task YAMLs whose ``dataset_path: json`` /
``dataset_kwargs.data_files`` name local files (see ``tests/data/zeroshot/`` for a minimal one).
lm-eval (``datasets``) resolves a relative ``data_files`` path against the working directory, not
against the YAML's folder: write it relative to where you run losa, or absolute.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from losa.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

# HellaSwag, Winogrande, BoolQ, OpenBookQA, PIQA, ARC-Easy, ARC-Challenge (paper section 3.3).
PAPER_TASKS: tuple[str, ...] = ("hellaswag", "winogrande", "boolq", "openbookqa", "piqa", "arc_easy", "arc_challenge")

_REPORTED_METRICS = ("acc", "acc_norm")


@functools.lru_cache(maxsize=4)
def task_manager(include_path: str | None = None, include_defaults: bool = True):
    """lm-eval's TaskManager, cached: indexing lm-eval's ~15k built-in task YAMLs takes seconds."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path, include_defaults=include_defaults)


def resolve_task_manager(tasks: Sequence[str], include_path: str | Path | None = None):
    """A TaskManager that knows every name in ``tasks``; ConfigError naming the unknown ones.

    Tasks found in ``include_path`` alone are resolved without indexing lm-eval's built-in tasks.
    """
    if include_path is not None:
        path = Path(include_path).expanduser().resolve()
        if not path.exists():
            raise DataError(f"task directory {str(include_path)!r} does not exist; pass a directory of lm-eval task YAMLs")
        include = str(path)
        local = task_manager(include, include_defaults=False)
        if all(name in local.all_tasks for name in tasks):
            return local
        manager = task_manager(include, include_defaults=True)
    else:
        manager = task_manager(None, include_defaults=True)
    unknown = [name for name in tasks if name not in manager.all_tasks]
    if unknown:
        where = f"lm-eval's built-in tasks or {include_path}" if include_path is not None else "lm-eval's built-in tasks"
        raise ConfigError(
            f"unknown zero-shot task(s) {', '.join(unknown)}: not in {where}. Check the spelling "
            f"(the paper's tasks are {', '.join(PAPER_TASKS)}) or pass --include-path DIR with your task YAMLs"
        )
    return manager


def _is_offline_error(error: BaseException) -> bool:
    """Whether a dataset-loading failure means the Hub could not be reached."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, ConnectionError) or type(seen).__name__ in ("OfflineModeIsEnabled", "LocalEntryNotFoundError"):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def load_tasks(manager, tasks: Sequence[str]) -> list:
    """lm-eval Task/Group objects (datasets loaded); a failed download becomes a DataError."""
    loaded = []
    for name in tasks:
        try:
            loaded.extend(manager.load([name])["tasks"].values())
        except Exception as e:  # datasets raises many types: ConnectionError, FileNotFoundError, ...
            if _is_offline_error(e):
                raise DataError(
                    f"zero-shot task {name!r} needs its dataset from the Hugging Face Hub, which could not be "
                    f"reached ({type(e).__name__}: {e}). Run once with network access to fill the datasets cache, "
                    "or pass --include-path DIR with lm-eval task YAMLs whose dataset_path: json and "
                    "dataset_kwargs.data_files point at local files"
                ) from None
            raise DataError(
                f"cannot load the dataset of zero-shot task {name!r} ({type(e).__name__}: {e}); "
                "check the task YAML's dataset_path / data_files (lm-eval resolves a relative data_files path "
                "against the working directory, not the YAML's folder)"
            ) from None
    return loaded


def check_tasks(tasks: Sequence[str], include_path: str | Path | None = None) -> list[str]:
    """Resolve ``tasks`` and load their data now (ConfigError / DataError naming the task), so that a
    bad task fails before hours of pruning, training or perplexity rather than after; their names."""
    tasks = [tasks] if isinstance(tasks, str) else list(tasks)
    if not tasks:
        raise ConfigError("no zero-shot tasks given; pass --tasks a,b,c (the paper's: " + ",".join(PAPER_TASKS) + ")")
    return [t.task_name for t in load_tasks(resolve_task_manager(tasks, include_path), tasks)]


def _metric(task_result: dict, name: str) -> float | None:
    """lm-eval stores metrics as 'name,filter' ('acc,none'); None if the task does not report it."""
    for key, value in task_result.items():
        if key.split(",")[0] == name and isinstance(value, (int, float)):
            return float(value)
    return None


def summarize(results: dict, task_names: Sequence[str]) -> dict:
    """Per-task acc / acc_norm with standard errors and the unweighted means over ``task_names``."""
    per_task = {}
    for name in task_names:
        raw = results["results"][name]
        row = {}
        for metric in _REPORTED_METRICS:
            value = _metric(raw, metric)
            if value is not None:
                row[metric] = value
                stderr = _metric(raw, f"{metric}_stderr")
                row[f"{metric}_stderr"] = stderr if stderr is not None and math.isfinite(stderr) else None
        if "acc" not in row:
            raise ConfigError(f"task {name!r} reports no 'acc' metric; zero-shot evaluation needs multiple-choice accuracy tasks")
        n = results.get("n-samples", {}).get(name, {})
        row["samples"] = int(n.get("effective", n.get("original", 0))) if n else None
        per_task[name] = row
    accs = [row["acc"] for row in per_task.values()]
    norms = [row.get("acc_norm", row["acc"]) for row in per_task.values()]
    return {
        "tasks": per_task,
        "mean_acc": sum(accs) / len(accs),  # the paper's "average" over its seven tasks
        "mean_acc_norm": sum(norms) / len(norms),  # acc_norm where a task reports it, else acc
    }


def _per_doc(samples: list[dict]) -> list[dict]:
    """lm-eval's logged samples reduced to what a reader checks: choice log-likelihoods and target."""
    rows = []
    for s in sorted(samples, key=lambda s: s["doc_id"]):
        lls = [float(r[0][0]) if isinstance(r[0], (list, tuple)) else float(r[0]) for r in s["resps"]]
        rows.append({"doc_id": int(s["doc_id"]), "target": s["target"], "loglikelihoods": lls, "acc": s.get("acc")})
    return rows


def zero_shot(
    model_path_or_model: str | Path | nn.Module,
    tasks: Sequence[str] = PAPER_TASKS,
    *,
    tokenizer=None,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    limit: int | None = None,
    num_fewshot: int = 0,
    include_path: str | Path | None = None,
    dtype: str = "float32",
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    return_samples: bool = False,
) -> dict:
    """Zero-shot accuracy of a causal LM on lm-eval tasks.

    ``model_path_or_model`` is a local checkpoint directory (loaded with losa's safe loader in
    ``dtype`` onto ``device``, with its unmerged LoRA adapter if it has one, as ``losa.api.evaluate``)
    or an in-memory model, which then needs ``tokenizer`` and is moved to ``device``. ``limit``
    evaluates only the first N documents of each task (for smoke tests).

    Returns ``{"tasks": {name: {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "samples"}},
    "mean_acc", "mean_acc_norm", "num_fewshot", "limit", "lm_eval_version", "timings_s"}`` (``acc_norm``
    only where lm-eval reports it; ``timings_s``: seconds of loading the tasks, the model and of the
    evaluation) and, with ``return_samples``, per-document log-likelihoods under "per_doc".
    """
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    from losa.config import check_device_available
    from losa.report import Timer

    check_device_available(str(device))
    tasks = [tasks] if isinstance(tasks, str) else list(tasks)
    if not tasks:
        raise ConfigError("no zero-shot tasks given; pass --tasks a,b,c (the paper's: " + ",".join(PAPER_TASKS) + ")")
    if limit is not None and limit < 1:
        raise ConfigError(f"limit must be a positive number of documents per task, got {limit}")
    if num_fewshot < 0:
        raise ConfigError(f"num_fewshot must be >= 0, got {num_fewshot}")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")

    timer = Timer()
    # Resolve and load the tasks (and their data) before loading the model: bad input fails fast.
    with timer("tasks"):
        manager = resolve_task_manager(tasks, include_path)
        task_objects = load_tasks(manager, tasks)
    task_names = [t.task_name for t in task_objects]

    adapter = None
    if isinstance(model_path_or_model, (str, Path)):
        from losa.checkpoint import load_evaluation_model, lora_adapter_dir

        with timer("load"):
            model, tokenizer = load_evaluation_model(
                model_path_or_model, dtype=dtype, device=device, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code
            )
        adapter = lora_adapter_dir(model_path_or_model)
    else:
        if tokenizer is None:
            raise ConfigError("zero_shot on an in-memory model needs its tokenizer (tokenizer=...)")
        model = model_path_or_model.to(device)
    was_training = model.training
    model.eval()
    use_cache = model.config.use_cache
    model.config.use_cache = False  # scoring needs no KV cache

    logger.info("zero-shot: %s (%d-shot%s)", ", ".join(task_names), num_fewshot, f", first {limit} docs" if limit else "")
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    try:
        with timer("evaluate"):
            results = lm_eval.simple_evaluate(
                model=lm,
                tasks=task_objects,
                num_fewshot=num_fewshot,
                limit=limit,
                task_manager=manager,
                log_samples=return_samples,
            )
    finally:
        model.config.use_cache = use_cache
        model.train(was_training)

    summary = summarize(results, task_names)
    for name, row in summary["tasks"].items():
        logger.info("%s: acc %.4f%s", name, row["acc"], f", acc_norm {row['acc_norm']:.4f}" if "acc_norm" in row else "")
    logger.info("mean acc over %d tasks: %.4f", len(task_names), summary["mean_acc"])
    summary.update(num_fewshot=num_fewshot, limit=limit, lm_eval_version=lm_eval.__version__, timings_s=timer.seconds)
    if adapter is not None:
        summary["lora_adapter"] = str(adapter)
    if return_samples:
        summary["per_doc"] = {name: _per_doc(results["samples"][name]) for name in task_names}
    return summary
