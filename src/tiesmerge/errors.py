"""Typed errors. Every message says what is wrong and, in ``hint``, what to do next.

The CLI prints ``error: <message>`` and ``hint: <hint>``; usage errors and errors in the files a user
writes (recipes, JSON-lines data: ``ConfigError``) exit with status 2, everything else with status 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = [
    "TiesMergeError",
    "ConfigError",
    "CheckpointError",
    "IncompatibleCheckpointsError",
    "InvalidTensorError",
    "OutputError",
    "EvaluatorError",
    "InternalError",
    "MethodError",
    "OutOfMemoryError",
    "TrainingError",
    "MergeWarning",
]


class TiesMergeError(Exception):
    """Base class of every error tiesmerge raises on purpose."""

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\nhint: {self.hint}"


# GGUF (llama.cpp's format) is read nowhere: said wherever such a file arrives (a model, its folder, the recipe)
GGUF_HINT = ("tiesmerge reads safetensors (PyTorch pickles with --allow-pickle), not GGUF: merge the safetensors "
             "model the GGUF file was made from, or convert it back (transformers: from_pretrained(folder, "
             "gguf_file=...), then save_pretrained), and convert the merge with llama.cpp's convert_hf_to_gguf.py")
MAX_LISTED = 50  # problems a ConfigError's message lists (a recipe naming 10,000 missing paths printed 10,004 lines)


class ConfigError(TiesMergeError, ValueError):
    """A method option, recipe or command-line value is invalid. Holds every problem found."""

    exit_code = 2

    def __init__(self, problems: str | list[str], *, hint: str | None = None) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        if len(self.problems) == 1:
            message = self.problems[0]
        else:  # every problem stays in .problems; the message lists the first MAX_LISTED (a terminal's worth)
            shown = self.problems[:MAX_LISTED]
            rest = len(self.problems) - len(shown)
            message = f"{len(self.problems)} problems:\n" + "\n".join(f"  - {p}" for p in shown) + more_problems(rest)
        super().__init__(message, hint=hint)


def more_problems(rest: int) -> str:
    """The line that ends a list of problems cut at MAX_LISTED (``rest`` left out), or nothing where none was."""
    return (f"\n  ... and {rest} more (fix these first and run again; in Python, the error's .problems holds "
            "every one)"  # (hp55 c89: a command-line user has no .problems)
            if rest > 0 else "")


def listed(items: Sequence[Any], limit: int = 8, sep: str = ", ") -> str:
    """The first ``limit`` of ``items`` (as given: format them first) joined, and "and N more" for the rest: a
    message line stays a line when a recipe lists thousands (hp41 C64: a 440,000-character warning)."""
    shown = sep.join(str(item) for item in items[:limit])
    return shown + (f"{sep}and {len(items) - limit:,} more" if len(items) > limit else "")


class CheckpointError(TiesMergeError):
    """A checkpoint cannot be found or read (missing path, corrupt header, truncated shard, pickle)."""


def input_problems(messages: Sequence[str], hint: str | None) -> CheckpointError:
    """Several inputs' problems (missing, damaged: none the user's writing) as one CheckpointError, listed as a
    ConfigError lists its problems, each in ``.problems``; its exit status is a damaged input's, not a usage error's."""
    shown = "\n".join("  - " + m.replace("\n", "\n    ") for m in messages[:MAX_LISTED])
    error = CheckpointError(f"{len(messages)} problems with the inputs:\n{shown}"
                            + more_problems(len(messages) - MAX_LISTED), hint=hint)
    error.problems = list(messages)  # type: ignore[attr-defined]  # each, as a ConfigError's
    return error


class IncompatibleCheckpointsError(TiesMergeError):
    """The inputs cannot be merged together (names, shapes or dtypes differ)."""


class InvalidTensorError(TiesMergeError):
    """A tensor's values are unusable (NaN or Inf)."""


class OutputError(TiesMergeError):
    """The output location cannot be written (exists, is a file, not writable)."""


class EvaluatorError(TiesMergeError):
    """A user's evaluator (``tune --evaluator``) raised or returned something that is not a score."""


class InternalError(TiesMergeError):
    """An error tiesmerge did not foresee, wrapped by the CLI so that it prints a message, not a traceback."""


class MethodError(TiesMergeError):
    """A merge method that is not tiesmerge's own (a plugin's, or a config class of the caller's) failed in its
    ``merge`` or returned something other than a merged chunk: the method's authors' to fix, not tiesmerge's bug."""


class OutOfMemoryError(TiesMergeError):
    """The process ran out of memory (an allocation, or a mapping of a file, the address-space limit refused).

    Not a bug and not a damaged input (hp40b C60: torch's allocator failure was reported as "a bug in
    tiesmerge", a refused mmap as "the file changed or was truncated"): the hint says what needs less memory.
    """


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` says that memory ran out: MemoryError, an OSError with ENOMEM (mmap under
    ``ulimit -v``), or torch's allocator failure, which is a RuntimeError ("DefaultCPUAllocator: can't
    allocate memory", "CUDA out of memory")."""
    import errno

    if isinstance(exc, MemoryError) or is_library_load(exc):
        return True
    if isinstance(exc, OSError):
        return exc.errno == errno.ENOMEM
    if isinstance(exc, RuntimeError):
        text = str(exc)[:2000]
        return ("can't allocate memory" in text or "DefaultCPUAllocator" in text
                or "out of memory" in text.lower()
                or "can't start new thread" in text)  # a thread's stack refused by ulimit -v (hp44 c10)
    return False


def memory_hint(budget: int | None = None) -> str:
    """What needs less memory, said the same way by every place that reports an OutOfMemoryError: a smaller budget
    than ``budget`` (bytes; the one in use, when known: hp44 c09's hint suggested the 512MiB just given), or more
    memory."""
    example = f"{max(budget // 2 >> 20, 1)}MiB" if budget else "512MiB"  # typed back as given: no space, no decimals
    return (f"give a smaller memory budget (--memory-budget, memory_budget= in Python; e.g. {example}), or run with "
            "more memory: raise the process's limit (ulimit -v) or free memory on this machine")


def library_out_of_memory(said: str = "", where: str = "", *, command_line: bool = False) -> OutOfMemoryError:
    """The one wording of memory running out while a library (torch, llvmlite) loads, from the API and the command
    line alike (``said``: the library's own words; ``where``: a file's "path: " prefix)."""
    return OutOfMemoryError(
        f"{where}ran out of memory while loading a library{f' ({said})' if said else ''}: the process's address-space "
        "limit is smaller than the libraries tiesmerge runs on (importing torch reserves about 650 MiB of addresses)",
        hint="raise the limit (ulimit -v 2000000 leaves room for a merge, or unlimited)"
             + ("; nothing was read or written" if command_line else ""))


def is_library_load(exc: BaseException) -> bool:
    """Whether ``exc`` is a shared library (torch's) that could not be mapped while it was imported: the process's
    address-space limit is smaller than the library itself, which no budget can help (hp44 c31)."""
    text = str(exc)[:2000]
    if isinstance(exc, ImportError) and ("failed to map segment" in text or "cannot allocate memory" in text.lower()):
        return True
    if isinstance(exc, MemoryError):  # inside an import (compiling a library's module under ulimit -v: hp46 c17c)
        tb = exc.__traceback__
        while tb is not None:
            if tb.tb_frame.f_code.co_filename.startswith("<frozen importlib"):
                return True
            tb = tb.tb_next
    # llvmlite (numba's compiler) says only "Could not find/load shared object file" (hp46 c17b): where the process
    # has an address-space limit, that is the limit, not a missing file
    return isinstance(exc, (ImportError, OSError)) and "shared object" in text and _address_space_limited()


def kernel_cache_error(exc: BaseException) -> OutputError | None:
    """``exc`` as numba's failure to write its cache of compiled kernels (the first run after an install compiles
    them and saves them beside the package, or in NUMBA_CACHE_DIR), where the disk or the file-size limit is full: an
    OSError raised inside numba names no file, and was said as standard output's or as the output's newest file
    (hp69b c04: "redirect standard output" with stdout at /dev/null); and any error raised in numba's caching module
    as its cache being damaged. None for any other error."""
    import errno
    import os

    tb = exc.__traceback__
    marker = f"{os.sep}numba{os.sep}"
    frames = []
    while tb is not None:
        frames.append(tb.tb_frame.f_code.co_filename)
        tb = tb.tb_next
    if not any(marker in f for f in frames):
        return None
    if not isinstance(exc, OSError) and any(f.endswith(f"{os.sep}caching.py") for f in frames if marker in f):
        # a cache file numba cannot read back (truncated, garbled: hp71b c24, an "unexpected UnpicklingError")
        return OutputError(f"numba's cache of the kernels it compiled is damaged ({type(exc).__name__}: "
                           f"{str(exc)[:120]})",
                           hint="remove the cache (the folder NUMBA_CACHE_DIR names, or the *.nbi and *.nbc files "
                                "in tiesmerge/engine/__pycache__), then run again: the kernels are compiled afresh")
    if not isinstance(exc, OSError) or exc.filename is not None or exc.errno not in (
            errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS, errno.EACCES):
        return None
    return OutputError(f"numba could not save its cache of the kernels it compiled ({exc.strerror or exc}): the disk, "
                       "or the file-size limit (ulimit -f), is full where it keeps them",
                       hint="free some space (or raise the file-size limit), or point NUMBA_CACHE_DIR at a folder "
                            "with room, then run again (nothing was written at the output)")


def address_space_limit() -> int | None:
    """The process's soft address-space limit (ulimit -v) in bytes, None where there is none."""
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    return None if soft == resource.RLIM_INFINITY or soft < 0 else int(soft)


def _address_space_limited() -> bool:
    return address_space_limit() is not None


class TrainingError(TiesMergeError):
    """Learning merge coefficients failed (``tiesmerge adapt``): a loss that is not finite."""


class MergeWarning(UserWarning):
    """The merge runs, but probably not as meant (e.g. a density that keeps no entry: the output is the base).

    The CLI prints ``warning: <message>``; the Python API issues it through :mod:`warnings`, so
    ``warnings.simplefilter("error", MergeWarning)`` turns it into an exception.
    """
