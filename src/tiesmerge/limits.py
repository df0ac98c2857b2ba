"""JSON and YAML read with limits: size, nesting depth, and (YAML) what aliases expand to.

Configs, indexes, adapter configs and recipes are small; a file that is huge, nested
thousands deep, or a YAML "billion laughs" (aliases of aliases, a few hundred bytes that
expand to gigabytes) is refused with a typed error, whose message never echoes the document.
YAML is read with the safe loader only: no tag can construct a Python object.

>>> loads_json('{"a": [1, 2]}', "x.json")
{'a': [1, 2]}
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from collections.abc import Container, Iterable, Mapping, Sequence, Sized
from itertools import chain
from pathlib import Path
from typing import Any

import yaml

from .errors import CheckpointError, ConfigError, TiesMergeError
from .paths import open_regular, read_regular

__all__ = ["MAX_CONFIG_BYTES", "MAX_DEPTH", "MAX_YAML_NODES", "loads_json", "read_json", "read_json_lines",
           "check_text_pairs", "warn_unread_keys", "parse_float", "underflows", "overflows", "OutOfFloatRange",
           "loads_yaml", "read_yaml", "scan", "plain_numbers"]

MAX_CONFIG_BYTES = 64 << 20  # an index of a huge model is a few MB; tokenizer.json tens of MB
MAX_DEPTH = 64  # real configs nest under 10 deep
MAX_YAML_NODES = 100_000  # nodes after alias expansion; a recipe has tens


# what helps when a config, index, recipe or data file cannot be read: the file is damaged, or not what it
# claims to be (its name says which one)
_FIX_FILE = "the file is damaged or not the kind its name says: restore it from its source, or fix it"


_LEAVES = frozenset({str, float, bool, int, type(None)})  # parsed values with nothing to look into
_CONTAINERS = frozenset({dict, list})


def scan(data: Any, limit: int = MAX_DEPTH) -> tuple[int, int | None]:
    """One pass over parsed JSON/YAML (no recursion): its nesting depth (a leaf counts as a level), stopping
    past ``limit``, and the first integer past the float range (a 400-digit number, a long hex in YAML), or
    None. Every number tiesmerge reads becomes a float somewhere, and float() of such an int raises
    OverflowError: refused here, for every file and naming it, rather than wherever a value happens to be
    converted. It walks level by level, each level's values gathered and sorted out by type in C: a
    tokenizer.json holds millions of values, and a Python step per value took seconds."""
    deepest, level, big = 0, [data], None
    while level:  # the values at depth ``deepest + 1``
        deepest += 1
        if deepest > limit:
            break
        kinds = set(map(type, level))
        if big is None:
            big = _past_floats(level, kinds)
        if kinds <= _LEAVES:
            break
        if kinds == {dict}:
            dicts, lists = level, []
        elif kinds == {list}:
            dicts, lists = [], level
        else:  # mixed, or kinds a YAML loader makes (dates, int subclasses)
            dicts = [v for v in level if isinstance(v, dict)]
            lists = [v for v in level if isinstance(v, list)]
        level = [*chain.from_iterable(map(dict.values, dicts)), *chain.from_iterable(lists)]
    return deepest, big


def _past_floats(values: list[Any], kinds: set[type]) -> int | None:
    """The first integer among ``values`` past the float range, or None."""
    if int in kinds:
        ints = [v for v in values if type(v) is int]
        if max(ints) > sys.float_info.max or min(ints) < -sys.float_info.max:
            return next(v for v in ints if abs(v) > sys.float_info.max)
    if not kinds <= _LEAVES | _CONTAINERS:
        return next((v for v in values if isinstance(v, int) and not isinstance(v, bool) and type(v) is not int
                     and abs(v) > sys.float_info.max), None)
    return None


def _huge_number(source: str, error: type[TiesMergeError], digits: int | None = None) -> TiesMergeError:
    """A number no weight, density or size can be: past the float range (``digits`` None: past Python's 4,300)."""
    size = f"{digits:,}" if digits is not None else "more than 4,300"
    return error(f"{source}: holds an integer of {size} digits, past the range of any number tiesmerge uses "
                 "(about 1.8e308)", hint="fix that value: weights, densities and sizes are small numbers")


def _check_numbers(big: int | None, source: str, error: type[TiesMergeError]) -> None:
    if big is not None:  # parsed, so below the 4,300 digits Python converts to text
        raise _huge_number(source, error, len(str(abs(big))))


class _RepeatedKey(ValueError):
    pass


def plain_numbers(value: Any, depth: int = 2) -> Any:
    """numpy's scalars (np.float32(1.0), np.int64(2), np.bool_) and torch's 0-d tensors as the Python numbers they
    stand for, in ``value`` and the lists, tuples and mappings it holds ``depth`` levels down (a grid's lists, a
    range's pair): the API's checks and the search log take Python numbers, and refused these as "not a finite
    number" (hp59b c24, c25); 1-D arrays and tensors of real numbers as lists of them."""
    numpy = sys.modules.get("numpy")  # a numpy scalar exists only once numpy is imported
    if numpy is not None and isinstance(value, numpy.ndarray) and value.ndim == 1 and depth > 0 \
            and value.dtype.kind in "biuf":  # np.linspace's grid (hp61b c15b): its numbers, as a list
        return [plain_numbers(v, 0) for v in value]
    torch = sys.modules.get("torch")  # torch.linspace's grid, and a 0-d tensor's number (hp62b: numpy's were taken)
    if torch is not None and isinstance(value, torch.Tensor) and value.ndim <= 1 and not value.is_complex() \
            and value.device.type != "meta" and (value.ndim == 0 or depth > 0):
        if value.is_floating_point() and value.dtype != torch.float64:  # 0.1 as 0.1, not float32's 0.10000000149
            half = value.dtype == torch.float16
            numbers = [_shortest(x, half) for x in value.reshape(-1).float().tolist()]
        else:
            numbers = value.reshape(-1).tolist()
        return numbers if value.ndim else numbers[0]
    if numpy is not None and isinstance(value, numpy.generic):
        if isinstance(value, numpy.floating) and value.dtype.itemsize < 8 and numpy.isfinite(value):
            return float(str(value))  # numpy's str is the shortest decimal that reads back as the value
        if isinstance(value, (numpy.bool_, numpy.integer, numpy.floating)):
            return value.item()
        return value
    if depth > 0 and isinstance(value, Mapping):
        return {k: plain_numbers(v, depth - 1) for k, v in value.items()}
    if depth > 0 and isinstance(value, (list, tuple)):
        return type(value)(plain_numbers(v, depth - 1) for v in value) if type(value) in (list, tuple) else value
    return value


def _shortest(x: float, half: bool = False) -> float:
    """A float32 (``half``: float16) number as the shortest decimal that reads back as it: torch.tensor(0.1) is 0.1,
    not 0.10000000149011612, in a grid, a log and a table."""
    import numpy

    return float(str((numpy.float16 if half else numpy.float32)(x))) if math.isfinite(x) else x


def finite_float(x: Any) -> bool:
    """A finite number a float can hold: an int past 1.8e308 is none (math.isfinite raises OverflowError on it)."""
    try:
        return math.isfinite(x)
    except OverflowError:
        return False


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        repeated = next(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        raise _RepeatedKey(repeated)
    return out


def not_utf8_kind(raw: bytes) -> str:
    """What a file that is not UTF-8 looks like, from its first bytes: said beside the error (hp42 D65: a gzip file
    was told to convert itself from UTF-16)."""
    if raw[:2] == b"\x1f\x8b":
        return ": it is gzip-compressed"
    if raw[:2] in (b"\xff\xfe", b"\xfe\xff"):
        return ": it is UTF-16 (it starts with UTF-16's byte-order mark)"
    if (binary := _binary_kind(raw)) is not None:  # a weights file given as data: "convert it from Latin-1" (hp85b
        return f": it is {binary}, not text"  # c28)
    return ""


def weights_magic(head: bytes) -> str | None:
    """"gguf" or "zip" (torch.save's archive) where ``head`` starts as another weights format does, else None: one
    sniff for a weights file given where text is read and for one renamed to .safetensors."""
    return {b"GGUF": "gguf", b"PK\x03\x04": "zip"}.get(head[:4])


def _binary_kind(raw: bytes, nul: bool = True) -> str | None:
    """What binary file ``raw`` starts as (weights given where text is read), or None; ``nul``: any file holding a
    NUL byte counts (after gzip's and UTF-16's marks are told, which hold them too)."""
    # safetensors: an 8-byte little-endian header length, then the header's JSON (eight spaces before a '{"' read
    # as a length past any header)
    if len(raw) >= 10 and raw[8:10] == b'{"' and int.from_bytes(raw[:8], "little") < 2**30:
        return "a safetensors weights file"
    magic = weights_magic(raw)
    if magic is not None:
        return "a GGUF weights file" if magic == "gguf" else "a zip archive (a PyTorch checkpoint?)"
    if nul and b"\x00" in raw[:4096]:
        return "a binary file (it holds NUL bytes)"
    return None


def not_utf8_hint(raw: bytes) -> str:
    if raw[:2] == b"\x1f\x8b":
        return "decompress it first (`gunzip FILE.gz`): tiesmerge reads text files as they are"
    if raw[:2] in (b"\xff\xfe", b"\xfe\xff"):
        return "convert it to UTF-8 (`iconv -f UTF-16 -t UTF-8 FILE > FILE.utf8`)"
    if _binary_kind(raw) is not None:
        return "check the path: a text file (UTF-8) is read here, not a binary one"
    return ("save the file as UTF-8 (an editor's \"UTF-8\" encoding; `iconv -f LATIN1 -t UTF-8` converts a Latin-1 "
            "file)")


def loads_json(text: str | bytes, source: str, *, error: type[TiesMergeError] = CheckpointError,
               max_depth: int = MAX_DEPTH, unique_keys: bool = False, finite: bool = False) -> Any:
    """Parse JSON text: a typed error for bad syntax, bad encoding or nesting deeper than ``max_depth``, with
    ``unique_keys`` for an object naming a key twice (JSON keeps the last silently; a data row
    ``{"label": 1, "label": 0}`` is a mistake whichever was meant: hp41 C24), and with ``finite`` for NaN, Infinity
    or a number past a float's range, which Python's reader takes and no JSON standard allows (a file tiesmerge
    writes again into its output: hp70a c34, c46)."""
    try:
        data = json.loads(text, object_pairs_hook=_unique_keys) if unique_keys else json.loads(text)
    except _RepeatedKey as exc:
        raise error(f"{source}: an object gives the key {str(exc)!r} twice, so which value is meant is unclear",
                    hint="write each key once (JSON readers keep the last one silently)") from None
    except RecursionError:
        raise error(f"{source}: JSON nested too deep to read (more than {max_depth} levels)", hint=_FIX_FILE) from None
    except UnicodeDecodeError as exc:
        raise error(f"{source}: not UTF-8 text ({exc.reason} at byte {exc.start})", hint=_FIX_FILE) from None
    except ValueError as exc:
        if "int_max_str_digits" in str(exc):  # Python's own remedy is no advice for a data file
            raise _huge_number(source, error) from None
        raise error(f"{source}: not valid JSON ({str(exc)[:200]})", hint=_FIX_FILE) from None
    deepest, big = scan(data, max_depth)
    if deepest > max_depth:
        raise error(f"{source}: JSON nested more than {max_depth} levels deep, deeper than any config, manifest or "
                    "data file nests", hint=_FIX_FILE)  # (hp70a c35: "...; no config is", cut short)
    _check_numbers(big, source, error)
    if finite and (bad := non_finite(data, limit=1)):
        where, value = bad[0]
        raise error(f"{source}: holds {value} at {where or 'its top'}, which is no JSON number (NaN, Infinity, or "
                    "past a float's range)", hint=_FIX_FILE)
    return data


def non_finite(value: Any, limit: int = 3) -> list[tuple[str, float]]:
    """The floats of parsed JSON ``value`` that are not finite (NaN, Infinity, a number past a float's range), with
    their key paths (``a.b[1]``), the first ``limit`` of them; the depth is bounded as the reader bounds it."""
    found: list[tuple[str, float]] = []

    def walk(item: Any, where: str, depth: int) -> None:
        if len(found) >= limit:
            return
        if isinstance(item, float) and not math.isfinite(item):
            found.append((where, item))
            return
        items = item.items() if isinstance(item, dict) else enumerate(item) if isinstance(item, list) else ()
        for key, child in items if depth < MAX_DEPTH else ():
            walk(child, f"{where}[{key}]" if isinstance(key, int) else f"{where}.{key}" if where else str(key),
                 depth + 1)

    walk(value, "", 0)
    return found


def read_json(path: str | os.PathLike, what: str, *, error: type[TiesMergeError] = CheckpointError,
              max_bytes: int = MAX_CONFIG_BYTES, unique_keys: bool = False, finite: bool = False) -> Any:
    """A JSON file (a regular file, at most ``max_bytes``), parsed with :func:`loads_json`."""
    return loads_json(read_regular(path, what, max_bytes=max_bytes, error=error), f"{path}", error=error,
                      unique_keys=unique_keys, finite=finite)


def read_json_lines(path: str | os.PathLike, what: str, *, max_bytes: int,
                    error: type[TiesMergeError] = CheckpointError, hint: str | None = None,
                    limit: int | None = None) -> list[tuple[int, dict]]:
    """(line number, object) of the non-empty lines of a JSON-lines file (a regular UTF-8 file of at
    most ``max_bytes``; each line parsed with :func:`loads_json` and required to be an object), up to
    ``limit`` rows; an error naming the file when it holds none."""
    hint = hint or "write one JSON object per line, one example each"  # about the file, not --help's (hp62b v5)
    fd = open_regular(path, what, error)
    try:
        _not_being_written(fd, path, error)  # rows still appended by an export under way: not learned half-made
        if limit is not None:  # the first rows only: read as far as they go, not the whole file (--limit 2 of 600 MB)
            with os.fdopen(os.dup(fd), "rb") as f:
                raw = _first_lines(f, limit, max_bytes)
    finally:
        os.close(fd)
    if limit is None:
        raw = read_regular(path, what, max_bytes=max_bytes, error=error)
    if (binary := _binary_kind(raw, nul=False)) is not None:  # said before its bytes decode by chance (c28)
        raise error(f"{path}: {what} is not text: it is {binary}", hint=not_utf8_hint(raw))
    try:
        text = raw.decode("utf-8-sig")  # a byte-order mark (Windows editors write one) is not part of the data
    except UnicodeDecodeError as exc:
        raise error(f"{path}: {what} is not UTF-8 text ({exc.reason} at byte {exc.start}){not_utf8_kind(raw)}",
                    hint=not_utf8_hint(raw)) from None
    rows = []
    # lines end at "\n" only (JSON Lines): str.splitlines would also split inside a text holding U+2028, U+0085 or a
    # form feed, which JSON leaves unescaped (json.dumps(..., ensure_ascii=False) writes them as they are)
    for number, line in enumerate(text.split("\n"), 1):
        line = line.removesuffix("\r")
        if limit is not None and len(rows) >= limit:
            break
        if line.strip():
            row = loads_json(line, f"{path}:{number}", error=error, unique_keys=True)
            if not isinstance(row, dict):
                raise error(f"{path}:{number}: each line must be a JSON object, not {type(row).__name__}",
                            hint=hint)
            if "\\u" in line:  # an escape may be half a UTF-16 pair, which no tokenizer takes (hostile pass 25, F6)
                check_surrogates(row, f"{path}:{number}", error)
            rows.append((number, row))
    if not rows:
        raise error(f"{path}: {what} holds no examples (it is empty or holds only blank lines)", hint=hint)
    return rows


# keys that name a field tiesmerge reads under another name in other tools' exports (GLUE's sentence2, HF's text_b)
_KNOWN_AS = {"text_b": "text_pair", "textpair": "text_pair", "text2": "text_pair", "sentence2": "text_pair",
             "hypothesis": "text_pair", "pair": "text_pair", "sentence": "text", "sentence1": "text",
             "premise": "text", "text_a": "text", "labels": "label", "target": "label", "answer": "label",
             "choice": "choices", "options": "choices", "question": "prompt"}


def warn_unread_keys(rows: Sequence[tuple[int, dict]], path: str | os.PathLike, read: Sequence[str],
                     what: str) -> None:
    """Name, once, the keys of the rows (line number, object) that ``what`` reads nothing from: a sentence pair
    under ``text_b`` was scored on its first text alone, silently (hp52 c41); a key read elsewhere under another
    name is said with it."""
    import difflib
    import warnings

    from .errors import MergeWarning

    unread = unread_keys(rows, read)  # key -> its first line
    if not unread:
        return
    said = []
    for key, number in list(unread.items())[:KEYS_SHOWN]:
        meant = _KNOWN_AS.get(key.lower()) if key.lower() not in read else key.lower()
        meant = meant if meant in read else next(iter(difflib.get_close_matches(key, read, n=1, cutoff=0.75)), None)
        said.append(f"{key[:60]!r} (line {number}{f'; did you mean {meant!r}?' if meant else ''})")
    warnings.warn(MergeWarning(
        f"{path}: {what} reads {', '.join(repr(k) for k in read)} from each line, and nothing from "
        + ", ".join(said) + more_keys(unread)), stacklevel=3)


KEYS_SHOWN = 8  # unread keys named in a warning; the rest counted


def unread_keys(rows: Iterable[tuple[Any, Any]], read: Container[str]) -> dict[str, Any]:
    """{key: where it first appears} of the keys of ``rows`` ((where, row) pairs; a row that is no mapping holds
    none) that are not in ``read``, in the order met."""
    unread: dict[str, Any] = {}
    for where, row in rows:
        for key in row if isinstance(row, Mapping) else ():
            if key not in read:
                unread.setdefault(key, where)
    return unread


def more_keys(unread: Sized) -> str:
    """" and N more key(s)" for the unread keys past those a warning names."""
    return f" and {len(unread) - KEYS_SHOWN:,} more key(s)" if len(unread) > KEYS_SHOWN else ""


def check_text_pairs(rows: Sequence[tuple[int, dict]], path: str | os.PathLike,
                     error: type[TiesMergeError] = ConfigError) -> bool:
    """Whether the rows (line number, object) are sentence pairs: every one has a ``text_pair``, or none does. Some
    with and some without is refused naming a line: a batch holding one row without a pair was encoded without any,
    so the result depended on the batch size (hp42 D55, C61)."""
    paired = [number for number, row in rows if "text_pair" in row]
    if paired and len(paired) != len(rows):
        unpaired = next(number for number, row in rows if "text_pair" not in row)
        raise error(f"{path}:{unpaired}: no 'text_pair', while {len(paired):,} other line(s) have one (line "
                    f"{paired[0]} first); a model of sentence pairs needs both texts of every example",
                    hint="give every line its text_pair, or none of them")
    return bool(paired)


def check_surrogates(row: dict, where: str, error: type[TiesMergeError]) -> None:
    """Refuse a row holding a lone UTF-16 surrogate (``"\\ud800"``: valid JSON, but no text a tokenizer encodes)."""
    try:
        json.dumps(row, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = ord(exc.object[exc.start])
        raise error(f"{where}: a string holds \\u{bad:04x}, half of a UTF-16 surrogate pair without its other half, "
                    "which is no text (a tokenizer cannot encode it)",
                    hint="fix the data: write the character itself, or both halves of its \\ud8xx\\udcxx escape"
                    ) from None


def _not_being_written(fd: int, path: str | os.PathLike, error: type[TiesMergeError]) -> None:
    """Refuse the open file ``fd`` while another process holds it open for writing (io.leases.refuse_writers)."""
    from .io.leases import refuse_writers  # (io imports this module)

    refuse_writers(fd, Path(path), error)


def _first_lines(f: Any, rows: int, max_bytes: int) -> bytes:
    """The bytes of ``f`` up to the end of its ``rows``-th non-blank line (at most ``max_bytes``): what a limited
    read parses. A blank line is no row; a line cut by ``max_bytes`` is parsed as it is (and refused as broken)."""
    out, found = bytearray(), 0
    while found < rows and len(out) < max_bytes:
        line = f.readline(max_bytes - len(out))
        if not line:
            break
        out += line
        found += bool(line.strip())
    return bytes(out)


def underflows(text: str, value: float) -> bool:
    """Whether a number written as nonzero (``1e-400``) reads as 0.0: past the smallest float (5e-324), an
    option the user set to a tiny value would silently be 0 (``--lam 1e-400``: the merge is the base)."""
    if value != 0:
        return False
    mantissa = re.split(r"[eE]", str(text).strip().lstrip("+-"), maxsplit=1)[0]
    return any(c in "123456789" for c in mantissa)


def overflows(text: str, value: float) -> bool:
    """Whether a number written as digits (``-1e400``) reads as an infinity: past the largest float (1.8e308),
    where the refusal would otherwise say "got -inf", a value nobody wrote."""
    return math.isinf(value) and "inf" not in str(text).lower()


class OutOfFloatRange(ValueError):
    """A number past the range of a float: written as nonzero but read as 0, or written as digits but read as
    an infinity (:func:`underflows`, :func:`overflows`); its text says which, its ``hint`` what to do."""

    def __init__(self, message: str, hint: str) -> None:
        super().__init__(message)
        self.hint = hint


def out_of_range(text: str, value: float, where: str = "") -> OutOfFloatRange | None:
    """The error for ``text`` read as ``value`` when that crossed the float range, else None."""
    shown = f"{text.strip()}{where}"
    if underflows(text, value):
        return OutOfFloatRange(f"{shown} is too small for a float: it reads as 0 (the smallest is 5e-324); "
                               "write 0 if 0 is meant", hint="give the value as it is meant (0, or a number of at "
                               "least 1e-38)")
    if overflows(text, value):
        return OutOfFloatRange(f"{shown} is too large for a float: it reads as {'-' if value < 0 else ''}inf (the "
                               "largest float is about 1.8e308)", hint="give the value as it is meant: a number "
                               "below 1.8e308")
    return None


class NotPlainDigits(OutOfFloatRange):
    """A number written with '_' or with digits other than ASCII's, which Python's float() and int() read (``1_0`` is
    10, a typo of 1.0; Arabic-Indic ``٣`` is 3): refused on the command line, where such a number is a typo."""


def check_plain_digits(text: str) -> None:
    """Raise :class:`NotPlainDigits` for number text holding '_' or a character outside ASCII (hp71b c38)."""
    if "_" in text or not text.isascii():
        raise NotPlainDigits(f"{text.strip()!r} is not a number as tiesmerge reads one: write it in ASCII digits, "
                             "without '_' (1_0 reads as 10 in Python)",
                             hint="write numbers as 0.5, 10, 1e-3")


def parse_int(text: str) -> int:
    """``int(text)`` of ASCII digits without '_' (:class:`NotPlainDigits` otherwise, a ValueError)."""
    check_plain_digits(text)
    return int(text)


def parse_float(text: str) -> float:
    """``float(text)``; :class:`OutOfFloatRange` (a ValueError) for a nonzero number that reads as 0 or digits that
    read as an infinity, or written with '_' or non-ASCII digits (:class:`NotPlainDigits`)."""
    check_plain_digits(text)
    value = float(text)
    problem = out_of_range(text, value)
    if problem is not None:
        raise problem
    return value


class _CountingLoader(yaml.SafeLoader):
    """The safe loader, with the composed graph measured before anything is constructed."""

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
        _refuse_base_60(node)
        value = super().construct_yaml_int(node)
        _refuse_octal(node, value)
        return value

    def construct_yaml_float(self, node: yaml.ScalarNode) -> float:
        _refuse_base_60(node)
        value = super().construct_yaml_float(node)
        problem = out_of_range(str(node.value), value, f" (line {node.start_mark.line + 1})")
        if problem is not None:
            raise problem
        return value


_CountingLoader.add_constructor("tag:yaml.org,2002:float", _CountingLoader.construct_yaml_float)
_CountingLoader.add_constructor("tag:yaml.org,2002:int", _CountingLoader.construct_yaml_int)


def _refuse_base_60(node: yaml.ScalarNode) -> None:
    """YAML 1.1 reads ``1:30`` as the base-60 number 90 (and ``0:30`` is refused): a weight or lam written so was
    merged as 60 or 90 without a word (hp45 c33). No recipe value is meant in base 60."""
    text = str(node.value)
    if ":" in text:
        reading = _base_60(text)  # this value's own reading (hp48 c06: every refusal said "1:30 is 90")
        shown = f"{text.strip()[:40]} is {reading:g}" if reading is not None else "1:30 is 90"
        raise OutOfFloatRange(f"{text.strip()[:40]} (line {node.start_mark.line + 1}) reads in YAML 1.1 as a base-60 "
                              f"number ({shown})", hint="write the number meant in decimals (90, or 1.5), or quote "
                                                        "the value if it is text")


def _base_60(text: str) -> float | None:
    """YAML 1.1's reading of a base-60 scalar (``190:20:30`` is 685,230; ``1:0.5`` is 60.5), None where unreadable."""
    sign = -1 if text.strip().startswith("-") else 1
    try:
        parts = [float(p) for p in text.strip().lstrip("+-").replace("_", "").split(":")]
    except ValueError:
        return None
    value = 0.0
    for part in parts:
        value = value * 60 + part
    return sign * value


def _refuse_octal(node: yaml.ScalarNode, value: int) -> None:
    """YAML 1.1 reads ``010`` as the octal number 8: a ``lam: 010`` or ``weight: 010`` merged at 8 without a word (hp48
    c07), where JSON, YAML 1.2 and mergekit's reading of a typed value differ. Refused where the two readings differ
    (``007`` is 7 either way); ``0x10`` says its base and stays."""
    text = str(node.value).strip().lstrip("+-").replace("_", "")
    if len(text) > 1 and text[0] == "0" and text.isdigit() and int(text, 10) != abs(value):
        raise OutOfFloatRange(f"{str(node.value).strip()[:40]} (line {node.start_mark.line + 1}) reads in YAML 1.1 as "
                              f"the octal number {value} (a leading 0), not {int(text, 10)}",
                              hint=f"write {int(text, 10)}, or {value} if the octal reading is meant, or quote the "
                                   "value if it is text")


# YAML 1.1 (PyYAML) reads 1e-1, 5e-1 or 1.0e308 as text (its floats need a dot and a signed exponent); YAML 1.2, JSON,
# mergekit (pydantic coerces them) and the command line (--lam 1e-1) read them as numbers: so do recipes
_CountingLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."))


def _no_duplicate_keys(node: yaml.MappingNode, source: str, error: type[TiesMergeError]) -> None:
    """A key given twice in one mapping is an error naming it and both lines: YAML loaders keep
    the last silently, so ``density: 0.2`` further down would override the one the user reads."""
    seen: dict[tuple[str, str], tuple[int, int]] = {}
    for key, _ in node.value:
        if not isinstance(key, yaml.ScalarNode) or key.tag == "tag:yaml.org,2002:merge":  # `<<:` merges
            continue
        here = (key.start_mark.line + 1, key.start_mark.column + 1)
        if (key.tag, key.value) in seen:
            shown = key.value if len(key.value) <= 80 else key.value[:80] + "..."
            first = seen[key.tag, key.value]
            # both on one line (a flow mapping, {density: 0.3, density: 0.4}): their columns (hp84a c28: "lines 4
            # and 4")
            where = (f"line {here[0]}, columns {first[1]} and {here[1]}" if first[0] == here[0] else
                     f"lines {first[0]} and {here[0]}")
            raise error(f"{source}: key {shown!r} is given twice in one mapping ({where})",
                        hint="keep one of them: YAML would silently use the last")
        seen[key.tag, key.value] = here


def _expanded_size(node: yaml.Node, limit: int, max_depth: int, source: str, error: type[TiesMergeError]) -> int:
    """Nodes ``node`` stands for once every alias is expanded (memoized per node, so a
    billion-laughs document is measured in a few hundred steps), refused past ``limit``."""
    sizes: dict[int, int] = {}
    stack: list[tuple[yaml.Node, int, bool]] = [(node, 1, False)]
    while stack:
        item, depth, done = stack.pop()
        if depth > max_depth:
            raise error(f"{source}: YAML nested more than {max_depth} levels deep; no recipe is")
        if id(item) in sizes:
            continue
        children: list[yaml.Node] = []
        if isinstance(item, yaml.SequenceNode):
            children = list(item.value)
        elif isinstance(item, yaml.MappingNode):
            _no_duplicate_keys(item, source, error)
            children = [n for pair in item.value for n in pair]
        if done or not children:
            total = 1 + sum(sizes.get(id(c), 0) for c in children)
            if total > limit:
                raise error(f"{source}: the YAML holds more than {limit:,} values once its aliases are expanded; "
                            "a recipe holds a few dozen", hint="shorten the recipe's lists (and write it without "
                                                              "nested aliases, if it has any)")
            sizes[id(item)] = total
            continue
        stack.append((item, depth, True))
        stack.extend((c, depth + 1, False) for c in children if id(c) not in sizes)
    return sizes[id(node)]


def loads_yaml(text: str | bytes, source: str, *, error: type[TiesMergeError] = CheckpointError,
               max_nodes: int = MAX_YAML_NODES, max_depth: int = MAX_DEPTH) -> Any:
    """Parse YAML with the safe loader, measuring the composed graph first (aliases expanded,
    depth) so that nothing huge is ever built or printed."""
    try:
        loader = _CountingLoader(text)  # checks every character first: a control character (NUL, ESC) is refused here
    except yaml.YAMLError as exc:
        raise _not_yaml(exc, source, error) from None
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded_size(node, max_nodes, max_depth, source, error)
        data = loader.construct_document(node)
        _check_numbers(scan(data, max_depth)[1], source, error)  # the depth was measured on the nodes above
        return data
    except TiesMergeError:  # our own limits' errors (a ValueError too): already say what is wrong
        raise
    except OutOfFloatRange as exc:
        raise error(f"{source}: {exc}", hint=exc.hint) from None
    except RecursionError:
        raise error(f"{source}: YAML nested too deep to read (more than {max_depth} levels)",
                    hint=_FIX_FILE) from None
    except yaml.YAMLError as exc:
        raise _not_yaml(exc, source, error) from None
    except (ValueError, TypeError) as exc:  # e.g. an unhashable key, a bad timestamp
        if "int_max_str_digits" in str(exc):
            raise _huge_number(source, error) from None
        raise error(f"{source}: YAML that tiesmerge cannot read ({type(exc).__name__}: {str(exc)[:200]})",
                    hint=_FIX_FILE) from None
    finally:
        loader.dispose()


def _not_yaml(exc: yaml.YAMLError, source: str, error: type[TiesMergeError]) -> TiesMergeError:
    """The error for YAML the parser refused, with where: a line and column, or the character a reader refused."""
    if isinstance(exc, yaml.reader.ReaderError):  # a character YAML does not allow (a binary file, a colour code)
        what = f"the character U+{exc.character:04X}" if isinstance(exc.character, int) else "a byte"
        return error(f"{source}: not valid YAML ({what} at position {exc.position}, which YAML does not allow: a "
                     "control character, or a binary file)", hint=_FIX_FILE)
    mark = getattr(exc, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    problem = getattr(exc, "problem", None) or type(exc).__name__
    if "expected a single document" in str(getattr(exc, "context", "")) + str(problem):
        # two documents (a '---' between them): valid YAML, one recipe each; not "damaged" (hp88a c78)
        return error(f"{source}: holds more than one YAML document (a '---' line{where}), and a recipe is one",
                     hint="keep one recipe per file (remove the '---' line and what follows, or split the file)")
    return error(f"{source}: not valid YAML ({str(problem)[:200]}{where})", hint=_FIX_FILE)


def read_yaml(path: str | os.PathLike, what: str, *, error: type[TiesMergeError] = CheckpointError,
              max_bytes: int = 1 << 20) -> Any:
    """A YAML file (a regular file of at most ``max_bytes``), parsed with :func:`loads_yaml`."""
    fd = open_regular(path, what, error)
    try:
        _not_being_written(fd, path, error)  # a recipe an editor or a script is still saving
    finally:
        os.close(fd)
    raw = read_regular(path, what, max_bytes=max_bytes, error=error)
    try:
        text = raw.decode("utf-8-sig")  # a byte-order mark (Windows editors write one) is not part of the data
    except UnicodeDecodeError as exc:
        raise error(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}){not_utf8_kind(raw)}",
                    hint=not_utf8_hint(raw)) from None
    return loads_yaml(text, str(path), error=error)
