"""Results tables: rows of per-task accuracies as Markdown and JSON, with normalized accuracy."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .suite_eval import SuiteResult

__all__ = ["ResultRow", "ResultsTable"]


@dataclass(frozen=True)
class ResultRow:
    name: str
    result: SuiteResult
    validation: bool = False  # hyperparameters chosen on validation data
    note: str = ""


@dataclass
class ResultsTable:
    """Accuracy rows over one task list; normalized against the ``reference`` row (fine-tuned)."""

    tasks: Sequence[str]
    reference: str = "fine-tuned"
    rows: list[ResultRow] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    def add(self, row: ResultRow) -> None:
        missing = [t for t in self.tasks if t not in row.result.accuracy]
        extra = [t for t in row.result.accuracy if t not in self.tasks]
        if missing or extra:  # a row's mean and normalized mean must be over exactly the table's tasks
            raise ValueError(f"row {row.name!r}: tasks differ from the table's (missing {missing}, extra {extra})")
        # a row is its name plus whether validation chose it: "TIES" appears once each way
        self.rows = [r for r in self.rows if (r.name, r.validation) != (row.name, row.validation)] + [row]

    def _reference(self) -> SuiteResult | None:
        return next((r.result for r in self.rows if r.name == self.reference), None)

    def to_dict(self) -> dict[str, Any]:
        ref = self._reference()
        rows = []
        for r in self.rows:
            entry = {"name": r.name, "validation": r.validation, "note": r.note,
                     "accuracy": {t: r.result.accuracy[t] for t in self.tasks}, "mean": r.result.mean}
            if ref is not None:
                entry["normalized"] = r.result.normalized(ref)
                entry["normalized_mean"] = r.result.normalized_mean(ref)
            rows.append(entry)
        return {"tasks": list(self.tasks), "reference": self.reference, "rows": rows, "meta": self.meta}

    def to_markdown(self) -> str:
        ref = self._reference()
        head = ["method", "val", *self.tasks, "mean", "norm. mean"]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in self.rows:
            cells = [r.name + (f" ({r.note})" if r.note else ""), "yes" if r.validation else "no"]
            cells += [f"{100 * r.result.accuracy[t]:.1f}" for t in self.tasks]
            cells.append(f"**{100 * r.result.mean:.1f}**")
            cells.append(f"{100 * r.result.normalized_mean(ref):.1f}" if ref is not None else "–")
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"

    def write(self, markdown: str | Path, json_path: str | Path, *, preamble: str = "", epilogue: str = "") -> None:
        Path(markdown).write_text(preamble + self.to_markdown() + epilogue)
        Path(json_path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ResultsTable:
        table = cls(tasks=list(data["tasks"]), reference=data.get("reference", "fine-tuned"),
                    meta=dict(data.get("meta", {})))
        for r in data["rows"]:
            table.add(ResultRow(r["name"], SuiteResult(dict(r["accuracy"])), r.get("validation", False),
                                r.get("note", "")))
        return table
