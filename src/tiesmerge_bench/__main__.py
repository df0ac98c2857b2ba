"""``python -m tiesmerge_bench``: fetch the benchmark sources and print per-task counts, or export a split
as the ``encoder-accuracy`` evaluator's JSON-lines file (``--export val.jsonl``)."""

from __future__ import annotations

import argparse
import json
import sys
import time

from tiesmerge.errors import TiesMergeError

from .fetch import default_cache_dir
from .suite import DEFAULT_SIZES, describe, fetch_sources, load_suite
from .tasks import TASK_NAMES


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tiesmerge_bench", description=__doc__)
    parser.add_argument("--tasks", nargs="+", choices=TASK_NAMES, help="tasks to load (default: all)")
    parser.add_argument("--cache-dir", help=f"download cache (default: {default_cache_dir()})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sizes", type=int, nargs=3, default=DEFAULT_SIZES, metavar=("TRAIN", "VAL", "TEST"))
    parser.add_argument("--fetch-only", action="store_true", help="only fetch/verify the sources")
    parser.add_argument("--json", action="store_true", help="print the counts as JSON")
    parser.add_argument("--export", metavar="FILE", help="write a split as JSON lines for "
                        "`tiesmerge tune/search --evaluator encoder-accuracy:FILE` (each task's classes, then "
                        "its examples)")
    parser.add_argument("--split", default="validation", choices=("train", "validation", "test"),
                        help="--export: the split (default validation)")
    parser.add_argument("--limit", type=int, help="--export: the first N examples of each task (default all)")
    args = parser.parse_args(argv)
    try:
        start = time.perf_counter()
        fetched = fetch_sources(args.tasks, cache_dir=args.cache_dir)
        fetch_s = time.perf_counter() - start
        for key, src in fetched.items():
            how = "cached" if src.reused else "fetched"
            print(f"{key}: {how} {src.archive.path} ({src.archive.size} bytes) in {src.seconds:.1f}s", file=sys.stderr)
        print(f"sources ready in {fetch_s:.1f}s", file=sys.stderr)
        if args.fetch_only:
            return 0
        start = time.perf_counter()
        suite = load_suite(args.tasks, cache_dir=args.cache_dir, seed=args.seed, sizes=args.sizes)
        print(f"tasks built in {time.perf_counter() - start:.1f}s", file=sys.stderr)
    except TiesMergeError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        if exc.hint:
            print(f"hint: {exc.hint}", file=sys.stderr)
        return exc.exit_code
    if args.export:
        lines = export_lines(suite, args.split, args.limit)
        try:
            with open(args.export, "x", encoding="utf-8") as out:  # never over an existing file
                out.writelines(json.dumps(line, ensure_ascii=False) + "\n" for line in lines)
        except OSError as exc:
            print(f"error: {args.export}: cannot write it ({exc.strerror or exc})", file=sys.stderr)
            print("hint: name a new file (an existing one is never replaced)", file=sys.stderr)
            return 1
        print(f"wrote {args.export}: {len(lines) - len(suite)} {args.split} examples of {len(suite)} tasks",
              file=sys.stderr)
        return 0
    if args.json:
        summary = {
            name: {
                "classes": list(task.classes),
                "pool": task.pool_size,
                "splits": {s: task.class_counts(s) for s in ("train", "validation", "test")},
                "sources": [{"path": f.path, "sha256": f.sha256, "size": f.size} for f in task.sources],
            }
            for name, task in suite.items()
        }
        print(json.dumps(summary, indent=2))
    else:
        describe(suite)
    return 0


def export_lines(suite: dict, split: str, limit: int | None = None) -> list[dict]:
    """The encoder-accuracy evaluator's lines: per task, its class descriptions, then its examples."""
    lines: list[dict] = []
    for name, task in suite.items():
        lines.append({"task": name, "classes": list(task.descriptions)})
        lines += [{"task": name, "text": text, "label": label} for text, label in getattr(task, split)[:limit]]
    return lines


if __name__ == "__main__":
    raise SystemExit(main())
