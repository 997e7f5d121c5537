"""Offline real-text corpus for the reference model, the demo, the tests and the benchmarks.

No pretrained LLM or hub dataset can be downloaded in this project, so the text comes from what a
package registry gives on a fresh machine: Debian's documentation packages and the running
Python's standard library. Sources (all English technical prose):

* ``python3.11-doc`` (Debian): the reST sources of the Python 3.11 documentation
  (``/usr/share/doc/python3.11/html/_sources/**/*.rst.txt``), one document per page;
* ``perl-doc`` (Debian): the POD manual pages of Perl 5 (``perl*.pod``), one document per page;
  ``perltoc`` (a table of contents) and ``perluniprops`` (property tables) are left out;
* the docstrings and comments of the running interpreter's standard library (``Lib/**/*.py``
  without tests and ``site-packages``), one document per module, in source order.

The two ``.deb`` files are fetched with ``apt-get download`` (running ``apt-get update`` once if the
package lists are missing) into ``<out>/_debs`` and unpacked with ``dpkg-deb -x``; ``--deb-dir`` uses
already downloaded ``.deb`` files instead. The package versions, their sha256 and the Python version
are recorded in ``manifest.json``: given those, the output is byte-identical on every run.

Documents are assigned to the splits ``train / calib / finetune / eval`` by a seeded sha256 of their
id (never by position), so a document lies in exactly one split and adding documents does not move
the others. A byte-level BPE tokenizer is trained on the train split and saved next to the splits
as a transformers ``PreTrainedTokenizerFast`` (``<out>/tokenizer``); token counts in the manifest
use it.

Usage::

    python -m losa.reference.corpus --out data/corpus
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import io
import json
import re
import shutil
import subprocess
import sys
import sysconfig
import tokenize
from pathlib import Path
from typing import NamedTuple

from losa.errors import DataError, LosaError, OutputError

SPLIT_FRACTIONS: dict[str, float] = {"train": 0.80, "calib": 0.04, "finetune": 0.08, "eval": 0.08}
DEFAULT_SEED = 0
DEFAULT_VOCAB_SIZE = 8192
DEBIAN_PACKAGES = ("python3.11-doc", "perl-doc")
SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
MIN_TRAIN_TOKENS = 5_000_000
MIN_EVAL_TOKENS = 200_000
PERL_POD_EXCLUDED = {"perltoc.pod", "perluniprops.pod"}
DOCUMENT_SEPARATOR = "\n\n"


class Document(NamedTuple):
    """One unit of splitting: a documentation page or a module's docstrings and comments."""

    doc_id: str
    text: str


# ----------------------------------------------------------------------------- splitting


def split_of(doc_id: str, seed: int, fractions: dict[str, float] = SPLIT_FRACTIONS) -> str:
    """Split name of one document: a seeded sha256 of its id mapped to [0, 1) against the
    cumulative split fractions (in the dict's order)."""
    digest = hashlib.sha256(f"{seed}:{doc_id}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    cumulative = 0.0
    for name, fraction in fractions.items():
        cumulative += fraction
        if u < cumulative:
            return name
    return next(reversed(fractions))  # rounding: fractions summing to 1 - eps


def split_documents(
    documents: list[Document], seed: int, fractions: dict[str, float] = SPLIT_FRACTIONS
) -> dict[str, list[Document]]:
    """Partition documents into splits by ``split_of``; each split is sorted by document id so the
    result does not depend on the input order."""
    if abs(sum(fractions.values()) - 1.0) > 1e-9 or any(f < 0 for f in fractions.values()):
        raise DataError(f"split fractions {fractions} must be non-negative and sum to 1")
    ids = [d.doc_id for d in documents]
    if len(set(ids)) != len(ids):
        duplicated = sorted({i for i in ids if ids.count(i) > 1})[:5]
        raise DataError(f"duplicate document ids {duplicated}: give every document a unique id")
    splits: dict[str, list[Document]] = {name: [] for name in fractions}
    for doc in sorted(documents):
        splits[split_of(doc.doc_id, seed, fractions)].append(doc)
    return splits


def normalize_text(text: str) -> str:
    """Unix newlines, no trailing spaces, at most one blank line in a row, no outer blank lines."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\t", "    ")
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", text).strip("\n")


def join_documents(documents: list[Document]) -> str:
    """The text of one split file: the documents separated by a blank line, ending in a newline."""
    return DOCUMENT_SEPARATOR.join(d.text for d in documents) + "\n"


# ----------------------------------------------------------------------------- sources


def fetch_debian_package(package: str, deb_dir: Path) -> Path:
    """Download ``package``'s .deb into ``deb_dir`` with ``apt-get download`` (reusing one already
    there); runs ``apt-get update`` once if apt does not know the package yet."""
    deb_dir.mkdir(parents=True, exist_ok=True)
    existing = sorted(deb_dir.glob(f"{package}_*.deb"))
    if existing:
        return existing[-1]
    if shutil.which("apt-get") is None:
        raise DataError(
            f"cannot fetch the Debian package {package}: apt-get is not available. Download "
            f"{package}_*.deb on a Debian/Ubuntu machine and pass its folder with --deb-dir"
        )
    for attempt in ("download", "update-then-download"):
        if attempt == "update-then-download":
            subprocess.run(["apt-get", "update"], capture_output=True, text=True)
        done = subprocess.run(
            ["apt-get", "download", package], cwd=deb_dir, capture_output=True, text=True
        )
        found = sorted(deb_dir.glob(f"{package}_*.deb"))
        if done.returncode == 0 and found:
            return found[-1]
    raise DataError(
        f"cannot fetch the Debian package {package} with apt-get download "
        f"({done.stderr.strip().splitlines()[-1] if done.stderr.strip() else 'no output'}). "
        f"Run `apt-get update` as root or pass a folder holding {package}_*.deb with --deb-dir"
    )


def unpack_deb(deb: Path, dest: Path) -> Path:
    """Unpack a .deb's file tree into ``dest`` (``dpkg-deb -x``) and return ``dest``."""
    if shutil.which("dpkg-deb") is None:
        raise DataError(f"cannot unpack {deb}: dpkg-deb is not available (install dpkg)")
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    done = subprocess.run(["dpkg-deb", "-x", str(deb), str(dest)], capture_output=True, text=True)
    if done.returncode != 0:
        raise DataError(f"cannot unpack {deb}: {done.stderr.strip()}; delete it and run again")
    return dest


def deb_version(deb: Path) -> str:
    """The Version field of a .deb."""
    done = subprocess.run(["dpkg-deb", "-f", str(deb), "Version"], capture_output=True, text=True)
    return done.stdout.strip()


def python_doc_documents(root: Path) -> list[Document]:
    """One document per page of the Python docs' reST sources under an unpacked python3.X-doc."""
    # the package ships one tree plus symlinks to it: keep each real file once
    pages = sorted({p.resolve() for p in root.glob("usr/share/doc/python3*/html/_sources/**/*.rst.txt")})
    if not pages:
        raise DataError(f"no reST sources found under {root}: is it an unpacked python3.X-doc?")
    docs = []
    for page in pages:
        sources = next(p for p in page.parents if p.name == "_sources")
        text = normalize_text(page.read_text(encoding="utf-8"))
        if text:
            docs.append(Document(f"python-doc/{page.relative_to(sources).as_posix()}", text))
    return docs


def perl_pod_documents(root: Path) -> list[Document]:
    """One document per Perl manual page (POD) under an unpacked perl-doc."""
    pods = sorted(p for p in root.glob("usr/share/perl/*/pod/*.pod") if p.name not in PERL_POD_EXCLUDED)
    if not pods:
        raise DataError(f"no POD pages found under {root}: is it an unpacked perl-doc?")
    docs = []
    for pod in pods:
        text = normalize_text(pod.read_text(encoding="utf-8", errors="replace"))
        if text:
            docs.append(Document(f"perl-doc/{pod.name}", text))
    return docs


def docstrings_and_comments(source: str) -> str:
    """The docstrings (module, class, function) and comments of Python source, in source order;
    consecutive comment lines form one paragraph."""
    pieces: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc and node.body:
                pieces.append((node.body[0].lineno, doc))
    comment_lines: list[tuple[int, str]] = []
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            text = token.string.lstrip("#").strip()
            if text and not text.startswith("!"):  # drop shebangs and empty markers
                comment_lines.append((token.start[0], text))
    paragraph: list[str] = []
    for i, (line, text) in enumerate(comment_lines):
        paragraph.append(text)
        is_last = i + 1 == len(comment_lines) or comment_lines[i + 1][0] != line + 1
        if is_last:
            pieces.append((line - len(paragraph) + 1, "\n".join(paragraph)))
            paragraph = []
    return "\n\n".join(text for _, text in sorted(pieces, key=lambda p: p[0]))


def stdlib_documents(stdlib: Path) -> list[Document]:
    """One document per standard-library module: its docstrings and comments (tests excluded)."""
    docs = []
    for path in sorted(stdlib.rglob("*.py")):
        parts = path.relative_to(stdlib).parts
        if parts[0] in {"site-packages", "test", "idlelib"} or "tests" in parts:
            continue
        try:
            text = normalize_text(docstrings_and_comments(path.read_text(encoding="utf-8")))
        except (SyntaxError, UnicodeDecodeError, tokenize.TokenError):
            continue  # a few stdlib files are deliberately broken (lib2to3 fixtures)
        if len(text) >= 200:
            docs.append(Document(f"stdlib/{path.relative_to(stdlib).as_posix()}", text))
    if not docs:
        raise DataError(f"no standard-library modules found under {stdlib}")
    return docs


# ----------------------------------------------------------------------------- tokenizer


def train_tokenizer(train_file: Path, vocab_size: int, out_dir: Path):
    """Train a byte-level BPE on ``train_file`` and save it to ``out_dir`` as a transformers
    PreTrainedTokenizerFast (no BOS/EOS are added automatically: text in, tokens out)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train([str(train_file)], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, model_max_length=256, **SPECIAL_TOKENS)
    fast.save_pretrained(out_dir)
    return fast


def count_tokens(tokenizer, text: str, chunk_chars: int = 1_000_000) -> int:
    """Number of tokens of ``text``, encoded in line-aligned chunks to bound memory."""
    total, start = 0, 0
    while start < len(text):
        end = text.find("\n", start + chunk_chars)
        end = len(text) if end == -1 else end + 1
        total += len(tokenizer(text[start:end], add_special_tokens=False)["input_ids"])
        start = end
    return total


# ----------------------------------------------------------------------------- build


def collect_documents(work_dir: Path, deb_dir: Path) -> tuple[list[Document], dict]:
    """Fetch and unpack the sources; return all documents and a description of the sources."""
    sources: dict = {"debian": {}, "python_stdlib": {}}
    documents: list[Document] = []
    readers = {"python3.11-doc": python_doc_documents, "perl-doc": perl_pod_documents}
    for package in DEBIAN_PACKAGES:
        deb = fetch_debian_package(package, deb_dir)
        docs = readers[package](unpack_deb(deb, work_dir / package))
        sources["debian"][package] = {
            "file": deb.name,
            "version": deb_version(deb),
            "sha256": hashlib.sha256(deb.read_bytes()).hexdigest(),
            "documents": len(docs),
        }
        documents += docs
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    docs = stdlib_documents(stdlib)
    sources["python_stdlib"] = {"python": sys.version.split()[0], "documents": len(docs)}
    documents += docs
    return documents, sources


def build_corpus(
    out_dir: Path,
    seed: int = DEFAULT_SEED,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    deb_dir: Path | None = None,
    check_sizes: bool = True,
) -> dict:
    """Write ``{train,calib,finetune,eval}.txt``, ``tokenizer/`` and ``manifest.json`` to
    ``out_dir`` and return the manifest."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(f"cannot create {out_dir}: {err}; choose a writable --out") from err
    deb_dir = deb_dir or out_dir / "_debs"
    documents, sources = collect_documents(out_dir / "_unpacked", deb_dir)
    splits = split_documents(documents, seed)
    texts = {name: join_documents(docs) for name, docs in splits.items()}
    for name, text in texts.items():
        (out_dir / f"{name}.txt").write_text(text, encoding="utf-8")
    shutil.rmtree(out_dir / "_unpacked")

    tokenizer = train_tokenizer(out_dir / "train.txt", vocab_size, out_dir / "tokenizer")
    manifest = {
        "seed": seed,
        "split_fractions": SPLIT_FRACTIONS,
        "sources": sources,
        "tokenizer": {"type": "byte-level BPE", "vocab_size": len(tokenizer), "path": "tokenizer"},
        "splits": {
            name: {
                "file": f"{name}.txt",
                "sha256": hashlib.sha256(texts[name].encode("utf-8")).hexdigest(),
                "documents": len(splits[name]),
                "characters": len(texts[name]),
                "tokens": count_tokens(tokenizer, texts[name]),
                "document_ids": [d.doc_id for d in splits[name]],
            }
            for name in splits
        },
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    if check_sizes:
        tokens = {name: manifest["splits"][name]["tokens"] for name in splits}
        if tokens["train"] < MIN_TRAIN_TOKENS or tokens["eval"] < MIN_EVAL_TOKENS:
            raise DataError(
                f"corpus too small ({tokens}); need {MIN_TRAIN_TOKENS} train and "
                f"{MIN_EVAL_TOKENS} eval tokens: check that the source packages are complete"
            )
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("data/corpus"), help="output folder")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="seed of the split hash")
    parser.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE)
    parser.add_argument("--deb-dir", type=Path, default=None, help="folder with the .deb files")
    args = parser.parse_args(argv)
    try:
        manifest = build_corpus(args.out, args.seed, args.vocab_size, args.deb_dir)
    except LosaError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for name, split in manifest["splits"].items():
        print(f"{name:9s} {split['documents']:5d} docs {split['tokens']:9d} tokens  {split['sha256']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
