"""Names that differ only in Unicode normalization: a composed é (U+00E9) beside e + a combining accent (U+0301)
print alike, so a lookup that misses one of them must say so, with the code points, or the message names two
strings no reader can tell apart ("lacks 'café.w'" of an input that holds 'café.w'). macOS writes file names
decomposed; Python and most tools write them composed."""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable

__all__ = ["code_points", "normalization_twin", "first_twin", "apart", "non_ascii_note"]


def code_points(name: str) -> str:
    """The non-ASCII characters of ``name`` as code points (U+00E9), where two names print alike."""
    return " ".join(f"U+{ord(c):04X}" for c in name if ord(c) > 127) or "ASCII only"


def normalization_twin(name: str, names: Iterable[str]) -> str | None:
    """The first of ``names`` that is not ``name`` but equals it under NFC, or None (ASCII names have none)."""
    if name.isascii():
        return None
    want = unicodedata.normalize("NFC", name)
    return next((n for n in names if n != name and unicodedata.normalize("NFC", n) == want), None)


def first_twin(wanted: Iterable[str], held: Iterable[str]) -> tuple[str, str] | None:
    """(a name of ``wanted``, the name of ``held`` apart from it only in normalization) for the first such name, or
    None: ``held`` indexed once, so many wanted names cost one pass each."""
    wanted = [n for n in wanted if not n.isascii()]
    if not wanted:
        return None
    index = {unicodedata.normalize("NFC", n): n for n in held if not n.isascii()}
    for name in wanted:
        other = index.get(unicodedata.normalize("NFC", name))
        if other is not None and other != name:
            return name, other
    return None


def apart(missing: str, held: str) -> str:
    """The sentence saying two names differ only in normalization, code points included."""
    return (f"{missing!r} ({code_points(missing)}) and {held!r} ({code_points(held)}) differ only in Unicode "
            "normalization (a composed character beside a letter + a combining mark, as macOS writes names)")


def non_ascii_note(names: Iterable[str]) -> str:
    """'' where every name is ASCII; else a clause naming the first non-ASCII name's characters with their Unicode
    names: a Cyrillic 'о' (U+043E) in 'q_prоj' prints like the Latin 'o', so "'q_prоj' does not select q_proj"
    reads as nonsense without it."""
    name = next((n for n in names if not n.isascii()), None)
    if name is None:
        return ""
    chars = ", ".join(dict.fromkeys(f"U+{ord(c):04X} {unicodedata.name(c, 'unnamed')}" for c in name if ord(c) > 127))
    return f" ({name!r} holds {chars}, which may look like an ASCII letter but is not one)"
