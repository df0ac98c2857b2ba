"""Issue 13, the seventeenth independent hostile pass: one case per finding (F1-F8), and its notes."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import tiesmerge
from helpers_ckpt import make_family, run_cli, write_family_dirs, write_hf_dir
from tiesmerge.errors import CheckpointError, ConfigError, InvalidTensorError, MergeWarning
from tiesmerge.methods import Average, NuSlerp, Slerp, TaskArithmetic, Ties

LONG = {"model.embed_tokens.weight": (512, 256), "lm_head.weight": (512, 256),  # past 32,768 entries: torch splits
        "model.layers.0.mlp.up_proj.weight": (64, 256)}                          # such sums over its threads


@pytest.fixture
def family(tmp_path):
    return write_family_dirs(tmp_path)


def _long_family(folder):
    base, fts = make_family(2, shapes=LONG, with_int=False)
    return str(write_hf_dir(folder / "base", base)), [str(write_hf_dir(folder / f"ft{k}", ft))
                                                      for k, ft in enumerate(fts)]


def _cli(args, env):
    done = subprocess.run([sys.executable, "-m", "tiesmerge", *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), **env})
    assert done.returncode == 0, done.stderr
    return done


@pytest.mark.parametrize("method", ["slerp", "model_stock"])
def test_the_whole_tensor_sums_split_over_the_callers_thread_count_on_every_run(tmp_path, method):
    """F1: with OMP_NUM_THREADS=1 and no remembered verdict, the first run's sums split as over numba's 2 threads
    (its kernels had moved torch's count mid-merge); the second run (verdict remembered) as over 1, as torch does:
    the same command wrote different bits."""
    base, models = _long_family(tmp_path)
    env = {"OMP_NUM_THREADS": "1", "TIESMERGE_CACHE_DIR": str(tmp_path / "cache")}
    args = ["merge", "--base", base, "--model", models[0], "--model", models[1], "--method", method, "--no-progress"]
    for name in ("first", "second"):
        _cli([*args, "-o", str(tmp_path / name)], env)
    _cli([*args, "-o", str(tmp_path / "torch")], {**env, "TIESMERGE_KERNELS": "0"})  # torch itself, at 1 thread
    want = (tmp_path / "torch" / "model.safetensors").read_bytes()
    assert (tmp_path / "first" / "model.safetensors").read_bytes() == want
    assert (tmp_path / "second" / "model.safetensors").read_bytes() == want


def test_the_api_keeps_the_thread_count_the_caller_set(tmp_path):
    """F1, through the API: torch.set_num_threads(1) before a SLERP gave the 2-thread split."""
    base, models = _long_family(tmp_path)
    code = (f"import torch, tiesmerge; torch.set_num_threads(1); "
            f"tiesmerge.merge({base!r}, {models!r}, 'slerp:t=0.3', output={str(tmp_path / 'api')!r}); "
            "print(torch.get_num_threads())")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "TIESMERGE_CACHE_DIR": str(tmp_path / "cache")})
    assert done.returncode == 0 and done.stdout.strip() == "1", done.stderr
    _cli(["merge", "--base", base, "--model", models[0], "--model", models[1], "--method", "slerp", "--t", "0.3",
          "--no-progress", "-o", str(tmp_path / "torch")], {"OMP_NUM_THREADS": "1", "TIESMERGE_KERNELS": "0"})
    assert (tmp_path / "api" / "model.safetensors").read_bytes() == \
        (tmp_path / "torch" / "model.safetensors").read_bytes()


def _huge(tmp_path, scale=1e22):
    base, fts = make_family(2, with_int=False)
    scaled = [{name: v * scale for name, v in state.items()} for state in (base, *fts)]
    return (str(write_hf_dir(tmp_path / "hb", scaled[0])),
            [str(write_hf_dir(tmp_path / f"h{k}", state)) for k, state in enumerate(scaled[1:])])


@pytest.mark.parametrize("kernels", ["1", "0"])
def test_norms_that_overflow_float32_are_named(tmp_path, monkeypatch, kernels):
    """F2, F3: model_stock on values of 1e22 was refused with a hint blaming values 'near the dtype's range' (the
    norm overflows, not the values); nuslerp took such tensors as orthogonal without the warning slerp gives."""
    monkeypatch.setenv("TIESMERGE_KERNELS", kernels)
    base, models = _huge(tmp_path)
    with pytest.raises(InvalidTensorError, match="a task vector's norm is infinite") as caught:  # (hp67a c101: worded)
        tiesmerge.merge(base, models, "model_stock", output=str(tmp_path / "ms"))
    assert "for Inf or huge values" in caught.value.hint
    assert not (tmp_path / "ms").exists()
    with pytest.warns(MergeWarning, match="nuslerp: tensor .* has an infinite norm in float32"):
        tiesmerge.merge(base, models, NuSlerp(of="models"), output=str(tmp_path / "nu"))


def test_a_nan_is_not_called_an_overflowing_norm(tmp_path):
    """Note N1: slerp on a tensor holding one NaN warned of values "so large that its norm overflows" first."""
    base, fts = make_family(2, with_int=False)
    name = "model.layers.0.mlp.up_proj.weight"
    fts[0][name][3, 2] = float("nan")
    b, ms = write_hf_dir(tmp_path / "b", base), [write_hf_dir(tmp_path / f"m{k}", ft) for k, ft in enumerate(fts)]
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with pytest.raises(tiesmerge.errors.TiesMergeError):
            tiesmerge.merge(str(b), [str(m) for m in ms], Slerp(), output=str(tmp_path / "x"))
    assert not [w for w in seen if "infinite norm" in str(w.message)]


@pytest.mark.parametrize("method", ["slerp", "nuslerp"])
def test_an_inf_input_is_not_worded_as_huge_finite_values(tmp_path, method):
    """hp67a c102, c104: slerp and nuslerp on a tensor holding an Inf warned "values so large (about 1e19 or
    more) that its norm overflows" before the Inf's own error: the warning names an Inf as one cause."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(512, 8, generator=g)
    models = [w + 0.01 * torch.randn(512, 8, generator=g) for _ in range(2)]
    models[0][257, 1] = float("inf")  # a row the base-distance sample does not read: met first by the angle
    b, ms = write_hf_dir(tmp_path / "b", {"w": w}), [write_hf_dir(tmp_path / f"m{k}", {"w": m})
                                                     for k, m in enumerate(models)]
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with pytest.raises(tiesmerge.errors.TiesMergeError, match="holds Inf"):
            tiesmerge.merge(str(b), [str(m) for m in ms], method, output=str(tmp_path / "x"))
    said = [str(w.message) for w in seen if "infinite norm" in str(w.message)]
    assert said and all("or an Inf, which is refused as such" in s for s in said)
    assert not any("so large" in str(w.message) for w in seen)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="read leases are Linux's")
def test_a_model_another_process_holds_open_for_writing_is_refused(family, tmp_path):
    """F4: a download that preallocates its file and fills it in place (still open for writing) was merged from the
    zeros not written yet, without a word: the read lease could not be taken and the file was read without one."""
    b, ms = family
    weights = ms[0] / "model.safetensors"
    before = weights.read_bytes()
    writer = subprocess.Popen([sys.executable, "-c", f"import time; f = open({str(weights)!r}, 'r+b'); "
                               "print('open', flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "open"
        with pytest.raises(CheckpointError, match="another process has this file open for writing"):
            tiesmerge.merge(str(b), [str(m) for m in ms], output=str(tmp_path / "out"))
    finally:
        writer.kill()
        writer.wait()
    assert not (tmp_path / "out").exists() and weights.read_bytes() == before
    time.sleep(0.1)
    tiesmerge.merge(str(b), [str(m) for m in ms], output=str(tmp_path / "out"))  # once the writer is gone


def test_numpy_and_torch_scalars_inside_list_options_are_numbers(family, tmp_path):
    """F5: weights=list(np.array([...], np.float32)) was refused as 'must be a finite number, got np.float32(0.3)'."""
    assert TaskArithmetic(weights=list(np.array([0.25, 0.75], dtype=np.float32))).weights == (0.25, 0.75)
    assert TaskArithmetic(weights=np.array([0.5, 2.0])).weights == (0.5, 2.0)
    assert TaskArithmetic(weights=[0.5, torch.tensor(2.0)]).weights == (0.5, 2.0)
    assert Ties(densities=[np.float32(0.5), 0.25]).densities == (0.5, 0.25)
    b, ms = family
    tiesmerge.merge(str(b), [str(m) for m in ms], "task_arithmetic", weights=list(np.array([0.3, 0.7])),
                    output=str(tmp_path / "out"))
    with pytest.raises(ConfigError, match="must be a finite number"):  # a meta tensor holds no number (note N4)
        Slerp(t=torch.tensor(0.3, device="meta"))


def test_a_base_weight_that_nearly_cancels_the_others_is_refused(family, tmp_path, capsys):
    """F6: --base-weight -1.999999 --weights 1 1 sums to 1e-6 and scaled the merge a million-fold, silently (also
    through a mergekit linear recipe, whose summary printed the weight as -2)."""
    with pytest.raises(ConfigError, match=r"-1.999999, 1, 1 \(base_weight first\) sum to 1e-06"):
        Average(base_weight=-1.999999, weights=(1.0, 1.0))
    b, ms = family
    recipe = tmp_path / "linear.yaml"
    listed = [(b, -1.999999), (ms[0], 1), (ms[1], 1)]
    recipe.write_text(f"merge_method: linear\nbase_model: {b}\nmodels:\n"
                      + "".join(f"  - {{model: {m}, parameters: {{weight: {w}}}}}\n" for m, w in listed)
                      + "parameters: {normalize: true}\ndtype: float32\n")
    rc, _, err = run_cli(["merge", recipe, "-o", tmp_path / "out", "--no-progress"], capsys)
    assert rc != 0 and "sum to 1e-06" in err and not (tmp_path / "out").exists()
    assert Average(base_weight=-1.5, weights=(1.0, 1.0)).base_weight == -1.5  # a sum of 0.5 is a mean


def test_shards_without_their_index_are_named_as_such(family, tmp_path, monkeypatch):
    """F7: two shards and no index: "no model weights found (looked for *.safetensors)" and a hint to rename or remove
    the user's folder to use a Hugging Face cache that did not hold it, for an absolute path too."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    _, ms = family
    state = load_file(str(ms[0] / "model.safetensors"))
    keys = sorted(state)
    folder = tmp_path / "org" / "noindex"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text((ms[0] / "config.json").read_text())
    save_file({k: state[k] for k in keys[:3]}, str(folder / "model-00001-of-00002.safetensors"))
    save_file({k: state[k] for k in keys[3:]}, str(folder / "model-00002-of-00002.safetensors"))
    for given in (str(folder), "org/noindex"):
        monkeypatch.chdir(tmp_path)
        with pytest.raises(CheckpointError, match="holds 2 .safetensors files .* but no model.safetensors.index.json")\
                as caught:
            tiesmerge.open_checkpoint(given)
        assert "the index is missing" in caught.value.hint and "remove" not in caught.value.hint


def test_a_float64_output_that_overflows_float32_says_the_merge_computes_in_float32(tmp_path):
    """F8: a merged value of 4e39 with --dtype float64 was blamed on values past float64's 1.8e308."""
    base, models = _huge(tmp_path)
    with pytest.raises(tiesmerge.errors.TiesMergeError) as caught:
        tiesmerge.merge(base, models, TaskArithmetic(lam=1e20), output=str(tmp_path / "x"), dtype="float64")
    assert "computes in float32" in caught.value.hint and "1.8e308" not in caught.value.hint


def test_notes_of_the_seventeenth_pass(family, tmp_path, capsys, monkeypatch):
    """N2 a memory budget hint rounded to the nearest (the value it gave was refused again); N3 `--t 1e308` was told
    float32's range, not [0, 1]; N5 a single-quoted spec value was split at its commas; N6 a LoRA factor without its
    partner had a generic hint; N10 TIESMERGE_DIGEST_CACHE=off was ignored; N11 slerp t = 0 from the base wrote the
    base without a word; N12 a copied search folder was said to be edited."""
    from tiesmerge.sizes import format_size, parse_size

    needed = 26_623_263
    assert parse_size(format_size(needed, up=True).replace(" ", "")) >= needed
    with pytest.raises(ConfigError, match=r"t must be in \[0, 1\] \(fraction\), got 1e\+308"):
        Slerp(t=1e308)
    assert tiesmerge.api.method_of_spec("slerp:t_by_name='self_attn=0,1;*=0.5',layers=2").t_by_name == \
        "self_attn=0,1;*=0.5"
    b, ms = family
    with pytest.warns(MergeWarning, match="t = 0 is an endpoint: the merge is the base itself"):
        tiesmerge.merge(str(b), [str(ms[0])], Slerp(anchor="base", t=0.0), output=str(tmp_path / "t0"))
    monkeypatch.setenv("TIESMERGE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("TIESMERGE_DIGEST_CACHE", "off")
    tiesmerge.merge(str(b), [str(m) for m in ms], output=str(tmp_path / "nocache"))
    assert not (tmp_path / "cache" / "digests.json").exists()


def test_a_lora_factor_without_its_partner_says_the_adapter_is_incomplete(tmp_path):
    """Note N6."""
    from helpers_adapters import random_lora, write_lora_dir

    base, _ = make_family(1, with_int=False)
    folder = write_lora_dir(tmp_path / "lora", random_lora(base, 2, 0), alpha=4)
    weights = load_file(str(folder / "adapter_model.safetensors"))
    del weights[next(k for k in sorted(weights) if k.endswith("lora_B.weight"))]
    save_file(weights, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as caught:
        tiesmerge.open_checkpoint(str(folder))
    assert "incomplete or damaged" in caught.value.hint


def test_a_copied_search_folder_says_how_to_resume(tmp_path):
    """Note N12: the stamps of a copy's results.md and report.html are new: the message said they were edited."""
    from tiesmerge.errors import OutputError
    from tiesmerge.paths import SEARCH_STAMPS, check_report_unchanged

    folder = tmp_path / "search"
    folder.mkdir()
    (folder / "results.md").write_text("# results\n")
    (folder / SEARCH_STAMPS).write_text(json.dumps({"results.md": [1, 2]}))  # another file's stamp: a copy's
    with pytest.raises(OutputError) as caught:
        check_report_unchanged(folder)
    assert "folder was copied" in str(caught.value) and "resumes from log.jsonl" in caught.value.hint


@pytest.mark.parametrize("method", ["della", "della_linear"])
@pytest.mark.parametrize("shape", [(0,), (3, 0, 2)])
def test_della_merges_a_tensor_with_no_entries(tmp_path, method, shape):
    """Pass 18 F2: della on a (0,) or (3, 0, 2) tensor raised "unexpected IndexError" (a min over an empty dim)."""
    base, fts = make_family(2, with_int=False)
    for state in (base, *fts):
        state["extra.empty"] = torch.zeros(shape)
    out = tiesmerge.merge(base, fts, method)
    assert out["extra.empty"].shape == shape


def test_statistics_data_with_odd_labels_or_pairs_are_named(tmp_path):
    """Pass 18 F3, F4: `stats` on a label past int64 (gram and the exact Fisher use none) and on a text_pair that is
    no string printed "unexpected ValueError / TypeError" (a list blamed the model's config.json)."""
    from tiesmerge.stats.hf import read_jsonl

    data = tmp_path / "pairs.jsonl"
    for pair in ("5", "null", '["a", "b"]'):
        data.write_text(f'{{"text": "a premise", "text_pair": {pair}, "label": 1}}\n')
        with pytest.raises(ConfigError, match=r"pairs.jsonl:1: 'text_pair' must be a string"):
            read_jsonl(data)
    data.write_text('{"text": "fine", "label": 18446744073709551616}\n')
    assert read_jsonl(data)[0]["label"] == 2**64  # kept: gram and the exact Fisher never read it


def test_notes_of_the_eighteenth_pass(family, tmp_path):
    """Pass 18 N4: an average search over weights -1:1 (3 models) stopped at a candidate whose weights cancelled; N3
    a t_by_name value of 1e-320 was read as 0;
    N8: a copy of the base under slerp was said to "add nothing" while it pulls the merge toward the base."""
    from tiesmerge.tuning.space import build_space

    with pytest.raises(ConfigError, match="weights over -1:1 crosses 0"):
        build_space("average", 3, axes=["weights"], ranges={"weights": (-1.0, 1.0)})
    with pytest.raises(ConfigError, match="t_by_name holds t = 9.99989e-321, which must be 0 or at least 1.2e-38"):
        Slerp(t_by_name="*=1e-320", layers=2)  # N3: read as 0 where --t 1e-320 is refused
    b, ms = family
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in b.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    with pytest.warns(MergeWarning, match="pulls the merge toward the base"):
        tiesmerge.merge(str(b), [str(copy), str(ms[0])], Slerp(), output=str(tmp_path / "x"))


def test_a_schedule_rule_shadowed_by_an_earlier_one_warns():
    """Pass 18 N2: the first matching rule wins, so a later rule whose tensors all match an earlier one sets nothing
    (a repeated filter, a catch-all first): said, naming both rules; rules that each win somewhere stay silent."""
    names = ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.up_proj.weight", "model.embed.weight",
             "model.layers.0.cross_attn.k_proj.weight"]
    for schedule, dead in [("self_attn=0.3;self_attn=0.9;*=0.5", "rule 2 ('self_attn') is shadowed by rule 1"),
                           ("*=0.5;mlp=1", "rule 2 ('mlp') is shadowed by rule 1 ('*')"),
                           ("attn=0.1;self_attn=0.2", "rule 2 ('self_attn') is shadowed by rule 1 ('attn')")]:
        with pytest.warns(MergeWarning, match=re.escape(dead)):
            Slerp(t_by_name=schedule).check_tensors(dict.fromkeys(names, (2, 2)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Slerp(t_by_name="self_attn=0.2;attn=0.1;mlp=0.3;*=0.5").check_tensors(dict.fromkeys(names, (2, 2)))


@pytest.mark.parametrize("t", ["[.nan]", "[1.5]", "[{filter: mlp, value: [0, .inf]}, {value: 0.5}]"])
def test_a_recipe_t_outside_0_1_is_named_as_the_recipe_writes_it(family, tmp_path, capsys, t):
    """Pass 18 N6: a mergekit recipe's `t: [.nan]` was reported as the t_by_name flag; now as parameters.t."""
    b, ms = family
    recipe = tmp_path / "r.yml"
    recipe.write_text(f"merge_method: slerp\nbase_model: {b}\nmodels:\n  - model: {ms[0]}\nparameters:\n  t: {t}\n")
    rc, out, err = run_cli(["merge", str(recipe), "-o", str(tmp_path / "out")], capsys)
    assert rc == 2 and "parameters.t:" in err and "must be a finite number in [0, 1]" in err, err
    assert "t_by_name" not in err and not (tmp_path / "out").exists()


def test_adapt_cut_short_names_the_checkpoint_it_keeps_and_the_rerun_hint_says_resume(classifiers, tmp_path,
                                                                                     capsys, monkeypatch):
    """Pass 18 N5: a run stopped mid-way (a signal, Ctrl-C) keeps its checkpoint without saying so, and the same
    command then refused it with a hint at --force only, not at --resume, which continues the run."""
    import importlib

    learn = importlib.import_module("tiesmerge.adamerging.learn")

    root, base, fts, data = classifiers
    files = [tmp_path / f"task{k}.jsonl" for k in range(2)]
    for f in files:
        f.write_text(data.read_text())
    argv = ["adapt", "--base", base, *sum((["--model", f] for f in fts), []), *sum((["--data", f] for f in files), []),
            "--steps", "4", "--checkpoint-every", "1", "--batch-size", "2", "--no-progress", "-o", tmp_path / "out"]
    saved = learn._save

    def save_then_stop(path, state):
        saved(path, state)
        raise KeyboardInterrupt  # as the CLI's handler raises on SIGINT, after the first step's checkpoint

    monkeypatch.setattr(learn, "_save", save_then_stop)
    rc, out, err = run_cli(argv, capsys)
    checkpoint = tmp_path / "out.adapt-checkpoint.safetensors"
    assert rc == 130 and checkpoint.is_file() and not (tmp_path / "out").exists(), err
    assert f"the checkpoint of the steps done is kept: {checkpoint}" in err and "--resume" in err, err
    monkeypatch.setattr(learn, "_save", saved)
    rc, out, err = run_cli(argv, capsys)
    assert rc != 0 and "hint: --resume continues that run from it" in err, err
    rc, out, err = run_cli([*argv, "--resume"], capsys)
    assert rc == 0 and (tmp_path / "out" / "config.json").is_file(), err
