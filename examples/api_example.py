"""The losa Python API on the bundled reference model: prune, recover with LoSA, evaluate, export.

    python examples/api_example.py [--device cpu] [--out runs/api-example]

Needs models/reference-llama and data/corpus (see examples/configs/reference-wanda70-losa.yaml).
Each call below is what one ``losa`` CLI subcommand or one stage of ``losa run`` does; every
setting not passed is the paper's default (see losa.config). A few minutes on a CPU.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(ROOT / "models" / "reference-llama"))
    p.add_argument("--corpus", default=str(ROOT / "data" / "corpus"))
    p.add_argument("--out", default=str(ROOT / "runs" / "api-example"))
    p.add_argument("--device", default="cpu")
    args = p.parse_args()

    from losa import api
    from losa.config import EvalConfig, FinetuneConfig, LosaConfig, PruneConfig, TrainConfig
    from losa.errors import LosaError
    from losa.export import export_compressed
    from losa.log import setup_logging

    setup_logging(quiet=True)
    corpus, out = Path(args.corpus), Path(args.out)
    calib, train, held_out = (f"text:{corpus / split}.txt" for split in ("calib", "finetune", "eval"))
    small = dict(calib=calib, nsamples=32, seqlen=256, device=args.device, overwrite=True)  # paper: 128 x 2048

    def perplexity(model_dir: Path) -> float:
        """Perplexity of a checkpoint on the held-out corpus split (200 windows of 256 tokens spread over it)."""
        return api.evaluate(EvalConfig(model=str(model_dir), data=held_out, seqlen=256, max_windows=200,
                                       device=args.device))["perplexity"]

    try:
        # 1. One-shot pruning: Wanda, 70 % unstructured. Writes a standard HF checkpoint + report.json.
        wanda = api.prune(PruneConfig(model=args.model, out=str(out / "wanda70"), method="wanda", sparsity=0.7, **small))

        # 2. Prune and recover with LoSA: T = 5 dynamic steps, LSR + SRA + DSA (the defaults); the
        #    adapters are merged back, so the result is exactly as sparse as step T's masks.
        losa = api.finetune(FinetuneConfig(
            model=args.model, out=str(out / "wanda70-losa"), method="losa", pruner="wanda", sparsity=0.7, **small,
            train=train, train_samples=1000, train_seqlen=256,       # paper: 10K Alpaca-GPT4 samples of 1024 tokens
            losa=LosaConfig(steps=5, r0=6, lsr_samples=32),           # RMI features of every calibration sequence
            training=TrainConfig(learning_rate=2e-4, batch_size=4, grad_accum=2),
        ))

        # 3. Evaluate the dense model and both sparse checkpoints the same way.
        rows = [("dense", perplexity(Path(args.model)), 0.0),
                ("Wanda 70 %", perplexity(out / "wanda70"), wanda["overall_sparsity"]),
                ("Wanda 70 % + LoSA", perplexity(out / "wanda70-losa"), losa["overall_sparsity"])]

        # 4. Store the recovered model compressed (bitmask + non-zeros, compressed-tensors layout).
        export = export_compressed(out / "wanda70-losa", out / "wanda70-losa-compressed", overwrite=True)
    except LosaError as e:  # bad input (missing model or data, ...): one line, not a traceback
        print(f"error: {e}", file=sys.stderr)
        return 2

    print(f"\n{'model':<20} {'perplexity':>10} {'sparsity':>9}")
    for name, ppl, sparsity in rows:
        print(f"{name:<20} {ppl:>10.2f} {sparsity:>9.2%}")
    print(f"\nLoSA steps (target sparsity, mean rank): "
          + ", ".join(f"({s['target_sparsity']:.3f}, {s['mean_rank']})" for s in losa["steps"]))
    print(f"{export['format']} export: {export['export_bytes'] / 1e6:.1f} MB vs {export['dense_bytes'] / 1e6:.1f} MB dense "
          f"(prunable weights {export['prunable_ratio']:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
