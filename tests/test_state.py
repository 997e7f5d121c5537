"""Run state: RNG states are saved and restored exactly, and nothing is ever unpickled."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from losa.errors import ConfigError
from losa.state import RunState, load_rng_state, save_rng_state


def draws() -> tuple:
    return torch.rand(4).tolist(), random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), np.random.randn()


def test_rng_state_round_trips_exactly_without_pickle(tmp_path, monkeypatch):
    torch.manual_seed(1)
    random.seed(2)
    np.random.seed(3)
    random.gauss(0, 1)  # Python and NumPy cache the second normal of a pair: that cache is state too
    np.random.randn()
    save_rng_state(tmp_path)
    expected = draws()
    torch.manual_seed(99)
    random.seed(99)
    np.random.seed(99)
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load (pickle) called"))
    load_rng_state(tmp_path)
    assert draws() == expected
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rng.json", "rng.safetensors"]


def test_step_checkpoint_restores_rng_and_refuses_legacy_pickle(tmp_path, monkeypatch):
    state = RunState(tmp_path / "s", {"seed": 0})
    state.start()
    torch.manual_seed(0)
    state.save_step(1, {"w": torch.ones(2)}, {"a": torch.zeros(1)}, {"step": 1})
    expected = draws()
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load (pickle) called"))
    weights, adapters, record = state.load_step(state.last_step())
    assert draws() == expected and record == {"step": 1} and torch.equal(weights["w"], torch.ones(2))
    assert not list((tmp_path / "s").rglob("*.pt"))

    step = tmp_path / "s" / "step-1"  # a state directory of an older losa: a pickled rng.pt
    for name in ("rng.safetensors", "rng.json"):
        (step / name).unlink()
    (step / "rng.pt").write_bytes(b"not to be unpickled")
    with pytest.raises(ConfigError, match="pickled.*--restart"):
        state.load_step(1)
