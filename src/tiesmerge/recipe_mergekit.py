"""mergekit YAML recipes, read as they are, translated to tiesmerge methods with mergekit's semantics.

mergekit's methods that tiesmerge shares, and what each becomes (mergekit 0.1.5, its
``generalized_task_arithmetic`` and ``linear`` merges):

- ``ties``: per-tensor magnitude trim at each model's own ``density`` (default 1: no trim); the
  weights multiply the trimmed deltas; the sign is elected on the weighted deltas by their sum,
  + where the sum is exactly 0; a model agrees when its weighted delta has the elected sign;
  ``normalize`` (default true) divides by the sum of the agreeing models' weights, else sums;
  ``lambda`` scales the result.  ->  ``ties`` with ``scope=per_tensor, elect=mass,
  zero_sign=positive, aggregate=mean|sum, weights, densities, lam, threshold_ties=sort`` (exactly
  max(1, int(density * numel)) entries per tensor, ties at the threshold in torch.argsort's order, as
  mergekit; the fused engine replays that order without sorting, engine/exactk.py).
- ``task_arithmetic``: base + λ Σ w τ (``normalize`` default false divides by Σ w).
  ->  ``task_arithmetic`` with ``weights``, ``lam`` and ``normalize_weights`` (the division after the sum, by the
  weights' float32 sum, as mergekit's).
- ``linear``: Σ w θ / Σ w over the listed models (``normalize`` default true).
  ->  ``average`` with ``base_weight``: the first listed model read as the base with its weight,
  the others' weights (``base_model`` counts where the models list it); the models' own values summed
  w_i θ_i from 0 in order, then / Σ w, in float32 as mergekit does (bit for bit in float32, and in
  bfloat16 too, where mergekit also accumulates in float32). With ``normalize: false``: the same with
  ``normalize_weights=False``, Σ w_i θ_i undivided, in mergekit's order (weights not summing to 1 scale the
  model, as in mergekit: said in a warning).
- ``dare_ties`` / ``dare_linear``: random drop at ``density`` kept, then TIES's steps / a sum.
  ->  ``dare_ties`` / ``dare_linear`` with ``drop_rate = 1 − density`` (``dare_linear``'s ``normalize`` as
  ``normalize_weights``: the division after the sum, by the weights' float32 sum, as mergekit's). The random
  masks differ (counter-based here, ``torch.bernoulli`` there) and so does the rescale: 1/density here
  (the DARE paper), each tensor's L1 norm there; outputs agree in expectation, not entry by entry
  (at density 1, where nothing is drawn, bit for bit in float32).

Issue 12 added the mergekit family (each the tiesmerge method of the same name, mergekit 0.1.5's
semantics, bit for bit in float32 where no randomness enters):

- ``slerp``: base_model and one other model, ``t`` (a scalar, or mergekit's filters and
  gradients: ``t: [{filter: self_attn, value: [0, 0.5, 1]}, {value: 0.5}]``, read with the
  base's number of layers from its config.json)  ->  ``slerp`` with ``anchor=base``, ``t`` or
  ``t_by_name`` + ``layers``.
- ``nuslerp``: two models and their ``weight`` s, ``nuslerp_flatten`` (default true),
  ``nuslerp_row_wise``; with a base_model their task vectors, else the models  ->  ``nuslerp``.
- ``breadcrumbs`` / ``breadcrumbs_ties``: ``density`` (default 1: nothing dropped), ``gamma``
  (0.01), ``normalize`` (false), ``rescale`` (false), ``lambda``  ->  the method of that name with
  ``scope=per_tensor, threshold_ties=sort`` (mergekit's exact counts in torch.sort's order),
  ``normalize`` as ``normalize_weights`` (or ``aggregate=mean|sum`` for the TIES variant) and
  ``rescale`` as ``rescale=l1|none``.
- ``della`` / ``della_linear``: ``density``, ``epsilon`` (0.15), ``normalize`` (true / false),
  ``rescale`` (true: each tensor's L1 norm restored)  ->  ``della`` / ``della_linear`` with
  ``rescale=l1|none``; the random draws differ (counter-based here, torch.bernoulli there):
  equal to mergekit's only at density 1.
- ``model_stock``: base_model and two or more models, ``filter_wise``  ->  ``model_stock``.

Per-model density, gamma and epsilon must be equal across the models for these (tiesmerge's
Breadcrumbs and DELLA take one value); ``embed_slerp`` is not a parameter of mergekit 0.1.5.

Known entrywise differences in ``ties``: mergekit computes in the recipe's ``dtype`` (bf16
rounding of every intermediate), tiesmerge in float32 with one rounding at the end; k is
int(density·n) there and ⌊density·n⌋ of the density as written here (they differ only where the
float product rounds across an integer). A model entry that is the base itself (mergekit lists it) has τ = 0 and is
dropped. ``model+adapter`` references whose model is the base become the PEFT adapter itself.

Anything else (slices, gradients, per-tensor filters, other methods or keys) is an error that
lists what is not supported.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .dtypes import BY_NAME
from .errors import ConfigError, MergeWarning, TiesMergeError, listed
from .limits import read_json
from .methods.base import FLOAT32_MAX, FLOAT32_TINY, finite
from .methods.dare import MIN_DENSITY
from .methods.ops import dare_keep_probability
from .paths import inside
from .unicode_names import apart, normalization_twin

__all__ = ["MERGEKIT_METHODS", "is_mergekit", "translate_mergekit"]

MERGEKIT_METHODS = ("linear", "task_arithmetic", "ties", "dare_ties", "dare_linear",
                    "slerp", "nuslerp", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear", "model_stock")
_TOP_KEYS = ("merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "tokenizer_source")
_NOT_SUPPORTED_TOP = {
    "slices": "slices (layer ranges, frankenmerges)",
    "modules": "per-module merges (modules:)",
    "tokenizer": "tokenizer surgery (tokenizer:)",
    "chat_template": "chat_template",
}
# the options each method reads, with mergekit's defaults
_OPTIONS: dict[str, dict[str, Any]] = {
    "linear": {"weight": None, "normalize": True},
    "task_arithmetic": {"weight": None, "normalize": False, "lambda": 1.0, "int8_mask": False},
    "ties": {"weight": None, "density": 1.0, "normalize": True, "lambda": 1.0, "int8_mask": False, "rescale": False},
    "dare_ties": {"weight": None, "density": 1.0, "normalize": False, "lambda": 1.0, "int8_mask": False,
                  "rescale": True},
    "dare_linear": {"weight": None, "density": 1.0, "normalize": False, "lambda": 1.0, "int8_mask": False,
                    "rescale": True},
    # issue 12: mergekit 0.1.5's defaults (merge_methods/*.py, generalized_task_arithmetic.py's registry)
    "slerp": {"t": None},
    "nuslerp": {"weight": None, "nuslerp_flatten": True, "nuslerp_row_wise": False},
    "breadcrumbs": {"weight": None, "density": 1.0, "gamma": 0.01, "normalize": False, "lambda": 1.0,
                    "int8_mask": False, "rescale": False},
    "breadcrumbs_ties": {"weight": None, "density": 1.0, "gamma": 0.01, "normalize": False, "lambda": 1.0,
                         "int8_mask": False, "rescale": False},
    "della": {"weight": None, "density": 1.0, "epsilon": 0.15, "normalize": True, "lambda": 1.0, "int8_mask": False,
              "rescale": True},
    "della_linear": {"weight": None, "density": 1.0, "epsilon": 0.15, "normalize": False, "lambda": 1.0,
                     "int8_mask": False, "rescale": True},
    "model_stock": {"filter_wise": False},
}
_PER_MODEL = ("weight", "density", "gamma", "epsilon")
_NEEDS_NO_BASE = ("linear", "nuslerp")  # the methods whose base_model is optional
# the methods that rank a tensor's entries by magnitude (trim, band, keep probabilities): under tokenizer_source union
# their choice in the vocabulary tensors depends on which rows are ranked together
_TRIMMING = ("ties", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear")
_BOOLS = ("normalize", "int8_mask", "rescale", "nuslerp_flatten", "nuslerp_row_wise", "filter_wise")
# the dtype names mergekit recipes use, as tiesmerge's canonical names
_DTYPES = {name: BY_NAME[name].name for name in ("float32", "float16", "bfloat16", "fp32", "fp16", "bf16")}


def _probe(path: str, read: Any) -> Any:
    """``read(checkpoint)`` of a model's safetensors headers, or None for an adapter (model+lora: its factors are no
    model's tensors) or a model that cannot be opened: a probe only, which never fails (the merge opens each input
    itself and names any problem)."""
    from .io.checkpoint import open_checkpoint

    if (Path(path) / "adapter_config.json").is_file():
        return None
    try:
        checkpoint = open_checkpoint(path)
    except Exception:  # noqa: BLE001 - a probe only
        return None
    try:
        return read(checkpoint)
    except Exception:  # noqa: BLE001 - a probe only
        return None
    finally:
        checkpoint.close()


def _stored_float_dtype(path: str) -> str | None:
    """The name of the one floating dtype a model's weights are stored in, or None (see :func:`_probe`)."""
    from .io.checkpoint import stored_float_dtype

    kind = _probe(path, stored_float_dtype)
    return kind.name if kind is not None and kind.name in _DTYPES else None


def _promoted(names: list[str]) -> str:
    """torch's promotion of floating dtypes (by name, without torch): the widest; bfloat16 with float16 is float32."""
    kinds = set(names)
    if len(kinds) == 1:
        return names[0]
    for wide in ("float64", "float32"):
        if wide in kinds:
            return wide
    return "float32"  # bfloat16 and float16 together


def is_mergekit(data: Any) -> bool:
    return isinstance(data, dict) and "merge_method" in data


def _path(value: str) -> str:
    # mergekit resolves local paths against the working directory, not the recipe's folder
    return os.path.expanduser(value)


_REPORTED = object()  # a shared parameter whose problem is already listed


def _scalar(value: Any, where: str, problems: list[str]) -> Any:
    """mergekit parameters may be gradients (lists) or per-tensor filters; only scalars are read: a number, or
    true/false for the switches (normalize, rescale...). YAML's other scalars (a date, !!binary bytes) and a
    boolean where a number belongs (``density: on``) are named, never converted."""
    if isinstance(value, (list, dict)):
        problems.append(f"{where}: {value!r} is a gradient or a per-tensor filter; tiesmerge reads one value "
                        "per model and parameter")
        return None
    key = where.rsplit(".", 1)[-1]
    if key in _BOOLS:  # mergekit's own reader takes 0 and 1 for its switches too
        if not (isinstance(value, bool) or (isinstance(value, int) and value in (0, 1))):
            problems.append(f"{where}: {_short(value)} must be true or false")
            return None
        return bool(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        yaml_bool = " (YAML reads on/off, yes/no and true/false as booleans)" if isinstance(value, bool) else ""
        problems.append(f"{where}: {_short(value)} must be a number{yaml_bool}")
        return None
    if isinstance(value, float) and not math.isfinite(value):  # named with the others, not after a later stage
        problems.append(f"{where}: {value} must be a finite number")
        return None
    if abs(value) > FLOAT32_MAX:  # said with the recipe's key: the method's own check names its translated options
        problems.append(f"{where}: {value:g} is past float32's range (at most {FLOAT32_MAX:.3g}), in which tiesmerge "
                        "(as mergekit) merges")
        return None
    if key != "density" and 0 < abs(value) < FLOAT32_TINY:  # the recipe's key, not "base_weight" (hp78a c37); a
        # density this small has its own words (a fraction too small to keep anything)
        problems.append(f"{where}: {value!r} is below float32's smallest normal number (1.2e-38), in which tiesmerge "
                        "(as mergekit) merges: a product with it is 0; give 0 or at least 1.2e-38")
        return None
    return value


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _long_form(ref: dict, where: str, problems: list[str]) -> str | None:
    """mergekit's long model reference, ``{model: {path: P}, lora: {path: L}}``, as its short form ``P+L`` (hp42
    C33: refused as "a model is a path"). A hub revision or an architecture override has no meaning for the local
    folders tiesmerge reads: refused, named."""
    problems_before = len(problems)
    unknown = sorted(map(str, set(ref) - {"model", "lora", "override_architecture"}))
    if unknown:
        problems.append(f"{where}: unknown key(s) {', '.join(unknown)[:200]} in a model reference (mergekit's long "
                        "form has model: {path: ...} and lora: {path: ...})")
    if ref.get("override_architecture") is not None:
        problems.append(f"{where}: override_architecture is not read: tiesmerge merges tensors by name and keeps the "
                        "architecture of the base's config.json")
    parts = []
    for key in ("model", "lora"):
        part = ref.get(key)
        if part is None and key == "lora":
            continue
        path = part.get("path") if isinstance(part, dict) else None
        if not isinstance(path, str) or not path:
            problems.append(f"{where}.{key}: needs path: a folder (mergekit's long form: {key}: {{path: ...}}), got "
                            f"{_short(part)}")
            continue
        extra = sorted(map(str, set(part) - {"path", "revision"}))
        if extra:
            problems.append(f"{where}.{key}: unknown key(s) {', '.join(extra)[:200]} (a path and a revision are read)")
        if part.get("revision") is not None:
            problems.append(f"{where}.{key}: revision {_short(part['revision'])} names a hub revision; tiesmerge reads "
                            "local folders: give the folder of that revision as path")
        parts.append(path)
    return "+".join(parts) if len(problems) == problems_before else None


def _model_ref(ref: Any, base: str | None, where: str, problems: list[str], *,
               base_refused: bool = False) -> str | None:
    if isinstance(ref, dict):  # mergekit's long form, as its short path[+lora]
        ref = _long_form(ref, where, problems)
        if ref is None:
            return None
    if not isinstance(ref, str):
        problems.append(f"{where}: a model is a path (or mergekit's {{model: {{path: ...}}}}), got {_short(ref)}")
        return None
    if "+" in ref:  # mergekit's model+lora: the model with a LoRA applied
        model, adapter = ref.split("+", 1)
        if Path(_path(ref)).is_dir() and not (Path(_path(model)).exists() and Path(_path(adapter)).exists()):
            problems.append(f"{where}: {ref!r} is a folder here, but mergekit (and tiesmerge) read a '+' in a model "
                            f"as MODEL+LORA ({model!r} with the LoRA {adapter!r}, neither of which exists): rename "
                            "the folder without '+', or link to it under another name")  # hostile pass 31, C47
            return None
        if any(part != part.strip() and not os.path.lexists(_path(part)) for part in (model, adapter)):
            # "base + la1": mergekit splits at '+' as it stands, so 'base ' names no folder (hp80a c26: "applies an
            # adapter to a model other than base_model")
            problems.append(f"{where}: {ref!r} has spaces around '+'; MODEL+LORA is read as it stands, so "
                            f"{model!r} and {adapter!r} name paths with those spaces: write "
                            f"{model.strip()}+{adapter.strip()}")
            return None
        if not adapter.strip():  # "base+": no adapter named (hp82a c89: "'' ... is no PEFT adapter")
            problems.append(f"{where}: {ref!r} names no adapter after '+' (MODEL+LORA: the LoRA's folder); list the "
                            "model on its own if no adapter is meant")
            return None
        if not model.strip():  # "+lora": no model named (hp76a c58: "a model other than base_model")
            problems.append(f"{where}: {ref!r} names no model before '+' (MODEL+LORA: the model the adapter was "
                            "trained on, base_model's path" + (f", {base}" if base is not None else "") + ")")
            return None
        if base is not None and _is_base(_path(model), base):
            folder = Path(_path(adapter))
            # an adapter_config.json that is there but no regular file (a FIFO, a folder) is the IO layer's to name
            # (hp60a c60: "no adapter_config.json", of one that is there)
            if folder.is_dir() and not os.path.lexists(folder / "adapter_config.json"):  # hp30 N5: a full model
                problems.append(f"{where}: {ref!r}: {adapter!r} after '+' is no PEFT adapter (no "
                                "adapter_config.json); mergekit applies an adapter there (list a full model on its "
                                "own)")
                return None
            return _path(adapter)  # the adapter's ΔW is this model's task vector
        if where == "base_model":
            problems.append(f"base_model: {ref!r} applies an adapter to the base itself; tiesmerge reads an adapter "
                            "only as a task vector of its base (list it under models as BASE+ADAPTER, or merge the "
                            "adapter into the base first and give that folder)")
        elif base_refused:  # base_model's own problem is listed: "the recipe has no base_model" would contradict it
            problems.append(f"{where}: {ref!r} applies an adapter, which needs a base_model tiesmerge reads (the "
                            "recipe's is refused above)")
        elif base is None:  # hp36 C18: "a model other than base_model", of a recipe that names none
            problems.append(f"{where}: {ref!r} applies an adapter, and the recipe has no base_model; tiesmerge reads "
                            f"an adapter as a task vector of the base it was trained on: add base_model: {model}")
        else:
            problems.append(f"{where}: {ref!r} applies an adapter to a model other than base_model; tiesmerge reads "
                            "an adapter as a task vector of the base it was trained on")
        return None
    if where != "base_model" and base is not None and os.path.lexists(os.path.join(_path(ref), "adapter_config.json")):
        # hp52 c35: mergekit reads a model entry as a full model and stops on a bare adapter ("Unrecognized model";
        # with a config.json beside it, "Unable to find model files": hp53 c42); a folder holding model weights too
        # is refused when it is opened. Without a base_model the recipe is refused below (hp53 c05)
        warnings.warn(MergeWarning(
            f"{where}: {ref!r} is a PEFT adapter on its own, which mergekit refuses as a model; tiesmerge reads it "
            f"as the base with this adapter, which mergekit writes BASE+ADAPTER ({base}+{ref})"), stacklevel=4)
    return _path(ref)


def translate_mergekit(data: dict[str, Any], *, source: str = "recipe") -> tuple[dict[str, Any], dict[str, Any]]:
    """A mergekit recipe -> (a tiesmerge recipe dict, the origin record for the manifest).

    Raises one ConfigError listing every unsupported key, method or value."""
    problems: list[str] = []
    warnings: list[str] = []
    tokenizer = data.get("tokenizer")
    newer_spelling = False  # the recipe's own key named in what is said of it (hp47 c58)
    if isinstance(tokenizer, dict) and set(tokenizer) == {"source"} and tokenizer["source"] in ("base", "union"):
        newer_spelling = True
        # mergekit's newer spelling of tokenizer_source (its own errors recommend it): read as that (hp45 c37)
        if data.get("tokenizer_source") not in (None, tokenizer["source"]):
            problems.append(f"tokenizer.source {tokenizer['source']!r} and tokenizer_source "
                            f"{data['tokenizer_source']!r} disagree: give one")
        data = {**{k: v for k, v in data.items() if k != "tokenizer"}, "tokenizer_source": tokenizer["source"]}
    for key in data:
        if key in _NOT_SUPPORTED_TOP and data[key] is None:  # mergekit's own default, as tools that dump it write
            continue
        if key == "tokenizer":  # a source of a model's tokenizer, added tokens, padding: what is not read
            problems.append("tokenizer: is read only as {source: base} or {source: union} (tiesmerge copies the "
                            "base's tokenizer or unites the models'); its other settings (tokens:, a model as "
                            "source, pad_to_multiple_of) are not supported")
        elif key in _NOT_SUPPORTED_TOP:
            problems.append(f"{_NOT_SUPPORTED_TOP[key]} is not supported")
        elif key not in _TOP_KEYS:
            problems.append(f"unknown mergekit key {key!r}")
    method = data.get("merge_method")
    if method not in MERGEKIT_METHODS:
        problems.append(f"merge_method {method!r} is not supported (tiesmerge reads {', '.join(MERGEKIT_METHODS)})")
        raise ConfigError([f"{source}: {p}" for p in problems],
                          hint="`tiesmerge methods` lists what each mergekit method becomes; a tiesmerge recipe "
                               "(method:, base:, models:) reaches every method")
    defaults = dict(_OPTIONS[method])
    base = data.get("base_model")
    base = _model_ref(base, None, "base_model", problems) if base is not None else None
    if data.get("base_model") is None and method not in _NEEDS_NO_BASE:  # a wrong value was reported just above
        problems.append(f"base_model is required by {method}")
    tok = data.get("tokenizer_source")
    if isinstance(tok, str) and tok not in ("base", "union") and base is not None and os.path.exists(_path(tok)) \
            and _is_base(_path(tok), base):  # base_model's own path: its tokenizer, as "base" (hp76a c48)
        tok = "base"
    if tok not in (None, "base", "union"):
        problems.append(f"tokenizer_source {tok!r} is not supported (tiesmerge copies the base's tokenizer, "
                        "tokenizer_source: base, or unites the models' vocabularies, tokenizer_source: union, as "
                        "--vocab-policy union does)")
    # -- global parameters: defaults for every model
    shared = data.get("parameters") or {}
    if not isinstance(shared, dict):
        problems.append("parameters must be a mapping")
        shared = {}
    values: dict[str, Any] = {}
    for key, value in shared.items():
        if key not in defaults:
            problems.append(f"parameters.{key} is not a parameter of mergekit's {method} that tiesmerge supports")
            continue
        if method == "slerp" and key == "t" and isinstance(value, (list, dict)):
            values[key] = value  # filters and gradients: translated into t_by_name below
            continue
        read = _scalar(value, f"parameters.{key}", problems)
        values[key] = _REPORTED if read is None else read  # a problem said once, not again where it is used
    # -- models
    entries = data.get("models")
    if not isinstance(entries, list) or not entries:
        problems.append("models must be a non-empty list of {model: PATH, parameters: {...}}")
        entries = []
    paths: list[str] = []
    per_model: dict[str, list[Any]] = {key: [] for key in _PER_MODEL}
    dropped_base = missing_weight = False
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or "model" not in entry:
            problems.append(f"models[{i}]: expected {{model: PATH, parameters: {{...}}}}, got {entry!r}")
            continue
        extra = [k for k in entry if k not in ("model", "parameters")]
        if extra:
            problems.append(f"models[{i}]: key {extra[0]!r} is not supported (a model takes model and parameters)")
        path = _model_ref(entry["model"], base, f"models[{i}].model", problems,
                          base_refused=base is None and data.get("base_model") is not None)  # (hp45 c28)
        if path is None:
            continue
        params = entry.get("parameters") or {}
        if not isinstance(params, dict):
            problems.append(f"models[{i}].parameters must be a mapping")
            params = {}
        for key in params:
            if key not in _PER_MODEL or key not in defaults:
                problems.append(f"models[{i}].parameters.{key} is not a per-model parameter of {method} that "
                                "tiesmerge supports")
        if base is not None and _is_base(path, base) and method not in ("linear",):
            dropped_base = True  # mergekit lists the base among the models; its delta is 0
            continue
        paths.append(path)
        for key in _PER_MODEL:
            if key in defaults:
                value = params.get(key, values.get(key, defaults[key]))
                # a weight nobody gave is said once below ("every model needs a weight"), not as "None" per model;
                # a shared value already reported is not reported again per model
                if value is None and key == "weight":
                    missing_weight = True
                read = (None if value is _REPORTED or (value is None and key == "weight") else
                        _scalar(value, f"models[{i}].parameters.{key}", problems))
                if key == "density" and isinstance(read, (int, float)) and not isinstance(read, bool) and read <= 0:
                    # said with the recipe's other problems (validate lists them all), not by the method later
                    where = f"models[{i}].parameters.density" if key in params else "parameters.density"
                    problem = f"{where}: {read:g} keeps nothing; a density is the fraction of entries kept, in (0, 1]"
                    if problem not in problems:  # a shared value: once
                        problems.append(problem)
                    read = None
                per_model[key].append(read)
    seen: dict[Any, int] = {}
    # linear without base_model reads its first model as the base: a duplicate of it was "the base itself" (hp37b
    # M10); elsewhere the inputs' own check names a duplicate ("model 1 is listed twice")
    # (hp73a c12: a base-less nuslerp listing one folder twice was "model 0 is the base itself")
    checked = paths if method in ("linear", "nuslerp") and base is None else []
    # one model under every name: "list it once" leaves a merge of one model, which linear and nuslerp refuse; the
    # merge of a model with itself is that model (hp76a c01, c02: the hint followed was refused in turn)
    alone = len({_model_key(p) for p in checked}) == 1
    remedy = ("every entry is this one model, and a merge of a model with itself is that model: use the model "
              "itself (or list the other models this merge is meant for)" if alone else
              "list it once, with the sum of its weights")
    for k, p in enumerate(checked):
        key = _model_key(p)
        if key in seen:
            first = paths[seen[key]]
            twin = f" ({apart(first, p)})" if normalization_twin(p, [first]) else ""  # printed alike (hp76a c38)
            problems.append(f"models: {p!r} is listed twice; mergekit refuses duplicate merge inputs too: "
                            + ("list each model once (with the sum of its weights)" if not alone else remedy)
                            if first == p else
                            f"models: {first!r} and {p!r} are one model{twin} (one weights file under two names: a "
                            "link, a hard-linked copy, or a folder and its own file; mergekit would merge it twice as "
                            f"two inputs); {remedy}")
        seen.setdefault(key, k)
    if method == "linear" and base is not None and entries and \
            not any(_is_base(p, base) for p in paths) and \
            not any((Path(p) / "adapter_config.json").is_file() for p in paths):  # LoRA entries: refused below
        # mergekit's planner adds a base_model the models do not list as one more input, after them, with the shared
        # parameters only: without a shared weight mergekit stops ("Missing required parameter weight"); tiesmerge
        # merged the listed models alone and ignored base_model (hp37b M05)
        if values.get("weight") is None:
            problems.append(f"linear: base_model {base!r} is not among models, and mergekit's linear merges it as "
                            "one more model (after the listed ones) with the shared parameters, which give it no "
                            "weight (mergekit stops: 'Missing required parameter weight'); list it under models "
                            "with a weight, give parameters.weight, or leave out base_model")
        else:
            paths.append(base)
            per_model["weight"].append(values["weight"])
    if "weight" in defaults and missing_weight:  # not where a weight given was refused above
        problems.append(f"every model needs a weight (mergekit's {method} requires one: "
                        "models[i].parameters.weight or parameters.weight)")
    options = {k: values.get(k, v) for k, v in defaults.items() if k not in _PER_MODEL}
    for key, value in options.items():
        if key in _BOOLS and not isinstance(value, bool) and value is not _REPORTED:
            problems.append(f"parameters.{key} must be true or false, got {value!r}")
    if options.get("int8_mask"):
        warnings.append("int8_mask is ignored: tiesmerge's masks are never materialised in a chosen dtype")
    dtype, out_dtype = data.get("dtype"), data.get("out_dtype")
    # a dtype problem does not stop the method's own checks below: every problem is listed at once
    dtype_problems = [f"{key} {repr(value)[:80]} is not one of {', '.join(_DTYPES)}"
                      for key, value in (("dtype", dtype), ("out_dtype", out_dtype))
                      if value is not None and (not isinstance(value, str) or value not in _DTYPES)]
    if problems:
        problems += dtype_problems
        raise ConfigError([f"{source}: {p}" for p in problems],
                          hint=f"fix each problem named above; tiesmerge reads mergekit's "
                               f"{', '.join(MERGEKIT_METHODS)} with scalar parameters (slerp's t also with filters "
                               "and gradients): see tiesmerge merge --help")
    weights = [float(w) for w in per_model["weight"]] if "weight" in defaults else []
    if base is None and tok in (None, "base") and method in ("linear", "nuslerp"):
        _refuse_unaligned(paths, tok, problems)
    if method in _FAMILY:
        method_name, params, semantics = _translate_family(method, options, weights, per_model, paths, base,
                                                           problems, warnings, union=tok == "union")
    else:
        method_name, params, semantics = _translate(method, options, weights, per_model["density"], paths, base,
                                                    problems, warnings, base_anchor=method == "linear" and (
                                                        tok is not None or _shapes_differ(paths, base)),
                                                    union=tok == "union")
    problems += dtype_problems
    if problems:  # the recipe's values break the method's rules: each message says which, and how
        hint = (f"fix the values named above in {source}" if not any("config.json" in p for p in problems) else
                "fix what each problem above names (a model's config.json among them, not only the recipe)")
        raise ConfigError([f"{source}: {p}" for p in problems], hint=hint)
    files_from = None
    if "_anchor" in params:
        # the engine's base is the first listed model; the output's config and tokenizer are base_model's, as
        # mergekit writes them (hp42 C54: the first model's were copied)
        named = base if base is not None and method == "linear" else None
        base, paths = params.pop("_anchor"), params.pop("_models")
        # as the models spell it: a hard-linked copy of base_model among them is its entry (hp76a c32)
        files_from = next((p for p in (base, *paths) if _is_base(p, named)), named) if named is not None else None
    named_base = files_from or base  # the recipe's base_model: whose dtype a reader expects the output in
    out_name = out_dtype or dtype
    if out_name is None and base is not None:  # every method: mergekit computes in the promoted dtype (hp44 c17)
        # without a dtype, the output keeps the engine's base's dtype: here one of the models. mergekit stacks the
        # models' tensors, which promotes their dtypes (hp42 C68: a bfloat16 first model rounded a float32 merge;
        # hp43 C04: a bfloat16 base_model beside float32 models is written float32 by mergekit)
        # a BASE+LORA entry is the base with the LoRA folded in, in the base's dtype, as mergekit loads it (hp46
        # c38b: one such entry switched the promotion off, and a bfloat16 base_model's dtype was written)
        on_base = _stored_float_dtype(named_base) if named_base is not None else None
        stored = [_stored_float_dtype(p) or (on_base if os.path.isfile(os.path.join(p, "adapter_config.json"))
                                             else None) for p in (base, *paths)]
        if all(d is not None for d in stored):
            promoted = _promoted(stored)  # type: ignore[arg-type]
            if promoted != stored[0]:
                out_name = promoted
            if promoted != stored[0] or promoted != _stored_float_dtype(named_base):  # (hp45 c30: base_model bf16)
                warnings.append(f"no dtype given: the output is {promoted}, the models' dtypes promoted, as mergekit "
                                "writes it")
    if dtype is not None and _DTYPES[dtype] != "float32":  # float32: nothing differs to warn about (hp44 c33)
        warnings.append(f"arithmetic runs in float32 (mergekit computes in dtype={dtype}); the output is "
                        f"{_DTYPES[out_name]}")
    recipe = {"method": method_name, "base": base, "models": paths, "parameters": params,
              **({"files_from": files_from} if files_from is not None and files_from != base else {})}
    if tok == "base":  # mergekit keeps base_model's tokenizer and its rows of every model's embedding and head:
        recipe["vocab_policy"] = "truncate"  # tiesmerge's truncate (hp43 C26: refused as differing shapes)
    if tok == "union":  # the models' added tokens kept: each new row the mean of the models that hold the token
        recipe["vocab_policy"] = "union"
        warnings.append(f"{tokenizer_words('union', newer_spelling)} runs as --vocab-policy union: the output's "
                        "tokenizer holds every "
                        "model's added tokens, each new embedding row the mean of the models that have the token"
                        + ("; the base's own rows of the embedding and output layers are trimmed among themselves, "
                           "where mergekit ranks them together with the new rows (their deltas against a row it "
                           "makes up for the base), so some old-token rows can differ from mergekit's too"
                           if method in _TRIMMING else ""))  # hp37b V03: said, not silent
    if out_name is not None:
        recipe["dtype"] = _DTYPES[out_name]
    origin = {"format": "mergekit", "merge_method": method, "semantics": semantics,
              "base_listed_among_models": dropped_base, "warnings": warnings}
    if newer_spelling:
        origin["tokenizer_key"] = "tokenizer.source"
    # what an overflow's hint may name: the recipe's own scaling and whether its weights cancel (hp48 c50)
    origin["scaling"] = {k: options[k] for k in ("lambda", "normalize") if k in options}
    if weights:  # normalize divides after the weighted sum: a huge weight overflows before it (hp78a c35)
        origin["scaling"]["largest_weight"] = max(abs(w) for w in weights)
    return recipe, origin


def tokenizer_words(source: str, newer_spelling: bool) -> str:
    """How the recipe spelled its tokenizer source: ``tokenizer: {source: union}`` or ``tokenizer_source: union``."""
    return f"tokenizer: {{source: {source}}}" if newer_spelling else f"tokenizer_source: {source}"


def _shapes_differ(paths: list[str], base: str | None) -> bool:
    """Whether the first listed model's tensors differ in names or shapes from base_model's (a vocabulary a fine-tune
    grew): read from the safetensors headers only; False where either cannot be opened (the merge names that)."""
    if base is None or not paths or _is_base(paths[0], base):
        return False
    shapes = []
    for path in (paths[0], base):
        found = _probe(path, lambda c: {n: tuple(c.info(n).shape) for n in c.names()})
        if found is None:
            return False
        shapes.append(found)
    return shapes[0] != shapes[1]


def _is_base(path: str, base: str) -> bool:
    """Whether an entry reads base_model's weights: by the weights file, as duplicates are told (hp76a c12, c32,
    c38: a hard-linked copy of the base, its index file, or its name in the other Unicode normalization was "a model
    other than base_model", where a link to it was read as the base)."""
    return os.path.realpath(path) == os.path.realpath(base) or _model_key(path) == _model_key(base)


def _model_key(path: str) -> Any:
    """What makes two entries one model: the weights file the entry reads (a folder's model.safetensors, or the file
    itself), by device and inode, so a folder and its own weights file, or a hard-linked copy, are one (hp74a c18,
    c41: "model 0 is the base itself" in a recipe without a base); the resolved path where there is no such file."""
    # a sharded folder by its index (hp75a c04, c05: a hard-linked copy of one was "model 0 is the base itself")
    weights = next((os.path.join(path, n) for n in ("model.safetensors", "model.safetensors.index.json")
                    if os.path.exists(os.path.join(path, n))), path) if os.path.isdir(path) else path
    try:
        found = os.stat(weights)
        return found.st_dev, found.st_ino
    except OSError:
        return os.path.realpath(path) if os.path.exists(path) else path


def _refuse_unaligned(paths: list[str], tok: str | None, problems: list[str]) -> None:
    """A base-less recipe whose models' tensors differ in shape (vocabularies that differ) said in the recipe's terms
    (hp69a c24: "shapes differ between the base and model 0", of a recipe that has no base, its models[1] called
    model 0): without a tokenizer_source, and under tokenizer_source: base where a model has fewer rows than
    models[0], whose tokenizer it keeps (hp72a c03, c39: its cut cannot give a model rows it lacks)."""
    shapes = [_probe(p, lambda c: {n: tuple(c.info(n).shape) for n in c.names()}) for p in paths]
    if any(found is None for found in shapes):
        return  # a folder that cannot be read: the merge names it
    differ = [(k, n) for k in range(1, len(paths)) for n in sorted(shapes[0].keys() & shapes[k].keys())
              if shapes[0][n] != shapes[k][n]]
    # rows models[0]'s tokenizer can cut the others' tables to: theirs are longer, the rest of the shape the same
    shorter = [(k, n) for k, n in differ if len(shapes[k][n]) != len(shapes[0][n]) or shapes[k][n][0] <
               shapes[0][n][0] or shapes[k][n][1:] != shapes[0][n][1:]]
    if tok == "base":
        if shorter:
            k, name = shorter[0]
            problems.append(f"tokenizer_source: base keeps models[0]'s tokenizer ({paths[0]}) and cuts every other "
                            f"model's token tables to it, but models[{k}] ({paths[k]}) has {name!r} of shape "
                            f"{shapes[k][name]} against models[0]'s {shapes[0][name]}: a cut cannot give it rows it "
                            "lacks; use tokenizer_source: union, or list first the model of the smallest vocabulary")
        return
    if differ:
        k, name = differ[0]
        more = sum(1 for j, _ in differ if j == k) - 1
        problems.append(f"models[0] ({paths[0]}) and models[{k}] ({paths[k]}) differ in shape ({name!r}: "
                        f"{shapes[0][name]} and {shapes[k][name]}{f', and {more} more' if more else ''}): "
                        "their vocabularies differ, and the recipe aligns none: add tokenizer_source: union "
                        "(the output's tokenizer holds every model's tokens)" + (
                            ", or tokenizer_source: base (models[0]'s tokenizer: the others' rows cut to it)"
                            if not shorter else ""))


def _union_anchor(paths: list[str]) -> int | None:
    """Which model a base-less linear merge under tokenizer_source: union reads as the engine's base: the first
    whose tokens every other model holds at the same ids (union extends the base's vocabulary by the others' added
    tokens, so the base must be a common part; mergekit's union does not depend on the order, hp69a c24). None where
    no model is; 0 where a tokenizer cannot be read, which the merge names (hp72a c02: said as tokens no model
    shares)."""
    from .io.vocab import read_vocab

    try:
        vocabs = [read_vocab(p, p) for p in paths]
    except TiesMergeError:
        return 0
    for k in sorted(range(len(paths)), key=lambda k: vocabs[k].size):
        own = vocabs[k].tokens
        if all(all(other.tokens.get(i) == text for i, text in own.items())
               for j, other in enumerate(vocabs) if j != k):
            return k
    return None


def _translate(method: str, options: dict[str, Any], weights: list[float], densities: list[Any], paths: list[str],
               base: str | None, problems: list[str], warnings: list[str], *,
               base_anchor: bool = False, union: bool = False) -> tuple[str, dict[str, Any], str]:
    lam = options.get("lambda", 1.0)
    normalize = options["normalize"]
    total = sum(weights)
    if method == "linear":
        adapters = [p for p in paths if (Path(p) / "adapter_config.json").is_file()]
        if adapters:  # hp36 C18: "the base is a PEFT lora adapter", of a recipe whose base was a full model
            problems.append(f"linear: {adapters[0]!r} is a PEFT adapter; tiesmerge's linear reads the "
                            "models' own values, the first standing as the base, and an adapter has none: merge each "
                            "adapter into its model first, or use merge_method: task_arithmetic (normalize: true "
                            "divides by the weights' sum) on base_model")
            return "", {}, ""
        if normalize and total == 0:  # mergekit divides by the sum whatever it is: 3e-9 is a sum (hp70a c16: refused
            # as 0 under a 1e-8 tolerance of tiesmerge's own)
            problems.append("linear: the weights sum to 0, so normalize has nothing to divide by; give weights "
                            "with a nonzero sum (or normalize: false, which sums w_i θ_i undivided)")
            return "", {}, ""
        # normalize: false with weights not summing to 1 is merged as mergekit merges it (hp41 C19: it was refused
        # as inexpressible), and the engine says what it scales by, for flags and recipes alike (hp79a c34)
        # the engine needs a base: the first listed model stands as it, with its weight, so that the
        # models' own values are summed in the list's order, as mergekit does (a base_model the models do
        # not list was appended last above, with the shared weight, as mergekit's planner adds it)
        anchor, at = paths[0], 0
        listed = [k for k, p in enumerate(paths) if base is not None and _is_base(p, base)]
        if base_anchor and listed and listed[0] != 0:
            # base_model as the engine's base where the models' vocabularies differ (or a tokenizer_source is given):
            # the vocabulary is aligned on the base, as mergekit aligns it on base_model (hp43 C25, C26: the first
            # model stood as the base, and its added tokens were "the base's"). The sum then runs in another order
            # than mergekit's: float32 results may differ from its by an ulp
            at = listed[0]
            anchor = paths[at]
            warnings.append("linear: base_model is read as the base (the models' vocabularies differ, or a "
                            "tokenizer_source is given), so the float32 sum runs in another order than mergekit's and "
                            "may differ from its output by an ulp")
        if base is None and union:
            common = _union_anchor(paths)
            if common is None:
                problems.append("linear with tokenizer_source: union and no base_model: no model's tokens are all "
                                "held by every other model at the same ids, and tiesmerge's union extends the "
                                "vocabulary of the model it reads as the base, id for id; give base_model: the model "
                                "they were fine-tuned from")  # (hp73a c49: tokens held at other ids)
                return "", {}, ""
            if common != 0:  # the first model added tokens another lacks: the common one stands as the base
                at, anchor = common, paths[common]
                warnings.append(f"linear: {anchor} (models[{at}]) is read as the base, since every other model "
                                "holds its tokens (tokenizer_source: union extends the base's vocabulary), so the "
                                "float32 sum runs in another order than mergekit's and may differ from its output "
                                "by an ulp")
        others = [(p, w) for k, (p, w) in enumerate(zip(paths, weights)) if k != at]
        if not others:
            problems.append("linear needs at least one model besides the base")
            return "", {}, ""
        if normalize:
            params = {"base_weight": weights[at], "weights": [w for _, w in others], "_anchor": anchor,
                      "_models": [p for p, _ in others]}
            return "average", params, ("mergekit linear: Σ w_i θ_i / Σ w_i over the models' own values in "
                                       f"mergekit's float32 order ({anchor} read as the base, weight "
                                       f"{weights[at]:.10g})")
        # weights summing to 1, no division: Σ w_i θ_i itself, accumulated as mergekit does (θ_0 + Σ w_i (θ_i − θ_0)
        # on the first model differed from it by an ulp in a tenth of the entries, hp40b C61)
        params = {"base_weight": weights[at], "weights": [w for _, w in others], "normalize_weights": False,
                  "_anchor": anchor, "_models": [p for p, _ in others]}
        return "average", params, ("mergekit linear, normalize: false: Σ w_i θ_i over the models' own values, "
                                   f"undivided, in mergekit's float32 order ({anchor} read as the base, weight "
                                   f"{weights[at]:.10g})")
    if method == "task_arithmetic":
        # divided after the sum, by the weights' float32 sum, as mergekit divides (weights divided first differ
        # from mergekit's output by a rounding, hp34 D85)
        return "task_arithmetic", {"lam": lam, "weights": weights, "normalize_weights": bool(normalize)}, (
            "mergekit task_arithmetic: base + λ Σ w_t τ_t" + (" / Σ w" if normalize else ""))
    density_values = [float(d) for d in densities]
    if method == "ties":
        _warn_above_one(method, density_values)
        params: dict[str, Any] = {"scope": "per_tensor", "elect": "mass", "zero_sign": "positive",
                                  "aggregate": "mean" if normalize else "sum", "lam": lam, "weights": weights,
                                  "densities": [min(1.0, d) for d in density_values],  # (density unused then)
                                  "threshold_ties": "sort"}
        bad = [d for d in density_values if not 0 < d]
        if bad:
            problems.append(f"ties: density {bad[0]} keeps nothing; use a fraction in (0, 1]")
        if options.get("rescale"):
            problems.append("ties with rescale: true (norm-preserving trim) is not supported")
        return "ties", params, ("mergekit ties: per-tensor magnitude trim at each model's density (exactly "
                                "max(1, int(density·numel)) entries, ties at the threshold in torch.argsort's "
                                "order), sign elected "
                                "on the weighted deltas by their sum (+ on a zero sum), "
                                + ("normalized by the sum of agreeing weights" if normalize else
                                   "agreeing weighted deltas summed") + ", × λ")
    # dare_ties / dare_linear
    if len(set(density_values)) > 1:
        problems.append(f"{method}: per-model densities {density_values} differ; tiesmerge's DARE drops every "
                        "model at one rate: give every model the same density (ties takes one per model; "
                        "breadcrumbs, DELLA and DARE one for all)")  # (hp65a c24: breadcrumbs was said to take one)
        return "", {}, ""
    density = density_values[0] if density_values else 1.0
    # at density 1 nothing is dropped, so nothing is rescaled: rescale: false is read there (hp45 c50: refused)
    if not options.get("rescale", True) and density != 1:
        problems.append(f"{method} with rescale: false (drop without rescaling) is not supported at density "
                        f"{density}: tiesmerge's DARE rescales what it keeps by 1/density (rescale: true), and at "
                        "density 1 the two agree")
        return "", {}, ""
    if not 0 < density <= 1:
        problems.append(f"{method}: density {density} must be a fraction in (0, 1]")
        return "", {}, ""
    if dare_keep_probability(1.0 - density) == 0.0:  # the drop rate 1 − density rounds to 1 where DARE draws: every
        # entry drops (hp75a c28: said as "drop_rate ... got 1.0", a key mergekit recipes have not; hp76a c09: the
        # bound then said, 1e-15, was refused itself)
        problems.append(f"{method}: density {density!r} keeps a fraction too small for DARE's 24-bit random draw (1 − "
                        "density rounds to 1 in float32, so every entry would drop); give a density of at least "
                        f"{MIN_DENSITY:g}")
        return "", {}, ""
    if density < 1:  # at density 1 nothing is dropped or rescaled on either side: equal entry by entry (hp47 c15)
        warnings.append(f"{method}: the random masks differ from mergekit's (torch.bernoulli) and the survivors are "
                        "rescaled by 1/density (DARE's rule) where mergekit keeps each tensor's L1 norm; the two "
                        "agree in expectation, not entry by entry")
    if method == "dare_ties":  # normalize divides by the agreeing weights, as in ties
        params = {"drop_rate": 1.0 - density, "lam": lam, "weights": weights, "elect": "mass",
                  "aggregate": "mean" if normalize else "sum"}
        warnings.append("dare_ties: where the weighted deltas sum to exactly 0, tiesmerge elects no sign and "
                        "mergekit elects +")
        return "dare_ties", params, ("mergekit dare_ties: random drop at 1 − density with 1/density rescale, sign "
                                     "elected on the weighted deltas by their sum, agreeing deltas "
                                     + ("averaged by weight" if normalize else "summed") + ", × λ")
    # divided after the sum, by the weights' float32 sum, as mergekit divides (weights divided first differ from
    # mergekit's output by a rounding, hp40b C61, as task_arithmetic's did, hp34 D85)
    params = {"drop_rate": 1.0 - density, "lam": lam, "weights": weights, "normalize_weights": bool(normalize)}
    return "dare_linear", params, "mergekit dare_linear: random drop at 1 − density with 1/density rescale, " \
                                  "Σ w_t dare(τ_t)" + (" / Σ w" if normalize else "") + ", × λ"


# ------------------------------------------------------------------------------------------------ issue 12

# a normalized weight from which Σ w θ can leave float32's range on values a model plausibly holds (~1e8 at most)
_HUGE_WEIGHT = 1e30


def overflow_hint(code: str, merge_method: str, scaling: Mapping[str, Any] | None = None) -> str:
    """What helps against an overflow (output dtype ``code``) in a mergekit recipe's terms: its ``dtype``/``out_dtype``,
    its ``lambda`` and its models' weights, never tiesmerge's lam or --dtype, which the recipe does not have or refuses
    (hp44 c23). ``scaling``: the recipe's ``lambda`` and ``normalize`` where known (the translation's origin record):
    weights that normalize cancels are not offered, nor a normalize: true already set (hp48 c50)."""
    scaling = scaling or {}
    wider = ("float16 holds values up to 65504 only: set the recipe's out_dtype (or dtype) to bfloat16 or float32"
             if code == "F16" else "")
    if merge_method in ("slerp", "nuslerp", "model_stock"):  # interpolations: only the inputs can hold such values
        inputs = (f"{merge_method} interpolates between the models, so a merged value past the dtype's range comes "
                  "from values near that range in a model: check the inputs for huge values")
        return f"{wider}; {inputs}" if wider else inputs
    lam = scaling.get("lambda")
    normalized = scaling.get("normalize") is True
    lowered = f"lower parameters.lambda ({lam:g})" if isinstance(lam, (int, float)) and abs(lam) > 1 else ""
    largest = scaling.get("largest_weight")
    if not normalized:
        weights = "lower the models' weight (parameters.weight) in the recipe" + (
            ", or set normalize: true" if merge_method in ("linear", "ties", "dare_ties", "breadcrumbs_ties", "della")
            else "")
    elif isinstance(largest, (int, float)) and largest >= _HUGE_WEIGHT:
        # mergekit multiplies each model's values by its weight and divides the sum by the weights' sum: only the
        # ratio counts, yet a weight of 3e38 overflows float32 before the division (hp78a c35)
        weights = (f"lower the models' weight (parameters.weight) in the recipe, all by one factor (normalize keeps "
                   f"the result the same): each model's values are multiplied by its weight before the division by "
                   f"their sum, and a weight as large as {largest:.3g} overflows there")
    else:
        weights = ""
    weights = ", or ".join(p for p in (lowered, weights) if p)
    if not weights:  # normalized weights and no lambda to lower: only the inputs remain
        inputs = ("the weights are normalized, so lowering them changes nothing: a merged value past the dtype's "
                  "range comes from values near that range in a model; check the inputs for huge values")
        return f"{wider}; {inputs}" if wider else inputs
    if wider:
        return f"{wider}, or {weights}"
    return (f"the output dtype already holds values up to 3.4e38, so a merged value past it comes from the recipe's "
            f"scaling or from inputs near that limit: {weights}, and check the inputs for huge values")


_FAMILY = ("slerp", "nuslerp", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear", "model_stock")


def _one(values: list[Any], key: str, method: str, problems: list[str]) -> float | None:
    """The one value every model shares (tiesmerge's Breadcrumbs and DELLA take one)."""
    numbers = [float(v) for v in values if v is not None]
    if len(set(numbers)) > 1:
        problems.append(f"{method}: per-model {key} values {numbers} differ; tiesmerge's {method} takes one {key}")
        return None
    return numbers[0] if numbers else None


def _layers(base: str | None) -> int | None:
    """The base's number of layers from its config.json (mergekit's num_layers), or None."""
    if base is None or not os.path.lexists(Path(base) / "config.json"):
        return None
    try:  # the limited reader: a FIFO, a huge or deeply nested file is refused, never hangs; never through a link out
        inside(Path(base) / "config.json", base, "the base's config")
        config = read_json(Path(base) / "config.json", "the base's config")
    except TiesMergeError:
        return None
    if not isinstance(config, dict):
        return None
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(config.get(key), int):
            return config[key]
    return None


def _schedule(setting: Any, problems: list[str]) -> str | None:
    """mergekit's filters / gradient for t -> tiesmerge's t_by_name text (see methods/schedule.py)."""
    rules = setting if isinstance(setting, list) and setting and isinstance(setting[0], dict) else [{"value": setting}]
    if isinstance(setting, dict):
        rules = [setting]
    parts = []
    found = len(problems)  # every rule's problems at once, as validate promises (hp70a c15: 2.5 only on a rerun)
    for rule in rules:
        if not isinstance(rule, dict) or "value" not in rule or set(rule) - {"filter", "value"}:
            problems.append(f"parameters.t: {rule!r} is not a {{filter: NAME, value: V}} rule")
            continue
        pattern = rule.get("filter") or "*"
        if not isinstance(pattern, str) or any(c in pattern for c in ";=,"):
            problems.append(f"parameters.t: filter {pattern!r} must be a name fragment without ';', '=' or ','")
            continue
        value = rule["value"]
        values = value if isinstance(value, list) else [value]
        if not values or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            problems.append(f"parameters.t: {value!r} must be a number or a list of numbers")
            continue
        bad = [v for v in values if not 0 <= v <= 1]  # NaN and infinities fail the comparison too
        if bad:  # said here, in the recipe's words, not later as a t_by_name flag
            problems += [f"parameters.t: {v} must be a finite number in [0, 1] (0 is base_model, 1 the model)"
                         for v in bad[:5]]
            continue
        tiny = next((v for v in values if finite(v)), None)  # 1e-300 is 0 in float32 (hostile pass 26, N3)
        if tiny is not None:
            problems.append(f"parameters.t: {tiny!r} {finite(tiny)}")
            continue
        parts.append(f"{pattern}=" + ",".join(repr(float(v)) for v in values))
    if len(problems) > found:
        return None
    if not any(p.startswith("*=") for p in parts):
        problems.append("parameters.t: no rule matches every tensor; end the list with {value: V}")
        return None
    return ";".join(parts)


def _translate_family(method: str, options: dict[str, Any], weights: list[float], per_model: dict[str, list[Any]],
                      paths: list[str], base: str | None, problems: list[str], warnings: list[str], *,
                      union: bool = False) -> tuple[str, dict[str, Any], str]:
    """The issue-12 methods: slerp, nuslerp, breadcrumbs(_ties), della(_linear), model_stock."""
    if method == "slerp":
        if len(paths) != 1:
            problems.append(f"slerp merges base_model with exactly one other model; got {len(paths)} besides the base")
            return "", {}, ""
        t = options.get("t")
        if t is None:
            problems.append("slerp needs parameters.t")
            return "", {}, ""
        if not isinstance(t, (list, dict)) and not 0 <= t <= 1:  # in the recipe's words, as a rule's t is (hp77a
            # c18: "slerp: t must be in [0, 1] (fraction)" with a hint about flags)
            problems.append(f"parameters.t: {t} must be a finite number in [0, 1] (0 is base_model, 1 the model)")
            return "", {}, ""
        if not isinstance(t, (list, dict)):
            return "slerp", {"anchor": "base", "t": float(t)}, (
                f"mergekit slerp: each tensor interpolated on the sphere from base_model (t = 0) at t = {t}, "
                "a lerp where |cos| > 0.9995, float32")
        text = _schedule(t, problems)
        if text is None:
            return "", {}, ""
        params: dict[str, Any] = {"anchor": "base", "t": 0.5, "t_by_name": text}
        if any("," in part for part in text.split(";")):
            layers = _layers(base)
            if layers is None:
                # nothing in the recipe can fix that (hp79a c38: "fix the values named above in the recipe")
                problems.append(f"slerp: t has a gradient, and {base}/config.json gives no num_hidden_layers, which "
                                "spreads it over the layers: add num_hidden_layers to that config.json, or give t as "
                                "plain numbers (a gradient is mergekit's layer-by-layer interpolation)")
                return "", {}, ""
            params["layers"] = layers
        rules = text.split(";")  # thousands of filters made a 431,000-character line (hp41 C64): the first few
        return "slerp", params, ("mergekit slerp from base_model with t per tensor: "
                                 + listed(rules, sep="; ") + (" (all in t_by_name)" if len(rules) > 8 else ""))
    if method == "nuslerp":
        if len(paths) != 2:
            problems.append(f"nuslerp merges exactly two models besides the base; got {len(paths)}")
            return "", {}, ""
        params = {"weights": weights, "flatten": options["nuslerp_flatten"], "row_wise": options["nuslerp_row_wise"],
                  "of": "task_vectors"}
        if base is None:  # the engine needs a base: the first model stands as it, the first endpoint
            from .methods.nuslerp import NuSlerp, t_not_offered

            with t_not_offered():  # mergekit's nuslerp has no t (hp76a c39)
                try:  # the weights' checks, as given by flags: opposite signs summing to ~0, a t outside [0, 1]
                    probe = NuSlerp(weights=tuple(float(w) for w in weights))  # (hostile pass 26, F4)
                    probe.requirements()
                except ConfigError as exc:
                    problems.append(f"the models' weight values: {exc.message}")  # the message names nuslerp
                    return "", {}, ""
                probe.check_tensors({})  # both weights ~0: the midpoint, said
            t = probe.interpolation()  # mergekit's t, in its arithmetic
            common = _union_anchor(paths) if union else 0
            if common != 0:  # union extends the first model's vocabulary, which the second lacks (hp69a c24)
                problems.append("nuslerp with tokenizer_source: union and no base_model: tiesmerge's union extends "
                                "the first model's vocabulary, and " + (
                                    f"models[1] ({paths[1]}) lacks some of models[0]'s tokens: list models[1] first "
                                    "(with the weights swapped too, the interpolation is the same)" if common == 1
                                    else "each model lacks some of the other's tokens: give base_model, the model "
                                    "they were fine-tuned from"))
                return "", {}, ""
            params.update(of="base_and_model", weights=None, t=t, _anchor=paths[0], _models=paths[1:])
        return "nuslerp", params, ("mergekit nuslerp of the two " + ("task vectors, added to base_model"
                                                                     if base is not None else "models"))
    if method == "model_stock":
        if len(paths) < 2:
            problems.append(f"model_stock needs at least two models besides base_model; got {len(paths)}")
            return "", {}, ""
        return "model_stock", {"filter_wise": options["filter_wise"]}, (
            "mergekit model_stock: t = k cos / (1 + (k-1) cos) per " + ("row" if options["filter_wise"] else "tensor")
            + ", cos the mean pairwise cosine of the task vectors")
    density = _one(per_model["density"], "density", method, problems)
    if density is not None and density <= 0:
        problems.append(f"{method}: density {density} keeps nothing; use a fraction in (0, 1]")
    if density is not None:
        _warn_above_one(method, [density])
    lam, normalize = options["lambda"], options["normalize"]
    ties = method in ("breadcrumbs_ties", "della")
    agreement = {"elect": "mass", "zero_sign": "positive", "aggregate": "mean" if normalize else "sum"}
    if method.startswith("breadcrumbs"):
        gamma = _one(per_model["gamma"], "gamma", method, problems)
        if problems:
            return "", {}, ""
        params = {"density": min(1.0, density), "gamma": gamma, "lam": lam, "weights": weights, "scope": "per_tensor",
                  "threshold_ties": "sort", "rescale": "l1" if options["rescale"] else "none"}
        if density >= 1:  # every entry kept: the translation's own settings for a cut are not the recipe's words
            params.update(threshold_ties="keep", rescale="none")
            if gamma == _OPTIONS[method]["gamma"]:
                del params["gamma"]
        params.update(agreement if ties else {"normalize_weights": normalize})
        return method, params, (f"mergekit {method}: per tensor, the int(gamma n) largest |delta| and the smallest "
                                "dropped (exact counts in torch.sort's order), then " + (
                                    "sign election on the weighted deltas, agreeing ones " if ties else
                                    "the weighted deltas ") + ("averaged by weight" if normalize else "summed")
                                + ", × λ")
    epsilon = _one(per_model["epsilon"], "epsilon", method, problems)
    if problems:
        return "", {}, ""
    params = {"density": min(1.0, density), "epsilon": epsilon, "lam": lam, "weights": weights,
              "rescale": "l1" if options["rescale"] else "none"}
    params.update(agreement if ties else {"normalize_weights": normalize})
    if density >= 1:  # nothing is drawn or rescaled: an epsilon the recipe gives is said unused (hp63a c24), not
        # mergekit's defaults it never wrote
        params["rescale"] = "inverse_p"
        if epsilon == _OPTIONS[method]["epsilon"]:
            del params["epsilon"]
        return method, params, (f"mergekit {method} at density 1: nothing dropped or rescaled (mergekit's rule), "
                                + ("sign election, agreeing deltas " if ties else "weighted deltas ")
                                + ("averaged by weight" if normalize else "summed") + ", × λ")
    if density < 1:
        warnings.append(f"{method}: the random draws differ from mergekit's (torch.bernoulli); the keep "
                        "probabilities and the rescale are mergekit's, so the two agree in distribution, not "
                        "entry by entry")
    return method, params, (f"mergekit {method}: MagPrune keep probabilities from each row's magnitude ranks in "
                            "[density - ε, density + ε], " + ("L1 rescale, " if options["rescale"] else "")
                            + ("sign election, agreeing deltas " if ties else "weighted deltas ")
                            + ("averaged by weight" if normalize else "summed") + ", × λ")


def _warn_above_one(method: str, densities: list[float]) -> None:
    """A density above 1 keeps every entry in mergekit, and so here; but it is likely a percent (7 for 0.07)."""
    above = [d for d in densities if d > 1]
    if above:
        warnings.warn(MergeWarning(
            f"{method}: density {above[0]:g} is above 1, so every entry is kept (as mergekit keeps them); a density "
            f"is the fraction kept: {above[0] / 100:g} keeps {above[0]:g} %"), stacklevel=4)
