"""What each `tiesmerge` subcommand does with its parsed arguments. The commands that do tensor
math import the engine inside themselves, so the others start without torch or numba."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import inspect
import json
import math
import os
import re
import sys
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import ConfigError, OutputError, TiesMergeError, input_problems
from ..methods.base import ModelPath, option_types
from ..paths import (
    check_not_input,
    check_output_file,
    check_output_location,
    check_search_dir,
    existing_folder,
    held_through_mount,
    nested,
    staged_file,
)
from ..recipe import read_recipe_data, recipe_from_dict
from ..registry import METHODS, broken_plugins, method_class
from ..sizes import DEFAULT_MEMORY_BUDGET, format_size, parse_size
from .adapt import cmd_adapt
from .terminal import completed, shown, terminal_safe

__all__ = ["HANDLERS"]


def _load_callable(spec: str):
    import importlib

    module, _, name = spec.partition(":")
    if not module or not name:
        raise ConfigError(f"--evaluator {spec!r}: expected MODULE:FUNCTION or a built-in NAME:FILE",
                          hint="e.g. --evaluator my_eval:score, or --evaluator classifier-accuracy:val.jsonl "
                               "(tiesmerge tune --help lists the built-ins)")
    path_like = "/" in module or os.sep in module or module.startswith(".") or module.endswith(".py")
    if not path_like and "-" not in module and not all(part.isidentifier() for part in module.split(".")):
        # 'pkg..m' was said as a module whose code raised, hinted to fix a module that does not exist (hp87b c87)
        raise ConfigError(f"--evaluator {spec!r}: {module!r} is not a Python module name (dotted names of letters, "
                          "digits and _)", hint=f"e.g. --evaluator my_eval:{name}, or pkg.my_eval:{name}")
    if str(Path.cwd()) not in sys.path:
        # last, so a module in the current directory can be named but never shadows an installed one (a
        # matplotlib.py or scipy.py lying there would otherwise run when the search imports the real one)
        sys.path.append(str(Path.cwd()))
    import torch  # noqa: F401 - loaded first, so its defaults before the module's import are known

    from ..tuning.evaluator import process_state_kept

    try:
        # a module that sets torch's default device or dtype, the umask or the working folder as it is imported: put
        # back, said (hp45 c35; hp46 c07: an output of mode 000; c08: the inputs read from the module's folder)
        with process_state_kept(f"--evaluator {spec}'s module", when="after its import"):
            loaded: Any = importlib.import_module(module)
            for part in name.split("."):  # module:obj.score, a bound method of an object the module makes (hp46 c47)
                loaded = getattr(loaded, part)
            if not callable(loaded):  # "the evaluator 5 is not callable", exit 1, said of the value (hp84b c08)
                raise ConfigError(f"--evaluator {spec!r}: {module}.{name} is {type(loaded).__name__}, not a function",
                                  hint=f"name a function of {module} that takes a state dict and returns a score, "
                                       "higher is better")
            return loaded
    except ConfigError:  # said above, of the loaded name
        raise
    except (Exception, SystemExit) as exc:  # an import runs the module: any error of it (a sys.exit too) is its own
        from ..evaluation.builtin import BUILTIN_EVALUATORS

        builtins = ", ".join(BUILTIN_EVALUATORS)
        if "/" in module or os.sep in module or module.startswith(".") or module.endswith(".py"):
            # a file path, not a module name: nothing of it ran (hp50 k18: blamed on the module's code)
            stem = Path(module).name.removesuffix(".py")
            folder = Path(module).parent
            raise ConfigError(f"--evaluator {spec!r}: {module!r} is a file path; --evaluator takes a module name "
                              "(MODULE:FUNCTION, as Python imports it)",
                              hint=f"pass --evaluator {stem}:{name} from "
                                   + (f"the folder {folder}, or add {folder}" if str(folder) != "." else
                                      "its folder, or add that folder") + " to PYTHONPATH") from None
        if isinstance(exc, ModuleNotFoundError) and module.replace("_", "-") in BUILTIN_EVALUATORS:
            # classifier_accuracy:val.jsonl: the built-in's name with '_' (hp74b c40: read as a Python module)
            raise ConfigError(f"--evaluator {spec!r}: no module {module!r}; did you mean the built-in "
                              f"{module.replace('_', '-')}:{name}?", hint=f"built-ins are {builtins}") from None
        if "-" in module:  # no Python module has a hyphen: a built-in's name, mistyped
            raise ConfigError(f"--evaluator {spec!r}: {module!r} is not a built-in evaluator (they are {builtins})",
                              hint="e.g. --evaluator classifier-accuracy:val.jsonl") from None
        top = sys.modules.get(module.split(".")[0])
        loaded = getattr(top, "__file__", None)
        mine = Path.cwd() / f"{module.split('.')[0]}.py"
        if isinstance(exc, AttributeError) and top is not None and mine.is_file() and \
                (loaded is None or Path(loaded).resolve() != mine.resolve()):
            # the working folder comes last on the path, so an installed module of the same name wins (hp45 c14)
            raise ConfigError(f"--evaluator {spec!r}: {mine.name} in the working folder is shadowed by the module "
                              f"{module.split('.')[0]!r} Python has already"
                              + (f" ({loaded})" if loaded else " (built in)")
                              + f", which has no {name!r}",
                              hint=f"rename your file (e.g. my_{mine.name}) and pass --evaluator "
                                   f"my_{module}:{name}") from None
        found = sys.modules.get(module)
        if isinstance(exc, AttributeError) and found is not None:
            # the module imported; the name is what is missing (hp86b c09: hinted PYTHONPATH and the folder)
            where = getattr(found, "__file__", None) or module
            defined = sorted(k for k, v in vars(found).items() if not k.startswith("_") and callable(v)
                             and getattr(v, "__module__", None) == found.__name__)
            raise ConfigError(f"--evaluator {spec!r}: the module {module!r} imports ({where}), but {name!r} is not "
                              f"in it ({exc})",
                              hint=(f"its own functions and classes: {', '.join(defined[:12])}"
                                    + (", ..." if len(defined) > 12 else "") if defined else
                                    f"{module} defines no function of its own")
                                   + f"; pass --evaluator {module}:FUNCTION") from None
        if not isinstance(exc, (ModuleNotFoundError, AttributeError)) or (isinstance(exc, ModuleNotFoundError) and
                                                                          exc.name not in (None, module)):
            # the module was found and its own code failed as it ran (hp45 c64: "must be importable from here")
            where = getattr(found, "__file__", None) or getattr(exc, "filename", None) or _module_file(module)
            raise ConfigError(f"--evaluator {spec!r}: importing {module!r} ran its code, which raised "
                              f"{type(exc).__name__}: {str(exc)[:300]}",
                              hint=f"fix the module ({where}): importing it must define {name!r} without errors "
                                   "(--debug shows the traceback)") from None
        if isinstance(exc, ModuleNotFoundError) and os.path.lexists(mine) and not mine.is_file():
            # a FIFO (or a folder, a dangling link) named like the module: Python skips it, "No module named" (hp79b
            # c37, with a hint to run from the folder it was run from)
            kind = "a folder" if mine.is_dir() else "a link whose target does not exist" if mine.is_symlink() and \
                not mine.exists() else "not a regular file (a FIFO, a device or a socket)"
            raise ConfigError(f"--evaluator {spec!r}: {mine.name} in the working folder is {kind}, which Python does "
                              "not import as a module", hint=f"make {mine.name} a regular Python file defining "
                                                             f"{name!r}") from None
        raise ConfigError(f"--evaluator {spec!r}: cannot load it ({type(exc).__name__}: {str(exc)[:300]})",
                          hint=f"the module must be importable from here (run from its folder, or add that folder to "
                               f"PYTHONPATH) and define {name!r}; or name a built-in ({builtins}) as NAME:FILE"
                          ) from None


def _module_file(module: str) -> str:
    """Where a top-level module would be imported from (found, not run), or its name."""
    import importlib.util

    if "." in module:  # finding a submodule imports its package: not again
        return module
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return module
    return spec.origin if spec is not None and spec.origin else module


def _evaluator(spec: str, base: Any, device: str) -> Any:
    """A built-in evaluator (``NAME:FILE``, its file read and checked now) or the user's ``module:function``; a
    built-in's check of the fine-tunes runs in tune and run_search (``check_models``)."""
    from ..evaluation.builtin import builtin_evaluator

    builtin = builtin_evaluator(spec, base, device=device)  # scored where the candidates are merged
    return builtin if builtin is not None else _load_callable(spec)


def _evaluator_file(spec: str) -> list[tuple[str, Any]]:
    """The loaded evaluator's module file, or a built-in's data file: an input like the models, which an
    output never replaces."""
    from ..evaluation.builtin import BUILTIN_EVALUATORS

    name, _, argument = spec.partition(":")
    if name in BUILTIN_EVALUATORS:
        # ("the evaluator's file (classifier-accuracy:val.jsonl) (val.jsonl)": the path followed it again, hp87b c25)
        return [(f"the data file of --evaluator {name}", argument)]
    module = sys.modules.get(name)
    path = getattr(module, "__file__", None)
    if not path:
        return []
    folder = Path(path).parent if Path(path).name == "__init__.py" else None
    return [(f"the evaluator's module ({spec})", path), *([("the evaluator's package", folder)] if folder else [])]


def _is_scores_file(path: Path) -> bool:
    """``path`` holds scores an earlier ``tune --json`` wrote (its three fields and nothing else: a copy the user
    added notes to is theirs), so --force may replace it."""
    from ..errors import TiesMergeError
    from ..limits import read_json

    try:
        data = read_json(path, "--json", error=OutputError, max_bytes=64 << 20)
    except (TiesMergeError, ValueError):
        return False
    if not (isinstance(data, dict) and set(data) == {"method", "best", "points"}):
        return False
    best, points = data["best"], data["points"]
    # the best and every point hold one set of keys (the options, lam, score): a note added inside one is the user's
    # (hp55 c51: --force deleted a note in "best")
    return isinstance(best, dict) and {"lam", "score"} <= set(best) and isinstance(points, list) and \
        all(isinstance(p, dict) and set(p) == set(best) for p in points)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def check_memory_budget(memory_budget: str | None, base: Any, models: list[Any], method: Any = "ties",
                        vocab_policy: str = "error") -> None:
    """A ``--memory-budget`` the user set that the plan cannot keep is refused before any work, with
    the number it needs, in every command that merges (merge checks its own recipe's)."""
    if memory_budget is None or memory_budget == DEFAULT_MEMORY_BUDGET:
        return
    from ..api import plan_merge
    from ..inputs import check_budget

    check_budget(plan_merge(base, list(models), method, memory_budget=memory_budget, allow_distant=True,
                            vocab_policy=vocab_policy))


def _check_writes(output: str | None, force: bool, inputs: list[tuple[str, Any]], marker: str = "tiesmerge.json"
                  ) -> None:
    """Before any work: the output may be written (see tiesmerge.paths; ``marker``: the manifest the command
    writes, so that --force replaces only its own kind of output) and is none of the inputs."""
    if output:
        check_not_input(output, inputs)
        check_output_location(output, force, marker)


def _check_copies(output: str | None, base: str) -> None:
    """Before a tune or search that ends by writing the best merge: the base's files that merge copies beside the
    weights (config, tokenizer: a link leaving the folder, a FIFO, a file still being written), checked as merge
    checks them, so that none fails the write after hours of scoring (hp35 E55)."""
    if output and os.path.isdir(base):
        from ..io.writer import check_model_files, model_files

        check_model_files(model_files(Path(base)))


def cmd_tune(args: argparse.Namespace) -> int:
    from ..api import merge
    from ..inputs import option_inputs
    from ..tuning import parse_grid, tune
    from ..tuning.evaluator import format_score, guard

    grid = parse_grid(args.method, args.grid)  # unknown methods and options fail before anything is read
    inputs = [("the base", args.base), *((f"model {k}", m) for k, m in enumerate(args.models)),
              *option_inputs(args.method, grid)]  # a grid of sign_from models: inputs too
    _check_writes(args.output, args.force, inputs)
    _check_copies(args.output, args.base)
    if args.json:
        if args.output and (nested(args.json, args.output) or held_through_mount(args.json, args.output)):
            raise OutputError(f"{args.json}: --json lies at or inside the output directory {args.output}"
                              + (", reached through another mount of it," if not nested(args.json, args.output)
                                 else ",") + " which the best merge replaces",
                              hint="write the scores beside the output, not into it")
    evaluate = guard(_evaluator(args.evaluator, args.base, args.device), f"--evaluator {args.evaluator}",
                     finite=True)
    module = _evaluator_file(args.evaluator)  # fail now, before the tune, not before the last write
    _check_writes(args.output, args.force, module)
    def check_json() -> None:
        check_output_file(args.json, args.force, [*inputs, *module], "--json", ours=_is_scores_file)

    if args.json:
        check_json()
    check_memory_budget(args.memory_budget, args.base, args.models, args.method, args.vocab_policy)

    def show(point) -> None:
        options = " ".join(f"{k}={v}" for k, v in point.options.items())
        lam = f" lam={point.lam:g}" if point.lam is not None else ""  # as given (hp57 c26: 0.0001 was "0.00")
        print(f"  {options}{lam}  score {format_score(point.score)}", flush=True)

    result = tune(args.base, args.models, args.method, evaluate, grid=grid, device=args.device,
                  memory_budget=args.memory_budget, vocab_policy=args.vocab_policy, allow_distant=args.allow_distant,
                  on_point=show)
    best = result.best
    lam = {} if best.lam is None else {"lam": best.lam}  # SLERP, Model Stock: no lam
    print(f"best: {' '.join(f'{k}={v}' for k, v in {**best.options, **lam}.items())} score {format_score(best.score)} "
          f"({_count(len(result.points), 'point')}, {_count(result.merges, 'merge')}, {result.seconds:.1f} s)")
    scores = json.dumps({"method": args.method, "best": {**best.options, "lam": best.lam, "score": best.score},
                         "points": [{**p.options, "lam": p.lam, "score": p.score} for p in result.points]},
                        indent=2) + "\n"
    # the scores appear with the best merge or not at all: staged beside their path (a full disk fails before the
    # merge), renamed into place once the merge is written, removed if it fails
    written = False  # whether the best merge is in place (a --json refused after it: its hint is not to merge again)
    try:
        with staged_file(args.json, scores, recheck=check_json) if args.json else contextlib.nullcontext():
            if args.output:
                if args.json:  # a path taken while tune ran: said before the merge is written (hp88b c16)
                    check_json()
                merge(args.base, args.models, args.method, output=args.output, device=args.device,
                      memory_budget=args.memory_budget, force=args.force, vocab_policy=args.vocab_policy,
                      allow_distant=args.allow_distant, **best.options, **lam)
                written = True
    except TiesMergeError as exc:  # the grid's work is not lost with the output (hp67b c26: a full disk)
        if written:  # only the scores' rename failed: the merge is complete where it belongs (hp88b c16: the hint
            # then said to write it again at a path that now held it)
            exc.hint = ((exc.hint + "; ") if exc.hint else "") + (
                f"the best merge was written to {shown(args.output)}; the grid's scores were printed above "
                f"(--json {shown(args.json)} was not written)")
            raise
        exc.hint = ((exc.hint + "; ") if exc.hint else "") + (
            "the grid's scores were printed above" + (f" (--json {shown(args.json)} was not written)"
                                                     if args.json else "")
            + ("; once fixed, write the best merge without the grid: " if args.output else
               "; to write the best merge without the grid: ") + _best_merge_command(args, {**best.options, **lam}))
        raise
    if args.output:
        completed(args.output)
        print(f"wrote the best merge to {shown(args.output)}")
    return 0


def _best_merge_command(args: argparse.Namespace, options: dict[str, Any]) -> str:
    """The `tiesmerge merge` command line that writes ``options``' merge of tune's inputs to its output."""
    import shlex

    words = ["tiesmerge", "merge", "--base", args.base, *(w for m in args.models for w in ("--model", m)),
             "--method", args.method]
    for name, value in options.items():
        dashed = name.replace("_", "-")
        flag = "--" + dashed
        if isinstance(value, bool):  # (argparse.BooleanOptionalAction's negative form)
            words.append(flag if value else "--" + "no-" + dashed)
        elif isinstance(value, (list, tuple)):
            words += [flag, *(str(v) for v in value)]
        elif value is not None:
            words += [flag, str(value)]
    if args.device != "cpu":
        words += ["--device", str(args.device)]
    if args.memory_budget is not None:
        words += ["--memory-budget", str(args.memory_budget)]
    if args.vocab_policy != "error":
        words += ["--vocab-policy", args.vocab_policy]
    if args.allow_distant:
        words.append("--allow-distant")
    # no -o given (the --json path failed): a placeholder, never "-o None" (hp87b c66's neighbour)
    words += ["-o", args.output if args.output is not None else "OUT"] + (["--force"] if args.force else [])
    return " ".join(shlex.quote(str(w)) for w in words)


def cmd_search(args: argparse.Namespace) -> int:
    from ..api import merge
    from ..inputs import option_inputs
    from ..tuning import LocalExecutor, RayExecutor, parse_grid, parse_ranges, run_search, write_report
    from ..tuning.evaluator import format_score, guard
    from ..tuning.space import parse_fixed

    grid = parse_grid(args.method, args.grid)  # unknown methods and options fail before anything is read
    ranges, fixed = parse_ranges(args.ranges), parse_fixed(args.method, args.fixed)
    inputs = [("the base", args.base), *((f"model {k}", m) for k, m in enumerate(args.models)),
              *option_inputs(args.method, {**grid, **fixed})]  # sign_from in --grid or --set: an input too
    _check_writes(args.output, args.force, inputs)  # fail now, not after the search
    try:
        check_not_input(args.dir, inputs)  # the log and the report are written there
    except OutputError as exc:  # the folder is --dir's (./tiesmerge-search when not given), not "the output"
        raise OutputError(f"--dir {args.dir}: {exc.message.removeprefix(f'{args.dir}: ')}",
                          hint="pass --dir with a folder outside the inputs (the default is ./tiesmerge-search in "
                               "the working folder)") from None
    check_search_dir(args.dir)
    if args.output and held_through_mount(args.dir, args.output):  # the same folder by another path (hp55 c21: the
        raise OutputError(f"{args.output}: the output and --dir {args.dir} are the same folder or one holds the "
                          "other, reached through another mount of it; the best merge would replace the search's "
                          "log", hint="choose separate paths")  # whole search ran, then the output was refused)
    if args.output and nested(args.dir, args.output):
        # a folder inside --dir is fine (hp54 c07: -o DIR/best was refused as replacing the log), unless it is one of
        # the files the search writes there
        from ..paths import SEARCH_FILES

        where = Path(os.path.realpath(args.dir))
        inside = Path(os.path.realpath(args.output))
        if inside == where or inside in where.parents or inside.relative_to(where).parts[0] in SEARCH_FILES or \
                inside.relative_to(where).parts[0].startswith(".tiesmerge-"):
            raise OutputError(f"{args.output}: the output and --dir {args.dir} are the same or one holds the other, "
                              "or the output names a file the search writes there (its log, results.md, report.html)",
                              hint="choose separate paths, or a folder of its own inside --dir (e.g. DIR/best)")
    evaluate = guard(_evaluator(args.evaluator, args.base, args.device), f"--evaluator {args.evaluator}",
                     finite=True)
    module = _evaluator_file(args.evaluator)  # an input too: neither output may replace it
    _check_writes(args.output, args.force, module)
    _check_copies(args.output, args.base)
    check_not_input(args.dir, module)
    if args.workers is not None and (args.ray is None or args.ray):
        raise ConfigError("--workers sizes the local Ray cluster that --ray without an address starts")
    if args.workers is not None and args.workers < 1:
        raise ConfigError(f"--workers {args.workers}: the local cluster's workers must be at least 1")
    check_memory_budget(args.memory_budget, args.base, args.models, args.method, args.vocab_policy)
    executor = RayExecutor(args.ray or None, workers=args.workers) if args.ray is not None else LocalExecutor()

    def show(trial) -> None:
        options = " ".join(f"{k}={v}" for k, v in trial.options.items() if k not in fixed)
        print(f"  [{trial.index}] {options}  score {format_score(trial.score)}", flush=True)

    try:
        result = run_search(args.base, args.models, args.method, evaluate, strategy=args.strategy, budget=args.budget,
                            seed=args.seed, axes=args.axes, grid=grid, ranges=ranges, fixed=fixed, popsize=args.popsize,
                            executor=executor, log=args.dir / "log.jsonl", device=args.device,
                            memory_budget=args.memory_budget, vocab_policy=args.vocab_policy,
                            allow_distant=args.allow_distant, on_trial=show)
    finally:
        executor.close()
    best = result.best
    options = " ".join(f"{k}={v}" for k, v in best.options.items())
    print(f"best: [{best.index}] {options} score {format_score(best.score)} "
          f"({len(result.trials)} candidate{'' if len(result.trials) == 1 else 's'}, {result.evaluations} scored"
          f"{f' ({result.log_checked} of them to check the log it resumed)' if result.log_checked else ''} and "
          f"{result.merges} merge{'' if result.merges == 1 else 's'} "  # (hp84b c57: "1 merges")
          "in this run, "
          f"{result.seconds:.1f} s)")
    from ..paths import check_report_unchanged

    check_report_unchanged(args.dir)  # an edit made while the search ran is not overwritten either
    print(f"wrote {shown(write_report(result, args.dir))} and {shown(args.dir / 'results.md')} beside "
          f"{shown(args.dir / 'log.jsonl')}")
    if args.output:
        merge(args.base, args.models, args.method, output=args.output, device=args.device,
              memory_budget=args.memory_budget, force=args.force, vocab_policy=args.vocab_policy,
              allow_distant=args.allow_distant, **best.options)
        print(f"wrote the best merge to {shown(args.output)}")
    return 0


def _recipe_data(args: argparse.Namespace) -> dict[str, Any]:
    """The recipe as a dict: the YAML file, if any, with command-line flags on top."""
    data: dict[str, Any] = {}
    if args.recipe:  # paths in the file are resolved against its folder here; mergekit's are translated
        data = read_recipe_data(args.recipe)
        origin = data.get("origin")  # a mergekit translation's record; a recipe's own of another type is refused by
        warned = origin.get("warnings") if isinstance(origin, dict) else None  # recipe_from_dict below (hp37 C53)
        for warning in warned if isinstance(warned, list) else []:
            print(f"warning: {terminal_safe(str(warning))}", file=sys.stderr)
    # flags override the recipe's inputs: said, as --method's override is (hp37b R02: per-model weights vanished)
    if args.base:
        if data.get("base") not in (None, args.base):
            print(f"warning: --base {terminal_safe(str(args.base))} replaces the recipe's base "
                  f"{terminal_safe(str(data['base']))}", file=sys.stderr)
        data["base"] = args.base
    if args.models:
        listed = data.get("models")
        if isinstance(listed, list) and listed:
            per_model = sorted({k for m in listed if isinstance(m, dict) for k in m if k not in ("path", "model")})
            # each key's own flag (hp40b C54: the stats' hint named --weights)
            as_flags = [flag for key, flag in (("weight", "--weights"), ("stats", "--stats")) if key in per_model]
            kept = _per_model_kept(data, args)
            print(f"warning: --model replaces the recipe's {len(listed)} model(s)"
                  + (f" and their per-model {', '.join(terminal_safe(str(k)) for k in per_model[:6])} ("
                     + (f"give them with {' and '.join(as_flags)}, or edit the recipe)" if as_flags else
                        "set them in the recipe)") if per_model else "")
                  # what stays is said too (hp40b C54: parameters.densities stayed, then "2 densities given for 1")
                  + (f"; the recipe's {', '.join(kept)} stay{'s' if len(kept) == 1 else ''}: one value per model, "
                     f"in order, so give {len(args.models)} (with a flag such as "
                     f"--{kept[0].removeprefix('parameters.').replace('_', '-')}, or in the recipe)" if kept else ""),
                  file=sys.stderr)
        data["models"] = args.models
    flags = []  # the flags that replace a recipe's values: named in its errors (hp40b C53)
    origin = data.get("origin")
    if isinstance(origin, dict) and origin.get("format") == "mergekit":
        per_model = [flag for flag, given in (("--base", args.base), ("--model", args.models),
                                              ("--weights", getattr(args, "opt_weights", None)),
                                              ("--densities", getattr(args, "opt_densities", None)),
                                              ("--stats", args.stats)) if given]
        if per_model:  # hp41 C20, C43, C85: bound to the translated models (the first listed may become the base)
            raise ConfigError(f"{args.recipe}: {' and '.join(per_model)} over a mergekit recipe: its models and their "
                              "values are the recipe's `models:` and `base_model:`, and tiesmerge's translation may "
                              "make the first model the base (linear without base_model), so a flag could not be "
                              "matched to the models you listed",
                              hint="edit the recipe (or give the whole merge as flags, without it)")
        # the translation is the merge_method's own (linear reads its first model as the base, with its weight):
        # another method over it, or --base-weight, bound to the first listed model (hp42 C5, C45)
        linear = origin.get("merge_method") == "linear"
        method_flags = [flag for flag, given in (("--method", args.method),
                                                 ("--base-weight", linear and getattr(args, "opt_base_weight", None)
                                                  is not None),
                                                 # tokenizer_source is the recipe's say (hp44 c06, c20: the flag
                                                 # overrode tokenizer_source: base silently)
                                                 ("--vocab-policy", getattr(args, "vocab_policy", None) is not None))
                        if given]
        # any other option of the translated method: the recipe's own parameters and semantics (recorded under
        # origin) would no longer describe the merge (hp43 C31: --normalize-weights over normalize: false)
        method_flags += [f"--{k.removeprefix('opt_').replace('_', '-')}" for k, v in vars(args).items()
                         if k.startswith("opt_") and v is not None and k != "opt_base_weight"
                         and f"--{k.removeprefix('opt_').replace('_', '-')}" not in per_model]
        if method_flags:
            raise ConfigError(f"{args.recipe}: {' and '.join(method_flags)} over a mergekit recipe: it is read as its "
                              f"merge_method ({origin.get('merge_method')}) with mergekit's semantics"
                              + (", which make the first listed model the engine's base (with its own weight), so "
                                 "--base-weight would set that model's weight, not base_model's"
                                 if "--base-weight" in method_flags else ""),
                              hint=_recipe_keys_hint(method_flags, origin.get("merge_method")))
    if args.models and args.recipe:
        flags.append("--model")
    if args.stats:
        _drop_per_model(data, "stats", "--stats")  # the flag replaces the recipe's per-model stats: (hp40b C53)
        if args.recipe and isinstance(data.get("stats"), list) and data["stats"] and data["stats"] != args.stats:
            print(f"warning: --stats replaces the recipe's stats ({len(data['stats'])} folder(s))",  # (hp68a c48)
                  file=sys.stderr)
        data["stats"] = args.stats
        flags.append("--stats")
    import importlib

    command_line = importlib.import_module("tiesmerge.cli.main")  # the module (the package's `main` is a function)
    if getattr(args, "allow_distant", False):
        if args.recipe and data.get("allow_distant") is False:  # said as the other flags over a recipe (hp88a c67)
            print("warning: --allow-distant replaces the recipe's allow_distant: false", file=sys.stderr)
        data["allow_distant"] = True
    elif "allow_distant" in command_line.switched_off and data.get("allow_distant") is True:
        # `--allow-distant false` over a recipe's true: the false word was dropped, the recipe's true merged a model
        # of another pretraining run without a word (hp88a c67)
        print("warning: --allow-distant false replaces the recipe's allow_distant: true", file=sys.stderr)
        data["allow_distant"] = False
    if args.method:
        if data.get("method") not in (None, args.method):
            dropped = data.get("parameters") or {}
            if isinstance(dropped, dict) and dropped:  # said, not dropped silently
                print(f"warning: --method {args.method} replaces the recipe's method "
                      f"{terminal_safe(str(data['method']))}, and its parameters "
                      f"({', '.join(terminal_safe(str(k)) for k in list(dropped)[:8])}) are that method's: they are "
                      "left out (give the new method's options as flags)", file=sys.stderr)
            data["parameters"] = {}  # the recipe's options belong to its own method
            fields = {f.name for f in dataclasses.fields(method_class(args.method))}
            if "weights" not in fields:  # the models' weights are an option of the old method too (hp45 c35:
                _drop_per_model(data, "weight", f"--method {args.method}, which takes no weights,")  # "weights?")
        data["method"] = args.method
    data.setdefault("method", "ties")
    for key in ("dtype", "shard_size", "memory_budget", "device", "vocab_policy", "output_format", "rank"):
        if getattr(args, key) is not None:
            if args.recipe and data.get(key) is not None and str(data[key]) != str(getattr(args, key)):
                # said, as the README promises (hp44 c21: --dtype over a recipe's dtype replaced it without a word)
                print(f"warning: --{key.replace('_', '-')} {terminal_safe(str(getattr(args, key)))} replaces the "
                      f"recipe's {key} {terminal_safe(str(data[key]))}", file=sys.stderr)
            data[key] = getattr(args, key)
            flags.append(f"--{key.replace('_', '-')}")  # its errors name the flag too (hp60a c11: "r8.yaml: rank")
    given = {k.removeprefix("opt_"): v for k, v in vars(args).items() if k.startswith("opt_")}
    if given:
        fields = [f.name for f in dataclasses.fields(method_class(data["method"]))]
        wrong = [k for k in given if k not in fields]
        if wrong:
            raise ConfigError([f"--{k.replace('_', '-')} does not apply to method {data['method']!r}" for k in wrong],
                              hint=f"{data['method']} takes: {', '.join('--' + f.replace('_', '-') for f in fields)}")
        recipe_params = data.get("parameters") or {}
        if not isinstance(recipe_params, dict):
            raise ConfigError(f"{args.recipe}: 'parameters' must be a mapping of method options")
        if "weights" in given:  # as parameters.weights is replaced, the models' own weight: entries are (hp40b C53)
            _drop_per_model(data, "weight", "--weights")
        for key, value in given.items():  # a recipe's own value replaced by a flag: said (hp44 c21)
            if args.recipe and key in recipe_params and recipe_params[key] != value:  # parameters.weights too
                # (hp68a c49; the models' own weight: entries are said by _drop_per_model above)
                print(f"warning: --{key.replace('_', '-')} {terminal_safe(str(value))} replaces the recipe's "
                      f"{key} {terminal_safe(str(recipe_params[key]))}", file=sys.stderr)
        data["parameters"] = {**recipe_params, **given}
        flags += [f"--{k.replace('_', '-')}" for k in given]
    missing = [flag for flag, key in (("--base", "base"), ("--model", "models")) if not data.get(key)]
    if missing and not args.recipe:  # a recipe's own check lists what it lacks, beside its other problems
        raise ConfigError(f"missing {' and '.join(missing)} (or a recipe file)",
                          hint="tiesmerge merge --base BASE --model FT1 --model FT2 -o OUT")
    args.flags_over_recipe = flags if args.recipe else []
    return data


def _per_model_kept(data: dict[str, Any], args: argparse.Namespace) -> list[str]:
    """The recipe's per-model values that --model leaves in place (a method's one-per-model lists, such as
    parameters.densities, and a top-level stats list), unless a flag or --method replaces them (hp40b C54)."""
    kept = []
    method = data.get("method") or "ties"
    params = data.get("parameters")
    if isinstance(params, dict) and params and not (args.method and args.method != method):
        try:
            fields = {f.name for f in dataclasses.fields(method_class(method)) if f.metadata.get("per_model")}
        except (TiesMergeError, TypeError, KeyError):  # an unknown method: the recipe's own check names it
            fields = set()
        kept += [f"parameters.{k}" for k in params if k in fields and isinstance(params[k], (list, tuple))
                 and getattr(args, f"opt_{k}", None) is None]
    if isinstance(data.get("stats"), list) and not args.stats:
        kept.append("stats")
    return kept


def _drop_per_model(data: dict[str, Any], key: str, flag: str) -> None:
    """A recipe's per-model ``key`` (weight, stats) left out, since ``flag`` on the command line replaces it: said."""
    listed = data.get("models")
    if not isinstance(listed, list) or not any(isinstance(m, dict) and m.get(key) is not None for m in listed):
        return
    print(f"warning: {flag} replaces the recipe's per-model {key}" if not flag.endswith(",") else
          f"warning: {flag} leaves out the recipe's per-model {key}", file=sys.stderr)
    data["models"] = [{k: v for k, v in m.items() if k != key} if isinstance(m, dict) else m for m in listed]


def _recipe_pickle_consent(recipe: Any, args: argparse.Namespace) -> None:
    """Unpickling runs a file's code: the person running the command opts in (--allow-pickle), never a recipe that
    may come from someone else."""
    if recipe.allow_pickle and not args.allow_pickle:
        raise ConfigError(f"{args.recipe}: the recipe sets allow_pickle: true, but only --allow-pickle on the command "
                          "line lets tiesmerge read pickled weights (.bin/.pt)",
                          hint="pass --allow-pickle if you trust every model the recipe names, or convert them to "
                               "safetensors")


# a flag over a mergekit recipe -> the recipe's own key for it (hp76a c47: one fixed hint offered
# "tokenizer_source: a model", which is refused, and base_model's weight for --lam)
_RECIPE_KEYS = {"--vocab-policy": "tokenizer_source: base or union", "--method": "merge_method",
                "--base-weight": "base_model's parameters.weight (list it under models:)", "--lam": "parameters.lambda",
                "--density": "parameters.density", "--weights": "models[i].parameters.weight",
                "--normalize-weights": "parameters.normalize", "--epsilon": "parameters.epsilon",
                "--gamma": "parameters.gamma", "--t": "parameters.t"}


def _recipe_keys_hint(flags: list[str], merge_method: Any = None) -> str:
    """Where each flag goes in the mergekit recipe, for its ``merge_method``: a parameter that method lacks (--lam over
    linear: "parameters.lambda", then refused as no parameter of linear, hp88a c66) is said as such."""
    from ..recipe_mergekit import _OPTIONS

    takes = _OPTIONS.get(merge_method) if isinstance(merge_method, str) else None
    keys, lacking = [], []
    for flag in flags:
        key = _RECIPE_KEYS.get(flag)
        if key is None:
            continue
        parameter = re.search(r"parameters\.(\w+)", key)
        if takes is not None and parameter and parameter.group(1) not in takes:
            lacking.append(f"{flag} ({parameter.group(1)})")
        else:
            keys.append(f"{flag} is {key}")
    said = []
    if keys:
        said.append(f"say it in the recipe ({'; '.join(keys)})")
    if lacking:
        said.append(f"mergekit's {merge_method} has no {', '.join(lacking)}: change merge_method to one that has")
    return (", or ".join(said) + ", or give the whole merge as flags, without it" if said else
            "change merge_method or its parameters in the recipe, or give the whole merge as flags, without it")


def _mergekit_words(data: dict[str, Any], own_policy: bool = True) -> None:
    """A mergekit recipe's hints name its own keys: tokenizer_source, not the --vocab-policy it refuses (hp45 c04);
    a tiesmerge recipe's, its vocab_policy key where ``own_policy`` (the recipe's value, no flag's)."""
    from .. import inputs
    from ..io import align

    origin = data.get("origin")
    if isinstance(origin, dict) and origin.get("format") == "mergekit":
        from ..recipe_mergekit import tokenizer_words

        newer = origin.get("tokenizer_key") == "tokenizer.source"  # the recipe's own spelling (hp47 c58)
        align.policy_words = {policy: f"{tokenizer_words(source, newer)} in the recipe"
                              for policy, source in (("union", "union"), ("truncate", "base"))}
        # a model listed twice: counted more by its weight where the method has weights (hp45 c12: "--weights")
        weighted = origin.get("merge_method") not in ("slerp", "nuslerp", "model_stock")
        inputs.weights_option = "a larger weight (models[i].parameters.weight in the recipe)" if weighted else None
        from ..methods import nuslerp

        nuslerp.t_offered = False  # mergekit's nuslerp has per-model weights, no t (hp76a c39)
    elif own_policy and data.get("vocab_policy") in ("union", "truncate"):  # a tiesmerge recipe's own key, where no
        # flag replaced it (hp68a c64: "--vocab-policy union needs ..." of a recipe's vocab_policy: union)
        align.policy_words = {**align.policy_words, data["vocab_policy"]: f"vocab_policy: {data['vocab_policy']} "
                                                                          "(the recipe's)"}


@contextlib.contextmanager
def _overflow_said_for(origin: Any):
    """An overflow in a mergekit recipe's merge: the hint in the recipe's terms (its dtype and weights)."""
    from ..finite import NotFiniteError

    try:
        yield
    except NotFiniteError as exc:
        if isinstance(origin, dict) and origin.get("format") == "mergekit":
            from ..recipe_mergekit import overflow_hint

            scaling = origin.get("scaling") if isinstance(origin.get("scaling"), dict) else None
            if exc.base_value is None:
                exc.hint = overflow_hint(exc.code, str(origin.get("merge_method")), scaling)
            else:
                exc.hint = exc.wider_dtype_hint("set the recipe's out_dtype (or dtype) to bfloat16 or float32")
        raise


def cmd_merge(args: argparse.Namespace) -> int:
    from ..api import describe_plan, merge, plan_merge  # the engine: imported by the commands that merge
    from ..inputs import check_budget

    data = _recipe_data(args)
    _mergekit_words(data, own_policy=bool(args.recipe) and "--vocab-policy" not in args.flags_over_recipe)
    origin = data.get("origin")
    if args.recipe and not (isinstance(origin, dict) and origin.get("format") == "mergekit"):
        # a tiesmerge recipe's duplicate model: its own key first (hp75a c10: "use --weights" over a recipe)
        from .. import inputs

        inputs.weights_option = "weights: [...] under the recipe's parameters: (or --weights)"
    flags = args.flags_over_recipe  # a problem may be the flags': the source says they were applied (hp40b C53)
    source = f"{args.recipe} with {', '.join(flags)} from the command line" if flags else args.recipe or "command line"
    recipe = recipe_from_dict(data, source=source)
    _recipe_pickle_consent(recipe, args)
    common = dict(device=recipe.device, memory_budget=recipe.memory_budget, dtype=recipe.dtype,
                  vocab_policy=recipe.vocab_policy, allow_pickle=args.allow_pickle,
                  allow_distant=recipe.allow_distant)
    if args.dry_run:
        if args.output:  # the same checks as a real run: a dry run that says nothing wrong must mean it
            reference = recipe.method.requirements().reference
            _check_writes(args.output, args.force,
                          [("the recipe", args.recipe), ("the base", recipe.base),
                           *((f"model {k}", m) for k, m in enumerate(recipe.models)),
                           ("the reference model", reference),
                           *((f"the statistics of model {k}", s) for k, s in enumerate(recipe.stats or ()))])
        plan = plan_merge(recipe.base, list(recipe.models), recipe.method, output_format=recipe.output_format,
                          stats=recipe.stats, rank=recipe.rank, origin=recipe.origin, **common)
        check_budget(plan)
        print(describe_plan(plan, recipe.method, len(recipe.models)))
        if args.output:
            print(f"output           {shown(args.output)} (not written: dry run)")
            from ..io.writer import check_free_space, output_footprint

            one_file = plan.adapter_output  # an adapter is one file; a model's weights are sharded
            needed = output_footprint(plan.output_bytes, copied=plan.copied_bytes, tensors=len(plan.jobs),
                                      shard_bytes=plan.output_bytes + 1 if one_file else parse_size(recipe.shard_size))
            with contextlib.suppress(OSError):  # as the real run checks it (hp54 c43), the same footprint (hp56 c39)
                check_free_space(args.output, needed, existing_folder(args.output))
        return 0
    if not args.output:
        raise ConfigError("missing -o/--output", hint="tiesmerge merge ... -o ./merged (or --dry-run to only plan)")
    check_not_input(args.output, [("the recipe", args.recipe)])  # the merge's own inputs are checked by merge()
    started = time.perf_counter()
    with _overflow_said_for(recipe.origin):
        out = merge(recipe.base, list(recipe.models), recipe.method, output=args.output,
                    shard_size=recipe.shard_size, force=args.force,
                    progress=not args.no_progress and sys.stderr.isatty(), output_format=recipe.output_format,
                    rank=recipe.rank, origin=recipe.origin, stats=recipe.stats, files_from=recipe.files_from,
                    # a budget the user set: one the plan cannot keep is refused, before the first heavy read
                    budget_floor=recipe.memory_budget != DEFAULT_MEMORY_BUDGET, **common)
    seconds = time.perf_counter() - started
    completed(out)
    manifest = json.loads((Path(out) / "tiesmerge.json").read_text())
    read = manifest["engine"]["bytes_read"]
    t = manifest["tensors"]
    n = len(recipe.models)
    req = recipe.method.requirements()
    what = None
    if req.n_models == 1 and req.base_values:  # the base is an endpoint of the interpolation (slerp from the base;
        n += 1                                  # mergekit's nuslerp without a base_model): two models merged
        if not recipe.origin:  # --base B --model M: "the base and 1 model", as the command named them (hp63a c20)
            what = "the base and 1 model"
    elif getattr(recipe.method, "base_weight", None):  # average with the base weighted in (a mergekit linear): it
        n += 1                                         # counts among the merged models (hp44 c02: "merged 2" of 3)
        if not recipe.origin:  # --base-weight: as the command named them (hp79a c23: "merged 3 models" of two)
            what = f"the base and {n - 1} model{'s' if n != 2 else ''}"
    what = what or f"{n} model{'s' if n != 1 else ''}"
    print(f"merged {what} with {recipe.method.name} into {shown(out)}")
    if recipe.origin and recipe.origin.get("semantics"):  # a hand-written origin may not say
        print(f"  semantics: {terminal_safe(str(recipe.origin['semantics']))}")
    adapter = manifest.get("adapters", {})
    if "max_relative_reconstruction_error" in adapter:
        print(f"  LoRA adapter at rank {adapter['rank']}: relative reconstruction error at most "
              f"{adapter['max_relative_reconstruction_error']:.3g} (per module in tiesmerge.json)")
    # an adapter holds the adapted modules only: nothing of the base is copied into it (hp39 C16: "37 copied")
    held = ("nothing copied (an adapter)" if recipe.output_format == "adapter" else
            f"{t['copied']} copied, {t['tied_aliases']} tied")
    print(f"  {t['merged']} tensors merged, {held}; "
          f"{format_size(read)} read in {seconds:.1f} s ({read / max(seconds, 1e-9) / 1e9:.2f} GB/s)")
    seconds = manifest["seconds"]
    print("  phases: " + ", ".join(f"{k} {v:.2f} s" for k, v in seconds.items() if not k.startswith("profile.")))
    profile = {k.removeprefix("profile."): v for k, v in seconds.items() if k.startswith("profile.")}
    if profile:  # where the merge thread spent its time (the reader and writer threads overlap it)
        print("  profile: " + ", ".join(f"{k} {v:.2f} s" for k, v in profile.items()))
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    from ..stats import save_stats
    from ..stats.hf import hf_statistics

    for flag, value in (("--limit", args.limit), ("--batch-size", args.batch_size), ("--max-length", args.max_length)):
        if value is not None and value < 1:
            raise ConfigError(f"{flag} must be a positive number, got {value}")
    given = [flag for flag, value in (("--fisher", args.fisher), ("--per-example", args.per_example)) if value]
    if args.kind != "fisher" and given:  # hp29 N7: they were ignored without a word
        raise ConfigError(f"{' and '.join(given)} appl{'ies' if len(given) == 1 else 'y'} to fisher statistics "
                          f"(per-example gradients), and {args.kind} "
                          "statistics are input Gram matrices from a forward pass",
                          hint=f"leave {' and '.join(given)} out")  # both, where both were given (hp72b c39)
    if os.path.isdir(args.data):  # said as what it is, before "the output lies inside the data file (.)" (hp72b c14)
        raise ConfigError(f"--data {args.data}: is a directory, and --data takes a JSONL file of examples",
                          hint='give the file itself: one {"text": ..., "label": ...} object per line')
    _check_writes(args.output, args.force, [("the model", args.model), ("the data file", args.data)],
                  "tiesmerge_stats.json")
    started = time.perf_counter()
    stats = hf_statistics(args.kind, args.model, args.data, fisher=args.fisher or "exact",
                          per_example=args.per_example or "loop",
                          batch_size=args.batch_size, limit=args.limit, max_length=args.max_length, device=args.device,
                          progress=not args.no_progress and sys.stderr.isatty())
    out = save_stats(args.output, stats, force=args.force)
    completed(out)
    # the files as written (headers and manifest too): the tensors' bytes alone understated them (hp39 C42)
    size = sum(f.stat().st_size for f in Path(out).iterdir() if f.is_file() and not f.is_symlink())
    print(f"wrote {args.kind} statistics of {shown(args.model)} ({_count(stats.manifest.examples, 'example')}, "
          f"{_count(len(stats.tensors), 'tensor')}, {format_size(size)}) to {shown(out)} in "
          f"{time.perf_counter() - started:.1f} s")
    return 0


def cmd_analyze(args: argparse.Namespace) -> int:
    from ..api import analyze, method_of_spec
    from ..inputs import method_inputs

    # the models the --method specs name (sign_from) are inputs too: named as such before the output's kind
    _check_writes(args.output, args.force,
                  [("the base", args.base), *((f"model {k}", m) for k, m in enumerate(args.models)),
                   *(i for spec in args.methods for i in method_inputs(method_of_spec(spec)))], "analysis.json")
    if args.subsets_per_size < 0:
        raise ConfigError(f"--subsets-per-size must be 0 (every subset) or more, got {args.subsets_per_size}")
    check_memory_budget(args.memory_budget, args.base, args.models)  # the analysis reads like a TIES merge
    data = analyze(args.base, args.models, output=args.output, density=args.density,
                   subsets_per_size=args.subsets_per_size or None, seed=args.seed, device=args.device,
                   memory_budget=args.memory_budget, vocab_policy=args.vocab_policy, allow_pickle=args.allow_pickle,
                   force=args.force, progress=not args.no_progress and sys.stderr.isatty(),
                   methods=args.methods)
    completed(args.output)
    for line in data["summary"]:  # a sentence may name a tensor: one printed line each (hp36 C05)
        print(f"- {shown(line)}")
    engine = data["engine"]
    print(f"wrote {shown(Path(args.output) / 'report.html')} (and analysis.json, PNGs): "
          f"{format_size(engine['bytes_read'])} read in {data['seconds']['total']:.1f} s")
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    classes = [method_class(args.name)] if args.name else list(METHODS.values())
    for cls in classes:
        print(f"{cls.name}  —  {cls.summary}")
        print(f"  paper: {cls.paper}")
        if args.name and cls.__doc__:  # one method: its semantics, the reference it follows, where it differs
            print(textwrap.indent(inspect.cleandoc(cls.__doc__), "  "))
        types = option_types(cls)
        for f in dataclasses.fields(cls):
            meta = f.metadata
            default = "—" if f.default is None else f.default
            flag, negated = f.name.replace('_', '-'), "no-" + f.name.replace('_', '-')
            # a switch on the command line, true|false in a recipe (hp84a c42: shown as true|false only)
            kind = {float: "number", int: "integer", str: "text", ModelPath: "path", tuple: "list, one per model",
                    bool: f"a switch: --{flag} or --{negated}; true|false in a recipe"}[types[f.name]]
            extra = f" one of {'|'.join(meta['choices'])}" if meta.get("choices") else f" ({kind})"
            unit = f" [{meta['unit']}]" if meta.get("unit") else ""
            grid = meta.get("grid")
            searched = f"; tune searches {_axis(grid)}" if grid else ""
            print(f"  --{f.name.replace('_', '-'):<15} default {default!s:<8} "
                  f"{meta.get('help', '')}{unit}{extra}{searched}")
        print()
    if not args.name:
        for name, problem in broken_plugins().items():  # set aside: the other methods still work
            print(f"warning: method {name!r} is not available: {problem.message}", file=sys.stderr)
    return 0


def _axis(values: tuple) -> str:
    """A grid axis in few characters: 0.8..3.0 step 0.1, or the values themselves."""
    if len(values) > 4:
        step = round(values[1] - values[0], 6)
        return f"{values[0]}..{values[-1]} step {step}"
    return ", ".join(str(v) for v in values)


def cmd_validate(args: argparse.Namespace) -> int:
    from ..api import base_distance, check_statistics_owners, plan_merge
    from ..distance import check_distances
    from ..inputs import check_budget

    try:
        data = read_recipe_data(args.recipe)
    except ConfigError as exc:  # a mergekit recipe's own problems (its translation): the inputs are checked too
        written = _inputs_as_written(args.recipe)
        if written is None:
            raise
        raise _with_input_problems(exc, *written, args, mergekit=True) from None
    _mergekit_words(data)
    try:
        recipe = recipe_from_dict(data, source=str(args.recipe))
    except ConfigError as exc:  # the recipe's own problems, and then each input's (hostile pass 31, C74)
        raise _with_input_problems(exc, data.get("base"), _model_paths(data.get("models")), args,
                                   allow_pickle=data.get("allow_pickle") is True) from None
    _recipe_pickle_consent(recipe, args)
    # the checks of the merge's plan, short of reading any weights: every input exists and is a model
    # (headers read), none is given twice, the shapes align, the statistics fit, the device exists
    try:
        plan = plan_merge(recipe.base, list(recipe.models), recipe.method, device=recipe.device,
                          memory_budget=recipe.memory_budget, dtype=recipe.dtype, vocab_policy=recipe.vocab_policy,
                          allow_pickle=recipe.allow_pickle, output_format=recipe.output_format, stats=recipe.stats,
                          rank=recipe.rank,  # checked as the merge checks it (hp45 c66: rank 1000 was "ok")
                          origin=recipe.origin,  # a mergekit recipe's adapters read as the merge reads them
                          allow_distant=True)  # judged below, once the numbers are shown
    except TiesMergeError as exc:  # the first problem of the inputs: every other input's is looked for too
        raise _with_input_problems(exc, recipe.base, [str(m) for m in recipe.models], args,
                                   allow_pickle=recipe.allow_pickle, vocab_policy=recipe.vocab_policy,
                                   stats=recipe.stats, method=recipe.method) from None
    check_budget(plan)
    # statistics are checked against their models' files, as the merge checks them (hp42 C42: swapped, "ok")
    check_statistics_owners(list(recipe.models), list(recipe.stats or ()), recipe.method,
                            allow_pickle=recipe.allow_pickle)
    # how far each model is from the base (a small sample of rows): shown, then judged
    distances = base_distance(recipe.base, list(recipe.models), vocab_policy=recipe.vocab_policy,
                              allow_pickle=recipe.allow_pickle, origin=recipe.origin)
    for d in distances:
        print(f"  base distance of {d.line()}")
    check_distances(distances, recipe.base, recipe.allow_distant)
    print(f"{shown(args.recipe)}: ok — {recipe.method.name} of {len(recipe.models)} models onto {shown(recipe.base)}")
    if recipe.origin:
        semantics = terminal_safe(str(recipe.origin.get("semantics")))  # a recipe's own text: escaped
        print(f"  read as a {shown(recipe.origin.get('format'))} recipe: {semantics}")
        for warning in recipe.origin.get("warnings", []):
            print(f"  warning: {terminal_safe(str(warning))}")
    for key, value in recipe.to_dict()["parameters"].items():
        text = str(value)  # a t_by_name of 9,000 filters is a 440,000-character line (hp41 C64)
        print(f"  {key} = {text if len(text) <= 300 else text[:240] + f'... ({len(text):,} characters in all)'}")
    merged = [j for j in plan.jobs if j.merge]
    print(f"  inputs checked: {len(merged)} tensors to merge, {format_size(plan.bytes_to_read)} to read, "
          f"peak memory {format_size(plan.peak_bytes)}")
    return 0


def _model_paths(models: Any) -> list[str]:
    """A recipe's model paths as written (a path, or {path: ...}), where the recipe itself did not validate."""
    entries = models if isinstance(models, list) else []
    paths = [e.get("path") if isinstance(e, dict) else e for e in entries]
    return [str(p) for p in paths if isinstance(p, str) and p]


def _inputs_as_written(recipe: str) -> tuple[str, list[str]] | None:
    """The base and model paths of a recipe that did not translate (mergekit's base_model and models[].model, which
    mergekit resolves against the working folder), or None where the file names none."""
    from ..limits import read_yaml

    try:
        data = read_yaml(recipe, "the recipe", error=ConfigError)
    except ConfigError:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("base_model"), str) or "+" in data["base_model"]:
        return None  # (a BASE+LORA base_model: refused by the translation, not "no such file": hp45 c28)
    entries = data.get("models") if isinstance(data.get("models"), list) else []
    models = [e.get("model") if isinstance(e, dict) else e for e in entries]
    # a MODEL+LORA reference is checked by the translation itself
    return data["base_model"], [m for m in models if isinstance(m, str) and m and "+" not in m]


def _with_input_problems(first: TiesMergeError, base: Any, models: list[str], args: argparse.Namespace, *,
                         allow_pickle: bool = False, vocab_policy: str = "error", mergekit: bool = False,
                         stats: Any = None, method: Any = None) -> TiesMergeError:
    """``first`` (a recipe's or its inputs' first problem) with every input problem found beside it: the base, then
    each model checked against it on its own (its files, its shapes, an adapter's binding), then each statistics
    directory of a data-aware ``method`` opened on its own, as `validate` promises every problem at once (hostile pass
    31, C74; hp67a c46: only the first bad stats: folder was named). Returns ``first`` itself where nothing else is
    found."""
    from ..api import plan_merge
    from ..hub import resolve_source
    from ..inputs import _label
    from ..io.checkpoint import open_checkpoint

    if not isinstance(base, (str, Path)) or not str(base):
        return first
    if mergekit and "\0" not in str(base):  # a mergekit recipe lists its base_model among its models (slerp's
        # usual form), as mergekit reads it: no problem of its own (hp66a c19: "model 0 is the base itself" beside the
        # real one); a path holding a NUL byte is named by its own check below, never resolved here
        models = [m for m in models if not isinstance(m, str) or "\0" in m
                  or os.path.realpath(m) != os.path.realpath(str(base))]
    problems = list(getattr(first, "problems", None) or [first.message])
    known = len(problems)
    # by their first line: a problem said with the inputs together, said again of one model alone, differs only in
    # its shapes table (hp45 c51: one mismatch listed three times). Sets, not scans of the lists: 20,000 models took
    # 45.8 s (hp40b C30)
    def first_line(message: str) -> str:  # the role a missing path was read in is no other problem (hp64a c62:
        # "../base: no such file ... (cannot read the model)" and "(cannot read the base)" both listed), nor where
        # else it was looked for (hp84a c29: "(the folder rr exists here, ...; no Hugging Face repo ...)")
        line = re.sub(r" \(cannot read the [^)]*\)$", "", message.split("\n", 1)[0])
        return re.sub(r": no such file or directory \(.*\)$", ": no such file or directory", line)

    said_before = {first_line(p) for p in problems}
    allow = allow_pickle and bool(getattr(args, "allow_pickle", False))  # a recipe's own consent needs the flag
    usage = [isinstance(first, ConfigError)]  # whether any problem is the user's writing (exit 2), not an input's

    def add(exc: TiesMergeError, k: int | None) -> None:
        usage[0] |= isinstance(exc, ConfigError)
        for message in getattr(exc, "problems", None) or [exc.message]:
            # checked alone, a model is model 0: its place in the recipe is said instead
            said = message if k is None else re.sub(r"\bmodel 0\b", f"model {k}", message)
            if first_line(said) not in said_before:
                said_before.add(first_line(said))
                problems.append(said)

    try:
        open_checkpoint(str(base), allow_pickle=allow, role="the base").close()  # worded as the merge words it
        base_opens = True
    except TiesMergeError as exc:  # every model's check would stop there too
        add(exc, None)
        base_opens = False
    checked: set[str] = set()
    planned = False  # whether a model was planned against the base yet: that plan names the base's own problems
    for k, model in enumerate(models):
        if model in checked:
            continue
        checked.add(model)
        opened = True
        if "\0" not in model:  # a NUL byte: the plan names it, as the recipe's own check does
            # a model that does not open is named by its own open, as its plan would name it: each plan opened the
            # base twice more, 20,002 opens for 10,000 missing models (hp40b C30). One plan is made all the same,
            # for the problems of the base's own that it names (a base that is an adapter)
            try:
                source = resolve_source(model)
                open_checkpoint(source, allow_pickle=allow, label=_label(source, model)).close()
            except TiesMergeError as exc:
                add(exc, k)
                opened = False
            except (OSError, ValueError):
                pass  # not a TiesMergeError: left to the plan, as before
        # where the base does not open, each model is only opened (hp84a c29: the missing ones were never named)
        if not base_opens or (planned and not opened):
            continue
        planned = True
        try:
            plan_merge(str(base), [model], "task_arithmetic", vocab_policy=vocab_policy, allow_pickle=allow,
                       allow_distant=True)
        except TiesMergeError as exc:
            add(exc, k)
    if models:
        from ..inputs import check_inputs

        try:
            check_inputs(str(base), models)  # one given twice, or the base among the models
        except TiesMergeError as exc:
            add(exc, None)
    spec = method.requirements().statistics if method is not None else None
    if spec is not None and isinstance(stats, (list, tuple)):
        from ..stats.files import open_stats

        for source in stats:  # each folder as the plan opens it (its label the path), whether or not its model opens
            if isinstance(source, (str, os.PathLike)):
                try:
                    open_stats(source, kind=spec.kind, label=str(source)).close()
                except TiesMergeError as exc:
                    add(exc, None)
    reference = getattr(method, "sign_from", None)  # a sign_from reference is an input too (hp85a c56a: a missing
    # one was not named beside a missing model)
    if isinstance(reference, (str, os.PathLike)) and str(reference) and "\0" not in str(reference):
        try:
            source = resolve_source(str(reference))
            open_checkpoint(source, allow_pickle=allow, label=f"{_label(source, str(reference))} (reference)",
                            role="the reference model").close()
        except TiesMergeError as exc:
            add(exc, None)
        except (OSError, ValueError):
            pass  # not a TiesMergeError: left to the plan
    if len(problems) == known:
        return first
    hint = ("fix each problem named above (each model was checked against the base on its own; run validate again to "
            "check them together)" if base_opens else
            "fix each problem named above (the base does not open, so each model was only opened, not checked "
            "against it; run validate again once the base opens)")
    # missing or damaged inputs alone exit as a damaged input does (1), wherever the recipe lies (hp84a c29: 2 from
    # one folder, 1 from another, for the same inputs)
    return ConfigError(problems, hint=hint) if usage[0] else input_problems(problems, hint)


def cmd_demo(args: argparse.Namespace) -> int:
    from ..paths import DEMO_MARKER, demo_workdir

    if args.params is not None and not args.synthetic:  # the real demo fine-tunes MiniLM: its size is MiniLM's
        raise ConfigError(f"--params {args.params:g} sizes the synthetic model, and this demo fine-tunes MiniLM",
                          hint="add --synthetic to merge synthetic Llama-shaped models of that size")
    if args.params is None:
        args.params = 50.0
    if not (math.isfinite(args.params) and 0.01 <= args.params <= 10_000):
        raise ConfigError(f"--params {args.params:g}: the synthetic model's size must be between 0.01 and 10,000 "
                          "million parameters", hint="e.g. --params 50 (the default)")
    if not args.synthetic:  # the extras first: a refused demo leaves no --workdir (nor its marker) behind
        from .demo_text import model_dir

        model_dir()
    fresh = None  # a --workdir this run makes (or finds empty): emptied again if the demo fails or is stopped
    if args.workdir:
        existed = os.path.lexists(args.workdir)
        # the folders above it that this run makes too (wd/x of --workdir wd/x/y), innermost first: removed with it
        # (hp87b c75: left behind by a refused or stopped demo)
        above = Path(os.path.abspath(args.workdir)).parents
        parents = [p for p in above if not os.path.lexists(p)] if not existed else []
        args.workdir = str(demo_workdir(args.workdir))  # before anything is made: never over a user's files
        if not existed or sorted(os.listdir(args.workdir)) == [DEMO_MARKER]:
            fresh = (Path(args.workdir), existed, parents)
        import importlib

        command_line = importlib.import_module("tiesmerge.cli.main")  # the module (the package's `main` is a function)
        command_line.left_on_stop = (
            f"the demo's files in the new --workdir {args.workdir} were removed (the folder too, unless it holds "
            "files of yours)" if fresh and not existed else
            f"the demo's files in --workdir {args.workdir} were removed (files of yours stay)" if fresh else
            f"the models written so far stay in {args.workdir}; the demo replaces them when run there again")
    try:
        if args.synthetic:
            from .demo import run_demo

            return run_demo(workdir=args.workdir, million_params=args.params)
        from .demo_text import run_text_demo

        return run_text_demo(workdir=args.workdir)
    except BaseException:
        # a full disk, an error or a stop in a folder this demo made: nothing of it stays (a half-written demo on a
        # full disk held its space until the next run, hp36 C33); an earlier demo's folder keeps its marker
        if fresh is not None:
            _empty_demo_workdir(*fresh)
        raise


def _empty_demo_workdir(root: Path, keep_folder: bool, parents: Sequence[Path] = ()) -> None:
    """Remove what this demo wrote in ``root`` (a folder it made, or found empty), and the folder too when it made
    it and nothing else is left, with the ``parents`` it made for it: a file someone put there meanwhile stays
    (paths.remove_demo_files)."""
    from ..paths import remove_demo_files

    remove_demo_files(root)
    if not keep_folder:
        for folder in (root, *parents):
            try:
                os.rmdir(folder)  # only when empty: a file of someone else's stops it, and the folders above
            except OSError:
                break


HANDLERS = {"merge": cmd_merge, "analyze": cmd_analyze, "methods": cmd_methods, "validate": cmd_validate,
            "tune": cmd_tune, "search": cmd_search, "stats": cmd_stats, "demo": cmd_demo, "adapt": cmd_adapt}
