"""Where numba keeps the compiled kernels (``@njit(cache=True)``), decided before numba is imported.

numba writes them beside their source, in the package's ``__pycache__``; where it cannot (a
system-wide or another user's install, a read-only image, Nix), it falls back to its user-wide
``~/.cache/numba``, outside anything tiesmerge promises to write. There tiesmerge puts them in
its own cache folder instead, beside the digest cache (``numba/`` in ``$TIESMERGE_CACHE_DIR``,
``$XDG_CACHE_HOME/tiesmerge`` or ``~/.cache/tiesmerge``), so they are kept across runs (a cold
compile takes ~9 s); without a usable home, or where that folder lies in an input or the output of
the merge running when the kernels are first imported, in a private temporary folder removed at
exit. A ``NUMBA_CACHE_DIR`` the user set is left as it is.

Also numba's process-wide set-up that costs time before the first kernel runs
(:func:`import_arraymath_without_scipy`).
"""

from __future__ import annotations

import os

__all__ = ["place", "import_arraymath_without_scipy"]

# importing this module places the cache (the engine's kernel modules import it before numba)


def place() -> None:
    """Set ``NUMBA_CACHE_DIR`` where numba's own choice would leave the promised folders (see above)."""
    if os.environ.get("NUMBA_CACHE_DIR"):
        return
    engine = os.path.dirname(os.path.abspath(__file__))
    pycache = os.path.join(engine, "__pycache__")
    if os.access(pycache if os.path.isdir(pycache) else engine, os.W_OK | os.X_OK):
        return  # numba writes beside the source, inside the package
    from ..io.card import cache_folder, kept_out
    from ..scratch import private_folder_for

    folder = cache_folder()
    # placed when the kernels are first imported, during a merge: a cache folder pointed into one of its
    # inputs or its output (TIESMERGE_CACHE_DIR=the output) gets nothing, as the digest cache does not
    if folder is None or kept_out(folder):
        private_folder_for("NUMBA_CACHE_DIR", "tiesmerge-numba-")
    else:
        os.environ["NUMBA_CACHE_DIR"] = str(folder / "numba")


def import_arraymath_without_scipy() -> None:
    """Import numba's ``numba.np.arraymath`` with scipy's BLAS hidden from it.

    numba imports that module when it loads the first compiled kernel of a process, and its import
    probes for BLAS by importing ``scipy.linalg.cython_blas``: all of scipy.linalg, ~1 s of CPU on the
    2-core machine where scipy is installed (a dependency of scikit-learn and sentence-transformers),
    before the first tensor of every merge. The probe's answer only picks the inner product of
    numba's ``np.correlate`` (a loop instead of BLAS); ``np.dot`` in numba code asks for scipy itself
    when it is compiled. The kernels here use neither."""
    import sys

    blas = "scipy.linalg.cython_blas"
    if "numba.np.arraymath" in sys.modules or blas in sys.modules:
        return
    sys.modules[blas] = None  # type: ignore[assignment]  # an import of it now raises ImportError
    try:
        import numba.np.arraymath  # noqa: F401
    finally:
        if sys.modules.get(blas, 0) is None:
            del sys.modules[blas]


place()
