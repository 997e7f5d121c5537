import json

import pytest
import torch

from losa.data import (DataSpec, contiguous_windows, format_alpaca, load_documents, sample_windows,
                       tokenize_documents)
from losa.errors import DataError


def test_specs(tmp_path, text_file):
    assert DataSpec.parse(f"text:{text_file}").kind == "text"
    assert DataSpec.parse(str(text_file)).kind == "text"
    j = tmp_path / "a.jsonl"
    j.write_text(json.dumps({"text": "hello"}) + "\n")
    assert DataSpec.parse(str(j)).kind == "jsonl"
    assert DataSpec.parse("c4").kind == "c4"
    with pytest.raises(DataError, match="does not exist"):
        DataSpec.parse("text:/no/such/file.txt")


def test_directory_and_jsonl_documents(tmp_path):
    d = tmp_path / "docs"
    d.mkdir()
    (d / "b.txt").write_text("second")
    (d / "a.txt").write_text("first")
    assert load_documents(f"text:{d}") == ["first", "second"]
    j = tmp_path / "alpaca.jsonl"
    j.write_text(json.dumps({"instruction": "Add.", "input": "1 2", "output": "3"}) + "\n"
                 + json.dumps({"instruction": "Say hi.", "output": "hi"}) + "\n")
    docs = load_documents(f"jsonl:{j}")
    assert "### Instruction:\nAdd.\n\n### Input:\n1 2\n\n### Response:\n3" in docs[0]
    assert "### Input" not in docs[1] and docs[1].endswith("### Response:\nhi")


def test_bad_jsonl(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match="no records"):
        load_documents(f"jsonl:{empty}")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(DataError, match="broken.jsonl:2"):
        load_documents(f"jsonl:{broken}")
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text('{"title": "x"}\n')
    with pytest.raises(DataError, match="'text' field"):
        load_documents(f"jsonl:{wrong}")


def test_hub_dataset_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError, match="text:PATH"):
        load_documents("wikitext2", "eval")


def test_sampling_is_deterministic_and_distinct():
    tokens = torch.arange(1000)
    a = sample_windows(tokens, 10, 50, seed=3)
    b = sample_windows(tokens, 10, 50, seed=3)
    c = sample_windows(tokens, 10, 50, seed=4)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (10, 50)
    assert len({int(w[0]) for w in a}) == 10  # distinct windows
    assert all(torch.equal(w, torch.arange(int(w[0]), int(w[0]) + 50)) for w in a)  # contiguous text
    with pytest.raises(DataError, match="fewer than nsamples x seqlen"):
        sample_windows(tokens, 30, 50, seed=0)


def test_contiguous_windows_cover_text_in_order():
    w = contiguous_windows(torch.arange(105), 10)
    assert w.shape == (10, 10) and torch.equal(w.flatten(), torch.arange(100))


def test_tokenize_joins_documents_with_eos(tokenizer):
    ids = tokenize_documents(tokenizer, ["the model", "the data"])
    assert (ids == tokenizer.eos_token_id).sum() == 1


def test_alpaca_format_without_input():
    prompt, response = format_alpaca({"instruction": "x", "output": "y"})
    assert prompt.endswith("### Response:\n") and response == "y"
