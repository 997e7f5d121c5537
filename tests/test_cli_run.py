"""`losa run` goes through losa.runconfig.run_main: dry run and bad keys through the CLI entry point."""

from pathlib import Path

from losa.cli import main

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "configs"


def test_run_dry_run_prints_resolved_config(capsys):
    assert main(["run", str(EXAMPLES / "reference-wanda70-losa.yaml"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "method: wanda" in out and "steps: 5" in out and "r0: 6" in out


def test_run_unknown_key_is_one_line_error(capsys):
    assert main(["run", str(EXAMPLES / "reference-wanda70-losa.yaml"), "--dry-run", "--set", "prune.sparsityy=0.5"]) == 2
    err = capsys.readouterr().err
    assert "sparsityy" in err and "did you mean 'sparsity'" in err and "Traceback" not in err
