"""The same mergekit YAML given to tiesmerge and to mergekit: outputs compared, times side by side.

    python benchmarks/speed/mergekit_recipes.py            # small synthetic Llama set (make_models.py)

Each recipe is written once and run as it is by ``tiesmerge merge RECIPE -o OUT`` and by
mergekit 0.1.5's ``mergekit-yaml RECIPE OUT`` (its own venv, /tmp/mergekit-venv). Outputs are
compared tensor by tensor (max |Δ|, entries beyond one bf16 ulp). DARE recipes draw random
masks in both tools (differently), so their rows report only time and the agreement of the
merged deltas' magnitude. Writes benchmarks/results/mergekit_recipes.md + .json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import make_models  # noqa: E402
from run import DEFAULT_MERGEKIT_VENV, DEFAULT_RESULTS, REPO, compare_outputs, log, timed  # noqa: E402

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
    p.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    p.add_argument("--tiesmerge", type=Path, default=REPO / ".venv" / "bin" / "tiesmerge")
    p.add_argument("--mergekit-venv", type=Path, default=DEFAULT_MERGEKIT_VENV)
    p.add_argument("--out", type=Path, default=DEFAULT_RESULTS)
    p.add_argument("--memory-budget", default="4GiB", help="tiesmerge's --memory-budget (default 4GiB)")
    args = p.parse_args()
    models_dir = args.root / args.size
    base, fts = models_dir / "base", [models_dir / f"ft-{i:02d}" for i in (1, 2, 3)]
    if not all(d.is_dir() for d in (base, *fts)):
        raise SystemExit(f"missing models under {models_dir}: run benchmarks/speed/make_models.py --size {args.size}")
    work = args.root / "mergekit-recipes"
    work.mkdir(parents=True, exist_ok=True)
    mergekit = args.mergekit_venv / "bin" / "mergekit-yaml"
    rows = []
    for key in args.recipes:
        label, template = RECIPES[key]
        recipe = work / f"{key}.yaml"
        recipe.write_text(template.format(base=base, m1=fts[0], m2=fts[1], m3=fts[2]).lstrip())
        ours, theirs = work / f"{key}-tiesmerge", work / f"{key}-mergekit"
        for out in (ours, theirs):
            shutil.rmtree(out, ignore_errors=True)
        log(f"{key}: tiesmerge")
        # mergekit's exact-k trim sorts each tensor whole: the embedding (32000 x 1024, 3 models) needs
        # more than the default 2 GiB working budget in one chunk
        t_run = timed([str(args.tiesmerge), "merge", str(recipe), "-o", str(ours), "--no-progress",
                       "--memory-budget", args.memory_budget], work / f"{key}-tiesmerge.log")
        log(f"{key}: mergekit ({t_run['wall_s']} s for tiesmerge)")
        m_run = timed([str(mergekit), str(recipe), str(theirs)], work / f"{key}-mergekit.log")
        row = {"key": key, "label": label, "recipe": recipe.read_text(),
               "tiesmerge": {k: t_run.get(k) for k in ("rc", "wall_s", "peak_rss_bytes", "log_tail")},
               "mergekit": {k: m_run.get(k) for k in ("rc", "wall_s", "peak_rss_bytes", "log_tail")}}
        if t_run["rc"] == 0 and m_run["rc"] == 0:
            compared = compare_outputs(ours, theirs, base)
            compared.pop("per_tensor")
            row["compare"] = compared
            manifest = json.loads((ours / "tiesmerge.json").read_text())
            row["semantics"] = manifest["recipe"].get("origin", {}).get("semantics")
            row["translated_to"] = {"method": manifest["method"]["name"], "options": manifest["method"]["options"]}
            log(f"{key}: max |Δ| {compared['max_abs_diff']:.3g}, beyond 1 bf16 ulp "
                f"{100 * compared['fraction_beyond_1ulp']:.4f} %, {m_run['wall_s']} s for mergekit")
        rows.append(row)
        for out in (ours, theirs):
            shutil.rmtree(out, ignore_errors=True)
    spec = json.loads((base / "speed-model.json").read_text()) if (base / "speed-model.json").is_file() else {}
    result = {"created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "models": str(models_dir), "model_spec": spec,
              "tiesmerge_memory_budget": args.memory_budget, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "mergekit_recipes.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "mergekit_recipes.md").write_text(report(result))
    print(report(result))
    return 0 if all(r["tiesmerge"]["rc"] == 0 and r["mergekit"]["rc"] == 0 for r in rows) else 1


def report(result: dict) -> str:
    lines = ["# mergekit recipes: tiesmerge's output against mergekit's own", "",
             f"The same YAML file run by `tiesmerge merge RECIPE -o OUT` and by mergekit 0.1.5's `mergekit-yaml "
             f"RECIPE OUT`, on the synthetic Llama checkpoints `{result['models']}` (base + 3 fine-tunes, bf16, "
             "from `benchmarks/speed/make_models.py`). Written by `benchmarks/speed/mergekit_recipes.py` on "
             f"{result['created']}; one run each, 2 CPU cores; tiesmerge with `--memory-budget "
             f"{result['tiesmerge_memory_budget']}` (mergekit's exact-k trim sorts each tensor whole).", "",
             "| recipe | tiesmerge s | mergekit s | max abs diff | entries differing | beyond 1 bf16 ulp | "
             "opposite merged sign |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        c = r.get("compare")
        t, m = r["tiesmerge"], r["mergekit"]
        if c is None:
            lines.append(f"| {r['label']} | {t['wall_s']} (rc {t['rc']}) | {m['wall_s']} (rc {m['rc']}) "
                         "| — | — | — | — |")
            continue
        lines.append(f"| {r['label']} | {t['wall_s']:.1f} | {m['wall_s']:.1f} | {c['max_abs_diff']:.3g} | "
                     f"{100 * c['fraction_differing']:.3f} % | {100 * c['fraction_beyond_1ulp']:.4f} % | "
                     f"{c['entries_opposite_sign']:,} |")
    lines += ["", "Max |merged − base| for scale: " + ", ".join(
        f"{r['key']} {r['compare']['max_abs_merged_minus_base']:.3g}" for r in result["rows"] if "compare" in r), "",
        "What each recipe became in tiesmerge (the manifest's `recipe.origin.semantics`):", ""]
    lines += [f"- `{r['key']}`: {r.get('semantics')}" for r in result["rows"]]
    lines += ["", "Where the outputs differ: the ties recipes run with mergekit's own trim (exactly max(1, k) entries "
              "per tensor, ties at the threshold in `torch.argsort`'s order: `threshold_ties: sort`), so computed in "
              "float32 (`ties_f32`) the two outputs are bit-identical. With `dtype: bfloat16` mergekit rounds the task "
              "vectors, the election sums and the division to bf16 before the final cast; tiesmerge computes in "
              "float32 and rounds once, and the differences in the bf16 rows are that intermediate rounding (it "
              "flips the elected sign where the weighted sum is near 0). `linear` and `task_arithmetic` differ by "
              "the order of float32 operations (θ_0 + Σ (w_i/Σw)(θ_i − θ_0) vs Σ w_i θ_i / Σ w) and mergekit's bf16 "
              "task vectors: one bf16 ulp at most but for a few entries at a binade edge. `dare_ties` draws different "
              "random masks in the two tools and rescales differently (1/density vs the tensor's L1 norm), so only its "
              "timing is comparable. tiesmerge's exact-k trim runs on the torch path (a sort per tensor and model), "
              "which is why its ties times are mergekit's rather than the fused kernels' (`results/speed.md`).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
