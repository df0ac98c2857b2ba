"""tiesmerge_bench.splits: deduplication and seeded, stratified, order-independent splits."""

from __future__ import annotations

from collections import Counter

import pytest

from tiesmerge_bench.splits import dedup_examples, scaled_sizes, stratified_split, task_rng


def test_dedup_examples_drops_repeats_and_conflicts() -> None:
    examples = [("Hello  World", "a"), ("hello world", "a"), ("same", "a"), ("SAME", "b"), ("x", "b"), ("", "a")]
    kept, stats = dedup_examples(examples)
    assert kept == [("Hello  World", "a"), ("x", "b")]
    assert (stats.given, stats.kept, stats.duplicates, stats.conflicting_texts) == (6, 2, 3, 1)


def test_scaled_sizes() -> None:
    assert scaled_sizes(5000, (2000, 500, 1000)) == (2000, 500, 1000)
    assert scaled_sizes(350, (2000, 500, 1000)) == (200, 50, 100)
    assert sum(scaled_sizes(101, (2000, 500, 1000))) == 101
    with pytest.raises(ValueError):
        scaled_sizes(10, (-1, 1, 1))


def _pool(n: int = 1000) -> list[tuple[str, int]]:
    # Imbalanced: class 0 gets 60%, 1 gets 30%, 2 gets 10%.
    return [(f"text {i}", 0 if i % 10 < 6 else 1 if i % 10 < 9 else 2) for i in range(n)]


def test_stratified_split_sizes_disjoint_proportional() -> None:
    train, val, test = stratified_split(_pool(), (500, 100, 200), task_rng(0, "t"))
    assert (len(train), len(val), len(test)) == (500, 100, 200)
    assert not (set(train) & set(val) or set(train) & set(test) or set(val) & set(test))
    for split, size in ((train, 500), (val, 100), (test, 200)):
        counts = Counter(label for _, label in split)
        for label, share in ((0, 0.6), (1, 0.3), (2, 0.1)):
            assert abs(counts[label] - share * size) <= 1.0


def test_stratified_split_deterministic_and_order_independent() -> None:
    pool = _pool()
    a = stratified_split(pool, (300, 50, 100), task_rng(7, "t"))
    b = stratified_split(list(reversed(pool)), (300, 50, 100), task_rng(7, "t"))
    c = stratified_split(pool, (300, 50, 100), task_rng(8, "t"))
    d = stratified_split(pool, (300, 50, 100), task_rng(7, "other"))
    assert a == b
    assert a != c and a != d


def test_stratified_split_small_pool_uses_everything() -> None:
    train, val, test = stratified_split(_pool(70), (2000, 500, 1000), task_rng(0, "t"))
    assert (len(train), len(val), len(test)) == (40, 10, 20)
