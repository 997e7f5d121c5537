"""Typed configuration. Defaults are the paper's settings (ALGORITHM.md)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from losa.errors import ConfigError


DTYPE_NAMES = ("float32", "float16", "bfloat16", "auto")


def _check_device_dtype(obj) -> None:
    import torch

    if obj.dtype not in DTYPE_NAMES:
        raise ConfigError(f"unknown dtype {obj.dtype!r}; choose one of {', '.join(DTYPE_NAMES)}")
    try:
        device = torch.device(obj.device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"unknown device {obj.device!r}; use cpu, cuda or cuda:N") from None
    obj.device = str(device)


def check_device_available(device: str) -> None:
    """At run time (a config may be written on a CPU machine for a GPU one)."""
    import torch

    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError):
        raise ConfigError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} requested but CUDA is not available here; use --device cpu")


def _check_positive(obj, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")


def _check_window(obj, name: str, unset: str = "") -> None:
    """A window length: an integer >= 2 (a window of n tokens predicts n - 1 of them)."""
    value = getattr(obj, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < 2:
        raise ConfigError(f"{name} must be an integer of at least 2 tokens{unset}, got {value!r}")


@dataclass
class PruneConfig:
    model: str
    out: str | None = None
    method: str = "wanda"  # magnitude | wanda | sparsegpt
    sparsity: float | None = None  # unstructured rate ...
    pattern: str | None = None  # ... or N:M, e.g. "2:4"
    calib: str = "c4"  # 128 C4 sequences of 2048 tokens (Wanda / SparseGPT / LoSA)
    nsamples: int = 128
    seqlen: int = 2048
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"
    batch_size: int = 8
    overwrite: bool = False
    allow_pickle: bool = False
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        from losa.pruning import PRUNERS

        if self.method not in PRUNERS:
            raise ConfigError(f"unknown pruning method {self.method!r}; choose one of {', '.join(PRUNERS)}")
        if (self.sparsity is None) == (self.pattern is None):
            raise ConfigError("give exactly one of --sparsity (e.g. 0.5) or --pattern (e.g. 2:4)")
        self.target()  # validates
        _check_positive(self, "nsamples", "batch_size")
        _check_window(self, "seqlen")
        _check_device_dtype(self)

    def target(self):
        from losa.pruning.patterns import Pattern

        if self.pattern is not None:
            return Pattern.parse(str(self.pattern))
        try:
            sparsity = float(self.sparsity)
        except (TypeError, ValueError):
            raise ConfigError(f"sparsity must be a number in [0, 1), got {self.sparsity!r}") from None
        return Pattern.unstructured(sparsity)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class EvalConfig:
    model: str
    data: str = "wikitext2"
    seqlen: int = 2048
    batch_size: int = 4
    device: str = "cpu"
    dtype: str = "float32"
    max_windows: int | None = None  # evaluate N windows spread evenly over the text (quick checks)
    allow_pickle: bool = False
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        _check_window(self, "seqlen")
        _check_positive(self, "batch_size")
        if self.max_windows is not None:
            _check_positive(self, "max_windows")
        _check_device_dtype(self)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class TrainConfig:
    """Fine-tuning settings of the paper / the authors' code (ALGORITHM.md section 4)."""

    learning_rate: float = 2e-4
    batch_size: int = 4
    grad_accum: int = 2
    max_grad_norm: float = 0.3
    warmup_ratio: float = 0.3
    weight_decay: float = 0.001
    lr_scheduler: str = "linear"
    # "auto": paged AdamW (8-bit, as the authors) on CUDA when bitsandbytes is installed, else AdamW
    optim: str = "auto"
    epochs: int = 1

    def __post_init__(self) -> None:
        _check_positive(self, "batch_size", "grad_accum", "epochs")
        for name in ("learning_rate", "max_grad_norm"):
            if not float(getattr(self, name)) > 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}")
        if self.weight_decay < 0:
            raise ConfigError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        from transformers.trainer_utils import SchedulerType
        from transformers.training_args import OptimizerNames

        schedulers = [t.value for t in SchedulerType]
        if self.lr_scheduler not in schedulers:
            raise ConfigError(f"unknown lr_scheduler {self.lr_scheduler!r}; choose one of {', '.join(schedulers)}")
        optimizers = ["auto", *(o.value for o in OptimizerNames)]
        if self.optim not in optimizers:
            raise ConfigError(f"optim {self.optim!r} is not a transformers optimiser; e.g. auto, adamw_torch, paged_adamw_8bit")

    def as_dict(self) -> dict:
        return asdict(self)


FINETUNE_METHODS = ("losa", "lora", "sparse-lora", "ft-then-sparsify")


@dataclass
class LosaConfig:
    """LoSA's own settings; defaults are the paper's (ALGORITHM.md sections 1-4)."""

    steps: int = 5  # T
    r0: int = 6  # initial mean rank; grows by one per step (Eq. 9)
    r_min: int = 1
    r_max: int = 16
    alpha: float = 16.0
    dropout: float = 0.1
    beta: float | None = None  # None: 1 with Wanda, 100 with SparseGPT (authors)
    delta: float | None = None  # None: the paper's table (allocation.rates.delta_for)
    schedule: str = "cubic"  # or "linear"
    lsr: bool = True  # layer-wise sparsity rates from RMI
    sra: bool = True  # sparsity-aware rank allocation
    dsa: bool = True  # dynamic sparsity and adaptation (T steps); off: one step at the final sparsity
    rank_by: str = "error"  # or "sparsity" (ablation, paper Table 7)
    shrink: str = "keep"  # how adapters shrink: keep leading rows (paper) or "svd"
    mixed_nm: bool = False  # N:M patterns: per-block N from the LSR importances (paper sec. 3.4)
    lsr_samples: int = 64  # calibration sequences whose features give the RMI (authors: 64 for 7B)
    sra_samples: int = 16  # calibration sequences whose dense block outputs are kept for SRA
    lora_rank: int = 8  # rank of the LoRA / Sparse-LoRA baselines

    def __post_init__(self) -> None:
        from losa.schedule import SCHEDULES

        _check_positive(self, "steps", "r0", "r_min", "r_max", "lsr_samples", "sra_samples", "lora_rank")
        if self.r_min > self.r_max:
            raise ConfigError(f"r_min ({self.r_min}) must not exceed r_max ({self.r_max})")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"unknown schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}")
        if self.rank_by not in ("error", "sparsity"):
            raise ConfigError(f"rank_by must be 'error' or 'sparsity', got {self.rank_by!r}")
        if self.shrink not in ("keep", "svd"):
            raise ConfigError(f"shrink must be 'keep' or 'svd', got {self.shrink!r}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.lsr_samples < 2:
            raise ConfigError("lsr_samples must be at least 2 (CKA compares samples)")
        if not self.alpha > 0:
            raise ConfigError(f"alpha must be > 0, got {self.alpha!r}")
        if self.beta is not None and not self.beta >= 0:
            raise ConfigError(f"beta must be >= 0 (or null for the pruner's default), got {self.beta!r}")
        if self.delta is not None and not 0 <= self.delta < 0.5:
            raise ConfigError(f"delta must be in [0, 0.5) (or null for the paper's table), got {self.delta!r}")
        self._check_rank_range()

    def _check_rank_range(self) -> None:
        """SRA allocates ranks in [r_min, r_max] around each step's mean rank (Eq. 9: r0, r0 + 1, ...,
        r0 + steps - 1; without DSA only the last): every mean rank must lie in that range, or the
        rank budget fails after the first step's pruning."""
        if not self.sra:  # uniform ranks: the mean rank itself, not clipped to [r_min, r_max]
            return
        first, last = (self.r0 if self.dsa else self.final_mean_rank()), self.final_mean_rank()
        if last > self.r_max:
            raise ConfigError(
                f"the mean rank of the last step, r0 + steps - 1 = {self.r0} + {self.steps} - 1 = {last}, exceeds "
                f"r_max = {self.r_max}: lower r0 or steps so that r0 + steps - 1 <= {self.r_max} (or raise r_max)"
            )
        if first < self.r_min:
            which = "of the first step, r0 =" if self.dsa else "(one step without DSA), r0 + steps - 1 ="
            raise ConfigError(
                f"the mean rank {which} {first}, is below r_min = {self.r_min}: raise r0 (or lower r_min)"
            )

    def final_mean_rank(self) -> int:
        return self.r0 + self.steps - 1

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class FinetuneConfig:
    """``losa finetune``: prune and recover with LoSA, or one of the baselines."""

    model: str
    out: str | None = None
    method: str = "losa"
    pruner: str = "wanda"
    sparsity: float | None = None
    pattern: str | None = None
    calib: str = "c4"
    nsamples: int = 128
    seqlen: int = 2048
    train: str = "alpaca-gpt4"  # Alpaca-GPT4 (10K samples in the paper)
    train_samples: int = 10000
    train_seqlen: int = 1024
    eval: str | None = None  # perplexity data evaluated on the result (None: skip)
    eval_seqlen: int | None = None  # default: seqlen
    eval_max_windows: int | None = None  # evaluate on this many evenly spread windows (quick runs)
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"
    batch_size: int = 8  # calibration forward batch
    overwrite: bool = False
    resume: bool = True  # continue from <out>.state after an interruption
    allow_pickle: bool = False
    trust_remote_code: bool = False
    losa: LosaConfig = None  # type: ignore[assignment]
    training: TrainConfig = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        from losa.pruning import PRUNERS

        self.losa = self.losa if self.losa is not None else LosaConfig()
        self.training = self.training if self.training is not None else TrainConfig()
        if self.method not in FINETUNE_METHODS:
            raise ConfigError(f"unknown method {self.method!r}; choose one of {', '.join(FINETUNE_METHODS)}")
        if self.pruner not in PRUNERS:
            raise ConfigError(f"unknown pruner {self.pruner!r}; choose one of {', '.join(PRUNERS)}")
        PruneConfig(model=self.model, method=self.pruner, sparsity=self.sparsity, pattern=self.pattern,
                    nsamples=self.nsamples, seqlen=self.seqlen)  # validates the target and sizes
        _check_positive(self, "train_samples", "batch_size")
        _check_window(self, "train_seqlen")
        # the evaluation runs after training: its settings are checked now, not hours later
        if self.eval is not None and (not isinstance(self.eval, str) or not self.eval.strip()):
            raise ConfigError(f"eval must be a data spec (text:PATH, jsonl:PATH, wikitext2, c4) or unset, got {self.eval!r}")
        if self.eval_seqlen is not None:
            _check_window(self, "eval_seqlen", " (or unset to use seqlen)")
        if self.eval_max_windows is not None:
            _check_positive(self, "eval_max_windows")
        _check_device_dtype(self)

    def target(self):
        return PruneConfig(model=self.model, method=self.pruner, sparsity=self.sparsity, pattern=self.pattern).target()

    def beta(self) -> float:
        if self.losa.beta is not None:
            return self.losa.beta
        return 100.0 if self.pruner == "sparsegpt" else 1.0

    def as_dict(self) -> dict:
        return asdict(self)
