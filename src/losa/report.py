"""report.json: what was done, with what settings, per-layer results, metrics and timings."""

from __future__ import annotations

import contextlib
import platform
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

import losa


class Timer:
    """Accumulates wall-clock seconds per named phase."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._running: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        start = self._running[phase] = time.perf_counter()
        try:
            yield
        finally:
            del self._running[phase]
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start

    def total(self, *phases: str) -> float:
        """Finished seconds of ``phases`` together."""
        return sum(self.seconds.get(phase, 0.0) for phase in phases)

    def snapshot(self) -> dict[str, float]:
        """The seconds so far, phases still running included (for a report written inside one)."""
        now = time.perf_counter()
        out = dict(self.seconds)
        for phase, start in self._running.items():
            out[phase] = out.get(phase, 0.0) + now - start
        return out


class PeakMemory:
    """Peak memory of the code inside ``with PeakMemory(device) as peak:``, in MiB (``peak.mib``).

    CUDA: torch's peak allocated bytes, reset at entry. CPU: the process's peak resident set
    (Linux VmHWM), reset at entry through /proc/self/clear_refs, so it counts this phase only
    (``None`` where that is not possible).
    """

    def __init__(self, device: str = "cpu") -> None:
        self.device = torch.device(device)
        self.mib: float | None = None

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # resets the peak RSS to the current RSS
                self._cpu = True
            except OSError:
                self._cpu = False
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            self.mib = torch.cuda.max_memory_allocated(self.device) / 2**20
        elif self._cpu:
            with open("/proc/self/status") as f:
                kib = next((int(line.split()[1]) for line in f if line.startswith("VmHWM:")), None)
            self.mib = None if kib is None else kib / 1024


def environment() -> dict:
    import transformers

    return {
        "losa": losa.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


@dataclass
class Report:
    command: str
    settings: dict
    layers: list = field(default_factory=list)
    metrics: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        out = {
            "command": self.command,
            **({"method": self.settings["method"]} if "method" in self.settings else {}),
            "settings": self.settings,
            "layers": [l.as_dict() if hasattr(l, "as_dict") else l for l in self.layers],
            "metrics": self.metrics,
            "timings_s": {k: round(v, 3) for k, v in self.timings.items()},
            "environment": environment(),
        }
        if self.layers:
            total = sum(l.numel for l in self.layers)
            out["overall_sparsity"] = sum(l.sparsity * l.numel for l in self.layers) / total
        out.update(self.extra)
        return out
