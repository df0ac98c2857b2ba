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

from tiesmerge.engine.executor import _stream_id  # noqa: E402
from tiesmerge.methods import IsoC, IsoCTS, TsvMerge  # noqa: E402
from tiesmerge.methods import svd as linalg  # noqa: E402
from tiesmerge.methods.base import ChunkContext  # noqa: E402

MARK_START = "<!-- svd_methods.py: start -->"
MARK_END = "<!-- svd_methods.py: end -->"
RANDOMIZED_ABOVE = 4_000_000  # entries: the two 32000 x 1024 matrices of the small set, nothing else


COST = {"ties_global": 0, "iso_c": 1, "tsv_m_randomized": 2, "iso_cts": 3, "tsv_m": 4}  # --resume's order


def resumed(key: str, label: str, argv: list[str], inputs: list[Path], work: Path, repeat: int) -> dict | None:
    """A row an earlier run of this script measured (every repeat's /usr/bin/time record in the work
    directory, exit status 0), summarised as run.py does; None if it is missing or failed."""
    reps = []
    for r in range(repeat):
        time_path = work / f"{key}-{r + 1}.time"
        record = speed.parse_time_v(time_path.read_text()) if time_path.is_file() else {}
        if record.get("exit_status") != 0 or not record.get("wall_s"):
            return None
        reps.append({**record, "rc": 0, "log": str(time_path.with_suffix(".log")), "resumed": True,
                     "recorded_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time_path.stat().st_mtime))})
    speed.log(f"{label}: kept the earlier run's record ({reps[0]['wall_s']:.1f} s)")
    return speed.summarize(key, label, argv, inputs, reps)


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


def svd_error(a: torch.Tensor, k: int, *, power_iters: int, full: tuple, seed: int = 0) -> dict:
    """Randomized vs full SVD (``full``: (U, S, Vh, seconds)) of one matrix at rank k."""
    a = a.float()
    u, s, vh, full_s = full
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
        clock = time.perf_counter()
        full = (*torch.linalg.svd(a, full_matrices=False), time.perf_counter() - clock)  # once per matrix
        for q in power_iters:
            speed.log(f"randomized SVD error: {label} {name} {tuple(a.shape)}, {q} power iterations")
            out.append({"set": label, "tensor": name, **svd_error(a, k_of(a), power_iters=q, full=full)})
    return out


def merged_difference(exact: Path, randomized: Path, base: Path, names: list[str]) -> list[dict]:
    """Relative Frobenius difference of the merged task vectors, randomized vs exact TSV-M."""
    out = []
    for name in names:
        b = _tensor(base, name).double()
        d_exact, d_rand = _tensor(exact, name).double() - b, _tensor(randomized, name).double() - b
        out.append({"tensor": name, "relative_difference": float((d_rand - d_exact).norm() / d_exact.norm())})
    return out


def shapes_of(directory: Path) -> dict[tuple[int, ...], list[str]]:
    """The model's 2-D tensor names grouped by shape (the SVD methods' work; vectors are averaged)."""
    groups: dict[tuple[int, ...], list[str]] = {}
    for f in sorted(directory.glob("*.safetensors")):
        with safe_open(str(f), "pt") as fh:
            for name in fh.keys():
                shape = tuple(fh.get_slice(name).get_shape())
                if len(shape) == 2:
                    groups.setdefault(shape, []).append(name)
    return groups


def per_tensor_projection(base: Path, fts: list[Path], key: str, label: str, method, max_entries: int = 0) -> dict:
    """The method's merge of one tensor of every 2-D shape of the model, timed in this process
    (wall and CPU seconds, all threads), times the number of tensors of that shape."""
    shapes = []
    for shape, names in shapes_of(base).items():
        if max_entries and shape[0] * shape[1] > max_entries:
            continue
        name = names[0]
        b = _tensor(base, name).float()
        tau = torch.stack([_tensor(ft, name).float() - b for ft in fts])  # (n, rows, cols)
        ctx = ChunkContext(name=name, shape=shape, stream=_stream_id(name))
        speed.log(f"{label}: {name} {shape} (x{len(names)})")
        wall, cpu = time.perf_counter(), time.process_time()
        method.merge(tau, ctx)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        shapes.append({"shape": list(shape), "tensor": name, "count": len(names), "wall_s": round(wall, 3),
                       "cpu_s": round(cpu, 3)})
    return {"key": key, "label": label, "per_shape": shapes, "ok": True,
            "projected_wall_s": sum(x["wall_s"] * x["count"] for x in shapes),
            "projected_cpu_s": sum(x["cpu_s"] * x["count"] for x in shapes)}


def merged_difference_in_process(base: Path, fts: list[Path], names: list[str]) -> list[dict]:
    """TSV-M's merge of each named tensor with the exact and with the randomized SVD, in this
    process: the relative Frobenius difference of the two merged task vectors."""
    out = []
    for name in names:
        b = _tensor(base, name).float()
        tau = torch.stack([_tensor(ft, name).float() - b for ft in fts])
        ctx = ChunkContext(name=name, shape=tuple(b.shape), stream=_stream_id(name))
        exact = TsvMerge().merge(tau.clone(), ctx).double()
        fast = TsvMerge(randomized_above=RANDOMIZED_ABOVE).merge(tau.clone(), ctx).double()
        out.append({"tensor": name, "relative_difference": float((fast - exact).norm() / exact.norm())})
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
        mark = " †" if run["repeats"][0].get("resumed") else ""
        lines.append(f"| {run['label']}{mark} | {run['wall_s']:.1f} | {ratio} | "
                     f"{run['peak_rss_bytes'] / speed.MiB:,.0f} | {run['cpu_percent']} | "
                     f"{'—' if busy is None else f'{100 * busy:.0f} %'} |")
    projections = results.get("per_tensor", {})
    if projections:
        ties_run = runs.get("ties_global", {}).get("repeats", [{}])[0]
        ties_cpu = (ties_run.get("user_s") or 0) + (ties_run.get("sys_s") or 0)
        lines += ["", "Per-tensor projection (`--per-tensor`): each SVD method's `merge` of one tensor of every "
                  "2-D shape of the small set (real task vectors of the 3 fine-tunes), timed in one process, times "
                  "the number of tensors of that shape: the method's SVD compute for the whole model, without the "
                  f"reads and writes (which TIES's row includes); torch with {results.get('per_tensor_threads')} "
                  "thread(s), CPU s counts every thread"
                  + (f"; shapes above {results['per_tensor_max_entries']:,} entries (the embeddings) left out."
                     if results.get("per_tensor_max_entries") else "."), "",
                  "| method | projected wall s | projected CPU s | CPU × TIES's whole merge |" + "".join(
                      f" {s['shape'][0]}×{s['shape'][1]} (×{s['count']}) CPU s |"
                      for s in next(iter(projections.values()))["per_shape"]),
                  "|---|---:|---:|---:|" + "---:|" * len(next(iter(projections.values()))["per_shape"])]
        for pr in projections.values():
            ratio = f"{pr['projected_cpu_s'] / ties_cpu:.1f}" if ties_cpu else "—"
            lines.append(f"| {pr['label']} | {pr['projected_wall_s']:.0f} | {pr['projected_cpu_s']:.0f} | {ratio} |"
                         + "".join(f" {s['cpu_s']:.1f} |" for s in pr["per_shape"]))
        if ties_cpu:
            lines += ["", f"TIES's whole merge (reads, merge, writes): {ties_cpu:.1f} CPU s (user + sys)."]
    if any(run.get("repeats") and run["repeats"][0].get("resumed") for run in runs.values()):
        lines += ["", "† measured by an earlier, interrupted run of this script (its /usr/bin/time record, kept "
                  "with --resume); the CPUs' load before it was not recorded."]
    missing = [label for key, label, _ in rows(results["memory_budget"])
               if key not in runs and key not in results.get("per_tensor", {})]
    if missing:
        lines += ["", "Not measured in this run: " + ", ".join(missing) + "."]
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
    p.add_argument("--per-tensor", action="store_true",
                   help="time each SVD method's merge of one tensor per 2-D shape and project the whole model, "
                        "instead of whole merges (for a machine too loaded to finish them)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads of the --per-tensor timings (0: torch's default); 1 keeps an "
                        "oversubscribed machine's spinning threads out of the CPU seconds")
    p.add_argument("--max-entries", type=int, default=0,
                   help="--per-tensor: leave out shapes with more entries than this (0: none)")
    p.add_argument("--skip-error", action="store_true", help="no randomized SVD error rows")
    p.add_argument("--quick", action="store_true", help="no error row for the synthetic 32000 x 1024 embedding")
    p.add_argument("--resume", action="store_true",
                   help="keep the rows of an earlier run found in the work directory (their /usr/bin/time records); "
                        "run the rest, cheapest first")
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
    json_path = args.results / "speed_svd.json"
    args.results.mkdir(parents=True, exist_ok=True)
    # the randomized SVD's error first (minutes): the timed rows may be stopped, this is kept
    embeddings = [n for n in _names(base) if "embed_tokens" in n or n == "lm_head.weight"]
    mlp = [n for n in _names(base) if n.endswith("layers.0.mlp.up_proj.weight")]
    # the synthetic embedding's full SVD takes minutes on a loaded machine: --quick leaves it out
    if args.skip_error:  # the earlier run's error rows, if any, are kept
        earlier = json.loads(json_path.read_text()) if json_path.is_file() else {}
        results["svd_error"] = earlier.get("svd_error", [])
    else:
        results["svd_error"] = error_rows(base, fts[0], [*mlp, *([] if args.quick else embeddings[:1])],
                                          lambda a: min(a.shape) // args.n, "small set, ft-01", (0, 2))
    if args.real_base and args.real_model and not args.skip_error:
        names = [n for n in _names(args.real_model) if n.endswith(("word_embeddings.weight",
                                                                   "layer.0.intermediate.dense.weight"))]
        results["svd_error"] += error_rows(args.real_base, args.real_model, names,
                                           lambda a: min(a.shape) // args.n, f"real: {args.real_model.name}", (0, 2))
    todo = [r for r in rows(args.memory_budget) if not args.only or r[0] in args.only]
    if args.per_tensor:
        todo = [r for r in todo if r[0] == "ties_global"]
    if args.resume:
        todo.sort(key=lambda r: COST[r[0]])
    for key, label, extra in todo:
        argv_ = speed.tiesmerge_argv(tiesmerge, base, fts, outs / key, *extra)
        earlier = resumed(key, label, argv_, inputs, work, args.repeat) if args.resume else None
        results["runs"][key] = earlier or speed.run_one(key, label, argv_, inputs, work, args.repeat, outs / key)
        # written after every row: a run stopped early keeps what it measured
        json_path.write_text(json.dumps(results, indent=2) + "\n")
        write_section(results, args.results / "speed.md")
    results["runs"] = {k: results["runs"][k] for k, _, _ in rows(args.memory_budget) if k in results["runs"]}
    if args.per_tensor:
        if args.threads:
            torch.set_num_threads(args.threads)
        results["per_tensor_threads"] = torch.get_num_threads()
        results["per_tensor_max_entries"] = args.max_entries
        results["per_tensor"] = {}
        for key, label, method in (("iso_c", "Iso-C", IsoC()), ("tsv_m", "TSV-M", TsvMerge()),
                                   ("iso_cts", "Iso-CTS", IsoCTS()),
                                   ("tsv_m_randomized", "TSV-M, randomized SVD above 4,000,000 entries",
                                    TsvMerge(randomized_above=RANDOMIZED_ABOVE))):
            if args.only and key not in args.only:
                continue
            if key == "tsv_m_randomized" and args.max_entries and args.max_entries < RANDOMIZED_ABOVE:
                continue  # it differs from TSV-M only on the shapes left out
            results["per_tensor"][key] = per_tensor_projection(base, fts, key, label, method, args.max_entries)
            json_path.write_text(json.dumps(results, indent=2) + "\n")
            write_section(results, args.results / "speed.md")
        if not args.max_entries and "tsv_m_randomized" in results["per_tensor"]:
            results["merged_difference"] = merged_difference_in_process(base, fts, embeddings)

    if (outs / "tsv_m").is_dir() and (outs / "tsv_m_randomized").is_dir():
        results["merged_difference"] = merged_difference(outs / "tsv_m", outs / "tsv_m_randomized", base, embeddings)
    json_path.write_text(json.dumps(results, indent=2) + "\n")
    write_section(results, args.results / "speed.md")
    speed.log(f"wrote {json_path} and a section of {args.results / 'speed.md'}")
    shutil.rmtree(outs, ignore_errors=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
