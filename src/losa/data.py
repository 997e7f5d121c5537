"""Text sources, tokenisation and deterministic sampling of token windows.

A data spec is one string:
  ``text:PATH``   a UTF-8 text file, or a directory of ``*.txt`` files (sorted, joined by blank lines)
  ``jsonl:PATH``  one JSON object per line: ``{"text": ...}`` or Alpaca ``instruction/input/output``
  ``wikitext2``, ``c4``, ``alpaca-gpt4``  the paper's hub datasets through ``datasets.load_dataset``
                  (needs network)
  ``PATH``        shorthand for ``text:PATH`` (``jsonl:`` if it ends in .jsonl)
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from losa.errors import DataError

log = logging.getLogger(__name__)

HUB_DATASETS = ("wikitext2", "c4", "alpaca-gpt4")
# C4 in the Wanda / SparseGPT protocol: perplexity on the first 1100 validation documents, 256 windows
C4_EVAL_DOCUMENTS, C4_EVAL_WINDOWS = 1100, 256

ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


@dataclass(frozen=True)
class DataSpec:
    kind: str  # "text", "jsonl" or a hub dataset name
    path: Path | None = None

    @classmethod
    def parse(cls, spec: str) -> "DataSpec":
        if not isinstance(spec, str) or not spec.strip():
            raise DataError("empty data spec: use text:PATH, jsonl:PATH, wikitext2 or c4")
        spec = spec.strip()
        if spec in HUB_DATASETS:
            return cls(spec)
        kind, sep, rest = spec.partition(":")
        if sep and kind in ("text", "jsonl"):
            path = Path(rest).expanduser()
        else:
            path = Path(spec).expanduser()
            kind = "jsonl" if path.suffix == ".jsonl" else "text"
        if not path.exists():
            raise DataError(
                f"data path {str(path)!r} does not exist (spec {spec!r}); "
                f"use text:PATH, jsonl:PATH or one of {', '.join(HUB_DATASETS)}"
            )
        return cls(kind, path)

    def __str__(self) -> str:
        return self.kind if self.path is None else f"{self.kind}:{self.path}"


def format_alpaca(record: dict) -> tuple[str, str]:
    """(prompt, response) in the Alpaca template."""
    instruction = str(record.get("instruction", "")).strip()
    extra = str(record.get("input", "") or "").strip()
    template = ALPACA_PROMPT if extra else ALPACA_PROMPT_NO_INPUT
    return template.format(instruction=instruction, input=extra), str(record.get("output", ""))


def read_jsonl(path: Path) -> list[dict]:
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg}); each line must be one JSON object") from None
            if not isinstance(obj, dict) or not ("text" in obj or "instruction" in obj):
                raise DataError(
                    f"{path}:{lineno}: each line needs a 'text' field or Alpaca 'instruction'/'input'/'output' fields"
                )
            records.append(obj)
    if not records:
        raise DataError(f"{path} holds no records; give a jsonl file with at least one JSON object per line")
    return records


def check_data_available(spec: str, split: str = "train") -> DataSpec:
    """Before the model is loaded: a local source exists, and a hub dataset is fetched now (into the
    datasets cache, which the later load reads), so an offline machine fails fast."""
    parsed = DataSpec.parse(spec)
    if parsed.kind in HUB_DATASETS:
        _load_hub(parsed.kind, split)
    return parsed


def load_documents(spec: str | DataSpec, split: str = "train") -> Sequence[str]:
    """The documents of a data source, in a deterministic order.

    ``split`` only matters for hub datasets (``train`` for calibration / training, ``eval`` for
    perplexity); local sources are used whole: split them into files yourself.
    """
    spec = spec if isinstance(spec, DataSpec) else DataSpec.parse(spec)
    if spec.kind in HUB_DATASETS:
        return _load_hub(spec.kind, split)
    if spec.kind == "jsonl":
        docs = []
        for rec in read_jsonl(spec.path):
            if "text" in rec:
                docs.append(str(rec["text"]))
            else:
                prompt, response = format_alpaca(rec)
                docs.append(prompt + response)
        return docs
    files = sorted(spec.path.rglob("*.txt")) if spec.path.is_dir() else [spec.path]
    if not files:
        raise DataError(f"directory {spec.path} holds no *.txt files")
    docs = []
    for file in files:
        try:
            docs.append(file.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise DataError(f"{file} is not UTF-8 text; convert it or point text: at a text file") from None
    if not any(d.strip() for d in docs):
        raise DataError(f"{spec} holds no text")
    return docs


def _load_hub(name: str, split: str) -> Sequence[str]:
    try:
        import datasets

        if name == "wikitext2":
            ds = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split="train" if split == "train" else "test")
            # the Wanda / SparseGPT protocol joins the lines with blank lines into one text
            return ["\n\n".join(ds["text"])]
        if name == "alpaca-gpt4":
            ds = datasets.load_dataset("vicgalle/alpaca-gpt4", split="train")
            return ["".join(format_alpaca(rec)) for rec in ds]
        files = {"train": "en/c4-train.00000-of-01024.json.gz", "eval": "en/c4-validation.00000-of-00008.json.gz"}
        ds = datasets.load_dataset("allenai/c4", data_files={split: files["train" if split == "train" else "eval"]}, split=split)
        if split == "train":
            return ds["text"]  # lazy in datasets >= 4: calibration reads only the documents it samples
        # the Wanda / SparseGPT protocol: the first 1100 validation documents joined by spaces (and
        # C4_EVAL_WINDOWS windows of them, see evaluation_ids)
        return [" ".join(ds.select(range(min(C4_EVAL_DOCUMENTS, len(ds))))["text"])]
    except Exception as e:  # network, hub and cache problems all end here
        raise DataError(
            f"could not load the hub dataset {name!r} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). "
            "It needs network access to the Hugging Face hub (or a warm datasets cache); "
            "offline, pass local data as text:PATH or jsonl:PATH"
        ) from None


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "sequence longer than model_max_length" is expected here
    try:
        return tokenizer(texts, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    finally:
        hf_logging.set_verbosity(verbosity)


def tokenize_documents(tokenizer, documents: Sequence[str]) -> torch.Tensor:
    """All documents tokenised and joined into one 1-D LongTensor, separated by EOS where defined."""
    encoded = _encode(tokenizer, list(documents))
    sep = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None and len(documents) > 1 else []
    ids: list[int] = []
    for i, doc in enumerate(encoded):
        if i and sep:
            ids.extend(sep)
        ids.extend(doc)
    return torch.tensor(ids, dtype=torch.long)


def _check_sampling(nsamples: int, seqlen: int) -> None:
    if nsamples < 1 or seqlen < 2:
        raise DataError(f"need nsamples >= 1 and seqlen >= 2, got nsamples={nsamples}, seqlen={seqlen}")


def sample_windows(tokens: torch.Tensor, nsamples: int, seqlen: int, seed: int, what: str = "calibration") -> torch.Tensor:
    """``nsamples`` distinct non-overlapping windows of ``seqlen`` tokens, chosen with ``seed``."""
    _check_sampling(nsamples, seqlen)
    available = tokens.numel() // seqlen
    if available < nsamples:
        raise DataError(
            f"{what} text has {tokens.numel():,} tokens, fewer than nsamples x seqlen = "
            f"{nsamples} x {seqlen} = {nsamples * seqlen:,}; give more text or lower --nsamples / --seqlen"
        )
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randperm(available, generator=gen)[:nsamples] * seqlen
    return torch.stack([tokens[s : s + seqlen] for s in starts.tolist()])


def contiguous_windows(tokens: torch.Tensor, seqlen: int) -> torch.Tensor:
    """Non-overlapping ``seqlen`` windows over the whole text (the Wanda / SparseGPT perplexity protocol)."""
    count = tokens.numel() // seqlen
    if count < 1:
        raise DataError(f"evaluation text has {tokens.numel()} tokens, fewer than one window of {seqlen}; lower --seqlen")
    return tokens[: count * seqlen].view(count, seqlen)


def sample_document_windows(tokenizer, documents: Sequence[str], nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """``nsamples`` windows of ``seqlen`` tokens, each from its own document longer than ``seqlen``
    tokens at a random offset (the Wanda / SparseGPT C4 calibration). Documents are tokenised one
    at a time in a seeded order, only until enough are found: a C4 shard is never tokenised whole."""
    _check_sampling(nsamples, seqlen)
    gen = torch.Generator().manual_seed(seed)
    windows = []
    for i in torch.randperm(len(documents), generator=gen).tolist():
        ids = _encode(tokenizer, [documents[i]])[0]
        if len(ids) <= seqlen:
            continue
        start = int(torch.randint(0, len(ids) - seqlen, (1,), generator=gen))
        windows.append(torch.tensor(ids[start : start + seqlen], dtype=torch.long))
        if len(windows) == nsamples:
            return torch.stack(windows)
    raise DataError(
        f"calibration data has {len(windows)} document(s) longer than {seqlen} tokens, fewer than "
        f"nsamples = {nsamples}; lower --nsamples / --seqlen or give more text"
    )


def calibration_ids(tokenizer, spec: str, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    parsed = DataSpec.parse(spec)
    documents = load_documents(parsed, "train")
    if parsed.kind == "c4":  # C4's documents are independent web pages: windows never straddle two
        return sample_document_windows(tokenizer, documents, nsamples, seqlen, seed)
    return sample_windows(tokenize_documents(tokenizer, documents), nsamples, seqlen, seed)


def evaluation_ids(tokenizer, spec: str, seqlen: int) -> torch.Tensor:
    parsed = DataSpec.parse(spec)
    windows = contiguous_windows(tokenize_documents(tokenizer, load_documents(parsed, "eval")), seqlen)
    return windows[:C4_EVAL_WINDOWS] if parsed.kind == "c4" else windows
