"""What the second independent hostile pass of issue 13 left open, one case each (checked as the
catalogue checks its cases: exit status, message, no traceback, nothing left, inputs unchanged):

- a repo id whose revision walks out of the cache is named as a bad revision, not blamed on -o;
- ``--force`` deletes no file a user added to an earlier output (each output lists its files);
- matplotlib and torch write their caches into private folders removed at exit, not under
  ``~`` or ``$TMPDIR``;
- a file-size limit (``ulimit -f``) met while writing a report names the file;
- a ``--memory-budget`` the plan cannot keep is refused by every command that merges.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import test_hostile_catalogue
from helpers_ckpt import run_cli
from test_hostile_catalogue import _merge, _run, check, snapshot
from tiesmerge.errors import CheckpointError
from tiesmerge.hub import split_repo_id
from tiesmerge.paths import unlisted_files

# the catalogue's fixture: inputs/base, inputs/ft0, inputs/ft1 and a working folder of the user's own
family = test_hostile_catalogue.family


# ------------------------------------------------------------------ a revision that walks out


@pytest.mark.parametrize("text", ["org/n@../../..", "org/n@main/../..", "org/n@/etc", "org/n@a//b", "org/n@main/"])
def test_a_revision_that_walks_out_of_the_cache_is_named(text):
    with pytest.raises(CheckpointError, match="is not a revision"):
        split_repo_id(text)


def test_a_revision_that_walks_out_is_blamed_on_the_model_not_the_output(family, capsys):
    inputs, b, ms = family
    before = snapshot(inputs)
    rc, err = _run(["merge", "--base", str(b), "--model", "org/n@../../..", "--model", str(ms[0]), "-o", "out",
                    "--no-progress"], capsys)
    check(rc, err, want_rc=1, needle=("org/n@../../..", "is not a revision"), output=Path("out"), inputs=inputs,
          before=before)
    assert "output" not in err.split("hint:")[0]


# ------------------------------------------------------------------ --force and a user's files


def test_force_keeps_an_earlier_output_that_holds_a_users_file(family, capsys):
    inputs, b, ms = family
    assert _run(_merge(b, ms, "out"), capsys)[0] == 0
    manifest = json.loads(Path("out/tiesmerge.json").read_text())
    assert "tiesmerge.json" in manifest["written"] and "README.md" in manifest["written"]
    assert unlisted_files(Path("out").absolute()) == []
    Path("out/my_eval_notes.txt").write_text("hours of the user's work")
    (Path("out") / "plots").mkdir()
    Path("out/plots/curve.png").write_bytes(b"png")
    before, kept = snapshot(inputs), snapshot(Path("out"))
    rc, err = _run(_merge(b, ms, "out", "--force"), capsys)
    check(rc, err, want_rc=1, needle=("2 file(s) that this output's manifest does not list", "my_eval_notes.txt",
                                      "plots/curve.png", "move them out"),
          output=None, inputs=inputs, before=before)
    assert snapshot(Path("out")) == kept
    os.remove("out/my_eval_notes.txt")
    os.remove("out/plots/curve.png")
    os.rmdir("out/plots")
    assert _run(_merge(b, ms, "out", "--force"), capsys)[0] == 0  # only tiesmerge's own files: replaced


def test_force_keeps_a_statistics_folder_that_holds_a_users_file(tmp_path):
    import torch

    from tiesmerge.errors import OutputError
    from tiesmerge.stats.files import Statistics, StatsManifest, save_stats

    stats = Statistics(StatsManifest("fisher", 1), {"w": torch.ones(2)})
    out = tmp_path / "fisher"
    save_stats(out, stats)
    assert unlisted_files(out) == []
    (out / "notes.md").write_text("mine")
    with pytest.raises(OutputError, match="notes.md"):
        save_stats(out, stats, force=True)
    assert (out / "notes.md").read_text() == "mine"


# ------------------------------------------------------------------ caches outside the output


def _clean_env(tmp_path: Path) -> tuple[dict[str, str], list[Path]]:
    home, tmp = tmp_path / "home", tmp_path / "tmp"
    home.mkdir()
    tmp.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("MPLCONFIGDIR", "TORCHINDUCTOR_CACHE_DIR",
                                                            "XDG_CACHE_HOME", "XDG_CONFIG_HOME")}
    env.update(HOME=str(home), TMPDIR=str(tmp), TIESMERGE_DIGEST_CACHE="0")
    return env, [home, tmp]


def test_the_console_script_leaves_no_matplotlib_or_torch_cache_behind(family, tmp_path):
    pytest.importorskip("matplotlib")
    inputs, b, ms = family
    env, watched = _clean_env(tmp_path)
    # the console script's own entry (it leaves with os._exit), plotting an analysis and reaching
    # torch._dynamo, which creates $TMPDIR/torchinductor_<user> when first imported
    script = textwrap.dedent(f"""
        import sys
        import importlib
        cli = importlib.import_module("tiesmerge.cli.main")
        sys.argv = ["tiesmerge", "analyze", "--base", {str(b)!r}, "--model", {str(ms[0])!r},
                    "--model", {str(ms[1])!r}, "-o", "report", "--no-progress"]
        real_main = cli.main
        def main():
            code = real_main()
            import torch._dynamo  # noqa: F401
            return code
        cli.main = main
        cli.entry()
    """)
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert Path("report/report.html").is_file()
    for folder in watched:
        assert list(folder.rglob("*")) == [], f"written under {folder}: {list(folder.rglob('*'))}"


def test_plotting_from_the_library_removes_its_folder_at_exit(tmp_path):
    pytest.importorskip("matplotlib")
    env, watched = _clean_env(tmp_path)
    script = ("from tiesmerge.plotting import pyplot\nimport os\nplt = pyplot('a test')\n"
              "fig = plt.figure(); fig.gca().plot([1, 2]); fig.savefig(os.devnull, format='png')\n"
              "print(os.environ['MPLCONFIGDIR'])")
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().startswith(str(watched[1]))  # it was used: a private folder in $TMPDIR ...
    for folder in watched:  # ... and removed at exit
        assert list(folder.rglob("*")) == []


def test_a_folder_the_user_chose_for_matplotlib_is_kept(tmp_path):
    pytest.importorskip("matplotlib")
    env, _ = _clean_env(tmp_path)
    env["MPLCONFIGDIR"] = str(tmp_path / "mine")
    script = "from tiesmerge.plotting import pyplot\nimport os\npyplot('a test')\nprint(os.environ['MPLCONFIGDIR'])"
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.stdout.strip() == str(tmp_path / "mine") and (tmp_path / "mine").is_dir()


# ------------------------------------------------------------------ a file-size limit names the file


@pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_FSIZE semantics")
def test_a_file_size_limit_met_while_writing_a_report_names_the_file(tmp_path):
    script = textwrap.dedent(f"""
        import resource
        resource.setrlimit(resource.RLIMIT_FSIZE, (16, 16))
        from tiesmerge.errors import OutputError
        from tiesmerge.paths import write_file
        try:
            write_file({str(tmp_path / 'report.html')!r}, "x" * 4096)
        except OutputError as exc:
            print(exc.message)
            print(exc.hint)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert "report.html: cannot write it" in done.stdout and "file size limit" in done.stdout, done
    assert "ulimit -f" in done.stdout and "--shard-size" not in done.stdout
    assert list(tmp_path.iterdir()) == []  # the temporary file is gone too


# ------------------------------------------------------------------ the budget floor everywhere


@pytest.mark.parametrize("command", ["tune", "search", "analyze"])
def test_a_budget_below_the_floor_is_refused_by_every_command(family, tmp_path, capsys, command):
    inputs, b, ms = family
    (tmp_path / "work" / "ev_floor.py").write_text("def score(state):\n    return 0.5\n")
    sys.path.insert(0, str(tmp_path / "work"))
    try:
        flags = ["--base", str(b), "--model", str(ms[0]), "--model", str(ms[1]), "--memory-budget", "16B"]
        argv = {"tune": ["tune", *flags, "--evaluator", "ev_floor:score"],
                "search": ["search", *flags, "--evaluator", "ev_floor:score", "--dir", "runs"],
                "analyze": ["analyze", *flags, "-o", "report", "--no-progress"]}[command]
        before = snapshot(inputs)
        rc, err = _run(argv, capsys)
    finally:
        sys.path.remove(str(tmp_path / "work"))
        sys.modules.pop("ev_floor", None)
    check(rc, err, want_rc=2, needle=("memory budget 16 B is below", "--memory-budget"), output=Path("report"),
          inputs=inputs, before=before)
    assert not Path("runs/log.jsonl").exists()


# ------------------------------------------------------------------ the third pass: files transformers reads


def _tampered_copy(src: Path, dest: Path, name: str, how: str) -> Path:
    """A copy of the model directory ``src`` whose file ``name`` is a link to an outside copy
    (``how="link"``) or a FIFO (``how="fifo"``)."""
    import shutil

    shutil.copytree(src, dest)
    (dest / name).unlink()
    if how == "link":
        outside = dest.parent / f"outside-{dest.name}-{name}"
        shutil.copy(src / name, outside)
        (dest / name).symlink_to(outside)
    else:
        os.mkfifo(dest / name)
    return dest


@pytest.mark.parametrize("name", ["config.json", "tokenizer.json"])
@pytest.mark.parametrize("how", ["link", "fifo"])
@pytest.mark.parametrize("command", ["stats", "tune", "adapt"])
def test_model_files_that_leave_the_model_or_would_block_are_refused_before_transformers_reads_them(
        classifiers, tmp_path, command, name, how):
    """c047/c063-c073: transformers follows links (read outside the model) and blocks on a FIFO; every
    command that hands a directory to transformers checks its files first, naming the file."""
    root, base, fts, data = classifiers
    model = _tampered_copy(base if command != "stats" else fts[0], tmp_path / "m", name, how)
    out = tmp_path / "out"
    if command == "stats":
        argv = ["stats", "gram", "--model", model, "--data", data, "-o", out]
    elif command == "tune":
        argv = ["tune", "--base", model, "--model", fts[0], "--model", fts[1], "--grid", "density=0.5",
                "--grid", "lam=1", "--evaluator", f"classifier-accuracy:{data}"]
    else:
        argv = ["adapt", "--base", model, "--model", fts[0], "--model", fts[1], "--data", data, "--data", data,
                "--task-names", "a", "b", "--steps", "1", "-o", out]
    # a subprocess with a timeout: a FIFO that is opened would block for ever
    done = subprocess.run([sys.executable, "-m", "tiesmerge", *map(str, argv)], capture_output=True, text=True,
                          timeout=240, cwd=tmp_path)
    assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr
    want = "outside" if how == "link" else "a FIFO"
    assert f"{name} " in done.stderr and want in done.stderr, done.stderr
    assert not out.exists()


def test_a_dry_run_checks_the_files_it_would_copy(family, tmp_path, capsys):
    """c061: a real run refused a config.json linked to outside the base; the dry run said nothing."""
    inputs, b, ms = family
    outside = tmp_path / "outside.json"
    outside.write_text((b / "config.json").read_text())
    (b / "config.json").unlink()
    (b / "config.json").symlink_to(outside)
    before = snapshot(inputs)
    rc, err = _run(["merge", "--base", str(b), "--model", str(ms[0]), "--model", str(ms[1]), "-o", "out",
                    "--dry-run"], capsys)
    check(rc, err, want_rc=1, needle=("config.json", "outside"), output=Path("out"), inputs=inputs, before=before)


def test_an_output_inside_an_inputs_cache_blobs_is_refused(family, tmp_path, capsys, monkeypatch):
    """c007: a model named by repo id lives in the cache's blobs folder (its snapshot holds links):
    -o inside that blobs folder wrote into the input."""
    import shutil

    inputs, b, ms = family
    cache = tmp_path / "hub"
    repo = cache / "models--org--a"
    commit = "a" * 40
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    for f in ms[0].iterdir():
        blob = repo / "blobs" / f"blob-{f.name}"
        shutil.copy(f, blob)
        (snap / f.name).symlink_to(blob)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    before = snapshot(repo)
    rc, err = _run(["merge", "--base", str(b), "--model", "org/a", "--model", str(ms[1]), "-o",
                    str(repo / "blobs" / "x"), "--no-progress"], capsys)
    check(rc, err, want_rc=1, needle=("lies inside model 0", "blobs"), output=repo / "blobs" / "x", inputs=repo,
          before=before)


def test_force_never_replaces_a_users_file_named_as_the_scores(family, tmp_path, capsys):
    """c028/c029b: --json with --force overwrote a user's text file; --force replaces only our scores."""
    inputs, b, ms = family
    (tmp_path / "work" / "ev_keep.py").write_text("def score(state):\n    return 0.5\n")
    sys.path.insert(0, str(tmp_path / "work"))
    try:
        Path("keep.txt").write_text("the user's results")
        argv = ["tune", "--base", str(b), "--model", str(ms[0]), "--model", str(ms[1]), "--evaluator", "ev_keep:score",
                "--grid", "density=0.5", "--grid", "lam=1", "--json", "keep.txt", "--force"]
        rc, err = _run(argv, capsys)
        assert rc == 1 and "tiesmerge did not write" in err and Path("keep.txt").read_text() == "the user's results"
        argv[-2] = "scores.json"
        assert _run(argv, capsys)[0] == 0
        assert _run(argv, capsys)[0] == 0  # our own scores: replaced with --force
        assert json.loads(Path("scores.json").read_text())["method"] == "ties"
    finally:
        sys.path.remove(str(tmp_path / "work"))
        sys.modules.pop("ev_keep", None)


# ------------------------------------------------------------------ the third pass: limits and messages


def test_a_long_but_legal_scores_name_is_written(tmp_path):
    """c183: the temporary sibling '.NAME.XXXX.tmp' of a 250-byte --json passed 255 bytes: the whole
    tune ran, then its scores could not be written."""
    from tiesmerge.paths import write_file

    target = tmp_path / ("x" * 250 + ".json")
    write_file(target, "{}\n")
    assert target.read_text() == "{}\n" and [p.name for p in tmp_path.iterdir()] == [target.name]


def test_the_default_checkpoint_of_a_long_output_name_fits_the_file_system(tmp_path):
    """c184: a valid -o of 250 bytes made OUTPUT.adapt-checkpoint.safetensors too long to create."""
    from tiesmerge.adamerging.run import default_checkpoint

    out = tmp_path / ("é" * 125)  # 250 bytes
    ck = default_checkpoint(out)
    assert len(os.fsencode(ck.name)) <= 255 and ck.name.endswith(".adapt-checkpoint.safetensors")
    ck.write_text("")  # the file system takes it
    assert default_checkpoint(tmp_path / "merged").name == "merged.adapt-checkpoint.safetensors"
    assert default_checkpoint(out) == ck and default_checkpoint(tmp_path / ("é" * 124 + "a")) != ck


@pytest.mark.parametrize("argv,needle", [
    (["--device", "cpu:99"], "the CPU takes no index"),                                          # c203
    (["--method", "dare_linear", "--seed", str(2 ** 64)], "seed must be an integer in [0, 2**63)"),  # c209
])
def test_values_that_would_be_silently_changed_are_refused(family, capsys, argv, needle):
    inputs, b, ms = family
    before = snapshot(inputs)
    rc, err = _run(["merge", "--base", str(b), "--model", str(ms[0]), "--model", str(ms[1]), "-o", "out",
                    "--no-progress", *argv], capsys)
    check(rc, err, want_rc=rc or 1, needle=needle, output=Path("out"), inputs=inputs, before=before)
    assert rc in (1, 2)


@pytest.mark.parametrize("extra,needle", [
    (["--strategy", "random", "--budget", "999999999999", "--axis", "lam"], "more candidates than any search"),
    (["--strategy", "random", "--budget", "4", "--range", "lam=-1e308:1e308", "--axis", "lam"],
     "their difference must be finite"),
])
def test_a_search_that_could_never_run_is_refused_before_it_starts(family, tmp_path, capsys, extra, needle):
    """c213/c222: a budget of 10**12 allocated 7 TiB of proposals (MemoryError, 'a bug'); c227: finite
    bounds whose width overflows made every candidate infinite, blamed on the candidates."""
    inputs, b, ms = family
    (tmp_path / "work" / "ev_never.py").write_text("def score(state):\n    return 0.5\n")
    sys.path.insert(0, str(tmp_path / "work"))
    try:
        before = snapshot(inputs)
        rc, err = _run(["search", "--base", str(b), "--model", str(ms[0]), "--model", str(ms[1]), "--evaluator",
                        "ev_never:score", "--dir", "runs", *extra], capsys)
    finally:
        sys.path.remove(str(tmp_path / "work"))
        sys.modules.pop("ev_never", None)
    check(rc, err, want_rc=rc or 2, needle=needle, output=None, inputs=inputs, before=before)
    assert rc in (1, 2) and not Path("runs/log.jsonl").exists()


def test_every_error_of_a_bad_file_or_evaluator_comes_with_a_hint(family, tmp_path, capsys):
    """c029, c047, c138: errors with no hint line; c141: an alias bomb's message wrapped twice."""
    inputs, b, ms = family
    flags = ["--base", str(b), "--model", str(ms[0]), "--model", str(ms[1])]
    rc, err = _run(["tune", *flags, "--evaluator", "no_such_module_here:score"], capsys)
    assert rc == 2 and "hint: the module must be importable" in err and "classifier-accuracy" in err
    rc, err = _run(["tune", *flags, "--evaluator", "nope-accuracy:a.jsonl"], capsys)  # c333
    assert rc == 2 and "'nope-accuracy' is not a built-in evaluator (they are classifier-accuracy," in err
    deep = tmp_path / "deep.yaml"
    deep.write_text("a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [{', '.join(['*' + p] * 10)}]\n" for p, c in zip("abcdefg", "bcdefgh")))
    rc, err = _run(["validate", str(deep)], capsys)
    assert rc == 2 and err.count("error:") == 1 and "YAML that tiesmerge cannot read" not in err
    assert "hint:" in err and "hint:" not in err.split("\n")[0]
    (b / "config.json").write_text("[" * 100 + "]" * 100)
    rc, err = _run(["merge", *flags, "-o", "out", "--no-progress"], capsys)
    assert rc != 0 and "nested" in err and "hint: the file is damaged" in err


def test_a_local_folder_that_shadows_a_cached_repo_id_is_named(family, capsys, monkeypatch, tmp_path):
    """c096: ./org/a (empty) stood for the cached org/a, and the message did not say so (said only where the cache
    holds org/a: pass 17 F7, the hint named a cache that did not hold it)."""
    inputs, b, ms = family
    Path("org/a").mkdir(parents=True)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    rc, err = _run(["merge", "--base", str(b), "--model", "org/a", "--model", str(ms[1]), "-o", "out"], capsys)
    assert rc == 1 and "no model weights found" in err and "a local path always wins" not in err
    (tmp_path / "hub" / "models--org--a").mkdir(parents=True)
    rc, err = _run(["merge", "--base", str(b), "--model", "org/a", "--model", str(ms[1]), "-o", "out"], capsys)
    assert rc == 1 and "no model weights found" in err and "a local path always wins" in err


def test_a_meta_tensor_in_a_state_dict_is_named():
    """c123: the API passed torch's 'Cannot copy out of meta tensor' through."""
    import torch

    import tiesmerge
    from tiesmerge.errors import CheckpointError as Err

    base = {"w": torch.zeros(2, 2)}
    with pytest.raises(Err, match="'w' is on the meta device"):
        tiesmerge.merge(base, [{"w": torch.empty(2, 2, device="meta")}, {"w": torch.ones(2, 2)}])


# ------------------------------------------------------------------ the third pass: demo, streams, adapters, cache


@pytest.mark.parametrize("where", ["model", "user_folder", "cwd"])
def test_the_demo_never_writes_into_a_model_or_a_folder_of_the_users(family, capsys, where):
    """c299-c301: --workdir of an existing model (or '.') had the demo's base/config.json written over
    the user's files."""
    inputs, b, ms = family
    if where == "user_folder":
        Path("mine/base").mkdir(parents=True)
        Path("mine/base/NOTES.txt").write_text("mine")
    workdir = {"model": str(ms[0]), "user_folder": "mine", "cwd": "."}[where]
    before, work = snapshot(inputs), snapshot(Path.cwd())
    rc, err = _run(["demo", "--synthetic", "--params", "1", "--workdir", workdir], capsys)
    assert rc == 1 and "Traceback" not in err and ("did not write" in err or "working" in err), err
    assert snapshot(inputs) == before and snapshot(Path.cwd()) == work


def test_the_demo_may_reuse_its_own_workdir_and_checks_its_size(capsys, tmp_path, monkeypatch):
    """c302/c303: --params 1e12 started generating a trillion parameters; --params -1 ran silently."""
    monkeypatch.chdir(tmp_path)
    for params in ("-1", "1e12", "nan"):
        rc, err = _run(["demo", "--synthetic", "--params", params], capsys)
        assert rc == 2 and "between 0.01 and 10,000" in err, err
    assert _run(["demo", "--synthetic", "--params", "0.05", "--workdir", "d"], capsys)[0] == 0
    assert _run(["demo", "--synthetic", "--params", "0.05", "--workdir", "d"], capsys)[0] == 0  # its own folder


def test_closed_or_full_standard_streams_are_no_crash(family, tmp_path):
    """c320: `2>&-` (a cron job) crashed with 'NoneType has no attribute isatty' after the merge; c317: a
    full standard output was reported as a disk error at the output."""
    inputs, b, ms = family
    script = ("import sys\nfrom tiesmerge.cli.main import main\nsys.stderr = None\n"
              f"sys.exit(main(['merge', '--base', {str(b)!r}, '--model', {str(ms[0])!r}, '--model', {str(ms[1])!r}, "
              f"'-o', {str(tmp_path / 'o')!r}]))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240)
    assert done.returncode == 0 and (tmp_path / "o" / "tiesmerge.json").is_file(), done.stdout + done.stderr
    if os.path.exists("/dev/full"):
        with open("/dev/full", "w") as full:
            done = subprocess.run([sys.executable, "-m", "tiesmerge", "methods"], stdout=full, stderr=subprocess.PIPE,
                                  text=True, timeout=240)
        assert done.returncode == 1 and "cannot write to standard output" in done.stderr, done.stderr


@pytest.mark.parametrize("how", ["fifo", "dangling", "folder", "outside"])
def test_an_adapter_config_that_is_not_a_regular_file_inside_is_named(lora_family, tmp_path, capsys, how):
    """c279-c281: an adapter_config.json FIFO, dangling link or folder was skipped and the adapter
    misread as a full model ('tensor names differ')."""
    _, b, dirs, _ = lora_family
    config = dirs[0] / "adapter_config.json"
    saved = config.read_text()
    config.unlink()
    if how == "fifo":
        os.mkfifo(config)
    elif how == "dangling":
        config.symlink_to(tmp_path / "nowhere.json")
    elif how == "folder":
        config.mkdir()
    else:
        (tmp_path / "elsewhere.json").write_text(saved)
        config.symlink_to(tmp_path / "elsewhere.json")
    rc, err = _run(["merge", "--base", str(b), "--model", str(dirs[0]), "--model", str(dirs[1]), "-o",
                    str(tmp_path / "o"), "--no-progress"], capsys)
    assert rc == 1 and "adapter_config.json" in err and "tensor names differ" not in err, err
    assert "Traceback" not in err and not (tmp_path / "o").exists()


def test_an_adapter_rank_above_the_matrices_and_an_option_given_twice_are_refused(lora_family, tmp_path, capsys):
    """c282: --rank 999 on 16 x 16 modules wrote factors larger than the matrices; c261: 'ties:density=0.1,
    density=0.3' silently took the last."""
    _, b, dirs, _ = lora_family
    rc, err = _run(["merge", "--base", str(b), "--model", str(dirs[0]), "--model", str(dirs[1]), "-o",
                    str(tmp_path / "o"), "--output-format", "adapter", "--rank", "999", "--no-progress"], capsys)
    assert rc == 2 and "rank 999 is more than" in err and not (tmp_path / "o").exists(), err
    from tiesmerge.api import method_of_spec
    from tiesmerge.errors import ConfigError

    with pytest.raises(ConfigError, match="density is given twice"):
        method_of_spec("ties:density=0.1,density=0.3")


@pytest.mark.parametrize("where", ["model", "output"])
def test_the_digest_cache_is_never_written_into_an_input_or_the_output(family, capsys, monkeypatch, where):
    """c263-c266: TIESMERGE_CACHE_DIR (or XDG_CACHE_HOME) inside a model wrote digests.json into it;
    at the output, it made the output look like someone else's folder."""
    inputs, b, ms = family
    monkeypatch.setenv("TIESMERGE_CACHE_DIR", str(ms[0]) if where == "model" else str(Path("out").absolute()))
    before = snapshot(inputs)
    assert _run(_merge(b, ms, "out"), capsys)[0] == 0
    assert snapshot(inputs) == before and not Path("out/digests.json").exists()


def test_an_analysis_that_keeps_nothing_says_so_instead_of_zero_over_zero(family, capsys):
    """c294: --density 1e-30 printed '0.0% of the parameters that two or more models keep conflict'
    and named a 'most conflicted' tensor at 0.0%."""
    inputs, b, ms = family
    rc, out, err = run_cli(["analyze", "--base", b, "--model", ms[0], "--model", ms[1], "-o", "report",
                            "--density", "1e-30", "--no-progress"], capsys)
    assert rc == 0, err
    assert "nothing to compare" in out and "most conflicted" not in out and "keep conflict" not in out


@pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_FSIZE semantics")
def test_a_file_size_limit_inside_an_output_names_the_file_and_no_merge_option(family, tmp_path):
    """c273-c276: analyze under `ulimit -f` named the output folder and suggested merge's --shard-size."""
    inputs, b, ms = family
    script = textwrap.dedent(f"""
        import resource, sys
        resource.setrlimit(resource.RLIMIT_FSIZE, (5 * 512, 5 * 512))
        from tiesmerge.cli.main import main
        sys.exit(main(["analyze", "--base", {str(b)!r}, "--model", {str(ms[0])!r}, "--model", {str(ms[1])!r},
                       "-o", {str(tmp_path / 'uf')!r}, "--no-progress"]))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240)
    assert done.returncode == 1, done.stderr
    assert f"{tmp_path / 'uf'}/" in done.stderr and "--shard-size" not in done.stderr, done.stderr
    assert not (tmp_path / "uf").exists() and not list(tmp_path.glob(".tiesmerge-*"))


def test_a_search_resumed_with_another_evaluator_or_changed_weights_is_another_search(family, tmp_path, capsys):
    """c351/c352: the log was resumed silently, mixing the old evaluator's (or the old weights') scores
    with the new ones, and the best merge was chosen across both."""
    from safetensors.torch import load_file, save_file

    inputs, b, ms = family
    work = tmp_path / "work"
    (work / "ev_first.py").write_text("def score(state):\n    return 1.0\ndef other(state):\n    return -2.0\n")
    sys.path.insert(0, str(work))
    try:
        argv = ["search", "--base", str(b), "--model", str(ms[0]), "--model", str(ms[1]), "--grid", "density=0.5",
                "--grid", "lam=1", "--dir", "runs"]
        assert _run([*argv, "--evaluator", "ev_first:score"], capsys)[0] == 0
        rc, err = _run([*argv, "--evaluator", "ev_first:other"], capsys)
        assert rc == 2 and "the log of another search" in err and "evaluator" in err, err
        weights = ms[0] / "model.safetensors"
        state = load_file(str(weights))
        save_file({k: v * 1.5 for k, v in state.items()}, str(weights))  # replaced at the same path
        rc, err = _run([*argv, "--evaluator", "ev_first:score"], capsys)
        assert rc == 2 and "weights" in err, err
    finally:
        sys.path.remove(str(work))
        sys.modules.pop("ev_first", None)


def test_a_deleted_working_directory_is_named(tmp_path):
    """c354/c355: a deleted working folder gave 'No such file or directory' or 'a symbolic link loop'."""
    gone = tmp_path / "gone"
    gone.mkdir()
    script = (f"import os, sys\nos.chdir({str(gone)!r})\nos.rmdir({str(gone)!r})\n"
              "from tiesmerge.cli.main import main\nsys.exit(main(['methods']))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "the working directory no longer exists" in done.stderr, done.stderr


def test_a_model_read_as_text_without_a_tokenizer_is_refused(classifiers, tmp_path, capsys):
    """c372: with no tokenizer files transformers built an empty tokenizer; statistics, scores and
    adaptation ran on inputs of unknown tokens only, silently."""
    import shutil

    root, base, fts, data = classifiers
    bare = tmp_path / "bare"
    shutil.copytree(fts[0], bare)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (bare / name).exists():
            (bare / name).unlink()
    rc, err = _run(["stats", "gram", "--model", str(bare), "--data", str(data), "-o", str(tmp_path / "o")], capsys)
    assert rc == 1 and "holds no tokenizer" in err and not (tmp_path / "o").exists(), err


def test_a_killed_runs_scratch_folder_is_removed_by_the_next_run(tmp_path):
    """c358: SIGKILL left $TMPDIR/tiesmerge-torch-XXXX for ever."""
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    from tiesmerge.scratch import host_tag

    stale = tmp_path / f"tiesmerge-torch-{host_tag()}-{dead.stdout.strip()}-abc123"
    (stale / "sub").mkdir(parents=True)  # torch's folder, as torch leaves it: no file in it
    marked = tmp_path / f"tiesmerge-numba-{host_tag()}-{dead.stdout.strip()}-abc124"
    marked.mkdir()
    (marked / ".tiesmerge-temporary").touch()  # as tiesmerge makes its own (scratch.MARK)
    (marked / "x").write_text("left by a killed run")
    # a user's folder of such a name, holding data and no mark, is never removed (a known-left item of hp62)
    users = tmp_path / f"tiesmerge-torch-{host_tag()}-{dead.stdout.strip()}-mine"
    users.mkdir()
    (users / "notes.txt").write_text("mine")
    # sixth pass (pf1): a folder of another host sharing TMPDIR (its pid means nothing here) is never removed
    elsewhere = tmp_path / f"tiesmerge-torch-{'0' * 8 if host_tag() != '0' * 8 else '1' * 8}-{dead.stdout.strip()}-abc"
    elsewhere.mkdir()
    done = subprocess.run([sys.executable, "-m", "tiesmerge", "methods"], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and not stale.exists() and not marked.exists(), done.stderr
    assert sorted(tmp_path.iterdir()) == sorted([elsewhere, users]) and (users / "notes.txt").read_text() == "mine"


def test_a_tokenizer_config_naming_a_missing_file_is_a_typed_error(classifiers, tmp_path, capsys):
    """c371: tokenizer_config.json naming a tokenizer_file that is not there: 'unexpected ValueError ... a bug'."""
    import shutil

    root, base, fts, data = classifiers
    model = tmp_path / "m"
    shutil.copytree(fts[0], model)
    (model / "tokenizer.json").unlink()
    config = json.loads((model / "tokenizer_config.json").read_text())
    config["tokenizer_file"] = str(tmp_path / "nowhere" / "tokenizer.json")
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    (model / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\nw0\n")
    rc, err = _run(["stats", "gram", "--model", str(model), "--data", str(data), "-o", str(tmp_path / "o")], capsys)
    assert rc in (0, 1) and "Traceback" not in err and "a bug" not in err, err


def test_hints_on_the_last_messages_without_one(family, capsys):
    """F13: `--shard-size 0` and an over-long output name printed no hint; F5: a base config.json
    linked outside the model was parsed ('not valid JSON') before the link was refused."""
    inputs, b, ms = family
    flags = ["--base", str(b), "--model", str(ms[0]), "--model", str(ms[1])]
    rc, err = _run(["merge", *flags, "-o", "out", "--shard-size", "0"], capsys)
    assert rc == 2 and "hint: fix each value named" in err
    rc, err = _run(["merge", *flags, "-o", "y" * 300], capsys)
    assert rc == 1 and "hint: use a shorter name" in err
    outside = Path("outside.txt")
    outside.write_text("not json at all")
    (b / "config.json").unlink()
    (b / "config.json").symlink_to(outside.absolute())
    rc, err = _run(["merge", *flags, "-o", "out", "--no-progress"], capsys)
    assert rc == 1 and "outside" in err and "not valid JSON" not in err, err


@pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_FSIZE semantics")
def test_a_shard_too_large_suggests_only_options_the_command_has(classifiers, tmp_path):
    """F25: stats (and adapt) under `ulimit -f` suggested merge's --shard-size."""
    root, base, fts, data = classifiers
    script = textwrap.dedent(f"""
        import resource, sys
        resource.setrlimit(resource.RLIMIT_FSIZE, (20 * 512, 20 * 512))
        from tiesmerge.cli.main import main
        sys.exit(main(["stats", "gram", "--model", {str(fts[0])!r}, "--data", {str(data)!r},
                       "-o", {str(tmp_path / "st")!r}]))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240)
    assert done.returncode != 0 and "--shard-size" not in done.stderr and "ulimit -f" in done.stderr, done.stderr
