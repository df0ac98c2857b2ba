"""Where numba keeps the compiled kernels (``@njit(cache=True)``), decided before numba is imported.

numba writes them beside their source, in the package's ``__pycache__``; where it cannot (a
system-wide or another user's install, a read-only image, Nix), it falls back to its user-wide
``~/.cache/numba``, outside anything tiesmerge promises to write. There tiesmerge puts them in
its own cache folder instead, beside the digest cache (``numba/`` in ``$TIESMERGE_CACHE_DIR``,
``$XDG_CACHE_HOME/tiesmerge`` or ``~/.cache/tiesmerge``), so they are kept across runs (a cold
compile takes ~9 s); without a usable home, or where that folder lies in an input or the output of
the merge running when the kernels are first imported, in a private temporary folder removed at
exit. A ``NUMBA_CACHE_DIR`` the user set is left as it is.

Also numba's import with its settings from ``NUMBA_*`` variables only (:func:`import_numba`), and
numba's process-wide set-up that costs time before the first kernel runs
(:func:`import_arraymath_without_scipy`).
"""

from __future__ import annotations

import os
import re
import sys
import warnings

__all__ = ["place", "import_numba", "import_arraymath_without_scipy"]

# numba's own settings file, looked up in the working folder when numba is imported and at each compile
NUMBA_SETTINGS_FILE = ".numba_config.yaml"
# numba's warning for a NUMBA_* value it cannot parse: the variable, the value, then a whole traceback
_UNPARSED = re.compile(r"Environment variable '(\w+)' is defined but its associated value '(.*?)' could not be "
                       r"parsed\.", re.DOTALL)

# importing this module places the cache (the engine's kernel modules import it before numba)


def place() -> None:
    """Set ``NUMBA_CACHE_DIR`` where numba's own choice would leave the promised folders (see above)."""
    if os.environ.get("NUMBA_CACHE_DIR"):  # the user's, unless it lies in an input or the output (hp70b c33)
        from ..scratch import private_folder_for

        private_folder_for("NUMBA_CACHE_DIR", "tiesmerge-numba-")
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


_checked = False


def _kernel_folders(folder: str) -> list[str]:
    """Where numba keeps tiesmerge's kernels under ``folder``: the package's ``__pycache__`` itself, or a
    NUMBA_CACHE_DIR's ``engine_<hash>`` folders (numba names them after the source's folder): listed by name only,
    so a shared cache of 20,000 entries is no cost and hides nothing (hp74b c13: a scan capped there missed them)."""
    if os.path.basename(folder) == "__pycache__":
        return [folder]
    try:
        with os.scandir(folder) as entries:
            return [folder, *(e.path for e in entries if e.name.startswith("engine"))]
    except OSError:
        return []


def check_cache_files() -> None:
    """Refuse a cache entry of tiesmerge's kernels (``kernels.*.nbi``/``.nbc``, ``exactk.*``) that is no regular file:
    numba opens a FIFO there and waits on it for good (hp72b c08: the run hung), a folder there fails its write
    naming a temporary file that is gone (c07), and a link loop fails as a bare "Too many levels of symbolic links"
    (hp74b c12). Once per process, before numba reads its cache."""
    global _checked
    if _checked:
        return
    import errno
    import stat

    folder = os.environ.get("NUMBA_CACHE_DIR") or os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                               "__pycache__")
    for place in _kernel_folders(folder):
        try:
            with os.scandir(place) as entries:
                names = [e.name for e in entries]
        except OSError:
            continue
        for name in names:
            if not name.startswith(("kernels.", "exactk.")) or ".nb" not in name:
                continue
            path = os.path.join(place, name)
            try:
                mode = os.stat(path).st_mode  # a link followed, as numba follows it
            except OSError as exc:
                if exc.errno != errno.ELOOP:
                    continue  # a dangling link: numba's own write replaces it
                mode = None
            if mode is None or not stat.S_ISREG(mode):
                from ..errors import OutputError

                what = ("a link loop" if mode is None else "a folder" if stat.S_ISDIR(mode) else
                        "a FIFO" if stat.S_ISFIFO(mode) else "no regular file")
                raise OutputError(f"{path}: is {what}, in numba's cache of the kernels tiesmerge compiled, where "
                                  "numba keeps a file (it would wait on a FIFO for good, and fail to read or write "
                                  "the others)", hint=f"remove it (or the cache folder {folder}), then run again: "
                                                      "the kernels are compiled afresh")
    _checked = True  # only once the scan passed: a refused import is tried again, and checked again


def import_numba() -> None:
    """Import numba with its settings taken from the environment's ``NUMBA_*`` variables only.

    numba also reads ``.numba_config.yaml`` from the working folder, at import and again at each
    compile: run inside a downloaded model's folder, such a file could switch the JIT off (the kernels
    then fail as Python), ask for a threading layer that is not installed, or put numba's cache
    anywhere on disk (it wrote there), and a malformed one stopped the import with a YAML traceback.
    A folder's file must not change how a merge runs or where it writes, so numba is imported with
    ``yaml`` hidden from it (it then skips the file, and says so: here one warning naming the file)
    and told to look for no file afterwards. Its complaint about a ``NUMBA_*`` value it cannot
    parse (a warning carrying a whole traceback; numba then uses its default) becomes one line naming
    the variable. Raises ImportError where numba is not installed or fails to import."""
    check_cache_files()
    if "numba.core.config" in sys.modules:
        return
    absent = object()
    yaml = sys.modules.get("yaml", absent)
    sys.modules["yaml"] = None  # type: ignore[assignment]  # numba's `import yaml` raises ImportError now
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")  # recorded here, shown below through the caller's own filters
            try:
                from numba.core import config
            finally:
                if yaml is absent:
                    del sys.modules["yaml"]
                else:
                    sys.modules["yaml"] = yaml  # type: ignore[assignment]
    finally:
        _say_again(caught)
    config._config_fname = ""  # the compiler's reloads look for no file either (os.path.exists("") is False)


def _say_again(caught: list[warnings.WarningMessage]) -> None:
    """Show the warnings numba's import gave: its two about settings as tiesmerge's own lines, the rest as they were."""
    from ..errors import MergeWarning

    for shown in caught:
        text = str(shown.message)
        unparsed = _UNPARSED.match(text)
        if unparsed is not None:
            name, value = unparsed.groups()
            lines = [line.strip() for line in text.splitlines() if line.strip()]
            reason = lines[-1][:200] if len(lines) > 1 else "no reason given"
            warnings.warn(f"{name}={value[:40]!r} is not a value numba reads ({reason}): numba uses its default "
                          f"for it; unset {name} or give it a value numba accepts", MergeWarning, stacklevel=3)
        elif text.startswith("A Numba config file is found"):
            warnings.warn(f"{os.path.abspath(NUMBA_SETTINGS_FILE)} is not read: tiesmerge takes numba's settings "
                          "from NUMBA_* environment variables only (a file in the working folder, perhaps a "
                          "downloaded model's, must not change how a merge runs or where numba writes); set "
                          "the variables instead", MergeWarning, stacklevel=3)
        else:
            warnings.warn_explicit(shown.message, shown.category, shown.filename, shown.lineno, source=shown.source)


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
