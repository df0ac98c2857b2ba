"""Issue 13, the eighth independent hostile pass: one case per finding, checked as the catalogue checks its cases."""

from __future__ import annotations

import os
import shutil

import pytest

import test_hostile_catalogue
from helpers_ckpt import ray_search_process, run_cli, write_hf_dir
from test_hostile_catalogue import _merge, check, snapshot

family = test_hostile_catalogue.family


def test_force_keeps_an_edit_whose_size_and_modification_time_were_restored(family, tmp_path, capsys):
    """F1: a model card edited in place with its size kept and its mtime set back (``touch -r``, ``cp -p``)."""
    inputs, b, ms = family
    out = tmp_path / "out"
    assert run_cli(_merge(b, ms, out), capsys)[0] == 0
    card = out / "README.md"
    st = os.stat(card)
    text = card.read_text()
    card.write_text(text[:-8] + "MY NOTE\n")  # same size
    os.utime(card, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(card).st_size == st.st_size and os.stat(card).st_mtime_ns == st.st_mtime_ns
    before = snapshot(inputs)
    rc, _, err = run_cli(_merge(b, ms, out, "--force"), capsys)
    check(rc, err, want_rc=1, needle=("README.md",), output=out, inputs=inputs, before=before, output_existed=True)
    assert card.read_text().endswith("MY NOTE\n")


def test_force_still_replaces_an_untouched_earlier_output(family, tmp_path, capsys):
    inputs, b, ms = family
    out = tmp_path / "out"
    assert run_cli(_merge(b, ms, out), capsys)[0] == 0
    rc, _, err = run_cli(_merge(b, ms, out, "--force"), capsys)
    assert rc == 0, err


def test_an_output_stamped_by_an_earlier_version_is_still_checked_by_size_and_mtime(family, tmp_path, capsys):
    """Stamps of [size, mtime_ns] (before the change time was recorded) keep working."""
    import json

    inputs, b, ms = family
    out = tmp_path / "out"
    assert run_cli(_merge(b, ms, out), capsys)[0] == 0
    manifest = out / "tiesmerge.json"
    data = json.loads(manifest.read_text())
    data["written_stamps"] = {k: v[:2] for k, v in data["written_stamps"].items()}
    manifest.write_text(json.dumps(data))
    rc, _, err = run_cli(_merge(b, ms, out, "--force"), capsys)
    assert rc == 0, err


def test_ambiguous_commit_prefixes_are_shown_long_enough_to_tell_apart(tmp_path, monkeypatch):
    """F2: two snapshots sharing 12 leading digits were both shown as the same 12 characters."""
    from tiesmerge.errors import CheckpointError
    from tiesmerge.hub import resolve_repo

    repo = tmp_path / "hf" / "hub" / "models--org--r3"
    for commit in ("a" * 40, "a" * 13 + "b" * 27):
        (repo / "snapshots" / commit).mkdir(parents=True)
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(CheckpointError) as info:
        resolve_repo("org/r3", "aaaaaaa")
    assert "(" + "a" * 14 + ", " + "a" * 13 + "b)" in str(info.value), str(info.value)


def test_a_working_folder_deleted_during_the_run_does_not_fail_the_final_checks(tmp_path, monkeypatch):
    """F3: the end-of-merge check of protected folders called Path.cwd() on a deleted working folder."""
    from tiesmerge import paths

    gone = tmp_path / "gone"
    gone.mkdir()
    monkeypatch.chdir(gone)
    shutil.rmtree(gone)
    protected = paths._protected()
    assert protected and all(p != gone for p in protected)


def test_a_base_tensor_holding_nan_that_no_adapter_changes_is_not_copied_silently(tmp_path, capsys):
    """F5: an adapter merge copied an untargeted base tensor holding NaN into the output."""
    from helpers_adapters import random_lora, write_lora_dir
    from helpers_ckpt import make_base, write_hf_dir

    base = make_base()
    base["model.norm.weight"][2] = float("nan")
    inputs = tmp_path / "in"
    b = write_hf_dir(inputs / "base", base)
    loras = [write_lora_dir(inputs / f"lora{k}", random_lora(base, 2, k), alpha=4.0) for k in range(2)]
    before = snapshot(inputs)
    for extra in ((), ("--dtype", "fp16")):
        rc, _, err = run_cli(["merge", "--base", str(b), "--model", str(loras[0]), "--model", str(loras[1]),
                              "-o", str(tmp_path / "out"), "--no-progress", *extra], capsys)
        check(rc, err, want_rc=1, needle=("tensor 'model.norm.weight' (8,), copied from the base", "NaN at element 2"),
              output=tmp_path / "out", inputs=inputs, before=before)


@pytest.mark.parametrize("kind", ["nested", "quantized", "int key"])
def test_api_state_dicts_of_tensors_without_one_dense_shape_are_refused(kind):
    """F6 (and a NOTE row): nested and quantized tensors failed inside torch; an int key passed through."""
    import warnings

    import torch

    import tiesmerge
    from tiesmerge.errors import CheckpointError

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's own prototype and deprecation warnings
        if kind == "nested":
            make = lambda: {"w": torch.nested.nested_tensor([torch.ones(2), torch.ones(3)])}  # noqa: E731
        elif kind == "quantized":
            make = lambda: {"w": torch.quantize_per_tensor(torch.ones(4), 0.1, 0, torch.qint8)}  # noqa: E731
        else:
            make = lambda: {1: torch.ones(2)}  # noqa: E731
        with pytest.raises(CheckpointError) as info:
            tiesmerge.merge(make(), [make(), make()], "ties")
    assert {"nested": "is a nested tensor", "quantized": "is a quantized tensor",
            "int key": "the key 1 is a int, not a tensor name"}[kind] in str(info.value)


def test_weights_without_tensors_are_an_error_not_an_empty_model(tmp_path, capsys):
    """F7: a base whose weights file holds no tensors merged "0 tensors" into an empty model."""
    import json

    from safetensors.torch import save_file

    inputs = tmp_path / "in"
    dirs = []
    for name in ("base", "a", "b"):
        (inputs / name).mkdir(parents=True)
        save_file({}, str(inputs / name / "model.safetensors"))
        (inputs / name / "config.json").write_text(json.dumps({"model_type": "custom"}))
        dirs.append(inputs / name)
    before = snapshot(inputs)
    rc, _, err = run_cli(_merge(dirs[0], dirs[1:], tmp_path / "out"), capsys)
    check(rc, err, want_rc=1, needle="the base holds no tensors", output=tmp_path / "out", inputs=inputs,
          before=before)


def test_models_of_integer_tensors_only_warn_that_nothing_is_merged():
    """A NOTE row: integer tensors are copied from the base, so such a "merge" is the base; said, not silent."""
    import torch

    import tiesmerge
    from tiesmerge.errors import MergeWarning

    base = {"ids": torch.arange(4)}
    with pytest.warns(MergeWarning, match="nothing to merge: the base's 1 tensor"):
        out = tiesmerge.merge(base, [{"ids": torch.arange(4) + 1}, {"ids": torch.arange(4) + 2}], "ties")
    assert torch.equal(out["ids"], base["ids"])


def test_a_base_config_changed_during_the_merge_is_refused(family, tmp_path, capsys, monkeypatch):
    """F8: the files copied from the base (config, tokenizer) were not guarded like the weights."""
    from tiesmerge.io import writer

    inputs, b, ms = family
    real = writer.SafetensorsStreamWriter.write

    def rewrite_config(self, name, chunk):  # a download still writing the config, mid-merge
        (b / "config.json").write_text('{"model_type":"cus')
        return real(self, name, chunk)

    monkeypatch.setattr(writer.SafetensorsStreamWriter, "write", rewrite_config)
    rc, _, err = run_cli(_merge(b, ms, tmp_path / "out"), capsys)
    assert rc == 1 and "config.json" in err and "while tiesmerge read it" in err, err
    assert not (tmp_path / "out").exists()


def test_a_per_model_axis_on_the_grid_strategy_points_to_the_sampling_strategies(family, tmp_path, capsys,
                                                                                 monkeypatch):
    """F10: the hint offered --grid weights=..., which the grid then refused."""
    _, b, ms = family
    (tmp_path / "work" / "eighth_pass_eval.py").write_text("def score(state):\n    return 1.0\n")
    monkeypatch.syspath_prepend(str(tmp_path / "work"))
    rc, _, err = run_cli(["search", "--base", str(b), "--model", str(ms[0]), "--model", str(ms[1]), "--evaluator",
                          "eighth_pass_eval:score", "--axis", "weights", "--budget", "2", "--dir", "s"], capsys)
    assert rc == 2 and "per-model axes (weights) are searched by --strategy random or cmaes" in err, err


def test_api_writers_take_force_as_a_boolean_and_stats_stay_out_of_their_model(tmp_path):
    """F11: analyze/save_stats took force="no" as true; save_stats wrote inside the model it describes."""
    import torch

    import tiesmerge
    from helpers_ckpt import make_family, write_hf_dir
    from tiesmerge.errors import ConfigError, OutputError
    from tiesmerge.stats.files import Statistics, StatsManifest

    base, fts = make_family(2)
    b = write_hf_dir(tmp_path / "base", base)
    ms = [write_hf_dir(tmp_path / f"ft{k}", ft) for k, ft in enumerate(fts)]
    tiesmerge.analyze(b, ms, output=tmp_path / "an")
    with pytest.raises(ConfigError, match="force='no' must be True or False"):
        tiesmerge.analyze(b, ms, output=tmp_path / "an", force="no")
    stats = Statistics(StatsManifest(kind="gram", examples=4, model=str(ms[0])), {"w": torch.ones(2, 2)})
    with pytest.raises(ConfigError, match="must be True or False"):
        tiesmerge.save_stats(tmp_path / "st", stats, force="no")
    with pytest.raises(OutputError, match="lies inside the model these statistics describe"):
        tiesmerge.save_stats(ms[0] / "sub", stats)
    assert not (ms[0] / "sub").exists()


@pytest.mark.parametrize("rules", ["[{filter: self_attn, value: [0, 0.5, 1.0e+30]}, {value: 0.5}]",
                                   "[{filter: self_attn, value: .inf}, {value: 0.5}]",  # 1e400: refused as written
                                   "[{filter: mlp, value: 0.3}, {value: -5}]",
                                   # hp70a c15: every bad value at once (2.5 was said only on a second run)
                                   "[{filter: self_attn, value: [0, .nan]}, {value: 2.5}]"])
def test_slerp_t_out_of_range_is_refused_in_filters_and_gradients_too(family, tmp_path, capsys, rules):
    """F12: the scalar t was held to [0, 1], its filters and gradients were not."""
    import json

    _, b, ms = family
    config = json.loads((b / "config.json").read_text())
    (b / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 2}))  # for the gradient
    recipe = tmp_path / "s.yaml"
    recipe.write_text(f"merge_method: slerp\nbase_model: {b}\nmodels:\n  - model: {ms[0]}\n"
                      f"parameters:\n  t: {rules}\n")
    rc, _, err = run_cli(["validate", str(recipe)], capsys)
    # named as the recipe writes it (pass 18 N6), not as the t_by_name it is translated into
    assert rc == 2 and "parameters.t:" in err and "must be a finite number in [0, 1]" in err, err
    if "2.5" in rules:
        assert "parameters.t: nan must be" in err and "parameters.t: 2.5 must be" in err, err


def test_numbas_kernel_cache_stays_in_the_promised_folders_when_the_package_is_read_only(tmp_path, monkeypatch):
    """F13: with a read-only install numba fell back to ~/.cache/numba; tiesmerge's own cache folder now."""
    from tiesmerge.engine import numba_cache

    real_access = os.access
    engine = os.path.dirname(numba_cache.__file__)
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p).startswith(engine) else real_access(p, mode))
    monkeypatch.delenv("NUMBA_CACHE_DIR", raising=False)
    monkeypatch.setenv("TIESMERGE_CACHE_DIR", str(tmp_path / "cache"))
    numba_cache.place()
    assert os.environ["NUMBA_CACHE_DIR"] == str(tmp_path / "cache" / "numba")
    monkeypatch.setenv("NUMBA_CACHE_DIR", "/somewhere/the/user/chose")
    numba_cache.place()
    assert os.environ["NUMBA_CACHE_DIR"] == "/somewhere/the/user/chose"
    monkeypatch.delenv("NUMBA_CACHE_DIR")
    monkeypatch.delenv("TIESMERGE_CACHE_DIR")
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", "/nonexistent")
    numba_cache.place()  # no usable home: a private temporary folder, removed at exit
    assert os.path.basename(os.environ["NUMBA_CACHE_DIR"]).startswith("tiesmerge-numba-")


def test_a_writable_package_keeps_numbas_own_choice(monkeypatch):
    from tiesmerge.engine import numba_cache

    monkeypatch.delenv("NUMBA_CACHE_DIR", raising=False)
    numba_cache.place()
    assert "NUMBA_CACHE_DIR" not in os.environ


def test_a_merged_adapter_in_float16_is_factored_in_float32(tmp_path, capsys):
    """F14: the dense ΔW passed through float16 before its SVD, so factors that fit float16 were refused, with an
    error naming float32."""
    import torch
    from safetensors.torch import load_file

    from helpers_adapters import random_lora, write_lora_dir
    from helpers_ckpt import make_base, write_hf_dir

    base = make_base()
    b = write_hf_dir(tmp_path / "base", base)
    loras = [write_lora_dir(tmp_path / f"lora{k}", random_lora(base, 2, k), alpha=4.0) for k in range(2)]
    argv = ["merge", "--base", str(b), "--model", str(loras[0]), "--model", str(loras[1]), "--output-format",
            "adapter", "--dtype", "float16", "--no-progress"]
    rc, _, err = run_cli([*argv, "--lam", "1e6", "-o", str(tmp_path / "out")], capsys)  # ΔW ~1e5, factors ~1e2-1e3
    assert rc == 0, err
    factors = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    assert {v.dtype for v in factors.values()} == {torch.float16}
    assert all(bool(torch.isfinite(v).all()) for v in factors.values())
    rc, _, err = run_cli([*argv, "--lam", "1e12", "-o", str(tmp_path / "out2")], capsys)  # factors past 65504
    assert rc == 1 and "output dtype F16" in err and "float16 holds values up to 65504" in err, err


def _bind_mount_works(tmp_path) -> bool:
    import subprocess

    (tmp_path / "probe_a").mkdir()
    (tmp_path / "probe_b").mkdir()
    try:
        proc = subprocess.run(["unshare", "-m", "--propagation", "private", "mount", "--bind",
                               str(tmp_path / "probe_a"), str(tmp_path / "probe_b")], capture_output=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return proc.returncode == 0


def test_an_input_reached_through_another_mount_is_still_an_input(family, tmp_path):
    """F16: identity was by resolved path only; a bind mount (NFS exported twice, a Docker volume) of the folder
    holding an input let -o replace it (--force) or write inside it."""
    import subprocess
    import sys

    if not _bind_mount_works(tmp_path):
        pytest.skip("needs unshare -m and mount --bind (root in a private mount namespace)")
    inputs, b, ms = family
    view = tmp_path / "view"
    view.mkdir()
    before = snapshot(inputs)
    for out, extra, how in ((view / "ft0", ["--force"], "is model 0"),
                            (view / "ft1" / "inside", [], "lies inside model 1")):
        script = (f"mount --bind {inputs} {view} && {sys.executable} -m tiesmerge.cli.main "
                  + " ".join(_merge(b, ms, out, *extra)))
        proc = subprocess.run(["unshare", "-m", "--propagation", "private", "bash", "-c", script],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 1 and how in proc.stderr and "another mount" in proc.stderr, proc.stderr
    assert snapshot(inputs) == before


def _mount_alias(monkeypatch, alias, target):
    """``alias`` made to stand for ``target`` as a bind mount makes it, to os.stat only (same device and inode
    under another path; realpath still tells them apart): for the identity checks, without mount privileges."""
    from pathlib import Path

    alias.mkdir()
    real_stat = os.stat

    def stat(p, *a, **k):
        p = Path(os.fspath(p))
        if p == alias or alias in p.parents:
            p = target / p.relative_to(alias)
        return real_stat(p, *a, **k)

    monkeypatch.setattr(os, "stat", stat)
    return alias


def test_identity_checks_tell_a_second_path_to_the_same_folder(tmp_path, monkeypatch):
    """F16 without mount privileges: os.stat made to report one folder under two paths, as a bind mount does."""

    from tiesmerge import paths
    from tiesmerge.errors import OutputError

    model = tmp_path / "models" / "m"
    model.mkdir(parents=True)
    alias = _mount_alias(monkeypatch, tmp_path / "alias", tmp_path / "models")

    with pytest.raises(OutputError, match="is model 0 .* another mount"):
        paths.check_not_input(alias / "m", [("model 0", str(model))])
    with pytest.raises(OutputError, match="lies inside model 0 .* another mount"):
        paths.check_not_input(alias / "m" / "sub", [("model 0", str(model))])
    with pytest.raises(OutputError, match="contains model 0 .* another mount"):
        paths.check_not_input(alias, [("model 0", str(model))])
    paths.check_not_input(tmp_path / "elsewhere", [("model 0", str(model))])  # unrelated: fine


def test_a_stop_signal_during_a_ray_search_is_tiesmerges_to_handle(family, tmp_path):
    """F15: ray.init installed its own SIGTERM handling (sys.exit(15), a C++ stack dump): the search died without
    the command's cleanup, leaving its private Ray folder."""
    import glob
    import signal
    import tempfile
    import time

    pytest.importorskip("ray")
    inputs, b, ms = family
    work = tmp_path / "work"
    (work / "slow_ray_eval.py").write_text("import time\ndef score(state):\n    time.sleep(1.0)\n"
                                           "    return float(len(state))\n")
    proc = ray_search_process(b, ms, work, "slow_ray_eval:score", 40, tmp_path / "s")
    log = tmp_path / "s"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:  # the first scores: Ray is up and working
        if any(p.stat().st_size > 0 for p in log.glob("*.jsonl")) if log.is_dir() else False:
            break
        time.sleep(0.5)
    assert proc.poll() is None, proc.communicate()[1]
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM and "terminated by SIGTERM" in err, (proc.returncode, err[-2000:])
    assert "SIGTERM received at time" not in err
    left = glob.glob(os.path.join(tempfile.gettempdir(), f"tiesray-*-{proc.pid}-*"))
    assert not left, left


def test_numbas_cache_is_never_placed_in_an_input_or_the_output(tmp_path, monkeypatch):
    """F19 (after F13's fix): TIESMERGE_CACHE_DIR pointed into an input, or at the output, got numba's kernels."""
    from tiesmerge.engine import numba_cache
    from tiesmerge.io.card import digest_cache_kept_out_of

    real_access = os.access
    engine = os.path.dirname(numba_cache.__file__)
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p).startswith(engine) else real_access(p, mode))
    for cache, kept in ((tmp_path / "model_a" / "cache", tmp_path / "model_a"), (tmp_path / "out", tmp_path / "out")):
        monkeypatch.delenv("NUMBA_CACHE_DIR", raising=False)
        monkeypatch.setenv("TIESMERGE_CACHE_DIR", str(cache))
        with digest_cache_kept_out_of([kept]):
            numba_cache.place()
        assert os.path.basename(os.environ["NUMBA_CACHE_DIR"]).startswith("tiesmerge-numba-"), cache
        assert not cache.exists()


def test_run_search_keeps_its_log_out_of_the_models_and_never_advises_deleting_a_stranger(family, tmp_path):
    """F20: run_search(log=...) wrote inside an input model, and called the model's config.json a corrupt log
    to delete."""
    from tiesmerge.errors import ConfigError, OutputError
    from tiesmerge.tuning import run_search

    inputs, b, ms = family
    before = snapshot(inputs)
    with pytest.raises(OutputError, match="lies inside model 0"):
        run_search(b, ms, "ties", lambda state: 1.0, budget=1, log=str(ms[0] / "search.jsonl"))
    notes = tmp_path / "notes.txt"
    notes.write_text("my own notes\n")
    with pytest.raises(ConfigError) as info:
        run_search(b, ms, "ties", lambda state: 1.0, budget=1, log=str(notes))
    assert "not a search log" in info.value.message and "delete" not in (info.value.hint or "")
    assert notes.read_text() == "my own notes\n" and snapshot(inputs) == before


def test_a_warning_made_an_error_by_the_users_filter_is_not_called_a_bug(tmp_path):
    """F21: PYTHONWARNINGS=error turned a MergeWarning into "unexpected MergeWarning ... a bug in tiesmerge"."""
    import subprocess
    import sys

    import torch

    from helpers_ckpt import write_hf_dir

    dirs = [write_hf_dir(tmp_path / name, {"ids": torch.arange(4) + k}) for k, name in enumerate(("base", "a", "b"))]
    env = {**os.environ, "PYTHONWARNINGS": "error"}
    code = "import sys\nfrom tiesmerge.cli.main import main\nsys.exit(main(sys.argv[1:]))\n"
    proc = subprocess.run([sys.executable, "-c", code, *_merge(dirs[0], dirs[1:], tmp_path / "out")],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert proc.returncode == 1 and "a warning made an error by your warnings filter: nothing to merge" in \
        proc.stderr and "bug" not in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists()


def test_tune_and_search_take_the_input_flags_their_hints_name(tmp_path, capsys, monkeypatch):
    """F17: a distant model (or vocabularies that differ) could not be tuned at all: the hint named
    --allow-distant / --vocab-policy, which tune and search did not have."""
    import torch

    g = torch.Generator().manual_seed(7)
    base = {"layer.weight": torch.randn(1024, 1000, generator=g)}  # judged: at least a million parameters
    near = {"layer.weight": base["layer.weight"] + 0.01 * torch.randn(1024, 1000, generator=g)}
    far = {"layer.weight": torch.randn(1024, 1000, generator=g)}  # another model altogether: unrelated weights
    b = write_hf_dir(tmp_path / "base", base)
    ms = [write_hf_dir(tmp_path / "ft0", near), write_hf_dir(tmp_path / "far", far)]
    (tmp_path / "eighth_pass_flags_eval.py").write_text("def score(state):\n    return 1.0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    common = ["--base", str(b), "--model", str(ms[0]), "--model", str(ms[1]), "--evaluator",
              "eighth_pass_flags_eval:score"]
    tune = ["tune", *common, "--grid", "density=0.5", "--grid", "lam=1"]
    search = ["search", *common, "--grid", "density=0.5", "--dir", str(tmp_path / "s")]
    for argv in (tune, search):
        rc, _, err = run_cli(argv, capsys)
        assert rc == 1 and "--allow-distant" in err, err
        rc, _, err = run_cli([*argv, "--allow-distant"], capsys)
        assert rc == 0, err
    with pytest.raises(SystemExit) as info:  # argparse's usage error: a union is merge's alone
        run_cli([*tune, "--vocab-policy", "union"], capsys)
    assert info.value.code == 2 and "invalid choice: 'union'" in capsys.readouterr().err


def test_tuning_refuses_a_vocabulary_union_in_the_api():
    import torch

    import tiesmerge.tuning as tuning
    from tiesmerge.errors import ConfigError

    base = {"w": torch.zeros(2)}
    with pytest.raises(ConfigError, match="tune and search take 'error' or 'truncate'"):
        tuning.tune(base, [{"w": torch.ones(2)}, {"w": torch.ones(2) * 2}], "ties", lambda s: 1.0,
                    vocab_policy="union")


def test_a_ray_address_where_nothing_listens_is_refused_in_seconds():
    """F24: `search --ray 127.0.0.1:1` retried for minutes (and ignored SIGTERM a while)."""
    import socket
    import time

    from tiesmerge.errors import ConfigError
    from tiesmerge.tuning.executors import _check_reachable

    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    started = time.monotonic()
    with pytest.raises(ConfigError, match=f"--ray 127.0.0.1:{port}: no Ray cluster answers there") as info:
        _check_reachable(f"127.0.0.1:{port}", timeout=2)
    assert time.monotonic() - started < 10 and "ray start --head" in info.value.hint
    with socket.socket() as listening:  # something listening: let Ray speak with it
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        _check_reachable(f"ray://127.0.0.1:{listening.getsockname()[1]}", timeout=2)
    _check_reachable("auto")


def test_an_output_that_is_a_mount_point_is_refused_before_the_work(family, tmp_path, capsys):
    """F25: an empty mount point at -o failed at the final rename, after the work, leaving .tiesmerge-old-*."""
    import subprocess
    import sys

    if not _bind_mount_works(tmp_path):
        pytest.skip("needs unshare -m and mount --bind (root in a private mount namespace)")
    inputs, b, ms = family
    mnt, src = tmp_path / "mnt", tmp_path / "elsewhere"
    mnt.mkdir()
    src.mkdir()
    script = (f"mount --bind {src} {mnt} && {sys.executable} -c 'import sys; from tiesmerge.cli.main import main; "
              f"sys.exit(main(sys.argv[1:]))' " + " ".join(_merge(b, ms, mnt)))
    proc = subprocess.run(["unshare", "-m", "--propagation", "private", "bash", "-c", script], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 1 and "is a mount point" in proc.stderr, proc.stderr
    assert "merged" in proc.stderr.split("hint:")[1]
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tiesmerge-")]


def test_a_parking_folder_is_removed_when_the_old_output_cannot_be_moved(tmp_path, monkeypatch):
    """F25's leftover: the .tiesmerge-old-* folder made before a rename that failed."""
    from tiesmerge.io import writer

    final = tmp_path / "out"
    final.mkdir()
    (final / "tiesmerge.json").write_text("{}")
    real_replace = os.replace

    def busy(src, dst):
        if Path(src) == final:
            raise OSError(16, "Device or resource busy")
        return real_replace(src, dst)

    from pathlib import Path

    monkeypatch.setattr(writer, "_check_output_path", lambda *a: None)  # what is tested is the rename, not the checks
    monkeypatch.setattr(os, "replace", busy)
    with pytest.raises(OSError):
        with writer.atomic_directory(final, force=True) as tmp:
            (tmp / "x").write_text("new")
    assert sorted(os.listdir(tmp_path)) == ["out"] and (final / "tiesmerge.json").exists()


def test_a_working_folder_deleted_under_a_library_is_named(monkeypatch, capsys):
    """F3b: a library resolving a path against a deleted working folder (torch's lazy imports) gave
    "No such file or directory" naming nothing."""
    import sys

    cli = sys.modules["tiesmerge.cli.main"]

    def vanish(args):
        raise FileNotFoundError(2, "No such file or directory")  # as os.getcwd() raises, no file named

    monkeypatch.setitem(cli.HANDLERS, "methods", vanish)
    monkeypatch.setattr(cli, "_cwd_gone", lambda: True)
    assert cli.main(["methods"]) == 1
    err = capsys.readouterr().err
    assert "the working directory was deleted (or moved away) while tiesmerge ran" in err, err


def test_outputs_follow_the_umask_not_tempfiles_private_modes(family, tmp_path, capsys):
    """A NOTE row: outputs were 0700 (mkdtemp) and report files 0600 (mkstemp) whatever the umask."""
    import stat

    from tiesmerge.paths import write_file

    inputs, b, ms = family
    old = os.umask(0o022)
    try:
        assert run_cli(_merge(b, ms, tmp_path / "out"), capsys)[0] == 0
        write_file(tmp_path / "scores.json", "{}\n")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "out").st_mode) == 0o755
    assert stat.S_IMODE(os.stat(tmp_path / "out" / "model.safetensors").st_mode) == 0o644
    assert stat.S_IMODE(os.stat(tmp_path / "scores.json").st_mode) == 0o644


def test_the_caches_stay_out_of_an_input_reached_through_another_mount(tmp_path, monkeypatch):
    """F26: TIESMERGE_CACHE_DIR inside an input reached through a bind mount got digests.json and numba/."""

    from tiesmerge.io.card import digest_cache_kept_out_of, kept_out

    model = tmp_path / "models" / "a"
    model.mkdir(parents=True)
    alias = _mount_alias(monkeypatch, tmp_path / "alias", tmp_path / "models")

    with digest_cache_kept_out_of([model]):
        assert kept_out(alias / "a" / "cache") and kept_out(model / "x")
        assert not kept_out(tmp_path / "elsewhere")


def test_the_working_folder_reached_through_another_mount_is_never_replaced(tmp_path, monkeypatch):
    """F16b: the protected folders (the working folder and those above it) were compared by path only."""

    from tiesmerge import paths
    from tiesmerge.errors import OutputError

    work = tmp_path / "out" / "earlier"
    work.mkdir(parents=True)
    (work / "tiesmerge.json").write_text("{}")
    alias = _mount_alias(monkeypatch, tmp_path / "alias", tmp_path / "out")

    monkeypatch.chdir(work)
    with pytest.raises(OutputError, match="holds the working, home or root folder"):
        paths.check_output_location(alias / "earlier", force=True)


def test_a_single_output_file_in_a_folder_that_cannot_be_written_is_refused_first(tmp_path, monkeypatch):
    """F27: tune --json and adapt --checkpoint in a read-only folder failed only after the work."""
    from tiesmerge import paths
    from tiesmerge.errors import OutputError

    ro = tmp_path / "ro"
    ro.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if os.fspath(p) == os.fspath(ro) else
                        real_access(p, mode))
    with pytest.raises(OutputError, match="--json's folder .* is not writable"):
        paths.check_output_file(ro / "scores.json", False, [], "--json")


def test_a_checkpoint_that_cannot_be_written_is_named_not_called_a_bug(tmp_path, monkeypatch):
    """F27's other half: safetensors' own write error came out as "unexpected SafetensorError ... a bug"."""
    import sys

    import torch

    import tiesmerge.adamerging  # noqa: F401 -- its package re-exports learn(), the function, under the same name
    from tiesmerge.errors import OutputError

    learn = sys.modules["tiesmerge.adamerging.learn"]

    def failing(*a, **k):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr("safetensors.torch.save_file", failing)
    state = {"coefficients": torch.zeros(2, 2), "optimizer": {"state": {}, "param_groups": []}, "fingerprint": "f",
             "step": 1, "entropy": [], "config": {}}
    with pytest.raises(OutputError, match="ck.safetensors: cannot write it"):
        learn._save(tmp_path / "ck.safetensors", state)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_a_drop_rate_that_leaves_nothing_warns_that_the_merge_is_the_base(method):
    """F23: `--drop-rate 0.9999999999` wrote the base with no word, where a density keeping nothing warns."""
    import warnings

    import torch

    import tiesmerge
    from tiesmerge.errors import MergeWarning

    base, models = {"w": torch.zeros(50, 50)}, [{"w": torch.randn(50, 50)} for _ in range(2)]
    with pytest.warns(MergeWarning, match=r"drop_rate 0.99999 \(density 1e-05\) leaves 0.05 of the models' 5,"):
        tiesmerge.merge(base, models, method, drop_rate=0.99999)
    with warnings.catch_warnings():
        warnings.simplefilter("error", MergeWarning)  # an ordinary rate: no warning
        tiesmerge.merge(base, models, method, drop_rate=0.9)
