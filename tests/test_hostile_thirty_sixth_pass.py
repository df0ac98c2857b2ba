"""Hostile pass 36 (issue 13)."""

from __future__ import annotations

import pytest
import torch

from helpers_ckpt import run_cli, write_hf_dir


def test_analyzes_summary_prints_a_tensor_name_on_one_line(tmp_path, capsys):
    """hp36 C05: a tensor named "w\\nerror: fake.weight" forged a line of its own in analyze's plain-language summary
    on stdout (errors escaped the newline; the summary printed it raw)."""
    pytest.importorskip("matplotlib")
    g = torch.Generator().manual_seed(0)
    name = "w\nerror: fake.weight"
    base = {name: torch.randn(64, 64, generator=g)}
    models = [{name: base[name] + torch.randn(64, 64, generator=g)} for _ in range(2)]
    b = write_hf_dir(tmp_path / "base", base)
    ms = [write_hf_dir(tmp_path / f"m{k}", m) for k, m in enumerate(models)]
    rc, out, err = run_cli(["analyze", "--base", b, "--model", ms[0], "--model", ms[1], "-o", tmp_path / "rep",
                            "--no-progress"], capsys)
    assert rc == 0, err
    assert "w\\nerror: fake.weight" in out
    assert not any(line.startswith("error:") for line in out.splitlines()), out


def test_a_tokenizer_that_yields_no_tokens_is_named_not_the_config():
    """hp36 C20: a model whose tokenizer turned every text into no tokens (AutoTokenizer picked a class that did not
    match its files) failed in the forward ("cannot reshape tensor of 0 elements"), blamed on its config.json."""
    from tiesmerge.errors import CheckpointError
    from tiesmerge.evaluation.loading import encode

    class Empty:
        def __call__(self, texts, pairs=None, **kwargs):
            return {"input_ids": torch.zeros(len(texts), 0, dtype=torch.long),
                    "attention_mask": torch.zeros(len(texts), 0, dtype=torch.long)}

    with pytest.raises(CheckpointError, match=r"m: its tokenizer \(Empty\) turns the texts into no tokens"):
        encode(Empty(), ["good film"], max_length=16, directory="m")


def test_stats_gram_says_which_layers_it_cannot_collect(tmp_path, capsys):
    """hp36 C21: stats gram on a GPT-2 classifier collected 1 tensor (the head) without a word: its attention and MLP
    are transformers' Conv1D, not nn.Linear, and RegMean then silently averaged them."""
    import json

    import transformers

    from helpers_models import CLASSIFIER_WORDS, TEXTS, save_word_tokenizer

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=len(CLASSIFIER_WORDS), n_embd=16, n_layer=1, n_head=2, n_positions=32,
                                  num_labels=2, pad_token_id=0)
    transformers.GPT2ForSequenceClassification(cfg).save_pretrained(tmp_path / "g")
    save_word_tokenizer(tmp_path / "g")
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t, _ in TEXTS))
    rc, _, err = run_cli(["stats", "gram", "--model", tmp_path / "g", "--data", data, "-o", tmp_path / "st"], capsys)
    assert rc == 0, err
    assert "layer(s) of" in err and "are transformers' Conv1D" in err and "RegMean averages their weights" in err


@pytest.mark.parametrize("with_base", [True, False])
def test_mergekit_linear_of_lora_entries_says_what_it_cannot_do(tmp_path, capsys, with_base):
    """hp36 C18: a mergekit linear recipe of `llama+lora1`, `llama+lora2` with base_model llama was refused as "the
    base is a PEFT lora adapter … --base takes the full model" (no --base was given); without base_model, as "a LoRA
    on a model other than base_model" (there was none)."""
    import yaml

    from helpers_adapters import random_lora, write_lora_dir
    from helpers_ckpt import make_base

    base = make_base()
    b = write_hf_dir(tmp_path / "llama", base)
    loras = [write_lora_dir(tmp_path / f"lora{k}", random_lora(base, 2, k), alpha=4.0) for k in range(2)]
    recipe = {"merge_method": "linear", "models": [{"model": f"{b}+{lora}", "parameters": {"weight": 0.5}}
                                                   for lora in loras]}
    if with_base:
        recipe["base_model"] = str(b)
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    rc, _, err = run_cli(["validate", tmp_path / "r.yaml"], capsys)
    assert rc == 2, err
    if with_base:
        assert "linear: " in err and "is a PEFT adapter" in err and "task_arithmetic" in err
    else:
        assert "applies an adapter, and the recipe has no base_model" in err and f"add base_model: {b}" in err
    assert "--base takes" not in err


@pytest.mark.parametrize("budget", [-1, -5, 0])
def test_a_budget_below_one_is_a_usage_error_for_every_strategy(budget):
    """hp36 C38: search --budget -1 on the grid scored the grid less its last point (a Python negative slice), and
    wrote the best merge; C39: --budget 0 said "no candidate got a finite score", blaming the evaluator."""
    from tiesmerge.errors import ConfigError
    from tiesmerge.methods import Ties
    from tiesmerge.tuning.space import build_space
    from tiesmerge.tuning.strategies import make_strategy

    space = build_space(Ties, 2, axes=("lam",))
    for strategy in ("grid", "random", "cmaes"):
        with pytest.raises(ConfigError, match=f"--budget {budget}: the number of candidates to score is a whole"):
            make_strategy(strategy, space, budget=budget)


def test_the_demo_names_a_file_it_cannot_write(tmp_path, monkeypatch):
    """hp36 C33: `demo --synthetic` under `ulimit -f` failed as "unexpected SafetensorError: … File too large (os
    error 27) … a bug in tiesmerge". The file and what ran out are named, and the part written is removed."""
    from safetensors import SafetensorError

    from tiesmerge.cli import demo
    from tiesmerge.errors import OutputError

    def too_large(tensors, filename, metadata=None):
        open(filename, "wb").write(b"partial")
        raise SafetensorError("Error while serializing: I/O error: File too large (os error 27)")

    monkeypatch.setattr(demo, "save_file", too_large)
    with pytest.raises(OutputError, match=r"model-00001-of-00002.safetensors: cannot write it: .*File too large"):
        demo._save_hf(tmp_path / "base", {"w": torch.zeros(2, 2), "v": torch.zeros(2)}, {})
    assert not (tmp_path / "base" / "model-00001-of-00002.safetensors").exists()


def test_the_model_cards_recipe_runs_again_as_the_card_says(tmp_path, capsys):
    """hp36 C46: an --output-format adapter merge's card held shard_size, which a recipe for an adapter refuses, so
    "Re-run with tiesmerge merge recipe.yaml" failed; C45: an adapt output's card said the same of a recipe whose
    method (adamerging) no recipe runs."""
    import re

    from helpers_adapters import random_lora, write_lora_dir
    from helpers_ckpt import make_base
    from tiesmerge.io.card import model_card

    base = make_base()
    b = write_hf_dir(tmp_path / "base", base)
    loras = [write_lora_dir(tmp_path / f"lora{k}", random_lora(base, 2, k), alpha=4.0) for k in range(2)]
    rc, _, err = run_cli(["merge", "--base", b, "--model", loras[0], "--model", loras[1], "--method",
                          "task_arithmetic", "--output-format", "adapter", "--rank", "4", "-o", tmp_path / "ad"],
                         capsys)
    assert rc == 0, err
    card = (tmp_path / "ad" / "README.md").read_text()
    recipe = re.search(r"```+yaml\n(.*?)\n```", card, re.S).group(1)
    assert "shard_size" not in recipe and "output_format: adapter" in recipe
    assert "library_name: peft" in card and "# Merged LoRA adapter" in card  # hp36 C57: listed as transformers
    (tmp_path / "recipe.yaml").write_text(recipe)
    rc, _, err = run_cli(["merge", tmp_path / "recipe.yaml", "-o", tmp_path / "again"], capsys)
    assert rc == 0, err
    learned = model_card(base_label="b", model_labels=["a"], recipe_yaml="method: adamerging\n",
                         method_name="adamerging", paper="p", summary="s", version="v")
    assert "Learned by `tiesmerge adapt`" in learned and "tiesmerge merge recipe.yaml" not in learned


def test_ranges_with_the_grid_strategy_are_refused_not_ignored():
    """hp36 C42: search --strategy grid --range lam=5:6 scored the default grid (lam 0.8, 0.9, ...) without a word,
    and its log recorded the range beside values outside it."""
    from helpers_ckpt import make_family
    from tiesmerge.errors import ConfigError
    from tiesmerge.tuning import run_search

    base, models = make_family(2)
    with pytest.raises(ConfigError, match="--range lam: ranges are where the random and cmaes strategies draw"):
        run_search(base, models, "ties", lambda state: 0.0, strategy="grid", ranges={"lam": (5.0, 6.0)})


def test_a_choice_accuracy_row_given_to_adapt_says_which_field_to_rename(tmp_path):
    """hp36 C51: adapt --forward choice on choice-accuracy's file ({"prompt", "choices", "label"}) said "each line
    must be an object with a string 'text'" with a classifier row as the example."""
    import json

    from tiesmerge.errors import ConfigError
    from tiesmerge.stats.hf import read_jsonl

    data = tmp_path / "c.jsonl"
    data.write_text(json.dumps({"prompt": "Is it spam? ", "choices": ["yes", "no"], "label": 1}) + "\n")
    with pytest.raises(ConfigError, match="a 'prompt' line .*these rows name the prompt 'text'") as caught:
        read_jsonl(data, empty_texts=True)
    assert '"choices"' in caught.value.hint


def test_a_single_grid_value_pins_a_fraction_axis_of_a_random_search_as_it_pins_lam():
    """hp36 C41: search --strategy random --grid density=0.3 drew density from [0.05, 1] without a word, while
    --grid lam=2 held lam at 2."""
    from tiesmerge.methods import Ties
    from tiesmerge.tuning.space import build_space

    space = build_space(Ties, 2, axes=("density", "lam"), grid={"density": (0.3,), "lam": (2.0,)})
    axes = {a.name: a for a in space.axes}
    assert (axes["density"].low, axes["density"].high) == (0.3, 0.3)
    assert (axes["lam"].low, axes["lam"].high) == (2.0, 2.0)
