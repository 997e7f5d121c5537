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
