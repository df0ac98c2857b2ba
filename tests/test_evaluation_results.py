"""Results tables (evaluation/results.py): markdown, the dict round trip, files."""

from __future__ import annotations

import json

import pytest

from tiesmerge.evaluation.results import ResultRow, ResultsTable
from tiesmerge.evaluation.suite_eval import SuiteResult

TASKS = ("a", "b")


def _table() -> ResultsTable:
    table = ResultsTable(tasks=TASKS, meta={"seed": 0})
    table.add(ResultRow("fine-tuned", SuiteResult({"a": 0.9, "b": 0.8})))
    table.add(ResultRow("ties", SuiteResult({"a": 0.81234, "b": 0.6}), validation=True, note="k=0.2"))
    table.add(ResultRow("average", SuiteResult({"a": 0.45, "b": 0.4})))
    return table


def test_results_markdown():
    md = _table().to_markdown()
    lines = md.rstrip("\n").split("\n")
    assert md.endswith("\n")
    assert len(lines) == 2 + 3
    assert lines[0] == "| method | val | a | b | mean | norm. mean |"
    assert lines[1].count("---") == 6
    assert lines[2] == "| fine-tuned | no | 90.0 | 80.0 | **85.0** | 100.0 |"
    # mean (0.81234 + 0.6) / 2 = 70.617 %; normalized (0.81234/0.9 + 0.6/0.8) / 2 = 82.63 %
    assert lines[3] == "| ties (k=0.2) | yes | 81.2 | 60.0 | **70.6** | 82.6 |"
    # normalized (0.5 + 0.5) / 2
    assert lines[4] == "| average | no | 45.0 | 40.0 | **42.5** | 50.0 |"


def test_results_markdown_without_reference():
    table = ResultsTable(tasks=TASKS)
    table.add(ResultRow("ties", SuiteResult({"a": 0.5, "b": 0.25})))
    assert table.to_markdown().splitlines()[2] == "| ties | no | 50.0 | 25.0 | **37.5** | – |"
    assert "normalized" not in table.to_dict()["rows"][0]


def test_results_add_replaces_same_name_and_rejects_missing_task():
    table = _table()
    table.add(ResultRow("ties", SuiteResult({"a": 0.1, "b": 0.2}), validation=True))
    assert [r.name for r in table.rows] == ["fine-tuned", "average", "ties"]
    assert table.rows[-1].result.accuracy == {"a": 0.1, "b": 0.2}
    # the same method without validation is another row (Table 1 has both)
    table.add(ResultRow("ties", SuiteResult({"a": 0.3, "b": 0.4})))
    assert [(r.name, r.validation) for r in table.rows][-2:] == [("ties", True), ("ties", False)]
    with pytest.raises(ValueError, match="missing"):
        table.add(ResultRow("broken", SuiteResult({"a": 0.5})))
    with pytest.raises(ValueError, match="extra"):
        table.add(ResultRow("broken", SuiteResult({"a": 0.5, "b": 0.5, "c": 0.5})))
    assert "broken" not in [r.name for r in table.rows]


def test_results_dict_round_trip():
    table = _table()
    data = table.to_dict()
    assert data["tasks"] == ["a", "b"] and data["reference"] == "fine-tuned" and data["meta"] == {"seed": 0}
    ties = data["rows"][1]
    assert ties["validation"] is True and ties["note"] == "k=0.2"
    assert ties["mean"] == pytest.approx(0.70617)
    assert ties["normalized"] == pytest.approx({"a": 0.81234 / 0.9, "b": 0.75})
    assert ties["normalized_mean"] == pytest.approx((0.81234 / 0.9 + 0.75) / 2)
    back = ResultsTable.from_dict(json.loads(json.dumps(data)))
    assert back.to_dict() == data
    assert back.to_markdown() == table.to_markdown()


def test_results_write(tmp_path):
    table = _table()
    md, js = tmp_path / "results.md", tmp_path / "results.json"
    table.write(md, js, preamble="# Results\n\n", epilogue="\nend\n")
    assert md.read_text() == "# Results\n\n" + table.to_markdown() + "\nend\n"
    assert json.loads(js.read_text()) == table.to_dict()
    assert ResultsTable.from_dict(json.loads(js.read_text())).to_markdown() == table.to_markdown()
