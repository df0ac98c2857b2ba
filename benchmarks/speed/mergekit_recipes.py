"""The same mergekit YAML given to tiesmerge and to mergekit: outputs compared, times side by side.

    python benchmarks/speed/mergekit_recipes.py                 # every recipe, small synthetic Llama set
    python benchmarks/speed/mergekit_recipes.py --only ties_f32  # re-run rows; the others are kept

A new row is one entry in RECIPES: a key, a description and the YAML (with {base}, {m1}..{m3}).

Each recipe is written once and run as it is by ``tiesmerge merge RECIPE -o OUT`` and by
mergekit 0.1.5's ``mergekit-yaml RECIPE OUT`` (its own venv, /tmp/mergekit-venv). Outputs are
compared tensor by tensor (max |Δ|, entries beyond one bf16 ulp). DARE recipes draw random
masks in both tools (differently), so their rows report only time and the agreement of the
merged deltas' magnitude. Writes benchmarks/results/mergekit_recipes.md + .json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import make_models  # noqa: E402
from run import DEFAULT_MERGEKIT_VENV, DEFAULT_RESULTS, REPO, compare_outputs, log, timed  # noqa: E402

TARGET_SPEEDUP = 5.0  # issue 12: every recipe at least 5x faster in tiesmerge than in mergekit, in one run

# recipes in mergekit's own format; {base} and {m1..m3} are the synthetic models
RECIPES: dict[str, tuple[str, str]] = {
    "linear": ("linear, weights 0.5/0.3/0.2", """
merge_method: linear
models:
  - {{model: {m1}, parameters: {{weight: 0.5}}}}
  - {{model: {m2}, parameters: {{weight: 0.3}}}}
  - {{model: {m3}, parameters: {{weight: 0.2}}}}
dtype: bfloat16
"""),
    "task_arithmetic": ("task_arithmetic, base listed, λ 0.8", """
merge_method: task_arithmetic
base_model: {base}
models:
  - {{model: {base}}}
  - {{model: {m1}, parameters: {{weight: 0.6}}}}
  - {{model: {m2}, parameters: {{weight: 0.4}}}}
  - {{model: {m3}, parameters: {{weight: 0.3}}}}
parameters: {{lambda: 0.8}}
dtype: bfloat16
"""),
    "ties": ("ties, densities 0.2/0.3/0.5, weights 1/0.7/0.5, normalize", """
merge_method: ties
base_model: {base}
models:
  - {{model: {m1}, parameters: {{density: 0.2, weight: 1.0}}}}
  - {{model: {m2}, parameters: {{density: 0.3, weight: 0.7}}}}
  - {{model: {m3}, parameters: {{density: 0.5, weight: 0.5}}}}
parameters: {{normalize: true, int8_mask: true}}
dtype: bfloat16
"""),
    "ties_sum": ("ties, density 0.2, weight 0.5, normalize false, λ 1.5", """
merge_method: ties
base_model: {base}
models:
  - {{model: {m1}, parameters: {{density: 0.2, weight: 0.5}}}}
  - {{model: {m2}, parameters: {{density: 0.2, weight: 0.5}}}}
  - {{model: {m3}, parameters: {{density: 0.2, weight: 0.5}}}}
parameters: {{normalize: false, lambda: 1.5}}
dtype: bfloat16
"""),
    "ties_f32": ("ties as above, computed in float32 (dtype float32, out_dtype bfloat16)", """
merge_method: ties
base_model: {base}
models:
  - {{model: {m1}, parameters: {{density: 0.2, weight: 1.0}}}}
  - {{model: {m2}, parameters: {{density: 0.3, weight: 0.7}}}}
  - {{model: {m3}, parameters: {{density: 0.5, weight: 0.5}}}}
parameters: {{normalize: true}}
dtype: float32
out_dtype: bfloat16
"""),
    "linear_f32": ("linear as above, computed in float32 (out_dtype bfloat16)", """
merge_method: linear
models:
  - {{model: {m1}, parameters: {{weight: 0.5}}}}
  - {{model: {m2}, parameters: {{weight: 0.3}}}}
  - {{model: {m3}, parameters: {{weight: 0.2}}}}
dtype: float32
out_dtype: bfloat16
"""),
    "dare_ties": ("dare_ties, density 0.5, weight 0.5 (random masks)", """
merge_method: dare_ties
base_model: {base}
models:
  - {{model: {m1}, parameters: {{density: 0.5, weight: 0.5}}}}
  - {{model: {m2}, parameters: {{density: 0.5, weight: 0.5}}}}
  - {{model: {m3}, parameters: {{density: 0.5, weight: 0.5}}}}
dtype: bfloat16
"""),
}


# --- issue 12: the mergekit family, each recipe as mergekit's documentation writes it (float32 arithmetic,
# bf16 output). della draws random masks in both tools (differently): compare its time, not its entries.
RECIPES.update({
    "slerp": ("slerp from the base, t by filter and layer gradient", """
merge_method: slerp
base_model: {base}
models: [{{model: {base}}}, {{model: {m1}}}]
parameters:
  t:
    - {{filter: self_attn, value: [0, 0.5, 0.3, 0.7, 1]}}
    - {{filter: mlp, value: [1, 0.5, 0.7, 0.3, 0]}}
    - {{value: 0.5}}
dtype: float32
out_dtype: bfloat16
"""),
    "nuslerp": ("nuslerp of two task vectors, weights 0.7/0.3", """
merge_method: nuslerp
base_model: {base}
models: [{{model: {m1}, parameters: {{weight: 0.7}}}}, {{model: {m2}, parameters: {{weight: 0.3}}}}]
dtype: float32
out_dtype: bfloat16
"""),
    "breadcrumbs": ("breadcrumbs, density 0.3, gamma 0.01, weights 1/0.7/0.5", """
merge_method: breadcrumbs
base_model: {base}
models:
  - {{model: {m1}, parameters: {{weight: 1.0}}}}
  - {{model: {m2}, parameters: {{weight: 0.7}}}}
  - {{model: {m3}, parameters: {{weight: 0.5}}}}
parameters: {{density: 0.3, gamma: 0.01}}
dtype: float32
out_dtype: bfloat16
"""),
    "breadcrumbs_ties": ("breadcrumbs_ties, density 0.3, gamma 0.01, normalize", """
merge_method: breadcrumbs_ties
base_model: {base}
models:
  - {{model: {m1}, parameters: {{weight: 1.0}}}}
  - {{model: {m2}, parameters: {{weight: 0.7}}}}
  - {{model: {m3}, parameters: {{weight: 0.5}}}}
parameters: {{density: 0.3, gamma: 0.01, normalize: true}}
dtype: float32
out_dtype: bfloat16
"""),
    "della": ("della, density 0.5, epsilon 0.15 (random masks)", """
merge_method: della
base_model: {base}
models:
  - {{model: {m1}, parameters: {{weight: 1.0}}}}
  - {{model: {m2}, parameters: {{weight: 0.7}}}}
  - {{model: {m3}, parameters: {{weight: 0.5}}}}
parameters: {{density: 0.5, epsilon: 0.15}}
dtype: float32
out_dtype: bfloat16
"""),
    "della_linear": ("della_linear, density 1 (the deterministic part)", """
merge_method: della_linear
base_model: {base}
models:
  - {{model: {m1}, parameters: {{weight: 0.5}}}}
  - {{model: {m2}, parameters: {{weight: 0.3}}}}
  - {{model: {m3}, parameters: {{weight: 0.2}}}}
parameters: {{density: 1.0, normalize: true}}
dtype: float32
out_dtype: bfloat16
"""),
    "model_stock": ("model_stock of three fine-tunes", """
merge_method: model_stock
base_model: {base}
models: [{{model: {m1}}}, {{model: {m2}}}, {{model: {m3}}}]
dtype: float32
out_dtype: bfloat16
"""),
})

def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--root", type=Path, default=make_models.DEFAULT_ROOT)
    p.add_argument("--size", choices=sorted(make_models.SIZES), default="small")
    p.add_argument("--only", "--recipes", dest="only", nargs="+", choices=list(RECIPES), default=None,
                   help="re-run only these rows; the other rows are kept from the existing results file")
    p.add_argument("--tiesmerge", type=Path, default=REPO / ".venv" / "bin" / "tiesmerge")
    p.add_argument("--mergekit-venv", type=Path, default=DEFAULT_MERGEKIT_VENV)
    p.add_argument("--out", type=Path, default=DEFAULT_RESULTS)
    p.add_argument("--memory-budget", default="8GiB", help="tiesmerge's --memory-budget (default 8GiB: whole-tensor "
                   "methods hold the 32000 x 1024 embedding of every model at once)")
    p.add_argument("--work", type=Path, default=None, help="recipes, outputs and logs (default ROOT/mergekit-recipes)")
    p.add_argument("--repeat", type=int, default=2, help="tiesmerge runs per recipe (the fastest is reported; "
                   "mergekit runs once)")
    args = p.parse_args()
    models_dir = args.root / args.size
    base, fts = models_dir / "base", [models_dir / f"ft-{i:02d}" for i in (1, 2, 3)]
    if not all(d.is_dir() for d in (base, *fts)):
        raise SystemExit(f"missing models under {models_dir}: run benchmarks/speed/make_models.py --size {args.size}")
    work = args.work or args.root / "mergekit-recipes"
    work.mkdir(parents=True, exist_ok=True)
    previous = _previous_rows(args.out / "mergekit_recipes.json") if args.only else {}
    spec = json.loads((base / "speed-model.json").read_text()) if (base / "speed-model.json").is_file() else {}
    args.out.mkdir(parents=True, exist_ok=True)
    fresh: dict[str, dict] = {}
    for key in args.only or list(RECIPES):  # the results are rewritten after each row: a cut-short run keeps its rows
        fresh[key] = run_recipe(key, args, work, base, fts)
        rows = [fresh.get(k) or previous[k] for k in RECIPES if k in fresh or k in previous]
        result = {"created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "models": str(models_dir), "model_spec": spec,
                  "tiesmerge_memory_budget": args.memory_budget, "cpus": os.cpu_count(), "rows": rows}
        (args.out / "mergekit_recipes.json").write_text(json.dumps(result, indent=2) + "\n")
        (args.out / "mergekit_recipes.md").write_text(report(result))
    print(report(result))
    return 0 if all(r["tiesmerge"]["rc"] == 0 and r["mergekit"]["rc"] == 0 for r in rows) else 1


def _previous_rows(path: Path) -> dict[str, dict]:
    """The rows of an earlier run, by recipe key (kept where ``--only`` re-runs others)."""
    if not path.is_file():
        return {}
    return {r["key"]: r for r in json.loads(path.read_text()).get("rows", [])}


def _cpu_s(run: dict) -> float | None:
    return None if run.get("user_s") is None else round(run["user_s"] + (run.get("sys_s") or 0.0), 2)


def run_recipe(key: str, args: argparse.Namespace, work: Path, base: Path, fts: list[Path]) -> dict:
    """One row: the recipe run by tiesmerge (``--repeat`` times, the fastest kept) and by mergekit
    (once), the outputs compared, the times and the machine's load beside them."""
    label, template = RECIPES[key]
    recipe = work / f"{key}.yaml"
    recipe.write_text(template.format(base=base, m1=fts[0], m2=fts[1], m3=fts[2]).lstrip())
    ours, theirs = work / f"{key}-tiesmerge", work / f"{key}-mergekit"
    for out in (ours, theirs):
        shutil.rmtree(out, ignore_errors=True)
    runs = []
    load_before = os.getloadavg()[0]
    for i in range(max(1, args.repeat)):
        log(f"{key}: tiesmerge ({i + 1}/{args.repeat})")
        shutil.rmtree(ours, ignore_errors=True)
        runs.append(timed([str(args.tiesmerge), "merge", str(recipe), "-o", str(ours), "--no-progress",
                           "--memory-budget", args.memory_budget], work / f"{key}-tiesmerge.log"))
    t_run = min(runs, key=lambda r: (r["rc"] != 0, r["wall_s"] or 0.0))
    if t_run["rc"] != 0:  # nothing to compare: do not spend mergekit's minutes
        log(f"{key}: tiesmerge failed (rc {t_run['rc']}), see {work / f'{key}-tiesmerge.log'}")
        m_run = {"rc": None, "wall_s": None}
    else:
        log(f"{key}: mergekit ({t_run['wall_s']} s for tiesmerge)")
        mergekit = args.mergekit_venv / "bin" / "mergekit-yaml"
        m_run = timed([str(mergekit), str(recipe), str(theirs)], work / f"{key}-mergekit.log")
    keys = ("rc", "wall_s", "user_s", "sys_s", "peak_rss_bytes", "log_tail")
    row = {"key": key, "label": label, "recipe": recipe.read_text(),
           "tiesmerge": {k: t_run.get(k) for k in keys} | {"cpu_s": _cpu_s(t_run),
                                                          "all_wall_s": [r["wall_s"] for r in runs]},
           "mergekit": {k: m_run.get(k) for k in keys} | {"cpu_s": _cpu_s(m_run)},
           "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)], "memory_budget": args.memory_budget}
    if t_run["rc"] == 0 and m_run["rc"] == 0:
        compared = compare_outputs(ours, theirs, base)
        compared.pop("per_tensor")
        row["compare"] = compared
        manifest = json.loads((ours / "tiesmerge.json").read_text())
        row["semantics"] = manifest["recipe"].get("origin", {}).get("semantics")
        row["translated_to"] = {"method": manifest["method"]["name"], "options": manifest["method"]["options"]}
        row["tiesmerge_profile"] = manifest.get("seconds")
        log(f"{key}: max |Δ| {compared['max_abs_diff']:.3g}, beyond 1 bf16 ulp "
            f"{100 * compared['fraction_beyond_1ulp']:.4f} %, {m_run['wall_s']} s for mergekit")
    for out in (ours, theirs):
        shutil.rmtree(out, ignore_errors=True)
    return row


def _budgets(result: dict) -> str:
    """The --memory-budget of the rows (older rows did not record theirs: the run's)."""
    used = {r.get("memory_budget", result["tiesmerge_memory_budget"]) for r in result["rows"]}
    return ", ".join(sorted(used)) + ("` (per row in the .json)" if len(used) > 1 else "`")


def _ratio(m: float | None, t: float | None) -> float | None:
    return m / t if m and t else None


def report(result: dict) -> str:
    lines = ["# mergekit recipes: tiesmerge's output against mergekit's own", "",
             f"The same YAML file run by `tiesmerge merge RECIPE -o OUT` and by mergekit 0.1.5's `mergekit-yaml "
             f"RECIPE OUT`, on the synthetic Llama checkpoints `{result['models']}` (base + 3 fine-tunes, bf16, "
             "from `benchmarks/speed/make_models.py`). Written by `benchmarks/speed/mergekit_recipes.py` on "
             f"{result['created']} ({result.get('cpus', 2)} CPU cores shared with other work: the load average "
             "is recorded per row in the .json); tiesmerge with `--memory-budget "
             f"{_budgets(result)}, the fastest of its runs, mergekit run once. Speed-up = "
             "mergekit / tiesmerge, by wall time and by CPU time (user + system, less sensitive to the "
             "machine's load).", "",
             "| recipe | tiesmerge s | mergekit s | speed-up | CPU s tiesmerge / mergekit | CPU speed-up | "
             "max abs diff | entries differing | beyond 1 bf16 ulp | opposite merged sign |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    fast, slow = [], []
    for r in result["rows"]:
        c = r.get("compare")
        t, m = r["tiesmerge"], r["mergekit"]
        if c is None:
            lines.append(f"| {r['label']} | {t['wall_s']} (rc {t['rc']}) | {m['wall_s']} (rc {m['rc']}) "
                         "| — | — | — | — | — | — | — |")
            slow.append(f"`{r['key']}` (failed)")
            continue
        speedup, cpu_speedup = _ratio(m["wall_s"], t["wall_s"]), _ratio(m.get("cpu_s"), t.get("cpu_s"))
        (fast if speedup and speedup >= TARGET_SPEEDUP else slow).append(f"`{r['key']}` {speedup:.1f}×")
        cpu = f"{t['cpu_s']:.1f} / {m['cpu_s']:.1f}" if t.get("cpu_s") and m.get("cpu_s") else "—"
        cpu_x = f"{cpu_speedup:.1f}×" if cpu_speedup else "—"
        lines.append(f"| {r['label']} | {t['wall_s']:.1f} | {m['wall_s']:.1f} | **{speedup:.1f}×** | {cpu} | "
                     f"{cpu_x} | {c['max_abs_diff']:.3g} | {100 * c['fraction_differing']:.3f} % | "
                     f"{100 * c['fraction_beyond_1ulp']:.4f} % | {c['entries_opposite_sign']:,} |")
    lines += ["", f"At least {TARGET_SPEEDUP:g}× faster by wall time: " + (", ".join(fast) or "none") + ". "
              f"Below {TARGET_SPEEDUP:g}×: " + (", ".join(slow) or "none") + ".", ""]
    lines += ["Max |merged − base| for scale: " + ", ".join(
        f"{r['key']} {r['compare']['max_abs_merged_minus_base']:.3g}" for r in result["rows"] if "compare" in r), "",
        "What each recipe became in tiesmerge (the manifest's `recipe.origin.semantics`):", ""]
    lines += [f"- `{r['key']}`: {r.get('semantics')}" for r in result["rows"]]
    lines += ["", "Where the outputs differ: the ties recipes run with mergekit's own trim (exactly max(1, "
              "int(density·numel)) entries per tensor, ties at the threshold in `torch.argsort`'s order: "
              "`threshold_ties: sort`). The fused engine finds that choice without sorting: it replays the "
              "partitions of the sort torch runs there (libstdc++'s introsort) only along the range that holds "
              "position k (`src/tiesmerge/engine/exactk.py`), so computed in float32 (`ties_f32`) the two outputs "
              "are bit-identical. With `dtype: bfloat16` mergekit rounds the task vectors, the election sums and "
              "the division to bf16 before the final cast; tiesmerge computes in float32 and rounds once, and the "
              "differences in the bf16 rows are that intermediate rounding (it flips the elected sign where the "
              "weighted sum is near 0). `linear` runs mergekit's own float32 order (Σ w_i θ_i accumulated from 0 "
              "with torch's fused multiply-add, then / Σ w; the first model read as the base): bit-identical, also "
              "with `dtype: bfloat16`, where mergekit accumulates in float32 too. `task_arithmetic` differs by "
              "mergekit's bf16 task vectors: one bf16 ulp at most but for a few entries at a binade edge. "
              "`dare_ties` and `della` draw different random masks in the two tools (and DARE rescales "
              "differently: 1/density vs the tensor's L1 norm), so only their timing is comparable. The whole-tensor "
              "recipes (`slerp`, `nuslerp`, `model_stock`) take their scalars from the norms and sums mergekit's torch "
              "computes, on the same float32 values and in ATen's own order (8-lane norms, the cascade sum split as "
              "torch's threads split it), straight from the stored rows (`src/tiesmerge/engine/whole.py`; checked "
              "against torch once per run, else torch reduces widened copies), and `breadcrumbs(_ties)` replays "
              "torch.sort's ascending order at the band's two cuts (`exactk.band_mask`), so they are bit-identical.",
              ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
