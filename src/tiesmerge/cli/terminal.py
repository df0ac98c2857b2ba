"""What the command line prints, made safe for a terminal: names from hostile inputs (a path, a tensor, a recipe
entry) may hold escape sequences that clear or recolour the screen, or newlines that forge a line of their own."""

from __future__ import annotations

import os
import re
from typing import Any, TextIO

from ..paths import undecodable_as_bytes

__all__ = ["SafeStream", "shown", "terminal_safe"]

# C0 controls but newline and tab, DEL, C1 controls, and the bidirectional overrides that reorder what is shown
_UNSAFE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069\ud800-\udfff]")


def _escaped(text: str) -> str:
    # a path's byte that is no UTF-8 (the surrogate '\udce9' Python reads for e9) as \xe9, as the README promises
    return _UNSAFE.sub(lambda m: f"\\x{ord(m.group()):02x}" if ord(m.group()) < 0x100
                       else undecodable_as_bytes(m.group()) if "\ud800" <= m.group() <= "\udfff"
                       else f"\\u{ord(m.group()):04x}", text)


def terminal_safe(text: str) -> str:
    """``text`` as it may reach a terminal: every control character shown as an escape (``\\x1b``), and every
    line after the first indented, so a newline in a name cannot forge an ``error:`` line of its own."""
    first, *rest = _escaped(text).split("\n")
    return "\n".join([first, *(line if line.startswith((" ", "\t")) or not line else "  " + line for line in rest)])


def shown(value: Any) -> str:
    """A name (path, tensor, option value) inside one printed line: control characters and newlines escaped."""
    return _escaped(str(value)).replace("\n", "\\n")


class SafeStream:
    """Standard output for a command's duration: whatever is printed has its control characters escaped (tables
    and newlines pass; an escape sequence inside a printed name does not reach the terminal)."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            self._stream.write(_escaped(text))
        except BrokenPipeError:
            self._to_nowhere()
        return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._to_nowhere()

    def _to_nowhere(self) -> None:
        """The reader of a pipe went away (`tiesmerge tune ... | head -1`): the command still finishes its work and
        writes its outputs; what it prints from now on goes nowhere (the pipe's end, where it has a descriptor, is
        replaced by /dev/null, so that what Python still buffers for it can be flushed)."""
        try:
            fd = self._stream.fileno()
        except (AttributeError, OSError, ValueError):
            fd = None
        if fd is not None:
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, fd)
            os.close(null)
            try:
                self._stream.flush()  # now into /dev/null
                return
            except OSError:
                pass
        self._stream = open(os.devnull, "w")  # noqa: SIM115 - for the rest of the command

    def __getattr__(self, name: str) -> Any:  # flush, fileno, isatty, encoding, buffer, ...
        return getattr(self._stream, name)


COMPLETED: list[str] = []  # outputs this command finished writing (an error printing afterwards must not hide them)


def completed(path: object) -> None:
    """Record an output the command has written completely, before its summary is printed."""
    COMPLETED.append(str(path))


_LONG = re.compile(r"\S{400,}")  # a path or value no one reads whole (PATH_MAX is 4096; a recipe may hold more)


def abridged(text: str) -> str:
    """``text`` with every run of 400 or more non-space characters cut in its middle, its length said: a 900,000
    character path named in an error was echoed whole (a 900 kB line)."""
    return _LONG.sub(lambda m: f"{m.group()[:160]}…[{len(m.group()):,} characters]…{m.group()[-120:]}", text)
