"""Hostile pass 35 (issue 13): encoder-decoders and models transformers converts on loading, in stats, adapt's
forwards and the built-in evaluators; layer counts of every stack."""

from __future__ import annotations

import json

import pytest

from helpers_ckpt import run_cli
from helpers_models import CLASSIFIER_WORDS, TEXTS, save_word_tokenizer

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")


def _saved(tmp_path_factory, name, model_class, config):
    """A tiny model of ``model_class`` from ``config``, saved by transformers with the word-level tokenizer."""
    import torch

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp(name) / name
    model_class(config).save_pretrained(folder)
    save_word_tokenizer(folder)
    return folder


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    return _saved(tmp_path_factory, "t5", transformers.T5ForConditionalGeneration, transformers.T5Config(
        vocab_size=len(CLASSIFIER_WORDS), d_model=16, d_ff=32, d_kv=8, num_layers=2, num_decoder_layers=2,
        num_heads=2, decoder_start_token_id=0, pad_token_id=0))


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory):
    return _saved(tmp_path_factory, "moe", transformers.MixtralForCausalLM, transformers.MixtralConfig(
        vocab_size=len(CLASSIFIER_WORDS), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, num_local_experts=2, num_experts_per_tok=1,
        max_position_embeddings=32))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "data.jsonl"
    path.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in TEXTS))
    return path


def test_stats_refuses_an_encoder_decoder_before_its_forward_fails(t5_dir, data, tmp_path, capsys):
    """hp35 E3: stats gram on an unmodified T5ForConditionalGeneration failed in the forward ("You must specify
    exactly one of input_ids …") with a hint blaming its config.json, which was the original."""
    rc, _, err = run_cli(["stats", "gram", "--model", t5_dir, "--data", data, "-o", tmp_path / "st"], capsys)
    assert rc == 2 and "an encoder-decoder model (T5ForConditionalGeneration)" in err, err
    assert "config.json likely" not in err and not (tmp_path / "st").exists()


def test_adapts_forwards_say_what_fits_an_encoder_decoder(t5_dir):
    """hp35 E10: --forward choice on a T5 suggested --forward encoder, which then failed as "unexpected ValueError …
    a bug in tiesmerge"."""
    from tiesmerge.errors import ConfigError
    from tiesmerge.evaluation.forward import load_forward

    with pytest.raises(ConfigError, match="the encoder forward takes a bare encoder, and this is an encoder-decoder"):
        load_forward("encoder", t5_dir, heads={"t": ["good", "bad"]})
    with pytest.raises(ConfigError) as caught:
        load_forward("choice", t5_dir)
    assert "choice-accuracy" in caught.value.hint and "--forward encoder" not in caught.value.hint


@pytest.mark.parametrize("key", ["num_decoder_layers", "num_layers"])
def test_every_stacks_layer_count_is_held_to_the_weights(t5_dir, tmp_path, key):
    """hp35 E1: a T5 config claiming num_decoder_layers = 100,000 (weights: 2) ran the meta build of 100,000 blocks
    for minutes; only num_hidden_layers, n_layer and num_layers were held to the weights. Nested configs too."""
    import shutil
    import time

    from tiesmerge.errors import CheckpointError
    from tiesmerge.evaluation import loading

    folder = tmp_path / "t5"
    shutil.copytree(t5_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    started = time.perf_counter()
    with pytest.raises(CheckpointError, match=f"{key} = 100,000, but the weights hold 2 layers"):
        loading._check_sizes(folder, folder / "config.json", {**config, key: 100_000})
    with pytest.raises(CheckpointError, match="text_config.num_hidden_layers = 100,000"):
        loading._check_sizes(folder, folder / "config.json", {**config, "text_config": {"num_hidden_layers": 100_000}})
    assert time.perf_counter() - started < 10


def test_a_model_transformers_converts_on_loading_is_refused_where_tensors_are_matched_by_name(moe_dir, data,
                                                                                                 tmp_path, capsys):
    """hp35 E12/E13: transformers 5 fuses a Mixtral checkpoint's per-expert tensors when it loads it. adapt warned
    that 14 of 29 merged tensors were not the forward's and learned coefficients on the base's experts; tune's
    evaluators and stats said the config.json was not the weights' (it was). Each now says what transformers does."""
    from tiesmerge.errors import ConfigError
    from tiesmerge.evaluation.builtin import builtin_evaluator
    from tiesmerge.evaluation.forward import load_forward
    from tiesmerge.evaluation.loading import converted_on_load

    if converted_on_load(moe_dir) is None:
        pytest.skip("this transformers loads Mixtral checkpoints by their names")
    rc, _, err = run_cli(["stats", "gram", "--model", moe_dir, "--data", data, "-o", tmp_path / "st"], capsys)
    assert rc == 2 and "converts this model's tensors when it loads them" in err, err
    with pytest.raises(ConfigError, match="converts this model's tensors when it loads them .* which adapt"):
        load_forward("choice", moe_dir)
    text = tmp_path / "t.txt"
    text.write_text("good film very good plot\n")
    with pytest.raises(ConfigError, match="which a built-in evaluator"):
        builtin_evaluator(f"lm-perplexity:{text}", moe_dir)


# (heads with this function forward are refused outright since hp42 D60: the forward would not read them)
@pytest.mark.parametrize("changed", [{"max_length": 2}])
def test_resuming_with_other_forward_settings_is_refused(tmp_path, changed):
    """hp35 E7: adapt --resume with another --max-length was accepted, and ended with coefficients equal to neither
    the unbroken run at the old setting nor the one at the new (the README promises a resume ends as an unbroken run
    would). The forward's settings are part of the checkpoint's fingerprint."""
    import tiesmerge
    from test_adapt_hostile import _checkpointed, _forward
    from tiesmerge.errors import ConfigError

    base, fts, files, ck = _checkpointed(tmp_path, steps=2)
    option = "--max-length 128 there, 2 now" if "max_length" in changed else "--heads not set there"
    with pytest.raises(ConfigError, match=rf"another run \({option}"):  # named since hp39 C24
        tiesmerge.adapt(base, fts, files, forward=_forward(), steps=4, checkpoint=ck, resume=True, **changed)
    tiesmerge.adapt(base, fts, files, forward=_forward(), steps=4, checkpoint=ck, resume=True)  # the same: resumes


def test_the_same_class_text_twice_is_refused():
    """hp35 E9: --heads {"d1": ["good", "good"]} ran: the entropy was log 2 on every input and the task's coefficients
    never moved, without a word. Two identical descriptions (or answer choices) are refused as one is."""
    from tiesmerge.adamerging.run import check_labels
    from tiesmerge.errors import ConfigError

    tasks = {"d1": [{"text": "x"}]}
    with pytest.raises(ConfigError, match=r"entries 0 and 2 are the same text \('good'\)"):
        check_labels({"d1": ["good", "bad", " good "]}, "heads", "class descriptions", tasks, every_task=True)
    check_labels({"d1": ["good", "bad"]}, "heads", "class descriptions", tasks, every_task=True)


def test_an_overflow_in_adapts_merge_gives_adapts_own_remedy():
    """hp35 E21: adapt on float16 models whose merge overflowed named the tensor (good) with the merge's hint, "write
    a wider dtype (--dtype …) or use a smaller lam": adapt has neither."""

    import tiesmerge
    from test_adapt import _data, _family, _forward
    from tiesmerge.finite import NotFiniteError

    base, fts = _family()
    base = {k: v.half() for k, v in base.items()}
    fts = [{k: (base[k].float() + 100 * (v - base[k].float()).sign()).half() for k, v in ft.items()} for ft in fts]
    with pytest.raises(NotFiniteError) as caught:
        tiesmerge.adapt(base, fts, _data(), forward=_forward(), steps=0, init=1000.0)
    assert "--clamp" in caught.value.hint and "--init" in caught.value.hint and "65504" in caught.value.hint
    assert "--dtype" not in caught.value.hint and "smaller lam" not in caught.value.hint


def test_adapt_refuses_a_lam_it_would_ignore(tmp_path, capsys):
    """hp35 E22: adapt --lam 0.0001 was accepted, changed nothing, and was named on the model card."""
    from helpers_ckpt import cli_flags, write_family_dirs

    b, ms = write_family_dirs(tmp_path)
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "good film"}\n')
    rc, _, err = run_cli(["adapt", *cli_flags(b, ms), "--data", data, "--data", data, "--lam", "0.0001", "-o",
                          tmp_path / "out"], capsys)
    assert rc == 2 and "--lam 0.0001: adapt learns each task vector's scale" in err, err
    assert not (tmp_path / "out").exists()


def test_adapt_and_the_evaluators_refuse_a_config_adding_modules_the_weights_lack(classifiers, tmp_path):
    """hp35 E24: stats refused a classifier whose config.json adds cross-attention (is_decoder + add_cross_attention),
    but tune's classifier-accuracy and adapt's classifier forward ran on it silently (random modules, a causal mask:
    0.50 against 0.75). The check is in the one loader every model goes through."""
    from test_hostile_thirty_fourth_pass import _copy_with_config
    from tiesmerge.errors import CheckpointError
    from tiesmerge.evaluation.builtin import builtin_evaluator
    from tiesmerge.evaluation.forward import load_forward

    _root, base, _fts, data = classifiers
    model = _copy_with_config(base, tmp_path / "decoder", is_decoder=True, add_cross_attention=True)
    with pytest.raises(CheckpointError, match="parameter.s. the weights do not hold, e.g. .*crossattention"):
        load_forward("classifier", model)
    score = builtin_evaluator(f"classifier-accuracy:{data}", model)
    import torch
    from safetensors.torch import load_file

    state = {k: torch.as_tensor(v) for k, v in load_file(str(model / "model.safetensors")).items()}
    with pytest.raises(CheckpointError, match="parameter.s. the weights do not hold"):
        score(state)


def _one_output(classifiers, tmp_path):
    """The classifiers fixture's base with a head of 1 output (a regression head), config and weights alike."""
    from safetensors.torch import load_file, save_file

    from test_hostile_thirty_fourth_pass import _copy_with_config

    model = _copy_with_config(classifiers[1], tmp_path / "reg", num_labels=1, id2label={"0": "LABEL_0"},
                              label2id={"LABEL_0": 0})
    weights = load_file(str(model / "model.safetensors"))
    weights["classifier.weight"] = weights["classifier.weight"][:1].contiguous()
    weights["classifier.bias"] = weights["classifier.bias"][:1].contiguous()
    save_file(weights, str(model / "model.safetensors"))
    return model


def test_a_fisher_of_a_one_output_head_is_refused_not_written_as_zeros(classifiers, tmp_path, capsys):
    """hp35 E37: stats fisher (exact) on a num_labels=1 classifier (a regression head, as STS-B fine-tunes have)
    wrote statistics of 0.0 everywhere (the log-probability of one class is 0), and a later fisher merge blamed the
    data. E38: adapt's classifier forward on it learned nothing (entropy 0 -> 0), without a word."""
    from tiesmerge.errors import ConfigError
    from tiesmerge.evaluation.forward import load_forward

    model = _one_output(classifiers, tmp_path)
    rc, _, err = run_cli(["stats", "fisher", "--model", model, "--data", classifiers[3], "-o", tmp_path / "st"],
                         capsys)
    assert rc == 2 and "a head of 1 output (num_labels 1: a regression head) has no class distribution" in err, err
    assert not (tmp_path / "st").exists()
    with pytest.raises(ConfigError, match="adapt's objectives are 0 whatever the coefficients"):
        load_forward("classifier", model)


def test_a_search_resumed_after_its_evaluator_was_edited_is_refused(tmp_path, monkeypatch):
    """hp35 E40: a search resumed after the evaluator's module was edited (the same MODULE:FUNCTION, now returning
    minus the old score) reused every old score. The module's source digest is in the log's header."""
    import importlib
    import sys

    from helpers_ckpt import make_family
    from tiesmerge.errors import ConfigError
    from tiesmerge.tuning import run_search

    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "edited_eval.py").write_text("def score(state):\n    return 1.0\n")
    base, models = make_family(2)
    import edited_eval

    grid = {"density": (0.5,), "lam": (1.0,)}
    run_search(base, models, "ties", edited_eval.score, grid=grid, log=str(tmp_path / "log.jsonl"))
    run_search(base, models, "ties", edited_eval.score, grid=grid, log=str(tmp_path / "log.jsonl"))  # resumes
    (tmp_path / "edited_eval.py").write_text("def score(state):\n    return -1.0\n")
    importlib.reload(sys.modules["edited_eval"])
    with pytest.raises(ConfigError, match="is the log of another search .*the evaluator.s code"):
        run_search(base, models, "ties", sys.modules["edited_eval"].score, grid=grid, log=str(tmp_path / "log.jsonl"))


def test_many_names_that_are_no_task_are_counted():
    """hp35 E50: 200,000 extra --heads keys were said as five names, without a count."""
    from tiesmerge.adamerging.run import check_labels
    from tiesmerge.errors import ConfigError

    labels = {"t": ["a", "b"], **{f"x{i}": ["a", "b"] for i in range(1000)}}
    with pytest.raises(ConfigError, match=r"--heads names 'x0', 'x1', 'x2', 'x3', 'x4' and 995 more, none of them a "
                                          r"task"):
        check_labels(labels, "heads", "class descriptions", {"t": [{"text": "a"}]}, every_task=False)


def test_a_checkpoint_over_a_stats_output_names_that_output(tmp_path):
    """hp35 E33: adapt --checkpoint at the weights file of a `tiesmerge stats` output was refused as "a file
    tiesmerge did not write"; it names the output and its kind now."""
    import json as _json

    from tiesmerge.errors import OutputError
    from tiesmerge.paths import check_output_file

    folder = tmp_path / "g1"
    folder.mkdir()
    (folder / "tiesmerge_stats.json").write_text(_json.dumps({"kind": "gram", "examples": 3, "tiesmerge_version": "x"}))
    (folder / "model.safetensors").write_bytes(b"x")
    with pytest.raises(OutputError, match=r"a file of the tiesmerge output .*g1 \(statistics: tiesmerge stats\)"):
        check_output_file(folder / "model.safetensors", True, [], "the checkpoint")


def test_a_classifier_saved_without_a_pad_token_id_takes_its_tokenizers(tmp_path):
    """hp35 E51: a LlamaForSequenceClassification saved with pad_token_id null (common for Llama-family classifiers;
    its tokenizer has a pad token) failed every batch of 2 ("Cannot handle batch sizes > 1 if no padding token is
    defined"), with a hint blaming its original config."""
    import torch

    from tiesmerge.evaluation.forward import load_forward, logits

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=len(CLASSIFIER_WORDS), hidden_size=16, intermediate_size=32,
                                   num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                   max_position_embeddings=32, num_labels=3, pad_token_id=None)
    transformers.LlamaForSequenceClassification(cfg).save_pretrained(tmp_path / "lc")
    save_word_tokenizer(tmp_path / "lc")
    assert json.loads((tmp_path / "lc" / "config.json").read_text()).get("pad_token_id") is None
    fwd = load_forward("classifier", tmp_path / "lc")
    rows = [{"text": "good film"}, {"text": "very bad plot not good"}]
    with torch.no_grad():
        together = logits(fwd, fwd.encode(rows, "t"), "t")
        alone = torch.cat([logits(fwd, fwd.encode([r], "t"), "t") for r in rows])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)  # the answer read at each text's last token


def test_tune_checks_the_files_its_best_merge_copies_before_it_scores(tmp_path, capsys, monkeypatch):
    """hp35 E55: a base whose tokenizer_config.json is a link leaving the folder: merge, adapt and search refused it
    at once, but tune merged and scored all its grid points, then refused the same link when writing the best
    merge, and the whole tune was lost."""
    import os

    from helpers_ckpt import cli_flags, write_family_dirs

    b, ms = write_family_dirs(tmp_path)
    outside = tmp_path / "elsewhere.json"
    outside.write_text("{}")
    (b / "tokenizer_config.json").unlink(missing_ok=True)
    os.symlink(outside, b / "tokenizer_config.json")
    (tmp_path / "count_eval.py").write_text(f"def score(state):\n    open({str(tmp_path / 'scored')!r}, 'a').write('x')"
                                            "\n    return 0.0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for command in ("tune", "search"):
        extra = ["--grid", "lam=1.0,1.5"] if command == "tune" else ["--budget", "2", "--dir", tmp_path / "s"]
        rc, _, err = run_cli([command, *cli_flags(b, ms), "--evaluator", "count_eval:score", *extra, "-o",
                              tmp_path / "best"], capsys)
        assert rc == 1 and "tokenizer_config.json" in err, err
        assert not (tmp_path / "scored").exists()  # refused before the first score


def test_adapt_on_a_device_torch_has_not_is_a_typed_error(tmp_path, capsys):
    """hp35 E57: adapt --device cuda on a CPU-only torch was "unexpected AssertionError: Torch not compiled with
    CUDA enabled … a bug" (mps: an unexpected RuntimeError); the other commands said it in their own words."""
    import torch

    from helpers_ckpt import cli_flags, write_family_dirs

    b, ms = write_family_dirs(tmp_path)
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "good film"}\n')
    for device in (["cuda:7"] if torch.cuda.is_available() else ["cuda", "cuda:7"]) + ["mps"]:
        rc, _, err = run_cli(["adapt", *cli_flags(b, ms), "--data", data, "--data", data, "--device", device, "-o",
                              tmp_path / "out"], capsys)
        assert rc == 2 and "unexpected" not in err and "device" in err, err


def test_an_infinite_clamp_is_refused_it_would_reach_the_manifest_as_non_json():
    """hp35 E59: adapt --clamp -inf inf was accepted and written to tiesmerge.json as -Infinity/Infinity, which
    strict JSON readers refuse; without --clamp the coefficients are unbounded anyway."""
    from tiesmerge.adamerging.learn import AdaptConfig

    assert any("clamp must be two finite numbers" in p for p in AdaptConfig(clamp=(float("-inf"), 1.0)).problems())
    assert not AdaptConfig(clamp=(0.0, 1.0)).problems()


def test_python_dash_m_tiesmerge_never_imports_modules_of_the_working_folder(tmp_path):
    """hp35 E74: `python -m tiesmerge` run from a folder holding yaml.py or numpy.py (a downloaded model's folder)
    imported and ran them before any tiesmerge code: `-m` puts the working folder first on the import path. The
    installed script was safe; `-m` is now too."""
    import subprocess
    import sys

    for name in ("re", "yaml", "numpy", "argparse", "safetensors"):
        (tmp_path / f"{name}.py").write_text(f"open({str(tmp_path / 'ran')!r}, 'a').write({name!r} + '\\n')\n")
    done = subprocess.run([sys.executable, "-m", "tiesmerge", "--version"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.startswith("tiesmerge "), done.stdout + done.stderr
    assert not (tmp_path / "ran").exists(), (tmp_path / "ran").read_text()
    done = subprocess.run([sys.executable, "-m", "tiesmerge", "methods"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and not (tmp_path / "ran").exists()


def test_encoder_accuracy_refuses_an_encoder_decoder_and_a_class_given_twice(t5_dir, tmp_path):
    """hp35 E70: tune --evaluator encoder-accuracy on a T5 base failed after merging as "raised ValueError … fix the
    evaluator" (the evaluator is tiesmerge's); E62: a task whose classes were the same text twice scored every input
    as class 0, without a word."""
    from tiesmerge.errors import ConfigError
    from tiesmerge.evaluation.builtin import EncoderAccuracy

    data = tmp_path / "enc.jsonl"
    data.write_text(json.dumps({"task": "t", "classes": ["good", "bad"]}) + "\n"
                    + json.dumps({"task": "t", "text": "good film", "label": 0}) + "\n")
    with pytest.raises(ConfigError, match="encoder-accuracy embeds texts by an encoder's mean pooling, and the base "
                                          "is an encoder-decoder"):
        EncoderAccuracy(t5_dir, data)
    data.write_text(json.dumps({"task": "t", "classes": ["good", " good"]}) + "\n"
                    + json.dumps({"task": "t", "text": "good film", "label": 0}) + "\n")
    with pytest.raises(ConfigError, match="task 't' lists the class 'good' twice"):
        EncoderAccuracy(tmp_path, data)
