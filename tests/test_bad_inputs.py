"""Bad input reaches the user as one line naming the problem and the fix, before any expensive work.

Each test names the audit finding it covers: perplexity windows, finetune evaluation settings,
the LoSA rank range, zero-shot device / task checks, tokenizer mismatches, one-line load errors,
``losa export`` on pickled weights, the LoRA baseline's adapter in ``losa eval``; and property tests
of every subcommand's flags against a real tiny checkpoint.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from losa import api, cli, runconfig
from losa.checkpoint import check_output_dir, load_model
from losa.config import EvalConfig, FinetuneConfig, LosaConfig, TrainConfig
from losa.errors import ConfigError, DataError, ModelError, OutputError
from losa.perplexity import perplexity

from conftest import TOY_DATA, ZEROSHOT_DIR as TOY, tiny_model

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    """(exit code, stderr) of ``losa.cli.main``; argparse's own exits included."""
    try:
        code = cli.main(argv)
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def assert_one_line_error(code: int, err: str, command: str, *needles: str) -> str:
    """Exit 2 with exactly one ``losa <command>: error: ...`` line (argparse adds its usage lines)."""
    assert code == 2, err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith(f"losa {command}: error: "), err
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def tiny_finetune(model_dir, text_file, out, **kw) -> FinetuneConfig:
    losa = kw.pop("losa", {})
    base = dict(model=str(model_dir), out=str(out), sparsity=0.5, calib=f"text:{text_file}", nsamples=4, seqlen=16,
                train=f"text:{text_file}", train_samples=4, train_seqlen=16, seed=0)
    return FinetuneConfig(**{**base, **kw}, losa=LosaConfig(**{"steps": 2, "lsr_samples": 4, "sra_samples": 2,
                                                                "dropout": 0.0, **losa}),
                          training=TrainConfig(batch_size=4, grad_accum=1))


def forbid(monkeypatch, target, name: str) -> None:
    """Make ``target.name`` fail the test if called: the error must come before that work."""
    def called(*args, **kwargs):
        raise AssertionError(f"{name} ran before the input error was reported")

    monkeypatch.setattr(target, name, called)


# ---------------------------------------------------------------- 1. perplexity windows


def test_perplexity_window_of_one_token_is_a_config_error(tmp_path, model_dirs, text_file, capsys, restore_logging):
    for bad in (1, 0, -3):
        with pytest.raises(ConfigError, match="seqlen must be an integer of at least 2 tokens"):
            EvalConfig(model="m", seqlen=bad)
    with pytest.raises(ConfigError, match="batch_size"):
        EvalConfig(model="m", batch_size=0)
    with pytest.raises(ConfigError, match="at least 2 tokens"):  # the function itself, called directly
        perplexity(tiny_model("llama"), torch.zeros(3, 1, dtype=torch.long))
    code, err = run_cli(["eval", "--model", str(model_dirs["llama"]), "--data", f"text:{text_file}", "--seqlen", "1", "-q"],
                        capsys)
    assert_one_line_error(code, err, "eval", "--seqlen must be an integer of at least 2 tokens, got 1")
    code, err = run_cli(["finetune", "--model", str(model_dirs["llama"]), "--sparsity", "0.5", "--out", str(tmp_path / "o"),
                         "--eval", f"text:{text_file}", "--eval-seqlen", "1", "-q"], capsys)
    assert_one_line_error(code, err, "finetune", "--eval-seqlen must be an integer of at least 2 tokens")
    with pytest.raises(ConfigError, match=r"evaluate\.perplexity\.seqlen: must be an integer of at least 2 tokens, got 1"):
        runconfig.run_config_from_dict({"model": "m", "out": "o", "prune": {"sparsity": 0.5},
                                        "evaluate": {"perplexity": {"seqlen": 1}}})
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------- 2. finetune's evaluation, checked up front


@pytest.mark.parametrize("field,value,message", [
    ("eval_seqlen", 0, "eval_seqlen must be an integer of at least 2 tokens (or unset to use seqlen), got 0"),
    ("eval_seqlen", -5, "eval_seqlen must be an integer of at least 2 tokens"),
    ("eval_max_windows", 0, "eval_max_windows must be a positive integer, got 0"),
    ("eval", "", "eval must be a data spec"),
])
def test_finetune_eval_settings_are_validated_in_the_config(model_dirs, text_file, tmp_path, field, value, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        tiny_finetune(model_dirs["llama"], text_file, tmp_path / "o", **{"eval": f"text:{text_file}", field: value})


def test_finetune_eval_seqlen_unset_uses_seqlen(model_dirs, text_file, tmp_path):
    assert tiny_finetune(model_dirs["llama"], text_file, tmp_path / "o", eval=f"text:{text_file}").eval_seqlen is None


def test_finetune_missing_eval_file_fails_before_loading(tmp_path, model_dirs, text_file, monkeypatch):
    forbid(monkeypatch, api, "load_model")
    with pytest.raises(DataError, match="nonexistent"):
        api.finetune(tiny_finetune(model_dirs["llama"], text_file, tmp_path / "o", eval="text:/nonexistent/eval.txt"))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", ["prune", "finetune", "eval"])
def test_offline_hub_dataset_fails_before_the_model_loads(tmp_path, model_dirs, text_file, monkeypatch, command):
    from losa.config import PruneConfig

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    forbid(monkeypatch, api, "load_model")
    forbid(monkeypatch, api, "load_evaluation_model")
    with pytest.raises(DataError, match="could not load the hub dataset .*offline, pass local data as text:PATH"):
        if command == "prune":
            api.prune(PruneConfig(model=str(model_dirs["llama"]), out=str(tmp_path / "o"), sparsity=0.5, calib="c4"))
        elif command == "finetune":
            api.finetune(tiny_finetune(model_dirs["llama"], text_file, tmp_path / "o", train="alpaca-gpt4"))
        else:
            api.evaluate(EvalConfig(model=str(model_dirs["llama"]), data="wikitext2"))
    assert list(tmp_path.iterdir()) == []


def test_finetune_eval_window_beyond_the_context_names_the_flag(tmp_path, model_dirs, text_file, monkeypatch, capsys,
                                                                restore_logging):
    forbid(monkeypatch, api, "calibration_ids")
    with pytest.raises(ModelError, match=r"^--eval-seqlen 1024 exceeds the model's context length of 128 tokens; "
                                         r"lower --eval-seqlen$"):
        api.finetune(tiny_finetune(model_dirs["llama"], text_file, tmp_path / "o", eval=f"text:{text_file}", eval_seqlen=1024))
    code, err = run_cli(["finetune", "--model", str(model_dirs["llama"]), "--sparsity", "0.5", "--out", str(tmp_path / "o"),
                         "--calib", f"text:{text_file}", "--seqlen", "32", "--train", f"text:{text_file}",
                         "--train-seqlen", "32", "--eval", f"text:{text_file}", "--eval-seqlen", "1024", "-q"], capsys)
    assert_one_line_error(code, err, "finetune", "--eval-seqlen 1024 exceeds")
    assert list(tmp_path.iterdir()) == []


def test_finetune_eval_text_shorter_than_a_window_fails_before_training(tmp_path, model_dirs, text_file, monkeypatch):
    import losa.algorithm

    forbid(monkeypatch, losa.algorithm, "run_losa")
    short = tmp_path / "short.txt"
    short.write_text("the model weight layer")
    with pytest.raises(DataError, match="fewer than one window of 64; lower --eval-seqlen or give more text"):
        api.finetune(tiny_finetune(model_dirs["llama"], text_file, tmp_path / "o", eval=f"text:{short}", eval_seqlen=64))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["short.txt"]  # no output, no <out>.state


# ---------------------------------------------------------------- 3. the rank range of the LoSA schedule


def test_mean_rank_schedule_must_fit_r_min_r_max(tmp_path, model_dirs, capsys, restore_logging):
    with pytest.raises(ConfigError, match=re.escape("r0 + steps - 1 = 20 + 5 - 1 = 24, exceeds r_max = 16: lower r0 or "
                                                    "steps so that r0 + steps - 1 <= 16")):
        LosaConfig(r0=20)
    with pytest.raises(ConfigError, match="r0 \\+ steps - 1 = 6 \\+ 12 - 1 = 17"):
        LosaConfig(steps=12)
    with pytest.raises(ConfigError, match=re.escape("r0 = 6, is below r_min = 7: raise r0 (or lower r_min)")):
        LosaConfig(r_min=7)
    assert LosaConfig(r0=12, steps=5).final_mean_rank() == 16  # the edge is allowed
    LosaConfig(r0=20, sra=False)  # uniform ranks are not clipped to [r_min, r_max]
    LosaConfig(r0=4, steps=3, r_min=6, dsa=False)  # without DSA only the last mean rank (6) is used
    out = tmp_path / "o"
    code, err = run_cli(["finetune", "--model", str(model_dirs["llama"]), "--sparsity", "0.5", "--out", str(out),
                         "--r0", "20", "-q"], capsys)
    assert_one_line_error(code, err, "finetune", "lower r0 or steps")
    assert list(tmp_path.iterdir()) == []  # no <out>.state either
    with pytest.raises(ConfigError, match=r"finetune\.r0: the mean rank of the last step"):
        runconfig.run_config_from_dict({"model": "m", "out": "o", "prune": {"sparsity": 0.5}, "finetune": {"r0": 20}})


# ---------------------------------------------------------------- 4. zero-shot


def test_zero_shot_on_cuda_without_cuda_is_one_line(model_dirs, task_dir, monkeypatch, capsys, restore_logging):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, err = run_cli(["eval", "--model", str(model_dirs["llama"]), "--tasks", "losa_toy_mc", "--include-path",
                         str(task_dir), "--device", "cuda", "-q"], capsys)
    assert_one_line_error(code, err, "eval", "CUDA is not available", "--device cpu")
    code, err = run_cli(["eval", "--model", str(model_dirs["llama"]), "--tasks", "losa_toy_mc", "--include-path",
                         str(task_dir), "--device", "bogus", "-q"], capsys)
    assert_one_line_error(code, err, "eval", "unknown device 'bogus'")


def test_eval_checks_the_tasks_before_the_perplexity(model_dirs, text_file, task_dir, monkeypatch, capsys, restore_logging):
    forbid(monkeypatch, api, "evaluate")
    code, err = run_cli(["eval", "--model", str(model_dirs["llama"]), "--data", f"text:{text_file}", "--seqlen", "32",
                         "--tasks", "no_such_task_xyz", "--include-path", str(task_dir), "-q"], capsys)
    assert_one_line_error(code, err, "eval", "no_such_task_xyz")


def broken_task_dir(tmp_path: Path) -> Path:
    d = tmp_path / "broken_tasks"
    d.mkdir()
    text = (TOY / "losa_toy_mc.yaml").read_text().replace("losa_toy_mc", "losa_broken_mc")
    (d / "losa_broken_mc.yaml").write_text(text.replace(f"test: {TOY_DATA}", f"test: {tmp_path / 'gone.jsonl'}"))
    return d


def test_run_loads_the_zero_shot_data_before_pruning(tmp_path, model_dirs, text_file, monkeypatch):
    forbid(monkeypatch, api, "prune")
    forbid(monkeypatch, api, "finetune")
    tasks = broken_task_dir(tmp_path)
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"model: {model_dirs['llama']}\nout: {tmp_path / 'run'}\nprune: {{sparsity: 0.5}}\n"
                   f"calibration: {{data: 'text:{text_file}', nsamples: 4, seqlen: 32}}\n"
                   f"evaluate:\n  zero_shot: {{tasks: [losa_broken_mc], include_path: '{tasks}'}}\n")
    with pytest.raises(DataError, match="losa_broken_mc.*working directory"):
        runconfig.run_main(str(cfg))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("key,value,message", [
    ("calibration.seqlen", 1024, "calibration.seqlen: 1024 exceeds the context length"),
    ("evaluate.perplexity.seqlen", 129, "evaluate.perplexity.seqlen: 129 exceeds the context length"),
    ("evaluate.perplexity.data", "'text:SHORT'", "fewer than one window of 32; lower evaluate.perplexity.seqlen"),
])
def test_run_checks_windows_and_evaluation_text_before_pruning(tmp_path, model_dirs, text_file, monkeypatch, key, value,
                                                              message):
    forbid(monkeypatch, api, "prune")
    short = tmp_path / "short.txt"
    short.write_text("the model weight")
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"model: {model_dirs['llama']}\nout: {tmp_path / 'run'}\nprune: {{sparsity: 0.5}}\n"
                   f"calibration: {{data: 'text:{text_file}', nsamples: 4, seqlen: 32}}\n"
                   f"evaluate:\n  perplexity: {{data: 'text:{text_file}', seqlen: 32}}\n")
    with pytest.raises((ConfigError, DataError), match=re.escape(message)):
        runconfig.run_main(str(cfg), overrides=[f"{key}={str(value).replace('SHORT', str(short))}"])
    assert not (tmp_path / "run").exists()


def test_documented_include_path_works_from_the_repository_root(monkeypatch):
    """The toy task and the example config's commented zero_shot line, run from the repository root."""
    from losa.zeroshot import check_tasks

    monkeypatch.chdir(REPO)
    assert check_tasks(["losa_toy_mc"], "tests/data/zeroshot") == ["losa_toy_mc"]
    example = REPO / "examples" / "configs" / "reference-wanda70-losa.yaml"
    line = next(line for line in example.read_text().splitlines() if "zero_shot: {tasks: [losa_toy_mc]" in line)
    documented = runconfig.parse_yaml(line.lstrip("# "))["zero_shot"]
    assert documented == {"tasks": ["losa_toy_mc"], "include_path": "tests/data/zeroshot"}
    assert check_tasks(documented["tasks"], documented["include_path"]) == ["losa_toy_mc"]
    config = runconfig.load_run_config(example, [f"evaluate.zero_shot={json.dumps(documented)}"])
    if not all((REPO / p).exists() for p in ("models/reference-llama", "data/corpus/calib.txt", "data/corpus/eval.txt",
                                               "data/corpus/finetune.txt")):
        pytest.skip("the reference model / corpus is not in this checkout")
    runconfig._check_inputs(config)  # everything the example's run reads, zero-shot included


# ---------------------------------------------------------------- 5. tokenizer and model must match


def save_with_config(directory: Path, tokenizer, arch: str = "llama", **config) -> Path:
    model = tiny_model(arch, **config)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.mark.parametrize("config,message", [
    (dict(eos_token_id=7), "its EOS token '</s>' has id 2, but config.json has eos_token_id 7"),
    (dict(bos_token_id=0), "its BOS token '<s>' has id 1, but config.json has bos_token_id 0"),
    (dict(eos_token_id=[5, 7]), "eos_token_id [5, 7]"),
])
def test_a_tokenizer_of_another_model_is_refused(tmp_path, tokenizer, config, message):
    d = save_with_config(tmp_path / "m", tokenizer, **config)
    with pytest.raises(ModelError, match=re.escape(message)) as err:
        load_model(d)
    assert "save the model's own tokenizer beside it" in str(err.value) and "\n" not in str(err.value)


def test_token_ids_in_a_list_or_unset_are_accepted(tmp_path, tokenizer):
    load_model(save_with_config(tmp_path / "list", tokenizer, eos_token_id=[2, 9]))
    load_model(save_with_config(tmp_path / "unset", tokenizer, eos_token_id=None, bos_token_id=None))


@pytest.mark.parametrize("name", ["reference-llama", "reference-opt"])
def test_the_committed_reference_models_load(name):
    path = REPO / "models" / name
    if not path.exists():
        pytest.skip(f"{path} is not in this checkout")
    model, tokenizer = load_model(path)
    assert tokenizer.eos_token_id == model.config.eos_token_id and tokenizer.bos_token_id == model.config.bos_token_id


def test_every_tiny_test_model_loads(model_dirs):
    for path in model_dirs.values():
        load_model(path)


# ---------------------------------------------------------------- 6. one-line load and output errors


def test_missing_tokenizer_is_one_line(tmp_path, model_dirs):
    d = tmp_path / "m"
    d.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(model_dirs["llama"] / name, d / name)
    with pytest.raises(ModelError, match="holds no tokenizer") as err:
        load_model(d)
    assert "\n" not in str(err.value) and "tokenizer.save_pretrained" in str(err.value)


def test_remote_code_refusal_names_the_flag(tmp_path, model_dirs, text_file, capsys, restore_logging):
    d = tmp_path / "remote"
    shutil.copytree(model_dirs["llama"], d)
    config = json.loads((d / "config.json").read_text())
    config.update(model_type="losa_custom", auto_map={"AutoConfig": "configuration_x.XConfig",
                                                     "AutoModelForCausalLM": "modeling_x.XModel"})
    (d / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match="pass --trust-remote-code") as err:
        load_model(d)
    assert "\n" not in str(err.value) and "trust_remote_code=True" not in str(err.value)
    code, err = run_cli(["eval", "--model", str(d), "--data", f"text:{text_file}", "--seqlen", "32", "-q"], capsys)
    assert_one_line_error(code, err, "eval", "pass --trust-remote-code")


def test_wrong_tensor_shapes_name_a_tensor(tmp_path, model_dirs):
    d = tmp_path / "shapes"
    shutil.copytree(model_dirs["llama"], d)
    config = json.loads((d / "config.json").read_text())
    config["intermediate_size"] = 96
    (d / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match=r"do not have the shapes its config.json describes \(9 tensor\(s\), e\.g\. "
                                         r"model\.layers\.\d\.mlp\.\w+_proj\.weight is \[") as err:
        load_model(d)
    assert "\n" not in str(err.value) and "above report" not in str(err.value)


def test_out_below_a_file_says_so(tmp_path, model_dirs, text_file, capsys, restore_logging):
    blocker = tmp_path / "file"
    blocker.write_text("")
    real = re.escape(str(blocker.resolve()))
    with pytest.raises(OutputError, match=f"cannot create {real}/x/y: {real} is a "
                                          "file, not a directory; choose another --out"):
        check_output_dir(blocker / "x" / "y", overwrite=False)
    code, err = run_cli(["prune", "--model", str(model_dirs["llama"]), "--sparsity", "0.5", "--calib", f"text:{text_file}",
                         "--out", str(blocker / "x"), "-q"], capsys)
    assert_one_line_error(code, err, "prune", "is a file, not a directory")


# ---------------------------------------------------------------- 7. export of pickled weights


def test_export_of_pickled_weights_does_not_suggest_a_missing_flag(tmp_path, capsys, restore_logging):
    p = tmp_path / "pickled"
    model = tiny_model("llama")
    model.config.save_pretrained(p)
    torch.save(model.state_dict(), p / "pytorch_model.bin")
    code, err = run_cli(["export", "--model", str(p), "--out", str(tmp_path / "ct"), "-q"], capsys)
    line = assert_one_line_error(code, err, "export", "reads safetensors only", "save_pretrained")
    assert "pass --allow-pickle" not in line
    assert not (tmp_path / "ct").exists()


# ---------------------------------------------------------------- 8. the LoRA baseline's adapter in losa eval


@pytest.fixture(scope="module")
def lora_baseline(tmp_path_factory, model_dirs, text_file) -> Path:
    out = tmp_path_factory.mktemp("lora") / "lora"
    cfg = tiny_finetune(model_dirs["llama"], text_file, out, method="lora")
    cfg.training = TrainConfig(batch_size=4, grad_accum=1, learning_rate=1e-2, warmup_ratio=0.0)
    api.finetune(cfg)
    assert (out / "lora-adapter" / "adapter_config.json").exists()
    return out


def test_eval_of_a_lora_baseline_uses_its_adapter(lora_baseline, text_file, task_dir, caplog):
    from peft import PeftModel

    from losa.zeroshot import zero_shot

    config = EvalConfig(model=str(lora_baseline), data=f"text:{text_file.with_name('eval.txt')}", seqlen=32, max_windows=4)
    with caplog.at_level(logging.INFO, logger="losa.checkpoint"):
        from_disk = api.evaluate(config)
    assert "unmerged LoRA adapter" in caplog.text
    assert from_disk["lora_adapter"] == str(lora_baseline / "lora-adapter")
    base, tokenizer = load_model(lora_baseline)
    base_only = api.evaluate(config, model=base, tokenizer=tokenizer)
    with_adapter = api.evaluate(config, model=PeftModel.from_pretrained(base, str(lora_baseline / "lora-adapter")),
                                tokenizer=tokenizer)
    assert from_disk["perplexity"] == pytest.approx(with_adapter["perplexity"], rel=1e-6)
    assert abs(from_disk["perplexity"] - base_only["perplexity"]) > 1e-4 * base_only["perplexity"]
    assert "lora_adapter" not in base_only

    zs = zero_shot(lora_baseline, ["losa_toy_mc"], include_path=task_dir, limit=4, return_samples=True)
    base, tokenizer = load_model(lora_baseline)
    in_memory = zero_shot(PeftModel.from_pretrained(base, str(lora_baseline / "lora-adapter")), ["losa_toy_mc"],
                          tokenizer=tokenizer, include_path=task_dir, limit=4, return_samples=True)
    assert zs["lora_adapter"] == str(lora_baseline / "lora-adapter")
    def lls(result):
        return [ll for doc in result["per_doc"]["losa_toy_mc"] for ll in doc["loglikelihoods"]]

    assert lls(zs) == pytest.approx(lls(in_memory), abs=1e-5)
    assert set(zs["timings_s"]) == {"tasks", "load", "evaluate"} and all(v >= 0 for v in zs["timings_s"].values())


# ---------------------------------------------------------------- 9. property tests of every subcommand's flags
#
# Each example gives every flag a valid value except for a drawn set of flags (often none, at most
# two), which get invalid ones: the outcome must be exit 0 (the output written) or exit 2 with one
# ``losa <cmd>: error:`` line, no traceback, and nothing written. Valid runs use tiny budgets.


def draw_flags(data, valid: dict, bad: dict) -> tuple[dict, set]:
    """{flag: value} with the flags of a drawn subset of ``bad`` set to invalid values."""
    broken = data.draw(st.sets(st.sampled_from(sorted(bad)), max_size=2), label="invalid flags")
    flags = {flag: data.draw(st.sampled_from(bad[flag] if flag in broken else valid[flag]), label=flag)
             for flag in sorted(set(valid) | set(bad))}
    return flags, broken


def flag_args(flags: dict) -> list[str]:
    argv = []
    for flag, value in flags.items():
        if value is True:
            argv.append(flag)
        elif value is not None and value is not False:
            argv += [f"{flag}={value}"] if value.startswith("-") or not value else [flag, value]
    return argv


def check_outcome(code: int, err: str, command: str, broken: set, out: Path | None = None) -> None:
    from hypothesis import event

    event(f"exit {code}")
    assert "Traceback" not in err, err
    if code == 0:
        assert not broken, f"invalid {broken} accepted"
        assert out is None or out.exists()
        return
    assert_one_line_error(code, err, command)
    if out is not None:
        assert not out.exists()


def device_choices() -> tuple[list, list]:
    """(valid, invalid) --device values on this machine."""
    bad = ["bogus", "cuda:x"] + ([] if torch.cuda.is_available() else ["cuda"])
    return [None, "cpu"], bad


@pytest.fixture(scope="module")
def fuzz_files(tmp_path_factory, model_dirs) -> dict[str, Path]:
    """A text shorter than any window, a broken zero-shot task, a pickled and a 2:4 checkpoint, a plain file."""
    from losa.pruning.patterns import Pattern
    from losa.pruning.sequential import prune_model

    root = tmp_path_factory.mktemp("fuzz")
    (root / "short.txt").write_text("the model")
    (root / "file").write_text("")
    pickled = root / "pickled"
    tiny_model("llama").config.save_pretrained(pickled)
    torch.save({}, pickled / "pytorch_model.bin")
    two_four = root / "two_four"
    model, _ = load_model(model_dirs["llama"])
    prune_model(model, None, method="magnitude", pattern=Pattern.nm(2, 4))
    model.save_pretrained(two_four)
    return {"short": root / "short.txt", "file": root / "file", "pickled": pickled, "two_four": two_four,
            "broken_tasks": broken_task_dir(root)}


@pytest.mark.parametrize("model_class", ["LlamaModel", "LlamaForSequenceClassification"])
def test_a_llama_checkpoint_that_is_not_a_causal_lm_is_one_line(tmp_path, tokenizer, text_file, model_class, capsys,
                                                                restore_logging):
    import transformers

    from conftest import tiny_config

    model_dir = tmp_path / model_class
    getattr(transformers, model_class)(tiny_config("llama", num_labels=2)).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    out = tmp_path / "out"
    code, err = run_cli(["prune", "--model", str(model_dir), "--sparsity", "0.5", "--calib", f"text:{text_file}",
                         "--nsamples", "2", "--seqlen", "16", "--out", str(out), "-q"], capsys)
    assert_one_line_error(code, err, "prune", f"is a {model_class} checkpoint, not a causal language model",
                          "*ForCausalLM")
    assert not out.exists()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_prune_flags(model_dirs, text_file, fuzz_files, tmp_path_factory, capsys, restore_logging, data):
    root = tmp_path_factory.mktemp("prune")
    (root / "existing").mkdir()
    valid_devices, bad_devices = device_choices()
    flags, broken = draw_flags(data, valid={
        "--model": [str(model_dirs["llama"]), str(model_dirs["opt"])], "--method": [None, "magnitude", "wanda", "sparsegpt"],
        "--target": ["--sparsity=0.5", "--sparsity=0", "--pattern=2:4", "--pattern=4:8"], "--calib": [f"text:{text_file}"],
        "--nsamples": ["2", "4"], "--seqlen": ["8", "16"], "--seed": [None, "3"], "--batch-size": [None, "1"],
        "--out": ["new", "existing-overwrite"], "--device": valid_devices, "--dtype": [None, "float32", "bfloat16"],
    }, bad={
        "--model": [str(root / "nope"), str(fuzz_files["file"]), str(fuzz_files["pickled"]), str(root)],
        "--method": ["bogus"], "--target": ["--sparsity=1.2", "--sparsity=-0.1", "--sparsity=x", "--pattern=4:4",
                                              "--pattern=2:3", "--pattern=2", "--pattern=a:b"],
        "--calib": ["text:/nonexistent", f"text:{fuzz_files['short']}", ""], "--nsamples": ["0", "-1", "x"],
        "--seqlen": ["1", "0", "1024", "y"], "--batch-size": ["0"], "--out": ["existing", "below-file"],
        "--device": bad_devices, "--dtype": ["int8"],
    })
    if broken & {"--calib", "--nsamples", "--seqlen"} and flags["--method"] == "magnitude":
        flags["--method"] = "wanda"  # magnitude reads no calibration data: those flags do not matter to it
    out = {"new": root / "pruned", "below-file": fuzz_files["file"] / "pruned"}.get(flags["--out"], root / "existing")
    overwrite = flags.pop("--out") == "existing-overwrite"
    target = flags.pop("--target")
    argv = ["prune", "--out", str(out), target, "-q"] + flag_args({**flags, "--overwrite": overwrite})
    code, err = run_cli(argv, capsys)
    check_outcome(code, err, "prune", broken, out if out.name == "pruned" else None)
    if code == 0:
        report = json.loads((out / "report.json").read_text())
        assert report["method"] == (flags["--method"] or "wanda") and report["layers"]
    elif out.name == "existing":  # a refused run leaves the existing directory as it was
        assert out.is_dir() and not any(out.iterdir())


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_eval_flags(model_dirs, text_file, task_dir, fuzz_files, capsys, restore_logging, data):
    eval_text = f"text:{text_file.with_name('eval.txt')}"
    valid_devices, bad_devices = device_choices()
    flags, broken = draw_flags(data, valid={
        "--data": [eval_text], "--seqlen": ["2", "16", "32"], "--batch-size": [None, "1", "4"], "--max-windows": ["1", "3"],
        "--device": valid_devices, "--dtype": [None, "float32"], "--tasks": [None, "losa_toy_mc"], "--limit": ["2"],
        "--num-fewshot": [None, "0"], "--include-path": [str(task_dir)],
    }, bad={
        "--data": ["text:/nonexistent", "jsonl:/nonexistent.jsonl", "/nonexistent.txt", f"text:{fuzz_files['short']}"],
        "--seqlen": ["1", "0", "-4", "129", "abc"], "--batch-size": ["0", "-1", "x"], "--max-windows": ["0", "-1", "y"],
        "--device": bad_devices, "--dtype": ["int8"], "--tasks": ["no_such_task_xyz", "", "losa_broken_mc"],
        "--limit": ["0", "-1", "x"], "--num-fewshot": ["-1"], "--include-path": ["/nonexistent"],
    })
    if flags["--tasks"] == "losa_broken_mc":
        flags["--include-path"] = str(fuzz_files["broken_tasks"])
    if {"--limit", "--num-fewshot", "--include-path"} & broken and flags["--tasks"] is None:
        flags["--tasks"] = "losa_toy_mc"  # those flags matter only with --tasks
    code, err = run_cli(["eval", "--model", str(model_dirs["llama"]), "-q"] + flag_args(flags), capsys)
    check_outcome(code, err, "eval", broken)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_export_flags(model_dirs, fuzz_files, tmp_path_factory, capsys, restore_logging, data):
    root = tmp_path_factory.mktemp("export")
    (root / "existing").mkdir()
    flags, broken = draw_flags(data, valid={
        "--model": [str(model_dirs["llama"]), str(fuzz_files["two_four"])], "--out": ["new", "existing"],
        "--format": [None, "compressed-tensors", "sparse-bitmask"],
    }, bad={
        "--model": [str(root / "nope"), str(fuzz_files["file"]), str(fuzz_files["pickled"]), str(root)],
        "--out": ["below-file", "existing-without-overwrite"], "--format": ["zip"],
    })
    if flags["--format"] is None and flags["--model"] == str(fuzz_files["two_four"]) and data.draw(st.booleans()):
        flags["--format"] = "sparse-24-bitmask"
    out = {"new": root / "ct", "below-file": fuzz_files["file"] / "ct"}.get(flags["--out"], root / "existing")
    overwrite = flags.pop("--out") == "existing"
    argv = ["export", "--out", str(out), "-q"] + flag_args({**flags, "--overwrite": overwrite})
    code, err = run_cli(argv, capsys)
    check_outcome(code, err, "export", broken, out if out.name == "ct" and out.parent == root else None)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_finetune_flags(model_dirs, text_file, fuzz_files, tmp_path_factory, capsys, restore_logging, data):
    """Valid combinations train for real, on a budget of four 16-token sequences."""
    root = tmp_path_factory.mktemp("finetune")
    out = root / "out"
    flags, broken = draw_flags(data, valid={
        "--method": [None, "losa", "lora", "sparse-lora"], "--eval": [None, f"text:{text_file.with_name('eval.txt')}"],
        "--eval-seqlen": [None, "16"], "--eval-max-windows": ["2"], "--r0": [None, "2"], "--steps": ["1", "2"],
        "--train-seqlen": ["16"], "--lr": [None, "1e-3"], "--train-batch-size": ["4"], "--lsr-samples": ["4"],
        "--lora-rank": [None, "4"], "--dropout": [None, "0.0"], "--delta": [None, "0.05"], "--no-sra": [False, True],
    }, bad={
        "--method": ["bogus"], "--eval": ["text:/nonexistent", f"text:{fuzz_files['short']}", ""],
        "--eval-seqlen": ["0", "1", "-2", "1024", "q"], "--eval-max-windows": ["0", "-3", "z"], "--r0": ["0", "-1", "30"],
        "--steps": ["0", "30"], "--train-seqlen": ["1", "4096"], "--lr": ["0", "-1e-3", "nan"],
        "--train-batch-size": ["0", "x"], "--lsr-samples": ["1"], "--lora-rank": ["0"], "--dropout": ["1.5"],
        "--delta": ["0.7"],
    })
    if broken & {"--eval-seqlen", "--eval-max-windows"} and not flags["--eval"]:
        flags["--eval"] = f"text:{text_file.with_name('eval.txt')}"
    if broken & {"--r0", "--steps"}:
        flags["--no-sra"] = False  # a mean rank beyond r_max is only an error with SRA
    argv = ["finetune", "--model", str(model_dirs["llama"]), "--out", str(out), "--sparsity", "0.5", "--calib",
            f"text:{text_file}", "--nsamples", "4", "--seqlen", "16", "--train", f"text:{text_file}", "--train-samples", "4",
            "--sra-samples", "2", "--grad-accum", "1", "-q"] + flag_args(flags)
    code, err = run_cli(argv, capsys)
    check_outcome(code, err, "finetune", broken, out)
    assert not out.with_name("out.state").exists()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_run_settings(model_dirs, text_file, task_dir, fuzz_files, tmp_path_factory, capsys, restore_logging, data):
    """``losa run`` with settings from the file (and --set); a finetune section appears only when invalid."""
    root = tmp_path_factory.mktemp("run")
    eval_text = f"text:{text_file.with_name('eval.txt')}"
    settings_, broken = draw_flags(data, valid={
        "prune": ["{method: magnitude, sparsity: 0.5}", "{method: wanda, pattern: '2:4'}"], "calibration.seqlen": ["16", "32"],
        "evaluate.perplexity": [None, f"{{data: '{eval_text}', seqlen: 16, max_windows: 2}}"],
        "evaluate.zero_shot": [None, f"{{tasks: [losa_toy_mc], include_path: '{task_dir}', limit: 2}}"],
        "export": [None, "{format: compressed-tensors}", "{format: sparse-bitmask}"], "out": ["new"], "finetune": [None],
    }, bad={
        "prune": ["{sparsity: 1.5}", "{sparsity: 0.5, pattern: '2:4'}", "{sparsityy: 0.5}", "{method: lora, sparsity: 0.5}"],
        "calibration.seqlen": ["1", "129", "x"],
        "evaluate.perplexity": [f"{{data: '{eval_text}', seqlen: 1}}", f"{{data: '{eval_text}', seqlen: 129}}",
                                f"{{data: '{eval_text}', max_windows: 0}}", "{data: 'text:/nonexistent', seqlen: 16}",
                                f"{{data: 'text:{fuzz_files['short']}', seqlen: 16}}"],
        "evaluate.zero_shot": ["{tasks: [no_such_task_xyz]}", "{tasks: []}", f"{{tasks: [losa_toy_mc], include_path: '{task_dir}', limit: 0}}",
                               f"{{tasks: [losa_broken_mc], include_path: '{fuzz_files['broken_tasks']}'}}"],
        "export": ["{format: zip}"], "out": ["below-file"],
        "finetune": ["{r0: 20}", "{steps: 0}", "{method: bogus}", "{seqlen: 1}", "{eval: x}"],
    })
    target = root / "run" if settings_.pop("out") == "new" else fuzz_files["file"] / "run"
    if "2:4" in settings_["prune"] and settings_["export"] == "{format: compressed-tensors}" and data.draw(st.booleans()):
        settings_["export"] = "{format: sparse-24-bitmask}"
    cfg = root / "run.yaml"
    cfg.write_text(f"model: {model_dirs['llama']}\nout: {target}\ncalibration: {{data: 'text:{text_file}', nsamples: 2}}\n")
    overrides = [f"{key}={value}" for key, value in settings_.items() if value is not None]
    dry_run = data.draw(st.booleans(), label="dry run")
    argv = ["run", str(cfg), "-q"] + [arg for o in overrides for arg in ("--set", o)] + (["--dry-run"] if dry_run else [])
    code, err = run_cli(argv, capsys)
    if dry_run and code == 0:
        broken -= {"calibration.seqlen", "evaluate.perplexity", "evaluate.zero_shot", "out"}  # some checked when it runs
    check_outcome(code, err, "run", broken, None)
    if code == 2 or dry_run:
        assert not target.exists()
    else:
        assert (target / "report.json").exists()
