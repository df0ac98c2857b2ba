"""Small text helpers: whitespace, truncation, sentence splitting, passage grouping."""

from __future__ import annotations

import re
from collections.abc import Iterable

__all__ = ["normalize_whitespace", "truncate_words", "split_sentences", "group_units", "dedup_key"]

_WS = re.compile(r"\s+")
# A sentence ends at . ! or ? (optionally followed by closing quotes/brackets) before
# whitespace. Good enough for speeches: a rare split after "Mr." only moves a passage
# boundary, it never loses text.
_SENTENCE_END = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\"')\]]))\s+")


def normalize_whitespace(text: str) -> str:
    """Collapse every run of whitespace (newlines, tabs) into one space and strip the ends."""
    return _WS.sub(" ", text).strip()


def truncate_words(text: str, max_words: int) -> str:
    """The first ``max_words`` whitespace-separated words of ``text`` (whitespace collapsed)."""
    words = text.split()
    return " ".join(words[:max_words])


def split_sentences(text: str) -> list[str]:
    """Split running prose into sentences; empty pieces are dropped."""
    return [s for s in (normalize_whitespace(p) for p in _SENTENCE_END.split(text)) if s]


def group_units(units: Iterable[str], *, target_words: int, min_words: int) -> list[str]:
    """Join consecutive units (sentences, lines) into passages of about ``target_words`` words.

    Units are added until a passage reaches ``target_words``; a unit longer than twice the
    target is first cut into ``target_words`` windows so one run-on sentence cannot make a
    passage several times too long. A trailing remainder shorter than ``min_words`` is
    dropped (too little text to classify).
    """
    if target_words <= 0 or min_words < 0:
        raise ValueError("target_words must be positive and min_words non-negative")
    passages: list[str] = []
    current: list[str] = []
    count = 0
    for unit in units:
        words = unit.split()
        if not words:
            continue
        pieces = (
            [words[i : i + target_words] for i in range(0, len(words), target_words)]
            if len(words) > 2 * target_words
            else [words]
        )
        for piece in pieces:
            current.extend(piece)
            count += len(piece)
            if count >= target_words:
                passages.append(" ".join(current))
                current, count = [], 0
    if count >= max(min_words, 1):
        passages.append(" ".join(current))
    return passages


def dedup_key(text: str) -> str:
    """Key under which two texts count as duplicates: case-folded, whitespace-collapsed."""
    return normalize_whitespace(text).casefold()
