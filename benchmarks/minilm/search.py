"""CMA-ES over per-model densities and weights (and lam) against the paper's grid, on MiniLM.

Both searches score candidates by mean validation accuracy over the tasks and get the same number
of evaluations (the paper's TIES grid: 3 densities x 23 lams = 69). The grid runs through
``tiesmerge.tuning.tune`` (3 merges, lam swept on top); CMA-ES through ``run_search`` on a local
Ray cluster, once with 2 workers and once with 1 (the same candidates and scores: only the wall
time differs). Both winners are then scored on the test splits. Run from the repo root:

    python benchmarks/minilm/search.py   # see benchmarks/README.md for the committed CPU run

Writes benchmarks/results/search.md + .json, and the CMA-ES report in benchmarks/results/search/.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import common  # noqa: E402
from common import base_dir, finetuned_dir, hardware, load_encoder, make_heads  # noqa: E402

import tiesmerge  # noqa: E402
from tiesmerge.evaluation import evaluate_encoder  # noqa: E402
from tiesmerge.evaluation.finetune import TrainConfig  # noqa: E402
from tiesmerge.tuning import RayExecutor, paper_grid, run_search, tune, write_report  # noqa: E402
from tiesmerge_bench import load_suite  # noqa: E402

RESULTS = Path(__file__).resolve().parents[1] / "results"
AXES = ("densities", "weights", "lam")


_ENCODERS: dict = {}  # (base, device) -> the encoder each process loads once and refills per candidate


class MeanAccuracy:
    """The evaluator: mean accuracy over the tasks' ``splits`` of the encoder holding ``state``.

    main() uses it as ``search.MeanAccuracy`` (not ``__main__``'s), so Ray workers import this module
    and keep one encoder per worker process: loading it (tokenizer and model) per candidate would
    cost more than scoring a small validation set."""

    def __init__(self, base: Path, splits: dict, heads: dict, device: str) -> None:
        self.base, self.splits, self.heads, self.device = base, splits, heads, device

    def _encoder(self, state):
        key = (str(self.base), self.device)
        if key not in _ENCODERS:
            _ENCODERS[key] = load_encoder(self.base, self.device)
        encoder = _ENCODERS[key]
        missing, unexpected = encoder.model.load_state_dict(dict(state), strict=False)
        if [k for k in missing if "position_ids" not in k] or unexpected:
            raise ValueError(f"state does not fit {self.base}: missing {missing[:3]}, unexpected {unexpected[:3]}")
        return encoder

    def __call__(self, state) -> float:
        return evaluate_encoder(self._encoder(state), self.splits, self.heads).mean

    def per_task(self, state) -> dict[str, float]:
        return dict(evaluate_encoder(self._encoder(state), self.splits, self.heads).accuracy)


def warm_up() -> int:
    """A Ray task that imports what the evaluations need: run once per worker before the clock starts,
    so the timed search does not include starting the workers' Python (torch, transformers)."""
    import transformers  # noqa: F401

    import tiesmerge.tuning  # noqa: F401

    time.sleep(1.0)  # long enough that the workers' warm-ups overlap: each lands on its own worker
    return os.getpid()


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tasks", nargs="+", default=["wn_noun", "wn_verb", "fortune"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--train-limit", type=int, default=500, help="train examples per task")
    p.add_argument("--val-limit", type=int, default=100, help="validation examples per task (the search's score)")
    p.add_argument("--test-limit", type=int, default=500, help="test examples per task")
    p.add_argument("--lams", type=float, nargs="+", help="the grid's lam values (default the paper's 23)")
    p.add_argument("--popsize", type=int, default=8, help="CMA-ES generation size")
    p.add_argument("--workers", type=int, nargs="+", default=[2, 1], help="Ray workers of the timed CMA-ES runs")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()
    clock = time.perf_counter()
    suite = load_suite(args.tasks, seed=args.seed)
    tasks = list(suite)
    val = {t: suite[t].validation[:args.val_limit] for t in tasks}
    test = {t: suite[t].test[:args.test_limit] for t in tasks}
    heads = make_heads(suite, args.device)
    config = TrainConfig(epochs=args.epochs, seed=args.seed)
    ft = [finetuned_dir(t, [suite[t]], heads, config, args.device, train_limit=args.train_limit, log=log)
          for t in tasks]
    base = base_dir()
    log(f"data and fine-tunes ready in {time.perf_counter() - clock:.0f} s: {', '.join(d.name for d in ft)}")
    import search  # this file as a module, for the workers (see MeanAccuracy)

    on_val = search.MeanAccuracy(base, val, heads, args.device)
    on_test = search.MeanAccuracy(base, test, heads, args.device)
    grid = paper_grid("ties")
    if args.lams:
        grid["lam"] = tuple(args.lams)
    budget = len(grid["density"]) * len(grid["lam"])

    clock = time.perf_counter()
    grid_result = tune(base, ft, "ties", on_val, grid=grid, device=args.device,
                       on_point=lambda pt: log(f"  grid {pt.options} lam={pt.lam}: {pt.score:.4f}"))
    grid_seconds = time.perf_counter() - clock
    gb = grid_result.best
    log(f"grid (tune, in-process): density={gb.options['density']} lam={gb.lam} val {gb.score:.4f} "
        f"({len(grid_result.points)} evaluations, {grid_result.merges} merges, {grid_seconds:.0f} s)")
    grid_test = on_test.per_task(grid_result.best_state)

    n = len(ft)
    start = {"densities": (0.2,) * n, "weights": (1.0,) * n, "lam": 1.0}  # TIES's paper defaults
    runs, cmaes = {}, None
    for workers in args.workers:
        with tempfile.TemporaryDirectory() as tmp:  # a fresh log: every candidate is scored in each timed run
            executor = RayExecutor(workers=workers)
            try:
                import ray

                clock = time.perf_counter()
                pids = ray.get([ray.remote(search.warm_up).remote() for _ in range(workers)])
                warm = time.perf_counter() - clock
                clock = time.perf_counter()
                result = run_search(base, ft, "ties", on_val, strategy="cmaes", budget=budget, seed=args.seed,
                                    axes=AXES, start=start, popsize=args.popsize, executor=executor,
                                    log=str(Path(tmp) / "log.jsonl"),
                                    device=args.device, on_trial=lambda t: log(f"  cmaes [{t.index}] {t.score:.4f}"))
                seconds = time.perf_counter() - clock
            finally:
                executor.close()
        runs[workers] = {"seconds": seconds, "warm_up_seconds": warm, "warmed_workers": len(set(pids)),
                         "evaluations": result.evaluations, "merges": result.merges,
                         "eval_seconds_sum": sum(t.seconds for t in result.trials)}
        log(f"cmaes on Ray, {workers} worker(s): val {result.best.score:.4f} in {seconds:.0f} s")
        if cmaes is None:
            cmaes = result
        else:  # the same seed proposes the same candidates: the scores must agree, whatever the workers
            same = [t.score for t in result.trials] == [t.score for t in cmaes.trials]
            runs[workers]["same_scores_as_first_run"] = same
    assert cmaes is not None
    cmaes_test = on_test.per_task(cmaes.best_state)
    report = write_report(cmaes, args.out / "search")
    data = {
        "tasks": tasks, "budget": budget, "seed": args.seed, "fine_tunes": [d.name for d in ft],
        "protocol": {"train_per_task": args.train_limit, "epochs": args.epochs, "val_per_task": args.val_limit,
                     "test_per_task": args.test_limit, "max_length": common.MAX_LENGTH},
        "grid": {"densities": list(grid["density"]), "lams": list(grid["lam"]),
                 "best": {**gb.options, "lam": gb.lam}, "validation": gb.score, "test": grid_test,
                 "test_mean": sum(grid_test.values()) / n, "seconds": grid_seconds, "merges": grid_result.merges},
        "cmaes": {"best": {k: list(v) if isinstance(v, tuple) else v for k, v in cmaes.best.options.items()},
                  "space": cmaes.space.describe(), "popsize": args.popsize,
                  "validation": cmaes.best.score, "test": cmaes_test, "test_mean": sum(cmaes_test.values()) / n,
                  "runs": {str(k): v for k, v in runs.items()},
                  "trials": [{"options": {k: list(v) if isinstance(v, tuple) else v for k, v in t.options.items()},
                              "score": t.score} for t in cmaes.trials]},
        "hardware": hardware(), "tiesmerge_version": tiesmerge.__version__,
    }
    (args.out / "search.json").write_text(json.dumps(data, indent=1) + "\n")
    (args.out / "search.md").write_text(render(data, report))
    log(f"wrote {args.out / 'search.md'}")


def render(d: dict, report: Path) -> str:
    tasks = d["tasks"]
    g, c = d["grid"], d["cmaes"]
    pct = lambda x: f"{100 * x:.1f}"  # noqa: E731

    def opts(best: dict) -> str:
        return ", ".join(f"{k}=" + ("(" + ", ".join(f"{v:.3g}" for v in val) + ")" if isinstance(val, list)
                                    else f"{val:.3g}") for k, val in best.items())

    axes = f"k in {g['densities']} x {len(g['lams'])} λ in {g['lams'][0]:g}..{g['lams'][-1]:g}"
    rows = [f"| grid (`tune`: {axes}) | {opts(g['best'])} | {pct(g['validation'])} | "
            + " | ".join(pct(g["test"][t]) for t in tasks) + f" | **{pct(g['test_mean'])}** |",
            f"| CMA-ES (per-model densities, weights, λ) | {opts(c['best'])} | {pct(c['validation'])} | "
            + " | ".join(pct(c["test"][t]) for t in tasks) + f" | **{pct(c['test_mean'])}** |"]
    runs = c["runs"]
    ranges = ", ".join(f"{a['name']} [{a['low']:g}, {a['high']:g}]" for a in c["space"]["axes"])
    timing = [f"| {w} | {r['seconds']:.0f} | {r['evaluations']} | {r['merges']} | {r['eval_seconds_sum']:.0f} | "
              f"{r['warm_up_seconds']:.0f} |" for w, r in sorted(runs.items())]
    p = d["protocol"]
    return "\n".join([
        f"# Search: CMA-ES over per-model TIES options vs the paper's grid ({len(tasks)} MiniLM tasks)",
        "",
        f"Fine-tuned models: {', '.join(d['fine_tunes'])} (benchmarks/minilm/common.py `finetuned_dir`, "
        f"{p['train_per_task']} train examples per task, {p['epochs']} epoch, max length {p['max_length']}; the "
        "models cached when this ran). Both searches score a candidate by mean accuracy on the first "
        f"{p['val_per_task']} validation examples of each task and get the same budget: **{d['budget']} "
        f"evaluations**. Test: the first {p['test_per_task']} test examples per task. Seed {d['seed']}.",
        "",
        "| search | best options | val | " + " | ".join(tasks) + " | test mean |",
        "|---|---|---|" + "---|" * len(tasks) + "---|",
        *rows,
        "",
        f"CMA-ES (`cma`, generations of {c['popsize']}, started from TIES's defaults: densities 0.2, weights 1, "
        f"λ 1; ranges {ranges}) ran on a local Ray cluster. Wall time of the whole search (merges and "
        "evaluations, one Ray task each; a fresh cluster and log per run):",
        "",
        "| Ray workers | wall s | evaluations | merges | evaluation s, summed | worker warm-up s (not in wall) |",
        "|---|---|---|---|---|---|",
        *timing,
        "",
        f"Same candidates and scores with 1 and 2 workers: "
        f"{all(r.get('same_scores_as_first_run', True) for r in runs.values())}. Report with the plots: "
        f"[{report.parent.name}/report.html]({report.parent.name}/report.html).",
        "",
        f"Hardware: {d['hardware']}.",
        "",
    ])


if __name__ == "__main__":
    main()
