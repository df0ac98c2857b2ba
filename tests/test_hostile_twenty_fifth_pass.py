"""Issue 13, the twenty-fifth independent hostile pass (hp25): its defects and notes (F1, F2 and F13's PEFT rules are
checked module by module against PEFT itself in test_hostile_twenty_fourth_pass)."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sys
import time

import pytest
import torch

from helpers_adapters import random_ia3, random_lora, write_ia3_dir, write_lora_dir
from helpers_ckpt import assert_no_output, finetune, make_base, run_cli, write_family_dirs, write_hf_dir
from tiesmerge.errors import ConfigError

_LONG_INDEX = "9" * 5000


def _snapshot(*folders):
    return {p: p.read_bytes() for f in folders for p in sorted(f.rglob("*")) if p.is_file()}


def _lora_merge(tmp_path, capsys, config=None, extra=None):
    base = make_base()
    b = write_hf_dir(tmp_path / "base", base)
    lora = write_lora_dir(tmp_path / "lora", random_lora(base, 2, seed=1), alpha=4, config=config or {}, extra=extra)
    before = _snapshot(b, lora)
    out = tmp_path / "out"
    rc, _, err = run_cli(["merge", "--method", "task_arithmetic", "--base", str(b), "--model", str(lora),
                          "-o", str(out)], capsys)
    assert _snapshot(b, lora) == before and "Traceback" not in err
    return rc, err, out


@pytest.mark.parametrize("config, ok", [
    ({"layers_to_transform": []}, True),  # F1: PEFT tests no layer for an empty list
    ({"target_modules": ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj", "up_proj"],
      "layers_to_transform": [0]}, False),  # layer 1's up_proj is tested (a suffix entry); its q_proj is named whole
    ({"target_modules": ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj",
                         "model.layers.0.mlp.up_proj", "model.layers.1.mlp.up_proj"],
      "layers_to_transform": [0]}, True),
    ({"target_modules": ["q_proj", "up_proj"], "layers_to_transform": [1, 0], "layers_pattern": "model.layers"}, True),
    ({"exclude_modules": r"(?=.*layers\.1\.).*"}, False),  # F13: a lookahead no longer turns the check off
    ({"target_modules": r"^(?!.*layers\.1\.).*proj"}, False),
    ({"target_modules": r"^(?!.*vision).*proj"}, True),
])
def test_lora_configs_are_judged_as_peft_judges_them(tmp_path, capsys, config, ok):
    rc, err, out = _lora_merge(tmp_path, capsys, config)
    if ok:
        assert rc == 0 and "does not adapt" not in err, err
    else:
        assert rc != 0 and "its config does not adapt" in err, err
        assert_no_output(out)


def test_a_modules_to_save_copy_the_config_does_not_declare_is_refused(tmp_path, capsys):
    """F8: lm_head saved whole (lm_head.modules_to_save.default.weight) beside a config without modules_to_save: PEFT
    has no wrapper to put it in and drops it; the merge carried it into the output."""
    copy = (make_base()["lm_head.weight"] + 0.5).contiguous()
    rc, err, out = _lora_merge(tmp_path, capsys, extra={"lm_head.modules_to_save.default.weight": copy})
    assert rc != 0 and "modules_to_save does not name it" in err, err
    assert_no_output(out)
    rc, err, _ = _lora_merge(tmp_path / "declared", capsys, config={"modules_to_save": ["lm_head"]},
                             extra={"lm_head.modules_to_save.default.weight": copy})
    assert rc == 0, err


@pytest.mark.parametrize("config, culprit", [
    ({"init_lora_weights": "lora_ga"}, "init_lora_weights 'lora_ga'"),  # F9: W - s·B0·A0, as PiSSA
    ({"alora_invocation_tokens": [5, 6, 7]}, "alora_invocation_tokens"),  # F10: activated LoRA cannot be folded
    ({"arrow_config": {"top_k": 2}}, "arrow_config"),
    ({"use_bdlora": {"nblocks": 2}}, "use_bdlora"),
    ({"kasa_config": {"x": 1}}, "kasa_config"),
])
def test_lora_variants_that_are_not_s_b_a_are_refused(tmp_path, capsys, config, culprit):
    rc, err, out = _lora_merge(tmp_path, capsys, config)
    assert rc != 0 and "this LoRA variant is not supported" in err and culprit in err, err
    assert_no_output(out)


def test_a_huge_target_modules_regex_is_neither_slow_nor_silent(tmp_path, capsys):
    """F7: a 28 MB alternation took a minute and 3.7 GB in re.compile, then skipped the check without a word."""
    start = time.perf_counter()
    rc, err, _ = _lora_merge(tmp_path, capsys, {"target_modules": "q_proj|" * 400_000 + "up_proj"})
    assert rc == 0 and "is not checked" in err, err
    assert time.perf_counter() - start < 30


def test_ia3_vectors_must_have_the_layout_feedforward_modules_gives(tmp_path, capsys):
    """F3: PEFT builds a feed-forward module's vector as (1, in), any other's as (out, 1); q_proj (8x8, square)
    stored as (1, in) while feedforward_modules does not name it was merged as an input scaling."""
    base = make_base()
    b = write_hf_dir(tmp_path / "base", base)
    vectors = random_ia3(base, seed=1)
    q = "model.layers.0.self_attn.q_proj"
    vectors[q] = vectors[q].reshape(1, -1)  # (8, 1) -> (1, 8): fits the weight's columns as well as its rows
    ia3 = write_ia3_dir(tmp_path / "ia3", vectors)
    rc, _, err = run_cli(["merge", "--method", "task_arithmetic", "--base", str(b), "--model", str(ia3),
                          "-o", str(tmp_path / "out")], capsys)
    assert rc != 0 and "feedforward_modules does not name" in err and "(8, 1)" in err, err


def test_a_layer_index_of_5000_digits_is_no_bug(tmp_path, capsys):
    """F4: int() of more than 4300 digits raised inside slerp's t_by_name gradient ("a bug in tiesmerge")."""
    shapes = {"model.layers.0.self_attn.q_proj.weight": (4, 4), f"model.layers.{_LONG_INDEX}.x.weight": (4, 4)}
    base = make_base(shapes=shapes, with_int=False)
    b = write_hf_dir(tmp_path / "base", base)
    ms = [write_hf_dir(tmp_path / f"ft{k}", finetune(base, k)) for k in range(2)]
    rc, _, err = run_cli(["merge", "--method", "slerp", "--base", str(b), "--model", str(ms[0]), "--model",
                          str(ms[1]), "--layers", "2", "--t-by-name", "self_attn=0,1;*=0.5",
                          "-o", str(tmp_path / "out")], capsys)
    assert rc == 0 and "bug" not in err, err
    from tiesmerge.analysis.runner import _layer_and_module
    from tiesmerge.methods.schedule import layer_index

    assert layer_index(f"model.layers.{_LONG_INDEX}.x.weight") is None
    assert _layer_and_module(f"model.layers.{_LONG_INDEX}.x.weight")[0] is None


def test_a_planted_temporary_name_with_an_impossible_pid_breaks_nothing(tmp_path, capsys, monkeypatch):
    """F5: a folder named like tiesmerge's temporaries with a pid past 2**31, planted beside the output or in a
    shared /tmp, made every run fail with "unexpected OverflowError"; it is left alone (not ours to remove)."""
    host = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
    b, ms = write_family_dirs(tmp_path)
    planted = [tmp_path / f".tiesmerge-tmp-{host}-99999999999999-abc", tmp_path / f".tiesmerge-old-{host}-0-abc"]
    scratch = tmp_path / "tmp"
    planted += [scratch / f"tiesmerge-torch-{host}-99999999999999-abc", scratch / f"tiesmerge-numba-{host}-4194305-x"]
    for folder in planted:
        folder.mkdir(parents=True)
    monkeypatch.setenv("TMPDIR", str(scratch))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)
    rc, _, err = run_cli(["merge", "--base", str(b), "--model", str(ms[0]), "--model", str(ms[1]),
                          "-o", str(tmp_path / "out")], capsys)
    assert rc == 0, err
    assert all(folder.is_dir() for folder in planted)
    from tiesmerge.scratch import process_is_dead

    assert not any(process_is_dead(pid) for pid in ("99999999999999", "0", "٣", str(os.getpid())))


def test_a_data_text_holding_half_a_surrogate_pair_is_named_as_such(tmp_path):
    """F6: {"text": "\\ud800"} is valid JSON but no text; stats and adapt blamed the model's config.json."""
    from tiesmerge.limits import read_json_lines

    data = tmp_path / "surr.jsonl"
    data.write_text('{"text": "fine"}\n{"text": "a \\ud800 b"}\n{"text": "\\ud83d\\ude00 a pair is fine"}\n')
    with pytest.raises(Exception, match=r"surr.jsonl:2: a string holds \\ud800, half of a UTF-16 surrogate pair"):
        read_json_lines(data, "the data", max_bytes=1 << 20)
    data.write_text('{"text": "fine"}\n{"text": "\\ud83d\\ude00 a pair is fine"}\n')
    assert len(read_json_lines(data, "the data", max_bytes=1 << 20)) == 2


@pytest.mark.parametrize("content", [b"\x00\x01\x02", b"method: ties\n\x1b[31m\n", b"merge_method: ties\x00\n"])
def test_a_control_character_in_a_recipe_is_invalid_yaml_not_a_bug(tmp_path, capsys, content):
    """F11: PyYAML's ReaderError (a character YAML does not allow) escaped as "unexpected ReaderError ... a bug"."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_bytes(content)
    for argv in (["validate", str(recipe)], ["merge", str(recipe), "-o", str(tmp_path / "out")]):
        rc, _, err = run_cli(argv, capsys)
        assert rc != 0 and "not valid YAML (the character U+00" in err and "bug" not in err, err
    assert_no_output(tmp_path / "out")


@pytest.mark.skipif(sys.platform != "linux", reason="a file name of bytes that are no UTF-8")
def test_names_that_are_no_utf8_are_shown_escaped(tmp_path, capsys):
    """F12: a model path holding the byte \\xff broke analyze's plots; a data file d\\xff.jsonl broke adapt's
    fingerprint (both "unexpected ... a bug in tiesmerge")."""
    b, ms = write_family_dirs(tmp_path)
    odd = tmp_path / os.fsdecode(b"bad\xffname")
    ms[0].rename(odd)
    rc, _, err = run_cli(["analyze", "--base", str(b), "--model", str(odd), "--model", str(ms[1]),
                          "-o", str(tmp_path / "report"), "--no-progress"], capsys)
    assert rc == 0, err
    assert "bad\\xffname" in (tmp_path / "report" / "report.html").read_text(encoding="utf-8")  # \xNN (hp38 C17)
    from tiesmerge.adamerging.run import read_task_data

    data = tmp_path / os.fsdecode(b"d\xff.jsonl")
    data.write_text('{"text": "a"}\n')
    assert list(read_task_data([data], None)) == ["d\\xff"]  # the byte, escaped


def test_notes_of_the_twenty_fifth_pass(tmp_path, capsys):
    """N3: statistics of 0 examples; N4: one model's Fisher statistics all zeros; N8: nuslerp at an endpoint, and
    "both weights are 0" for (0, 1e-30)."""
    from tiesmerge.errors import MergeWarning
    from tiesmerge.methods.nuslerp import NuSlerp
    from tiesmerge.stats.files import StatsManifest

    with pytest.raises(Exception, match="computed from 0 examples"):
        StatsManifest.from_dict({"kind": "fisher", "examples": 0}, "tiesmerge_stats.json")
    with pytest.warns(MergeWarning, match=r"t = 0 \(from the weights\) is an endpoint: the merge is the first model"):
        NuSlerp(weights=(1.0, 0.0)).check_tensors({"w": (2, 2)})
    with pytest.warns(MergeWarning, match="the weights sum to 0 or nearly"):
        NuSlerp(weights=(0.0, 1e-30)).check_tensors({"w": (2, 2)})
    import warnings

    with warnings.catch_warnings():  # hp70a c44: 1e-7 and 9.5e-7 sum past 1e-6, so their ratio is taken: no word
        warnings.simplefilter("error")
        NuSlerp(weights=(1e-7, 9.5e-7)).check_tensors({"w": (2, 2)})
    assert NuSlerp(weights=(1e-7, 9.5e-7)).interpolation() == pytest.approx(9.5 / 10.5)
    with pytest.raises(ConfigError):
        NuSlerp(weights=(1.0, -1.0)).requirements()


def test_fisher_statistics_all_zeros_for_one_model_are_said(tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    from tiesmerge.stats.files import StatsManifest

    b, ms = write_family_dirs(tmp_path)
    stats = []
    for k, model in enumerate(ms):
        folder = tmp_path / f"stats{k}"
        folder.mkdir()
        tensors = {n: (torch.zeros_like(t) if k == 0 else torch.rand_like(t)) for n, t in
                   load_file(str(model / "model.safetensors")).items() if t.is_floating_point()}
        save_file(tensors, str(folder / "model.safetensors"))
        from tiesmerge.stats import files_digest

        manifest = StatsManifest("fisher", 8, {}, model_digest=files_digest(model))
        (folder / "tiesmerge_stats.json").write_text(json.dumps(manifest.to_dict()))
        stats += ["--stats", str(folder)]
    rc, _, err = run_cli(["merge", "--method", "fisher", "--base", str(b), "--model", str(ms[0]), "--model",
                          str(ms[1]), *stats, "-o", str(tmp_path / "out")], capsys)
    assert rc == 0 and "statistics of model(s) 0 are all zeros" in err, err


@pytest.mark.parametrize("pattern, outcome", [
    (r"(?<=model\.)layers", "peft"),  # a lookbehind: PEFT's own expression, on the regex package (hp27)
    (["h|layers", "blocks"], "peft"),  # a top-level '|' splits PEFT's pasted expression: reproduced
    ("x" * 30_000, "unchecked"),  # no re.compile of an unbounded string
    ("(layers", "invalid"),
    (["h|layers", "(bad"], "invalid"),
])
def test_layers_pattern_entries_tiesmerge_cannot_run_are_said(pattern, outcome):
    from tiesmerge.errors import CheckpointError, MergeWarning
    from tiesmerge.io.peft_targets import check_adapted

    config = {"target_modules": ["q_proj"], "layers_to_transform": [0], "layers_pattern": pattern}
    if outcome == "invalid":
        with pytest.raises(CheckpointError, match="layers_pattern: pattern key .* is not a valid regular expression"):
            check_adapted(config, ["model.layers.1.q_proj"], "adapter_config.json")
    elif outcome == "peft":
        import warnings

        pytest.importorskip("peft.tuners.tuners_utils")
        from helpers_adapters import peft_adapts, tiesmerge_adapts

        for module in ("model.layers.1.q_proj", "model.layers.0.q_proj", "layers.0.q_proj", "x.blocks.0.h.1.q_proj"):
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # decided, not "unchecked"
                assert tiesmerge_adapts(config, module) == peft_adapts(config, module), (pattern, module)
    else:
        with pytest.warns(MergeWarning, match="layers_pattern holds a regex .* is not checked"):
            check_adapted(config, ["model.layers.1.q_proj"], "adapter_config.json")


def test_the_twenty_sixth_pass(tmp_path, capsys):
    """hp26 F1: a lookahead selector whose repeats multiply out to 10^9 (the regex package's compile took minutes and
    gigabytes); F3: 10,000 modules_to_save entries (one automaton pass per entry and span); F4: a base-less mergekit
    nuslerp with weights 1, -1 merged at t = 0.5 (the flags refuse it); N1: lora_bias "false" called a variant;
    N2: alpha_pattern giving a module alpha 0 or less without a word."""
    from tiesmerge.errors import MergeWarning
    from tiesmerge.io.peft_targets import check_adapted

    modules = [f"model.layers.{i}.self_attn.{p}" for i in range(32) for p in ("q_proj", "k_proj")]
    start = time.perf_counter()
    with pytest.warns(MergeWarning, match="target_modules holds a regex .* is not checked"):
        check_adapted({"target_modules": r"(?=x)((a{1000}){1000}){1000}|.*proj"}, modules, "adapter_config.json")
    check_adapted({"target_modules": ["q_proj", "k_proj"], "modules_to_save": [f"m{i}" for i in range(10_000)]},
                  modules, "adapter_config.json")
    check_adapted({"target_modules": ["q_proj", "k_proj"], "modules_to_save": [rf"m{i}\.x" for i in range(1_000)]},
                  modules, "adapter_config.json")
    assert time.perf_counter() - start < 20

    b, ms = write_family_dirs(tmp_path)
    recipe = tmp_path / "nuslerp.yml"
    recipe.write_text(f"merge_method: nuslerp\nmodels:\n  - model: {ms[0]}\n    parameters: {{weight: 1}}\n"
                      f"  - model: {ms[1]}\n    parameters: {{weight: -1}}\n")
    rc, _, err = run_cli(["merge", str(recipe), "-o", str(tmp_path / "out")], capsys)
    assert rc != 0 and "the models' weight values" in err and "opposite signs" in err, err
    assert_no_output(tmp_path / "out")
    recipe.write_text(recipe.read_text().replace("weight: 1}", "weight: 0}").replace("weight: -1}", "weight: 0}"))
    rc, _, err = run_cli(["merge", str(recipe), "-o", str(tmp_path / "out")], capsys)
    assert rc == 0 and "the weights sum to 0 or nearly" in err, err

    rc, err, _ = _lora_merge(tmp_path / "bias", capsys, {"lora_bias": "false"})
    assert rc != 0 and "lora_bias is 'false'" in err and "not true or false" in err, err
    rc, err, _ = _lora_merge(tmp_path / "alpha", capsys, {"alpha_pattern": {"q_proj": -8}})
    assert rc == 0 and "alpha_pattern gives 2 module(s) an alpha of 0 or less" in err and "reversed" in err, err


@pytest.mark.parametrize("digest, outcome", [("", "refused"), ("sha256:" + "0" * 64, "refused"),
                                             ("x" * 100_000, "refused"), (None, "refused"),
                                             ("files:" + "0" * 64, "other model"), ("tensors:" + "0" * 64, "warned")])
def test_a_statistics_digest_that_checks_nothing_is_refused(tmp_path, capsys, digest, outcome):
    """hp26 F5: model_digest "" / "sha256:..." / 100,000 x's switched the check that statistics belong to their model
    off: model 0's statistics were merged as model 1's."""
    from tiesmerge.stats import Statistics, StatsManifest, files_digest, save_stats

    b, ms = write_family_dirs(tmp_path)
    names = [n for n, t in make_base().items() if t.is_floating_point()]
    shapes = {n: t.shape for n, t in make_base().items()}
    dirs = []
    for k in range(2):
        recorded = files_digest(ms[k]) if k == 0 else digest
        dirs.append(save_stats(tmp_path / f"fisher{k}", Statistics(StatsManifest("fisher", 4, model_digest=recorded),
                                                                   {n: torch.rand(shapes[n]) for n in names})))
    rc, _, err = run_cli(["merge", "--method", "fisher", "--base", str(b), "--model", str(ms[0]), "--model",
                          str(ms[1]), "--stats", str(dirs[0]), "--stats", str(dirs[1]), "-o", str(tmp_path / "out")],
                         capsys)
    if outcome == "refused":
        assert rc != 0 and "records no usable model digest" in err, err
    elif outcome == "other model":
        assert rc != 0 and "computed with another model" in err, err
    else:
        assert rc == 0 and "digest of in-memory tensors" in err, err


def test_a_recipe_t_that_underflows_is_named_in_the_recipes_words(tmp_path, capsys):
    """hp26 N3: a mergekit slerp gradient value 1e-300 was refused as the flag t_by_name, with the flags' hint."""
    b, ms = write_family_dirs(tmp_path)
    recipe = tmp_path / "slerp.yml"
    recipe.write_text(f"merge_method: slerp\nbase_model: {b}\nmodels:\n  - model: {ms[0]}\nparameters:\n  t:\n"
                      "    - filter: self_attn\n      value: [0, 1e-300]\n    - value: 0.5\n")
    rc, _, err = run_cli(["validate", str(recipe)], capsys)
    assert rc != 0 and "parameters.t: 1e-300 must be 0 or at least 1.2e-38" in err and "t_by_name" not in err, err


def test_pattern_tables_cost_bounded_time(tmp_path, capsys):
    """hp26 F6: 1,000 alpha_pattern keys of 7,000 automaton states each took 105 s and 2.2 GB; module paths (and lists
    of them, as tools write for every module) run on re in linear time and count for nothing."""
    start = time.perf_counter()
    rc, err, _ = _lora_merge(tmp_path / "bomb", capsys, {"alpha_pattern": {f"(.{{0,20}}){{20}}X{i}": 4
                                                                          for i in range(1000)}})
    assert rc != 0 and "alpha_pattern holds more regex keys than tiesmerge runs" in err, err
    paths = {f"model.layers.{i}.self_attn.q_proj": 4 for i in range(2000)}
    rc, err, _ = _lora_merge(tmp_path / "paths", capsys, {"alpha_pattern": paths,
                                                          "rank_pattern": {"q_proj|up_proj": 2}})
    assert rc == 0, err
    assert time.perf_counter() - start < 20
    from tiesmerge.io.patterns import ModulePattern

    listed = "|".join(f"model\\.layers\\.{i}\\.self_attn\\.q_proj" for i in range(300))  # 9,000 characters
    pattern = ModulePattern.compile(listed, "target_modules", whole=True, max_chars=20_000)
    assert pattern.plain is not None and pattern.matches("model.layers.7.self_attn.q_proj")
    assert not pattern.matches("model.layers.7.self_attn.q_projx")
    assert not pattern.matches("x.model.layers.7.self_attn.q_proj")


def test_the_tensor_named_behind_a_distance_verdict_is_the_one_behind_it():
    """hp26 N6: a norm weight moved by 60,000 made the distance, and the message named a k_proj of cosine 0.88."""
    from tiesmerge.distance import ModelDistance, TensorDistance, check_distances
    from tiesmerge.errors import IncompatibleCheckpointsError

    tensors = (TensorDistance("model.norm.weight", 3750.0, 1.0, 64), TensorDistance("k_proj.weight", 0.526, 0.884, 64),
               TensorDistance("q_proj.weight", 0.01, 0.999, 64))
    far = ModelDistance(0, "ft1", 10027.0, 0.0, tensors, 12_000_000, 0)
    with pytest.raises(IncompatibleCheckpointsError, match="furthest tensor 'model.norm.weight'"):
        check_distances([far], "base", allow_distant=False)
    unrelated = ModelDistance(0, "ft1", 0.9, 0.67, tensors, 12_000_000, 0)
    with pytest.raises(IncompatibleCheckpointsError, match="furthest tensor 'k_proj.weight'"):
        check_distances([unrelated], "base", allow_distant=False)


def test_a_digest_cache_grown_past_its_bound_is_trimmed_not_stuck(tmp_path):
    """hp26 N7: a cache of long paths could grow past the 16 MiB bound, after which tiesmerge took its own cache for
    a file of the user's ("not a JSON object of its entries") and never wrote it again."""
    from tiesmerge.io import card

    cache = tmp_path / "digests.json"
    entry = {"stamp": [1, 2, 3, 4, 5], "sha256": "0" * 64}
    cache.write_text(json.dumps({f"/{'d' * 4000}/{i}": entry for i in range(4_500)}))  # ~18 MiB, ours
    assert cache.stat().st_size > card._MAX_CACHE_BYTES
    card.remember_many(cache, {f"/{'e' * 4000}/{i}": entry for i in range(5_000)})  # long paths: trimmed to fit
    size = cache.stat().st_size
    assert 0 < size <= card._MAX_CACHE_BYTES and len(card.load_cache(cache)) > 1_000
    foreign = tmp_path / "mine.json"
    foreign.write_bytes(b"[" + b" " * (card._MAX_CACHE_BYTES + 10) + b"]")
    from tiesmerge.errors import MergeWarning

    with pytest.warns(MergeWarning, match="or larger than the 16 MiB it writes at most"):
        card.remember_many(foreign, {"/x": entry})
    assert foreign.stat().st_size == card._MAX_CACHE_BYTES + 12  # left as it is


@pytest.mark.parametrize("where", ["config.json", "tokenizer_config.json"])
def test_a_model_folder_naming_its_own_code_is_refused_even_where_a_standard_class_exists(tmp_path, where):
    """hp26 N8: config.json with model_type bert and an auto_map naming modeling_x.py: transformers silently used its
    own BertForSequenceClassification, statistics of another model than the folder declares."""
    from tiesmerge.errors import CheckpointError
    from tiesmerge.evaluation.loading import _check_config

    config = {"model_type": "bert", "architectures": ["XForSequenceClassification"]}
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "BertTokenizer"}))
    target = tmp_path / where
    target.write_text(json.dumps({**json.loads(target.read_text()),
                                  "auto_map": {"AutoModelForSequenceClassification": "modeling_x.XModel"}}))
    (tmp_path / "modeling_x.py").write_text("raise SystemExit('never imported')\n")
    with pytest.raises(CheckpointError, match=f"{where}: auto_map names code shipped with the model"):
        _check_config(tmp_path)


def test_the_twenty_seventh_pass(tmp_path, capsys):
    """hp27 F1: a module path of 3,000 components (binding and the span-by-span modules_to_save test were cubic);
    F2: layers_pattern '.*x' over paths 'a.1.' x 200 (the automaton ran span by span)."""
    from tiesmerge.errors import CheckpointError
    from tiesmerge.io.peft_targets import check_adapted

    start = time.perf_counter()
    with pytest.raises(CheckpointError, match="a module path of .* components"):
        check_adapted({"target_modules": ["q_proj"]}, [".".join(["a"] * 3000) + ".q_proj"], "adapter_config.json")
    deep = ".".join(["a.1"] * 100) + ".q_proj"  # 201 components: read, and decided quickly
    check_adapted({"target_modules": ["q_proj"], "modules_to_save": [".*fier"], "layers_to_transform": [1],
                   "layers_pattern": ".*x|a"}, [deep] * 50, "adapter_config.json")
    with pytest.raises(Exception, match="does not adapt"):
        check_adapted({"target_modules": ["q_proj"], "layers_to_transform": [0], "layers_pattern": ".*x"},
                      [deep] * 50, "adapter_config.json")
    assert time.perf_counter() - start < 10


def test_pattern_tables_and_name_lists_of_every_module_are_looked_up(tmp_path, capsys):
    """hp27 F3: alpha_pattern of 100,000-300,000 keys (each compiled, then tried against every module: 16-74 s); F4: a
    target_modules list of 500,000 names scanned for every module. Module names are indexed now; the order rule
    (the first key in the table that matches) and '.' matching any character are kept."""
    from tiesmerge.io.patterns import PatternTable
    from tiesmerge.io.peft_targets import check_adapted

    start = time.perf_counter()
    table = {f"model.layers.{i}.self_attn.q_proj": i for i in range(99_000)}
    patterns = PatternTable({"up_proj": -1, **table, "q_proj": -2, r"layers\.7\..*": -3}, "alpha_pattern", "cfg",
                            lambda v, what: float(v))
    assert patterns.lookup("model.layers.7.self_attn.q_proj") == 7  # the first key that matches, in table order
    assert patterns.lookup("model.layers.7.mlp.up_proj") == -1
    assert patterns.lookup("base.layers.7.self_attn.k_proj") == -3
    assert patterns.lookup("x.model.layersX3.self_attn.q_proj") == 3  # '.' in a key matches any character, as in re
    assert patterns.lookup("model.layers.3.self_attn.q_projx") is None
    names = [f"m{i}" for i in range(500_000)] + ["q_proj"]
    check_adapted({"target_modules": names, "feedforward_modules": names}, [f"model.layers.{i}.q_proj"
                                                                         for i in range(400)], "adapter_config.json")
    assert time.perf_counter() - start < 20


@pytest.mark.parametrize("keys", [["q_proj", "layers.0.self_attn.q_proj"], ["layers.0.self_attn.q_proj", "q_proj"],
                                  ["self_attn.q_proj", r".*\.0\..*", "up_proj"], ["layersX0", "layers.0"],
                                  ["model", "proj", "mlp.up_proj", r"(up|q)_proj"], ["0.mlp.up_proj", "1.mlp"]])
def test_pattern_table_lookups_agree_with_peft(keys):
    """The index keeps PEFT's rule (peft.utils.other.get_pattern_key): the first key, in the table's order, that the
    module path ends with as a regex."""
    other = pytest.importorskip("peft.utils.other")
    from helpers_adapters import LORA_MODULES
    from tiesmerge.io.patterns import PatternTable

    table = PatternTable({k: i for i, k in enumerate(keys)}, "rank_pattern", "cfg", lambda v, what: float(v))
    for module in (*LORA_MODULES, "model.layersX0.self_attn.q_proj", "model.layers.0.mlp.up_projx", "model"):
        expected = other.get_pattern_key(keys, module)
        got = table.lookup(module)
        assert (None if expected == module and module not in keys else keys.index(expected)) == got, (keys, module)


def test_a_backtracking_selector_has_a_budget_over_all_modules(monkeypatch):
    """hp27 F5: a lookahead taking ~40 ms a module (under the 50 ms per-match limit) over 3,000 modules took 31 s."""
    from tiesmerge.errors import CheckpointError
    from tiesmerge.io import patterns, peft_targets

    monkeypatch.setattr(patterns, "TOTAL_SECONDS", 0.0)  # the budget spent by the first match
    with pytest.raises(CheckpointError, match="target_modules took more than 0 s to match the adapter's module"):
        peft_targets.check_adapted({"target_modules": r"(?=.*proj).*"}, ["a.q_proj", "b.q_proj", "c.q_proj"], "cfg")


def test_notes_of_the_twenty_seventh_pass(tmp_path, capsys):
    """hp27 N3: --lam 3e38 wrote weights of 1.6e37 without a word; N4: a modules_to_save entry invalid alone but valid
    once joined with the others; N5: a rank_pattern rank of 4.0 (r: 4.0 is refused)."""
    from tiesmerge.errors import CheckpointError
    from tiesmerge.io.peft_targets import check_adapted

    b, ms = write_family_dirs(tmp_path)
    rc, _, err = run_cli(["merge", "--method", "task_arithmetic", "--base", str(b), "--model", str(ms[0]),
                          "--model", str(ms[1]), "--lam", "3e38", "-o", str(tmp_path / "out")], capsys)
    assert "lam = 3e+38 scales the merged task vector" in err, err
    with pytest.raises(CheckpointError, match="modules_to_save: pattern key 'x\\)\\|\\(\\?:\\.\\*' is not a valid"):
        check_adapted({"target_modules": ["q_proj"], "modules_to_save": ["x)|(?:.*", "y.z"]}, ["a.q_proj"], "cfg")
    rc, err, _ = _lora_merge(tmp_path / "rank", capsys, {"rank_pattern": {"q_proj": 2.0}})
    assert rc != 0 and "rank_pattern['q_proj'] is '2.0' (float), not a positive integer" in err, err


def test_a_size_under_one_byte_is_said_so():
    """hp27 N2: --shard-size 0.5B was "not a positive, finite number of bytes"."""
    from tiesmerge.sizes import parse_size

    with pytest.raises(ValueError, match="at least 1 byte: '0.5B' is 0.5 bytes"):
        parse_size("0.5B")


@pytest.mark.parametrize("key", ["(?i:LM_HEAD)", "(?i:LM_HEAD.*)", "(?i)LM_HEAD", "(?-i:lm_head)"])
def test_inline_flags_are_refused_wherever_they_stand(key):
    """hp27 N1: a scoped (?i:LM_HEAD) was accepted (and matched case-insensitively) while (?i:LM_HEAD.*) and
    (?i)LM_HEAD were refused: every inline flag is refused in the keys tiesmerge runs itself (exclude, alpha_pattern);
    PEFT's selectors with one run on the regex package, as PEFT runs them."""
    from tiesmerge.errors import CheckpointError
    from tiesmerge.io.patterns import ModulePattern
    from tiesmerge.io.peft_targets import check_adapted

    with pytest.raises(CheckpointError, match="inline flags such as"):
        ModulePattern.compile(key, "exclude", anywhere=True)
    check_adapted({"target_modules": ["q_proj"], "exclude_modules": f"{key}.*"}, ["model.q_proj"], "cfg")
