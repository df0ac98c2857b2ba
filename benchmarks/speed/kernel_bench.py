"""The fused kernels alone: ns per entry·model for each code-generation target and thread count.

numba reads ``NUMBA_CPU_NAME``, ``NUMBA_CPU_FEATURES`` and ``NUMBA_NUM_THREADS`` once, when it
starts, so each variant (target x threads) runs in its own process: this script with
``--child``. The parent runs every variant once per round, in a rotated order (A/B interleaved,
so that a change in the machine's load hits every variant alike), waits before each until the
CPUs are idle, and reports the minimum and the median of all timed calls per variant.

Each child builds the same inputs (``make_models``' fine-tune law: base + dense noise + sparse
changes, bf16, seeded; the f32 rows hold the same values widened), a chunk of ``--entries``
entries per input as the executor hands the kernels (base row + one row per model), and times:

* ``count``: :func:`kernels.count_pass` with a window around the 80th percentile of |tau| (its
  bounds: the 79.75th and 80.25th percentiles; ties at those values on the bf16 grid make it hold
  ~2 %, as the engine's sampled brackets held 0.6-1.9 % on the small set) and the engine's bin
  count: one counting pass from a sample bracket;
* ``count_nowindow``: the same with every window empty (lo > hi): the vectorised first loop alone;
* ``ties``: :func:`kernels.ties_merge`, density 0.2 thresholds, mass election, mean, bf16 or
  f32 out (the input's dtype);
* ``linear``: :func:`kernels.linear_merge` (task arithmetic, lambda 0.4).

Targets: ``host`` (numba's default: the host CPU's name and features) and ``avx2``
(``NUMBA_CPU_NAME=haswell NUMBA_CPU_FEATURES=``: LLVM's haswell, AVX2 + FMA, no AVX-512).
``NUMBA_CPU_NAME=haswell`` alone is not AVX2-only: numba still passes the host's feature
string (``+avx512f,...``) to LLVM, which then emits AVX-512 code, 512-bit wide; ``--asm`` shows it
(target ``haswell-name-only``).

    .venv/bin/python benchmarks/speed/kernel_bench.py                   # host, avx2 x 1 thread, all cores
    .venv/bin/python benchmarks/speed/kernel_bench.py --rounds 5 --wait-idle 120
    .venv/bin/python benchmarks/speed/kernel_bench.py --asm             # vector registers per kernel and target
    # two versions of the kernels side by side: a copy of another commit's src/ next to this checkout's
    git archive BASE src | tar -x -C /tmp/base && \
        .venv/bin/python benchmarks/speed/kernel_bench.py --src base=/tmp/base/src this=src

Results: ``benchmarks/results/kernels.{json,md}`` (``--name`` changes the stem).

Why over 400 lines: the parent (scheduling, idle waits, the report) and the child (one variant's
timings and its assembly census) are one script so that both sides of a comparison run the same code.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))

import run as speed  # noqa: E402  (machine record, idle wait; same directory)

DEFAULT_RESULTS = REPO / "benchmarks" / "results"
TARGETS = {
    "host": {},
    "avx2": speed.AVX2_ENV,
}
# only for --asm: the trap of setting the CPU name without the features
ASM_TARGETS = {**TARGETS, "haswell-name-only": {"NUMBA_CPU_NAME": "haswell"}}
KERNELS = ("count", "count_nowindow", "ties", "linear")
DENSITY = 0.2
WINDOW = 0.005  # quantiles spanned by the counting window (it holds ~2 % of the entries, see above)


# ---------------------------------------------------------------- child: one target, one thread count


def _inputs(entries: int, n: int, seed: int = 0):
    """(base, models) as bf16 tensors of ``entries`` entries: make_models' fine-tune law."""
    import make_models
    import torch

    dims = (entries // 1024, 1024)
    base, shared, consensus = make_models.base_tensor(seed, "kernel_bench", dims)
    models = [make_models.finetune_tensor(seed, t, "kernel_bench", base, shared, consensus) for t in range(n)]
    return base.reshape(-1), torch.stack([m.reshape(-1) for m in models])


def _window(tau_abs, kernels_bins: int):
    """lo, hi, shift (uint32, per model): a window of |tau| bit patterns holding ~WINDOW of the
    entries around the (1 - DENSITY) quantile, binned like WindowSelect does."""
    import numpy as np

    n, size = tau_abs.shape
    k_hi = int(size * (1 - DENSITY + WINDOW / 2))
    k_lo = int(size * (1 - DENSITY - WINDOW / 2))
    lo = np.array([tau_abs[t].kthvalue(k_lo).values.item() for t in range(n)], np.float32).view(np.uint32)
    hi = np.array([tau_abs[t].kthvalue(k_hi).values.item() for t in range(n)], np.float32).view(np.uint32)
    width = hi.astype(np.int64) - lo.astype(np.int64) + 1
    bins = int(min(kernels_bins, 1 << int(np.ceil(np.log2(width.max())))))
    shift = np.array([max(0, int(w - 1).bit_length() - (bins.bit_length() - 1)) for w in width], np.uint32)
    return lo, hi, shift, bins


def _engine_bins(n: int, threads: int) -> int:
    # the executor's choice (Executor._kernel_bins): per-thread histograms under 32 MiB
    per_bin = 24 * n * max(1, threads)
    return 1 << max(12, min(18, ((32 << 20) // per_bin).bit_length() - 1))


def child(args: argparse.Namespace) -> int:
    import numba
    import numpy as np
    import torch

    from tiesmerge.engine import kernels

    threads = numba.config.NUMBA_NUM_THREADS
    entries = args.entries
    base16, models16 = _inputs(entries, max(args.n))
    rows = []
    for dtype in args.dtypes:
        tdtype = {"bf16": torch.bfloat16, "f32": torch.float32}[dtype]
        base = base16.to(tdtype)
        models = models16.to(tdtype)
        tau_abs = (models.float() - base.float()).abs_()
        for n in args.n:
            inputs = [kernels.raw_view(base), *(kernels.raw_view(models[t]) for t in range(n))]
            thresholds = np.array([tau_abs[t].kthvalue(int(entries * (1 - DENSITY)) + 1).values.item()
                                   for t in range(n)], np.float32)
            out = kernels.out_view(torch.empty(entries, dtype=tdtype))
            lo, hi, shift, bins = _window(tau_abs[:n], _engine_bins(n, threads))
            bits = tau_abs[:n].numpy().view(np.uint32)
            inside = float(((bits >= lo[:, None]) & (bits <= hi[:, None])).mean())  # fraction in the window
            counts = (np.zeros((threads, n), np.int64), np.zeros((threads, n, bins), np.int64),
                      np.full((threads, n, bins), 0xFFFFFFFF, np.uint32), np.zeros((threads, n, bins), np.uint32))
            empty = (np.ones(n, np.uint32), np.zeros(n, np.uint32), np.zeros(n, np.uint32))
            calls = {
                "count": lambda inputs=inputs, counts=counts, lo=lo, hi=hi, shift=shift:
                    kernels.count_pass(inputs, lo, hi, shift, *counts),
                "count_nowindow": lambda inputs=inputs, counts=counts, empty=empty:
                    kernels.count_pass(inputs, *empty, *counts),
                "ties": lambda inputs=inputs, thresholds=thresholds, out=out, n=n:
                    kernels.ties_merge(inputs, thresholds, np.ones(n, np.float32), 1.0, "mass", "zero", None,
                                       "mean", out),
                "linear": lambda inputs=inputs, out=out: kernels.linear_merge(inputs, None, 0.4, 1, out),
            }
            for name in args.kernels:
                call = calls[name]
                assert call(), f"{name}: a task vector is not finite"  # the first call loads the cached code
                seconds, faults = [], []
                for _ in range(args.reps):
                    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                    t0 = time.perf_counter()
                    call()
                    seconds.append(time.perf_counter() - t0)
                    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
                rows.append({"kernel": name, "dtype": dtype, "n": n, "entries": entries, "seconds": seconds,
                             "minor_faults": faults, "inside_window": inside if name == "count" else 0.0})
    print(json.dumps({"threads": threads, "threading_layer": numba.threading_layer(), "target": speed.numba_target(),
                      "tiesmerge": str(Path(kernels.__file__).resolve()), "rows": rows}))
    return 0


# ---------------------------------------------------------------- asm: which registers each kernel uses


_PACKED = re.compile(r"^\s*(v\w+)\s+(.*)$")


def asm_child() -> int:
    """Compile the kernels afresh (numba does not show cached code) and count, per kernel and
    input dtype, the packed AVX instructions by the widest register they use."""
    import numpy as np
    import torch

    from tiesmerge.engine import kernels

    n, entries = 3, 1 << 15
    base16, models16 = _inputs(entries, n)
    T = kernels.numba.config.NUMBA_NUM_THREADS
    for tdtype in (torch.bfloat16, torch.float32):
        base, models = base16.to(tdtype), models16.to(tdtype)
        inputs = [kernels.raw_view(base), *(kernels.raw_view(models[t]) for t in range(n))]
        out = kernels.out_view(torch.empty(entries, dtype=tdtype))
        kernels.ties_merge(inputs, np.full(n, 1e-3, np.float32), np.ones(n, np.float32), 1.0, "mass", "zero",
                           None, "mean", out)
        kernels.linear_merge(inputs, None, 0.4, 1, out)
        lo, hi = np.full(n, 0x3A000000, np.uint32), np.full(n, 0x3A000000 + (1 << 20) - 1, np.uint32)
        kernels.count_pass(inputs, lo, hi, np.full(n, 8, np.uint32), np.zeros((T, n), np.int64),
                           np.zeros((T, n, 1 << 12), np.int64), np.zeros((T, n, 1 << 12), np.uint32),
                           np.zeros((T, n, 1 << 12), np.uint32))
    report = {}
    for name in ("_count_kernel", "_ties_kernel", "_linear_kernel"):
        for sig, asm in getattr(kernels, name).inspect_asm().items():
            tally = {"zmm": 0, "ymm": 0, "xmm": 0, "kmask": 0}
            for line in asm.splitlines():
                m = _PACKED.match(line)
                if not m or m.group(1).endswith(("ss", "sd")) or m.group(1).startswith(("vmovs", "vucomis", "vcomis")):
                    continue  # scalar float ops use xmm registers too
                ops = m.group(2)
                for width in ("zmm", "ymm", "xmm"):
                    if f"%{width}" in ops:
                        tally[width] += 1
                        break
                tally["kmask"] += bool(re.search(r"%k[1-7]", ops))
            report[f"{name.strip('_')}[{sig[0].dtype}]"] = tally
    print(json.dumps({"target": speed.numba_target(), "asm": report}))
    return 0


# ---------------------------------------------------------------- parent


def _variant_env(target: str, threads: int, targets: dict, src: str | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NUMBA_CPU_", "NUMBA_NUM_THREADS"))}
    if src is not None:  # this copy of tiesmerge first on the path (before the installed one)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(src).resolve()), env.get("PYTHONPATH")]))
    return {**env, **targets[target], "NUMBA_NUM_THREADS": str(threads)}


def _env_text(target: str, threads: int, targets: dict) -> str:
    return " ".join(f"{k}={shlex.quote(v) if v else ''}" for k, v in
                    {**targets[target], "NUMBA_NUM_THREADS": str(threads)}.items())


def run_asm(args: argparse.Namespace) -> dict:
    out = {}
    for target in ASM_TARGETS:
        with tempfile.TemporaryDirectory(prefix="kernel-bench-cache-") as cache:
            env = {**_variant_env(target, 1, ASM_TARGETS), "NUMBA_CACHE_DIR": cache}
            proc = subprocess.run([sys.executable, __file__, "--asm-child"], env=env, capture_output=True,
                                  text=True, check=False)
        if proc.returncode != 0:
            raise SystemExit(f"asm child {target} failed:\n{proc.stderr[-3000:]}")
        out[target] = json.loads(proc.stdout.splitlines()[-1])
        speed.log(f"asm {target}: {out[target]['target']['cpu_name']}")
        for k, v in out[target]["asm"].items():
            speed.log(f"  {k:32s} zmm {v['zmm']:4d}  ymm {v['ymm']:4d}  xmm {v['xmm']:4d}  k-mask {v['kmask']:4d}")
    return out


def _sources(args: argparse.Namespace) -> dict[str, str | None]:
    """label -> src directory (None: the tiesmerge this interpreter imports)."""
    if not args.src:
        return {"": None}
    pairs = [item.partition("=") for item in args.src]
    if any(not label or not path for label, _, path in pairs):
        raise SystemExit("--src takes LABEL=DIR items, e.g. --src base=/tmp/base/src this=src")
    return {label: path for label, _, path in pairs}


def run_variants(args: argparse.Namespace) -> dict:
    sources = _sources(args)
    variants = [(s, t, k) for s in sources for t in args.targets for k in args.threads]

    def key(s: str, t: str, k: int) -> str:
        return f"{s}:{t}/{k}" if s else f"{t}/{k}"

    runs: dict[str, dict] = {key(s, t, k): {"src": s, "src_dir": sources[s], "target": t, "threads": k, "rounds": [],
                                            "env": (f"PYTHONPATH={sources[s]} " if sources[s] else "")
                                            + _env_text(t, k, TARGETS)}
                             for s, t, k in variants}
    child_argv = [sys.executable, __file__, "--child", "--entries", str(args.entries), "--reps", str(args.reps),
                  "--n", *map(str, args.n), "--dtypes", *args.dtypes, "--kernels", *args.kernels]
    for r in range(args.rounds):
        order = variants[r % len(variants):] + variants[:r % len(variants)]
        for src, target, threads in order:
            busy = speed.wait_idle(0.10, args.wait_idle)
            speed.log(f"round {r + 1}/{args.rounds}: {key(src, target, threads)} "
                      f"(CPUs {100 * (busy or 0):.0f} % busy before)")
            proc = subprocess.run(child_argv, env=_variant_env(target, threads, TARGETS, sources[src]),
                                  capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                raise SystemExit(f"child {key(src, target, threads)} failed:\n{proc.stderr[-3000:]}")
            result = json.loads(proc.stdout.splitlines()[-1])
            result["cpu_busy_before"] = busy
            runs[key(src, target, threads)]["rounds"].append(result)
    return runs


def summarize(runs: dict) -> list[dict]:
    """One row per (kernel, dtype, n): min and median ns/entry·model per variant, over all calls."""
    table: dict[tuple, dict] = {}
    for key, run in runs.items():
        for result in run["rounds"]:
            for row in result["rows"]:
                cell = table.setdefault((row["kernel"], row["dtype"], row["n"]), {}).setdefault(key, [])
                cell += [s / (row["entries"] * row["n"]) * 1e9 for s in row["seconds"]]
    out = []
    for (kernel, dtype, n), cells in table.items():
        out.append({"kernel": kernel, "dtype": dtype, "n": n,
                    "ns": {k: {"min": min(v), "median": statistics.median(v), "calls": len(v)}
                           for k, v in cells.items()}})
    return out


def write_report(results: dict, md_path: Path, json_path: Path) -> None:
    json_path.write_text(json.dumps(results, indent=2) + "\n")
    m = results["machine"]
    keys = list(results["runs"])
    threads = sorted({r["threads"] for r in results["runs"].values()})
    lines = [
        "# Fused kernels: ns per entry·model, by code-generation target and thread count",
        "",
        f"Written by `benchmarks/speed/kernel_bench.py` on {m['date_utc']} (see its docstring). Machine: "
        f"{m['cpu_model']}, {m['usable_cpus']} usable CPU(s) ({m['cpu']['threads_per_core']} thread(s) per core), "
        f"vector extensions: {', '.join(m['cpu']['vector_extensions'])}; commit {m['git_commit'][:10]}"
        f"{', src/ modified' if m['src_modified'] else ''}.",
        "",
        f"One chunk of {results['entries']:,} entries per input (base + n models), {results['rounds']} round(s) "
        f"× {results['reps']} timed call(s) per variant, variants interleaved; each cell: min (median) "
        "ns per entry and model over all calls.",
        "",
        "| variant | environment | numba target | threading layer |",
        "|---|---|---|---|",
    ]
    for key, run in results["runs"].items():
        first = run["rounds"][0]
        lines.append(f"| {key} | `{run['env']}` | {first['target']['cpu_name']} "
                     f"({', '.join(first['target']['vector_features']) or '—'}) | {first['threading_layer']} |")
    if results.get("sources"):  # what each --src copy held, noted by hand after the run
        lines += ["", "Sources: " + "; ".join(f"`{k}`: {v}" for k, v in results["sources"].items()) + "."]
    runs = results["runs"]

    def find(src: str, target: str, k: int) -> str | None:
        wanted = (src, target, k)
        return next((key for key, run in runs.items() if (run["src"], run["target"], run["threads"]) == wanted), None)

    sources = list(dict.fromkeys(run["src"] for run in runs.values()))  # "" when one, unnamed
    targets = list(dict.fromkeys(run["target"] for run in runs.values()))
    derived = []  # (header, numerator key, denominator key, format)
    if len(threads) > 1:  # scaling with threads, per source and target
        derived += [(f"{s + ': ' if s else ''}{t}, {threads[0]}→{threads[-1]} threads", find(s, t, threads[0]),
                     find(s, t, threads[-1]), "{:.2f}×") for s in sources for t in targets]
    if "host" in targets and "avx2" in targets:
        derived += [(f"{s + ': ' if s else ''}avx2 / host, {threads[-1]} thread(s)", find(s, "avx2", threads[-1]),
                     find(s, "host", threads[-1]), "{:.2f}") for s in sources]
    derived += [(f"{s} / {sources[0]}, {t}/{k}", find(s, t, k), find(sources[0], t, k), "{:.2f}")
                for s in sources[1:] for t in targets for k in threads]
    header = ["kernel", "dtype", "n", *keys, *(d[0] for d in derived)]
    lines += ["", "| " + " | ".join(header) + " |", "|---|---|---:|" + "---:|" * (len(header) - 3)]
    for row in results["table"]:
        ns = row["ns"]
        cells = [row["kernel"], row["dtype"], str(row["n"])]
        cells += [f"{ns[k]['min']:.3f} ({ns[k]['median']:.3f})" if k in ns else "—" for k in keys]
        for _, num, den, fmt in derived:
            cells.append(fmt.format(ns[num]["min"] / ns[den]["min"]) if num in ns and den in ns else "—")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Derived columns compare the minima."]
    busy = [r.get("cpu_busy_before") for run in results["runs"].values() for r in run["rounds"]]
    busy = [b for b in busy if b is not None]
    spread = [row["ns"][k]["median"] / row["ns"][k]["min"] for row in results["table"] for k in row["ns"]]
    lines += ["", "CPUs busy in the 2 s before each variant (other processes): "
                  f"at most {100 * max(busy, default=0):.0f} %; "
                  f"median / min over a cell's calls: {min(spread, default=1):.2f}–{max(spread, default=1):.2f} "
                  "(how noisy the machine was)."]
    faults = [f for run in results["runs"].values() for r in run["rounds"] for row in r["rows"]
              for f in row["minor_faults"]]
    inside = [row["inside_window"] for run in results["runs"].values() for r in run["rounds"] for row in r["rows"]
              if row["kernel"] == "count"]
    lines += [f"Minor page faults per timed call: at most {max(faults, default=0)} (kernels allocate only "
              "block scratch)."]
    if inside:
        lines += [f"`count`'s window held {100 * min(inside):.1f}–{100 * max(inside):.1f} % of the entries "
                  "(bf16 task vectors take few values: ties at the bounds widen it)."]
    if results.get("asm"):
        lines += ["", "Packed AVX instructions in each compiled kernel, by the widest register they use "
                      "(`--asm`: compiled afresh per target):", "",
                  "| target | kernel | zmm (512-bit) | ymm (256-bit) | xmm (128-bit) | with a k-mask |",
                  "|---|---|---:|---:|---:|---:|"]
        stored = {"[uint16]": " (bf16 rows)", "[int16]": " (f16 rows)", "[float32]": " (f32 rows)"}
        for target, a in results["asm"].items():
            for k, v in a["asm"].items():
                name = next((k.replace(raw, text) for raw, text in stored.items() if raw in k), k)
                lines.append(f"| {target} | {name} | {v['zmm']} | {v['ymm']} | {v['xmm']} | {v['kmask']} |")
    lines += ["", "```bash", results["invocation"], "```"]
    md_path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--targets", nargs="+", choices=list(TARGETS), default=list(TARGETS))
    p.add_argument("--threads", nargs="+", type=int, default=sorted({1, len(os.sched_getaffinity(0))}))
    p.add_argument("--kernels", nargs="+", choices=KERNELS, default=list(KERNELS))
    p.add_argument("--dtypes", nargs="+", choices=("bf16", "f32"), default=["bf16", "f32"])
    p.add_argument("--n", nargs="+", type=int, default=[3, 8], help="models per merge (default 3 8)")
    p.add_argument("--entries", type=int, default=8 << 20, help="entries per chunk (default 8 Mi)")
    p.add_argument("--rounds", type=int, default=3, help="each variant once per round, interleaved")
    p.add_argument("--reps", type=int, default=5, help="timed calls per kernel in each round")
    p.add_argument("--asm", action="store_true", help="also count vector registers in each compiled kernel")
    p.add_argument("--src", nargs="+", metavar="LABEL=DIR",
                   help="measure these copies of tiesmerge's src/ side by side (default: the installed one)")
    p.add_argument("--wait-idle", type=float, default=600, metavar="SECONDS",
                   help="before each variant, wait up to this long for the CPUs to be at most 10%% busy")
    p.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    p.add_argument("--name", default="kernels", help="results file stem (default kernels)")
    p.add_argument("--report-only", action="store_true", help="measure nothing: rewrite the .md from the .json")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--asm-child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(args)
    if args.asm_child:
        return asm_child()
    md_path, json_path = args.results / f"{args.name}.md", args.results / f"{args.name}.json"
    if args.report_only:
        write_report(json.loads(json_path.read_text()), md_path, json_path)
        speed.log(f"rewrote {md_path} from {json_path}")
        return 0
    exe = Path(sys.executable)
    exe_text = os.path.relpath(exe, REPO) if exe.is_relative_to(REPO) else "python"
    results = {
        "invocation": shlex.join([exe_text, "benchmarks/speed/kernel_bench.py",
                                  *(sys.argv[1:] if argv is None else argv)]),
        "machine": speed.machine_info(exe.parent / "python", None, Path(tempfile.gettempdir())),
        "entries": args.entries, "rounds": args.rounds, "reps": args.reps,
    }
    if args.asm:
        results["asm"] = run_asm(args)
    results["runs"] = run_variants(args)
    results["table"] = summarize(results["runs"])
    args.results.mkdir(parents=True, exist_ok=True)
    write_report(results, md_path, json_path)
    print(md_path.read_text())
    speed.log(f"wrote {md_path} and {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
