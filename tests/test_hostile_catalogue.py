"""Hostile and careless input through the command line, one case per failure class of issue 13
(and the cases that already passed), each checked the same way: the exit status, the message,
no traceback, nothing left at or beside the output path, and every input's bytes unchanged.

Cross-cutting (paths, readers, writer, recipes, adapters, CLI): it is the catalogue a second
hostile review reads. Cases that would hang a broken build (a FIFO, a backtracking regex) or
need a signal run the CLI in a subprocess with a timeout.

Why over 400 lines: one function per hostile case, each a few lines, kept in one catalogue.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import stat
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers_adapters import random_lora, write_lora_dir
from helpers_ckpt import (
    cli_flags,
    leftovers,
    make_base,
    make_family,
    run_cli,
    write_earlier_manifest,
    write_hf_dir,
    write_pickle,
)
from tiesmerge.stats.files import Statistics, StatsManifest, save_stats

# ------------------------------------------------------------------ the common checks


def snapshot(root: Path) -> dict[str, tuple]:
    """Every entry under ``root``, links not followed, FIFOs never opened: kind and content hash."""
    out: dict[str, tuple] = {}
    for folder, dirs, files in os.walk(root):
        for name in [*dirs, *files]:
            path = Path(folder) / name
            st = os.lstat(path)
            rel = str(path.relative_to(root))
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(path))
            elif stat.S_ISREG(st.st_mode):
                out[rel] = ("file", hashlib.sha256(path.read_bytes()).hexdigest())
            else:
                out[rel] = ("dir" if stat.S_ISDIR(st.st_mode) else "special",)
    return out


def check(rc: int, err: str, *, want_rc: int, needle: str | tuple[str, ...], output: Path | None,
          inputs: Path, before: dict, output_existed: bool = False) -> None:
    assert rc == want_rc, err
    for n in (needle,) if isinstance(needle, str) else needle:
        assert n in err, err
    assert "Traceback" not in err, err
    assert len(err) < 4000, f"message of {len(err)} characters"
    if output is not None:
        left = [p for p in leftovers(output) if not (output_existed and p == output.absolute())]
        assert not left, f"left behind: {left}"
    assert snapshot(inputs) == before, "an input changed"


@pytest.fixture
def family(tmp_path, monkeypatch):
    """inputs/base, inputs/ft0, inputs/ft1 (HF dirs) and a working directory of the user's own."""
    inputs = tmp_path / "inputs"
    base, fts = make_family(2)
    b = write_hf_dir(inputs / "base", base)
    ms = [write_hf_dir(inputs / f"ft{k}", ft) for k, ft in enumerate(fts)]
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("the user's own file")
    monkeypatch.chdir(work)
    return inputs, b, ms


def _merge(b, ms, out, *extra):
    return ["merge", *cli_flags(b, ms), "-o", str(out), "--no-progress", *extra]


def _run(argv, capsys):
    rc, _, err = run_cli(argv, capsys)
    return rc, err


# ------------------------------------------------------------------ 1. --force never destroys an input


@pytest.mark.parametrize("target", ["sign_from", "base_link", "inside_base"])
def test_force_never_replaces_or_writes_into_an_input(family, tmp_path, capsys, target):
    inputs, b, ms = family
    ref = write_hf_dir(inputs / "ref", make_family(2, seed=3)[1][0])
    write_earlier_manifest(ref)  # a merged model used as the reference: still an input
    (inputs / "link").symlink_to(b)
    out = {"sign_from": ref, "base_link": inputs / "link", "inside_base": b / "merged"}[target]
    before = snapshot(inputs)
    rc, err = _run(_merge(b, ms, out, "--force", "--sign-from", str(ref)), capsys)
    check(rc, err, want_rc=1, needle="input", output=None, inputs=inputs, before=before)


def test_force_never_replaces_statistics(family, capsys):
    inputs, b, ms = family
    names = list(load_file(str(b / "model.safetensors")))
    stats = []
    for k in range(2):
        tensors = {n: torch.ones(t.shape) for n, t in load_file(str(b / "model.safetensors")).items()
                   if t.is_floating_point() and n in names}
        stats.append(save_stats(inputs / f"stats{k}", Statistics(StatsManifest("fisher", 4), tensors)))
    before = snapshot(inputs)
    rc, err = _run(_merge(b, ms, stats[0], "--force", "--method", "fisher", "--stats", str(stats[0]),
                          "--stats", str(stats[1])), capsys)
    check(rc, err, want_rc=1, needle=("statistics", "input"), output=None, inputs=inputs, before=before)


@pytest.mark.parametrize("where", [".", "~", "..", "/"])
def test_force_never_replaces_the_working_home_or_root_folder(family, tmp_path, monkeypatch, capsys, where):
    inputs, b, ms = family
    monkeypatch.setenv("HOME", str(tmp_path / "work"))
    before, work_before = snapshot(inputs), snapshot(tmp_path / "work")
    rc, err = _run(_merge(b, ms, os.path.expanduser(where), "--force"), capsys)
    # the folders above the inputs are refused as holding them; the others as the user's folders
    check(rc, err, want_rc=1, needle="contains the base" if where in ("..", "/") else "never replaces", output=None,
          inputs=inputs, before=before)
    assert snapshot(tmp_path / "work") == work_before


def test_force_replaces_only_what_tiesmerge_wrote(family, tmp_path, capsys):
    inputs, b, ms = family
    out = tmp_path / "photos"
    out.mkdir()
    (out / "holiday.jpg").write_bytes(b"\xff\xd8 precious")
    before = snapshot(inputs)
    rc, err = _run(_merge(b, ms, out, "--force"), capsys)
    check(rc, err, want_rc=1, needle="only a directory that tiesmerge wrote", output=out, inputs=inputs,
          before=before, output_existed=True)
    assert (out / "holiday.jpg").read_bytes() == b"\xff\xd8 precious"
    # and a previous merge is replaced as before
    assert _run(_merge(b, ms, tmp_path / "merged"), capsys)[0] == 0
    rc, err = _run(_merge(b, ms, tmp_path / "merged", "--force", "--method", "average"), capsys)
    assert rc == 0, err


def test_stats_output_that_is_its_model_is_refused_before_anything(family, capsys):
    inputs, b, ms = family
    data = inputs / "data.jsonl"
    data.write_text('{"text": "a", "label": 0}\n')
    before = snapshot(inputs)
    rc, err = _run(["stats", "fisher", "--model", str(ms[0]), "--data", str(data), "-o", str(ms[0]), "--force"],
                   capsys)
    check(rc, err, want_rc=1, needle=("is the model", "input"), output=None, inputs=inputs, before=before)
    write_earlier_manifest(ms[1])  # a merged model: written by tiesmerge, and still an input
    before = snapshot(inputs)
    rc, err = _run(["stats", "fisher", "--model", str(ms[1]), "--data", str(data), "-o", str(ms[1]), "--force"],
                   capsys)
    check(rc, err, want_rc=1, needle=("is the model", "input"), output=None, inputs=inputs, before=before)


@pytest.mark.parametrize("command", ["analyze", "tune"])
def test_other_writing_commands_refuse_an_input_as_output(family, capsys, command):
    inputs, b, ms = family
    argv = {"analyze": ["analyze", *cli_flags(b, ms), "-o", str(ms[1]), "--force", "--no-progress"],
            "tune": ["tune", *cli_flags(b, ms), "--evaluator", "nowhere:score", "-o", str(ms[1]), "--force"]}[command]
    before = snapshot(inputs)
    rc, err = _run(argv, capsys)
    check(rc, err, want_rc=1, needle="input", output=None, inputs=inputs, before=before)


def _evaluator(folder: Path, name: str) -> Path:
    """A scoring module ``name`` in ``folder`` (a fresh name per test: imports are cached per name)."""
    sys.modules.pop(name, None)
    path = folder / f"{name}.py"
    path.write_text("CALLS = []\n\ndef score(state):\n    CALLS.append(1)\n    return 1.0\n")
    return path


@pytest.mark.parametrize("case,needle", [("existing", "did not write"), ("existing_force", "did not write"),
                                         ("evaluator", "evaluator"),
                                         ("base_file", "the base"), ("inside_output", "inside the output"),
                                         ("no_parent", "does not exist"),
                                         ("link", "never replaces a link")])  # (hp47 c56: it was replaced)
def test_tune_json_never_overwrites_an_input_nor_writes_through_a_link(family, tmp_path, capsys, case, needle):
    inputs, b, ms = family
    work = Path.cwd()
    ev = _evaluator(work, f"ev_json_{case}")
    (tmp_path / "target.txt").write_text("someone else's file")
    json_path = {"existing": work / "notes.txt", "existing_force": work / "notes.txt", "evaluator": ev,
                 "base_file": b / "config.json",
                 "inside_output": tmp_path / "out" / "scores.json", "no_parent": tmp_path / "nowhere" / "s.json",
                 "link": work / "scores.json"}[case]
    if case == "link":
        json_path.symlink_to(tmp_path / "target.txt")
    force = [] if case == "existing" else ["--force"]
    before, work_before = snapshot(inputs), snapshot(work)
    rc, out, err = run_cli(["tune", *cli_flags(b, ms), "--evaluator", f"ev_json_{case}:score", "--grid",
                            "density=0.5", "--json", str(json_path), "-o", str(tmp_path / "out"), *force], capsys)
    if case == "link":  # never replaced, --force included; its target is untouched
        assert json_path.is_symlink()
        json_path.unlink()  # (the working folder's snapshot below is of the folder as it was, without the link)
        work_before = {k: v for k, v in work_before.items() if "scores.json" not in str(k)}
    check(rc, err, want_rc=1, needle=needle, output=tmp_path / "out", inputs=inputs, before=before)
    assert "score" not in out and not getattr(sys.modules.get(f"ev_json_{case}"), "CALLS", [])  # before the tune
    assert snapshot(work) == work_before and (tmp_path / "target.txt").read_text() == "someone else's file"


@pytest.mark.parametrize("command", ["tune", "search"])
def test_an_output_holding_the_evaluator_module_is_refused_before_anything(family, tmp_path, capsys, command):
    inputs, b, ms = family
    out = tmp_path / "out"
    out.mkdir()
    write_earlier_manifest(out)  # an earlier merge: --force may replace it, not the evaluator
    name = f"ev_in_out_{command}"
    _evaluator(out, name)
    sys.path.insert(0, str(out))
    try:
        before, out_before = snapshot(inputs), snapshot(out)
        extra = ["--dir", str(tmp_path / "s")] if command == "search" else []
        rc, err = _run([command, *cli_flags(b, ms), "--evaluator", f"{name}:score", "--grid", "density=0.5",
                        *extra, "-o", str(out), "--force"], capsys)
    finally:
        sys.path.remove(str(out))
    # refused as a file tiesmerge did not write there (the listing), before it is seen as the evaluator
    check(rc, err, want_rc=1, needle=(f"{name}.py",), output=None, inputs=inputs, before=before)
    assert snapshot(out) == out_before and not (tmp_path / "s").exists()
    assert not getattr(sys.modules.get(name), "CALLS", [])


@pytest.mark.parametrize("case,needle", [("foreign", "not a tiesmerge search"), ("fifo", "FIFO"),
                                         ("link", "symbolic link"), ("same_as_output", "same or one holds")])
def test_search_dir_is_checked_before_the_search(family, tmp_path, capsys, case, needle):
    inputs, b, ms = family
    d = tmp_path / "s"
    d.mkdir()
    if case == "foreign":
        (d / "thesis.tex").write_text("mine")
    elif case == "fifo":
        os.mkfifo(d / "log.jsonl")
    elif case == "link":
        (tmp_path / "elsewhere.jsonl").write_text('{"format": "tiesmerge-search/1"}\n')
        (d / "log.jsonl").symlink_to(tmp_path / "elsewhere.jsonl")
    name = f"ev_dir_{case}"
    _evaluator(Path.cwd(), name)
    out = d if case == "same_as_output" else tmp_path / "out"
    before, d_before = snapshot(inputs), snapshot(d)
    rc, err = _run(["search", *cli_flags(b, ms), "--evaluator", f"{name}:score", "--grid", "density=0.5",
                    "--dir", str(d), "-o", str(out)], capsys)
    check(rc, err, want_rc=1, needle=needle, output=None, inputs=inputs, before=before)
    assert snapshot(d) == d_before and not (tmp_path / "out").exists()
    assert not getattr(sys.modules.get(name), "CALLS", [])


# ------------------------------------------------------------------ 2. nothing read or copied from outside the model


@pytest.mark.parametrize("entry", ["../secret/model.safetensors", "ABSOLUTE"])
def test_index_shards_outside_the_model_are_refused(family, tmp_path, capsys, entry):
    inputs, b, ms = family
    secret = inputs / "secret"
    write_hf_dir(secret, make_base(5))
    shard = str(secret / "model.safetensors") if entry == "ABSOLUTE" else entry
    names = list(load_file(str(ms[0] / "model.safetensors")))
    (ms[0] / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {n: shard for n in names}}))
    before = snapshot(inputs)
    rc, err = _run(_merge(b, ms, tmp_path / "out"), capsys)
    check(rc, err, want_rc=1, needle="outside the model", output=tmp_path / "out", inputs=inputs, before=before)


def test_index_shard_linked_outside_the_model_is_refused(family, tmp_path, capsys):
    inputs, b, ms = family
    write_hf_dir(inputs / "secret", make_base(5))
    (ms[0] / "shard.safetensors").symlink_to(inputs / "secret" / "model.safetensors")
    names = list(load_file(str(ms[0] / "model.safetensors")))
    (ms[0] / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {n: "shard.safetensors" for n in names}}))
    before = snapshot(inputs)
    rc, err = _run(_merge(b, ms, tmp_path / "out"), capsys)
    check(rc, err, want_rc=1, needle="outside", output=tmp_path / "out", inputs=inputs, before=before)


def test_only_model_files_are_copied_and_never_through_a_link(family, tmp_path, capsys):
    inputs, b, ms = family
    ssh = tmp_path / "ssh"
    ssh.mkdir()
    (ssh / "id_rsa").write_text("PRIVATE KEY")
    (b / "extras").symlink_to(ssh)
    (b / "notes.md").write_text("private notes")
    (b / "chat_template.jinja").write_text("{{ messages }}")
    rc, err = _run(_merge(b, ms, tmp_path / "out"), capsys)
    assert rc == 0, err
    out = tmp_path / "out"
    assert not (out / "extras").exists() and not (out / "notes.md").exists()
    assert not any("PRIVATE" in p.read_text(errors="ignore") for p in out.rglob("*") if p.is_file())
    copied = json.loads((out / "tiesmerge.json").read_text())["output"]["copied_from_base"]
    assert "chat_template.jinja" in copied and "config.json" in copied and "extras" not in copied
    assert all(not (out / name).is_symlink() and (out / name).is_file() for name in copied)


def test_model_file_linked_outside_is_refused_before_the_merge(family, tmp_path, capsys):
    inputs, b, ms = family
    (tmp_path / "elsewhere.json").write_text('{"secret": 1}')
    (b / "tokenizer.json").unlink()
    (b / "tokenizer.json").symlink_to(tmp_path / "elsewhere.json")
    before = snapshot(inputs)
    rc, err = _run(_merge(b, ms, tmp_path / "out"), capsys)
    check(rc, err, want_rc=1, needle=("tokenizer.json", "outside"), output=tmp_path / "out", inputs=inputs,
          before=before)


def test_every_file_linked_outside_a_model_is_named_at_once(family, tmp_path, capsys):
    """hp65a c58: a folder with four files linked out (vocab.txt, chat_template.jinja, ...) was refused one file per
    run; every bad file of the folder is named in one error."""
    inputs, b, ms = family
    (tmp_path / "elsewhere.json").write_text('{"secret": 1}')
    for name in ("tokenizer.json", "generation_config.json"):
        if (b / name).exists():
            (b / name).unlink()
        (b / name).symlink_to(tmp_path / "elsewhere.json")
    before = snapshot(inputs)
    rc, err = _run(_merge(b, ms, tmp_path / "out"), capsys)
    check(rc, err, want_rc=1, needle=("tokenizer.json", "outside"), output=tmp_path / "out", inputs=inputs,
          before=before)
    assert "generation_config.json" in err and "also:" in err

@pytest.mark.parametrize("through", ["tokenizer", "shard"])
def test_hf_cache_blobs_folder_that_is_a_link_is_refused(family, tmp_path, capsys, through):
    """``models--org--evil/snapshots/main/* -> ../../blobs/*`` (the hub's layout) with its ``blobs`` itself a link
    to an outside folder: neither a copied file nor a shard may be reached through it."""
    inputs, b, ms = family
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "x").write_text('{"secret": "PRIVATE"}')
    (outside / "w.safetensors").write_bytes((b / "model.safetensors").read_bytes())
    snap = inputs / "models--org--evil" / "snapshots" / "main"
    snap.mkdir(parents=True)
    for f in b.iterdir():
        (snap / f.name).write_bytes(f.read_bytes())
    (inputs / "models--org--evil" / "blobs").symlink_to(outside)
    name, blob = ("tokenizer.json", "x") if through == "tokenizer" else ("model.safetensors", "w.safetensors")
    (snap / name).unlink()
    (snap / name).symlink_to(Path("../../blobs") / blob)
    before = snapshot(inputs)
    rc, err = _run(_merge(snap, ms, tmp_path / "out"), capsys)
    check(rc, err, want_rc=1, needle=(name, "symbolic link", "outside"), output=tmp_path / "out", inputs=inputs,
          before=before)


# ------------------------------------------------------------------ 3. non-finite output is never written


def big_step_family(tmp_path: Path) -> tuple[Path, Path, list[Path]]:
    """A base and two fine-tunes 10 apart everywhere: a lam within float32's range (options past it are refused
    up front) still takes the merged values past it."""
    inputs = tmp_path / "big_inputs"
    b = write_hf_dir(inputs / "base", {"w": torch.zeros(4, 4)})
    ms = [write_hf_dir(inputs / f"ft{k}", {"w": torch.full((4, 4), 10.0)}) for k in range(2)]
    return inputs, b, ms


def test_lam_that_overflows_is_an_error_naming_the_tensor(tmp_path, capsys):
    inputs, b, ms = big_step_family(tmp_path)
    before = snapshot(inputs)
    rc, err = _run(_merge(b, ms, tmp_path / "out", "--method", "task_arithmetic", "--lam", "1e38"), capsys)
    check(rc, err, want_rc=1, needle=("not finite", "tensor '", "smaller lam"), output=tmp_path / "out",
          inputs=inputs, before=before)


def test_float16_overflow_is_an_error_suggesting_a_wider_dtype(tmp_path, capsys, monkeypatch):
    inputs = tmp_path / "inputs"
    base = {"w": torch.full((4, 4), 60000.0, dtype=torch.float16)}
    fts = [{"w": torch.full((4, 4), 65000.0, dtype=torch.float16)} for _ in range(2)]
    b = write_hf_dir(inputs / "base", base)
    ms = [write_hf_dir(inputs / f"ft{k}", ft) for k, ft in enumerate(fts)]
    monkeypatch.chdir(tmp_path)
    before = snapshot(inputs)
    rc, err = _run(_merge(b, ms, tmp_path / "out", "--method", "task_arithmetic", "--lam", "2"), capsys)
    check(rc, err, want_rc=1, needle=("tensor 'w'", "wider dtype"), output=tmp_path / "out", inputs=inputs,
          before=before)
    rc, err = _run(_merge(b, ms, tmp_path / "out", "--method", "task_arithmetic", "--lam", "2", "--dtype",
                          "float32"), capsys)
    assert rc == 0, err


# ------------------------------------------------------------------ 4. no hang (subprocess with a timeout)


def _cli_subprocess(argv, cwd, timeout=60):
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "tiesmerge.cli.main", *map(str, argv)], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stderr, time.monotonic() - started


def test_fifo_named_safetensors_is_refused_not_opened(family, tmp_path):
    inputs, b, ms = family
    (ms[1] / "model.safetensors").unlink()
    os.mkfifo(ms[1] / "model.safetensors")
    before = snapshot(inputs)
    rc, err, _ = _cli_subprocess(_merge(b, ms, tmp_path / "out"), tmp_path)
    check(rc, err, want_rc=1, needle="FIFO", output=tmp_path / "out", inputs=inputs, before=before)


def test_yaml_alias_bomb_is_refused_without_expanding(family, tmp_path, capsys):
    inputs, b, ms = family
    lines = ["a: &a [x, x, x, x, x, x, x, x, x, x]"]
    for k in range(1, 10):
        prev = chr(ord("a") + k - 1)
        lines.append(f"{chr(ord('a') + k)}: &{chr(ord('a') + k)} [{', '.join(['*' + prev] * 10)}]")
    lines.append(f"method: *j\nbase: {b}\nmodels: [{ms[0]}, {ms[1]}]")
    recipe = inputs / "bomb.yaml"
    recipe.write_text("\n".join(lines) + "\n")
    before = snapshot(inputs)
    rc, err = _run(["merge", str(recipe), "-o", str(tmp_path / "out")], capsys)
    check(rc, err, want_rc=2, needle="values once its aliases are expanded", output=tmp_path / "out", inputs=inputs,
          before=before)


def _lora_with_module(inputs: Path, module: str, config: dict) -> tuple[Path, list[Path]]:
    base = make_base(0)
    base[module + ".weight"] = torch.randn(8, 8)
    b = write_hf_dir(inputs / "base", base)
    loras = [write_lora_dir(inputs / f"lora{k}", random_lora(base, 2, k, modules=(module,)), alpha=4.0,
                            config=config) for k in range(2)]
    return b, loras


def test_pathological_alpha_pattern_does_not_hang(tmp_path):
    inputs = tmp_path / "inputs"
    b, loras = _lora_with_module(inputs, "model." + "a" * 40 + "_proj", {"alpha_pattern": {"(a+)+$": 2.0}})
    before = snapshot(inputs)
    rc, err, seconds = _cli_subprocess(_merge(b, loras, tmp_path / "out", "--method", "task_arithmetic"), tmp_path)
    assert rc == 0, err
    assert seconds < 60 and "Traceback" not in err and snapshot(inputs) == before


@pytest.mark.parametrize("method", ["tsv_m", "iso_cts"])
def test_pathological_exclude_regex_does_not_hang(family, tmp_path, method):
    inputs, b, ms = family
    before = snapshot(inputs)
    rc, err, seconds = _cli_subprocess(_merge(b, ms, tmp_path / "out", "--method", method,
                                              "--exclude", r"((\w|\.)+)+!"), tmp_path)
    assert rc == 0, err
    assert seconds < 60 and "Traceback" not in err and snapshot(inputs) == before


@pytest.mark.parametrize("how", ["merge", "dry_run", "validate"])
def test_exclude_regex_the_automaton_cannot_run_is_refused_before_the_merge(family, tmp_path, capsys, how):
    inputs, b, ms = family
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"method: tsv_m\nbase: {b}\nmodels: [{ms[0]}, {ms[1]}]\nparameters:\n  exclude: '(?=a)b'\n")
    argv = {"merge": _merge(b, ms, tmp_path / "out", "--method", "tsv_m", "--exclude", "(?=a)b"),
            "dry_run": _merge(b, ms, tmp_path / "out", "--method", "tsv_m", "--exclude", "(?=a)b", "--dry-run"),
            "validate": ["validate", str(recipe)]}[how]
    before = snapshot(inputs)
    rc, err = _run(argv, capsys)
    assert rc != 0
    check(rc, err, want_rc=rc, needle=("exclude", "lookarounds"), output=tmp_path / "out", inputs=inputs,
          before=before)


# ------------------------------------------------------------------ 5. typed errors, never a traceback


def _index(model: Path, weight_map) -> None:
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


@pytest.mark.parametrize("case", ["weight_map_list", "weight_map_numbers", "index_list", "index_deep",
                                  "config_list", "config_deep"])
def test_json_of_the_wrong_type_or_depth(family, tmp_path, capsys, case):
    inputs, b, ms = family
    names = list(load_file(str(ms[0] / "model.safetensors")))
    if case == "weight_map_list":
        _index(ms[0], ["model.safetensors"])
    elif case == "weight_map_numbers":
        _index(ms[0], {n: 5 for n in names})
    elif case == "index_list":
        (ms[0] / "model.safetensors.index.json").write_text("[1, 2]")
    elif case == "index_deep":
        (ms[0] / "model.safetensors.index.json").write_text("[" * 100_000 + "]" * 100_000)
    elif case == "config_list":
        (b / "config.json").write_text("[1, 2, 3]")
    else:
        (b / "config.json").write_text('{"a": ' * 50_000 + "1" + "}" * 50_000)
    before = snapshot(inputs)
    rc, err = _run(_merge(b, ms, tmp_path / "out"), capsys)
    check(rc, err, want_rc=1, needle=".json", output=tmp_path / "out", inputs=inputs, before=before)


@pytest.mark.parametrize("case", ["loop", "dangling", "char_device"])
def test_model_paths_that_are_not_files_or_folders(family, tmp_path, capsys, case):
    inputs, b, ms = family
    if case == "loop":
        (inputs / "l1").symlink_to(inputs / "l2")
        (inputs / "l2").symlink_to(inputs / "l1")
        model, needle = inputs / "l1", "loop"
    elif case == "dangling":
        (inputs / "gone").symlink_to(inputs / "nowhere")
        model, needle = inputs / "gone", "does not exist"
    else:
        model, needle = Path("/dev/zero"), "character device"
    before = snapshot(inputs)
    rc, err = _run(_merge(b, [ms[0], model], tmp_path / "out"), capsys)
    check(rc, err, want_rc=1, needle=needle, output=tmp_path / "out", inputs=inputs, before=before)


@pytest.mark.parametrize("case", ["fifo", "dangling", "loop"])
def test_model_files_that_cannot_be_copied_fail_before_the_merge(family, tmp_path, capsys, monkeypatch, case):
    inputs, b, ms = family
    (b / "tokenizer.json").unlink()
    if case == "fifo":
        os.mkfifo(b / "tokenizer.json")
    elif case == "dangling":
        (b / "tokenizer.json").symlink_to(b / "nowhere.json")
    else:
        (b / "tokenizer.json").symlink_to(b / "tokenizer.json")
    from tiesmerge.engine import executor

    ran = []
    monkeypatch.setattr(executor.Executor, "run", lambda self, sink: ran.append(1))
    before = snapshot(inputs)
    rc, err = _run(_merge(b, ms, tmp_path / "out"), capsys)
    check(rc, err, want_rc=1, needle="tokenizer.json", output=tmp_path / "out", inputs=inputs, before=before)
    assert not ran, "the merge ran before the model files were checked"


def test_full_disk_while_copying_model_files_is_a_typed_error(family, tmp_path, capsys, monkeypatch):
    inputs, b, ms = family
    import shutil

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(shutil, "copyfileobj", full)
    monkeypatch.setattr(shutil, "copyfile", full)
    before = snapshot(inputs)
    rc, err = _run(_merge(b, ms, tmp_path / "out"), capsys)
    check(rc, err, want_rc=1, needle="No space left", output=tmp_path / "out", inputs=inputs, before=before)


@pytest.mark.parametrize("case,needle", [("rank0", "the rank r is at least 1"), ("alpha_string", "lora_alpha"),
                                         ("bad_regex", "not a valid regular expression"),
                                         ("alpha_pattern_list", "alpha_pattern")])
def test_bad_lora_configs(tmp_path, capsys, monkeypatch, case, needle):
    inputs = tmp_path / "inputs"
    module = "model.layers.0.self_attn.q_proj"
    config = {"alpha_string": {"lora_alpha": "sixteen"}, "bad_regex": {"alpha_pattern": {"[q": 2}},
              "alpha_pattern_list": {"alpha_pattern": ["q_proj"]}}.get(case, {})
    b, loras = _lora_with_module(inputs, module, config)
    if case == "rank0":
        from safetensors.torch import save_file

        save_file({f"base_model.model.{module}.lora_A.weight": torch.zeros(0, 8),
                   f"base_model.model.{module}.lora_B.weight": torch.zeros(8, 0)},
                  str(loras[1] / "adapter_model.safetensors"))
    monkeypatch.chdir(tmp_path)
    before = snapshot(inputs)
    rc, err = _run(_merge(b, loras, tmp_path / "out", "--method", "task_arithmetic"), capsys)
    check(rc, err, want_rc=1, needle=needle, output=tmp_path / "out", inputs=inputs, before=before)


def test_an_evaluator_that_raises_is_named(family, tmp_path, capsys, monkeypatch):
    inputs, b, ms = family
    (tmp_path / "work" / "bad_eval.py").write_text("def score(state):\n    raise ZeroDivisionError('oops')\n")
    monkeypatch.syspath_prepend(str(tmp_path / "work"))
    before = snapshot(inputs)
    rc, err = _run(["tune", *cli_flags(b, ms), "--evaluator", "bad_eval:score", "--grid", "density=0.5",
                    "--grid", "lam=1.0"], capsys)
    check(rc, err, want_rc=1, needle=("bad_eval:score", "ZeroDivisionError"), output=None, inputs=inputs,
          before=before)


@pytest.mark.parametrize("case,needle", [("pickle", "pickle"), ("truncated", "truncated"),
                                         ("undecodable", "UTF-8")])
def test_stats_inputs_are_checked_before_any_model_is_loaded(family, tmp_path, capsys, case, needle):
    inputs, b, ms = family
    model = inputs / "clf"
    write_hf_dir(model, make_base(1), config={"architectures": ["BertForSequenceClassification"]})
    data = inputs / "data.jsonl"
    data.write_text('{"text": "a", "label": 0}\n')
    if case == "pickle":
        (model / "model.safetensors").unlink()
        write_pickle(model / "pytorch_model.bin", make_base(1))
    elif case == "truncated":
        raw = (model / "model.safetensors").read_bytes()
        (model / "model.safetensors").write_bytes(raw[: len(raw) // 2])
    else:
        data.write_bytes(b'{"text": "\xff\xfe\xfa", "label": 0}\n')
    before = snapshot(inputs)
    rc, err = _run(["stats", "fisher", "--model", str(model), "--data", str(data), "-o", str(tmp_path / "out")],
                   capsys)
    check(rc, err, want_rc=1 if case != "undecodable" else 2, needle=needle, output=tmp_path / "out",
          inputs=inputs, before=before)


def test_an_unexpected_error_is_a_message_not_a_traceback(family, tmp_path, capsys, monkeypatch):
    inputs, b, ms = family
    from tiesmerge.engine import executor

    def bug(self, sink):
        raise KeyError("a bug")

    monkeypatch.setattr(executor.Executor, "run", bug)
    before = snapshot(inputs)
    rc, err = _run(_merge(b, ms, tmp_path / "out"), capsys)
    check(rc, err, want_rc=1, needle=("unexpected KeyError", "--debug"), output=tmp_path / "out", inputs=inputs,
          before=before)
    rc, err = _run(["--debug", *_merge(b, ms, tmp_path / "out")], capsys)
    assert rc == 1 and "Traceback" in err


# ------------------------------------------------------------------ 6. nothing left behind


def test_sigterm_removes_the_temporary_output(family, tmp_path):
    inputs, b, ms = family
    out = tmp_path / "out"
    code = ("import sys, time\n"
            "from tiesmerge.io import writer\n"
            "real = writer.SafetensorsStreamWriter.write\n"
            "def slow(self, name, chunk):\n"  # every chunk takes 0.5 s: the signal lands mid-write
            "    print('writing', flush=True); time.sleep(0.5); return real(self, name, chunk)\n"
            "writer.SafetensorsStreamWriter.write = slow\n"
            "from tiesmerge.cli.main import main\n"
            "sys.exit(main(sys.argv[1:]))\n")
    before = snapshot(inputs)
    proc = subprocess.Popen([sys.executable, "-c", code, *_merge(b, ms, out)], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    check(proc.returncode, err, want_rc=143, needle="terminated", output=out, inputs=inputs, before=before)


def test_a_killed_runs_temporary_directory_is_removed_later(family, tmp_path, capsys):
    inputs, b, ms = family
    from tiesmerge.scratch import host_tag as _host

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".tiesmerge-tmp-{_host()}-{dead.pid}-abc123"
    stale.mkdir()
    (stale / ".tiesmerge-temporary").touch()  # as tiesmerge makes its temporaries (io.writer.OWNED)
    (stale / "model.safetensors").write_bytes(b"half written")
    alive = tmp_path / f".tiesmerge-tmp-{_host()}-{os.getpid()}-xyz789"  # this process: alive, kept
    alive.mkdir()
    rc, err = _run(_merge(b, ms, tmp_path / "out"), capsys)
    assert rc == 0, err
    assert not stale.exists() and alive.exists()


def test_an_output_name_of_255_bytes_works(family, tmp_path, capsys):
    inputs, b, ms = family
    out = tmp_path / ("m" * 255)
    rc, err = _run(_merge(b, ms, out), capsys)
    assert rc == 0, err
    assert (out / "model.safetensors").is_file() and leftovers(out) == [out]


# ------------------------------------------------------------------ 7. messages that say what is true


def test_free_space_is_shown_in_units_that_fit(family, tmp_path, capsys, monkeypatch):
    inputs, b, ms = family
    import shutil

    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    before = snapshot(inputs)
    rc, err = _run(_merge(b, ms, tmp_path / "out"), capsys)
    check(rc, err, want_rc=1, needle=("KiB", "1000 B is free"), output=tmp_path / "out", inputs=inputs,
          before=before)
    assert "0.00 GiB" not in err


def test_a_misspelt_option_suggests_the_option(family, tmp_path, capsys):
    inputs, b, ms = family
    recipe = inputs / "r.yaml"
    recipe.write_text(f"method: ties\nbase: {b}\nmodels: [{ms[0]}, {ms[1]}]\ndensty: 0.3\n")
    before = snapshot(inputs)
    rc, err = _run(["validate", str(recipe)], capsys)
    check(rc, err, want_rc=2, needle="parameters.density", output=None, inputs=inputs, before=before)
    assert "dtype" not in err


def test_a_wrong_base_model_is_reported_once(family, tmp_path, capsys):
    inputs, b, ms = family
    recipe = inputs / "mk.yaml"
    recipe.write_text(f"merge_method: ties\nbase_model: 5\nmodels:\n  - model: {ms[0]}\n  - model: {ms[1]}\n"
                      "parameters: {density: 0.5, weight: 1.0}\n")
    before = snapshot(inputs)
    rc, err = _run(["validate", str(recipe)], capsys)
    check(rc, err, want_rc=2, needle="base_model", output=None, inputs=inputs, before=before)
    assert err.count("base_model:") == 1 and "required" not in err, err


# ------------------------------------------------------------------ a model written while it is read


def test_a_model_that_changes_while_read_is_refused(family, tmp_path, capsys, monkeypatch):
    inputs, b, ms = family
    from tiesmerge.engine import executor

    real = executor.Executor.run

    def grow(self, sink):
        result = real(self, sink)
        with open(ms[1] / "model.safetensors", "ab") as f:  # a copy still running
            f.write(b"\0" * 8)
        return result

    monkeypatch.setattr(executor.Executor, "run", grow)
    # the check without read leases (a file system that grants none): with one, this process's own append waited
    # out the kernel's lease-break time, 45 s (leases have tests of their own: hostile pass 14)
    monkeypatch.setenv("TIESMERGE_LEASES", "0")
    rc, err = _run(_merge(b, ms, tmp_path / "out"), capsys)
    assert rc == 1 and "changed size" in err and "Traceback" not in err, err
    assert not leftovers(tmp_path / "out")


# ------------------------------------------------------------------ tied embeddings: every row compared


def test_a_head_equal_to_the_embedding_only_in_its_first_rows_is_not_tied(tmp_path):
    import tiesmerge

    base, fts = make_family(2)
    for sd in (base, *fts):
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"].clone()
        sd["lm_head.weight"][10:] += 1.0  # equal in rows 0..9 only
    b = write_hf_dir(tmp_path / "base", base, config={"tie_word_embeddings": True})
    ms = [write_hf_dir(tmp_path / f"ft{k}", ft, config={"tie_word_embeddings": True}) for k, ft in enumerate(fts)]
    out = tiesmerge.merge(b, ms, "task_arithmetic", lam=1.0, output=tmp_path / "out")
    merged = load_file(str(out / "model.safetensors"))
    want = tiesmerge.merge(base, fts, "task_arithmetic", lam=1.0)
    torch.testing.assert_close(merged["lm_head.weight"], want["lm_head.weight"])
    assert not json.loads((out / "tiesmerge.json").read_text())["alignment"]["tied"]


# ------------------------------------------------------------------ cases that already passed (kept)


@pytest.mark.parametrize("case,needle", [("missing", "no such file"), ("pickle", "pickle"),
                                         ("huge_header", "safetensors"), ("exists", "not empty")])
def test_cases_that_already_passed(family, tmp_path, capsys, case, needle):
    inputs, b, ms = family
    out = tmp_path / "out"
    models = list(ms)
    if case == "missing":
        models[1] = inputs / "nope"
    elif case == "pickle":
        (ms[1] / "model.safetensors").unlink()
        write_pickle(ms[1] / "pytorch_model.bin", make_base(0))
    elif case == "huge_header":
        (ms[1] / "model.safetensors").write_bytes(struct.pack("<Q", 100 << 30) + b"{}")
    else:
        out.mkdir()
        (out / "mine.txt").write_text("x")
    before = snapshot(inputs)
    rc, err = _run(_merge(b, models, out), capsys)
    check(rc, err, want_rc=1, needle=needle, output=out, inputs=inputs, before=before, output_existed=case == "exists")
