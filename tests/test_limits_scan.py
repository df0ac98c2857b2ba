"""limits.scan: the depth of parsed JSON/YAML (a leaf is a level) and its first integer past the float
range, held to a plain recursive definition on random documents and on a tokenizer.json's shape (the level-by-level
walk sorts values out by type in bulk, so each shape of level is a case)."""

from __future__ import annotations

import collections
import datetime
import random
import sys

import pytest

from tiesmerge.errors import CheckpointError
from tiesmerge.limits import loads_json, scan


class _Int(int):
    """An int subclass (a YAML loader may make one)."""


def _depth(x) -> int:
    if isinstance(x, dict):
        return 1 + max(map(_depth, x.values()), default=0)
    if isinstance(x, list):
        return 1 + max(map(_depth, x), default=0)
    return 1


def _bigs(x) -> list[int]:
    if isinstance(x, dict):
        return [b for v in x.values() for b in _bigs(v)]
    if isinstance(x, list):
        return [b for v in x for b in _bigs(v)]
    return [x] if isinstance(x, int) and not isinstance(x, bool) and abs(x) > sys.float_info.max else []


def _document(r: random.Random, depth: int = 0):
    c = r.random()
    if depth > r.randint(1, 30) or c < 0.35:
        return r.choice([1, -2, 10**400, -10**309, 10**308, "x", None, True, 2.5, _Int(3), _Int(-10**500),
                         datetime.date(2020, 1, 1), b"x", (1, 10**400), {2}])
    if c < 0.7:
        return [_document(r, depth + 1) for _ in range(r.randint(0, 4))]
    kind = collections.OrderedDict if c < 0.8 else dict
    return kind((str(k), _document(r, depth + 1)) for k in range(r.randint(0, 4)))


@pytest.mark.parametrize("seed", range(4))
def test_scan_agrees_with_the_recursive_definition(seed):
    r = random.Random(seed)
    for _ in range(2000):
        doc = _document(r)
        depth, bigs = _depth(doc), _bigs(doc)
        for limit in (2, 5, 64):
            got_depth, big = scan(doc, limit)
            if depth > limit:
                assert got_depth > limit
                continue
            assert got_depth == depth
            assert (big is None) == (not bigs) and (big is None or big in bigs)


def test_scan_of_a_tokenizer_shaped_document():
    vocab = {f"t{i}": i for i in range(50_000)}
    doc = {"model": {"vocab": vocab, "merges": [[f"a{i}", "b"] for i in range(50_000)]},
           "added_tokens": [{"id": i, "content": f"<{i}>", "special": True} for i in range(1000)]}
    assert scan(doc) == (5, None)
    vocab["huge"] = -10**310
    assert scan(doc) == (5, -10**310)


def test_deep_and_huge_json_refused_with_the_file_named():
    with pytest.raises(CheckpointError, match="x.json: JSON nested more than 64 levels deep, deeper than any config, "
                                              "manifest or data file nests"):
        loads_json("[" * 65 + "]" * 65, "x.json")
    assert loads_json("[" * 63 + "]" * 63, "x.json") is not None  # 63 lists + nothing inside: within the limit
    with pytest.raises(CheckpointError, match="x.json: holds an integer of 310 digits"):
        loads_json('{"a": [1, 2.5, "s", ' + "9" * 310 + "]}", "x.json")
