"""The ``losa`` command line. Every subcommand is a thin layer over ``losa.api``."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from losa.errors import LosaError

log = logging.getLogger("losa")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", help="compute device: cpu, cuda, cuda:1 (default cpu)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16", "auto"])
    p.add_argument("--allow-pickle", action="store_true", help="allow loading pickled *.bin weights (unsafe)")
    p.add_argument("--trust-remote-code", action="store_true", help="run model code shipped with the checkpoint")
    p.add_argument("-v", "--verbose", action="count", default=0)
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors, no progress bars")


def _add_prune(sub) -> None:
    p = sub.add_parser("prune", help="one-shot pruning (magnitude, Wanda, SparseGPT)")
    p.add_argument("--model", required=True, help="local Hugging Face checkpoint directory")
    p.add_argument("--method", default="wanda", choices=["magnitude", "wanda", "sparsegpt"])
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--sparsity", type=float, help="unstructured sparsity in [0, 1), e.g. 0.5")
    target.add_argument("--pattern", help="N:M semi-structured pattern, e.g. 2:4 or 4:8")
    p.add_argument("--calib", default="c4", help="calibration data: text:PATH, jsonl:PATH, c4, wikitext2 (default c4)")
    p.add_argument("--nsamples", type=int, default=128, help="calibration windows (default 128)")
    p.add_argument("--seqlen", type=int, default=2048, help="tokens per calibration window (default 2048)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8, help="calibration windows per forward batch")
    p.add_argument("--out", required=True, help="output checkpoint directory")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    _add_common(p)


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="perplexity on a text source")
    p.add_argument("--model", required=True)
    p.add_argument("--data", default="wikitext2", help="text:PATH, jsonl:PATH, wikitext2, c4 (default wikitext2)")
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-windows", type=int, default=None, help="evaluate only the first N windows")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    _add_common(p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="losa", description="Prune LLMs and recover them with LoSA.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_prune(sub)
    _add_eval(sub)
    return parser


def _run(args: argparse.Namespace) -> int:
    from losa import api
    from losa.config import EvalConfig, PruneConfig

    if args.command == "prune":
        config = PruneConfig(
            model=args.model, out=args.out, method=args.method, sparsity=args.sparsity, pattern=args.pattern,
            calib=args.calib, nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed, device=args.device,
            dtype=args.dtype, batch_size=args.batch_size, overwrite=args.overwrite, allow_pickle=args.allow_pickle,
            trust_remote_code=args.trust_remote_code,
        )
        report = api.prune(config)
        print(f"wrote {args.out} (overall sparsity {report['overall_sparsity']:.4f}, {report['timings_s']['prune']:.1f} s pruning)")
        return 0
    if args.command == "eval":
        config = EvalConfig(
            model=args.model, data=args.data, seqlen=args.seqlen, batch_size=args.batch_size, device=args.device,
            dtype=args.dtype, max_windows=args.max_windows, allow_pickle=args.allow_pickle,
            trust_remote_code=args.trust_remote_code,
        )
        result = api.evaluate(config)
        if args.json:
            print(json.dumps(result))
        else:
            print(f"perplexity {result['perplexity']:.4f} over {result['tokens']:,} tokens ({config.data})")
        return 0
    raise AssertionError(args.command)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from losa.log import setup_logging

    setup_logging(args.verbose, args.quiet)
    try:
        return _run(args)
    except LosaError as e:
        print(f"losa {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"losa {args.command}: interrupted; nothing partial was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
