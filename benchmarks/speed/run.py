"""Speed and memory of tiesmerge against the read floor and mergekit, on synthetic Llama checkpoints.

One command, same inputs, one run:

* floors: ``cat`` every input weight file to /dev/null (page cache warm); ``python -c 'import
  tiesmerge'`` (RSS); the global TIES merge of the tiny set (RSS of a merge holding no data);
* tiesmerge TIES, global trimming (the paper's default), and per-tensor trimming;
* tiesmerge TIES, per-tensor trimming with ``--zero-sign positive`` (mergekit's semantics; its
  output is compared with mergekit's, tensor by tensor);
* tiesmerge task arithmetic;
* tiesmerge TIES global and per tensor with TIESMERGE_KERNELS=0 (the torch path, no numba kernels);
* mergekit ``ties`` (``mergekit-yaml``), from its own virtual environment;
* memory-budget runs: tiesmerge global TIES on the ~1 B model with ``--memory-budget 256MiB``
  (also on the torch path) and ``2GiB`` (the default).

Each run is timed by ``/usr/bin/time -v`` (wall seconds, peak RSS), after the inputs were read once
so that every run starts from the same warm page cache. Results go to
``benchmarks/results/speed.json`` and ``benchmarks/results/speed.md``.

    .venv/bin/python benchmarks/speed/run.py                  # small set, 3 fine-tunes, all runs
    .venv/bin/python benchmarks/speed/run.py --repeat 3 --n 8
    .venv/bin/python benchmarks/speed/run.py --no-budget-run  # skip the ~1 B memory-budget runs
    .venv/bin/python benchmarks/speed/run.py --report-only    # rewrite speed.md from speed.json

Why one long file: it is the one command anyone reruns to reproduce the speed table, and it reads
top to bottom as the run does — inputs, floors, tiesmerge rows, mergekit, the output comparison,
the report — so nothing of the comparison hides in a helper module.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import filecmp
import json
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))

import make_models  # noqa: E402

DEFAULT_RESULTS = REPO / "benchmarks" / "results"
DEFAULT_MERGEKIT_VENV = Path("/tmp/mergekit-venv")
TIME = "/usr/bin/time"
GB = 1e9
MiB = 1 << 20
WAIT_IDLE = {"max_busy": 1.0, "timeout": 0.0}  # set from --wait-idle
FLOORS = ("read_floor", "import_floor", "merge_floor", "merge_floor_torch")
# variables a run adds to this process's environment (written before its command in the record)
TORCH_ENV = {"TIESMERGE_KERNELS": "0"}  # tiesmerge's torch path instead of its fused numba kernels
# tiesmerge remembers input digests by file identity (io/card.py): an untimed warm-up merge of the
# real inputs fills that cache for the timed runs, and one timed run hashes every input again
COLD_DIGEST_ENV = {"TIESMERGE_DIGEST_CACHE": "0"}
MERGEKIT_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}  # the synthetic models have no tokenizer
# tiesmerge rows that --cpu-name runs again with numba generating code for another CPU
CODEGEN_ROWS = ("ties_global", "ties_per_tensor", "ties_per_tensor_positive", "task_arithmetic")
# the x86 vector extensions worth recording (from /proc/cpuinfo's flags)
VECTOR_FLAGS = re.compile(r"sse4_1|sse4_2|avx|avx2|fma|f16c|avx512\w*|avx_vnni\w*|amx\w*")


def codegen_env(cpu_name: str) -> dict[str, str]:
    """numba generating code for ``cpu_name`` with LLVM's features for that CPU (haswell: AVX2 + FMA,
    no AVX-512). NUMBA_CPU_NAME alone is not enough: numba then still hands LLVM the host's
    feature string, and on an AVX-512 host LLVM emits AVX-512 code (512-bit wide for haswell)."""
    return {"NUMBA_CPU_NAME": cpu_name, "NUMBA_CPU_FEATURES": ""}


AVX2_ENV = codegen_env("haswell")


def env_prefix(extra: dict[str, str] | None) -> str:
    """``K=V`` words to write before a command run with ``extra`` added to the environment."""
    return "".join(f"{k}={shlex.quote(v) if v else ''} " for k, v in (extra or {}).items())


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def parse_size(text: str) -> int:
    """'256MiB' -> 268435456; '2GB' -> 2000000000 (the units tiesmerge's --memory-budget takes)."""
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]i?B|B)?\s*", text, re.IGNORECASE)
    if not m:
        raise ValueError(f"not a size: {text!r}")
    unit = (m.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "TIB": 1 << 40}[unit]
    return int(float(m.group(1)) * scale)


# ---------------------------------------------------------------- machine


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def _cmd_out(argv: list[str]) -> str:
    return _cmd_out_env(argv, None)


def _cmd_out_env(argv: list[str], env: dict | None) -> str:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def numba_target() -> dict:
    """numba's code-generation target in this process: the CPU name and the features LLVM is given
    (numba's own rule: NUMBA_CPU_NAME / NUMBA_CPU_FEATURES, else the host's)."""
    import llvmlite.binding as ll
    from numba.core import config
    from numba.core.codegen import get_host_cpu_features

    name = config.CPU_NAME or ll.get_host_cpu_name()
    features = config.CPU_FEATURES if config.CPU_FEATURES is not None else get_host_cpu_features()
    enabled = [f[1:] for f in features.split(",")
               if f.startswith("+") and VECTOR_FLAGS.fullmatch(f[1:].replace("-", "_").replace(".", "_"))]
    return {"cpu_name": name, "features": features or None,
            "vector_features": enabled if features else [f"LLVM's defaults for {name}"]}


def cpu_info() -> dict:
    """Cores, threads per core and vector extensions, from /proc/cpuinfo and sysfs."""
    cpuinfo = _read("/proc/cpuinfo")
    flags = re.search(r"^flags\s*:\s*(.*)$", cpuinfo, re.MULTILINE)
    cores = set(re.findall(r"physical id\s*:\s*(\d+)\s*\n(?:.*\n)*?core id\s*:\s*(\d+)", cpuinfo))
    siblings = _read("/sys/devices/system/cpu/cpu0/topology/thread_siblings_list").strip()  # "0", "0-1", "0,64"
    per_core = 0
    for part in filter(None, siblings.split(",")):
        first, _, last = part.partition("-")
        per_core += int(last or first) - int(first) + 1
    return {"physical_cores": len(cores) or None, "threads_per_core": per_core or None,
            "vector_extensions": [f for f in (flags.group(1).split() if flags else []) if VECTOR_FLAGS.fullmatch(f)]}


def numba_targets(tiesmerge_python: Path, cpu_names: list[str]) -> dict:
    """numba's target in the tiesmerge environment: by default, and with each --cpu-name."""
    code = f"import json, sys; sys.path.insert(0, {str(HERE)!r}); import run; print(json.dumps(run.numba_target()))"
    out = {}
    for label, extra in [("default", {}), *((name, codegen_env(name)) for name in cpu_names)]:
        text = _cmd_out_env([str(tiesmerge_python), "-c", code], dict(os.environ, **extra))
        out[label] = json.loads(text.splitlines()[-1]) if text else None
    return out


def machine_info(tiesmerge_python: Path, mergekit_python: Path | None, root: Path,
                 cpu_names: list[str] | None = None) -> dict:
    cpuinfo = _read("/proc/cpuinfo")
    model = re.search(r"model name\s*:\s*(.*)", cpuinfo)
    meminfo = _read("/proc/meminfo")
    mem = re.search(r"MemTotal:\s*(\d+) kB", meminfo)
    probe = ("import json, torch, safetensors, tiesmerge; print(json.dumps({'torch': torch.__version__, "
             "'torch_threads': torch.get_num_threads(), 'safetensors': safetensors.__version__, "
             "'tiesmerge': tiesmerge.__version__}))")
    versions = {}
    out = _cmd_out([str(tiesmerge_python), "-c", probe])
    if out:
        versions["tiesmerge_env"] = json.loads(out.splitlines()[-1])
    if mergekit_python is not None and mergekit_python.exists():
        probe_mk = ("import json, torch, transformers, safetensors; from importlib.metadata import version; "
                    "print(json.dumps({'mergekit': version('mergekit'), 'torch': torch.__version__, "
                    "'torch_threads': torch.get_num_threads(), 'transformers': transformers.__version__, "
                    "'safetensors': safetensors.__version__}))")
        out = _cmd_out([str(mergekit_python), "-c", probe_mk])
        if out:
            versions["mergekit_env"] = json.loads(out.splitlines()[-1])
    git = _cmd_out(["git", "-C", str(REPO), "rev-parse", "HEAD"])
    dirty = _cmd_out(["git", "-C", str(REPO), "status", "--porcelain", "--", "src"])
    return {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": model.group(1).strip() if model else platform.processor(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu": cpu_info(),
        "numba_target": numba_targets(tiesmerge_python, cpu_names or []),
        "ram_gib": round(int(mem.group(1)) / (1 << 20), 1) if mem else None,
        "filesystem": _cmd_out(["df", "-hT", str(root)]).splitlines()[-1:] or None,
        "git_commit": git,
        "src_modified": bool(dirty),
        "loadavg_at_start": os.getloadavg(),
        "busy_processes_at_start": busy_processes(),
        **versions,
    }


def cpu_busy(seconds: float = 2.0) -> float | None:
    """Fraction of all CPUs busy over the next ``seconds`` (from /proc/stat): is anything else running?"""
    def sample() -> tuple[int, int] | None:
        line = _read("/proc/stat").splitlines()[:1]
        if not line or not line[0].startswith("cpu "):
            return None
        v = [int(x) for x in line[0].split()[1:]]
        idle = v[3] + (v[4] if len(v) > 4 else 0)
        return sum(v), idle

    a = sample()
    time.sleep(seconds)
    b = sample()
    if a is None or b is None or b[0] == a[0]:
        return None
    return round(1 - (b[1] - a[1]) / (b[0] - a[0]), 3)


def busy_processes() -> list[str]:
    """Other processes using CPU right now (ps), for the record."""
    out = _cmd_out(["ps", "-eo", "pid,pcpu,etime,args", "--sort=-pcpu"])
    rows = []
    for line in out.splitlines()[1:6]:
        parts = line.split(None, 3)
        if len(parts) == 4 and float(parts[1]) >= 10 and int(parts[0]) != os.getpid():
            rows.append(line[:200])
    return rows


def wait_idle(max_busy: float, timeout: float) -> float | None:
    """Wait (up to ``timeout`` s) until the CPUs are at most ``max_busy`` busy; returns the last reading."""
    deadline = time.monotonic() + timeout
    busy = cpu_busy()
    while busy is not None and busy > max_busy and time.monotonic() < deadline:
        log(f"CPUs {100 * busy:.0f} % busy before the run; waiting ({', '.join(busy_processes()) or '?'})")
        time.sleep(15)
        busy = cpu_busy()
    return busy


# ---------------------------------------------------------------- timing


def warm(files: list[Path]) -> float:
    """Read every file once (fills the page cache); returns seconds."""
    buf = bytearray(16 * MiB)
    view = memoryview(buf)
    started = time.perf_counter()
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while fh.readinto(view):
                pass
    return time.perf_counter() - started


def parse_time_v(text: str) -> dict:
    def grab(pattern: str) -> str | None:
        m = re.search(pattern, text)
        return m.group(1).strip() if m else None

    elapsed = grab(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\):\s*(\S+)")
    wall = None
    if elapsed:
        parts = [float(p) for p in elapsed.split(":")]
        wall = 0.0
        for p in parts:
            wall = wall * 60 + p
    rss = grab(r"Maximum resident set size \(kbytes\):\s*(\d+)")
    cpu = grab(r"Percent of CPU this job got:\s*(\d+)%")
    user = grab(r"User time \(seconds\):\s*([\d.]+)")
    system = grab(r"System time \(seconds\):\s*([\d.]+)")
    status = grab(r"Exit status:\s*(\d+)")
    major = grab(r"Major \(requiring I/O\) page faults:\s*(\d+)")
    return {
        "wall_s": wall,
        "peak_rss_bytes": int(rss) * 1024 if rss else None,
        "cpu_percent": int(cpu) if cpu else None,
        "user_s": float(user) if user else None,
        "sys_s": float(system) if system else None,
        "exit_status": int(status) if status else None,
        "major_page_faults": int(major) if major else None,
    }


def timed(argv: list[str], log_path: Path, env: dict | None = None, stdout_to_devnull: bool = False) -> dict:
    """Run argv under /usr/bin/time -v; returns the parsed measurements (and rc, log path)."""
    time_path = log_path.with_suffix(".time")
    full = [TIME, "-v", "-o", str(time_path), *argv]
    started = time.perf_counter()
    with open(log_path, "w") as logf:
        proc = subprocess.run(full, stdout=subprocess.DEVNULL if stdout_to_devnull else logf, stderr=logf,
                              env=env, check=False)
    perf_wall = time.perf_counter() - started
    result = parse_time_v(_read(str(time_path)))
    if not result["wall_s"]:  # /usr/bin/time rounds to 10 ms; a faster run takes the wall clock here
        result["wall_s"] = round(perf_wall, 3)
    result.update({"rc": proc.returncode, "perf_counter_wall_s": round(perf_wall, 3), "log": str(log_path)})
    if proc.returncode != 0:
        result["log_tail"] = _read(str(log_path))[-3000:]
    return result


# ---------------------------------------------------------------- runs


def tiesmerge_argv(tiesmerge: Path, base: Path, models: list[Path], out: Path, *extra: str) -> list[str]:
    argv = [str(tiesmerge), "merge", "--base", str(base)]
    for m in models:
        argv += ["--model", str(m)]
    return argv + [*extra, "-o", str(out), "--force", "--no-progress"]


def mergekit_yaml(base: Path, models: list[Path]) -> str:
    lines = ["merge_method: ties", f"base_model: {base}", "models:"]
    for m in models:
        lines += [f"  - model: {m}", "    parameters: {density: 0.2, weight: 1.0}"]
    lines += ["parameters: {normalize: true}", "dtype: bfloat16", ""]
    return "\n".join(lines)


def manifest_of(out: Path) -> dict | None:
    path = out / "tiesmerge.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError:
        return None


def run_rep(key: str, label: str, argv: list[str], inputs: list[Path], work: Path, r: int, repeat: int,
            out: Path | None, extra: dict | None = None, is_floor: bool = False) -> dict:
    """One timed run (repeat ``r`` of ``repeat``), with ``extra`` added to the environment."""
    warm_s = warm(inputs)
    if out is not None and not is_floor:
        shutil.rmtree(out, ignore_errors=True)  # the same fresh start for every tool
        os.sync()
    busy = wait_idle(WAIT_IDLE["max_busy"], WAIT_IDLE["timeout"])
    load = os.getloadavg()
    log(f"{label}: run {r + 1}/{repeat} (CPUs {_fmt(100 * busy if busy is not None else None, '.0f')} % busy "
        f"before, load {load[0]:.2f})")
    res = timed(argv, work / f"{key}-{r + 1}.log", env=dict(os.environ, **extra) if extra else None,
                stdout_to_devnull=is_floor)
    os.sync()  # the output's dirty pages go to disk now, not during the next run
    res["loadavg_before"] = [round(x, 2) for x in load]
    res["cpu_busy_before"] = busy
    if busy is not None and busy > WAIT_IDLE["max_busy"]:
        res["busy_processes_before"] = busy_processes()
    res["warm_read_s"] = round(warm_s, 3)
    if out is not None and res["rc"] == 0:
        man = manifest_of(out)
        if man is not None:
            eng = man.get("engine", {})
            res["engine_bytes_read"] = eng.get("bytes_read")
            res["engine_passes"] = eng.get("passes")
            res["engine_estimated_peak_bytes"] = eng.get("estimated_peak_bytes")
            res["engine_memory_budget_bytes"] = eng.get("memory_budget_bytes")
            res["manifest_seconds"] = man.get("seconds")
            res["thresholds"] = man.get("thresholds")
        res["output_bytes"] = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    if res["rc"] != 0:
        log(f"  FAILED (rc {res['rc']}); see {res['log']}")
    else:
        log(f"  {res['wall_s']:.2f} s wall, peak RSS {res['peak_rss_bytes'] / MiB:.0f} MiB, "
            f"CPU {res['cpu_percent']}%")
    return res


def summarize(key: str, label: str, argv: list[str], inputs: list[Path], reps: list[dict],
              extra: dict | None = None, is_floor: bool = False) -> dict:
    """A run's record: every repeat, the median wall time, the largest peak RSS."""
    input_bytes = sum(f.stat().st_size for f in inputs)
    ok = [r for r in reps if r["rc"] == 0]
    command = env_prefix(extra) + shlex.join(argv) + (" > /dev/null" if is_floor else "")
    summary: dict = {"key": key, "label": label, "command": command, "argv": argv, "env": extra or {},
                     "input_bytes": input_bytes, "repeats": reps, "ok": bool(ok) and len(ok) == len(reps)}
    if ok:
        summary["wall_s"] = statistics.median(r["wall_s"] for r in ok)
        summary["wall_s_min"] = min(r["wall_s"] for r in ok)
        summary["peak_rss_bytes"] = max(r["peak_rss_bytes"] for r in ok)
        summary["cpu_percent"] = statistics.median(r["cpu_percent"] for r in ok)
        summary["input_gb_per_s"] = input_bytes / GB / summary["wall_s"] if summary["wall_s"] else None
        eb = [r.get("engine_bytes_read") for r in ok if r.get("engine_bytes_read") is not None]
        if eb:
            summary["engine_bytes_read"] = eb[0]
            summary["engine_gb_per_s"] = eb[0] / GB / summary["wall_s"]
            summary["engine_passes"] = ok[0].get("engine_passes")
            summary["engine_estimated_peak_bytes"] = ok[0].get("engine_estimated_peak_bytes")
            summary["engine_memory_budget_bytes"] = ok[0].get("engine_memory_budget_bytes")
            summary["manifest_seconds"] = ok[0].get("manifest_seconds")
    return summary


def run_one(key: str, label: str, argv: list[str], inputs: list[Path], work: Path, repeat: int,
            out: Path | None, extra: dict | None = None, is_floor: bool = False) -> dict:
    reps = [run_rep(key, label, argv, inputs, work, r, repeat, out, extra, is_floor) for r in range(repeat)]
    return summarize(key, label, argv, inputs, reps, extra, is_floor)


def same_files(a: Path, b: Path) -> bool:
    """Whether two output directories hold byte-identical safetensors files."""
    fa, fb = sorted(p.name for p in a.glob("*.safetensors")), sorted(p.name for p in b.glob("*.safetensors"))
    return bool(fa) and fa == fb and all(filecmp.cmp(a / f, b / f, shallow=False) for f in fa)


# ---------------------------------------------------------------- output comparison


def _tensor_files(directory: Path) -> dict[str, Path]:
    from safetensors import safe_open

    owner: dict[str, Path] = {}
    for f in sorted(directory.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as fh:
            for name in fh.keys():
                owner[name] = f
    return owner


def compare_outputs(a_dir: Path, b_dir: Path, base_dir: Path) -> dict:
    """Tensor by tensor: max |a - b|, entries that differ, entries beyond one bf16 ulp of max(|a|, |b|)."""
    import torch
    from safetensors import safe_open

    a_files, b_files, base_files = _tensor_files(a_dir), _tensor_files(b_dir), _tensor_files(base_dir)
    only_a = sorted(set(a_files) - set(b_files))
    only_b = sorted(set(b_files) - set(a_files))
    per_tensor = []
    totals = {"entries": 0, "entries_differing": 0, "entries_beyond_1ulp": 0, "entries_opposite_sign": 0}
    max_abs = 0.0
    max_delta = 0.0
    handles: dict[Path, object] = {}

    def get(path: Path, name: str):
        if path not in handles:
            handles[path] = safe_open(str(path), framework="pt")
        return handles[path].get_tensor(name)  # type: ignore[attr-defined]

    by_file: dict[Path, list[str]] = {}
    for name in sorted(set(a_files) & set(b_files)):
        by_file.setdefault(a_files[name], []).append(name)
    for path in sorted(by_file):  # shard by shard of the first output
        for name in by_file[path]:
            a = get(a_files[name], name)
            b = get(b_files[name], name)
            if a.shape != b.shape:
                per_tensor.append({"name": name, "shape_a": list(a.shape), "shape_b": list(b.shape)})
                continue
            af, bf = a.float(), b.float()
            diff = (af - bf).abs()
            mag = torch.maximum(af.abs(), bf.abs()).clamp_min(2.0 ** -126)
            ulp = torch.exp2(torch.floor(torch.log2(mag)) - 7)  # bf16: 8 significant bits
            n_diff = int((diff > 0).sum())
            n_ulp = int((diff > ulp).sum())
            mx = float(diff.max()) if diff.numel() else 0.0
            n_opp = 0
            if name in base_files:
                base32 = get(base_files[name], name).float()
                max_delta = max(max_delta, float((af - base32).abs().max()))
                # merged deltas of opposite signs: the two elections disagreed there
                n_opp = int((((af - base32).sign() * (bf - base32).sign()) < 0).sum())
                del base32
            max_abs = max(max_abs, mx)
            totals["entries"] += a.numel()
            totals["entries_differing"] += n_diff
            totals["entries_beyond_1ulp"] += n_ulp
            totals["entries_opposite_sign"] += n_opp
            per_tensor.append({"name": name, "dtype_a": str(a.dtype).removeprefix("torch."),
                               "dtype_b": str(b.dtype).removeprefix("torch."), "numel": a.numel(),
                               "max_abs_diff": mx, "entries_differing": n_diff, "entries_beyond_1ulp": n_ulp,
                               "entries_opposite_sign": n_opp})
            del a, b, af, bf, diff, mag, ulp
        for h in list(handles):
            handles.pop(h)
    compared = [t for t in per_tensor if "max_abs_diff" in t]
    return {
        "a": str(a_dir), "b": str(b_dir),
        "tensors_compared": len(compared),
        "tensors_identical": sum(1 for t in compared if t["entries_differing"] == 0),
        "tensors_beyond_1ulp": sum(1 for t in compared if t["entries_beyond_1ulp"] > 0),
        "shape_mismatches": [t for t in per_tensor if "max_abs_diff" not in t],
        "only_in_a": only_a, "only_in_b": only_b,
        "max_abs_diff": max_abs,
        "max_abs_merged_minus_base": max_delta,
        **totals,
        "fraction_differing": totals["entries_differing"] / max(1, totals["entries"]),
        "fraction_beyond_1ulp": totals["entries_beyond_1ulp"] / max(1, totals["entries"]),
        "worst_tensors": sorted(compared, key=lambda t: -t["entries_beyond_1ulp"])[:5],
        "per_tensor": compared,
    }


def _emulate(base, fts, dtype, exact_k: bool, density: float = 0.2):
    """TIES per tensor, zero votes elect +, mean of agreeing (mergekit's normalize: true), lambda 1.

    dtype=bfloat16, exact_k=True is mergekit 0.1.5's arithmetic (task vectors, sum and division in
    bf16; exactly k entries kept via argsort); dtype=float32, exact_k=False is tiesmerge's (float32,
    every entry equal to the k-th largest |tau| kept)."""
    import torch

    b = base.to(dtype)
    kept = []
    for f in fts:
        d = f.to(dtype) - b
        k = max(1, int(density * d.numel()))
        w = d.abs().reshape(-1).float()
        if exact_k:
            mask = torch.zeros_like(w)
            mask[torch.argsort(w, descending=True)[:k]] = 1
        else:
            mask = (w >= w.kthvalue(w.numel() - k + 1).values).float()
        kept.append(d * mask.reshape(d.shape).to(dtype))
    deltas = torch.stack(kept)
    sign = (deltas.sum(0) >= 0).to(dtype) * 2 - 1
    agree = deltas.sign() == sign
    mixed = (deltas * agree).sum(0)
    div = agree.to(dtype).sum(0)
    div[div == 0] = 1
    return (b + mixed / div).to(base.dtype)


def attribute(names: list[str], a_dir: Path, b_dir: Path, base_dir: Path, model_dirs: list[Path]) -> list[dict]:
    """For a few tensors: do two emulations reproduce the two outputs bit for bit, and how many entries
    does each difference alone (bf16 arithmetic; exactly-k tie breaking) change?"""
    from safetensors import safe_open

    files = {d: _tensor_files(d) for d in (a_dir, b_dir, base_dir, *model_dirs)}

    def get(d: Path, name: str):
        with safe_open(str(files[d][name]), framework="pt") as fh:
            return fh.get_tensor(name)

    import torch

    rows = []
    for name in names:
        base = get(base_dir, name)
        fts = [get(d, name) for d in model_dirs]
        a, b = get(a_dir, name), get(b_dir, name)
        tm_emul = _emulate(base, fts, torch.float32, exact_k=False)
        mk_emul = _emulate(base, fts, torch.bfloat16, exact_k=True)
        f32_exact = _emulate(base, fts, torch.float32, exact_k=True)
        bf16_ties = _emulate(base, fts, torch.bfloat16, exact_k=False)
        rows.append({
            "name": name, "numel": base.numel(),
            "tiesmerge_equals_float32_keep_ties_emulation": bool(torch.equal(a, tm_emul)),
            "mergekit_equals_bf16_exact_k_emulation": bool(torch.equal(b, mk_emul)),
            "entries_changed_by_bf16_arithmetic_alone": int((bf16_ties != tm_emul).sum()),
            "entries_changed_by_exact_k_tie_breaking_alone": int((f32_exact != tm_emul).sum()),
            "entries_differing_tiesmerge_vs_mergekit": int((a != b).sum()),
        })
        del base, fts, a, b, tm_emul, mk_emul, f32_exact, bf16_ties
    return rows


def compare_and_attribute(a: Path, b: Path, base: Path, models: list[Path]) -> dict:
    log("comparing tiesmerge per-tensor (--zero-sign positive) with mergekit, tensor by tensor")
    c = compare_outputs(a, b, base)
    worst = [t["name"] for t in c["worst_tensors"][:2]]
    picks = list(dict.fromkeys(worst + ["model.layers.0.self_attn.k_proj.weight", "model.norm.weight"]))
    picks = [n for n in picks if any(t["name"] == n for t in c["per_tensor"])]
    log(f"  attributing the differences on {', '.join(picks)}")
    c["attribution"] = attribute(picks, a, b, base, models)
    log(f"  max |Δ| {c['max_abs_diff']:.3g}; {c['tensors_beyond_1ulp']}/{c['tensors_compared']} tensors "
        f"beyond one bf16 ulp; {100 * c['fraction_beyond_1ulp']:.4f} % of entries")
    return c


# ---------------------------------------------------------------- report


def _fmt(x, spec: str = ".2f", none: str = "—") -> str:
    return none if x is None else format(x, spec)


def ratios(runs: dict[str, dict]) -> dict:
    def r(num: str, den: str, field: str) -> float | None:
        a, b = runs.get(num, {}), runs.get(den, {})
        if a.get(field) and b.get(field):
            return a[field] / b[field]
        return None

    out = {
        "mergekit_over_tiesmerge_per_tensor_positive_time": r("mergekit_ties", "ties_per_tensor_positive", "wall_s"),
        "mergekit_over_tiesmerge_per_tensor_time": r("mergekit_ties", "ties_per_tensor", "wall_s"),
        "mergekit_over_tiesmerge_global_time": r("mergekit_ties", "ties_global", "wall_s"),
        "mergekit_over_tiesmerge_per_tensor_positive_rss": r("mergekit_ties", "ties_per_tensor_positive",
                                                             "peak_rss_bytes"),
        "mergekit_over_tiesmerge_global_rss": r("mergekit_ties", "ties_global", "peak_rss_bytes"),
        "global_over_per_tensor_time": r("ties_global", "ties_per_tensor", "wall_s"),
        "global_over_per_tensor_rss": r("ties_global", "ties_per_tensor", "peak_rss_bytes"),
        "torch_path_over_fused_global_time": r("ties_global_torch", "ties_global", "wall_s"),
        "torch_path_over_fused_per_tensor_time": r("ties_per_tensor_torch", "ties_per_tensor", "wall_s"),
        "torch_path_over_fused_global_rss": r("ties_global_torch", "ties_global", "peak_rss_bytes"),
    }
    for key in ("ties_global", "ties_per_tensor", "ties_per_tensor_positive", "task_arithmetic",
                "ties_global_torch", "ties_per_tensor_torch", "mergekit_ties"):
        out[f"{key}_over_read_floor_time"] = r(key, "read_floor", "wall_s")
    for key in (k for k in runs if "@" in k):  # --cpu-name / --numba-threads twins
        out[f"{key}_over_default_time"] = r(key, key.partition("@")[0], "wall_s")
        out[f"mergekit_over_{key}_time"] = r("mergekit_ties", key, "wall_s")
        out[f"mergekit_over_{key}_rss"] = r("mergekit_ties", key, "peak_rss_bytes")
    return out


def what_this_shows(results: dict) -> str:
    """A short paragraph generated from the numbers (so a rerun never leaves a stale one)."""
    runs, rt = results["runs"], results["ratios"]
    inp = results["set"]["input_bytes"]
    parts = []
    floor = runs.get("read_floor", {})
    if floor.get("ok"):
        parts.append(f"Reading the {inp / GB:.2f} GB of inputs from a warm page cache takes {floor['wall_s']:.2f} s "
                     f"({floor['input_gb_per_s']:.2f} GB/s): no merge can beat that.")
    g, pt = runs.get("ties_global", {}), runs.get("ties_per_tensor", {})
    if g.get("ok"):
        passes = g.get("engine_bytes_read", 0) / inp if g.get("engine_bytes_read") else None
        how = {1: "the merge pass only", 2: "one counting pass from a sampled bracket, then the merge pass",
               3: "two counting passes, then the merge pass"}.get(round(passes or 0), "counting passes, then the merge")
        parts.append(f"tiesmerge's global TIES (the paper's one threshold per model) takes {g['wall_s']:.1f} s, "
                     f"{_fmt(rt.get('ties_global_over_read_floor_time'), '.1f')}× the read floor; it reads the "
                     f"inputs {_fmt(passes, '.1f')} times ({how}), at "
                     f"{g['cpu_percent']:.0f} % CPU, so it is bound by compute on this machine, not by reading.")
    cold = runs.get("ties_global_cold_digests", {})
    if g.get("ok") and cold.get("ok"):
        parts.append(f"Hashing every input again for the manifest (a first merge of new files; later merges "
                     f"reuse the digests) makes it {cold['wall_s']:.1f} s.")
    if g.get("ok") and pt.get("ok"):
        pt_reads = pt.get("engine_bytes_read", 0) / inp
        why = (" (each tensor larger than one chunk is read again for its threshold before the merge)"
               if pt_reads > 1.05 else " (each tensor's threshold is found in memory, then merged)")
        parts.append(f"Per-tensor trimming reads {pt_reads:.2f}× the inputs{why} and takes {pt['wall_s']:.1f} s: "
                     f"global costs "
                     f"{rt['global_over_per_tensor_time']:.2f}× per-tensor in time and "
                     f"{rt['global_over_per_tensor_rss']:.2f}× in peak RSS.")
    mk, ptp = runs.get("mergekit_ties", {}), runs.get("ties_per_tensor_positive", {})
    if mk.get("ok") and ptp.get("ok"):
        parts.append(f"mergekit's ties takes {mk['wall_s']:.1f} s and peaks at {mk['peak_rss_bytes'] / MiB:,.0f} MiB: "
                     f"{rt['mergekit_over_tiesmerge_per_tensor_positive_time']:.2f}× the time and "
                     f"{rt['mergekit_over_tiesmerge_per_tensor_positive_rss']:.2f}× the peak RSS of tiesmerge with "
                     f"the same semantics (per tensor, zero votes elect +), and "
                     f"{_fmt(rt.get('mergekit_over_tiesmerge_global_time'))}× the time of tiesmerge's global TIES.")
    elif results.get("mergekit_note"):
        parts.append(f"mergekit: {results['mergekit_note']}")
    c = results.get("comparison") or {}
    if "tensors_compared" in c:
        parts.append(f"Outputs: {c['tensors_beyond_1ulp']} of {c['tensors_compared']} tensors have entries more than "
                     f"one bf16 ulp from mergekit's ({100 * c['fraction_beyond_1ulp']:.4f} % of all entries; max |Δ| "
                     f"{c['max_abs_diff']:.3g}, where tiesmerge's largest |merged − base| is "
                     f"{c['max_abs_merged_minus_base']:.3g}; {c.get('entries_opposite_sign', 0):,} entries, "
                     f"{100 * c.get('entries_opposite_sign', 0) / max(1, c['entries']):.4f} %, moved the base in "
                     "opposite directions).")
        att = c.get("attribution") or []
        if att:
            both = all(t["tiesmerge_equals_float32_keep_ties_emulation"] and t["mergekit_equals_bf16_exact_k_emulation"]
                       for t in att)
            bf = sum(t["entries_changed_by_bf16_arithmetic_alone"] for t in att)
            tie = sum(t["entries_changed_by_exact_k_tie_breaking_alone"] for t in att)
            parts.append(("Both outputs are reproduced bit for bit" if both else "The outputs are not both reproduced")
                         + f" on the {len(att)} tensors checked by a plain-torch emulation: mergekit 0.1.5 forms the "
                         "task vectors, the sum and the division in bf16 and keeps exactly k entries per tensor (sort "
                         "order breaks ties at the threshold); tiesmerge computes in float32 and keeps every entry "
                         f"equal to the threshold. Of the two, bf16 arithmetic alone changes {bf:,} entries there and "
                         f"the exact-k tie breaking alone {tie:,}: the differences come from mergekit's bf16 rounding "
                         "(of the task vectors too, which moves entries across the top-k threshold and can flip an "
                         "election), not from a different algorithm.")
    for key, twin in runs.items():
        if not key.startswith("ties_global@") or not twin.get("ok") or not g.get("ok"):
            continue
        env = " ".join(f"{k}={v}" for k, v in twin.get("env", {}).items())
        vs_mk = ""
        if rt.get(f"mergekit_over_{key}_time"):
            vs_mk = (f", {rt[f'mergekit_over_{key}_time']:.2f}× faster than mergekit at "
                     f"{1 / rt[f'mergekit_over_{key}_rss']:.2f}× its peak RSS")
        same = {True: "; its output is byte-identical to the default's", False: "; its output DIFFERS from the "
                "default's"}.get(twin.get("same_output_as_default"), "")
        parts.append(f"With `{env}` global TIES takes {twin['wall_s']:.1f} s "
                     f"({rt[f'{key}_over_default_time']:.2f}× the default run){vs_mk}{same}.")
    gt = runs.get("ties_global_torch", {})
    if gt.get("ok") and g.get("ok"):
        parts.append(f"With its fused numba kernels switched off (TIESMERGE_KERNELS=0) the same global TIES takes "
                     f"{gt['wall_s']:.1f} s ({rt['torch_path_over_fused_global_time']:.2f}× the fused path).")
    for b in results.get("budget_runs") or []:
        if not b.get("ok"):
            continue
        floor_rss = runs.get("merge_floor_torch" if b.get("torch_path") else "merge_floor", {}).get("peak_rss_bytes")
        extra = (f" ({(b['peak_rss_bytes'] - floor_rss) / MiB:,.0f} MiB above the {floor_rss / MiB:,.0f} MiB peak of "
                 "the same merge on the tiny set)") if floor_rss else ""
        path = " on the torch path" if b.get("torch_path") else ""
        parts.append(f"Under `--memory-budget {b['budget']}`{path} the {b['params'] / 1e9:.2f} B-parameter merge "
                     f"({b['input_bytes'] / GB:.1f} GB of inputs) peaks at {b['peak_rss_bytes'] / MiB:,.0f} MiB RSS"
                     f"{extra}, {b['peak_rss_over_budget']:.2f}× the budget, in {b['wall_s']:.0f} s.")
    return " ".join(parts)


def profile_table(runs: dict[str, dict]) -> list[str]:
    """Where global TIES spends its time (the manifest's seconds, from its fastest, least disturbed run),
    for the default row and its --cpu-name / --numba-threads twins: what the kernels' code and
    threads can change, and what they cannot (start-up, sampling, reading and writing)."""
    rows = []
    for key, run in runs.items():
        if key.partition("@")[0] != "ties_global" or not run.get("ok"):
            continue
        reps = sorted((r for r in run["repeats"] if r.get("manifest_seconds")), key=lambda r: r["wall_s"])
        if not reps:
            continue
        rep = reps[0]
        sec = rep["manifest_seconds"]
        total = sec.get("total", 0.0)
        count, merge = sec.get("profile.count_kernel", 0.0), sec.get("profile.merge_kernel", 0.0)
        sample = sec.get("profile.sample", 0.0)
        rows.append(f"| {run['label']} | {rep['wall_s']:.2f} | {rep['wall_s'] - total:.2f} | {sample:.2f} | "
                    f"{count:.2f} | {merge:.2f} | {total - sample - count - merge:.2f} |")
    if not rows:
        return []
    return ["", "Where global TIES spends its time (seconds, from the manifest of each row's fastest run):", "",
            "| run | wall | outside the merge (start-up, exit) | sampling | counting kernel | merge kernel | "
            "rest of the merge (reading, writing, Python) |", "|---|---:|---:|---:|---:|---:|---:|", *rows]


def cpu_line(m: dict) -> str:
    """The CPU's cores and vector extensions, and the code numba generated for each variant."""
    cpu = m.get("cpu")
    if not cpu:  # a record from before the CPU was recorded
        return "CPU details not recorded."
    targets = "; ".join(f"{label}: {t['cpu_name']} ({', '.join(t['vector_features']) or 'no vector features'})"
                        for label, t in (m.get("numba_target") or {}).items() if t)
    return (f"CPU: {cpu['physical_cores'] or '?'} core(s), {cpu['threads_per_core'] or '?'} thread(s) per core; "
            f"vector extensions: {', '.join(cpu['vector_extensions']) or 'none listed'}. "
            f"numba's code generation target — {targets or 'not recorded'}.")


def write_report(results: dict, md_path: Path, json_path: Path) -> None:
    json_path.write_text(json.dumps(results, indent=2) + "\n")
    m = results["machine"]
    s = results["set"]
    lines = [
        "# Speed and memory: tiesmerge vs the read floor and mergekit",
        "",
        f"Written by `benchmarks/speed/run.py` on {m['date_utc']} (see `benchmarks/speed/README.md`). "
        f"Inputs: synthetic Llama checkpoints from `benchmarks/speed/make_models.py` — "
        f"**{s['size']}** ({s['params'] / 1e9:.3f} B parameters, bf16, {s['shards_per_model']} shards of "
        f"≤ {s['shard_size'] / 1e6:.0f} MB "
        f"per model), base + **{s['n']}** fine-tunes, {s['input_bytes'] / GB:.2f} GB of weights read per merge. "
        f"Page cache warmed before every run; {results['repeat']} repeat(s), median wall time, max peak RSS.",
        "",
        f"Machine: {m['cpu_model']}, {m['usable_cpus']} usable CPU(s), {m['ram_gib']} GiB RAM, {m['platform']}; "
        f"tiesmerge {m.get('tiesmerge_env', {}).get('tiesmerge', '?')} (commit {m['git_commit'][:10]}"
        f"{', src/ modified' if m['src_modified'] else ''}), torch {m.get('tiesmerge_env', {}).get('torch', '?')}"
        + (f"; mergekit {m['mergekit_env']['mergekit']} (torch {m['mergekit_env']['torch']}, "
           f"transformers {m['mergekit_env']['transformers']})" if m.get("mergekit_env") else "")
        + ".",
        "",
        cpu_line(m),
        "",
        "| run | wall s | peak RSS MiB | CPU % | input GB/s | × read floor | engine bytes read (passes) |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    floor = results["runs"].get("read_floor", {})
    for key, run in results["runs"].items():
        if not run.get("ok"):
            lines.append(f"| {run['label']} | failed | | | | | rc {[r['rc'] for r in run.get('repeats', [])]} |")
            continue
        vs_floor = run["wall_s"] / floor["wall_s"] if floor.get("wall_s") and key not in FLOORS else None
        eng = (f"{run['engine_bytes_read'] / GB:.2f} GB ({run.get('engine_passes')})"
               if run.get("engine_bytes_read") else "—")
        gbs = run.get("input_gb_per_s") if key == "read_floor" or key not in FLOORS else None
        lines.append(f"| {run['label']} | {run['wall_s']:.2f} | {run['peak_rss_bytes'] / MiB:,.0f} | "
                     f"{run['cpu_percent']:.0f} | {_fmt(gbs)} | {_fmt(vs_floor, '.1f')} | {eng} |")
    busy = [r.get("cpu_busy_before") for run in results["runs"].values() for r in run.get("repeats", [])]
    busy = [b for b in busy if b is not None]
    if busy:
        lines += ["", f"CPUs busy in the 2 s before each run (other processes): at most {100 * max(busy):.0f} %."]
    if results.get("mergekit_note"):
        lines += ["", f"mergekit: {results['mergekit_note']}"]
    lines += profile_table(results["runs"])
    rt = results["ratios"]
    lines += [
        "",
        "Ratios (wall time unless marked RSS):",
        "",
        "| ratio | value |",
        "|---|---:|",
    ]
    names = {
        "mergekit_over_tiesmerge_per_tensor_positive_time": "mergekit / tiesmerge per-tensor (mergekit semantics)",
        "mergekit_over_tiesmerge_per_tensor_time": "mergekit / tiesmerge per-tensor",
        "mergekit_over_tiesmerge_global_time": "mergekit / tiesmerge global",
        "mergekit_over_tiesmerge_per_tensor_positive_rss": "mergekit / tiesmerge per-tensor (mergekit semantics), RSS",
        "mergekit_over_tiesmerge_global_rss": "mergekit / tiesmerge global, RSS",
        "global_over_per_tensor_time": "tiesmerge global / per-tensor",
        "global_over_per_tensor_rss": "tiesmerge global / per-tensor, RSS",
        "torch_path_over_fused_global_time": "tiesmerge torch path / fused kernels, global",
        "torch_path_over_fused_per_tensor_time": "tiesmerge torch path / fused kernels, per tensor",
        "torch_path_over_fused_global_rss": "tiesmerge torch path / fused kernels, global, RSS",
    }
    for k, label in names.items():
        lines.append(f"| {label} | {_fmt(rt.get(k))} |")
    for k, v in rt.items():
        twin = next((key for key in results["runs"] if "@" in key and key in k), None)
        if twin is None:
            continue
        label = results["runs"][twin]["label"]
        what = {f"{twin}_over_default_time": f"{label} / the default run",
                f"mergekit_over_{twin}_time": f"mergekit / {label}",
                f"mergekit_over_{twin}_rss": f"mergekit / {label}, RSS"}.get(k)
        if what:
            lines.append(f"| {what} | {_fmt(v)} |")
    for k, v in rt.items():
        if k.endswith("_over_read_floor_time"):
            lines.append(f"| {results['runs'].get(k.removesuffix('_over_read_floor_time'), {}).get('label', k)}"
                         f" / read floor | {_fmt(v, '.1f')} |")
    budgets = results.get("budget_runs") or []
    if budgets:
        first = budgets[0]
        lines += ["", "## Memory budget", "",
                  f"tiesmerge global TIES on the **{first['size']}** set ({first['params'] / 1e9:.3f} B parameters, "
                  f"base + {first['n']} fine-tunes, {first['input_bytes'] / GB:.2f} GB of weights: "
                  f"{first['input_bytes'] / first['budget_bytes']:.0f}× a {first['budget']} budget; one model is "
                  f"{first['input_bytes'] / (first['n'] + 1) / first['budget_bytes']:.1f}× it).", "",
                  "| run | wall s | peak RSS MiB | budget MiB | RSS / budget | RSS − import floor MiB | "
                  "RSS − merge floor MiB | engine estimate MiB | input GB/s |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        idle = results["runs"].get("import_floor", {}).get("peak_rss_bytes")
        for b in budgets:
            floor_rss = results["runs"].get("merge_floor_torch" if b.get("torch_path") else "merge_floor",
                                            {}).get("peak_rss_bytes")
            if not b.get("ok"):
                lines.append(f"| {b['label']} | failed | | | | | | | |")
                continue
            est = b.get("engine_estimated_peak_bytes")
            lines.append(
                f"| {b['label']} | {b['wall_s']:.2f} | {b['peak_rss_bytes'] / MiB:,.0f} | "
                f"{b['budget_bytes'] / MiB:,.0f} | "
                f"{b['peak_rss_over_budget']:.2f} | "
                f"{_fmt((b['peak_rss_bytes'] - idle) / MiB if idle else None, ',.0f')} | "
                f"{_fmt((b['peak_rss_bytes'] - floor_rss) / MiB if floor_rss else None, ',.0f')} | "
                f"{_fmt(est / MiB if est else None, ',.0f')} | {_fmt(b.get('input_gb_per_s'))} |")
        lines += ["", "Import floor: peak RSS of `python -c 'import tiesmerge'`; merge floor: peak RSS of the same "
                      "merge on the tiny set, on the same path (interpreter, torch, numba and its compiled kernels, "
                      "thread pools). "
                      "Engine estimate: `engine.estimated_peak_bytes` from the output's tiesmerge.json."]
    cmp_ = results.get("comparison")
    lines += ["", "## tiesmerge per-tensor (`--zero-sign positive`) vs mergekit, tensor by tensor", ""]
    if cmp_ and "tensors_compared" in cmp_:
        lines += [
            f"Informative, not a gate. {cmp_['tensors_compared']} tensors compared: "
            f"{cmp_['tensors_identical']} bit-identical, {cmp_['tensors_beyond_1ulp']} with at least one entry more "
            f"than one bf16 ulp apart. Max |Δ| = {cmp_['max_abs_diff']:.3g} (tiesmerge's largest |merged − base| is "
            f"{cmp_['max_abs_merged_minus_base']:.3g}); entries that differ at all: "
            f"{100 * cmp_['fraction_differing']:.3f} %; beyond one ulp: {100 * cmp_['fraction_beyond_1ulp']:.4f} %; "
            f"merged − base of opposite signs: {cmp_.get('entries_opposite_sign', 0):,} entries.",
        ]
        if cmp_.get("worst_tensors"):
            lines += ["", "| tensor | entries | differ | beyond 1 ulp | opposite signs | max abs diff |",
                      "|---|---:|---:|---:|---:|---:|"]
            for t in cmp_["worst_tensors"]:
                lines.append(f"| {t['name']} | {t['numel']:,} | {t['entries_differing']:,} | "
                             f"{t['entries_beyond_1ulp']:,} | {t.get('entries_opposite_sign', 0):,} | "
                             f"{t['max_abs_diff']:.3g} |")
        if cmp_.get("attribution"):
            lines += ["", "Where the differences come from, on a few tensors: `_emulate` in run.py re-runs per-tensor "
                      "TIES in float32 keeping every entry tied at the threshold (tiesmerge's arithmetic) and in bf16 "
                      "keeping exactly k entries by argsort (mergekit 0.1.5's), then changes one thing at a time.", "",
                      "| tensor | tiesmerge = f32/keep-ties emulation | mergekit = bf16/exact-k emulation | "
                      "entries changed by bf16 arithmetic alone | by exact-k tie breaking alone | "
                      "differ in the outputs |",
                      "|---|---|---|---:|---:|---:|"]
            for t in cmp_["attribution"]:
                ours = "yes" if t["tiesmerge_equals_float32_keep_ties_emulation"] else "no"
                lines.append(f"| {t['name']} | {ours} | "
                             f"{'yes' if t['mergekit_equals_bf16_exact_k_emulation'] else 'no'} | "
                             f"{t['entries_changed_by_bf16_arithmetic_alone']:,} | "
                             f"{t['entries_changed_by_exact_k_tie_breaking_alone']:,} | "
                             f"{t['entries_differing_tiesmerge_vs_mergekit']:,} |")
    else:
        lines.append(f"not compared: {(cmp_ or {}).get('note', 'one of the two outputs is missing')}")
    if results.get("what_this_shows"):
        lines += ["", "## What this shows", "", results["what_this_shows"]]
    lines += ["", "## Commands", "",
              "The runner, then each measured command (each run as `/usr/bin/time -v -o RUN.time COMMAND`, "
              "after reading every input file once):", "", "```bash", results["invocation"]]
    for run in results["runs"].values():
        lines.append(run["command"])
    for b in budgets:
        if b.get("command"):
            lines.append(b["command"])
    lines += ["```"]
    if results.get("mergekit_yaml"):
        lines += ["", "mergekit config (`mergekit.yml`):", "", "```yaml", results["mergekit_yaml"].rstrip(), "```"]
    md_path.write_text("\n".join(lines) + "\n")


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", type=Path, default=make_models.DEFAULT_ROOT, help="models and outputs live here")
    p.add_argument("--size", choices=sorted(make_models.SIZES), default="small",
                   help="small (default), large; tiny is a smoke test")
    p.add_argument("--n", type=int, default=3, help="fine-tunes to merge (default 3)")
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--tiesmerge", type=Path, default=REPO / ".venv" / "bin" / "tiesmerge")
    p.add_argument("--mergekit-venv", type=Path, default=DEFAULT_MERGEKIT_VENV)
    p.add_argument("--skip-mergekit", action="store_true")
    p.add_argument("--only", nargs="+", metavar="KEY",
                   help="run only these: read_floor import_floor merge_floor ties_global ties_per_tensor "
                        "ties_per_tensor_positive task_arithmetic ties_global_torch ties_per_tensor_torch "
                        "mergekit_ties")
    p.add_argument("--no-budget-run", action="store_true", help="skip the memory-budget run")
    p.add_argument("--budget-size", choices=sorted(make_models.SIZES), default="large")
    p.add_argument("--budget-n", type=int, default=3)
    p.add_argument("--budget", nargs="+", default=["256MiB", "2GiB"],
                   help="memory budgets for the budget runs (default 256MiB 2GiB; 2GiB is tiesmerge's default)")
    p.add_argument("--no-torch-path", action="store_true",
                   help="skip the TIESMERGE_KERNELS=0 runs (tiesmerge's torch path instead of its fused kernels)")
    p.add_argument("--no-compare", action="store_true")
    p.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    p.add_argument("--name", default="speed", help="results file stem (default speed)")
    p.add_argument("--compare-only", action="store_true",
                   help="measure nothing: redo the output comparison on the outputs on disk, then the report")
    p.add_argument("--report-only", action="store_true",
                   help="measure nothing: rewrite the .md (and the derived fields of the .json) from the .json")
    p.add_argument("--wait-idle", type=float, default=600, metavar="SECONDS",
                   help="before each run, wait up to this long for the CPUs to be at most 10%% busy (default 600)")
    p.add_argument("--cpu-name", nargs="+", default=[], metavar="CPU",
                   help=f"also run the fused tiesmerge rows ({', '.join(CODEGEN_ROWS)}) with numba generating code "
                        "for CPU, e.g. haswell (AVX2 + FMA, no AVX-512): NUMBA_CPU_NAME=CPU NUMBA_CPU_FEATURES=, "
                        "each right after its default row")
    p.add_argument("--numba-threads", nargs="+", type=int, default=[], metavar="N",
                   help="also run those rows with NUMBA_NUM_THREADS=N (the kernels' threads)")
    args = p.parse_args(argv)
    WAIT_IDLE.update(max_busy=0.10, timeout=args.wait_idle)
    if args.report_only or args.compare_only:
        md_path, json_path = args.results / f"{args.name}.md", args.results / f"{args.name}.json"
        results = json.loads(json_path.read_text())
        if args.compare_only:
            a = Path(results["runs"]["ties_per_tensor_positive"]["output_dir"])
            b = Path(results["runs"]["mergekit_ties"]["output_dir"])
            results["comparison"] = compare_and_attribute(a, b, Path(results["set"]["base"]),
                                                          [Path(m) for m in results["set"]["models"]])
        results["ratios"] = ratios(results["runs"])
        results["what_this_shows"] = what_this_shows(results)
        write_report(results, md_path, json_path)
        log(f"rewrote {md_path} from {json_path}")
        return 0

    exe = Path(sys.executable)
    exe_text = os.path.relpath(exe, REPO) if exe.is_relative_to(REPO) else "python"
    invocation = shlex.join([exe_text, "benchmarks/speed/run.py", *(sys.argv[1:] if argv is None else argv)])
    work = args.root / "runs"
    work.mkdir(parents=True, exist_ok=True)
    outs = args.root / "out"
    outs.mkdir(parents=True, exist_ok=True)
    mk_bin = args.mergekit_venv / "bin" / "mergekit-yaml"
    mk_py = args.mergekit_venv / "bin" / "python"
    tm_py = args.tiesmerge.parent / "python"

    base, models = make_models.make_set(args.root, args.size, args.n, log=log)
    inputs = make_models.weight_files(base) + [f for m in models for f in make_models.weight_files(m)]
    shape = make_models.SIZES[args.size]
    results: dict = {
        "invocation": invocation,
        "repeat": args.repeat,
        "machine": machine_info(tm_py, mk_py if mk_py.exists() else None, args.root, args.cpu_name),
        "set": {"size": args.size, "n": args.n, "params": make_models.n_params(shape), "shape": vars(shape),
                "base": str(base), "models": [str(m) for m in models],
                "shards_per_model": len(make_models.weight_files(base)),
                "shard_size": make_models.DEFAULT_SHARD_SIZE,
                "input_files": len(inputs), "input_bytes": sum(f.stat().st_size for f in inputs)},
        "runs": {},
    }
    want = set(args.only) if args.only else None

    def enabled(key: str) -> bool:
        return want is None or key.partition("@")[0] in want

    # the runs, in order
    plan: list[tuple[str, str, list[str], Path | None, dict | None, bool]] = []
    plan.append(("read_floor", "read floor: cat inputs > /dev/null", ["cat", *map(str, inputs)], None, None, True))
    plan.append(("import_floor", "python -c 'import tiesmerge' (RSS floor)",
                 [str(tm_py), "-c", "import tiesmerge"], None, None, False))
    out = {k: outs / k for k in ("ties_global", "ties_per_tensor", "ties_per_tensor_positive", "task_arithmetic",
                                 "mergekit_ties", "budget", "merge_floor", "ties_global_torch",
                                 "ties_per_tensor_torch")}
    tm = args.tiesmerge
    # the fixed cost of a merge (interpreter, torch, numba and its cached kernels, threads): the same
    # command on the tiny set, whose weights are 1.8 MB
    tbase, tmodels = make_models.make_set(args.root, "tiny", args.n, log=log)
    tinputs = make_models.weight_files(tbase) + [f for m in tmodels for f in make_models.weight_files(m)]
    plan.append(("merge_floor", "tiesmerge TIES, global, on the tiny set (merge floor)",
                 tiesmerge_argv(tm, tbase, tmodels, out["merge_floor"], "--method", "ties", "--density", "0.2"),
                 out["merge_floor"], None, False))
    if not args.no_torch_path:
        plan.append(("merge_floor_torch", "the same, torch path (TIESMERGE_KERNELS=0)",
                     tiesmerge_argv(tm, tbase, tmodels, out["merge_floor"], "--method", "ties", "--density", "0.2"),
                     out["merge_floor"], TORCH_ENV, False))
    plan.append(("ties_global", "tiesmerge TIES, global (paper)",
                 tiesmerge_argv(tm, base, models, out["ties_global"], "--method", "ties", "--density", "0.2"),
                 out["ties_global"], None, False))
    plan.append(("ties_global_cold_digests", "tiesmerge TIES, global, inputs hashed again (TIESMERGE_DIGEST_CACHE=0)",
                 tiesmerge_argv(tm, base, models, out["ties_global"], "--method", "ties", "--density", "0.2"),
                 out["ties_global"], COLD_DIGEST_ENV, False))
    plan.append(("ties_per_tensor", "tiesmerge TIES, per tensor",
                 tiesmerge_argv(tm, base, models, out["ties_per_tensor"], "--method", "ties", "--density", "0.2",
                                "--scope", "per_tensor"), out["ties_per_tensor"], None, False))
    plan.append(("ties_per_tensor_positive", "tiesmerge TIES, per tensor, --zero-sign positive",
                 tiesmerge_argv(tm, base, models, out["ties_per_tensor_positive"], "--method", "ties", "--density",
                                "0.2", "--scope", "per_tensor", "--zero-sign", "positive"),
                 out["ties_per_tensor_positive"], None, False))
    plan.append(("task_arithmetic", "tiesmerge task arithmetic",
                 tiesmerge_argv(tm, base, models, out["task_arithmetic"], "--method", "task_arithmetic"),
                 out["task_arithmetic"], None, False))
    if not args.no_torch_path:
        plan.append(("ties_global_torch", "tiesmerge TIES, global, torch path (TIESMERGE_KERNELS=0)",
                     tiesmerge_argv(tm, base, models, out["ties_global_torch"], "--method", "ties", "--density", "0.2"),
                     out["ties_global_torch"], TORCH_ENV, False))
        plan.append(("ties_per_tensor_torch", "tiesmerge TIES, per tensor, torch path (TIESMERGE_KERNELS=0)",
                     tiesmerge_argv(tm, base, models, out["ties_per_tensor_torch"], "--method", "ties", "--density",
                                    "0.2", "--scope", "per_tensor"), out["ties_per_tensor_torch"], TORCH_ENV, False))
    yaml_text = mergekit_yaml(base, models)
    results["mergekit_yaml"] = yaml_text
    if args.skip_mergekit:
        results["mergekit_note"] = "skipped (--skip-mergekit)"
    elif not mk_bin.exists():
        results["mergekit_note"] = (f"not run: {mk_bin} does not exist (create it as benchmarks/speed/README.md says: "
                                    "pip install torch==2.13.0, then mergekit==0.1.5)")
    else:
        cfg = work / "mergekit.yml"
        cfg.write_text(yaml_text)
        command = [str(mk_bin), str(cfg), str(out["mergekit_ties"])]
        plan.append(("mergekit_ties", "mergekit ties (mergekit-yaml)", command, out["mergekit_ties"], MERGEKIT_ENV,
                     False))
    # the fused rows again under other code generation or thread counts, each right after its own
    variants = [(f"@{c}", f", numba code for {c}", codegen_env(c)) for c in args.cpu_name]
    variants += [(f"@{k}t", f", {k} numba thread(s)", {"NUMBA_NUM_THREADS": str(k)}) for k in args.numba_threads]
    for suffix, what, extra in variants:
        for row in [row for row in plan if row[0] in CODEGEN_ROWS]:
            key, label, cmd, o, _, is_floor = row
            twin_out = outs / (key + suffix)
            plan.insert(plan.index(row) + 1 + sum(r[0].startswith(key + "@") for r in plan),
                        (key + suffix, label + what, [str(twin_out) if c == str(o) else c for c in cmd],
                         twin_out, extra, is_floor))

    # warm-up, untimed: every command once on the tiny set, so numba's compile cache (tiesmerge's
    # fused kernels), Python's imports and the tools' files are warm before anything is timed
    warmups = {}
    for key, _label, cmd, o, env, is_floor in plan:
        if is_floor or not enabled(key) or o is None or key.startswith("merge_floor"):
            continue
        wcmd = [str(tbase) if c == str(base) else c for c in cmd]
        for m_real, m_tiny in zip(models, tmodels):
            wcmd = [str(m_tiny) if c == str(m_real) else c for c in wcmd]
        wcmd = [str(outs / "warmup") if c == str(o) else c for c in wcmd]
        if key == "mergekit_ties":
            wcfg = work / "mergekit-warmup.yml"
            wcfg.write_text(mergekit_yaml(tbase, tmodels))
            wcmd = [str(mk_bin), str(wcfg), str(outs / "warmup")]
        shutil.rmtree(outs / "warmup", ignore_errors=True)
        started = time.perf_counter()
        rc = subprocess.run(wcmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=dict(os.environ, **env) if env else None, check=False).returncode
        warmups[key] = {"rc": rc, "seconds": round(time.perf_counter() - started, 2)}
        log(f"warm-up {key}: {warmups[key]['seconds']} s (rc {rc})")
    # the real inputs' digests, remembered for the timed runs (one timed run hashes them again)
    digest_cmd = tiesmerge_argv(tm, base, models, outs / "warmup", "--method", "task_arithmetic")
    shutil.rmtree(outs / "warmup", ignore_errors=True)
    started = time.perf_counter()
    rc = subprocess.run(digest_cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False).returncode
    warmups["input_digests"] = {"rc": rc, "seconds": round(time.perf_counter() - started, 2)}
    log(f"warm-up input digests: {warmups['input_digests']['seconds']} s (rc {rc})")
    shutil.rmtree(outs / "warmup", ignore_errors=True)
    results["warmup"] = warmups

    # repeats interleaved: every run once per round, so a change in the machine's load hits all alike
    todo = [row for row in plan if enabled(row[0])]
    reps: dict[str, list[dict]] = {row[0]: [] for row in todo}
    for r in range(args.repeat):
        for key, label, cmd, o, env, is_floor in todo:
            run_inputs = tinputs if key.startswith("merge_floor") else inputs
            reps[key].append(run_rep(key, label, cmd, run_inputs, work, r, args.repeat, o, env, is_floor))
    for key, label, cmd, o, env, is_floor in todo:
        run_inputs = tinputs if key.startswith("merge_floor") else inputs
        results["runs"][key] = summarize(key, label, cmd, run_inputs, reps[key], env, is_floor)
        results["runs"][key]["output_dir"] = str(o) if o else None
        default = results["runs"].get(key.partition("@")[0], {})
        if "@" in key and default.get("ok") and results["runs"][key]["ok"]:
            results["runs"][key]["same_output_as_default"] = same_files(o, Path(default["output_dir"]))
    for key in reps:
        if "@" in key:
            shutil.rmtree(outs / key, ignore_errors=True)  # 0.5 GB each; compared above
    results["ratios"] = ratios(results["runs"])

    # output comparison: tiesmerge per-tensor with mergekit's zero-sign rule vs mergekit
    a, b = out["ties_per_tensor_positive"], out["mergekit_ties"]
    if args.no_compare:
        results["comparison"] = {"note": "skipped (--no-compare)"}
    elif results["runs"].get("ties_per_tensor_positive", {}).get("ok") and results["runs"].get(
            "mergekit_ties", {}).get("ok"):
        results["comparison"] = compare_and_attribute(a, b, base, models)
    else:
        results["comparison"] = {"note": "one of the two runs did not run or failed"}

    # memory-budget runs on the larger set: each budget with the fused kernels, the first also on the torch path
    if not args.no_budget_run:
        bbase, bmodels = make_models.make_set(args.root, args.budget_size, args.budget_n, log=log)
        binputs = make_models.weight_files(bbase) + [f for m in bmodels for f in make_models.weight_files(m)]
        variants = [(b, False) for b in args.budget]
        if not args.no_torch_path:
            variants.insert(1, (args.budget[0], True))
        results["budget_runs"] = []
        for budget, torch_path in variants:
            bargv = tiesmerge_argv(tm, bbase, bmodels, out["budget"], "--method", "ties", "--density", "0.2",
                                   "--memory-budget", budget)
            label = f"tiesmerge TIES, global, --memory-budget {budget}" + (", torch path" if torch_path else "")
            key = f"budget_{budget}" + ("_torch" if torch_path else "")
            br = run_one(key, label, bargv, binputs, work, 1, out["budget"], TORCH_ENV if torch_path else None)
            br.update({"budget": budget, "budget_bytes": parse_size(budget), "size": args.budget_size,
                       "n": args.budget_n, "params": make_models.n_params(make_models.SIZES[args.budget_size]),
                       "torch_path": torch_path})
            if br.get("ok"):
                br["peak_rss_over_budget"] = br["peak_rss_bytes"] / br["budget_bytes"]
            results["budget_runs"].append(br)
        shutil.rmtree(out["budget"], ignore_errors=True)  # 2 GB; nothing reads it

    args.results.mkdir(parents=True, exist_ok=True)
    md_path, json_path = args.results / f"{args.name}.md", args.results / f"{args.name}.json"
    results["what_this_shows"] = what_this_shows(results)
    write_report(results, md_path, json_path)
    log(f"wrote {md_path} and {json_path}")
    return 0 if all(r.get("ok") for r in results["runs"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
