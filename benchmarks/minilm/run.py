"""Table 1 in miniature: fine-tune MiniLM on 8 real tasks, merge, evaluate. Run from the repo root:

    python benchmarks/minilm/run.py                  # everything; reuses cached data and models
    python benchmarks/minilm/run.py --device cuda    # the same on a GPU, with the full protocol

Writes benchmarks/results/table1.md + .json and fig5.md + .png + .json. Every merge goes
through tiesmerge.merge; hyperparameters with validation come from tiesmerge.tuning.tune.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import common  # noqa: E402
from common import base_dir, finetuned_dir, hardware, load_encoder, make_heads  # noqa: E402

import tiesmerge  # noqa: E402
from tiesmerge.evaluation import ResultRow, ResultsTable, SuiteResult, evaluate_encoder  # noqa: E402
from tiesmerge.evaluation.finetune import TrainConfig  # noqa: E402
from tiesmerge.methods import Average, TaskArithmetic, Ties  # noqa: E402
from tiesmerge.tuning import paper_grid, tune  # noqa: E402
from tiesmerge_bench import TASK_NAMES, load_suite  # noqa: E402

RESULTS = Path(__file__).resolve().parents[1] / "results"


class EvalCache:
    """Results already computed under the same settings, so a rerun only does what is missing."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data = json.loads(path.read_text()) if path.is_file() else {}
        self.reused: list[str] = []

    def get(self, key: str, compute):
        if key in self.data:
            self.reused.append(key)
        else:
            self.data[key] = compute()
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps(self.data, indent=1))
        return self.data[key]


def eval_cache(args, ft_dirs: dict[str, Path], multi_dir: Path) -> EvalCache:
    """The cache of every result computed under these settings (data limits, models, seed)."""
    settings = json.dumps([common.MAX_LENGTH, args.train_limit, args.test_limit, args.val_limit, args.seed,
                           args.epochs, [str(d) for d in ft_dirs.values()], str(multi_dir)])
    return EvalCache(common.CACHE / "evals" / f"{hashlib.sha256(settings.encode()).hexdigest()[:12]}.json")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", nargs="+", default=list(TASK_NAMES))
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--train-limit", type=int, default=None, help="train examples per task (default all: 2000)")
    p.add_argument("--test-limit", type=int, default=None, help="test examples per task (default all: 1000)")
    p.add_argument("--val-limit", type=int, default=None, help="validation examples per task used for tuning")
    p.add_argument("--fig5-limit", type=int, default=None, help="test examples per task in the Fig. 5 sweep")
    p.add_argument("--fig5-subsets", type=int, default=10, help="subsets per number of tasks (paper: 10)")
    p.add_argument("--skip-fig5", action="store_true")
    p.add_argument("--stats-examples", type=int, default=256,
                   help="validation examples per task for the Gram matrices (RegMean) and the Fisher")
    p.add_argument("--fisher-examples", type=int, default=None,
                   help="validation examples per task for the exact Fisher (default: --stats-examples); "
                        "each costs one backward pass per class")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--name", default="table1", help="file stem of the table (table1 -> table1.md/.json)")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    clock = time.perf_counter()

    # -- data and heads
    suite = load_suite(args.tasks, seed=args.seed)
    tasks = list(suite)
    test = {t: suite[t].test[:args.test_limit] for t in tasks}
    val = {t: suite[t].validation[:args.val_limit] for t in tasks}
    heads = make_heads(suite, args.device)
    seconds["data"] = time.perf_counter() - clock
    log(f"data: {', '.join(f'{t} {len(suite[t].train)}/{len(val[t])}/{len(test[t])}' for t in tasks)}")

    # -- fine-tuning (cached)
    clock = time.perf_counter()
    config = TrainConfig(epochs=args.epochs, seed=args.seed)
    ft_dirs = {t: finetuned_dir(t, [suite[t]], heads, config, args.device, train_limit=args.train_limit, log=log)
               for t in tasks}
    multi_dir = finetuned_dir("multitask", [suite[t] for t in tasks], heads, config, args.device,
                              train_limit=args.train_limit, log=log)
    seconds["finetune"] = time.perf_counter() - clock
    base = base_dir()

    def evaluate_state(state, splits) -> SuiteResult:
        return evaluate_encoder(load_encoder(base, args.device, state=state), splits, heads)

    cache = eval_cache(args, ft_dirs, multi_dir)

    def accuracy(key: str, compute) -> SuiteResult:
        return SuiteResult(cache.get(key, lambda: dict(compute().accuracy)))

    table = ResultsTable(tasks=tasks)
    clock = time.perf_counter()
    table.add(ResultRow("zero-shot", accuracy("zero-shot", lambda: evaluate_encoder(load_encoder(base, args.device),
                                                                                    test, heads))))
    own = accuracy("fine-tuned", lambda: SuiteResult({t: evaluate_encoder(load_encoder(ft_dirs[t], args.device),
                                                                          {t: test[t]}, heads).accuracy[t]
                                                      for t in tasks}))
    table.add(ResultRow("fine-tuned", own, note="each task's own model"))
    table.add(ResultRow("multitask", accuracy("multitask", lambda: evaluate_encoder(
        load_encoder(multi_dir, args.device), test, heads))))
    seconds["evaluate_references"] = time.perf_counter() - clock
    log(f"references: zero-shot {table.rows[0].result.mean:.3f}, fine-tuned {table.rows[1].result.mean:.3f}, "
        f"multitask {table.rows[2].result.mean:.3f}")

    # -- merges without validation (paper defaults)
    models = [ft_dirs[t] for t in tasks]
    clock = time.perf_counter()
    for label, method in (("averaging", Average()), ("task arithmetic", TaskArithmetic(lam=0.4)),
                          ("TIES", Ties(density=0.2, lam=1.0))):
        note = {"averaging": "", "task arithmetic": "λ=0.4", "TIES": "k=0.2, λ=1"}[label]
        table.add(ResultRow(label, accuracy(f"merge:{label}", lambda method=method: evaluate_state(
            tiesmerge.merge(base, models, method, device=args.device), test)), note=note))
        log(f"{label}: {table.rows[-1].result.mean:.3f}")
    seconds["merge_and_evaluate"] = time.perf_counter() - clock

    # -- with validation: lam (and density) tuned on validation, evaluated on test
    clock = time.perf_counter()
    tuning = {}
    for label, name in (("task arithmetic", "task_arithmetic"), ("TIES", "ties")):
        def search(name=name) -> dict:
            result = tune(base, models, name, lambda state: evaluate_state(state, val).mean, grid=paper_grid(name),
                          device=args.device)
            best = result.best
            return {"best": {**best.options, "lam": best.lam, "validation_score": best.score},
                    "merges": result.merges, "points": len(result.points), "seconds": result.seconds,
                    "grid": [{**pt.options, "lam": pt.lam, "score": pt.score} for pt in result.points],
                    "test": dict(evaluate_state(result.best_state, test).accuracy)}

        tuning[name] = cache.get(f"tune:{name}", search)
        best = tuning[name]["best"]
        note = ", ".join(f"{k}={v}" for k, v in best.items() if k != "validation_score").replace("density", "k")
        note = note.replace("lam", "λ")
        table.add(ResultRow(label, SuiteResult(tuning[name]["test"]), validation=True, note=note))
        log(f"{label} (val): {note} -> test {table.rows[-1].result.mean:.3f} "
            f"({tuning[name]['points']} points, {tuning[name]['merges']} merges)")
    seconds["tune"] = time.perf_counter() - clock

    # -- data-aware baselines: statistics from validation data, one option chosen on validation
    clock = time.perf_counter()
    data_aware = data_aware_rows(args, suite, tasks, ft_dirs, base, heads, models, val, test, evaluate_state, cache)
    for label, entry in data_aware.items():
        table.add(ResultRow(label, SuiteResult(entry["test"]), validation=True, note=entry["note"]))
        log(f"{label} (val): {entry['note']} -> test {table.rows[-1].result.mean:.3f}")
    tuning.update({k: {kk: vv for kk, vv in v.items() if kk != "test"} for k, v in data_aware.items()})
    seconds["fisher_regmean"] = time.perf_counter() - clock

    meta = {"seed": args.seed, "device": args.device, "hardware": hardware(), "max_length": common.MAX_LENGTH,
            "epochs": args.epochs, "lr": config.lr, "batch_size": config.batch_size,
            "train_per_task": {t: len(suite[t].train[:args.train_limit]) for t in tasks},
            "validation_per_task_for_tuning": {t: len(val[t]) for t in tasks},
            "validation_per_task_for_statistics": {"fisher": args.fisher_examples or args.stats_examples,
                                                   "gram": args.stats_examples},
            "test_per_task": {t: len(test[t]) for t in tasks},
            "sources": {t: [{"path": s.path, "sha256": s.sha256, "size": s.size} for s in suite[t].sources]
                        for t in tasks},
            "tuning": tuning, "seconds": seconds, "tiesmerge_version": tiesmerge.__version__}
    meta["reused_from_cache"] = cache.reused  # results computed by an earlier run with the same settings
    table.meta = meta
    _write_table(table, args, meta)

    if not args.skip_fig5:
        clock = time.perf_counter()
        fig5(args, suite, ft_dirs, base, heads, evaluate_state, cache)
        seconds["fig5"] = time.perf_counter() - clock
        _write_table(table, args, meta)
    log(f"done: {json.dumps({k: round(v) for k, v in seconds.items()})}")


def _write_table(table: ResultsTable, args, meta) -> None:
    m = meta
    pre = (f"# Table 1 in miniature: all-MiniLM-L6-v2 fine-tuned on {len(table.tasks)} real tasks\n\n"
           f"Accuracy (%) on each task's test split ({', '.join(f'{t} {n}' for t, n in m['test_per_task'].items())} "
           f"examples). Rows with val = yes chose their hyperparameters on validation data "
           f"({sum(m['validation_per_task_for_tuning'].values())} examples over all tasks; "
           "TIES: k ∈ {0.1, 0.2, 0.3} × "
           "λ ∈ 0.8…3.0 step 0.1; task arithmetic: λ ∈ 0.1…1.0). Fisher merging and RegMean compute their "
           "statistics with each task's own model on the first examples of its validation split "
           f"(exact Fisher: {m['validation_per_task_for_statistics']['fisher']} per task; Gram matrices: "
           f"{m['validation_per_task_for_statistics']['gram']} per task, padding excluded) and choose one option "
           "on the tuning examples (Fisher: normalize ∈ {none, rms}, ε = 1e-6; RegMean: α ∈ {0.5, 0.7, 0.9, 0.95, 1}). "
           "Normalized mean: each task's accuracy ÷ its own fine-tuned model's, averaged.\n\n")
    post = (f"\nSettings: seed {m['seed']}, device {m['device']} "
            f"({m['hardware'].get('gpu') or m['hardware']['processor']}, "
            f"{m['hardware']['cpu_count']} CPUs, torch {m['hardware']['torch']}), max length {m['max_length']} tokens, "
            f"{m['epochs']} epochs, lr {m['lr']}, batch {m['batch_size']}, "
            f"train examples per task {sorted(set(m['train_per_task'].values()))}.\n\n"
            "Seconds per stage in this run: " + ", ".join(f"{k} {v:.0f}" for k, v in m["seconds"].items())
            + (f" ({len(m['reused_from_cache'])} results reused from an earlier run with the same settings, "
               "listed in the JSON; benchmarks/README.md gives the times of the run that computed them)"
               if m.get("reused_from_cache") else "") + "\n")
    table.write(args.out / f"{args.name}.md", args.out / f"{args.name}.json", preamble=pre, epilogue=post)
    log(f"wrote {args.out / (args.name + '.md')}")


def data_aware_rows(args, suite, tasks, ft_dirs, base, heads, models, val, test, evaluate_state,
                    cache: EvalCache) -> dict[str, dict]:
    """Fisher merging and RegMean: statistics per task model (cached), an option chosen on validation."""
    from stats import stats_dir

    n_fisher = args.fisher_examples or args.stats_examples
    searches = (("RegMean", "regmean", "gram", [{"alpha": a} for a in (0.5, 0.7, 0.9, 0.95, 1.0)], args.stats_examples),
                ("Fisher merging", "fisher", "fisher", [{"normalize": "none"}, {"normalize": "rms"}], n_fisher))
    rows = {}
    for label, name, kind, grid, examples in searches:
        dirs = [stats_dir(kind, t, ft_dirs[t], heads[t], suite[t].validation[:examples], args.device, log)
                for t in tasks]

        def search(name=name, grid=grid, dirs=dirs, examples=examples) -> dict:
            points, best, best_state = [], None, None
            started = time.perf_counter()
            for options in grid:
                state = tiesmerge.merge(base, models, name, stats=dirs, device=args.device, **options)
                score = evaluate_state(state, val).mean
                points.append({**options, "score": score})
                log(f"  {name} {options}: validation {score:.4f}")
                if best is None or score > best["score"]:
                    best, best_state = points[-1], state
            return {"best": best, "grid": points, "statistics_examples": examples, "merges": len(points),
                    "seconds": time.perf_counter() - started,
                    "test": dict(evaluate_state(best_state, test).accuracy)}

        entry = cache.get(f"{name}:stats{examples}", search)
        options = ", ".join(f"{k}={v}" for k, v in entry["best"].items() if k != "score").replace("alpha", "α")
        rows[label] = {**entry, "note": f"{options}; {examples} val. ex./task"}
    return rows


def fig5(args, suite, ft_dirs, base, heads, evaluate_state, cache: EvalCache) -> None:
    """Normalized accuracy vs number of tasks merged (Fig. 5): every size 2..n, up to K subsets each."""
    tasks = list(suite)
    test = {t: suite[t].test[:args.fig5_limit] for t in tasks}
    reference = cache.get(f"fig5:reference:{args.fig5_limit}", lambda: {
        t: evaluate_encoder(load_encoder(ft_dirs[t], args.device), {t: test[t]}, heads).accuracy[t] for t in tasks})
    rng = random.Random(args.seed)
    methods = {"averaging": Average(), "task arithmetic": TaskArithmetic(lam=0.4), "TIES": Ties(density=0.2, lam=1.0)}
    points = []
    for size in range(2, len(tasks) + 1):
        subsets = list(itertools.combinations(tasks, size))
        if len(subsets) > args.fig5_subsets:
            subsets = rng.sample(subsets, args.fig5_subsets)
        for subset in subsets:
            for label, method in methods.items():
                acc = cache.get(f"fig5:{args.fig5_limit}:{label}:{','.join(subset)}",
                                lambda subset=subset, method=method:
                                dict(evaluate_state(tiesmerge.merge(base, [ft_dirs[t] for t in subset], method,
                                                                    device=args.device),
                                                    {t: test[t] for t in subset}).accuracy))
                norm = sum(acc[t] / reference[t] for t in subset) / len(subset)
                points.append({"size": size, "tasks": list(subset), "method": label, "normalized": norm,
                               "accuracy": acc})
        log(f"fig5: size {size} done ({len(subsets)} subsets)")
    summary = {}
    for label in methods:
        summary[label] = {size: sum(p["normalized"] for p in points if p["method"] == label and p["size"] == size)
                          / max(1, sum(1 for p in points if p["method"] == label and p["size"] == size))
                          for size in range(2, len(tasks) + 1)}
    (args.out / "fig5.json").write_text(json.dumps({"reference": reference, "points": points, "summary": summary,
                                                    "test_per_task": {t: len(test[t]) for t in tasks},
                                                    "subsets_per_size": args.fig5_subsets}, indent=2) + "\n")
    sizes = list(range(2, len(tasks) + 1))
    lines = ["# Fig. 5 analogue: normalized accuracy vs number of tasks merged\n",
             f"Mean over up to {args.fig5_subsets} seeded subsets per size; normalized = merged accuracy ÷ the task's "
             f"own fine-tuned accuracy, on {len(next(iter(test.values())))} test examples per task.\n",
             "| method | " + " | ".join(str(s) for s in sizes) + " |", "|---|" + "---|" * len(sizes)]
    for label in methods:
        lines.append(f"| {label} | " + " | ".join(f"{100 * summary[label][s]:.1f}" for s in sizes) + " |")
    (args.out / "fig5.md").write_text("\n".join(lines) + "\n\n![fig5](fig5.png)\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, marker in zip(methods, "osD"):
        ax.plot(sizes, [100 * summary[label][s] for s in sizes], marker=marker, label=label)
    ax.set_xlabel("number of tasks merged")
    ax.set_ylabel("normalized accuracy (%)")
    ax.set_title("MiniLM, 8 text tasks (cf. paper Fig. 5)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out / "fig5.png", dpi=120)


if __name__ == "__main__":
    main()
