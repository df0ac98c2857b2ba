"""Issue 13, the ninth independent hostile pass: one case per finding, checked as the catalogue checks its cases."""

from __future__ import annotations

import json
import os

import pytest

import test_hostile_catalogue
from helpers_ckpt import run_cli
from test_hostile_catalogue import _merge, check, snapshot

family = test_hostile_catalogue.family


@pytest.mark.parametrize("extra", [["--method", "task_arithmetic", "--lam", "-1e-1"],
                                   ["--method", "task_arithmetic", "--weights", "1", "-2e-1"]])
def test_a_negative_number_in_scientific_notation_is_a_value(family, tmp_path, capsys, extra):
    """F1: argparse took "-1e-1" for an option ("expected one argument", "unrecognized arguments")."""
    _, b, ms = family
    rc, out, err = run_cli(_merge(b, ms, tmp_path / "out", "--dry-run", *extra), capsys)
    assert rc == 0, err


@pytest.mark.parametrize("value,needle", [("2020-01-01", "datetime.date(2020, 1, 1) must be a number"),
                                          ("!!binary aGVsbG8=", "b'hello' must be a number"),
                                          ("on", "True must be a number (YAML reads on/off"),
                                          ("true", "True must be a number")])
def test_mergekit_parameters_of_other_yaml_types_are_named(family, tmp_path, capsys, value, needle):
    """F2/F3: a YAML date or !!binary was "an unexpected TypeError ... a bug"; a boolean density was read as 1."""
    _, b, ms = family
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"merge_method: ties\nbase_model: {b}\nmodels:\n  - model: {ms[0]}\n"
                      f"    parameters: {{weight: 1, density: {value}}}\n  - model: {ms[1]}\n"
                      f"    parameters: {{weight: 1, density: 0.5}}\n")
    for command in ("validate", "merge"):
        argv = [command, str(recipe)] + (["-o", str(tmp_path / "out")] if command == "merge" else [])
        rc, _, err = run_cli(argv, capsys)
        assert rc == 2 and f"models[0].parameters.density: {needle}" in err and "bug" not in err, err


def test_force_keeps_a_scores_file_the_user_added_to(family, tmp_path, capsys, monkeypatch):
    """F4: `tune --json F --force` replaced a scores file holding the user's notes beside tiesmerge's fields."""
    _, b, ms = family
    (tmp_path / "work" / "ninth_pass_eval.py").write_text("def score(state):\n    return 1.0\n")
    monkeypatch.syspath_prepend(str(tmp_path / "work"))
    scores = tmp_path / "scores.json"
    argv = ["tune", "--base", str(b), "--model", str(ms[0]), "--model", str(ms[1]), "--evaluator",
            "ninth_pass_eval:score", "--grid", "density=0.5", "--grid", "lam=1", "--json", str(scores)]
    assert run_cli(argv, capsys)[0] == 0
    data = json.loads(scores.read_text())
    scores.write_text(json.dumps({**data, "my_notes": "run on the new data"}))
    rc, _, err = run_cli([*argv, "--force"], capsys)
    assert rc == 1 and "scores.json" in err, err
    assert json.loads(scores.read_text())["my_notes"] == "run on the new data"


@pytest.mark.parametrize("name", [".tiesmerge-tmp-00000000-999999-abc", ".tiesmerge-old-00000000-999999-abc"])
def test_an_output_named_like_a_temporary_sibling_is_refused(family, tmp_path, capsys, name):
    """F5: such an output was deleted (tmp) or spilled into its folder (old) by the next run in the same folder."""
    inputs, b, ms = family
    before = snapshot(inputs)
    rc, _, err = run_cli(_merge(b, ms, tmp_path / "out" / name), capsys)
    check(rc, err, want_rc=1, needle="names starting with '.tiesmerge-' are tiesmerge's own temporary folders",
          output=tmp_path / "out" / name, inputs=inputs, before=before)


def test_a_config_describing_far_more_layers_than_its_weights_is_refused_first(tmp_path):
    """F6: num_hidden_layers 2,000,000 beside 2 layers of weights made stats build the model for minutes and GBs."""
    import transformers

    from tiesmerge.errors import CheckpointError
    from tiesmerge.evaluation.loading import from_pretrained

    cfg = transformers.BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=16)
    transformers.BertModel(cfg).save_pretrained(tmp_path / "m", safe_serialization=True)
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    for key, value, needle in (("num_hidden_layers", 2_000_000, "num_hidden_layers = 2,000,000, but the weights "
                                                                 "hold 2 layers"),
                               ("hidden_size", 4096, "hidden_size = 4,096, a width no tensor of the weights has")):
        (tmp_path / "m" / "config.json").write_text(json.dumps({**config, key: value}))
        with pytest.raises(CheckpointError, match=needle):
            from_pretrained(transformers.AutoModel, tmp_path / "m")


def test_rank_without_an_adapter_output_is_refused(family, tmp_path, capsys):
    """F7: --rank was accepted and ignored when the output is a full model."""
    _, b, ms = family
    rc, _, err = run_cli(_merge(b, ms, tmp_path / "out", "--rank", "4"), capsys)
    assert rc == 2 and "applies to a merged LoRA adapter only" in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["merge", "search"])
def test_a_path_that_backs_out_of_a_missing_folder_is_refused_before_the_work(family, tmp_path, capsys,
                                                                               monkeypatch, command):
    """F8/F9: `-o out/missing/../m` was written at out/m, then read back through the missing folder (an error after
    the work, "nothing was written"); `search --dir` left the missing folder behind."""
    _, b, ms = family
    (tmp_path / "out").mkdir()
    path = tmp_path / "out" / "missing" / ".." / "m"
    if command == "merge":
        argv = _merge(b, ms, path)
    else:
        (tmp_path / "work" / "ninth_pass_dir_eval.py").write_text("def score(state):\n    return 1.0\n")
        monkeypatch.syspath_prepend(str(tmp_path / "work"))
        argv = ["search", "--base", str(b), "--model", str(ms[0]), "--model", str(ms[1]), "--evaluator",
                "ninth_pass_dir_eval:score", "--grid", "density=0.5", "--dir", str(path)]
    rc, _, err = run_cli(argv, capsys)
    assert rc == 1 and "does not exist, and then back out of it with '..'" in err, err
    assert os.listdir(tmp_path / "out") == []


def test_an_adapt_checkpoint_takes_the_umasks_mode(tmp_path):
    """F10: the checkpoint beside the output was 0600 while every other output file follows the umask."""
    import stat
    import sys

    import torch

    import tiesmerge.adamerging  # noqa: F401 -- its package re-exports learn(), the function, under the same name

    learn = sys.modules["tiesmerge.adamerging.learn"]
    state = {"coefficients": torch.zeros(2, 2), "optimizer": {"state": {}, "param_groups": []}, "fingerprint": "f",
             "step": 1, "entropy": [], "config": {}}
    old = os.umask(0o022)
    try:
        learn._save(tmp_path / "ck.safetensors", state)
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "ck.safetensors").st_mode) == 0o644


def test_a_dry_run_names_a_copy_of_the_base(family, tmp_path, capsys):
    """F11: a byte copy of the base as a model printed "‖τ‖/‖θ_base‖ 0.0000" as a plain note in --dry-run."""
    import shutil

    _, b, ms = family
    copy = shutil.copytree(b, tmp_path / "copy_of_base")
    rc, out, err = run_cli(["merge", "--base", str(b), "--model", str(copy), "--model", str(ms[1]), "--dry-run"],
                           capsys)
    assert rc == 0 and "IDENTICAL to the base on every sampled row" in out + err, out + err


@pytest.mark.parametrize("path", ["/proc/self/mem", "/proc/self/status"])
def test_files_of_the_kernels_file_systems_are_not_data(path):
    """F12/F13: /proc/kmsg blocks a read; /proc/self/mem fails with EIO (reported as standard output's error)."""
    from tiesmerge.errors import ConfigError
    from tiesmerge.paths import read_regular

    with pytest.raises(ConfigError, match="is a file of the kernel's proc file system"):
        read_regular(path, "the data file", max_bytes=1 << 20, error=ConfigError)


def test_a_read_error_names_the_file_not_standard_output(tmp_path, monkeypatch):
    """F13's other half: an EIO while reading a data file came out as "cannot write to standard output"."""
    import io

    from tiesmerge.errors import ConfigError
    from tiesmerge.paths import read_regular

    data = tmp_path / "d.jsonl"
    data.write_text("{}\n")

    class Failing(io.RawIOBase):
        def readable(self):
            return True

        def readinto(self, buffer):
            raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fdopen", lambda *a, **k: io.BufferedReader(Failing()))
    with pytest.raises(ConfigError, match="d.jsonl: cannot read the data file \\(Input/output error\\)"):
        read_regular(data, "the data file", max_bytes=1 << 20, error=ConfigError)


def test_a_demo_refused_for_space_leaves_no_folder(tmp_path, capsys):
    """F14: the refusal left the new --workdir behind, holding only the demo's marker."""
    import shutil

    free = shutil.disk_usage(tmp_path).free
    params = 1.0 + free / 10e6  # million parameters needing more than the free space (bf16: 14 bytes each)
    if params > 10_000:
        pytest.skip("more free disk than the demo's largest size can need")
    rc, _, err = run_cli(["demo", "--synthetic", "--params", f"{params:.0f}", "--workdir", str(tmp_path / "demo")],
                         capsys)
    assert rc == 1 and "need" in err, err
    assert not (tmp_path / "demo").exists()
