"""The benchmark drivers' own logic (not their timings): results-file sections, and that every
command `make bench` would run parses with the parser of the script or CLI it calls."""

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from _markdown import write_section  # noqa: E402


def test_sections_are_replaced_in_place_and_new_ones_appended(tmp_path):
    path = tmp_path / "results.md"
    write_section(path, "A", "## A\n\nfirst\n", "# Results\n\nheader\n")
    write_section(path, "B", "## B\n\nsecond\n", "# unused\n")
    write_section(path, "A", "## A\n\nfirst, rerun\n", "# unused\n")
    text = path.read_text()
    assert text.startswith("# Results\n\nheader\n")
    assert text.index("first, rerun") < text.index("second")  # A stays where it was
    assert "first\n" not in text.replace("first, rerun", "") and text.count("## A\n") == 1
    assert not list(tmp_path.glob("*.tmp"))
    with pytest.raises(ValueError, match="## C"):
        write_section(path, "C", "## not C\n", "")


def _sweep_args(tmp_path):
    return SimpleNamespace(model=str(ROOT / "models" / "reference-llama"), corpus=str(tmp_path / "corpus"),  # need not exist: parsing only
                           out=str(tmp_path / "bench-out"), nsamples=64, seqlen=256, train_samples=400, seeds=[0, 1],
                           eval_windows=256)


def test_every_sweep_cell_is_a_valid_losa_command(tmp_path):
    from run_all import cell_commands

    from losa.cli import build_parser

    cells = cell_commands(_sweep_args(tmp_path))
    assert {"t1-wanda-0.7-s1-losa", "t1-sparsegpt-0.7-s1-lora", "abl-no-dsa", "inv-lr1e-3-losa"} <= set(cells)
    for name, argv in cells.items():
        args = build_parser().parse_args([*argv, "--out", str(tmp_path / name)])
        assert args.command in ("prune", "finetune"), name
    # LoRA and LoSA cells of Table 1 get the same fine-tuning budget
    lora, losa = cells["t1-wanda-0.7-s0-lora"], cells["t1-wanda-0.7-s0-losa"]
    assert lora[lora.index("--train-samples") + 1] == losa[losa.index("--train-samples") + 1]


def test_every_peer_run_parses_with_its_script(tmp_path):
    import bench_adapter_step
    import bench_pruning
    from run_all import peer_commands

    runs = peer_commands(_sweep_args(tmp_path))
    assert set(runs) >= {"peers-pruning-llmcompressor", "peers-adapter-step-h256"}
    for name, argv in runs.items():
        script, rest = argv[0], argv[1:]
        assert (ROOT / script).is_file(), name
        if script.endswith("bench_pruning.py"):  # llm-compressor's env is made by `make bench` on first use
            args = bench_pruning.parse_args([*rest, "--peers-python", sys.executable])
        else:
            args = bench_adapter_step.parse_args(rest)
        assert getattr(args, "threads") == 1, name  # peer timings are single-threaded


def _cell(name: str, ppl: float) -> dict:
    return {"name": name, "command": f"losa finetune --seed 0 --out x/{name}", "wall_s": 1.0, "peak_rss_mib": 10.0,
            "report": {"metrics": {"perplexity": ppl}, "training": {"loss": [3.0, 2.0], "seconds": 1.0}}}


def test_sweep_results_merge_into_the_committed_file_and_rebuild_the_tables(tmp_path):
    import json

    from tables import save_sweep, write_benchmarks_md

    out, sweep = tmp_path / "bench-out", tmp_path / "sweep.json"
    for name, ppl in (("t1-wanda-0.7-s0-pruned", 54.5), ("t1-wanda-0.7-s0-losa", 51.4)):
        (out / name).mkdir(parents=True)
        (out / name / "result.json").write_text(json.dumps(_cell(name, ppl)))
    (out / "dense.json").write_text(json.dumps({"perplexity": 31.9, "tokens": 1000}))
    meta = {"argv": "python benchmarks/run_all.py", "machine": "test", "args": {"jobs": 2}}
    save_sweep(out, sweep, meta)
    saved = json.loads(sweep.read_text())
    assert set(saved["cells"]) == {"t1-wanda-0.7-s0-pruned", "t1-wanda-0.7-s0-losa"} and saved["dense"]["perplexity"] == 31.9
    assert "loss" not in saved["cells"]["t1-wanda-0.7-s0-losa"]["report"]["training"]  # compacted
    # a later partial run replaces its own cells only
    fresh = tmp_path / "rerun"
    (fresh / "t1-wanda-0.7-s0-losa").mkdir(parents=True)
    (fresh / "t1-wanda-0.7-s0-losa" / "result.json").write_text(json.dumps(_cell("t1-wanda-0.7-s0-losa", 50.0)))
    save_sweep(fresh, sweep, meta)
    cells = json.loads(sweep.read_text())["cells"]
    assert cells["t1-wanda-0.7-s0-losa"]["report"]["metrics"]["perplexity"] == 50.0 and "t1-wanda-0.7-s0-pruned" in cells
    target = tmp_path / "BENCHMARKS.md"
    write_benchmarks_md(sweep, target)  # from the committed file alone (no bench-out)
    text = target.read_text()
    assert "| wanda | 70% | 54.50 | n/a | 50.00 | 0 |" in text and "**31.90**" in text
    with pytest.raises(FileNotFoundError, match="run the sweep first"):
        write_benchmarks_md(tmp_path / "missing.json", target)
