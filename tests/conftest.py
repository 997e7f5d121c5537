"""Shared fixtures: tiny random-initialised models of every supported architecture (no downloads),
a small BPE tokenizer trained on the fly, and a text corpus to calibrate and evaluate on."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

# Tiny tensors: one thread is faster than two fighting over a shared CPU.
torch.set_num_threads(1)

WORDS = (
    "the model weight layer sparse prune token data train loss rank block mask value input output "
    "matrix error python function return list dict class module import value index query key and of "
    "to in is for with a an that this it on as by be are from at or not have which"
).split()


def synthetic_text(n_words: int, seed: int = 0) -> str:
    """Deterministic text with some structure (a first-order chain over a small vocabulary)."""
    rng = random.Random(seed)
    successors = {w: rng.sample(WORDS, 5) for w in WORDS}
    word, out = "the", []
    for i in range(n_words):
        out.append(word)
        word = rng.choice(successors[word]) if rng.random() < 0.85 else rng.choice(WORDS)
        if i % 17 == 16:
            out.append(".\n" if i % 5 == 0 else ".")
    return " ".join(out)


@pytest.fixture(scope="session")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text(synthetic_text(12000), encoding="utf-8")
    (path.parent / "eval.txt").write_text(synthetic_text(800, seed=1), encoding="utf-8")  # a small held-out text
    return path


@pytest.fixture(scope="session")
def tokenizer(text_file):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>", "<pad>"], show_progress=False)
    tok.train([str(text_file)], trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


def tiny_config(arch: str, vocab_size: int = 256, **overrides):
    """A 3-block config of ``arch``; ``overrides`` set or replace config fields (e.g. sliding windows)."""
    from transformers import LlamaConfig, MistralConfig, OPTConfig, Qwen2Config

    common = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    if arch == "llama":
        return LlamaConfig(**{**common, **overrides})
    if arch == "mistral":
        return MistralConfig(**{**common, "sliding_window": None, **overrides})
    if arch == "qwen2":
        return Qwen2Config(**{**common, **overrides})
    if arch == "opt":
        # bos_token_id: the test tokenizer's <s> (OPTConfig's default 2 is its </s>, a mismatch load_model refuses)
        opt = dict(vocab_size=vocab_size, hidden_size=32, ffn_dim=64, num_hidden_layers=3, num_attention_heads=4,
                   max_position_embeddings=128, word_embed_proj_dim=32, do_layer_norm_before=True, bos_token_id=1)
        return OPTConfig(**{**opt, **overrides})
    raise ValueError(arch)


ARCHS = ("llama", "mistral", "qwen2", "opt")


def tiny_model(arch: str, seed: int = 0, **overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **overrides))
    model.eval()
    return model


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory, tokenizer) -> dict[str, Path]:
    """A saved tiny checkpoint (safetensors + tokenizer) of every supported architecture."""
    root = tmp_path_factory.mktemp("models")
    dirs = {}
    for arch in ARCHS:
        d = root / arch
        model = tiny_model(arch)
        model.save_pretrained(d, safe_serialization=True)
        tokenizer.save_pretrained(d)
        dirs[arch] = d
    return dirs


# ---------------------------------------------------------------- shared by the CLI / run-config / zero-shot tests

ZEROSHOT_DIR = Path(__file__).parent / "data" / "zeroshot"
TOY_DATA = "tests/data/zeroshot/toy_mc.jsonl"  # the toy task YAML's data_files: relative to the repository root


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and lose a lot on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def restore_logging():
    """losa.cli.main configures logging to the (captured) stderr; put the root logger back afterwards."""
    import logging

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    """The toy zero-shot task copied to a temp dir with its data_files made absolute (works from any cwd)."""
    import shutil

    d = tmp_path_factory.mktemp("zeroshot_tasks")
    shutil.copy(ZEROSHOT_DIR / "toy_mc.jsonl", d / "toy_mc.jsonl")
    yaml_text = (ZEROSHOT_DIR / "losa_toy_mc.yaml").read_text()
    assert f"test: {TOY_DATA}" in yaml_text
    (d / "losa_toy_mc.yaml").write_text(yaml_text.replace(f"test: {TOY_DATA}", f"test: {d / 'toy_mc.jsonl'}"))
    return d
