"""The hostile-input building blocks on their own: tiesmerge.paths, tiesmerge.limits, the stale
temporary directories of io.writer, and what must keep working (the Hugging Face cache's links)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import tiesmerge
from helpers_ckpt import make_family, write_earlier_manifest, write_hf_dir
from tiesmerge.errors import CheckpointError, ConfigError, OutputError
from tiesmerge.io.writer import remove_stale
from tiesmerge.limits import loads_json, loads_yaml, read_json
from tiesmerge.paths import FileStamps, check_input, check_not_input, check_output_location, inside
from tiesmerge.scratch import host_tag as _host


def _hf_cache_snapshot(root: Path, state: dict, name: str) -> Path:
    """A model as the Hugging Face cache stores it: snapshots/<rev>/* are links into ../../blobs."""
    plain = write_hf_dir(root / f"plain-{name}", state, shards=2)
    repo = root / f"models--org--{name}"
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    for k, f in enumerate(sorted(plain.iterdir())):
        blob = repo / "blobs" / f"blob{k}"
        blob.write_bytes(f.read_bytes())
        (snap / f.name).symlink_to(Path("../../blobs") / blob.name)
    return snap


def test_hugging_face_cache_snapshots_still_merge(tmp_path):
    base, fts = make_family(2)
    b = _hf_cache_snapshot(tmp_path, base, "base")
    ms = [_hf_cache_snapshot(tmp_path, ft, f"ft{k}") for k, ft in enumerate(fts)]
    out = tiesmerge.merge(b, ms, "task_arithmetic", lam=0.5, output=tmp_path / "out")
    want = tiesmerge.merge(base, fts, "task_arithmetic", lam=0.5)
    got = {}
    for shard in out.glob("*.safetensors"):
        got.update(load_file(str(shard)))
    torch.testing.assert_close(got["lm_head.weight"], want["lm_head.weight"])
    assert (out / "tokenizer.json").is_file() and not (out / "tokenizer.json").is_symlink()


def test_inside_refuses_links_and_dots_that_leave(tmp_path):
    model = tmp_path / "m"
    model.mkdir()
    (tmp_path / "outside.bin").write_bytes(b"x")
    (model / "ok.bin").write_bytes(b"x")
    (model / "leak.bin").symlink_to(tmp_path / "outside.bin")
    assert inside(model / "ok.bin", model, "a file") == (model / "ok.bin").resolve()
    for bad in (model / "leak.bin", model / ".." / "outside.bin"):
        with pytest.raises(CheckpointError, match="outside"):
            inside(bad, model, "a file")


def test_check_input_names_what_is_wrong(tmp_path):
    os.mkfifo(tmp_path / "pipe")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    for path, needle in ((tmp_path / "pipe", "FIFO"), (tmp_path / "loop", "loop"),
                         (tmp_path / "dangling", "does not exist"), (tmp_path / "missing", "no such file"),
                         (Path("/dev/null"), "character device")):
        with pytest.raises(CheckpointError, match=needle):
            check_input(path, "the model")


def test_output_checks(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    with pytest.raises(OutputError, match="loop"):
        check_output_location(tmp_path / "loop", force=True)
    with pytest.raises(OutputError, match="never replaces"):
        check_output_location(".", force=True)
    (tmp_path / "in").mkdir()
    with pytest.raises(OutputError, match="lies inside"):
        check_not_input(tmp_path / "in" / "out", [("the base", tmp_path / "in")])
    check_not_input(tmp_path / "elsewhere", [("the base", tmp_path / "in"), ("a state dict", {"w": 1})])


def test_file_stamps_see_a_change(tmp_path):
    f = tmp_path / "w.safetensors"
    f.write_bytes(b"12345678")
    stamps = FileStamps.of([f])
    stamps.check()
    os.utime(f, ns=(1, 1))
    with pytest.raises(CheckpointError, match="was modified"):
        stamps.check()
    f.unlink()
    with pytest.raises(CheckpointError, match="disappeared"):
        stamps.check()


def test_json_limits(tmp_path):
    with pytest.raises(CheckpointError, match="nested"):
        loads_json("[" * 70 + "]" * 70, "x.json")
    with pytest.raises(CheckpointError, match="not UTF-8"):
        loads_json(b'{"a": "\xff"}', "x.json")
    (tmp_path / "big.json").write_text(json.dumps({"a": "x" * 4096}))
    with pytest.raises(CheckpointError, match="more than"):
        read_json(tmp_path / "big.json", "a config", max_bytes=1024)
    assert loads_json('{"a": [1, {"b": null}]}', "x.json") == {"a": [1, {"b": None}]}


@pytest.mark.parametrize("text,needle", [("a: &a [*a]", "nested"), ("a: !!python/object:os.system {}", "YAML"),
                                         ("[" * 5000 + "]" * 5000, "nested")])
def test_yaml_limits(text, needle):
    with pytest.raises(ConfigError, match=needle):
        loads_yaml(text, "r.yaml", error=ConfigError)


def test_yaml_anchors_that_stay_small_are_fine():
    assert loads_yaml("x: &x {density: 0.2}\ny: *x\n", "r.yaml") == {"x": {"density": 0.2}, "y": {"density": 0.2}}


def test_a_parked_previous_output_of_a_killed_run_is_put_back(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    parked = tmp_path / f".tiesmerge-old-{_host()}-{dead.pid}-q1"
    (parked / "merged").mkdir(parents=True)
    write_earlier_manifest(parked / "merged")
    (parked / ".tiesmerge-temporary").touch()  # as tiesmerge makes its temporaries (io.writer.OWNED)
    tmp = tmp_path / f".tiesmerge-tmp-{_host()}-{dead.pid}-q2"
    tmp.mkdir()
    other_host = tmp_path / f".tiesmerge-tmp-00000000-{dead.pid}-q3"  # another machine's run: not ours to judge
    other_host.mkdir()
    from tiesmerge.errors import MergeWarning

    with pytest.warns(MergeWarning, match=r"merged: put back: a run killed while replacing it"):  # said (hp62a c20)
        cleaned = remove_stale(tmp_path)
    assert sorted(cleaned) == sorted([parked.name, tmp.name])
    assert (tmp_path / "merged" / "tiesmerge.json").is_file() and other_host.exists()
    assert not (tmp_path / ".tiesmerge-temporary").exists()  # the parking folder's own mark is not put back


def test_write_file_replaces_a_link_never_writes_through_it(tmp_path):
    from tiesmerge.paths import write_file

    (tmp_path / "target.txt").write_text("someone else's")
    (tmp_path / "results.md").symlink_to(tmp_path / "target.txt")
    write_file(tmp_path / "results.md", "report")
    assert not (tmp_path / "results.md").is_symlink() and (tmp_path / "results.md").read_text() == "report"
    assert (tmp_path / "target.txt").read_text() == "someone else's"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.md", "target.txt"]
