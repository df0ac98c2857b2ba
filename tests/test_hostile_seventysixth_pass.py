"""Hostile pass 76 (and the notes of 74 and 75 it re-tried): what a careless user's inputs still got wrong."""

from __future__ import annotations

import os
import unicodedata

import pytest


def _hard_linked_copy(source, target):
    target.mkdir()
    for f in source.iterdir():
        os.link(f, target / f.name)
    return target


@pytest.fixture()
def family(tmp_path):
    from helpers_adapters import random_lora, write_lora_dir
    from helpers_ckpt import make_family, write_hf_dir

    base, models = make_family(2, with_int=False)
    b = write_hf_dir(tmp_path / "b", base, shards=2)
    copy = _hard_linked_copy(b, tmp_path / "b_hl")
    m1 = write_hf_dir(tmp_path / "m1", models[0])
    loras = [write_lora_dir(tmp_path / f"l{k}", random_lora(base, 2, k), alpha=4) for k in range(2)]
    return tmp_path, b, copy, m1, loras


@pytest.mark.parametrize("spelling", ["b_hl", "b/model.safetensors.index.json"])
def test_a_hard_linked_copy_of_the_base_is_the_base_in_a_mergekit_recipe(family, capsys, spelling):
    """hp76a c12, c32: base_model's hard-linked copy (or its index file) was "a model other than base_model" in a
    BASE+LORA entry, and "not among models" in linear, where a symbolic link to it was read as the base."""
    from helpers_ckpt import run_cli

    tmp_path, b, _, m1, loras = family
    other = tmp_path / spelling
    recipe = tmp_path / "k.yaml"
    recipe.write_text(f"merge_method: ties\nbase_model: {b}\nmodels:\n"
                      f"  - model: {other}+{loras[0]}\n    parameters: {{weight: 1.0, density: 0.5}}\n"
                      f"  - model: {b}+{loras[1]}\n    parameters: {{weight: 1.0, density: 0.5}}\n")
    rc, _, err = run_cli(["merge", recipe, "-o", tmp_path / "o"], capsys)
    assert rc == 0, err
    if spelling.endswith(".json"):  # an index is no model path of its own (refused, the folder hinted)
        return
    linear = tmp_path / "h.yaml"
    linear.write_text(f"merge_method: linear\nbase_model: {b}\nmodels:\n  - model: {other}\n"
                      f"    parameters: {{weight: 1.0}}\n  - model: {m1}\n    parameters: {{weight: 1.0}}\n")
    rc, _, err = run_cli(["merge", linear, "-o", tmp_path / "o2"], capsys)
    assert rc == 0 and "not among models" not in err, err


def test_a_recipe_of_one_model_under_two_names_says_the_merge_is_the_model(family, capsys):
    """hp76a c01, c02: a base-less linear (or nuslerp) listing one model under two names hinted "list it once, with
    the sum of its weights", which a one-model linear or nuslerp refuses in turn."""
    from helpers_ckpt import run_cli

    tmp_path, b, copy, m1, _ = family
    for method in ("linear", "nuslerp"):
        recipe = tmp_path / f"{method}.yaml"
        recipe.write_text(f"merge_method: {method}\nmodels:\n  - model: {b}\n    parameters: {{weight: 1.0}}\n"
                          f"  - model: {copy}\n    parameters: {{weight: 1.0}}\n")
        rc, _, err = run_cli(["validate", recipe], capsys)
        assert rc != 0 and "a merge of a model with itself is that model" in err, err
        assert "sum of its weights" not in err
    three = tmp_path / "three.yaml"
    three.write_text(f"merge_method: linear\nmodels:\n  - model: {b}\n    parameters: {{weight: 1.0}}\n"
                     f"  - model: {copy}\n    parameters: {{weight: 1.0}}\n"
                     f"  - model: {m1}\n    parameters: {{weight: 1.0}}\n")
    rc, _, err = run_cli(["validate", three], capsys)
    assert rc != 0 and "list it once, with the sum of its weights" in err, err


def test_names_apart_only_in_normalization_are_said_so_in_a_recipe(family, capsys):
    """hp76a c38: 'café' and 'café' (composed, and decomposed as a hard-linked copy) were "one model" with no word
    of how the two names differ, and 'café+l0' under base_model café "a model other than base_model"."""
    from helpers_ckpt import run_cli

    tmp_path, b, _, m1, loras = family
    composed = _hard_linked_copy(b, tmp_path / "caf\u00e9")
    decomposed = _hard_linked_copy(b, tmp_path / unicodedata.normalize("NFD", "caf\u00e9"))
    recipe = tmp_path / "u1.yaml"
    recipe.write_text(f"merge_method: linear\nmodels:\n  - model: {composed}\n    parameters: {{weight: 1.0}}\n"
                      f"  - model: {decomposed}\n    parameters: {{weight: 1.0}}\n"
                      f"  - model: {m1}\n    parameters: {{weight: 1.0}}\n", encoding="utf-8")
    rc, _, err = run_cli(["validate", recipe], capsys)
    assert rc != 0 and "differ only in Unicode normalization" in err and "U+0301" in err, err
    ties = tmp_path / "u2.yaml"
    ties.write_text(f"merge_method: ties\nbase_model: {composed}\nmodels:\n"
                    f"  - model: {decomposed}+{loras[0]}\n    parameters: {{weight: 1.0, density: 0.5}}\n"
                    f"  - model: {m1}\n    parameters: {{weight: 1.0, density: 0.5}}\n", encoding="utf-8")
    rc, _, err = run_cli(["merge", ties, "-o", tmp_path / "o"], capsys)
    assert rc == 0, err


def test_a_drop_rate_that_rounds_to_one_in_float32_is_refused():
    """hp76a c09, c10, c18: DARE's uniforms are multiples of 2^-24, compared with the drop rate rounded to float32:
    a rate of 0.999999999 drops every entry of every model, however many, and was taken (said as "leaves a few on
    average", or printed as "drop_rate 1"). hp77a c03: the bound said is the bound applied."""
    import torch

    import tiesmerge
    from tiesmerge.errors import ConfigError
    from tiesmerge.methods.dare import DROP_RATE_BOUND, MIN_DENSITY, drop_rate_check

    below = DROP_RATE_BOUND - 1e-16  # the largest float64 under the bound
    assert drop_rate_check(below) is None and drop_rate_check(1 - MIN_DENSITY) is None
    assert "below 1 - 2^-25 = 0.99999997019768" in drop_rate_check(DROP_RATE_BOUND)
    assert drop_rate_check(1 - 1e-9) == drop_rate_check(DROP_RATE_BOUND)
    base, models = {"w": torch.zeros(8)}, [{"w": torch.ones(8)}]
    for method in ("dare_ties", "dare_linear"):
        with pytest.raises(ConfigError, match="steps of 2\\^-24"):
            tiesmerge.merge(base, models, method, drop_rate=0.999999999)


@pytest.mark.parametrize("kernels", ["1", "0"])
@pytest.mark.parametrize("drop_rate", [0.9, 0.99999996, 0.9999999701])
def test_dare_rescales_by_the_draws_own_keep_probability(monkeypatch, tmp_path, kernels, drop_rate):
    """hp77a c02: kept entries were rescaled by 1 / (1 - drop_rate) while the 24-bit draw keeps at a probability
    rounded to its step (2^-24 for a rate of 0.9999999701: twice 1 - drop_rate), so the merge's expectation was 2x
    the task vector. The rescale is now the draw's own, on the fused path and the torch path alike."""
    import torch
    from safetensors.torch import save_file

    import tiesmerge
    from tiesmerge.methods import ops

    monkeypatch.setenv("TIESMERGE_KERNELS", kernels)
    kept = ops.dare_keep_probability(drop_rate)
    assert abs(kept - (1 - drop_rate)) <= 2.0 ** -24
    save_file({"w": torch.zeros(1 << 16)}, str(tmp_path / "b.safetensors"))
    save_file({"w": torch.ones(1 << 16)}, str(tmp_path / "m.safetensors"))
    merged = tiesmerge.merge(str(tmp_path / "b.safetensors"), [str(tmp_path / "m.safetensors")], "dare_linear",
                             drop_rate=drop_rate, allow_distant=True)["w"]
    survivors = merged[merged != 0]
    assert survivors.numel() == 0 or torch.all(survivors == torch.tensor(1.0 / kept, dtype=torch.float32))


def test_della_rescales_by_the_draws_own_keep_probability():
    """hp77a c22: DELLA's inverse_p divided by p where the draw keeps at ceil(p 2^24) / 2^24 (2^-24 for p = 3e-8)."""
    import torch

    from tiesmerge.methods import ops

    p = torch.tensor([3e-8, 0.35, 1.0, 2.0 ** -24], dtype=torch.float32)
    drawn = ops.draw_keep_probability(p)
    assert drawn.tolist() == [2.0 ** -24, float(torch.ceil(p[1] * 2 ** 24) / 2 ** 24), 1.0, 2.0 ** -24]
    uniforms = ops.hash_uniform(5, 9, 0, 1 << 20, "cpu")
    for value in p.tolist():  # the share kept is the drawn probability, not p, where they differ
        share = float((uniforms < torch.tensor(value, dtype=torch.float32)).double().mean())
        assert abs(share - float(ops.draw_keep_probability(torch.tensor(value)))) < 5e-3 + 3 * (value / 2 ** 20) ** .5


@pytest.mark.parametrize("method", ["della", "della_linear"])
def test_a_della_keep_probability_below_the_draws_step_is_refused(method, capsys, tmp_path):
    """hp76a c37: della at density 1e-46, epsilon 0 (a keep probability that is 0 in float32) kept nothing and
    divided by 0: "the merged value is not finite ... the merge overflowed ... use a smaller lam"."""
    import torch

    import tiesmerge
    from tiesmerge.errors import ConfigError

    base, models = {"w": torch.zeros(8, 8)}, [{"w": torch.randn(8, 8)} for _ in range(2)]
    with pytest.raises(ConfigError, match="the smallest keep probability is below 3e-08") as caught:
        tiesmerge.merge(base, models, method, density=1e-46, epsilon=0.0)
    assert "at least epsilon + 3e-08" in caught.value.hint
    tiesmerge.merge(base, models, method, density=0.5, epsilon=0.1)


def test_a_mergekit_nuslerp_is_not_offered_t(family, capsys):
    """hp76a c39: mergekit nuslerp with weights 1 and -1 hinted "or t itself", and parameters.t is refused in a
    mergekit recipe; tiesmerge's own nuslerp still offers it."""
    from helpers_ckpt import run_cli

    tmp_path, b, _, m1, _ = family
    recipe = tmp_path / "q.yaml"
    recipe.write_text(f"merge_method: nuslerp\nmodels:\n  - model: {b}\n    parameters: {{weight: 1.0}}\n"
                      f"  - model: {m1}\n    parameters: {{weight: -1.0}}\n")
    for command in (["validate", recipe], ["merge", recipe, "-o", tmp_path / "o"]):
        rc, _, err = run_cli(command, capsys)
        assert rc != 0 and "give weights of one sign" in err and "or t itself" not in err, err
    from tiesmerge.errors import ConfigError
    from tiesmerge.registry import make_method

    with pytest.raises(ConfigError, match="or t itself"):  # tiesmerge's own nuslerp takes t
        make_method("nuslerp", {"weights": (1.0, -1.0)}).requirements()


def test_flags_over_a_mergekit_recipe_hint_its_own_keys(family, capsys):
    """hp76a c47: --vocab-policy/--lam/--density over a mergekit recipe got one fixed hint, offering
    "tokenizer_source: a model" (refused) and base_model's weight for --lam; c48: tokenizer_source naming base_model's
    own path was refused, where mergekit reads that model's tokenizer: base's."""
    from helpers_ckpt import run_cli

    tmp_path, b, _, m1, _ = family
    recipe = tmp_path / "mx.yaml"
    recipe.write_text(f"merge_method: ties\nbase_model: {b}\nmodels:\n  - model: {m1}\n"
                      "    parameters: {weight: 1.0, density: 0.5}\n")
    rc, _, err = run_cli(["merge", recipe, "--lam", "2", "-o", tmp_path / "o"], capsys)
    assert rc != 0 and "--lam is parameters.lambda" in err and "base_model's" not in err, err
    rc, _, err = run_cli(["merge", recipe, "--vocab-policy", "union", "-o", tmp_path / "o"], capsys)
    assert rc != 0 and "--vocab-policy is tokenizer_source: base or union" in err and "a model" not in err, err
    recipe.write_text(recipe.read_text() + f"tokenizer_source: {b}\n")
    rc, _, err = run_cli(["validate", recipe], capsys)
    assert rc == 0, err


def test_a_multi_label_fine_tune_given_as_a_link_to_its_weights_is_refused(classifiers, tmp_path):
    """hp76b c132: a link (in another folder) to a multi-label fine-tune's model.safetensors was scored by
    classifier-accuracy; its config lies beside the link's target."""
    import json
    import shutil

    import tiesmerge
    from tiesmerge.errors import ConfigError
    from tiesmerge.evaluation.builtin import builtin_evaluator

    _, base, fts, data = classifiers
    multi = tmp_path / "multi"
    shutil.copytree(fts[0], multi)
    config = json.loads((multi / "config.json").read_text())
    (multi / "config.json").write_text(json.dumps({**config, "problem_type": "multi_label_classification"}))
    (tmp_path / "links").mkdir()
    link = tmp_path / "links" / "m.safetensors"
    link.symlink_to(multi / "model.safetensors")
    score = builtin_evaluator(f"classifier-accuracy:{data}", base)
    with pytest.raises(ConfigError, match="model 0 problem_type multi_label_classification"):
        tiesmerge.tune(base, [link, fts[1]], "task_arithmetic", score, grid={"lam": [1.0]})


@pytest.mark.parametrize("problem", ["multi_label_classification", "regression"])
def test_the_apis_fisher_of_a_multi_label_module_is_refused(problem):
    """hp76b c134: fisher_information computed a softmax Fisher of a multi-label (or regression) module without a
    word, where `tiesmerge stats fisher` refuses the model; a log-likelihood of the caller's own is still taken."""
    import torch
    import transformers

    from tiesmerge.errors import ConfigError
    from tiesmerge.stats.fisher import fisher_information

    cfg = transformers.BertConfig(vocab_size=20, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=16, num_labels=3, problem_type=problem)
    module = transformers.BertForSequenceClassification(cfg)
    batch = torch.tensor([[1, 2, 3], [4, 5, 6]])
    with pytest.raises(ConfigError, match=f"problem_type {problem}: fisher_information"):
        fisher_information(module, [batch], lambda m, b: m(input_ids=b).logits, per_example="loop")

    def own_likelihood(m, b):  # (B,): the caller's own sigmoid log-likelihood of all-zero labels
        return torch.nn.functional.logsigmoid(-m(input_ids=b).logits).sum(-1)

    stats = fisher_information(module, [batch], own_likelihood, kind="empirical", per_example="loop")
    assert stats.tensors


def test_statistics_record_where_their_model_is_wherever_they_were_made(tmp_path, monkeypatch):
    """hp76b c76: statistics of a model typed '.' recorded '.', and a later refusal named "another model (.)",
    the caller's working folder then; an existing path is recorded absolute, other labels as given."""
    import torch
    from safetensors.torch import save_file

    from tiesmerge.stats.files import recorded_place
    from tiesmerge.stats.gram import gram_matrices

    (tmp_path / "m").mkdir()
    monkeypatch.chdir(tmp_path / "m")
    assert recorded_place(".") == str(tmp_path / "m")
    assert recorded_place("org/some-model") == "org/some-model"
    module = torch.nn.Sequential(torch.nn.Linear(3, 2))
    save_file(module.state_dict(), str(tmp_path / "m" / "model.safetensors"))
    stats = gram_matrices(module, [torch.ones(2, 3)], lambda m, b: m(b), model=".")
    assert stats.manifest.model == str(tmp_path / "m")


def test_stats_takes_no_progress_as_merge_does():
    """hp76a c20: `tiesmerge stats gram ... --no-progress` was a usage error; merge and analyze take it."""
    from tiesmerge.cli.main import _parser

    args = _parser().parse_args(["stats", "gram", "--model", "m", "--data", "d.jsonl", "-o", "g", "--no-progress"])
    assert args.no_progress is True


def test_a_model_count_refusal_names_the_option_that_takes_it():
    """hp76a c51: slerp (or nuslerp) of one model was "merges exactly 2 models, got 1" with a generic hint, where
    --anchor base (--of base_and_model) interpolates the base and that model."""
    from tiesmerge.methods.base import check_models
    from tiesmerge.registry import make_method

    assert "--anchor base" in check_models(make_method("slerp", {}), 1)[0]
    assert "anchor=models (the default)" in check_models(make_method("slerp", {"anchor": "base"}), 2)[0]
    assert "--of base_and_model" in check_models(make_method("nuslerp", {}), 1)[0]
    assert check_models(make_method("slerp", {}), 2) == []
    assert check_models(make_method("slerp", {}), 3) == ["slerp merges exactly 2 models, got 3"]


def test_a_model_plus_lora_entry_without_a_model_is_said_so(family, capsys):
    """hp76a c58: a mergekit entry "+l0" (nothing before '+') was "applies an adapter to a model other than
    base_model"."""
    from helpers_ckpt import run_cli

    tmp_path, b, _, m1, loras = family
    recipe = tmp_path / "p.yaml"
    recipe.write_text(f"merge_method: ties\nbase_model: {b}\nmodels:\n  - model: +{loras[0]}\n"
                      f"    parameters: {{weight: 1.0, density: 0.5}}\n  - model: {m1}\n"
                      "    parameters: {weight: 1.0, density: 0.5}\n")
    rc, _, err = run_cli(["validate", recipe], capsys)
    assert rc != 0 and "names no model before '+'" in err and "other than base_model" not in err, err


def test_a_per_model_density_in_a_tiesmerge_recipe_points_at_densities(family, capsys):
    """hp76a c40: `models: [{path: m, density: 0.5}]` in a tiesmerge recipe was "unknown key 'density'" with no
    pointer to parameters.densities."""
    from helpers_ckpt import run_cli

    tmp_path, b, _, m1, _ = family
    recipe = tmp_path / "s.yaml"
    recipe.write_text(f"method: ties\nbase: {b}\nmodels:\n  - {{path: {m1}, weight: 1, density: 0.5}}\n")
    rc, _, err = run_cli(["validate", recipe], capsys)
    assert rc != 0 and "one density per model is parameters: {densities: [...]}" in err, err
    recipe.write_text(f"method: ties\nbase: {b}\nmodels:\n  - {{path: {m1}, lam: 2}}\n")
    rc, _, err = run_cli(["validate", recipe], capsys)
    assert rc != 0 and "method options go under parameters:" in err, err


def test_a_slerp_filter_matching_nothing_is_said_in_a_recipes_terms_too():
    """hp76a c43: a mergekit slerp's parameters.t filter matching no tensor was warned of as "t_by_name's filter(s)",
    a key the recipe does not hold; both names are said."""
    import torch

    import tiesmerge
    from tiesmerge.errors import MergeWarning

    base = {"a.mlp.w": torch.zeros(4, 4)}
    models = [{"a.mlp.w": torch.randn(4, 4)} for _ in range(2)]
    with pytest.warns(MergeWarning, match=r"t_by_name's filter\(s\) \(a mergekit recipe's parameters.t filters\) "
                                          r"'self_atn' match no tensor"):
        tiesmerge.merge(base, models, "slerp", t_by_name="self_atn=0.3;*=0.5")


@pytest.mark.parametrize("command", [["validate"], ["merge", "--dry-run", "-o", "out"]])
def test_validate_says_against_which_folder_a_mergekit_recipes_paths_are_read(family, capsys, monkeypatch, command):
    """hp76a c25: validate (and merge --dry-run) run from another folder listed "../base: no such file" with no
    hint, where merge says a mergekit recipe's paths are read against the working folder."""
    from helpers_ckpt import run_cli

    tmp_path, b, _, m1, _ = family
    (tmp_path / "d").mkdir()
    recipe = tmp_path / "d" / "r.yaml"
    monkeypatch.chdir(tmp_path)  # the recipe was written for tmp_path/d
    # the missing paths alone, or (validate lists every problem) beside a problem of the recipe's values
    for density in ("0.5", "1e-9") if command[0] == "validate" else ("0.5",):
        recipe.write_text("merge_method: della\nbase_model: ../b\nmodels:\n  - model: ../m1\n"
                          f"    parameters: {{weight: 1.0, density: {density}}}\nparameters: {{epsilon: 0.0}}\n")
        rc, _, err = run_cli([command[0], "d/r.yaml", *command[1:]], capsys)
        assert rc != 0 and "paths in a mergekit recipe are relative to the working folder" in err, err


def test_an_outputs_manifest_or_card_given_as_a_recipe_is_said_so(tmp_path, capsys):
    """hp76a c35: `merge OUT/tiesmerge.json` was "16 problems: unknown key 'tiesmerge_version' ..." and `merge
    OUT/README.md` "not valid YAML"; both are files of an output, and the card shows the recipe to save."""
    from helpers_ckpt import make_family, run_cli, write_hf_dir

    base, models = make_family(2)
    b = write_hf_dir(tmp_path / "b", base)
    ms = [write_hf_dir(tmp_path / f"m{k}", m) for k, m in enumerate(models)]
    rc, _, err = run_cli(["merge", "--base", b, "--model", ms[0], "--model", ms[1], "-o", tmp_path / "o"], capsys)
    assert rc == 0, err
    for name, what in (("tiesmerge.json", "the manifest (a merged model"), ("README.md", "the model card")):
        rc, _, err = run_cli(["merge", tmp_path / "o" / name, "-o", tmp_path / "again"], capsys)
        assert rc != 0 and f"{what}" in err and "not a recipe" in err and "```yaml block" in err, err
    (tmp_path / "README.md").write_text("method: ties\n")  # a README.md elsewhere is read as the recipe it is
    rc, _, err = run_cli(["validate", tmp_path / "README.md"], capsys)
    assert "not a recipe" not in err


def test_a_card_tells_apart_models_whose_names_print_alike(tmp_path, capsys):
    """hp76a c23: two model folders 'café' (composed) and 'café' (decomposed) were listed alike in the card."""
    from helpers_ckpt import make_family, run_cli, write_hf_dir

    base, models = make_family(2)
    b = write_hf_dir(tmp_path / "b", base)
    composed = write_hf_dir(tmp_path / "caf\u00e9", models[0])
    decomposed = write_hf_dir(tmp_path / unicodedata.normalize("NFD", "caf\u00e9"), models[1])
    rc, _, err = run_cli(["merge", "--base", b, "--model", composed, "--model", decomposed, "-o", tmp_path / "o"],
                         capsys)
    assert rc == 0, err
    card = (tmp_path / "o" / "README.md").read_text(encoding="utf-8")
    assert "(U+00E9)" in card and "(U+0301)" in card


def test_files_from_a_model_without_a_tokenizer_is_warned(tmp_path):
    """hp76a c30: files_from a model folder without tokenizer files, where the base has them, wrote an output with
    no tokenizer, silently."""
    import shutil
    import warnings

    import tiesmerge
    from helpers_ckpt import make_family, write_hf_dir
    from tiesmerge.errors import MergeWarning
    from tiesmerge.paths import TOKENIZER_FILES

    base, models = make_family(2)
    b = write_hf_dir(tmp_path / "b", base)
    ms = [write_hf_dir(tmp_path / f"m{k}", m) for k, m in enumerate(models)]
    assert any((b / n).is_file() for n in TOKENIZER_FILES)
    for n in TOKENIZER_FILES:
        if (ms[1] / n).exists():
            (ms[1] / n).unlink()
    with pytest.warns(MergeWarning, match="holds no tokenizer, while the base"):
        tiesmerge.merge(str(b), [str(m) for m in ms], "ties", output=str(tmp_path / "o"), files_from=str(ms[1]))
    shutil.rmtree(tmp_path / "o")
    with warnings.catch_warnings():
        warnings.simplefilter("error", MergeWarning)
        tiesmerge.merge(str(b), [str(m) for m in ms], "ties", output=str(tmp_path / "o"), files_from=str(ms[0]))


@pytest.mark.parametrize("text", [b"my notes\nline2\ncaf\xe9 recipe\n", b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe",
                                  b"notes on tiesmerge-search/1 runs\nline2\n", b"{", b"\xef\xbb\xbf"])
def test_a_users_file_as_the_search_log_is_never_called_a_damaged_log(tmp_path, text):
    """hp77b c38, c39: a Latin-1 notes file or a binary file given as log= was "the search log is corrupt (not UTF-8
    text)", with advice to delete a line or the file; c05: notes naming the log format were "its header is damaged";
    c03, c04: a file holding only '{' or a byte-order mark was replaced as a cut header."""
    from tiesmerge.errors import ConfigError
    from tiesmerge.tuning.results_log import ResultsLog

    path = tmp_path / "victim"
    path.write_bytes(text)
    with pytest.raises(ConfigError, match="not a search log") as caught:
        ResultsLog(path, {"space": {"lam": [1.0]}})
    assert "corrupt" not in str(caught.value)
    assert path.read_bytes() == text


def test_tune_and_search_callbacks_and_bytes_models_are_checked_first(classifiers, tmp_path):
    """hp77b c18, c19: on_point=5 / on_trial=5 were TypeError tracebacks after the first candidate was scored;
    c07: the API's tune skipped the multi-label check for models given as bytes paths or a generator; c08:
    fisher_information(model=".../model.safetensors") skipped it too."""
    import json
    import shutil

    import torch

    import tiesmerge
    from tiesmerge.errors import ConfigError
    from tiesmerge.evaluation.builtin import builtin_evaluator
    from tiesmerge.stats.fisher import fisher_information
    from tiesmerge.tuning.driver import run_search

    _, base, fts, data = classifiers
    with pytest.raises(ConfigError, match="on_point is 5, not a function"):
        tiesmerge.tune(base, fts, "task_arithmetic", lambda s: 1.0, grid={"lam": [1.0]}, on_point=5)
    with pytest.raises(ConfigError, match="on_trial is 5, not a function"):
        run_search(base, fts, "task_arithmetic", lambda s: 1.0, grid={"lam": [1.0]}, on_trial=5)
    multi = tmp_path / "multi"
    shutil.copytree(fts[0], multi)
    config = json.loads((multi / "config.json").read_text())
    (multi / "config.json").write_text(json.dumps({**config, "problem_type": "multi_label_classification"}))
    score = builtin_evaluator(f"classifier-accuracy:{data}", base)
    for models in ([bytes(multi), bytes(fts[1])], (m for m in [str(multi), str(fts[1])])):
        with pytest.raises(ConfigError, match="model 0 problem_type multi_label_classification"):
            tiesmerge.tune(base, models, "task_arithmetic", score, grid={"lam": [1.0]})
    module = torch.nn.Linear(3, 2)
    with pytest.raises(ConfigError, match="problem_type multi_label_classification"):
        fisher_information(module, [torch.ones(2, 3)], lambda m, b: m(b), per_example="loop",
                           model=str(multi / "model.safetensors"))


def test_adapt_takes_models_as_merge_does_and_names_a_row_that_is_none(classifiers, tmp_path):
    """hp77b c24, c25: the API's adapt with bytes model paths, or models as a generator, were TypeError tracebacks;
    c26: an int or None among in-memory rows was one too."""
    import tiesmerge
    from tiesmerge.errors import ConfigError

    _, base, fts, data = classifiers
    for models in ([bytes(m) for m in fts], (str(m) for m in fts)):
        result = tiesmerge.adapt(base, models, [data, data], tasks=["a", "b"], steps=1, batch_size=2)
        assert result is not None
    with pytest.raises(ConfigError, match="task 'a': example 2 is int '5', not a row"):
        tiesmerge.adapt(base, fts, [[{"text": "good"}, 5], [{"text": "bad"}]], tasks=["a", "b"], steps=1)
    with pytest.raises(ConfigError, match="task 'a': example 1 is NoneType"):
        tiesmerge.adapt(base, fts, [[None], [{"text": "bad"}]], tasks=["a", "b"], steps=1)


@pytest.mark.parametrize("typed", ["out1\u200b", "out1 ", "out1\u00a0", "\u043eut1"])
def test_names_that_print_alike_beyond_normalization_are_told(tmp_path, capsys, typed):
    """hp77a c31, c32: only the two Unicode normalizations were caught: -o 'out1' + a zero-width space (a trailing
    space, a no-break space, a Cyrillic 'о') beside out1 made a second folder printed 'out1', and --model 'm0' + a
    zero-width space was "no such file" although m0 prints alike."""
    from helpers_ckpt import make_family, run_cli, write_hf_dir

    base, models = make_family(2)
    b = write_hf_dir(tmp_path / "b", base)
    ms = [write_hf_dir(tmp_path / f"m{k}", m) for k, m in enumerate(models)]
    (tmp_path / "out1").mkdir()
    rc, _, err = run_cli(["merge", "--base", b, "--model", ms[0], "--model", ms[1], "-o", tmp_path / typed], capsys)
    assert rc != 0 and "would be created beside a name that prints alike" in err and "out1 exists" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "m0", "m1", "out1"]
    model = tmp_path / ("m0" + typed[len("out1"):] if typed.startswith("out1") else "m\u043e".replace("m", "m0"))
    rc, _, err = run_cli(["merge", "--base", b, "--model", model, "--model", ms[1], "-o", tmp_path / "o"], capsys)
    assert rc != 0 and ("m0 exists: its name prints like" in err or not typed.startswith("out1")), err
    rc, _, err = run_cli(["merge", "--base", b, "--model", ms[0], "--model", ms[1], "-o", tmp_path / "out2"], capsys)
    assert rc == 0, err


def test_a_shard_given_as_a_model_hints_its_folder(tmp_path):
    """hp77a c27: one shard of a sharded model given as a model was "tensor names differ: model 0 lacks 9 of the
    base's tensors"; it is refused as a shard, its folder hinted."""
    from helpers_ckpt import make_family, write_hf_dir
    from tiesmerge.errors import CheckpointError
    from tiesmerge.io.checkpoint import open_checkpoint

    _, models = make_family(1)
    sharded = write_hf_dir(tmp_path / "sh", models[0], shards=2)
    shard = next(sharded.glob("model-00001-of-*.safetensors"))
    with pytest.raises(CheckpointError, match="one shard of the sharded model") as caught:
        open_checkpoint(shard)
    assert caught.value.hint == f"give the model's folder instead: {sharded}"
    open_checkpoint(sharded)


def test_pass_78_short_fixes(tmp_path, capsys):
    """hp78a c11: a link to one shard given as a model was "tensor names differ"; c36: a base-less mergekit linear
    with weights 1 and 0 warned "every model's weight is 0, so the merge is the base itself"; hp78b c23: a damaged
    header of a search whose long base path puts "format" past 200 characters was "not a search log"."""
    import json

    from helpers_ckpt import make_family, run_cli, write_hf_dir
    from tiesmerge.errors import CheckpointError, ConfigError
    from tiesmerge.io.checkpoint import open_checkpoint
    from tiesmerge.tuning.results_log import ResultsLog

    _, models = make_family(2)
    sharded = write_hf_dir(tmp_path / "sh", models[0], shards=2)
    link = tmp_path / "lnk.safetensors"
    link.symlink_to(next(sharded.glob("model-00001-of-*.safetensors")))
    with pytest.raises(CheckpointError, match="one shard of the sharded model .* links to") as caught:
        open_checkpoint(link)
    assert caught.value.hint == f"give the model's folder instead: {sharded}"
    m1 = write_hf_dir(tmp_path / "m1", models[1])
    recipe = tmp_path / "lin.yaml"
    recipe.write_text(f"merge_method: linear\nmodels:\n  - model: {sharded}\n    parameters: {{weight: 1.0}}\n"
                      f"  - model: {m1}\n    parameters: {{weight: 0.0}}\n")
    rc, _, err = run_cli(["merge", recipe, "-o", tmp_path / "o"], capsys)
    assert rc == 0 and "every model's weight is 0 but the base's (base_weight 1" in err, err
    header = {"base": "/" + "deep/" * 60 + "base", "space": {"lam": [1.0]}}
    log = tmp_path / "log.jsonl"
    ResultsLog(log, header).append({"key": json.dumps({"lam": 1.0}), "options": {"lam": 1.0}, "score": 0.5,
                                    "seconds": 1.0})
    text = log.read_text()
    log.write_text(text.replace('"format"', '"format",', 1))
    with pytest.raises(ConfigError, match="its header is damaged"):
        ResultsLog(log, header)


def test_run_search_takes_a_generator_of_models(classifiers):
    """hp78b c08: run_search(models=(m for m in ...)) was "TypeError: object of type 'generator' has no len()"."""
    from tiesmerge.tuning.driver import run_search

    _, base, fts, _ = classifiers
    result = run_search(base, (str(m) for m in fts), "task_arithmetic", lambda s: 1.0, grid={"lam": [1.0]})
    assert result.best is not None


def test_fisher_of_a_cache_style_link_reads_the_links_folder_config(classifiers, tmp_path):
    """hp78b c19: fisher_information(model=snap/model.safetensors), a link into blobs/ as the Hugging Face cache
    keeps it, beside a config saying multi_label_classification, was computed: only the target's folder was read."""
    import json
    import shutil

    import torch

    from tiesmerge.errors import ConfigError
    from tiesmerge.stats.fisher import fisher_information

    _, _, fts, _ = classifiers
    (tmp_path / "blobs").mkdir()
    (tmp_path / "snap").mkdir()
    shutil.copy(fts[0] / "model.safetensors", tmp_path / "blobs" / "abc")
    (tmp_path / "snap" / "model.safetensors").symlink_to(tmp_path / "blobs" / "abc")
    config = json.loads((fts[0] / "config.json").read_text())
    (tmp_path / "snap" / "config.json").write_text(json.dumps({**config, "problem_type": "multi_label_classification"}))
    with pytest.raises(ConfigError, match="problem_type multi_label_classification"):
        fisher_information(torch.nn.Linear(3, 2), [torch.ones(2, 3)], lambda m, b: m(b), per_example="loop",
                           model=str(tmp_path / "snap" / "model.safetensors"))


def test_a_lora_alpha_past_float32_raises_no_numpy_warning(tmp_path):
    """hp78a c29: lora_alpha 1e39 printed numpy's "RuntimeWarning: overflow encountered in cast" (with a source
    line) before the typed error: the comparison cast the Python float to float32."""
    import warnings

    import tiesmerge
    from helpers_adapters import random_lora, write_lora_dir
    from helpers_ckpt import make_family, write_hf_dir
    from tiesmerge.errors import TiesMergeError

    base, _ = make_family(1, with_int=False)
    b = write_hf_dir(tmp_path / "b", base)
    lora = write_lora_dir(tmp_path / "l", random_lora(base, 2, 0), alpha=1e39)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        with pytest.raises(TiesMergeError, match="out of range"):
            tiesmerge.merge(str(b), [str(lora)], "task_arithmetic", output=str(tmp_path / "o"))


def test_pass_78_leftovers(tmp_path, capsys):
    """hp78a c33: a shard its index names part1.safetensors (no -NNNNN-of-NNNNN) given as a model was "tensor names
    differ"; c35: a base-less mergekit linear with weight 3e38 overflowed with the hint "the weights are normalized,
    so lowering them changes nothing"; c37: a 1e-320 weight was said as the translation's "base_weight"."""
    import json

    from safetensors.torch import load_file, save_file

    from helpers_ckpt import make_family, run_cli, write_hf_dir
    from tiesmerge.errors import CheckpointError
    from tiesmerge.io.checkpoint import open_checkpoint

    _, models = make_family(2, with_int=False)
    sharded = write_hf_dir(tmp_path / "sh", models[0], shards=2)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    renamed = {}
    for old in sorted(set(index["weight_map"].values())):
        renamed[old] = f"part{len(renamed) + 1}.safetensors"
        save_file(load_file(sharded / old), sharded / renamed[old])
        (sharded / old).unlink()
    index["weight_map"] = {k: renamed[v] for k, v in index["weight_map"].items()}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="one shard of the sharded model"):
        open_checkpoint(sharded / "part1.safetensors")
    open_checkpoint(sharded)
    m1 = write_hf_dir(tmp_path / "m1", models[1])
    recipe = tmp_path / "lin.yaml"
    for weights, said in (((3e38, 1), "all by one factor"), (("1e-320", 1), "models[0].parameters.weight: 1e-320 is "
                                                                           "below float32's smallest normal")):
        recipe.write_text(f"merge_method: linear\nparameters: {{normalize: true}}\nmodels:\n  - model: {sharded}\n"
                          f"    parameters: {{weight: {weights[0]}}}\n  - model: {m1}\n"
                          f"    parameters: {{weight: {weights[1]}}}\ndtype: float32\n")
        rc, _, err = run_cli(["merge", recipe, "-o", tmp_path / "o"], capsys)
        assert rc != 0 and said in err and "changes nothing" not in err and "base_weight" not in err, err
        assert not (tmp_path / "o").exists()


def test_pass_78_notes(tmp_path, capsys):
    """hp78a c38: a new output whose name prints like the input 'base' was hinted "type the path as it is stored"
    (the base's name); c14: a model's config.json as the recipe listed its keys as typos ("did you mean 'dtype'?");
    c09: the duplicate-weights warning printed 'm1' and 'm1' + a no-break space alike; c05: DELLA's epsilon
    0.19999998 printed as 0.2 ("0.2 - 0.2 = 2e-08")."""
    import shutil

    import tiesmerge
    from helpers_ckpt import make_family, run_cli, write_hf_dir
    from tiesmerge.errors import ConfigError
    from tiesmerge.methods.della import Della

    base, models = make_family(2, with_int=False)
    b = write_hf_dir(tmp_path / "base", base)
    ms = [str(write_hf_dir(tmp_path / f"m{k}", m)) for k, m in enumerate(models)]
    rc, _, err = run_cli(["merge", "--base", b, "--model", ms[0], "--model", ms[1], "-o", tmp_path / "b\u0430se"],
                         capsys)
    assert rc != 0 and "choose a name for the output that prints unlike" in err and "as it is stored" not in err, err
    rc, _, err = run_cli(["merge", b / "config.json", "-o", tmp_path / "o"], capsys)
    assert rc != 0 and "a model's configuration" in err and f"--base {b}" in err and "did you mean" not in err, err
    twin = tmp_path / "m0\u00a0"
    shutil.copytree(ms[0], twin)
    with pytest.warns(UserWarning, match=r"m0\\xa0': U\+00A0 a space at an end\) hold the same weights"):
        tiesmerge.merge(str(b), [ms[0], str(twin)], "ties", output=str(tmp_path / "o2"))
    with pytest.raises(ConfigError, match=r"density 0\.2 - epsilon 0\.19999998 = "):
        Della(density=0.2, epsilon=0.19999998, weights=None)._requirements()


def test_adapt_names_text_of_another_type(classifiers):
    """hp78b c17: an in-memory adapt row whose text was bytes was said as "an empty or missing 'text'"."""
    import tiesmerge
    from tiesmerge.errors import ConfigError

    _, base, fts, _ = classifiers
    with pytest.raises(ConfigError, match="example 1's 'text' is a bytes, not a string") as caught:
        tiesmerge.adapt(base, fts, [[{"text": b"good"}], [{"text": "bad"}]], tasks=["a", "b"], steps=1)
    assert "decode" in caught.value.hint


def test_a_cut_adapt_checkpoint_is_said_as_damaged(classifiers, tmp_path):
    """hp78b c27: the first 100 bytes of an adapt checkpoint given as --checkpoint were "a file tiesmerge wrote as an
    adapt checkpoint, not as the checkpoint", and the hint offered --force, refused the same."""
    import tiesmerge
    from tiesmerge.errors import OutputError

    _, base, fts, data = classifiers
    ckpt = tmp_path / "ck.json"
    tiesmerge.adapt(base, fts, [data, data], tasks=["a", "b"], steps=1, batch_size=2, checkpoint=ckpt)
    raw = ckpt.read_bytes()
    ckpt.write_bytes(raw[:raw.index(b"tiesmerge-adapt-checkpoint/") + 40])  # cut inside its header
    for force in (False, True):
        with pytest.raises(OutputError, match="wrote as an adapt checkpoint, which no longer reads as one") as caught:
            tiesmerge.adapt(base, fts, [data, data], tasks=["a", "b"], steps=1, batch_size=2, checkpoint=ckpt,
                            force=force)
        assert "delete it yourself" in caught.value.hint


def test_statistics_of_a_weights_file_record_its_folders_digests(classifiers):
    """hp78b c20: fisher_information(model=folder/model.safetensors) recorded no tokenizer or config digest, where
    model=folder records both (a merge reading that file compares them)."""
    import torch

    from tiesmerge.stats.fisher import fisher_information

    _, _, fts, _ = classifiers
    module = torch.nn.Linear(3, 2)
    seen = {}
    for model in (fts[0], fts[0] / "model.safetensors"):
        torch.manual_seed(0)
        stats = fisher_information(module, [torch.randn(2, 3)], lambda m, b: m(b), per_example="loop",
                                   model=str(model))
        seen[str(model)] = (stats.manifest.tokenizer_digest, stats.manifest.config_digest)
    folder, file = seen.values()
    assert folder == file and folder[1] is not None, seen


def test_a_base_given_as_its_weights_file_warns_of_the_missing_config(tmp_path):
    """hp77a c01: --base b/model.safetensors (a folder holding config.json) wrote an output without config.json,
    silently; the folder itself copies it."""
    import tiesmerge
    from helpers_ckpt import make_family, write_hf_dir

    base, models = make_family(2, with_int=False)
    b = write_hf_dir(tmp_path / "b", base)
    ms = [str(write_hf_dir(tmp_path / f"m{k}", m)) for k, m in enumerate(models)]
    with pytest.warns(UserWarning, match=rf"given as its weights file .* give the base's folder \({b}\)"):
        tiesmerge.merge(str(b / "model.safetensors"), ms, "ties", output=str(tmp_path / "o"))
    assert not (tmp_path / "o" / "config.json").exists()
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tiesmerge.merge(str(b), ms, "ties", output=str(tmp_path / "o2"))
    assert (tmp_path / "o2" / "config.json").is_file()


def test_quantized_checkpoints_are_refused_before_the_merge(tmp_path):
    """hp77a c14: a bitsandbytes 8-bit model (int8 weights and their .SCB scales) merged silently, its int8 layer the
    base's and its scales averaged as floats; c15: a base whose config declared quantization_config over plain
    weights passed it into the float output, which transformers then loaded as quantized."""
    import json

    import tiesmerge
    from helpers_ckpt import make_family, write_hf_dir
    from tiesmerge.errors import CheckpointError

    base, models = make_family(2, with_int=False)
    declared = write_hf_dir(tmp_path / "qb", base, config={"quantization_config": {"quant_method": "bitsandbytes"}})
    b = write_hf_dir(tmp_path / "b", base)
    ms = [str(write_hf_dir(tmp_path / f"m{k}", m)) for k, m in enumerate(models)]
    with pytest.raises(CheckpointError, match="the base is a quantized checkpoint .* quant_method bitsandbytes") as c:
        tiesmerge.merge(str(declared), ms, "ties", output=str(tmp_path / "o"))
    assert "remove quantization_config" in c.value.hint
    packed = dict(models[0])
    name = next(iter(packed))
    packed[name.removesuffix(".weight") + ".SCB"] = packed[name].flatten()[:4].float()
    q = write_hf_dir(tmp_path / "q", packed)
    with pytest.raises(CheckpointError, match=r"a model is a quantized checkpoint \(it holds .*\.SCB"):
        tiesmerge.merge(str(b), [str(q), ms[1]], "ties", output=str(tmp_path / "o"))
    assert not (tmp_path / "o").exists()
    assert json.loads((declared / "config.json").read_text())["quantization_config"]


def test_unknown_method_suggests_only_a_near_name():
    """hp77a c26: `tiesmerge methods nonexistent` asked "did you mean 'consensus'?"."""
    from tiesmerge.registry import did_you_mean

    assert did_you_mean("nonexistent", ["consensus", "ties"]) == ""
    assert did_you_mean("tie", ["consensus", "ties"]) == " (did you mean 'ties'?)"


def test_a_regex_target_modules_says_it_matches_whole_paths():
    """hp77a c06: a target_modules string 'q_proj|v_proj' refused with "does not select it" and no word that PEFT
    matches a string against the module's whole path."""
    from tiesmerge.io.peft_targets import Targeting

    selection = Targeting.of({"target_modules": "query|value"}, "cfg")
    why = selection.why_not("encoder.layer.0.attention.self.query")
    assert why is not None and "whole path must match (PEFT's re.fullmatch)" in why, why
    assert Targeting.of({"target_modules": ".*\\.(query|value)"}, "cfg").why_not(
        "encoder.layer.0.attention.self.query") is None


def test_a_mergekit_slerp_t_out_of_range_is_said_with_its_key(tmp_path):
    """hp77a c18: `t: 1.5` in a mergekit slerp recipe was "slerp: t must be in [0, 1] (fraction)" with a hint about
    the command line's flags, where a rule's t says "parameters.t"."""
    from tiesmerge.errors import ConfigError
    from tiesmerge.recipe_mergekit import translate_mergekit

    with pytest.raises(ConfigError, match=r"parameters\.t: 1\.5 must be a finite number in \[0, 1\]"):
        translate_mergekit({"merge_method": "slerp", "base_model": "b", "parameters": {"t": 1.5},
                            "models": [{"model": "b"}, {"model": "m"}]})


def _adapt_checkpoint(classifiers, tmp_path):
    """A one-step adapt run's settings (its checkpoint among them), and the checkpoint's tensors and metadata."""
    from safetensors import safe_open

    import tiesmerge

    _, base, fts, data = classifiers
    run = {"tasks": ["a", "b"], "steps": 1, "batch_size": 2, "checkpoint": tmp_path / "ck.safetensors"}
    tiesmerge.adapt(base, fts, [data, data], **run)
    with safe_open(run["checkpoint"], "pt") as f:
        return run, {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


@pytest.mark.parametrize("step", ["3.5", "99999999999999999999"])
def test_an_adapt_checkpoints_edited_step_is_said_as_damage(classifiers, tmp_path, step):
    """hp77b c13: an adapt checkpoint whose step was edited to "3.5" was "not a checkpoint tiesmerge adapt wrote (its
    fields are missing or damaged: ValueError: invalid literal for int() ...)", hinting at another checkpoint."""
    from safetensors.torch import save_file

    import tiesmerge
    from tiesmerge.errors import ConfigError

    _, base, fts, data = classifiers
    run, tensors, meta = _adapt_checkpoint(classifiers, tmp_path)
    save_file(tensors, run["checkpoint"], metadata={**meta, "step": step})
    with pytest.raises(ConfigError, match=f"the checkpoint is damaged \\(step '{step}' is no count of steps") as c:
        tiesmerge.adapt(base, fts, [data, data], resume=True, **run)
    assert "remove it to start afresh" in c.value.hint


def test_undivided_and_opposite_weights_are_said_as_what_they_scale(tmp_path, capsys):
    """hp79a c23, c36: average with normalize_weights off, every model's weight 0 and base_weight 2, was "the merge is
    that model itself" (it is twice that model); c29: every weight 0 made an all-zero model "the base itself"; c34:
    weights summing to 2001 undivided were silent on the command line (a mergekit recipe warned); c30: ties with
    weights 1000 and -1000 multiplied the agreeing task vectors by 1000, silently."""
    import warnings

    import torch

    import tiesmerge
    from helpers_ckpt import make_family, run_cli, write_hf_dir
    from tiesmerge.errors import ConfigError

    base = {"w": torch.ones(3)}
    models = [{"w": torch.full((3,), 1.5)}, {"w": torch.full((3,), 2.0)}]
    with pytest.warns(UserWarning, match="so the merge is that model times 2 ") as seen:
        out = tiesmerge.merge(base, models, "average", weights=[0, 0], base_weight=2, normalize_weights=False)
    assert torch.equal(out["w"], torch.full((3,), 2.0)) and not any("itself" in str(w.message) for w in seen)
    with pytest.raises(ConfigError, match="the merge would be an all-zero model"):
        tiesmerge.merge(base, models, "average", weights=[0, 0], base_weight=0, normalize_weights=False)
    with pytest.warns(UserWarning, match="sum to 2001, not 1"):
        tiesmerge.merge(base, models, "average", weights=[1000, 1000], base_weight=1, normalize_weights=False)
    with pytest.warns(UserWarning, match=r"weights of opposite signs \(1000, -1000\).* up to 2000 times"):
        tiesmerge.merge(base, models, "ties", weights=[1000, -1000], density=1.0)
    # τ1 − τ2 where they agree: no scale to speak of (hp85a c23: but τ2 where it is elected alone, which is said)
    with pytest.warns(UserWarning, match=r"model\(s\) 1 have a negative weight") as seen:
        tiesmerge.merge(base, models, "ties", weights=[1, -1], density=1.0)
    assert not any("opposite signs" in str(w.message) for w in seen)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one sign: a mean
        tiesmerge.merge(base, models, "ties", weights=[1000, 1000], density=1.0)
    fam_base, fam_models = make_family(2, with_int=False)
    b = write_hf_dir(tmp_path / "b", fam_base)
    ms = [write_hf_dir(tmp_path / f"m{k}", m) for k, m in enumerate(fam_models)]
    rc, out_text, _ = run_cli(["merge", "--base", b, "--model", ms[0], "--model", ms[1], "--method", "average",
                               "--weights", "1", "1", "--base-weight", "1", "-o", tmp_path / "o"], capsys)
    assert rc == 0 and "merged the base and 2 models with average" in out_text, out_text


@pytest.mark.parametrize("damage, said", [("coefficients", "it lacks its 'coefficients' tensor"),
                                          ("entropy", "a field is not valid JSON"),
                                          ("config", "it lacks its 'config' field")])
def test_an_adapt_checkpoints_damaged_fields_are_said_as_damage(classifiers, tmp_path, damage, said):
    """hp79b c36, c25: an adapt checkpoint (its format field intact) without its coefficients tensor or config field,
    or with invalid JSON in a field, was "not a checkpoint tiesmerge adapt wrote (... KeyError: 'coefficients')"."""
    from safetensors.torch import save_file

    import tiesmerge
    from tiesmerge.errors import ConfigError

    _, base, fts, data = classifiers
    run, tensors, meta = _adapt_checkpoint(classifiers, tmp_path)
    if damage == "coefficients":
        del tensors["coefficients"]
    elif damage == "entropy":
        meta["entropy"] = "[1,"
    else:
        del meta["config"]
    save_file(tensors, run["checkpoint"], metadata=meta)
    with pytest.raises(ConfigError, match=f"the checkpoint is damaged \\({said}") as c:
        tiesmerge.adapt(base, fts, [data, data], resume=True, **run)
    assert "Error" not in str(c.value) and "start afresh" in c.value.hint


def test_a_chain_of_links_shows_the_multi_label_config_beside_its_middle_link(classifiers, tmp_path):
    """hp79b c06, c19, c20: M1/model.safetensors -> M2/model.safetensors -> the weights (a link into a Hugging Face
    cache snapshot, whose own file links on into blobs/), M2/config.json multi-label: fisher_information, tune's
    built-in evaluators and adapt read it as single-label, where one link was refused."""
    import json

    import torch

    from tiesmerge.errors import ConfigError
    from tiesmerge.stats.fisher import fisher_information

    _, _, fts, _ = classifiers
    (tmp_path / "M1").mkdir()
    (tmp_path / "M2").mkdir()
    config = json.loads((fts[0] / "config.json").read_text())
    (tmp_path / "M2" / "config.json").write_text(json.dumps({**config, "problem_type": "multi_label_classification"}))
    (tmp_path / "M2" / "model.safetensors").symlink_to(fts[0] / "model.safetensors")
    (tmp_path / "M1" / "model.safetensors").symlink_to("../M2/model.safetensors")
    with pytest.raises(ConfigError, match="problem_type multi_label_classification"):
        fisher_information(torch.nn.Linear(3, 2), [torch.ones(2, 3)], lambda m, b: m(b), per_example="loop",
                           model=str(tmp_path / "M1" / "model.safetensors"))


def test_run_search_lists_any_iterable_of_models(classifiers):
    """hp79b c02, c03: run_search with models as a class having only __iter__ (or only __getitem__) was a TypeError
    "object of type 'OnePass' has no len()"; tune lists the first and names the second."""
    from tiesmerge.errors import ConfigError
    from tiesmerge.tuning import run_search

    _, base, fts, _ = classifiers

    class OnePass:
        def __init__(self, xs):
            self.it = iter(xs)

        def __iter__(self):
            return self.it

    class Indexed:
        def __init__(self, xs):
            self.xs = xs

        def __getitem__(self, i):
            return self.xs[i]

    result = run_search(base, OnePass([str(m) for m in fts]), "ties", lambda sd: 0.5,
                        grid={"density": [0.2], "lam": [1.0]})
    assert result is not None
    with pytest.raises(ConfigError, match="got Indexed"):
        run_search(base, Indexed([str(m) for m in fts]), "ties", lambda sd: 0.5, grid={"density": [0.2], "lam": [1.0]})


def test_pass_79_merge_notes(tmp_path):
    """hp79a c07: a subnormal DARE density in a mergekit recipe printed as 9.99989e-321; c38: a slerp t gradient over
    a base config without num_hidden_layers was hinted "fix the values named above in the recipe"."""
    from tiesmerge.errors import ConfigError
    from tiesmerge.recipe_mergekit import translate_mergekit

    with pytest.raises(ConfigError, match="density 1e-320 keeps a fraction too small"):
        translate_mergekit({"merge_method": "dare_ties", "base_model": "b", "models": [
            {"model": "m", "parameters": {"weight": 1.0, "density": 1e-320}}]})
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="add num_hidden_layers to that config.json") as caught:
        translate_mergekit({"merge_method": "slerp", "base_model": str(tmp_path / "b"), "parameters": {"t": [0, 1]},
                            "models": [{"model": str(tmp_path / "b")}, {"model": "m"}]})
    assert "in the recipe" not in caught.value.hint or "not only the recipe" in caught.value.hint


def test_an_evaluator_module_that_is_a_fifo_is_named_so(tmp_path, monkeypatch):
    """hp79b c37: --evaluator ffm:score with ffm.py a FIFO in the working folder was "No module named 'ffm'", hinting
    to run from its folder (it was run from there)."""
    from tiesmerge.cli.commands import _load_callable
    from tiesmerge.errors import ConfigError

    monkeypatch.chdir(tmp_path)
    os.mkfifo(tmp_path / "fifo_evaluator_mod.py")
    with pytest.raises(ConfigError, match="fifo_evaluator_mod.py in the working folder is not a regular file"):
        _load_callable("fifo_evaluator_mod:score")


def test_a_search_folder_with_its_log_deleted_or_damaged_is_still_its_own(tmp_path):
    """hp79b c15: a search log whose header had one 0xff byte inside the base path was "the log of another search"
    (its base differing by a U+FFFD); c16 (and hp77b c16, c33): a search's --dir whose log was deleted, cut early or
    its marker damaged was "--dir exists and holds files that are not a tiesmerge search's (results.md, ...)", its
    own report files."""
    import json

    from tiesmerge.errors import ConfigError, OutputError
    from tiesmerge.paths import SEARCH_STAMPS, check_search_dir, file_stamp
    from tiesmerge.tuning.results_log import ResultsLog

    header = {"base": "/models/base-model", "space": {"lam": [1.0]}}
    log = tmp_path / "log.jsonl"
    ResultsLog(log, header).append({"key": json.dumps({"lam": 1.0}), "options": {"lam": 1.0}, "score": 0.5,
                                    "seconds": 1.0})
    raw = log.read_bytes()
    at = raw.index(b"base-model")
    log.write_bytes(raw[:at] + b"\xff" + raw[at + 1:])
    with pytest.raises(ConfigError, match="its header is damaged: byte .* is not UTF-8"):
        ResultsLog(log, header)
    folder = tmp_path / "s"
    folder.mkdir()
    for name in ("results.md", "report.html"):
        (folder / name).write_text("report")
    (folder / SEARCH_STAMPS).write_text(json.dumps({n: file_stamp(folder / n) for n in ("results.md", "report.html")}))
    check_search_dir(folder)  # its log deleted: the search starts afresh there
    (folder / "log.jsonl").write_text('{"format": "tiesmerge-searcX/1"}\n')
    check_search_dir(folder)  # judged as the log is opened
    (folder / SEARCH_STAMPS).unlink()
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="holds files that are not a tiesmerge search's"):
        check_search_dir(folder)


def test_statistics_through_a_re_pointed_link_say_the_link_may_name_another_model(tmp_path):
    """hp77b c12: statistics computed through a link (kk/la -> a), the link then re-pointed at model b: "its weight
    files changed since", where no file changed."""
    from pathlib import Path

    from tiesmerge.errors import IncompatibleCheckpointsError
    from tiesmerge.io.checkpoint import open_checkpoint
    from tiesmerge.manifest import check_stats_digests
    from tiesmerge.stats import StatsManifest, StatsSource
    from tiesmerge.stats.files import combine_digests

    (tmp_path / "b").mkdir()
    link = tmp_path / "la"
    link.symlink_to(tmp_path / "b")
    then = [{"path": str(link / "model.safetensors"), "sha256": "a" * 64}]
    now = [{"path": str(link / "model.safetensors"), "sha256": "b" * 64}]
    digest = "files:" + combine_digests([(Path(f["path"]).name, f["sha256"]) for f in then])
    source = StatsSource(open_checkpoint({}, label="s0"), StatsManifest("fisher", 4, model_digest=digest,
                                                                        model=str(link)), "s0")
    with pytest.raises(IncompatibleCheckpointsError, match="or the link now names another model"):
        check_stats_digests([source], [now], [str(link)])


def test_pass_80_weights_say_what_they_scale_by():
    """hp80a c03: 13 models with weights 1, 1, -1.9999 (and ten more) under ties skipped the cancelling-weights check
    (pairs only past 12); c21: task_arithmetic normalized with weights 1, -0.999 multiplied the task vector ~1000
    times, silently; c22: normalized weights 1000, 1000 were said to scale a task vector 1000 times; c25: the advice
    "a negative weight flips a task vector" under ties, where (-1, -1) merges as (1, 1); c29: average undivided with
    base_weight 1 and weights 1000, -1000 (sum 1) extrapolated far, silently."""
    import warnings

    import torch

    import tiesmerge

    base = {"w": torch.zeros(4)}
    two = [{"w": torch.tensor([1.0, -1.0, 0.5, 0.2])}, {"w": torch.tensor([0.5, -0.5, 1.0, -0.2])}]
    many = [{"w": torch.randn(4, generator=torch.Generator().manual_seed(k))} for k in range(16)]
    # (hp84a c51: these 13 models are measured exactly, in float32 as the merge divides (hp87b c77): 1, 1, -1.9999
    # reach 39992, where the exact sum says 39999)
    with pytest.warns(UserWarning, match=r"which scales the merged task vector up to 3.999e\+04 times"):
        tiesmerge.merge(base, many[:13], "ties", weights=[1, 1, -1.9999] + [1] * 10, density=1.0)
    # (hp86a c11: 13 distinct weights are measured too, 8,192 subsets; past 16,384 "without bound" is said)
    with pytest.warns(UserWarning, match=r"which scales the merged task vector up to \d+ times"):
        tiesmerge.merge(base, many[:13], "ties", weights=[1 + k / 100 for k in range(12)] + [-1.9999], density=1.0)
    # (under 16 models every subset is measured, as the merge adds them: hp87b c77)
    with pytest.warns(UserWarning, match="which scales the merged task vector up to 397 times"):
        tiesmerge.merge(base, many[:15], "ties", weights=[1 + k / 100 for k in range(14)] + [-1.9999], density=1.0)
    with pytest.warns(UserWarning, match="with 16 models can scale the merged task vector without bound"):
        tiesmerge.merge(base, many, "ties", weights=[1 + k / 100 for k in range(15)] + [-1.9999], density=1.0)
    with pytest.warns(UserWarning, match=r"task_arithmetic: weights of opposite signs \(1, -0.999\): the weights "
                                         r"nearly cancel"):
        tiesmerge.merge(base, two, "task_arithmetic", weights=[1, -0.999], normalize_weights=True, lam=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tiesmerge.merge(base, two, "task_arithmetic", weights=[1000, 1000], normalize_weights=True, lam=1.0)
    with pytest.warns(UserWarning, match="every weight is negative .* undoes their sign") as seen:
        tiesmerge.merge(base, two, "ties", weights=[-1, -1], density=1.0)
    assert not any("flips" in str(w.message) for w in seen)
    with pytest.warns(UserWarning, match=r"as they stand they reach ±1e\+03"):
        tiesmerge.merge(base, two, "average", weights=[1000, -1000], base_weight=1, normalize_weights=False)


def test_compressed_tensors_fp8_checkpoints_are_refused(tmp_path):
    """hp80a c07: float8_e4m3 weights with a .weight_scale beside them (compressed-tensors, no quantization_config)
    merged silently; a float32 weight beside a tensor called weight_scale is a model's own and merges."""
    import torch

    import tiesmerge
    from tiesmerge.errors import CheckpointError

    base = {"l.weight": torch.zeros(2, 2), "l.weight_scale": torch.ones(1)}
    fine = [{"l.weight": torch.ones(2, 2) * k, "l.weight_scale": torch.ones(1)} for k in (1, 2)]
    tiesmerge.merge(base, fine, "task_arithmetic")
    fp8 = {"l.weight": torch.ones(2, 2).to(torch.float8_e4m3fn), "l.weight_scale": torch.ones(1)}
    with pytest.raises(CheckpointError, match="it holds 'l.weight_scale', a tensor only quantized checkpoints hold"):
        tiesmerge.merge(base, [fp8, fine[0]], "task_arithmetic")


def test_pass_80_merge_notes(tmp_path, capsys):
    """hp80a c36: an adapter_config.json given as the recipe listed 10 problems ("did you mean 'base'?"); c27:
    `--memory-budget=--` was "not a size: []"; c26: a mergekit entry "base + la1" (spaces around '+') was "applies an
    adapter to a model other than base_model"."""
    import json

    from helpers_ckpt import run_cli
    from tiesmerge.errors import ConfigError
    from tiesmerge.recipe_mergekit import translate_mergekit

    (tmp_path / "la").mkdir()
    (tmp_path / "la" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2}))
    rc, _, err = run_cli(["merge", tmp_path / "la" / "adapter_config.json", "-o", tmp_path / "o"], capsys)
    assert rc != 0 and "a PEFT adapter's configuration" in err and "did you mean" not in err, err
    rc, _, err = run_cli(["merge", "--base", tmp_path, "--model", tmp_path, "-o", tmp_path / "o",
                          "--memory-budget=--"], capsys)
    assert rc == 2 and "--memory-budget=-- gives '--'" in err and "[]" not in err, err
    (tmp_path / "base").mkdir()
    with pytest.raises(ConfigError, match="has spaces around '[+]'") as caught:
        translate_mergekit({"merge_method": "ties", "base_model": str(tmp_path / "base"), "models": [
            {"model": f"{tmp_path / 'base'} + {tmp_path / 'la'}", "parameters": {"weight": 1.0, "density": 0.5}}]})
    assert "other than base_model" not in str(caught.value)


def test_pass_80_tune_side(classifiers, tmp_path):
    """hp80b c04, c21: run_search and adapt with a model None, 5 or a module were TypeError tracebacks (tune says them);
    c05: a base state dict holding {"x": 1} was an AttributeError in tune and run_search; c18: a statistics manifest
    whose model field held a NUL byte was "unexpected ValueError: embedded null byte"; c12: an in-memory adapt row
    with a lone surrogate was "the model fails in its forward pass", hinting at its config.json."""
    import torch

    import tiesmerge
    from tiesmerge.errors import CheckpointError, ConfigError
    from tiesmerge.stats.files import StatsManifest
    from tiesmerge.tuning import run_search

    _, base, fts, data = classifiers
    grid = {"density": [0.2], "lam": [1.0]}
    for bad in (None, 5, torch.nn.Linear(2, 2)):
        with pytest.raises(ConfigError, match="not a path or a state dict"):
            run_search(base, [fts[0], bad], "ties", lambda sd: 0.5, grid=grid)
        with pytest.raises(ConfigError, match="not a path or a state dict"):
            tiesmerge.adapt(base, [fts[0], bad], [data, data], tasks=["a", "b"], steps=1)
    state = {"x": torch.ones(2), "y": 1}
    models = [{"x": torch.ones(2) * 2, "y": torch.ones(1)}, {"x": torch.ones(2) * 3, "y": torch.ones(1)}]
    for call in (tiesmerge.tune, run_search):
        with pytest.raises(CheckpointError, match="entry 'y' is a int, not a torch.Tensor"):
            call(state, models, "ties", lambda sd: 0.5, grid=grid)
    with pytest.raises(CheckpointError, match="field 'model' holds a NUL byte"):
        StatsManifest.from_dict({"kind": "fisher", "examples": 3, "model": "/a\0b"}, "m.json")
    with pytest.raises(ConfigError, match="task 'a': example 1: a string holds .udc80"):
        tiesmerge.adapt(base, fts, [[{"text": "good \udc80"}], [{"text": "bad"}]], tasks=["a", "b"], steps=1)


@pytest.mark.parametrize("words", [["merge", "--base", "b", "--model", "m", "-o", "o", "--method=--"],
                                   ["merge", "--base", "b", "--model", "m", "-o--"],
                                   ["analyze", "--base", "b", "--model", "m", "-o=--"],
                                   ["merge", "--base=--", "--model", "m", "-o", "o"],
                                   ["stats", "fisher", "--model", "b", "--data", "d.jsonl", "-o", "s", "--limit=--"],
                                   ["analyze", "--base", "b", "--model", "m", "-o", "a", "--subsets-per-size=--"]])
def test_any_option_given_as_equals_dashes_is_refused_first(tmp_path, capsys, monkeypatch, words):
    """hp81a c14-c17, c36-c39: `--X=--` (argparse reads the '--' as the end of options and leaves []) was a TypeError
    "'<' not supported between list and int", a default silently used (--method=-- merged ties), or "not a size: []"
    for every option but the few checked by name."""
    from helpers_ckpt import run_cli

    monkeypatch.chdir(tmp_path)
    rc, _, err = run_cli(words, capsys)
    flag = next(w for w in words if w.endswith("--") and w != "--")[:-2].removesuffix("=")
    assert rc == 2 and f"{flag}=-- gives '--'" in err and "unexpected" not in err, err
    assert os.listdir(tmp_path) == []


def test_pass_81_merge_side(tmp_path, capsys):
    """hp81a c02, c24: twelve weights 1 and one -0.001 under ties were said to scale "without bound" (it is 1.002),
    naming no negative weight; c07, c08: a compressed-tensors compression_config, or a quantization_config nested in
    text_config, merged silently; c11, c12, c33: adapters merged over a quantized base failed as "the base has no
    tensor" or a traceback; c40: an int8 base tensor that LoRAs change kept the base's values silently; c19, c20: a
    weights file or a shard index as the recipe was "not UTF-8 text ... iconv" or "unknown key 'weight_map'"."""
    import warnings

    import torch

    import tiesmerge
    from helpers_adapters import random_lora, write_lora_dir
    from helpers_ckpt import make_family, run_cli, write_hf_dir
    from tiesmerge.errors import CheckpointError

    base = {"w": torch.zeros(4)}
    many = [{"w": torch.randn(4, generator=torch.Generator().manual_seed(k))} for k in range(13)]
    with warnings.catch_warnings(record=True) as caught:  # (hp85a c23: the negative weight's sign is said)
        warnings.simplefilter("always")
        tiesmerge.merge(base, many, "ties", weights=[1] * 12 + [-0.001], density=1.0)
    assert not [w for w in caught if "opposite signs" in str(w.message)]
    # (1, -1, -0.5 and ten 1s reach 7, measured exactly since hp84a c51: no warning; -0.999 beside a 1 reaches 1999)
    with pytest.warns(UserWarning, match=r"13 weights, 2 negative: model 1: -1, model 2: -0.999"):
        tiesmerge.merge(base, many, "ties", weights=[1, -1, -0.999] + [1] * 10, density=1.0)
    fam_base, fam_models = make_family(2, with_int=False)
    for extra in ({"compression_config": {"sparsity_config": {"format": "sparse-bitmask"}}},
                  {"text_config": {"quantization_config": {"quant_method": "bitsandbytes"}}}):
        q = write_hf_dir(tmp_path / f"q{len(list(tmp_path.iterdir()))}", fam_base, config=extra)
        with pytest.raises(CheckpointError, match="the base is a quantized checkpoint"):
            tiesmerge.merge(str(q), [{k: v + 1 for k, v in fam_base.items()}], "task_arithmetic")
    loras = [str(write_lora_dir(tmp_path / f"l{k}", random_lora(fam_base, 2, k), alpha=4)) for k in range(2)]
    with pytest.raises(CheckpointError, match="quantized") as caught:
        tiesmerge.merge(str(q), loras, "task_arithmetic", output=str(tmp_path / "ad"), output_format="adapter")
    assert "unquantized base the adapters were trained from" in caught.value.hint
    adapted = next(n for n in tiesmerge.merge(fam_base, [loras[0]], "task_arithmetic") if n.endswith("proj.weight")
                   and not torch.equal(fam_base[n], tiesmerge.merge(fam_base, [loras[0]], "task_arithmetic")[n]))
    int_base = {**fam_base, adapted: fam_base[adapted].to(torch.int8)}
    ib = write_hf_dir(tmp_path / "ib", int_base)
    # (hp84a c17: a layer's weight stored as integers is refused as quantized before align's own check of it)
    with pytest.raises(CheckpointError, match=f"stores '{adapted}' as int8: a layer's weights stored as integers"):
        tiesmerge.merge(str(ib), loras, "task_arithmetic", output=str(tmp_path / "o"))
    b = write_hf_dir(tmp_path / "b", fam_base, shards=2)
    rc, _, err = run_cli(["merge", b / "model-00001-of-00002.safetensors", "-o", tmp_path / "o"], capsys)
    assert rc == 2 and "a weights file, not a recipe" in err and "iconv" not in err, err
    rc, _, err = run_cli(["merge", b / "model.safetensors.index.json", "-o", tmp_path / "o"], capsys)
    assert rc == 2 and "a sharded model's index" in err, err
    (tmp_path / "report.html").write_text("<html></html>")
    rc, _, err = run_cli(["merge", tmp_path / "report.html", "-o", tmp_path / "o"], capsys)
    assert rc == 2 and "a report or a plot (.html file), not a recipe" in err, err


def test_pass_81_tune_side(classifiers):
    """hp81b c01: run_search with a base state dict holding a meta or sparse tensor or an int key was a
    NotImplementedError / RuntimeError (tune says them); c26: one holding zeros(1).expand(3e9) tried to allocate
    12 GB for its digest; c11: a float8_e4m3fn base tensor in tune was "isfinite not implemented", "a bug"; c27: a
    float8_e4m3fnuz tensor in an in-memory merge was an AttributeError."""
    import torch
    from safetensors.torch import load_file

    import tiesmerge
    from tiesmerge.errors import CheckpointError, IncompatibleCheckpointsError
    from tiesmerge.tuning import run_search

    _, base, fts, _ = classifiers
    state = load_file(str(base / "model.safetensors"))
    name = next(k for k, v in state.items() if v.dim() == 2)
    grid = {"density": [0.2], "lam": [1.0]}
    for odd, said in ((state[name].to("meta"), "on the meta device"), (state[name].to_sparse(), "layout")):
        with pytest.raises(CheckpointError, match=said):
            run_search({**state, name: odd}, [str(m) for m in fts], "ties", lambda sd: 0.5, grid=grid)
    with pytest.raises(IncompatibleCheckpointsError, match="tensor names differ"):
        run_search({**state, "huge": torch.zeros(1).expand(3_000_000_000)}, [str(m) for m in fts], "ties",
                   lambda sd: 0.5, grid=grid)
    result = tiesmerge.tune({**state, name: state[name].to(torch.float8_e4m3fn)}, [str(m) for m in fts], "ties",
                            lambda sd: 0.5, grid=grid)
    assert result.best is not None
    if hasattr(torch, "float8_e4m3fnuz"):
        with pytest.raises(CheckpointError, match="float8_e4m3fnuz, which tiesmerge cannot read"):
            tiesmerge.merge({**state, name: state[name].to(torch.float8_e4m3fnuz)}, [str(m) for m in fts], "ties")


def test_pass_81_tune_side_notes(classifiers, tmp_path):
    """hp81b c36: run_search's start= was not in the log's header, so another start resumed the log silently (two
    searches' candidates in one log); c37: start= under the grid strategy was ignored silently; c30: --json naming
    a search's report stamps was said to be a temporary file; c08: an emptied tokenizer_digest was "its tokenizer
    files changed since"."""
    from tiesmerge.errors import CheckpointError, ConfigError, OutputError
    from tiesmerge.paths import SEARCH_STAMPS, check_output_file
    from tiesmerge.stats.files import StatsManifest
    from tiesmerge.tuning import run_search

    _, base, fts, _ = classifiers
    log = tmp_path / "log.jsonl"
    search = {"strategy": "cmaes", "budget": 6, "axes": ["lam", "density"], "log": log}
    run_search(base, [str(m) for m in fts], "ties", lambda sd: 0.5, start={"lam": 1.0, "density": 0.2}, **search)
    with pytest.raises(ConfigError, match="the log of another search"):
        run_search(base, [str(m) for m in fts], "ties", lambda sd: 0.5, start={"lam": 2.0, "density": 0.2}, **search)
    # c04: cma's own generation size (6 for 2 axes), given explicitly, is the same search
    run_search(base, [str(m) for m in fts], "ties", lambda sd: 0.5, start={"lam": 1.0, "density": 0.2}, popsize=6,
               **search)
    with pytest.raises(ConfigError, match="a starting point is CMA-ES's; the grid strategy has none"):
        run_search(base, [str(m) for m in fts], "ties", lambda sd: 0.5, grid={"lam": [1.0], "density": [0.2]},
                   start={"lam": 1.0})
    with pytest.raises(OutputError, match="a search's record of its report files"):
        check_output_file(tmp_path / SEARCH_STAMPS, True, [], "--json")
    with pytest.raises(CheckpointError, match="'tokenizer_digest' is '', not a sha256 digest"):
        StatsManifest.from_dict({"kind": "fisher", "examples": 3, "tokenizer_digest": ""}, "m.json")


def test_pass_82_merge_side(tmp_path):
    """hp82a c06, c09: della_linear and breadcrumbs with normalized weights summing to 0 divided by 1 silently
    (task_arithmetic and dare_linear say it); c87: with 16 models the warnings summed the weights otherwise than the
    merge (a sequential float32 sum of 0, an exact 56, torch's 48); c95: an adapter_config.json given as a model was
    hinted at a full model's folder."""
    import torch

    import tiesmerge
    from tiesmerge.errors import CheckpointError
    from tiesmerge.methods.ops import float32_sum

    base = {"w": torch.zeros(4)}
    two = [{"w": torch.tensor([1.0, -1.0, 0.5, 0.2])}, {"w": torch.tensor([0.5, -0.5, 1.0, -0.2])}]
    for method in ("della_linear", "breadcrumbs"):
        with pytest.warns(UserWarning, match="weights that sum to 0 .* divides by 1"):
            tiesmerge.merge(base, two, method, weights=[1, -1], normalize_weights=True, density=1.0)
    weights = [1e8] + [4.0] * 14 + [-1e8]
    assert float32_sum(weights) == float(torch.tensor(weights, dtype=torch.float32).sum())
    (tmp_path / "ad").mkdir()
    (tmp_path / "ad" / "adapter_config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="a PEFT adapter's config file") as caught:
        tiesmerge.merge(base, [str(tmp_path / "ad" / "adapter_config.json"), two[0]], "ties")
    assert caught.value.hint == f"give the adapter's folder instead: {tmp_path / 'ad'}"


def test_pass_82_tune_side(classifiers, tmp_path):
    """hp82b c01, c03, c04: run_search with start={} began CMA-ES at the ranges' middles, unrecorded; a start equal
    to the defaults, or a partial one, was recorded as given; c19, c20: in-memory adapt rows with object(), a set or
    an int key beside the text were tracebacks; c24: popsize=2.0 was said to be out of range."""
    import tiesmerge
    from tiesmerge.errors import ConfigError
    from tiesmerge.tuning import run_search

    _, base, fts, data = classifiers
    models = [str(m) for m in fts]
    search = {"strategy": "cmaes", "budget": 6, "axes": ["lam", "density"], "log": tmp_path / "log.jsonl"}
    seen = []
    run_search(base, models, "ties", lambda sd: 0.5, start={}, on_trial=lambda t: seen.append(t.options), **search)
    again = []
    run_search(base, models, "ties", lambda sd: 0.5, on_trial=lambda t: again.append(t.options),
               **{**search, "log": tmp_path / "log2.jsonl"})
    assert seen == again  # {} is the defaults, as no start is
    run_search(base, models, "ties", lambda sd: 0.5, start={"lam": 1.0}, **search)  # the defaults: the same search
    for odd in ({"text": "good", "x": object()}, {"text": "good", 5: 1}, {"text": "good", "s": {1, 2}}):
        with pytest.raises(ConfigError, match="example 1 holds a field that is not JSON data"):
            tiesmerge.adapt(base, fts, [[odd], [{"text": "bad"}]], tasks=["a", "b"], steps=1)
    with pytest.raises(ConfigError, match="a CMA-ES generation's size is a whole number"):
        run_search(base, models, "ties", lambda sd: 0.5, popsize=2.0, **{**search, "log": None})


def test_the_calling_script_is_no_helper_of_the_evaluator(tmp_path, monkeypatch):
    """hp82b c11, c12: the evaluator's code digest took in the script that called run_search (beside my_eval.py), so a
    comment added to it was "its module's source changed"."""
    import importlib
    import sys
    import types

    from tiesmerge.tuning.driver import _evaluator_code

    (tmp_path / "ev_main_probe.py").write_text("def score(state):\n    return 0.5\n")
    (tmp_path / "drive.py").write_text("# the user's script\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module("ev_main_probe")
    script = types.ModuleType("__main__")
    script.__file__ = str(tmp_path / "drive.py")
    monkeypatch.setitem(sys.modules, "__main__", script)
    files = _evaluator_code(module.score)
    assert files and not any(f.endswith("drive.py") for f in files), files


def test_tuning_candidates_carry_no_autograd_graph():
    """hp82b c16: a base state dict whose tensors require grad gave the evaluator candidates with AddBackward0
    graphs attached (merged with gradient tracking on)."""
    import torch

    import tiesmerge

    base = {"w": torch.zeros(4, requires_grad=True)}
    models = [{"w": torch.tensor([1.0, -1.0, 0.5, 0.2])}, {"w": torch.tensor([0.5, -0.5, 1.0, -0.2])}]
    seen = []

    def score(state):
        seen.append(state["w"].requires_grad or state["w"].grad_fn is not None)
        return 0.5

    tiesmerge.tune(base, models, "ties", score, grid={"density": [1.0], "lam": [1.0]})
    assert seen and not any(seen)


def test_pass_82_merge_notes(tmp_path):
    """hp82a c117: a weight of -0.999999999 was printed as -1 in the sum-0 warning; c89: a mergekit entry 'base+' was
    "'' ... is no PEFT adapter"."""
    import torch

    import tiesmerge
    from tiesmerge.errors import ConfigError
    from tiesmerge.recipe_mergekit import translate_mergekit

    base = {"w": torch.zeros(4)}
    two = [{"w": torch.tensor([1.0, -1.0, 0.5, 0.2])}, {"w": torch.tensor([0.5, -0.5, 1.0, -0.2])}]
    with pytest.warns(UserWarning, match=r"\(1, -0.999999999\)"):
        tiesmerge.merge(base, two, "task_arithmetic", weights=[1, -0.999999999], normalize_weights=True)
    (tmp_path / "b").mkdir()
    with pytest.raises(ConfigError, match="names no adapter after"):
        translate_mergekit({"merge_method": "ties", "base_model": str(tmp_path / "b"), "models": [
            {"model": f"{tmp_path / 'b'}+", "parameters": {"weight": 1.0, "density": 0.5}}]})


def test_pass_83_tune_notes(classifiers, tmp_path):
    """hp83b c08: an in-memory adapt row whose label was np.int64(1) was "not JSON data"; c03: a CMA-ES start as the
    log records it (a per-model axis None: its default) given back was "None, not 2 values"."""
    import numpy as np

    import tiesmerge
    from tiesmerge.tuning import run_search

    _, base, fts, _ = classifiers
    result = tiesmerge.adapt(base, fts, [[{"text": "good", "label": np.int64(1)}], [{"text": "bad", "label": 0}]],
                             tasks=["a", "b"], steps=1)
    assert result is not None
    run_search(base, [str(m) for m in fts], "ties", lambda sd: 0.5, strategy="cmaes", budget=6,
               axes=["lam", "densities"], start={"densities": None, "lam": 2.0})


def test_an_evaluator_code_change_names_its_helpers_too():
    """hp83b c11: an edit to a helper module the evaluator imports was said as "its module's source changed"."""
    from tiesmerge.tuning.results_log import _header_difference

    said = _header_difference("evaluator_code", ["a"], ["b"])
    assert "or a helper module's it imports from its folder" in said
