"""`make demo` end to end on the reference model and the offline corpus (about 2 minutes on 2 CPU
cores, plus the one-time corpus build): the `slow` marker keeps it out of `make test`."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_demo_prunes_recovers_and_writes_a_sparse_checkpoint(tmp_path):
    out = tmp_path / "demo"
    subprocess.run([sys.executable, str(ROOT / "examples" / "demo.py"), "--out", str(out)], check=True, timeout=1800)
    dense, pruned, losa = json.loads((out / "summary.json").read_text())
    assert dense["sparsity"] == 0.0 and pruned["sparsity"] == pytest.approx(0.7, abs=0.005)
    assert losa["sparsity"] == pytest.approx(0.7, abs=0.005)
    # 70 % Wanda clearly hurts the reference model and LoSA recovers part of it
    assert pruned["perplexity"] > 1.3 * dense["perplexity"]
    assert dense["perplexity"] < losa["perplexity"] < pruned["perplexity"]
    report = json.loads((out / "losa" / "report.json").read_text())
    assert [step["step"] for step in report["steps"]] == [1, 2, 3, 4, 5]
    assert sorted(p.name for p in (out / "losa" / "plots").glob("*.png")) == [
        "ranks_by_step.png", "sparsity_by_step.png", "training_loss.png"]


@pytest.mark.slow
def test_api_example_runs_every_stage(tmp_path):
    """examples/api_example.py (prune, LoSA, evaluate, export through the Python API) as documented."""
    if not (ROOT / "data" / "corpus" / "eval.txt").exists():  # the demo test above builds it
        subprocess.run([sys.executable, "-m", "losa.reference.corpus", "--out", str(ROOT / "data" / "corpus")], check=True)
    out = tmp_path / "api"
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "api_example.py"), "--out", str(out)],
                          capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {line.rsplit(None, 2)[0]: [float(v.rstrip("%")) for v in line.rsplit(None, 2)[1:]]
            for line in done.stdout.splitlines() if line.startswith(("dense", "Wanda"))}
    dense, pruned, losa = rows["dense"], rows["Wanda 70 %"], rows["Wanda 70 % + LoSA"]
    assert dense[0] < losa[0] < pruned[0]
    assert pruned[1] == pytest.approx(70, abs=0.5) and losa[1] == pytest.approx(70, abs=0.5)
    config = json.loads((out / "wanda70-losa-compressed" / "config.json").read_text())
    assert config["quantization_config"]["sparsity_config"]["format"] == "sparse-bitmask"
