"""YAML recipes -> a typed, frozen MergeRecipe. Every problem is collected into one ConfigError.

    method: ties
    base: ./llama-base
    models:
      - ./llama-math
      - path: ./llama-code
        weight: 0.5          # becomes the method's per-model weights
        stats: ./stats-code  # fisher, regmean: the model's statistics (tiesmerge stats); or a
                             # top-level list `stats: [dir, ...]`, one per model
    parameters: {density: 0.2, lam: 1.0, scope: global}
    dtype: bfloat16          # optional: output dtype (default: the base's)
    shard_size: 5GB
    memory_budget: 2GiB
    device: cpu
    vocab_policy: error      # or truncate, or union (a tokenizer holding every model's added tokens)
    allow_distant: false     # true: merge models that do not look fine-tuned from the base
    files_from: ./llama-base # optional: the input whose config and tokenizer files the output copies

Relative paths are resolved against the recipe file's folder.

A mergekit recipe (``merge_method:``) is accepted as it is, for the methods both tools share;
see :mod:`tiesmerge.recipe_mergekit` for the translation and its semantics.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from .dtypes import BY_NAME
from .errors import GGUF_HINT, ConfigError
from .hub import split_repo_id
from .io.align import VOCAB_POLICIES
from .limits import read_yaml
from .methods.base import MergeMethod, ModelPath, check_models, option_types
from .recipe_mergekit import is_mergekit, translate_mergekit
from .registry import METHODS, broken_plugins, did_you_mean, make_method, method_suggestion
from .sizes import DEFAULT_MEMORY_BUDGET, DEFAULT_SHARD_SIZE, OUTPUT_FORMATS, parse_size

if TYPE_CHECKING:
    import torch

__all__ = ["MergeRecipe", "load_recipe", "read_recipe_data", "recipe_from_dict", "from_mergekit", "DTYPES",
           "parse_dtype"]

DTYPES = BY_NAME  # the output dtype names a recipe or the command line accepts -> tiesmerge.dtypes.DType
_KEYS = ("method", "base", "models", "parameters", "dtype", "shard_size", "memory_budget", "device", "vocab_policy",
         "allow_pickle", "output_format", "rank", "origin", "stats", "allow_distant", "files_from")


def parse_dtype(name: str | None) -> torch.dtype | None:
    """An output dtype name (``bf16``) as a torch dtype (imports torch); ``DTYPES[name]`` is the
    torch-free descriptor."""
    if name is None:
        return None
    if not isinstance(name, str) or name not in DTYPES:  # a YAML list is unhashable: check the type first
        raise ConfigError(f"dtype {name!r} is not one of {', '.join(DTYPES)}{did_you_mean(str(name), list(DTYPES))}",
                          hint="write the output dtype by name, e.g. dtype: bfloat16 (--dtype bfloat16)")
    return DTYPES[name].torch


@dataclass(frozen=True)
class MergeRecipe:
    method: MergeMethod
    base: str
    models: tuple[str, ...]
    dtype: str | None = None
    shard_size: str = DEFAULT_SHARD_SIZE
    memory_budget: str = DEFAULT_MEMORY_BUDGET
    device: str = "cpu"
    vocab_policy: str = "error"
    allow_pickle: bool = False
    output_format: str = "model"  # "adapter": a merged PEFT adapter (adapters in)
    rank: int | None = None  # LoRA adapter output: the rank of the SVD re-factoring
    origin: dict[str, Any] | None = None  # a translated recipe's source format and semantics (mergekit)
    stats: tuple[str, ...] | None = None  # fisher, regmean: one statistics directory per model
    allow_distant: bool = False  # merge models that do not look fine-tuned from the base (tiesmerge.distance)
    files_from: str | None = None  # the input whose config and tokenizer the output copies (None: the base)

    def __post_init__(self) -> None:
        if isinstance(self.stats, list):
            object.__setattr__(self, "stats", tuple(self.stats))

    def to_dict(self) -> dict[str, Any]:
        params = {f.name: getattr(self.method, f.name) for f in dataclasses.fields(self.method)}
        params = {k: (list(v) if isinstance(v, tuple) else _named(v)) for k, v in params.items() if v is not None}
        out: dict[str, Any] = {"method": self.method.name, "base": self.base, "models": list(self.models),
                               "parameters": params}
        for key in ("dtype", "shard_size", "memory_budget", "device", "vocab_policy"):
            out[key] = getattr(self, key)
        if self.output_format != "model":  # an adapter is one file: no shard_size, which a recipe for one refuses
            out.update(output_format=self.output_format, rank=self.rank, shard_size=None)  # (hp36 C46)
        out["origin"] = self.origin
        if self.stats:
            out["models"] = [{"path": m, "stats": s} for m, s in zip(self.models, self.stats, strict=True)]
        if self.allow_distant:
            out["allow_distant"] = True
        if self.files_from is not None:
            out["files_from"] = self.files_from
        if self.allow_pickle:  # a re-run needs --allow-pickle too, and says so (hp38 C12)
            out["allow_pickle"] = True
        return {k: v for k, v in out.items() if v is not None}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _named(value: Any) -> Any:
    """A model read from the Hugging Face cache is recorded by the id it was named by (``org/name``,
    which the recipe can be run with again), as plain text; anything else as it is."""
    label = getattr(value, "label", None)
    return label if isinstance(value, str) and isinstance(label, str) else value


def _path(value: Any, root: Path | None) -> str:
    """A path, relative ones against the recipe's folder; an ``org/name[@revision]`` that is no
    path there stays a Hugging Face repo id (resolved from the local cache when merged)."""
    if isinstance(value, str) and hasattr(value, "repo_id"):  # a snapshot the command line resolved (hub.HubPath):
        return value  # kept whole, so the card and the manifest name it by its repo id
    p = Path(os.path.expanduser(str(value)))
    if root is not None and not p.is_absolute() and not os.path.lexists(root / p) and split_repo_id(str(value)):
        return str(value)
    return str(p if p.is_absolute() or root is None else root / p)


def _short(value: Any, limit: int = 80) -> str:
    """A value as an error message shows it: its repr, cut (a hostile recipe may hold a huge one)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text):,} characters)"


def _suggest_key(key: str, method: Any) -> str:
    """The nearest recipe key, or the method option that was meant (``densty`` -> parameters.density):
    options are compared first, with a strict cutoff, since they belong under ``parameters``."""
    if key.lower() in ("output", "out", "output_dir", "output_path", "out_path", "destination"):
        return " (a recipe does not name its output: give it on the command line, tiesmerge merge RECIPE -o DIR)"
    # mergekit's own keys beside tiesmerge's method: (hp84a c52: base_model was "did you mean 'models'?")
    if key in ("tokenizer_source", "tokenizer"):  # (hp88a c74: no pointer)
        return (f" ({key} is mergekit's key: a tiesmerge recipe writes vocab_policy: union (every model's tokens) or "
                "truncate (the base's); the base's tokenizer is the default)")
    mergekit = {"base_model": "base", "merge_method": "method"}.get(key)
    if mergekit is not None:
        return (f" ({key} is mergekit's key: a tiesmerge recipe writes {mergekit}:; or write the whole recipe in "
                "mergekit's form, with merge_method: instead of method:)")
    classes = [METHODS[method]] if isinstance(method, str) and method in METHODS else list(METHODS.values())
    options = sorted({f.name for cls in classes for f in dataclasses.fields(cls)})
    if key in options:
        return f" ({key!r} is a method option: put it under parameters)"
    close = difflib.get_close_matches(key, options, n=1, cutoff=0.75)
    if close:
        return f" (did you mean the method option parameters.{close[0]}?)"
    return did_you_mean(key, _KEYS)


def recipe_from_dict(data: Any, *, root: Path | None = None, source: str = "recipe") -> MergeRecipe:
    """Validate a parsed recipe; raise one ConfigError listing every problem."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: a recipe is a YAML mapping, got "
                          f"{'nothing (empty)' if data is None else type(data).__name__}",
                          hint="start from an example: tiesmerge merge --help shows one (method:, base:, models:)")
    if is_mergekit(data):
        data = from_mergekit(data, source=source)
    problems: list[str] = []
    name = data.get("method")
    for key in data:
        if key not in _KEYS:
            problems.append(f"unknown key {_short(key)}{_suggest_key(str(key), name)}")
    if name is None:
        problems.append(f"'method' is missing (one of {', '.join(METHODS)})")
    elif not isinstance(name, str):  # e.g. `method: [ties]`: one name, not a list of them
        example = f" (write method: {name[0]})" if isinstance(name, list) and len(name) == 1 and isinstance(
            name[0], str) else ""
        problems.append(f"'method' must be one method name, got {type(name).__name__} {_short(name)}{example}")
    elif name not in METHODS:
        broken = broken_plugins().get(name) if isinstance(name, str) else None  # a plugin that cannot load: why
        unknown = f"unknown method {_short(name)}{method_suggestion(name, list(METHODS))}"
        problems.append(broken.message if broken else unknown)
    base = data.get("base")
    if base is None:
        problems.append("'base' is missing: the path of the model the others were fine-tuned from")
    elif not isinstance(base, (str, os.PathLike)) or not str(base):  # `base: 5` is not the folder "5"
        problems.append(f"'base' must be the path of a model (text), got {type(base).__name__} {_short(base)}")
    models_raw = data.get("models")
    paths: list[str] = []
    weights: list[float | None] = []
    stats: list[str | None] = []
    if not isinstance(models_raw, list) or not models_raw:
        problems.append("'models' must be a non-empty list of paths (or of {path:, weight:})")
        models_raw = []
    for i, entry in enumerate(models_raw):
        if isinstance(entry, (str, os.PathLike)) and str(entry):
            paths.append(_path(entry, root))
            weights.append(None)
            stats.append(None)
        elif isinstance(entry, dict) and "path" in entry:
            if not isinstance(entry["path"], (str, os.PathLike)) or not str(entry["path"]):
                problems.append(f"models[{i}].path must be the path of a model (text), got {_short(entry['path'])}")
                continue
            extra = [k for k in entry if k not in ("path", "weight", "stats")]
            options = {f.name for f in dataclasses.fields(METHODS[name])} if isinstance(name, str) and \
                name in METHODS else None
            for key in extra:  # each named (hp85a c56b: the second of two was not)
                # a method option per model (hp76a c40: a model's density: said as unknown, with no way to say it),
                # pointed where this method takes it (hp87a c74: densities: hinted to methods that have none)
                if key in ("density", "densities"):
                    where = ("; one density per model is parameters: {densities: [...]}, in the models' order"
                             if options is None or "densities" in options else
                             f"; {name} takes one density for every model: parameters: {{density: ...}}"
                             if "density" in options else f"; {name} has no density option")
                elif key == "parameters":  # mergekit's per-model parameters: (hp88a c72: no pointer)
                    where = ("; mergekit's per-model parameters: are, here, the entry's weight: and the recipe's "
                             "top-level parameters: (densities: [...] in the models' order, where the method has it)")
                else:
                    where = "; method options go under parameters:" if key != "model" else ""
                problems.append(f"models[{i}]: unknown key {_short(key)} (a model takes path, weight and stats)"
                                f"{where}")
            paths.append(_path(entry["path"], root))
            weights.append(entry.get("weight"))
            if entry.get("stats") is not None and not isinstance(entry["stats"], (str, os.PathLike)):
                problems.append(f"models[{i}].stats must be a statistics directory, got {_short(entry['stats'])}")
            stats.append(_path(entry["stats"], root) if isinstance(entry.get("stats"), (str, os.PathLike)) else None)
        elif isinstance(entry, dict) and "model" in entry:  # mergekit's entry form (hp87a c75: no pointer)
            problems.append(f"models[{i}]: model: is mergekit's key; a tiesmerge recipe's entry is {{path: "
                            f"{_short(entry['model'], 60)}, weight: ...}} (or write the whole file as a mergekit "
                            "recipe: merge_method:, base_model:, models: [{model: ...}])")
        else:
            problems.append(f"models[{i}]: expected a path or {{path:, weight:}}, got {_short(entry)}")
    params = data.get("parameters") or {}
    if not isinstance(params, dict):
        problems.append("'parameters' must be a mapping of method options")
        params = {}
    params = dict(params)
    if any(w is not None for w in weights):
        if "weights" in params:
            problems.append("weights are given both per model and in parameters.weights; keep one")
        elif any(w is None for w in weights):
            problems.append("give a weight to every model or to none")
        elif isinstance(name, str) and name in METHODS and "weights" not in {
                f.name for f in dataclasses.fields(METHODS[name])}:  # (hp63a c18: "unknown option 'weights' (did
            # you mean 'power_iters'?)", of an option the recipe does not name)
            first = next(i for i, w in enumerate(weights) if w is not None)
            problems.append(f"models[{first}].weight: {name} takes no per-model weight; remove the models' weight: "
                            f"keys (`tiesmerge methods {name}` lists its options)")
        else:
            params["weights"] = weights
    top_stats = data.get("stats")
    if top_stats is not None:
        if not isinstance(top_stats, list) or not all(isinstance(x, (str, os.PathLike)) for x in top_stats):
            problems.append("'stats' must be a list of statistics directories, one per model")
        elif any(x is not None for x in stats):
            problems.append("statistics are given both per model (stats:) and in the top-level stats list; keep one")
        elif len(top_stats) != len(paths):
            # (hp85b c32: "lists 1 directories", hinted about sizes)
            counted = f"{len(top_stats)} statistics director{'y' if len(top_stats) == 1 else 'ies'} for " \
                      f"{len(paths)} model{'' if len(paths) == 1 else 's'}"
            problems.append(f"--stats is given {counted}: give one --stats per --model, in the models' order"
                            if source == "command line" or "--stats" in source else
                            f"'stats' lists {counted}: list one per model, in the models' order")
        else:
            stats = [_path(x, root) for x in top_stats]
    if any(x is not None for x in stats) and any(x is None for x in stats):
        problems.append("give statistics to every model or to none")
    for key, check in (("shard_size", parse_size), ("memory_budget", parse_size)):
        if key in data:
            try:
                check(data[key])
            except ValueError as exc:
                problems.append(f"{key}: {exc}")
    if data.get("dtype") is not None and (not isinstance(data["dtype"], str) or data["dtype"] not in DTYPES):
        problems.append(f"dtype {_short(data['dtype'])} is not one of {', '.join(DTYPES)}")
    if data.get("vocab_policy", "error") not in VOCAB_POLICIES:
        problems.append(f"vocab_policy {_short(data['vocab_policy'])} is not one of {', '.join(VOCAB_POLICIES)}")
    if str(data.get("device", "cpu")).split(":")[0] not in ("cpu", "cuda"):
        problems.append(f"device {_short(data['device'])} is not cpu or cuda")
    if data.get("output_format", "model") not in OUTPUT_FORMATS:
        problems.append(f"output_format {_short(data['output_format'])} is not one of {', '.join(OUTPUT_FORMATS)}")
    rank = data.get("rank")
    if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool) or rank < 1):
        problems.append(f"rank must be a positive integer, got {_short(rank)}")
    elif rank is not None and data.get("output_format", "model") == "model":  # as merge refuses it
        problems.append(f"rank {rank} applies to a merged LoRA adapter only (output_format: adapter), and the output "
                        "is a full model")
    if data.get("output_format") == "adapter" and "shard_size" in data:
        problems.append("shard_size applies to a full model's weights; an adapter is written as one "
                        "adapter_model.safetensors")
    if data.get("origin") is not None and not isinstance(data["origin"], dict):
        problems.append("origin must be a mapping (it records where a translated recipe came from; format: mergekit "
                        "also folds its adapters as mergekit does)")
    for key in ("allow_pickle", "allow_distant"):
        if not isinstance(data.get(key, False), bool):  # bool("no") would be True
            problems.append(f"{key} must be true or false, got {_short(data[key])}")
    files_from = data.get("files_from")
    if files_from is not None:  # one of the merge's inputs, never a new one the output checks would not see
        inputs = [*([_path(base, root)] if isinstance(base, str) else []), *paths]
        if not isinstance(files_from, str) or not any(
                os.path.realpath(_path(files_from, root)) == os.path.realpath(p) for p in inputs):
            problems.append(f"files_from {_short(files_from)} must be the base or one of the models (the input "
                            "whose config and tokenizer files the output copies)")
    method = None
    if isinstance(name, str) and name in METHODS:
        try:
            method = make_method(name, params)
            problems += check_models(method, len(paths))
        except ConfigError as exc:
            problems += exc.problems
            # unknown options stop make_method before the known ones are checked: check those too,
            # so one run reports every problem
            known = {f.name for f in dataclasses.fields(METHODS[name])}
            if any(k not in known for k in params):
                try:
                    known_only = make_method(name, {k: v for k, v in params.items() if k in known})
                    problems += check_models(known_only, len(paths))
                except ConfigError as inner:
                    problems += inner.problems
    if problems:
        hint = ("fix each value named (`tiesmerge merge --help` shows the flags and their units; sizes are like 2GB "
                "or 500MiB)")
        if any(p.startswith("unknown method") for p in problems):  # the methods, not the sizes
            hint = f"the methods are {', '.join(METHODS)}; `tiesmerge methods NAME` shows one's options"
        raise ConfigError([f"{source}: {p}" for p in problems], hint=hint)
    assert method is not None
    return MergeRecipe(method=method, base=_path(base, root), models=tuple(paths), dtype=data.get("dtype"),
                       shard_size=str(data.get("shard_size", DEFAULT_SHARD_SIZE)),
                       memory_budget=str(data.get("memory_budget", DEFAULT_MEMORY_BUDGET)),
                       device=str(data.get("device", "cpu")), vocab_policy=data.get("vocab_policy", "error"),
                       allow_pickle=bool(data.get("allow_pickle", False)),
                       output_format=data.get("output_format", "model"), rank=rank, origin=data.get("origin"),
                       stats=tuple(stats) if stats and all(x is not None for x in stats) else None,
                       allow_distant=bool(data.get("allow_distant", False)),
                       files_from=_path(data["files_from"], root) if data.get("files_from") is not None else None)


def from_mergekit(data: dict[str, Any], *, source: str = "recipe") -> dict[str, Any]:
    """A mergekit recipe as a tiesmerge recipe dict, its source and semantics under ``origin``."""
    recipe, origin = translate_mergekit(data, source=source)
    return {**recipe, "origin": origin}


def load_recipe(path: str | os.PathLike) -> MergeRecipe:
    """Read and validate a YAML recipe file."""
    data = read_recipe_data(path)
    return recipe_from_dict(data, source=os.fsdecode(path) if isinstance(path, bytes) else str(path))


def _check_strings(data: Any, path: Path, where: str = "") -> None:
    """No value holds a NUL byte (a YAML ``\\0`` escape: no path or name can), and no model path is empty (it
    would be read as the recipe's own folder)."""
    if isinstance(data, dict):
        for k, v in data.items():
            _check_strings(v, path, f"{where}.{k}" if where else str(k))
    elif isinstance(data, list):
        for i, v in enumerate(data):
            _check_strings(v, path, f"{where}[{i}]")
    elif isinstance(data, str):
        if "\0" in data:
            raise ConfigError(f"{path}: {where} = {data!r} holds a NUL byte, which no path or name can",
                              hint="remove the \\0 escape")
        key = re.sub(r"\[\d+\]", "", where).rsplit(".", 1)[-1]  # "slices[0].sources[1].model" -> "model"
        if not data.strip() and key in ("base", "base_model", "models", "model", "path", "stats"):
            raise ConfigError(f"{path}: {where} is empty", hint="give the model's path")


def _refuse_output_file(path: Path) -> None:
    """A file tiesmerge wrote into an output given as a recipe: its manifest, or a merge's model card (hp76a c35:
    "16 problems: unknown key 'tiesmerge_version'", and "not valid YAML" of the card, which shows the recipe)."""
    from .paths import OUTPUT_KINDS, is_output_marker

    card = path.name == "README.md" and is_output_marker(path.parent / "tiesmerge.json")
    if not (card or is_output_marker(path)):
        return
    what = "model card" if card else f"manifest ({OUTPUT_KINDS[path.name]})"
    hint = ("a merge's README.md shows the recipe it ran (its ```yaml block, where the merge read files): save that "
            "block as recipe.yaml in the folder the merge ran from, and give that file" if path.name in
            ("README.md", "tiesmerge.json") else "give a recipe (method:, base:, models:); tiesmerge merge --help "
            "shows one")
    raise ConfigError(f"{path}: the {what} of a tiesmerge output, not a recipe", hint=hint)


# keys of a Hugging Face model's config.json that no recipe (tiesmerge's or mergekit's) holds
_MODEL_CONFIG_KEYS = ("model_type", "architectures", "_name_or_path", "transformers_version")


def _refuse_model_config(data: dict[str, Any], path: Path) -> None:
    """A model's config.json given as the recipe (YAML reads JSON): "4 problems: unknown key 'model_type' (did you
    mean 'dtype'?)" listed its keys as a recipe's typos (hp78a c14)."""
    if "method" in data or is_mergekit(data):
        return
    recipe = "and a recipe as a YAML file with method:, base:, models: (tiesmerge merge --help shows one)"
    if "weight_map" in data:  # a sharded model's index: "unknown key 'metadata' / 'weight_map'" (hp81a c20)
        raise ConfigError(f"{path}: a sharded model's index (weight_map), not a recipe",
                          hint=f"give the model's folder as an input (--base {path.parent} or --model {path.parent}), "
                               + recipe)
    if "peft_type" in data:  # an adapter_config.json: "10 problems ... did you mean 'base'?" (hp80a c36)
        # (a copy saved elsewhere, ac.yaml, is no adapter's folder: hp81a c35 was told --model .)
        folder = (f"the adapter's folder as a model (--model {path.parent})" if path.name == "adapter_config.json"
                  else "the adapter's folder (the one holding adapter_config.json and adapter_model.safetensors) as "
                       "a model")
        raise ConfigError(f"{path}: a PEFT adapter's configuration (peft_type {str(data['peft_type'])[:40]!r}), not "
                          f"a recipe", hint=f"give {folder}, {recipe}")
    tokenizer = [k for k in ("added_tokens", "pre_tokenizer", "tokenizer_class", "chat_template", "model_max_length",
                             "added_tokens_decoder", "bos_token", "eos_token", "unk_token", "pad_token") if k in data]
    if not tokenizer and data and len(data) > 8 and all(isinstance(v, int) and not isinstance(v, bool)
                                                        for v in data.values()):
        tokenizer = ["a token -> id vocabulary"]  # vocab.json (hp88a c73), said by what it holds
    if tokenizer:  # a tokenizer.json or tokenizer_config.json: "unknown key 'decoder' (did you mean 'device'?)"
        # (hp87a c90)
        raise ConfigError(f"{path}: a tokenizer's file ({', '.join(tokenizer[:3])}), not a recipe",
                          hint=f"give the model's folder (the one holding its config.json and weights) as an input, "
                               f"{recipe}")
    found = [k for k in _MODEL_CONFIG_KEYS if k in data]
    if not found:
        return
    folder = (f"the model's folder as an input (--base {path.parent} or --model {path.parent})"
              if path.name == "config.json" else "the model's folder (the one holding config.json and its weights) "
                                                 "as an input")
    raise ConfigError(f"{path}: a model's configuration ({', '.join(found)}), not a recipe",
                      hint=f"give {folder}, {recipe}")


def read_recipe_data(path: str | os.PathLike) -> dict[str, Any]:
    """The recipe file as a mapping, its relative paths resolved against the file's folder."""
    from .paths import fs_text

    path = fs_text(path)  # bytes, as merge takes paths
    if not isinstance(path, (str, os.PathLike)):  # load_recipe(5), (None): pathlib's TypeError (hp59a c10)
        raise ConfigError(f"the recipe is a {type(path).__name__}, not the path of a YAML file")
    path = Path(path)
    _refuse_output_file(path)
    if path.suffix.lower() == ".gguf":  # hinted as an input, which then failed as "not a .safetensors file" (hp84a c59)
        raise ConfigError(f"{path}: a GGUF weights file, not a recipe", hint=GGUF_HINT)
    if path.suffix.lower() in (".safetensors", ".bin", ".pt", ".pth", ".ckpt"):  # "not UTF-8 text ...
        # iconv -f LATIN1" of a model's weights given as the recipe (hp81a c19)
        raise ConfigError(f"{path}: a weights file, not a recipe", hint=f"give it (or its folder, {path.parent}) as "
                          "an input: --base or --model; a recipe is a YAML file with method:, base:, models: "
                          "(tiesmerge merge --help shows one)")
    if path.suffix.lower() in (".png", ".jpg", ".jpeg", ".svg", ".pdf", ".html", ".htm"):  # analyze's report and
        # plots: "not valid YAML ... the file is damaged" (hp81a c19, c54)
        raise ConfigError(f"{path}: a report or a plot ({path.suffix.lower()} file), not a recipe",
                          hint="a recipe is a YAML file with method:, base:, models: (tiesmerge merge --help shows "
                               "one); a merge's README.md shows the recipe it ran")
    # the safe loader with size, depth and alias limits: a recipe never runs code, and a
    # "billion laughs" of aliases is refused before it is built (or printed in an error)
    data = read_yaml(path, "the recipe", error=ConfigError)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe is a YAML mapping, got "
                          f"{'an empty file' if data is None else type(data).__name__}",
                          hint="start from an example: tiesmerge merge --help shows one (method:, base:, models:)")
    _refuse_model_config(data, path)
    _check_strings(data, path)
    if is_mergekit(data):  # mergekit's paths are relative to the working directory, as mergekit reads them
        return from_mergekit(data, source=str(path))
    data = dict(data)
    if isinstance(data.get("base"), (str, os.PathLike)):
        data["base"] = _path(data["base"], path.parent)
    if isinstance(data.get("files_from"), (str, os.PathLike)):  # read as base and models are (hp44 c29)
        data["files_from"] = _path(data["files_from"], path.parent)
    if isinstance(data.get("models"), list):
        data["models"] = [_path(m, path.parent) if isinstance(m, (str, os.PathLike)) else
                          {**m, **({"path": _path(m["path"], path.parent)} if isinstance(m["path"], str) else {}),
                           **({"stats": _path(m["stats"], path.parent)} if isinstance(m.get("stats"), str) else {})}
                          if isinstance(m, dict) and "path" in m else m  # not text: left for the check to name
                          for m in data["models"]]
    if isinstance(data.get("stats"), list):
        data["stats"] = [_path(x, path.parent) if isinstance(x, (str, os.PathLike)) else x for x in data["stats"]]
    params = data.get("parameters")
    if isinstance(params, dict) and isinstance(data.get("method"), str) and data["method"] in METHODS:
        # a method's path options (e.g. ties' sign_from) are relative to the recipe's folder too
        types = option_types(METHODS[data["method"]])
        data["parameters"] = {k: _path(v, path.parent)
                              if types.get(k) is ModelPath and isinstance(v, (str, os.PathLike)) else v
                              for k, v in params.items()}
    return data
