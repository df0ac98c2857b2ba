"""The paper's analyses on the MiniLM benchmark: Fig. 3, Fig. 7, Tables 3, 4 and 5, on the
converged fine-tuning protocol of Table 1 (its cached models and evaluation cache are reused).
Run from the repository root with Table 1's settings:

    TIESMERGE_BENCH_MAX_LENGTH=32 python benchmarks/minilm/analyses.py --val-limit 100 --threads 1
    ... --only fig3 table4          # a part
    ... --seed 1                    # another fine-tuning seed's models

Writes benchmarks/results/{fig3,fig7,table3,table4,table5}.md + .json (+ .png for the figures).
Every merge goes through tiesmerge.merge / tiesmerge.tuning.tune; evaluations are cached with
those of run.py (one cache per seed's models), so a rerun recomputes only what is missing.

Why over 400 lines: five of the paper's analyses share one evaluation cache and one set of models;
each has its own function, in the paper's order.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import common  # noqa: E402
import run  # noqa: E402
from common import hardware, load_encoder  # noqa: E402
from finetune_all import protocol_args, protocol_from  # noqa: E402
from run import RESULTS, log  # noqa: E402
from variants import SignFlip, TrimDisjointMean  # noqa: E402

import tiesmerge  # noqa: E402
from tiesmerge.evaluation import SuiteResult, evaluate_encoder  # noqa: E402
from tiesmerge.evaluation.finetune import TrainConfig, finetune  # noqa: E402
from tiesmerge.methods import Average, MagnitudePrune, Ties  # noqa: E402
from tiesmerge.tuning import tune  # noqa: E402
from tiesmerge_bench import TASK_NAMES  # noqa: E402

FIG3_DENSITIES = (0.05, 0.1, 0.2, 0.3, 0.5, 0.7)
FIG7_DENSITIES = (0.2, 0.3)
FIG7_P = (0.2, 0.5, 1.0)
FIG7_SEEDS = (0, 1, 2)
DENSITIES = (0.1, 0.2, 0.3)  # the paper's validation grid for k
LAMS = (1.0, 1.5, 2.0, 2.5, 3.0)  # a coarse subset of the paper's 0.8..3.0 step 0.1 (CPU time)
FEW_SHOT = 32  # examples per task (Table 5)


class Bench(run.Bench):
    """Table 1's models of one fine-tuning seed (``--seed``), its evaluation cache, and the analyses' test subsets."""

    def __init__(self, args, suite, heads, protocol) -> None:
        super().__init__(args, suite, heads, protocol, args.seed)
        if self.multi is None:  # Table 3's oracle sign comes from it
            raise SystemExit(f"seed {args.seed}: the multitask model is not cached; run finetune_all.py first")
        self.small_test = {t: self.suite[t].test[:args.small_test] for t in self.tasks}
        self.fig7_test = {t: self.suite[t].test[:args.fig7_test] for t in self.tasks}

    def evaluate(self, state, splits) -> dict[str, float]:
        return dict(evaluate_encoder(load_encoder(self.base, self.args.device, state=state), splits,
                                     self.heads).accuracy)

    def evaluate_dir(self, directory: Path, splits) -> dict[str, float]:
        return dict(evaluate_encoder(load_encoder(directory, self.args.device), splits, self.heads).accuracy)

    def merge(self, models: list[Path], method):
        return tiesmerge.merge(self.base, models, method, device=self.args.device)

    def own_accuracy(self, limit: int) -> dict[str, float]:
        """Each fine-tuned model on its own task, on the first ``limit`` test examples (shared with Fig. 5)."""
        return self.cache.get(f"fig5:reference:{limit}", lambda: {
            t: self.evaluate_dir(self.ft[t], {t: self.suite[t].test[:limit]})[t] for t in self.tasks})

    def tuned(self, key: str, method, grid: dict) -> dict:
        """tune() on validation (cached): every grid point's score and the best point."""
        def search() -> dict:
            result = tune(self.base, [self.ft[t] for t in self.tasks], method,
                          lambda state: SuiteResult(self.evaluate(state, self.val)).mean, grid=grid,
                          device=self.args.device)
            return {"best": {**result.best.options, "lam": result.best.lam, "validation_score": result.best.score},
                    "grid": [{**p.options, "lam": p.lam, "score": p.score} for p in result.points],
                    "merges": result.merges, "seconds": result.seconds}
        return self.cache.get(key, search)


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _write(out: Path, stem: str, lines: list[str], data: dict, fig=None) -> None:
    (out / f"{stem}.json").write_text(json.dumps(data, indent=1) + "\n")
    if fig is not None:
        fig.tight_layout()
        fig.savefig(out / f"{stem}.png", dpi=120)
        lines.append(f"\n![{stem}]({stem}.png)")
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    log(f"wrote {out / (stem + '.md')}")


def _settings_line(b: Bench, what: str) -> str:
    return (f"Settings: all-MiniLM-L6-v2 fine-tuned on 8 tasks (benchmarks/README.md; max length {common.MAX_LENGTH} "
            "tokens, the converged protocol: each task's learning rate chosen on validation, early stopping), "
            f"{what}; fine-tuning seed {b.args.seed}; "
            f"{hardware()['processor']}, {hardware()['cpu_count']} CPUs, torch {hardware()['torch']}.")


# ---------------------------------------------------------------------------------------- Fig. 3
def fig3(b: Bench) -> None:
    """Each fine-tuned model with its task vector trimmed to its top k (global threshold)."""
    n_test = b.args.small_test
    own = b.own_accuracy(n_test)
    zero = b.cache.get(f"fig3:zero-shot:{n_test}", lambda: b.evaluate(None, b.small_test))
    acc = {t: {0.0: zero[t], 1.0: own[t]} for t in b.tasks}
    for t in b.tasks:
        for k in FIG3_DENSITIES:
            acc[t][k] = b.cache.get(f"fig3:{n_test}:{t}:{k}", lambda t=t, k=k: b.evaluate(
                b.merge([b.ft[t]], MagnitudePrune(density=k, lam=1.0)), {t: b.small_test[t]})[t])
        log(f"fig3: {t} done")
    ks = sorted(acc[b.tasks[0]])
    normalized = {k: _mean(acc[t][k] / own[t] for t in b.tasks) for k in ks}
    lines = ["# Fig. 3 analogue: accuracy when each task vector is trimmed to its top-k\n",
             f"Each fine-tuned model's accuracy (%) on its own task ({n_test} test examples per task) when its task "
             "vector keeps only its top-k entries by magnitude (one threshold over the whole model, as in TIES); "
             "k = 0 is the pretrained model, k = 100% the fine-tuned one.\n",
             "| task | " + " | ".join(f"k={100 * k:g}%" for k in ks) + " |", "|---|" + "---|" * len(ks)]
    for t in b.tasks:
        lines.append(f"| {t} | " + " | ".join(f"{100 * acc[t][k]:.1f}" for k in ks) + " |")
    lines.append("| **mean** | " + " | ".join(f"**{100 * _mean(acc[t][k] for t in b.tasks):.1f}**" for k in ks) + " |")
    lines.append("| normalized mean | " + " | ".join(f"{100 * normalized[k]:.1f}" for k in ks) + " |")
    lines += ["", f"**Against the paper** (Fig. 3: keeping the top 20% keeps almost all of the fine-tuned accuracy): "
              f"here the top 20% keeps {100 * normalized[0.2]:.1f}% of the fine-tuned accuracy on average, the top "
              f"10% {100 * normalized[0.1]:.1f}%, the top 5% {100 * normalized[0.05]:.1f}%; the pretrained model "
              f"alone reaches {100 * normalized[0.0]:.1f}%.", "", _settings_line(b, f"{n_test} test examples per task")]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for t in b.tasks:
        ax.plot([100 * k for k in ks], [100 * acc[t][k] / own[t] for k in ks], color="grey", alpha=0.35, linewidth=1)
    ax.plot([100 * k for k in ks], [100 * normalized[k] for k in ks], marker="o", color="C0", label="mean of 8 tasks")
    ax.set_xlabel("top-k of the task vector kept (%)")
    ax.set_ylabel("accuracy ÷ fine-tuned accuracy (%)")
    ax.set_title("Trimming a task vector to its top-k (cf. paper Fig. 3)")
    ax.grid(alpha=0.3)
    ax.legend()
    _write(b.args.out, "fig3", lines, {"test_per_task": n_test, "accuracy": {t: {str(k): v for k, v in a.items()}
                                                                           for t, a in acc.items()},
                                       "normalized_mean": {str(k): v for k, v in normalized.items()}}, fig)


# ---------------------------------------------------------------------------------------- Fig. 7
def _flip_label(k: float, region: str) -> str:
    return f"top {100 * k:g}%" if region == "top" else f"bottom {100 - 100 * k:g}% (outside the top {100 * k:g}%)"


def fig7(b: Bench) -> None:
    """Flip the sign of each top-k (or each bottom) entry with probability p."""
    n_test = b.args.fig7_test
    own = b.own_accuracy(n_test)
    runs = []
    for k in FIG7_DENSITIES:
        for region in ("top", "bottom"):
            for p in FIG7_P:
                for seed in FIG7_SEEDS if p < 1 else (0,):  # p = 1 flips every entry: no randomness left
                    acc = {t: b.cache.get(f"fig7:{n_test}:{t}:{k}:{region}:{p}:{seed}", lambda t=t, k=k, region=region,
                                          p=p, seed=seed: b.evaluate(b.merge([b.ft[t]], SignFlip(k, p, region, seed)),
                                                                     {t: b.fig7_test[t]})[t]) for t in b.tasks}
                    runs.append({"density": k, "region": region, "p": p, "seed": seed, "accuracy": acc,
                                 "normalized_mean": _mean(acc[t] / own[t] for t in b.tasks)})
            log(f"fig7: k={k} {region} done")
    summary = {}
    for k in FIG7_DENSITIES:
        for region in ("top", "bottom"):
            rows = {0.0: [1.0]}
            for p in FIG7_P:
                rows[p] = [r["normalized_mean"] for r in runs if (r["density"], r["region"], r["p"]) == (k, region, p)]
            summary[_flip_label(k, region)] = {p: (_mean(v), statistics.pstdev(v)) for p, v in rows.items()}
    ps = (0.0, *FIG7_P)
    lines = ["# Fig. 7 analogue: flipping the signs of the top-k vs the bottom entries\n",
             f"Each fine-tuned model with the sign of every entry of its task vector's top-k (or of every entry "
             f"outside it, \"bottom\") flipped with probability p; accuracy on its own task ({n_test} test examples), "
             "÷ the fine-tuned accuracy, mean over the 8 tasks; ± the standard deviation over 3 seeds (p < 1).\n",
             "| entries flipped | " + " | ".join(f"p={p:g}" for p in ps) + " |", "|---|" + "---|" * len(ps)]
    for label, row in summary.items():
        cells = (f"{100 * row[p][0]:.1f}" + (f" ± {100 * row[p][1]:.1f}" if row[p][1] else "") for p in ps)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    top20, bottom20 = summary[_flip_label(0.2, "top")], summary[_flip_label(0.2, "bottom")]
    lines += ["", f"**Against the paper** (Fig. 7: accuracy collapses when the top 20–30% are flipped and barely "
              f"moves for the bottom 70–80%): flipping each top-20% entry with p = 0.5 leaves "
              f"{100 * top20[0.5][0]:.1f}% of the fine-tuned accuracy and p = 1 {100 * top20[1.0][0]:.1f}%; flipping "
              f"the bottom 80% leaves {100 * bottom20[0.5][0]:.1f}% (p = 0.5) and "
              f"{100 * bottom20[1.0][0]:.1f}% (p = 1).",
              "", _settings_line(b, f"{n_test} test examples per task")]
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(FIG7_DENSITIES), figsize=(10, 4), sharey=True)
    for ax, k in zip(axes, FIG7_DENSITIES):
        for region, marker in (("top", "o"), ("bottom", "s")):
            row = summary[_flip_label(k, region)]
            ax.errorbar(ps, [100 * row[p][0] for p in ps], yerr=[100 * row[p][1] for p in ps], marker=marker,
                        capsize=3, label=_flip_label(k, region))
        ax.set_xlabel("probability p of flipping an entry's sign")
        ax.set_title(f"k = {100 * k:g}%")
        ax.grid(alpha=0.3)
        ax.legend()
    axes[0].set_ylabel("accuracy ÷ fine-tuned accuracy (%)")
    _write(b.args.out, "fig7", lines, {"test_per_task": n_test, "runs": runs,
                                       "summary": {key: {str(p): v for p, v in row.items()}
                                                   for key, row in summary.items()}}, fig)


# ---------------------------------------------------------------------------------------- Table 4
def _best(grid: list[dict], where) -> dict:
    return max((p for p in grid if where(p)), key=lambda p: p["score"])


def table4(b: Bench) -> dict:
    """TIES and TIES with one step removed, each tuned on validation (k, lam) where it has them."""
    n = len(b.tasks)
    coarse = {"density": DENSITIES, "lam": LAMS}
    full = _full_ties(b)
    rows = {
        "TIES (trim, elect, disjoint mean, λ)": full["best"],
        "− trim (k = 100%)": b.tuned("table4:-trim", Ties(density=1.0), {"lam": LAMS})["best"],
        "− elect (mean of every kept value)": b.tuned("table4:-elect", TrimDisjointMean(), coarse)["best"],
        # the agreeing values summed and divided by n (zeros counted) instead of by their own count
        "− disjoint mean (÷ n)": b.tuned("table4:-disjoint", Ties(aggregate="sum", weights=(1.0 / n,) * n),
                                        coarse)["best"],
        "− scaling (λ = 1)": _best(full["grid"], lambda p: p["lam"] == 1.0),
    }
    rows["− scaling (λ = 1)"] = {**rows["− scaling (λ = 1)"], "validation_score": rows["− scaling (λ = 1)"]["score"]}
    paper = {"TIES (trim, elect, disjoint mean, λ)": (74.5, 70.7), "− trim (k = 100%)": (73.0, 70.6),
             "− elect (mean of every kept value)": (73.1, 69.6), "− disjoint mean (÷ n)": (72.6, 67.5),
             "− scaling (λ = 1)": (72.0, 65.5)}
    n_val = b.args.val_limit
    lines = ["# Table 4 analogue: TIES with one step removed at a time (validation)\n",
             f"Mean validation accuracy (%) over the 8 tasks ({n_val} validation examples per task), each variant "
             f"with its own k ∈ {{{', '.join(f'{k:g}' for k in DENSITIES)}}} and "
             f"λ ∈ {{{', '.join(f'{x:g}' for x in LAMS)}}} "
             "chosen on that validation set (as the paper's Table 4 does).\n",
             "| variant | k | λ | validation | paper T5-base | paper (IA)³ |", "|---|---|---|---|---|---|"]
    for label, best in rows.items():
        k = best.get("density", 1.0 if "trim (k" in label else "")
        lines.append(f"| {label} | {k} | {best['lam']:g} | **{100 * best['validation_score']:.1f}** | "
                     f"{paper[label][0]} | {paper[label][1]} |")
    full_score = 100 * rows["TIES (trim, elect, disjoint mean, λ)"]["validation_score"]
    drops = {label: full_score - 100 * best["validation_score"] for label, best in rows.items()}
    order = sorted((k for k in drops if k.startswith("−")), key=lambda k: -drops[k])
    lines += ["", "**Against the paper** (every step helps; removing the scaling or the disjoint mean costs most, "
              "1.9–5.2 points): here removing " + ", ".join(f"{k.split(' (')[0][2:]} costs {drops[k]:.1f}"
                                                           for k in order) + " points.",
              "", _settings_line(b, f"{n_val} validation examples per task")]
    _write(b.args.out, "table4", lines, {"validation_per_task": n_val, "rows": rows, "paper": paper,
                                         "grid": {"density": DENSITIES, "lam": LAMS}})
    return full


# ---------------------------------------------------------------------------------------- Tables 3, 5
def _signed_row(b: Bench, key: str, sign_dir: Path) -> dict:
    """TIES with the sign taken from ``sign_dir``: tuned on validation, then scored on test."""
    tuned = b.tuned(f"{key}:tune", Ties(sign_from=str(sign_dir)), {"density": DENSITIES, "lam": LAMS})
    best = tuned["best"]
    test = b.cache.get(f"{key}:test", lambda: b.evaluate(
        b.merge([b.ft[t] for t in b.tasks], Ties(density=best["density"], lam=best["lam"], sign_from=str(sign_dir))),
        b.test))
    return {"best": best, "test": test}


def _full_ties(b: Bench) -> dict:
    """TIES tuned on the coarse grid. run.py's validation search (the paper's full grid, same
    validation data) already scored every coarse point: those scores are reused when cached."""
    if "tune:ties" in b.cache.data:
        b.cache.reused.append("tune:ties")
        grid = [p for p in b.cache.data["tune:ties"]["grid"] if p["density"] in DENSITIES and p["lam"] in LAMS]
        if len(grid) == len(DENSITIES) * len(LAMS):
            best = max(grid, key=lambda p: p["score"])
            return {"best": {"density": best["density"], "lam": best["lam"], "validation_score": best["score"]},
                    "grid": grid, "source": "run.py's search (tune:ties), coarse points"}
    return b.tuned("table4:full", Ties(), {"density": DENSITIES, "lam": LAMS})


def _elected_row(b: Bench) -> dict:
    """TIES with elected signs, tuned on the same coarse validation grid as Table 4."""
    full = _full_ties(b)
    best = full["best"]
    test = b.cache.get(f"ties-val:{best['density']}:{best['lam']}:test", lambda: b.evaluate(
        b.merge([b.ft[t] for t in b.tasks], Ties(density=best["density"], lam=best["lam"])), b.test))
    return {"best": best, "test": test}


def _table_lines(b: Bench, rows: dict[str, dict]) -> list[str]:
    lines = ["| row | k | λ | " + " | ".join(b.tasks) + " | mean |", "|---|---|---|" + "---|" * (len(b.tasks) + 1)]
    for label, row in rows.items():
        best = row.get("best", {})
        lines.append(f"| {label} | {best.get('density', '')} | {best.get('lam', '')} | "
                     + " | ".join(f"{100 * row['test'][t]:.1f}" for t in b.tasks)
                     + f" | **{100 * _mean(row['test'].values()):.1f}** |")
    return lines


def table3(b: Bench) -> None:
    """The oracle sign: gamma from the multitask model's task vector."""
    multi = {"test": b.cache.get("multitask", lambda: b.evaluate_dir(b.multi, b.test))}
    elected = _elected_row(b)
    oracle = _signed_row(b, "table3:oracle", b.multi)
    default = b.cache.get("table3:oracle:k0.2-lam1:test", lambda: b.evaluate(
        b.merge([b.ft[t] for t in b.tasks], Ties(density=0.2, lam=1.0, sign_from=str(b.multi))), b.test))
    ties_default = b.cache.get("merge:ties:{}", lambda: b.evaluate(b.merge([b.ft[t] for t in b.tasks], Ties()), b.test))
    rows = {"multitask model": multi, "TIES, elected sign (val)": elected, "TIES, oracle sign (val)": oracle,
            "TIES, elected sign (k=0.2, λ=1)": {"test": ties_default},
            "TIES, oracle sign (k=0.2, λ=1)": {"test": default}}
    n_test = len(b.test[b.tasks[0]])
    means = {label: 100 * _mean(r["test"].values()) for label, r in rows.items()}
    lines = ["# Table 3 analogue: TIES with the oracle sign of the multitask model\n",
             f"Test accuracy (%), {n_test} examples per task. The oracle sign is γ = sgn(θ_multitask − θ_base), "
             "passed as `--sign-from` (TIES's `sign_from` option); rows marked val chose k and λ on "
             f"{b.args.val_limit} validation examples per task (k ∈ {{0.1, 0.2, 0.3}}, "
             f"λ ∈ {{{', '.join(f'{x:g}' for x in LAMS)}}}).\n",
             *_table_lines(b, rows), "",
             f"**Against the paper** (Table 3, (IA)³: oracle sign 72.0 vs elected 66.4, multitask 73.1): here the "
             f"oracle sign gives {means['TIES, oracle sign (val)']:.1f} vs elected "
             f"{means['TIES, elected sign (val)']:.1f} (multitask {means['multitask model']:.1f}); without validation "
             f"{means['TIES, oracle sign (k=0.2, λ=1)']:.1f} vs {means['TIES, elected sign (k=0.2, λ=1)']:.1f}.", "",
             _settings_line(b, f"{n_test} test examples per task")]
    _write(b.args.out, "table3", lines, {"rows": rows, "means": means, "paper": {"oracle": 72.0, "elected": 66.4,
                                                                                 "multitask": 73.1}})


def _few_shot_dir(b: Bench, init: str) -> Path:
    """A multitask model trained on 32 examples per task, from the mean of the task models or from
    the pretrained model (cached beside the other fine-tunes)."""
    config = TrainConfig(epochs=b.args.few_shot_epochs, seed=b.args.seed)
    # the task models it starts from (init "mean") are part of its identity
    models = hashlib.sha256(json.dumps([str(b.ft[t]) for t in b.tasks]).encode()).hexdigest()[:12]
    out = (common.CACHE / "models"
           / f"fewshot{FEW_SHOT}-{init}-e{config.epochs}-s{config.seed}-L{common.MAX_LENGTH}-{models}")
    if (out / "model.safetensors").is_file():
        return out
    state = b.merge([b.ft[t] for t in b.tasks], Average()) if init == "mean" else None
    encoder = load_encoder(b.base, b.args.device, state=state)
    examples = {t: b.suite[t].train[:FEW_SHOT] for t in b.tasks}
    result = finetune(encoder, b.heads, examples, config)
    common._save(encoder, out)
    (out / "train_log.json").write_text(json.dumps({"steps": result.steps, "seconds": result.seconds,
                                                    "examples_per_task": FEW_SHOT, "init": init,
                                                    "final_loss": result.final_loss}, indent=2))
    log(f"few-shot multitask ({init} init): {result.steps} steps, {result.seconds:.0f} s")
    return out


def table5(b: Bench) -> None:
    """The sign from a few-shot multitask model, initialised at the mean of the task models or from scratch."""
    elected = _elected_row(b)
    rows: dict[str, dict] = {"TIES, elected sign (val)": elected}
    for init, label in (("mean", "mean of the task models"), ("base", "the pretrained model")):
        directory = _few_shot_dir(b, init)
        rows[f"few-shot multitask model itself (from {label})"] = {"test": b.cache.get(
            f"table5:{directory.name}:model", lambda directory=directory: b.evaluate_dir(directory, b.test))}
        rows[f"TIES, sign from few-shot multitask (from {label}) (val)"] = _signed_row(b, f"table5:{directory.name}",
                                                                                       directory)
    means = {label: 100 * _mean(r["test"].values()) for label, r in rows.items()}
    n_test = len(b.test[b.tasks[0]])
    lines = ["# Table 5 analogue: the sign vector from a few-shot multitask model\n",
             f"Test accuracy (%), {n_test} examples per task. The few-shot multitask model is trained on "
             f"{FEW_SHOT} examples per task ({FEW_SHOT * len(b.tasks)} in all, {b.args.few_shot_epochs} epochs, the "
             "benchmark's optimiser settings), starting either from the mean of the task models (the paper's choice) "
             "or from the pretrained model; its task vector's sign is passed to TIES as `sign_from`. k and λ chosen "
             f"on {b.args.val_limit} validation examples per task.\n", *_table_lines(b, rows), "",
             f"**Against the paper** (Table 5, (IA)³: few-shot sign 67.7 vs elected 66.4): here "
             f"{means['TIES, sign from few-shot multitask (from mean of the task models) (val)']:.1f} (from the mean), "
             f"{means['TIES, sign from few-shot multitask (from the pretrained model) (val)']:.1f} (from scratch) vs "
             f"elected {means['TIES, elected sign (val)']:.1f}.", "",
             _settings_line(b, f"{n_test} test examples per task")]
    _write(b.args.out, "table5", lines, {"rows": rows, "means": means, "few_shot_per_task": FEW_SHOT,
                                         "paper": {"few_shot_sign": 67.7, "elected": 66.4}})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", nargs="+", choices=("fig3", "fig7", "table4", "table3", "table5"),
                   default=["fig3", "table4", "table3", "table5", "fig7"])
    p.add_argument("--tasks", nargs="+", default=list(TASK_NAMES))
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0, help="the fine-tuning seed whose models are analysed")
    p.add_argument("--data-seed", type=int, default=0, help="seed of the train/validation/test splits")
    p.add_argument("--cached-only", action="store_true", help="train nothing (a missing model is an error)")
    p.add_argument("--test-limit", type=int, default=None, help="test examples per task for Tables 3 and 5")
    p.add_argument("--val-limit", type=int, default=None, help="validation examples per task (Table 1: 100)")
    p.add_argument("--small-test", type=int, default=200, help="test examples per task for Fig. 3")
    p.add_argument("--fig7-test", type=int, default=100, help="test examples per task for Fig. 7 (224 merges)")
    p.add_argument("--few-shot-epochs", type=int, default=5)
    p.add_argument("--out", type=Path, default=RESULTS)
    protocol_args(p)
    args = p.parse_args()
    started = time.perf_counter()
    suite, _, heads, _ = common.start_run(args)
    b = Bench(args, suite, heads, protocol_from(args))
    for name in args.only:
        clock = time.perf_counter()
        {"fig3": fig3, "fig7": fig7, "table4": table4, "table3": table3, "table5": table5}[name](b)
        log(f"{name}: {time.perf_counter() - clock:.0f} s")
    log(f"done in {time.perf_counter() - started:.0f} s ({len(b.cache.reused)} results reused from the cache)")


if __name__ == "__main__":
    main()
