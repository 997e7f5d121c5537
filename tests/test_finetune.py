"""End-to-end LoSA and baselines on tiny models: invariants, resume, NaN handling."""

import json

import pytest
import torch
from safetensors.torch import load_file

from losa import api
from losa.config import FinetuneConfig, LosaConfig, TrainConfig
from losa.errors import ConfigError, TrainingError
from losa.train import step_chunks


def tiny_cfg(model_dir, text_file, out, **kw):
    losa_kw = kw.pop("losa", {})
    train_kw = kw.pop("training", {})
    base = dict(model=str(model_dir), out=str(out), pruner="wanda", sparsity=0.6, calib=f"text:{text_file}",
                nsamples=8, seqlen=32, train=f"text:{text_file}", train_samples=24, train_seqlen=32, seed=0,
                eval=f"text:{text_file.with_name('eval.txt')}", eval_seqlen=32)
    base.update(kw)
    return FinetuneConfig(**base, losa=LosaConfig(steps=3, lsr_samples=8, sra_samples=4, dropout=0.0, **losa_kw),
                          training=TrainConfig(batch_size=4, grad_accum=1, **train_kw))


def test_step_chunks_follow_the_authors_split():
    assert step_chunks(10000, 5) == [(0, 1000), (1000, 2000), (2000, 3000), (3000, 4000), (4000, 10000)]
    assert step_chunks(7, 1) == [(0, 7)]
    chunks = step_chunks(24, 3)
    assert chunks[0][0] == 0 and chunks[-1][1] == 24 and all(a < b for a, b in chunks)


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_losa_end_to_end_exact_sparsity(tmp_path, model_dirs, text_file, arch):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "losa"
    report = api.finetune(tiny_cfg(model_dirs[arch], text_file, out))
    steps = report["steps"]
    assert [s["step"] for s in steps] == [1, 2, 3]
    # cubic schedule, mean rank r0 + t - 1, LSR rates average S_t, SRA ranks sum exactly
    for s in steps:
        assert sum(float(p) for p in s["block_patterns"]) / 3 == pytest.approx(s["target_sparsity"], abs=1e-12)
        assert sum(s["ranks"]) == 3 * s["mean_rank"]
        assert len(s["errors"]) == 3 and all(e >= 0 for e in s["errors"])
        assert set(s["seconds"]) >= {"lsr", "prune", "forward", "sra", "train"}
        assert all(v >= 0 for v in s["seconds"].values())
    assert "dense_outputs" in steps[0]["seconds"]  # D_l, recorded once before step 1
    assert steps[-1]["target_sparsity"] == pytest.approx(0.6)
    assert [s["mean_rank"] for s in steps] == [6, 7, 8]
    # sparsity only grows from step to step
    for a, b in zip(steps, steps[1:]):
        assert all(y >= x - 1e-12 for x, y in zip(a["block_sparsity"], b["block_sparsity"]))
    # the saved checkpoint is a plain HF model with exactly the step-T sparsity in every layer
    saved = json.loads((out / "report.json").read_text())
    assert saved["metrics"]["perplexity"] > 1
    model = AutoModelForCausalLM.from_pretrained(out)
    names = {l["name"]: l for l in saved["layers"]}
    state = load_file(str(out / "model.safetensors"))
    assert not any("lora" in k for k in state)
    assert all(layer["target"] == steps[-1]["block_patterns"][layer["block"]] for layer in names.values())
    for name, layer in names.items():
        w = dict(model.named_modules())[name].weight
        assert float((w == 0).float().mean()) == pytest.approx(layer["sparsity"])
        block = layer["block"]
        assert layer["sparsity"] == pytest.approx(steps[-1]["block_sparsity"][block], abs=0.02)
    # per-row counts are int(in_features * S_i): with 32-wide layers that rounds by up to 1/32
    assert saved["overall_sparsity"] == pytest.approx(0.6, abs=1 / 32)
    assert {"sparsity_by_step.png", "ranks_by_step.png", "training_loss.png"} <= {p.name for p in (out / "plots").iterdir()}
    assert not (tmp_path / "losa.state").exists()


def test_resume_gives_the_same_result(tmp_path, model_dirs, text_file):
    straight = tmp_path / "straight"
    api.finetune(tiny_cfg(model_dirs["llama"], text_file, straight))
    resumed = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        api.finetune(tiny_cfg(model_dirs["llama"], text_file, resumed), stop_after=1)
    assert not resumed.exists() and (tmp_path / "resumed.state" / "step-1").exists()
    report = api.finetune(tiny_cfg(model_dirs["llama"], text_file, resumed))
    assert [s["step"] for s in report["steps"]] == [1, 2, 3]
    a = load_file(str(straight / "model.safetensors"))
    b = load_file(str(resumed / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_resume_refuses_other_settings(tmp_path, model_dirs, text_file):
    out = tmp_path / "r"
    with pytest.raises(KeyboardInterrupt):
        api.finetune(tiny_cfg(model_dirs["llama"], text_file, out), stop_after=1)
    with pytest.raises(ConfigError, match="different settings.*sparsity"):
        api.finetune(tiny_cfg(model_dirs["llama"], text_file, out, sparsity=0.5))


def test_nan_loss_stops_and_keeps_last_good_step(tmp_path, model_dirs, text_file, monkeypatch):
    import losa.algorithm
    from losa.train import train as real_train

    def poisoned(model, samples, tokenizer, config, *, seed, device, desc):
        if desc == "step 2":  # make step 2 diverge
            for p in model.parameters():
                if p.requires_grad:
                    p.data.fill_(float("nan"))
        return real_train(model, samples, tokenizer, config, seed=seed, device=device, desc=desc)

    out = tmp_path / "nan"
    monkeypatch.setattr(losa.algorithm, "train", poisoned)
    with pytest.raises(TrainingError, match="the training loss became nan at optimiser step 1;"):
        api.finetune(tiny_cfg(model_dirs["llama"], text_file, out, eval=None))
    assert not out.exists()
    assert json.loads((tmp_path / "nan.state" / "latest.json").read_text())["step"] == 1  # last good step kept
    monkeypatch.undo()
    report = api.finetune(tiny_cfg(model_dirs["llama"], text_file, out, eval=None))  # resumes after step 1
    assert [s["step"] for s in report["steps"]] == [1, 2, 3] and out.exists()


@pytest.mark.parametrize("method", ["lora", "sparse-lora", "ft-then-sparsify"])
def test_baselines(tmp_path, model_dirs, text_file, method):
    out = tmp_path / method
    report = api.finetune(tiny_cfg(model_dirs["llama"], text_file, out, method=method))
    assert report["metrics"]["perplexity"] > 1
    assert report["overall_sparsity"] == pytest.approx(0.6, abs=1 / 32)
    if method == "lora":
        assert report["merged_density"] > 0.9  # merging LoRA would destroy the sparsity
        assert (out / "lora-adapter" / "adapter_config.json").exists()
    assert report["trainable_parameters"] > 0


@pytest.mark.parametrize("ablation", [dict(lsr=False), dict(sra=False), dict(dsa=False), dict(rank_by="sparsity"),
                                      dict(schedule="linear")])
def test_ablations(tmp_path, model_dirs, text_file, ablation):
    report = api.finetune(tiny_cfg(model_dirs["llama"], text_file, tmp_path / "a", eval=None, losa=ablation))
    steps = report["steps"]
    assert report["overall_sparsity"] == pytest.approx(0.6, abs=1 / 32)
    if ablation.get("lsr") is False:
        assert all(p == str(float(steps[-1]["target_sparsity"])) for p in steps[-1]["block_patterns"])
    if ablation.get("sra") is False:
        assert all(len(set(s["ranks"])) == 1 for s in steps)
    if ablation.get("dsa") is False:
        assert len(steps) == 1 and steps[0]["mean_rank"] == 8
    if ablation.get("schedule") == "linear":
        assert [s["target_sparsity"] for s in steps] == pytest.approx([0.2, 0.4, 0.6])


def test_losa_nm_pattern(tmp_path, model_dirs, text_file):
    report = api.finetune(tiny_cfg(model_dirs["qwen2"], text_file, tmp_path / "nm", sparsity=None, pattern="2:4", eval=None))
    assert report["overall_sparsity"] == pytest.approx(0.5)
    assert all(p == "2:4" for s in report["steps"] for p in s["block_patterns"])
    # the pattern applies from step 1 (N:M groups cannot be reached gradually), and the record says so
    assert [s["target_sparsity"] for s in report["steps"]] == [0.5, 0.5, 0.5]
    assert report["method"] == "losa" and report["steps"][0]["training"]["optimizer"] == "adamw_torch"


def test_cli_finetune_flags(tmp_path, model_dirs, text_file):
    from losa.cli import build_parser, finetune_config

    args = build_parser().parse_args([
        "finetune", "--model", str(model_dirs["llama"]), "--method", "losa", "--pruner", "sparsegpt", "--sparsity", "0.7",
        "--calib", f"text:{text_file}", "--train", f"text:{text_file}", "--steps", "4", "--train-samples", "100",
        "--train-seqlen", "64", "--seed", "3", "--out", str(tmp_path / "o"), "--no-lsr", "--no-sra", "--no-dsa",
        "--rank-by", "sparsity", "--schedule", "linear", "--delta", "0.06"])
    cfg = finetune_config(args)
    assert cfg.losa.delta == 0.06
    assert (cfg.pruner, cfg.sparsity, cfg.losa.steps, cfg.train_samples, cfg.seed) == ("sparsegpt", 0.7, 4, 100, 3)
    assert (cfg.losa.lsr, cfg.losa.sra, cfg.losa.dsa, cfg.losa.rank_by, cfg.losa.schedule) == (False, False, False, "sparsity", "linear")
    assert cfg.beta() == 100.0
    defaults = finetune_config(build_parser().parse_args(["finetune", "--model", "m", "--sparsity", "0.7", "--out", "o"]))
    assert (defaults.losa.steps, defaults.losa.r0, defaults.training.learning_rate, defaults.nsamples) == (5, 6, 2e-4, 128)
    assert defaults.losa.delta is None  # the paper's delta table


def test_cli_finetune_runs(tmp_path, model_dirs, text_file):
    import os
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "losa.cli", "finetune", "--model", str(model_dirs["llama"]), "--sparsity", "0.5",
                        "--calib", f"text:{text_file}", "--nsamples", "4", "--seqlen", "32", "--train", f"text:{text_file}",
                        "--train-samples", "8", "--train-seqlen", "32", "--steps", "2", "--lsr-samples", "4",
                        "--sra-samples", "2", "--out", str(tmp_path / "o"), "-q"],
                       capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert report["command"] == "finetune" and len(report["steps"]) == 2


def test_collator_masks_only_its_own_padding(tokenizer):
    """EOS is a target even when it doubles as the pad token; only the added padding is ignored."""
    import copy

    from losa.train import causal_lm_collator

    tok = copy.deepcopy(tokenizer)
    tok.pad_token = None  # like LLaMA / OPT tokenizers without a pad token: pad = eos
    eos = tok.eos_token_id
    samples = [[5, 6, eos, 7, eos], [8, eos]]
    batch = causal_lm_collator(tok)([{"input_ids": s, "labels": s} for s in samples])
    assert tok.pad_token_id == eos
    assert batch["input_ids"].shape == batch["labels"].shape == (2, 5)
    assert batch["labels"][0].tolist() == samples[0]  # both EOS kept as targets
    padded = batch["attention_mask"][1] == 0
    assert padded.sum() == 3 and (batch["labels"][1][padded] == -100).all()
    assert batch["labels"][1][~padded].tolist() == [8, eos]


def test_merge_check_refuses_a_layer_less_sparse_than_its_pattern():
    from conftest import tiny_model

    from losa.api import _check_merged_sparsity
    from losa.models.registry import architecture_of
    from losa.pruning.patterns import Pattern

    model = tiny_model("llama")
    arch = architecture_of(model)
    masks = {f"{arch.blocks_path}.{i}.{n}": lin.weight != 0 for i, b in enumerate(arch.blocks(model))
             for n, lin in arch.linears(b).items()}
    blocks = len(arch.blocks(model))
    _check_merged_sparsity(model, masks, [Pattern.unstructured(0.0)] * blocks)  # dense model, dense pattern: fine
    with pytest.raises(RuntimeError, match="less sparse than its step-T pattern 0.5"):
        _check_merged_sparsity(model, masks, [Pattern.unstructured(0.5)] * blocks)
    name = next(iter(masks))
    masks[name] = torch.zeros_like(masks[name])  # "pruned" everywhere, but the weights are not zero
    with pytest.raises(RuntimeError, match="merging broke the sparsity"):
        _check_merged_sparsity(model, masks, [Pattern.unstructured(0.0)] * blocks)


def test_optimiser_choice(monkeypatch, caplog):
    import sys

    from losa.train import _optimizer_name

    assert _optimizer_name(TrainConfig(), "cpu") == "adamw_torch"
    assert _optimizer_name(TrainConfig(optim="adafactor"), "cuda") == "adafactor"
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # not installed: import fails
    with caplog.at_level("WARNING", logger="losa.train"):
        assert _optimizer_name(TrainConfig(), "cuda:0") == "adamw_torch"
    assert "needs bitsandbytes" in caplog.text and "--optim" in caplog.text


def test_optim_flag_reaches_the_config_and_bad_names_name_the_flag():
    from losa import cli

    parser = cli.build_parser()
    base = ["finetune", "--model", "m", "--sparsity", "0.5", "--out", "o"]
    assert cli.finetune_config(parser.parse_args(base + ["--optim", "adamw_torch"])).training.optim == "adamw_torch"
    with pytest.raises(ConfigError, match=r"^--optim 'bogus' is not a transformers optimiser"):
        cli.finetune_config(parser.parse_args(base + ["--optim", "bogus"]))


def test_a_killed_cli_run_resumes_to_the_same_result(tmp_path, model_dirs, text_file):
    """A real interruption: ``losa finetune`` is SIGKILLed in a subprocess once a step is saved;
    rerunning the same command continues from that step and ends bit-identical to a run that
    was never interrupted."""
    import os
    import signal
    import subprocess
    import sys
    import time

    def argv(out):
        return [sys.executable, "-m", "losa.cli", "finetune", "--model", str(model_dirs["llama"]), "--out", str(out),
                "--sparsity", "0.6", "--calib", f"text:{text_file}", "--nsamples", "8", "--seqlen", "32",
                "--train", f"text:{text_file}", "--train-samples", "60", "--train-seqlen", "32", "--steps", "4",
                "--lsr-samples", "8", "--sra-samples", "4", "--dropout", "0", "--train-batch-size", "4",
                "--grad-accum", "1", "--seed", "0", "-q"]

    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    subprocess.run(argv(straight), env=env, check=True, capture_output=True, timeout=300)
    latest = tmp_path / "resumed.state" / "latest.json"
    proc = subprocess.Popen(argv(resumed), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not latest.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)  # no cleanup runs: only what was written atomically survives
    proc.wait()
    killed_after = json.loads(latest.read_text())["step"]
    assert 1 <= killed_after < 4 and not resumed.exists()
    done = subprocess.run(argv(resumed), env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((resumed / "report.json").read_text())
    assert [s["step"] for s in report["steps"]] == [1, 2, 3, 4]
    a, b = load_file(str(straight / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
