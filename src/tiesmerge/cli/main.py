"""`tiesmerge`: one command, subcommands merge, analyze, methods, validate, tune, stats, demo.

The CLI only calls the public API; every option of a method is a flag generated from the
method's dataclass fields, so the flags, the recipe keys and the Python API never drift apart.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any, NoReturn

from ..errors import ConfigError, TiesMergeError
from ..io.align import VOCAB_POLICIES
from ..methods.base import ModelPath, option_types
from ..recipe import DTYPES, load_recipe, read_recipe_data, recipe_from_dict
from ..registry import METHODS, method_class
from ..sizes import DEFAULT_MEMORY_BUDGET, DEFAULT_SHARD_SIZE, OUTPUT_FORMATS, format_size
from ..version import __version__

MERGE_EXAMPLES = """\
examples:
  # TIES with the paper's defaults (density 0.2, lam 1.0, one threshold per model)
  tiesmerge merge --base ./base --model ./ft-math --model ./ft-code -o ./merged

  # per-tensor trimming and PEFT/mergekit's zero-sign rule, bf16 output in 2 GB shards
  tiesmerge merge --base ./base --model ./a --model ./b --scope per_tensor --zero-sign positive \\
      --dtype bfloat16 --shard-size 2GB -o ./merged

  # task arithmetic, the paper's no-validation lambda
  tiesmerge merge --base ./base --model ./a --model ./b --method task_arithmetic --lam 0.4 -o ./ta

  # what would happen, without reading any weights
  tiesmerge merge recipe.yaml -o ./merged --dry-run

  # PEFT LoRA adapters in, a merged LoRA adapter out (truncated SVD at rank 16)
  tiesmerge merge --base ./base --model ./lora-math --model ./lora-code --output-format adapter \
      --rank 16 -o ./merged-lora

  # a mergekit recipe, as it is (linear, task_arithmetic, ties, dare_ties, dare_linear)
  tiesmerge merge mergekit.yaml -o ./merged

  # data-aware baselines: statistics first (tiesmerge stats --help), one --stats per --model
  tiesmerge merge --method fisher --base ./base --model ./a --stats ./fisher-a \
      --model ./b --stats ./fisher-b -o ./fisher-merged
  tiesmerge merge --method regmean --alpha 0.95 --base ./base --model ./a --stats ./gram-a \
      --model ./b --stats ./gram-b -o ./regmean-merged

recipe.yaml:
  method: ties
  base: ./base
  models: [./ft-math, {path: ./ft-code, weight: 0.5}]
  parameters: {density: 0.2, lam: 1.0}

mergekit.yaml:
  merge_method: ties
  base_model: ./base
  models:
    - model: ./ft-math
      parameters: {density: 0.5, weight: 0.5}
    - model: ./ft-code
      parameters: {density: 0.5, weight: 0.5}
  parameters: {normalize: true}
  dtype: bfloat16
"""


STATS_EXAMPLES = """\
examples:
  # the exact diagonal Fisher of a sequence classifier on 256 labelled or unlabelled texts
  tiesmerge stats fisher --model ./ft-sst2 --data sst2-validation.jsonl --limit 256 -o ./fisher-sst2

  # Gram matrices X^T X / N of every Linear layer's inputs (padding excluded), for RegMean
  tiesmerge stats gram --model ./ft-sst2 --data sst2-validation.jsonl --limit 256 -o ./gram-sst2

data.jsonl, one example per line (label: only for --fisher empirical|batched):
  {"text": "a gripping, funny film", "label": 1}

The output is a statistics directory: model.safetensors keyed like the model, and
tiesmerge_stats.json (kind, examples, options, the model's digest, checked when merging).
Other models and likelihoods: tiesmerge.stats.fisher_information / gram_matrices in Python.
"""


TUNE_EXAMPLES = """\
examples:
  # the paper's grid for TIES (k in 0.1, 0.2, 0.3; lam 0.8..3.0), scored by your function
  tiesmerge tune --base ./base --model ./a --model ./b --evaluator my_eval:validation_accuracy -o ./best

  # task arithmetic, a custom lam grid
  tiesmerge tune --base ./base --model ./a --model ./b --method task_arithmetic \\
      --grid lam=0.1:1.0:0.05 --evaluator my_eval:validation_accuracy --json grid.json

my_eval.py:
  def validation_accuracy(state_dict) -> float:   # higher is better
      model.load_state_dict(state_dict); return accuracy(model, validation_data)

tau_m is merged once per density (or drop rate) and every lam is swept on top of it.
"""


ANALYZE_EXAMPLES = """\
examples:
  # sign conflicts, redundancy and merged magnitudes of three fine-tunes, at the paper's top 20%
  tiesmerge analyze --base ./base --model ./ft-math --model ./ft-code --model ./ft-chat -o ./interference

  # a 7B family on a small machine: every subset of the models, 1 GiB of working memory
  tiesmerge analyze --base ./llama --model ./a --model ./b --subsets-per-size 0 --memory-budget 1GiB -o ./r

writes analysis.json, one PNG per figure and report.html (self-contained: open it in a browser)
"""


def _number(text: str) -> int | float:
    """A flag value for an option whose type differs between methods: an int if it reads as one."""
    try:
        return int(text)
    except ValueError:
        return float(text)


_FLAG_TYPES: dict[Any, dict[str, Any]] = {
    float: {"type": float, "metavar": "X"},
    int: {"type": int, "metavar": "N"},
    str: {"type": str, "metavar": "TEXT"},
    ModelPath: {"type": str, "metavar": "DIR"},
    tuple: {"type": float, "nargs": "+", "metavar": "W"},
    bool: {"action": argparse.BooleanOptionalAction},
}


def _method_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per method option (the union over the methods), typed by its annotation: an int
    option gets an int flag, a path a DIR, a per-model tuple one value per model."""
    group = parser.add_argument_group("method options (tiesmerge methods lists which method takes which)")
    kinds: dict[str, Any] = {}
    first: dict[str, dataclasses.Field] = {}
    for cls in METHODS.values():
        types = option_types(cls)
        for f in dataclasses.fields(cls):
            if f.name in kinds and kinds[f.name] != types[f.name]:
                kinds[f.name] = "mixed"
            else:
                kinds.setdefault(f.name, types[f.name])
                first.setdefault(f.name, f)
    for name, f in first.items():
        meta = f.metadata
        kwargs: dict[str, Any] = {"dest": f"opt_{name}", "default": argparse.SUPPRESS,
                                  "help": meta.get("help", "") + (f" [{meta['unit']}]" if meta.get("unit") else "")}
        if meta.get("choices") and kinds[name] is str:
            kwargs["choices"] = meta["choices"]
        elif kinds[name] == "mixed":
            kwargs.update(type=_number, metavar="X")
        else:
            kwargs.update(_FLAG_TYPES[kinds[name]])
        group.add_argument("--" + name.replace("_", "-"), **kwargs)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tiesmerge",
        description="Merge models fine-tuned from one base (TIES-Merging and baselines), streamed tensor by tensor.",
        epilog="run 'tiesmerge COMMAND --help' for a command's options and examples",
    )
    parser.add_argument("--version", action="version", version=f"tiesmerge {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    m = sub.add_parser("merge", help="merge fine-tuned models into one", epilog=MERGE_EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    m.add_argument("recipe", nargs="?", help="a YAML recipe (flags given too override it)")
    m.add_argument("--base", help="the model the others were fine-tuned from (HF directory or .safetensors)")
    m.add_argument("--model", action="append", dest="models", metavar="PATH", help="a fine-tuned model; repeat")
    m.add_argument("--stats", action="append", metavar="DIR",
                   help="fisher, regmean: a model's statistics directory (tiesmerge stats); one per --model, in order")
    m.add_argument("--method", help=f"one of {', '.join(METHODS)} (default ties)")
    m.add_argument("-o", "--output", help="output directory (an HF model directory)")
    m.add_argument("--dtype", choices=sorted(DTYPES), help="output dtype (default: the base's)")
    m.add_argument("--shard-size", help=f"largest output shard, e.g. 2GB (default {DEFAULT_SHARD_SIZE})")
    m.add_argument("--memory-budget", help=f"working memory for tensor chunks, e.g. 512MiB (default {DEFAULT_MEMORY_BUDGET})")
    m.add_argument("--device", help="cpu or cuda (default cpu)")
    m.add_argument("--vocab-policy", choices=VOCAB_POLICIES, help="on embedding rows that differ (default error)")
    m.add_argument("--allow-pickle", action="store_true", help="read .bin/.pt files (with weights_only=True)")
    m.add_argument("--force", action="store_true", help="replace a non-empty output directory")
    m.add_argument("--dry-run", action="store_true", help="print the plan (tensors, bytes, peak memory) and stop")
    m.add_argument("--no-progress", action="store_true", help="no progress bar")
    m.add_argument("--output-format", choices=OUTPUT_FORMATS,
                   help="model (default): a full HF model; adapter: a merged PEFT adapter (adapters in)")
    m.add_argument("--rank", type=int, help="--output-format adapter with LoRA: rank of the SVD re-factoring "
                                            "(default: the largest input rank)")
    _method_flags(m)

    a = sub.add_parser("analyze", help="measure interference (sign conflicts, redundancy) between fine-tuned models",
                       epilog=ANALYZE_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    a.add_argument("--base", required=True, help="the model the others were fine-tuned from")
    a.add_argument("--model", action="append", dest="models", required=True, metavar="PATH",
                   help="a fine-tuned model; repeat (2 to 12)")
    a.add_argument("-o", "--output", required=True, help="report directory: analysis.json, PNGs, report.html")
    a.add_argument("--density", type=float, default=0.2,
                   help="top-k fraction of each task vector that counts as kept (default 0.2, the paper's k)")
    a.add_argument("--subsets-per-size", type=int, default=10, metavar="N",
                   help="sign conflicts: seeded sample of N subsets per number of models; 0 = every subset (default 10)")
    a.add_argument("--seed", type=int, default=0, help="seed of the subset sample (default 0)")
    a.add_argument("--memory-budget", help=f"working memory for tensor chunks, e.g. 512MiB (default {DEFAULT_MEMORY_BUDGET})")
    a.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    a.add_argument("--vocab-policy", default="error", choices=VOCAB_POLICIES, help="on embedding rows that differ")
    a.add_argument("--allow-pickle", action="store_true", help="read .bin/.pt files (with weights_only=True)")
    a.add_argument("--force", action="store_true", help="replace a non-empty report directory")
    a.add_argument("--no-progress", action="store_true", help="no progress bar")

    ms = sub.add_parser("methods", help="list the methods with their options, defaults and papers")
    ms.add_argument("name", nargs="?", help="show one method")

    v = sub.add_parser("validate", help="check a recipe and report every problem at once",
                       epilog="example:\n  tiesmerge validate recipe.yaml", formatter_class=argparse.RawDescriptionHelpFormatter)
    v.add_argument("recipe")

    t = sub.add_parser("tune", help="search a method's (density, lam) grid on validation data",
                       epilog=TUNE_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("--base", required=True, help="the base model")
    t.add_argument("--model", action="append", dest="models", required=True, metavar="PATH", help="a fine-tuned model; repeat")
    t.add_argument("--method", default="ties", help="a method whose options declare a paper grid (tiesmerge methods "
                                                    "shows it), or any method with --grid axes (default ties)")
    t.add_argument("--evaluator", required=True, metavar="MODULE:FUNCTION",
                   help="a function taking a state dict and returning a validation score (higher is better)")
    t.add_argument("--grid", action="append", default=[], metavar="NAME=VALUES",
                   help="override one axis: density=0.1,0.2,0.3 or lam=0.8:3.0:0.1 (start:stop:step); "
                        "default: the paper's grid")
    t.add_argument("--device", default="cpu")
    t.add_argument("--memory-budget", default=None)
    t.add_argument("-o", "--output", help="write the best merge here as an HF directory")
    t.add_argument("--json", type=Path, help="write every grid point's score here")
    t.add_argument("--force", action="store_true", help="replace a non-empty output directory")

    st = sub.add_parser("stats", help="compute a model's Fisher or Gram statistics from data (for fisher, regmean)",
                        epilog=STATS_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    st.add_argument("kind", choices=("fisher", "gram"), help="fisher: diagonal Fisher; gram: Linear inputs' X^T X / N")
    st.add_argument("--model", required=True, help="a Hugging Face model directory (the fine-tuned model)")
    st.add_argument("--data", required=True, help="a JSON-lines file: {\"text\": ..., \"label\": ...} per line")
    st.add_argument("-o", "--output", required=True, help="the statistics directory to write")
    st.add_argument("--fisher", default="exact", choices=("exact", "empirical", "batched"),
                    help="exact: E over y ~ p(y|x) summed over classes (default); empirical: true labels; "
                         "batched: square of each batch's summed gradient (both approximations)")
    st.add_argument("--per-example", default="loop", choices=("loop", "vmap"),
                    help="per-example gradients by a loop (any model) or torch.func.vmap (faster where it works)")
    st.add_argument("--limit", type=int, help="use the first N examples (default all)")
    st.add_argument("--batch-size", type=int, default=8)
    st.add_argument("--max-length", type=int, default=128, help="tokens per example (longer ones are truncated)")
    st.add_argument("--device", default="cpu")
    st.add_argument("--force", action="store_true", help="replace a non-empty output directory")

    d = sub.add_parser("demo", help="fine-tune MiniLM on 3 real tasks, merge, print a table (or --synthetic)",
                       epilog="examples:\n  tiesmerge demo\n  tiesmerge demo --synthetic --params 50",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    d.add_argument("--workdir", help="where to write the demo models (default: a temporary directory)")
    d.add_argument("--synthetic", action="store_true",
                   help="no downloads: synthetic Llama-shaped fine-tunes with known sparse skills")
    d.add_argument("--params", type=float, default=50.0, help="--synthetic: model size, millions of parameters")
    return parser


def _load_callable(spec: str):
    import importlib

    module, _, name = spec.partition(":")
    if not module or not name:
        raise ConfigError(f"--evaluator {spec!r}: expected MODULE:FUNCTION", hint="e.g. --evaluator my_eval:score")
    if str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))  # so a module in the current directory can be named
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"--evaluator {spec!r}: cannot load it ({exc})") from None


def _cmd_tune(args: argparse.Namespace) -> int:
    from ..api import merge
    from ..tuning import parse_grid, tune

    grid = parse_grid(args.method, args.grid)  # unknown methods and options fail before anything is read
    evaluate = _load_callable(args.evaluator)

    def show(point) -> None:
        options = " ".join(f"{k}={v}" for k, v in point.options.items())
        print(f"  {options} lam={point.lam:.2f}  score {point.score:.4f}", flush=True)

    result = tune(args.base, args.models, args.method, evaluate, grid=grid, device=args.device,
                  memory_budget=args.memory_budget, on_point=show)
    best = result.best
    print(f"best: {' '.join(f'{k}={v}' for k, v in best.options.items())} lam={best.lam} score {best.score:.4f} "
          f"({len(result.points)} points, {result.merges} merges, {result.seconds:.1f} s)")
    if args.json:
        args.json.write_text(json.dumps({"method": args.method, "best": {**best.options, "lam": best.lam,
                                                                           "score": best.score},
                                         "points": [{**p.options, "lam": p.lam, "score": p.score}
                                                    for p in result.points]}, indent=2) + "\n")
    if args.output:
        merge(args.base, args.models, args.method, output=args.output, device=args.device,
              memory_budget=args.memory_budget, force=args.force, **best.options, lam=best.lam)
        print(f"wrote the best merge to {args.output}")
    return 0


def _recipe_data(args: argparse.Namespace) -> dict[str, Any]:
    """The recipe as a dict: the YAML file, if any, with command-line flags on top."""
    data: dict[str, Any] = {}
    if args.recipe:  # paths in the file are resolved against its folder here; mergekit's are translated
        data = read_recipe_data(args.recipe)
        for warning in (data.get("origin") or {}).get("warnings", []):
            print(f"warning: {warning}", file=sys.stderr)
    if args.base:
        data["base"] = args.base
    if args.models:
        data["models"] = args.models
    if args.stats:
        data["stats"] = args.stats
    if args.method:
        if data.get("method") not in (None, args.method):
            data["parameters"] = {}  # the recipe's options belong to its own method
        data["method"] = args.method
    data.setdefault("method", "ties")
    for key in ("dtype", "shard_size", "memory_budget", "device", "vocab_policy", "output_format", "rank"):
        if getattr(args, key) is not None:
            data[key] = getattr(args, key)
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
        data["parameters"] = {**recipe_params, **given}
    missing = [flag for flag, key in (("--base", "base"), ("--model", "models")) if not data.get(key)]
    if missing:
        raise ConfigError(f"missing {' and '.join(missing)} (or a recipe file)",
                          hint="tiesmerge merge --base BASE --model FT1 --model FT2 -o OUT")
    return data


def _cmd_merge(args: argparse.Namespace) -> int:
    from ..api import describe_plan, merge, plan_merge  # the engine: imported by the commands that merge

    data = _recipe_data(args)
    recipe = recipe_from_dict(data, source=args.recipe or "command line")
    common = dict(device=recipe.device, memory_budget=recipe.memory_budget, dtype=recipe.dtype,
                  vocab_policy=recipe.vocab_policy, allow_pickle=args.allow_pickle or recipe.allow_pickle)
    if args.dry_run:
        plan = plan_merge(recipe.base, list(recipe.models), recipe.method, output_format=recipe.output_format,
                          stats=recipe.stats, **common)
        print(describe_plan(plan, recipe.method, len(recipe.models)))
        if args.output:
            print(f"output           {args.output} (not written: dry run)")
        return 0
    if not args.output:
        raise ConfigError("missing -o/--output", hint="tiesmerge merge ... -o ./merged (or --dry-run to only plan)")
    started = time.perf_counter()
    out = merge(recipe.base, list(recipe.models), recipe.method, output=args.output, shard_size=recipe.shard_size,
                force=args.force, progress=not args.no_progress and sys.stderr.isatty(),
                output_format=recipe.output_format, rank=recipe.rank, origin=recipe.origin, stats=recipe.stats,
                **common)
    seconds = time.perf_counter() - started
    manifest = json.loads((Path(out) / "tiesmerge.json").read_text())
    read = manifest["engine"]["bytes_read"]
    t = manifest["tensors"]
    print(f"merged {len(recipe.models)} models with {recipe.method.name} into {out}")
    if recipe.origin:
        print(f"  semantics: {recipe.origin.get('semantics')}")
    adapter = manifest.get("adapters", {})
    if "max_relative_reconstruction_error" in adapter:
        print(f"  LoRA adapter at rank {adapter['rank']}: relative reconstruction error at most "
              f"{adapter['max_relative_reconstruction_error']:.3g} (per module in tiesmerge.json)")
    print(f"  {t['merged']} tensors merged, {t['copied']} copied, {t['tied_aliases']} tied; "
          f"{format_size(read)} read in {seconds:.1f} s ({read / max(seconds, 1e-9) / 1e9:.2f} GB/s)")
    seconds = manifest["seconds"]
    print("  phases: " + ", ".join(f"{k} {v:.2f} s" for k, v in seconds.items() if not k.startswith("profile.")))
    profile = {k.removeprefix("profile."): v for k, v in seconds.items() if k.startswith("profile.")}
    if profile:  # where the merge thread spent its time (the reader and writer threads overlap it)
        print("  profile: " + ", ".join(f"{k} {v:.2f} s" for k, v in profile.items()))
    return 0


def _cmd_stats(args: argparse.Namespace) -> int:
    from ..stats import save_stats
    from ..stats.hf import hf_statistics

    for flag, value in (("--limit", args.limit), ("--batch-size", args.batch_size), ("--max-length", args.max_length)):
        if value is not None and value < 1:
            raise ConfigError(f"{flag} must be a positive number, got {value}")
    started = time.perf_counter()
    stats = hf_statistics(args.kind, args.model, args.data, fisher=args.fisher, per_example=args.per_example,
                          batch_size=args.batch_size, limit=args.limit, max_length=args.max_length, device=args.device,
                          progress=sys.stderr.isatty())
    out = save_stats(args.output, stats, force=args.force)
    size = sum(t.numel() * 4 for t in stats.tensors.values())
    print(f"wrote {args.kind} statistics of {args.model} ({stats.manifest.examples} examples, {len(stats.tensors)} "
          f"tensors, {format_size(size)}) to {out} in {time.perf_counter() - started:.1f} s")
    return 0


def _cmd_analyze(args: argparse.Namespace) -> int:
    from ..api import analyze

    if args.subsets_per_size < 0:
        raise ConfigError(f"--subsets-per-size must be 0 (every subset) or more, got {args.subsets_per_size}")
    data = analyze(args.base, args.models, output=args.output, density=args.density,
                   subsets_per_size=args.subsets_per_size or None, seed=args.seed, device=args.device,
                   memory_budget=args.memory_budget, vocab_policy=args.vocab_policy, allow_pickle=args.allow_pickle,
                   force=args.force, progress=not args.no_progress and sys.stderr.isatty())
    for line in data["summary"]:
        print(f"- {line}")
    engine = data["engine"]
    print(f"wrote {Path(args.output) / 'report.html'} (and analysis.json, PNGs): {format_size(engine['bytes_read'])} "
          f"read in {data['seconds']['total']:.1f} s")
    return 0


def _cmd_methods(args: argparse.Namespace) -> int:
    classes = [method_class(args.name)] if args.name else list(METHODS.values())
    for cls in classes:
        print(f"{cls.name}  —  {cls.summary}")
        print(f"  paper: {cls.paper}")
        types = option_types(cls)
        for f in dataclasses.fields(cls):
            meta = f.metadata
            default = "—" if f.default is None else f.default
            kind = {float: "number", int: "integer", str: "text", bool: "true|false", ModelPath: "path",
                    tuple: "list, one per model"}[types[f.name]]
            extra = f" one of {'|'.join(meta['choices'])}" if meta.get("choices") else f" ({kind})"
            unit = f" [{meta['unit']}]" if meta.get("unit") else ""
            grid = meta.get("grid")
            searched = f"; tune searches {_axis(grid)}" if grid else ""
            print(f"  --{f.name.replace('_', '-'):<15} default {default!s:<8} {meta.get('help', '')}{unit}{extra}{searched}")
        print()
    return 0


def _axis(values: tuple) -> str:
    """A grid axis in few characters: 0.8..3.0 step 0.1, or the values themselves."""
    if len(values) > 4:
        step = round(values[1] - values[0], 6)
        return f"{values[0]}..{values[-1]} step {step}"
    return ", ".join(str(v) for v in values)


def _cmd_validate(args: argparse.Namespace) -> int:
    recipe = load_recipe(args.recipe)
    print(f"{args.recipe}: ok — {recipe.method.name} of {len(recipe.models)} models onto {recipe.base}")
    if recipe.origin:
        print(f"  read as a {recipe.origin.get('format')} recipe: {recipe.origin.get('semantics')}")
        for warning in recipe.origin.get("warnings", []):
            print(f"  warning: {warning}")
    for key, value in recipe.to_dict()["parameters"].items():
        print(f"  {key} = {value}")
    missing = [p for p in (recipe.base, *recipe.models) if not Path(p).exists()]
    for p in missing:
        print(f"  warning: {p} does not exist (yet)")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    if args.synthetic:
        from .demo import run_demo

        return run_demo(workdir=args.workdir, million_params=args.params)
    from .demo_text import run_text_demo

    return run_text_demo(workdir=args.workdir)


def main(argv: list[str] | None = None) -> int:
    debug = "--debug" in (sys.argv[1:] if argv is None else argv)
    try:
        parser = _parser()  # reads the method table: a broken plugin is an error, not a traceback
    except TiesMergeError as exc:
        return _report(exc, debug)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    handler = {"merge": _cmd_merge, "analyze": _cmd_analyze, "methods": _cmd_methods, "validate": _cmd_validate,
               "tune": _cmd_tune, "stats": _cmd_stats, "demo": _cmd_demo}
    try:
        return handler[args.command](args)
    except TiesMergeError as exc:
        return _report(exc, args.debug)
    except BrokenPipeError:  # e.g. `tiesmerge methods | head`
        return 0
    except KeyboardInterrupt:
        if args.debug:
            traceback.print_exc()
        print("error: interrupted; no output directory was left behind", file=sys.stderr)
        return 130


def _report(exc: TiesMergeError, debug: bool) -> int:
    """``error: ...`` and ``hint: ...`` on stderr; the exit status of the error's kind."""
    if debug:
        traceback.print_exc()
    print(f"error: {exc.message}", file=sys.stderr)
    if exc.hint:
        print(f"hint: {exc.hint}", file=sys.stderr)
    return exc.exit_code


def entry() -> NoReturn:  # pragma: no cover - exercised by the installed `tiesmerge` script
    """The console script: run, flush, and leave without the interpreter's teardown.

    Tearing down torch and numba's thread pool took 0.55 s at exit on a 2-core machine (measured:
    benchmarks/speed/NOTES.md), more than the arithmetic of a small merge. By the time ``main``
    returns, every output is closed and renamed into place and every thread pool has finished.
    """
    code = main()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (BrokenPipeError, ValueError):  # a closed pipe: nothing more can reach it anyway
            pass
    os._exit(code)


if __name__ == "__main__":  # pragma: no cover
    entry()
