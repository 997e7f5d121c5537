"""`make demo`: the main job on the bundled reference model, end to end.

Dense reference model -> Wanda 70 % -> LoSA fine-tune (5 dynamic steps) -> evaluation -> a sparse
Hugging Face checkpoint with report.json and plots, and a summary table. Uses the same Python API
as the `losa` CLI. The offline corpus is built first if it is not there yet (data/corpus).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default=str(ROOT / "models" / "reference-llama"))
    p.add_argument("--corpus", default=str(ROOT / "data" / "corpus"))
    p.add_argument("--out", default=str(ROOT / "runs" / "demo"))
    p.add_argument("--sparsity", type=float, default=0.7)
    p.add_argument("--nsamples", type=int, default=64)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--train-samples", type=int, default=400)
    p.add_argument("--eval-windows", type=int, default=256, help="evaluation windows, spread over the eval split")
    p.add_argument("--device", default="cpu")
    args = p.parse_args()

    from losa import api
    from losa.config import EvalConfig, FinetuneConfig, LosaConfig, PruneConfig
    from losa.log import setup_logging

    setup_logging()
    corpus, out = Path(args.corpus), Path(args.out)
    if not (corpus / "eval.txt").exists():
        print("building the offline corpus (once) ...", flush=True)
        subprocess.run([sys.executable, "-m", "losa.reference.corpus", "--out", str(corpus)], check=True)
    calib, evaluation, train = (f"text:{corpus / name}.txt" for name in ("calib", "eval", "finetune"))
    rows = []

    def evaluate(model: str) -> float:
        return api.evaluate(EvalConfig(model=model, data=evaluation, seqlen=args.seqlen, device=args.device, batch_size=16,
                                       max_windows=args.eval_windows))["perplexity"]

    start = time.perf_counter()
    rows.append(("dense", evaluate(args.model), 0.0, time.perf_counter() - start))

    start = time.perf_counter()
    pruned = api.prune(PruneConfig(model=args.model, out=str(out / "wanda"), method="wanda", sparsity=args.sparsity,
                                   calib=calib, nsamples=args.nsamples, seqlen=args.seqlen, device=args.device, overwrite=True))
    rows.append((f"Wanda {args.sparsity:.0%}", evaluate(str(out / "wanda")), pruned["overall_sparsity"], time.perf_counter() - start))

    start = time.perf_counter()
    losa = api.finetune(FinetuneConfig(
        model=args.model, out=str(out / "losa"), method="losa", pruner="wanda", sparsity=args.sparsity, calib=calib,
        nsamples=args.nsamples, seqlen=args.seqlen, train=train, train_samples=args.train_samples,
        train_seqlen=args.seqlen, eval=evaluation, eval_max_windows=args.eval_windows, device=args.device, overwrite=True,
        losa=LosaConfig(lsr_samples=min(64, args.nsamples))))
    rows.append((f"Wanda {args.sparsity:.0%} + LoSA", losa["metrics"]["perplexity"], losa["overall_sparsity"], time.perf_counter() - start))

    summary = [{"model": name, "perplexity": ppl, "sparsity": sp, "seconds": sec} for name, ppl, sp, sec in rows]
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print()
    print(f"{'model':<22} {'perplexity':>11} {'sparsity':>9} {'time s':>8}")
    for name, ppl, sp, sec in rows:
        print(f"{name:<22} {ppl:>11.2f} {sp:>9.2%} {sec:>8.1f}")
    print(f"\nsparse checkpoint: {out / 'losa'} (report.json, plots/); pruned only: {out / 'wanda'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
