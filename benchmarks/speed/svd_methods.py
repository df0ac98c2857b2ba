"""The SVD merge methods' speed beside TIES on the speed benchmark's small set, in one run, and
the randomized SVD's error against the full SVD on the same task vectors (and, optionally, on a
real fine-tuned model's).

Rows (each `tiesmerge merge` under /usr/bin/time -v, page cache warmed first, as run.py does):
TIES global (the paper's defaults, fused kernels), TSV-M, TSV-M with the randomized SVD for the
two embedding-sized matrices (--randomized-above), Iso-C, Iso-CTS. The SVD methods need each
tensor whole with its SVD workspace, so they run with --memory-budget (default 8GiB; the
32000 x 1024 embeddings need about 2.4 GiB by the planner's count).

Error rows: for a matrix A (a fine-tune's task vector) and k = r // n (TSV-M's rank per task),
||A - A_k(randomized)||_F / ||A - A_k(exact)||_F (1 is optimal, Eckart-Young), the largest
relative error of the top-k singular values, and both timings; then the merged TSV-M tensors of
the exact and the randomized run compared (relative Frobenius difference of the task vectors).

    .venv/bin/python benchmarks/speed/svd_methods.py                   # -> benchmarks/results/speed.md section
    .venv/bin/python benchmarks/speed/svd_methods.py --real-base ~/.cache/tiesmerge/bench/models/base \\
        --real-model ~/.cache/tiesmerge/bench/models/wn_noun-5d7e12b16cb5
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))

import make_models  # noqa: E402
import run as speed  # noqa: E402

from tiesmerge.methods import svd as linalg  # noqa: E402

MARK_START = "<!-- svd_methods.py: start -->"
MARK_END = "<!-- svd_methods.py: end -->"
RANDOMIZED_ABOVE = 4_000_000  # entries: the two 32000 x 1024 matrices of the small set, nothing else


def rows(budget: str) -> list[tuple[str, str, list[str]]]:
    """(key, label, extra flags) of each timed merge."""
    svd = ["--memory-budget", budget]
    return [
        ("ties_global", "TIES, global (paper defaults)", ["--method", "ties", "--density", "0.2"]),
        ("tsv_m", "TSV-M", ["--method", "tsv_m", *svd]),
        ("tsv_m_randomized", f"TSV-M, randomized SVD above {RANDOMIZED_ABOVE:,} entries (the embeddings)",
         ["--method", "tsv_m", "--randomized-above", str(RANDOMIZED_ABOVE), *svd]),
        ("iso_c", "Iso-C", ["--method", "iso_c", *svd]),
        ("iso_cts", "Iso-CTS", ["--method", "iso_cts", *svd]),
    ]


def _tensor(directory: Path, name: str) -> torch.Tensor:
    for f in sorted(directory.glob("*.safetensors")):
        with safe_open(str(f), "pt") as fh:
            if name in fh.keys():
                return fh.get_tensor(name)
    raise KeyError(f"{name} not in {directory}")


def _names(directory: Path) -> list[str]:
    names = []
    for f in sorted(directory.glob("*.safetensors")):
        with safe_open(str(f), "pt") as fh:
            names += list(fh.keys())
    return names


def svd_error(a: torch.Tensor, k: int, *, power_iters: int, seed: int = 0) -> dict:
    """Randomized vs full SVD of one matrix at rank k (see the module docstring)."""
    a = a.float()
    clock = time.perf_counter()
    u, s, vh = torch.linalg.svd(a, full_matrices=False)
    full_s = time.perf_counter() - clock
    best = float(torch.linalg.matrix_norm(a.double() - (u[:, :k].double() * s[:k].double()) @ vh[:k].double()))
    clock = time.perf_counter()
    ur, sr, vhr = linalg.randomized_svd(a, k, generator=torch.Generator().manual_seed(seed), power_iters=power_iters)
    rand_s = time.perf_counter() - clock
    err = float(torch.linalg.matrix_norm(a.double() - (ur.double() * sr.double()) @ vhr.double()))
    return {"shape": list(a.shape), "k": k, "power_iters": power_iters, "full_svd_s": round(full_s, 3),
            "randomized_s": round(rand_s, 3), "error_ratio": err / best if best else None,
            "relative_error": err / float(torch.linalg.matrix_norm(a.double())),
            "optimal_relative_error": best / float(torch.linalg.matrix_norm(a.double())),
            "max_singular_value_rel_error": float(((sr - s[:k]).abs() / s[:k]).max())}


def error_rows(base: Path, model: Path, names: list[str], k_of, label: str, power_iters: tuple[int, ...]) -> list[dict]:
    out = []
    for name in names:
        a = _tensor(model, name).float() - _tensor(base, name).float()
        for q in power_iters:
            speed.log(f"randomized SVD error: {label} {name} {tuple(a.shape)}, {q} power iterations")
            out.append({"set": label, "tensor": name, **svd_error(a, k_of(a), power_iters=q)})
    return out


def merged_difference(exact: Path, randomized: Path, base: Path, names: list[str]) -> list[dict]:
    """Relative Frobenius difference of the merged task vectors, randomized vs exact TSV-M."""
    out = []
    for name in names:
        b = _tensor(base, name).double()
        d_exact, d_rand = _tensor(exact, name).double() - b, _tensor(randomized, name).double() - b
        out.append({"tensor": name, "relative_difference": float((d_rand - d_exact).norm() / d_exact.norm())})
    return out


def write_section(results: dict, md_path: Path) -> None:
    """Insert (or replace) this script's section of speed.md; the rest of the file is left as it is."""
    runs = results["runs"]
    ties = runs.get("ties_global", {}).get("wall_s")
    lines = [MARK_START, "## The SVD methods (TSV-M, Iso-C, Iso-CTS) beside TIES", "",
             f"Written by `benchmarks/speed/svd_methods.py` on {results['machine']['date_utc']} (commit "
             f"{(results['machine'].get('git_commit') or '?')[:10]}); the {results['size']} set, "
             f"base + {results['n']} fine-tunes, "
             f"{results['repeat']} repeat(s), median wall time. The SVD methods run with --memory-budget "
             f"{results['memory_budget']} (each tensor whole, with its SVD workspace) and torch's "
             f"{results['machine'].get('tiesmerge_env', {}).get('torch_threads', '?')} threads.", "",
             "| run | wall s | × TIES | peak RSS MiB | CPU % | CPUs busy before |", "|---|---:|---:|---:|---:|---:|"]
    for run in runs.values():
        if not run.get("ok"):
            lines.append(f"| {run['label']} | failed | | | | |")
            continue
        ratio = f"{run['wall_s'] / ties:.1f}" if ties else "—"
        busy = run["repeats"][0].get("cpu_busy_before")
        lines.append(f"| {run['label']} | {run['wall_s']:.1f} | {ratio} | {run['peak_rss_bytes'] / speed.MiB:,.0f} | "
                     f"{run['cpu_percent']} | {'—' if busy is None else f'{100 * busy:.0f} %'} |")
    lines += ["", "Randomized SVD (seeded Gaussian sketch, k + 10 columns, q power iterations) against the full "
              "SVD at TSV-M's rank per task k = r // n: the error ratio is ||A - A_k|| of the randomized "
              "factors over that of the exact ones (1 is optimal).", "",
              "| task vector | shape | k | q | error ratio | rel. error (optimal) | max σ rel. error | full s | "
              "randomized s |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for e in results["svd_error"]:
        lines.append(f"| {e['set']}: {e['tensor']} | {e['shape'][0]}×{e['shape'][1]} | {e['k']} | {e['power_iters']} | "
                     f"{e['error_ratio']:.4f} | {e['relative_error']:.4f} ({e['optimal_relative_error']:.4f}) | "
                     f"{e['max_singular_value_rel_error']:.2e} | {e['full_svd_s']:.2f} | {e['randomized_s']:.2f} |")
    for d in results.get("merged_difference", []):
        lines.append("")
        lines.append(f"TSV-M merged `{d['tensor']}`, randomized vs exact SVD: relative difference of the merged "
                     f"task vectors {d['relative_difference']:.4f}.")
    lines += ["", "Commands: " + "; ".join(f"`{run['command']}`" for run in runs.values()), "", MARK_END]
    section = "\n".join(lines) + "\n"
    text = md_path.read_text() if md_path.exists() else ""
    if MARK_START in text and MARK_END in text:
        head, rest = text.split(MARK_START, 1)
        text = head + section + rest.split(MARK_END, 1)[1].lstrip("\n")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    md_path.write_text(text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", type=Path, default=make_models.DEFAULT_ROOT)
    p.add_argument("--size", default="small", help="the model set (tiny: a check of this script)")
    p.add_argument("--n", type=int, default=3)
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--memory-budget", default="8GiB")
    p.add_argument("--only", nargs="*", help="run only these row keys")
    p.add_argument("--wait-idle", type=float, default=120, help="seconds to wait for idle CPUs before each run")
    p.add_argument("--real-base", type=Path, help="a real base model directory, for the randomized SVD's error")
    p.add_argument("--real-model", type=Path, help="a model fine-tuned from --real-base")
    p.add_argument("--results", type=Path, default=speed.DEFAULT_RESULTS)
    args = p.parse_args(argv)
    speed.WAIT_IDLE.update(max_busy=0.10, timeout=args.wait_idle)

    base, fts = make_models.make_set(args.root, args.size, args.n, log=speed.log)
    inputs = make_models.weight_files(base) + [f for d in fts for f in make_models.weight_files(d)]
    tiesmerge = REPO / ".venv" / "bin" / "tiesmerge"
    work = args.root / "runs-svd"
    work.mkdir(parents=True, exist_ok=True)
    outs = args.root / "out-svd"
    results: dict = {"machine": speed.machine_info(REPO / ".venv" / "bin" / "python", None, args.root),
                     "size": args.size, "n": args.n, "repeat": args.repeat, "memory_budget": args.memory_budget,
                     "runs": {}}
    for key, label, extra in rows(args.memory_budget):
        if args.only and key not in args.only:
            continue
        argv_ = speed.tiesmerge_argv(tiesmerge, base, fts, outs / key, *extra)
        results["runs"][key] = speed.run_one(key, label, argv_, inputs, work, args.repeat, outs / key)

    embeddings = [n for n in _names(base) if "embed_tokens" in n or n == "lm_head.weight"]
    mlp = [n for n in _names(base) if n.endswith("layers.0.mlp.up_proj.weight")]
    results["svd_error"] = error_rows(base, fts[0], [*mlp, *embeddings[:1]], lambda a: min(a.shape) // args.n,
                                      "small set, ft-01", (0, 2))
    if args.real_base and args.real_model:
        names = [n for n in _names(args.real_model) if n.endswith(("word_embeddings.weight",
                                                                   "layer.0.intermediate.dense.weight"))]
        results["svd_error"] += error_rows(args.real_base, args.real_model, names,
                                           lambda a: min(a.shape) // args.n, f"real: {args.real_model.name}", (0, 2))
    if (outs / "tsv_m").is_dir() and (outs / "tsv_m_randomized").is_dir():
        results["merged_difference"] = merged_difference(outs / "tsv_m", outs / "tsv_m_randomized", base, embeddings)
    args.results.mkdir(parents=True, exist_ok=True)
    json_path = args.results / "speed_svd.json"
    json_path.write_text(json.dumps(results, indent=2) + "\n")
    write_section(results, args.results / "speed.md")
    speed.log(f"wrote {json_path} and a section of {args.results / 'speed.md'}")
    shutil.rmtree(outs, ignore_errors=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
