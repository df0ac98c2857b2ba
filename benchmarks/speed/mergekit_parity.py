"""Bit-for-bit parity of the issue-12 methods (and linear) with the real mergekit 0.1.5, on tiny float32 Llamas.

    python benchmarks/speed/mergekit_parity.py [--mergekit-venv /tmp/mergekit-venv] [--root /tmp/tiesmerge-parity]

Writes a seeded family of tiny float32 ``LlamaForCausalLM`` checkpoints (a base and three
fine-tunes; the embedding and head have more than 2^20 entries, so SLERP's chunked norms run;
the fine-tunes' deltas sit on a coarse grid, so magnitudes tie and the sort order matters), runs
every recipe below as it is through ``tiesmerge merge RECIPE`` and mergekit's ``mergekit-yaml
RECIPE`` (``dtype: float32``), and compares the outputs tensor by tensor: entries whose bits
differ, and the largest |difference|. DELLA draws random masks in both tools (differently), so
its recipes run at density 1, the deterministic part. Writes benchmarks/results/mergekit_parity.md
and .json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
RESULTS = REPO / "benchmarks" / "results"

HIDDEN, INTERMEDIATE, LAYERS, HEADS, KV_HEADS, VOCAB = 64, 176, 4, 4, 2, 17000  # 17000 x 64 > 2^20 entries

RECIPES: dict[str, str] = {
    "linear": """
merge_method: linear
models:
  - {{model: {m1}, parameters: {{weight: 0.5}}}}
  - {{model: {m2}, parameters: {{weight: 0.3}}}}
  - {{model: {m3}, parameters: {{weight: 0.2}}}}
dtype: float32
""",
    "slerp": """
merge_method: slerp
base_model: {base}
models: [{{model: {base}}}, {{model: {m1}}}]
parameters: {{t: 0.3}}
dtype: float32
""",
    "slerp_gradient": """
merge_method: slerp
base_model: {base}
models: [{{model: {base}}}, {{model: {m1}}}]
parameters:
  t:
    - {{filter: self_attn, value: [0, 0.5, 0.3, 0.7, 1]}}
    - {{filter: mlp, value: [1, 0.5, 0.7, 0.3, 0]}}
    - {{value: 0.5}}
dtype: float32
""",
    "nuslerp_base": """
merge_method: nuslerp
base_model: {base}
models: [{{model: {m1}, parameters: {{weight: 0.7}}}}, {{model: {m2}, parameters: {{weight: 0.3}}}}]
dtype: float32
""",
    "nuslerp_rows": """
merge_method: nuslerp
models: [{{model: {m1}, parameters: {{weight: 1.0}}}}, {{model: {m2}, parameters: {{weight: 2.0}}}}]
parameters: {{nuslerp_flatten: false, nuslerp_row_wise: true}}
dtype: float32
""",
    "breadcrumbs": """
merge_method: breadcrumbs
base_model: {base}
models:
  - {{model: {m1}, parameters: {{weight: 0.5, density: 0.3, gamma: 0.02}}}}
  - {{model: {m2}, parameters: {{weight: 0.3, density: 0.3, gamma: 0.02}}}}
  - {{model: {m3}, parameters: {{weight: 0.2, density: 0.3, gamma: 0.02}}}}
parameters: {{lambda: 1.2}}
dtype: float32
""",
    "breadcrumbs_rescale": """
merge_method: breadcrumbs
base_model: {base}
models:
  - {{model: {m1}, parameters: {{weight: 1.0}}}}
  - {{model: {m2}, parameters: {{weight: 0.5}}}}
parameters: {{density: 0.4, gamma: 0.05, normalize: true, rescale: true}}
dtype: float32
""",
    "breadcrumbs_ties": """
merge_method: breadcrumbs_ties
base_model: {base}
models:
  - {{model: {m1}, parameters: {{weight: 1.0}}}}
  - {{model: {m2}, parameters: {{weight: 0.7}}}}
  - {{model: {m3}, parameters: {{weight: 0.5}}}}
parameters: {{density: 0.3, gamma: 0.01, normalize: true, int8_mask: true}}
dtype: float32
""",
    "breadcrumbs_ties_sum": """
merge_method: breadcrumbs_ties
base_model: {base}
models:
  - {{model: {m1}, parameters: {{weight: 1.0}}}}
  - {{model: {m2}, parameters: {{weight: 1.0}}}}
parameters: {{density: 0.5, lambda: 0.8}}
dtype: float32
""",
    "della_density1": """
merge_method: della
base_model: {base}
models:
  - {{model: {m1}, parameters: {{weight: 1.0}}}}
  - {{model: {m2}, parameters: {{weight: 0.6}}}}
  - {{model: {m3}, parameters: {{weight: 0.4}}}}
parameters: {{density: 1.0, lambda: 1.1}}
dtype: float32
""",
    "della_linear_density1": """
merge_method: della_linear
base_model: {base}
models:
  - {{model: {m1}, parameters: {{weight: 0.5}}}}
  - {{model: {m2}, parameters: {{weight: 0.5}}}}
parameters: {{density: 1.0, normalize: true}}
dtype: float32
""",
    "model_stock": """
merge_method: model_stock
base_model: {base}
models: [{{model: {m1}}}, {{model: {m2}}}, {{model: {m3}}}]
dtype: float32
""",
    "model_stock_filter_wise": """
merge_method: model_stock
base_model: {base}
models: [{{model: {m1}}}, {{model: {m2}}}]
parameters: {{filter_wise: true}}
dtype: float32
""",
}


def llama_shapes() -> dict[str, tuple[int, ...]]:
    head = HIDDEN // HEADS
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        shapes.update({
            p + "self_attn.q_proj.weight": (HIDDEN, HIDDEN), p + "self_attn.k_proj.weight": (KV_HEADS * head, HIDDEN),
            p + "self_attn.v_proj.weight": (KV_HEADS * head, HIDDEN), p + "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
            p + "mlp.gate_proj.weight": (INTERMEDIATE, HIDDEN), p + "mlp.up_proj.weight": (INTERMEDIATE, HIDDEN),
            p + "mlp.down_proj.weight": (HIDDEN, INTERMEDIATE), p + "input_layernorm.weight": (HIDDEN,),
            p + "post_attention_layernorm.weight": (HIDDEN,)})
    shapes.update({"model.norm.weight": (HIDDEN,), "lm_head.weight": (VOCAB, HIDDEN)})
    return shapes


def write_family(root: Path, seed: int = 0) -> dict[str, Path]:
    """base, m1..m3: float32; each fine-tune's delta on a grid of 2^-9 (ties in |delta|); m1's and
    m2's layer norms drawn afresh near 0 (on a base near 1, base + (model - base) rounds away the
    model's low bits: SLERP and Model Stock must read the models' own values), m3's equal to the
    base's (a zero task vector: SLERP's lerp branch)."""
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
              "intermediate_size": INTERMEDIATE, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
              "num_key_value_heads": KV_HEADS, "vocab_size": VOCAB, "max_position_embeddings": 256,
              "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "torch_dtype": "float32"}
    gen = torch.Generator().manual_seed(seed)
    base = {k: torch.randn(s, generator=gen) * (0.02 if len(s) == 2 else 1.0) + (0 if len(s) == 2 else 1.0)
            for k, s in llama_shapes().items()}
    paths = {}
    for name in ("base", "m1", "m2", "m3"):
        out = root / name
        out.mkdir(parents=True, exist_ok=True)
        if name == "base":
            state = base
        else:
            state = {}
            for k, v in base.items():
                delta = torch.round(torch.randn(v.shape, generator=gen) * 4) / 512  # coarse: magnitudes tie
                if name == "m3" and v.dim() == 1:
                    delta = torch.zeros_like(v)
                state[k] = (v + delta).float()
                if name != "m3" and v.dim() == 1:
                    state[k] = 0.1 * torch.randn(v.shape, generator=gen)
        save_file({k: v.contiguous() for k, v in state.items()}, str(out / "model.safetensors"),
                  metadata={"format": "pt"})
        (out / "config.json").write_text(json.dumps(config, indent=1))
        paths[name] = out
    return paths


def tensors(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def compare(a_dir: Path, b_dir: Path) -> dict:
    a, b = tensors(a_dir), tensors(b_dir)
    rows, differing, total, max_abs = [], 0, 0, 0.0
    for name in sorted(set(a) | set(b)):
        if name not in a or name not in b or a[name].shape != b[name].shape:
            rows.append({"name": name, "problem": "missing or shape"})
            continue
        x, y = a[name], b[name]
        diff = int((x.view(torch.int32) != y.view(torch.int32)).sum()) if x.dtype == y.dtype == torch.float32 \
            else int((x.float() != y.float()).sum())
        differing += diff
        total += x.numel()
        if diff:
            m = float((x.double() - y.double()).abs().max())
            max_abs = max(max_abs, m)
            rows.append({"name": name, "differing": diff, "numel": x.numel(), "max_abs": m})
    return {"entries": total, "differing": differing, "max_abs": max_abs, "dtypes": sorted({str(t.dtype) for t in
                                                                                            a.values()}),
            "tensors_differing": rows}


def run(argv: list[str], log: Path, env: dict | None = None) -> tuple[int, float]:
    started = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.run(argv, stdout=f, stderr=f, env=env, check=False).returncode
    return rc, time.perf_counter() - started


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mergekit-venv", type=Path, default=Path("/tmp/mergekit-venv"))
    p.add_argument("--root", type=Path, default=Path("/tmp/tiesmerge-parity"))
    p.add_argument("--tiesmerge", type=Path, default=Path(sys.executable).parent / "tiesmerge")
    p.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()
    paths = write_family(args.root / "models")
    base, model = tensors(paths["base"]), tensors(paths["m1"])
    rounds = sum(int((base[k] + (model[k] - base[k]) != model[k]).sum()) for k in base)
    print(f"entries where base + (m1 - base) != m1 in float32: {rounds}", flush=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    results = []
    for key in args.recipes:
        recipe = args.root / f"{key}.yaml"
        recipe.write_text(RECIPES[key].format(**{k: str(v) for k, v in paths.items()}).lstrip())
        ours, theirs = args.root / f"{key}-tiesmerge", args.root / f"{key}-mergekit"
        t_rc, t_s = run([str(args.tiesmerge), "merge", str(recipe), "-o", str(ours), "--force", "--no-progress",
                         "--dtype", "float32"], args.root / f"{key}-tiesmerge.log")
        m_rc, m_s = run([str(args.mergekit_venv / "bin" / "mergekit-yaml"), str(recipe), str(theirs)],
                        args.root / f"{key}-mergekit.log", env)
        row = {"recipe": key, "tiesmerge_rc": t_rc, "mergekit_rc": m_rc, "tiesmerge_s": round(t_s, 2),
               "mergekit_s": round(m_s, 2)}
        if t_rc == 0 and m_rc == 0:
            row.update(compare(ours, theirs))
        results.append(row)
        verdict = (f"{row['differing']} of {row['entries']} entries differ (max |Δ| {row['max_abs']:.3g})"
                   if "entries" in row else f"rc tiesmerge {t_rc}, mergekit {m_rc}")
        print(f"{key:<26} {verdict}", flush=True)
    mk = subprocess.run([str(args.mergekit_venv / "bin" / "python"), "-c",
                         "import importlib.metadata as m, torch, numpy; print(m.version('mergekit'), torch.__version__,"
                         " numpy.__version__)"], capture_output=True, text=True, check=False).stdout.split()
    data = {"mergekit": mk[0] if mk else None, "mergekit_torch": mk[1] if len(mk) > 1 else None,
            "tiesmerge_torch": torch.__version__, "shapes": {"hidden": HIDDEN, "layers": LAYERS, "vocab": VOCAB},
            "entries_where_base_plus_tau_is_not_the_model": rounds,
            "results": results}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "mergekit_parity.json").write_text(json.dumps(data, indent=2) + "\n")
    lines = ["# mergekit 0.1.5 parity of the issue-12 methods (float32, bit for bit)", "",
             f"Written by `benchmarks/speed/mergekit_parity.py`: mergekit {data['mergekit']} (torch "
             f"{data['mergekit_torch']}) against tiesmerge (torch {data['tiesmerge_torch']}), a tiny float32 Llama "
             f"(hidden {HIDDEN}, {LAYERS} layers, vocab {VOCAB}), three fine-tunes; each recipe run as is by both. "
             f"In {rounds} entries of m1, base + (m1 - base) is not m1 in float32: the interpolations read the "
             "models' own values. Times: one run each, process start-up included, on a shared machine: a check of "
             "equality, not a speed benchmark (`mergekit_recipes.py` is one).",
             "", "| recipe | entries | entries whose bits differ | max abs diff | tiesmerge s | mergekit s |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in results:
        if "entries" in r:
            lines.append(f"| {r['recipe']} | {r['entries']:,} | {r['differing']:,} | {r['max_abs']:.3g} | "
                         f"{r['tiesmerge_s']} | {r['mergekit_s']} |")
        else:
            lines.append(f"| {r['recipe']} | failed: rc tiesmerge {r['tiesmerge_rc']}, mergekit {r['mergekit_rc']} "
                         "| | | | |")
    (args.out / "mergekit_parity.md").write_text("\n".join(lines) + "\n")
    return 0 if all(r.get("differing", 1) == 0 for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
