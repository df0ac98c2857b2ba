"""Deduplicate examples and cut fixed, seeded, stratified train/validation/test splits."""

from __future__ import annotations

import hashlib
import random
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .text import dedup_key
from .types import Example, LabeledText

__all__ = ["DedupStats", "dedup_examples", "scaled_sizes", "stratified_split", "task_rng"]


@dataclass(frozen=True)
class DedupStats:
    """What deduplication removed: repeats of a text, and texts seen under several labels."""

    given: int
    kept: int
    duplicates: int
    conflicting_texts: int


def dedup_examples(examples: Iterable[Example]) -> tuple[list[Example], DedupStats]:
    """Keep one copy of each text (case/whitespace-insensitive), first occurrence wins.

    A text seen with two different labels is dropped altogether: keeping either copy
    would put an example in the data whose label is a coin flip (e.g. the same quote in
    two fortune files, or an identical gloss in two lexicographer files).
    """
    first: dict[str, Example] = {}
    labels: dict[str, set[str]] = defaultdict(set)
    given = 0
    for text, label in examples:
        given += 1
        key = dedup_key(text)
        if not key:
            continue
        first.setdefault(key, (text, label))
        labels[key].add(label)
    conflicting = {k for k, ls in labels.items() if len(ls) > 1}
    kept = [ex for k, ex in first.items() if k not in conflicting]
    return kept, DedupStats(given, len(kept), given - len(first), len(conflicting))


def scaled_sizes(pool: int, sizes: Sequence[int]) -> tuple[int, ...]:
    """``sizes`` when the pool has enough examples, else scaled down proportionally.

    Rounding leftovers go to the first split (train) so the three sizes add up to the pool.
    """
    if any(s < 0 for s in sizes):
        raise ValueError(f"split sizes must be non-negative, got {tuple(sizes)}")
    total = sum(sizes)
    if pool >= total:
        return tuple(sizes)
    if total == 0:
        return tuple(0 for _ in sizes)
    scaled = [pool * s // total for s in sizes]
    scaled[0] += pool - sum(scaled)
    return tuple(scaled)


def task_rng(seed: int, task: str) -> random.Random:
    """A generator that depends only on (seed, task name), so tasks never share a stream.

    Derived through sha256 rather than ``hash()``, which is salted per process.
    """
    digest = hashlib.sha256(f"tiesmerge-bench:{seed}:{task}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def _apportion(total: int, counts: Sequence[int]) -> list[int]:
    # Largest-remainder apportionment of `total` over classes in proportion to `counts`.
    # Never exceeds a class's count because total <= sum(counts).
    pool = sum(counts)
    if pool == 0:
        return [0 for _ in counts]
    exact = [total * c / pool for c in counts]
    quota = [int(x) for x in exact]
    order = sorted(range(len(counts)), key=lambda i: (-(exact[i] - quota[i]), i))
    for i in order[: total - sum(quota)]:
        quota[i] += 1
    return quota


def stratified_split(
    examples: Sequence[LabeledText], sizes: Sequence[int], rng: random.Random
) -> tuple[tuple[LabeledText, ...], ...]:
    """Cut ``examples`` into len(sizes) disjoint splits with the pool's class proportions.

    Deterministic for a given rng state and example *set*: the pool is sorted first, so
    the order the parser produced does not matter. Each class is shuffled, its first
    ``quota`` items are spread evenly over [0, 1) and the merged order is cut into
    consecutive splits, so every split gets each class within one example of its
    proportional share. Splits are shuffled at the end so classes are interleaved.
    """
    pool = sorted(set(examples), key=lambda ex: (ex[1], ex[0]))
    sizes = scaled_sizes(len(pool), sizes)
    by_class: dict[int, list[LabeledText]] = defaultdict(list)
    for ex in pool:
        by_class[ex[1]].append(ex)
    labels = sorted(by_class)
    quotas = _apportion(sum(sizes), [len(by_class[label]) for label in labels])
    keyed: list[tuple[float, float, LabeledText]] = []
    for label, quota in zip(labels, quotas):
        items = by_class[label]
        rng.shuffle(items)
        keyed.extend(((i + 0.5) / quota, rng.random(), items[i]) for i in range(quota))
    keyed.sort(key=lambda k: (k[0], k[1]))
    ordered = [ex for _, _, ex in keyed]
    splits: list[tuple[LabeledText, ...]] = []
    start = 0
    for size in sizes:
        part = ordered[start : start + size]
        rng.shuffle(part)
        splits.append(tuple(part))
        start += size
    return tuple(splits)
