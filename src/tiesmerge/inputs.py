"""A merge's inputs, opened by role and checked before anything is read: the base, the models,
the method's reference model and its statistics, and the executor that will merge them.

Roles never mix: the reference (TIES's ``sign_from``) is read beside the models against the
real base, never aligned, trimmed or counted as a model; statistics are checked against the
models they belong to.
"""

from __future__ import annotations

import dataclasses
import os
import re
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import adapter_merge
from .distance import check_distances, measure
from .dtypes import BY_NAME, FLOAT32, DType, as_dtype
from .engine.executor import Executor
from .engine.reader import EngineInputs
from .engine.side import SideInputs
from .errors import CheckpointError, ConfigError, IncompatibleCheckpointsError, MergeWarning
from .hub import HubPath, resolve_source
from .io.adapters import adapter_kind, yields_task_vector
from .io.align import _RECOMPUTED, Alignment, align, with_parts
from .io.checkpoint import Checkpoint, open_checkpoint
from .io.ia3 import Ia3Checkpoint, Ia3Folded
from .io.vocab_rows import VOCAB_SUFFIXES
from .lazy import torch
from .methods import TaskArithmetic
from .methods.base import MergeMethod, check_models, warn_unused
from .paths import check_not_input
from .registry import make_method
from .sizes import DEFAULT_MEMORY_BUDGET, parse_size
from .unicode_names import apart, normalization_twin

if TYPE_CHECKING:
    from .stats.files import StatsSource

__all__ = ["Source", "StatsInput", "Prepared", "as_method", "check_inputs", "check_output_not_input", "device_of",
           "budget_of", "check_budget", "check_ordered", "listed_stats", "open_models", "prepare", "resolve_sources"]

Source = "str | os.PathLike | Mapping[str, torch.Tensor]"  # a path, or a state dict
StatsInput = "str | os.PathLike | Statistics | Mapping[str, torch.Tensor]"  # a directory, or statistics in memory


def as_method(method: str | MergeMethod, options: Mapping[str, Any]) -> MergeMethod:
    if isinstance(method, type):  # `merge(base, models, Ties)`: refused with what to pass instead (hp37b A22)
        from .api import method_of_spec

        return method_of_spec(method)
    if isinstance(method, str) and ":" in method:  # "ties:density=0.5", the spec analyze --method takes
        from .api import method_of_spec

        if options:
            raise ConfigError(f"options {sorted(options)} given beside the spec {method!r}, which holds its own",
                              hint="give the options in one place: the spec, or keywords with the plain name")
        return method_of_spec(method)
    if isinstance(method, str):
        return make_method(method, options)
    if options:
        raise ConfigError(f"options {sorted(options)} given beside a method object; set them on the object",
                          hint=f"e.g. dataclasses.replace(method, {next(iter(options))}=...)")
    if not isinstance(method, MergeMethod):
        raise ConfigError(f"method must be a name or a method config such as tiesmerge.methods.Ties(), got {method!r}")
    return method


def _identity(source: Any) -> Any:
    # os.path.realpath, not Path.resolve: a link loop is named by paths.resolve when the model is opened,
    # not a RuntimeError here
    return ("memory", id(source)) if isinstance(source, Mapping) else ("path", Path(os.path.realpath(source)))


def _weights_identity(source: Any) -> frozenset[tuple[int, int]] | None:
    """The (device, inode) of each weights file a path source holds, so that one model given two ways is seen:
    a folder and its only weights file (`--model a/model.safetensors --model a`), or a copy made with hard links
    (``cp -al``). None for state dicts and paths that hold no weights file."""
    if isinstance(source, Mapping):
        return None
    try:
        path = Path(source)
        files = [path] if path.suffix == ".safetensors" else sorted(path.glob("*.safetensors")) if path.is_dir() \
            else []
        found = frozenset((st.st_dev, st.st_ino) for st in (os.stat(f) for f in files))
    except (OSError, ValueError):  # unreadable: the reader names the problem later
        return None
    return found or None


def _check_source(role: str, source: Any) -> None:
    """A model is a path (str or os.PathLike) or a state dict; a path holds no NUL byte (no file system takes one)."""
    if not isinstance(source, (str, os.PathLike, Mapping)):
        raise ConfigError(f"{role} is a {type(source).__name__}, not a path or a state dict",
                          hint="pass a model directory, a .safetensors file or a {name: tensor} mapping")
    if isinstance(source, str) and not source.strip():
        raise ConfigError(f"{role} is an empty path", hint="give the model's directory or file")
    if isinstance(source, Mapping):  # its entries, before anything reads them: a meta, sparse or 12 GB expanded
        # tensor failed in run_search's digest as a NotImplementedError or an allocation (hp81b c01, c26)
        from .io.state_dict import StateDictCheckpoint

        StateDictCheckpoint(source, f"the {role}" if role == "base" else role)
        return
    if "\0" in os.fspath(source):
        raise ConfigError(f"{role}: the path {os.fspath(source)!r} holds a NUL byte, which no file name can",
                          hint="fix the path (in a YAML recipe, a \\0 escape writes one)")


def takes_weights(method: Any) -> bool:
    """Whether a method config has per-model weights (a model given twice can be counted more by one)."""
    return "weights" in getattr(method, "__dataclass_fields__", {})


def check_inputs(base: Any, models: Sequence[Any], weighted: bool = True) -> None:
    """The base and models as inputs of one merge: a non-empty ordered list, none given twice, the base not among
    them. ``weighted``: whether the method takes weights, so a model given twice may be counted more by one (hp71a
    c49: "use --weights" was hinted to slerp, model_stock, fisher and analyze, which take none)."""
    check_ordered(models)
    if isinstance(models, (str, bytes, os.PathLike, Mapping)) or not len(models):  # one path: letter by letter
        raise ConfigError("models must be a non-empty list of fine-tuned models (paths or state dicts)")
    for role, source in (("base", base), *((f"models[{k}]", m) for k, m in enumerate(models))):
        _check_source(role, source)
    seen: dict[Any, int] = {}
    files_seen: dict[frozenset, int] = {}
    base_id, base_files = _identity(base), _weights_identity(base)
    for k, m in enumerate(models):
        ident, files = _identity(m), _weights_identity(m)
        if ident == base_id or (files is not None and files == base_files):
            how = "" if ident == base_id else " (its weights files are the base's)"
            raise ConfigError(f"model {k} ({m if not isinstance(m, Mapping) else 'state dict'}) is the base "
                              f"itself{how}", hint="list only the fine-tuned models after the base")
        if ident in seen or (files is not None and files in files_seen):
            other = seen[ident] if ident in seen else files_seen[files]
            how = "" if ident in seen else " (the same weights files)"
            raise ConfigError(f"model {k} is listed twice (also model {other}){how}: "
                              f"{m if not isinstance(m, Mapping) else 'the same state dict object'}",
                              hint="each fine-tuned model should appear once" + (
                                  f"; use {weights_option} to count one more" if weights_option and weighted
                                  else ""))
        seen[ident] = k
        if files is not None:
            files_seen[files] = k


def option_inputs(method: str | type, options: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """The models a method's options name (e.g. TIES' ``sign_from``): inputs too, which no output may replace.
    ``options``: option -> value, or -> the values a grid tries."""
    from .methods.base import ModelPath, option_types
    from .registry import method_class

    types = option_types(method_class(method) if isinstance(method, str) else method)
    found = []
    for name, value in options.items():
        if types.get(name) is ModelPath:
            values = value if isinstance(value, (list, tuple)) else (value,)
            found += [(f"the reference model ({name})", v) for v in values if isinstance(v, (str, os.PathLike))]
    return found


def method_inputs(method: Any) -> list[tuple[str, Any]]:
    """The models a configured method reads beside the base and the task models (its ModelPath options)."""
    import dataclasses

    return option_inputs(type(method), {f.name: getattr(method, f.name) for f in dataclasses.fields(method)})


def check_output_not_input(output: str | os.PathLike, named: Sequence[tuple[str, Any]]) -> None:
    """The output directory is replaced as a whole (with force=True), so it must not be, contain,
    or lie inside an input (``named``: (role, source) pairs), links followed: see ``tiesmerge.paths``."""
    check_not_input(output, named)


# the device's hints name the value, not a flag: it may come from a recipe's device: or the API (hp84a c58)
_CPU_OR_CUDA = "give cpu or cuda (--device on the command line, device: in a recipe)"


def device_of(device: Any) -> str | torch.device:
    """"cpu" (a string: the fused CPU path never imports torch), or a CUDA torch.device."""
    if str(device).split(":")[0] not in ("cpu", "cuda"):
        raise ConfigError(f"device {device!r} is not cpu or cuda", hint=_CPU_OR_CUDA)
    if str(device) == "cpu":
        return "cpu"
    if str(device).startswith("cpu:"):  # torch takes and ignores an index for the CPU: a typo, not a device
        raise ConfigError(f"device {device!r}: the CPU takes no index", hint="give cpu, without an index")
    try:
        device_t = torch.device(device)
    except (RuntimeError, TypeError):  # torch's own message lists every backend it knows, not what we take
        raise ConfigError(f"device {device!r} is not cpu or cuda", hint=_CPU_OR_CUDA) from None
    if device_t.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' was asked for but no CUDA device is available", hint="give cpu instead")
    return device_t


def budget_of(memory_budget: int | str | None) -> int:
    try:
        return parse_size(memory_budget if memory_budget is not None else DEFAULT_MEMORY_BUDGET)
    except ValueError as exc:
        raise ConfigError(f"memory_budget: {exc}") from None


def _label(source: Any, default: str) -> str:
    if isinstance(source, HubPath):
        return source.label  # named by its repo id: the manifest and the card carry it
    return default if isinstance(source, Mapping) else str(source)


def check_ordered(models: Any) -> None:
    """Models given as a set have no order: per-model options (weights, densities, statistics) bind to the models by
    position, and a set's order changes with PYTHONHASHSEED (hp40b C43: weights [1, 0] merged ftA under one seed and
    ftB under another)."""
    if isinstance(models, (set, frozenset)):
        raise ConfigError(f"models must be a list or tuple, not a {type(models).__name__}: a set has no order, and "
                          "per-model options (weights, densities, statistics) are matched to the models by position",
                          hint="pass the models as a list, in the order of their per-model options")


def listed_stats(stats: Any) -> Any:
    """``stats`` with an iterator (a generator) read into a list once: counted against the models, it was used up
    and then read as "0 statistics given for 2 models" (hp71a c50); a set refused as models' is (no order); anything
    else as given, for the checks to name."""
    if isinstance(stats, (set, frozenset)):
        raise ConfigError(f"stats must be a list or tuple, not a {type(stats).__name__}: a set has no order, and "
                          "statistics are matched to the models by position",
                          hint="pass the statistics as a list, in the models' order")
    if isinstance(stats, Iterator):
        return list(stats)
    return stats


def resolve_sources(base: Any, models: Any) -> tuple[Any, Any]:
    """``org/name[@revision]`` names that are not local paths, resolved from the local Hugging Face
    cache (tiesmerge.hub, no network); everything else as given."""
    from .paths import fs_text  # bytes paths, and PathLikes returning bytes: Python's str for them

    base = fs_text(base)
    check_ordered(models)
    if isinstance(models, (str, bytes, os.PathLike, Mapping)):
        return resolve_source(base), fs_text(models)  # check_inputs reports it
    if not isinstance(models, Iterable):  # models=5, None: a TypeError of the loop below (hp59a c58)
        raise ConfigError(f"models must be a non-empty list of fine-tuned models (paths or state dicts), got "
                          f"{type(models).__name__}")
    return resolve_source(base), [resolve_source(fs_text(m)) for m in models]


def _open(stack: ExitStack, source: Any, allow_pickle: bool, label: str, role: str = "the model") -> Checkpoint:
    if isinstance(source, (str, os.PathLike)):  # a statistics folder's Fisher values merged as weights (hp61a c41)
        folder = Path(source) if os.path.isdir(source) else Path(source).parent
        if os.path.lexists(folder / "tiesmerge_stats.json"):
            raise CheckpointError(f"{source}: {role} is a statistics folder (tiesmerge_stats.json: what tiesmerge "
                                  "stats wrote), not a model: its tensors are Fisher or Gram values",
                                  hint="give the model folder the statistics were computed from; statistics are "
                                       "read by the methods that use them (merge --method fisher or regmean with "
                                       "--stats, or stats: in a recipe)")  # analyze has no --stats (hp62a c26)
    ckpt = open_checkpoint(source, allow_pickle=allow_pickle, label=label, role=role)
    stack.callback(ckpt.close)
    return ckpt


def refuse_adapter_base(base_ckpt: Checkpoint) -> None:
    """An adapter given as the base: it holds changes to a model, not the model itself (refused by merge, and by tune
    and search, where it was "unexpected RuntimeError: bind(base) the adapter", hp88b c75)."""
    if yields_task_vector(base_ckpt):
        kind = getattr(base_ckpt, "adapter_kind", None) or "adapter"
        raise ConfigError(f"{base_ckpt.label}: the base is a PEFT {kind} adapter, not a model",
                          hint="the base is the full model the adapters were trained on (base_model_name_or_path in "
                               "their adapter_config.json); give adapters as models (--model, models: in a recipe, "
                               "BASE+ADAPTER in a mergekit recipe)")  # (hp54 c46: --base is refused over a recipe)


def open_models(stack: ExitStack, base: Any, models: Sequence[Any], allow_pickle: bool
                ) -> tuple[Checkpoint, list[Checkpoint]]:
    """The base and the models, opened (and closed by ``stack``)."""
    base_ckpt = _open(stack, base, allow_pickle, _label(base, "base state dict"), role="the base")
    refuse_adapter_base(base_ckpt)
    return base_ckpt, [_open(stack, m, allow_pickle, _label(m, f"models[{k}] state dict"))
                       for k, m in enumerate(models)]


def _open_reference(stack: ExitStack, path: str | None, base: Any, base_ckpt: Checkpoint, models: list[Checkpoint],
                    allow_pickle: bool) -> Checkpoint | None:
    """The method's reference model (TIES's ``sign_from``), bound to the real base if an adapter."""
    if path is None:
        return None
    if not isinstance(base, Mapping) and os.path.realpath(path) == os.path.realpath(base):
        raise ConfigError(f"the reference {path} is the base itself: its task vector is 0, so it says nothing",
                          hint="point sign_from at a model fine-tuned from the base, e.g. a multitask model")
    if adapter_kind(models) == "ia3":
        raise ConfigError("a reference model (sign_from) cannot be used with (IA)³ adapters: they merge scaling "
                          "vectors, not weight changes", hint="fold each (IA)³ adapter into its base model first")
    reference = _open(stack, path, allow_pickle, f"{path} (reference)", role="the reference model (sign_from)")
    if yields_task_vector(reference):
        if getattr(reference, "adapter_kind", None) != "lora":
            raise ConfigError(f"{path}: an (IA)³ adapter cannot be a reference model: its vectors scale weights and "
                              "give no signs", hint="point sign_from at a model fine-tuned from the base, or at a LoRA "
                                                    "adapter of it")  # hp30 N4
        reference.bind(base_ckpt)  # type: ignore[attr-defined]
    return reference


def _check_reference(reference: Checkpoint, alignment: Alignment, vocab_policy: str = "error") -> None:
    """The reference must hold every merged tensor with its shape (it is never aligned as a model,
    so its other tensors, and tensors the models do not change, do not matter); under ``truncate`` a vocabulary
    tensor of more rows gives its first ones, as a model's does (hp64a c120: refused, though the hint that led
    there promised it)."""
    names = set(reference.names())
    if yields_task_vector(reference):  # an adapter changes only the tensors it targets: its sign is 0 elsewhere
        merged = [j.name for j in alignment.jobs if j.merge]
        missing = [n for n in merged if n not in names]
        if missing:
            warnings.warn(MergeWarning(
                # the label already says "(reference)" (hp40b C51: "the reference X (reference) (an adapter)")
                f"{reference.label}, an adapter, changes {len(merged) - len(missing)} of the "
                f"{len(merged)} merged tensors; on the other {len(missing)} (e.g. {missing[0]!r}) its sign is 0 "
                "everywhere, so no model's entry agrees with it and the merge keeps the base's values there"),
                stacklevel=3)
        return
    for job in alignment.jobs:
        if not job.merge:
            continue
        if job.name not in names:
            twin = normalization_twin(job.name, names)  # (hp74a c63: names printed alike, "another base")
            raise IncompatibleCheckpointsError(
                f"{reference.label}: the reference lacks tensor {job.name!r} {job.shape}, which is merged",
                hint=f"{apart(job.name, twin)}: save the reference's tensor names in the models' form" if twin else
                "the reference must be fine-tuned from the same base as the models")
        info = reference.info(job.name)
        shape = tuple(info.shape)
        more_rows = len(shape) == len(job.shape) >= 1 and shape[1:] == tuple(job.shape[1:]) and \
            shape[0] > job.shape[0] and job.name.endswith(VOCAB_SUFFIXES)
        if more_rows and vocab_policy == "truncate" and info.dtype.is_floating_point:
            continue  # its first rows are the base's tokens' (read by row, as a model's)
        if shape != tuple(job.shape) or not info.dtype.is_floating_point:
            hint = "the reference must be fine-tuned from the same base as the models"
            if more_rows:  # a reference that added tokens (hp64a c121)
                hint = (f"the reference's vocabulary grew ({shape[0]} rows, the base's {job.shape[0]}): "
                        "--vocab-policy truncate merges the base's rows, the reference's first rows among them")
            # both dtypes said: "(8, 8) int8, but the base's is (8, 8)" read as equal shapes refused (hp84a c38)
            raise IncompatibleCheckpointsError(
                f"{reference.location(job.name)}: tensor {job.name!r} of the reference is {shape} "
                f"{str(info.dtype).removeprefix('torch.')}, but the base's is {tuple(job.shape)} "
                f"{job.dtype_info.name}" + ("" if info.dtype.is_floating_point else
                                            ": a reference's tensors must be floating, as the models' are"),
                hint=hint)
    # tensors the base lacks are never read (a multitask reference's own heads are fine), but not unseen: a reference
    # of a bigger architecture passed silently where the same checkpoint as a model is refused (hp85a c57)
    held = {j.name for j in alignment.jobs} | {a for j in alignment.jobs for a in j.aliases}
    extra = sorted(n for n in names - held if not _RECOMPUTED.search(n))
    if extra:
        warnings.warn(MergeWarning(
            f"{reference.label}: the reference holds {len(extra)} tensor(s) the base lacks, first {extra[0]!r}; they "
            "are not read (only the merged tensors take their signs from it): check that it was fine-tuned from this "
            "base"), stacklevel=3)


# How the caller passes statistics, for the hint when a data-aware method has none: the Python API's keyword by
# default; the command line sets what the running command takes ("--stats": merge; "stats:": validate, a recipe's
# key; None: analyze, tune, search, adapt take none), so a hint never names an option the command lacks.
stats_option: str | None = "stats="
# the same for per-model weights (a method option): merge and validate take them; analyze, tune, search, adapt do not
weights_option: str | None = "weights="


def _stats_hint(kind: str) -> str:
    compute = f"compute them with 'tiesmerge stats {kind} --model MODEL --data DATA -o DIR'"
    if stats_option is None:
        return (f"this command takes no statistics, so this method cannot run here: choose one that needs none "
                f"(e.g. ties), or {compute} and merge with 'tiesmerge merge' (one --stats DIR per --model)")
    if stats_option == "stats=":
        return f"{compute}, then pass stats=[one directory per model], in the models' order"
    if stats_option == "stats:":
        return f"{compute}, then list them in the recipe's stats: (one directory per model, in the models' order)"
    return f"{compute}, then pass one {stats_option} DIR per --model, in the same order"


def _refuse_unused_stats(method: MergeMethod, stats: Sequence[Any] | None) -> None:
    if stats and method.requirements().statistics is None:
        raise ConfigError(f"statistics were given, but method {method.name!r} does not use them",
                          hint="statistics serve the data-aware methods: fisher, regmean")


def _open_side(stack: ExitStack, method: MergeMethod, stats: Sequence[Any] | None, models: list[Checkpoint],
               alignment: Alignment, device: Any, progress: Any) -> tuple[SideInputs | None, list[StatsSource]]:
    """The per-model statistics of a data-aware method (Fisher, RegMean), opened and checked."""
    spec = method.requirements().statistics
    if spec is None:
        _refuse_unused_stats(method, stats)
        return None, []
    if not stats:
        raise ConfigError(f"method {method.name!r} needs {spec.kind} statistics of every model",
                          hint=_stats_hint(spec.kind))
    from .stats.files import Statistics, open_stats  # torch: only data-aware methods read statistics

    if isinstance(stats, (str, bytes, os.PathLike, Mapping, Statistics)):
        raise ConfigError("stats must be a list: one statistics directory (or object) per model")
    from .paths import fs_text

    stats = [fs_text(s) for s in stats]  # bytes paths, as the models' (hp45 c24)
    _refuse_shared_stats(stats)
    opened = []
    for k, source in enumerate(stats):
        label = str(source) if isinstance(source, (str, os.PathLike)) else f"stats[{k}]"
        src = open_stats(source, kind=spec.kind, label=label)
        stack.callback(src.close)
        opened.append(src)
        if isinstance(source, (str, os.PathLike)) and src.manifest is not None and k < len(models) \
                and models[k].files():
            _check_recorded_digest(source, src.manifest.model_digest, k, models[k].label)
    side = SideInputs(spec, [o.checkpoint for o in opened], models, alignment, device=device, progress=progress)
    return side, opened


def _refuse_shared_stats(stats: Sequence[Any]) -> None:
    """One statistics folder given for two models: statistics are one model's (its Fisher values, its inputs' Gram
    matrices), and where their digest was of in-memory tensors nothing else would tell (hp68a c29: merged)."""
    seen: dict[str, int] = {}
    for k, source in enumerate(stats):
        if not isinstance(source, (str, os.PathLike)) or not os.path.isdir(source):
            continue
        real = os.path.realpath(source)
        if real in seen:
            raise ConfigError(f"the statistics of model {k} ({os.fspath(source)}) are those of model {seen[real]} "
                              "(the same folder): statistics belong to one model",
                              hint="compute each model's own statistics (tiesmerge stats ... --model MODEL) and give "
                                   "them in the models' order")
        seen[real] = k


_DIGEST = re.compile(r"(files|tensors):[0-9a-f]{64}")  # what tiesmerge stats records (stats.files.model_digest)


def _check_recorded_digest(source: Any, recorded: Any, k: int, label: str) -> None:
    """A statistics directory is checked against its model's files (manifest.check_stats_digests): a manifest whose
    digest is missing, empty or malformed (model_digest: null, "", "sha256:...") would switch that check off unseen
    (hostile pass 26, F5); one of in-memory tensors ("tensors:...", the API's) cannot be checked against files, and
    that is said."""
    if not isinstance(recorded, str) or not _DIGEST.fullmatch(recorded):
        shown = "null" if recorded is None else repr(recorded[:40] + ("..." if len(recorded) > 40 else "")) \
            if isinstance(recorded, str) else repr(recorded)
        raise IncompatibleCheckpointsError(
            f"{source}: the statistics manifest records no usable model digest (model_digest: {shown}; tiesmerge "
            "records files:<sha256>), so tiesmerge cannot check that these statistics belong to model "
            f"{k} ({label})",
            hint="recompute them with tiesmerge stats (which records the digest), or record it: "
                 "StatsManifest(..., model_digest=tiesmerge.stats.files_digest(MODEL_DIR))")
    if recorded.startswith("tensors:"):
        warnings.warn(MergeWarning(
            f"{source}: these statistics record a digest of in-memory tensors (computed through the Python API), "
            f"which tiesmerge cannot check against model {k}'s files ({label}): make sure they are its statistics"),
            stacklevel=4)


def requested_dtype(dtype: Any) -> DType | None:
    """The output dtype: a name (bf16, float32, ...), a torch dtype or a descriptor; floating."""
    if dtype is None:
        return None
    try:
        out = as_dtype(dtype)
    except (TypeError, ValueError):
        out = None
    if out not in BY_NAME.values():
        raise ConfigError(f"dtype {dtype!r} is not an output dtype", hint=f"use one of {', '.join(BY_NAME)}")
    return out


@dataclass(frozen=True)
class Prepared:
    """Everything a merge needs, opened and checked: the checkpoints by role and the executor."""

    base: Checkpoint
    models: list[Checkpoint]
    reference: Checkpoint | None
    executor: Executor
    stats: list[StatsSource]
    vocab: Any = None  # io.vocab_rows.VocabLayout of a vocabulary union that adds rows, else None
    distances: tuple = ()  # distance.ModelDistance per model: how far each is from the base


def _check_tokenizers(base: Checkpoint, models: list[Checkpoint]) -> None:
    """Model directories whose tokenizers give a shared id different strings: an error (io.vocab)."""
    from .io.vocab import check_same_tokens

    if base.directory() is None or yields_task_vector(base):
        return
    check_same_tokens((Path(base.directory()), base.label),
                      [(k, Path(m.directory()), m.label) for k, m in enumerate(models)
                       if m.directory() is not None and not yields_task_vector(m)], rows=_vocab_rows(base))


def _union_inputs(base: Checkpoint, models: list[Checkpoint], method: MergeMethod, stats: Sequence[Any] | None,
                  out_dtype: DType | None) -> tuple[Checkpoint, list[Checkpoint], Any, dict[str, tuple[str, int]]]:
    """``vocab_policy="union"``: the tokenizers read and united, the inputs seen through the union
    (io.vocab, io.vocab_rows). Full model directories only: the tokenizers live beside the weights."""
    from .io.vocab import read_vocab, union_of
    from .io.vocab_rows import layout_of, views_of

    req = method.requirements()
    _refuse_unused_stats(method, stats)  # before blaming statistics the method never reads (hp30 N6)
    adapters = any(yields_task_vector(c) for c in models)
    why = ("a PEFT adapter is among the inputs" if adapters else
           f"method {method.name!r} reads a reference model" if req.reference is not None else
           f"method {method.name!r} reads per-model statistics" if req.statistics is not None else None)
    if why:  # a hint for the case at hand: the vocabularies' extra rows exist only in the models' own tensors
        from .io.align import policy_words  # a mergekit recipe's own key, not the flag refused over it (hp57 c83)

        union, truncate = (policy_words[p].split(" (")[0] for p in ("union", "truncate"))
        # (not truncate for adapters: an adapter's resized vocabulary is refused under it too, hp56 c147)
        hint = ("fold each adapter into its model first (PeftModel.merge_and_unload) and merge those directories "
                f"with {union}; adapters trained on the base's own vocabulary need no {union}"
                if adapters else
                f"{truncate} merges the base's rows (the reference and the statistics cover them), or "
                "merge with a method that reads only the models")
        raise ConfigError(f"{union} cannot be used here: {why}", hint=hint)
    unread = next((c for c in (base, *models) if c.directory() is None), None)
    if unread is not None:
        raise ConfigError(f"--vocab-policy union reads each model's tokenizer, but {unread.label} is not a model "
                          "directory", hint="give the base and the models as Hugging Face model directories")
    base_vocab = read_vocab(base.directory(), base.label)
    _check_base_rows(base, base_vocab.size)
    union = union_of(base_vocab, [read_vocab(m.directory(), m.label) for m in models])
    layout = layout_of(base, models, union)
    if layout is None:
        return base, models, None, {}
    base_view, model_views, routes = views_of(base, models, layout, out_dtype)
    return base_view, model_views, layout, routes


def _vocab_rows(base: Checkpoint) -> int | None:
    """The fewest rows among the base's token tables (embeddings, heads), or None where it has none."""
    tables = [base.info(n).shape[0] for n in base.names() if n.endswith(VOCAB_SUFFIXES) and base.info(n).shape]
    return min(tables, default=None)


def _check_base_rows(base: Checkpoint, tokens: int) -> None:
    """A base whose tokenizer holds more tokens than its token tables have rows (a tokenizer of another model saved
    beside it): the union placed tokens past them and blamed the models (hp64a c173, c174)."""
    rows = _vocab_rows(base)
    if rows is not None and tokens > rows:
        raise IncompatibleCheckpointsError(
            f"{base.label}: the base's tokenizer holds {tokens:,} tokens, but its token tables have {rows:,} rows: "
            f"ids {rows:,} and up have no row in the base itself",
            hint="the base's tokenizer files are another model's (a fine-tune's with added tokens?): put the base's "
                 "own tokenizer beside its weights")


def check_booleans(**flags: Any) -> None:
    """Switches of the Python API are true or false, as a recipe's are: ``allow_distant="no"`` is a
    non-empty string, so truthy, and would merge the very models it meant to refuse."""
    wrong = [f"{name}={value!r} must be True or False" for name, value in flags.items() if not isinstance(value, bool)]
    if wrong:
        raise ConfigError(wrong)


def _check_ia3_entries_as_adapter(models: list[Checkpoint]) -> None:
    """A mergekit recipe's (IA)³ entries written as a merged adapter (tiesmerge's own option: mergekit writes full
    models): an (IA)³ adapter holds scaling vectors, so they are merged as vectors, not folded as mergekit merges
    them; said so, and refused beside entries no (IA)³ adapter can hold (hp59a c13, c14)."""
    other = next((c for c in models if not isinstance(c, Ia3Checkpoint)), None)
    if other is not None:
        raise ConfigError(f"a merged adapter (--output-format adapter) cannot hold this recipe's (IA)³ entries beside "
                          f"{other.label} ({'a LoRA adapter' if yields_task_vector(other) else 'a full model'}): "
                          "mergekit folds each entry into the base, and only a full model holds their merge",
                          hint="leave out --output-format adapter (output_format: model) to write the full model")
    warnings.warn(MergeWarning(
        "the recipe's (IA)³ entries are merged as scaling vectors (l − 1) into an (IA)³ adapter, not as mergekit "
        "merges them (folded into the base, W·l, and trimmed and elected on the weights' changes, which no (IA)³ "
        "adapter can hold); leave out --output-format adapter for mergekit's merge"), stacklevel=4)


def prepare(stack: ExitStack, base: Any, models: Sequence[Any], method: MergeMethod, *, device: str,
            memory_budget: int | str | None, dtype: str | torch.dtype | None, vocab_policy: str,
            allow_pickle: bool, progress: Any = None, output_format: str = "model",
            stats: Sequence[Any] | None = None, allow_distant: bool = False, fold_like_peft: bool = False
            ) -> Prepared:
    """Open the inputs (closed by ``stack``), align them, check every role, measure how far each
    model is from the base (a distant model is an error unless ``allow_distant``), plan the merge.
    ``fold_like_peft``: adapters read as mergekit reads a MODEL+LORA entry (folded into the base in its dtype; a merged
    adapter's output merges LoRA's task vectors and (IA)³'s vectors as the command line does)."""
    check_booleans(allow_pickle=allow_pickle, allow_distant=allow_distant)
    check_inputs(base, models, takes_weights(method))
    problems = check_models(method, len(models))
    if problems:
        raise ConfigError(problems)
    req = method.requirements()
    device_t, budget = device_of(device), budget_of(memory_budget)
    out_dtype = requested_dtype(dtype)
    base_ckpt, model_ckpts = open_models(stack, base, models, allow_pickle)
    _refuse_quantized([("the base", base_ckpt), *(("a model", c) for c in model_ckpts)],
                      adapters_only=output_format == "adapter")
    for ckpt in model_ckpts if fold_like_peft else ():
        if hasattr(ckpt, "fold_like_peft"):
            ckpt.fold_like_peft = True
    if fold_like_peft and output_format == "model":  # mergekit folds an (IA)³ entry too (PEFT's merge_and_unload)
        model_ckpts = [Ia3Folded(c) if isinstance(c, Ia3Checkpoint) else c for c in model_ckpts]
    elif fold_like_peft and any(isinstance(c, Ia3Checkpoint) for c in model_ckpts):
        _check_ia3_entries_as_adapter(model_ckpts)
    if req.base_values and output_format == "adapter":
        raise ConfigError(f"method {method.name!r} needs the base's values, which a merged adapter does not hold",
                          hint=adapter_merge.FULL_MODEL_HINT)
    if req.model_values and output_format == "adapter":  # an adapter merge runs on task vectors (a zero base):
        # an interpolation of the models themselves would silently become one of their task vectors
        raise ConfigError(f"method {method.name!r} as configured interpolates the models' own values (base + task "
                          "vector), which a merged adapter does not hold: on the adapters alone it would interpolate "
                          "their task vectors, another merge than the full model's",
                          hint=adapter_merge.FULL_MODEL_HINT + (" (nuslerp's default of=task_vectors interpolates "
                                                                "the task vectors by design)"
                                                                if method.name == "nuslerp" else ""))
    # PEFT adapters: a zero or an (IA)³ identity base where the output needs one (adapter_merge.py)
    engine_base, engine_models = adapter_merge.engine_inputs(base_ckpt, model_ckpts, output_format)
    reference = _open_reference(stack, req.reference, base, base_ckpt, model_ckpts, allow_pickle)
    if reference is not None:  # its stored codes gave the elected signs (hp85a c12: 61% of them the real weights');
        # named by role: a wrapping method, as adapt's, declares no option for it
        _refuse_quantized([("the reference model", reference)])
    layout, routes = None, {}
    if vocab_policy != "union":  # union compares the tokenizers itself (io.vocab.union_of)
        _check_tokenizers(engine_base, engine_models)
    if vocab_policy == "union":
        engine_base, engine_models, layout, routes = _union_inputs(engine_base, engine_models, method, stats,
                                                                   out_dtype)
    alignment = align(engine_base, engine_models, vocab_policy="error" if vocab_policy == "union" else vocab_policy)
    if layout is not None:
        alignment = with_parts(alignment, engine_base, routes, layout.manifest())
    _warn_other_architecture(base_ckpt, model_ckpts)
    warn_unused(method)
    if hasattr(method, "check_tensors"):  # options describing the model (slerp's filters and layers, an exclude)
        method.check_tensors({j.name: tuple(j.shape) for j in alignment.jobs if j.merge})
    _warn_float64([j.name for j in alignment.jobs if j.merge and j.dtype_info.code == "F64"], out_dtype)
    if reference is not None:
        _check_reference(reference, alignment, vocab_policy)
    distances: tuple = ()
    if engine_base is base_ckpt or layout is not None:  # adapters merged against a stand-in base: not measured
        distances = tuple(measure(engine_base, engine_models, alignment.jobs))
        check_distances(distances, base_ckpt.label, allow_distant)
    side, opened = _open_side(stack, method, stats, model_ckpts, alignment, device_t, progress)

    def make_executor(inputs: EngineInputs, m: MergeMethod, side: SideInputs | None = None,
                      alignment: Alignment | None = None, intermediate: bool = False) -> Executor:
        alignment = alignment or align(inputs.base, list(inputs.models), vocab_policy=vocab_policy)
        # a merged adapter's task vectors are factored in float32 and only its factors take the output dtype (a
        # float16 ΔW could overflow where its rank-r factors fit): adapter_merge.write_adapter casts them. Merged
        # (IA)³ vectors folded into the base are an intermediate too: W·l is cast, not l (l = 1 + λτ can pass
        # float16's 65504 where the product fits it; hp36 C37)
        return Executor(inputs, alignment, m, device=device_t, memory_budget=budget,
                        out_dtype=FLOAT32 if output_format == "adapter" or intermediate else out_dtype,
                        progress=progress, side=side)

    inputs = EngineInputs(engine_base, tuple(engine_models), reference,
                          reference_base=base_ckpt if reference is not None and engine_base is not base_ckpt else None)
    fold = adapter_merge.needs_fold(model_ckpts, output_format)
    executor = make_executor(inputs, method, side, alignment, intermediate=fold)
    if fold:
        executor, _ = adapter_merge.fold_ia3(base_ckpt, executor,
                                             lambda b, ms: make_executor(EngineInputs(b, tuple(ms)),
                                                                         TaskArithmetic(lam=1.0)), model_ckpts)
    notes = [f"base distance of {d.line()}" for d in distances]
    if layout is not None:
        u = layout.union
        notes.insert(0, f"vocabulary union: {u.base_size} base tokens + {len(u.new)} added by the models = "
                        f"{u.size}; " + ", ".join(f"{n} {rb} -> {ro} rows" for n, rb, ro in layout.tensors)
                     + "; new rows: the mean of the models that have the token")
    executor.plan = dataclasses.replace(executor.plan, notes=(*executor.plan.notes, *notes))
    return Prepared(base_ckpt, model_ckpts, reference, executor, opened, layout, distances)


_ARCHITECTURE_FIELDS = ("model_type", "num_hidden_layers")  # what says which model a config describes


# tensors only a quantized checkpoint holds: bitsandbytes' scales and 4-bit state, GPTQ/AWQ's packed weights, zeros
# and group indices, FP8 block scales (their weights are codes, not values a float merge may average)
_QUANTIZED_SUFFIXES = (".SCB", ".weight_format", ".qweight", ".qzeros",
                       ".weight_scale_inv", ".weight_packed", ".weight_zero_point", ".W_q",
                       ".weight._data", ".weight._scale")  # optimum-quanto's codes and scales (hp84a c04)
# common words a float model may name its own buffers with (a float 'norm.absmax', a bool 'attn.bitmask': hp86a
# c26): they count only beside integer codes of the same stem, as bitsandbytes' 4-bit state (float absmax and
# quant_map of a uint8 '.weight'), compressed-tensors' sparse bitmask (a uint8 '.bitmask' and integer
# '.row_offsets' beside '.compressed': hp81a c07) and GPTQ's integer '.g_idx' store them
_CODE_SUFFIXES = (".absmax", ".quant_map", ".compressed", ".bitmask", ".row_offsets", ".g_idx")
# a scale beside a weight stored in 8 bits (compressed-tensors' FP8 and INT8: hp80a c07); beside a float16/float32
# weight a tensor of that name may be a model's own (a layer scale), so the weight's dtype decides
_SCALE_SUFFIXES = (".weight_scale", ".input_scale")
_EIGHT_BIT = ("F8_E4M3", "F8_E5M2", "I8", "U8")
# MLX's group scales and biases, beside its packed integer weight (hp84a c03); beside a float weight they may be a
# model's own
_GROUP_SUFFIXES = (".scales", ".biases")


def _integer_codes(ckpt: Checkpoint, name: str) -> bool:
    """Whether ``name`` is stored as integers (booleans are masks, not codes)."""
    info = ckpt.info(name)
    return not info.is_floating and info.dtype_info.code != "BOOL"


def _quantized_tensor(ckpt: Checkpoint, integer_weights: bool) -> str | None:
    """The first tensor of ``ckpt`` that only a quantized checkpoint holds, or None (``integer_weights``: a layer's
    weight stored as integers counts; for a fine-tune, whose base stores it as float, align names the file, the
    tensor and both dtypes)."""
    names = ckpt.names()
    held = set(names)
    for name in names:
        if name.endswith(_QUANTIZED_SUFFIXES):
            return name
        if name.endswith(_CODE_SUFFIXES):
            stem = name.rsplit(".", 1)[0]
            if any(n in held and _integer_codes(ckpt, n) for n in (stem, *(stem + s for s in _CODE_SUFFIXES))):
                return name
        if name.endswith(_SCALE_SUFFIXES + _GROUP_SUFFIXES):
            weight = name.rsplit(".", 1)[0] + ".weight"
            code = ckpt.info(weight).dtype_info.code if weight in held else None
            if code in _EIGHT_BIT or (name.endswith(_GROUP_SUFFIXES) and code is not None
                                      and not ckpt.info(weight).is_floating):
                return name
        # a layer's weight stored as integers is codes whatever the format (MLX and GPTQ pack them into int32, hp84a
        # c03, c17): no model trains integer weights, the base or a sign_from reference (whose int8 codes were
        # hinted "fine-tuned from the same base": hp86a c25)
        if integer_weights and name.endswith(".weight") and _integer_codes(ckpt, name):
            return name
    return None


def _declared_quantization(config: Mapping[str, Any]) -> tuple[str, Any] | None:
    """(where, value) of a quantization or compression config in a model's config.json, its own or a sub-model's
    (a composite model's text_config: hp81a c08), or None."""
    # breadth first, three levels of sub-configs deep (text_config.vision_config.quantization_config was not seen:
    # hp85a c13); the reader has bounded the config's depth already
    level: list[tuple[str, Mapping[str, Any]]] = [("", config)]
    for _ in range(4):
        for where, sub in level:
            for key in ("quantization_config", "compression_config"):  # (compression_config: compressed-tensors)
                if sub.get(key) is not None:
                    return where + key, sub[key]
            if isinstance(sub.get("quantization"), Mapping) and sub["quantization"]:  # MLX's {group_size, bits}
                return where + "quantization", sub["quantization"]
        level = [(f"{where}{k}.", v) for where, sub in level for k, v in sub.items() if isinstance(v, Mapping)]
    return None


def _refuse_quantized(named: Sequence[tuple[str, Checkpoint]], adapters_only: bool = False) -> None:
    """A quantized checkpoint (its config's quantization_config, or its tensors'): its int8 codes were copied from the
    base and its scales averaged as floats, silently (hp77a c14), and a config saying quantized over plain weights was
    copied into a float output transformers then refused to load without bitsandbytes (hp77a c15). A quantized base
    under a merge of its adapters (QLoRA's) is refused too: its packed weights do not have the shapes the adapters
    apply to ("the base has no tensor 'layer.0.weight'" of a GPTQ base, a traceback of a bitsandbytes one: hp81a c11,
    c12, c33), and the float base they were trained from is what to give."""
    from .io.align import read_model_config

    for role, ckpt in named:  # (role, checkpoint): the base, the models, a sign_from reference
        if yields_task_vector(ckpt):
            continue  # an adapter: its factors are plain floats whatever base it was trained on
        try:
            config = read_model_config(ckpt)
        except CheckpointError:
            config = {}  # a damaged config is named where the output's config is read
        declared = _declared_quantization(config)
        packed = _quantized_tensor(ckpt, integer_weights=role != "a model")
        if declared is None and packed is None:
            continue
        value = declared[1] if declared is not None else None
        method = value.get("quant_method") if isinstance(value, Mapping) else None
        which = f", quant_method {method}" if isinstance(method, str) else ""
        why = (f"its config.json declares {declared[0]}{which}" if declared is not None else
               f"it stores {packed!r} as {ckpt.info(packed).dtype_info.name}: a layer's weights stored as integers "
               "are quantized codes" if packed.endswith(".weight") else
               f"it holds {packed!r}, a tensor only quantized checkpoints hold")
        mlx = (declared is not None and declared[0].endswith("quantization")) or \
            (packed is not None and packed.endswith(_GROUP_SUFFIXES))
        # MLX's checkpoints are not transformers' to load: its own tool dequantizes them (hp87a c107)
        how = ("mlx_lm: python -m mlx_lm.convert --hf-path DIR --mlx-path OUT --dequantize" if mlx else
               "transformers: load it, model.dequantize(), save_pretrained")
        hint = f"merge the unquantized (float) checkpoints: dequantize it first ({how}), then merge"
        if role == "the base" and adapters_only:
            hint = ("give the unquantized base the adapters were trained from (QLoRA quantizes a float base: its "
                    "float weights have the shapes the adapters apply to); the merged adapter applies to the "
                    "quantized model as well")
        elif declared is not None and packed is None:
            hint += (f"; if its weights are plain floats already, remove {declared[0]} from its config.json"
                     + (" (the output would carry it, and transformers would load the float weights as quantized)"
                        if role == "the base" else ""))  # (only the base's config is the output's)
        harm = ("its stored codes are not its weights, so their signs are not the reference's"
                if role == "the reference model" else  # (hp88a c77: "merging ... averaged" of a reference)
                "merging quantized weights is not supported: their stored codes and scales are not values that can be "
                "averaged")
        raise CheckpointError(f"{ckpt.label}: {role} is a quantized checkpoint ({why}); {harm}", hint=hint)


def _warn_other_architecture(base: Checkpoint, models: Sequence[Checkpoint]) -> None:
    """A fine-tune whose config.json names another architecture than the base's (model_type, number of layers),
    though its tensors fit: the wrong folder, or a hand-edited config. The merge runs (the tensors decide, and the
    output carries the base's config), but not silently (hostile pass 24, N6)."""
    from .io.align import read_model_config

    try:
        own = read_model_config(base)
    except CheckpointError:
        return  # said where the output's config is read
    for model in models:
        if yields_task_vector(model):
            continue  # an adapter has no model config
        try:
            theirs = read_model_config(model)
        except CheckpointError:
            continue  # a fine-tune's config is not read otherwise: its damage is not this merge's business
        differ = [f"{f} {theirs[f]!r} (the base: {own[f]!r})" for f in _ARCHITECTURE_FIELDS
                  if f in own and f in theirs and theirs[f] != own[f]]
        if differ:
            warnings.warn(MergeWarning(
                f"{model.label}: its config.json names another architecture than the base's: {'; '.join(differ)}; "
                "the tensors fit, so it merges, and the output carries the base's config: check that this is the "
                "fine-tune you meant (the wrong folder?)"), stacklevel=3)


def _warn_float64(names: list[str], out_dtype: DType | None) -> None:
    """Merged tensors stored as float64 are computed in float32 (as mergekit, and as every kernel here is): a float64
    output of them holds float32-rounded values (0.95 written as 0.9500000476837158), which its dtype does not say."""
    if names and (out_dtype is None or out_dtype.code == "F64"):
        warnings.warn(MergeWarning(
            f"{len(names)} merged tensor(s) are stored as float64 ({', '.join(repr(n) for n in names[:3])}"
            f"{', ...' if len(names) > 3 else ''}): tiesmerge merges in float32 (as mergekit does), so their float64 "
            "output carries float32's precision (about 7 significant digits); --dtype float32 writes them as "
            "computed"), stacklevel=3)


def check_budget(plan: Any) -> None:
    """The planner cuts tensors down to single rows, but no further: a budget below what the largest
    such chunk needs (with its working copies) cannot be kept. The command line refuses it with that
    number; the Python API lets a tiny budget force one-row chunks (the engine's tests do)."""
    from .engine.plan import FIXED_OVERHEAD
    from .sizes import format_size

    budget = plan.memory_budget
    floor = plan.peak_bytes - FIXED_OVERHEAD  # the largest chunk as planned (rows cut to fit)
    if budget < floor:
        raise ConfigError(f"memory budget {format_size(budget)} is below the {format_size(floor)} this merge needs at "
                          "the least (its largest chunk, a row of a tensor or a tensor kept whole, with its working "
                          "copies)", hint=f"raise --memory-budget to {format_size(floor, up=True)} or more "
                                          f"(memory_budget: in a recipe; the default is {DEFAULT_MEMORY_BUDGET})")
