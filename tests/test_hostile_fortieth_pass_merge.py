"""Hostile pass 40b, C60, C52, C51, C54, C17: what `merge` (and `demo`) say when memory runs out, a dry run's
size of a merged adapter, --sign-from's warnings, --model over a recipe's per-model values, TMPDIR as the output."""

from __future__ import annotations

import errno
import os
import re
import subprocess
import sys

import pytest
from safetensors import safe_open

from helpers_adapters import random_ia3, random_lora, write_ia3_dir, write_lora_dir
from helpers_ckpt import copy_model_dir, make_family, run_cli, write_hf_dir
from tiesmerge.sizes import format_size

# what torch's CPU allocator raised under `ulimit -v 4000000` in `demo --synthetic --params 2000` (hp40b C60)
TORCH_OOM = ("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you tried to "
             "allocate 2883584 bytes. Error code 12 (Cannot allocate memory)")


@pytest.fixture
def family(tmp_path):
    base, models = make_family(2)
    return [write_hf_dir(tmp_path / n, s) for n, s in zip(("base", "a", "b"), (base, *models))]


def _merge(dirs, out, *extra):
    return ["merge", "--base", dirs[0], *[a for d in dirs[1:] for a in ("--model", d)], "-o", out, "--no-progress",
            *extra]


# --- C60: out of memory -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("raised", [RuntimeError(TORCH_OOM), MemoryError()], ids=["torch-allocator", "MemoryError"])
def test_demo_out_of_memory_is_said_as_such_with_what_helps(tmp_path, capsys, monkeypatch, raised):
    """C60: torch's allocator failure (a RuntimeError) was "unexpected RuntimeError ... this is a bug in tiesmerge".
    It is a typed out-of-memory error whose hint names a smaller --params and a higher limit."""
    from tiesmerge.cli import commands

    def demo(args):
        raise raised

    monkeypatch.setitem(commands.HANDLERS, "demo", demo)
    rc, out, err = run_cli(["demo", "--synthetic", "--params", "2000", "--workdir", tmp_path / "d"], capsys)
    assert rc == 1 and "Traceback" not in err, err
    assert "error: ran out of memory" in err and "a bug in tiesmerge" not in err and "unexpected" not in err, err
    assert "--params" in err and "ulimit -v" in err and "--memory-budget" not in err, err


def test_merge_out_of_memory_from_torch_names_the_memory_budget(family, tmp_path, capsys, monkeypatch):
    """C60: the same failure in `merge` names --memory-budget (the engine's working memory) and the limit."""
    from tiesmerge.cli import commands

    def merge(args):
        raise RuntimeError(TORCH_OOM)

    monkeypatch.setitem(commands.HANDLERS, "merge", merge)
    rc, out, err = run_cli(_merge(family, tmp_path / "out"), capsys)
    assert rc == 1 and "error: ran out of memory" in err and "a bug in tiesmerge" not in err, err
    assert "--memory-budget" in err and "ulimit -v" in err, err


def test_a_mapping_refused_for_memory_is_not_blamed_on_the_file(family, tmp_path, capsys, monkeypatch):
    """C60: mmap's ENOMEM under `ulimit -v` was "cannot map tensor ... hint: the file changed or was truncated while
    tiesmerge read it". It is said as memory running out, with what helps; nothing is left at the output."""
    from tiesmerge.io import safetensors_reader

    def no_memory(*args, **kwargs):
        raise OSError(errno.ENOMEM, "Cannot allocate memory")

    monkeypatch.setattr(safetensors_reader.mmap, "mmap", no_memory)
    monkeypatch.setattr(safetensors_reader.os, "preadv", no_memory)  # the read path, where mapping is not used
    rc, out, err = run_cli(_merge(family, tmp_path / "out"), capsys)
    assert rc == 1 and "Traceback" not in err, err
    assert "ran out of memory" in err and "changed or was truncated" not in err, err
    assert "--memory-budget" in err and "ulimit -v" in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("method", ["map_rows", "read"])
def test_the_reader_says_enomem_as_memory_for_both_ways_of_reading(family, monkeypatch, method):
    """C60, the reader alone (the Python API): a refused mapping and a refused read are OutOfMemoryError."""
    from tiesmerge.errors import OutOfMemoryError
    from tiesmerge.io import safetensors_reader
    from tiesmerge.io.checkpoint import open_checkpoint

    def no_memory(*args, **kwargs):
        raise OSError(errno.ENOMEM, "Cannot allocate memory")

    monkeypatch.setattr(safetensors_reader.mmap, "mmap", no_memory)
    monkeypatch.setattr(safetensors_reader.os, "preadv", no_memory)
    ckpt = open_checkpoint(family[1])
    try:
        name = next(n for n in ckpt.names() if ckpt.info(n).numel > 1)
        with pytest.raises(OutOfMemoryError, match="ran out of memory") as caught:
            ckpt.map_rows(name, None) if method == "map_rows" else ckpt.read(name)
        assert "--memory-budget" in caught.value.hint and "changed" not in caught.value.hint
    finally:
        ckpt.close()


# --- C52: a dry run's size of a merged adapter ----------------------------------------------------------------------

def _data_bytes(folder):
    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as f:
        return sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys())  # noqa: SIM118


def _output_size(out):
    return next(line for line in out.splitlines() if line.startswith("output size"))


@pytest.mark.parametrize("kind", ["ia3", "lora"])
def test_a_dry_run_says_the_merged_adapters_size_not_a_rank_formula(tmp_path, capsys, kind):
    """C52: `--dry-run --output-format adapter` printed "at rank r, r × (rows + columns) values per adapted module"
    for (IA)³ adapters, which have no rank, and for LoRA with --rank given. It prints the size the merge writes
    (the tensors' data), with (IA)³'s own wording."""
    base, _ = make_family(1)
    base_dir = write_hf_dir(tmp_path / "base", base)
    if kind == "ia3":
        adapters = [write_ia3_dir(tmp_path / f"ad{k}", random_ia3(base, k)) for k in range(2)]
        extra = []
    else:
        adapters = [write_lora_dir(tmp_path / f"ad{k}", random_lora(base, 4, k), alpha=8.0) for k in range(2)]
        extra = ["--rank", "3"]
    argv = _merge([base_dir, *adapters], tmp_path / "out", "--output-format", "adapter", *extra)
    rc, out, err = run_cli([*argv, "--dry-run"], capsys)
    assert rc == 0, err
    line = _output_size(out)
    assert "rows + columns" not in line and "rank r" not in line, line
    assert ("(IA)³ scaling vector per adapted module" in line) if kind == "ia3" else ("rank-3 LoRA factors" in line)
    rc, out, err = run_cli(argv, capsys)
    assert rc == 0, err
    written = _data_bytes(tmp_path / "out")
    assert line.split()[2:4] == format_size(written).split(), (line, written)


def test_a_dry_run_refuses_a_rank_for_ia3_adapters_as_the_merge_does(tmp_path, capsys):
    """C52: the plan takes the rank now; a rank for (IA)³ inputs is refused by the dry run as by the merge."""
    base, _ = make_family(1)
    base_dir = write_hf_dir(tmp_path / "base", base)
    adapters = [write_ia3_dir(tmp_path / f"ad{k}", random_ia3(base, k)) for k in range(2)]
    rc, out, err = run_cli([*_merge([base_dir, *adapters], tmp_path / "out", "--output-format", "adapter",
                                    "--rank", "2"), "--dry-run"], capsys)
    assert rc == 2 and "(IA)³ adapters (scaling vectors, which have no rank)" in err, err


# --- C51: --sign-from's warnings ------------------------------------------------------------------------------------

def test_a_lora_reference_is_named_once(tmp_path, capsys):
    """C51: "the reference ../lora/l_patterns (reference) (an adapter) changes 2 of the 6 ...": the label said twice."""
    base, _ = make_family(1)
    base_dir = write_hf_dir(tmp_path / "base", base)
    adapters = [write_lora_dir(tmp_path / f"ad{k}", random_lora(base, 2, k), alpha=4.0) for k in range(2)]
    from helpers_adapters import LORA_MODULES

    reference = write_lora_dir(tmp_path / "ref", random_lora(base, 2, 9, modules=LORA_MODULES[:2]), alpha=4.0)
    rc, out, err = run_cli([*_merge([base_dir, *adapters], tmp_path / "out"), "--sign-from", reference], capsys)
    assert rc == 0, err
    assert "(reference) (an adapter)" not in err and "the reference " + str(reference) not in err, err
    assert f"{reference} (reference), an adapter, changes 2 of the 4 merged tensors" in err, err


def test_a_copy_of_the_base_as_reference_is_named_as_the_cause_first(family, tmp_path, capsys):
    """C51: with a copy of the base as --sign-from, the first warning blamed the options ("with these options the
    method keeps nothing"), the real cause came after. The cause is said, once, and the options are not blamed."""
    copy = copy_model_dir(family[0], tmp_path / "base_copy")
    rc, out, err = run_cli([*_merge(family, tmp_path / "out"), "--sign-from", copy], capsys)
    assert rc == 0, err
    warned = [line for line in err.splitlines() if line.startswith("warning:")]
    assert "keeps nothing" not in err, err
    assert warned and "reference model (sign_from)" in warned[0] and "task vector is 0" in warned[0], warned
    assert sum("reference model (sign_from)" in w for w in warned) == 1, warned


# --- C54: --model over a recipe's per-model values ------------------------------------------------------------------

def test_model_over_a_recipe_names_the_per_model_densities_that_stay(family, tmp_path, capsys):
    """C54: "--model replaces the recipe's 2 model(s) and their per-model weight", then "2 densities given for 1
    models": the densities, which stay, were not named."""
    recipe = tmp_path / "ov.yaml"
    recipe.write_text(f"method: ties\nbase: {family[0]}\nmodels: [{{path: {family[1]}, weight: 1}}, "
                      f"{{path: {family[2]}, weight: 3}}]\nparameters: {{densities: [0.1, 0.9]}}\n")
    rc, out, err = run_cli(["merge", recipe, "--model", family[1], "-o", tmp_path / "o", "--dry-run"], capsys)
    warning = next(line for line in err.splitlines() if line.startswith("warning: --model replaces"))
    assert "parameters.densities" in warning and "--densities" in warning and "give 1" in warning, warning
    # given as a flag, they are replaced: not said to stay
    rc, out, err = run_cli(["merge", recipe, "--model", family[1], "--densities", "0.5", "-o", tmp_path / "o",
                            "--dry-run"], capsys)
    assert rc == 0 and "parameters.densities" not in err, err


def test_model_over_a_recipe_with_per_model_stats_names_the_stats_flag(family, tmp_path, capsys):
    """C54: over per-model stats the warning said "(give them as flags, e.g. --weights, ...)": --stats is meant."""
    recipe = tmp_path / "f.yaml"
    recipe.write_text(f"method: fisher\nbase: {family[0]}\nmodels:\n  - {{path: {family[1]}, stats: {tmp_path}/fA}}\n"
                      f"  - {{path: {family[2]}, stats: {tmp_path}/fB}}\n")
    rc, out, err = run_cli(["merge", recipe, "--model", family[2], "--model", family[1], "-o", tmp_path / "o",
                            "--dry-run"], capsys)
    warning = next(line for line in err.splitlines() if line.startswith("warning: --model replaces"))
    assert "per-model stats" in warning and "--stats" in warning and "--weights" not in warning, warning


# --- C17: TMPDIR as the output --------------------------------------------------------------------------------------

@pytest.mark.parametrize("earlier", [False, True], ids=["empty", "earlier-output-force"])
def test_tmpdir_as_the_output_is_refused_naming_tmpdir(family, tmp_path, capsys, earlier):
    """C17: with TMPDIR the -o folder, the refusal blamed tiesmerge's own private torch folder as the user's file
    ("--force would delete 1 file(s) that tiesmerge did not write there (added since: tiesmerge-torch-…/)"). TMPDIR
    is named as the cause, and nothing of tiesmerge's is left there."""
    out = tmp_path / "out"
    extra = []
    if earlier:
        rc, _, err = run_cli(_merge(family, out), capsys)
        assert rc == 0, err
        extra = ["--force"]
    else:
        out.mkdir()
    before = sorted(p.name for p in out.iterdir())
    env = {k: v for k, v in os.environ.items() if k not in ("TORCHINDUCTOR_CACHE_DIR", "TEMP", "TMP")}
    env["TMPDIR"] = str(out)
    done = subprocess.run([sys.executable, "-m", "tiesmerge", *map(str, _merge(family, out, *extra))], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert re.search(r"the temporary folder \S+ \(TMPDIR\) is the output", done.stderr), done.stderr
    assert "tiesmerge-torch" not in done.stderr and "did not write" not in done.stderr, done.stderr
    assert sorted(p.name for p in out.iterdir()) == before


def test_tmpdir_inside_the_output_is_refused(family, tmp_path, capsys, monkeypatch):
    """C17, in the process: a TMPDIR inside the output folder is refused as well (the output is replaced whole)."""
    import tempfile

    out = tmp_path / "out"
    (out / "tmp").mkdir(parents=True)
    monkeypatch.setattr(tempfile, "tempdir", str(out / "tmp"))
    rc, _, err = run_cli(_merge(family, out, "--force"), capsys)
    assert rc == 1 and "(TMPDIR) lies inside the output" in err, err
