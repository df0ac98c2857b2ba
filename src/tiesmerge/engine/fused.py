"""The fused CPU kernels' front door: whether they can run, and how stored rows reach them.

:mod:`.kernels` imports numba and compiles (or loads from numba's cache) on import, 0.2 to 0.5 s
on the machines we measure; planning a merge (``--dry-run``) needs to know only whether they
would run. So the engine asks here, and the kernels are imported when a merge first calls one
(:func:`load`). If numba is installed but fails to import, the merge falls back to torch.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType

import numpy as np

from .. import stops

__all__ = ["RAW_VIEWS", "OUT_VIEWS", "available", "load", "torch_threads_kept"]

# how each stored dtype (by its safetensors code) reaches a kernel: a numpy view of the same bytes
# OpenMP's default wait policy keeps a pool's workers spinning for a while after each parallel region.
# Whole-tensor merges alternate numba's pool (the kernels) and torch's (the reductions) tensor by
# tensor, so each pool's spinning takes the cores the other needs: on 2 busy cores a SLERP recipe
# spent 9.7 s of CPU spinning and computing, 4.2 s with passive waits. libgomp reads this when it
# loads (with torch or numba's OpenMP layer), so it applies where neither is loaded yet and the
# user set nothing.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

RAW_VIEWS = {"BF16": np.dtype(np.uint16), "F16": np.dtype(np.int16), "F32": np.dtype(np.float32)}
OUT_VIEWS = {"BF16": np.dtype(np.uint16), "F32": np.dtype(np.float32)}  # others: float32, then a cast


@contextmanager
def torch_threads_kept() -> Iterator[None]:
    """Restore torch's thread count after the kernels ran. numba's OpenMP layer and torch share
    libgomp, and a parallel kernel can leave torch's count at numba's (every core) in the calling
    thread: a caller that had set torch to one thread (an evaluation beside other work) then runs
    on two spinning threads. Measured in the LLM benchmark: a 135M model's forward took 4x the CPU
    after a merge (20 s against 5 s) on a busy 2-core machine. Imports nothing."""
    from . import aten  # imports nothing heavy

    module = sys.modules.get("torch")
    before = module.get_num_threads() if module is not None else None
    aten.enter_scope(before)  # the count the merge's emulated sums split over, whatever the kernels do to it
    try:
        yield
    finally:
        pinned = aten.exit_scope()
        module = sys.modules.get("torch")  # imported during the merge (to check the emulation) perhaps
        want = before if before is not None else pinned
        if module is not None and want is not None and module.get_num_threads() != want:
            module.set_num_threads(want)


# Below this address-space limit (ulimit -v), the kernels and torch run on one thread: each thread reserves its stack
# and a malloc arena of addresses, and libgomp ends the whole process (exit 1, no exception) when it cannot start one,
# or numba's pool waits forever (hp45 c41, c48: a 3 x 128 MB merge under ulimit -v 500000). 2 GiB leaves torch (about
# 650 MiB of addresses) and a merge's buffers room; above it threads are started as usual.
TIGHT_ADDRESS_SPACE = 2 << 30


def address_space_limit() -> int | None:
    """errors.address_space_limit, here so a test can stand in a limit for the engine alone."""
    from ..errors import address_space_limit as limit

    return limit()


@contextmanager
def one_thread_when_tight() -> Iterator[None]:
    """The merge's kernels (numba's) and torch's intra-op work on one thread while the address-space limit is below
    TIGHT_ADDRESS_SPACE; the counts as they were afterwards."""
    limit = address_space_limit()
    if limit is None or limit >= TIGHT_ADDRESS_SPACE:
        yield
        return
    torch = sys.modules.get("torch")
    numba = sys.modules.get("numba")
    before = (torch.get_num_threads() if torch is not None else None,
              numba.get_num_threads() if numba is not None and hasattr(numba, "get_num_threads") else None)
    if torch is not None:
        torch.set_num_threads(1)
    if before[1] is not None:
        numba.set_num_threads(1)
    try:
        yield
    finally:
        if torch is not None and before[0] is not None:
            torch.set_num_threads(before[0])
        if before[1] is not None:
            numba.set_num_threads(before[1])


def available() -> bool:
    """True when numba is installed and TIESMERGE_KERNELS is not "0" (the switch lets a benchmark
    time the torch path on the same machine). Does not import numba."""
    if os.environ.get("TIESMERGE_KERNELS", "1") == "0":
        return False
    if os.environ.get("NUMBA_DISABLE_JIT", "0").strip() not in ("", "0"):  # numba's debugging switch: its kernels
        return False  # would run as Python (and fail on their intrinsics): the torch engine merges (hp29 F6)
    loaded = _loaded()
    return loaded.numba is not None if loaded is not None else importlib.util.find_spec("numba") is not None


def _loaded() -> ModuleType | None:
    import sys

    return sys.modules.get(f"{__package__}.kernels")


def load() -> ModuleType | None:
    """The kernels module, imported now if it was not; None where numba cannot be imported."""
    kernels = _loaded()
    if kernels is None:
        kernels = _import_kernels()
    if kernels.numba is None or not available():
        return None
    _check_threading_layer()
    return kernels


def _check_threading_layer() -> None:
    """numba's NUMBA_THREADING_LAYER (a user's environment may carry it): a layer numba cannot load (tbb not
    installed, a misspelt name) failed the first kernel as "unexpected ValueError" (hostile pass 29, F6)."""
    layer = os.environ.get("NUMBA_THREADING_LAYER")
    if layer is None:  # set but empty is no layer numba knows either (hp30 F3)
        return
    try:
        from numba.np.ufunc import parallel

        parallel._launch_threads()  # loads the layer now (once; later calls return at once)
    except (ValueError, ImportError, OSError) as exc:
        from ..errors import ConfigError

        reason = (str(exc).splitlines() or [""])[0][:200]  # numba's own message runs on with a HINT paragraph
        raise ConfigError(f"NUMBA_THREADING_LAYER={layer[:40]!r}: numba cannot load that threading layer ({reason})",
                          hint="unset NUMBA_THREADING_LAYER (numba picks one), or set it to omp or workqueue") from None


def _import_kernels() -> ModuleType:
    """Import the kernels (and numba, some hundred thousand objects) with the cyclic garbage collector paused, as
    the console script imports its own modules: its passes over the growing heap took a tenth of numba's import.
    Modules live as long as the process; the collector's state is restored after."""
    import gc

    paused = gc.isenabled()
    gc.disable()
    try:
        with stops.held():  # numba's C initialisation swallows a KeyboardInterrupt as an ImportError (pass 24, F7)
            from . import kernels
    finally:
        if paused:
            gc.enable()
    return kernels
