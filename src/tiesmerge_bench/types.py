"""Value types shared by the data layer: examples, source files, task data."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from tiesmerge.errors import TiesMergeError

__all__ = ["Example", "LabeledText", "SourceFile", "TaskData", "DataSourceError"]

# A parsed example before labels are turned into indices: (text, label name).
Example = tuple[str, str]
# A split example: (text, index into TaskData.classes).
LabeledText = tuple[str, int]


class DataSourceError(TiesMergeError):
    """A benchmark source cannot be fetched, unpacked or parsed (the message names the file)."""


@dataclass(frozen=True)
class SourceFile:
    """One input the task was built from, pinned by content.

    ``path`` is relative to the cache directory. For a directory of many small files
    (the SpamAssassin messages, the SOTU speeches) it names the directory, ``sha256``
    is the hash of its sorted ``"<sha256>  <relative path>\\n"`` listing and ``size``
    the sum of the file sizes, so one entry still pins the whole input.
    """

    path: str
    sha256: str
    size: int


@dataclass(frozen=True)
class TaskData:
    """One classification task, split and ready for evaluation.

    ``descriptions[i]`` is a natural-language sentence for ``classes[i]``; embedding
    it gives a frozen zero-shot head. Labels in the splits index into ``classes``.
    """

    name: str
    classes: tuple[str, ...]
    descriptions: tuple[str, ...]
    train: tuple[LabeledText, ...]
    validation: tuple[LabeledText, ...]
    test: tuple[LabeledText, ...]
    sources: tuple[SourceFile, ...]
    # How many distinct, label-consistent texts the task had before sampling.
    pool_size: int = 0

    def __post_init__(self) -> None:
        if len(self.classes) != len(self.descriptions):
            raise ValueError(
                f"task {self.name!r}: {len(self.classes)} classes but {len(self.descriptions)} descriptions"
            )
        for split_name in ("train", "validation", "test"):
            for _, label in getattr(self, split_name):
                if not 0 <= label < len(self.classes):
                    raise ValueError(f"task {self.name!r}: {split_name} label {label} out of range")

    def split(self, name: str) -> tuple[LabeledText, ...]:
        """The split called ``name`` (``train``, ``validation`` or ``test``)."""
        if name not in ("train", "validation", "test"):
            raise KeyError(f"unknown split {name!r}; expected train, validation or test")
        split: tuple[LabeledText, ...] = getattr(self, name)
        return split

    def class_counts(self, split: str) -> dict[str, int]:
        """Examples per class name in one split, every class listed (zeros included)."""
        counts = Counter(label for _, label in self.split(split))
        return {c: counts.get(i, 0) for i, c in enumerate(self.classes)}
