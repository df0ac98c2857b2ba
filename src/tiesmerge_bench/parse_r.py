"""Turn the R data sets (already converted by rdata) into labelled examples.

Both functions take plain Python/pandas objects, so tests feed them dicts and lists
without any R file; reading the lazy-load DB is :mod:`.rlazyload`'s job.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from .text import group_units, normalize_whitespace
from .types import DataSourceError, Example

__all__ = ["foods_examples", "austen_examples", "austen_passages"]

# A chapter or volume heading ("CHAPTER I", "Chapter 12", "VOLUME II") splits the text
# into blocks: passages never straddle one, and the heading itself is not text.
_HEADING = re.compile(r"^\s*(chapter|volume)\s+([ivxlcdm]+|\d+|[a-z]+)\b[.:]?\s*$", re.IGNORECASE)
# End matter: the closing marker, and the editor's note appended to Northanger Abbey.
_END = re.compile(r"^\s*(the end|finis|a note on the text)\s*$", re.IGNORECASE)
# Gutenberg-style _italics_ markers carry no meaning for a classifier.
_ITALICS = re.compile(r"_([^_]+)_")


def _is_missing(value: Any) -> bool:
    # pandas gives NA/NaN for missing R strings; treat anything that is not text as missing.
    return not isinstance(value, str)


def foods_examples(frame: Mapping[str, Sequence[Any]] | Any, *, where: str = "small_fine_foods") -> list[Example]:
    """Fine-food reviews -> (review text, ``great``|``other``).

    ``frame`` has a ``review`` and a ``score`` column (a pandas DataFrame or a dict of
    lists). modeldata's ``score`` is ``great`` for a 5-star rating and ``other`` below;
    anything that is not ``great`` is mapped to ``other`` so a relabelled factor does
    not silently create a third class.
    """
    try:
        reviews, scores = frame["review"], frame["score"]
    except (KeyError, IndexError, TypeError) as exc:
        raise DataSourceError(
            f"{where}: expected 'review' and 'score' columns",
            hint="the modeldata package layout changed; check small_fine_foods' columns",
        ) from exc
    out: list[Example] = []
    for review, score in zip(list(reviews), list(scores)):
        if _is_missing(review) or _is_missing(score):
            continue
        text = normalize_whitespace(review)
        if text:
            out.append((text, "great" if str(score).strip().lower() == "great" else "other"))
    return out


def austen_passages(lines: Iterable[str], *, target_words: int = 60, min_words: int = 40) -> list[str]:
    """Cut one novel (its text lines) into passages of several consecutive lines.

    Front matter before the first chapter heading (title, "By Jane Austen") is skipped
    when the novel has headings, and everything from "THE END"/"FINIS" (or an editor's
    "A NOTE ON THE TEXT") on is dropped; blank lines are paragraph breaks only, so a passage
    may span paragraphs but never a chapter. Lines are ~10-13 words, so a 60-word target
    gives passages of about 60-75 words.
    """
    all_lines = [_ITALICS.sub(r"\1", line if isinstance(line, str) else "") for line in lines]
    starts = [i for i, line in enumerate(all_lines) if _HEADING.match(line)]
    body = all_lines[starts[0] :] if starts else all_lines
    passages: list[str] = []
    block: list[str] = []
    for line in body:
        if _END.match(line):
            break
        if _HEADING.match(line):
            passages.extend(group_units(block, target_words=target_words, min_words=min_words))
            block = []
        elif line.strip():
            block.append(line.strip())
    passages.extend(group_units(block, target_words=target_words, min_words=min_words))
    return passages


def austen_examples(
    novels: Mapping[str, Iterable[str]], *, target_words: int = 60, min_words: int = 40
) -> list[Example]:
    """``{label: lines}`` for each novel -> (passage, label) for every passage."""
    return [
        (passage, label)
        for label, lines in novels.items()
        for passage in austen_passages(lines, target_words=target_words, min_words=min_words)
    ]
