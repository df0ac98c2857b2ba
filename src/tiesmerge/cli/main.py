"""`tiesmerge`: one command, subcommands merge, analyze, methods, validate, tune, stats, adapt, demo.

The CLI only calls the public API; every option of a method is a flag generated from the
method's dataclass fields, so the flags, the recipe keys and the Python API never drift apart.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import re
import signal
import sys
import threading
import traceback
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

from .. import stops
from ..errors import (
    ConfigError,
    InternalError,
    MergeWarning,
    OutOfMemoryError,
    TiesMergeError,
    is_library_load,
    is_out_of_memory,
    kernel_cache_error,
    library_out_of_memory,
    memory_hint,
)
from ..io import leases
from ..io.align import VOCAB_POLICIES
from ..io.card import digest_cache_kept_out_of
from ..methods.base import ModelPath, option_types
from ..recipe import DTYPES
from ..registry import METHODS
from ..scratch import private_folder_for, remove_private_folders
from ..sizes import DEFAULT_MEMORY_BUDGET, DEFAULT_SHARD_SIZE, OUTPUT_FORMATS
from ..version import __version__
from .adapt import add_adapt_parser
from .commands import HANDLERS
from .examples import ANALYZE_EXAMPLES, MERGE_EXAMPLES, SEARCH_EXAMPLES, STATS_EXAMPLES, TUNE_EXAMPLES
from .numbers import float_flag as _float
from .numbers import int_flag as _int
from .terminal import COMPLETED, SafeStream, abridged, shown, terminal_safe

EVALUATOR_HELP = ("a function taking a state dict and returning a validation score (higher is better), or a "
                  "built-in: classifier-accuracy:FILE, choice-accuracy:FILE, encoder-accuracy:FILE, "
                  "lm-perplexity:FILE (tiesmerge tune --help describes them)")


def _number(text: str) -> int | float | bool | str:
    """A flag value for an option whose type differs between methods: an int if it reads as one,
    else a float, true/false as a bool, else the word; the chosen method's own checks then say
    whether it fits (a clearer message than argparse's "invalid value")."""
    for convert in (_int, _float):
        try:
            return convert(text)
        except argparse.ArgumentTypeError:
            raise
        except ValueError:
            pass
    lowered = text.strip().lower()
    if lowered in ("true", "yes", "on"):
        return True
    if lowered in ("false", "no", "off"):
        return False
    return text



_FLAG_TYPES: dict[Any, dict[str, Any]] = {
    float: {"type": _float, "metavar": "X"},
    int: {"type": _int, "metavar": "N"},
    str: {"type": str, "metavar": "TEXT"},
    ModelPath: {"type": str, "metavar": "DIR"},
    tuple: {"type": _float, "nargs": "+", "metavar": "W"},
    bool: {"action": argparse.BooleanOptionalAction},
}


def _method_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per method option (the union over the methods), typed by its annotation: an int
    option gets an int flag, a path a DIR, a per-model tuple one value per model."""
    group = parser.add_argument_group("method options (tiesmerge methods lists which method takes which)")
    kinds: dict[str, Any] = {}
    first: dict[str, dataclasses.Field] = {}
    choices: dict[str, tuple[str, ...]] = {}  # a text option's choices, over every method that has it
    for cls in METHODS.values():
        types = option_types(cls)
        for f in dataclasses.fields(cls):
            if f.name in kinds and kinds[f.name] != types[f.name]:
                kinds[f.name] = "mixed"
            else:
                kinds.setdefault(f.name, types[f.name])
                first.setdefault(f.name, f)
            known = choices.setdefault(f.name, ())
            choices[f.name] = known + tuple(c for c in f.metadata.get("choices", ()) if c not in known)
    for name, f in first.items():
        meta = f.metadata
        kwargs: dict[str, Any] = {"dest": f"opt_{name}", "default": argparse.SUPPRESS,
                                  "help": meta.get("help", "") + (f" [{meta['unit']}]" if meta.get("unit") else "")}
        if meta.get("choices") and kinds[name] is str:
            kwargs["choices"] = choices[name]  # each method checks its own
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
    m.add_argument("--base", help="the model the others were fine-tuned from: an HF directory, a .safetensors file, "
                                  "or org/name[@revision] from the local Hugging Face cache (never downloaded; a "
                                  "local path of the same name wins)")
    m.add_argument("--model", action="append", dest="models", metavar="PATH",
                   help="a fine-tuned model (a path or org/name[@revision], like --base); repeat")
    m.add_argument("--stats", action="append", metavar="DIR",
                   help="fisher, regmean: a model's statistics directory (tiesmerge stats); one per --model, in order")
    m.add_argument("--method", help=f"one of {', '.join(METHODS)} (default ties)")
    m.add_argument("-o", "--output", help="output directory (an HF model directory)")
    m.add_argument("--dtype", choices=sorted(DTYPES),
                   help="dtype of every floating tensor written, merged or copied from the base; integer "
                        "buffers keep theirs (default: the base's; a merged adapter's: float32)")
    m.add_argument("--shard-size", help=f"largest output shard, e.g. 2GB (default {DEFAULT_SHARD_SIZE})")
    m.add_argument("--memory-budget",
                   help=f"working memory for tensor chunks, e.g. 512MiB (default {DEFAULT_MEMORY_BUDGET})")
    m.add_argument("--device", help="cpu or cuda (default cpu)")
    m.add_argument("--vocab-policy", choices=VOCAB_POLICIES,
                   help="on vocabularies that differ (default error); truncate: the base's rows; union: a tokenizer "
                        "holding every model's added tokens, their rows the mean of the models that have them")
    m.add_argument("--allow-distant", action="store_true",
                   help="merge models that do not look fine-tuned from the base (default: an error, see --dry-run)")
    m.add_argument("--allow-pickle", action="store_true", help="read .bin/.pt files (with weights_only=True)")
    m.add_argument("--force", action="store_true",
                   help="replace an output directory tiesmerge wrote before (never an input)")
    m.add_argument("--dry-run", action="store_true", help="print the plan (tensors, bytes, peak memory) and stop")
    m.add_argument("--no-progress", action="store_true", help="no progress bar")
    m.add_argument("--output-format", choices=OUTPUT_FORMATS,
                   help="model (default): a full HF model; adapter: a merged PEFT adapter (adapters in)")
    m.add_argument("--rank", type=_int, help="--output-format adapter with LoRA: rank of the SVD re-factoring "
                                            "(default: the largest input rank)")
    _method_flags(m)

    a = sub.add_parser("analyze", help="measure interference (sign conflicts, redundancy) between fine-tuned models",
                       epilog=ANALYZE_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    a.add_argument("--base", required=True, help="the model the others were fine-tuned from")
    a.add_argument("--model", action="append", dest="models", required=True, metavar="PATH",
                   help="a fine-tuned model; repeat (2 to 12)")
    a.add_argument("-o", "--output", required=True, help="report directory: analysis.json, PNGs, report.html")
    a.add_argument("--density", type=_float, default=0.2,
                   help="top-k fraction of each task vector that counts as kept (default 0.2, the paper's k)")
    a.add_argument("--subsets-per-size", type=_int, default=10, metavar="N",
                   help="sign conflicts: seeded sample of N subsets per number of models; "
                        "0 = every subset (default 10)")
    a.add_argument("--seed", type=_int, default=0, help="seed of the subset sample (default 0)")
    a.add_argument("--memory-budget",
                   help=f"working memory for tensor chunks, e.g. 512MiB (default {DEFAULT_MEMORY_BUDGET})")
    a.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    a.add_argument("--vocab-policy", default="error", choices=("error", "truncate"),
                   help="on embedding rows that differ: error, or truncate to compare the base's rows (union is a "
                        "merge policy: analyze compares rows as stored)")
    a.add_argument("--allow-pickle", action="store_true", help="read .bin/.pt files (with weights_only=True)")
    a.add_argument("--force", action="store_true",
                   help="replace a report directory tiesmerge wrote before (never an input)")
    a.add_argument("--no-progress", action="store_true", help="no progress bar")
    a.add_argument("--method", action="append", dest="methods", default=[], metavar="NAME[:KEY=VALUE,...]",
                   help="also merge with this method (e.g. slerp:t=0.3 or breadcrumbs:density=0.3,gamma=0.02) and "
                        "add its merged magnitudes to the magnitude section; repeat. A value holding commas goes in "
                        "[...] (a list) or double quotes: 'slerp:t_by_name=\"self_attn=0,1;*=0.5\",layers=2'")

    ms = sub.add_parser("methods", help="list the methods with their options, defaults and papers")
    ms.add_argument("name", nargs="?", help="show one method")

    v = sub.add_parser("validate", help="check a recipe and report every problem at once",
                       epilog="example:\n  tiesmerge validate recipe.yaml",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    v.add_argument("recipe")
    v.add_argument("--allow-pickle", action="store_true", help="read .bin/.pt files (with weights_only=True); a "
                   "recipe's own allow_pickle: true counts only with this flag")

    t = sub.add_parser("tune", help="search a method's (density, lam) grid on validation data",
                       epilog=TUNE_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("--base", required=True, help="the base model")
    t.add_argument("--model", action="append", dest="models", required=True, metavar="PATH",
                   help="a fine-tuned model; repeat")
    t.add_argument("--method", default="ties", help="a method whose options declare a paper grid (tiesmerge methods "
                                                    "shows it), or any method with --grid axes (default ties)")
    t.add_argument("--evaluator", required=True, metavar="MODULE:FUNCTION|NAME:FILE",
                   help=EVALUATOR_HELP)
    t.add_argument("--grid", action="append", default=[], metavar="NAME=VALUES",
                   help="override one axis: density=0.1,0.2,0.3 or lam=0.8:3.0:0.1 (start:stop:step); "
                        "default: the paper's grid")
    t.add_argument("--device", default="cpu")
    t.add_argument("--memory-budget", default=None)
    _tuning_input_flags(t)
    t.add_argument("-o", "--output", help="write the best merge here as an HF directory")
    t.add_argument("--json", metavar="FILE", help="write every grid point's score here")
    t.add_argument("--force", action="store_true",
                   help="replace an output directory tiesmerge wrote before (never an input)")

    _search_parser(sub)

    st = sub.add_parser("stats", help="compute a model's Fisher or Gram statistics from data (for fisher, regmean)",
                        epilog=STATS_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    st.add_argument("kind", choices=("fisher", "gram"), help="fisher: diagonal Fisher; gram: Linear inputs' X^T X / N")
    st.add_argument("--model", required=True, help="a Hugging Face model directory (the fine-tuned model)")
    st.add_argument("--data", required=True, help="a JSON-lines file: {\"text\": ..., \"label\": ...} per line")
    st.add_argument("-o", "--output", required=True, help="the statistics directory to write")
    st.add_argument("--fisher", choices=("exact", "empirical", "batched"),  # default exact (None: not given)
                    help="exact: E over y ~ p(y|x) summed over classes (default); empirical: true labels; "
                         "batched: square of each batch's summed gradient (both approximations)")
    st.add_argument("--per-example", choices=("loop", "vmap"),
                    help="per-example gradients by a loop (any model, the default) or torch.func.vmap (faster where it "
                         "works)")
    st.add_argument("--limit", type=_int, help="use the first N examples (default all)")
    st.add_argument("--batch-size", type=_int, default=8)
    st.add_argument("--max-length", type=_int, default=128, help="tokens per example (longer ones are truncated)")
    st.add_argument("--device", default="cpu")
    st.add_argument("--force", action="store_true",
                    help="replace an output directory tiesmerge wrote before (never an input)")
    st.add_argument("--no-progress", action="store_true", help="no progress bar")  # as merge's (hp76a c20)

    add_adapt_parser(sub, _method_flags)

    d = sub.add_parser("demo", help="fine-tune MiniLM on 3 real tasks, merge, print a table (or --synthetic)",
                       epilog="examples:\n  tiesmerge demo\n  tiesmerge demo --synthetic --params 50",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    d.add_argument("--workdir", help="where to write the demo models (default: a temporary directory)")
    d.add_argument("--synthetic", action="store_true",
                   help="no downloads: synthetic Llama-shaped fine-tunes with known sparse skills")
    d.add_argument("--params", type=_float, default=None, help="--synthetic: model size, millions of parameters "
                   "(default 50)")
    for p in (parser, *sub.choices.values()):
        # argparse takes "-1e-1" for an option (it knows only -3 and -0.5 as negative numbers): "--lam -1e-1"
        # failed with "expected one argument"; no option of tiesmerge's looks like a number, so none is shadowed
        p._negative_number_matcher = _NEGATIVE_NUMBER
    return parser



_NEGATIVE_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-(inf|infinity|nan)$", re.IGNORECASE)

def _search_parser(sub) -> None:
    s = sub.add_parser("search", help="search per-model weights, densities and lam (grid, random, CMA-ES), on Ray too",
                       epilog=SEARCH_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("--base", required=True, help="the base model")
    s.add_argument("--model", action="append", dest="models", required=True, metavar="PATH",
                   help="a fine-tuned model; repeat")
    s.add_argument("--method", default="ties", help="the method whose options are searched (default ties)")
    s.add_argument("--evaluator", required=True, metavar="MODULE:FUNCTION|NAME:FILE",
                   help=EVALUATOR_HELP)
    s.add_argument("--strategy", default="grid", choices=("grid", "random", "cmaes"), help="default grid")
    s.add_argument("--budget", type=_int, help="candidates to score (random, cmaes; grid: the first N points)")
    s.add_argument("--seed", type=_int, default=0, help="seed of the random and CMA-ES proposals (default 0)")
    s.add_argument("--axis", action="append", dest="axes", metavar="OPTION",
                   help="an option to search, e.g. densities, weights (per model), density, lam; repeat "
                        "(default: the grid's axes)")
    s.add_argument("--grid", action="append", default=[], metavar="NAME=VALUES",
                   help="an axis' grid values: density=0.1,0.2 or lam=0.8:3.0:0.1 (default: the paper's)")
    s.add_argument("--range", action="append", dest="ranges", default=[], metavar="NAME=LO:HI",
                   help="an axis' range for random and CMA-ES (default: its grid's, or [0.05, 1] for a fraction, "
                        "[0.1, 1] for per-model weights)")
    s.add_argument("--set", action="append", dest="fixed", default=[], metavar="NAME=VALUE",
                   help="hold an option, e.g. --set scope=per_tensor")
    s.add_argument("--popsize", type=_int, help="CMA-ES generation size (default 4 + 3 ln d)")
    s.add_argument("--ray", nargs="?", const="", metavar="ADDRESS",
                   help="run on Ray: join the cluster at ADDRESS, or without one start a local cluster")
    s.add_argument("--workers", type=_int,
                   help="--ray without ADDRESS: candidates scored at once on the local cluster, each with CPUs / "
                        "workers threads (default: one per CPU)")
    s.add_argument("--dir", default="tiesmerge-search", type=Path,
                   help="log.jsonl (resumable), results.md and report.html go here (default ./tiesmerge-search)")
    s.add_argument("--device", default="cpu")
    _tuning_input_flags(s)
    s.add_argument("--memory-budget", default=None)
    s.add_argument("-o", "--output", help="write the best merge here as an HF directory")
    s.add_argument("--force", action="store_true",
                   help="replace an output directory tiesmerge wrote before (never an input)")


def _tuning_input_flags(p: argparse.ArgumentParser) -> None:
    """What tune and search take of merge's input flags (their merges and the best one written alike)."""
    p.add_argument("--vocab-policy", default="error", choices=("error", "truncate"),
                   help="on vocabularies that differ (default error); truncate: the base's rows (a union is merge's "
                        "alone: tuning scales candidates on the base's tensors)")
    p.add_argument("--allow-distant", action="store_true",
                   help="tune models that do not look fine-tuned from the base (default: an error, see merge "
                        "--dry-run)")


def _resolve_repo_ids(args: argparse.Namespace) -> None:
    """Every model a command takes (``--base``, ``--model``, a method's model option such as
    ``--sign-from``) may be named ``org/name[@revision]`` and is read from the local Hugging Face
    cache, in every command alike (tiesmerge.hub; a local path of that name wins)."""
    from ..hub import resolve_source

    paths = {f"opt_{f.name}" for cls in METHODS.values() for f in dataclasses.fields(cls)
             if option_types(cls)[f.name] is ModelPath}
    for attr in ("base", "model", *paths):
        value = getattr(args, attr, None)
        if isinstance(value, str):
            setattr(args, attr, resolve_source(value))
    if isinstance(getattr(args, "models", None), list):
        args.models = [resolve_source(m) if isinstance(m, str) else m for m in args.models]


def _command_paths(args: argparse.Namespace) -> list[str]:
    """The folders a command reads or writes that its command line names (outputs, --dir, the models, statistics):
    the digest cache is never written into one of them (hp40 D16: a TIESMERGE_CACHE_DIR pointed at search's --dir
    wrote digests.json beside its log). Files' folders are not among them: a data file in $HOME would keep the cache
    (~/.cache/tiesmerge) from ever being written."""
    paths: list[str] = []
    for name in ("output", "dir", "base", "model", "models", "stats"):
        value = getattr(args, name, None)
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, (str, os.PathLike)) and os.fspath(item):
                paths.append(os.fspath(item))
    return paths


def _private_torch_cache() -> None:
    """torch creates ``$TMPDIR/torchinductor_<user>`` when torch._dynamo is first imported (the
    Fisher statistics' and adapt's autograd reach it), though tiesmerge compiles nothing. Unless the
    user chose a folder, give it a private one that is removed at exit, so a run leaves nothing
    outside its output (README, Safety)."""
    private_folder_for("TORCHINDUCTOR_CACHE_DIR", "tiesmerge-torch-", create=False)  # torch makes it when needed


_EMPTY_MEANS_NONE = frozenset({"--exclude"})


def _empty_values(argv: list[str], multi: frozenset[str] = frozenset(), positional: str | None = None) -> list[str]:
    """The options (and positional arguments) given an empty string: `--stats ''` was taken for the working folder
    ("the output lies inside the statistics (.)") and `-o ''` for nothing at all. ``multi``: the command's options
    that take several values, whose empty one is named by its place (hp41 C58: `--task-names '' y` was "--task-names
    is empty", though one of its two names is). ``positional``: the name of the command's one positional argument,
    said for an empty one (hp85a c18: "argument 2 is empty" of `merge ''`)."""
    empty = []
    for k, arg in enumerate(argv):
        if arg != "":
            continue
        flag = next((j for j in range(k - 1, -1, -1) if argv[j].startswith("-") and len(argv[j]) > 1
                     and not argv[j][1].isdigit() and argv[j][1] != "."), None)  # not a value like -0.5
        if flag is not None and argv[flag] in multi:
            count = next((j for j in range(flag + 1, len(argv)) if argv[j].startswith("-") and len(argv[j]) > 1
                          and not argv[j][1].isdigit() and argv[j][1] != "."), len(argv)) - flag - 1
            empty.append(argv[flag] if count == 1 else f"{argv[flag]}: value {k - flag} of {count}")
            continue
        before = argv[k - 1] if k else ""
        empty.append(before if before.startswith("-") else
                     f"the {positional} argument" if positional and k else f"argument {k + 1}")
    for arg in argv:
        if arg.startswith("--") and arg.endswith("=") and "=" not in arg[:-1]:  # --stats=
            empty.append(arg[:-1])
    return empty


def _positional_name(parser: argparse.ArgumentParser, command: str | None) -> str | None:
    """The metavar (or name) of ``command``'s positional argument, where it has exactly one."""
    commands = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
    sub = commands.choices.get(command) if commands is not None and command else None
    found = [a for a in sub._actions if not a.option_strings] if sub is not None else []
    return (found[0].metavar or found[0].dest).upper() if len(found) == 1 and isinstance(found[0].dest, str) \
        else None


def _multi_value_options(parser: argparse.ArgumentParser, command: str | None) -> frozenset[str]:
    """The option strings of ``command`` that take several values (nargs "+", "*" or a count above 1)."""
    commands = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
    sub = commands.choices.get(command) if commands is not None and command else None
    if sub is None:
        return frozenset()
    return frozenset(o for a in sub._actions if a.nargs in ("+", "*") or isinstance(a.nargs, int) and a.nargs > 1
                     for o in a.option_strings)


_TRUE_WORDS, _FALSE_WORDS = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


# the plain flags (store_true) whose last word on the command line was false: a recipe's own true is then replaced
# (hp88a c67: a recipe's allow_distant: true stayed on under --allow-distant false), read by the commands
switched_off: frozenset[str] = frozenset()


def _looks_like_a_value(word: str) -> bool:
    """A word after a switch that is a value, not the recipe the command would read it as (`--force Y`,
    `--normalize-weights 2`: "no such file ... (cannot read the recipe)", hp88a c85)."""
    try:
        float(word)
        return True
    except ValueError:
        return word.lower() in ("y", "n", "t", "f", "enable", "disable", "enabled", "disabled")


def _switch_values(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """A method's boolean option is a switch on the command line (--flatten, --no-flatten) but true|false in a
    recipe: `--flatten false` read "false" as the recipe (hp84a c42: "false: no such file"), `--flatten=false` was
    argparse's "ignored explicit argument". A true/false word given to a switch, or to a prefix argparse takes for
    it (hp85a c08), is taken as meant: --flatten or --no-flatten (a file of that name in the
    working folder stays the recipe it may be); given to the negative form (--no-flatten false) it is refused, as
    its meaning cannot be told."""
    global switched_off
    switched_off = frozenset()  # (one command per call: an earlier call's in-process run does not carry over)
    commands = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
    command = next((w for w in argv if not w.startswith("-")), None)
    sub = commands.choices.get(command) if commands is not None and command else None
    if sub is None:
        return argv
    # each switch's option strings -> (its positive and negative strings, whether this one is the negative)
    switches: dict[str, tuple[tuple[str, str | None], bool]] = {
        o: ((a.option_strings[0], a.option_strings[1]), o == a.option_strings[1]) for a in sub._actions
        if isinstance(a, argparse.BooleanOptionalAction) and len(a.option_strings) == 2 for o in a.option_strings}
    # a plain flag (--force, --dry-run) given a word: true keeps it, false leaves it out (hp86a c05: "--force false"
    # read "false" as the recipe); the last word counts, as for a switch (hp88a c67: `--force --force=no` replaced)
    plain = {o: a.dest for a in sub._actions if isinstance(a, argparse._StoreTrueAction) for o in a.option_strings
             if o.startswith("--")}
    switches.update({o: ((o, None), False) for o in plain})
    every = [o for a in sub._actions for o in a.option_strings if o.startswith("--")]

    def switch(flag: str) -> str | None:  # the switch `flag` names, exactly or as argparse's unique prefix
        if flag in switches:
            return flag
        matches = [o for o in every if o.startswith(flag)] if flag.startswith("--") and len(flag) > 2 else []
        return matches[0] if len(matches) == 1 and matches[0] in switches else None

    end = argv.index("--") if "--" in argv else len(argv)
    out: list[str] = []
    last: dict[str, tuple[bool, list[str]]] = {}  # a plain flag's dest -> (its last value, the words that gave it)
    k = 0
    while k < len(argv):
        word: str | None = argv[k]
        flag, eq, value = argv[k].partition("=")
        name = switch(flag) if k < end else None
        if name is not None:
            if not eq and k + 1 < end and argv[k + 1].lower() in _TRUE_WORDS + _FALSE_WORDS \
                    and not os.path.exists(argv[k + 1]):
                value, k = argv[k + 1], k + 1
            elif not eq and k + 1 < end and _looks_like_a_value(argv[k + 1]) and not os.path.exists(argv[k + 1]):
                raise ConfigError(f"{flag} {argv[k + 1]}: {switches[name][0][0]} is a switch: it takes no value, or "
                                  "true/false (the word after it would be read as the recipe)",
                                  hint=f"write {flag}, or {flag} true / {flag} false")
            (positive, negative), is_negative = switches[name]
            if eq and value.lower() not in _TRUE_WORDS + _FALSE_WORDS:  # argparse's bare "ignored explicit
                # argument 'maybe'" after the whole usage (hp87a c86)
                raise ConfigError(f"{argv[k]}: {positive} is a switch: it takes no value, or true/false",
                                  hint=f"write {positive}" + (f" or {negative}" if negative else "")
                                       + f" (or {positive}=true / {positive}=false)")
            if value.lower() in _TRUE_WORDS + _FALSE_WORDS:
                if is_negative:
                    raise ConfigError(f"{flag} {value}: the negative form of a switch takes no value",
                                      hint=f"write {positive} (true) or {negative} (false)")
                word = negative if value.lower() in _FALSE_WORDS else positive
            if positive in plain:  # placed once at the end, with its last value
                said = f"{flag}={value}" if value else flag
                last[plain[positive]] = (word is not None, [*last.get(plain[positive], (True, []))[1], said])
                word = None
        if word is not None:
            out.append(word)
        k += 1
    switched_off = frozenset(dest for dest, (on, _) in last.items() if not on)
    flags = {dest: option for option, dest in plain.items()}  # each plain flag's long form (its last)
    for dest, (on, said) in last.items():
        if len(said) > 1 and len({w.partition("=")[2].lower() in _FALSE_WORDS for w in said}) > 1:
            print(f"warning: {' then '.join(said)} given twice: only the last value counts", file=sys.stderr)
        if on:  # placed before the options' end, where argparse reads it as the flag
            out.insert(out.index("--") if "--" in out else len(out), flags[dest])
    return out


def _warn_repeated_options(parser: argparse.ArgumentParser, command: str | None, argv: list[str]) -> None:
    """An option that takes one value given more than once: argparse keeps the last silently (hp66a c26: `--density
    0.2 --density 0.3` merged at 0.3 without a word); said, as a recipe's repeated key is. Repeatable options
    (--model, --stats, --grid) append and are not counted."""
    commands = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
    sub = commands.choices.get(command) if commands is not None and command else None
    if sub is None:
        return
    single = {o: a for a in sub._actions if isinstance(a, (argparse._StoreAction, argparse.BooleanOptionalAction))
              for o in a.option_strings}
    every = {o: a for a in sub._actions for o in a.option_strings}
    words = argv[:argv.index("--")] if "--" in argv else argv
    counts: dict[argparse.Action, list[str]] = {}
    for word in words:
        action = None
        if word.startswith("--"):  # --flag, --flag=value, or a prefix argparse takes for it (hp69a c06: --memory)
            name = word.split("=", 1)[0]
            action = every.get(name)
            if action is None:
                prefixed = {a for o, a in every.items() if o.startswith("--") and o.startswith(name)}
                action = prefixed.pop() if len(prefixed) == 1 else None
        elif word.startswith("-") and len(word) > 1 and word[1] != "-":  # -o, -oX, -o=X (hp69a c18, c19)
            action = every.get(word[:2])
        if action is not None and action in single.values():
            counts.setdefault(action, []).append(word.split("=", 1)[0] if word.startswith("--") else word[:2])
    for flags in counts.values():
        if len(flags) > 1:
            times = "twice" if len(flags) == 2 else f"{len(flags)} times"
            warnings.warn(f"{' then '.join(dict.fromkeys(flags))} given {times}: only the last value counts",
                          MergeWarning, stacklevel=2)


_WRITTEN = {"output": "-o", "json": "--json", "dir": "--dir", "checkpoint": "--checkpoint"}  # paths a command writes


def _warn_literal_tilde(args: argparse.Namespace) -> None:
    """A written path starting with "~" reached us unexpanded (quoted, or after "="): it names a folder "~" in the
    working folder, not the home folder. Said before the work, with the absolute path, so nobody looks in $HOME."""
    for field, flag in _WRITTEN.items():
        value = getattr(args, field, None)
        if isinstance(value, str) and (value == "~" or value.startswith("~/")):
            warnings.warn(f"{flag} {shown(value)} starts with '~', which the shell did not expand (it was quoted): "
                          f"it is written at {shown(os.path.abspath(value))}, under the working folder; write "
                          f"{flag} ~/... unquoted, or $HOME/..., for the home folder", MergeWarning, stacklevel=2)


def _refuse_dash(args: argparse.Namespace) -> None:
    """A written path of "-" is the usual word for standard output, which no command writes to (a merge is a folder,
    a --json file is written whole and atomically): refused rather than making a file or folder named "-" that the
    user looks for on the terminal. "./-" still names such a folder, for whoever wants one."""
    dashed = [flag for field, flag in _WRITTEN.items() if getattr(args, field, None) == "-"]
    if dashed:
        raise ConfigError([f"{flag} - would write a {'file' if flag in ('--json', '--checkpoint') else 'folder'} "
                           "named '-': tiesmerge never writes to standard output" for flag in dashed],
                          hint="give a path to write (./- for one named '-')")


@contextlib.contextmanager
def _library_bars_off() -> Iterator[None]:
    """--no-progress for the libraries' bars too (transformers' "Loading weights", the hub's): their switch is
    huggingface_hub's environment variable, read when transformers is imported, and transformers' own where it
    already is; both set back afterwards (main runs more than once in a process)."""
    before = os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS")
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    logging = sys.modules.get("transformers.utils.logging")
    was_on = bool(logging is not None and logging.is_progress_bar_enabled())
    if was_on:
        logging.disable_progress_bar()
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("HF_HUB_DISABLE_PROGRESS_BARS", None)
        else:
            os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = before
        if was_on:  # only what was on before; a library imported meanwhile keeps them off (it read the variable)
            with warnings.catch_warnings():  # huggingface_hub warns where its own switch was read as off
                warnings.simplefilter("ignore")
                logging.enable_progress_bar()


MAX_NUMBA_THREADS = 1024  # numba starts that many workers: 20,000 took 1 GB and 9 s, 100,000 crashed it


def main(argv: list[str] | None = None) -> int:
    global left_on_stop
    left_on_stop = NOTHING_LEFT  # a command that writes in place sets its own (tests run many commands in one process)
    placed = getattr(sys.modules.get("tiesmerge.io.writer"), "PLACED", None)  # (not imported for it: it reads numpy)
    if placed is not None:
        placed.clear()
    debug = "--debug" in (sys.argv[1:] if argv is None else argv)
    # a standard stream closed by the caller (`2>&-` in a cron job) is None here: write nowhere, never crash
    if sys.stdout is None:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the process
    if sys.stderr is None:
        sys.stderr = open(os.devnull, "w")  # noqa: SIM115
    for stream in (sys.stdout, sys.stderr):  # a path of undecodable bytes (\xff) is printed escaped, never a crash
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    try:
        parser = _parser()  # reads the method table (broken plugins are set aside, never a traceback)
    except TiesMergeError as exc:
        return _report(exc, debug)
    given = list(sys.argv[1:] if argv is None else argv)
    for k, word in enumerate(given):  # --debug given true/false, as the command's own flags take it (hp87a c04:
        # `--debug false` read "false" as the recipe); its "=" form too
        flag, eq, value = word.partition("=")
        if flag == "--debug" and (eq or (k + 1 < len(given) and given[k + 1].lower() in _TRUE_WORDS + _FALSE_WORDS
                                         and not os.path.exists(given[k + 1]))):
            said = value if eq else given.pop(k + 1)
            if said.lower() not in _TRUE_WORDS + _FALSE_WORDS:
                return _report(ConfigError(f"{word}: --debug is a switch: it takes no value, or true/false",
                                           hint="write --debug (or --debug=true / --debug=false)"), debug)
            given[k] = "--debug"
            if said.lower() in _FALSE_WORDS:
                given.pop(k)
            debug = "--debug" in given
            break
    if "--debug" in given[1:]:  # after the command, where the hints' "run again with --debug" gets appended
        given.remove("--debug")
        given.insert(0, "--debug")
    # `--memory-budget=--`: argparse reads the '--' as the end of the options and leaves the option [] (said as "not a
    # size: []", hp80a c27), a TypeError of '<' (hp81a c36, c37), a default silently used (c17): refused first
    # (the short form too: -o-- and -o=-- were "output is a list" and "missing -o/--output", hp83a c08, c20)
    dashed = next((g for g in given if re.fullmatch(r"--[\w-]+=--|-[A-Za-z]=?--", g)), None)
    if dashed is not None:
        flag = dashed[:-2].removesuffix("=")
        command = next((g for g in given if not g.startswith("-")), None)
        return _report(ConfigError(f"{flag}=-- gives '--', which the command line reads as the end of its options, "
                                   "not as a value", hint=f"give {flag} a value"
                                   + (", e.g. 2GiB" if flag in ("--memory-budget", "--shard-size") else
                                      f" (tiesmerge {command or ''} --help lists them)".replace("  ", " "))), debug)
    try:
        given = _switch_values(parser, given)
    except ConfigError as exc:
        return _report(exc, debug)
    args, extras = parser.parse_known_args(given)
    if extras:  # said by the command's own parser: its usage, not the top level's (`tiesmerge validate BASE --model`)
        commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        said = ""
        if args.command == "validate" and any(e.split("=")[0] in ("--base", "--model", "--method") for e in extras):
            # (hp85a c18: `validate --base B --model M` took B for the recipe, the flags as unrecognized)
            said = ("; validate checks a recipe file: to check flags without merging, run `tiesmerge merge --base "
                    "... --model ... -o OUT --dry-run`")
        (commands.choices.get(args.command) or parser).error(f"unrecognized arguments: {' '.join(extras)}{said}")
    if args.command is None:
        parser.print_help()
        return 2
    output = getattr(args, "output", None)
    if getattr(args, "force", False) and isinstance(output, str) and output and os.path.isdir(output):
        # a stop before the new output is swapped in leaves the earlier one as it was: said so, not "no output
        # directory was left behind", whichever command writes it and however early the stop (hp67a c32; hp68a c12,
        # c67, c68: a stop while merge imported torch, and analyze's and stats' --force)
        left_on_stop = f"nothing new was written, and the existing output {shown(output)} is unchanged"
    # an option whose empty value means something of its own (exclude: "empty: none", as a recipe's exclude: "" and
    # the API's exclude="" say it; hp63a c21 refused `--exclude ''` as empty)
    empty = [flag for flag in _empty_values(given, _multi_value_options(parser, args.command),
                                            _positional_name(parser, args.command))
             if flag not in _EMPTY_MEANS_NONE]
    if empty:
        return _report(ConfigError([f"{flag} is empty" for flag in empty],
                                   hint="give a value (a path, a name or a number), or leave it out"), debug)
    try:
        os.getcwd()
    except FileNotFoundError:  # relative paths, and the check that -o is not the working folder, need it
        return _report(ConfigError("the working directory no longer exists (it was deleted or moved away)",
                                   hint="cd into an existing folder and run again"), args.debug)
    threads = os.environ.get("NUMBA_NUM_THREADS")
    if threads is not None and not (re.fullmatch(r"[0-9]{1,5}", threads.strip()) and
                                    0 < int(threads) <= MAX_NUMBA_THREADS):
        # numba reads it at import, deep inside the first kernel (0: "a bug"; 100000: a crash): said here, named
        return _report(ConfigError(f"NUMBA_NUM_THREADS={threads[:40]!r} is not a number of threads from 1 to "
                                   f"{MAX_NUMBA_THREADS}",
                                   hint="unset it, or give a count such as 2 (the engine's kernels run on numba)"),
                       args.debug)
    shown_before = warnings.showwarning
    stdout = sys.stdout
    COMPLETED.clear()  # main() runs more than once in a process (tests, the API's callers)
    previous = _terminate_like_interrupt()
    wording: list[tuple[Any, str, Any]] = []  # the library's hint wording, put back after the command
    try:  # from the handlers on: a stop signal anywhere is "terminated", never a traceback (hostile pass 24, F8)
        with stops.held():  # the engine's imports (~0.4 s): a stop signal here unwinds the command after them
            _private_torch_cache()
            from .. import inputs, sizes
            from ..io import align
            from ..methods import nuslerp
        # the command's words in hints: an API call after main() in one process gets the library's again (a
        # mergekit recipe's "tokenizer_source" named in a later tiesmerge.merge's hint, seen in pass 48's tests)
        wording[:] = [(module, name, getattr(module, name)) for module, name in (
            (sizes, "shard_size_option"), (inputs, "stats_option"), (inputs, "weights_option"),
            (align, "union_offered"), (align, "policy_words"), (nuslerp, "t_offered"))]
        sizes.shard_size_option = "--shard-size" if args.command == "merge" else None  # for the hints
        inputs.stats_option = {"merge": "--stats", "validate": "stats:"}.get(args.command)  # None: it has none
        inputs.weights_option = {"merge": "--weights", "validate": "weights: [...] under parameters:"}.get(args.command)
        align.union_offered = args.command in ("merge", "validate")
        align.policy_words = dict(align.POLICY_FLAGS)  # a mergekit recipe's merge sets its own words
        warnings.showwarning = _warning_printer(shown_before)
        sys.stdout = SafeStream(stdout)  # type: ignore[assignment]
        _resolve_repo_ids(args)
        _refuse_dash(args)
        _warn_literal_tilde(args)
        _warn_repeated_options(parser, args.command, given)
        with _library_bars_off() if getattr(args, "no_progress", False) else contextlib.nullcontext(), \
                digest_cache_kept_out_of(_command_paths(args)):
            return HANDLERS[args.command](args)
    except TiesMergeError as exc:
        _recipe_paths_hint(exc, getattr(args, "recipe", None))
        return _report(exc, args.debug, command=args.command)
    except BrokenPipeError:  # e.g. `tiesmerge methods | head`
        return 0
    except KeyboardInterrupt as exc:
        return _stopped(exc, args.debug)
    except OSError as exc:  # the disk filled, a file vanished, a permission changed under us
        if is_out_of_memory(exc):  # ENOMEM: a mapping or allocation the address-space limit refused (hp40b C60)
            return _out_of_memory(exc, args)
        cache = kernel_cache_error(exc)
        if cache is not None:
            return _report(cache, args.debug)
        if exc.filename is None and _is_stdout_error(exc):
            done = (f"; the output {shown(COMPLETED[-1])} was written completely before, only the summary was lost"
                    if COMPLETED else "")
            return _report(InternalError(f"cannot write to standard output ({exc.strerror or exc}){done}",
                                         hint="standard output goes to a full disk or a closed pipe: redirect it "
                                              "elsewhere"), args.debug)
        if exc.filename is None and isinstance(exc, FileNotFoundError) and _cwd_gone():
            # a library resolving a path against the working folder (torch's lazy imports do) after it was deleted
            return _report(InternalError("the working directory was deleted (or moved away) while tiesmerge ran",
                                         hint="nothing was written at the output; run again from a folder that "
                                              "stays"), args.debug)
        where = f"{exc.filename}: " if exc.filename else ""
        return _report(InternalError(f"{where}{exc.strerror or exc}",
                                     hint="nothing was written at the output; fix the cause and run again"), args.debug)
    except Warning as exc:  # a warning raised as an error by the user's filter (PYTHONWARNINGS=error, -W error)
        return _report(TiesMergeError(
            f"a warning made an error by your warnings filter: {str(exc)[:500]}",
            hint="nothing was written at the output; fix what the warning says, or let it through "
                 "(PYTHONWARNINGS=default, or -W 'default::tiesmerge.errors.MergeWarning')"), args.debug)
    except MemoryError as exc:  # a library sized something by an input (a huge table) past the memory it may use
        if _stopping:
            return _stopped(None, args.debug)
        return _out_of_memory(exc, args)
    except Exception as exc:  # a bug of ours (RecursionError included): a message, never a traceback
        if _stopping:  # raised by code the stop signal interrupted (a lock left half-released): it is the stop
            return _stopped(None, args.debug)
        if is_out_of_memory(exc):  # torch's allocator fails with a RuntimeError, not MemoryError (hp40b C60)
            return _out_of_memory(exc, args)
        cache = kernel_cache_error(exc)
        if cache is not None:
            return _report(cache, args.debug)
        return _report(InternalError(f"unexpected {type(exc).__name__}: {str(exc)[:500]}",
                                     hint="this is a bug in tiesmerge; run again with --debug for the traceback "
                                          "and report it"), args.debug)
    except BaseException as exc:  # noqa: BLE001 - a Rust library's panic (pyo3's PanicException) is no Exception
        if isinstance(exc, SystemExit):  # argparse's and --help's own exits
            raise
        return _report(InternalError(f"a library tiesmerge called stopped with {type(exc).__name__}: "
                                     f"{str(exc)[:300]}",
                                     hint="an input likely holds what that library cannot process (e.g. a tokenizer "
                                          "whose regex backtracks without end); run again with --debug for the "
                                          "traceback"), args.debug)
    finally:
        for module, name, value in wording:
            setattr(module, name, value)
        summary = getattr(warnings.showwarning, "summary", None)
        if summary is not None:
            summary()  # the count of warnings left unshown, after the command's own output
        warnings.showwarning = shown_before
        sys.stdout = stdout
        for signum, handler in previous.items():
            if handler is not None:  # None: a handler set outside Python, which cannot be put back from here
                signal.signal(signum, handler)
        if _watchdog is not None:  # the command's cleanup is done, stopped or not
            _watchdog.finish()
        if sys.unraisablehook is _swallowed_stop:
            sys.unraisablehook = _previous_unraisable


# Every catchable signal whose default action ends the process (signal(7): "Term" or "Core") but the faults a
# crash raises (SEGV, BUS, FPE, ILL, ABRT, SYS, TRAP): kill's default (TERM), a closed terminal or ssh session
# (HUP), Ctrl-\ (QUIT), the user signals job schedulers send before they kill a job (USR1, USR2), the limits'
# signals (XCPU: `ulimit -t`, SGE's s_cpu; ALRM, VTALRM, PROF: timers), a power failure (PWR: init, some
# container runtimes), I/O readiness (IO) and the real-time signals. Each is handled as Ctrl-C (SIGINT), so
# the temporary output is removed; one whose handler is not the default (a profiler's SIGPROF, an ignored HUP
# under nohup) is left as it is.
_STOPPING_BY_DEFAULT = ("SIGTERM", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGXCPU", "SIGALRM", "SIGVTALRM",
                        "SIGPROF", "SIGPWR", "SIGSTKFLT", "SIGIO", "SIGPOLL", "SIGLOST", "SIGEMT")
STOP_SIGNALS = tuple(dict.fromkeys(
    [getattr(signal, name) for name in _STOPPING_BY_DEFAULT if hasattr(signal, name)]
    + ([signal.Signals(n) if n in signal.Signals._value2member_map_ else n
        for n in range(signal.SIGRTMIN, signal.SIGRTMAX + 1)] if hasattr(signal, "SIGRTMIN") else [])))


class Terminated(KeyboardInterrupt):
    """A stop signal, raised where the program is, so every cleanup (the temporary output) runs as on Ctrl-C."""

    def __init__(self, signum: int = signal.SIGTERM) -> None:
        super().__init__(signum)
        self.signum = int(signum)
        self.name = signal.Signals(signum).name if signum in signal.Signals._value2member_map_ else \
            f"SIGRTMIN+{signum - signal.SIGRTMIN}"


_stopping = False  # a stop signal (or Ctrl-C) arrived: its cleanup is running
_stopped_by: Terminated | None = None  # the stop signal other than Ctrl-C that arrived first, for the exit status


STOP_GRACE_S = 60.0  # seconds a stop's cleanup may take before the process ends without it


class _StopWatchdog:
    """Bounds a stop's cleanup. The stop signal raises where the program is, and code it unwinds through may block
    for ever (an evaluator's pool waiting on a lock the interrupted code left held: hp59b c39; user code catching
    the stop and waiting), while every later signal is taken as the first one's cleanup. ``STOP_GRACE_S`` after the
    stop, the process ends with the signal's status, saying so; a temporary output it leaves is removed by a later
    run. A thread of its own per command, started with the command (never from the signal handler: starting a thread
    there could wait on a lock the interrupted code holds); the handler only sets an event no other code touches."""

    def __init__(self) -> None:
        self._stopped = threading.Event()
        self._finished = threading.Event()
        self._signum = int(signal.SIGINT)
        self._thread = threading.Thread(target=self._watch, name="tiesmerge-stop-watchdog", daemon=True)
        self._thread.start()

    def arm(self, signum: int) -> None:
        self._signum = int(signum)
        self._stopped.set()

    def finish(self) -> None:
        self._finished.set()
        self._stopped.set()  # wakes the thread, which ends

    def _watch(self) -> None:
        self._stopped.wait()
        if self._finished.wait(STOP_GRACE_S) or _watchdog is not self:  # done, or another command runs now
            return
        name = signal.Signals(self._signum).name if self._signum in signal.Signals._value2member_map_ else \
            str(self._signum)
        try:
            os.write(2, (f"\nerror: {'interrupted' if self._signum == signal.SIGINT else 'terminated by ' + name}; "
                         f"its cleanup did not end within {STOP_GRACE_S:g} s (blocked, e.g. in an evaluator's code), "
                         "so the process ends without it; a temporary output it left is removed by the next run "
                         "that writes there\n").encode())
        except OSError:
            pass
        os._exit(128 + self._signum)


_watchdog: _StopWatchdog | None = None  # the running command's


def _on_stop_signal(signum: int, frame: Any) -> None:
    global _stopping, _stopped_by
    if os.getpid() != _handler_pid:  # a child forked without Python's at-fork hooks (a C library's fork), which
        _as_by_default(signum)  # kept this handler (_default_handlers_in_child resets it at every os.fork): the
        return  # signal does what it would have done there (hp48 c40)
    if signum == getattr(signal, "SIGIO", None) and leases.on_signal():  # a read lease breaking, not a stop
        return
    if _stopping:  # a second signal during the first one's cleanup (Ctrl-C, then the scheduler's TERM): let it finish
        return
    if stops.hold(signum):  # inside an import that would swallow it (tiesmerge.stops): delivered after it
        return
    _stopping = True
    if _watchdog is not None:
        _watchdog.arm(signum)
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    _stopped_by = Terminated(signum)
    raise _stopped_by


leases.cooperating_handlers.add(_on_stop_signal)  # it passes a SIGIO on to the leases while they are held
_handler_pid = os.getpid()  # the process whose command the handlers stop (set again as they are installed)


def _default_handlers_in_child() -> None:
    """In a child forked while a command runs (an evaluator's multiprocessing pool, its own os.fork), every signal
    tiesmerge handles is handled again as Python would have: Ctrl-C raises KeyboardInterrupt, a stop signal ends
    the process. Set at the fork, not when the signal comes: a Python handler runs only between bytecodes of the
    main thread, so a child blocked in C (a lock another thread held at the fork, ``sigwait``) would outlive the
    SIGTERM a pool's end sends it, and the pool's ``join`` would wait for it forever (a CI run hung so)."""
    global _fork_hold
    _fork_hold = None
    stops.forget()
    for signum in (signal.SIGINT, *STOP_SIGNALS):
        try:
            if signal.getsignal(signum) is _on_stop_signal:
                signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL)
        except (ValueError, OSError):  # a platform's signal that cannot be set: the handler's own check stays
            continue
    if sys.unraisablehook is _swallowed_stop:
        sys.unraisablehook = _previous_unraisable


def _as_by_default(signum: int) -> None:
    """``signum`` in a forked child, as if tiesmerge had never handled it: Ctrl-C raises KeyboardInterrupt, a signal
    whose default ends the process ends it (no "Terminated" traceback from each worker of an evaluator's pool)."""
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    try:
        signal.signal(signum, signal.SIG_DFL)
    except (ValueError, OSError):  # forked from another thread than the main one: end as the default would
        os._exit(128 + signum)
    os.kill(os.getpid(), signum)


def _swallowed_stop(args: Any) -> None:
    """sys.unraisablehook for the command's duration. A signal handled while Python runs a finalizer (a weakref
    callback, ``__del__``, the garbage collector: importlib's module locks use one) has its exception printed as
    "Exception ignored" and dropped, so the stop would never reach the command, and every later stop signal would
    be taken as the first one's cleanup. Here that stop is forgotten and the same signal sent again a moment later,
    when the handler runs outside the finalizer and its exception unwinds the command as usual."""
    global _stopping, _stopped_by
    exc = args.exc_value
    if _stopping and isinstance(exc, KeyboardInterrupt):
        signum = exc.signum if isinstance(exc, Terminated) else signal.SIGINT
        _stopping, _stopped_by = False, None
        timer = threading.Timer(0.05, os.kill, (os.getpid(), signum))
        timer.daemon = True
        timer.start()
        return
    _previous_unraisable(args)


_previous_unraisable = sys.unraisablehook
_fork_hold: Any = None  # the stops.held() block open across a fork of the main thread


def _hold_across_fork() -> None:
    """Before a fork: a stop signal waits until the fork's hooks have run. Raised inside them (the main thread forking
    an evaluator's pool worker), it skipped logging's release of its lock, and the pool's end, whose thread forks
    again, waited on that lock for ever (hp59b c39: SIGTERM to the process group, 1 run in 8)."""
    global _fork_hold
    if threading.current_thread() is threading.main_thread() and _fork_hold is None:
        _fork_hold = stops.held()
        _fork_hold.__enter__()


def _release_after_fork() -> None:
    global _fork_hold
    block, _fork_hold = _fork_hold, None
    if block is not None and threading.current_thread() is threading.main_thread():
        block.__exit__(None, None, None)  # a stop signal held meanwhile is delivered here, after every hook


if hasattr(os, "register_at_fork"):  # POSIX only; Windows has no fork
    import logging  # noqa: F401 - registered first, so its at-fork lock is taken after our hold and freed before

    # before-hooks run last-registered first, after-hooks first-registered first: ours enclose every earlier one's
    os.register_at_fork(before=_hold_across_fork, after_in_parent=_release_after_fork,
                        after_in_child=_default_handlers_in_child)


def _terminate_like_interrupt() -> dict[int, Any]:
    """Handle the stop signals as Ctrl-C for the command's duration, and any second one as nothing while the
    first one's cleanup runs; the handlers they replace (only the main thread may set handlers: elsewhere the
    caller's stay)."""
    global _stopping, _stopped_by, _handler_pid, _watchdog
    _stopping, _stopped_by, _handler_pid = False, None, os.getpid()
    if threading.current_thread() is threading.main_thread():  # where the handlers are set
        _watchdog = _StopWatchdog()
    previous: dict[int, Any] = {}
    for signum in (signal.SIGINT, *STOP_SIGNALS):
        try:
            current = signal.getsignal(signum)
            if signum == signal.SIGINT and current is not signal.default_int_handler:
                continue  # a caller's own Ctrl-C handler stays
            if signum != signal.SIGINT and current is not signal.SIG_DFL and current is not _on_stop_signal:
                continue  # ignored (HUP under nohup: the user asked for it), or another program's handler
            previous[signum] = signal.signal(signum, _on_stop_signal)
        except (ValueError, OSError):  # not the main thread, or a signal this platform will not let us handle
            break
    if previous and sys.unraisablehook is not _swallowed_stop:
        global _previous_unraisable
        _previous_unraisable, sys.unraisablehook = sys.unraisablehook, _swallowed_stop
    return previous


def _cwd_gone() -> bool:
    try:
        os.getcwd()
    except FileNotFoundError:
        return True
    return False


def _is_stdout_error(exc: OSError) -> bool:
    """The error came from printing. Every file tiesmerge writes is named in its errors (write_error),
    so a write error that names no file, raw at this level, is standard output's."""
    import errno

    return exc.errno in (errno.ENOSPC, errno.EFBIG, errno.EIO, errno.EBADF, errno.EDQUOT)


def _warning_printer(fallback: Callable[..., None]) -> Callable[..., None]:
    """``warnings.showwarning`` for the command's duration: tiesmerge's own warnings as ``warning: ...`` lines on
    stderr (no source line, no Python location), others as Python shows them."""

    shown: set[str] = set()
    # the same warning about many tensors (Model Stock's t per tensor: hundreds of lines for a real model, hp37b M09):
    # the first few, then one line with the count
    per_kind: dict[str, list[str]] = {}

    def show(message: Warning | str, category: type[Warning], filename: str, lineno: int, file: Any = None,
             line: str | None = None) -> None:
        if issubclass(category, MergeWarning):
            text = str(message)
            if text in shown:  # once per command, however often the merge's steps meet the cause
                return
            shown.add(text)
            # warnings naming a tensor group by their words without the name and its numbers (t = 1.43, a cosine)
            kind = _NUMBER.sub("#", _TENSOR_NAMED.sub("tensor …", text)) if _TENSOR_NAMED.search(text) else text
            tensors = per_kind.setdefault(kind, [])
            tensors.append(text)
            if kind == text or len(tensors) <= _SAME_KIND_SHOWN:
                print(f"warning: {terminal_safe(abridged(text))}", file=sys.stderr)
        else:
            fallback(message, category, filename, lineno, file, line)

    def summary() -> None:
        for kind, tensors in per_kind.items():
            if kind != tensors[0] and len(tensors) > _SAME_KIND_SHOWN:
                more = len(tensors) - _SAME_KIND_SHOWN
                first = terminal_safe(tensors[0][:70].split(" tensor ")[0].rstrip(":"))
                print(f"warning: ... and {more} more tensor{'s' if more != 1 else ''} with the same warning as the "
                      f"{_SAME_KIND_SHOWN} above ({first}: ...)", file=sys.stderr)
        per_kind.clear()

    show.summary = summary  # type: ignore[attr-defined]
    return show


_SAME_KIND_SHOWN = 3
# a tensor's name inside a warning, with the numbers that go with it (t = 1.43, a cosine): the rest is the kind
_TENSOR_NAMED = re.compile(r"tensor '(?:[^'\\]|\\.)*'|tensor \"(?:[^\"\\]|\\.)*\"")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:e[-+]?\d+)?")


# said after a stop: every writer's temporary output is removed; a command that writes in place (the demo's
# --workdir) sets what stays (hostile pass 29, F2)
NOTHING_LEFT = "no output directory was left behind"
left_on_stop = NOTHING_LEFT


def _recipe_paths_hint(exc: TiesMergeError, recipe: str | None) -> None:
    """A path of a recipe that does not exist: say against which folder the recipe's paths were read. tiesmerge
    recipes read theirs against the recipe's folder, mergekit's against the working folder (as mergekit does), and
    neither error said so (hp37 C05)."""
    # (hp76a c25: validate and --dry-run list the inputs' problems without a hint: said there too)
    if not recipe or "no such file or directory" not in exc.message or \
            not (not exc.hint or exc.hint.startswith(("check the", "fix each problem named above"))):
        return
    try:
        from ..limits import read_yaml
        from ..recipe_mergekit import is_mergekit

        mergekit = is_mergekit(read_yaml(recipe, "the recipe"))
    except Exception:  # noqa: BLE001 - the recipe's own problems were said already; this only words the hint
        return
    if mergekit:
        where = (f"paths in a mergekit recipe are relative to the working folder ({os.getcwd()}), as mergekit reads "
                 "them: run it from the folder it was written for, or give absolute paths")
    else:
        where = (f"paths in a tiesmerge recipe are relative to the recipe's folder "
                 f"({os.path.dirname(os.path.abspath(recipe))})")
    if not exc.hint:
        exc.hint = where
    elif where.split(" (")[0] not in exc.hint:
        exc.hint = f"{exc.hint.rstrip('.')}; {where}"


def _stopped(exc: KeyboardInterrupt | None, debug: bool) -> int:
    """Ctrl-C or a stop signal ended the command (every cleanup has run): say which, exit as the shell expects."""
    if debug:
        traceback.print_exc()
    # the signal that started it: a library may catch our Terminated and raise a plain KeyboardInterrupt of its
    # own (Ray's ray.get cancels its tasks so), or code it interrupted may fail with another error (a lock released
    # twice), and the exit status must still say which signal it was
    stopped = exc if isinstance(exc, Terminated) else _stopped_by
    left = left_on_stop
    placed = getattr(sys.modules.get("tiesmerge.io.writer"), "PLACED", None)
    placed = [p for p in placed or () if os.path.isdir(p)]  # not a folder a command made and removed since (hp68a
    # c61: analyze --method's compared merges, "complete and kept" in a private folder already deleted)
    if placed and (left == NOTHING_LEFT or left.startswith("nothing new was written")):  # the output was in place
        # before the stop (hp66a c14, c32: "no output was left", of a complete one); the demo says its own
        left = f"the output {placed[-1]} was complete before the stop and is kept"
    if stopped is not None:
        print(f"error: terminated by {stopped.name}; {left}", file=sys.stderr)
        return 128 + stopped.signum  # the shell's convention for a process ended by that signal
    print(f"error: interrupted; {left}", file=sys.stderr)
    return 130


MEMORY_BUDGET_COMMANDS = ("merge", "analyze", "tune", "search", "adapt")  # those with a --memory-budget


def _out_of_memory(exc: BaseException, args: argparse.Namespace) -> int:
    """Memory ran out (MemoryError, torch's allocator's RuntimeError, ENOMEM from mmap): said as such, with
    what needs less memory, not as "a bug in tiesmerge" or a truncated file (hp40b C60)."""
    command, debug = args.command, args.debug
    text = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    text = text.strip().splitlines()[0][:200] if text.strip() else ""
    where = f"{exc.filename}: " if isinstance(exc, OSError) and exc.filename else ""
    if _loading_a_library(exc):  # torch's own files under a tight ulimit -v: no budget helps (hp44 c31)
        return _report(library_out_of_memory(text, where, command_line=True), debug)
    if command == "demo":
        helps = "give a smaller --params (the synthetic models' size, millions of parameters)"
    elif command in MEMORY_BUDGET_COMMANDS:
        from ..sizes import budget_in_use

        helps = memory_hint(budget_in_use(getattr(args, "memory_budget", None))).split(", or run with")[0]
    else:
        helps = "use smaller inputs"
    done = "" if command == "demo" else "nothing was written at the output; "
    inputs = "" if command == "demo" else "; an input may also ask for more than it should (check the inputs' configs)"
    return _report(OutOfMemoryError(
        f"{where}ran out of memory{f' ({text})' if text else ''}",
        hint=f"{done}{helps}, or run with more memory: raise the process's limit (ulimit -v) or free memory "
             f"on this machine{inputs}; --debug shows where"), debug)


def _loading_a_library(exc: BaseException) -> bool:
    """Whether memory ran out mapping a library's own files (torch's shared objects, a package folder read at its
    import) rather than a model's."""
    if is_library_load(exc):  # (a MemoryError inside an import too)
        return True
    filename = getattr(exc, "filename", None)
    if not isinstance(filename, str):
        return False
    import sysconfig

    roots = {sysconfig.get_paths()[k] for k in ("purelib", "platlib", "stdlib")}
    return any(os.path.abspath(filename).startswith(os.path.join(root, "")) for root in roots)


def _report(exc: TiesMergeError, debug: bool, command: str | None = None) -> int:
    """``error: ...`` and ``hint: ...`` on stderr; the exit status of the error's kind. An error that
    carries no hint of its own (an option's value refused by its check) points to the command's
    help, whose options and examples say what is accepted: every error ends with a hint."""
    if debug:
        traceback.print_exc()
    print(f"error: {terminal_safe(abridged(exc.message))}", file=sys.stderr)
    hint = exc.hint or (f"`tiesmerge {command} --help` lists the options, the values each accepts, and examples"
                        if command else "")
    if hint:
        print(f"hint: {terminal_safe(abridged(hint))}", file=sys.stderr)
    return exc.exit_code


def entry() -> NoReturn:  # pragma: no cover - exercised by the installed `tiesmerge` script
    """The console script: run, flush, and leave without the interpreter's teardown.

    Tearing down torch and numba's thread pool took 0.55 s at exit on a 2-core machine (measured:
    benchmarks/speed/NOTES.md), more than the arithmetic of a small merge. By the time ``main``
    returns, every output is closed and renamed into place and every thread pool has finished.
    """
    try:
        code = main()
    except KeyboardInterrupt as exc:  # Ctrl-C while the command line was parsed, before main's handlers: nothing began
        code = _stopped(exc, "--debug" in sys.argv[1:])
    remove_private_folders()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (BrokenPipeError, ValueError):  # a closed pipe: nothing more can reach it anyway
            pass
    os._exit(code)


if __name__ == "__main__":  # pragma: no cover
    entry()
