"""LoRA adapters per task on the converged protocol, merged by tiesmerge and by PEFT. From the repo root:

    TIESMERGE_BENCH_MAX_LENGTH=32 python benchmarks/minilm/lora.py --seeds 0 1 2 --tune-seeds 0 --threads 1
    TIESMERGE_BENCH_MAX_LENGTH=32 python benchmarks/minilm/lora.py --train-only ...   # adapters only
    TIESMERGE_BENCH_MAX_LENGTH=32 python benchmarks/minilm/lora.py --cached-only ...  # merges only

A rank-8 LoRA (α = 16) on every attention projection (query, key, value, attention output) and
both MLP projections (intermediate, output) of all-MiniLM-L6-v2 is trained per task against the
frozen cosine heads (benchmarks/minilm, same data and splits), on the protocol of Table 1
(common.Protocol): all train examples, early stopping on validation accuracy (best epoch kept),
the learning rate chosen per task on validation at seed 0 from a ladder (--lora-lrs) and reused
for the other seeds. Adapters are cached by their settings under ~/.cache/tiesmerge/bench/lora/,
evaluations under ~/.cache/tiesmerge/bench/evals/lora-*.json, so the same command resumes.

The adapters are then merged, per seed:

- by tiesmerge on the real weight changes ΔW = (α/r)·B·A, for every method of --methods (TIES,
  task arithmetic, TSV-M, Iso-C): one row with its defaults and one with its options chosen on
  validation (the --tune-seeds' validation split, over the method's own grid, as run.py does
  for Table 1; the other seeds reuse the choice); and TIES (defaults) written back as a rank-8
  LoRA adapter (truncated SVD of each module's merged update);
- by PEFT's ``add_weighted_adapter`` with ``ties`` and ``dare_ties``, which merge the A and the B
  factors separately (PEFT's documented behaviour for these combination types).

Writes benchmarks/results/lora.md + .json (mean ± std over the seeds, each seed normalized by its
own adapters, as table1.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import statistics
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import common  # noqa: E402
import torch  # noqa: E402
from common import NotCached, base_dir, hardware, load_encoder  # noqa: E402
from plan import describe, plan, shrink, thin  # noqa: E402
from run import Bench, EvalCache, _first, _flag_edges, log, method_rows  # noqa: E402
from seedtable import SeedTable  # noqa: E402

import tiesmerge  # noqa: E402
from tiesmerge.evaluation import evaluate_encoder  # noqa: E402
from tiesmerge.evaluation.finetune import TrainConfig, finetune  # noqa: E402
from tiesmerge.methods import Ties  # noqa: E402
from tiesmerge.registry import make_method  # noqa: E402
from tiesmerge_bench import TASK_NAMES  # noqa: E402

RESULTS = Path(__file__).resolve().parents[1] / "results"
TARGETS = ["query", "key", "value", "dense"]  # BERT: dense = attention output, intermediate, output (MLP)
RANK, ALPHA = 8, 16
LORA_LRS = (5e-4, 1e-3)  # full fine-tuning uses 1e-4; LoRA's factors start at zero and need larger steps
METHODS = ("ties", "task_arithmetic", "tsv_m", "iso_c")
REFERENCE = "individual LoRA"
SVD_ROW = "TIES → LoRA r=8"
PEFT_ROWS = {"ties": "PEFT add_weighted_adapter ties", "dare_ties": "PEFT add_weighted_adapter dare_ties"}
# The SVD methods decompose each LoRA target's ΔW (rank ≤ 8 in a 384 x 384 matrix): tiesmerge keeps only each
# matrix's numerical rank (methods/svd.py, numerical_rank), so neither TSV-M's 384/8 = 48 triplets per task nor
# Iso-C's 384 flattened directions bring in the null space's arbitrary basis; precision_check measures that.


# --------------------------------------------------------------------------------------------- adapters

def lora_dir(task, heads, config: TrainConfig, device: str, train_limit: int | None, val_limit: int | None,
             train: bool = True) -> Path:
    """Train (or reuse) one task's LoRA adapter with early stopping on the first ``val_limit``
    validation examples (the best epoch kept); return its PEFT directory."""
    from peft import LoraConfig, get_peft_model

    digest = hashlib.sha256(json.dumps({**asdict(config), "rank": RANK, "alpha": ALPHA, "targets": TARGETS,
                                        "max_length": common.MAX_LENGTH, "train_limit": train_limit,
                                        "early_stopping_val_limit": val_limit}, sort_keys=True).encode())
    for text, label in task.train[:train_limit]:
        digest.update(text.encode())
        digest.update(str(label).encode())
    for text, label in task.validation[:val_limit]:
        digest.update(text.encode())
        digest.update(str(label).encode())
    out = common.CACHE / "lora" / f"{task.name}-{digest.hexdigest()[:12]}"
    if (out / "adapter_model.safetensors").is_file() and (out / "train_log.json").is_file():
        return out
    if not train:
        raise NotCached(f"no cached LoRA adapter {out.name} in {out.parent} (lr {config.lr:g}, seed {config.seed})")
    encoder = load_encoder(base_dir(), device)
    encoder.model = get_peft_model(encoder.model, LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS,
                                                             lora_dropout=0.0))
    val = {task.name: task.validation[:val_limit]}

    def epoch_done(record) -> None:
        log(f"    [{task.name} lr {config.lr:g} seed {config.seed}] epoch {record.epoch}: train loss "
            f"{record.train_loss:.4f}, validation {record.validation:.4f} ({record.seconds:.0f} s)")

    result = finetune(encoder, heads, {task.name: task.train[:train_limit]}, config,
                      validate=lambda enc: evaluate_encoder(enc, val, heads).mean, on_epoch=epoch_done)
    tmp = out.with_name(out.name + ".tmp")
    encoder.model.save_pretrained(tmp)
    (tmp / "train_log.json").write_text(json.dumps({**asdict(result), "config": asdict(config),
                                                    "max_length": common.MAX_LENGTH, "train_limit": train_limit,
                                                    "val_limit": val_limit, "device": device,
                                                    "torch_threads": torch.get_num_threads()}, indent=2))
    tmp.rename(out)
    log(f"  [{task.name}] LoRA lr {config.lr:g} seed {config.seed}: best epoch {result.best_epoch} "
        f"(validation {result.best_validation:.4f}), {result.steps} steps, {result.seconds:.0f} s")
    return out


class Ladder:
    """common.Protocol's learning-rate ladder and early stopping, applied to LoRA adapters."""

    def __init__(self, args, heads) -> None:
        self.args, self.heads = args, heads
        self.protocol = common.Protocol(lrs=tuple(args.lora_lrs), max_epochs=args.max_epochs,
                                        patience=args.patience, train_limit=args.train_limit,
                                        val_limit=args.es_val_limit)

    def run(self, task, lr: float, seed: int, train: bool = True) -> Path:
        p = self.protocol
        return lora_dir(task, self.heads, p.config(lr, seed), self.args.device, p.train_limit, p.val_limit, train)

    def chosen_lr(self, task, train: bool = True) -> tuple[float, dict[float, float]]:
        """As common.chosen_lr: the next (larger) rate is trained only while the best run so far
        was still improving at its last epoch; ties go to the smaller rate."""
        p, scores = self.protocol, {}
        for lr in p.lrs:
            record = common.train_log(self.run(task, lr, p.select_seed, train))
            scores[lr] = record["best_validation"]
            if record["best_epoch"] != p.max_epochs or scores[lr] < max(scores.values()):
                break
        return max(scores, key=lambda lr: (scores[lr], -lr)), scores

    def adapter(self, task, seed: int, train: bool = True) -> Path:
        lr, _ = self.chosen_lr(task, train)
        return self.run(task, lr, seed, train)


def train_all(args, ladder: Ladder, suite) -> None:
    """Seed 0 at the ladder's first rate for every task first (one complete set early), then the
    ladder, then the other seeds, one adapter at a time."""
    p = ladder.protocol
    if p.select_seed in args.seeds:
        for name in args.tasks:
            ladder.run(suite[name], p.lrs[0], p.select_seed)
    for seed in sorted(args.seeds, key=lambda s: (s != p.select_seed, s)):
        for name in args.tasks:
            t0 = time.perf_counter()
            path = ladder.adapter(suite[name], seed)
            log(f"{name} seed {seed}: {path} ({time.perf_counter() - t0:.0f} s)")


def peft_merge(adapters: dict[str, Path], combination: str, density: float, device: str) -> dict:
    """PEFT's add_weighted_adapter over every task's adapter (weights 1), merged into the base."""
    from peft import PeftModel

    names = list(adapters)
    encoder = load_encoder(base_dir(), device)
    model = PeftModel.from_pretrained(encoder.model, adapters[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(adapters[name], adapter_name=name)
    model.add_weighted_adapter(names, [1.0] * len(names), "merged", combination_type=combination, density=density)
    model.set_adapter("merged")
    return {k: v.detach().clone() for k, v in model.merge_and_unload(adapter_names=["merged"]).state_dict().items()}


def own_adapter_state(adapter: Path, device: str) -> dict:
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_encoder(base_dir(), device).model, adapter)
    return {k: v.detach().clone() for k, v in model.merge_and_unload().state_dict().items()}


# --------------------------------------------------------------------------------------------- merges

class LoraTable(SeedTable):
    """table1.md's table, normalized against each seed's own adapters."""

    def reference(self):
        return next(r for r in self.rows if r.name == REFERENCE)

    def to_dict(self):
        return {**super().to_dict(), "reference": REFERENCE}


class LoraBench(Bench):
    """run.Bench with each task's LoRA adapter (a PEFT folder) as its model: tiesmerge merges ΔW."""

    def __init__(self, args, suite, heads, ladder: Ladder, seed: int) -> None:
        # not Bench.__init__: it would train full fine-tunes
        self.args, self.suite, self.heads, self.seed = args, suite, heads, seed
        self.tasks = list(suite)
        self.test = {t: suite[t].test[:args.test_limit] for t in self.tasks}
        self.val = {t: suite[t].validation[:args.val_limit] for t in self.tasks}
        self.adapters = {t: ladder.adapter(suite[t], seed, train=not args.cached_only) for t in self.tasks}
        self.ft, self.multi = self.adapters, None
        self.base = base_dir()
        self.models = [self.adapters[t] for t in self.tasks]
        settings = json.dumps(["lora", common.MAX_LENGTH, args.test_limit, args.val_limit, args.data_seed,
                               [str(d) for d in self.models]])
        self.cache = EvalCache(common.CACHE / "evals" / f"lora-{hashlib.sha256(settings.encode()).hexdigest()[:12]}"
                                                        ".json")

    def timed(self, label: str, merge):
        """``merge()``'s result; its seconds are kept in the cache beside the accuracies."""
        started = time.perf_counter()
        state = merge()
        seconds = time.perf_counter() - started
        self.cache.data.pop(f"seconds:{label}", None)
        self.cache.get(f"seconds:{label}", lambda: seconds)
        return state

    def merged_test(self, name: str, options: dict) -> dict[str, float]:
        key = f"merge:{name}:{json.dumps(options, sort_keys=True)}"
        return self.cache.get(key, lambda: self.evaluate_state(self.timed(key, lambda: tiesmerge.merge(
            self.base, self.models, make_method(name, options), device=self.args.device)), self.test))


def reference_rows(b: LoraBench, table: LoraTable) -> None:
    table.row("zero-shot").per_seed[b.seed] = b.cache.get("zero-shot", lambda: b.evaluate_state(None, b.test))
    table.row(REFERENCE).per_seed[b.seed] = b.cache.get("individual", lambda: {
        t: b.evaluate_state(own_adapter_state(b.adapters[t], b.args.device), {t: b.test[t]})[t] for t in b.tasks})
    log(f"seed {b.seed}: zero-shot {_mean(table.row('zero-shot').per_seed[b.seed]):.4f}, individual LoRA "
        f"{_mean(table.row(REFERENCE).per_seed[b.seed]):.4f}")


def adapter_rows(b: LoraBench, table: LoraTable, svd_errors: dict) -> None:
    """TIES written back as a rank-8 adapter, and PEFT's own ties / dare_ties."""
    k = b.args.density

    def run_svd():
        from peft import PeftModel

        with tempfile.TemporaryDirectory() as tmp:
            out = b.timed("svd", lambda: tiesmerge.merge(b.base, b.models, Ties(density=k, lam=1.0),
                                                         output=Path(tmp) / "adapter", output_format="adapter",
                                                         rank=RANK))
            errors = json.loads((out / "tiesmerge.json").read_text())["adapters"]["relative_reconstruction_error"]
            model = PeftModel.from_pretrained(load_encoder(b.base, b.args.device).model, out)
            state = {name: v.detach().clone() for name, v in model.merge_and_unload().state_dict().items()}
        return {"accuracy": b.evaluate_state(state, b.test), "max_error": max(errors.values()),
                "mean_error": statistics.fmean(errors.values())}

    found = b.cache.get(f"svd:{k}", run_svd)
    svd_errors[b.seed] = {"mean": found["mean_error"], "max": found["max_error"]}
    table.row(SVD_ROW).per_seed[b.seed] = found["accuracy"]
    log(f"seed {b.seed} {SVD_ROW}: {_mean(found['accuracy']):.4f}")
    for combination, label in PEFT_ROWS.items():
        def run_peft(combination=combination):
            torch.manual_seed(b.seed)  # dare_ties draws its masks from torch's global generator
            state = b.timed(f"peft:{combination}", lambda: peft_merge(b.adapters, combination, k, b.args.device))
            return b.evaluate_state(state, b.test)

        table.row(label).per_seed[b.seed] = b.cache.get(f"peft:{combination}:{k}", run_peft)
        log(f"seed {b.seed} {label}: {_mean(table.row(label).per_seed[b.seed]):.4f}")


def precision_check(b: LoraBench) -> dict:
    """How much an SVD merge of the adapters depends on the SVD's precision: the relative difference
    (Frobenius, over every merged tensor) between the merged updates with float32 and with float64
    SVDs. An update made of singular directions with nonzero singular values differs by rounding
    only (~1e-6); one that used an arbitrary basis of a null space would differ by O(1) (it did, by
    87 % and 105 %, before the methods kept only each matrix's numerical rank)."""
    from safetensors.torch import load_file

    base = load_file(str(next(b.base.glob("*.safetensors"))))

    def delta(name: str, options: dict) -> dict:
        state = tiesmerge.merge(b.base, b.models, make_method(name, options), device=b.args.device)
        return {k: state[k].double() - base[k].double() for k in base}

    out = {}
    for name in ("tsv_m", "iso_c"):
        single, double = delta(name, {"svd_precision": "float32"}), delta(name, {"svd_precision": "float64"})
        diff = sum(float((single[k] - double[k]).norm() ** 2) for k in base) ** 0.5
        norm = sum(float(double[k].norm() ** 2) for k in base) ** 0.5
        out[name] = diff / norm
        log(f"seed {b.seed} {name}: float32 vs float64 SVD, relative difference {out[name]:.2e}")
    return out


def _mean(accuracy: dict[str, float]) -> float:
    return sum(accuracy.values()) / len(accuracy)


# --------------------------------------------------------------------------------------------- report

def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", nargs="+", default=list(TASK_NAMES))
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="LoRA training seeds")
    p.add_argument("--tune-seeds", nargs="+", type=int, default=[0],
                   help="seeds whose validation data choose the merge options (the others reuse the first's)")
    p.add_argument("--data-seed", type=int, default=0, help="seed of the train/validation/test splits")
    p.add_argument("--lora-lrs", nargs="+", type=float, default=list(LORA_LRS),
                   help="LoRA learning-rate ladder tried per task at seed 0 (the best on validation is reused)")
    p.add_argument("--max-epochs", type=int, default=common.Protocol.max_epochs)
    p.add_argument("--patience", type=int, default=common.Protocol.patience)
    p.add_argument("--train-limit", type=int, default=None, help="train examples per task (default all: 2000)")
    p.add_argument("--es-val-limit", type=int, default=None,
                   help="validation examples per task for early stopping and the lr choice (default all: 500)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), help="tiesmerge methods merged on ΔW")
    p.add_argument("--test-limit", type=int, default=500, help="test examples per task (Table 1: 500)")
    p.add_argument("--val-limit", type=int, default=100, help="validation examples per task for merge tuning")
    p.add_argument("--max-axis-values", type=int, default=None)
    p.add_argument("--max-grid-points", type=int, default=6, help="as Table 1: thin each grid to this many points")
    p.add_argument("--widen-rounds", type=int, default=1, help="times a grid is widened past an edge (Table 1: 1)")
    p.add_argument("--density", type=float, default=0.2, help="k of the TIES → LoRA and PEFT rows (paper: 0.2)")
    p.add_argument("--train-only", action="store_true", help="train the adapters, merge nothing")
    p.add_argument("--cached-only", action="store_true",
                   help="train nothing: a seed whose adapters are not all cached is left out (and said so)")
    p.add_argument("--table1", type=Path, default=RESULTS / "table1.json", help="full fine-tunes, for the reading")
    p.add_argument("--out", type=Path, default=RESULTS)
    return p.parse_args()


def command(args) -> str:
    parts = [f"TIESMERGE_BENCH_MAX_LENGTH={common.MAX_LENGTH} python benchmarks/minilm/lora.py",
             "--seeds " + " ".join(map(str, args.seeds)), "--tune-seeds " + " ".join(map(str, args.tune_seeds))]
    if args.threads:
        parts.append(f"--threads {args.threads}")
    return " ".join(parts)


def lr_choices(ladder: Ladder, suite) -> dict:
    out = {}
    for name in suite:
        try:
            lr, scores = ladder.chosen_lr(suite[name], train=False)
        except NotCached:
            continue
        out[name] = {"chosen": lr, "validation_by_lr": {f"{k:g}": v for k, v in scores.items()}}
    return out


def adapter_logs(benches: dict[int, LoraBench]) -> dict:
    out = {}
    for seed, b in benches.items():
        for t, path in b.adapters.items():
            record = common.train_log(path)
            out.setdefault(str(seed), {})[t] = {
                "path": str(path), "lr": record["config"]["lr"], "best_epoch": record["best_epoch"],
                "best_validation": record["best_validation"], "steps": record["steps"],
                "seconds": round(record["seconds"], 1), "curve": record["curve"]}
    return out


def write(table: LoraTable, args, ladder: Ladder, plans, suite, searches, svd_errors, null_space, seconds, benches,
          missing) -> None:
    tasks = table.tasks
    tuned = {p.name: describe(c) for p in plans if (c := _first(searches.get(p.name)))}
    labels = {p.label: p.name for p in plans}
    for r in table.rows:
        if r.validation and labels.get(r.name) in tuned:
            r.note = tuned[labels[r.name]]
        elif not r.validation and labels.get(r.name) == "ties":
            r.note = r.note.replace("λ=1", "λ=1; global") if "global" not in r.note else r.note
    if svd_errors:
        means = [e["mean"] for e in svd_errors.values()]
        table.row(SVD_ROW).note = (f"TIES k={args.density:g}, λ=1, each module's update cut to rank {RANK} by SVD: "
                                   f"relative error mean {statistics.fmean(means):.2f}, max "
                                   f"{max(e['max'] for e in svd_errors.values()):.2f}")
    for label in PEFT_ROWS.values():
        table.row(label).note = f"A and B merged apart, density={args.density:g}"
    p = ladder.protocol
    choices = lr_choices(ladder, suite)
    logs = adapter_logs(benches)
    train_seconds = {s: sum(v["seconds"] for v in by_task.values()) for s, by_task in logs.items()}
    all_runs = [common.train_log(path) for path in sorted((common.CACHE / "lora").glob("*-*"))
                if (path / "train_log.json").is_file() and path.name.split("-")[0] in suite]
    ladder_seconds = sum(r["seconds"] for r in all_runs if r["config"]["seed"] == p.select_seed
                         and r.get("val_limit", "x") == p.val_limit and r["max_length"] == common.MAX_LENGTH
                         and r["config"]["patience"] == p.patience and r["config"]["epochs"] == p.max_epochs)
    any_bench = next(iter(benches.values()))
    merge_seconds = {}
    for b in benches.values():
        for key, v in b.cache.data.items():
            if key.startswith("seconds:"):
                merge_seconds.setdefault(key[len("seconds:"):], []).append(v)
    table.meta = {
        "command": command(args), "seeds": sorted(benches), "seeds_left_out": missing, "tune_seeds": args.tune_seeds,
        "data_seed": args.data_seed, "device": args.device, "hardware": hardware(), "max_length": common.MAX_LENGTH,
        "lora": {"rank": RANK, "alpha": ALPHA, "targets": TARGETS, "dropout": 0.0},
        "protocol": dataclasses.asdict(p), "lr_choice": choices, "adapters": logs,
        "train_seconds_per_seed": train_seconds, "train_seconds_seed0_all_ladder_runs": ladder_seconds,
        "test_per_task": {t: len(any_bench.test[t]) for t in tasks},
        "validation_per_task_for_tuning": {t: len(any_bench.val[t]) for t in tasks},
        "grids": {p.name: {k: list(v) for k, v in p.grid.items()} for p in plans if p.grid},
        "searches": searches, "svd_relative_error": {str(k): v for k, v in svd_errors.items()},
        "float32_vs_float64_svd_relative_difference": {str(k): v for k, v in null_space.items()},
        "merge_seconds": {k: [round(x, 2) for x in v] for k, v in merge_seconds.items()},
        "seconds": {k: round(v, 1) for k, v in seconds.items()}, "tiesmerge_version": tiesmerge.__version__,
        "reused_from_cache": sorted({k for b in benches.values() for k in b.cache.reused})}
    seeds = ", ".join(map(str, sorted(benches)))
    lrs = ", ".join(f"{t} {c['chosen']:g}" for t, c in choices.items())
    epochs = {t: [logs[s][t]["best_epoch"] for s in sorted(logs)] for t in tasks}
    pre = (
        f"# LoRA adapters merged, converged protocol: all-MiniLM-L6-v2, {len(benches)} training seed(s) ({seeds})\n\n"
        f"One rank-{RANK} LoRA (α={ALPHA}, no dropout) per task on the attention (query, key, value, output) and "
        "MLP (intermediate, output) projections, trained against the frozen cosine heads on Table 1's protocol "
        f"(common.Protocol): all {len(suite[tasks[0]].train[:p.train_limit])} training examples per task, "
        f"{common.MAX_LENGTH}-token inputs, batch {p.batch_size}, AdamW with linear warm-up and decay over at most "
        f"{p.max_epochs} epochs, early stopping on the accuracy over all "
        f"{len(suite[tasks[0]].validation[:p.val_limit])} validation examples (patience {p.patience}, best epoch "
        f"kept). The learning rate was chosen per task on validation at seed {p.select_seed} from the ladder "
        f"{list(p.lrs)} (the next rate is tried only while the best run so far still improved at its last epoch) "
        f"and reused for the other seeds: {lrs}. Best epoch per task (seeds {seeds}): "
        + "; ".join(f"{t} {'/'.join(map(str, e))}" for t, e in epochs.items()) + ". Curves: lora.json "
        "(meta.adapters).\n\n"
        f"Accuracy (%) on {len(any_bench.test[tasks[0]])} test examples per task, mean ± std over the seeds. "
        "Normalized mean: each task's accuracy ÷ the same seed's own adapter's, averaged over tasks, then "
        "mean ± std over seeds; worst task: the lowest normalized accuracy (mean over seeds). tiesmerge merges "
        "the adapters' real weight changes ΔW = (α/r)·B·A (every other tensor has no change). Rows with val = no "
        "use the method's defaults; rows with val = yes chose their options on seed "
        f"{args.tune_seeds[0]}'s validation split only ({len(any_bench.val[tasks[0]])} examples per task, the "
        "first of the validation examples; never test) over the method's own grid, as Table 1 (thinned to "
        f"{args.max_grid_points} points, widened {args.widen_rounds}× where the best value sat on an edge; "
        "⚠ marks a choice still on an edge, or a caveat), and reused that choice for the other seeds.\n\n")
    post = "\n" + _reading(table, args) + _null_space_text(null_space) + _times(
        table, train_seconds, ladder_seconds, merge_seconds, searches, seconds, p) + (
        f"\nSeeds left out (adapters not cached yet): {sorted(missing)}; the command below resumes from the cache.\n"
        if missing else "") + (
        f"\nGenerated by `{command(args)}` ({args.device}, {hardware()['cpu_count']} CPU cores shared with other "
        f"jobs, torch threads {torch.get_num_threads()}); `--train-only` trains, `--cached-only` merges.\n")
    table.write(args.out / "lora.md", args.out / "lora.json", preamble=pre, epilogue=post)
    log(f"wrote {args.out / 'lora.md'}")


def _reading(table: LoraTable, args) -> str:
    """The best merge, how far PEFT's factor-wise merges and the rank-8 write-back are from tiesmerge's
    ΔW merge, and each method next to its Table 1 row (full fine-tunes)."""
    merges = [r for r in table.rows if r.name not in ("zero-shot", REFERENCE) and table.seeds(r)]
    if not merges:
        return ""
    norm = {(r.name, r.validation): table.summary(r)["normalized_mean"] for r in merges}
    summary = {(r.name, r.validation): table.summary(r) for r in merges}

    def name(r) -> str:
        return f"{r.name} ({'val' if r.validation else 'defaults'})"

    best = max(merges, key=lambda r: norm[(r.name, r.validation)][0])
    b = summary[(best.name, best.validation)]
    text = (f"**Reading.** The best merge, {name(best)}, keeps {100 * b['normalized_mean'][0]:.1f} ± "
            f"{100 * b['normalized_mean'][1]:.1f}% of the individual adapters (worst task {b['worst_task']} at "
            f"{100 * b['worst_normalized']:.1f}%).")
    ties = norm.get(("TIES", False))
    if ties is not None:
        for row in (SVD_ROW, *PEFT_ROWS.values()):
            if (row, False) in norm:
                text += (f" {row}: {100 * norm[(row, False)][0]:.1f}% against {100 * ties[0]:.1f}% for TIES with the "
                         "same k and λ on ΔW.")
    if args.table1.is_file():
        full = {(r["name"], r["validation"]): r["summary"]["normalized_mean"][0]
                for r in json.loads(args.table1.read_text())["rows"] if "summary" in r}
        pairs = [(r, full[(r.name, r.validation)]) for r in merges if (r.name, r.validation) in full]
        if pairs:
            text += (" Next to Table 1 (full fine-tunes, each normalized against its own models; table1.md), "
                     "LoRA here vs full there: " + "; ".join(
                         f"{name(r)} {100 * norm[(r.name, r.validation)][0]:.1f}% vs {100 * v:.1f}%"
                         for r, v in pairs) + ".")
    return text + "\n"


def _null_space_text(null_space: dict) -> str:
    check = next(iter(null_space.values()), None)
    loose = [k for k, v in (check or {}).items() if v > 1e-3]
    measured = (" Measured on these adapters (the tuning seed): the merged update differs by "
                + ", ".join(f"{v:.1e} for {k}" for k, v in check.items())
                + " (relative, Frobenius) between a float32 and a float64 SVD of the same inputs"
                + (f"; more than rounding for {', '.join(loose)} (see the reading below)." if loose else
                   ": rounding, nothing arbitrary.") if check else "")
    return ("\n**SVD methods on adapters.** Every LoRA target here has min(rows, cols) = 384, while each task's "
            f"ΔW has rank ≤ {RANK} and the sum of the 8 has rank ≤ {8 * RANK}. TSV-M's default keeps 384/8 = 48 "
            "triplets per task and Iso-C flattens all 384 singular values of the sum; taken literally, 40 of "
            "TSV-M's triplets and ≥ 320 of Iso-C's directions would be an arbitrary basis of a null space (the "
            "reference implementations do that, and their result then depends on the SVD routine). tiesmerge "
            "keeps only each matrix's numerical rank (singular values above float32's rounding floor, past a "
            "cliff: methods/svd.py), so a task contributes its 8 triplets and Iso-C flattens the nonzero "
            "spectrum over its own directions; full fine-tunes, whose spectra decay smoothly, are unaffected "
            "(Table 1's merges are bit-identical)." + measured + "\n")


def _merge_label(key: str) -> str:
    if key.startswith("merge:"):
        _, name, options = key.split(":", 2)
        options = json.loads(options)
        return f"{name} ({describe(options) if options else 'defaults'})"
    return {"svd": SVD_ROW, "peft:ties": "PEFT ties", "peft:dare_ties": "PEFT dare_ties"}.get(key, key)


def _times(table, train_seconds, ladder_seconds, merge_seconds, searches, seconds, p) -> str:
    merges = "; ".join(f"{_merge_label(k)} {statistics.fmean(v):.1f} s" for k, v in merge_seconds.items())
    tuning = "; ".join(f"{name} {statistics.fmean(x['seconds'] for x in by_seed.values()):.0f} s "
                       f"({sum(x['merges'] for x in by_seed.values())} merges, "
                       f"{sum(len(x['points']) for x in by_seed.values())} points scored)"
                       for name, by_seed in searches.items())
    return (f"\n**Times.** Training: {', '.join(f'seed {s} {v:.0f} s' for s, v in train_seconds.items())} for the "
            f"{len(table.tasks)} chosen adapters of each seed; all seed-{p.select_seed} runs of the ladder together "
            f"{ladder_seconds:.0f} s (one torch thread on a core shared with other jobs, so these are upper bounds). "
            "Merges (seconds, mean over seeds, the merge alone, without evaluation): " + merges
            + (f". Validation searches on seed 0 (merges + validation evaluations): {tuning}" if tuning else "")
            + ". Stages of this run: " + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items()) + ".\n")


def main() -> None:
    args = parse_args()
    suite, tasks, heads, seconds = common.start_run(args)
    ladder = Ladder(args, heads)
    if not args.cached_only:
        clock = time.perf_counter()
        train_all(args, ladder, suite)
        seconds["train"] = time.perf_counter() - clock
    if args.train_only:
        return
    plans = [dataclasses.replace(p, grid=shrink(thin(p.grid, args.max_axis_values), args.max_grid_points))
             for p in plan(len(tasks), args.methods)]
    for p in plans:
        if p.skip:
            raise SystemExit(f"{p.name} has no row on adapters: {p.skip}")
    table = LoraTable(tasks)
    for name in ("zero-shot", REFERENCE, *(p.label for p in plans), SVD_ROW, *PEFT_ROWS.values()):
        table.row(name)
    for p in plans:
        if p.grid:
            table.row(p.label, validation=True)
    choices: dict[str, dict] = {}
    searches: dict[str, dict] = {}
    svd_errors: dict[int, dict] = {}
    null_space: dict[int, dict] = {}
    benches: dict[int, LoraBench] = {}
    missing: dict[int, str] = {}
    for seed in sorted(args.seeds, key=lambda s: (s not in args.tune_seeds, s)):
        try:
            bench = LoraBench(args, suite, heads, ladder, seed)
        except NotCached as exc:
            missing[seed] = str(exc)
            log(f"seed {seed} left out: {exc}")
            continue
        if seed not in args.tune_seeds and not choices:
            missing[seed] = "no tuning seed ran before it"
            continue
        benches[seed] = bench
        clock = time.perf_counter()
        reference_rows(bench, table)
        method_rows(bench, table, plans, choices, searches)
        if seed == args.tune_seeds[0] and {"tsv_m", "iso_c"} <= set(args.methods):
            null_space[seed] = bench.cache.get("svd_precision_check", lambda b=bench: precision_check(b))
        adapter_rows(bench, table, svd_errors)
        seconds[f"seed{seed}:merges_and_evaluation"] = time.perf_counter() - clock
        _flag_edges(table, searches)
        write(table, args, ladder, plans, suite, searches, svd_errors, null_space, seconds, benches, missing)
    if not benches:
        raise SystemExit(f"no seed has all its adapters cached: {missing}")
    write(table, args, ladder, plans, suite, searches, svd_errors, null_space, seconds, benches, missing)


if __name__ == "__main__":
    main()
