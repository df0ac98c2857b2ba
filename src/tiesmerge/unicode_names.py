"""Names that print alike but differ: a composed é (U+00E9) beside e + a combining accent (U+0301) (macOS writes file
names decomposed; Python and most tools composed), or a zero-width space, a space at an end, a Cyrillic 'о' beside a
Latin 'o'. A lookup that misses one of them must say so, with the code points, or the message names two strings no
reader can tell apart ("lacks 'café.w'" of an input that holds 'café.w')."""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable

__all__ = ["code_points", "normalization_twin", "first_twin", "apart", "non_ascii_note", "look_alike_twin"]


def code_points(name: str) -> str:
    """The characters of ``name`` a reader cannot see or tell apart, where two names print alike: its non-ASCII ones
    as code points (U+00E9), and spaces at either end."""
    odd = [f"U+{ord(c):04X}" for c in name if ord(c) > 127]
    odd += ["a space at an end"] if name != name.strip() else []
    return " ".join(odd) or "ASCII only"


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


# letters of other scripts that print like Latin ones in most fonts (a small table: the common Cyrillic and Greek
# look-alikes), for file names that a user typed with one and the disk holds with the other
_CONFUSABLE = str.maketrans({
    "\u0430": "a", "\u0435": "e", "\u043e": "o", "\u0440": "p", "\u0441": "c", "\u0443": "y", "\u0445": "x",
    "\u0456": "i", "\u0458": "j", "\u0455": "s", "\u04bb": "h", "\u0501": "d", "\u0410": "A", "\u0412": "B",
    "\u0415": "E", "\u041a": "K", "\u041c": "M", "\u041d": "H", "\u041e": "O", "\u0420": "P", "\u0421": "C",
    "\u0422": "T", "\u0425": "X", "\u0406": "I", "\u0408": "J", "\u0405": "S", "\u03bf": "o", "\u03b1": "a",
    "\u0391": "A", "\u0392": "B", "\u0395": "E", "\u0396": "Z", "\u0397": "H", "\u0399": "I", "\u039a": "K",
    "\u039c": "M", "\u039d": "N", "\u039f": "O", "\u03a1": "P", "\u03a4": "T", "\u03a5": "Y", "\u03a7": "X"})


def _skeleton(name: str) -> str:
    """What ``name`` looks like: compatibility-normalized (a no-break space is a space), invisible format characters
    (zero-width spaces and joiners, U+FEFF) dropped, look-alike letters as Latin, surrounding spaces stripped."""
    text = "".join(c for c in unicodedata.normalize("NFKC", name) if unicodedata.category(c) != "Cf")
    return text.translate(_CONFUSABLE).strip()


def look_alike_twin(name: str, names: Iterable[str]) -> str | None:
    """The first of ``names`` that is not ``name`` but prints like it: the other Unicode normalization, or apart only
    in invisible characters, spaces at either end, a no-break space or letters of another script that look Latin
    (hp77a c31, c32: -o 'out1' + U+200B beside out1 made a second 'out1'; --model 'm0' + U+200B was "no such file")."""
    want = _skeleton(name)
    if not want:
        return None
    return next((n for n in names if n != name and _skeleton(n) == want), None)

