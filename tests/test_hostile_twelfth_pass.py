"""Issue 13, the twelfth independent hostile pass: one case per finding."""

from __future__ import annotations

import os
import stat

import tiesmerge
from helpers_adapters import random_lora, write_lora_dir
from helpers_ckpt import make_base, run_cli, write_hf_dir


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_adapter_and_demo_weights_follow_the_umask(tmp_path, capsys):
    """F4: a merged adapter's adapter_model.safetensors and the demo's shards were 0600 (safetensors' own mode) while
    every other output file follows the umask (0644 under 022)."""
    old = os.umask(0o022)
    try:
        base = make_base(0)
        b = write_hf_dir(tmp_path / "base", base)
        adapters = [write_lora_dir(tmp_path / f"a{k}", random_lora(base, 2, k), alpha=4.0) for k in range(2)]
        out = tiesmerge.merge(b, adapters, "ties", output=tmp_path / "out", output_format="adapter")
        assert _mode(out / "adapter_model.safetensors") == 0o644
        assert run_cli(["demo", "--synthetic", "--params", "0.05", "--workdir", str(tmp_path / "wd")], capsys)[0] == 0
        shards = list((tmp_path / "wd" / "base").glob("*.safetensors"))
        assert shards and all(_mode(p) == 0o644 for p in shards), [oct(_mode(p)) for p in shards]
    finally:
        os.umask(old)


def test_recipes_read_numbers_in_scientific_notation(tmp_path, capsys):
    """F1: `lam: 1e-1` in a recipe (and mergekit `weight: 5e-1`, which mergekit accepts) was text to PyYAML (YAML 1.1
    floats need a dot and a signed exponent): "lam must be a finite number, got '1e-1'"."""
    import json

    from helpers_ckpt import make_family

    base, fts = make_family(2)
    b = write_hf_dir(tmp_path / "base", base)
    ms = [write_hf_dir(tmp_path / f"ft{k}", ft) for k, ft in enumerate(fts)]
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"method: task_arithmetic\nbase: {b}\nmodels: [{ms[0]}, {ms[1]}]\nparameters: {{lam: 1e-1}}\n")
    rc, _, err = run_cli(["merge", str(recipe), "-o", str(tmp_path / "out"), "--no-progress"], capsys)
    assert rc == 0, err
    assert json.loads((tmp_path / "out" / "tiesmerge.json").read_text())["method"]["options"]["lam"] == 0.1
    mk = tmp_path / "mk.yaml"
    mk.write_text(f"merge_method: task_arithmetic\nbase_model: {b}\nmodels:\n"
                  f"  - model: {ms[0]}\n    parameters: {{weight: 5e-1}}\n  - model: {ms[1]}\n"
                  f"    parameters: {{weight: 1e0}}\n")
    rc, _, err = run_cli(["validate", str(mk)], capsys)
    assert rc == 0, err


def test_an_adapt_checkpoint_above_the_output_or_a_folder_is_named_so(tmp_path):
    """F2: `adapt -o X/sub/ad --checkpoint X/sub` said "the checkpoint lies at or inside the output directory" (the
    reverse), and `--checkpoint $PWD` never said that the checkpoint is a directory."""
    import pytest

    from test_adapt_hostile import _forward, _setup
    from tiesmerge.errors import OutputError

    base, fts, files = _setup(tmp_path)
    (tmp_path / "X" / "sub").mkdir(parents=True)
    with pytest.raises(OutputError, match="the checkpoint is a directory"):
        tiesmerge.adapt(base, fts, files, forward=_forward(), steps=1, output=tmp_path / "X" / "sub" / "ad",
                        checkpoint=tmp_path / "X" / "sub")
    with pytest.raises(OutputError, match="the output directory .* lies inside the checkpoint's path"):
        tiesmerge.adapt(base, fts, files, forward=_forward(), steps=1, output=tmp_path / "Y" / "sub" / "ad",
                        checkpoint=tmp_path / "Y" / "sub")


def test_a_slerp_filter_matching_no_tensor_is_warned(tmp_path, capsys):
    """F5: `--t-by-name "self_atn=0.9"` (a typo) merged every tensor at the default t, silently."""
    from helpers_ckpt import make_family

    base, fts = make_family(2)
    b = write_hf_dir(tmp_path / "base", base)
    ms = [write_hf_dir(tmp_path / f"ft{k}", ft) for k, ft in enumerate(fts)]
    argv = ["merge", "--base", str(b), "--model", str(ms[0]), "--model", str(ms[1]), "--method", "slerp",
            "--no-progress"]
    rc, _, err = run_cli([*argv, "--t-by-name", "self_atn=0.9", "-o", str(tmp_path / "o1")], capsys)
    assert rc == 0 and "filters) 'self_atn' match no tensor" in err, err
    rc, _, err = run_cli([*argv, "--t-by-name", "self_attn=0.9", "-o", str(tmp_path / "o2")], capsys)
    assert rc == 0 and "match no tensor" not in err, err


def test_a_mergekit_problem_is_said_once(tmp_path, capsys):
    """F6: `normalize: maybe` and a `density` gradient were followed by lines about a None the recipe never wrote."""
    from helpers_ckpt import make_family

    base, fts = make_family(2)
    b = write_hf_dir(tmp_path / "base", base)
    ms = [write_hf_dir(tmp_path / f"ft{k}", ft) for k, ft in enumerate(fts)]
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"merge_method: ties\nbase_model: {b}\nparameters: {{normalize: maybe, density: [0.1, 0.9]}}\n"
                      f"models:\n  - model: {ms[0]}\n    parameters: {{weight: 1}}\n  - model: {ms[1]}\n"
                      "    parameters: {weight: 1}\n")
    rc, _, err = run_cli(["validate", str(recipe)], capsys)
    assert rc == 2 and "2 problems" in err and "None" not in err, err


def test_unrecognized_arguments_show_the_commands_own_usage(capsys):
    """F3: `tiesmerge validate RECIPE --model A` printed the top level's usage ("usage: tiesmerge [-h] [--version]
    ... COMMAND ...") instead of validate's, which says it takes only a recipe."""
    import pytest

    from tiesmerge.cli.main import main

    with pytest.raises(SystemExit) as caught:
        main(["validate", "r.yaml", "--model", "a"])
    err = capsys.readouterr().err
    assert caught.value.code == 2 and "usage: tiesmerge validate" in err, err
    assert "tiesmerge validate: error: unrecognized arguments: --model a" in err, err



def test_statistics_of_a_model_whose_config_misnames_its_class_are_refused_first(tmp_path, capsys):
    """F8: `stats gram` on a causal LM whose config.json has no `architectures` (or a string there) built a headless
    model, wrote statistics named without "model.", and only the later regmean merge failed, blaming them."""
    import json

    import transformers

    from helpers_models import save_word_tokenizer
    from test_evaluation_builtin import CLASSIFIER_WORDS

    cfg = transformers.LlamaConfig(vocab_size=len(CLASSIFIER_WORDS), hidden_size=16, intermediate_size=32,
                                   num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                   max_position_embeddings=32, tie_word_embeddings=False)
    model_dir = tmp_path / "lm"
    transformers.LlamaForCausalLM(cfg).save_pretrained(model_dir, safe_serialization=True)
    save_word_tokenizer(model_dir)
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "good film"}\n{"text": "bad plot"}\n')
    config = json.loads((model_dir / "config.json").read_text())
    for architectures in (None, "LlamaForCausalLM"):
        config.pop("architectures", None)
        if architectures is not None:
            config["architectures"] = architectures
        (model_dir / "config.json").write_text(json.dumps(config))
        rc, _, err = run_cli(["stats", "gram", "--model", str(model_dir), "--data", str(data), "-o",
                              str(tmp_path / "st")], capsys)
        assert rc == 2 and "its statistics would match no tensor of the model" in err, err
        assert not (tmp_path / "st").exists()


def test_an_unknown_method_hints_at_the_methods(tmp_path, capsys):
    """F7: `merge --method tiez` hinted at flags, units and sizes ("sizes are like 2GB"), not at the methods."""
    from helpers_ckpt import make_family

    base, fts = make_family(2)
    b = write_hf_dir(tmp_path / "base", base)
    ms = [write_hf_dir(tmp_path / f"ft{k}", ft) for k, ft in enumerate(fts)]
    rc, _, err = run_cli(["merge", "--base", str(b), "--model", str(ms[0]), "--model", str(ms[1]), "--method", "tiez",
                          "-o", str(tmp_path / "o")], capsys)
    assert rc == 2 and "did you mean 'ties'" in err and "hint: the methods are ties, " in err and "2GB" not in err, err


def test_force_over_a_manifest_listing_no_file_names_it_damaged(tmp_path, capsys):
    """F9: `written` holding '', '.', '/' made --force refuse (safe) with "would discard your changes to 3 file(s)
    (changed since: , ., /)" instead of calling the manifest damaged."""
    import json

    from helpers_ckpt import make_family

    base, fts = make_family(2)
    b = write_hf_dir(tmp_path / "base", base)
    ms = [write_hf_dir(tmp_path / f"ft{k}", ft) for k, ft in enumerate(fts)]
    argv = ["merge", "--base", str(b), "--model", str(ms[0]), "--model", str(ms[1]), "-o", str(tmp_path / "out"),
            "--no-progress"]
    assert run_cli(argv, capsys)[0] == 0
    manifest = tmp_path / "out" / "tiesmerge.json"
    data = json.loads(manifest.read_text())
    data["written"] = [*data["written"], "", ".", "/"]
    manifest.write_text(json.dumps(data))
    rc, _, err = run_cli([*argv, "--force"], capsys)
    assert rc == 1 and "the manifest is damaged" in err and "changed since" not in err, err
    assert (tmp_path / "out" / "tiesmerge.json").is_file()


def test_an_empty_revision_is_named(tmp_path, monkeypatch):
    """Pass 12's NOTE: `org/a@` (an '@' with no revision) was "no such file or directory"."""
    import pytest

    from tiesmerge.errors import CheckpointError
    from tiesmerge.hub import resolve_source

    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match="no revision after '@'"):
        resolve_source("org/a@")
