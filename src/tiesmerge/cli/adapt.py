"""`tiesmerge adapt`: learn the merge's coefficients from unlabeled inputs (AdaMerging), or labelled ones.

Kept out of main.py and commands.py (which only register it): the parser and the handler.
Nothing here imports torch at import time: ``--help`` starts without it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..io.align import VOCAB_POLICIES
from ..limits import read_json
from .numbers import float_flag, int_flag
from .terminal import completed, shown

__all__ = ["ADAPT_EXAMPLES", "add_adapt_parser", "cmd_adapt"]

ADAPT_EXAMPLES = """\
examples:
  # layer-wise AdaMerging++ (over TIES's trimmed, sign-elected vectors) of two sentiment/topic classifiers,
  # on each task's unlabeled inputs (one JSON-lines file per model, in the models' order)
  tiesmerge adapt --base ./base --model ./ft-sst2 --model ./ft-agnews \\
      --data sst2-unlabeled.jsonl --data agnews-unlabeled.jsonl \\
      --method ties --density 0.2 --granularity layer -o ./merged

  # task-wise AdaMerging over task arithmetic, a sentence encoder with frozen heads, on a GPU
  tiesmerge adapt --base ./minilm --model ./ft-a --model ./ft-b --data a.jsonl --data b.jsonl \\
      --forward encoder --heads heads.json --granularity task --device cuda -o ./merged

  # what a run holds in memory, without running it
  tiesmerge adapt --base ./base --model ./ft-a --model ./ft-b --data a.jsonl --data b.jsonl --dry-run

  # continue an interrupted run (or run more steps) from OUTPUT.adapt-checkpoint.safetensors
  tiesmerge adapt ... --steps 1000 --resume -o ./merged --force

  # coefficients over TSV-M's decorrelated per-task components, learned from labelled validation examples
  tiesmerge adapt --base ./base --model ./ft-a --model ./ft-b --data a-val.jsonl --data b-val.jsonl \\
      --method tsv_m --init 1.0 --objective cross_entropy -o ./merged

data.jsonl, one example per line (labels are ignored, but for --objective cross_entropy, which needs them):
  {"text": "a gripping, funny film"}        {"text": "a gripping, funny film", "label": 1}
heads.json (--forward encoder): each task's class descriptions, tasks named like the data files' stems:
  {"sst2-unlabeled": ["a negative review", "a positive review"], ...}
choices.json (--forward choice, a causal LM): each task's answer choices (or "choices" in each row):
  {"boolq": [" yes", " no"]}

Writes the merged model as `tiesmerge merge` does, plus adamerging_coefficients.json/.png
(task x layer) and adamerging_entropy.json/.png; tiesmerge.json records the run. Layer-wise,
every parameter tensor of the model has its own coefficient per task (FusionBench's grouping).
"""


def add_adapt_parser(sub: Any, method_flags: Callable[[argparse.ArgumentParser], None]) -> None:
    p = sub.add_parser("adapt", help="learn per-task (or per-layer) merge coefficients from unlabeled inputs "
                                     "(AdaMerging)", epilog=ADAPT_EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="the model the others were fine-tuned from (HF directory)")
    p.add_argument("--model", action="append", dest="models", required=True, metavar="PATH",
                   help="a fine-tuned model; repeat")
    p.add_argument("--data", action="append", required=True, metavar="JSONL",
                   help="one model's task's unlabeled inputs, {\"text\": ...} per line; one per --model, in order")
    p.add_argument("--task-names", nargs="+", metavar="NAME", help="the tasks' names (default: the data files' stems)")
    p.add_argument("--method", default="task_arithmetic",
                   help="the per-task vectors: task_arithmetic (AdaMerging, default), ties (AdaMerging++), or any "
                        "method exposing them (dare_linear, dare_ties, breadcrumbs, breadcrumbs_ties, della, "
                        "della_linear, tsv_m); its options as flags")
    p.add_argument("--forward", default="classifier", choices=("classifier", "encoder", "choice"),
                   help="the model's logits: classifier (a *ForSequenceClassification, default), encoder (a "
                        "sentence encoder with frozen cosine heads: --heads), choice (a causal LM over answer "
                        "choices: --choices or rows' 'choices')")
    p.add_argument("--heads", metavar="FILE", help="--forward encoder: a JSON file {task: [class descriptions]}")
    p.add_argument("--choices", metavar="FILE", help="--forward choice: a JSON file {task: [answer choices]}")
    p.add_argument("--granularity", default="layer", choices=("task", "layer"),
                   help="one coefficient per task, or per task and parameter tensor (default layer)")
    p.add_argument("--objective", default="entropy", choices=("entropy", "cross_entropy"),
                   help="what the coefficients minimise: entropy of the predictions on unlabeled inputs (default, "
                        "the paper's) or cross-entropy against each row's integer 'label' (labelled data, e.g. a "
                        "validation split)")
    p.add_argument("--steps", type=int_flag, default=500, help="optimizer steps, each on one batch of every task (500)")
    p.add_argument("--lr", type=float_flag, default=1e-3, help="Adam's learning rate (default 1e-3, the paper's)")
    p.add_argument("--batch-size", type=int_flag, default=16, help="examples per task and step (default 16)")
    p.add_argument("--init", type=float_flag, default=0.3, help="every coefficient's initial value (default 0.3)")
    p.add_argument("--shuffle-seed", type=int_flag, default=0,
                   help="the run's seed: of the batches' shuffling, its only randomness (default 0; --seed is a "
                        "method option, e.g. DARE's)")
    p.add_argument("--clamp", type=float_flag, nargs=2, metavar=("LOW", "HIGH"),
                   help="keep the coefficients in [LOW, HIGH] (default: unbounded, as the paper)")
    p.add_argument("--limit", type=int_flag, help="use each data file's first N examples (default all)")
    p.add_argument("--max-length", type=int_flag, default=128, help="tokens per example (longer ones are truncated)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--memory-budget", help="the merge engine's working memory, e.g. 512MiB")
    p.add_argument("-o", "--output", help="output directory (an HF model directory)")
    p.add_argument("--force", action="store_true",
                   help="replace an output directory tiesmerge wrote before (never an input)")
    p.add_argument("--checkpoint", metavar="FILE",
                   help="coefficients and optimizer state, written each pass over the data "
                        "(default OUTPUT.adapt-checkpoint.safetensors beside the output)")
    p.add_argument("--checkpoint-every", type=int_flag, metavar="N", help="steps between checkpoints (default: a pass)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint, if there is one")
    p.add_argument("--dry-run", action="store_true", help="print the coefficients and memory a run needs, and stop")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--allow-pickle", action="store_true", help="read .bin/.pt files (with weights_only=True)")
    p.add_argument("--vocab-policy", choices=VOCAB_POLICIES, default="error",
                   help="on embedding rows that differ (default error)")
    method_flags(p)


def _json_mapping(path: str | None, what: str) -> dict[str, list[str]] | None:
    if path is None:
        return None
    # a file the user writes: exit 2, as data files (hp54 c12); a task given twice is refused as they refuse a key
    # given twice (hp68b c37: the last kept silently)
    data = read_json(Path(path), what, error=ConfigError, unique_keys=True)
    if not isinstance(data, dict) or not all(isinstance(v, list) and all(isinstance(x, str) for x in v)
                                             for v in data.values()):
        raise ConfigError(f"{path}: {what} must be a JSON object of lists of strings, e.g. "
                          '{"task": ["first", "second"]}')
    for task, texts in data.items():  # a "\ud800" escape is valid JSON but no text: the tokenizer failed on it as
        for text in (task, *texts):  # the model's fault, or as a bug (hp42 D46)
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise ConfigError(f"{path}: {what}: {text[:40]!r} holds \\u{ord(exc.object[exc.start]):04x}, half of "
                                  "a UTF-16 surrogate pair without its other half, which is no text",
                                  hint="write the character itself, or both halves of its \\ud8xx\\udcxx escape"
                                  ) from None
    return data


def cmd_adapt(args: argparse.Namespace) -> int:
    from ..adamerging import adapt, describe_adapt  # torch: imported by the command that runs
    from ..adamerging.run import check_adapt_outputs, check_adapt_request, default_checkpoint
    from ..registry import make_method
    from .commands import check_memory_budget

    for flag, value in (("--limit", args.limit), ("--max-length", args.max_length),
                        ("--checkpoint-every", args.checkpoint_every)):
        if value is not None and value < 1:  # an option's value, not the data file's fault
            raise ConfigError(f"{flag} must be a positive number, got {value}")
    options = {k.removeprefix("opt_"): v for k, v in vars(args).items() if k.startswith("opt_")}
    if options.get("lam") is not None:  # hp35 E22: accepted, ignored, and then named on the model card
        raise ConfigError(f"--lam {options['lam']:g}: adapt learns each task vector's scale (the coefficients take "
                          "the place of the method's lam), so --lam would change nothing",
                          hint="leave --lam out; --init sets where the coefficients start, --clamp bounds them")
    method = make_method(args.method, options)
    if args.dry_run:
        # the checks a run makes before reading anything (hp45 c06: a dry run passed what the run refuses at once)
        check_adapt_request(args.base, args.models, args.data, method, forward=args.forward,
                            heads=_json_mapping(args.heads, "the heads"),
                            choices=_json_mapping(args.choices, "the choices"), tasks=args.task_names,
                            granularity=args.granularity,
                            steps=args.steps, lr=args.lr, batch_size=args.batch_size, init=args.init,
                            shuffle_seed=args.shuffle_seed, clamp=tuple(args.clamp) if args.clamp else None,
                            checkpoint_every=args.checkpoint_every, objective=args.objective, limit=args.limit)
        # the data files read as the run reads them first (a missing, empty or FIFO file; two tasks of one name from
        # the files' names): the run refused each at once, the dry run passed them (hp88b c54, c55)
        from ..adamerging.run import read_task_data

        read_task_data(args.data, args.task_names, limit=args.limit)
        if args.output:  # the checks a real run makes before any work (nothing is created), refused as a run would be
            check_adapt_outputs(args.base, args.models, args.data, output=args.output, force=args.force,
                                checkpoint=args.checkpoint, resume=args.resume, method=method)
        print(describe_adapt(args.base, args.models, method, granularity=args.granularity,
                             batch_size=args.batch_size, device=args.device, allow_pickle=args.allow_pickle,
                             vocab_policy=args.vocab_policy))
        if args.output:
            print(f"output           {shown(args.output)} (not written: dry run)")
        return 0
    if not args.output:
        raise ConfigError("missing -o/--output", hint="tiesmerge adapt ... -o ./merged (or --dry-run)")
    check_memory_budget(args.memory_budget, args.base, args.models, method)  # its final merge's
    started = time.perf_counter()
    kept = Path(args.checkpoint) if args.checkpoint else default_checkpoint(Path(args.output))
    before = _modified(kept)
    try:
        result = _run_adapt(adapt, args, method)
    except BaseException:  # a signal, Ctrl-C or an error mid-run: the progress saved so far is kept on purpose
        if _modified(kept) not in (None, before):
            print(f"note: the checkpoint of the steps done is kept: {shown(kept)}; the same command with --resume "
                  "continues from it", file=sys.stderr)
        raise
    completed(result.output)
    manifest = json.loads((Path(result.output) / "tiesmerge.json").read_text())["adamerging"]
    c = result.coefficients
    print(f"adapted {len(args.models)} models ({manifest['vectors']}, {args.granularity}-wise: {c.numel()} "
          f"coefficients) into {shown(result.output)} in {time.perf_counter() - started:.1f} s")
    if manifest["entropy"]["first"] is None:  # --steps 0: nothing learned, the merge is at the initial coefficients
        print("  0 steps: the coefficients stay at their initial value (--init)")
    else:
        print(f"  mean {args.objective.replace('_', '-')} {manifest['entropy']['first']} -> "
              f"{manifest['entropy']['last']} over "
              f"{len(result.history.entropy)} steps")
    for task, row in zip(result.tasks, c.tolist()):
        print(f"  {shown(task)}: coefficients mean {sum(row) / len(row):.3f}, range [{min(row):.3f}, {max(row):.3f}]")
    print(f"  files: {', '.join(manifest['files'])}")
    if kept.is_file():  # left on purpose (--resume continues from it); a rerun over it needs --force or --resume
        print(f"  checkpoint kept: {shown(kept)} (--resume continues from it; delete it once the run is final)")
    return 0


def _run_adapt(adapt: Callable[..., Any], args: argparse.Namespace, method: Any) -> Any:
    return adapt(args.base, args.models, args.data, method, forward=args.forward, tasks=args.task_names,
                 heads=_json_mapping(args.heads, "the heads"), choices=_json_mapping(args.choices, "the choices"),
                 granularity=args.granularity, steps=args.steps, lr=args.lr, batch_size=args.batch_size,
                 init=args.init, shuffle_seed=args.shuffle_seed, clamp=tuple(args.clamp) if args.clamp else None,
                 checkpoint_every=args.checkpoint_every, limit=args.limit, max_length=args.max_length,
                 device=args.device, memory_budget=args.memory_budget, output=args.output, force=args.force,
                 checkpoint=args.checkpoint, resume=args.resume,
                 progress=not args.no_progress and sys.stderr.isatty(), allow_pickle=args.allow_pickle,
                 vocab_policy=args.vocab_policy, objective=args.objective)


def _modified(path: Path) -> tuple[int, int] | None:
    """(mtime in ns, size) of ``path`` (links not followed), None where there is nothing."""
    try:
        st = path.lstat()
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size
