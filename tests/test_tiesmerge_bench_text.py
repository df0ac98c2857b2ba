"""tiesmerge_bench.text: passages from sentences and lines, sentence splitting."""

from __future__ import annotations

from tiesmerge_bench.text import dedup_key, group_units, split_sentences


def test_group_units_targets_and_drops_short_tail() -> None:
    units = ["one two three", "four five", "six seven eight nine", "ten"]
    assert group_units(units, target_words=5, min_words=2) == ["one two three four five", "six seven eight nine ten"]
    assert group_units(["a b c d e f", "g"], target_words=5, min_words=2) == ["a b c d e f"]


def test_group_units_cuts_run_on_units() -> None:
    long_unit = " ".join(f"w{i}" for i in range(25))
    passages = group_units([long_unit], target_words=10, min_words=3)
    assert [len(p.split()) for p in passages] == [10, 10, 5]


def test_split_sentences() -> None:
    text = 'We met.  Was it "good?" Yes!\nAnd then\nwe left.'
    assert split_sentences(text) == ["We met.", 'Was it "good?"', "Yes!", "And then we left."]


def test_dedup_key_ignores_case_and_whitespace() -> None:
    assert dedup_key("  Hello\n\tWORLD ") == dedup_key("hello world") == "hello world"
    assert dedup_key("hello  world!") != dedup_key("hello world")
