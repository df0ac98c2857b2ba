"""Per-tensor overhead: merges of checkpoints holding many small tensors (mixture-of-experts layouts hold
10^4 to 10^5), against a merge of the same bytes in one tensor. From the repo root:

    python benchmarks/speed/many_tensors.py                     # 1,000, 5,000 and 20,000 tensors
    python benchmarks/speed/many_tensors.py --counts 100000 --tiesmerge /path/to/other/venv/bin/tiesmerge

Each set is a base and two fine-tunes (base + 0.01 noise) of N float32 tensors of 16 x 16 entries;
the reference is the same N x 256 entries as one tensor. Both are merged by ``tiesmerge merge``
(TIES, the default: a global top-k, so every tensor is visited by the count pass and the merge).
Overhead per tensor = (time of the N-tensor merge - time of the one-tensor merge) / N. Writes
benchmarks/results/many_tensors.md + .json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "benchmarks" / "results"


def make_set(root: Path, count: int, whole: bool) -> list[Path]:
    """ROOT/{base,a,b}/model.safetensors with ``count`` tensors of 16 x 16 (or, ``whole``, one of count x 256)."""
    import torch
    from safetensors.torch import save_file

    dirs = [root / name for name in ("base", "a", "b")]
    if all((d / "model.safetensors").is_file() for d in dirs):
        return dirs
    g = torch.Generator().manual_seed(count)
    base = {"w": torch.randn(count, 256, generator=g)} if whole else \
        {f"model.layers.0.experts.{i}.w": torch.randn(16, 16, generator=g) for i in range(count)}
    for k, d in enumerate(dirs):
        d.mkdir(parents=True, exist_ok=True)
        state = base if k == 0 else {n: v + 0.01 * torch.randn(v.shape, generator=g) for n, v in base.items()}
        save_file(state, str(d / "model.safetensors"))
    return dirs


def run_merge(tiesmerge: Path, dirs: list[Path], out: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    proc = subprocess.run([str(tiesmerge), "merge", "--base", str(dirs[0]), "--model", str(dirs[1]), "--model",
                           str(dirs[2]), "-o", str(out), "--no-progress"], capture_output=True, text=True)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode:
        raise SystemExit(f"tiesmerge failed:\n{proc.stderr}")
    phases = next((line.strip() for line in proc.stdout.splitlines() if line.strip().startswith("phases:")), "")
    shutil.rmtree(out, ignore_errors=True)
    return {"wall_s": round(wall, 2), "cpu_s": round(after.ru_utime + after.ru_stime - before.ru_utime
                                                     - before.ru_stime, 2), "phases": phases}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--counts", nargs="+", type=int, default=[1000, 5000, 20000])
    p.add_argument("--root", type=Path, default=Path(os.environ.get("TIESMERGE_SPEED_ROOT", "/tmp/tiesmerge-speed"))
                   / "many-tensors")
    p.add_argument("--tiesmerge", type=Path, default=REPO / ".venv" / "bin" / "tiesmerge")
    p.add_argument("--compare", type=Path, default=None,
                   help="another tiesmerge (e.g. an earlier commit's) to time on the same N-tensor sets")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()
    warm = make_set(args.root / "n10", 10, whole=False)  # numba's compile cache and imports, not timed
    for tool in filter(None, (args.tiesmerge, args.compare)):
        run_merge(tool, warm, args.root / "out")
    rows = []
    for count in args.counts:
        many = make_set(args.root / f"n{count}", count, whole=False)
        one = make_set(args.root / f"n{count}-whole", count, whole=True)
        m = run_merge(args.tiesmerge, many, args.root / "out")
        o = run_merge(args.tiesmerge, one, args.root / "out")
        per = (m["wall_s"] - o["wall_s"]) / count * 1000
        per_cpu = (m["cpu_s"] - o["cpu_s"]) / count * 1000
        c = run_merge(args.compare, many, args.root / "out") if args.compare else None
        rows.append({"tensors": count, "many": m, "one": o, "overhead_ms_per_tensor": round(per, 3),
                     "cpu_overhead_ms_per_tensor": round(per_cpu, 3), "compare": c, "load": os.getloadavg()[0]})
        if c:
            print(f"{count:>7} tensors, --compare: {c['wall_s']:.1f} s (CPU {c['cpu_s']:.1f}): "
                  f"{c['wall_s'] / m['wall_s']:.1f}x the time", flush=True)
        print(f"{count:>7} tensors: {m['wall_s']:.1f} s (CPU {m['cpu_s']:.1f}) vs one tensor {o['wall_s']:.1f} s "
              f"(CPU {o['cpu_s']:.1f}): {per:.2f} ms a tensor (CPU {per_cpu:.2f})", flush=True)
    info = {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": platform.machine(), "cpus": os.cpu_count(),
            "python": sys.version.split()[0], "tiesmerge": str(args.tiesmerge),
            "compare": str(args.compare) if args.compare else None, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "many_tensors.json").write_text(json.dumps(info, indent=2) + "\n")
    lines = ["# Per-tensor overhead: many small tensors against the same bytes in one tensor", "",
             f"Written by `benchmarks/speed/many_tensors.py` on {info['date']} ({info['cpus']} CPU cores; the load "
             "average at each row is in the .json). Base + 2 fine-tunes, float32, TIES defaults; each row's "
             "N tensors of 16 x 16 against one tensor of N x 256 entries (the same bytes).", "",
             *([f"`--compare`: `{args.compare}`, timed on the same N-tensor sets in the same run.", ""]
               if args.compare else []),
             "| tensors | N-tensor merge s (CPU s) | one-tensor merge s (CPU s) | overhead per tensor, ms (CPU ms) | "
             "--compare s (CPU s) | phases of the N-tensor merge |", "|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        c = r["compare"]
        compared = f"{c['wall_s']} ({c['cpu_s']})" if c else "-"
        lines.append(f"| {r['tensors']:,} | {r['many']['wall_s']} ({r['many']['cpu_s']}) | {r['one']['wall_s']} "
                     f"({r['one']['cpu_s']}) | {r['overhead_ms_per_tensor']} ({r['cpu_overhead_ms_per_tensor']}) | "
                     f"{compared} | "
                     f"{r['many']['phases'].removeprefix('phases: ')} |")
    (args.out / "many_tensors.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
