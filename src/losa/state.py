"""Run state for resuming an interrupted fine-tune.

After every finished step the state directory holds, written atomically: the prunable weights,
the adapter factors (their shapes are the ranks), the step's rates / ranks / report, and the RNG
states (torch generators as tensors in ``rng.safetensors``, Python's and NumPy's as ``rng.json``:
nothing in a state directory is pickled, so resuming never unpickles). Rerunning the same command
continues after the last finished step. The dense block outputs SRA compares against are recorded
once, before step 1, into the same directory (disk-backed, so their memory never grows with the
model).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from losa.checkpoint import write_json_atomic
from losa.distributed import is_main_process, main_process_writes
from losa.errors import ConfigError

# settings that do not change the result of a run (a resumed run may change them)
_NOT_FINGERPRINTED = ("out", "overwrite", "resume", "device", "batch_size", "eval", "eval_seqlen", "eval_max_windows")


def fingerprint(settings: dict) -> dict:
    return json.loads(json.dumps({k: v for k, v in settings.items() if k not in _NOT_FINGERPRINTED}, default=str))


class RunState:
    """``shared``: one directory for all processes of a distributed run, written by the main one only
    (the others wait for it and read it); a private directory (``shared=False``) is each process's own."""

    def __init__(self, directory: str | Path, settings: dict, shared: bool = True) -> None:
        self.dir = Path(directory)
        self.fingerprint = fingerprint(settings)
        self.shared = shared

    def _writes(self):
        return main_process_writes() if self.shared else contextlib.nullcontext(True)

    # -- dense block outputs (SRA's reference), recorded once ------------------------------------
    def dense_path(self, block: int) -> Path:
        return self.dir / "dense" / f"block_{block:04d}.safetensors"

    def save_dense(self, block: int, outputs: torch.Tensor) -> None:
        """Main process only (no barrier per block: ``mark_dense_complete`` waits for all of them)."""
        if self.shared and not is_main_process():
            return
        path = self.dense_path(block)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file({"outputs": outputs.detach().contiguous().cpu()}, str(tmp))
        os.replace(tmp, path)

    def load_dense(self, block: int, device) -> torch.Tensor:
        return load_file(str(self.dense_path(block)), device=str(device))["outputs"]

    def has_dense(self, num_blocks: int) -> bool:
        return (self.dir / "dense" / "complete").exists() and all(self.dense_path(i).exists() for i in range(num_blocks))

    def mark_dense_complete(self) -> None:
        with self._writes() as writer:
            if writer:
                (self.dir / "dense" / "complete").write_text(json.dumps(self.fingerprint))

    # -- per-step checkpoints --------------------------------------------------------------------
    def start(self) -> None:
        """Create the directory, or check that an existing one belongs to this run."""
        meta = self.dir / "run.json"
        with self._writes() as writer:
            if writer and not meta.exists():
                self.dir.mkdir(parents=True, exist_ok=True)
                write_json_atomic(meta, self.fingerprint)
        saved = json.loads(meta.read_text())
        if saved != self.fingerprint:
            differs = sorted(k for k in set(saved) | set(self.fingerprint) if saved.get(k) != self.fingerprint.get(k))
            raise ConfigError(
                f"{self.dir} holds the state of a run with different settings (differs in: {', '.join(differs)}); "
                "delete that directory to start over, or rerun with the original settings to resume"
            )

    def last_step(self) -> int:
        latest = self.dir / "latest.json"
        return json.loads(latest.read_text())["step"] if latest.exists() else 0

    def save_step(self, step: int, weights: dict[str, torch.Tensor], adapters: dict[str, torch.Tensor], record: dict) -> None:
        with self._writes() as writer:
            if writer:
                self._save_step(step, weights, adapters, record)

    def _save_step(self, step: int, weights: dict[str, torch.Tensor], adapters: dict[str, torch.Tensor], record: dict) -> None:
        final = self.dir / f"step-{step}"
        tmp = self.dir / f".step-{step}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, str(tmp / "weights.safetensors"))
        save_file({k: v.detach().contiguous().cpu() for k, v in adapters.items()}, str(tmp / "adapters.safetensors"))
        save_rng_state(tmp)
        write_json_atomic(tmp / "record.json", record)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        write_json_atomic(self.dir / "latest.json", {"step": step})
        for old in self.dir.glob("step-*"):
            if old != final:
                shutil.rmtree(old, ignore_errors=True)

    def load_step(self, step: int) -> tuple[dict, dict, dict]:
        d = self.dir / f"step-{step}"
        weights = load_file(str(d / "weights.safetensors"))
        adapters = load_file(str(d / "adapters.safetensors"))
        record = json.loads((d / "record.json").read_text())
        if not (d / _RNG_TENSORS).exists() and (d / "rng.pt").exists():
            raise ConfigError(
                f"{self.dir} was written by an older losa that pickled its RNG state ({d / 'rng.pt'}), which losa "
                "no longer unpickles; delete that directory (or rerun with --restart) to start the run over"
            )
        load_rng_state(d)
        return weights, adapters, record

    def remove(self) -> None:
        with self._writes() as writer:
            if writer:
                shutil.rmtree(self.dir, ignore_errors=True)


_RNG_TENSORS = "rng.safetensors"
_RNG_JSON = "rng.json"


def save_rng_state(directory: Path) -> None:
    """Write the torch (CPU and every CUDA device), Python and NumPy global RNG states into ``directory``
    without pickle: the generator states as uint8 tensors, the others as JSON."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(directory / _RNG_TENSORS))
    version, internal, gauss_next = random.getstate()
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    state = {
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
        "numpy": {"name": name, "keys": keys.tolist(), "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(cached_gaussian)},
    }
    (directory / _RNG_JSON).write_text(json.dumps(state) + "\n")  # directory is the step's temporary one


def load_rng_state(directory: Path) -> None:
    """Restore the global RNG states ``save_rng_state`` wrote (JSON floats round-trip exactly)."""
    tensors = load_file(str(directory / _RNG_TENSORS))
    state = json.loads((directory / _RNG_JSON).read_text())
    torch.set_rng_state(tensors["torch"])
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss_next"]))
    npy = state["numpy"]
    np.random.set_state((npy["name"], np.asarray(npy["keys"], dtype=np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached_gaussian"]))
    cuda = [tensors[f"cuda.{i}"] for i in range(len(tensors)) if f"cuda.{i}" in tensors]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
