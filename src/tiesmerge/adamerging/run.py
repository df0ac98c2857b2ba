"""``tiesmerge.adapt``: learn the merge's coefficients on unlabeled inputs, write the merged model.

The steps: the per-task vectors (the engine, :mod:`.vectors`), the forward (the evaluation's,
:mod:`tiesmerge.evaluation.forward`), the coefficients (:mod:`.learn`), then the merged model,
written by :func:`tiesmerge.merge` with :class:`LearnedMerge` (so the output directory, model card,
hashes and manifest are a merge's), the coefficients and the entropy curve beside it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
import warnings
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from ..errors import ConfigError, MergeWarning, OutputError
from ..evaluation.forward import ChoiceLogits, TaskForward, as_rows, load_forward
from ..evaluation.loading import refuse_multi_label, warn_unknown
from ..evaluation.rank_classification import MAX_CHOICES
from ..inputs import (
    Source,
    as_method,
    check_booleans,
    check_ordered,
    check_output_not_input,
    device_of,
    method_inputs,
    prepare,
)
from ..io.writer import _check_output_path as check_output_path
from ..io.writer import _remove_empty
from ..lazy import torch
from ..limits import check_surrogates, plain_numbers
from ..methods.base import ChunkContext, MergeMethod, Requirements, _shown
from ..paths import check_output_file, fs_text, held_through_mount, nested, physical
from ..sizes import format_size
from .learn import AdaptConfig, History, Merger, combine, is_checkpoint, learn, load_checkpoint
from .report import summarise, write_report
from .vectors import _Collect, collect_task_vectors, exposes_task_vectors

__all__ = ["AdaptResult", "LearnedMerge", "adapt", "check_adapt_outputs", "describe_adapt", "read_task_data"]

PAPER = "https://arxiv.org/abs/2310.02575"  # Yang et al., AdaMerging, ICLR 2024


@dataclass(frozen=True)
class LearnedMerge:
    """theta = base + sum_t lambda[t, layer] v_t, v_t the ``vectors`` method's per-task vectors:
    a merge with learned coefficients, as ``tiesmerge adapt`` writes it. ``coefficients`` names
    the JSON file beside the model that holds the values (the recipe records the file, not the
    T x L numbers)."""

    vectors: str  # the method of the per-task vectors, as "name:key=value,..."
    granularity: str
    coefficients: str
    name: ClassVar[str] = "adamerging"
    paper: ClassVar[str] = PAPER
    summary: ClassVar[str] = "task vectors combined with coefficients learned by entropy minimisation on " \
                             "unlabeled inputs (AdaMerging; over TIES vectors: AdaMerging++)"

    @classmethod
    def of(cls, inner: MergeMethod, table: torch.Tensor, layers: Sequence[str], granularity: str,
           coefficients_file: str) -> LearnedMerge:
        made = cls(method_spec(inner), granularity, coefficients_file)
        object.__setattr__(made, "_inner", inner)
        object.__setattr__(made, "_table", table.detach().float().cpu())  # (T, L)
        object.__setattr__(made, "_layer", {n: (i if granularity == "layer" else 0) for i, n in enumerate(layers)})
        return made

    def requirements(self) -> Requirements:
        return dataclasses.replace(self._inner.requirements(), kernel=None)  # type: ignore[attr-defined]

    def merge(self, tau: torch.Tensor, ctx: ChunkContext) -> torch.Tensor:
        v = self._inner.task_vectors(tau, ctx).float()  # type: ignore[attr-defined]  # (T, *S)
        lam = self._table[:, self._layer[ctx.name]].to(v.device)  # type: ignore[attr-defined]  # (T,)
        return combine(lam, v)  # (*S), as Merger.tensor computes it


def method_spec(method: MergeMethod) -> str:
    """``name:key=value,...`` of the options that differ from the defaults (JSON values)."""
    changed = {f.name: getattr(method, f.name) for f in dataclasses.fields(method)
               if getattr(method, f.name) != f.default}
    if not changed:
        return method.name
    return method.name + ":" + ",".join(f"{k}={json.dumps(list(v) if isinstance(v, tuple) else v)}"
                                        for k, v in changed.items())


@dataclass
class AdaptResult:
    """coefficients: (T, L) on the CPU; layers: the merged tensors (L of them layer-wise);
    output: the merged model's directory, or its state dict when no output was given."""

    coefficients: torch.Tensor
    tasks: list[str]
    layers: list[str]
    granularity: str
    history: History
    output: Path | dict[str, torch.Tensor]
    seconds: dict[str, float]


def _check_data_list(data: Any) -> None:
    if isinstance(data, (str, bytes, os.PathLike)) or not isinstance(data, Sequence):
        raise ConfigError(f"data must list one data file (or list of rows) per model, got {type(data).__name__}",
                          hint='e.g. data=["a.jsonl", "b.jsonl"], in the models\' order')


def read_task_data(data: Sequence[Any], tasks: Sequence[str] | None = None, *,
                   limit: int | None = None) -> dict[str, list[dict[str, Any]]]:
    """Task name -> rows, one entry of ``data`` per model: a JSON-lines file (read as ``tiesmerge
    stats`` reads it: one ``{"text": ...}`` per line, labels ignored) or a list of rows/strings.
    Tasks are named by ``tasks``, else by the files' stems (task0, task1, ... for lists)."""
    from ..stats.hf import read_jsonl

    _check_data_list(data)
    if tasks is not None and len(tasks) != len(data):
        raise ConfigError(f"{len(tasks)} task name(s) for {len(data)} data file(s)")
    out: dict[str, list[dict[str, Any]]] = {}
    for i, item in enumerate(data):
        is_path = isinstance(item, (str, os.PathLike))
        name = tasks[i] if tasks is not None else (Path(item).stem if is_path else f"task{i}")
        # a name holding a byte that is no UTF-8 (a file d\xff.jsonl: the surrogate '\udcff' here) is shown escaped:
        # it goes into reports, plots and the checkpoint's fingerprint, which are text (hostile pass 25, F12)
        name = name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace") \
            if isinstance(name, str) else name
        if name in out:
            # named by the stems of two files, or given the same name twice (hp68b c41: the hint to name them said
            # to one who had)
            raise ConfigError(f"two tasks are named {name!r}" + (" (the names given)" if tasks is not None else
                                                                 " (their data files' names)"),
                              hint="give each task its own name (--task-names / tasks=)" if tasks is not None else
                              "name the tasks (--task-names / tasks=), or give the data files other names")
        if is_path:
            rows = read_jsonl(item, limit=limit, empty_texts=True, unread_said=False)  # an empty file: named
        elif isinstance(item, Sequence) and not isinstance(item, (str, bytes)):
            rows = as_rows(list(item)[:limit] if limit is not None else list(item), f"task {name!r}")
            if not rows:
                raise ConfigError(f"task {name!r}: no examples")
        else:
            raise ConfigError(f"task {name!r}: its data is a {type(item).__name__}, not a data file or a list of rows")
        where = str(item) if is_path else f"task {name!r}"
        for k, row in enumerate(rows):
            # an empty text has no tokens: the forward could not score it (a tokenizer may even give (B, 0))
            text = row.get("text")
            if text is not None and not isinstance(text, str):  # bytes, a number: there, but not text (hp78b c17)
                raise ConfigError(f"{where}: example {k + 1}'s 'text' is a {type(text).__name__}, not a string",
                                  hint="give each example's text as a str (decode bytes first: text.decode('utf-8'))"
                                  if isinstance(text, (bytes, bytearray)) else "give each example's text as a str")
            if text is None or not text.strip():
                raise ConfigError(f"{where}: example {k + 1} has an empty or missing 'text'",
                                  hint="every example needs some text; drop the empty ones")
            # fields a data file could hold: JSON's (hp82b c19, c20: object(), a set, an int key or a list nested
            # 5000 deep beside the text were tracebacks of the digest's json.dumps)
            row = rows[k] = plain_numbers(row)  # numpy's scalars (a label np.int64(1)) are numbers (hp83b c08)
            try:
                json.dumps(row, sort_keys=True, allow_nan=True)
            except (TypeError, ValueError, RecursionError) as exc:
                reason = "nested too deep" if isinstance(exc, RecursionError) else str(exc).splitlines()[0][:120]
                raise ConfigError(f"{where}: example {k + 1} holds a field that is not JSON data ({reason})",
                                  hint="give each example as a data file's line would hold it: text keys, and "
                                       "strings, numbers, booleans, lists or mappings of them") from None
            # a lone surrogate ("\udc80") no tokenizer encodes: named as a data file's is, not as the model failing in
            # its forward pass with a hint at its config.json (hp80b c12)
            check_surrogates(row, f"{where}: example {k + 1}", ConfigError)
        out[name] = rows
    return out


def _fingerprint(base: Source, models: Sequence[Source], spec: str, config: AdaptConfig, data: Mapping[str, list],
                 forward: str, forward_settings: Mapping[str, Any] | None = None) -> str:
    """What a checkpoint must have been computed with to be resumed (the step count may grow), as JSON text of its
    parts, so that a refused resume can say which part differs (hp39 C24): the inputs (their resolved paths and the
    stamps of their files: weights replaced at the same path, or a permuted tokenizer, resumed silently, hp38 C8, C9),
    the method, the run's settings, the forward and its settings (max_length, heads, choices change what the
    coefficients are learned on: a resume with another --max-length ended with coefficients of neither run, hp35 E7),
    and a digest of each task's data."""
    from ..tuning.driver import (
        source_label,
        weights_stamp,  # search's: the inputs' weights, configs and tokenizer files
    )

    def named(source: Source, k: int) -> str:  # search's log names: ./base/ and base are one folder (hp39 C24)
        return source_label(source) or f"state dict {k}"

    def short(value: Any) -> str:
        return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]

    settings = {**dataclasses.asdict(config), "steps": None, "checkpoint_every": None}
    # per input (base first): its name and the stamp of its files, so that a refusal names the model that changed
    # (hp41 C69: "another base or fine-tuned model, or their files" named none)
    parts = {"inputs": [[named(s, k), weights_stamp([s])] for k, s in enumerate([base, *models])],
             "method": spec, "settings": short(settings), "forward": forward,
             "forward_settings": json.loads(json.dumps(dict(forward_settings or {}), sort_keys=True, default=str)),
             "data": [[task, short(rows)] for task, rows in data.items()]}  # a list: the tasks' order is the rows'
    # json's sort_keys orders the parts' names only; lists keep their order
    return json.dumps({"format": "tiesmerge-adapt-fingerprint/3", **parts}, sort_keys=True)


def _forward_dtypes(forward: TaskForward, names: Sequence[str]) -> dict[str, torch.dtype]:
    held = dict(forward.named_parameters())  # type: ignore[attr-defined]
    held.update(dict(forward.named_buffers()))  # type: ignore[attr-defined]
    return {n: held[forward.prefix + n].dtype for n in names if forward.prefix + n in held}


def describe_adapt(base: Source, models: Sequence[Source], method: str | MergeMethod = "task_arithmetic", *,
                   granularity: str = "layer", batch_size: int = 16, device: str = "cpu",
                   allow_pickle: bool = False, vocab_policy: str = "error", **method_options: Any) -> str:
    """What ``tiesmerge adapt --dry-run`` prints: the coefficients and the memory a run holds,
    from the checkpoints' headers (no tensor data is read)."""
    m = as_method(method, method_options)
    if not exposes_task_vectors(m):
        collect_task_vectors(base, models, m)  # raises the error naming the method
    with ExitStack() as stack:
        prepared = prepare(stack, base, models, _Collect(m), device=device, memory_budget=None, dtype="float32",
                           vocab_policy=vocab_policy, allow_pickle=allow_pickle)
        jobs = prepared.executor.alignment.jobs
    merged = [j for j in jobs if j.merge]
    n = len(models)
    merged_numel = sum(j.numel for j in merged)
    base_bytes = sum(j.numel * 4 if j.merge else j.nbytes for j in jobs)
    vectors = n * merged_numel * 4
    theta = 2 * merged_numel * 4  # the merged weights and their gradient, each step
    total = 2 * base_bytes + vectors + theta
    layers = len(merged) if granularity == "layer" else 1
    return "\n".join([
        f"method           adamerging over {method_spec(m)} ({granularity}-wise)",
        f"models           base + {n}",
        f"coefficients     {n} x {layers} = {n * layers:,} learned",
        f"tensors          {len(merged)} merged, {len(jobs) - len(merged)} taken from the base",
        f"base             {format_size(base_bytes)} (float32 where merged), and the forward's own copy of it",
        f"task vectors     {format_size(vectors)} ({n} x {merged_numel:,} float32)",
        f"merged weights   {format_size(theta)} (theta and its gradient)",
        f"memory           {format_size(total)} on {device}, plus one task's activations for a batch of "
        f"{batch_size} (model- and input-dependent, not estimated)",
    ])


def check_adapt_request(base: Source, models: Sequence[Source], data: Sequence[Any],
                        method: str | MergeMethod = "task_arithmetic", *, forward: str | TaskForward = "classifier",
                        heads: Mapping[str, Sequence[str]] | None = None,
                        choices: Mapping[str, Sequence[str]] | None = None, tasks: Sequence[str] | None = None,
                        granularity: str = "layer",
                        steps: int = 500, lr: float = 1e-3, batch_size: int = 16, init: float = 0.3,
                        shuffle_seed: int = 0, clamp: tuple[float, float] | None = None,
                        checkpoint_every: int | None = None, objective: str = "entropy", limit: int | None = None,
                        **method_options: Any) -> tuple[AdaptConfig, MergeMethod]:
    """The checks of an adapt run that read no weights and no data: its settings, the method's per-model values, the
    data files' count, heads and choices for a forward that reads them. A dry run makes them too (hp45 c06: --dry-run
    printed its plan for settings the run refuses at once)."""
    check_ordered(models)  # a set's order binds per-model options at random (hp40b C43)
    if clamp is not None and not (isinstance(clamp, (list, tuple)) and len(clamp) == 2 and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in clamp)):
        raise ConfigError(f"clamp must be (low, high), two numbers, got {_shown(clamp)}")  # (hp59b c31)
    if tasks is not None and (isinstance(tasks, (str, bytes, Mapping)) or not isinstance(tasks, (list, tuple))
                              or not all(isinstance(t, str) and t for t in tasks)):
        raise ConfigError(f"tasks must be a list of names (non-empty strings), one per data file, got "
                          f"{_shown(tasks)}")  # (hp59b c32: bytes names failed writing the manifest's JSON)
    config = AdaptConfig(granularity=granularity, steps=steps, lr=lr, batch_size=batch_size, init=init,
                         seed=shuffle_seed, clamp=tuple(clamp) if clamp is not None else None,
                         checkpoint_every=checkpoint_every, objective=objective)
    problems = config.problems()
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        problems.append(f"limit must be an integer >= 1, got {limit!r} (the examples used of each data file)")
    if problems:
        raise ConfigError(problems)
    m = as_method(method, method_options)
    if not exposes_task_vectors(m):
        collect_task_vectors(base, models, m)  # the error naming the method, before anything is read
    from ..methods.base import check_models

    if not isinstance(models, (str, os.PathLike, Mapping)):  # (a single path is said below, as merge says it)
        problems = check_models(m, len(models))  # per-model values of the wrong count, as merge refuses them: 3
        if problems:  # densities for 2 models was "a bug in tiesmerge", --weights 5 a changed result (hp43 c44, c45)
            raise ConfigError(problems)
    _check_data_list(data)
    if len(data) != len(models):
        raise ConfigError(f"{len(data)} data file(s) for {len(models)} model(s)",
                          hint="give one unlabeled data file per model, in the models' order")
    if tasks is not None and len(tasks) != len(data):  # (hp46 c10: a dry run passed it)
        raise ConfigError(f"{len(tasks)} task name(s) for {len(data)} data file(s)")
    if tasks is not None and (twice := next((t for i, t in enumerate(tasks) if t in list(tasks)[:i]), None)):
        # (hp87b c52: the dry run passed what the run refuses at once)
        raise ConfigError(f"two tasks are named {twice!r} (the names given)",
                          hint="give each task its own name (--task-names / tasks=)")
    if forward == "encoder" and heads is None:  # "task 'ua' has no class descriptions in --heads" of no --heads (c52)
        raise ConfigError("--forward encoder needs --heads FILE (heads= in Python): each task's class descriptions, "
                          "which the encoder's embeddings are compared with",
                          hint='--heads is a JSON object: {"task": ["first", "second", ...], ...}, one entry per task')
    if isinstance(forward, str):  # a built-in forward named (the command line's); a module of the caller's is
        _refuse_unread_labels(forward, heads, choices)  # checked after the labels themselves, in _adapt
    elif not (isinstance(getattr(forward, "prefix", None), str) and callable(getattr(forward, "encode", None))
              and callable(forward) and callable(getattr(forward, "named_parameters", None))):
        # None, a number, a plain nn.Linear: "'NoneType' object has no attribute 'to'" from inside (hp87b c57)
        from ..evaluation.forward import FORWARD_KINDS

        raise ConfigError(f"forward={_shown(forward)}: a forward is a kind's name ({', '.join(FORWARD_KINDS)}) or a "
                          "task forward module (a torch.nn.Module with a prefix and encode(rows, task), as "
                          "tiesmerge.evaluation.forward's FunctionLogits)",
                          hint='leave forward out for "classifier", or name another kind')
    return config, m


def _refuse_unread_labels(forward: Any, heads: Any, choices: Any) -> None:
    """A file the forward never reads: accepted, unused, and recorded in the manifest as if it had been (hp42 D60)."""
    for given, flag, needs in ((heads, "heads", "encoder"), (choices, "choices", "choice")):
        if given is not None and forward != needs:
            shown = forward if isinstance(forward, str) else type(forward).__name__
            raise ConfigError(f"--{flag} applies to --forward {needs}, and the forward is {shown}: it would not be "
                              "read", hint=f"add --forward {needs}, or leave --{flag} out")


def adapt(base: Source, models: Sequence[Source], data: Sequence[Any], method: str | MergeMethod = "task_arithmetic",
          *, forward: str | TaskForward = "classifier", tasks: Sequence[str] | None = None,
          heads: Mapping[str, Sequence[str]] | None = None, choices: Mapping[str, Sequence[str]] | None = None,
          granularity: str = "layer", steps: int = 500, lr: float = 1e-3, batch_size: int = 16, init: float = 0.3,
          shuffle_seed: int = 0, clamp: tuple[float, float] | None = None, checkpoint_every: int | None = None,
          limit: int | None = None, max_length: int = 128, device: str = "cpu", objective: str = "entropy",
          memory_budget: int | str | None = None, output: str | os.PathLike | None = None, force: bool = False,
          checkpoint: str | os.PathLike | None = None, resume: bool = False, progress: bool = False,
          allow_pickle: bool = False, vocab_policy: str = "error", **method_options: Any) -> AdaptResult:
    """Learn AdaMerging coefficients for ``models`` of ``base`` on one unlabeled data set per
    model (``data``: JSON-lines files or lists of rows, in the models' order), and merge with them.

    ``method`` gives the per-task vectors (``task_arithmetic``: AdaMerging; ``ties``:
    AdaMerging++; any method defining ``task_vectors``), with its options as keywords.
    ``forward``: ``"classifier"``, ``"encoder"`` (with ``heads``: class descriptions per task) or
    ``"choice"`` (with ``choices`` per task, or per row), built from ``base``; or a task forward
    module (:mod:`tiesmerge.evaluation.forward`, e.g. ``FunctionLogits``) holding the base's
    weights. Defaults are the paper's: Adam, ``lr`` 1e-3, ``steps`` 500, ``batch_size`` 16 per
    task, every coefficient starting at ``init`` 0.3; ``shuffle_seed`` seeds the batches' order (the
    only randomness; ``seed`` is left to the methods' options, e.g. DARE's). ``objective``: ``"entropy"`` (the
    paper's, on unlabeled inputs) or ``"cross_entropy"`` (every row needs an integer ``label``: learned from
    labelled data such as a validation split). ``output``: the merged model's directory
    (as :func:`tiesmerge.merge` writes it, plus the coefficients and the entropy curve); without
    it the merged state dict is returned. ``checkpoint`` (default: ``OUTPUT.adapt-checkpoint.safetensors``
    beside the output): the coefficients and optimizer state, written each pass over the data;
    ``resume`` continues from it.

    >>> r = tiesmerge.adapt("base", ["ft-a", "ft-b"], ["a.jsonl", "b.jsonl"], "ties",   # doctest: +SKIP
    ...                     forward="classifier", granularity="layer", output="merged")
    >>> r.coefficients.shape                                                            # doctest: +SKIP
    torch.Size([2, 101])
    """
    started = time.perf_counter()
    # switches and paths as merge takes them, checked before the training (hp59b c40: force="yes" after it, and
    # its checkpoint left beside the output; c33: a bytes output)
    check_booleans(force=force, resume=resume, progress=progress, allow_pickle=allow_pickle)
    output, checkpoint = fs_text(output), fs_text(checkpoint)
    if output is not None and not isinstance(output, (str, os.PathLike)):
        raise ConfigError(f"output is a {type(output).__name__}, not a path of the merged model's folder")
    if checkpoint is not None and not isinstance(checkpoint, (str, os.PathLike)):
        raise ConfigError(f"checkpoint is a {type(checkpoint).__name__}, not a path of the checkpoint file")
    # numpy's scalars are numbers (hp59b c25)
    steps, lr, batch_size, init, shuffle_seed, clamp, checkpoint_every, limit, max_length = (
        plain_numbers(v) for v in (steps, lr, batch_size, init, shuffle_seed, clamp, checkpoint_every, limit,
                                   max_length))
    if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 1:  # 0 truncated every
        raise ConfigError(f"max_length must be a whole number of tokens >= 1, got {_shown(max_length)}")  # input
    from ..inputs import check_inputs, resolve_sources

    # bytes paths and a generator of models, as merge and tune take them (hp77b c24, c25: TypeError tracebacks)
    base, models = resolve_sources(base, models)
    check_inputs(base, models)  # None, 5, a module: typed, as tune says them (hp80b c21: a TypeError traceback)
    config, m = check_adapt_request(base, models, data, method, forward=forward, heads=heads, choices=choices,
                                    tasks=tasks, granularity=granularity, steps=steps, lr=lr, batch_size=batch_size,
                                    init=init, shuffle_seed=shuffle_seed, clamp=clamp,
                                    checkpoint_every=checkpoint_every, objective=objective, limit=limit,
                                    **method_options)
    device = str(device_of(device))  # cpu, or a CUDA device that exists: a typed error before anything (hp35 E57)
    checkpoint, created = check_adapt_outputs(base, models, data, output=output, force=force, checkpoint=checkpoint,
                                              resume=resume, create=True, method=m)
    try:
        return _adapt(started, config, m, base, models, data, forward, tasks, heads, choices, limit, max_length, device,
                      memory_budget, output, force, checkpoint, resume, progress, allow_pickle, vocab_policy)
    except BaseException:
        _remove_empty(created)  # the folders made for the default checkpoint, when the run left nothing in them
        raise


def check_adapt_outputs(base: Source, models: Sequence[Source], data: Sequence[Any], *,
                        output: str | os.PathLike | None, force: bool, checkpoint: str | os.PathLike | None,
                        resume: bool, create: bool = False, method: MergeMethod | None = None
                        ) -> tuple[str | os.PathLike | None, list[Path]]:
    """The checks of what a run writes, before any work (``tiesmerge adapt --dry-run -o`` runs them too): the
    output and the checkpoint are no input, the output replaces only an earlier output (``force``), the checkpoint
    lies beside the output, never inside it, and an existing one is replaced only with ``force`` or resumed
    (``resume``: read now, so a file that is no checkpoint is refused before the training). Returns the checkpoint
    (the default one beside the output when none is named) and the folders made for it (``create``): the default
    checkpoint's folder is the output's parent, which the run creates."""
    inputs = [("the base", base), *((f"model {k}", s) for k, s in enumerate(models)),
              *((f"data file {k}", d) for k, d in enumerate(data) if isinstance(d, (str, os.PathLike))),
              *(method_inputs(method) if method is not None else ())]  # e.g. TIES' sign_from
    defaulted = checkpoint is None and output is not None
    folder = next((k for k, d in enumerate(data) if isinstance(d, (str, os.PathLike)) and os.path.isdir(d)), None)
    if folder is not None:  # said as what it is, before "the output lies inside data file 0 (.)" (hp74b c20)
        raise ConfigError(f"data file {folder} ({os.fspath(data[folder])}): is a directory, and each --data is a "
                          "JSONL file of one task's examples",
                          hint='give the file itself: one {"text": ...} object per line')
    if output is not None:
        check_output_not_input(output, inputs)
        check_output_path(Path(output).absolute(), force)  # before the training, not after it
        if checkpoint is None:
            checkpoint = default_checkpoint(Path(output))
            folder = physical(checkpoint).parent
            if not os.path.isdir(folder):
                # the output's missing parent (checked above, as the output's): nothing can be there yet, and the
                # output's checks cover it (the checkpoint is inside an input only if the output is)
                created = [folder, *(p for p in folder.parents if not p.exists())]  # innermost first
                if create:
                    try:
                        folder.mkdir(parents=True)
                    except OSError as exc:
                        raise OutputError(f"{output}: cannot create the output's folder {folder} "
                                          f"({exc.strerror or exc})", hint="choose a location you can write to") \
                            from None
                    return checkpoint, created
                return checkpoint, []
        elif os.path.isdir(checkpoint):  # a file is written there: a folder (the working one, say) is no checkpoint
            raise OutputError(f"{checkpoint}: the checkpoint is a directory; it names the file the run saves its "
                              "progress to", hint="name a file, e.g. --checkpoint run.adapt-checkpoint.safetensors "
                                                  "(or leave it out: beside the output)")
        elif nested(checkpoint, output) or held_through_mount(checkpoint, output):
            # the finished run writes the output whole (--force: replaces it): the output below the checkpoint's
            # path (its parent named as the checkpoint), or the checkpoint in it (by path, or through a bind mount)
            inner = Path(os.path.realpath(checkpoint)) in Path(os.path.realpath(output)).parents
            mounted = "," if nested(checkpoint, output) else ", reached through another mount of it,"
            where = (f"the output directory {output} lies inside the checkpoint's path" if inner else
                     f"the checkpoint lies at or inside the output directory {output}{mounted} which the finished "
                     "run writes as a whole")
            raise OutputError(f"{checkpoint}: {where}", hint="write the checkpoint beside the output (the default), "
                                                             "not into it or above it")
    if checkpoint is not None:
        # written each pass: never over an input (checked first: an input is never read as a checkpoint), and an
        # existing file only when resuming it (a file that is no checkpoint: the error says so) or with force
        ours = _resumable if resume else is_checkpoint
        try:
            check_output_file(checkpoint, force or resume, inputs, "the checkpoint", ours=ours)
        except OutputError as exc:
            if not (force or resume) and is_checkpoint(Path(checkpoint)):  # an earlier or interrupted run's progress
                exc.hint = ("--resume continues that run from it (the same command), --force starts afresh over it, "
                            "or choose another path" + ("; it is the default checkpoint beside the output, and "
                                                        "--checkpoint PATH puts the new one elsewhere"
                                                        if defaulted else ""))
            elif defaulted:  # the user never named this path: say where it comes from and how to move it
                exc.hint = (f"{checkpoint} is the default checkpoint beside the output; --checkpoint PATH "
                            f"(checkpoint=...) puts it elsewhere" + (f"; {exc.hint}" if exc.hint else ""))
            raise
        if resume and os.path.isfile(checkpoint):  # a link to a file, which check_output_file does not open
            load_checkpoint(Path(checkpoint))
    return checkpoint, []


def _resumable(path: Path) -> bool:
    load_checkpoint(path)  # a file that is no checkpoint of ours: say so, as resuming it would
    return True


def _adapt(started: float, config: AdaptConfig, m: MergeMethod, base: Source, models: Sequence[Source],
           data: Sequence[Any], forward: str | TaskForward, tasks: Sequence[str] | None,
           heads: Mapping[str, Sequence[str]] | None, choices: Mapping[str, Sequence[str]] | None, limit: int | None,
           max_length: int, device: str, memory_budget: int | str | None, output: str | os.PathLike | None,
           force: bool, checkpoint: str | os.PathLike | None, resume: bool, progress: bool, allow_pickle: bool,
           vocab_policy: str) -> AdaptResult:
    from ..api import merge

    granularity = config.granularity
    task_data = read_task_data(data, tasks, limit=limit)
    sources = {t: str(d) for t, d in zip(task_data, data) if isinstance(d, (str, os.PathLike))}  # task -> its file
    if config.objective == "cross_entropy":  # labels checked now, each error naming its data file (learn checks too)
        from .learn import check_labels as check_targets

        check_targets(task_data, sources)
    largest = max(len(rows) for rows in task_data.values())
    # a batch draws its rows from endless reshuffles: far past the data (not the default 16 on a small file), it
    # repeats each row many times a step
    if config.batch_size > max(16, 4 * largest):
        warnings.warn(MergeWarning(f"batch_size {config.batch_size:,} is more than any task's examples (at most "
                                   f"{largest:,}): each step scores every example about "
                                   f"{config.batch_size // largest:,} times; --batch-size {largest:,} costs a "
                                   "fraction of the time"), stacklevel=3)
    if forward == "encoder" or heads is not None:
        check_labels(heads or {}, "heads", "class descriptions", task_data, every_task=forward == "encoder")
    if choices is not None:
        check_labels(choices, "choices", "answer choices", task_data, every_task=False)
    _refuse_unread_labels(forward, heads, choices)
    seconds: dict[str, float] = {}
    clock = time.perf_counter()
    if isinstance(forward, str):
        if isinstance(base, Mapping):
            raise ConfigError("a forward built from a directory needs the base as a directory",
                              hint="pass forward= a task forward module holding the base's weights")
        kind = forward
        if forward == "classifier":  # the fine-tunes' heads too, not only the base's config (hp72b c52)
            refuse_multi_label(base, "adapt's classifier forward (its entropy and cross-entropy)", models)
        fwd: TaskForward = load_forward(forward, base, heads=heads, choices=choices, max_length=max_length,
                                        device=device)  # type: ignore[assignment]
        if forward == "choice":  # (a causal LM: checked by load_forward) a task without choices needs them per row
            _check_row_choices(task_data, choices)
            for task, rows in task_data.items():  # and a row's own choices must tell apart (hp42 D59)
                fwd.check_rows(rows, task)  # type: ignore[attr-defined]
        _warn_unread_by_forward(forward, task_data)
        examples_cut = _warn_cut(fwd, task_data, max_length)
    else:
        kind, fwd = type(forward).__name__, forward
        fwd.to(device)  # type: ignore[attr-defined]
        examples_cut = None  # the user's forward encodes as it likes
    seconds["forward"] = time.perf_counter() - clock
    clock = time.perf_counter()
    from ..tuning.driver import InputWatch

    # the final merge reads the models again: one replaced meanwhile would get coefficients learned for another
    # (hp45 c17: a run wrote base + c·(the new model's delta), its manifest naming the new files)
    watch = InputWatch([("the base", base), *((f"model {k}", p) for k, p in enumerate(models)),
                        *method_inputs(m)], during="adapt",
                       harm="the coefficients were learned on the model as it was, and the merge would apply them to "
                            "the new files",
                       hint="let whatever writes it finish, then run adapt again (with --checkpoint and --resume, a "
                            "resume refuses the changed model too)")
    tv = collect_task_vectors(base, models, m, device=device, memory_budget=memory_budget, vocab_policy=vocab_policy,
                              allow_pickle=allow_pickle)
    seconds["task_vectors"] = time.perf_counter() - clock
    merger = Merger({n: tv.base[n].to(device) for n in tv.names}, {n: v.to(device) for n, v in tv.vectors.items()},
                    tv.names, granularity, _forward_dtypes(fwd, tv.names))
    # a reference model the method reads (ties' sign_from) is an input too: its files are stamped (hp39 C1)
    references = [p for _, p in method_inputs(m)]
    fingerprint = _fingerprint(base, [*models, *references], method_spec(m), config, task_data, kind,
                               {"max_length": max_length, "heads": heads, "choices": choices})
    coefficients, history, learn_seconds = learn(fwd, merger, task_data, config, checkpoint=checkpoint, resume=resume,
                                                 fingerprint=fingerprint, progress=progress, sources=sources)
    seconds.update({f"learn_{k}": v for k, v in learn_seconds.items()})
    layers = list(tv.names)
    del merger, tv  # the final merge streams again: the vectors need not stay in memory
    watch.check()
    task_names = list(task_data)
    learned = LearnedMerge.of(m, coefficients, layers, granularity, "adamerging_coefficients.json")
    clock = time.perf_counter()

    def finish(staging: Path, manifest: dict[str, Any]) -> None:
        """The coefficients, heat map and entropy curve, and the manifest's ``adamerging`` part,
        written into the output before it is renamed into place (atomic with the weights)."""
        seconds["merge"] = time.perf_counter() - clock
        seconds["total"] = time.perf_counter() - started
        files = write_report(staging, coefficients, task_names, layers, granularity, history)
        manifest["adamerging"] = {
            "paper": PAPER, "vectors": method_spec(m), "vectors_paper": m.paper, "granularity": granularity,
            "tasks": task_names, "data": [str(d) if isinstance(d, (str, os.PathLike)) else f"{len(task_data[t])} rows"
                                          for d, t in zip(data, task_names)],
            "examples": {t: len(r) for t, r in task_data.items()}, "forward": kind,
            # what the forward read of them (hp39 C23: --max-length changed the coefficients and was recorded nowhere)
            **({"forward_settings": {"max_length": getattr(fwd, "max_length", max_length),
                                     "max_length_asked": max_length, "heads": heads, "choices": choices,
                                     "examples_cut": examples_cut}} if examples_cut is not None else {}),
            "config": {**dataclasses.asdict(config), "optimizer": "adam"}, "n_coefficients": int(coefficients.numel()),
            # a resume past --steps ends at the checkpoint's step: config.steps is what was asked (hp40 A9)
            "steps_taken": len(history.entropy),
            "entropy": {"first": _mean_row(history, 0), "last": _mean_row(history, -1)},
            "coefficients_summary": summarise(coefficients, task_names, layers, granularity),
            "files": files, "checkpoint": str(checkpoint) if checkpoint is not None else None,
            "seconds": {k: round(v, 3) for k, v in seconds.items()},
            "recipe_note": "recipe.parameters.coefficients names the JSON file holding the learned values",
        }

    from ..finite import NotFiniteError

    try:
        written = merge(base, models, learned, output=output, device=device, memory_budget=memory_budget, force=force,
                        allow_pickle=allow_pickle, vocab_policy=vocab_policy, progress=progress,
                        finish=finish if output is not None else None)
    except NotFiniteError as exc:  # the merge's hint names --dtype and lam, which adapt has not (hp35 E21)
        if exc.base_value is not None:  # the base's own value past the range: no coefficient is to blame (hp47 c66)
            raise
        exc.hint = ("the learned coefficients scale a task vector past the output dtype" + (" (float16 holds values "
                    "up to 65504)" if exc.code == "F16" else "") + ": bound them with --clamp (e.g. --clamp 0 1) or "
                    "start lower with --init, and check the models for huge values")
        raise
    seconds["merge"] = time.perf_counter() - clock
    seconds["total"] = time.perf_counter() - started
    return AdaptResult(coefficients, task_names, layers, granularity, history, written, seconds)


# the keys of a row each built-in forward reads (the data reader knows every forward's: text_pair, choices)
_FORWARD_READS = {"classifier": ("text", "text_pair", "label"), "encoder": ("text", "label"),
                  "choice": ("text", "choices", "label")}


def _warn_unread_by_forward(kind: str, task_data: Mapping[str, Sequence[Any]]) -> None:
    """Row keys this forward reads nothing from, though another forward would: a sentence pair given to the encoder
    forward, choices to the classifier's, were dropped silently (hp53 c24)."""
    reads = _FORWARD_READS.get(kind)
    if reads is None:
        return
    from ..limits import KEYS_SHOWN, more_keys, unread_keys

    unread = unread_keys(((task, row) for task, rows in task_data.items() for row in rows), reads)  # key -> task
    if unread:
        others = [f for f, r in _FORWARD_READS.items() if f != kind and any(k in r for k in unread)]
        warnings.warn(MergeWarning(
            f"--forward {kind} reads {', '.join(map(repr, reads))} from each row, and nothing from "
            + ", ".join(f"{str(k)[:60]!r} (task {t!r} first)" for k, t in list(unread.items())[:KEYS_SHOWN])
            + more_keys(unread)
            + (f" (--forward {' or '.join(others)} reads {'them' if len(unread) > 1 else 'it'})" if others else "")),
            stacklevel=3)


def _warn_cut(forward: Any, task_data: Mapping[str, Sequence[Any]], asked: int) -> dict[str, int]:
    """Per task, how many examples the built-in forward cuts to its token limit, said in one warning (hp39 C23:
    --max-length 4 cut every example without a word, and the coefficients were learned on the cut texts)."""
    tokenizer = getattr(forward, "tokenizer", None) or getattr(getattr(forward, "encoder", None), "tokenizer", None)
    for task, rows in task_data.items() if tokenizer is not None else ():  # texts the tokenizer reads as its
        # unknown token (hp63b c25), task by task (hp66b c35)
        texts = [r["text"] for r in rows if isinstance(r, Mapping) and isinstance(r.get("text"), str)]
        warn_unknown(tokenizer, texts, max_length=getattr(forward, "max_length", asked), where=f"task {task!r}'s data",
                     effect="the coefficients are learned on how the model reads that token", stacklevel=4)
    counter = getattr(forward, "count_cut", None)
    if counter is None:
        return {}
    cut = {task: counter(rows, task) for task, rows in task_data.items()}
    cut = {task: n for task, n in cut.items() if n}
    if cut:
        limit = getattr(forward, "max_length", asked)
        which = "prompts lose their first tokens" if isinstance(forward, ChoiceLogits) else "their last tokens are lost"
        shown = "; ".join(f"{n:,} of {len(task_data[t]):,} in task {t!r}" for t, n in list(cut.items())[:5])
        more = f"; and in {len(cut) - 5} more tasks" if len(cut) > 5 else ""
        fitted = f" (--max-length {asked:,}, fitted to the model's positions)" if limit != asked else ""
        # past the model's positions a larger --max-length cannot help (hp41 C9)
        helps = ("the model's positions allow no more" if limit != asked else
                 "a larger --max-length keeps more, at more time per step")
        warnings.warn(MergeWarning(f"examples longer than {limit:,} tokens{fitted} are cut ({which}): {shown}{more}; "
                                   f"the coefficients are learned on what is left ({helps})"), stacklevel=3)
    return cut


def check_labels(labels: Mapping[str, Any], flag: str, what: str, task_data: Mapping[str, Any], *,
                 every_task: bool) -> None:
    """``--heads`` / ``--choices`` against the tasks, before any model is loaded: keys that are tasks, and for
    each at least two non-empty strings (entropy over one class is 0 whatever the model does: the task could not
    steer its coefficients); with ``every_task``, an entry for every task."""
    problems = []
    unknown = [k for k in labels if k not in task_data]
    if unknown:
        shown = ", ".join(repr(k)[:60] for k in unknown[:5]) + (f" and {len(unknown) - 5:,} more" if len(unknown) > 5
                                                                 else "")
        problems.append(f"--{flag} names {shown}, {'which is no task' if len(unknown) == 1 else 'none of them a task'}"
                        f" (the tasks are {', '.join(repr(t) for t in task_data)})")
    if every_task:
        problems += [f"task {t!r} has no {what} in --{flag}" for t in task_data if t not in labels]
    for task, values in labels.items():
        if not isinstance(values, (list, tuple)) or not all(isinstance(v, str) for v in values):
            problems.append(f"--{flag} of task {task!r} must be a list of strings, got {str(values)[:80]!r}")
            continue
        if len(values) < 2:
            problems.append(f"--{flag} of task {task!r} holds {len(values)} {what[:-1] if len(values) == 1 else what}: "
                            "adapt minimizes the entropy over them, which needs at least two")
        if flag == "choices" and len(values) > MAX_CHOICES:  # each is a sequence through the model at every step
            problems.append(f"--choices of task {task!r} holds {len(values):,} answer choices; rank classification "
                            f"scores each as a sequence through the model, and at most {MAX_CHOICES:,} are taken")
        empty = [i for i, v in enumerate(values) if not v.strip()]
        if empty:
            problems.append(f"--{flag} of task {task!r}: entry {empty[0]} is empty (it has no tokens to score)")
        first: dict[str, int] = {}
        twice = next(((first[v.strip()], i) for i, v in enumerate(values) if first.setdefault(v.strip(), i) != i),
                     None)
        if twice is not None:  # two identical classes: the entropy over them never moves (hp35 E9)
            problems.append(f"--{flag} of task {task!r}: entries {twice[0]} and {twice[1]} are the same text "
                            f"({values[twice[1]].strip()[:60]!r}), so the model can never tell them apart")
    if problems:
        raise ConfigError(problems, hint=f'--{flag} is a JSON object: {{"task": ["first", "second", ...], ...}}, '
                                         "one entry per task (the data files' names, or --task-names)")


def _check_row_choices(task_data: Mapping[str, Any], choices: Mapping[str, Any] | None) -> None:
    """Before the task vectors: every task the --choices file leaves out carries choices on every row, and no task
    has both (hp43 c35: the rows' own won silently, while the manifest recorded the file's, never read)."""
    for task, rows in task_data.items():
        own = sum(1 for r in rows if isinstance(r, Mapping) and "choices" in r)
        if task in (choices or {}) and own:
            raise ConfigError(f"task {task!r}: {own:,} of its rows carry their own 'choices', and --choices gives the "
                              "task's too: which would be scored is unclear",
                              hint=f"give the choices in one place: remove {task!r} from the --choices file, or the "
                                   "rows' 'choices'")
    for task, rows in task_data.items():
        if task not in (choices or {}) and not all(isinstance(r, Mapping) and "choices" in r for r in rows):
            raise ConfigError(f"task {task!r}: no answer choices (its rows carry no 'choices' and --choices gives "
                              "none for it)", hint='add "choices": [...] to each row, or {"' + task + '": [...]} '
                                                   "to the --choices file")


CHECKPOINT_SUFFIX = ".adapt-checkpoint.safetensors"


def default_checkpoint(output: Path) -> Path:
    """``OUTPUT.adapt-checkpoint.safetensors`` beside the output; for an output name so long that the
    suffix would pass the file system's 255 bytes, its first bytes and a digest of the whole name."""
    if output.name in ("", ".", ".."):  # its absolute path's (hp60b c41: "PosixPath('.') has an empty name")
        output = Path(os.path.abspath(output))
    if not output.name:  # '/', refused as an output by the checks that follow
        return output / CHECKPOINT_SUFFIX.lstrip(".")
    name = output.name
    if len(os.fsencode(name + CHECKPOINT_SUFFIX)) > 255:
        digest = hashlib.sha256(os.fsencode(name)).hexdigest()[:12]
        name = os.fsencode(name)[:180].decode("utf-8", "ignore") + "-" + digest  # no character cut in two
    return output.with_name(name + CHECKPOINT_SUFFIX)


def _mean_row(history: History, index: int) -> float | None:
    if not history.entropy:
        return None
    row = history.entropy[index]
    return round(sum(row) / len(row), 6)
