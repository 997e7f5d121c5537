"""Seconds-long end-to-end smoke on the committed reference model (no corpus build needed):
calibration and evaluation text come from the docstrings of the running interpreter's stdlib."""

import inspect
import json
from pathlib import Path

import pytest

from losa import api
from losa.config import EvalConfig, FinetuneConfig, LosaConfig, PruneConfig, TrainConfig

MODEL = Path(__file__).resolve().parent.parent / "models" / "reference-llama"


def _docs(modules) -> str:
    import importlib

    parts = []
    for name in modules:
        module = importlib.import_module(name)
        for _, obj in inspect.getmembers(module):
            doc = inspect.getdoc(obj)
            if doc and len(doc) > 80:
                parts.append(doc)
    return "\n\n".join(dict.fromkeys(parts))


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    d = tmp_path_factory.mktemp("ref")
    (d / "calib.txt").write_text(_docs(["collections", "functools", "itertools", "os", "pathlib", "json", "re"]))
    (d / "eval.txt").write_text(_docs(["argparse", "logging", "subprocess", "threading"]))
    return d


@pytest.mark.skipif(not MODEL.exists(), reason="reference model not committed")
def test_reference_model_prune_and_losa_smoke(tmp_path, texts):
    ev = dict(data=f"text:{texts / 'eval.txt'}", seqlen=128, max_windows=24, batch_size=8)
    dense = api.evaluate(EvalConfig(model=str(MODEL), **ev))["perplexity"]
    assert dense < 200  # a real language model on real English/Python text
    # 70 % Wanda hurts the reference model clearly (+72 % on its own eval split, BENCHMARKS.md)
    api.prune(PruneConfig(model=str(MODEL), out=str(tmp_path / "w70"), method="wanda", sparsity=0.7,
                          calib=f"text:{texts / 'calib.txt'}", nsamples=16, seqlen=128))
    pruned = api.evaluate(EvalConfig(model=str(tmp_path / "w70"), **ev))["perplexity"]
    assert pruned > 1.3 * dense
    report = api.finetune(FinetuneConfig(
        model=str(MODEL), out=str(tmp_path / "losa"), pruner="wanda", sparsity=0.7, calib=f"text:{texts / 'calib.txt'}",
        nsamples=16, seqlen=128, train=f"text:{texts / 'calib.txt'}", train_samples=40, train_seqlen=128,
        losa=LosaConfig(steps=2, lsr_samples=16, sra_samples=4), training=TrainConfig(batch_size=4, grad_accum=1)))
    assert report["overall_sparsity"] == pytest.approx(0.7, abs=0.005)
    saved = json.loads((tmp_path / "losa" / "report.json").read_text())
    assert [s["step"] for s in saved["steps"]] == [1, 2]
    recovered = api.evaluate(EvalConfig(model=str(tmp_path / "losa"), **ev))["perplexity"]
    assert recovered < pruned  # even a tiny LoSA run recovers part of the damage
