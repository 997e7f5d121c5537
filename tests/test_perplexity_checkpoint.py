import json
import math
import os
import subprocess
import sys

import pytest
import torch

from losa import api
from losa.checkpoint import atomic_output_dir, load_model
from losa.config import EvalConfig, PruneConfig
from losa.errors import ConfigError, DataError, ModelError, OutputError
from losa.perplexity import perplexity

from conftest import tiny_model


def test_perplexity_equals_direct_computation():
    model = tiny_model("llama")
    windows = torch.randint(0, 256, (5, 12), generator=torch.Generator().manual_seed(0))
    got = perplexity(model, windows, batch_size=2)
    logp = []
    with torch.no_grad():
        for w in windows:  # one token at a time, by hand
            lp = torch.log_softmax(model(w[None]).logits[0].double(), -1)
            logp += [lp[t, w[t + 1]].item() for t in range(len(w) - 1)]
    assert got["tokens"] == 5 * 11
    assert got["perplexity"] == pytest.approx(math.exp(-sum(logp) / len(logp)), rel=1e-5)


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_prune_writes_a_checkpoint_that_transformers_reloads(tmp_path, model_dirs, text_file, arch):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "pruned"
    report = api.prune(PruneConfig(model=str(model_dirs[arch]), out=str(out), method="wanda", sparsity=0.5,
                                   calib=f"text:{text_file}", nsamples=4, seqlen=32, seed=0))
    assert report["overall_sparsity"] == pytest.approx(0.5)
    saved = json.loads((out / "report.json").read_text())
    assert saved["settings"]["method"] == "wanda" and len(saved["layers"]) == len(report["layers"])
    assert all(layer["sparsity"] == pytest.approx(0.5) for layer in saved["layers"])
    assert "prune" in saved["timings_s"]
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    ours, _ = load_model(out)
    ids = torch.randint(0, 200, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, ours(ids).logits, rtol=0, atol=0)
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp leftovers


def test_eval_api(model_dirs, text_file):
    result = api.evaluate(EvalConfig(model=str(model_dirs["qwen2"]), data=f"text:{text_file}", seqlen=32, max_windows=3))
    assert result["tokens"] == 3 * 31 and result["perplexity"] > 1


def test_bad_inputs_leave_nothing(tmp_path, model_dirs, text_file):
    out = tmp_path / "out"
    base = dict(model=str(model_dirs["llama"]), out=str(out), calib=f"text:{text_file}", nsamples=4, seqlen=32)
    for bad in (1.0, -0.1, 1.5):
        with pytest.raises(ConfigError, match=r"\[0, 1\)"):
            PruneConfig(**base, sparsity=bad)
    with pytest.raises(ConfigError):
        PruneConfig(**base, pattern="4:4")
    with pytest.raises(ConfigError, match="exactly one"):
        PruneConfig(**base)
    with pytest.raises(ModelError, match="does not exist"):
        api.prune(PruneConfig(**{**base, "model": str(tmp_path / "missing")}, sparsity=0.5))
    with pytest.raises(DataError, match="fewer than nsamples x seqlen"):
        api.prune(PruneConfig(**{**base, "nsamples": 1000}, sparsity=0.5))
    with pytest.raises(ConfigError, match="divide"):
        api.prune(PruneConfig(**base, pattern="2:3"))
    assert not out.exists() and list(tmp_path.iterdir()) == []
    out.mkdir()
    with pytest.raises(OutputError, match="--overwrite"):
        api.prune(PruneConfig(**base, sparsity=0.5))


def test_not_a_causal_lm_and_pickle_refused(tmp_path):
    from transformers import BertConfig, BertModel

    d = tmp_path / "bert"
    BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)).save_pretrained(d)
    with pytest.raises(ModelError, match="bert"):
        load_model(d)
    p = tmp_path / "pickled"
    model = tiny_model("llama")
    model.config.save_pretrained(p)
    torch.save(model.state_dict(), p / "pytorch_model.bin")  # a legacy pickled checkpoint
    with pytest.raises(ModelError, match="--allow-pickle"):
        load_model(p)


def test_atomic_output_keeps_old_on_failure(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_output_dir(out, overwrite=True) as tmp:
            (tmp / "new.txt").write_text("new")
            raise RuntimeError("boom")
    assert (out / "keep.txt").read_text() == "old" and len(list(tmp_path.iterdir())) == 1
    with atomic_output_dir(out, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in out.iterdir()] == ["new.txt"] and len(list(tmp_path.iterdir())) == 1


def _cli(*args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "losa.cli", *args], capture_output=True, text=True, env=env, timeout=300)


def test_cli_prune_and_eval_json(tmp_path, model_dirs, text_file):
    out = tmp_path / "p"
    r = _cli("prune", "--model", str(model_dirs["mistral"]), "--method", "sparsegpt", "--pattern", "2:4",
             "--calib", f"text:{text_file}", "--nsamples", "4", "--seqlen", "32", "--seed", "1", "--out", str(out), "-q")
    assert r.returncode == 0, r.stderr
    r = _cli("eval", "--model", str(out), "--data", f"text:{text_file}", "--seqlen", "32", "--max-windows", "2", "--json", "-q")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["tokens"] == 62 and result["perplexity"] > 1


def test_cli_input_errors_are_one_line(tmp_path, model_dirs, text_file):
    r = _cli("prune", "--model", str(tmp_path / "nope"), "--sparsity", "0.5", "--calib", f"text:{text_file}",
             "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "Traceback" not in r.stderr and "does not exist" in r.stderr
    r = _cli("eval", "--model", str(model_dirs["llama"]), "--data", "wikitext2", "--seqlen", "32")
    assert r.returncode == 2 and "Traceback" not in r.stderr and "text:PATH" in r.stderr


def test_windows_longer_than_the_context_are_refused(tmp_path, model_dirs, text_file):
    with pytest.raises(ModelError, match="context length of 128"):
        api.prune(PruneConfig(model=str(model_dirs["opt"]), out=str(tmp_path / "o"), sparsity=0.5,
                              calib=f"text:{text_file}", nsamples=2, seqlen=256))
    with pytest.raises(ModelError, match="context length"):
        api.evaluate(EvalConfig(model=str(model_dirs["llama"]), data=f"text:{text_file}", seqlen=1024))
    assert not (tmp_path / "o").exists()


def test_unwritable_output_is_refused(tmp_path, model_dirs, monkeypatch):
    import tempfile as _tempfile

    from losa.checkpoint import check_output_dir

    def refuse(*args, **kwargs):
        raise PermissionError("read-only file system")

    monkeypatch.setattr(_tempfile, "NamedTemporaryFile", refuse)
    with pytest.raises(OutputError, match="read-only"):
        check_output_dir(tmp_path / "out", overwrite=False)


def test_config_rejects_bad_device_dtype_and_training_settings(model_dirs):
    from losa.config import FinetuneConfig, LosaConfig, TrainConfig

    base = dict(model=str(model_dirs["llama"]), sparsity=0.5)
    with pytest.raises(ConfigError, match="dtype"):
        PruneConfig(**base, dtype="float8")
    with pytest.raises(ConfigError, match="device"):
        PruneConfig(**base, device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            api.evaluate(EvalConfig(model=str(model_dirs["llama"]), device="cuda"))
    with pytest.raises(ConfigError, match="lr_scheduler"):
        TrainConfig(lr_scheduler="sawtooth")
    with pytest.raises(ConfigError, match="optim"):
        TrainConfig(optim="sgd-ish")
    for bad in (dict(alpha=0), dict(beta=-1), dict(delta=0.7)):
        with pytest.raises(ConfigError):
            LosaConfig(**bad)
    with pytest.raises(ConfigError, match="dtype"):
        FinetuneConfig(**base, dtype="int4")


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "opt"])
def test_saved_pruned_model_reloads_to_the_in_memory_logits(tmp_path, tokenizer, arch):
    """A model pruned in memory, saved as safetensors and reloaded (plainly by transformers and by
    losa's loader), gives bit-identical float32 logits to the model before saving."""
    from transformers import AutoModelForCausalLM

    from losa.pruning.patterns import Pattern
    from losa.pruning.sequential import prune_model

    model = tiny_model(arch)
    calib = torch.randint(0, 200, (4, 16), generator=torch.Generator().manual_seed(0))
    prune_model(model, calib, method="wanda", pattern=Pattern.unstructured(0.5), batch_size=2)
    ids = torch.randint(0, 200, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(ids).logits
    model.save_pretrained(tmp_path, safe_serialization=True)
    tokenizer.save_pretrained(tmp_path)

    plain = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ours, _ = load_model(tmp_path)
    for reloaded in (plain, ours):
        assert next(reloaded.parameters()).dtype == torch.float32
        with torch.no_grad():
            assert torch.equal(reloaded(ids).logits, expected)
