"""The public Python API: plan a merge, run it."""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from . import __version__, adapter_merge
from .engine.executor import Executor, MemorySink, RunStats
from .engine.plan import Plan
from .engine.side import SideInputs
from .errors import ConfigError, IncompatibleCheckpointsError, OutputError
from .io.align import align
from .io.card import hash_files, model_card
from .io.checkpoint import Checkpoint, open_checkpoint
from .io.writer import OutputEntry, ShardedWriter, atomic_directory, copy_model_files
from .io.writer import _check_output_path as check_output_path
from .methods import TaskArithmetic
from .methods.base import DataAwareMethod, MergeMethod
from .recipe import MergeRecipe, parse_dtype
from .registry import make_method
from .sizes import DEFAULT_MEMORY_BUDGET, DEFAULT_SHARD_SIZE, format_size, parse_size
from .stats.files import Statistics, StatsSource, combine_digests, open_stats

__all__ = ["merge", "analyze", "plan_merge", "describe_plan"]

Source = str | os.PathLike | Mapping[str, torch.Tensor]
StatsInput = str | os.PathLike | Statistics | Mapping[str, torch.Tensor]


def _method(method: str | MergeMethod, options: Mapping[str, Any]) -> MergeMethod:
    if isinstance(method, str):
        return make_method(method, options)
    if options:
        raise ConfigError(f"options {sorted(options)} given beside a method object; set them on the object",
                          hint=f"e.g. dataclasses.replace(method, {next(iter(options))}=...)")
    if not dataclasses.is_dataclass(method) or not hasattr(method, "merge"):
        raise ConfigError(f"method must be a name or a method config such as tiesmerge.methods.Ties(), got {method!r}")
    return method


def _identity(source: Source) -> Any:
    return ("memory", id(source)) if isinstance(source, Mapping) else ("path", Path(source).resolve())


def _check_inputs(base: Source, models: Sequence[Source]) -> None:
    if isinstance(models, (str, os.PathLike, Mapping)) or not len(models):
        raise ConfigError("models must be a non-empty list of fine-tuned models (paths or state dicts)")
    seen: dict[Any, int] = {}
    base_id = _identity(base)
    for k, m in enumerate(models):
        ident = _identity(m)
        if ident == base_id:
            raise ConfigError(f"model {k} ({m if not isinstance(m, Mapping) else 'state dict'}) is the base itself",
                              hint="list only the fine-tuned models after the base")
        if ident in seen:
            raise ConfigError(f"model {k} is listed twice (also model {seen[ident]}): "
                              f"{m if not isinstance(m, Mapping) else 'the same state dict object'}",
                              hint="each fine-tuned model should appear once; use weights to count one more")
        seen[ident] = k


def _check_output_not_input(output: str | os.PathLike, base: Source, models: Sequence[Source]) -> None:
    """The output directory is replaced as a whole (with force=True), so it must not be, or
    contain, an input model: that would delete the model being merged."""
    final = Path(output).resolve()
    for k, source in enumerate([base, *models]):
        if isinstance(source, Mapping):
            continue
        src = Path(source).resolve()
        if src == final or final in src.parents:
            who = "the base" if k == 0 else f"model {k - 1}"
            raise OutputError(f"{output}: the output {'is' if src == final else 'contains'} {who} ({source}); "
                              "writing there would replace the model being merged",
                              hint="choose an output directory outside the input models")


def _open_all(stack: ExitStack, base: Source, models: Sequence[Source], allow_pickle: bool
              ) -> tuple[Checkpoint, list[Checkpoint]]:
    def label(source: Source, default: str) -> str:
        return default if isinstance(source, Mapping) else str(source)

    opened = [open_checkpoint(base, allow_pickle=allow_pickle, label=label(base, "base state dict"))]
    stack.callback(opened[0].close)
    for k, m in enumerate(models):
        ckpt = open_checkpoint(m, allow_pickle=allow_pickle, label=label(m, f"models[{k}] state dict"))
        stack.callback(ckpt.close)
        opened.append(ckpt)
    return opened[0], opened[1:]


def _open_side(stack: ExitStack, method: MergeMethod, stats: Sequence[StatsInput] | None, models: list[Checkpoint],
               alignment: Any, device: torch.device, progress: Any) -> tuple[SideInputs | None, list[StatsSource]]:
    """The per-model statistics of a data-aware method (Fisher, RegMean), opened and checked."""
    if not isinstance(method, DataAwareMethod):
        if stats:
            raise ConfigError(f"statistics were given, but method {method.name!r} does not use them",
                              hint="statistics serve the data-aware methods: fisher, regmean")
        return None, []
    spec = method.side_input()
    if not stats:
        raise ConfigError(f"method {method.name!r} needs {spec.kind} statistics of every model",
                          hint=f"compute them with 'tiesmerge stats {spec.kind} --model MODEL --data DATA -o DIR', "
                               "then pass one --stats DIR per --model, in the same order (stats=[...] in Python)")
    if isinstance(stats, (str, os.PathLike, Mapping, Statistics)):
        raise ConfigError("stats must be a list: one statistics directory (or object) per model")
    opened = []
    for k, source in enumerate(stats):
        label = f"stats[{k}]" if isinstance(source, (Mapping, Statistics)) else str(source)
        src = open_stats(source, kind=spec.kind, label=label)
        stack.callback(src.close)
        opened.append(src)
    side = SideInputs(spec, [o.checkpoint for o in opened], models, alignment, device=device, progress=progress)
    return side, opened


def _check_stats_digests(opened: list[StatsSource], hashed_models: list[list[dict]], labels: list[str]) -> None:
    """Statistics computed from a model directory record its files' digest: they must be this model's."""
    for k, (src, files) in enumerate(zip(opened, hashed_models)):  # opened is empty for other methods
        recorded = src.manifest.model_digest if src.manifest is not None else None
        if not recorded or not recorded.startswith("files:") or not files:
            continue
        actual = "files:" + combine_digests([(Path(f["path"]).name, f["sha256"]) for f in files])
        if actual != recorded:
            raise IncompatibleCheckpointsError(
                f"{src.label}: these statistics were computed with another model ({src.manifest.model}), "
                f"not model {k} ({labels[k]}): the weight files' digests differ",
                hint="give each model its own statistics, in the models' order, or recompute them")


def _device(device: str) -> torch.device:
    try:
        device_t = torch.device(device)
    except (RuntimeError, TypeError):  # torch's own message lists every backend it knows, not what we take
        raise ConfigError(f"device {device!r} is not cpu or cuda", hint="use --device cpu or --device cuda") from None
    if device_t.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' was asked for but no CUDA device is available", hint="use --device cpu")
    if device_t.type not in ("cpu", "cuda"):
        raise ConfigError(f"device {device!r} is not cpu or cuda")
    return device_t


def _budget(memory_budget: int | str | None) -> int:
    try:
        return parse_size(memory_budget if memory_budget is not None else DEFAULT_MEMORY_BUDGET)
    except ValueError as exc:
        raise ConfigError(f"memory_budget: {exc}") from None


def _prepare(stack: ExitStack, base: Source, models: Sequence[Source], method: MergeMethod, *, device: str,
             memory_budget: int | str | None, dtype: str | torch.dtype | None, vocab_policy: str,
             allow_pickle: bool, progress: Any = None, output_format: str = "model",
             stats: Sequence[StatsInput] | None = None
             ) -> tuple[Checkpoint, list[Checkpoint], Executor, list[StatsSource]]:
    _check_inputs(base, models)
    problems = method.check(len(models))
    if problems:
        raise ConfigError(problems)
    device_t, budget = _device(device), _budget(memory_budget)
    out_dtype = dtype if isinstance(dtype, torch.dtype) or dtype is None else parse_dtype(dtype)
    base_ckpt, model_ckpts = _open_all(stack, base, models, allow_pickle)

    def make_executor(engine_base: Checkpoint, engine_models: list[Checkpoint], m: MergeMethod,
                      side: SideInputs | None = None, alignment: Any = None) -> Executor:
        alignment = alignment or align(engine_base, engine_models, vocab_policy=vocab_policy)
        return Executor(engine_base, engine_models, alignment, m, device=device_t, memory_budget=budget,
                        out_dtype=out_dtype, progress=progress, side=side)

    # PEFT adapters: a zero or an (IA)³ identity base where the output needs one (adapter_merge.py);
    # TIES sign_from: the reference model is streamed after the merged ones
    engine_base, engine_models = adapter_merge.engine_inputs(base_ckpt, model_ckpts, output_format)
    engine_models = engine_models + _open_reference(stack, method, base, allow_pickle)
    alignment = align(engine_base, engine_models, vocab_policy=vocab_policy)
    side, opened = _open_side(stack, method, stats, model_ckpts, alignment, device_t, progress)
    executor = make_executor(engine_base, engine_models, method, side, alignment)
    if adapter_merge.needs_fold(model_ckpts, output_format):
        executor, _ = adapter_merge.fold_ia3(base_ckpt, executor,
                                             lambda b, ms: make_executor(b, ms, TaskArithmetic(lam=1.0)))
    return base_ckpt, model_ckpts, executor, opened


def _open_reference(stack: ExitStack, method: MergeMethod, base: Source, allow_pickle: bool) -> list[Checkpoint]:
    """The model a method reads beside the merged ones (TIES's ``sign_from``), streamed after them."""
    reference = getattr(method, "reference_model", lambda: None)()
    if reference is None:
        return []
    if not isinstance(base, Mapping) and Path(reference).resolve() == Path(base).resolve():
        raise ConfigError(f"sign_from {reference} is the base itself: its task vector is 0, so no sign would be taken",
                          hint="point sign_from at a model fine-tuned from the base, e.g. a multitask model")
    ckpt = open_checkpoint(reference, allow_pickle=allow_pickle, label=f"{reference} (sign_from)")
    stack.callback(ckpt.close)
    return [ckpt]


def plan_merge(base: Source, models: Sequence[Source], method: str | MergeMethod = "ties", *, device: str = "cpu",
               memory_budget: int | str | None = None, dtype: str | torch.dtype | None = None,
               vocab_policy: str = "error", allow_pickle: bool = False, output_format: str = "model",
               stats: Sequence[StatsInput] | None = None, **method_options: Any) -> Plan:
    """What :func:`merge` would do, without reading any tensor data: tensors, bytes, peak memory.

    (Merging (IA)³ adapters into a full model merges their small vectors first, to plan the fold;
    with ``normalize="rms"``, Fisher merging reads its statistics once to plan.)"""
    m = _method(method, method_options)
    with ExitStack() as stack:
        return _prepare(stack, base, models, m, device=device, memory_budget=memory_budget, dtype=dtype,
                        vocab_policy=vocab_policy, allow_pickle=allow_pickle, output_format=output_format,
                        stats=stats)[2].plan


def describe_plan(plan: Plan, method: MergeMethod, n_models: int) -> str:
    merged = [j for j in plan.jobs if j.merge]
    copied = [j for j in plan.jobs if not j.merge]
    lines = [
        f"method           {method.name} ({', '.join(f'{f.name}={getattr(method, f.name)}' for f in dataclasses.fields(method))})",
        f"models           base + {n_models}",
        f"tensors          {len(merged)} merged, {len(copied)} copied from the base, "
        f"{sum(len(j.aliases) for j in plan.jobs)} tied alias(es)",
        f"parameters       {sum(j.numel for j in merged):,} merged",
        f"passes           {plan.passes} over the merged tensors"
        + (" (2 top-k selection passes, then the merge)" if plan.passes == 3 else ""),
        f"bytes to read    {format_size(plan.bytes_to_read)}",
        f"output size      {format_size(plan.output_bytes)}",
        f"peak memory      {format_size(plan.peak_bytes)} estimated (budget {format_size(plan.memory_budget)})",
    ]
    lines += [f"note             {n}" for n in plan.notes]
    return "\n".join(lines)


def merge(base: Source, models: Sequence[Source], method: str | MergeMethod = "ties", *,
          output: str | os.PathLike | None = None, device: str = "cpu", memory_budget: int | str | None = None,
          dtype: str | torch.dtype | None = None, shard_size: int | str = DEFAULT_SHARD_SIZE, force: bool = False,
          allow_pickle: bool = False, vocab_policy: str = "error", progress: bool = False,
          output_format: str = "model", rank: int | None = None, origin: Mapping[str, Any] | None = None,
          stats: Sequence[StatsInput] | None = None, **method_options: Any) -> Path | dict[str, torch.Tensor]:
    """Merge fine-tuned ``models`` of ``base`` and write an HF directory (or return a state dict).

    ``base`` and ``models`` are paths (HF directories, .safetensors files, PEFT LoRA or (IA)³
    adapter directories) or state dicts. ``method`` is a name with its options as keywords, or a
    method config object. ``output_format="adapter"`` writes a merged adapter instead of a full
    model (LoRA: re-factored by truncated SVD at ``rank``, default the largest input rank).
    ``origin`` (e.g. a translated mergekit recipe's format and semantics) goes into the manifest.
    ``stats``: the data-aware methods (``fisher``, ``regmean``) take one statistics directory
    (``tiesmerge stats``) or :class:`tiesmerge.stats.Statistics` per model, in the models' order.

    >>> import tiesmerge                                                      # doctest: +SKIP
    >>> tiesmerge.merge("base", ["ft-a", "ft-b"], "ties", density=0.2, output="merged")
    PosixPath('merged')
    >>> tiesmerge.merge(base_sd, [sd_a, sd_b], tiesmerge.methods.Ties(lam=1.2))  # -> state dict
    """
    started = time.perf_counter()
    m = _method(method, method_options)
    try:
        shard_bytes = parse_size(shard_size)
    except ValueError as exc:
        raise ConfigError(f"shard_size: {exc}") from None
    if output is not None:
        _check_output_not_input(output, base, models)
    with ExitStack() as stack:
        bar = None
        if progress:
            bar = stack.enter_context(tqdm(total=0, unit="B", unit_scale=True, unit_divisor=1024,
                                           desc=f"merging ({m.name})", dynamic_ncols=True))
        base_ckpt, model_ckpts, executor, opened_stats = _prepare(
            stack, base, models, m, device=device, memory_budget=memory_budget, dtype=dtype,
            vocab_policy=vocab_policy, allow_pickle=allow_pickle, progress=bar.update if bar else None,
            output_format=output_format, stats=stats)
        if bar is not None:
            bar.reset(total=executor.plan.bytes_to_read)
        prepared = time.perf_counter()
        if output is None:
            if output_format == "adapter":
                raise ConfigError("a merged adapter is written to a directory", hint="pass output=DIR")
            sink = MemorySink(executor.alignment.jobs, executor.out_dtype)
            executor.run(sink)
            return sink.state
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tiesmerge-hash")
        # on an error or Ctrl-C, skip the files not hashed yet: a plain `with pool` would hash every
        # remaining input (minutes for a large model) before the error is shown
        stack.callback(pool.shutdown, wait=True, cancel_futures=True)
        reference = executor.models[-1:] if getattr(m, "sign_from", None) else []  # streamed last
        inputs = [base_ckpt, *model_ckpts, *reference]  # the merged models, then any sign_from reference
        digests = [hash_files(c.files(), pool) for c in inputs]
        groups = [[OutputEntry(n, j.shape, (executor.out_dtype or j.dtype) if j.merge else j.dtype)
                   for n in (j.name, *j.aliases)] for j in executor.alignment.jobs]
        with atomic_directory(output, force=force, needed_bytes=executor.plan.output_bytes) as tmp:
            adapter_part = None
            if output_format == "adapter":
                run_stats, adapter_part = adapter_merge.write_adapter(tmp, executor, base_ckpt, model_ckpts,
                                                                      rank=rank, dtype=executor.out_dtype)
                files, copied = adapter_part["files"], []
            else:
                writer = ShardedWriter(tmp, groups, shard_bytes, metadata={"format": "pt", "tiesmerge": __version__})
                run_stats = executor.run(writer)
                writer.close()
                files = writer.files
            if executor.side is not None:
                run_stats.bytes_read += executor.side.bytes_read
            clock = time.perf_counter()
            if output_format != "adapter":
                copied = copy_model_files(base_ckpt.directory(), tmp,
                                          dtype=executor.out_dtype if executor.out_dtype else None)
            hashed = [[f.result() for f in d] for d in digests]
            _check_stats_digests(opened_stats, hashed[1:], [c.label for c in model_ckpts])
            run_stats.seconds["hash_wait"] = time.perf_counter() - clock
            run_stats.seconds["prepare"] = prepared - started
            recipe = MergeRecipe(method=m, base=base_ckpt.label, models=tuple(c.label for c in model_ckpts),
                                 dtype=str(executor.out_dtype).removeprefix("torch.") if executor.out_dtype else None,
                                 shard_size=str(shard_size), memory_budget=str(memory_budget or DEFAULT_MEMORY_BUDGET),
                                 device=str(device), vocab_policy=vocab_policy, output_format=output_format,
                                 rank=rank, origin=dict(origin) if origin else None,
                                 stats=tuple(s.label for s in opened_stats) or None)
            (tmp / "README.md").write_text(model_card(
                base_label=base_ckpt.label, model_labels=[c.label for c in model_ckpts], recipe_yaml=recipe.to_yaml(),
                method_name=m.name, paper=m.paper, summary=m.summary, version=__version__))
            run_stats.seconds["total"] = time.perf_counter() - started
            manifest = _manifest(recipe, executor, run_stats, hashed, files, copied)
            kind = next((getattr(c, "adapter_kind", None) for c in model_ckpts if hasattr(c, "adapter_kind")), None)
            if kind is not None:
                manifest["adapters"] = {"inputs": kind, "output_format": output_format, **(adapter_part or {})}
            if opened_stats:
                manifest["statistics"] = [{"label": s.label, "manifest": s.manifest.to_dict() if s.manifest else None}
                                          for s in opened_stats]
                manifest["statistics_missing"] = executor.side.missing if executor.side else []
            (tmp / "tiesmerge.json").write_text(json.dumps(manifest, indent=2) + "\n")
        return Path(output)


def _manifest(recipe: MergeRecipe, executor: Executor, stats: RunStats, hashed: list[list[dict]],
              files: list[str], copied: list[str]) -> dict[str, Any]:
    n = len(recipe.models)
    inputs: dict[str, Any] = {"base": {"label": recipe.base, "files": hashed[0]},
                              "models": [{"label": label, "files": h}
                                         for label, h in zip(recipe.models, hashed[1:1 + n], strict=True)]}
    if len(hashed) > 1 + n:  # TIES sign_from: the reference model read beside the merged ones
        inputs["sign_from"] = {"label": executor.models[n].label, "files": hashed[1 + n]}
    return {
        "tiesmerge_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "recipe": recipe.to_dict(),
        "method": {"name": recipe.method.name, "paper": recipe.method.paper,
                   "options": recipe.to_dict()["parameters"]},
        "inputs": inputs,
        "alignment": {"tied": [list(g) for g in executor.alignment.tied],
                      "truncated": list(executor.alignment.truncated), "vocab_policy": recipe.vocab_policy},
        "tensors": {"merged": stats.tensors_merged, "copied": stats.tensors_copied, "tied_aliases": stats.tensors_tied},
        "thresholds": stats.thresholds,
        "output": {"files": files, "copied_from_base": copied, "dtype": recipe.dtype or "same as base"},
        "engine": {"device": str(executor.device), "arithmetic": stats.engine,
                   "memory_budget_bytes": executor.plan.memory_budget,
                   "estimated_peak_bytes": executor.plan.peak_bytes, "passes": stats.passes,
                   "planned_passes": executor.plan.passes, "bytes_read": stats.bytes_read,
                   "per_tensor_reduction_bytes": stats.reduce_bytes, "sample_bytes": stats.sample_bytes},
        "seconds": {k: round(v, 4) for k, v in stats.seconds.items()},
    }



def analyze(base: Source, models: Sequence[Source], *, output: str | os.PathLike | None = None, density: float = 0.2,
            subsets_per_size: int | None = 10, seed: int = 0, curve: Sequence[float] | None = None,
            device: str = "cpu", memory_budget: int | str | None = None, vocab_policy: str = "error",
            allow_pickle: bool = False, force: bool = False, progress: bool = False) -> dict[str, Any]:
    """Measure interference between fine-tuned ``models`` of ``base``: sign conflicts after
    trimming to the top ``density`` (for 2..n models, ``subsets_per_size`` seeded subsets per
    size, None for all), the share of each task vector's mass in its top-k, the overlap of the
    top-k masks, and merged magnitudes by influence and sign agreement. Streamed like a merge.

    Returns the statistics as a JSON-ready dict; with ``output``, also writes ``analysis.json``,
    PNG plots and a self-contained ``report.html`` there.

    >>> import tiesmerge                                                      # doctest: +SKIP
    >>> report = tiesmerge.analyze("base", ["ft-a", "ft-b", "ft-c"], output="interference")
    >>> report["summary"][0]
    'With all 3 models trimmed to their top 20.0%, 41.2% of the parameters that two or more ...'
    """
    from .analysis import AnalysisSettings, run_analysis, summarise, write_report

    started = time.perf_counter()
    _check_inputs(base, models)
    settings = AnalysisSettings(density=density, subsets_per_size=subsets_per_size, seed=seed,
                                **({"curve": tuple(curve)} if curve is not None else {}))
    settings.check(len(models))
    device_t, budget = _device(device), _budget(memory_budget)
    if output is not None:
        _check_output_not_input(output, base, models)
        check_output_path(Path(output).absolute(), force)  # fail before the passes, not after them
    with ExitStack() as stack:
        base_ckpt, model_ckpts = _open_all(stack, base, models, allow_pickle)
        alignment = align(base_ckpt, model_ckpts, vocab_policy=vocab_policy)
        bar = None
        if progress:
            bar = stack.enter_context(tqdm(total=0, unit="B", unit_scale=True, unit_divisor=1024, desc="analyzing",
                                           dynamic_ncols=True))
            bar.reset(total=3 * sum(j.numel * j.dtype.itemsize for j in alignment.jobs if j.merge) * (len(models) + 1))
        data = run_analysis(base_ckpt, model_ckpts, alignment, settings, device=device_t, memory_budget=budget,
                            progress=bar.update if bar is not None else None)
        data["inputs"] = {"base": base_ckpt.label, "models": [c.label for c in model_ckpts]}
    data["tiesmerge_version"] = __version__
    data["created"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    data["summary"] = summarise(data)
    data["seconds"]["total"] = round(time.perf_counter() - started, 3)
    if output is not None:
        write_report(data, output, force=force)
    return data
