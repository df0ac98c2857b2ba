"""The search's JSONL log: a header line, then one line per scored candidate, appended as it is scored.

A search started again with the same log resumes: the strategy proposes the same candidates (same
seed, same scores told), and every candidate already in the log takes its score from there instead
of being merged and scored again. The header records what makes the scores comparable (the space,
strategy, seed and inputs); a log of another search is refused, not mixed in. The budget is not in
it: a search may be resumed with a larger budget to go on where it stopped.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from ..errors import ConfigError, OutputError

__all__ = ["ResultsLog", "FORMAT"]

FORMAT = "tiesmerge-search/1"


class ResultsLog:
    """Scored candidates by key (see :attr:`Candidate.key`), read from ``path`` and appended to it."""

    def __init__(self, path: str | os.PathLike, header: Mapping[str, Any]) -> None:
        self.path = Path(path)
        self.header = {"format": FORMAT, **header}
        self.records: dict[str, dict[str, Any]] = {}
        if os.path.lexists(self.path):  # a FIFO would block the read, a link would be written through
            mode = os.lstat(self.path).st_mode
            if not stat.S_ISREG(mode):
                raise OutputError(f"{self.path}: the search log is "
                                  f"{'a symbolic link' if stat.S_ISLNK(mode) else 'not a regular file'}",
                                  hint="remove it, or choose another --dir")
        if self.path.is_file() and self.path.stat().st_size:
            self._read()
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._write_line(self.header, mode="w")

    def _read(self) -> None:
        raw = self.path.read_bytes()
        if not raw.endswith(b"\n"):
            # the last line was cut by an interruption mid-write: drop it (its candidate is scored again)
            raw = raw[:raw.rfind(b"\n") + 1]
            with open(self.path, "r+b") as f:
                f.truncate(len(raw))
        lines = raw.decode().splitlines()
        try:
            found = json.loads(lines[0]) if lines else {}
        except json.JSONDecodeError:
            found = {}
        if found != json.loads(json.dumps(self.header)):
            different = sorted(k for k in {*found, *self.header} if found.get(k) != self.header.get(k))
            raise ConfigError(f"{self.path} is the log of another search (it differs in: {', '.join(different)})",
                              hint="pass another --log file, or delete this one to start afresh")
        for n, line in enumerate(lines[1:], start=2):
            try:
                record = json.loads(line)
                self.records[record["key"]] = record
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ConfigError(f"{self.path}:{n}: not a scored candidate: {line[:120]!r}",
                                  hint="the log is damaged; delete the line (its candidate is scored again)") from None

    def get(self, key: str) -> dict[str, Any] | None:
        return self.records.get(key)

    def append(self, record: Mapping[str, Any]) -> None:
        """Write one scored candidate and flush it to disk: a search killed later keeps its score."""
        self.records[record["key"]] = dict(record)
        self._write_line(record, mode="a")

    def _write_line(self, data: Mapping[str, Any], *, mode: str) -> None:
        with open(self.path, mode) as f:
            f.write(json.dumps(data, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.records.values())
