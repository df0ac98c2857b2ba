"""tiesmerge on a GPU against the same merges on the same machine's CPUs, the read floor and
mergekit ``--cuda``, on the speed benchmark's synthetic Llama set, in one run.

Rows, each a ``tiesmerge merge`` process timed from start to exit (the page cache warmed first, as
run.py does), once with ``--device cpu`` and once with ``--device cuda``:

* TIES global (the paper's defaults) and per tensor, task arithmetic, DARE-TIES, DELLA, Model
  Stock: the streamed methods;
* TSV-M, Iso-C, Iso-CTS: the whole-tensor SVD methods (with ``--memory-budget 8GiB``, as
  svd_methods.py runs them: each tensor whole, with its SVD workspace);
* floors: ``cat`` of every input file (the read floor) and the TIES merge of the tiny set on each
  device (the fixed cost: interpreter, torch, CUDA's context);
* mergekit ``ties`` on the CPU and with ``--cuda``, when ``--mergekit-python`` names a Python that
  imports mergekit (on the lent GPU machines: wheels carried in, see benchmarks/speed/README.md),
  beside tiesmerge's per-tensor TIES with mergekit's zero-sign rule.

For every method the CUDA output is compared with the CPU output: the relative difference of the
merged task vectors (||cuda - cpu|| / ||cpu - base|| over all tensors) and whether the files are
byte-identical. Peak host memory is each process's own (wait4's ru_maxrss); peak GPU memory is
nvidia-smi's reading of the device's used memory, sampled every 50 ms, less what was in use
before the run.

    python benchmarks/speed/gpu.py                                   # small set, every row
    python benchmarks/speed/gpu.py --methods ties_global tsv_m --devices cuda
    python benchmarks/speed/gpu.py --mergekit-python python3 --results "$OUT"

Writes ``RESULTS/speed_gpu.md`` and ``.json`` (``--name`` changes the stem).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import threading
import time
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))

import make_models  # noqa: E402
import run as speed  # noqa: E402

MiB = 1 << 20
SVD_BUDGET = ["--memory-budget", "8GiB"]  # the SVD methods need each tensor whole (svd_methods.py)


@dataclass(frozen=True)
class Row:
    key: str
    label: str
    flags: tuple[str, ...]


ROWS = (
    Row("ties_global", "TIES, global (paper defaults)", ("--method", "ties", "--density", "0.2")),
    Row("ties_per_tensor", "TIES, per tensor", ("--method", "ties", "--density", "0.2", "--scope", "per_tensor")),
    Row("ties_per_tensor_positive", "TIES, per tensor, --zero-sign positive (mergekit's rule)",
        ("--method", "ties", "--density", "0.2", "--scope", "per_tensor", "--zero-sign", "positive")),
    Row("task_arithmetic", "task arithmetic", ("--method", "task_arithmetic")),
    Row("dare_ties", "DARE-TIES (drop 0.9)", ("--method", "dare_ties")),
    Row("della", "DELLA", ("--method", "della")),
    Row("model_stock", "Model Stock", ("--method", "model_stock")),
    Row("tsv_m", "TSV-M", ("--method", "tsv_m", *SVD_BUDGET)),
    Row("iso_c", "Iso-C", ("--method", "iso_c", *SVD_BUDGET)),
    Row("iso_cts", "Iso-CTS", ("--method", "iso_cts", *SVD_BUDGET)),
)
ROW = {r.key: r for r in ROWS}


# ---------------------------------------------------------------- measuring


class GpuMemory:
    """The device's used memory (MiB) sampled by nvidia-smi while a run lasts; None without nvidia-smi."""

    def __init__(self) -> None:
        self.peak: int | None = None
        self._proc: subprocess.Popen | None = None
        self._thread: threading.Thread | None = None

    @staticmethod
    def used_now() -> int | None:
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=20, check=True).stdout
        except (OSError, subprocess.SubprocessError):
            return None
        return int(out.split()[0]) if out.split() else None

    def __enter__(self) -> GpuMemory:
        if shutil.which("nvidia-smi") is None:
            return self
        self._proc = subprocess.Popen(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits",
                                       "-lms", "50"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        return self

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            if line.strip().isdigit():
                self.peak = max(self.peak or 0, int(line))

    def __exit__(self, *exc) -> None:
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait()
            assert self._thread is not None
            self._thread.join(timeout=5)


# A small interpreter forks and execs each timed command, and reports the command's own peak RSS and
# CPU time (wait4). Not this script: a child forked from it would count this process's ~300 MiB
# (torch is imported here) in its ru_maxrss, since exec records the old address space's peak.
RUSAGE_WRAPPER = """
import os, sys
pid = os.fork()
if pid == 0:
    try:
        os.execvp(sys.argv[2], sys.argv[2:])
    finally:
        os._exit(127)
_, status, ru = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    f.write(f"{ru.ru_maxrss} {ru.ru_utime + ru.ru_stime}")
code = os.waitstatus_to_exitcode(status)
os._exit(code if code >= 0 else 128 - code)
"""


def timed(argv: list[str], log_path: Path, gpu: bool = False) -> dict:
    """Run ``argv``; its wall time, its own peak RSS and CPU time, and the GPU memory it added."""
    before = GpuMemory.used_now() if gpu else None
    usage_path = log_path.with_suffix(".rusage")
    usage_path.unlink(missing_ok=True)
    with open(log_path, "w") as logf, GpuMemory() if gpu else nullcontext() as sampler:
        started = time.perf_counter()
        rc = subprocess.run([sys.executable, "-S", "-c", RUSAGE_WRAPPER, str(usage_path), *argv], stdout=logf,
                            stderr=subprocess.STDOUT, check=False).returncode
        wall = time.perf_counter() - started
    maxrss_kib, cpu_s = (usage_path.read_text().split() if usage_path.is_file() else (None, None))
    result = {"rc": rc, "wall_s": round(wall, 3),
              "peak_rss_bytes": int(maxrss_kib) * 1024 if maxrss_kib is not None else None,
              "cpu_s": round(float(cpu_s), 2) if cpu_s is not None else None, "log": str(log_path)}
    if sampler is not None and sampler.peak is not None and before is not None:
        result["gpu_peak_mib"] = max(0, sampler.peak - before)
    if rc != 0:
        result["log_tail"] = log_path.read_text(errors="replace")[-3000:]
    return result


def merge_argv(python: str, base: Path, models: list[Path], out: Path, device: str, flags: tuple[str, ...]
               ) -> list[str]:
    argv = [python, "-m", "tiesmerge", "merge", "--base", str(base)]
    for m in models:
        argv += ["--model", str(m)]
    return [*argv, *flags, "--device", device, "-o", str(out), "--force", "--no-progress"]


def mergekit_argv(python: str, config: Path, out: Path, device: str) -> list[str]:
    return [python, "-m", "mergekit.scripts.run_yaml", str(config), str(out), *(["--cuda"] if device == "cuda" else [])]


# ---------------------------------------------------------------- comparing outputs


def compare(a_dir: Path, b_dir: Path, base_dir: Path) -> dict:
    """How far output ``a`` is from output ``b``: ||a - b|| / ||b - base|| over every tensor (float32),
    the largest |a - b|, and whether the weight files are byte-identical (run.py's helpers find the tensors' files
    and compare the bytes; each file is opened once)."""
    from safetensors import safe_open

    fa, fb, fbase = (speed._tensor_files(d) for d in (a_dir, b_dir, base_dir))
    if set(fa) != set(fb):
        return {"same_names": False, "only_in_a": sorted(set(fa) - set(fb))[:5],
                "only_in_b": sorted(set(fb) - set(fa))[:5]}
    num = den = 0.0
    max_abs = 0.0
    differing = 0
    with ExitStack() as stack:
        handle = {f: stack.enter_context(safe_open(str(f), "pt")) for f in {*fa.values(), *fb.values(),
                                                                               *fbase.values()}}
        for name in sorted(fa):
            a, b, base = (handle[files[name]].get_tensor(name).float() for files in (fa, fb, fbase))
            d = a - b
            num += float(d.double().square().sum())
            den += float((b - base).double().square().sum())
            m = float(d.abs().max()) if d.numel() else 0.0
            max_abs = max(max_abs, m)
            differing += m > 0
    return {"same_names": True, "tensors": len(fa), "tensors_differing": differing,
            "rel_diff": math.sqrt(num / den) if den else (0.0 if num == 0 else math.inf),
            "max_abs_diff": max_abs, "identical_files": speed.same_files(a_dir, b_dir)}


# ---------------------------------------------------------------- the machine


def gpu_info(python: str) -> dict:
    code = ("import json, torch; p = torch.cuda.get_device_properties(0) if torch.cuda.is_available() else None; "
            "print(json.dumps({'torch': torch.__version__, 'cuda': torch.version.cuda, "
            "'name': p.name if p else None, 'memory_gib': round(p.total_memory / 2**30, 1) if p else None, "
            "'multiprocessors': p.multi_processor_count if p else None}))")
    try:
        return json.loads(subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=120,
                                         check=True).stdout)
    except (OSError, subprocess.SubprocessError, ValueError) as exc:
        return {"error": str(exc)[:300]}


def _cpu_name() -> str | None:
    for line in speed._read("/proc/cpuinfo").splitlines():
        if line.startswith("model name"):
            return line.partition(":")[2].strip()
    return None


def machine(python: str) -> dict:
    return {"gpu": gpu_info(python), "cpus": os.cpu_count(), "cpu": _cpu_name(),
            "python": platform.python_version(), "platform": platform.platform(),
            "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)}


# ---------------------------------------------------------------- the report


def _cell(run: dict | None, field: str, spec: str = ".2f", scale: float = 1.0) -> str:
    if run is None:
        return "—"
    if not run.get("ok"):
        return "failed"
    value = run.get(field)
    return speed._fmt(value / scale if value is not None else None, spec)


def what_this_shows(results: dict) -> list[str]:
    runs, lines = results["runs"], []
    floor = runs.get("read_floor", {}).get("wall_s")
    fixed = {d: runs.get(f"merge_floor@{d}", {}).get("wall_s") for d in ("cpu", "cuda")}
    ups = []
    for key in results["methods"]:
        cpu, cuda = runs.get(f"{key}@cpu"), runs.get(f"{key}@cuda")
        if cpu and cuda and cpu.get("ok") and cuda.get("ok"):
            ups.append((cpu["wall_s"] / cuda["wall_s"], ROW[key].label))
    if ups:
        best, worst = max(ups), min(ups)
        lines.append(f"- On this machine the GPU runs are {worst[0]:.1f}× ({worst[1]}) to {best[0]:.1f}× "
                     f"({best[1]}) as fast as the same merges on its {results['machine']['cpus']} CPUs, "
                     "start-up and writes included.")
    if floor and fixed.get("cuda") is not None:
        near = [(runs[f"{k}@cuda"]["wall_s"] - fixed["cuda"]) / floor for k in results["methods"]
                if runs.get(f"{k}@cuda", {}).get("ok")]
        if near:
            lines.append(f"- Less the fixed cost of a CUDA merge ({fixed['cuda']:.1f} s on the tiny set: the "
                         f"interpreter, torch, CUDA's context), the GPU merges take {min(near):.1f}× to "
                         f"{max(near):.1f}× the time of reading the inputs once ({floor:.2f} s).")
    diffs = [(c.get("rel_diff"), k) for k, c in results.get("cuda_vs_cpu", {}).items() if c.get("same_names")]
    if diffs:
        exact = [k for d, k in diffs if d == 0]
        lines.append(f"- CUDA against CPU outputs: {len(exact)} of {len(diffs)} methods equal in every tensor; the "
                     f"largest relative difference of the merged task vectors is {max(d for d, _ in diffs):.2e}.")
    mk = {d: runs.get(f"mergekit_ties@{d}") for d in ("cpu", "cuda")}
    tm = {d: runs.get(f"ties_per_tensor_positive@{d}") for d in ("cpu", "cuda")}
    for d in ("cpu", "cuda"):
        if mk[d] and tm[d] and mk[d].get("ok") and tm[d].get("ok"):
            lines.append(f"- mergekit `ties` on {d}: {mk[d]['wall_s']:.1f} s against tiesmerge's "
                         f"{tm[d]['wall_s']:.1f} s for the same semantics ({mk[d]['wall_s'] / tm[d]['wall_s']:.1f}× "
                         "faster).")
    return lines


def write_report(results: dict, md_path: Path, json_path: Path) -> None:
    json_path.write_text(json.dumps(results, indent=1) + "\n")
    m, s, runs = results["machine"], results["set"], results["runs"]
    gpu = m.get("gpu", {})
    out = [
        "# tiesmerge on a GPU: the same merges on the GPU and the CPUs of one machine",
        "",
        f"Written by `benchmarks/speed/gpu.py` on {results['date']} (commit {results['commit']}): "
        f"`{results['invocation']}`.",
        "",
        f"Machine: {gpu.get('name') or 'no GPU'} ({speed._fmt(gpu.get('memory_gib'), '.0f')} GiB, "
        f"{gpu.get('multiprocessors')} SMs), {m['cpus']} CPUs ({m.get('cpu')}), {m['memory_gib']} GiB; "
        f"torch {gpu.get('torch')} (CUDA {gpu.get('cuda')}), Python {m['python']}.",
        "",
        f"Inputs: the {s['size']} set (make_models.py): base + {s['n']} fine-tunes, {s['params']:,} parameters "
        f"each, bf16, {s['input_bytes'] / 1e9:.2f} GB of weight files in all. Each run is a whole "
        "`tiesmerge merge` process (start-up, reads, merge, writes, manifest), page cache warm; "
        f"median of {results['repeat']} run(s).",
        "",
        "| method | CPU s | CUDA s | CUDA speed-up | CUDA GB/s of input | CPU peak RSS MiB | CUDA peak RSS MiB "
        "| GPU memory MiB | CUDA vs CPU output |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for key in results["methods"]:
        cpu, cuda = runs.get(f"{key}@cpu"), runs.get(f"{key}@cuda")
        up = (cpu["wall_s"] / cuda["wall_s"] if cpu and cuda and cpu.get("ok") and cuda.get("ok") else None)
        gbs = s["input_bytes"] / 1e9 / cuda["wall_s"] if cuda and cuda.get("ok") else None
        c = results.get("cuda_vs_cpu", {}).get(key)
        if c is None:
            versus = "—"
        elif not c.get("same_names"):
            versus = "different tensor names"
        elif c.get("identical_files"):
            versus = "byte-identical"
        else:
            versus = (f"rel. {c['rel_diff']:.1e}, max |Δ| {c['max_abs_diff']:.1e} "
                      f"({c['tensors_differing']}/{c['tensors']} tensors)")
        out.append(f"| {ROW[key].label} | {_cell(cpu, 'wall_s')} | {_cell(cuda, 'wall_s')} | {speed._fmt(up, '.1f')} "
                   f"| {speed._fmt(gbs)} | {_cell(cpu, 'peak_rss_bytes', '.0f', MiB)} "
                   f"| {_cell(cuda, 'peak_rss_bytes', '.0f', MiB)} | {_cell(cuda, 'gpu_peak_mib', '.0f')} "
                   f"| {versus} |")
    out += ["", "| floor or peer | device | wall s | peak RSS MiB | GPU memory MiB |", "|---|---|---:|---:|---:|"]
    for key, run in runs.items():
        name, _, device = key.partition("@")
        if name in ROW:
            continue
        out.append(f"| {run['label']} | {device or '—'} | {_cell(run, 'wall_s')} "
                   f"| {_cell(run, 'peak_rss_bytes', '.0f', MiB)} | {_cell(run, 'gpu_peak_mib', '.0f')} |")
    if results.get("mergekit_vs_tiesmerge"):
        out += ["", "mergekit `ties` against tiesmerge's per-tensor TIES with `--zero-sign positive` (the same "
                "semantics), each on the same device. With bf16 inputs they are not expected to be equal: mergekit "
                "0.1.5 forms the task vectors and their mean in bf16 and keeps exactly k entries, tiesmerge computes "
                "in float32 and keeps the entries tied at the threshold (speed.md traces each difference to one "
                "of the two):"]
        for device, c in results["mergekit_vs_tiesmerge"].items():
            out.append(f"- {device}: " + ("byte-identical" if c.get("identical_files") else
                                          f"relative difference {speed._fmt(c.get('rel_diff'), '.1e')}, "
                                          f"max |Δ| {speed._fmt(c.get('max_abs_diff'), '.1e')}"))
    if results.get("mergekit_note"):
        out += ["", f"mergekit: {results['mergekit_note']}"]
    failed = [k for k, r in runs.items() if not r.get("ok")]
    if failed:
        out += ["", "Failed runs (their logs' last lines are in the JSON): " + ", ".join(failed) + "."]
    shows = what_this_shows(results)
    if shows:
        out += ["", "What this shows (generated from the numbers above):", "", *shows]
    out += ["", "Commands:", "", "```bash", *results["commands"], "```", ""]
    md_path.write_text("\n".join(out))


# ---------------------------------------------------------------- the run


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", type=Path, default=make_models.DEFAULT_ROOT, help="models and outputs live here")
    p.add_argument("--size", choices=sorted(make_models.SIZES), default="small")
    p.add_argument("--n", type=int, default=3, help="fine-tunes to merge (default 3)")
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--methods", nargs="+", choices=[r.key for r in ROWS], default=[r.key for r in ROWS],
                   metavar="KEY", help="rows to run (default all): " + ", ".join(r.key for r in ROWS))
    p.add_argument("--devices", nargs="+", choices=["cpu", "cuda"], default=["cpu", "cuda"])
    p.add_argument("--python", default=sys.executable, help="the Python that runs `-m tiesmerge`")
    p.add_argument("--mergekit-python", help="a Python that imports mergekit 0.1.5 (none: no mergekit rows)")
    p.add_argument("--results", type=Path, default=speed.DEFAULT_RESULTS)
    p.add_argument("--name", default="speed_gpu", help="results file stem (default speed_gpu)")
    args = p.parse_args(argv)

    work, outs = args.root / "runs-gpu", args.root / "out-gpu"
    work.mkdir(parents=True, exist_ok=True)
    outs.mkdir(parents=True, exist_ok=True)
    args.results.mkdir(parents=True, exist_ok=True)
    base, models = make_models.make_set(args.root, args.size, args.n, log=speed.log)
    tbase, tmodels = make_models.make_set(args.root, "tiny", args.n, log=speed.log)
    inputs = make_models.weight_files(base) + [f for m in models for f in make_models.weight_files(m)]
    tinputs = make_models.weight_files(tbase) + [f for m in tmodels for f in make_models.weight_files(m)]
    shape = make_models.SIZES[args.size]
    invocation = shlex.join(["python", "benchmarks/speed/gpu.py", *(sys.argv[1:] if argv is None else argv)])
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short=10", "HEAD"], capture_output=True,
                            text=True, check=False).stdout.strip() or "unknown"
    results: dict = {
        "invocation": invocation, "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit, "repeat": args.repeat, "machine": machine(args.python), "methods": args.methods,
        "set": {"size": args.size, "n": args.n, "params": make_models.n_params(shape),
                "input_bytes": sum(f.stat().st_size for f in inputs), "input_files": len(inputs)},
        "runs": {}, "commands": [],
    }
    if "cuda" in args.devices and not results["machine"]["gpu"].get("name"):
        speed.log("no CUDA device: the cuda rows will fail (run with --devices cpu for the CPU rows alone)")

    # (key, label, argv, inputs, output, gpu): floors first, then every method on every device
    plan: list[tuple[str, str, list[str], list[Path], Path | None, bool]] = [
        ("read_floor", "read floor: cat inputs > /dev/null", ["cat", *map(str, inputs)], inputs, None, False)]
    for device in args.devices:
        floor_out = outs / f"floor-{device}"
        plan.append((f"merge_floor@{device}", "TIES on the tiny set (the fixed cost of a merge)",
                     merge_argv(args.python, tbase, tmodels, floor_out, device, ROW["ties_global"].flags),
                     tinputs, floor_out, device == "cuda"))
    for key in args.methods:
        for device in args.devices:
            plan.append((f"{key}@{device}", ROW[key].label,
                         merge_argv(args.python, base, models, outs / f"{key}@{device}", device, ROW[key].flags),
                         inputs, outs / f"{key}@{device}", device == "cuda"))
    if args.mergekit_python:
        config = work / "mergekit.yml"
        config.write_text(speed.mergekit_yaml(base, models))
        for device in args.devices:
            plan.append((f"mergekit_ties@{device}", "mergekit ties (mergekit-yaml)",
                         mergekit_argv(args.mergekit_python, config, outs / f"mergekit_ties@{device}", device),
                         inputs, outs / f"mergekit_ties@{device}", device == "cuda"))
    else:
        results["mergekit_note"] = "not run (no --mergekit-python)"

    # warm-up, untimed: each command once on the tiny set (imports, numba's cache, CUDA's kernels)
    for key, _label, cmd, _inputs, out, _gpu in plan:
        if out is None or key.startswith("merge_floor"):
            continue
        wcmd = [str(tbase) if c == str(base) else c for c in cmd]
        for real, tiny in zip(models, tmodels):
            wcmd = [str(tiny) if c == str(real) else c for c in wcmd]
        if key.startswith("mergekit"):
            wconfig = work / "mergekit-warmup.yml"
            wconfig.write_text(speed.mergekit_yaml(tbase, tmodels))
            wcmd = [str(wconfig) if c == str(work / "mergekit.yml") else c for c in wcmd]
        wcmd = [str(outs / "warmup") if c == str(out) else c for c in wcmd]
        shutil.rmtree(outs / "warmup", ignore_errors=True)
        rc = subprocess.run(wcmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False).returncode
        speed.log(f"warm-up {key}: rc {rc}")
    shutil.rmtree(outs / "warmup", ignore_errors=True)

    reps: dict[str, list[dict]] = {row[0]: [] for row in plan}
    for r in range(args.repeat):  # interleaved, so a change in the machine's load hits every row alike
        for key, _label, cmd, run_inputs, out, gpu in plan:
            speed.warm(run_inputs)
            if out is not None:
                shutil.rmtree(out, ignore_errors=True)
            os.sync()
            res = timed(cmd, work / f"{key}-{r + 1}.log", gpu=gpu)
            os.sync()
            speed.log(f"{key}: {res['wall_s']:.2f} s, rc {res['rc']}"
                      + (f", GPU +{res['gpu_peak_mib']} MiB" if "gpu_peak_mib" in res else ""))
            reps[key].append(res)
    for key, label, cmd, _inputs, out, _gpu in plan:
        ok = [x for x in reps[key] if x["rc"] == 0]
        run = {"label": label, "command": shlex.join(cmd), "repeats": reps[key], "ok": len(ok) == len(reps[key]),
               "output_dir": str(out) if out else None}
        if run["ok"]:
            run["wall_s"] = statistics.median(x["wall_s"] for x in ok)
            rss = [x["peak_rss_bytes"] for x in ok if x["peak_rss_bytes"] is not None]
            run["peak_rss_bytes"] = max(rss) if rss else None
            gpu_peaks = [x["gpu_peak_mib"] for x in ok if "gpu_peak_mib" in x]
            run["gpu_peak_mib"] = max(gpu_peaks) if gpu_peaks else None
        results["runs"][key] = run
        results["commands"].append(shlex.join(cmd) + (" > /dev/null" if key == "read_floor" else ""))

    results["cuda_vs_cpu"] = {}
    for key in args.methods:
        cpu, cuda = results["runs"].get(f"{key}@cpu"), results["runs"].get(f"{key}@cuda")
        if cpu and cuda and cpu["ok"] and cuda["ok"]:
            results["cuda_vs_cpu"][key] = compare(outs / f"{key}@cuda", outs / f"{key}@cpu", base)
    results["mergekit_vs_tiesmerge"] = {}
    for device in args.devices:
        mk, tm = results["runs"].get(f"mergekit_ties@{device}"), results["runs"].get(
            f"ties_per_tensor_positive@{device}")
        if mk and tm and mk["ok"] and tm["ok"]:
            results["mergekit_vs_tiesmerge"][device] = compare(outs / f"ties_per_tensor_positive@{device}",
                                                               outs / f"mergekit_ties@{device}", base)
    results["self_rusage_maxrss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    md_path, json_path = args.results / f"{args.name}.md", args.results / f"{args.name}.json"
    write_report(results, md_path, json_path)
    speed.log(f"wrote {md_path} and {json_path}")
    return 0 if all(r["ok"] for r in results["runs"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
