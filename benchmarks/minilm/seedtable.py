"""Table 1 over several fine-tuning seeds: mean ± std per task, normalized by each seed's own models.

A row holds one accuracy dict per seed. Normalized accuracy is computed within a seed (a merge of
seed s's models divided by seed s's fine-tuned models), then averaged over seeds, so the spread
says how much the merge moves with the fine-tuning seed, not how much the references do.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REFERENCE = "fine-tuned"
GOAL_MEAN, GOAL_FLOOR = 0.95, 0.85  # issue 12: >= 95% normalized mean, no task below 85% of its own model


@dataclass
class SeedRow:
    name: str
    validation: bool = False
    note: str = ""
    per_seed: dict[int, dict[str, float]] = field(default_factory=dict)  # seed -> task -> accuracy
    flag: str = ""  # e.g. a grid edge the search could not leave


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


@dataclass
class SeedTable:
    tasks: list[str]
    rows: list[SeedRow] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    def row(self, name: str, validation: bool = False) -> SeedRow:
        for r in self.rows:
            if (r.name, r.validation) == (name, validation):
                return r
        self.rows.append(SeedRow(name, validation))
        return self.rows[-1]

    def reference(self) -> SeedRow:
        return next(r for r in self.rows if r.name == REFERENCE)

    def seeds(self, row: SeedRow) -> list[int]:
        """The seeds this row and the reference both have (a row's numbers use only those)."""
        return sorted(set(row.per_seed) & set(self.reference().per_seed))

    def normalized(self, row: SeedRow) -> dict[int, dict[str, float]]:
        ref = self.reference().per_seed
        return {s: {t: row.per_seed[s][t] / ref[s][t] for t in self.tasks} for s in self.seeds(row)}

    def summary(self, row: SeedRow) -> dict[str, Any]:
        seeds = self.seeds(row)
        norm = self.normalized(row)
        means = [statistics.fmean(row.per_seed[s][t] for t in self.tasks) for s in seeds]
        norm_means = [statistics.fmean(norm[s].values()) for s in seeds]
        per_task_norm = {t: statistics.fmean(norm[s][t] for s in seeds) for t in self.tasks}
        worst_per_seed = [min(norm[s].values()) for s in seeds]
        return {"seeds": seeds, "accuracy": {t: _mean_std([row.per_seed[s][t] for s in seeds]) for t in self.tasks},
                "mean": _mean_std(means), "normalized_mean": _mean_std(norm_means),
                "normalized_per_task": per_task_norm, "worst_task": min(per_task_norm, key=per_task_norm.get),
                "worst_normalized": min(per_task_norm.values()), "worst_normalized_any_seed": min(worst_per_seed),
                "goal": statistics.fmean(norm_means) >= GOAL_MEAN and min(per_task_norm.values()) >= GOAL_FLOOR}

    def to_markdown(self) -> str:
        head = ["method", "val", *self.tasks, "mean", "norm. mean", "worst task (norm.)"]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in self.rows:
            if not self.seeds(r):
                continue
            s = self.summary(r)
            name = r.name + (f" ({r.note})" if r.note else "") + (f" ⚠ {r.flag}" if r.flag else "")
            cells = [name, "yes" if r.validation else "no"]
            cells += [_pm(*s["accuracy"][t]) for t in self.tasks]
            cells += [f"**{_pm(*s['mean'])}**", _pm(*s["normalized_mean"]),
                      f"{s['worst_task']} {100 * s['worst_normalized']:.1f}"]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"

    def to_dict(self) -> dict[str, Any]:
        rows = []
        for r in self.rows:
            entry = {"name": r.name, "validation": r.validation, "note": r.note, "flag": r.flag,
                     "per_seed": {str(k): v for k, v in r.per_seed.items()}}
            if self.seeds(r):
                entry["summary"] = self.summary(r)
            rows.append(entry)
        return {"tasks": self.tasks, "reference": REFERENCE, "rows": rows, "meta": self.meta}

    def write(self, markdown: Path, json_path: Path, *, preamble: str = "", epilogue: str = "") -> None:
        markdown.write_text(preamble + self.to_markdown() + epilogue)
        json_path.write_text(json.dumps(self.to_dict(), indent=1, ensure_ascii=False) + "\n")


def _pm(mean: float, std: float) -> str:
    return f"{100 * mean:.1f} ± {100 * std:.1f}"
