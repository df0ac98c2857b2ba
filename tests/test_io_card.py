"""The model card (io/card.py), and the input digests it and the manifest record: remembered by file
identity, never stale."""

from __future__ import annotations

import hashlib
import os
import re
from concurrent.futures import ThreadPoolExecutor

import pytest
import yaml

import tiesmerge
from tiesmerge.io import card


def test_model_card_front_matter_and_recipe(hf, tmp_path):
    _, _, b, ms = hf
    out = tiesmerge.merge(b, ms, "ties", output=tmp_path / "out", density=0.3, lam=1.5)
    card = (out / "README.md").read_text()
    m = re.match(r"^---\n(.*?)\n---\n", card, re.S)
    assert m, card[:200]
    front = yaml.safe_load(m.group(1))
    assert front["base_model"] == str(b)
    assert {"merge", "tiesmerge"} <= set(front["tags"])
    recipe = yaml.safe_load(re.search(r"```yaml\n(.*?)```", card, re.S).group(1))
    assert recipe["method"] == "ties"
    assert recipe["base"] == str(b) and recipe["models"] == [str(p) for p in ms]
    assert recipe["parameters"]["density"] == 0.3 and recipe["parameters"]["lam"] == 1.5
    for p in ms:
        assert str(p) in card
    assert "arxiv.org/abs/2306.01708" in card


def _digests(paths):
    with ThreadPoolExecutor(1) as pool:
        out = [f.result() for f in card.hash_files(paths, pool)]
    card.flush_digests()  # as a merge does once its inputs are hashed
    return out


def test_a_remembered_digest_is_reused_until_the_file_changes(tmp_path, monkeypatch):
    f = tmp_path / "w.safetensors"
    f.write_bytes(b"a" * 1000)
    calls = []
    real = card._sha256
    monkeypatch.setattr(card, "_sha256", lambda p: calls.append(p) or real(p))
    first, = _digests([f])
    again, = _digests([f])
    assert first["sha256"] == again["sha256"] == hashlib.sha256(b"a" * 1000).hexdigest()
    assert len(calls) == 1 and again["remembered"] and "remembered" not in first
    f.write_bytes(b"b" * 1000)  # same size; mtime/ctime change
    os.utime(f, ns=(1, 1))  # even an mtime put back by hand: ctime still moves
    changed, = _digests([f])
    assert changed["sha256"] == hashlib.sha256(b"b" * 1000).hexdigest() and len(calls) == 2


def test_the_digest_cache_can_be_switched_off(tmp_path, monkeypatch):
    monkeypatch.setenv("TIESMERGE_DIGEST_CACHE", "0")
    f = tmp_path / "w.bin"
    f.write_bytes(b"x")
    _digests([f])
    assert "remembered" not in _digests([f])[0]
    assert not (tmp_path / "digests.json").exists()


@pytest.mark.parametrize("garbage", [b"not json", b"[1, 2]", b'{"k": 3}'])
def test_a_damaged_cache_file_is_ignored(tmp_path, monkeypatch, garbage):
    monkeypatch.setenv("TIESMERGE_CACHE_DIR", str(tmp_path / "c"))
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "digests.json").write_bytes(garbage)
    f = tmp_path / "w.bin"
    f.write_bytes(b"y")
    assert _digests([f])[0]["sha256"] == hashlib.sha256(b"y").hexdigest()
