"""The search loop: a strategy proposes, an executor merges and scores, the log remembers.

``run_search`` asks the strategy for a batch, takes the scores of candidates already in the
log (a resumed search) or seen earlier in this one, has the executor score the rest, appends each
new score to the log as it arrives, tells the strategy the batch's scores in candidate order, and
repeats until the strategy is done. The best candidate is the first with the highest score.
"""

from __future__ import annotations

import json
import os
import re
import time
import types
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import ConfigError, EvaluatorError, MergeWarning
from ..limits import plain_numbers
from ..methods.base import MergeMethod, _shown, check_models
from ..registry import method_class
from .candidates import (
    Candidate,
    Evaluator,
    Job,
    as_state,
    better,
    candidate_state,
    check_tuning_vocab_policy,
    float32,
    merged_delta,
)
from .evaluator import check_callback, check_evaluated_models, evaluator_name, format_score, guard
from .evaluator_digest import evaluator_module, evaluator_objects, evaluator_state
from .executors import Executor, LocalExecutor
from .results_log import ResultsLog
from .space import SearchSpace, build_space, canonical, check_axes_and_fixed, check_start
from .strategies import default_popsize, make_strategy

__all__ = ["Trial", "SearchResult", "run_search"]


@dataclass(frozen=True)
class Trial:
    """One scored candidate: its options (lam included), score, seconds its evaluation took, and
    whether the score came from the log of an earlier run (``reused``)."""

    index: int
    options: dict[str, Any]
    score: float
    seconds: float
    reused: bool = False


@dataclass(frozen=True)
class SearchResult:
    method: str
    strategy: str
    space: SearchSpace
    best: Trial
    trials: tuple[Trial, ...]
    merges: int  # merges this run did (candidates differing in lam only share one)
    evaluations: int  # candidates this run scored (the others came from the log)
    seconds: float
    best_state: dict[str, torch.Tensor] = field(repr=False, compare=False, default_factory=dict)
    log_checked: int = 0  # of the evaluations, logged candidates scored again to check a resumed log (1-2)

    def table(self) -> str:
        """Every trial as a Markdown table, the best one in bold."""
        names = [a.name for a in self.space.axes]
        head = ["#", *names, "score", "eval s", ""]
        rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for t in self.trials:
            mark = "**best**" if t.index == self.best.index else ("from log" if t.reused else "")
            cells = [str(t.index), *(_cell(t.options[n]) for n in names), format_score(t.score), f"{t.seconds:.2f}",
                     mark]
            rows.append("| " + " | ".join(cells) + " |")
        return "\n".join(rows)


def _cell(value: Any) -> str:
    if isinstance(value, tuple):
        return ", ".join(f"{v:g}" for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def source_label(source: Any) -> str | None:
    """A model as the log names it: a folder by its resolved path (./base/ and /abs/base are one input, hp39 C24), a
    Hub id as given, a state dict by nothing (its bytes are in the weights' stamp)."""
    if isinstance(source, Mapping):
        return None
    return os.fsdecode(os.path.realpath(source)) if os.path.exists(source) else os.fsdecode(source)


def _evaluator_name(evaluate: Any) -> str:
    """What scored a log's candidates: a resumed search with another evaluator is another search
    (its old scores are not comparable with the new ones). A built-in names its data file too."""
    from .evaluator_digest import _is_ours, _type_text, _unguarded, evaluator_attribute

    inner = _unguarded(evaluate)
    kind = type(inner)
    if not _is_ours(kind):  # a user's: read through its type alone, never its __getattr__ or a lazy property
        return evaluator_name(inner)  # (hp48 c33: a data property loading 30 s, a list "data" crashing the start)
    data = evaluator_attribute(inner, "data")  # a built-in: its class, and the file it scores on
    on = f" on {source_label(data)}" if isinstance(data, (str, os.PathLike)) else ""
    return f"{_type_text(kind, '__module__')}:{_type_text(kind, '__qualname__')}{on}"


def _evaluator_data(evaluate: Any) -> Any:
    """The data file a built-in evaluator scores on (its ``data``), or None: tiesmerge's own evaluators only. A user's
    object with a ``data`` attribute is no built-in (hp46 c44: its "fifo" or "/dev/zero" was hashed and hung the
    search before its first candidate; a 20 GB dataset path was hashed at every start)."""
    import stat

    from .evaluator_digest import evaluator_attribute

    data = evaluator_attribute(evaluate, "data")  # its own attribute, read without running its code
    if not isinstance(data, (str, os.PathLike)):
        return None
    try:  # a regular file only: a FIFO or a device named by a user's attribute is never opened (it hung: hp46 c44)
        return data if stat.S_ISREG(os.stat(data).st_mode) else None
    except (OSError, ValueError):
        return None


def _evaluator_code(evaluate: Any) -> list[str] | None:
    """The source files of a user's evaluator function (``module:function``): its module's, then those of the modules
    loaded from the folder it was imported from (its helpers, imported at its top), or None (a lambda typed in, a
    callable object, tiesmerge's own built-ins). Their code decides the scores, so a log scored by other code is not
    resumed (hp35 E40: a search resumed after the evaluator was edited reused every old score; hp37 C19, hp38 C24:
    after a helper module it imports was edited). A module it imports only inside a function, later, is not seen."""
    import sys

    name = evaluator_module(evaluate)
    if not isinstance(name, str) or name == "tiesmerge" or name.startswith("tiesmerge.") or name == "?":
        return None
    module = sys.modules.get(name)
    namespace = vars(module) if isinstance(module, types.ModuleType) else {}
    path = namespace.get("__file__")
    archive = _zip_archive(namespace.get("__loader__"))
    if archive is not None:  # a module inside a zip on sys.path: the archive's bytes, its helpers' too (hp51 d17)
        return [archive]
    # a sourceless module (.pyc, an extension .so) counts by its file too (hp40 D17: a recompiled evc.pyc resumed)
    if not (isinstance(path, str) and path.endswith((".py", ".pyc", ".so", ".pyd")) and os.path.isfile(path)):
        return None
    # its helpers lie in the folder it was imported from, where `import common` finds them: a package's own imports
    # beside the package (pkg.ev, hp38 C24; pkg's __init__, hp51 d11), a linked module's beside the link, not its
    # target (hp51 d10), and through a linked subfolder (proj/lib -> ../shared/lib, hp51 d21): both spellings count
    up = name.count(".") + (1 if "__path__" in namespace else 0)
    folders = set()
    for spelled in (os.path.abspath(path), os.path.realpath(path)):
        folder = os.path.dirname(spelled)
        for _ in range(up):
            folder = os.path.dirname(folder)
        folders.add(folder + os.sep)
    folders = tuple(folders)
    # installed packages are not the user's helpers, even below the evaluator's folder (a venv in the project)
    installed = tuple(os.path.realpath(p) + os.sep for p in {sys.prefix, sys.base_prefix, sys.exec_prefix})
    helpers = set()
    for loaded in list(sys.modules.values()):  # a copy: another thread may import meanwhile
        if getattr(loaded, "__name__", None) == "__main__":  # the script that calls the search, not a helper the
            continue  # evaluator imports: a comment added to it was "its module's source changed" (hp82b c11, c12)
        file = getattr(loaded, "__file__", None)
        # an absolute path of a file that exists: torch.ops and torch.classes name "_ops.py" and "_classes.py",
        # relative, which abspath placed in the working folder, so the code changed with it (hp56 c62)
        if isinstance(file, str) and file.endswith((".py", ".pyc", ".so", ".pyd")) and file != path \
                and os.path.isabs(file) and os.path.isfile(file):
            spellings = (os.path.abspath(file), os.path.realpath(file))
            if any(f.startswith(folders) for f in spellings) and not any(f.startswith(installed) for f in spellings) \
                    and not any({"site-packages", "dist-packages"} & set(f.split(os.sep)) for f in spellings):
                helpers.add(spellings[1])
    return [path, *sorted(helpers - {os.path.realpath(path)})]


def _zip_archive(loader: Any) -> str | None:
    """The zip file a module was imported from (Python's zipimport), or None."""
    import zipimport

    if type(loader) is not zipimport.zipimporter:
        return None
    archive = loader.archive
    return archive if isinstance(archive, str) and os.path.isfile(archive) else None


def _warn_object_evaluator(evaluate: Any, results: Any) -> None:
    """A search resumed with an evaluator whose scores depend on an object's attributes (a callable object, a bound
    method, or one that a partial calls or a closure or decorator holds) takes the logged scores as that object's:
    its attributes (a sign, its data) cannot be compared with the first run's, since they also hold what it records
    while scoring (hp40 D15, hp41 C5, hp42 D29). Said when the log holds scores."""
    if results is None or not results.records:
        return
    objects = evaluator_objects(evaluate)
    if not objects:
        return
    warnings.warn(MergeWarning(f"{results.path}: resuming with {len(results.records):,} logged scores of an evaluator "
                               f"whose scores may depend on a {', '.join(objects)} object it holds: tiesmerge "
                               "compares its code, not that object's attributes or contents (which may be a cache it "
                               "fills), and scores the first and the best logged candidates again, so an evaluator "
                               "built otherwise (another sign, other data) that agrees on those two still needs a log "
                               "of its own"), stacklevel=3)


def _content_digest(path: str | os.PathLike | Sequence[str | os.PathLike]) -> str:
    """A digest of a data file's bytes (a validation text: small), so a byte-identical copy resumes the search; of
    several files (an evaluator and its helpers), their names below the first one's folder and their bytes."""
    import hashlib

    if not isinstance(path, (str, os.PathLike)):
        files = list(path)
        if len(files) == 1:
            return _content_digest(files[0])  # one file: the digest of logs written before helpers counted
        digest = hashlib.sha256()
        root = os.path.dirname(os.path.realpath(files[0]))
        for file in files:
            digest.update(os.path.relpath(os.path.realpath(file), root).encode("utf-8", "surrogateescape") + b"\0")
            digest.update(_content_digest(file).encode() + b"\0")
        return digest.hexdigest()[:16]
    digest = hashlib.sha256()
    try:
        size = os.stat(path).st_size
        if size > _MAX_HASHED:  # a dataset of gigabytes: by its stamp, not hashed at every start (hp46 c44)
            st = os.stat(path)
            return f"stamp:{st.st_size}:{st.st_mtime_ns}:{st.st_ino}"
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except OSError:
        return "unreadable"  # the evaluator names the file when it reads it
    return digest.hexdigest()[:16]


_MAX_HASHED = 1 << 28  # data files hashed whole up to 256 MiB


def weights_stamp(sources: Sequence[Any]) -> str:
    """The inode, size, modification and change time of every file of the inputs a merge or a forward reads: the
    weight files the checkpoint opens (shards in a subfolder, .pth files too: hp39 C3, C5), the configs and the
    tokenizer files (hp38 C10); not their bytes: hashing gigabytes at every resume would cost more than the check
    saves. A state dict given in memory counts by its tensors' bytes (hp39 C6, C18). A model whose files were
    replaced at the same path makes the log another search's; the files count by their resolved paths, so the
    same folder spelled otherwise (./base/, an absolute path) is the same input (hp39 C24)."""
    import hashlib
    import os
    from pathlib import Path

    from ..io.checkpoint import open_checkpoint
    from ..paths import MODEL_FILES, MODEL_SUFFIXES

    rows: list[Any] = []
    for source in sources:
        if isinstance(source, Mapping):
            rows.append(_state_digest(source))
            continue
        path = Path(source)
        files = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".json", ".bin", ".pt", ".pth")
                       or p.name in MODEL_FILES or p.name.endswith(MODEL_SUFFIXES)) if path.is_dir() else [path]
        if path.is_dir() and (path / "modules.json").is_file():  # a sentence-transformers folder: its modules'
            # settings (1_Pooling/config.json: mean or CLS) decide the encoder's scores too (hp45 c46)
            files += _module_settings(path)
        try:  # safetensors headers only: which files hold the weights. Never a pickle: the suffixes above list those
            checkpoint = open_checkpoint(path, allow_pickle=False)
        except Exception:  # noqa: BLE001 - not openable so: the merge names any problem; the folder's files count
            checkpoint = None
        if checkpoint is not None:
            try:
                files = sorted({*files, *checkpoint.files()})
            finally:
                checkpoint.close()
        for f in files:
            try:
                st = os.stat(f)
            except OSError:
                continue
            # no writer sets ctime back
            rows.append([os.path.realpath(f), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns])
    return hashlib.sha256(repr(rows).encode()).hexdigest()[:16]


def _module_settings(folder: Any) -> list[Any]:
    """The JSON files of a sentence-transformers folder's modules: the folders its modules.json names (any path it
    allows: hp46 c02, a Pooling module at pooling/), else the N_Name folders sentence-transformers writes."""
    from ..errors import TiesMergeError
    from ..limits import read_json

    try:
        modules = read_json(folder / "modules.json", "the sentence-transformers modules")
        named = [m.get("path") for m in modules if isinstance(m, dict)] if isinstance(modules, list) else []
    except (TiesMergeError, OSError):
        named = []
    subs = [folder / p for p in named if isinstance(p, str) and p and ".." not in p.split("/") and
            not p.startswith("/")] or [s for s in folder.iterdir() if re.fullmatch(r"[0-9]+_\w+", s.name)]
    return sorted(f for sub in subs if sub.is_dir() for f in sub.iterdir() if f.suffix == ".json")


class InputWatch:
    """The stamps of a search's inputs when it started, checked after each candidate: a model replaced while the
    search ran (a download finishing, a training run saving) made later candidates merge another model, scored and
    logged beside the earlier ones, and the best written from it (hp42 D50). Each input counts by its files'
    stamps (:func:`weights_stamp`), so the one that changed is named."""

    def __init__(self, named: Sequence[tuple[str, Any]], *, during: str = "the search",
                 harm: str = "later candidates would merge another model than the earlier ones",
                 hint: str = "let whatever writes it finish, then run the search again with a new log (search's "
                             "--dir, run_search's log=): the scores so far are of the model as it was") -> None:
        self.named = [(who, source) for who, source in named if not isinstance(source, Mapping)]
        self.stamps = [weights_stamp([source]) for _, source in self.named]
        self.during, self.harm, self.hint = during, harm, hint

    def check(self) -> None:
        from ..errors import CheckpointError

        for (who, source), stamp in zip(self.named, self.stamps):
            if weights_stamp([source]) != stamp:
                raise CheckpointError(f"{source}: {who} changed while {self.during} ran (its weights, config or "
                                      f"tokenizer files were replaced or rewritten): {self.harm}", hint=self.hint)


def _state_digest(state: Mapping[str, Any]) -> str:
    """sha256 over a state dict's names, shapes, dtypes and bytes."""
    import hashlib

    import torch

    digest = hashlib.sha256()
    for name in sorted(state):
        value = state[name]
        if isinstance(value, torch.Tensor):
            digest.update(f"{name}\0{tuple(value.shape)}\0{value.dtype}\0".encode())
            value = value.detach().cpu()
            if value.numel() * value.element_size() > value.untyped_storage().nbytes():
                # an expanded view (zeros(1).expand(3e9)) holds less than it shows: its storage and strides say it
                # whole, where .contiguous() allocated 12 GB (hp81b c26)
                digest.update(f"expanded\0{value.stride()}\0{value.storage_offset()}\0".encode())
                digest.update(bytes(value.untyped_storage()))
                continue
            flat = value.contiguous().reshape(-1)
            digest.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
        else:
            digest.update(f"{name}\0{value!r}\0".encode())
    return digest.hexdigest()


def run_search(base: Any, models: Sequence[Any], method: str | MergeMethod, evaluate: Evaluator, *,
               strategy: str = "grid", budget: int | None = None, seed: int = 0, axes: Sequence[str] | None = None,
               grid: Mapping[str, Sequence[float]] | None = None,
               ranges: Mapping[str, tuple[float, float]] | None = None, fixed: Mapping[str, Any] | None = None,
               start: Mapping[str, Any] | None = None, popsize: int | None = None,
               executor: Executor | None = None, log: str | None = None, device: str = "cpu",
               memory_budget: int | str | None = None, vocab_policy: str = "error", allow_distant: bool = False,
               on_trial: Callable[[Trial], None] | None = None) -> SearchResult:
    """Search ``method``'s options for the best ``evaluate`` score (higher is better) on validation data.

    strategy: "grid" (the axes' values: the paper's grid by default), "random" or "cmaes" (both
    ``budget`` candidates from ``seed``, within the axes' ranges). axes: the options searched
    (default: the grid's), e.g. ``("densities", "weights", "lam")`` for per-model TIES; ``grid``
    gives values, ``ranges`` {name: (lo, hi)}, ``fixed`` holds options. ``start``: CMA-ES's first
    mean (default: the method's defaults). ``executor``: :class:`LocalExecutor` (default) or
    :class:`RayExecutor`, which scores the same candidates to the same numbers. ``log``: a JSONL
    file every score is appended to; a search run again with it resumes without re-scoring.
    ``vocab_policy`` ("error" or "truncate") and ``allow_distant`` as :func:`tiesmerge.merge` takes them.
    ``on_trial`` is called with each scored :class:`Trial` as it comes (a progress hook of the caller's own: an
    exception it raises ends the search as raised, the scores logged so far kept, unlike an evaluator's, which
    becomes an EvaluatorError naming it).

    >>> result = run_search("base", ["ft-a", "ft-b"], "ties", score, strategy="cmaes", budget=60,
    ...                     axes=("densities", "weights", "lam"), log="search.jsonl")  # doctest: +SKIP
    >>> result.best.options, result.best.score                                       # doctest: +SKIP
    """
    from ..inputs import as_method, check_inputs, check_ordered
    from ..paths import fs_text

    if not isinstance(method, str):
        as_method(method, {})  # None, bytes, a number: a typed error (hp59b c22), not a TypeError of dataclasses
    if executor is not None and not all(callable(getattr(executor, k, None)) for k in ("start", "score", "close")):
        raise ConfigError(f"executor is a {type(executor).__name__}, not an executor of the search",
                          hint="give tiesmerge.tuning.LocalExecutor() or RayExecutor(...), or leave it out")  # c23
    # numpy's scalars are numbers (hp59b c25)
    budget, seed, popsize = plain_numbers(budget), plain_numbers(seed), plain_numbers(popsize)
    grid, ranges, fixed, start = (plain_numbers(grid), plain_numbers(ranges), plain_numbers(fixed),
                                  plain_numbers(start))
    check_ordered(models)  # a set's order binds per-model options at random (hp40b C43)
    # any iterable, listed once, as tune takes it: a generator (hp78b c08: "has no len()"), a class with __iter__
    # only (hp79b c02); a thing that is none is named by its type (hp79b c03: a TypeError of len())
    whole = isinstance(models, (str, bytes, os.PathLike, Mapping))  # "ab": models a and b (hp57 c36)
    if not whole and isinstance(models, Iterable) and not isinstance(models, Sequence):
        models = list(models)
    if whole or not isinstance(models, Sequence) or not len(models):
        got = "" if isinstance(models, Sequence) else f", got {type(models).__name__}"
        raise ConfigError(f"models must be a non-empty list of fine-tuned models (paths or state dicts){got}")
    base, models = fs_text(base), [fs_text(m) for m in models]  # bytes paths, as merge takes them (hp45 c24)
    check_inputs(base, models)  # None, 5, a module, an open file: typed, as tune says them (hp80b c04)
    check_axes_and_fixed(axes, fixed)
    if log is not None and not isinstance(log, (str, bytes, os.PathLike)):  # (hp58 c32: log=5, a TypeError)
        raise ConfigError(f"log is a {type(log).__name__}, not a path of the search's log file",
                          hint="e.g. log='search/log.jsonl', or leave it out")
    started = time.perf_counter()
    evaluator_name = _evaluator_name(evaluate)
    check_evaluated_models(evaluate, models)  # a built-in's check of the fine-tunes, before any merge
    evaluate = guard(evaluate)  # its failures: an EvaluatorError naming it, the cause chained
    check_callback(on_trial, "on_trial", "a scored candidate")
    cls = method_class(method) if isinstance(method, str) else type(method)
    if strategy == "grid" and ranges:  # hp36 C42: ignored without a word, the log recording them beside the grid
        raise ConfigError(f"--range {', '.join(ranges)}: ranges are where the random and cmaes strategies draw; the "
                          "grid strategy scores --grid's values",
                          hint="give the values with --grid NAME=v1,v2 (or NAME=start:stop:step), or choose "
                               "--strategy random or cmaes")
    if strategy != "cmaes" and popsize is not None:  # ignored, yet logged: a resume without it was "another search"
        raise ConfigError(f"--popsize {popsize}: a generation's size is CMA-ES's; the {strategy} strategy has none",
                          hint="leave --popsize out, or choose --strategy cmaes")  # (hp56 c22)
    if strategy != "cmaes" and start is not None:  # ignored silently (hp81b c37), as --popsize would be
        raise ConfigError(f"start: a starting point is CMA-ES's; the {strategy} strategy has none",
                          hint="leave start out, or choose strategy='cmaes'")
    space = build_space(cls, len(models), axes=axes, grid=grid, ranges=ranges, fixed=fixed)
    check_start(space, start)
    # the start resolved over the method's defaults: {} began at the ranges' middles, unrecorded (hp82b c01), and a
    # partial start was recorded as given (c04)
    given_start = {**space.defaults(), **start} if start is not None else None
    from ..inputs import option_inputs

    references = option_inputs(cls, fixed or {})  # a --set sign_from model is an input too (hp37 C74)
    check_tuning_vocab_policy(vocab_policy)
    job = Job(method, base, tuple(models), device, memory_budget, vocab_policy, allow_distant)
    start = given_start if given_start is not None else space.defaults()
    try:  # what no candidate can change (slerp's two models): said now, not as "candidates 0, 1" (hp87b c60)
        at_start = check_models(job.method_at({**(fixed or {}), **start}), len(models))
    except ConfigError:
        at_start = []  # a value the candidates' own check names
    unsearched = [p for p in at_start if not any(re.search(rf"\b{re.escape(a.name)}\b", p) for a in space.axes)]
    if unsearched:
        raise ConfigError(unsearched, hint="change the models or the fixed options (--set): no searched value "
                                           "changes this")
    if strategy == "grid" and seed != 0:  # the grid's candidates do not depend on it (hp87b c83: recorded, then a
        # resume with another seed refused as "another search")
        warnings.warn(MergeWarning(f"seed {_shown(seed)}: the grid strategy draws nothing, so the seed changes no "
                                   "candidate; it is not recorded"), stacklevel=2)
        seed = 0
    chooser = make_strategy(strategy, space, budget=budget, seed=seed, popsize=popsize, start=dict(start))
    # what changes the candidates, and only that: cma's own popsize, or a start at the defaults, given explicitly
    # is the search run without them (hp81b c04: --popsize 6 for 2 axes was "another search"); another start is
    # another search, whose candidates clashed in one log (hp81b c36)
    popsize_said = popsize if popsize and popsize != default_popsize(space.dimension) else None
    start_said = given_start if given_start and given_start != space.defaults() else None
    header = {"space": space.describe(), "strategy": strategy, "seed": seed,
              **({"popsize": popsize_said} if popsize_said else {}),
              **({"start": {k: start_said[k] for k in sorted(start_said)}} if start_said else {}),
              "base": source_label(base), "models": [source_label(m) for m in models],
              # a reference model a fixed option names (--set sign_from=DIR) is an input too: its weights replaced
              # at the same path resumed with scores of two references (hp37 C74)
              "evaluator": evaluator_name, "weights": weights_stamp([base, *models, *(p for _, p in references)]),
              # a built-in evaluator's data file (NAME:FILE): scores on another text are not comparable
              **({"evaluator_data": _content_digest(data)} if (data := _evaluator_data(evaluate)) else {}),
              **({"evaluator_code": _content_digest(code)} if (code := _evaluator_code(evaluate)) else {}),
              # what it was built with: a partial's arguments, a closure's cells, a callable object's attributes
              **({"evaluator_state": held} if (held := evaluator_state(evaluate)) else {}),
              **({"vocab_policy": vocab_policy} if vocab_policy != "error" else {})}  # it changes the candidates
    if log is not None:  # the log is appended to: never inside (or over) a model the search reads
        from ..paths import check_not_input, fs_text

        log = fs_text(log)  # bytes, as every path of the API may be (hp45 c24)
        # a --set sign_from reference is an input too (hp88b c34: the log written into its folder)
        check_not_input(log, [("the base", base), *((f"model {k}", m) for k, m in enumerate(models)),
                              *references],
                        what="the search log", hint="give log= a path outside the inputs")
    # the base read before the log is made: a damaged base left a log holding only its header, whose stamps then
    # refused the same search once the base was mended (hp88b c77)
    base32, dtypes = float32(as_state(base))
    results = ResultsLog(log, header) if log is not None else None
    owned = executor is None
    try:
        _warn_object_evaluator(evaluate, results)
        executor = executor or LocalExecutor()
        executor.start(job, evaluate, base32, dtypes)
    except BaseException:  # nothing scored: the log this search made goes with it
        if results is not None:
            results.finish()
        raise
    try:
        watch = InputWatch([("the base", base), *((f"model {k}", m) for k, m in enumerate(models)),
                            *references])  # "the reference model (sign_from)"
        return _loop(chooser, executor, results, job, space, base32, dtypes, strategy, started, on_trial, watch)
    finally:
        if owned:
            executor.close()
        if results is not None:
            results.finish()


def _loop(chooser, executor: Executor, results: ResultsLog | None, job: Job, space: SearchSpace,
          base32: Mapping[str, torch.Tensor], dtypes: Mapping[str, torch.dtype], strategy: str, started: float,
          on_trial: Callable[[Trial], None] | None, watch: InputWatch | None = None) -> SearchResult:
    n_models = len(job.models)
    trials: list[Trial] = []
    seen: dict[str, Trial] = {}  # scores of this run by candidate key: nothing is scored twice
    asked: set[str] = set()  # the keys of this search's candidates (the resume check scores logged ones too)
    best: Trial | None = None
    merges_before, evaluations, checked = executor.merges, 0, 0
    # a resumed log is checked by behaviour before anything: its oldest finite record and its best are scored again
    # and must match (what the header's digests cannot see: a file read inside the call, code a digest misses; the
    # best too, since its score decides the result: hp51 d02, d03 agreed on the oldest only); before this run logs
    # anything, so a refused run leaves the log as it was (hp49 c01, c12)
    to_check = _logged_to_check(results)
    if to_check and results is not None:
        logged = {c.key: float(results.get(c.key)["score"]) for c in to_check}  # type: ignore[index]
        try:
            _check(job, to_check, n_models)
        except ConfigError as exc:  # options no candidate of this search has: the log was edited (hp51 d08c, d16)
            raise ConfigError(f"{results.path}: the search log's records hold options this search's method refuses "
                              f"({'; '.join(exc.problems)[:300]})", hint="delete those lines (their candidates are "
                              "scored again), or the log to start afresh, then run the search again") from None

        def on_checked(c: Candidate, score: float, seconds: float) -> None:
            nonlocal evaluations, checked
            if watch is not None:
                watch.check()
            evaluations, checked = evaluations + 1, checked + 1
            _check_resumed_score(results, c, logged[c.key], score)
            # the log's score: a resume is bit-exact
            seen[c.key] = Trial(c.index, c.options, logged[c.key], seconds, True)
            if on_trial is not None:
                on_trial(seen[c.key])

        executor.score(to_check, on_checked)
    while batch := chooser.ask():
        candidates = [Candidate(len(trials) + i, options) for i, options in enumerate(batch)]
        _check(job, candidates, n_models, scored_before=bool(trials))  # a bad candidate fails before a merge
        scored: dict[int, Trial] = {}
        todo = []
        first: dict[str, Candidate] = {}  # key -> the batch's first candidate with it (linear, not pairwise)
        for c in candidates:
            known = seen.get(c.key)
            record = results.get(c.key) if results is not None and known is None else None
            if known is not None or record is not None:
                score = known.score if known is not None else float(record["score"])
                seconds = known.seconds if known is not None else float(record["seconds"])
                scored[c.index] = Trial(c.index, c.options, score, seconds, reused=True)
            elif c.key not in first:
                first[c.key] = c
                todo.append(c)

        def on_scored(c: Candidate, score: float, seconds: float, scored: dict[int, Trial] = scored) -> None:
            nonlocal evaluations
            if watch is not None:  # before it is logged: a candidate merged from a replaced model is not kept
                watch.check()
            evaluations += 1
            trial = Trial(c.index, c.options, score, seconds)
            if results is not None:
                results.append({"key": c.key, "index": c.index, "options": canonical(c.options), "score": score,
                                "seconds": round(seconds, 4)})
            scored[c.index] = trial
            if on_trial is not None:
                on_trial(trial)

        executor.score(todo, on_scored)
        for c in candidates:  # duplicates within the batch take their first twin's score
            if c.index not in scored:
                twin = first[c.key]
                scored[c.index] = Trial(c.index, c.options, scored[twin.index].score, scored[twin.index].seconds, True)
        new = [scored[c.index] for c in candidates]
        asked.update(c.key for c in candidates)
        for c, t in zip(candidates, new):
            seen.setdefault(c.key, t)
            if better(t.score, None if best is None else best.score):
                best = t
        trials += new
        chooser.tell(batch, [t.score for t in new])
    if best is None:  # the evaluator's failure, as tune says it (hp87b c90: a ConfigError, no scores named)
        raise EvaluatorError(f"no candidate got a finite score ({len(trials)} scored: "
                             f"{', '.join(sorted({str(t.score) for t in trials})[:8])})",
                             hint="check the evaluator on one merge first: it must return a finite validation "
                                  "score, higher is better")
    _warn_better_left_out(results, asked, best)
    best_state = _winner_state(executor, job, base32, dtypes, best)
    return SearchResult(space.method, strategy, space, best, tuple(trials), executor.merges - merges_before,
                        evaluations, time.perf_counter() - started, best_state, log_checked=checked)


def _warn_better_left_out(results: ResultsLog | None, asked: set[str], best: Trial) -> None:
    """A resume with a smaller budget than the log's (or another strategy) leaves logged candidates out of this
    search; one that scored better than this search's best is said (hp52 c09: a worse best written silently)."""
    if results is None:
        return
    left = [r for key, r in results.records.items() if key not in asked]
    better_ones = [r for r in left if better(float(r["score"]), best.score)]
    if better_ones:
        top = _best_record(better_ones)
        warnings.warn(MergeWarning(
            f"{results.path}: the log holds {len(left):,} scored candidate(s) this search did not ask for (a "
            f"smaller --budget than the run that logged them), {len(better_ones):,} of them better than its best: "
            f"candidate {top.get('index')} ({json.dumps(top['options'], sort_keys=True)[:200]}) scored "
            f"{format_score(float(top['score']))} where this search's best is {format_score(best.score)}; "
            "run with the budget that logged it to have it"), stacklevel=4)


def _logged_to_check(results: ResultsLog | None) -> list[Candidate]:
    """The log's candidates a resume scores again: its oldest with a finite score and, where another, its best, each
    rebuilt from its key (lists back to tuples)."""
    if results is None or not results.records:
        return []
    import math

    records = list(results.records.values())
    # finite scores only (the log's reader holds every score as a number): NaN matches NaN, so a NaN record checks
    # nothing (hp49 c30)
    finite = [r for r in records if math.isfinite(r["score"])]
    if not finite:
        return [_rebuilt(records[0])]
    best = _best_record(finite)
    return [_rebuilt(r) for r in ([finite[0]] if best is finite[0] else [finite[0], best])]


def _best_record(records: Sequence[Mapping[str, Any]]) -> Mapping[str, Any]:
    """The logged record with the best score, the first of equal ones (as the search's own best)."""
    best = records[0]
    for r in records[1:]:
        if better(float(r["score"]), float(best["score"])):
            best = r
    return best


def _rebuilt(record: Mapping[str, Any]) -> Candidate:
    """A logged candidate from its key, the canonical options it was logged by (the log's reader refuses a key that
    is not its options' JSON): its "options" may have been rewritten by a tool (hp50 k01: jq wrote lam 2.0 as 2)."""
    options = {k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(record["key"]).items()}
    index = record.get("index")
    return Candidate(index if isinstance(index, int) and not isinstance(index, bool) else 0, options)


def _check_resumed_score(results: ResultsLog | None, c: Candidate, logged: float, score: float) -> None:
    """A resumed log's candidate scored again to ``score`` where the log holds ``logged``: equal (to float noise:
    another thread count's sums), or the log is another search's in all but its header."""
    import math

    # relative only: scores of 1e-10 are as comparable as accuracies (hp49 c22: an absolute 1e-9 let a sign flip by)
    same = (math.isnan(logged) and math.isnan(score)) or logged == score or \
        math.isclose(logged, score, rel_tol=1e-5, abs_tol=0.0)
    if same:
        return
    where = results.path if results is not None else "the search log"
    raise ConfigError(
        f"{where}: candidate {c.index} ({str(canonical(c.options))[:200]}) scores {score!r} now where the log records "
        f"{logged!r}: what the evaluator scores changed since the log was written (its data, a file it reads, "
        "its code or settings, the models) in a way the log's header does not show, so none of its scores are "
        "reused",
        hint="start the search again in another --dir (log= in Python), or remove this log; an evaluator whose "
             "score varies from call to call (unseeded sampling) cannot resume a search: seed it")


def _check(job: Job, candidates: Sequence[Candidate], n_models: int, scored_before: bool = True) -> None:
    found: dict[str, list[int]] = {}  # a problem -> the candidates that have it (a grid repeats one many times)
    for c in candidates:
        try:
            problems = check_models(job.method_at(c.options), n_models)
        except ConfigError as exc:
            problems = exc.problems
        for p in problems:
            found.setdefault(p, []).append(c.index)
    if found:  # up-front checks (tuning.space) keep the box's corners valid: an adaptive strategy can still go inside
        raise ConfigError([f"{_candidates(indices)}: {p}" for p, indices in found.items()],
                          hint="narrow the searched ranges (--range) or change the fixed options (--set) so the "
                               "method accepts every candidate" + ("; the scores so far stay in the search's log"
                                                                   if scored_before else ""))  # (hp87b c60: none)


def _candidates(indices: list[int]) -> str:
    if len(indices) == 1:
        return f"candidate {indices[0]}"
    shown = ", ".join(map(str, indices[:4]))
    return f"candidates {shown}{f', ... ({len(indices)} in all)' if len(indices) > 4 else ''}"


def _winner_state(executor: Executor, job: Job, base32: Mapping[str, torch.Tensor],
                  dtypes: Mapping[str, torch.dtype], best: Trial) -> dict[str, torch.Tensor]:
    """The best candidate's state: from the executor's kept merge, else merged once more here (its
    score came from the log, or a tie kept another candidate's merge)."""
    probe = Candidate(best.index, best.options)
    delta = executor.delta(probe.merge_key)
    if delta is None:
        delta = merged_delta(job, base32, best.options)
    return candidate_state(job, base32, delta, best.options, dtypes)
