"""Torch's CPU numerics without ``import torch``: its thread count and its vector math, from its own library.

SLERP, NuSLERP and Model Stock take a few scalars per tensor from norms and sums and, for the two
SLERPs, the acos and sin of one of them (engine/whole.py). To merge bit for bit as their torch path
(and so as mergekit), each must be what torch computes: the reductions in ATen's order (the kernels
emulate it, split as torch's threads split a sum) and acos and sin from the library torch calls
(MKL's vector math in high-accuracy mode, on the x86 wheels). ``import torch`` costs 2.3 s of CPU
on the 2-core machine, more than such a merge of a 0.2 B-parameter model; this module loads only
the shared library that holds that code (``libtorch_cpu``, found beside torch's package without
importing it; 0.4 s) and calls two of its C functions through ctypes.

Whether that reproduces torch here is checked against torch itself (engine.whole.torch_order_ok):
once per machine, torch build and tiesmerge version, remembered (:func:`verdict`, with torch's
default thread count, so that Model Stock needs not even the library) in tiesmerge's cache folder
(``numerics.json``, beside the file digests). Where it is not confirmed, or no cache can be kept,
the caller imports torch and lets it compute, as before.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.util
import json
import os
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np

__all__ = ["library", "preload", "num_threads", "vector_math", "fingerprint", "verdict", "remember_verdict"]

# MKL's VML mode torch passes (aten/src/ATen/cpu/vml.h): VML_HA | VML_FTZDAZ_OFF | VML_ERRMODE_IGNORE
_VML_MODE = 0x2 | 0x140000 | 0x100
_CACHE_NAME = "numerics.json"
_LIBRARY = {"linux": "libtorch_cpu.so", "darwin": "libtorch_cpu.dylib"}
# the environment that changes what torch computes: its threads, its vector width, MKL's code path
_ENV_PREFIXES = ("OMP_", "MKL_", "ATEN_", "TORCH_", "KMP_", "GOMP_")


def _library_path() -> Path | None:
    """libtorch_cpu beside the installed torch package (found, not imported); None where torch or the
    file is missing, or on a platform whose library name is not known here."""
    name = _LIBRARY.get(sys.platform)
    if name is None:
        return None
    try:
        spec = importlib.util.find_spec("torch")
    except (ImportError, ValueError):
        return None
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "lib" / name
    return path if path.is_file() else None


_LOCK = threading.Lock()  # the merge's threads may ask at once
_LOADED: list[ctypes.CDLL | None] = []
_PRELOADING: list[threading.Thread] = []


def library() -> ctypes.CDLL | None:
    """torch's CPU library, loaded once (the one ``import torch`` loads: a later import reuses it); None where it
    cannot be loaded or lacks the functions used here."""
    if _PRELOADING:
        _PRELOADING[0].join()
    with _LOCK:
        if not _LOADED:
            _LOADED.append(_load())
        return _LOADED[0]


def preload() -> None:
    """Start loading :func:`library` on a background thread, for a merge that will ask for it: the loader's 0.3 s
    (relocations and the library's static initialisers) then runs beside the merge's preparation, which is
    Python on one core. A no-op once loaded or started."""
    with _LOCK:
        if _LOADED or _PRELOADING:
            return
        thread = threading.Thread(target=_preload, name="tiesmerge-aten-load", daemon=True)
        _PRELOADING.append(thread)
    thread.start()


def _preload() -> None:
    lib = _load()
    with _LOCK:
        if not _LOADED:
            _LOADED.append(lib)


def _open(path: str) -> ctypes.CDLL:
    """``ctypes.CDLL(path)`` (RTLD_NOW, RTLD_LOCAL, as ctypes opens it), with the interpreter's lock released
    while the loader runs: ctypes' own dlopen holds it, so a background load stalled every other thread."""
    try:
        dlopen = ctypes.CDLL(None).dlopen  # the C library's, called as any foreign function: without the lock
    except (OSError, AttributeError):
        return ctypes.CDLL(path)
    dlopen.restype, dlopen.argtypes = ctypes.c_void_p, [ctypes.c_char_p, ctypes.c_int]
    handle = dlopen(os.fsencode(path), os.RTLD_NOW | os.RTLD_LOCAL)
    if not handle:
        raise OSError(f"cannot load {path}")
    return ctypes.CDLL(path, handle=handle)


def _load() -> ctypes.CDLL | None:
    path = _library_path()
    if path is None:
        return None
    try:
        lib = _open(os.path.realpath(path))
        for name in ("vmsAcos", "vmsSin"):
            fn = getattr(lib, name)
            fn.restype = None
            fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_longlong]
        get = lib._ZN2at15get_num_threadsEv  # at::get_num_threads()
        get.restype, get.argtypes = ctypes.c_int, []
    except (OSError, AttributeError):
        return None
    return lib


_PINNED: list[int] = []  # torch's thread count as a merge found it (see pin_threads)
_DEPTH: list[int] = [0]  # merges under way in this process (torch_threads_kept scopes)


def enter_scope(count: int | None) -> None:
    """A merge starts (engine.fused.torch_threads_kept); ``count``: torch's thread count now, where it is imported."""
    _DEPTH[0] += 1
    if count is not None:
        pin_threads(count)


def exit_scope() -> int | None:
    """A merge ends: the count pinned during it (to restore torch's to) when the outermost one ends, else None."""
    _DEPTH[0] = max(0, _DEPTH[0] - 1)
    if _DEPTH[0]:
        return None
    pinned = _PINNED[0] if _PINNED else None
    _PINNED.clear()
    return pinned


def pin_threads(count: int) -> None:
    """Inside a merge, hold torch's thread count at the first value seen: numba's OpenMP kernels share libgomp with
    torch and can raise torch's count to theirs mid-merge, and sums split over another count than the caller's
    (the one torch itself would use, and the verdict was made at) differ in their last bits."""
    if _DEPTH[0] and not _PINNED:
        _PINNED.append(int(count))


def hold_torch_threads(count: int | None = None) -> None:
    """Set torch's thread count back to ``count`` (default: the one pinned for the merge under way) where a numba
    kernel moved it: called before torch reduces what must match its own sums at the caller's count."""
    count = count if count is not None else (_PINNED[0] if _PINNED else None)
    module = sys.modules.get("torch")
    if count is not None and module is not None and module.get_num_threads() != count:
        module.set_num_threads(count)


def num_threads() -> int | None:
    """torch's intra-op thread count, as ``torch.get_num_threads()`` says: the one pinned for the merge under way,
    else torch's own where it is imported, else the count remembered with the verdict for this machine, else asked
    of the library."""
    if _PINNED:
        return _PINNED[0]
    module = sys.modules.get("torch")
    if module is not None and hasattr(module, "get_num_threads"):
        return int(module.get_num_threads())
    known = verdict()
    if known is not None:
        return known[1]
    lib = library()
    return None if lib is None else int(lib._ZN2at15get_num_threadsEv())


def vector_math(name: str) -> Callable[[np.ndarray], np.ndarray]:
    """``"acos"`` or ``"sin"`` of a float32 array, by MKL's VML in the mode torch calls it (torch.acos,
    torch.sin on a contiguous float32 CPU tensor); by torch itself where :func:`library` cannot be loaded."""
    lib = library()
    if lib is None:  # confirmed once, but it cannot be loaded now: torch itself computes the same bits
        import torch

        op = getattr(torch, name)
        return lambda x: op(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))).numpy()
    fn = getattr(lib, {"acos": "vmsAcos", "sin": "vmsSin"}[name])

    def apply(x: np.ndarray) -> np.ndarray:
        src = np.ascontiguousarray(x, dtype=np.float32)
        out = np.empty_like(src)
        if src.size:
            fn(src.size, src.ctypes.data, out.ctypes.data, _VML_MODE)
        return out

    return apply


def _cpu() -> str:
    """The processor's model and feature flags (what picks MKL's and ATen's code paths)."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return ""
    first = text.split("\n\n", 1)[0]
    return "\n".join(line for line in first.splitlines()
                     if line.split(":", 1)[0].strip() in ("vendor_id", "model name", "flags", "cpu family", "model"))


def _sources() -> str:
    """A digest of the code that emulates torch (the kernels, the reductions, this module)."""
    here = Path(__file__).parent
    h = hashlib.sha256()
    for name in ("kernels.py", "whole.py", "aten.py"):
        try:
            h.update((here / name).read_bytes())
        except OSError:
            h.update(name.encode())
    return h.hexdigest()[:16]


def _online() -> str:
    try:
        return Path("/sys/devices/system/cpu/online").read_text().strip()
    except OSError:
        return ""


def fingerprint() -> str | None:
    """What a verdict holds for: the library file, the CPU (its model, flags and count: torch's default thread
    count is the number of its cores), the environment that changes torch's numerics, and this code. None
    where torch's library is not found."""
    path = _library_path()
    if path is None:
        return None
    st = os.stat(os.path.realpath(path))
    env = sorted((k, v) for k, v in os.environ.items() if k.startswith(_ENV_PREFIXES))
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 0
    key = json.dumps([os.path.realpath(path), st.st_size, st.st_mtime_ns, os.cpu_count(), affinity, _online(),
                      hashlib.sha256(_cpu().encode()).hexdigest()[:16], env, _sources()])
    return hashlib.sha256(key.encode()).hexdigest()


def _cache_file() -> Path | None:
    from ..io.card import cache_folder, caches_enabled

    if not caches_enabled():  # no cache files at all: checked in every run
        return None
    folder = cache_folder()
    return None if folder is None else folder / _CACHE_NAME


_KNOWN: list[tuple[bool, int]] = []  # the verdict once read (or made) in this process: every tensor asks for it


def verdict() -> tuple[bool, int] | None:
    """The remembered verdict for this fingerprint: (whether the emulation is torch's here, torch's default
    thread count), or None (never checked, or nowhere to remember)."""
    from ..io.card import load_cache

    if "torch" in sys.modules:  # torch's current thread count may not be its default: no remembered one applies
        return None
    if _KNOWN:
        return _KNOWN[0]
    cache, key = _cache_file(), fingerprint()
    if cache is None or key is None:
        return None
    known = load_cache(cache).get(key)
    # a thread count this machine cannot have (a damaged or planted file) would change how sums are split, and size
    # per-thread buffers: refused, checked against torch again. torch's default is at most the machine's CPUs (the
    # fingerprint holds their number)
    if (isinstance(known, list) and len(known) == 2 and isinstance(known[0], bool) and isinstance(known[1], int)
            and not isinstance(known[1], bool) and 1 <= known[1] <= _usable_cpus()):
        _KNOWN.append((known[0], known[1]))
        return _KNOWN[0]
    return None


def count_agrees(threads: int) -> bool:
    """Whether a remembered thread count is the one torch's library reports, where the library is loaded or being
    loaded (for an interp kernel's acos and sin: asking costs nothing more); True where it is not. A count that
    differs (a stale or planted cache) would split sums unlike torch: the verdict is then checked again."""
    if not (_LOADED or _PRELOADING):
        return True
    lib = library()
    return lib is None or int(lib._ZN2at15get_num_threadsEv()) == threads


def _usable_cpus() -> int:
    """The most threads torch can default to here: the machine's CPUs (OpenMP counts those the process may use)."""
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 0
    return max(1, affinity, os.cpu_count() or 1)


def remember_verdict(ok: bool, threads: int) -> None:
    """Remember the verdict of a check against torch, made at torch's default thread count ``threads`` (never
    inside an input or the output of a running merge)."""
    from ..io.card import remember

    cache, key = _cache_file(), fingerprint()
    if cache is not None and key is not None:
        remember(cache, key, [bool(ok), int(threads)])
