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

The two ``.deb`` files are fetched with ``apt-get download PACKAGE=VERSION`` at the versions pinned in
``PINNED_DEBIAN_PACKAGES`` (running ``apt-get update`` once if the package lists are missing) into
``<out>/_debs`` and unpacked with ``dpkg-deb -x``; ``--deb-dir`` uses already downloaded ``.deb``
files instead. The package versions, their sha256 and the Python version are recorded in
``manifest.json``: given those, the output is byte-identical on every run.

The pins (``PINNED_DEBIAN_PACKAGES``, ``PINNED_PYTHON``) are the sources of the corpus behind the
committed benchmark numbers, and ``EXPECTED_SPLIT_SHA256`` the sha256 of its splits. Debian's mirrors
keep only the newest point release of a package, so when a pinned version cannot be fetched the build
warns and falls back to the version apt offers; a different .deb, a different Python (whose stdlib
docstrings are a source) or a split whose sha256 differs from the expected one is warned about, not an
error: the corpus is still usable, but numbers measured on it are not comparable with the committed
ones. The exact .deb files stay fetchable from https://snapshot.debian.org (pass their folder with
``--deb-dir``).

Documents are assigned to the splits ``train / calib / finetune / eval`` by a seeded sha256 of their
id (never by position), so a document lies in exactly one split and adding documents does not move
the others. A byte-level BPE tokenizer is trained on the train split and saved next to the splits
as a transformers ``PreTrainedTokenizerFast`` (``<out>/tokenizer``); token counts in the manifest
use it.

Usage::

    python -m losa.reference.corpus --out data/corpus

``-q/--quiet`` shows only warnings and errors (no progress bars), ``-v/--verbose`` adds debug messages.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import io
import json
import logging
import re
import shutil
import subprocess
import sys
import sysconfig
import tokenize
from pathlib import Path
from typing import NamedTuple

from tqdm import tqdm

from losa.errors import DataError, LosaError, OutputError

logger = logging.getLogger(__name__)

SPLIT_FRACTIONS: dict[str, float] = {"train": 0.80, "calib": 0.04, "finetune": 0.08, "eval": 0.08}
DEFAULT_SEED = 0
DEFAULT_VOCAB_SIZE = 8192
DEBIAN_PACKAGES = ("python3.11-doc", "perl-doc")
SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
MIN_TRAIN_TOKENS = 5_000_000
MIN_EVAL_TOKENS = 200_000
PERL_POD_EXCLUDED = {"perltoc.pod", "perluniprops.pod"}
DOCUMENT_SEPARATOR = "\n\n"

# The sources of the corpus behind the committed benchmark numbers: package -> (version, sha256 of the .deb)
PINNED_DEBIAN_PACKAGES: dict[str, tuple[str, str]] = {
    "python3.11-doc": ("3.11.2-6+deb12u8", "50eb63e7f636c4281e9ce1b8f10386f1def42159eddce34fc1f41c46261df71b"),
    "perl-doc": ("5.36.0-7+deb12u3", "e9e3564ff5ade27de0585835f2acad769bcc545c0a0045a9f55d5401f27f7591"),
}
PINNED_PYTHON = "3.11.7"  # the interpreter whose stdlib docstrings went into it
# sha256 of its split files (seed DEFAULT_SEED, SPLIT_FRACTIONS)
EXPECTED_SPLIT_SHA256: dict[str, str] = {
    "train": "83b78fe3f47f6b2556bbf5203ee1fb25b8202332d7b73604f922f3c2e326b606",
    "calib": "bbb580aefb091f42beed54de33b03c36a76322de16bf18f9ec0d23abef416437",
    "finetune": "261814f98a64e5fd704d4ca12ac188439045fe8b1a6bb9ee8e30c6c53cfac932",
    "eval": "3411eb858d576491112e856f49e2c13fe404b193f58f0c7d706641d1a4c1752f",
}


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


def _deb_file_version(version: str) -> str:
    """A version as apt-get download spells it in the file name (an epoch's colon becomes %3a)."""
    return version.replace(":", "%3a")


def fetch_debian_package(package: str, deb_dir: Path, version: str | None = None) -> Path:
    """Download ``package``'s .deb into ``deb_dir`` with ``apt-get download`` (reusing one already
    there); runs ``apt-get update`` once if apt does not know the package yet.

    ``version`` (default: the pin in ``PINNED_DEBIAN_PACKAGES``) is asked for exactly; when apt cannot
    get it (mirrors keep only the newest point release) the build warns and takes the version apt
    offers. A .deb of another version already in ``deb_dir`` is used, with a warning."""
    deb_dir.mkdir(parents=True, exist_ok=True)
    version = version or PINNED_DEBIAN_PACKAGES.get(package, (None, None))[0]
    if version:
        pinned = sorted(deb_dir.glob(f"{package}_{_deb_file_version(version)}_*.deb"))
        if pinned:
            return pinned[-1]
    existing = sorted(deb_dir.glob(f"{package}_*.deb"))
    if existing:
        if version:
            logger.warning(
                "using %s from %s, not the pinned version %s: the corpus will differ from the one behind the "
                "committed benchmark numbers", existing[-1].name, deb_dir, version,
            )
        return existing[-1]
    if shutil.which("apt-get") is None:
        raise DataError(
            f"cannot fetch the Debian package {package}: apt-get is not available. Download "
            f"{package}_{version or '*'}_*.deb on a Debian/Ubuntu machine (or from https://snapshot.debian.org) "
            f"and pass its folder with --deb-dir"
        )
    spec = f"{package}={version}" if version else package
    # the pinned version, again after refreshing the package lists, then whatever version apt offers
    attempts = [(spec, False), (spec, True)] + ([(package, False)] if version else [])
    for target, update in attempts:
        if update:
            subprocess.run(["apt-get", "update"], capture_output=True, text=True)
        if target != spec:
            logger.warning(
                "the pinned version %s of %s is not available from apt (%s); falling back to the version apt "
                "offers, so the corpus will likely differ from the one behind the committed benchmark numbers. "
                "To reproduce it exactly, get %s_%s_all.deb from https://snapshot.debian.org and pass its folder "
                "with --deb-dir", version, package, _last_line(done.stderr), package, _deb_file_version(version),
            )
        done = subprocess.run(["apt-get", "download", target], cwd=deb_dir, capture_output=True, text=True)
        found = sorted(deb_dir.glob(f"{package}_*.deb"))
        if done.returncode == 0 and found:
            logger.info("downloaded %s", found[-1].name)
            return found[-1]
    raise DataError(
        f"cannot fetch the Debian package {package} with apt-get download ({_last_line(done.stderr)}). "
        f"Run `apt-get update` as root or pass a folder holding {package}_*.deb with --deb-dir"
    )


def _last_line(text: str) -> str:
    text = (text or "").strip()
    return text.splitlines()[-1] if text else "no output"


def check_sources(sources: dict) -> list[str]:
    """Warn about each source that differs from the pinned ones; return their descriptions."""
    differing = []
    for package, (version, sha256) in PINNED_DEBIAN_PACKAGES.items():
        got = sources.get("debian", {}).get(package)
        if got is None:
            continue
        if got["version"] != version:
            differing.append(f"{package} {got['version']} (pinned {version})")
        elif got["sha256"] != sha256:
            differing.append(f"{package} {version} with sha256 {got['sha256']} (pinned {sha256})")
    python = sources.get("python_stdlib", {}).get("python")
    if python is not None and python != PINNED_PYTHON:
        differing.append(f"stdlib docstrings of Python {python} (pinned {PINNED_PYTHON})")
    for item in differing:
        logger.warning("corpus source differs from the pinned build: %s", item)
    return differing


def check_split_hashes(split_sha256: dict[str, str], seed: int = DEFAULT_SEED) -> list[str]:
    """Names of the splits whose sha256 differs from ``EXPECTED_SPLIT_SHA256`` (logged as a warning;
    only the default seed has expected hashes)."""
    if seed != DEFAULT_SEED:
        logger.info("seed %d: no expected split hashes to compare with (they are for seed %d)", seed, DEFAULT_SEED)
        return []
    differing = sorted(name for name, digest in split_sha256.items() if EXPECTED_SPLIT_SHA256.get(name) != digest)
    if differing:
        logger.warning(
            "the rebuilt corpus differs from the one behind the committed benchmark numbers in split(s) %s "
            "(sha256 %s, expected %s): numbers measured on it are not comparable with BENCHMARKS.md. "
            "Build it with the pinned sources (PINNED_DEBIAN_PACKAGES, Python %s) to reproduce them",
            ", ".join(differing), ", ".join(split_sha256[n][:12] for n in differing),
            ", ".join(EXPECTED_SPLIT_SHA256.get(n, "none")[:12] for n in differing), PINNED_PYTHON,
        )
    else:
        logger.info("all splits match the sha256 of the committed corpus")
    return differing


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
    for page in tqdm(pages, desc="python docs", unit="doc", leave=False):
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
    for pod in tqdm(pods, desc="perl docs", unit="doc", leave=False):
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
    for path in tqdm(sorted(stdlib.rglob("*.py")), desc="stdlib", unit="module", leave=False):
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


def collect_documents(work_dir: Path, deb_dir: Path, progress: tqdm | None = None) -> tuple[list[Document], dict]:
    """Fetch and unpack the sources; return all documents and a description of the sources.
    ``progress`` (a stage bar) advances by one per source."""
    sources: dict = {"debian": {}, "python_stdlib": {}}
    documents: list[Document] = []
    readers = {"python3.11-doc": python_doc_documents, "perl-doc": perl_pod_documents}
    for package in DEBIAN_PACKAGES:
        _stage(progress, f"fetch {package}")
        deb = fetch_debian_package(package, deb_dir)
        docs = readers[package](unpack_deb(deb, work_dir / package))
        sources["debian"][package] = {
            "file": deb.name,
            "version": deb_version(deb),
            "sha256": hashlib.sha256(deb.read_bytes()).hexdigest(),
            "documents": len(docs),
        }
        logger.info("%s %s: %d documents", package, sources["debian"][package]["version"], len(docs))
        documents += docs
        _advance(progress)
    _stage(progress, "stdlib docstrings")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    docs = stdlib_documents(stdlib)
    sources["python_stdlib"] = {"python": sys.version.split()[0], "documents": len(docs)}
    logger.info("stdlib of Python %s (%s): %d documents", sources["python_stdlib"]["python"], stdlib, len(docs))
    documents += docs
    _advance(progress)
    return documents, sources


def _stage(progress: tqdm | None, name: str) -> None:
    if progress is not None:
        progress.set_description(f"corpus: {name}")
    logger.debug("corpus stage: %s", name)


def _advance(progress: tqdm | None) -> None:
    if progress is not None:
        progress.update()


def build_corpus(
    out_dir: Path,
    seed: int = DEFAULT_SEED,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    deb_dir: Path | None = None,
    check_sizes: bool = True,
) -> dict:
    """Write ``{train,calib,finetune,eval}.txt``, ``tokenizer/`` and ``manifest.json`` to
    ``out_dir`` and return the manifest.

    Sources that differ from the pins, and splits whose sha256 differs from ``EXPECTED_SPLIT_SHA256``,
    are warned about; the manifest lists them under ``reproducibility``."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(f"cannot create {out_dir}: {err}; choose a writable --out") from err
    deb_dir = deb_dir or out_dir / "_debs"
    # stages: one per Debian package, the stdlib, writing the splits, the tokenizer, counting tokens
    with tqdm(total=len(DEBIAN_PACKAGES) + 4, desc="corpus", unit="stage") as progress:
        documents, sources = collect_documents(out_dir / "_unpacked", deb_dir, progress)
        differing_sources = check_sources(sources)

        _stage(progress, "split and write")
        splits = split_documents(documents, seed)
        texts = {name: join_documents(docs) for name, docs in splits.items()}
        for name, text in texts.items():
            (out_dir / f"{name}.txt").write_text(text, encoding="utf-8")
        shutil.rmtree(out_dir / "_unpacked")
        digests = {name: hashlib.sha256(texts[name].encode("utf-8")).hexdigest() for name in splits}
        differing_splits = check_split_hashes(digests, seed)
        _advance(progress)

        _stage(progress, "train tokenizer")
        tokenizer = train_tokenizer(out_dir / "train.txt", vocab_size, out_dir / "tokenizer")
        _advance(progress)

        _stage(progress, "count tokens")
        tokens = {name: count_tokens(tokenizer, texts[name]) for name in splits}
        _advance(progress)
    manifest = {
        "seed": seed,
        "split_fractions": SPLIT_FRACTIONS,
        "sources": sources,
        "tokenizer": {"type": "byte-level BPE", "vocab_size": len(tokenizer), "path": "tokenizer"},
        "reproducibility": {
            "sources_differing_from_pins": differing_sources,
            "splits_differing_from_expected_sha256": differing_splits if seed == DEFAULT_SEED else None,
        },
        "splits": {
            name: {
                "file": f"{name}.txt",
                "sha256": digests[name],
                "documents": len(splits[name]),
                "characters": len(texts[name]),
                "tokens": tokens[name],
                "document_ids": [d.doc_id for d in splits[name]],
            }
            for name in splits
        },
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    if check_sizes:
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
    parser.add_argument("-v", "--verbose", action="count", default=0, help="debug messages")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors, no progress bars")
    args = parser.parse_args(argv)
    from losa.log import setup_logging

    setup_logging(args.verbose, args.quiet)
    try:
        manifest = build_corpus(args.out, args.seed, args.vocab_size, args.deb_dir)
    except LosaError as err:
        logger.error("%s", err)
        return 2
    for name, split in manifest["splits"].items():
        logger.info("%-9s %5d docs %9d tokens  %s", name, split["documents"], split["tokens"], split["sha256"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
