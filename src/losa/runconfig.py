"""``losa run CONFIG.yaml``: the whole pipeline (prune or prune + recover, evaluate, export) from one file.

The YAML file has these keys (every one optional except ``model``, ``out`` and a target in ``prune``)::

    model: checkpoints/Llama-2-7b-hf    # dense local Hugging Face checkpoint directory (required)
    out: runs/llama2-7b-wanda70-losa    # run directory (required): model/, compressed/, report.json
    device: cpu                         # also: dtype, seed, overwrite, allow_pickle, trust_remote_code
    prune:       {method: wanda, sparsity: 0.7}         # or pattern: "2:4" (exactly one of the two)
    calibration: {data: c4, nsamples: 128, seqlen: 2048, batch_size: 8}
    finetune:                            # omitted / null: prune only
      method: losa                       # or lora, sparse-lora, ft-then-sparsify
      data: alpaca-gpt4                  # also: samples, seqlen, resume
      steps: 5                           # ... and every other LosaConfig field by its own name
      training: {learning_rate: 2.0e-4}  # TrainConfig fields
    evaluate:
      perplexity: {data: wikitext2, seqlen: 2048}       # omitted / null: skipped
      zero_shot: {tasks: [boolq, piqa], limit: null}    # omitted / null: skipped
    export: {format: compressed-tensors}                # omitted / null: no export

Every key maps onto one field of the typed configurations in ``losa.config`` (``SCHEMA`` below
says which), and every default is that dataclass's default, i.e. the paper's setting; the zero-shot
and export defaults are those of ``losa.zeroshot.zero_shot`` and ``losa.export.export_compressed``.
A section that switches a stage (finetune, evaluate.perplexity, evaluate.zero_shot, export) runs
that stage when present, even as ``{}`` (all defaults), and skips it when omitted or null; the
settings-only sections (calibration, finetune.training) take their defaults when omitted or null.
Relative paths (model, out, text:PATH data) are relative to the working directory, as on the CLI.

Numbers are read as in YAML 1.2: ``2e-4`` is a float and ``2:4`` a string (PyYAML's YAML 1.1
reads them as the string "2e-4" and the base-60 integer 124).

The run writes ``out/model`` (the pruned / fine-tuned checkpoint, with its own report.json),
``out/compressed`` (the export, if asked), ``out/config.yaml`` (the resolved configuration) and
``out/report.json`` (one summary of every stage). The LoRA baseline is saved as the sparse base plus
its unmerged adapter (``model/lora-adapter``): it is evaluated with the adapter, and exported without.
Bad input raises ``ConfigError`` (one line, naming the file, line, section and key) before anything
is loaded.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import inspect
import logging
import math
import re
import shutil
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from losa.checkpoint import LORA_ADAPTER_SUBDIR, lora_adapter_dir
from losa.config import EvalConfig, FinetuneConfig, LosaConfig, PruneConfig, TrainConfig
from losa.distributed import is_main_process, main_process_writes
from losa.errors import ConfigError, OutputError
from losa.export import FORMATS, export_compressed
from losa.zeroshot import zero_shot

log = logging.getLogger(__name__)

_ZERO_SHOT = inspect.signature(zero_shot).parameters
_EXPORT = inspect.signature(export_compressed).parameters
MODEL_SUBDIR, EXPORT_SUBDIR = "model", "compressed"


# ---------------------------------------------------------------- the typed configuration tree


@dataclass
class ZeroShotConfig:
    """Settings of ``losa.zeroshot.zero_shot``; the defaults are its own (the paper's seven tasks, 0-shot)."""

    tasks: list[str] = field(default_factory=lambda: list(_ZERO_SHOT["tasks"].default))
    limit: int | None = _ZERO_SHOT["limit"].default  # first N documents per task (smoke tests)
    num_fewshot: int = _ZERO_SHOT["num_fewshot"].default
    batch_size: int = _ZERO_SHOT["batch_size"].default
    include_path: str | None = _ZERO_SHOT["include_path"].default  # directory of local lm-eval task YAMLs

    def __post_init__(self) -> None:
        # zero_shot checks these too, but only after fine-tuning: fail before the expensive part
        if not self.tasks:
            raise ConfigError("tasks is empty; list lm-eval task names, e.g. [boolq, piqa]")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"limit must be a positive number of documents per task or null, got {self.limit}")
        if self.num_fewshot < 0:
            raise ConfigError(f"num_fewshot must be >= 0, got {self.num_fewshot}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be a positive integer, got {self.batch_size}")


@dataclass
class ExportConfig:
    """Settings of ``losa.export.export_compressed``."""

    format: str = _EXPORT["format"].default

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ConfigError(f"unknown export format {self.format!r}; choose one of {', '.join(FORMATS)}")


@dataclass
class RunConfig:
    """A whole run: the prune settings always, fine-tuning / evaluation / export when asked.

    ``prune`` and ``finetune`` write to ``out/model``; ``perplexity`` evaluates that checkpoint.
    """

    out: str
    prune: PruneConfig
    finetune: FinetuneConfig | None = None
    perplexity: EvalConfig | None = None
    zero_shot: ZeroShotConfig | None = None
    export: ExportConfig | None = None
    source: str = "<dict>"  # where it was read from, for messages

    @property
    def model_dir(self) -> Path:
        return Path(self.out).expanduser() / MODEL_SUBDIR

    @property
    def export_dir(self) -> Path:
        return Path(self.out).expanduser() / EXPORT_SUBDIR


# ---------------------------------------------------------------- the YAML schema

# section path -> {YAML key: (dataclass, field)}. Types and defaults come from the dataclass field.
# Top-level and calibration keys are PruneConfig's fields; FinetuneConfig has the same fields (the
# pruning method is its ``pruner``), so they feed both. ``out`` is the run directory.
SCHEMA: dict[str, dict[str, tuple[type, str]]] = {
    "": {
        "model": (PruneConfig, "model"),
        "out": (RunConfig, "out"),
        **{name: (PruneConfig, name) for name in ("device", "dtype", "seed", "overwrite", "allow_pickle", "trust_remote_code")},
    },
    "prune": {name: (PruneConfig, name) for name in ("method", "sparsity", "pattern")},
    "calibration": {"data": (PruneConfig, "calib"), **{name: (PruneConfig, name) for name in ("nsamples", "seqlen", "batch_size")}},
    "finetune": {
        "method": (FinetuneConfig, "method"),
        "data": (FinetuneConfig, "train"),
        "samples": (FinetuneConfig, "train_samples"),
        "seqlen": (FinetuneConfig, "train_seqlen"),
        "resume": (FinetuneConfig, "resume"),
        **{f.name: (LosaConfig, f.name) for f in fields(LosaConfig)},
    },
    "finetune.training": {f.name: (TrainConfig, f.name) for f in fields(TrainConfig)},
    "evaluate": {},
    "evaluate.perplexity": {name: (EvalConfig, name) for name in ("data", "seqlen", "batch_size", "max_windows")},
    "evaluate.zero_shot": {f.name: (ZeroShotConfig, f.name) for f in fields(ZeroShotConfig)},
    "export": {f.name: (ExportConfig, f.name) for f in fields(ExportConfig)},
}
# Sections whose presence switches a stage on (omitted / null: off). The others are settings only.
STAGES = ("finetune", "evaluate.perplexity", "evaluate.zero_shot", "export")
# Fields that the run sets itself rather than reading them from the file.
SET_BY_RUN = {
    PruneConfig: {"out"},  # out/model
    FinetuneConfig: {"out", "eval", "eval_seqlen", "eval_max_windows", "losa", "training"},  # evaluation is its own stage
    EvalConfig: {"model", "device", "dtype", "allow_pickle", "trust_remote_code"},  # out/model, top level
}
# Top-level keys shared by every stage's configuration.
_SHARED = ("device", "dtype", "allow_pickle", "trust_remote_code")
_RENAMED_IN_FINETUNE = {"method": "pruner"}  # PruneConfig field -> FinetuneConfig field


def subsections(path: str) -> list[str]:
    """Names of the sections directly inside ``path`` ("" is the top level)."""
    prefix = f"{path}." if path else ""
    return [s[len(prefix):] for s in SCHEMA if s.startswith(prefix) and s and "." not in s[len(prefix):]]


def valid_keys(path: str) -> list[str]:
    return list(SCHEMA[path]) + subsections(path)


def _hint(owner: type, name: str):
    return typing.get_type_hints(owner)[name]


def _default(owner: type, name: str):
    """The dataclass default of ``owner.name`` (``dataclasses.MISSING`` if the field is required)."""
    f = next(f for f in fields(owner) if f.name == name)
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


# ---------------------------------------------------------------- reading YAML


class _Mapping(dict):
    """A YAML mapping that remembers the line and column of each key (1-based)."""

    marks: dict


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 numbers and duplicate-key errors."""


_INT = "tag:yaml.org,2002:int"
_FLOAT = "tag:yaml.org,2002:float"
_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in (_INT, _FLOAT)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(_INT, re.compile(r"^[-+]?(?:0|[1-9][0-9_]*)$"), list("-+0123456789"))
_Loader.add_implicit_resolver(
    _FLOAT,
    re.compile(
        r"""^(?:[-+]?[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?
            |[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+
            |[-+]?\.[0-9][0-9_]*(?:[eE][-+]?[0-9]+)?
            |[-+]?\.(?:inf|Inf|INF)
            |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def _construct_mapping(loader: _Loader, node: yaml.MappingNode):
    data = _Mapping()
    data.marks = {}
    yield data
    own = {}
    for key_node, _ in node.value:  # duplicates among the mapping's own keys (merge keys may override)
        if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
            continue
        key = loader.construct_object(key_node)
        if key in own:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (first on line {own[key].line + 1})", key_node.start_mark
            )
        own[key] = key_node.start_mark
    loader.flatten_mapping(node)
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        try:
            hash(key)
        except TypeError:
            raise yaml.constructor.ConstructorError(None, None, "a mapping key must be a plain value", key_node.start_mark) from None
        data[key] = loader.construct_object(value_node, deep=True)
        data.marks[key] = (key_node.start_mark.line + 1, key_node.start_mark.column + 1)


_Loader.add_constructor("tag:yaml.org,2002:map", _construct_mapping)


def parse_yaml(text: str, source: str = "<string>"):
    """YAML text to Python objects (mappings remember key positions); ConfigError with line:column."""
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark is not None else source
        what = e.problem + (f" ({e.context})" if e.context and e.problem else "") if e.problem else (e.context or "")
        raise ConfigError(f"{where}: not valid YAML: {' '.join(what.split())}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: not valid YAML: {' '.join(str(e).split())}") from None


def read_yaml(path: str | Path):
    path = Path(path).expanduser()
    if not path.exists():
        raise ConfigError(f"config file {str(path)!r} does not exist; see examples/configs/ for examples")
    if not path.is_file():
        raise ConfigError(f"config path {str(path)!r} is not a file; pass a YAML file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not UTF-8 text; save the config as UTF-8 YAML") from None
    return parse_yaml(text, str(path))


def apply_overrides(data, overrides: Sequence[str], source: str = "--set"):
    """``["finetune.steps=3", "out=runs/x"]`` applied to a parsed config (values are YAML)."""
    data = copy.deepcopy(data) if data is not None else {}
    for item in overrides:
        key, sep, text = item.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(parts):
            raise ConfigError(f"{source} {item!r}: write KEY=VALUE with a dotted key, e.g. finetune.steps=3")
        value = parse_yaml(text, f"{source} {key}")
        if not isinstance(data, dict):
            return data  # validation reports the malformed top level
        node = data
        for depth, part in enumerate(parts[:-1]):
            if node.get(part) is None:
                node[part] = {}  # also switches a stage on: --set export.format=sparse-bitmask
            node = node[part]
            if not isinstance(node, dict):
                raise ConfigError(f"{source} {item!r}: {'.'.join(parts[: depth + 1])} is not a section")
        node[parts[-1]] = value
        getattr(node, "marks", {}).pop(parts[-1], None)  # its line in the file no longer applies
    return data


# ---------------------------------------------------------------- validation


def _show(value) -> str:
    """A value as the user wrote it in YAML."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _describe(hint) -> str:
    args = typing.get_args(hint)
    if type(None) in args:
        return " or ".join(_describe(a) for a in args if a is not type(None)) + " or null"
    if typing.get_origin(hint) is list:
        return f"a list of {_describe(args[0])}s".replace("a strings", "strings")
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[hint]


def _check_value(value, hint):
    """``value`` converted to ``hint`` (int -> float is the one conversion), or raise TypeError."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        (hint,) = [a for a in args if a is not type(None)]
    if typing.get_origin(hint) is list:
        if not isinstance(value, list):
            raise TypeError
        return [_check_value(v, typing.get_args(hint)[0]) for v in value]
    if hint is bool and isinstance(value, bool):
        return value
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            number = float(value)
        except OverflowError:  # an integer beyond float's range
            raise TypeError from None
        if not math.isfinite(number):
            raise TypeError
        return number
    if hint is str and isinstance(value, str):
        return value
    raise TypeError


class _Context:
    """Where values came from, to name file, line, section and key in messages."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.marks: dict[tuple[str, object], tuple[int, int]] = {}  # (section, key) -> (line, column)

    def where(self, section: str, key=None) -> str:
        """``file:line:column`` of the key, else of its section, else the file."""
        mark = self.marks.get((section, key)) or self.marks.get(tuple(section.rpartition(".")[::2]))
        return f"{self.source}:{mark[0]}:{mark[1]}" if mark else self.source

    def error(self, section: str, key, message: str) -> ConfigError:
        """``file:line:col: section.key: message`` (the key is left out of the name when None)."""
        name = ".".join(str(p) for p in (section, key) if p)
        return ConfigError(f"{self.where(section, key)}: {name + ': ' if name else ''}{message}")


def _section_label(path: str) -> str:
    return f"section {path!r}" if path else "the top level"


def _walk(data, path: str, ctx: _Context, out: dict[str, dict | None]) -> None:
    """Check the keys of ``data`` (section ``path``) and its subsections; collect ``out[path]``."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{ctx.source}: the top level must be a mapping of keys to values, got "
                          f"{_show(data)}; start with model:, out: and prune:")
    marks = getattr(data, "marks", {})
    for key in data:
        if key in marks:
            ctx.marks[(path, key)] = marks[key]
    allowed = valid_keys(path)
    for key in data:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(allowed)}"
            raise ConfigError(f"{ctx.where(path, key)}: unknown key {_show(key)} in {_section_label(path)}{hint}")
    out[path] = {k: v for k, v in data.items() if k in SCHEMA[path]}
    for name in subsections(path):
        sub = f"{path}.{name}" if path else name
        value = data.get(name)
        if value is None:
            out[sub] = None  # omitted or null
            continue
        if not isinstance(value, Mapping):
            if sub in STAGES:
                use = "a mapping of its settings, {} for the defaults, or null to skip it"
            elif subsections(sub):
                use = f"a mapping with {' and/or '.join(k + ':' for k in subsections(sub))} (or null to skip them)"
            else:
                use = "a mapping of its settings (or null for the defaults)"
            raise ctx.error(path, name, f"must be {use}, got {_show(value)}")
        _walk(value, sub, ctx, out)


def _typed(sections: dict[str, dict | None], ctx: _Context) -> dict[type, dict]:
    """Type-checked field values per dataclass, from every present key."""
    values: dict[type, dict] = {}
    for path, data in sections.items():
        for key, value in (data or {}).items():
            owner, name = SCHEMA[path][key]
            hint = _hint(owner, name)
            try:
                values.setdefault(owner, {})[name] = _check_value(value, hint)
            except TypeError:
                finite = " (finite)" if isinstance(value, float) and not math.isfinite(value) else ""
                raise ctx.error(path, key, f"must be {_describe(hint)}{finite}, got {_show(value)}") from None
    return values


def _build(owner: type, kwargs: dict, ctx: _Context, **fixed):
    """``owner(**kwargs, **fixed)``; its ConfigError gets the file, section and key prepended."""
    try:
        return owner(**kwargs, **fixed)
    except ConfigError as e:
        message = str(e)
        keys = [(path, key, name) for path, entries in SCHEMA.items() for key, (o, name) in entries.items()
                if o is owner or (owner is FinetuneConfig and o is PruneConfig)]
        if owner is FinetuneConfig:  # PruneConfig keys reach FinetuneConfig under its own names
            keys = [(p, k, _RENAMED_IN_FINETUNE.get(n, n) if SCHEMA[p][k][0] is PruneConfig else n) for p, k, n in keys]
        found = [(m.start(), p, k, n) for p, k, n in keys if (m := re.search(rf"\b{re.escape(n)}\b", message))]
        if not found:
            raise ConfigError(f"{ctx.source}: {message}") from None
        _, path, key, name = min(found)
        if name != key:
            message = re.sub(rf"\b{re.escape(name)}\b", key, message)
        if re.match(rf"{re.escape(key)} (must|is) ", message):  # "steps must be ..." named finetune.steps
            message = message[len(key) + 1 :]
        raise ctx.error(path, key, message) from None


def _check_device_and_dtype(top: dict, ctx: _Context) -> None:
    import torch

    from losa.checkpoint import DTYPES

    device = top.get("device", _default(PruneConfig, "device"))
    try:
        torch.device(device)
    except (RuntimeError, ValueError):
        raise ctx.error("", "device", f"unknown device {device!r}; use cpu, cuda, cuda:1 or mps") from None
    dtype = top.get("dtype", _default(PruneConfig, "dtype"))
    if dtype not in DTYPES:
        raise ctx.error("", "dtype", f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")


def run_config_from_dict(data, source: str = "<dict>") -> RunConfig:
    """Validate a parsed configuration (as from YAML) into a RunConfig; ConfigError for any problem."""
    ctx = _Context(source)
    if data is None:
        raise ConfigError(f"{source}: the configuration is empty; it needs at least model:, out: and prune: {{sparsity: 0.5}}")
    sections: dict[str, dict | None] = {}
    _walk(data, "", ctx, sections)  # unknown keys anywhere come first: a typo explains a missing key
    for key in ("model", "out"):
        if key not in sections[""]:
            what = "the dense checkpoint directory" if key == "model" else "the run directory for model/, report.json, ..."
            raise ctx.error("", None, f"missing required key {key!r} ({what})")
    if sections["prune"] is None:
        raise ctx.error("", None, "missing section 'prune'; add prune: {sparsity: 0.5} or prune: {pattern: \"2:4\"}")
    values = _typed(sections, ctx)
    prune_values = values.get(PruneConfig, {})
    if (prune_values.get("sparsity") is None) == (prune_values.get("pattern") is None):
        which = "both are set" if prune_values.get("sparsity") is not None else "neither is set"
        raise ctx.error("", "prune", f"give exactly one of sparsity (e.g. 0.7) or pattern (e.g. \"2:4\"); {which}")
    _check_device_and_dtype(sections[""], ctx)

    out = values[RunConfig]["out"]
    model_dir = str(Path(out) / MODEL_SUBDIR)
    prune = _build(PruneConfig, prune_values, ctx, out=model_dir)
    finetune = None
    if sections.get("finetune") is not None:
        shared = {_RENAMED_IN_FINETUNE.get(k, k): v for k, v in prune_values.items()}
        losa = _build(LosaConfig, values.get(LosaConfig, {}), ctx)
        training = _build(TrainConfig, values.get(TrainConfig, {}), ctx)
        finetune = _build(FinetuneConfig, {**shared, **values.get(FinetuneConfig, {})}, ctx,
                          out=model_dir, losa=losa, training=training)
    shared = {k: getattr(prune, k) for k in _SHARED}
    perplexity = zero = export = None
    if sections.get("evaluate.perplexity") is not None:
        perplexity = _build(EvalConfig, values.get(EvalConfig, {}), ctx, model=model_dir, **shared)
    if sections.get("evaluate.zero_shot") is not None:
        zero = _build(ZeroShotConfig, values.get(ZeroShotConfig, {}), ctx)
    if sections.get("export") is not None:
        export = _build(ExportConfig, values.get(ExportConfig, {}), ctx)
    return RunConfig(out=out, prune=prune, finetune=finetune, perplexity=perplexity, zero_shot=zero, export=export,
                     source=source)


def load_run_config(path: str | Path, overrides: Sequence[str] = ()) -> RunConfig:
    """Read and validate a run configuration file (``overrides``: ``KEY=VALUE`` strings, see apply_overrides)."""
    data = read_yaml(path)
    if overrides:
        data = apply_overrides(data, overrides)
    return run_config_from_dict(data, str(path))


def resolve(config: RunConfig) -> dict:
    """The fully resolved configuration as a YAML-shaped dict: every key of every active section."""
    objects = {RunConfig: config, PruneConfig: config.prune, FinetuneConfig: config.finetune,
               LosaConfig: config.finetune.losa if config.finetune else None,
               TrainConfig: config.finetune.training if config.finetune else None,
               EvalConfig: config.perplexity, ZeroShotConfig: config.zero_shot, ExportConfig: config.export}

    def section(path: str):
        owners = {owner for owner, _ in SCHEMA[path].values()}
        if any(objects[o] is None for o in owners):
            return None
        out = {}
        for key, (owner, name) in SCHEMA[path].items():
            value = getattr(objects[owner], name)
            out[key] = list(value) if isinstance(value, tuple) else value
        for name in subsections(path):
            out[name] = section(f"{path}.{name}" if path else name)
        return out

    return section("")


def dump_yaml(resolved: dict) -> str:
    """YAML text of a resolved configuration (loads back to the same configuration)."""
    return yaml.safe_dump(resolved, sort_keys=False, default_flow_style=False, width=120)


# ---------------------------------------------------------------- running


def _check_outputs(config: RunConfig) -> None:
    """Fail before any work if ``out`` holds an earlier run (without overwrite) or cannot be written."""
    from losa.checkpoint import check_output_dir

    out = Path(config.out).expanduser()
    if out.exists() and not out.is_dir():
        raise OutputError(f"out {str(out)!r} is a file; choose a directory for the run")
    earlier = [p.name for p in (config.model_dir, config.export_dir, out / "report.json") if p.exists()]
    if earlier and not config.prune.overwrite:
        raise OutputError(f"{out} already holds a run ({', '.join(earlier)}); set overwrite: true in "
                          f"{config.source} to replace it, or choose another out")
    check_output_dir(config.model_dir, config.prune.overwrite, flag="out")


def _check_inputs(config: RunConfig) -> None:
    """Everything the later stages read, checked before hours of pruning and training: the model's
    config (windows within its context), local data files, the perplexity text (at least one
    window; a hub dataset is fetched now) and the zero-shot tasks with their data."""
    from losa.checkpoint import check_model_dir, load_config, load_tokenizer
    from losa.data import DataSpec

    DataSpec.parse(config.prune.calib)
    if config.finetune is not None:
        DataSpec.parse(config.finetune.train)
    if config.perplexity is not None:
        DataSpec.parse(config.perplexity.data)
    model = Path(config.prune.model).expanduser()
    check_model_dir(model, config.prune.allow_pickle)
    limit = getattr(load_config(model, config.prune.trust_remote_code), "max_position_embeddings", None)
    windows = [("calibration.seqlen", config.prune.seqlen)]
    if config.finetune is not None:
        windows.append(("finetune.seqlen", config.finetune.train_seqlen))
    if config.perplexity is not None:
        windows.append(("evaluate.perplexity.seqlen", config.perplexity.seqlen))
    for key, seqlen in windows:
        if limit is not None and seqlen > limit:
            raise ConfigError(f"{config.source}: {key}: {seqlen} exceeds the context length of {model} "
                              f"({limit} tokens); lower {key}")
    if config.perplexity is not None:
        from losa.api import check_evaluation_text

        check_evaluation_text(load_tokenizer(model, config.prune.trust_remote_code), config.perplexity.data,
                              config.perplexity.seqlen, "evaluate.perplexity.seqlen")
    if config.zero_shot is not None:
        from losa.zeroshot import check_tasks

        check_tasks(config.zero_shot.tasks, config.zero_shot.include_path)


def _evaluation_model(config: RunConfig):
    """(model, tokenizer) to evaluate in memory, or (None, None) to evaluate ``out/model`` from disk.

    The LoRA baseline is saved as the sparse base plus its unmerged adapter beside it (merging
    would destroy the sparsity); evaluating the base alone would drop what LoRA learned.
    """
    from losa.checkpoint import load_evaluation_model

    if config.finetune is None or config.finetune.method != "lora" or lora_adapter_dir(config.model_dir) is None:
        return None, None
    return load_evaluation_model(config.model_dir, dtype=config.prune.dtype, device=config.prune.device,
                                 trust_remote_code=config.prune.trust_remote_code)


def _stage_summary(report: dict) -> dict:
    """An API report without what the summary has elsewhere (settings, environment, per-layer rows)."""
    return {k: v for k, v in report.items() if k not in ("settings", "environment", "layers", "command")}


def run(config: RunConfig) -> dict:
    """Prune (or prune and fine-tune), evaluate and export as configured; returns the summary report.

    Writes ``out/model``, ``out/compressed`` (export), ``out/config.yaml`` and ``out/report.json``.
    """
    from losa import api
    from losa.report import Report, Timer

    _check_outputs(config)
    _check_inputs(config)
    out = Path(config.out).expanduser()
    resolved = resolve(config)
    timer = Timer()
    extra: dict = {"config_file": config.source, "model_dir": str(config.model_dir)}
    if config.finetune is not None:
        log.info("run: %s + %s to %s", config.finetune.pruner, config.finetune.method, config.model_dir)
        with timer(config.finetune.method):
            report = api.finetune(config.finetune)
        extra["finetune"] = _stage_summary(report)
    else:
        log.info("run: %s to %s", config.prune.method, config.model_dir)
        with timer("prune"):
            report = api.prune(config.prune)
        extra["prune"] = _stage_summary(report)
    extra["overall_sparsity"] = report["overall_sparsity"]
    metrics: dict = {}
    model, tokenizer = _evaluation_model(config) if config.perplexity or config.zero_shot else (None, None)
    if model is not None:
        extra["evaluated"] = f"{config.model_dir} with the unmerged LoRA adapter in {LORA_ADAPTER_SUBDIR}/"
    if config.perplexity is not None:
        with timer("perplexity"):
            metrics["perplexity"] = api.evaluate(config.perplexity, model=model, tokenizer=tokenizer)
    if config.zero_shot is not None:
        zs = config.zero_shot
        with timer("zero_shot"):
            metrics["zero_shot"] = zero_shot(
                config.model_dir if model is None else model, zs.tasks, tokenizer=tokenizer, batch_size=zs.batch_size,
                device=config.prune.device, limit=zs.limit, num_fewshot=zs.num_fewshot, include_path=zs.include_path,
                dtype=config.prune.dtype, trust_remote_code=config.prune.trust_remote_code,
            )
    del model
    with main_process_writes() as writer:  # a distributed launch: the other processes only wait
        if writer:
            _export(config, timer, extra)
    summary = Report("run", resolved, metrics=metrics, timings=timer.seconds, extra=extra).as_dict()
    if is_main_process():  # nothing reads these afterwards: no need to wait for them
        from losa.checkpoint import write_json_atomic

        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(dump_yaml(resolved), encoding="utf-8")
        write_json_atomic(out / "report.json", summary)
    return summary


def _export(config: RunConfig, timer, extra: dict) -> None:
    """The compressed-tensors export as configured (or removal of a stale one), into ``extra``."""
    if config.export is not None:
        with timer("export"):
            extra["export"] = _stage_summary(
                export_compressed(config.model_dir, config.export_dir, config.export.format, overwrite=config.prune.overwrite)
            )
        if lora_adapter_dir(config.model_dir) is not None:
            extra["export"]["note"] = f"the sparse base only: the unmerged LoRA adapter stays in {LORA_ADAPTER_SUBDIR}/"
    elif config.export_dir.exists():  # overwrite: an export of the replaced model would not match it
        shutil.rmtree(config.export_dir)


def summary_line(summary: dict) -> str:
    """One line for the terminal: where, how sparse, how good, how small."""
    parts = [f"overall sparsity {summary['overall_sparsity']:.4f}"]
    metrics = summary["metrics"]
    if "perplexity" in metrics:
        parts.append(f"perplexity {metrics['perplexity']['perplexity']:.3f} ({metrics['perplexity']['data']})")
    if "zero_shot" in metrics:
        parts.append(f"zero-shot mean acc {metrics['zero_shot']['mean_acc']:.4f}")
    if "export" in summary:
        parts.append(f"{summary['export']['format']} export {summary['export']['ratio']:.2f}x the dense size")
    return f"wrote {Path(summary['model_dir']).parent}: " + ", ".join(parts)


def run_main(path: str, dry_run: bool = False, overrides: Sequence[str] = ()) -> int:
    """``losa run``: load, then print the resolved configuration (dry run) or run it; LosaError on bad input."""
    config = load_run_config(path, overrides)
    if dry_run:
        print(dump_yaml(resolve(config)), end="")
        return 0
    print(summary_line(run(config)))
    return 0
