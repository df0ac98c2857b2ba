"""Table 1 in miniature: converged MiniLM task models over several seeds, every registered merge method.
Run from the repo root:

    python benchmarks/minilm/run.py                    # everything; reuses cached data, models, results
    python benchmarks/minilm/run.py --seeds 0          # one fine-tuning seed
    python benchmarks/minilm/run.py --device cuda      # the same on a GPU

Writes benchmarks/results/table1.md + .json, fig5.md + .png + .json and finetune_curves.md + .png +
.json. The task models follow the converged protocol of common.Protocol (fine-tuned by
finetune_all.py, or here when missing). Each registered method gets a row with its defaults and,
if it declares a grid, a row tuned on validation (plan.py); every merge goes through
tiesmerge.merge, every search through tiesmerge.tuning.tune. Results are cached per seed, so a
rerun after a new method lands computes only that method's rows.
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import hashlib
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import common  # noqa: E402
import curves  # noqa: E402
import fig5  # noqa: E402
from common import NotCached, base_dir, hardware, load_encoder, multitask_model, task_model  # noqa: E402
from finetune_all import protocol_args, protocol_from  # noqa: E402
from plan import DATA_AWARE, describe, plan, search, shrink, thin  # noqa: E402
from seedtable import GOAL_FLOOR, GOAL_MEAN, SeedTable  # noqa: E402

import tiesmerge  # noqa: E402
from tiesmerge.evaluation import evaluate_encoder  # noqa: E402
from tiesmerge.registry import make_method  # noqa: E402
from tiesmerge_bench import TASK_NAMES  # noqa: E402

RESULTS = Path(__file__).resolve().parents[1] / "results"


class EvalCache:
    """Results already computed under the same settings, so a rerun only does what is missing.

    Several run.py processes (e.g. one per --methods subset, to use more cores) may share one
    cache file: each write re-reads the file under a lock and adds its key, so none is lost."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data = json.loads(path.read_text()) if path.is_file() else {}
        self.reused: list[str] = []

    def _reload(self) -> None:
        if self.path.is_file():
            self.data.update(json.loads(self.path.read_text()))

    def get(self, key: str, compute):
        if key not in self.data:
            self._reload()
        if key in self.data:
            self.reused.append(key)
            return self.data[key]
        value = compute()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self._reload()
            self.data[key] = value
            tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(self.data, indent=1))
            tmp.replace(self.path)
        return value


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", nargs="+", default=list(TASK_NAMES))
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="fine-tuning seeds")
    p.add_argument("--tune-seeds", nargs="+", type=int, default=None,
                   help="seeds whose validation data choose hyperparameters (default: every seed); the "
                        "other seeds reuse the choice of the first of these")
    p.add_argument("--data-seed", type=int, default=0, help="seed of the train/validation/test splits")
    p.add_argument("--methods", nargs="+", default=None, help="registered methods to run (default: all)")
    p.add_argument("--test-limit", type=int, default=None, help="test examples per task (default all: 1000)")
    p.add_argument("--val-limit", type=int, default=None, help="validation examples per task used for tuning")
    p.add_argument("--max-axis-values", type=int, default=None,
                   help="thin every grid axis longer than this to this many evenly spaced values, ends kept "
                        "(a coarser search for a slow machine; the widening still runs past the ends)")
    p.add_argument("--max-grid-points", type=int, default=None,
                   help="thin the longest axes until a grid has at most this many points (slow machines)")
    p.add_argument("--widen-rounds", type=int, default=2, help="times a grid is widened past an edge")
    p.add_argument("--fig5-limit", type=int, default=None, help="test examples per task in the Fig. 5 sweep")
    p.add_argument("--fig5-subsets", type=int, default=10, help="subsets per number of tasks (paper: 10)")
    p.add_argument("--skip-fig5", action="store_true")
    p.add_argument("--cached-only", action="store_true",
                   help="train nothing: a seed whose models are not all cached is left out (and said so)")
    p.add_argument("--data-aware", nargs="*", default=["regmean", "fisher"], choices=["regmean", "fisher"],
                   help="which statistics-based rows to compute (none: --data-aware with no value)")
    p.add_argument("--adamerging", type=Path, nargs="*",
                   default=[RESULTS / "adamerging.json", RESULTS / "learned" / "adamerging.json"],
                   help="learned coefficients (adamerging.py's JSONs: entropy on unlabeled inputs, and cross-entropy "
                        "on labelled validation examples) evaluated here as rows; a missing file adds none")
    p.add_argument("--data-aware-seeds", nargs="+", type=int, default=None,
                   help="seeds that get the Fisher and RegMean rows (default: all; their statistics cost minutes a "
                        "task)")
    p.add_argument("--fisher-seeds", nargs="+", type=int, default=None,
                   help="fine-tuning seeds of the Fisher merging row (default: --data-aware-seeds); its exact "
                        "statistics take minutes per task on a CPU")
    p.add_argument("--stats-examples", type=int, default=256,
                   help="validation examples per task for the Gram matrices (RegMean) and the Fisher")
    p.add_argument("--fisher-examples", type=int, default=None,
                   help="validation examples per task for the exact Fisher (default: --stats-examples)")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--name", default="table1", help="file stem of the table (table1 -> table1.md/.json)")
    protocol_args(p)
    args = p.parse_args()
    args.tune_seeds = args.tune_seeds or list(args.seeds)
    return args


class Bench:
    """One seed's models, heads and splits, and the evaluation of a merged state dict."""

    def __init__(self, args, suite, heads, protocol, seed: int) -> None:
        self.args, self.suite, self.heads, self.seed = args, suite, heads, seed
        self.tasks = list(suite)
        self.test = {t: suite[t].test[:args.test_limit] for t in self.tasks}
        self.val = {t: suite[t].validation[:args.val_limit] for t in self.tasks}
        train = not args.cached_only
        self.ft = {t: task_model(suite[t], heads, protocol, seed, args.device, log, train) for t in self.tasks}
        try:  # the upper reference, not an input of any merge: a seed without it still has its merge rows
            self.multi = multitask_model(list(suite.values()), heads, protocol, seed, args.device, log, train)
        except NotCached as exc:
            log(f"seed {seed}: no multitask row ({exc})")
            self.multi = None
        self.base = base_dir()
        self.models = [self.ft[t] for t in self.tasks]
        settings = json.dumps([common.MAX_LENGTH, args.test_limit, args.val_limit, args.data_seed,
                               [str(d) for d in self.models]])
        self.cache = EvalCache(common.CACHE / "evals" / f"{hashlib.sha256(settings.encode()).hexdigest()[:12]}.json")

    def evaluate_state(self, state, splits) -> dict[str, float]:
        return dict(evaluate_encoder(load_encoder(self.base, self.args.device, state=state), splits,
                                     self.heads).accuracy)

    def merged_test(self, name: str, options: dict) -> dict[str, float]:
        key = f"merge:{name}:{json.dumps(options, sort_keys=True)}"
        return self.cache.get(key, lambda: self.evaluate_state(
            tiesmerge.merge(self.base, self.models, make_method(name, options), device=self.args.device,
                            memory_budget=common.MEMORY_BUDGET), self.test))


def reference_rows(bench: Bench, table: SeedTable) -> None:
    b, seed = bench, bench.seed
    table.row("zero-shot").per_seed[seed] = b.cache.get("zero-shot", lambda: dict(evaluate_encoder(
        load_encoder(b.base, b.args.device), b.test, b.heads).accuracy))
    table.row("fine-tuned").per_seed[seed] = b.cache.get("fine-tuned", lambda: {
        t: evaluate_encoder(load_encoder(b.ft[t], b.args.device), {t: b.test[t]}, b.heads).accuracy[t]
        for t in b.tasks})
    if b.multi is not None:
        table.row("multitask").per_seed[seed] = b.cache.get("multitask", lambda: dict(evaluate_encoder(
            load_encoder(b.multi, b.args.device), b.test, b.heads).accuracy))


def method_rows(bench: Bench, table: SeedTable, plans, choices: dict, searches: dict) -> None:
    """Default and validation rows of every planned method for one seed."""
    b, seed = bench, bench.seed
    for p in plans:
        if p.skip or p.name in DATA_AWARE:
            continue
        defaults = {k: getattr(make_method(p.name, {}), k) for k in p.grid}
        row = table.row(p.label)
        row.note = describe(defaults)
        row.per_seed[seed] = b.merged_test(p.name, {})
        log(f"seed {seed} {p.label} (defaults): {_mean(row.per_seed[seed]):.4f}")
        if not p.grid:
            continue
        if seed in b.args.tune_seeds:
            grid_key = json.dumps({k: list(v) for k, v in p.grid.items()}, sort_keys=True)

            def run_search(p=p):
                s = search(b.base, b.models, p.name, p.grid, lambda state: _mean(b.evaluate_state(state, b.val)),
                           device=b.args.device, rounds=b.args.widen_rounds, log=log)
                return {"best": s.best_options, "validation_score": s.best["score"], "points": s.points,
                        "merges": s.merges, "seconds": s.seconds, "edges": s.edges, "widened": s.widened,
                        "test": b.evaluate_state(s.best_state, b.test)}

            found = b.cache.get(f"search:{p.name}:{grid_key}:{b.args.widen_rounds}", run_search)
            searches.setdefault(p.name, {})[seed] = {k: v for k, v in found.items() if k != "test"}
            choices.setdefault(p.name, found["best"])
            accuracy = found["test"]
        else:
            accuracy = b.merged_test(p.name, choices[p.name])
        row = table.row(p.label, validation=True)
        row.per_seed[seed] = accuracy
        log(f"seed {seed} {p.label} (validation): {_mean(accuracy):.4f}")


def data_aware_rows(bench: Bench, table: SeedTable, plans, choices: dict, searches: dict) -> None:
    """Fisher merging and RegMean: statistics per task model (cached), an option chosen on validation."""
    from stats import stats_dir

    b, args, seed = bench, bench.args, bench.seed
    n_fisher = args.fisher_examples or args.stats_examples
    for name, kind, grid, examples in (
            ("regmean", "gram", [{"alpha": a} for a in (0.5, 0.7, 0.9, 0.95, 1.0)], args.stats_examples),
            ("fisher", "fisher", [{"normalize": "none"}, {"normalize": "rms"}], n_fisher)):
        if name not in args.data_aware or name not in {p.name for p in plans if not p.skip}:
            continue
        only = args.fisher_seeds if name == "fisher" and args.fisher_seeds is not None else args.data_aware_seeds
        if only is not None and seed not in only:  # the exact Fisher costs minutes per task: fewer seeds
            continue
        dirs = [stats_dir(kind, t, b.ft[t], b.heads[t], b.suite[t].validation[:examples], args.device, log)
                for t in b.tasks]

        def merged(options, dirs=dirs, name=name):
            return tiesmerge.merge(b.base, b.models, name, stats=dirs, device=args.device, **options)

        if seed in args.tune_seeds:
            def run_search(grid=grid, merged=merged):
                points, best, best_state = [], None, None
                for options in grid:
                    state = merged(options)
                    points.append({**options, "score": _mean(b.evaluate_state(state, b.val))})
                    if best is None or points[-1]["score"] > best["score"]:
                        best, best_state = points[-1], state
                return {"best": {k: v for k, v in best.items() if k != "score"}, "validation_score": best["score"],
                        "points": points, "test": b.evaluate_state(best_state, b.test)}

            found = b.cache.get(f"{name}:stats{examples}", run_search)
            searches.setdefault(name, {})[seed] = {k: v for k, v in found.items() if k != "test"}
            choices.setdefault(name, found["best"])
            accuracy = found["test"]
        else:
            accuracy = b.cache.get(f"{name}:stats{examples}:{json.dumps(choices[name])}",
                                   lambda name=name, merged=merged: b.evaluate_state(merged(choices[name]), b.test))
        row = table.row({"regmean": "RegMean", "fisher": "Fisher merging"}[name], validation=True)
        row.per_seed[seed] = accuracy
        row.note = f"{describe(choices[name])}; {examples} val. ex./task" + (
            f"; seed(s) {', '.join(map(str, only))} only" if only is not None and set(args.seeds) - set(only) else "")
        if name == "regmean" and choices[name].get("alpha") in (0.5, 1.0):
            row.flag = {1.0: "α=1 is the top of its valid range (exact RegMean)",
                        0.5: "α=0.5 is the bottom of the searched grid"}[choices[name]["alpha"]]
        log(f"seed {seed} {row.name} (validation): {_mean(accuracy):.4f}")


def learned_rows(bench: Bench, table: SeedTable) -> None:
    """AdaMerging rows: the coefficients adamerging.py learned for this seed's models (its JSON), merged here and
    evaluated on this table's test examples, so the rows compare with the others (adamerging.md scores them on
    its own, smaller test slice). The coefficients are stored to 4 decimals; the row is that merge."""
    from adamerging import VARIANTS, VECTORS

    from tiesmerge.adamerging import LearnedMerge

    paths = [p for p in bench.args.adamerging or () if p.is_file()]
    if not paths:
        return
    import torch
    from safetensors import safe_open

    b, seed = bench, bench.seed
    with safe_open(str(next(b.base.glob("*.safetensors"))), "pt") as f:
        names = list(f.keys())
    for r in (row for path in paths for row in json.loads(path.read_text())["rows"]):
        c = r.get("coefficients")
        if r["seed"] != seed or not c or c["tasks"] != b.tasks:
            continue
        inner_name, options = VECTORS[r["vectors"]]
        inner = make_method(r["vectors"], options)
        layers = c["layers"] if r["granularity"] == "layer" else names
        values = torch.tensor(c["values"], dtype=torch.float32)  # (T, L) or (T, 1)
        learned = LearnedMerge.of(inner, values, layers, r["granularity"], "adamerging_coefficients.json")
        digest = hashlib.sha256(json.dumps(c, sort_keys=True).encode()).hexdigest()[:12]
        accuracy = b.cache.get(f"learned:{r['method']}:{r['variant']}:{digest}", lambda learned=learned: (
            b.evaluate_state(tiesmerge.merge(b.base, b.models, learned, device=b.args.device), b.test)))
        on_validation = r["variant"] in (VARIANTS["val"], VARIANTS["val_labels"])
        where = {VARIANTS["val"]: "on validation inputs, unlabeled", VARIANTS["test"]: "on test inputs, unlabeled",
                 VARIANTS["val_labels"]: "on labelled validation examples (cross-entropy)"}[r["variant"]]
        row = table.row(f"{r['method']} {where}", validation=on_validation)
        learned_with = r["settings"]
        row.note = (f"{learned_with['steps']} Adam steps, lr {learned_with['lr']}, batch {learned_with['batch_size']}; "
                    "adamerging.md")
        row.per_seed[seed] = accuracy
        log(f"seed {seed} {row.name}: {_mean(accuracy):.4f} ({inner_name})")


def _mean(accuracy: dict[str, float]) -> float:
    return sum(accuracy.values()) / len(accuracy)


def main() -> None:
    args = parse_args()
    suite, tasks, heads, seconds = common.start_run(args)
    protocol = protocol_from(args)
    plans = [dataclasses.replace(p, grid=shrink(thin(p.grid, args.max_axis_values), args.max_grid_points))
             for p in plan(len(tasks), args.methods)]

    table = SeedTable(tasks)
    for name in ("zero-shot", "fine-tuned", "multitask"):
        table.row(name)
    for p in plans:  # the order of the table: defaults first, then the validation rows
        if not p.skip and p.name not in DATA_AWARE:
            table.row(p.label)
    for p in plans:
        if not p.skip and p.name not in DATA_AWARE and p.grid:
            table.row(p.label, validation=True)
    choices: dict[str, dict] = {}
    searches: dict[str, dict] = {}
    benches: dict[int, Bench] = {}
    missing_seeds: dict[int, str] = {}
    # the tuning seeds first: the other seeds reuse their choices
    for seed in sorted(args.seeds, key=lambda s: (s not in args.tune_seeds, s)):
        clock = time.perf_counter()
        try:
            bench = benches[seed] = Bench(args, suite, heads, protocol, seed)
        except NotCached as exc:
            missing_seeds[seed] = str(exc)
            log(f"seed {seed} left out: {exc}")
            continue
        seconds[f"seed{seed}:models"] = time.perf_counter() - clock
        clock = time.perf_counter()
        reference_rows(bench, table)
        method_rows(bench, table, plans, choices, searches)
        seconds[f"seed{seed}:merges"] = time.perf_counter() - clock
        clock = time.perf_counter()
        learned_rows(bench, table)
        seconds[f"seed{seed}:adamerging_rows"] = time.perf_counter() - clock
        if any(p.name in args.data_aware and not p.skip for p in plans) and \
                (args.data_aware_seeds is None or seed in args.data_aware_seeds):
            clock = time.perf_counter()
            data_aware_rows(bench, table, plans, choices, searches)
            seconds[f"seed{seed}:fisher_regmean"] = time.perf_counter() - clock
        _flag_edges(table, searches)
        _write(table, args, plans, protocol, suite, searches, seconds, benches, missing_seeds)
    if not benches:
        raise SystemExit(f"no seed has all its models cached: {missing_seeds}")
    clock = time.perf_counter()
    curves.write(args.out, protocol, suite, heads, args.seeds, args.device)
    seconds["curves"] = time.perf_counter() - clock
    if not args.skip_fig5:
        clock = time.perf_counter()
        fig5.run(args, benches[args.seeds[0]], table, searches, choices, plans, log)
        seconds["fig5"] = time.perf_counter() - clock
    _write(table, args, plans, protocol, suite, searches, seconds, benches, missing_seeds)
    log(f"done: {json.dumps({k: round(v) for k, v in seconds.items()})}")


def _flag_edges(table: SeedTable, searches: dict) -> None:
    from plan import label

    for name, by_seed in searches.items():
        edges = sorted({e for s in by_seed.values() for e in s.get("edges", [])})
        if edges:
            table.row(label(name), validation=True).flag = "; ".join(edges)


def _write(table: SeedTable, args, plans, protocol, suite, searches, seconds, benches, missing_seeds) -> None:
    tasks = table.tasks
    tuned = {p.name: describe(choices) for p in plans if (choices := _first(searches.get(p.name)))}
    for r in table.rows:
        if r.validation:
            name = next((p.name for p in plans if p.label == r.name), None)
            if name in tuned and name not in DATA_AWARE:
                r.note = tuned[name]
    any_bench = next(iter(benches.values()))
    meta = {"seeds": args.seeds, "tune_seeds": args.tune_seeds, "data_seed": args.data_seed,
            "device": args.device, "hardware": hardware(), "max_length": common.MAX_LENGTH,
            "protocol": {k: v for k, v in protocol.__dict__.items()},
            "test_per_task": {t: len(any_bench.test[t]) for t in tasks},
            "validation_per_task_for_tuning": {t: len(any_bench.val[t]) for t in tasks},
            "skipped_methods": {p.name: p.skip for p in plans if p.skip},
            "grids": {p.name: {k: list(v) for k, v in p.grid.items()} for p in plans if p.grid},
            "searches": searches, "seconds": seconds, "seeds_left_out": missing_seeds,
            "tiesmerge_version": tiesmerge.__version__,
            "reused_from_cache": sorted({k for b in benches.values() for k in b.cache.reused})}
    table.meta = meta
    pre = (f"# Table 1 in miniature: all-MiniLM-L6-v2, converged task models, {len(benches)} fine-tuning "
           f"seed(s) ({', '.join(map(str, sorted(benches)))})\n\n"
           f"Accuracy (%) on each task's test split ({', '.join(f'{t} {n}' for t, n in meta['test_per_task'].items())} "
           "examples), mean ± std over the fine-tuning seeds. Normalized mean: each task's accuracy ÷ the same "
           "seed's own fine-tuned model's, averaged over tasks, then mean ± std over seeds; worst task: the task "
           "with the lowest normalized accuracy (mean over seeds). Rows with val = no use the method's defaults "
           "(its paper's); rows with val = yes chose their options on validation data "
           f"({sum(meta['validation_per_task_for_tuning'].values())} examples over all tasks) over the method's own "
           "grid (declared on its options, widened where the best value sat on an edge; ⚠ marks a choice "
           "still on an edge). "
           + (f"Hyperparameters were chosen on seed {args.tune_seeds[0]}'s validation data and reused for "
              f"the other seeds. " if set(args.tune_seeds) != set(args.seeds) else "")
           + "Fisher merging and RegMean compute their statistics with each task's own model on the first "
           "examples of its validation split.\n\n")
    left_out = (f"\nSeeds left out (models not cached; `--cached-only`): {sorted(missing_seeds)}.\n"
                if missing_seeds else "")
    post = "\n" + _goal(table) + "\n" + _protocol_text(meta, protocol, suite) + _skipped(meta) + left_out + (
        "\nSeconds per stage in this run: " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items())
        + (f" ({len(meta['reused_from_cache'])} results reused from an earlier run with the same settings)"
           if meta["reused_from_cache"] else "") + ".\n")
    table.write(args.out / f"{args.name}.md", args.out / f"{args.name}.json", preamble=pre, epilogue=post)
    log(f"wrote {args.out / (args.name + '.md')}")


def _first(by_seed: dict | None) -> dict | None:
    return next(iter(by_seed.values()))["best"] if by_seed else None


def _goal(table: SeedTable) -> str:
    merges = [r for r in table.rows if r.name not in ("zero-shot", "fine-tuned", "multitask") and table.seeds(r)]
    if not merges:
        return ""
    summaries = {(r.name, r.validation): table.summary(r) for r in merges}
    best = max(merges, key=lambda r: summaries[(r.name, r.validation)]["normalized_mean"][0])
    s = summaries[(best.name, best.validation)]
    reached = [r for r in merges if summaries[(r.name, r.validation)]["goal"]]
    head = (f"**Goal (issue 12): one merged model keeping ≥ {100 * GOAL_MEAN:.0f}% normalized mean with no task "
            f"below {100 * GOAL_FLOOR:.0f}% of its own model, choices on validation only. ")
    if reached:
        head += "Reached** by " + ", ".join(f"{r.name} ({'val' if r.validation else 'defaults'})" for r in reached)
    else:
        head += (f"Not reached.** The best merge, {best.name} ({'val' if best.validation else 'defaults'}), keeps "
                 f"{100 * s['normalized_mean'][0]:.1f} ± {100 * s['normalized_mean'][1]:.1f}% "
                 f"({100 * (GOAL_MEAN - s['normalized_mean'][0]):.1f} points short); its worst task is "
                 f"{s['worst_task']} at {100 * s['worst_normalized']:.1f}% of its own model")
    multi = next((r for r in table.rows if r.name == "multitask" and table.seeds(r)), None)
    if multi is not None:
        head += f". The multitask model keeps {100 * table.summary(multi)['normalized_mean'][0]:.1f}%"
    return head + ".\n"


def _protocol_text(meta, protocol, suite) -> str:
    train = sorted({len(t.train[:protocol.train_limit]) for t in suite.values()})
    return (f"\nFine-tuning (common.Protocol): {'the first ' if protocol.train_limit else 'the full train split, '}"
            f"{train} training examples per task, max length {meta['max_length']} tokens, "
            f"batch {protocol.batch_size}, AdamW, "
            f"linear warm-up and decay over at most {protocol.max_epochs} epochs, early stopping on validation "
            f"accuracy (patience {protocol.patience}, the best epoch kept); learning rate per task from the "
            f"ladder {list(protocol.lrs)} on seed {protocol.select_seed}, reused for the other seeds; multitask: lr "
            f"{protocol.multitask_lr}, at most {protocol.multitask_epochs} epoch(s) of all {len(suite)} tasks. Curves: "
            "finetune_curves.md. Device "
            f"{meta['device']} ({meta['hardware'].get('gpu') or meta['hardware']['processor']}, "
            f"{meta['hardware']['cpu_count']} CPUs, torch {meta['hardware']['torch']}).\n")


def _skipped(meta) -> str:
    if not meta["skipped_methods"]:
        return ""
    return ("\nRegistered methods without a row here: "
            + "; ".join(f"{k}: {v}" for k, v in meta["skipped_methods"].items()) + ".\n")


if __name__ == "__main__":
    main()
