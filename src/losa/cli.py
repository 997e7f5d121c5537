"""The ``losa`` command line. Every subcommand is a thin layer over ``losa.api``."""

from __future__ import annotations

import argparse
import json
import logging
import os
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
    p.add_argument("--data", default=None,
                   help="perplexity data: text:PATH, jsonl:PATH, wikitext2, c4 (default wikitext2 unless --tasks is given)")
    p.add_argument("--tasks", nargs="?", const="paper", default=None,
                   help="zero-shot lm-eval tasks, comma separated; bare --tasks = the paper's seven")
    p.add_argument("--limit", type=int, default=None, help="zero-shot: at most N documents per task")
    p.add_argument("--num-fewshot", type=int, default=0)
    p.add_argument("--include-path", default=None, help="zero-shot: directory of local lm-eval task YAMLs")
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-windows", type=int, default=None, help="evaluate N windows spread evenly over the text")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    _add_common(p)


def _add_finetune(sub) -> None:
    from losa.config import FINETUNE_METHODS, LosaConfig, TrainConfig

    lc, tc = LosaConfig(), TrainConfig()
    p = sub.add_parser("finetune", help="prune and recover with LoSA (or a baseline / ablation)")
    p.add_argument("--model", required=True, help="local Hugging Face checkpoint directory (dense)")
    p.add_argument("--method", default="losa", choices=FINETUNE_METHODS)
    p.add_argument("--pruner", default="wanda", choices=["wanda", "sparsegpt", "magnitude"])
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--sparsity", type=float, help="final unstructured sparsity in [0, 1), e.g. 0.7")
    target.add_argument("--pattern", help="N:M pattern, e.g. 2:4")
    p.add_argument("--calib", default="c4", help="calibration data (default c4)")
    p.add_argument("--nsamples", type=int, default=128, help="calibration windows (default 128)")
    p.add_argument("--seqlen", type=int, default=2048, help="calibration window length (default 2048)")
    p.add_argument("--train", default="alpaca-gpt4", help="fine-tuning data: jsonl:PATH (Alpaca), text:PATH, alpaca-gpt4")
    p.add_argument("--train-samples", type=int, default=10000, help="fine-tuning sequences in all (default 10000)")
    p.add_argument("--train-seqlen", type=int, default=1024, help="max tokens per fine-tuning sequence (default 1024)")
    p.add_argument("--steps", type=int, default=lc.steps, help=f"dynamic steps T (default {lc.steps})")
    p.add_argument("--r0", type=int, default=lc.r0, help=f"initial mean rank (default {lc.r0})")
    p.add_argument("--lora-rank", type=int, default=lc.lora_rank, help="rank of the LoRA baselines (default 8)")
    p.add_argument("--alpha", type=float, default=lc.alpha)
    p.add_argument("--dropout", type=float, default=lc.dropout)
    p.add_argument("--schedule", default=lc.schedule, choices=["cubic", "linear"])
    p.add_argument("--rank-by", default=lc.rank_by, choices=["error", "sparsity"])
    p.add_argument("--no-lsr", action="store_true", help="ablation: uniform layer-wise sparsity")
    p.add_argument("--no-sra", action="store_true", help="ablation: uniform ranks")
    p.add_argument("--no-dsa", action="store_true", help="ablation: one step at the final sparsity")
    p.add_argument("--mixed-nm", action="store_true", help="N:M patterns: per-block N from the LSR importances")
    p.add_argument("--shrink", default=lc.shrink, choices=["keep", "svd"],
                   help="how an adapter shrinks: keep the leading rows (paper) or the best rank-r SVD approximation")
    p.add_argument("--delta", type=float, default=lc.delta,
                   help="LSR: half-width of the per-block sparsity range around S_t (default: the paper's table)")
    p.add_argument("--lsr-samples", type=int, default=lc.lsr_samples)
    p.add_argument("--sra-samples", type=int, default=lc.sra_samples)
    p.add_argument("--lr", type=float, default=tc.learning_rate, help=f"learning rate (default {tc.learning_rate})")
    p.add_argument("--train-batch-size", type=int, default=tc.batch_size)
    p.add_argument("--grad-accum", type=int, default=tc.grad_accum)
    p.add_argument("--optim", default=tc.optim,
                   help="a transformers optimiser name, e.g. adamw_torch, paged_adamw_8bit (default auto: paged "
                        "AdamW on CUDA with bitsandbytes, else AdamW)")
    p.add_argument("--eval", default=None, help="evaluate perplexity on this data after fine-tuning")
    p.add_argument("--eval-seqlen", type=int, default=None)
    p.add_argument("--eval-max-windows", type=int, default=None, help="evaluate N evenly spread windows only")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8, help="calibration windows per forward batch")
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--restart", action="store_true", help="ignore a saved state of an interrupted run")
    _add_common(p)


def _flags_named(cls, kwargs: dict, renamed: dict[str, str] | None = None):
    """``cls(**kwargs)``; a ConfigError whose message starts with one of its field names
    ("eval_seqlen must be ...") names the command-line flag instead ("--eval-seqlen must be ...").
    ``renamed``: field -> flag where the flag is not ``--field-name``."""
    from dataclasses import fields

    from losa.errors import ConfigError

    try:
        return cls(**kwargs)
    except ConfigError as e:
        name, sep, rest = str(e).partition(" ")
        if name in {f.name for f in fields(cls)}:
            flag = (renamed or {}).get(name, "--" + name.replace("_", "-"))
            raise ConfigError(flag + sep + rest) from None
        raise


def finetune_config(args: argparse.Namespace):
    from losa.config import FinetuneConfig, LosaConfig, TrainConfig

    losa = _flags_named(LosaConfig, dict(
        steps=args.steps, r0=args.r0, alpha=args.alpha, dropout=args.dropout, schedule=args.schedule, lsr=not args.no_lsr,
        sra=not args.no_sra, dsa=not args.no_dsa, rank_by=args.rank_by, mixed_nm=args.mixed_nm, shrink=args.shrink,
        lsr_samples=args.lsr_samples, sra_samples=args.sra_samples, lora_rank=args.lora_rank, delta=args.delta,
    ))
    training = _flags_named(TrainConfig, dict(learning_rate=args.lr, batch_size=args.train_batch_size, grad_accum=args.grad_accum,
                                              optim=args.optim),
                            {"learning_rate": "--lr", "batch_size": "--train-batch-size"})
    return _flags_named(FinetuneConfig, dict(
        model=args.model, out=args.out, method=args.method, pruner=args.pruner, sparsity=args.sparsity,
        pattern=args.pattern, calib=args.calib, nsamples=args.nsamples, seqlen=args.seqlen, train=args.train,
        train_samples=args.train_samples, train_seqlen=args.train_seqlen, eval=args.eval, eval_seqlen=args.eval_seqlen,
        eval_max_windows=args.eval_max_windows,
        seed=args.seed, device=args.device, dtype=args.dtype, batch_size=args.batch_size, overwrite=args.overwrite,
        resume=not args.restart, allow_pickle=args.allow_pickle, trust_remote_code=args.trust_remote_code,
        losa=losa, training=training,
    ))


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="export a sparse checkpoint to compressed-tensors (bitmask / 2:4)")
    p.add_argument("--model", required=True, help="sparse Hugging Face checkpoint directory")
    p.add_argument("--out", required=True)
    p.add_argument("--format", default="compressed-tensors",
                   choices=["compressed-tensors", "sparse-bitmask", "sparse-24-bitmask"],
                   help="compressed-tensors = bitmask, or 2:4 when every layer is 2:4")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("-v", "--verbose", action="count", default=0)
    p.add_argument("-q", "--quiet", action="store_true")


def _add_run(sub) -> None:
    p = sub.add_parser("run", help="the whole pipeline (prune, fine-tune, evaluate, export) from one YAML file")
    p.add_argument("config", help="YAML run configuration (see examples/configs/)")
    p.add_argument("--dry-run", action="store_true", help="print the resolved configuration and stop")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a setting, e.g. --set prune.sparsity=0.6 (repeatable)")
    p.add_argument("-v", "--verbose", action="count", default=0)
    p.add_argument("-q", "--quiet", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="losa", description="Prune LLMs and recover them with LoSA.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_prune(sub)
    _add_eval(sub)
    _add_finetune(sub)
    _add_export(sub)
    _add_run(sub)
    return parser


def _run(args: argparse.Namespace) -> int:
    from losa import api
    from losa.config import EvalConfig, PruneConfig

    if args.command == "prune":
        config = _flags_named(PruneConfig, dict(
            model=args.model, out=args.out, method=args.method, sparsity=args.sparsity, pattern=args.pattern,
            calib=args.calib, nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed, device=args.device,
            dtype=args.dtype, batch_size=args.batch_size, overwrite=args.overwrite, allow_pickle=args.allow_pickle,
            trust_remote_code=args.trust_remote_code,
        ))
        report = api.prune(config)
        print(f"wrote {args.out} (overall sparsity {report['overall_sparsity']:.4f}, {report['timings_s']['prune']:.1f} s pruning)")
        return 0
    if args.command == "eval":
        from losa.config import check_device_available

        result: dict = {}
        check_device_available(args.device)
        config = None
        if args.data is not None or args.tasks is None:
            config = _flags_named(EvalConfig, dict(
                model=args.model, data=args.data or "wikitext2", seqlen=args.seqlen, batch_size=args.batch_size,
                device=args.device, dtype=args.dtype, max_windows=args.max_windows, allow_pickle=args.allow_pickle,
                trust_remote_code=args.trust_remote_code,
            ))
        if args.tasks is not None:
            from losa.zeroshot import PAPER_TASKS, check_tasks, zero_shot

            tasks = PAPER_TASKS if args.tasks == "paper" else tuple(t.strip() for t in args.tasks.split(",") if t.strip())
            if config is not None:  # a bad task or its missing data fails now, not after the perplexity
                check_tasks(tasks, args.include_path)
        if config is not None:
            result = api.evaluate(config)
            if not args.json:
                print(f"perplexity {result['perplexity']:.4f} over {result['tokens']:,} tokens ({config.data})")
        if args.tasks is not None:
            zs = zero_shot(args.model, tasks, batch_size=args.batch_size, device=args.device, dtype=args.dtype,
                           limit=args.limit, num_fewshot=args.num_fewshot, include_path=args.include_path,
                           allow_pickle=args.allow_pickle, trust_remote_code=args.trust_remote_code)
            result["zero_shot"] = zs
            if not args.json:
                for name, task in zs["tasks"].items():
                    print(f"{name:<16} acc {task['acc']:.4f}" + (f"  acc_norm {task['acc_norm']:.4f}" if task.get("acc_norm") is not None else ""))
                print(f"{'mean':<16} acc {zs['mean_acc']:.4f}")
        if args.json:
            print(json.dumps(result))
        return 0
    if args.command == "run":
        from losa.runconfig import run_main

        return run_main(args.config, dry_run=args.dry_run, overrides=args.overrides)
    if args.command == "export":
        from losa.export import export_compressed

        info = export_compressed(args.model, args.out, format=args.format, overwrite=args.overwrite)
        print(f"wrote {args.out}: {info['format']}, sparsity {info['global_sparsity']:.4f}, "
              f"{info['export_bytes']:,} bytes vs {info['dense_bytes']:,} dense ({info['ratio']:.3f}x; prunable weights "
              f"{info['prunable_ratio']:.3f}x)")
        return 0
    if args.command == "finetune":
        report = api.finetune(finetune_config(args))
        ppl = report["metrics"].get("perplexity")
        print(f"wrote {args.out} ({args.method}, overall sparsity {report['overall_sparsity']:.4f}"
              + (f", perplexity {ppl:.3f}" if ppl is not None else "") + ")")
        return 0
    raise AssertionError(args.command)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from losa.log import setup_logging

    setup_logging(args.verbose, args.quiet)
    if int(os.environ.get("RANK", "0")) > 0:  # a distributed launch: results are printed by the main process
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (for the life of the process)
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
