"""Assemble BENCHMARKS.md from the sweep's results (benchmarks/results/sweep.json, merged there from
bench-out/ after every sweep) and the other benchmarks' results (benchmarks/results/*.md). Every number in it comes from a file written by a command in this repo."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

INTRO = """# Benchmarks

Every table below is produced by a command in this repository; each section names its command,
machine and seeds. `make bench` reruns the sweep (resumable, background-friendly) and rewrites this
file from `benchmarks/results/` (the sweep's cells in `sweep.json`; `python benchmarks/run_all.py
--tables-only` rebuilds it from there). Small scale: the models are the project's own
reference models (see below), not LLaMA-7B, so absolute numbers are not comparable with the paper's;
the orderings are what we check.
"""


RESULTS_DIR = Path(__file__).resolve().parent / "results"
SWEEP_FILE = RESULTS_DIR / "sweep.json"  # every sweep cell's result (committed): the tables' only input


def _compact(result: dict) -> dict:
    """A cell's result without its per-optimiser-step losses (the tables use the final ones)."""
    result = json.loads(json.dumps(result))
    for training in [s["training"] for s in result["report"].get("steps", [])] + [result["report"].get("training", {})]:
        training.pop("loss", None)
    return result


def save_sweep(out_root: Path, sweep_file: Path, meta: dict) -> None:
    """Merge the cells of ``out_root`` (bench-out/) into ``sweep_file``: a rerun cell replaces its
    old result, cells not rerun keep theirs."""
    sweep = json.loads(sweep_file.read_text()) if sweep_file.exists() else {"cells": {}}
    for f in sorted(out_root.glob("*/result.json")):
        result = json.loads(f.read_text())
        sweep["cells"][result["name"]] = _compact(result)
    for key, name in (("dense", "dense.json"), ("dense_opt", "dense-opt.json")):
        if (out_root / name).exists():
            sweep[key] = json.loads((out_root / name).read_text())
    sweep["meta"] = meta
    sweep["cells"] = dict(sorted(sweep["cells"].items()))
    tmp = sweep_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(sweep, indent=1) + "\n")
    tmp.replace(sweep_file)


def _ppl(r: dict | None) -> float | None:
    return None if r is None else r["report"].get("metrics", {}).get("perplexity")


def _fmt(values: list[float | None]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f} (n={len(values)})"


def _seed_of(result: dict) -> str:
    argv = result["command"].split()
    return argv[argv.index("--seed") + 1] if "--seed" in argv else "-"


def _provenance(results: dict[str, dict], prefixes: tuple[str, ...]) -> str:
    """One line under a table: which cells (rerun with ``--only``) and their seeds."""
    names = [n for n in results if n.startswith(prefixes)]
    seeds = sorted({_seed_of(results[n]) for n in names})
    return (f"Cells: `python benchmarks/run_all.py --only {' '.join(prefixes)}` ({len(names)} cells; seed "
            f"{', '.join(seeds) or '-'}); each cell's command is listed at the end of this file.")


def cell_commands(results: dict[str, dict]) -> str:
    lines = ["## Appendix: every cell's command", "", "<details><summary>The exact <code>losa</code> command of each "
             "sweep cell (from <code>benchmarks/results/sweep.json</code>)</summary>", ""]
    lines += [f"- `{name}`: `{results[name]['command']}`" for name in sorted(results)]
    return "\n".join([*lines, "", "</details>"]) + "\n"


def sweep_tables(results: dict[str, dict], dense: dict | None, meta: dict, dense_opt: dict | None = None) -> str:
    lines = ["## Small-scale reproduction (`make bench`)", ""]
    lines += [f"Command: `{meta['argv']}` on {meta['machine']}. Settings: {json.dumps(meta['args'])}.",
              "Perplexity on the reference corpus' evaluation split (non-overlapping windows); lower is better.",
              "Each cell's exact `losa` command is listed in the appendix at the end.", ""]
    if dense:
        lines += [f"Dense reference model: perplexity **{dense['perplexity']:.2f}** over {dense['tokens']:,} tokens.", ""]
    lines += ["### Table 1 analogue: pruner alone, + LoRA, + LoSA (same fine-tuning token budget)", "",
              "| pruner | sparsity | pruned | + LoRA | + LoSA | seeds |", "|---|---|---|---|---|---|"]
    for pruner in ("wanda", "sparsegpt"):
        for s in ("0.5", "0.6", "0.7"):
            prefix = f"t1-{pruner}-{s}-s"
            seeds = sorted({n[len(prefix):].split("-")[0] for n in results if n.startswith(prefix)})
            cols = []
            for kind in ("pruned", "lora", "losa"):
                cols.append(_fmt([_ppl(results.get(f"t1-{pruner}-{s}-s{seed}-{kind}")) for seed in seeds]))
            lines.append(f"| {pruner} | {float(s):.0%} | {' | '.join(cols)} | {','.join(seeds) or '-'} |")
    lines += ["", _provenance(results, ("t1-",))]
    if any(name.startswith("opt-") for name in results):
        lines += ["", "### Second architecture: the OPT reference model at 70 %", "",
                  f"Dense OPT reference: perplexity **{dense_opt['perplexity']:.2f}**." if dense_opt else "", "",
                  "| pruner | pruned | + LoRA | + LoSA |", "|---|---|---|---|"]
        for pruner in ("wanda", "sparsegpt"):  # seed 0 cells carry no seed suffix
            cols = [_fmt([_ppl(r) for n, r in results.items() if n.startswith(f"opt-{pruner}-0.7") and n.endswith(f"-{kind}")])
                    for kind in ("pruned", "lora", "losa")]
            lines.append(f"| {pruner} | {' | '.join(cols)} |")
        lines += ["", _provenance(results, ("opt-",))]
    lines += ["", "### Ablations at Wanda 70 %", "", "| variant | perplexity |", "|---|---|"]
    lines.append(f"| LoSA (all three) | {_fmt([_ppl(results.get('t1-wanda-0.7-s0-losa'))])} |")
    for name, label in (("no-lsr", "w/o LSR"), ("no-sra", "w/o SRA"), ("no-dsa", "w/o DSA"), ("none", "w/o LSR, SRA, DSA"),
                        ("rank-by-sparsity", "ranks by sparsity rate (not error)"), ("linear", "linear schedule (not cubic)"),
                        ("sparse-lora", "Sparse LoRA (masked, uniform r = 8, one shot)")):
        lines.append(f"| {label} | {_fmt([_ppl(results.get('abl-' + name))])} |")
    lines += ["", _provenance(results, ("abl-",)) + " Full LoSA: the Table 1 cell `t1-wanda-0.7-s0-losa`."]
    lines += ["", "### N:M: 2:4 vs mixed 2:4 (Wanda)", "", "| variant | perplexity |", "|---|---|"]
    for name, label in (("nm-2of4-pruned", "Wanda 2:4"), ("nm-2of4-losa", "+ LoSA, 2:4"), ("nm-mixed2of4-losa", "+ LoSA, mixed 2:4")):
        lines.append(f"| {label} | {_fmt([_ppl(results.get(name))])} |")
    lines += ["", _provenance(results, ("nm-",))]
    lines += ["", "### Robustness: Wanda at 40-90 %", "", "| sparsity | pruned | + LoRA | + LoSA |", "|---|---|---|---|"]
    for s in ("0.4", "0.5", "0.6", "0.7", "0.8", "0.9"):
        if s in ("0.5", "0.6", "0.7"):
            pr, lr, lo = (results.get(f"t1-wanda-{s}-s0-{k}") for k in ("pruned", "lora", "losa"))
        else:
            pr, lr, lo = results.get(f"rob-wanda-{s}-pruned"), results.get(f"inv-wanda-{s}-lora"), results.get(f"rob-wanda-{s}-losa")
        lines.append(f"| {float(s):.0%} | {_fmt([_ppl(pr)])} | {_fmt([_ppl(lr)])} | {_fmt([_ppl(lo)])} |")
    lines += ["", _provenance(results, ("rob-", "inv-wanda-")) + " 50-70 %: the Table 1 cells of seed 0."]
    jobs = meta.get("args", {}).get("jobs", 1)
    lines += ["", f"### Efficiency: LoRA vs LoSA (Wanda 70 %, seed 1, same data; run in the sweep, {jobs} cell(s) at a time)", "",
              "| method | trainable parameters | training wall s | training CPU s | training peak RSS MiB | cell wall s | cell peak RSS MiB | perplexity |",
              "|---|---|---|---|---|---|---|---|"]
    for kind in ("lora", "losa"):
        r = results.get(f"t1-wanda-0.7-s1-{kind}")
        if r is None:
            lines.append(f"| {kind} | n/a | n/a | n/a | n/a | n/a | n/a | n/a |")
            continue
        rep = r["report"]
        runs = [s["training"] for s in rep["steps"]] if kind == "losa" else [rep["training"]]
        if kind == "losa":
            params = f"{rep['trainable_parameters']:,} (last step; {', '.join(str(s['trainable_parameters']) for s in rep['steps'])} by step)"
        else:
            params = f"{rep['trainable_parameters']:,}"
        wall, cpu = sum(t["seconds"] for t in runs), sum(t.get("cpu_seconds", float("nan")) for t in runs)
        peak = max(t.get("peak_memory_mib") or float("nan") for t in runs)
        lines.append(f"| {kind} | {params} | {wall:.1f} | {cpu:.1f} | {peak:.0f} | {r['wall_s']:.1f} | {r['peak_rss_mib']:.0f} | {_fmt([_ppl(r)])} |")
    lines += ["", "Cells: `t1-wanda-0.7-s1-lora`, `t1-wanda-0.7-s1-losa` (seed 1). Training CPU s is process CPU time "
              "(one thread per cell, so other cells' load does not inflate it); training peak RSS is the process's peak "
              "resident memory during training only (LoSA: the highest of its steps); the cell columns cover the whole "
              "command (load, calibration, pruning, evaluation, save)."]
    lines += ["", "### Investigation: LoRA vs LoSA at Wanda 70 % (seed 0)", "", "| variant | + LoRA | + LoSA |", "|---|---|---|"]
    lines.append(f"| paper settings, 400 samples | {_fmt([_ppl(results.get('t1-wanda-0.7-s0-lora'))])} | {_fmt([_ppl(results.get('t1-wanda-0.7-s0-losa'))])} |")
    lines.append(f"| 3x fine-tuning budget (1200 samples) | {_fmt([_ppl(results.get('inv-budget3x-lora'))])} | {_fmt([_ppl(results.get('inv-budget3x-losa'))])} |")
    lines.append(f"| adapter dropout 0 | {_fmt([_ppl(results.get('inv-dropout0-lora'))])} | {_fmt([_ppl(results.get('inv-dropout0-losa'))])} |")
    lines.append(f"| learning rate 1e-3 (5x the paper's 2e-4) | {_fmt([_ppl(results.get('inv-lr1e-3-lora'))])} | {_fmt([_ppl(results.get('inv-lr1e-3-losa'))])} |")
    lines.append(f"| LoSA shrinking by SVD (not leading rows) | - | {_fmt([_ppl(results.get('inv-shrink-svd-losa'))])} |")
    lines.append(f"| LSR delta 0.06 (twice the paper's 0.03 at 70 %) | - | {_fmt([_ppl(results.get('inv-delta0.06-losa'))])} |")
    lines.append(f"| LoSA w/o DSA (Wanda; the ablation above) | - | {_fmt([_ppl(results.get('abl-no-dsa'))])} |")
    lines.append(f"| SparseGPT instead of Wanda | {_fmt([_ppl(results.get('t1-sparsegpt-0.7-s0-lora'))])} | {_fmt([_ppl(results.get('t1-sparsegpt-0.7-s0-losa'))])} |")
    lines.append(f"| SparseGPT, LoSA w/o DSA | - | {_fmt([_ppl(results.get('inv-sparsegpt-0.7-no-dsa-losa'))])} |")
    lines += ["", _provenance(results, ("inv-",)) + " Paper-settings and SparseGPT rows: the Table 1 cells of seed 0."]
    failed = [n for n in results if _ppl(results[n]) is None]
    if failed:
        lines += ["", f"Cells without a perplexity: {', '.join(failed)}"]
    return "\n".join(lines) + "\n"


def write_benchmarks_md(sweep_file: Path, target: Path) -> None:
    if not sweep_file.exists():
        raise FileNotFoundError(f"{sweep_file} does not exist: run the sweep first (python benchmarks/run_all.py)")
    sweep = json.loads(sweep_file.read_text())
    results, dense, dense_opt, meta = sweep["cells"], sweep.get("dense"), sweep.get("dense_opt"), sweep["meta"]
    parts = [INTRO]
    summary = RESULTS_DIR / "summary.md"  # headline numbers, by hand
    if summary.exists():
        parts.append(summary.read_text().strip() + "\n")
    for name in ("reference_model.md", "reference_model_opt.md", "pruning_peers.md", "adapter_step.md"):
        f = RESULTS_DIR / name
        if f.exists():
            parts.append(f.read_text().strip() + "\n")
    if results:
        parts.append(sweep_tables(results, dense, meta, dense_opt))
    analysis = RESULTS_DIR / "analysis.md"  # the reading of the sweep's numbers, written by hand
    if analysis.exists():
        parts.append(analysis.read_text().strip() + "\n")
    if results:
        parts.append(cell_commands(results))
    tmp = target.with_suffix(".tmp")
    tmp.write_text("\n".join(parts))
    tmp.replace(target)
