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


def _is_slice(window: list[int], ids: list[int]) -> bool:
    return any(ids[i : i + len(window)] == window for i in range(len(ids) - len(window) + 1))


def test_document_windows_come_each_from_one_long_document(tokenizer):
    from losa.data import sample_document_windows

    words = "the model prunes weights and the data trains adapters".split()
    rng = torch.Generator().manual_seed(0)  # each document its own random word order: windows are unique to it
    long_docs = [" ".join(words[k] for k in torch.randint(len(words), (40 + 7 * i,), generator=rng).tolist())
                 for i in range(6)]
    docs = ["short text", *long_docs, "tiny"]
    encoded = [tokenizer(d, add_special_tokens=False)["input_ids"] for d in docs]
    a = sample_document_windows(tokenizer, docs, 5, 16, seed=1)
    assert a.shape == (5, 16)
    assert torch.equal(a, sample_document_windows(tokenizer, docs, 5, 16, seed=1))
    sources = []
    for w in a.tolist():  # a contiguous piece of one document that is longer than the window
        matches = [k for k, ids in enumerate(encoded) if len(ids) > 16 and _is_slice(w, ids)]
        assert matches
        sources.append(matches[0])
    assert len(set(sources)) == 5  # one window per document
    with pytest.raises(DataError, match="longer than 16 tokens, fewer than nsamples = 7"):
        sample_document_windows(tokenizer, docs, 7, 16, seed=1)


def test_c4_follows_the_wanda_sparsegpt_protocol(tokenizer, monkeypatch):
    """Offline, with datasets.load_dataset replaced by local records: calibration windows never
    straddle two documents, and perplexity uses the first 1100 validation documents joined by
    spaces, at most 256 windows."""
    import datasets

    from losa.data import C4_EVAL_WINDOWS, calibration_ids, evaluation_ids

    docs = [f"document {i} " + "the data trains adapters " * (3 + i % 5) for i in range(1200)]
    calls = []

    def fake_load_dataset(path, data_files=None, split=None, **kw):
        calls.append((path, data_files, split))
        return datasets.Dataset.from_dict({"text": docs})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    windows = evaluation_ids(tokenizer, "c4", 4)
    expected = contiguous_windows(tokenize_documents(tokenizer, [" ".join(docs[:1100])]), 4)
    assert len(expected) > C4_EVAL_WINDOWS == 256
    assert torch.equal(windows, expected[:256])
    assert calls[-1][0] == "allenai/c4" and "validation" in next(iter(calls[-1][1].values()))
    calib = calibration_ids(tokenizer, "c4", 8, 12, seed=0)
    encoded = [tokenizer(d, add_special_tokens=False)["input_ids"] for d in docs]
    assert calib.shape == (8, 12)
    assert all(any(_is_slice(w, ids) for ids in encoded) for w in calib.tolist())
    assert "train" in next(iter(calls[-1][1].values()))


def test_instruction_samples_end_in_eos_from_jsonl_and_from_the_hub(tokenizer, tmp_path, monkeypatch):
    """Alpaca records from a local jsonl and from alpaca-gpt4 (datasets.load_dataset replaced by the
    same records) give the same samples: prompt + response + EOS, truncated to seqlen."""
    import datasets

    from losa.train import training_samples

    records = [{"instruction": f"Name the model {i}.", "input": "", "output": "the data " * (1 + i)} for i in range(6)]
    path = tmp_path / "alpaca.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: datasets.Dataset.from_dict(
        {key: [r[key] for r in records] for key in records[0]}))
    local = training_samples(tokenizer, f"jsonl:{path}", 6, 64, seed=0)
    hub = training_samples(tokenizer, "alpaca-gpt4", 6, 64, seed=0)
    assert local == hub
    assert all(s[-1] == tokenizer.eos_token_id and len(s) <= 64 for s in local)
    expected = {tuple(tokenizer("".join(format_alpaca(r)), add_special_tokens=False)["input_ids"][:63]) for r in records}
    assert {tuple(s[:-1]) for s in local} == expected
