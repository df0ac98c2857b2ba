"""Stop signals held back while code that must not be interrupted runs (imports, mostly).

A KeyboardInterrupt raised inside an import may never reach the command: numba's C extensions catch it
during their initialisation, print it and turn it into an ImportError, so a Ctrl-C became "numba is
absent", the merge ran on without it, and exited 0 (hostile pass 24, F7). Start-up imports of the engine
took ~0.4 s in which a stop signal escaped main's handling as a traceback (F8). Inside :func:`held`, the
command's stop handler (``tiesmerge.cli.main``) records the first stop signal instead of acting on it, and
it is sent again when the outermost :func:`held` ends, where it unwinds the command as usual. A second stop
signal while one is held acts at once: someone who presses Ctrl-C twice wants out, import or not.

Outside the command line (the library's callers keep their own handlers) nothing is held: only the
command's handler asks :func:`hold`.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator

__all__ = ["held", "hold", "forget"]

_depth = 0  # how many held() blocks are open (the handler only reads it: no lock a signal could wait on)
_pending: int | None = None  # the stop signal that arrived inside them


@contextlib.contextmanager
def held() -> Iterator[None]:
    """Hold the command's stop signals until the block ends, then deliver the first that arrived."""
    global _depth, _pending
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if _depth == 0 and _pending is not None:
            signum, _pending = _pending, None
            signal.raise_signal(signum)  # the handler runs now, outside whatever was being imported


def hold(signum: int) -> bool:
    """Called by the stop handler: True when ``signum`` is to wait for the end of :func:`held` (the first stop
    signal inside it); False when the handler should act now (outside it, or a second signal)."""
    global _pending
    if _depth == 0:
        return False
    if _pending is not None:  # the second: act now, and nothing is left to deliver when the block ends
        _pending = None
        return False
    _pending = int(signum)
    return True


def forget() -> None:
    """In a process forked inside :func:`held` (tiesmerge.cli.main holds a fork's hooks): nothing is held there, and
    a signal held for the parent is the parent's."""
    global _depth, _pending
    _depth, _pending = 0, None
