"""fortune(6) cookie files -> entries, labelled by the file (topic) they come from.

A cookie file is plain text with entries separated by lines holding only ``%``. Some
entries use terminal overstriking (``_\\bx`` for underlined x, ``x\\bx`` for bold), which
is removed so the text reads normally.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from .text import normalize_whitespace
from .types import Example

__all__ = ["parse_fortune_file", "fortune_examples"]

_SEPARATOR = re.compile(r"^%\s*$", re.MULTILINE)
# "c\b" erases c: keep only the character after the backspace (the visible one).
_OVERSTRIKE = re.compile(r".\x08")


def parse_fortune_file(text: str) -> list[str]:
    """The non-empty entries of one cookie file, whitespace-collapsed."""
    text = _OVERSTRIKE.sub("", text)
    entries = (normalize_whitespace(chunk) for chunk in _SEPARATOR.split(text))
    return [e for e in entries if e]


def fortune_examples(files: Mapping[str, str]) -> list[Example]:
    """``{topic: file text}`` -> (entry, topic) for every entry of every file."""
    return [(entry, topic) for topic, text in files.items() for entry in parse_fortune_file(text)]
