"""Fig. 5 analogue: normalized accuracy vs the number of tasks merged, for TIES, task arithmetic and
the three other methods with the best validation score on all eight tasks (each with the options
validation chose there; statistics-based methods are left out, their statistics being per task
model). Called by run.py on its first seed's models; results are cached with that seed's."""

from __future__ import annotations

import itertools
import json
import random

from common import load_encoder
from plan import DATA_AWARE, describe, label

import tiesmerge
from tiesmerge.evaluation import evaluate_encoder
from tiesmerge.registry import make_method

ALWAYS = ("ties", "task_arithmetic")


def pick(searches: dict, seed: int, n: int = 3) -> list[str]:
    """ALWAYS plus the ``n`` other methods with the best validation score at ``seed``."""
    scored = {name: by_seed[seed]["validation_score"] for name, by_seed in searches.items()
              if seed in by_seed and name not in ALWAYS and name not in DATA_AWARE}
    return [m for m in ALWAYS if m in searches] + sorted(scored, key=scored.get, reverse=True)[:n]


def run(args, bench, table, searches, choices, plans, log) -> None:
    methods = {name: choices[name] for name in pick(searches, bench.seed)}
    tasks = bench.tasks
    test = {t: bench.suite[t].test[:args.fig5_limit] for t in tasks}
    reference = bench.cache.get(f"fig5:reference:{args.fig5_limit}", lambda: {
        t: evaluate_encoder(load_encoder(bench.ft[t], args.device), {t: test[t]}, bench.heads).accuracy[t]
        for t in tasks})
    rng = random.Random(args.data_seed)
    points = []
    sizes = list(range(2, len(tasks) + 1))
    for size in sizes:
        subsets = list(itertools.combinations(tasks, size))
        if len(subsets) > args.fig5_subsets:
            subsets = rng.sample(subsets, args.fig5_subsets)
        for subset in subsets:
            for name, options in methods.items():
                key = f"fig5:{args.fig5_limit}:{name}:{json.dumps(options, sort_keys=True)}:{','.join(subset)}"
                acc = bench.cache.get(key, lambda subset=subset, name=name, options=options: bench.evaluate_state(
                    tiesmerge.merge(bench.base, [bench.ft[t] for t in subset], make_method(name, options),
                                    device=args.device), {t: test[t] for t in subset}))
                points.append({"size": size, "tasks": list(subset), "method": name, "options": options,
                               "normalized": sum(acc[t] / reference[t] for t in subset) / len(subset),
                               "accuracy": acc})
        log(f"fig5: size {size} done ({len(subsets)} subsets)")
    summary = {name: {size: _mean([p["normalized"] for p in points if p["method"] == name and p["size"] == size])
                      for size in sizes} for name in methods}
    out = args.out
    (out / "fig5.json").write_text(json.dumps({"seed": bench.seed, "reference": reference, "methods": methods,
                                               "points": points, "summary": summary,
                                               "test_per_task": {t: len(test[t]) for t in tasks},
                                               "subsets_per_size": args.fig5_subsets}, indent=1) + "\n")
    lines = ["# Fig. 5 analogue: normalized accuracy vs number of tasks merged\n",
             f"Fine-tuning seed {bench.seed}. Mean over up to {args.fig5_subsets} seeded subsets per size; normalized "
             "= merged accuracy ÷ the task's own fine-tuned accuracy, on "
             f"{len(next(iter(test.values())))} test examples per task. Methods: TIES and task arithmetic, and the "
             f"three other methods with the best validation score on all {len(tasks)} tasks ({args.name}.md), each "
             "with the options validation chose there.\n",
             "| method | " + " | ".join(str(s) for s in sizes) + " |", "|---|" + "---|" * len(sizes)]
    for name, options in methods.items():
        lines.append(f"| {label(name)} ({describe(options)}) | "
                     + " | ".join(f"{100 * summary[name][s]:.1f}" for s in sizes) + " |")
    (out / "fig5.md").write_text("\n".join(lines) + "\n\n![fig5](fig5.png)\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, marker in zip(methods, "osD^v<>"):
        ax.plot(sizes, [100 * summary[name][s] for s in sizes], marker=marker, label=label(name))
    ax.set_xlabel("number of tasks merged")
    ax.set_ylabel("normalized accuracy (%)")
    ax.set_title(f"MiniLM, 8 text tasks, seed {bench.seed} (cf. paper Fig. 5)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "fig5.png", dpi=120)
    plt.close(fig)


def _mean(values: list[float]) -> float:
    return sum(values) / max(1, len(values))
