"""One logging setup for every subcommand: INFO by default, DEBUG with -v, and with -q only
warnings and errors, no progress bars (lm-eval's included, which passes ``disable=`` itself)."""

import logging

import pytest
import tqdm

from losa.cli import main


@pytest.fixture
def restore_tqdm(restore_logging):
    yield
    from losa.log import _set_progress_bars

    _set_progress_bars(enabled=True)


def eval_argv(model_dirs, text_file, *extra):
    return ["eval", "--model", str(model_dirs["llama"]), "--data", f"text:{text_file.with_name('eval.txt')}",
            "--seqlen", "16", "--max-windows", "2", *extra]


def test_default_logs_info_and_verbose_logs_debug(model_dirs, text_file, capsys, restore_tqdm):
    assert main(eval_argv(model_dirs, text_file, "-q")) == 0
    assert main(eval_argv(model_dirs, text_file)) == 0  # a quiet run before does not silence this one
    assert "perplexity: " in capsys.readouterr().err  # its progress bar
    assert logging.getLogger().level == logging.INFO
    assert logging.getLogger("lm_eval").getEffectiveLevel() == logging.ERROR  # its per-run warnings are noise
    assert main(eval_argv(model_dirs, text_file, "-v")) == 0
    assert logging.getLogger().level == logging.DEBUG
    assert logging.getLogger("lm_eval").getEffectiveLevel() == logging.DEBUG


def test_quiet_prints_the_result_only(model_dirs, text_file, task_dir, capsys, restore_tqdm):
    argv = eval_argv(model_dirs, text_file, "--tasks", "losa_toy_mc", "--include-path", str(task_dir), "--limit", "2",
                     "-q")
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert captured.err == ""  # no INFO lines, no progress bars: not ours, not lm-eval's
    assert "perplexity" in captured.out and "losa_toy_mc" in captured.out
    assert tqdm.tqdm(range(2), disable=False).disable  # a caller's own disable=False is overridden
    assert logging.getLogger().level == logging.WARNING
