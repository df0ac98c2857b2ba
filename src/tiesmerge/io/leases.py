"""Read leases on the weights files being read: another process that opens one for writing, or truncates it, waits
until tiesmerge lets go, and the merge stops with an error instead of reading a file that changes under it.

The engine reads weights through file mappings (the kernels read the page cache in place). A file truncated while
mapped makes the next read of a lost page a SIGBUS, which kills the process before any cleanup (pass 14 of issue 13:
a download restarted over a model being merged). With a read lease (``fcntl(F_SETLEASE, F_RDLCK)``, Linux), the
kernel holds such an opener back (for at most ``/proc/sys/fs/lease-break-time``, 45 s by default, or fails it at
once where it opened without blocking) and signals the holder (SIGIO); :func:`check`, called between chunks, then
raises, the output is removed, and the files are closed, which lets the other process go on.

A lease needs the file to be the caller's own (or CAP_LEASE), a file system that grants leases, and a SIGIO that
reaches this module (the main thread, where handlers are set, and no other handler of SIGIO). Where one cannot be
held, :func:`hold` says so and the caller reads that file with ``pread`` (a truncated file then reads short: a typed
error) instead of mapping it. A file another process holds open for writing at that moment (the kernel refuses the
lease: EAGAIN) is refused: a download that preallocates its file and fills it in place reads as zeros where it has
not written yet (pass 17 of issue 13).
"""

from __future__ import annotations

import errno
import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, TiesMergeError

__all__ = ["hold", "release", "refuse_writers", "check", "on_signal", "cooperating_handlers"]

_LOCK = threading.Lock()
_HELD: dict[int, Path] = {}  # fd -> the file whose lease it holds
_SIGNALLED = threading.Event()  # a SIGIO arrived while leases were held: which one broke is asked at check()
_BROKEN: dict[int, Path] = {}  # fd -> its file, whose lease broke (until the fd's reader lets go)
# SIGIO handlers of the caller that pass it on here (the command line's stop-signal handler): a lease is held
# under them too
cooperating_handlers: set[Callable[..., Any]] = set()

_F_SETLEASE = getattr(__import__("fcntl"), "F_SETLEASE", None) if sys.platform.startswith("linux") else None


def _on_sigio(signum: int, frame: Any) -> None:
    on_signal()


def on_signal() -> bool:
    """A SIGIO arrived: True when leases are held (it is taken as a lease break, looked into at :func:`check`), False
    when none is (the caller treats it as it otherwise would). Takes no lock: a handler runs on the main thread
    between two bytecodes, possibly while that thread holds _LOCK (in hold, release or check), and would wait for
    itself; reading a dict's size is atomic."""
    if not _HELD:
        return False
    _SIGNALLED.set()
    return True


def _handler_ready() -> bool:
    """Whether a lease break would reach :func:`on_signal`: SIGIO handled here or by a cooperating handler; where it
    is the default (terminate the process), this module's handler is set (on the main thread only)."""
    try:
        current = signal.getsignal(signal.SIGIO)
    except (ValueError, AttributeError):
        return False
    if current is _on_sigio or current in cooperating_handlers:
        return True
    if current is not signal.SIG_DFL or threading.current_thread() is not threading.main_thread():
        return False  # another program's handler, or no way to set one: a break would go unseen (or kill us)
    try:
        signal.signal(signal.SIGIO, _on_sigio)  # kept afterwards: a late break must never terminate the process
    except (ValueError, OSError):
        return False
    return True


def hold(fd: int, path: Path) -> bool:
    """Take a read lease on the open (read-only) file ``fd``: True when held, False where it cannot be (see the
    module's docstring; the file is then not to be mapped)."""
    if _F_SETLEASE is None or os.environ.get("TIESMERGE_LEASES", "1") == "0" or not _handler_ready():
        return False
    import fcntl

    try:
        fcntl.fcntl(fd, _F_SETLEASE, fcntl.F_RDLCK)
    except OSError as exc:  # not our file (EACCES), no leases here (EINVAL): read without one
        if exc.errno == errno.EAGAIN:  # open for writing by another process right now: a download or save under way
            raise CheckpointError(f"{path}: another process has this file open for writing (a download, copy or "
                                  "save still under way?), so what is read now may not be what it will hold",
                                  hint="wait until that process has finished with it, then run again") from None
        return False
    with _LOCK:
        _HELD[fd] = path
    return True


def refuse_writers(fd: int, path: Path, error: type[TiesMergeError] = CheckpointError) -> None:
    """Refuse the open file ``fd`` where another process holds it open for writing now (an export still appending
    rows, a download): the lease is taken and given back at once, only to ask. Where leases cannot be taken, nothing
    is said (as :func:`hold`)."""
    try:
        held = hold(fd, path)
    except CheckpointError as exc:
        raise error(exc.message, hint=exc.hint) from None
    if held:
        release(fd)


def release(fd: int) -> None:
    """Give up ``fd``'s lease (before it is closed: closing gives it up too)."""
    with _LOCK:
        _BROKEN.pop(fd, None)
        if _HELD.pop(fd, None) is None:
            return
    import fcntl

    try:
        fcntl.fcntl(fd, _F_SETLEASE, fcntl.F_UNLCK)
    except OSError:
        pass


def check() -> None:
    """Raise CheckpointError when another process opened a leased file for writing (or truncated it) since the
    leases were taken; cheap when no SIGIO arrived."""
    if _SIGNALLED.is_set():
        _SIGNALLED.clear()
        import fcntl

        with _LOCK:
            held = list(_HELD.items())
        for fd, path in held:  # a lease being broken reports the type it must be lowered to: none
            try:
                if fcntl.fcntl(fd, fcntl.F_GETLEASE) == fcntl.F_UNLCK:
                    with _LOCK:
                        _BROKEN.setdefault(fd, path)
            except OSError:
                continue
    with _LOCK:
        path = next(iter(_BROKEN.values()), None)
    if path is not None:
        raise CheckpointError(
            f"{path}: another process opened this file for writing (or truncated it) while tiesmerge read it, so "
            "the merge stopped and nothing was written; that process was held back (it waits until tiesmerge has "
            "let go, or failed at once if it would not wait)",
            hint="wait until the model is complete (a download, a copy or a save still running), then run again")
