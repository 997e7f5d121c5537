"""Side-by-side one-shot pruning: losa vs llm-compressor (Wanda and SparseGPT, 50 % and 2:4).

Runs in losa's own environment (.venv). llm-compressor runs in a separate virtualenv
(``bash benchmarks/peers/setup_env.sh`` makes .venv-peers) through
``benchmarks/peers/llmcompressor_prune.py``, as a subprocess. The calibration windows are built
once here with losa's sampler and handed to llm-compressor as a tensor file, so both tools
calibrate on exactly the same tokens. Both pruned checkpoints are scored with losa's perplexity
evaluator on the same evaluation windows.

Timing: losa's pruning step is timed in-process exactly like ``report.json``'s
``timings_s.prune`` (``torch.manual_seed`` + ``prune_model``, no load / save); llm-compressor's
``oneshot`` call is timed inside its script (no load / save). Runs alternate between the tools
(losa, llmc, losa, llmc, ...) so that load from other processes spreads over both; the table
shows the median wall time and the median CPU time (all threads of the process) of the repeats.

    .venv/bin/python benchmarks/bench_pruning.py --model models/reference-llama \\
        --calib data/corpus/calib.txt --eval data/corpus/eval.txt
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _markdown import write_section  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PEER_SCRIPT = REPO / "benchmarks" / "peers" / "llmcompressor_prune.py"
DEFAULT_PEERS_PYTHON = REPO / ".venv-peers" / "bin" / "python"
TIME_TARGET = 0.7  # losa time / llm-compressor time, at most (issue target)
PPL_TARGET_PCT = 1.0  # |losa ppl - llmc ppl| / llmc ppl, at most, in %


@dataclass
class Case:
    method: str  # wanda | sparsegpt
    target: str  # "0.5" or "2:4"
    losa_s: list[float] = field(default_factory=list)
    losa_cpu_s: list[float] = field(default_factory=list)
    llmc_s: list[float] = field(default_factory=list)
    llmc_cpu_s: list[float] = field(default_factory=list)
    losa_sparsity: list[float] = field(default_factory=list)
    llmc_sparsity: list[float] = field(default_factory=list)
    losa_ppl: float | None = None
    llmc_ppl: float | None = None
    losa_phases: dict | None = None

    @property
    def name(self) -> str:
        return f"{self.method}-{self.target.replace(':', 'of')}"

    @property
    def is_nm(self) -> bool:
        return ":" in self.target

    def as_dict(self) -> dict:
        return dict(self.__dict__, name=self.name)


def text_spec(path_or_spec: str) -> str:
    """``text:PATH`` for a bare path; specs (text:, jsonl:) pass through."""
    return path_or_spec if re.match(r"^(text|jsonl):", path_or_spec) else f"text:{path_or_spec}"


def block_linear_sparsity(model) -> float:
    """Fraction of zeros over every prunable linear layer of the decoder blocks."""
    from losa.models.registry import architecture_of

    arch = architecture_of(model)
    zeros = total = 0
    for block in arch.blocks(model):
        for linear in arch.linears(block).values():
            zeros += int((linear.weight == 0).sum())
            total += linear.weight.numel()
    return zeros / total


def run_losa(args, case: Case, calib_ids: torch.Tensor, out: Path, save: bool) -> tuple[float, float, float]:
    """Prune with losa in-process; returns (wall s, cpu s, achieved sparsity). Saves to ``out`` if asked."""
    from losa.checkpoint import atomic_output_dir, load_model, save_pretrained
    from losa.config import PruneConfig
    from losa.pruning.sequential import prune_model

    config = PruneConfig(
        model=str(args.model),
        method=case.method,
        sparsity=None if case.is_nm else float(case.target),
        pattern=case.target if case.is_nm else None,
        nsamples=args.nsamples,
        seqlen=args.seqlen,
        seed=args.seed,
        device=args.device,
        batch_size=args.batch_size,
    )
    model, tokenizer = load_model(config.model, dtype=config.dtype)
    # the region losa.api.prune times as timings_s.prune
    wall0, cpu0 = time.perf_counter(), time.process_time()
    torch.manual_seed(config.seed)
    prune_model(model, calib_ids, method=config.method, pattern=config.target(), device=config.device, batch_size=config.batch_size)
    if config.device.startswith("cuda"):
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    sparsity = block_linear_sparsity(model)
    if save:
        with atomic_output_dir(out, overwrite=True) as tmp:
            save_pretrained(model, tokenizer, tmp)
    return wall, cpu, sparsity


PHASES = (
    "capture block-0 inputs",
    "statistics pass (dense block, hooks)",
    "of which statistics accumulation",
    "layer pruning (masks / OBS)",
    "propagation pass (pruned block)",
)


def losa_phases(args, case: Case, calib_ids: torch.Tensor) -> dict[str, float]:
    """Seconds per phase of one losa prune_model run, by wrapping the driver's functions (no source change)."""
    import contextlib
    import functools

    import losa.calibration as calibration
    import losa.pruning as pruners
    import losa.pruning.sequential as sequential
    from losa.checkpoint import load_model
    from losa.pruning.patterns import Pattern

    seconds = dict.fromkeys(PHASES, 0.0)

    def timed(phase, fn):
        @functools.wraps(fn)
        def wrapper(*a, **kw):
            start = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                seconds[phase] += time.perf_counter() - start

        return wrapper

    targets = [
        (calibration, "capture_block_inputs", PHASES[0]),
        (sequential, "prune_block", "prune_block"),  # statistics pass + layer pruning
        (calibration, "run_block", PHASES[4]),  # sequential_pass's propagation
    ]
    seconds["prune_block"] = 0.0
    for cls in (pruners.WandaPruner, pruners.SparseGPTPruner):
        targets += [(cls, "add_batch", PHASES[2]), (cls, "prune", PHASES[3])]
    model, _ = load_model(str(args.model))
    with contextlib.ExitStack() as restore:
        for owner, name, phase in targets:
            original = getattr(owner, name)
            setattr(owner, name, timed(phase, original))
            restore.callback(setattr, owner, name, original)
        start = time.perf_counter()
        torch.manual_seed(args.seed)
        sequential.prune_model(model, calib_ids, method=case.method, pattern=Pattern.parse(case.target),
                               device=args.device, batch_size=args.batch_size)  # fmt: skip
        seconds["total"] = time.perf_counter() - start
    # the statistics pass is prune_block's time outside the pruners' own prune calls
    seconds[PHASES[1]] = seconds.pop("prune_block") - seconds[PHASES[3]]
    return seconds


def run_llmc(args, case: Case, ids_file: Path, out: Path, log: Path) -> dict:
    """Prune with llm-compressor in .venv-peers; returns its JSON result line."""
    cmd = [
        str(args.peers_python),
        str(PEER_SCRIPT),
        "--model", str(args.model),
        "--method", case.method,
        *(["--pattern", case.target] if case.is_nm else ["--sparsity", case.target]),
        "--calib-ids", str(ids_file),
        "--out", str(out),
        "--batch-size", str(args.batch_size),
        "--seed", str(args.seed),
        *(["--threads", str(args.threads)] if args.threads else []),
    ]  # fmt: skip
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # llm-compressor onloads to any accelerator it sees
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=f, text=True, env=env)
        f.write("\n--- stdout ---\n" + proc.stdout)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = log.read_text()[-3000:]
        raise SystemExit(f"llm-compressor run failed (exit {proc.returncode}): {shlex.join(cmd)}\n{tail}")
    return json.loads(lines[-1])


def evaluate(args, model_dir: Path) -> float:
    from losa.api import evaluate as losa_evaluate
    from losa.config import EvalConfig

    config = EvalConfig(
        model=str(model_dir),
        data=text_spec(args.eval),
        seqlen=args.seqlen,
        device=args.device,
        max_windows=args.eval_windows,
    )
    return float(losa_evaluate(config)["perplexity"])


def machine() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"nproc": os.cpu_count(), "cpu": cpu, "gpu": gpu, "platform": platform.platform(), "python": platform.python_version()}


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def fmt(x: float | None, digits: int = 2) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def markdown_section(args, cases: list[Case], info: dict) -> str:
    """The run's section of the results file: command, machine, versions, table, verdict."""
    lines = [f"## {args.label}", ""]
    lines += [
        f"Command (from the repository root, {info['date']}):",
        "",
        "```",
        info["command"],
        "```",
        "",
        f"- model: `{args.model}` ({info['model_params']:,} parameters, loaded as float32), "
        f"dense perplexity {fmt(info['dense_ppl'])}",
        f"- calibration: `{text_spec(args.calib)}`, {args.nsamples} windows x {args.seqlen} tokens, "
        f"sampled once with losa's sampler (seed {args.seed}) and given to both tools; batch size {args.batch_size}",
        f"- evaluation: `{text_spec(args.eval)}`, non-overlapping {args.seqlen}-token windows"
        + (f" (first {args.eval_windows})" if args.eval_windows else " (all)")
        + ", losa's evaluator for both checkpoints",
        f"- device: {args.device}; repeats per tool and case: {args.repeats} (median shown), runs alternate losa / llmc",
        f"- seeds: sampling {args.seed}, torch.manual_seed({args.seed}) before pruning in both tools",
        f"- machine: {info['machine']['nproc']} CPUs (`nproc`), {info['machine']['cpu']}"
        + (f", GPU {info['machine']['gpu']}" if info["machine"]["gpu"] else "")
        + f"; load average before / after: {info['load_before']} / {info['load_after']}",
        f"- losa env (.venv): torch {info['losa_versions']['torch']}, transformers {info['losa_versions']['transformers']}, "
        f"torch threads: {info['losa_versions']['threads']}",
        f"- llm-compressor env (.venv-peers): llmcompressor {info['llmc_versions'].get('llmcompressor')}, "
        f"torch {info['llmc_versions'].get('torch')}, transformers {info['llmc_versions'].get('transformers')}, "
        f"torch threads: {info['llmc_threads']}",
        "",
        "| method | pattern | losa s | llm-compressor s | time ratio losa/llmc | losa CPU s | llmc CPU s "
        "| losa ppl | llmc ppl | ppl diff % | sparsity losa / llmc |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    verdicts = []
    for c in cases:
        losa_s, llmc_s = statistics.median(c.losa_s), statistics.median(c.llmc_s)
        ratio = losa_s / llmc_s
        diff = None if c.losa_ppl is None or c.llmc_ppl is None else 100.0 * (c.losa_ppl - c.llmc_ppl) / c.llmc_ppl
        lines.append(
            f"| {c.method} | {'unstructured ' + c.target if not c.is_nm else c.target} | {losa_s:.2f} | {llmc_s:.2f} "
            f"| {ratio:.2f} | {statistics.median(c.losa_cpu_s):.2f} | {statistics.median(c.llmc_cpu_s):.2f} "
            f"| {fmt(c.losa_ppl)} | {fmt(c.llmc_ppl)} | {fmt(diff)} "
            f"| {c.losa_sparsity[0]:.4f} / {c.llmc_sparsity[0]:.4f} |"
        )
        verdicts.append(
            f"- {c.name}: time ratio {ratio:.2f} ({'meets' if ratio <= TIME_TARGET else 'misses'} <= {TIME_TARGET}), "
            f"ppl diff {fmt(diff)} % ({'meets' if diff is not None and abs(diff) <= PPL_TARGET_PCT else 'misses'} "
            f"|diff| <= {PPL_TARGET_PCT} %); all wall times losa {', '.join(f'{t:.2f}' for t in c.losa_s)} s, "
            f"llmc {', '.join(f'{t:.2f}' for t in c.llmc_s)} s"
        )
    lines += ["", "Targets (issue): losa time at most 0.7x llm-compressor's, perplexity within 1 %.", "", *verdicts, ""]
    if all(c.losa_phases for c in cases):
        lines += [
            "Where losa's pruning time goes (`--profile`: one extra run per case, wall seconds per phase):",
            "",
            "| phase | " + " | ".join(c.name for c in cases) + " |",
            "|---|" + "---:|" * len(cases),
        ]
        for phase in (*PHASES, "total"):
            label = "&nbsp;&nbsp;" + phase if phase.startswith("of which") else phase
            lines.append(f"| {label} | " + " | ".join(f"{c.losa_phases[phase]:.2f}" for c in cases) + " |")
        lines.append("")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    default_model = REPO / "models" / "reference-llama"
    default_calib = REPO / "data" / "corpus" / "calib.txt"
    default_eval = REPO / "data" / "corpus" / "eval.txt"
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=default_model if default_model.exists() else None,
                   help="HF checkpoint dir (default models/reference-llama when it exists)")
    p.add_argument("--calib", default=str(default_calib) if default_calib.exists() else None,
                   help="calibration text: PATH or text:PATH (default data/corpus/calib.txt)")
    p.add_argument("--eval", default=str(default_eval) if default_eval.exists() else None,
                   help="evaluation text: PATH or text:PATH (default data/corpus/eval.txt)")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--batch-size", type=int, default=8, help="calibration batch size, both tools (losa's default)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads for both tools (default: torch's choice); 1 is steadier on a shared machine")
    p.add_argument("--repeats", type=int, default=2, help="timed runs per tool and case (median reported)")
    p.add_argument("--methods", default="wanda,sparsegpt")
    p.add_argument("--targets", default="0.5,2:4", help="comma list of sparsities / N:M patterns")
    p.add_argument("--profile", action="store_true", help="add a per-phase breakdown of losa's pruning time")
    p.add_argument("--eval-windows", type=int, default=None, help="evaluate only the first N windows (default all)")
    p.add_argument("--peers-python", type=Path, default=DEFAULT_PEERS_PYTHON)
    p.add_argument("--workdir", type=Path, default=REPO / "bench-out" / "pruning_peers",
                   help="pruned checkpoints, calibration ids, logs, raw JSON")
    p.add_argument("--out-md", type=Path, default=REPO / "benchmarks" / "results" / "pruning_peers.md")
    p.add_argument("--label", default=None, help="section title in --out-md (default from model and data)")
    args = p.parse_args(argv)
    for name in ("model", "calib", "eval"):
        if getattr(args, name) is None:
            p.error(f"--{name} is required (its default does not exist yet)")
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    if not args.peers_python.exists():
        p.error(f"{args.peers_python} not found: run `bash benchmarks/peers/setup_env.sh` first")
    if args.label is None:
        calib_name = Path(text_spec(args.calib).split(":", 1)[1]).name
        args.label = f"{Path(args.model).name}, calib {calib_name}, {args.nsamples}x{args.seqlen}, {args.device}"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    command = shlex.join([".venv/bin/python", "benchmarks/bench_pruning.py", *(sys.argv[1:] if argv is None else argv)])

    import transformers

    from losa.checkpoint import load_model
    from losa.data import calibration_ids

    args.workdir.mkdir(parents=True, exist_ok=True)
    load_before = load_average()
    model, tokenizer = load_model(str(args.model))
    model_params = sum(p.numel() for p in model.parameters())
    calib_ids = calibration_ids(tokenizer, text_spec(args.calib), args.nsamples, args.seqlen, args.seed)
    del model
    ids_file = args.workdir / "calib_ids.pt"
    torch.save(calib_ids, ids_file)
    print(f"calibration ids {tuple(calib_ids.shape)} -> {ids_file}", file=sys.stderr)

    cases = [Case(m, t) for m in args.methods.split(",") for t in args.targets.split(",")]
    llmc_info: dict = {}
    for rep in range(args.repeats):
        for case in cases:
            losa_out, llmc_out = args.workdir / f"losa-{case.name}", args.workdir / f"llmc-{case.name}"
            wall, cpu, sparsity = run_losa(args, case, calib_ids, losa_out, save=rep == 0)
            case.losa_s.append(wall), case.losa_cpu_s.append(cpu), case.losa_sparsity.append(sparsity)
            print(f"[{rep}] losa {case.name}: {wall:.2f} s wall, {cpu:.2f} s cpu, sparsity {sparsity:.4f}", file=sys.stderr)
            res = run_llmc(args, case, ids_file, llmc_out, args.workdir / f"llmc-{case.name}-{rep}.log")
            case.llmc_s.append(res["seconds"]), case.llmc_cpu_s.append(res["cpu_seconds"]), case.llmc_sparsity.append(res["sparsity"])
            llmc_info = res
            print(f"[{rep}] llmc {case.name}: {res['seconds']:.2f} s wall, {res['cpu_seconds']:.2f} s cpu, "
                  f"sparsity {res['sparsity']:.4f}", file=sys.stderr)  # fmt: skip

    if args.profile:
        for case in cases:
            case.losa_phases = losa_phases(args, case, calib_ids)
            print(f"profile {case.name}: " + ", ".join(f"{k} {v:.2f} s" for k, v in case.losa_phases.items()), file=sys.stderr)

    dense_ppl = evaluate(args, Path(args.model))
    for case in cases:
        case.losa_ppl = evaluate(args, args.workdir / f"losa-{case.name}")
        case.llmc_ppl = evaluate(args, args.workdir / f"llmc-{case.name}")
        print(f"{case.name}: ppl losa {case.losa_ppl:.3f}, llmc {case.llmc_ppl:.3f}", file=sys.stderr)

    info = {
        "command": command,
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "machine": machine(),
        "load_before": load_before,
        "load_after": load_average(),
        "model_params": model_params,
        "dense_ppl": dense_ppl,
        "losa_versions": {"torch": torch.__version__, "transformers": transformers.__version__, "threads": torch.get_num_threads()},
        "llmc_versions": llmc_info.get("versions", {}),
        "llmc_threads": llmc_info.get("threads"),
    }
    raw = {"args": {k: str(v) for k, v in vars(args).items()}, "info": info, "cases": [c.as_dict() for c in cases]}
    (args.workdir / "results.json").write_text(json.dumps(raw, indent=1))
    header = "# One-shot pruning: losa vs llm-compressor\n\nWritten by `benchmarks/bench_pruning.py`; one section per run.\n"
    write_section(args.out_md, args.label, markdown_section(args, cases, info), header)
    print(f"wrote {args.out_md} (raw numbers in {args.workdir / 'results.json'})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
