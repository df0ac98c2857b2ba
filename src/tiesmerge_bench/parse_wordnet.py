"""WordNet 3.0 ``data.noun`` / ``data.verb`` -> (gloss, lexicographer file name).

A data line is ``offset lex_filenum ss_type w_cnt word lex_id ... | gloss`` (wndb(5WN)).
``lex_filenum`` (two decimal digits) indexes the fixed list of lexicographer files
(lexnames(5WN)); the ``wordnet-base`` package ships the man page but not the
``lexnames`` file, so the table is written out here. Lines starting with spaces are
the license header.
"""

from __future__ import annotations

from .text import normalize_whitespace
from .types import DataSourceError, Example

__all__ = ["LEXNAMES", "parse_wordnet_data"]

LEXNAMES: dict[int, str] = {
    0: "adj.all", 1: "adj.pert", 2: "adv.all", 3: "noun.Tops", 4: "noun.act", 5: "noun.animal",
    6: "noun.artifact", 7: "noun.attribute", 8: "noun.body", 9: "noun.cognition",
    10: "noun.communication", 11: "noun.event", 12: "noun.feeling", 13: "noun.food",
    14: "noun.group", 15: "noun.location", 16: "noun.motive", 17: "noun.object",
    18: "noun.person", 19: "noun.phenomenon", 20: "noun.plant", 21: "noun.possession",
    22: "noun.process", 23: "noun.quantity", 24: "noun.relation", 25: "noun.shape",
    26: "noun.state", 27: "noun.substance", 28: "noun.time", 29: "verb.body",
    30: "verb.change", 31: "verb.cognition", 32: "verb.communication", 33: "verb.competition",
    34: "verb.consumption", 35: "verb.contact", 36: "verb.creation", 37: "verb.emotion",
    38: "verb.motion", 39: "verb.perception", 40: "verb.possession", 41: "verb.social",
    42: "verb.stative", 43: "verb.weather", 44: "adj.ppl",
}  # fmt: skip


def parse_wordnet_data(text: str, *, where: str = "data file") -> list[Example]:
    """Every synset's gloss with its lexicographer file name, in file order.

    Raises :class:`DataSourceError` naming the line when a data line is malformed, so a
    changed file format fails loudly instead of yielding wrong labels.
    """
    out: list[Example] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.startswith(" "):
            continue  # license header lines start with two spaces
        head, sep, gloss = line.partition(" | ")
        fields = head.split()
        if len(fields) < 2 or not fields[1].isdigit():
            raise DataSourceError(f"{where}:{lineno}: not a WordNet data line: {line[:60]!r}")
        lexname = LEXNAMES.get(int(fields[1]))
        if lexname is None:
            raise DataSourceError(f"{where}:{lineno}: unknown lex_filenum {fields[1]}")
        gloss = normalize_whitespace(gloss) if sep else ""
        if gloss:
            out.append((gloss, lexname))
    return out
