"""A two-process launch (torchrun, CPU / gloo): training is distributed by the Trainer, every process
computes the same pruned and adapted model, and only the main process writes."""

import json
import os
import subprocess
import sys

import pytest

SCRIPT = """
import json, os, sys
from losa import api
from losa.config import FinetuneConfig, LosaConfig, TrainConfig

model, text, out, dump = sys.argv[1:5]
cfg = FinetuneConfig(model=model, out=out, pruner="wanda", sparsity=0.6, calib="text:" + text, nsamples=8, seqlen=32,
                     train="text:" + text, train_samples=24, train_seqlen=32, seed=0, eval="text:" + text, eval_seqlen=32,
                     eval_max_windows=8, losa=LosaConfig(steps=2, lsr_samples=8, sra_samples=4, dropout=0.1),
                     training=TrainConfig(batch_size=2, grad_accum=1))
report = api.finetune(cfg)
with open(os.path.join(dump, "rank%s.json" % os.environ["RANK"]), "w") as f:
    json.dump(report, f, default=str)
"""


def test_two_processes_compute_the_same_model_and_write_once(tmp_path, model_dirs, text_file):
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(script), str(model_dirs["llama"]), str(text_file), str(out), str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for report in reports:
        report.pop("timings_s")
        report.pop("plots", None)  # written by the main process only
        for step in report["steps"]:
            step.pop("seconds")
            for measured in ("seconds", "cpu_seconds", "peak_memory_mib"):  # timings and memory differ by process
                step["training"].pop(measured)
    # the same masks, importances, reconstruction errors (which see step 1's trained adapters) and perplexity
    assert reports[0] == reports[1]
    # the processes split each step's samples: the last step's 22 are 11 per process, 6 batches of 2
    assert reports[0]["steps"][-1]["training"]["optimizer_steps"] == 6
    saved = json.loads((out / "report.json").read_text())
    assert saved["metrics"]["perplexity"] == pytest.approx(reports[0]["metrics"]["perplexity"])
    assert not (tmp_path / "out.state").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".out")) == []  # no temporaries left
