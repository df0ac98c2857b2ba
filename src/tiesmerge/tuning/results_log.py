"""The search's JSONL log: a header line, then one line per scored candidate, appended as it is scored.

A search started again with the same log resumes: the strategy proposes the same candidates (same
seed, same scores told), and every candidate already in the log takes its score from there instead
of being merged and scored again. The header records what makes the scores comparable (the space,
strategy, seed and inputs); a log of another search is refused, not mixed in. The budget is not in
it: a search may be resumed with a larger budget to go on where it stopped.
"""

from __future__ import annotations

import errno
import fcntl
import json
import math
import os
import stat
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from ..errors import ConfigError, MergeWarning, OutputError
from ..limits import loads_json

__all__ = ["ResultsLog", "FORMAT"]

FORMAT = "tiesmerge-search/1"


_NON_FINITE = ("nan", "inf", "-inf")  # a score the API keeps (NaN never wins), as the log writes it


def _same_score(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))

class ResultsLog:
    """Scored candidates by key (see :attr:`Candidate.key`), read from ``path`` and appended to it."""

    def __init__(self, path: str | os.PathLike, header: Mapping[str, Any]) -> None:
        from ..paths import check_walkable

        check_walkable(path, "the search log")  # a NUL byte or an unwalkable '..': typed, before anything
        text = os.fspath(path)
        if isinstance(text, str) and text.endswith(("/", os.sep)):  # Path() drops it: a folder meant, or a typo
            from ..errors import OutputError

            raise OutputError(f"{os.fspath(path)}: ends with '/', which names a folder, and the search log is a file",
                              hint="name the file itself (e.g. .../log.jsonl), or give the folder as --dir")
        self.path = Path(path)
        self.header = {"format": FORMAT, **header}
        self.records: dict[str, dict[str, Any]] = {}
        self._fd = -1
        self._lost = False  # removed while the search ran, and not written again
        self._made: list[Path] | None = None  # the folders made for a new log (innermost first), until a record is in
        # a new log (and its folder) is made and locked now, not with the first score: a second search on the same
        # --dir started meanwhile ran, and the first then lost its first evaluation to "the log of another search"
        # (hp84b c54). A search that ends before scoring anything removes it again (finish): no log.jsonl (nor
        # ./tiesmerge-search) is left behind
        if not os.path.lexists(self.path):
            from ..paths import check_creatable

            check_creatable(self.path, "the search log", "choose another --dir (log= in Python)")
        self._start()

    def _start(self) -> None:
        created = [p for p in (self.path.parent, *self.path.parent.parents) if not os.path.lexists(p)]  # innermost 1st
        existed = os.path.lexists(self.path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # changed since the check at the start (a file put where a folder goes)
            _remove_new(self.path, created)
            raise OutputError(f"{self.path}: cannot create the search log's folder ({exc.strerror or exc})",
                              hint="choose another --dir (log= in Python)") from None
        self._fd = self._open()
        try:  # one search writes a log at a time: two on one --dir scored every candidate twice, each logged twice
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # (hp34 D77); released when the log is closed
        except OSError as exc:
            self.close()
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise OutputError(f"{self.path}: cannot lock the search log ({exc.strerror or exc})",
                                  hint="choose another --dir (log= in Python) on a local file system") from None
            raise OutputError(f"{self.path}: another search is writing this log now (it holds its lock)",
                              hint="let that search finish (run this one again then: it resumes from the log), or "
                                   "choose another --dir (log= in Python)") from None
        try:
            if os.fstat(self._fd).st_size:
                self._read()
            else:
                try:
                    self._write_line(self.header)
                except BaseException:  # a log this call made, its header unwritten (a full disk): removed, with the
                    if not existed:  # folders made for it, so the same search run again starts afresh (hp57 c11: an
                        _remove_new(self.path, created)  # empty log.jsonl made --dir "not a search's")
                    raise
                self._made = None if existed else created  # (an empty file of the user's stays, header and all)
        except BaseException:  # a refused log (another search's, corrupt) is let go at once: in-process, the refused
            self.close()  # object stayed locked until collected, and the corrected call was "another search is
            raise  # writing this log now" (hp41 C38's neighbour, found by its test)

    def _open(self) -> int:
        """The log, opened once and checked through its descriptor (not its path, which another process
        could swap between a check and the open): never through a link (O_NOFOLLOW), never blocking on
        a FIFO (O_NONBLOCK until fstat says it is a regular file)."""
        flags = os.O_RDWR | os.O_CREAT | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
        try:
            fd = os.open(self.path, flags, 0o644)
        except OSError as exc:
            kind = "a symbolic link" if os.path.islink(self.path) else None
            if kind is None:
                raise OutputError(f"{self.path}: cannot open the search log ({exc.strerror or exc})",
                                  hint="choose another --dir (log= in Python)") from None
            raise OutputError(f"{self.path}: the search log is {kind}, which is never written through",
                              hint="remove it, or choose another --dir (log= in Python)") from None
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            os.close(fd)
            device = stat.S_ISCHR(mode) or stat.S_ISBLK(mode)  # /dev/null: "remove it" was the advice (hp87b c80)
            raise OutputError(f"{self.path}: the search log is not a regular file (a FIFO, device or folder)",
                              hint="the log is a file a later search resumes from: give a regular file's path "
                                   "(log=None keeps no log)" if device else
                                   "remove it, or choose another --dir (log= in Python)")
        os.set_blocking(fd, True)
        return fd

    def finish(self) -> None:
        """Close the log; one this search made and scored nothing into (it stopped first) is removed, with the
        folders made for it, as though it had never begun."""
        made, self._made = self._made, None
        if made is not None and self._fd >= 0 and \
                os.fstat(self._fd).st_size == len(_line(self.header)):  # the header alone, as written here
            try:  # while the lock is held: no other search can have begun writing it
                os.unlink(self.path)
                for folder in made:
                    os.rmdir(folder)  # only an empty one: a file of the search's (a report) or the user's stops it
            except OSError:
                pass
        self.close()

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self) -> None:  # the search closes it; an abandoned log must not leak its descriptor
        try:
            self.close()
        except (OSError, AttributeError):
            pass

    def _corrupt(self, line: int, why: str) -> ConfigError:
        return ConfigError(f"{self.path}:{line}: the search log is corrupt ({why})",
                           hint="delete the log to start the search afresh (its scores are lost), or choose another "
                                "--dir (log= in Python)" if line == 1 else
                                "delete that line (its candidate is scored again), then run the search again")

    def _read(self) -> None:
        size = os.fstat(self._fd).st_size
        raw = os.pread(self._fd, size, 0)
        # a last line cut by an interruption mid-write is dropped (its candidate is scored again), but only once the
        # header says the file is this search's log: a user's file given as log= lost its last line to the cut
        # before the "not a search log" refusal, and a one-line file was replaced whole (hp76b c95, c96, c97)
        complete = raw[:raw.rfind(b"\n") + 1]
        if not complete:
            if self._cut_header(raw):  # only this search's header, cut: start afresh
                os.ftruncate(self._fd, 0)
                self._write_line(self.header)
                return
            complete = raw + b"\n"  # one line, read (never written) to say what the file is
        torn = len(complete) < len(raw)
        # the first line alone says whose file this is, before the rest is decoded: a user's Latin-1 notes, a PNG or
        # an adapt checkpoint were "corrupt (not UTF-8 text)", with advice to delete a line, or the file (hp77b c38,
        # c39); a byte-order mark an editor saved first is no content: read past it (hp59b c45: "damaged")
        first = complete[:complete.find(b"\n")].decode("utf-8", errors="replace").removeprefix("\ufeff")
        try:
            found = json.loads(first)
        except (ValueError, RecursionError):  # nested past Python's limit, an int of 5,000 digits: damaged too
            # (hp54 c01, hp55 c04)
            found = None
        # ours, cut or edited: a JSON object naming the format (hp77b c05: a user's notes naming it were "damaged")
        json_like = first.lstrip(" \t\ufffd").startswith("{")  # (bytes before it undecodable: still ours)
        # (the whole line: keys are sorted, and a long base path puts "format" past 200 characters, hp78b c23)
        if (not isinstance(found, dict) or found.get("format") != FORMAT) and json_like and FORMAT in first:
            raise self._corrupt(1, f"its header is damaged: {first[:80]!r}")
        other = found.get("format") if isinstance(found, dict) else None
        if isinstance(other, str) and other != FORMAT and other.startswith(FORMAT.split("/")[0] + "/"):  # (hp56 c28)
            raise ConfigError(f"{self.path}: a search log of another format ({other[:40]!r}; this tiesmerge reads "
                              f"{FORMAT!r}): written by another tiesmerge version, so this one cannot resume it",
                              hint="resume it with the tiesmerge version that wrote it, or choose another --dir "
                                   "(log= in Python) to start afresh")
        if not isinstance(found, dict) or found.get("format") != FORMAT:  # never a log: someone's file, not ours
            raise ConfigError(f"{self.path}: not a search log (its first line is not the header of a {FORMAT} log: "
                              f"{first[:80]!r}); the search would append to it",
                              hint="choose another --dir (log= in Python): a search log is a file the search "
                                   "itself started")
        try:  # this search's header with a byte that is no UTF-8: damaged, not "the log of another search" whose
            # base path differs by a U+FFFD (hp79b c15)
            complete[:complete.find(b"\n")].decode("utf-8")
        except UnicodeDecodeError as exc:
            raise self._corrupt(1, f"its header is damaged: byte {exc.start} is not UTF-8 text") from None
        if found != json.loads(json.dumps(self.header)):
            mine = json.loads(json.dumps(self.header))
            different = sorted(k for k in {*found, *mine} if found.get(k) != mine.get(k))
            if "weights" in different and ({"base", "models"} & set(different)):  # other inputs (or their order):
                different.remove("weights")  # their files' stamps differ with them (hp48 c43: "files changed" too)
            raise ConfigError(f"{self.path} is the log of another search (it differs in: "
                              + "; ".join(_header_difference(k, found.get(k), mine.get(k), mine)
                                          for k in different) + ")",
                              hint="choose another --dir (log= in Python) for this search, or delete this log to "
                                   "start afresh")
        if torn:  # this search's log: its cut last line goes
            os.ftruncate(self._fd, len(complete))
        try:
            # lines end at "\n" only, as the log writes them: splitlines() also cut a line inside a text holding
            # U+2028 or U+0085 (jq writes them raw), and called the halves corrupt (hp57 c10)
            lines = complete.decode("utf-8").removeprefix("\ufeff").split("\n")[:-1]
        except UnicodeDecodeError as exc:
            raise self._corrupt(raw[:exc.start].count(b"\n") + 1, "not UTF-8 text") from None
        for n, line in enumerate(lines[1:], start=2):
            try:
                record = loads_json(line, str(self.path), error=ConfigError)
            except ConfigError as exc:  # bad syntax, nested past the reader's depth limit, a number past any range
                why = exc.message.removeprefix(f"{self.path}: ")  # the reader's own words (hp56 c01: a 400-digit
                raise self._corrupt(n, f"not a scored candidate: {why}: {line[:120]!r}") from None  # score, "not JSON")
            score = record.get("score") if isinstance(record, dict) else None
            written = score in _NON_FINITE  # the API keeps NaN and infinite scores: written as text, JSON has no NaN
            if written:
                score = record["score"] = float(score)
            if not (isinstance(record, dict) and isinstance(record.get("key"), str)
                    and isinstance(record.get("options"), dict) and isinstance(score, (int, float))
                    and not isinstance(score, bool) and (written or math.isfinite(score))):
                raise self._corrupt(n, f"not a scored candidate (a key, its options and a finite score): "
                                       f"{line[:120]!r}")
            self._check_key(n, record)
            seconds = record.get("seconds")  # reused with the score (hp53 c05: "abc" was "a bug in tiesmerge")
            if not (isinstance(seconds, (int, float)) and not isinstance(seconds, bool) and math.isfinite(seconds)
                    and seconds >= 0):
                raise self._corrupt(n, f"its seconds are {json.dumps(seconds)[:40]}, not a time in seconds")
            twin = self.records.get(record["key"])
            if twin is not None and not _same_score(twin["score"], score):  # hp51 d08b: which one is the truth?
                raise self._corrupt(n, f"the key {record['key'][:80]!r} is logged twice, with scores {twin['score']!r} "
                                       f"and {score!r}")
            self.records[record["key"]] = record

    def _cut_header(self, raw: bytes) -> bool:
        """Whether ``raw`` (a file without a full line) is the start of this search's own header line, as a search
        killed while writing it leaves it."""
        try:
            text = raw.decode("utf-8").removeprefix("\ufeff")
        except UnicodeDecodeError:
            return False
        # at least a few bytes of it: a lone '{' or byte-order mark is a user's file as much as a cut header (hp77b c03,
        # c04: replaced silently)
        return len(text) >= 16 and json.dumps(self.header, sort_keys=True).startswith(text)

    def _check_key(self, line: int, record: Mapping[str, Any]) -> None:
        """A record's key is its options as the search wrote them (sorted, canonical JSON): a key edited or swapped
        with another record's would lend its score to another candidate (hp51 d08a, d08d). Its options may have been
        rewritten by a tool (hp50 k01: jq wrote lam 2.0 as 2), so they are compared by value."""
        try:
            options = json.loads(record["key"])
        except (ValueError, RecursionError):  # (hp54 c10: a key nested 50,000 deep)
            options = None
        if not isinstance(options, dict) or json.dumps(options, sort_keys=True) != record["key"]:
            raise self._corrupt(line, f"its key {record['key'][:80]!r} is not a candidate's options as the search "
                                      "writes them")
        if options != record["options"]:
            raise self._corrupt(line, f"its key {record['key'][:80]!r} and its options "
                                      f"{json.dumps(record['options'], sort_keys=True)[:80]!r} disagree")

    def get(self, key: str) -> dict[str, Any] | None:
        return self.records.get(key)

    def append(self, record: Mapping[str, Any]) -> None:
        """Write one scored candidate and flush it to disk: a search killed later keeps its score."""
        if self._fd < 0:
            self._start()
        self.records[record["key"]] = dict(record)
        score = record.get("score")
        if isinstance(score, float) and not math.isfinite(score):  # hp40 E4: a bare NaN made the log unreadable
            record = {**record, "score": repr(score)}  # 'nan', 'inf' or '-inf'
        self._write_line(record)
        self._made = None  # a scored candidate: the log is kept, whatever follows
        if os.fstat(self._fd).st_nlink == 0 and not self._lost:
            self._write_again()

    def _write_again(self) -> None:
        """The log was removed while the search ran (rm, a clean-up job, the evaluator): every later score went to
        a file no name reaches, lost at exit, and the summary named a log that was gone (hp87b c62). Written again
        at its path with all it holds, locked, and said; where that cannot be done, said so."""
        size = os.fstat(self._fd).st_size
        held = os.pread(self._fd, size, 0)
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, flags, 0o644)
        except OSError as exc:  # a file put there meanwhile (never replaced), or the folder unmakeable
            self._lost = True  # said once
            warnings.warn(MergeWarning(
                f"{self.path}: the search log was removed while the search ran, and cannot be written again there "
                f"({exc.strerror or exc}); the scores of this run go on in the report, but a resume will score them "
                "again"), stacklevel=3)
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            view = memoryview(held)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        except OSError as exc:
            os.close(fd)
            raise OutputError(f"{self.path}: the search log was removed while the search ran, and writing it again "
                              f"failed ({exc.strerror or exc})", hint="free space there, then run the same search "
                                                                      "again") from None
        os.close(self._fd)
        self._fd = fd
        warnings.warn(MergeWarning(f"{self.path}: the search log was removed while the search ran; tiesmerge wrote it "
                                   f"again with its {len(self.records):,} scores, so a resume still reuses them"),
                      stacklevel=3)

    def _write_line(self, data: Mapping[str, Any]) -> None:
        line = memoryview(_line(data))
        end = os.lseek(self._fd, 0, os.SEEK_END)
        try:
            while line:  # a write may take part of the line (a disk filling up): the rest follows, or the error
                line = line[os.write(self._fd, line):]
            os.fsync(self._fd)
        except OSError as exc:  # no half line left behind, and the log named (the error carries no file name)
            try:
                os.ftruncate(self._fd, end)
            except OSError:
                pass
            raise OutputError(f"{self.path}: cannot append to the search log ({exc.strerror or exc}); the candidates "
                              "scored before are kept in it",
                              hint="free space there (or move --dir), then run the same search again: it resumes "
                                   "from the log") from None

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.records.values())


def _line(data: Mapping[str, Any]) -> bytes:
    """One record of the log as written: JSON with sorted keys, one line."""
    return (json.dumps(data, sort_keys=True) + "\n").encode()


def _remove_new(path: Path, folders: list[Path]) -> None:
    """Remove the empty log ``path`` this process made and the ``folders`` (innermost first) made for it, if empty."""
    try:
        if os.path.isfile(path) and not os.path.islink(path) and os.path.getsize(path) == 0:
            os.unlink(path)
        for folder in folders:
            os.rmdir(folder)  # only an empty one: another file there stops it
    except OSError:
        pass


# a log header's parts, in words (hp41 C38: "it differs in: models, weights" named no model, and "weights" read as
# the --weights option)
_HEADER_WORDS = {
    # (one stamp over every input: a --set sign_from reference's change was read as the models', hp85b c61)
    "weights": "the inputs' files (the base's, the models' or a --set sign_from reference's weights, configs, "
               "tokenizer files): changed since the log was started (their "
               "inode, size, modification or change time: a chmod, a new hard link or a copy changes the last too)",
    "evaluator_data": "the evaluator's data file: its contents changed",
    # one digest over the module and the helpers it imports from its folder: which changed cannot be told (hp83b c11:
    # a helper's edit was said as the module's)
    "evaluator_code": "the evaluator's code: its module's source, or a helper module's it imports from its folder, "
                      "changed",
    "evaluator_state": "what the evaluator was built with (a partial's arguments, closure values, defaults)",
    "space": "the search space (--axis, --grid, --range, --set, the method's options)",
}
_HEADER_OPTIONS = {"strategy": "--strategy", "seed": "--seed", "popsize": "--popsize", "vocab_policy": "--vocab-policy",
                   "evaluator": "--evaluator", "format": "the log's format"}


def _header_difference(key: str, there: Any, now: Any, header: Mapping[str, Any] | None = None) -> str:
    """One differing header part, said as the user would check it: a model by its position and path."""
    inputs = [(header or {}).get("base"), *((header or {}).get("models") or [])]
    if key == "weights" and inputs and all(i is None for i in inputs):  # state dicts given in memory: no files
        # (hp85b c42: said as files, inodes and chmod), but a sign_from reference may be a folder
        space = (header or {}).get("space")
        held = space.get("fixed") if isinstance(space, Mapping) else None
        reference = held.get("sign_from") if isinstance(held, Mapping) else None
        return ("the inputs' tensors (state dicts given in memory): they differ from those the log was written with"
                + (f", or the sign_from reference's files ({reference}) changed since" if isinstance(reference, str)
                   else ""))
    if key in _HEADER_WORDS and key != "space":
        return _HEADER_WORDS[key]
    if key == "models" and isinstance(there, list) and isinstance(now, list):
        if len(there) != len(now):
            return f"the models: {len(there)} there, {len(now)} now"
        return "; ".join(f"model {k} {a} there, {b} now"
                         for k, (a, b) in enumerate(zip(there, now)) if a != b)  # 0-based, as every other message
    if key == "base":
        return f"the base {there} there, {now} now"
    if key == "space" and isinstance(there, dict) and isinstance(now, dict):
        return _space_difference(there, now) or _HEADER_WORDS[key]

    def shown(value: Any) -> str:
        text = "not set" if value is None else repr(value)
        return text if len(text) <= 80 else text[:77] + "..."

    return f"{_HEADER_OPTIONS.get(key, key)} {shown(there)} there, {shown(now)} now"


def _space_difference(there: Mapping[str, Any], now: Mapping[str, Any]) -> str:
    """How two logged search spaces differ, by the option that differs (hp85b c14: "the search space (--axis, --grid,
    --range, --set, the method's options)" for one --set), or "" where no part can be told."""
    def shown(value: Any) -> str:
        text = "not set" if value is None else repr(value)
        return text if len(text) <= 60 else text[:57] + "..."

    said = []
    if there.get("method") != now.get("method"):
        said.append(f"the method {shown(there.get('method'))} there, {shown(now.get('method'))} now")
    held_there, held_now = there.get("fixed"), now.get("fixed")
    if isinstance(held_there, dict) and isinstance(held_now, dict):
        said += [f"--set {k}: {shown(held_there.get(k))} there, {shown(held_now.get(k))} now"
                 for k in sorted({*held_there, *held_now}, key=str) if held_there.get(k) != held_now.get(k)]
    axes_there, axes_now = there.get("axes"), now.get("axes")
    if isinstance(axes_there, list) and isinstance(axes_now, list) and axes_there != axes_now:
        def named(axes: list) -> dict:
            return {a.get("name"): a for a in axes if isinstance(a, dict)}

        a, b = named(axes_there), named(axes_now)
        if list(a) != list(b):
            said.append(f"the axes {', '.join(map(str, a)) or 'none'} there, {', '.join(map(str, b)) or 'none'} now")
        else:
            for name in a:
                if a[name] != b[name]:
                    old, new = a[name], b[name]
                    what = (f"values {shown(old.get('values'))} there, {shown(new.get('values'))} now"
                            if old.get("values") != new.get("values") else
                            f"range {old.get('low')}:{old.get('high')} there, {new.get('low')}:{new.get('high')} now")
                    said.append(f"axis {name}: {what}")
    return "; ".join(said)
