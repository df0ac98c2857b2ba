"""tiesmerge_bench.parse_fortune: fortune files split at %, overstrike removed."""

from __future__ import annotations

from tiesmerge_bench import fortune_examples, parse_fortune_file


def test_parse_fortune_file_separators_and_overstrike() -> None:
    text = "First   one\n\t-- Someone\n%\n%\n_\bu_\bn_\bd_\be_\br\n%\nLast\n"
    assert parse_fortune_file(text) == ["First one -- Someone", "under", "Last"]
    assert fortune_examples({"work": "a\n%\nb\n", "law": "c\n"}) == [("a", "work"), ("b", "work"), ("c", "law")]
