"""Models by name, offline: org/name[@revision] resolved from a local Hugging Face cache laid out
here (refs, snapshots linking into blobs), never the network; a local path of the same name wins."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import tiesmerge
from helpers_ckpt import assert_same_state, load_dir, make_family, run_cli, write_hf_dir
from tiesmerge.errors import CheckpointError
from tiesmerge.hub import resolve_repo, split_repo_id


def _commit(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()


def _cache_repo(cache: Path, repo_id: str, source: Path, revisions: dict[str, str]) -> dict[str, str]:
    """``source``'s files as the Hub client stores them: blobs by digest, one snapshot per commit
    whose files link into blobs, and refs/<name> files holding the commits. Returns name -> commit."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    out = {}
    for ref, salt in revisions.items():
        commit = _commit(repo_id + salt)
        snap = repo / "snapshots" / commit
        snap.mkdir(parents=True)
        for f in source.iterdir():
            data = f.read_bytes()
            blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
            blob.write_bytes(data)
            os.symlink(os.path.relpath(blob, snap), snap / f.name)
        if not ref.startswith("commit:"):
            (repo / "refs").mkdir(exist_ok=True)
            (repo / "refs" / ref).write_text(commit)
        out[ref] = commit
    return out


@pytest.fixture
def hub(tmp_path, monkeypatch):
    base, fts = make_family(2)
    ft_v1 = {k: v * 1.01 if v.is_floating_point() else v for k, v in fts[1].items()}
    dirs = {"base": write_hf_dir(tmp_path / "src" / "base", base),
            "ft0": write_hf_dir(tmp_path / "src" / "ft0", fts[0]),
            "ft1": write_hf_dir(tmp_path / "src" / "ft1", fts[1]),
            "ft1v1": write_hf_dir(tmp_path / "src" / "ft1v1", ft_v1)}
    cache = tmp_path / "hf" / "hub"
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    commits = {"base": _cache_repo(cache, "org/base", dirs["base"], {"main": "m"}),
               "ft0": _cache_repo(cache, "org/ft-0", dirs["ft0"], {"main": "m"}),
               "ft1": _cache_repo(cache, "org/ft-1", dirs["ft1"], {"main": "m"})}
    commits["ft1"].update(_cache_repo(cache, "org/ft-1", dirs["ft1v1"], {"v1": "v1"}))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return {"dirs": dirs, "cache": cache, "commits": commits, "states": (base, fts, ft_v1)}


def test_models_by_name_merge_like_their_directories(hub, tmp_path):
    d = hub["dirs"]
    out = tiesmerge.merge("org/base", ["org/ft-0", "org/ft-1"], "ties", output=tmp_path / "out")
    want = tiesmerge.merge(d["base"], [d["ft0"], d["ft1"]], "ties", output=tmp_path / "want")
    assert_same_state(load_dir(out), load_dir(want))
    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["base_model"] == "org/base"
    assert hub["commits"]["base"]["main"] in card
    man = json.loads((out / "tiesmerge.json").read_text())
    assert man["inputs"]["base"]["label"] == "org/base"
    assert man["inputs"]["base"]["hub"] == {"repo_id": "org/base", "revision": None,
                                            "commit": hub["commits"]["base"]["main"]}
    assert man["inputs"]["models"][1]["label"] == "org/ft-1"


def test_a_revision_by_tag_or_commit_prefix(hub, tmp_path):
    v1 = hub["commits"]["ft1"]["v1"]
    by_tag = tiesmerge.merge("org/base", ["org/ft-0", "org/ft-1@v1"], "ties")
    by_commit = tiesmerge.merge("org/base", ["org/ft-0", f"org/ft-1@{v1[:9]}"], "ties")
    base, fts, ft_v1 = hub["states"]
    want = tiesmerge.merge(base, [fts[0], ft_v1], "ties")
    for got in (by_tag, by_commit):
        for k in want:
            assert torch.equal(got[k], want[k]), k
    assert str(resolve_repo("org/ft-1", "v1")).endswith(v1)
    out = tiesmerge.merge("org/base@main", ["org/ft-0", "org/ft-1"], "ties", output=tmp_path / "o")
    assert "at revision `main`" in (out / "README.md").read_text()


def test_a_missing_model_or_revision_names_the_cache_and_the_command(hub):
    with pytest.raises(CheckpointError) as info:
        tiesmerge.plan_merge("org/base", ["org/ft-0", "org/absent"], "ties")
    assert str(hub["cache"]) in str(info.value) and "models--org--absent" in str(info.value)
    assert "hf download org/absent" in info.value.hint
    with pytest.raises(CheckpointError) as info:
        tiesmerge.plan_merge("org/base", ["org/ft-0", "org/ft-1@v9"], "ties")
    assert "not this revision" in str(info.value) and "v1" in str(info.value)
    assert "--revision v9" in info.value.hint


def test_a_local_directory_of_the_same_name_wins(hub):
    base, fts, _ = hub["states"]
    local = {k: v + 1 if v.is_floating_point() else v for k, v in fts[0].items()}
    write_hf_dir(Path("org") / "ft-0", local)  # ./org/ft-0 beside the cached org/ft-0
    got = tiesmerge.merge("org/base", ["org/ft-0", "org/ft-1"], "task_arithmetic", lam=1.0)
    want = tiesmerge.merge(base, [local, fts[1]], "task_arithmetic", lam=1.0)
    assert torch.equal(got["model.norm.weight"], want["model.norm.weight"])


def test_repo_ids_are_told_from_paths():
    assert split_repo_id("org/name") == ("org", "name", None)
    assert split_repo_id("meta-llama/Llama-3.1-8B@refs/pr/1") == ("meta-llama", "Llama-3.1-8B", "refs/pr/1")
    for path in ("./org/name", "/abs/name", "a/b/c", "org/..", "../x", "name"):
        assert split_repo_id(path) is None, path


def test_the_cli_and_a_recipe_take_names(hub, tmp_path, capsys):
    code, out, err = run_cli(["merge", "--base", "org/base", "--model", "org/ft-0", "--model", "org/ft-1@v1",
                              "-o", tmp_path / "cli"], capsys)
    assert code == 0, err
    # the card and the manifest name the models by their repo ids, as the API's do (hostile pass 8, F18)
    card = (tmp_path / "cli" / "README.md").read_text()
    assert "base_model: org/base" in card and "/snapshots/" not in card.split("---")[1], card
    man = json.loads((tmp_path / "cli" / "tiesmerge.json").read_text())
    assert man["inputs"]["base"]["label"] == "org/base" and man["inputs"]["models"][1]["label"] == "org/ft-1@v1"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("method: ties\nbase: org/base\nmodels: [org/ft-0, org/ft-1]\n")
    code, out, err = run_cli(["validate", recipe], capsys)
    assert code == 0 and "does not exist" not in out, out
    code, out, err = run_cli(["merge", recipe, "-o", tmp_path / "rec"], capsys)
    assert code == 0, err
    code, out, err = run_cli(["merge", "--base", "org/base", "--model", "org/ft-0", "--model", "org/nope",
                              "-o", tmp_path / "x"], capsys)
    assert code != 0 and "hf download org/nope" in err


def test_resolving_never_imports_a_downloader(hub):
    code = ("import sys, tiesmerge\n"
            "tiesmerge.plan_merge('org/base', ['org/ft-0', 'org/ft-1@v1'], 'ties')\n"
            "bad = [m for m in sys.modules if m.startswith(('huggingface_hub', 'requests', 'urllib3', 'httpx'))]\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ}, cwd=os.getcwd())


def test_every_command_takes_repo_ids(hub, tmp_path, capsys):
    """Hostile pass 3 (c339-c345): merge took org/name, but tune, search, analyze, stats, adapt and
    --sign-from said 'no such file'."""
    (tmp_path / "work" / "ev_ids.py").write_text("def score(state):\n    return 0.5\n")
    flags = ["--base", "org/base", "--model", "org/ft-0", "--model", "org/ft-1"]
    runs = {"tune": ["tune", *flags, "--evaluator", "ev_ids:score", "--grid", "density=0.5", "--grid", "lam=1"],
            "search": ["search", *flags, "--evaluator", "ev_ids:score", "--grid", "density=0.5", "--grid", "lam=1",
                       "--dir", tmp_path / "s"],
            "analyze": ["analyze", *flags, "-o", tmp_path / "a", "--no-progress"],
            "sign_from": ["merge", *flags, "--method", "ties", "--sign-from", "org/ft-1", "-o", tmp_path / "m",
                          "--no-progress"]}
    try:
        for name, argv in runs.items():
            code, out, err = run_cli(argv, capsys)
            assert code == 0, (name, err)
    finally:
        sys.modules.pop("ev_ids", None)
    manifest = json.loads((tmp_path / "m" / "tiesmerge.json").read_text())
    assert "org/ft-1" in json.dumps(manifest["recipe"])


def test_a_commit_prefix_too_short_says_so(hub):
    """Hostile pass 11 F10: `org/ft-1@0f0f` (4 digits of an existing snapshot) said the cache did not hold that
    revision while listing the snapshot that starts with it."""
    from tiesmerge.errors import CheckpointError

    v1 = hub["commits"]["ft1"]["v1"]
    with pytest.raises(CheckpointError, match="a commit prefix needs at least 7 hex digits") as caught:
        resolve_repo("org/ft-1", v1[:4])
    assert v1[:12] in str(caught.value) and caught.value.hint == "give 7 or more digits of the commit"
