"""Zero-shot accuracy through lm-eval, checked against an independent brute-force scorer on a local task."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from losa.errors import ConfigError, DataError
from losa.zeroshot import PAPER_TASKS, zero_shot

from conftest import TOY_DATA, ZEROSHOT_DIR as DATA, tiny_model

TASK = "losa_toy_mc"


def docs() -> list[dict]:
    return [json.loads(line) for line in (DATA / "toy_mc.jsonl").read_text().splitlines()]


@torch.no_grad()
def brute_force(model, tokenizer, documents: list[dict]) -> tuple[list[list[float]], float, float]:
    """Summed log-likelihood of every choice given the prompt, one unpadded forward pass per choice.

    Mirrors the task YAML: prompt "Question: {q}\\nAnswer:", continuation " " + choice; the
    continuation's tokens are those of prompt + continuation after the prompt's own tokens.
    """
    model.eval()
    all_lls, hits, hits_norm = [], 0, 0
    for doc in documents:
        context = f"Question: {doc['question']}\nAnswer:"
        lls = []
        for choice in doc["choices"]:
            ctx_ids = tokenizer(context)["input_ids"]
            full_ids = tokenizer(context + " " + choice)["input_ids"]
            assert full_ids[: len(ctx_ids)] == ctx_ids
            logits = model(torch.tensor([full_ids])).logits[0].float()
            logprobs = torch.log_softmax(logits, dim=-1)
            cont = range(len(ctx_ids), len(full_ids))
            lls.append(sum(logprobs[i - 1, full_ids[i]].item() for i in cont))
        all_lls.append(lls)
        pred = max(range(len(lls)), key=lambda i: lls[i])
        pred_norm = max(range(len(lls)), key=lambda i: lls[i] / len(doc["choices"][i]))
        hits += pred == doc["label"]
        hits_norm += pred_norm == doc["label"]
    return all_lls, hits / len(documents), hits_norm / len(documents)


def check_against_brute_force(result: dict, model, tokenizer, documents: list[dict]) -> None:
    lls, acc, acc_norm = brute_force(model, tokenizer, documents)
    row = result["tasks"][TASK]
    assert row["samples"] == len(documents)
    per_doc = result["per_doc"][TASK]
    assert [d["doc_id"] for d in per_doc] == list(range(len(documents)))
    for mine, theirs, doc in zip(lls, per_doc, documents):
        assert theirs["target"] == doc["label"]
        assert theirs["loglikelihoods"] == pytest.approx(mine, abs=1e-4)
    # no near-ties, so the argmax decisions cannot depend on batching / padding round-off
    margins = [sorted(x)[-1] - sorted(x)[-2] for x in lls]
    assert min(margins) > 1e-3
    assert row["acc"] == acc
    assert row["acc_norm"] == acc_norm
    n = len(documents)
    assert row["acc_stderr"] == pytest.approx((acc * (1 - acc) / (n - 1)) ** 0.5)  # sample std / sqrt(n)
    assert result["mean_acc"] == acc and result["mean_acc_norm"] == acc_norm


def test_checkpoint_dir_matches_brute_force(model_dirs, tokenizer, task_dir):
    from transformers import AutoModelForCausalLM

    result = zero_shot(model_dirs["llama"], [TASK], include_path=task_dir, batch_size=4, return_samples=True)
    model = AutoModelForCausalLM.from_pretrained(model_dirs["llama"], dtype=torch.float32)
    check_against_brute_force(result, model, tokenizer, docs())
    assert result["num_fewshot"] == 0 and result["limit"] is None
    import lm_eval

    assert result["lm_eval_version"] == lm_eval.__version__
    assert set(result["timings_s"]) == {"tasks", "load", "evaluate"} and all(s >= 0 for s in result["timings_s"].values())
    assert "lora_adapter" not in result  # a plain checkpoint: no adapter


def test_pruned_in_memory_model_with_limit_matches_brute_force(tokenizer, task_dir):
    from losa.pruning.patterns import Pattern
    from losa.pruning.sequential import layer_sparsities, prune_model

    model = tiny_model("opt", seed=3)
    prune_model(model, None, method="magnitude", pattern=Pattern.nm(2, 4))
    assert all(row.sparsity == 0.5 for row in layer_sparsities(model))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = zero_shot(model, TASK, tokenizer=tokenizer, include_path=task_dir, limit=7, batch_size=3, return_samples=True)
    check_against_brute_force(result, model, tokenizer, docs()[:7])
    assert result["limit"] == 7
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # evaluation changes nothing


def test_bad_arguments(tokenizer, task_dir):
    with pytest.raises(ConfigError, match="tokenizer"):
        zero_shot(tiny_model("llama"), [TASK], include_path=task_dir)
    with pytest.raises(DataError, match="does not exist"):
        zero_shot(tiny_model("llama"), [TASK], tokenizer=tokenizer, include_path=task_dir / "nope")
    with pytest.raises(ConfigError, match="limit"):
        zero_shot(tiny_model("llama"), [TASK], tokenizer=tokenizer, include_path=task_dir, limit=0)
    with pytest.raises(ConfigError, match="no zero-shot tasks"):
        zero_shot(tiny_model("llama"), [], tokenizer=tokenizer)


def test_missing_local_data_file_is_a_data_error(tmp_path, tokenizer):
    yaml_text = (DATA / "losa_toy_mc.yaml").read_text()
    yaml_text = yaml_text.replace("losa_toy_mc", "losa_missing_data").replace(f"test: {TOY_DATA}", f"test: {tmp_path / 'gone.jsonl'}")
    (tmp_path / "missing.yaml").write_text(yaml_text)
    with pytest.raises(DataError, match="losa_missing_data"):
        zero_shot(tiny_model("llama"), ["losa_missing_data"], tokenizer=tokenizer, include_path=tmp_path)


def test_unknown_task_names_and_offline_paper_tasks(tokenizer, task_dir, monkeypatch):
    """Unknown names are named in a ConfigError; the paper's tasks offline give a DataError saying why."""
    import datasets
    import huggingface_hub

    with pytest.raises(ConfigError, match="no_such_task_xyz") as err:
        zero_shot(tiny_model("llama"), [TASK, "no_such_task_xyz", "arc_easy"], tokenizer=tokenizer, include_path=task_dir)
    assert "arc_easy" not in str(err.value).split("not in")[0]  # only the unknown name is reported
    # force offline mode (no network in this sandbox anyway; with network this keeps the test local)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert "boolq" in PAPER_TASKS
    with pytest.raises(DataError, match="Hugging Face Hub") as err:
        zero_shot(tiny_model("llama"), ["boolq"], tokenizer=tokenizer, include_path=task_dir)  # reuses the index
    assert "--include-path" in str(err.value)


def test_cli_eval_tasks_and_export(tmp_path, task_dir, model_dirs, capsys):
    """`losa eval --tasks` and `losa export` go through the same functions as the API."""
    import json as _json

    from losa.cli import main

    assert main(["eval", "--model", str(model_dirs["llama"]), "--tasks", "losa_toy_mc", "--include-path", str(task_dir),
                 "--limit", "4", "--json", "-q"]) == 0
    result = _json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert "perplexity" not in result and 0 <= result["zero_shot"]["mean_acc"] <= 1
    assert main(["eval", "--model", str(model_dirs["llama"]), "--tasks", "no_such_task_xyz", "--include-path", str(task_dir), "-q"]) == 2
    assert "no_such_task_xyz" in capsys.readouterr().err
    assert main(["export", "--model", str(model_dirs["llama"]), "--out", str(tmp_path / "ct"), "-q"]) == 0
    assert (tmp_path / "ct" / "config.json").exists()
    assert main(["export", "--model", str(model_dirs["llama"]), "--out", str(tmp_path / "ct"), "-q"]) == 2
    assert "--overwrite" in capsys.readouterr().err
