"""The small-scale reproduction of the paper's experiments (`make bench`).

Every cell is one `losa` command run in its own process; its report.json and peak memory land in
bench-out/<cell>/. Then the peer comparisons run one at a time on the otherwise idle machine
(pruning vs llm-compressor, adapter train step vs PEFT LoRA); each rewrites its own section of
benchmarks/results/*.md. Finished cells and peer runs are skipped, so an interrupted sweep resumes
where it stopped (run it in the background: `nohup make bench &`). At the end BENCHMARKS.md is
rewritten from the results (`--tables-only` does just that). The sweep's results are kept in
benchmarks/results/sweep.json (committed), so the tables can be rebuilt on a fresh clone.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from tables import SWEEP_FILE, save_sweep, write_benchmarks_md  # noqa: E402


def opt_reference(args) -> Path:
    """The OPT reference model beside the LLaMA one (its cells run when it is there)."""
    return Path(args.model).parent / "reference-opt"


def cell_commands(args) -> dict[str, list[str]]:
    """Cell name -> losa argv. Budgets are identical for LoRA and LoSA (same samples x seqlen)."""
    c = args.corpus
    data = ["--calib", f"text:{c}/calib.txt", "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen)]
    ev = ["--eval", f"text:{c}/eval.txt", "--eval-seqlen", str(args.seqlen), "--eval-max-windows", str(args.eval_windows)]
    train = ["--train", f"text:{c}/finetune.txt", "--train-samples", str(args.train_samples),
             "--train-seqlen", str(args.seqlen), "--lsr-samples", str(min(args.nsamples, 64)), "--sra-samples", "16"]
    cells: dict[str, list[str]] = {}

    def prune(name, method, target, seed=0):
        cells[name] = ["prune", "--model", args.model, "--method", method, *target, *data, "--seed", str(seed)]

    def ft(name, method, pruner, target, extra=(), seed=0):
        cells[name] = ["finetune", "--model", args.model, "--method", method, "--pruner", pruner, *target, *data,
                       *train, *ev, "--seed", str(seed), *extra]

    def table1(sparsities, seeds):
        for s in sparsities:
            for seed in seeds:
                for pruner in ("wanda", "sparsegpt"):
                    tag = f"{pruner}-{s}-s{seed}"
                    prune(f"t1-{tag}-pruned", pruner, ["--sparsity", s], seed)
                    ft(f"t1-{tag}-lora", "lora", pruner, ["--sparsity", s], seed=seed)
                    ft(f"t1-{tag}-losa", "losa", pruner, ["--sparsity", s], seed=seed)

    # in priority order: an interrupted sweep has the most important cells first
    table1(["0.7"], args.seeds)
    w70 = ("wanda", ["--sparsity", "0.7"])
    for name, flags in {"no-lsr": ["--no-lsr"], "no-sra": ["--no-sra"], "no-dsa": ["--no-dsa"],
                        "none": ["--no-lsr", "--no-sra", "--no-dsa"], "rank-by-sparsity": ["--rank-by", "sparsity"],
                        "linear": ["--schedule", "linear"]}.items():
        ft(f"abl-{name}", "losa", *w70, flags)
    ft("abl-sparse-lora", "sparse-lora", *w70)
    table1(["0.5", "0.6"], [0])
    prune("nm-2of4-pruned", "wanda", ["--pattern", "2:4"])
    ft("nm-2of4-losa", "losa", "wanda", ["--pattern", "2:4"])
    ft("nm-mixed2of4-losa", "losa", "wanda", ["--pattern", "2:4"], ["--mixed-nm"])
    for s in ("0.4", "0.8", "0.9"):  # 0.5-0.7 come from table 1
        prune(f"rob-wanda-{s}-pruned", "wanda", ["--sparsity", s])
        ft(f"rob-wanda-{s}-losa", "losa", "wanda", ["--sparsity", s])
    # the second architecture: the OPT reference model, Table 1's 70 % rows (seed 0 first)
    opt_model = str(opt_reference(args))
    if Path(opt_model, "config.json").exists():
        for seed in args.seeds:
            for pruner in ("wanda", "sparsegpt"):
                tag = f"opt-{pruner}-0.7" + ("" if seed == 0 else f"-s{seed}")
                cells[f"{tag}-pruned"] = ["prune", "--model", opt_model, "--method", pruner, "--sparsity", "0.7", *data,
                                          "--seed", str(seed)]
                for method in ("lora", "losa"):
                    cells[f"{tag}-{method}"] = ["finetune", "--model", opt_model, "--method", method, "--pruner", pruner,
                                                "--sparsity", "0.7", *data, *train, *ev, "--seed", str(seed)]
    # investigation of LoRA vs LoSA (run last): the ordering where pruning hurts most, a 3x
    # fine-tuning budget for both, and LoSA variants (SVD shrinking, no adapter dropout)
    for s in ("0.4", "0.8", "0.9"):  # LoRA beside the robustness rows
        ft(f"inv-wanda-{s}-lora", "lora", "wanda", ["--sparsity", s])
    big = ["--train-samples", str(3 * args.train_samples)]
    ft("inv-budget3x-lora", "lora", *w70, big)
    ft("inv-budget3x-losa", "losa", *w70, big)
    ft("inv-shrink-svd-losa", "losa", *w70, ["--shrink", "svd"])
    ft("inv-dropout0-losa", "losa", *w70, ["--dropout", "0"])
    ft("inv-dropout0-lora", "lora", *w70, ["--dropout", "0"])
    # learning rate 5x the paper's (few optimiser steps at this scale), and twice the LSR delta
    ft("inv-lr1e-3-lora", "lora", *w70, ["--lr", "1e-3"])
    ft("inv-lr1e-3-losa", "losa", *w70, ["--lr", "1e-3"])
    ft("inv-delta0.06-losa", "losa", *w70, ["--delta", "0.06"])
    ft("inv-sparsegpt-0.7-no-dsa-losa", "losa", "sparsegpt", ["--sparsity", "0.7"], ["--no-dsa"])  # does DSA help SparseGPT?
    return cells


def peer_commands(args) -> dict[str, list[str]]:
    """Peer run name -> argv for this interpreter. All single-threaded: the ratios then use CPU
    time that other load cannot inflate, and both tools get the same one core."""
    def rel(path) -> str:  # commands run from the repository root; written into the results as such
        path = Path(path).resolve()
        return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)

    pruning = ["benchmarks/bench_pruning.py", "--model", rel(args.model), "--calib", rel(f"{args.corpus}/calib.txt"),
               "--eval", rel(f"{args.corpus}/eval.txt"), "--threads", "1", "--repeats", "3", "--eval-windows", "256",
               "--profile", "--workdir", rel(Path(args.out) / "peers" / "pruning"), "--out-md",
               "benchmarks/results/pruning_peers.md", "--label", "make bench: reference-llama, 128 x 256 calibration tokens, CPU, 1 thread"]
    step = ["benchmarks/bench_adapter_step.py", "--threads", "1", "--write", "benchmarks/results/adapter_step.md"]
    return {
        "peers-pruning-llmcompressor": pruning,
        "peers-adapter-step-h256": [*step, "--steps", "6"],
        "peers-adapter-step-h512": [*step, "--steps", "4", "--hidden", "512", "--intermediate", "1376", "--heads", "8"],
        "peers-adapter-step-bf16": [*step, "--steps", "4", "--dtype", "bfloat16", "--variants", "peft", "ours", "authors", "authors-plain"],
        "peers-adapter-shrink": [*step, "--steps", "4", "--dropouts", "0", "--shrink-study", "--study-steps", "300",
                                 "--study-recovery", "20", "--variants", "peft", "ours"],
    }


def peers_python() -> str | None:
    """llm-compressor's own environment (.venv-peers), created by benchmarks/peers/setup_env.sh if missing."""
    python = ROOT / ".venv-peers" / "bin" / "python"
    if not python.exists():
        print("creating .venv-peers for llm-compressor (benchmarks/peers/setup_env.sh) ...", flush=True)
        if subprocess.run(["bash", str(ROOT / "benchmarks" / "peers" / "setup_env.sh")]).returncode != 0:
            return None
    return str(python)


def run_peer(name: str, argv: list[str], out_root: Path) -> bool:
    done = out_root / "peers" / f"{name}.done"
    if done.exists():
        return True
    if name.startswith("peers-pruning") and peers_python() is None:
        print(f"  {name}: skipped, llm-compressor's environment could not be created", flush=True)
        return False
    done.parent.mkdir(parents=True, exist_ok=True)
    print(f"[{time.strftime('%H:%M:%S')}] {name}: python {' '.join(argv)}", flush=True)
    log = out_root / "peers" / f"{name}.log"
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, *argv], stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    if proc.returncode != 0:
        print(f"  FAILED ({proc.returncode}); see {log}", flush=True)
        return False
    done.write_text(time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()) + "\n")
    return True


def run_cell(name: str, argv: list[str], out_root: Path, python: str, eval_windows: int, threads: int,
             progress: str = "") -> dict | None:
    cell_dir = out_root / name
    result_file = cell_dir / "result.json"
    if result_file.exists():
        return json.loads(result_file.read_text())
    cell_dir.mkdir(parents=True, exist_ok=True)
    model_out = cell_dir / "model"
    argv = [*argv, "--out", str(model_out), "--overwrite", "-q"]
    cmd = [python, str(ROOT / "benchmarks" / "_cell.py"), str(cell_dir / "proc.json"), "--", *argv]
    print(f"[{time.strftime('%H:%M:%S')}] {progress} {name}: losa {' '.join(argv)}", flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        (cell_dir / "stderr.txt").write_text(proc.stderr)
        print(f"  FAILED ({proc.returncode}); see {cell_dir / 'stderr.txt'}", flush=True)
        return None
    result = {"name": name, "command": "losa " + " ".join(argv), **json.loads((cell_dir / "proc.json").read_text())}
    report = json.loads((model_out / "report.json").read_text())
    result["report"] = {k: report[k] for k in ("settings", "metrics", "timings_s", "overall_sparsity", "environment") if k in report}
    for key in ("steps", "training", "trainable_parameters", "merged_density"):
        if key in report:
            result["report"][key] = report[key]
    if argv[0] == "prune":
        ev = subprocess.run([python, "-m", "losa.cli", "eval", "--model", str(model_out), "--data",
                             argv[argv.index("--calib") + 1].replace("calib.txt", "eval.txt"), "--seqlen",
                             argv[argv.index("--seqlen") + 1], "--max-windows", str(eval_windows), "--batch-size", "16",
                             "--json", "-q"], capture_output=True, text=True, env=env)
        if ev.returncode != 0:
            (cell_dir / "stderr.txt").write_text(ev.stderr)
            return None
        result["report"]["metrics"] = {"perplexity": json.loads(ev.stdout)["perplexity"]}
    # keep the sweep's disk use small: the checkpoints are not needed for the tables
    for f in model_out.glob("*.safetensors"):
        f.unlink()
    result_file.write_text(json.dumps(result, indent=1))
    return result


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default=str(ROOT / "models" / "reference-llama"))
    p.add_argument("--corpus", default=str(ROOT / "data" / "corpus"))
    p.add_argument("--out", default=str(ROOT / "bench-out"))
    p.add_argument("--nsamples", type=int, default=64)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--train-samples", type=int, default=400)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--eval-windows", type=int, default=256, help="evaluation windows, evenly spread over the eval split")
    p.add_argument("--only", nargs="*", default=None, help="run only cells whose name starts with one of these")
    p.add_argument("--tables-only", action="store_true")
    p.add_argument("--jobs", type=int, default=2, help="cells run in parallel (each with cpu_count / jobs threads)")
    p.add_argument("--no-peers", action="store_true", help="skip the peer comparisons (llm-compressor, PEFT)")
    args = p.parse_args()
    out_root = Path(args.out)
    out_root.mkdir(parents=True, exist_ok=True)
    if not args.tables_only:
        if not (Path(args.corpus) / "eval.txt").exists():
            subprocess.run([sys.executable, "-m", "losa.reference.corpus", "--out", args.corpus], check=True)
        # dense reference perplexities (the OPT reference when it is there)
        for name, model in (("dense.json", args.model), ("dense-opt.json", opt_reference(args))):
            dense = out_root / name
            if dense.exists() or not Path(model, "config.json").exists():
                continue
            ev = subprocess.run([sys.executable, "-m", "losa.cli", "eval", "--model", str(model), "--data",
                                 f"text:{args.corpus}/eval.txt", "--seqlen", str(args.seqlen), "--max-windows",
                                 str(args.eval_windows), "--batch-size", "16", "--json", "-q"],
                                capture_output=True, text=True, check=True)
            dense.write_text(ev.stdout)
        from concurrent.futures import ThreadPoolExecutor

        cells = [(n, a) for n, a in cell_commands(args).items() if not args.only or any(n.startswith(o) for o in args.only)]
        threads = max(1, (os.cpu_count() or 1) // args.jobs)
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:  # cells start in priority order
            list(pool.map(lambda k: run_cell(*cells[k], out_root, sys.executable, args.eval_windows, threads,
                                             f"cell {k + 1}/{len(cells)}"), range(len(cells))))
        if not args.no_peers:  # after the sweep, one at a time: timings need the machine to themselves
            for name, argv in peer_commands(args).items():
                if not args.only or any(name.startswith(o) for o in args.only):
                    run_peer(name, argv, out_root)
    if not args.tables_only:
        meta = {"argv": "python benchmarks/run_all.py " + " ".join(sys.argv[1:]),
                "machine": f"{os.cpu_count()} CPU cores ({_cpu_model()}), no GPU" if not _has_cuda() else f"{_cpu_model()} + CUDA",
                "args": {k: v for k, v in vars(args).items() if k not in ("only", "tables_only", "out")}}
        if args.only and SWEEP_FILE.exists():  # a partial rerun keeps the sweep's command
            meta = json.loads(SWEEP_FILE.read_text())["meta"]
        save_sweep(out_root, SWEEP_FILE, meta)
    write_benchmarks_md(SWEEP_FILE, ROOT / "BENCHMARKS.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
