"""tiesmerge_bench.tasks: the eight task specs and their builders on unpacked package trees."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers_bench import WN_FIXTURE
from tiesmerge_bench import TASK_NAMES, TASKS, DataSourceError
from tiesmerge_bench.tasks import get_task


def test_every_task_has_descriptions() -> None:
    assert list(TASKS) == ["foods", "spam", "sotu", "austen", "wn_noun", "wn_verb", "fortune", "opinion"]
    assert list(TASK_NAMES) == list(TASKS)
    for spec in TASKS.values():
        assert len(spec.classes) == len(spec.descriptions) >= 2
        assert all(d.endswith(".") and len(d) > 20 for d in spec.descriptions)


def test_wordnet_task_drops_noun_tops(tmp_path: Path) -> None:
    root = tmp_path / "usr/share/wordnet"
    root.mkdir(parents=True)
    (root / "data.noun").write_text(WN_FIXTURE)
    examples = TASKS["wn_noun"].build(tmp_path)
    assert [label for _, label in examples] == ["noun.animal"]
    assert "noun.Tops" not in TASKS["wn_noun"].classes and len(TASKS["wn_noun"].classes) == 25


def test_missing_input_file_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(DataSourceError, match=r"fortunes/computers: expected file missing") as info:
        TASKS["fortune"].build(tmp_path)
    assert "layout changed" in (info.value.hint or "")


def test_unknown_task_lists_the_known_ones() -> None:
    assert get_task("opinion") is TASKS["opinion"]
    with pytest.raises(KeyError, match="unknown task 'imdb'; known tasks: foods, spam"):
        get_task("imdb")
