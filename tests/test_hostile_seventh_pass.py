"""Issue 13, the seventh independent hostile pass: one case per finding, checked as the catalogue checks its cases."""

from __future__ import annotations

import json

import pytest
import torch

import test_hostile_catalogue
from helpers_ckpt import make_family, run_cli, write_hf_dir
from test_hostile_catalogue import _merge, check, snapshot

family = test_hostile_catalogue.family


def test_a_dangling_link_at_the_output_is_kept_without_force(family, tmp_path, capsys):
    inputs, b, ms = family
    (tmp_path / "out").mkdir()
    link = tmp_path / "out" / "dangl"
    link.symlink_to("../elsewhere")
    before = snapshot(inputs)
    rc, _, err = run_cli(_merge(b, ms, link), capsys)
    check(rc, err, want_rc=1, needle=("is a link (to '../elsewhere') whose target does not exist",
                                       "never replaces a link, --force included"),
          output=None, inputs=inputs, before=before)
    assert link.is_symlink() and not (tmp_path / "elsewhere").exists()


def test_dry_run_names_a_non_finite_weight_instead_of_an_infinite_distance(tmp_path, capsys):
    base, fts = make_family(2)
    fts[1]["model.layers.0.mlp.up_proj.weight"][3, 2] = float("inf")
    b = write_hf_dir(tmp_path / "base", base)
    ms = [write_hf_dir(tmp_path / f"ft{k}", ft) for k, ft in enumerate(fts)]
    rc, out, err = run_cli(["merge", "--base", str(b), "--model", str(ms[0]), "--model", str(ms[1]), "--dry-run"],
                           capsys)
    assert rc == 1 and "'model.layers.0.mlp.up_proj.weight' (16, 8) holds Inf" in err and "ft1" in err, out + err


@pytest.mark.parametrize("path", ["[../m/a]", "null", "{x: 1}"])
def test_a_recipe_model_path_that_is_not_text_is_named(family, tmp_path, capsys, monkeypatch, path):
    inputs, b, ms = family
    rc_dir = tmp_path / "work" / "rc"
    rc_dir.mkdir()
    (rc_dir / "None").mkdir()  # where a stringified null would have pointed
    (rc_dir / "r.yaml").write_text(f"method: ties\nbase: {b}\nmodels: [{{path: {path}}}, {ms[1]}]\n")
    rc, _, err = run_cli(["merge", "rc/r.yaml", "-o", str(tmp_path / "out")], capsys)
    assert rc == 2 and "models[0].path must be the path of a model (text)" in err, err


def test_an_index_that_leaves_out_a_tensor_its_shard_holds_is_named(tmp_path, capsys):
    base, fts = make_family(2)
    b = write_hf_dir(tmp_path / "base", base, shards=2)
    ms = [write_hf_dir(tmp_path / f"ft{k}", ft, shards=2) for k, ft in enumerate(fts)]
    index = ms[1] / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"].pop("lm_head.weight")
    index.write_text(json.dumps(data))
    rc, _, err = run_cli(_merge(b, ms, tmp_path / "out"), capsys)
    assert rc == 1 and "model 1's index (model.safetensors.index.json) does not list 1 tensor(s)" in err, err
    assert "'lm_head.weight'" in err and "regenerate it" in err


def test_breadcrumbs_gamma_one_warns_once_that_density_and_gamma_pass_one(family, tmp_path, capsys):
    """gamma 1 dropped every entry under threshold_ties 'keep' (the merge the base), while 'sort' (mergekit) kept the
    smallest density: both keep the density now, as mergekit does, and say so once (hp63a c47)."""
    inputs, b, ms = family
    rc, _, err = run_cli(_merge(b, ms, tmp_path / "out", "--method", "breadcrumbs", "--gamma", "1"), capsys)
    assert rc == 0 and err.count("warning: breadcrumbs: density 0.") == 1 and "+ gamma 1 is past 1" in err, err
    rc, _, err = run_cli(_merge(b, ms, tmp_path / "out2", "--method", "breadcrumbs", "--gamma", "0.5"), capsys)
    assert rc == 0 and "warning" not in err, err


@pytest.mark.parametrize("reader", ["loads_json", "loads_yaml"])
def test_an_integer_of_thousands_of_digits_is_named_without_pythons_remedy(reader):
    from tiesmerge import limits
    from tiesmerge.errors import CheckpointError

    with pytest.raises(CheckpointError) as info:
        getattr(limits, reader)('{"a": ' + "1" * 5001 + "}", "x.json")
    assert "more than 4,300 digits" in str(info.value) and "set_int_max_str_digits" not in str(info.value)


def test_a_huge_text_is_cut_before_it_is_tokenized():
    from tiesmerge.evaluation.loading import CHARS_PER_TOKEN_BOUND, clipped

    assert clipped("a b c", 8) == "a b c"
    assert len(clipped("x" * 10_000_000, 8)) == 8 * CHARS_PER_TOKEN_BOUND


def test_a_merged_adapter_names_the_base_it_was_merged_on(tmp_path, capsys):
    from helpers_adapters import random_lora, write_lora_dir
    from helpers_ckpt import make_base

    base = make_base()
    b = write_hf_dir(tmp_path / "base", base)
    stranger = {"base_model_name_or_path": "evil-org/backdoored-base", "revision": "deadbeef",
                "auto_mapping": {"parent_library": "evil_pkg", "base_model_class": "X"}}
    loras = [write_lora_dir(tmp_path / f"lora{k}", random_lora(base, 2, k), alpha=4.0,
                            config=stranger if k == 0 else None) for k in range(2)]
    rc, _, err = run_cli(["merge", "--base", str(b), "--model", str(loras[0]), "--model", str(loras[1]),
                          "--method", "task_arithmetic", "--output-format", "adapter", "-o", str(tmp_path / "out"),
                          "--no-progress"], capsys)
    assert rc == 0, err
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(b) and config["revision"] is None
    assert "auto_mapping" not in config


def test_a_link_at_the_output_is_never_replaced_without_force(family, tmp_path, capsys):
    inputs, b, ms = family
    target = tmp_path / "empty"
    target.mkdir()
    link = tmp_path / "lnk"
    link.symlink_to(target)
    rc, _, err = run_cli(_merge(b, ms, link), capsys)
    assert rc == 1 and "the output path is a link (to" in err and "--force" in err, err
    assert link.is_symlink() and list(target.iterdir()) == []
    rc, _, err = run_cli([*_merge(b, ms, link), "--force"], capsys)  # nor with --force (hp47 c56)
    assert rc == 1 and "never replaces a link, --force included" in err, err
    assert link.is_symlink() and list(target.iterdir()) == []


def test_force_keeps_a_file_the_manifest_lists_but_never_stamped(family, tmp_path, capsys):
    inputs, b, ms = family
    out = tmp_path / "out"
    rc, _, err = run_cli(_merge(b, ms, out), capsys)
    assert rc == 0, err
    (out / "notes.txt").write_text("the user's notes")
    manifest = json.loads((out / "tiesmerge.json").read_text())
    manifest["written"].append("notes.txt")  # an edited manifest vouching for the user's file
    (out / "tiesmerge.json").write_text(json.dumps(manifest))
    rc, _, err = run_cli(_merge(b, ms, out, "--force"), capsys)
    assert rc == 1 and "notes.txt" in err, err
    assert (out / "notes.txt").read_text() == "the user's notes"


def test_figures_with_control_characters_print_no_matplotlib_warnings(capsys):
    import warnings

    from tiesmerge.plotting import png, pyplot

    plt = pyplot("a test")
    fig, ax = plt.subplots()
    ax.set_title("a\x1b]0;PWN\x07\x1b[2J")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert png(fig).startswith(b"\x89PNG")


def test_a_byte_identical_copy_of_a_model_warns_that_it_counts_twice(family, tmp_path, capsys):
    import shutil

    inputs, b, ms = family
    twin = shutil.copytree(ms[0], inputs / "twin")
    rc, _, err = run_cli(_merge(b, [ms[0], ms[1], twin], tmp_path / "out"), capsys)
    assert rc == 0 and "models 0 (" in err and "and 2 (" in err and "counts twice" in err, err


def test_force_keeps_an_empty_folder_the_user_made_in_an_output(family, tmp_path, capsys):
    inputs, b, ms = family
    out = tmp_path / "out"
    rc, _, err = run_cli(_merge(b, ms, out), capsys)
    assert rc == 0, err
    (out / "my-results").mkdir()
    rc, _, err = run_cli(_merge(b, ms, out, "--force"), capsys)
    assert rc == 1 and "my-results" in err, err
    assert (out / "my-results").is_dir()


def _lora_family(tmp_path, base):
    from helpers_adapters import random_lora, write_lora_dir

    b = write_hf_dir(tmp_path / "base", base)
    loras = [write_lora_dir(tmp_path / f"lora{k}", random_lora(base, 2, k), alpha=4.0) for k in range(2)]
    return b, loras


def test_dtype_casts_the_tensors_copied_from_the_base_too(tmp_path, capsys):
    """F12: with LoRA adapters, ``--dtype`` reached only the adapted tensors; the rest stayed float32."""
    import tiesmerge
    from helpers_adapters import TARGETS
    from helpers_ckpt import load_dir, make_base

    base = make_base()
    base["model.position_ids"] = torch.arange(32, dtype=torch.int64)  # an integer buffer keeps its dtype
    b, loras = _lora_family(tmp_path, base)
    rc, _, err = run_cli(["merge", "--base", str(b), "--model", str(loras[0]), "--model", str(loras[1]),
                          "--dtype", "fp16", "-o", str(tmp_path / "out"), "--no-progress"], capsys)
    assert rc == 0, err
    out = load_dir(tmp_path / "out")
    assert {n for n, v in out.items() if v.dtype != torch.float16} == {"model.position_ids"}
    assert out["model.position_ids"].dtype == torch.int64
    for name in set(base) - set(TARGETS) - {"model.position_ids"}:  # copied: the base's values, rounded once
        assert torch.equal(out[name], base[name].half()), name
    state = tiesmerge.merge(b, loras, "ties", dtype="float16")  # the API's state dict alike
    assert {n for n, v in state.items() if v.dtype != torch.float16} == {"model.position_ids"}


def test_a_copied_tensor_past_the_output_dtype_is_an_error_naming_it(tmp_path, capsys):
    """F12's other half: a base value that a float16 copy would turn into Inf stops the merge."""
    from helpers_ckpt import make_base

    base = make_base()
    base["model.norm.weight"][5] = 7e4  # no adapter targets model.norm
    inputs = tmp_path / "in"
    b, loras = _lora_family(inputs, base)
    before = snapshot(inputs)
    rc, _, err = run_cli(["merge", "--base", str(b), "--model", str(loras[0]), "--model", str(loras[1]),
                          "--dtype", "fp16", "-o", str(tmp_path / "out"), "--no-progress"], capsys)
    check(rc, err, want_rc=1, needle=("tensor 'model.norm.weight' (copied from the base, not merged)",
                                      "element 5", "70000", "--dtype bfloat16"),
          output=tmp_path / "out", inputs=inputs, before=before)
