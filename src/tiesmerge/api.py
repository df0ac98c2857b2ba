"""The public Python API: plan a merge, run it, analyse interference."""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from . import adapter_merge
from .engine import fused, whole
from .engine.executor import MemorySink
from .engine.plan import FIXED_OVERHEAD, Plan
from .errors import ConfigError, MergeWarning, TiesMergeError
from .finite import NotFiniteError, overflow_hint
from .inputs import (
    Source,
    StatsInput,
    as_method,
    budget_of,
    check_booleans,
    check_budget,
    check_inputs,
    check_output_not_input,
    device_of,
    listed_stats,
    method_inputs,
    open_models,
    prepare,
    requested_dtype,
    resolve_sources,
    takes_weights,
)
from .io.align import align
from .io.card import digest_cache_kept_out_of, flush_digests, hash_files, model_card
from .io.checkpoint import Checkpoint
from .io.vocab import write_tokenizer_files
from .io.vocab_rows import is_part
from .io.writer import (
    OutputEntry,
    ShardedWriter,
    atomic_directory,
    check_model_files,
    copy_model_files,
    model_files,
    output_footprint,
)
from .io.writer import _check_output_path as check_output_path
from .lazy import torch
from .limits import plain_numbers
from .manifest import check_stats_digests, merge_manifest, reference_option
from .methods.base import MergeMethod, _shown
from .paths import FileStamps, fs_text, input_roots
from .recipe import MergeRecipe
from .sizes import DEFAULT_MEMORY_BUDGET, DEFAULT_SHARD_SIZE, budget_in_use, format_size, parse_size
from .unicode_names import code_points
from .version import __version__

__all__ = ["merge", "analyze", "plan_merge", "describe_plan", "base_distance"]


def _typed_out_of_memory(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The API's entry points raise OutOfMemoryError where memory ran out (a MemoryError, torch's allocator's
    RuntimeError, a thread the address-space limit refused: hp44 c10), as the command line reports it."""
    import functools

    @functools.wraps(fn)
    def typed(*args: Any, **kwargs: Any) -> Any:
        from .errors import OutOfMemoryError, is_library_load, is_out_of_memory, library_out_of_memory, memory_hint

        try:
            return fn(*args, **kwargs)
        except OutOfMemoryError as exc:  # raised deeper with the general hint (a mapping the reader could not make):
            if exc.hint == memory_hint():  # its example is made smaller than the budget in use (hp44 c09)
                exc.hint = memory_hint(budget_in_use(kwargs.get("memory_budget")))
            raise
        except (RuntimeError, MemoryError, ImportError) as exc:
            if not is_out_of_memory(exc):
                raise
            said = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            if is_library_load(exc):  # a library's own import: no budget helps (hp46 c17c)
                raise library_out_of_memory(said) from exc
            raise OutOfMemoryError(f"ran out of memory ({said})",
                                   hint=memory_hint(budget_in_use(kwargs.get("memory_budget")))) from exc
    return typed



@_typed_out_of_memory
def _from_mergekit(origin: Mapping[str, Any] | None) -> bool:
    """A recipe translated from mergekit's YAML (its BASE+ADAPTER entries are read as mergekit reads them)."""
    return isinstance(origin, Mapping) and origin.get("format") == "mergekit"


def plan_merge(base: Source, models: Sequence[Source], method: str | MergeMethod = "ties", *, device: str = "cpu",
               memory_budget: int | str | None = None, dtype: str | torch.dtype | None = None,
               vocab_policy: str = "error", allow_pickle: bool = False, output_format: str = "model",
               stats: Sequence[StatsInput] | None = None, allow_distant: bool = False, rank: int | None = None,
               origin: Mapping[str, Any] | None = None, **method_options: Any) -> Plan:
    """What :func:`merge` would do: tensors, passes, bytes, peak memory, and (``plan.notes``) how
    far each model is from the base. Reads no tensor data beyond that distance's small sample of rows.
    ``rank``: a merged LoRA adapter's (``output_format="adapter"``), as :func:`merge` takes it, for its size.
    ``origin``: the recipe's, as :func:`merge` takes it (a mergekit recipe's BASE+ADAPTER entries are folded there).

    (Merging (IA)³ adapters into a full model merges their small vectors first, to plan the fold;
    with ``normalize="rms"``, Fisher merging reads its statistics once to plan.)

    >>> plan = tiesmerge.plan_merge("base", ["ft-a", "ft-b"], "ties")          # doctest: +SKIP
    >>> plan.pass_names, plan.bytes_to_read, plan.peak_bytes                  # doctest: +SKIP
    (('count (trim)', 'merge'), 2948201472, 402653184)
    """
    m = as_method(method, method_options)
    rank = plain_numbers(rank)  # np.int64(1) is the rank 1 (hp62a c06)
    if rank is not None and output_format != "adapter":  # as merge refuses it
        raise ConfigError(f"rank {rank!r} applies to a merged LoRA adapter only, and the output is a full model",
                          hint="add --output-format adapter (output_format='adapter'), or leave --rank out")
    base, models = resolve_sources(base, models)
    stats = listed_stats(stats)
    _all_input_problems(base, models, allow_pickle)
    with ExitStack() as stack:
        prepared = prepare(stack, base, models, m, device=device, memory_budget=memory_budget, dtype=dtype,
                           vocab_policy=vocab_policy, allow_pickle=allow_pickle, output_format=output_format,
                           stats=stats, allow_distant=allow_distant, fold_like_peft=_from_mergekit(origin))
        if output_format != "adapter":  # the files a merge copies beside the weights: checked as merge checks them
            copied = model_files(prepared.base.directory())
            check_model_files(copied)
            return dataclasses.replace(prepared.executor.plan, copied_bytes=tuple(os.stat(f).st_size for f in copied))
        # the adapter's own size, from the adapted modules' shapes and the rank: a number, not a formula (hp40b C52)
        adapter_merge.check_rank(prepared.models, rank)
        size, held = adapter_merge.adapter_size(prepared.base, prepared.models, rank, requested_dtype(dtype))
        return dataclasses.replace(prepared.executor.plan, adapter_output=True, output_bytes=size, adapter_layout=held)


def _all_input_problems(base: Any, models: Any, allow_pickle: bool) -> None:
    """Every input that cannot be opened (missing, not a model, a damaged header) and every one given twice,
    reported together when there are several: ``validate`` and ``--dry-run`` list all problems at once, as they
    do for options. One problem is left to the checks that follow, which name it the usual way."""
    from .errors import OutOfMemoryError, TiesMergeError, input_problems
    from .io.checkpoint import open_checkpoint

    if isinstance(models, (str, os.PathLike, Mapping)) or not models:
        return  # check_inputs names that
    errors: list[TiesMergeError] = []
    opened: set[str] = set()  # each folder once: a 3 KB recipe listing one model 300 times parsed its 2 MB header
    for source in (base, *models):  # 300 times, 45 s before "listed twice" (hp42 C14)
        if isinstance(source, Mapping):
            continue
        try:
            key = os.path.realpath(source)
        except (TypeError, ValueError):  # not a path (a NUL byte): its open names it
            key = None
        if key is not None and key in opened:
            continue
        if key is not None:
            opened.add(key)
        try:  # the base named as the base (hp84a c29: "nothere: ... (cannot read the model)")
            open_checkpoint(source, allow_pickle=allow_pickle, role="the base" if source is base else "the model"
                            ).close()
        except OutOfMemoryError:  # the process's memory, not an input's problem: said as it is (hp43 C51)
            raise
        except TiesMergeError as exc:
            errors.append(exc)
    try:
        check_inputs(base, models)
    except TiesMergeError as exc:
        errors.append(exc)
    if len(errors) > 1:
        # the first MAX_LISTED, as a ConfigError lists them (hp40b C31: 20,000 missing models printed 20,002 lines)
        raise input_problems([e.message for e in errors], next((e.hint for e in errors if e.hint), None))


def base_distance(base: Source, models: Sequence[Source], *, vocab_policy: str = "error",
                  allow_pickle: bool = False, origin: Mapping[str, Any] | None = None) -> list:
    """How far each model is from the base (:mod:`tiesmerge.distance`), measured on a sample of rows:
    a list of ``ModelDistance`` (``.relative_norm``, ``.share_barely_matching``, ``.distant``, ``.line()``).

    >>> [d.line() for d in tiesmerge.base_distance("base", ["ft-a", "other"])]   # doctest: +SKIP
    ['model 0: ‖τ‖/‖θ_base‖ 0.0213, 0% of 101 tensors barely match — looks fine-tuned from the base', ...]

    ``origin``: the recipe's, as :func:`merge` takes it (a mergekit recipe's BASE+ADAPTER entries are folded there).
    """
    base, models = resolve_sources(base, models)
    with ExitStack() as stack:
        return list(prepare(stack, base, models, as_method("task_arithmetic", {}), device="cpu", memory_budget=None,
                            dtype=None, vocab_policy=vocab_policy, allow_pickle=allow_pickle,
                            allow_distant=True, fold_like_peft=_from_mergekit(origin)).distances)


def check_statistics_owners(models: Sequence[Source], stats: Sequence[Any], method: MergeMethod, *,
                            allow_pickle: bool = False) -> None:
    """Statistics directories checked against their models' files, as :func:`merge` checks them once the weights are
    read (hp42 C42: validate said "ok" for statistics swapped between models): each model's files are hashed (the
    digests are remembered, so the merge that follows does not hash them again)."""
    spec = method.requirements().statistics
    if spec is None or not stats:
        return
    from .io.checkpoint import open_checkpoint
    from .stats.files import open_stats

    stats = [fs_text(s) for s in stats]
    paths = [(k, s) for k, s in enumerate(stats) if isinstance(s, (str, os.PathLike)) and k < len(models)]
    if len(paths) != len(stats):  # statistics in memory record no files to check (the merge warns of them)
        return
    with ExitStack() as stack, ThreadPoolExecutor(max_workers=1, thread_name_prefix="tiesmerge-hash") as pool:
        opened, files = [], []
        for k, source in paths:
            src = open_stats(source, kind=spec.kind, label=str(source))
            stack.callback(src.close)
            checkpoint = open_checkpoint(models[k], allow_pickle=allow_pickle, label=f"model {k}")
            stack.callback(checkpoint.close)
            opened.append(src)
            files.append([f.result() for f in hash_files(checkpoint.files(), pool)])
        flush_digests()
        check_stats_digests(opened, files, [str(models[k]) for k, _ in paths])


def describe_plan(plan: Plan, method: str | MergeMethod, n_models: int) -> str:
    """The plan as the lines ``tiesmerge merge --dry-run`` prints; ``method`` as every other function takes it (a
    config, or a name or spec string)."""
    method = method_of_spec(method)  # a name was a bare TypeError (hp37b A16)
    if not isinstance(plan, Plan):  # (hp59a c59: describe_plan(5, ...), an AttributeError)
        raise ConfigError(f"plan is a {type(plan).__name__}, not a plan (tiesmerge.plan_merge returns one)")
    if not isinstance(n_models, int) or isinstance(n_models, bool) or n_models < 1:
        raise ConfigError(f"n_models must be the number of models merged (at least 1), got {_shown(n_models)}")
    merged = [j for j in plan.jobs if j.merge]
    copied = [j for j in plan.jobs if not j.merge and not is_part(j.name)]  # a union's rows are no copy
    options = ", ".join(f"{k}={v}" for k, v in MergeRecipe(method, "", ()).to_dict()["parameters"].items())
    adapter = plan.adapter_output  # a merged adapter holds the adapted modules only (hp37b P09: "19 copied", 71 MiB)
    lines = [
        f"method           {method.name} ({options})",
        f"models           base + {n_models}",
        f"tensors          {len(merged)} merged, "
        + ("nothing copied (an adapter holds the adapted modules only)" if adapter else
           f"{len(copied)} copied from the base, {sum(len(j.aliases) for j in plan.jobs)} tied alias(es)"),
        f"parameters       {sum(j.numel for j in merged):,} merged",
        f"passes           {plan.passes} over the merged tensors: {', '.join(plan.pass_names)}",
        f"bytes to read    {format_size(plan.bytes_to_read)}",
        "output size      " + (f"{format_size(plan.output_bytes)} ({plan.adapter_layout}; the file adds a small "
                               "header)" if adapter and plan.adapter_layout else
                               "an adapter's factors: at rank r, r × (rows + columns) values per adapted module "
                               "(the rank is --rank, or the inputs' largest)" if adapter else
                               format_size(plan.output_bytes)),
        f"peak memory      {format_size(plan.peak_bytes)} estimated for the merge's data (budget "
        f"{format_size(plan.memory_budget)}"
        + (f"; {format_size(FIXED_OVERHEAD)} of fixed buffers (histograms, samples) do not shrink with it)"
           if plan.peak_bytes > plan.memory_budget else ")")
        # what a process measures (/usr/bin/time) adds the interpreter and its libraries: said, not hidden (hp37b P01)
        + "; the process adds the interpreter and the libraries a merge loads (torch, numba): about 170 MiB "
          "measured for a tiny merge on Linux x86-64",
    ]
    lines += [f"note             {n}" for n in plan.notes]
    return "\n".join(lines)


def _pinned(source: Any, label: str) -> str:
    """How the recipe names an input: a model read from the Hugging Face cache by id as ``org/name@COMMIT``, the
    snapshot it merged, so that the card's recipe merges the same weights after the cache's ``main`` moved on (a
    bare id re-ran silently on other weights, hp37 C70); any other input by its label."""
    commit = getattr(source, "commit", None)
    return f"{source.repo_id}@{commit}" if isinstance(commit, str) and commit else label


# methods on which a zero task vector has no effect at all: sums of (trimmed, dropped) task vectors, and TIES-style
# disjoint means (zeros never count); every other method counts each model (a mean over them, their number in a
# rank split or a cosine), so a copy of the base dilutes or bends the others' changes
_ZERO_ADDS_NOTHING = frozenset({"task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs",
                                "breadcrumbs_ties", "magnitude_prune"})


def _warn_base_file_beside_config(base: Checkpoint, output: Path) -> None:
    """A base given as its weights file, in a folder holding the model's config.json: the output gets no config (the
    files of a model are copied from a folder given as one), which was silent (hp77a c01: ``--base b/model.safetensors``
    wrote weights transformers cannot load)."""
    files = base.files()
    if base.directory() is not None or len(files) != 1 or (output / "config.json").is_file():
        return
    folder = Path(files[0]).parent
    if (folder / "config.json").is_file():
        warnings.warn(f"the base was given as its weights file ({base.label}), so the output has no config.json or "
                      f"tokenizer: give the base's folder ({folder}) to have them copied", MergeWarning, stacklevel=3)


def _warn_copies_of_base(hashed: Mapping[str, Any], labels: Sequence[str], weighted: bool = True,
                         interpolates: bool = False, method: str = "", distances: Sequence[Any] = (),
                         reference_said: bool = False) -> None:
    """Models whose weights files are byte for byte the base's (a zero task vector, which adds nothing and in a mean
    dilutes the others) or another model's (that task vector counts twice): usually the wrong folder was given, so
    say so; the merge itself is well defined. State dicts have no files and are not compared."""
    base = tuple(sorted(d["sha256"] for d in hashed["base"]))
    same, seen = [], {}
    for k, files in enumerate(hashed["models"]):
        key = tuple(sorted(d["sha256"] for d in files))
        if not key:
            continue
        if key == base:
            same.append(f"{k} ({labels[k]})")
        elif key in seen:
            first, this = labels[seen[key]], labels[k]
            if first != this and (not (first + this).isascii() or first.strip() != first or this.strip() != this):
                # two names that may print alike (m1 and 'm1' + a no-break space): told apart (hp78a c09)
                first, this = (f"{n!r}: {code_points(n)}" for n in (first, this))
            warnings.warn(f"models {seen[key]} ({first}) and {k} ({this}) hold the same weights "
                          "files, byte for byte: " + ("that task vector counts twice in the merge (give a weight "
                                                      "instead if that is meant)" if weighted else
                                                      "the merge combines a model with itself (was another folder "
                                                      "meant?)"), MergeWarning, stacklevel=3)
        seen.setdefault(key, k)
    reference = tuple(sorted(d["sha256"] for d in hashed.get("reference") or []))
    # sign_from a copy of the base (its own folder is refused up front); reference_said: the merge said it already
    if reference and reference == base and not reference_said:
        warnings.warn("the reference model (sign_from) holds the same weights files as the base, byte for byte: its "
                      "task vector is 0, so it elects no sign and the merge is the base itself (was a fine-tuned "
                      "model meant, e.g. a multitask one?)", MergeWarning, stacklevel=3)
    # a copy saved again (other metadata, shard layout, a dtype round trip) has other bytes, the same values: the
    # distance sample (distance.measure, read before the merge) sees every sampled row equal to the base's
    resaved = [f"{d.index} ({labels[d.index]})" for d in distances
               if d.tensors and d.relative_norm == 0.0 and f"{d.index} ({labels[d.index]})" not in same]
    for found, how in ((same, "hold the same weights files as the base, byte for byte"),
                       (resaved, "equal the base on every row the distance check sampled (a copy of the base saved "
                                 "again?)")):
        if not found:
            continue
        effect = ("a zero task vector, whose cosine with the others is 0: Model Stock's t drops toward 0 (with two "
                  "models the merge is the base itself)" if method == "model_stock" else
                  "an endpoint (or member) that is the base itself, which pulls the merge toward the base"
                  if interpolates else "a zero task vector, which adds nothing to the merge"
                  if method in _ZERO_ADDS_NOTHING else
                  f"a zero task vector, which {method or 'the method'} still counts among the models (in a mean "
                  "over them it dilutes the others' changes: average halves a second model's)")
        warnings.warn(f"model(s) {', '.join(found)} {how}: {effect} (was another folder meant?)", MergeWarning,
                      stacklevel=3)


def _warn_tokenizer_left_out(folder: Path, base_folder: Path | None) -> None:
    """files_from a folder without a tokenizer, where the base has one: the output gets none (hp76a c30: silent)."""
    from .paths import TOKENIZER_FILES

    def holds(where: Path | None) -> bool:
        return where is not None and any(os.path.isfile(os.path.join(where, n)) for n in TOKENIZER_FILES)

    if base_folder is not None and not holds(folder) and holds(base_folder):
        warnings.warn(MergeWarning(
            f"files_from {str(folder)!r} holds no tokenizer, while the base ({base_folder}) does: the output copies "
            "files_from's files only, so it has no tokenizer; name a folder that holds one (or leave files_from out "
            "to copy the base's)"), stacklevel=3)


def _files_source(files_from: Source | None, base: Source, models: Sequence[Source], prepared: Any) -> Path | None:
    """The folder whose config and tokenizer files the output copies: the base's, or ``files_from``'s, which must be
    one of the merge's own inputs (never a new one, which the output checks would not have seen)."""
    if files_from is None:
        return prepared.base.directory()
    files_from = fs_text(files_from)  # bytes, as base and models may be given (hp44 c28)
    if not isinstance(files_from, (str, os.PathLike)) or isinstance(files_from, bytes):
        raise ConfigError(f"files_from must be a path, got {type(files_from).__name__}")
    wanted = os.path.realpath(files_from)
    for source, checkpoint in [(base, prepared.base), *zip(models, prepared.models)]:
        if isinstance(source, (str, os.PathLike)) and os.path.realpath(source) == wanted:
            folder = checkpoint.directory()
            if folder is None or not os.path.isfile(os.path.join(folder, "config.json")):
                # a weights file, an adapter: nothing to copy, and the warning blamed the base (hp45 c05)
                what = "a folder without config.json" if os.path.isdir(source) else "a weights file"
                raise ConfigError(f"files_from {os.fspath(files_from)!r} is {what}: the output's config.json and "
                                  "tokenizer files are copied from a model folder that holds them",
                                  hint="name the model folder (the base, or a full model among the inputs), or leave "
                                       "files_from out to copy the base's")
            _warn_tokenizer_left_out(Path(folder), prepared.base.directory())
            return folder
    raise ConfigError(f"files_from {os.fspath(files_from)!r} is neither the base nor one of the models",
                      hint="name the input whose config and tokenizer files the output should copy")


@_typed_out_of_memory
def merge(base: Source, models: Sequence[Source], method: str | MergeMethod = "ties", *,
          output: str | os.PathLike | None = None, device: str = "cpu", memory_budget: int | str | None = None,
          dtype: str | torch.dtype | None = None, shard_size: int | str = DEFAULT_SHARD_SIZE, force: bool = False,
          allow_pickle: bool = False, vocab_policy: str = "error", progress: bool = False,
          output_format: str = "model", rank: int | None = None, origin: Mapping[str, Any] | None = None,
          stats: Sequence[StatsInput] | None = None, allow_distant: bool = False,
          finish: Callable[[Path, dict[str, Any]], None] | None = None, budget_floor: bool = False,
          files_from: Source | None = None, **method_options: Any) -> Path | dict[str, torch.Tensor]:
    """Merge fine-tuned ``models`` of ``base`` and write an HF directory (or return a state dict).

    ``base`` and ``models`` are paths (HF directories, .safetensors files, PEFT LoRA or (IA)³
    adapter directories) or state dicts. ``method`` is a name with its options as keywords, or a
    method config object. ``output_format="adapter"`` writes a merged adapter instead of a full
    model (LoRA: re-factored by truncated SVD at ``rank``, default the largest input rank).
    ``origin`` (e.g. a translated mergekit recipe's format and semantics) goes into the manifest; its
    ``format: mergekit`` also reads adapters as mergekit reads BASE+ADAPTER entries (each folded into the base as
    PEFT folds it), so a translated recipe merges as mergekit does.
    ``stats``: the data-aware methods (``fisher``, ``regmean``) take one statistics directory
    (``tiesmerge stats``) or :class:`tiesmerge.stats.Statistics` per model, in the models' order.
    ``vocab_policy``: ``"error"`` on vocabulary sizes that differ, ``"truncate"`` (the base's rows),
    ``"union"`` (a tokenizer holding every model's added tokens: :mod:`tiesmerge.io.vocab`).
    A model that does not look fine-tuned from ``base`` is an error before anything merges unless
    ``allow_distant`` (:mod:`tiesmerge.distance`). ``finish(staging_dir, manifest)``, for commands
    built on a merge (``adapt``), adds its own files and manifest fields before the output is
    renamed into place, so they are as atomic as the weights. ``budget_floor``: refuse a
    ``memory_budget`` below what the largest chunk needs (the command line, where a user set it;
    otherwise a tiny budget forces one-row chunks, as the engine's tests use it). ``files_from``: the input (the
    base or one of ``models``) whose config, generation config and tokenizer files the output copies, where that is
    not the base (a mergekit ``linear`` recipe reads its first model as the engine's base, and mergekit writes its
    ``base_model``'s files).

    >>> import tiesmerge                                                      # doctest: +SKIP
    >>> tiesmerge.merge("base", ["ft-a", "ft-b"], "ties", density=0.2, output="merged")
    PosixPath('merged')
    >>> tiesmerge.merge(base_sd, [sd_a, sd_b], tiesmerge.methods.Ties(lam=1.2))  # -> state dict
    """
    started = time.perf_counter()
    check_booleans(force=force, allow_pickle=allow_pickle, allow_distant=allow_distant, progress=progress,
                   budget_floor=budget_floor)
    if files_from is not None and vocab_policy != "error":  # hp43 C67, C68: ignored, or a config of another vocab
        raise ConfigError(f"files_from and vocab_policy {vocab_policy!r} together: the output's vocabulary is the "
                          "base's (truncate) or a union of the models' (union), and another model's config and "
                          "tokenizer would not describe it",
                          hint="leave files_from out (the base's files are copied), or the vocabulary policy")
    m = as_method(method, method_options)
    if str(device) == "cpu":  # a SLERP's acos and sin: torch's library loads beside the preparation below
        try:
            whole.prepare(m.requirements().kernel)
        except TiesMergeError:  # options the method refuses: said below, in the order the checks come
            pass
    base, models = resolve_sources(base, models)  # org/name[@revision]: from the local Hugging Face cache
    stats = listed_stats(stats)
    try:
        shard_bytes = parse_size(shard_size)
    except ValueError as exc:
        raise ConfigError(f"shard_size: {exc}") from None
    output = fs_text(output)  # bytes, or a PathLike returning bytes: the str Python's file functions take for it
    if output is not None and not isinstance(output, (str, os.PathLike)) or isinstance(output, bytes):
        raise ConfigError(f"output is a {type(output).__name__}, not a path", hint="pass a str or pathlib.Path")
    if output_format == "adapter" and shard_bytes != parse_size(DEFAULT_SHARD_SIZE):  # an adapter is one file
        raise ConfigError(f"shard_size {shard_size!r} applies to a full model's weights, and the output is an adapter "
                          "(written as one adapter_model.safetensors, as PEFT reads it)",
                          hint="leave --shard-size out with --output-format adapter")
    rank = plain_numbers(rank)  # np.int64(1) is the rank 1 (hp62a c06)
    if rank is not None and output_format != "adapter":  # a full model is written whole: no rank to cut it to
        raise ConfigError(f"rank {rank!r} applies to a merged LoRA adapter only, and the output is a full model",
                          hint="add --output-format adapter (output_format='adapter'), or leave --rank out")
    unwritten = [name for name, given in (("shard_size", shard_bytes != parse_size(DEFAULT_SHARD_SIZE)),
                                          ("force", force is True)) if given]
    if output is None and unwritten:  # accepted and ignored, where rank is refused (hp84a c36)
        verb = "applies" if len(unwritten) == 1 else "apply"  # ("shard_size apply": hp87a c43)
        raise ConfigError(f"{' and '.join(unwritten)} {verb} to a written output, and without output= the merge is "
                          "returned as a state dict",
                          hint="give output= a folder to write the merge there, or leave "
                               f"{' and '.join(unwritten)} out")
    if finish is not None and not callable(finish):  # called at the end, after the whole merge (hp59a c09)
        raise ConfigError(f"finish must be a function of (staging folder, manifest), got {type(finish).__name__}")
    if origin is not None:  # written into the manifest and the card at the end: a value YAML cannot hold fails now
        import yaml

        try:  # allow_nan: a NaN or Infinity made the manifest JSON no strict reader reads (hp59a c11)
            yaml.safe_dump(dict(origin)), json.dumps(dict(origin), allow_nan=False)
        except (TypeError, ValueError, RecursionError, yaml.YAMLError) as exc:  # RecursionError: nested too deep
            key = next((k for k, v in dict(origin).items() if not _writable(v)), None)  # which one (hp65a c33)
            under = f", under its key {str(key)[:60]!r}" if key is not None else ""
            raise ConfigError(f"origin holds a value that cannot be written to the manifest{under} "
                              f"({type(exc).__name__}: {str(exc)[:120]})",
                              hint="give origin plain strings, numbers, lists and mappings (in a recipe: its "
                                   "origin: mapping)") from None
    if output is not None:
        check_inputs(base, models, takes_weights(m))  # first: a single path given as `models` would be read letter
        # by letter
        reference = m.requirements().reference
        check_output_not_input(output, [("the base", base), *((f"model {k}", s) for k, s in enumerate(models)),
                                        (f"the reference model ({reference_option(m)})", reference),
                                        *((f"the statistics of model {k}", s) for k, s in enumerate(stats or ()))])
        check_output_path(Path(output).absolute(), force)  # fail before anything is opened, not after the merge
    with _overflow_hint_for(m), ExitStack() as stack:
        stack.enter_context(fused.torch_threads_kept())  # from before the distance sample's kernels run
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = stack.enter_context(tqdm(total=0, unit="B", unit_scale=True, unit_divisor=1024,
                                           desc=f"merging ({m.name})", dynamic_ncols=True))
        prepared = prepare(stack, base, models, m, device=device, memory_budget=memory_budget, dtype=dtype,
                           vocab_policy=vocab_policy, allow_pickle=allow_pickle,
                           progress=bar.update if bar else None, output_format=output_format, stats=stats,
                           allow_distant=allow_distant,
                           # a mergekit recipe's MODEL+LORA entries: folded as mergekit folds them (hp48 c05)
                           fold_like_peft=_from_mergekit(origin))
        executor = prepared.executor
        adapter_merge.check_rank(prepared.models, rank)
        if budget_floor:  # from the plan just made: planning again first would sample the distances twice
            check_budget(executor.plan)
        # checked now, before the first heavy read: the files copied beside the weights at the end, and
        # what every input file looks like (a model another process is still writing is refused)
        files_dir = _files_source(files_from, base, models, prepared)
        extra = model_files(files_dir) if output is not None and output_format != "adapter" else []
        check_model_files(extra)  # none being written elsewhere, each JSON whole: copied as they are at the end
        inputs_read = [prepared.base, *prepared.models, *([prepared.reference] if prepared.reference else [])]
        # the base's config and tokenizer files too: they are copied at the end, and a download still writing
        # them would leave a broken model behind an exit status of 0
        stamps = FileStamps.of([*(f for c in inputs_read for f in c.files()), *extra])
        if bar is not None:
            bar.reset(total=executor.plan.bytes_to_read)
        prepared_at = time.perf_counter()
        # entered before the pool: it is left after the pool's last hash (an ExitStack unwinds in reverse); and
        # before the first run, where numba's kernel cache may be placed (engine/numba_cache.py)
        stack.enter_context(digest_cache_kept_out_of(
            [*([output] if output is not None else []), *{f.parent for c in inputs_read for f in c.files()},
             *(r for c in inputs_read if c.directory() is not None for r in input_roots(c.directory())),
             *(f.parent for s in prepared.stats for f in s.checkpoint.files())]))  # --stats folders are inputs too
        if output is None:
            if output_format == "adapter":
                raise ConfigError("a merged adapter is written to a directory", hint="pass output=DIR")
            sink = MemorySink(executor.alignment.outputs(), executor.out_dtype)
            executor.run(executor.alignment.route(sink))
            return sink.state
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tiesmerge-hash")
        # on an error or Ctrl-C, skip the files not hashed yet: a plain `with pool` would hash every
        # remaining input (minutes for a large model) before the error is shown
        stack.callback(pool.shutdown, wait=True, cancel_futures=True)
        digests = {"base": hash_files(prepared.base.files(), pool),
                   "models": [hash_files(c.files(), pool) for c in prepared.models],
                   "reference": hash_files(prepared.reference.files(), pool) if prepared.reference else None}
        groups = [[OutputEntry(n, j.shape, j.output_dtype(executor.out_dtype)) for n in (j.name, *j.aliases)]
                  for j in executor.alignment.outputs()]
        # an adapter's own size (its factors at the rank), not the full model's (hp54 c25: a 1 MiB adapter refused
        # for the 5.6 MiB model it is not)
        if output_format == "adapter":  # one file
            data = adapter_merge.adapter_size(prepared.base, prepared.models, rank, requested_dtype(dtype))[0]
            needed = output_footprint(data, tensors=len(executor.plan.jobs), shard_bytes=data + 1)
        else:
            needed = output_footprint(executor.plan.output_bytes, copied=[os.stat(f).st_size for f in extra],
                                      tensors=len(executor.plan.jobs), shard_bytes=shard_bytes)
        merged_names = [n for j in executor.alignment.outputs() if j.merge for n in (j.name, *j.aliases)]
        with atomic_directory(output, force=force, needed_bytes=needed) as tmp:
            adapter_part = None
            if output_format == "adapter":
                run_stats, adapter_part = adapter_merge.write_adapter(tmp, executor, prepared.base, prepared.models,
                                                                      rank=rank, dtype=requested_dtype(dtype))
                files, copied = adapter_part["files"], []
            else:
                writer = ShardedWriter(tmp, groups, shard_bytes, metadata={"format": "pt", "tiesmerge": __version__},
                                       finite=merged_names)
                try:
                    run_stats = executor.run(executor.alignment.route(writer))
                except BaseException:
                    writer.abort()
                    raise
                writer.close()
                files = writer.files
            if executor.side is not None:
                run_stats.bytes_read += executor.side.bytes_read
            run_stats.tensors_copied -= len(executor.alignment.routes)  # a union's new rows: part of merged tensors
            clock = time.perf_counter()
            if output_format != "adapter":
                written_dtype = executor.out_dtype
                if written_dtype is None:  # the weights take the base's dtype; the copied config (another model's:
                    # C21, or the base's own, saying bfloat16 over float32 weights: hp68a c41) is made to agree
                    from .io.checkpoint import stored_float_dtype

                    written_dtype = stored_float_dtype(prepared.base)
                copied = copy_model_files(files_dir, tmp, files=extra,
                                          dtype=written_dtype if written_dtype else None)
                if prepared.base.directory() is not None and not (tmp / "config.json").is_file():
                    warnings.warn(f"the base ({prepared.base.label}) has no config.json, so the output has none: "
                                  "transformers cannot load it as a model until one is put beside the weights",
                                  MergeWarning, stacklevel=2)
                _warn_base_file_beside_config(prepared.base, tmp)
                if prepared.vocab is not None:  # the merged tokenizer and vocab_size replace the base's
                    rows = next(ro for _, _, ro in prepared.vocab.tensors)
                    vocab_files, chat_from = write_tokenizer_files(prepared.vocab.union, tmp, rows)
            hashed = {"base": [f.result() for f in digests["base"]],
                      "models": [[f.result() for f in d] for d in digests["models"]],
                      "reference": [f.result() for f in digests["reference"]] if digests["reference"] else None}
            # after the digests: a file renamed over while they were still hashed would be recorded by its
            # successor's digest, and a false "the same files as ..." warning follow (hp65a c43, c47)
            stamps.check("an input file")
            flush_digests()  # the digests worked out, remembered in one write (never into an input or the output)
            check_stats_digests(prepared.stats, hashed["models"], [c.label for c in prepared.models])
            _warn_copies_of_base(hashed, [c.label for c in prepared.models], weighted=hasattr(m, "weights"),
                                 interpolates=bool(m.requirements().model_values), method=m.name,
                                 distances=prepared.distances, reference_said=run_stats.reference_zero)
            run_stats.seconds["hash_wait"] = time.perf_counter() - clock
            run_stats.seconds["prepare"] = prepared_at - started
            recipe = MergeRecipe(method=m, base=prepared.base.label, models=tuple(c.label for c in prepared.models),
                                 dtype=requested_dtype(dtype).name if dtype is not None else None,
                                 shard_size=str(shard_size), memory_budget=str(memory_budget or DEFAULT_MEMORY_BUDGET),
                                 device=str(device), vocab_policy=vocab_policy, output_format=output_format,
                                 rank=rank, origin=dict(origin) if origin else None,
                                 stats=tuple(s.label for s in prepared.stats) or None, allow_distant=allow_distant,
                                 files_from=os.fsdecode(files_from) if files_from is not None else None,
                                 # pickled weights were read: the card's recipe and the manifest say so (hp38 C12)
                                 allow_pickle=allow_pickle and any(
                                     Path(f["path"]).suffix in (".bin", ".pt", ".pth")
                                     for files in (hashed["base"], *hashed["models"]) for f in files))
            (tmp / "README.md").write_text(model_card(
                base_label=getattr(base, "repo_id", prepared.base.label), base_revision=getattr(base, "revision", None),
                base_commit=getattr(base, "commit", None), model_labels=[c.label for c in prepared.models],
                recipe_yaml=dataclasses.replace(  # the card's recipe merges these snapshots again
                    recipe, base=_pinned(base, recipe.base),
                    models=tuple(_pinned(s, label) for s, label in zip(models, recipe.models))).to_yaml(),
                method_name=m.name, paper=m.paper, summary=m.summary,
                version=__version__, adapter=adapter_part["kind"] if adapter_part else False,
                in_memory=[label for source, label in zip([base, *models, *(stats or ())],
                                                          [recipe.base, *recipe.models, *(recipe.stats or ())])
                           if not isinstance(source, (str, os.PathLike))]),
                encoding="utf-8", errors="backslashreplace")  # a path's undecodable bytes: \xff
            run_stats.seconds["total"] = time.perf_counter() - started
            manifest = merge_manifest(recipe, executor, run_stats, hashed, files, copied)
            manifest["base_distance"] = [d.to_dict() for d in prepared.distances]
            for entry, source in zip([manifest["inputs"]["base"], *manifest["inputs"]["models"]], [base, *models]):
                if hasattr(source, "commit"):  # named by repo id: which snapshot of the cache was read
                    entry["hub"] = {"repo_id": source.repo_id, "revision": source.revision, "commit": source.commit}
            if prepared.vocab is not None and output_format != "adapter":
                manifest["alignment"]["vocabulary"].update(files_written=vocab_files, chat_template_from=chat_from)
            kind = next((getattr(c, "adapter_kind", None) for c in prepared.models if hasattr(c, "adapter_kind")), None)
            if kind is not None:
                manifest["adapters"] = {"inputs": kind, "output_format": output_format, **(adapter_part or {})}
            if adapter_part:  # a merged adapter's factors or vectors: float32 unless asked (hp57 c27: "same as base")
                manifest["output"]["dtype"] = str(recipe.dtype or "float32")
            if prepared.stats:
                manifest["statistics"] = [{"label": s.label, "manifest": s.manifest.to_dict() if s.manifest else None}
                                          for s in prepared.stats]
                manifest["statistics_missing"] = executor.side.missing if executor.side else []
            if finish is not None:
                finish(tmp, manifest)
            (tmp / "tiesmerge.json").write_text(json.dumps(manifest, indent=2) + "\n")
        return Path(output)


def _writable(value: Any) -> bool:
    """Whether ``value`` is written as JSON and YAML (origin's values)."""
    import yaml

    try:
        yaml.safe_dump(value)
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError, RecursionError, yaml.YAMLError):
        return False
    return True


@contextmanager
def _overflow_hint_for(method: MergeMethod):
    """An overflow's hint for ``method``: a scaling factor to lower where it has one (lam; per-model weights of the
    elementwise methods), else the inputs to check (SLERP, NuSLERP, Model Stock interpolate between them)."""
    try:
        yield
    except NotFiniteError as exc:
        if exc.base_value is None:  # else the base's own value is past the range: a wider dtype is the hint
            scaled = hasattr(method, "lam") or not method.requirements().whole_tensors
            levers = None
            if not hasattr(method, "lam") and hasattr(method, "weights"):  # average: its weights are the scaling
                levers = "smaller per-model weights (--weights" + (
                    "; or --normalize-weights, dividing by their sum)" if getattr(method, "normalize_weights", True)
                    is False else ")")
            exc.hint = overflow_hint(exc.code, scaled=scaled, levers=levers)
        raise


def _registered() -> set[str]:
    from .registry import METHODS

    return set(METHODS)


def _spec_items(text: str) -> list[str]:
    """``key=value`` items of a method spec, split at the commas outside ``[...]``, ``"..."`` and ``'...'`` (a list,
    or a quoted text that holds commas itself: ``t_by_name="self_attn=0,1;*=0.5"``)."""
    items, depth, quoted, start = [], 0, "", 0
    for i, char in enumerate(text):
        if char in "\"'" and (not quoted or char == quoted) and (i == 0 or text[i - 1] != "\\"):
            quoted = "" if quoted else char
        elif not quoted and char == "[":
            depth += 1
        elif not quoted and char == "]":
            depth = max(0, depth - 1)
        elif char == "," and not quoted and depth == 0:
            items.append(text[start:i])
            start = i + 1
    if quoted:  # the rest would be one value: name the quote, not what it swallowed
        kind = "double" if quoted == '"' else "single"
        raise ConfigError(f"method spec {text[:80]!r}: a {kind} quote is not closed", hint='close it: key="a,b"')
    items.append(text[start:])
    return items


def _numbers(text: str) -> list[float] | None:
    """A flat ``[...]`` list of numbers JSON does not spell (``inf``, ``nan``, ``1e400``), as numbers: their option's
    check then names the value (hp30 N3: ``weights=[inf,1]`` was "not a list"); None where it is no such list."""
    if not (text.startswith("[") and text.endswith("]")):
        return None
    try:
        return [float(item) for item in text[1:-1].split(",")]
    except ValueError:
        return None


def _words(text: str) -> list[str] | None:
    """An unquoted ``[a,b]`` as the list --help says it is ("a value holding commas goes in [...]"), not the text
    "[a,b]": a regex option read it as a character class, silently (hp63a c35); quoted, it is text."""
    if not (text.startswith("[") and text.endswith("]") and "," in text):
        return None
    return [item.strip() for item in text[1:-1].split(",")]


def method_of_spec(spec: str | MergeMethod) -> MergeMethod:
    """A method config from ``"name"`` or ``"name:key=value,key=value"`` (values read as JSON where
    they parse: numbers, true/false, [lists], "quoted text"; else as text), or the config itself. Commas
    inside [...] or "..." belong to the value: ``slerp:t_by_name="self_attn=0,1;*=0.5",layers=2``."""
    from .registry import make_method

    if isinstance(spec, type):  # `merge(base, models, Ties)`: a bare TypeError from deep inside (hp37b A22)
        name = getattr(spec, "name", spec.__name__)
        raise ConfigError(f"method {spec.__name__} is a class, not a method config",
                          hint=f"pass an instance, {spec.__name__}() or {spec.__name__}(density=0.2, ...), or the "
                               f"name {name!r}")
    if not isinstance(spec, str):
        if not isinstance(spec, MergeMethod):  # 5, None, ['ties']: an AttributeError or a TypeError of dataclasses
            raise ConfigError(f"method must be a name or a method config such as tiesmerge.methods.Ties(), got "
                              f"{_shown(spec)}")  # (hp60a c22, c42)
        return spec
    name, _, rest = spec.partition(":")
    options: dict[str, Any] = {}
    for item in _spec_items(rest) if rest else []:
        key, eq, value = item.partition("=")
        if not eq:
            raise ConfigError(f"method {spec!r}: {item!r} is not KEY=VALUE", hint="e.g. slerp:t=0.3,anchor=models")
        if not key.strip().isidentifier():  # a value's comma split it: '1;*=0.5' (hp64a c171: "unknown option")
            raise ConfigError(f"method {spec[:120]!r}: {item[:60]!r} is no option: the comma before it likely "
                              "belongs to the previous option's value",
                              hint='a value holding commas goes in double quotes, e.g. '
                                   'slerp:t_by_name="self_attn=0,1;*=0.5",layers=2')
        if key.strip() in options:  # as a key given twice in a recipe: which one was meant cannot be told
            raise ConfigError(f"method {spec!r}: {key.strip()} is given twice", hint="give each option once")
        try:
            options[key.strip()] = json.loads(value)
        except ValueError:
            text = value.strip()  # 'single-quoted text' is text, as "double-quoted" is
            options[key.strip()] = text[1:-1] if len(text) >= 2 and text[0] == text[-1] == "'" else \
                _numbers(text) or _words(text) or text
        except RecursionError:  # [[[[... 50,000 deep: no option holds that
            raise ConfigError(f"method {spec[:80]!r}: the value of {key.strip()} is nested too deep to read",
                              hint="give a number, a word, or a flat [list]") from None
    try:
        return make_method(name.strip(), options)
    except ConfigError as exc:  # an option's check: the method's own help says what each option accepts
        if exc.hint is None and name.strip() in _registered():
            exc.hint = f"`tiesmerge methods {name.strip()}` lists its options, their units and ranges"
            from .methods.base import option_types
            from .registry import method_class

            texts = {k for k, t in option_types(method_class(name.strip())).items() if t is str}
            words = next((k for k, v in options.items() if k in texts and isinstance(v, list)), None)
            if words is not None:  # [a,b] unquoted is a list; text holding commas goes in quotes
                exc.hint += f'; an unquoted [x,y] is a list: a text that holds commas goes in quotes, {words}="..."'
        raise


IA3_MEASURED = ("(IA)³ scaling vectors: task vector l − 1 per adapted module, as `tiesmerge merge` merges them "
                "(not their effect W·(l − 1) on the weights)")


# what a merge warns of its output folder, which analyze's compared merges (read back, then deleted) never show
_SCRATCH_OUTPUT_WARNINGS = (r"the base \(.*\) has no config\.json, so the output has none|the base's .* names custom "
                            r"code \(auto_map")


def analyze(base: Source, models: Sequence[Source], *, output: str | os.PathLike | None = None, density: float = 0.2,
            subsets_per_size: int | None = 10, seed: int = 0, curve: Sequence[float] | None = None,
            device: str = "cpu", memory_budget: int | str | None = None, vocab_policy: str = "error",
            allow_pickle: bool = False, force: bool = False, progress: bool = False,
            methods: Sequence[str | MergeMethod] = ()) -> dict[str, Any]:
    """Measure interference between fine-tuned ``models`` of ``base``: sign conflicts after
    trimming to the top ``density`` (for 2..n models, ``subsets_per_size`` seeded subsets per
    size, None for all), the share of each task vector's mass in its top-k, the overlap of the
    top-k masks, and merged magnitudes by influence and sign agreement. Streamed like a merge.
    ``methods`` (configs, or specs ``"name"`` / ``"name:key=value,..."``) are merged too (into a
    temporary float32 directory) and their merged magnitudes join the paper's four merges.
    ``curve``: the densities of the redundancy curves (at most 1,000; default 0.01 ... 1).

    Returns the statistics as a JSON-ready dict; with ``output``, also writes ``analysis.json``,
    PNG plots and a self-contained ``report.html`` there.

    >>> import tiesmerge                                                      # doctest: +SKIP
    >>> report = tiesmerge.analyze("base", ["ft-a", "ft-b", "ft-c"], output="interference")
    >>> report["summary"][0]
    'With all 3 models trimmed to their top 20.0%, 41.2% of the parameters that two or more ...'
    """
    from .analysis import AnalysisSettings, run_analysis, summarise, write_report

    started = time.perf_counter()
    base, models = resolve_sources(base, models)
    check_inputs(base, models, weighted=False)  # (analyze takes no weights: hp71a c49)
    output = fs_text(output)
    if output is not None and not isinstance(output, (str, os.PathLike)):
        raise ConfigError(f"output is a {type(output).__name__}, not a path", hint="pass a str or pathlib.Path")
    if vocab_policy == "union":
        raise ConfigError("analyze compares the models' rows as stored; --vocab-policy union is a merge policy",
                          hint="use --vocab-policy truncate to compare the base's rows")
    for name, value, example in (("methods", methods, "['ties']"), ("curve", curve, "[0.1, 0.2]")):
        if value is not None and (isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Iterable)):
            raise ConfigError(f"{name} must be a list, got {type(value).__name__} {_shown(value)}",
                              hint=f"e.g. {name}={example}")  # a string was read letter by letter (hp59a c56)
    from .methods.base import plain_value

    # Fraction, Decimal and numpy numbers are the numbers they are, as merge's options take them (hp66a c22)
    def number(value: Any) -> Any:
        return plain_value(plain_numbers(value, 0))

    density, subsets_per_size, seed = number(density), number(subsets_per_size), number(seed)
    settings = AnalysisSettings(density=density, subsets_per_size=subsets_per_size, seed=seed,
                                **({"curve": tuple(number(k) for k in curve)} if curve is not None else {}))
    settings.check(len(models))
    device_t, budget = device_of(device), budget_of(memory_budget)
    extra = [(spec if isinstance(spec, str) else m.name, m) for spec in methods for m in [method_of_spec(spec)]]
    if output is not None:  # the models the methods name (sign_from) are inputs too
        check_output_not_input(output, [("the base", base), *((f"model {k}", s) for k, s in enumerate(models)),
                                        *(i for _, m in extra for i in method_inputs(m))])
        check_output_path(Path(output).absolute(), force, "analysis.json")  # fail before the passes, not after
    with ExitStack() as stack:
        base_ckpt, model_ckpts = open_models(stack, base, models, allow_pickle)
        stamps = FileStamps.of(f for c in (base_ckpt, *model_ckpts) for f in c.files())
        # (IA)³ adapters merge their scaling vectors (τ = l − 1 against an identity base), not W·(l − 1): the
        # statistics measure what `tiesmerge merge` trims, elects and averages (hp36 C60). LoRA is unchanged:
        # its merge runs on ΔW = B·A, as the statistics do.
        engine_base, engine_models = adapter_merge.engine_inputs(base_ckpt, model_ckpts, "model")
        in_l_space = engine_base is not base_ckpt
        if in_l_space and extra:
            raise ConfigError("analyze --method with (IA)³ adapters: the statistics measure their scaling vectors "
                              "(l − 1), while a compared merge is written as a full model with the vectors folded "
                              "into its weights, so the two would not be the same quantities",
                              hint="leave out --method; to compare merges, fold each adapter into the base first "
                                   "(tiesmerge merge --base B --model ADAPTER --method task_arithmetic --lam 1 "
                                   "-o FOLDED: the adapter's own fold, nothing trimmed) and analyze the folded models")
        merged: list[tuple[str, Checkpoint]] = []
        if extra:  # each extra method's merge, float32, read back beside the models in the statistics pass
            from .scratch import discard, private_folder

            scratch = Path(private_folder("tiesmerge-analyze-"))  # a killed run's: removed by the next run
            stack.callback(discard, str(scratch))
            for i, (label, method) in enumerate(extra):
                try:
                    with warnings.catch_warnings():  # of the model folder no one sees (hp68a c38: "the output has
                        # no config.json, transformers cannot load it" said of this temporary merge)
                        warnings.filterwarnings("ignore", message=_SCRATCH_OUTPUT_WARNINGS)
                        path = merge(base, models, method, output=scratch / f"m{i}", device=device,
                                     memory_budget=budget, dtype="float32", allow_pickle=allow_pickle,
                                     vocab_policy=vocab_policy)
                except NotFiniteError as exc:  # which of the methods (hp48 c31); analyze writes no model
                    said = exc.message.replace("no merged model was written or returned", "no report was written")
                    exc.message = f"--method {label} (methods[{i}]): {said}"
                    raise
                merged.append((label, open_models(stack, path, [], False)[0]))
        alignment = align(engine_base, engine_models, vocab_policy=vocab_policy)
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = stack.enter_context(tqdm(total=0, unit="B", unit_scale=True, unit_divisor=1024, desc="analyzing",
                                           dynamic_ncols=True))
            bar.reset(total=3 * sum(j.nbytes for j in alignment.jobs if j.merge) * (len(models) + 1))
        data = run_analysis(engine_base, engine_models, alignment, settings, device=device_t, memory_budget=budget,
                            progress=bar.update if bar is not None else None, merged=merged)
        stamps.check("an input file")  # a model still being written would make the figures mean nothing
        data["inputs"] = {"base": base_ckpt.label, "models": [c.label for c in model_ckpts]}
        if in_l_space:
            data["inputs"]["measured"] = IA3_MEASURED
    # each compared merge's options, so the report says which variant it shows
    data["magnitudes"]["methods"] = {label: {f.name: getattr(method, f.name) for f in dataclasses.fields(method)}
                                     for label, method in extra}
    data["tiesmerge_version"] = __version__
    data["created"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    data["summary"] = summarise(data)
    data["seconds"]["total"] = round(time.perf_counter() - started, 3)
    if output is not None:
        write_report(data, output, force=force)
    return data
