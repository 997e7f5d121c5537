"""Typed configuration. Defaults are the paper's settings (ALGORITHM.md)."""

from __future__ import annotations

from dataclasses import dataclass, fields

from losa.errors import ConfigError


def _check_positive(obj, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")


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
        _check_positive(self, "nsamples", "seqlen", "batch_size")
        if self.seqlen < 2:
            raise ConfigError("seqlen must be at least 2")

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
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass
class EvalConfig:
    model: str
    data: str = "wikitext2"
    seqlen: int = 2048
    batch_size: int = 4
    device: str = "cpu"
    dtype: str = "float32"
    max_windows: int | None = None  # evaluate only the first N windows (quick checks)
    allow_pickle: bool = False
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        _check_positive(self, "seqlen", "batch_size")
        if self.max_windows is not None:
            _check_positive(self, "max_windows")

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}
