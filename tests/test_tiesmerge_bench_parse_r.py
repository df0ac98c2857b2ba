"""tiesmerge_bench.parse_r: the R data frames and character vectors turned into examples."""

from __future__ import annotations

import pytest

from tiesmerge_bench import DataSourceError, austen_examples, austen_passages, foods_examples


def test_foods_examples_maps_scores() -> None:
    frame = {
        "product": ["p1", "p2", "p3", "p4"],
        "review": ["Loved   it", "meh", None, "ok"],
        "score": ["great", "other", "great", "Great "],
    }
    assert foods_examples(frame) == [("Loved it", "great"), ("meh", "other"), ("ok", "great")]
    with pytest.raises(DataSourceError, match="'review' and 'score'"):
        foods_examples({"text": ["x"]})


def test_austen_passages_skip_front_and_end_matter() -> None:
    body = [f"line {i} has exactly six words" for i in range(30)]  # 6 words a line
    lines = ["EMMA", "", "By Jane Austen", "", "VOLUME I", "", "CHAPTER I", *body[:15], "", "CHAPTER II", *body[15:]]
    lines += ["", "FINIS", "an editor's note that is not the novel " * 3]
    passages = austen_passages(lines, target_words=24, min_words=12)
    assert all("Jane" not in p and "CHAPTER" not in p and "FINIS" not in p and "editor" not in p for p in passages)
    # Each chapter has 15 lines = 90 words: 3 passages of 24 words, 18-word tail kept (>= 12).
    assert [len(p.split()) for p in passages] == [24, 24, 24, 18, 24, 24, 24, 18]
    assert austen_examples({"emma": lines}, target_words=24, min_words=12)[0] == (passages[0], "emma")
    assert austen_passages(["Call _me_ Ishmael."], target_words=3, min_words=1) == ["Call me Ishmael."]
