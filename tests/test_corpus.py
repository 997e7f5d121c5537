"""Tests of the offline corpus (splitting, extraction) and of the committed reference model."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from losa.errors import DataError
from losa.reference import corpus
from losa.reference.corpus import Document, docstrings_and_comments, normalize_text, split_documents, split_of
from losa.reference.train import eval_perplexity, magnitude_prune_, unigram_perplexity

REPO = Path(__file__).resolve().parents[1]


def synthetic_documents(n: int = 400) -> list[Document]:
    return [Document(f"doc/{i:04d}.txt", f"text of document {i}\n" * (1 + i % 7)) for i in range(n)]


def test_split_is_a_partition_without_overlap():
    docs = synthetic_documents()
    splits = split_documents(docs, seed=0)
    assert set(splits) == set(corpus.SPLIT_FRACTIONS)
    ids_per_split = [{d.doc_id for d in split} for split in splits.values()]
    assert sum(len(ids) for ids in ids_per_split) == len(docs)
    assert set().union(*ids_per_split) == {d.doc_id for d in docs}
    for i, a in enumerate(ids_per_split):
        for b in ids_per_split[i + 1 :]:
            assert not a & b


def test_split_is_deterministic_and_independent_of_input_order():
    docs = synthetic_documents()
    first = split_documents(docs, seed=3)
    shuffled = [docs[i] for i in torch.randperm(len(docs), generator=torch.Generator().manual_seed(0))]
    again = split_documents(shuffled, seed=3)
    assert first == again
    # each document's split depends on its own id only: adding documents moves nobody
    bigger = split_documents(docs + [Document("extra/a", "new"), Document("extra/b", "new")], seed=3)
    for name in first:
        assert [d for d in bigger[name] if not d.doc_id.startswith("extra/")] == first[name]


def test_split_depends_on_seed_and_follows_fractions():
    docs = synthetic_documents(4000)
    a = {d.doc_id: split_of(d.doc_id, 0) for d in docs}
    b = {d.doc_id: split_of(d.doc_id, 1) for d in docs}
    assert sum(a[i] != b[i] for i in a) > 0.2 * len(docs)
    splits = split_documents(docs, seed=0)
    for name, fraction in corpus.SPLIT_FRACTIONS.items():
        observed = len(splits[name]) / len(docs)
        # binomial standard deviation is at most 0.008 for n=4000: 5 sigma
        assert abs(observed - fraction) < 0.04, (name, observed)


def test_split_rejects_duplicate_ids_and_bad_fractions():
    with pytest.raises(DataError, match="duplicate"):
        split_documents([Document("a", "x"), Document("a", "y")], seed=0)
    with pytest.raises(DataError, match="sum to 1"):
        split_documents([Document("a", "x")], seed=0, fractions={"train": 0.5, "eval": 0.4})


def test_normalize_text():
    assert normalize_text("a  \r\nb\t\n\n\n\nc\n\n") == "a\nb\n\nc"


def test_docstrings_and_comments_in_source_order():
    source = '''"""Module doc."""
# first comment
# continues
def f():
    """Function doc."""
    x = 1  # trailing remark
    return x

class C:
    """Class doc."""
'''
    text = docstrings_and_comments(source)
    assert text == "Module doc.\n\nfirst comment\ncontinues\n\nFunction doc.\n\ntrailing remark\n\nClass doc."


def test_missing_apt_raises_data_error(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus.shutil, "which", lambda name: None)
    with pytest.raises(DataError, match="--deb-dir"):
        corpus.fetch_debian_package("python3.11-doc", tmp_path)


class FakeApt:
    """Stands in for apt-get: ``available`` versions per package; records every command."""

    def __init__(self, available: dict[str, list[str]]):
        self.available = available
        self.commands: list[list[str]] = []

    def __call__(self, cmd, cwd=None, **kwargs):
        import subprocess

        self.commands.append(list(cmd))
        if cmd[:2] == ["apt-get", "update"]:
            return subprocess.CompletedProcess(cmd, 0, "", "")
        package, _, version = cmd[2].partition("=")
        versions = self.available.get(package, [])
        if not versions or (version and version not in versions):
            return subprocess.CompletedProcess(cmd, 100, "", f"E: Version '{version}' for '{package}' was not found")
        (Path(cwd) / f"{package}_{version or versions[-1]}_all.deb").write_bytes(b"deb")
        return subprocess.CompletedProcess(cmd, 0, "", "")


def test_debian_packages_are_fetched_at_the_pinned_version(tmp_path, monkeypatch, caplog):
    version = corpus.PINNED_DEBIAN_PACKAGES["python3.11-doc"][0]
    apt = FakeApt({"python3.11-doc": [version, "3.11.2-6+deb12u9"]})
    monkeypatch.setattr(corpus.shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(corpus.subprocess, "run", apt)
    with caplog.at_level("WARNING", logger="losa.reference.corpus"):
        deb = corpus.fetch_debian_package("python3.11-doc", tmp_path)
    assert deb.name == f"python3.11-doc_{version}_all.deb"
    assert apt.commands == [["apt-get", "download", f"python3.11-doc={version}"]]
    assert not caplog.records
    # reused on the next build, without apt
    assert corpus.fetch_debian_package("python3.11-doc", tmp_path) == deb and len(apt.commands) == 1


def test_unavailable_pinned_version_falls_back_with_a_warning(tmp_path, monkeypatch, caplog):
    apt = FakeApt({"perl-doc": ["5.36.0-7+deb12u9"]})  # the mirror moved on to a newer point release
    monkeypatch.setattr(corpus.shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(corpus.subprocess, "run", apt)
    with caplog.at_level("WARNING", logger="losa.reference.corpus"):
        deb = corpus.fetch_debian_package("perl-doc", tmp_path)
    pinned = corpus.PINNED_DEBIAN_PACKAGES["perl-doc"][0]
    assert deb.name == "perl-doc_5.36.0-7+deb12u9_all.deb"
    assert apt.commands == [["apt-get", "download", f"perl-doc={pinned}"], ["apt-get", "update"],
                            ["apt-get", "download", f"perl-doc={pinned}"], ["apt-get", "download", "perl-doc"]]
    message = " ".join(r.getMessage() for r in caplog.records)
    assert f"pinned version {pinned} of perl-doc is not available" in message and "snapshot.debian.org" in message
    caplog.clear()
    with caplog.at_level("WARNING", logger="losa.reference.corpus"):  # a non-pinned .deb already there: used, warned
        assert corpus.fetch_debian_package("perl-doc", tmp_path) == deb
    assert "not the pinned version" in caplog.text


def test_sources_and_split_hashes_are_checked_against_the_pins(caplog):
    version, sha256 = corpus.PINNED_DEBIAN_PACKAGES["perl-doc"]
    pinned_sources = {"debian": {"perl-doc": {"version": version, "sha256": sha256}},
                      "python_stdlib": {"python": corpus.PINNED_PYTHON}}
    with caplog.at_level("WARNING", logger="losa.reference.corpus"):
        assert corpus.check_sources(pinned_sources) == []
        assert corpus.check_split_hashes(dict(corpus.EXPECTED_SPLIT_SHA256)) == []
    assert not caplog.records
    other = {"debian": {"perl-doc": {"version": version, "sha256": "0" * 64}}, "python_stdlib": {"python": "3.12.1"}}
    with caplog.at_level("WARNING", logger="losa.reference.corpus"):
        differing = corpus.check_sources(other)
        assert corpus.check_split_hashes({**corpus.EXPECTED_SPLIT_SHA256, "eval": "f" * 64}) == ["eval"]
        assert corpus.check_split_hashes({"eval": "f" * 64}, seed=1) == []  # other seeds have no expected hashes
    assert len(differing) == 2 and "sha256" in differing[0] and "Python 3.12.1" in differing[1]
    assert "split(s) eval" in caplog.text and "not comparable" in caplog.text


@pytest.mark.skipif(not (REPO / "data" / "corpus" / "manifest.json").is_file(), reason="corpus not built")
def test_pins_match_the_built_corpus():
    """The pins are those of data/corpus (the corpus behind the committed benchmark numbers)."""
    import json

    manifest = json.loads((REPO / "data" / "corpus" / "manifest.json").read_text())
    assert {n: s["sha256"] for n, s in manifest["splits"].items()} == corpus.EXPECTED_SPLIT_SHA256
    assert {p: (s["version"], s["sha256"]) for p, s in manifest["sources"]["debian"].items()} == corpus.PINNED_DEBIAN_PACKAGES
    assert manifest["sources"]["python_stdlib"]["python"] == corpus.PINNED_PYTHON


def test_build_corpus_warns_when_splits_differ(tmp_path, monkeypatch, caplog):
    import json

    docs = synthetic_documents(200)
    sources = {"debian": {}, "python_stdlib": {"python": corpus.PINNED_PYTHON, "documents": len(docs)}}
    monkeypatch.setattr(corpus, "collect_documents", lambda work, debs, progress=None: (docs, sources))
    (tmp_path / "out" / "_unpacked").mkdir(parents=True)
    with caplog.at_level("WARNING", logger="losa.reference.corpus"):
        manifest = corpus.build_corpus(tmp_path / "out", vocab_size=300, check_sizes=False)
    assert manifest["reproducibility"]["splits_differing_from_expected_sha256"] == sorted(corpus.SPLIT_FRACTIONS)
    assert "not comparable" in caplog.text
    written = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert written["reproducibility"] == manifest["reproducibility"]
    assert sum(s["documents"] for s in written["splits"].values()) == len(docs)


def test_corpus_main_takes_quiet_and_verbose(monkeypatch, tmp_path):
    import losa.log

    calls = []
    monkeypatch.setattr(losa.log, "setup_logging", lambda verbose=0, quiet=False: calls.append((verbose, quiet)))
    monkeypatch.setattr(corpus, "build_corpus", lambda *a, **k: {"splits": {}})
    assert corpus.main(["--out", str(tmp_path), "--quiet"]) == 0
    assert corpus.main(["--out", str(tmp_path), "-vv"]) == 0
    assert calls == [(0, True), (2, False)]

    def fail(*a, **k):
        raise DataError("no sources")

    monkeypatch.setattr(corpus, "build_corpus", fail)
    assert corpus.main(["--out", str(tmp_path), "-q"]) == 2


def test_unigram_perplexity_matches_brute_force():
    train = torch.tensor([0, 0, 1, 2, 2, 2])
    held_out = torch.tensor([0, 2, 3])
    vocab = 4
    counts = [2 + 1, 1 + 1, 3 + 1, 0 + 1]  # add-one smoothing
    probs = [c / sum(counts) for c in counts]
    expected = math.exp(-sum(math.log(probs[t]) for t in held_out.tolist()) / len(held_out))
    assert unigram_perplexity(train, held_out, vocab) == pytest.approx(expected, rel=1e-9)


def tiny_llama(vocab_size: int = 32):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16,
    )
    return LlamaForCausalLM(config).eval()


def test_eval_perplexity_uses_non_overlapping_windows():
    model = tiny_llama()
    ids = torch.randint(0, 32, (3 * 8 + 5,), generator=torch.Generator().manual_seed(0))
    nll, count = 0.0, 0
    with torch.no_grad():
        for w in range(3):  # brute force: each window alone, the ragged tail of 5 dropped
            window = ids[w * 8 : (w + 1) * 8]
            logits = model(input_ids=window[None]).logits[0]
            log_probs = logits.log_softmax(-1)
            nll -= sum(log_probs[i, window[i + 1]].item() for i in range(7))
            count += 7
    assert eval_perplexity(model, ids, seq_len=8, batch_size=2) == pytest.approx(math.exp(nll / count), rel=1e-5)


def test_magnitude_prune_hits_the_sparsity_and_keeps_the_largest():
    model = tiny_llama()
    proj = model.model.layers[0].mlp.down_proj.weight
    original = proj.detach().clone()
    magnitude_prune_(model, 0.7)
    for module in model.model.layers[0].modules():
        if isinstance(module, torch.nn.Linear):
            assert (module.weight == 0).float().mean().item() == pytest.approx(0.7, abs=0.02)
    kept = proj != 0
    assert original.abs()[kept].min() >= original.abs()[~kept].max()


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_reference_model_loads_with_plain_transformers(arch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = REPO / "models" / f"reference-{arch}"
    assert (model_dir / "model.safetensors").is_file(), f"models/reference-{arch} is committed"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    assert model.config.model_type == arch
    for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
        assert getattr(tokenizer, name) is not None
    ids = tokenizer("The list type supports slicing.", return_tensors="pt")["input_ids"]
    assert tokenizer.decode(ids[0]) == "The list type supports slicing."
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], len(tokenizer))
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_reference_configs_build_models_the_pruning_registry_knows(arch):
    from types import SimpleNamespace

    from transformers import AutoModelForCausalLM

    from losa.models.registry import architecture_of
    from losa.reference.train import TrainConfig, reference_config

    tokenizer = SimpleNamespace(bos_token_id=1, eos_token_id=2, pad_token_id=0)
    cfg = TrainConfig(arch=arch, hidden_size=32, intermediate_size=48, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4)
    model = AutoModelForCausalLM.from_config(reference_config(cfg, 100, tokenizer))
    assert model.config.model_type == arch
    assert len(architecture_of(model).blocks(model)) == 2
    magnitude_prune_(model, 0.5)
    for block in architecture_of(model).blocks(model):
        for linear in architecture_of(model).linears(block).values():
            assert (linear.weight == 0).float().mean().item() == pytest.approx(0.5, abs=0.02)


def test_unknown_reference_architecture_is_a_config_error():
    from types import SimpleNamespace

    from losa.errors import ConfigError
    from losa.reference.train import TrainConfig, reference_config

    with pytest.raises(ConfigError, match="llama.*opt"):
        reference_config(TrainConfig(arch="gpt2"), 100, SimpleNamespace(bos_token_id=1, eos_token_id=2, pad_token_id=0))


def test_reference_report_regeneration_keeps_hand_written_notes(tmp_path):
    import json

    from losa.reference.train import write_report

    (tmp_path / "config.json").write_text(json.dumps({
        "architectures": ["OPTForCausalLM"], "hidden_size": 8, "num_hidden_layers": 1, "ffn_dim": 16,
        "num_attention_heads": 2, "vocab_size": 10, "max_position_embeddings": 8}))
    results = {"dense_ppl": 1.5, "unigram_ppl": 9.0, "sparsity": 0.7, "magnitude_pruned_ppl": 3.0, "eval_tokens": 5}
    report = tmp_path / "report.md"
    report.write_text("stale numbers\n\n## Notes\n\n- written by hand\n")
    for _ in range(2):
        write_report(report, tmp_path, results, ["python -m losa.reference.train --arch opt"])
    text = report.read_text()
    assert "stale numbers" not in text and "| dense model | 1.50 |" in text and "`OPTForCausalLM`" in text
    assert text.count("## Notes") == 1 and text.rstrip().endswith("- written by hand")


def test_reference_training_resumes_to_the_same_model(tmp_path, monkeypatch):
    """An interrupted training run, rerun, continues from its checkpoint and ends with the same
    weights as an uninterrupted run (optimiser, schedule and sampler state are all restored)."""
    import shutil

    from safetensors.torch import load_file

    from losa.reference import train as ref

    corpus = tmp_path / "corpus"
    (corpus / "tokenizer").mkdir(parents=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(REPO / "models" / "reference-llama" / name, corpus / "tokenizer" / name)
    (corpus / "train.txt").write_text("The list type supports slicing and sorting of its items.\n" * 40)
    cfg = ref.TrainConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, seq_len=16,
                          batch_size=2, max_steps=4, warmup_steps=1, checkpoint_every=2, bf16_autocast=False)
    ref.train_reference_model(corpus, tmp_path / "straight", cfg, tmp_path / "ckpt-straight")

    real_save = ref.save_checkpoint

    def save_then_stop(*args, **kwargs):
        real_save(*args, **kwargs)
        raise KeyboardInterrupt  # the machine goes away right after the first checkpoint

    monkeypatch.setattr(ref, "save_checkpoint", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        ref.train_reference_model(corpus, tmp_path / "resumed", cfg, tmp_path / "ckpt-resumed")
    monkeypatch.setattr(ref, "save_checkpoint", real_save)
    info = ref.train_reference_model(corpus, tmp_path / "resumed", cfg, tmp_path / "ckpt-resumed")

    straight = load_file(tmp_path / "straight" / "model.safetensors")
    resumed = load_file(tmp_path / "resumed" / "model.safetensors")
    assert straight.keys() == resumed.keys()
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key
    assert info["tokens_seen"] == 4 * 2 * 16
    # wall time accumulates over the segments of a resumed run
    assert ref.load_checkpoint(tmp_path / "ckpt-resumed" / ref.CHECKPOINT_NAME)["elapsed"] > 0
    assert not list((tmp_path / "ckpt-resumed").glob("*.pt"))  # nothing pickled


def test_reference_checkpoint_round_trips_without_pickle(tmp_path, monkeypatch):
    """Model (tied embeddings too), AdamW, schedule and sampler state come back exactly, and reading
    the checkpoint never goes through torch.load (pickle)."""
    from types import SimpleNamespace

    from transformers import AutoModelForCausalLM, get_cosine_with_min_lr_schedule_with_warmup

    from losa.reference import train as ref

    cfg = ref.TrainConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, seq_len=8)
    tokenizer = SimpleNamespace(bos_token_id=1, eos_token_id=2, pad_token_id=0)

    def build():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(ref.reference_config(cfg, 40, tokenizer))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
        return model, optimizer, get_cosine_with_min_lr_schedule_with_warmup(optimizer, 1, 10, min_lr_rate=0.1)

    model, optimizer, scheduler = build()
    generator = torch.Generator().manual_seed(5)
    for _ in range(2):
        batch = torch.randint(0, 40, (2, 8), generator=generator)
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        scheduler.step()
    path = tmp_path / ref.CHECKPOINT_NAME
    ref.save_checkpoint(path, model, optimizer, scheduler, 2, generator, 1.5)
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load (pickle) called"))
    state = ref.load_checkpoint(path)
    fresh, fresh_optimizer, fresh_scheduler = build()
    fresh.load_state_dict(state["model"])
    fresh_optimizer.load_state_dict(state["optimizer"])
    fresh_scheduler.load_state_dict(state["scheduler"])
    assert state["step"] == 2 and state["elapsed"] == 1.5
    assert torch.equal(state["generator"], generator.get_state())
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values()):
        assert torch.equal(a, b)
    assert fresh_scheduler.state_dict() == scheduler.state_dict()
    saved, loaded = optimizer.state_dict(), fresh_optimizer.state_dict()
    assert saved["param_groups"] == loaded["param_groups"]
    for index, entries in saved["state"].items():
        assert entries.keys() == loaded["state"][index].keys()
        for key, value in entries.items():
            assert torch.equal(value, loaded["state"][index][key]), (index, key)


def test_legacy_pickled_reference_checkpoint_is_refused(tmp_path, monkeypatch):
    from losa.reference import train as ref

    corpus = tmp_path / "corpus"
    (corpus / "tokenizer").mkdir(parents=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (corpus / "tokenizer" / name).write_bytes((REPO / "models" / "reference-llama" / name).read_bytes())
    (corpus / "train.txt").write_text("The list type supports slicing and sorting of its items.\n" * 40)
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "checkpoint.pt").write_bytes(b"not to be unpickled")
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load (pickle) called"))
    cfg = ref.TrainConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, seq_len=16,
                          batch_size=2, max_steps=2, warmup_steps=1, bf16_autocast=False)
    with pytest.raises(DataError, match="--allow-pickle"):
        ref.train_reference_model(corpus, tmp_path / "out", cfg, tmp_path / "ckpt")


def test_reference_train_main_takes_quiet_and_verbose(monkeypatch, tmp_path):
    import losa.log
    from losa.reference import train as ref

    calls = []
    monkeypatch.setattr(losa.log, "setup_logging", lambda verbose=0, quiet=False: calls.append((verbose, quiet)))
    monkeypatch.setattr(ref, "evaluate_reference_model", lambda *a, **k: {"dense_ppl": 1.0})
    args = ["--eval-only", "--out", str(tmp_path), "--threads", "1"]
    assert ref.main([*args, "-q"]) == 0
    assert ref.main([*args, "--verbose"]) == 0
    assert calls == [(0, True), (1, False)]
