"""Issue 13, the nineteenth independent hostile pass (hp19): its notes, one case each. Its two defects have their
tests beside the code they fixed: F1 (a search whose weights with base_weight cancel inside the box) in
test_tuning_space.py, F2 (a resumed checkpoint's adam.step) in test_adapt_hostile.py."""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import tiesmerge
from helpers_ckpt import run_cli, write_family_dirs, write_hf_dir
from tiesmerge.errors import MergeWarning
from tiesmerge.methods import Average, ModelStock
from tiesmerge.sizes import parse_size


@pytest.fixture
def family(tmp_path):
    return write_family_dirs(tmp_path)


def test_an_average_whose_normalised_weights_reach_far_past_the_models_warns(family, tmp_path):
    """N1: weights with base_weight summing to 0.0019 (each normalised weight ~529, under the 1000 refusal) merged
    silently: a 200x extrapolation reported as an average."""
    b, ms = family
    with pytest.warns(MergeWarning, match=r"sum to 0\.001891, so normalised by their sum they reach ±529"):
        tiesmerge.merge(str(b), [str(m) for m in ms], Average(weights=(0.871664, 0.130227), base_weight=-1.0),
                        output=str(tmp_path / "far"))
    with pytest.warns(MergeWarning, match=r"the weights \(1, -0\.95\) sum to 0\.05"):
        Average(weights=(1.0, -0.95)).requirements()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Average(weights=(1.5, -0.5)).requirements()  # a mild extrapolation (task negation): no word
        Average(weights=(0.3, 0.7), base_weight=0.5).requirements()


def test_a_checkpoint_at_a_hard_link_of_an_input_says_hard_link(tmp_path, family, capsys):
    """N2: refused rightly, but the reason given was "reached through another mount of the same folder"."""
    from tiesmerge.errors import OutputError
    from tiesmerge.paths import check_output_file

    data = tmp_path / "t.jsonl"
    data.write_text('{"text": "a"}\n')
    link = tmp_path / "ck.safetensors"
    os.link(data, link)
    with pytest.raises(OutputError, match=r"is data file 0 \(.*t\.jsonl\), a hard link to the same file"):
        check_output_file(link, False, [("data file 0", str(data))], "the checkpoint")


def test_model_stock_says_nearly_orthogonal_and_exactly_opposite(tmp_path):
    """N4: task vectors at a slightly negative cosine were called "nearly opposite"; exactly opposite ones (t
    undefined, the base kept, as mergekit) were silent."""
    torch.manual_seed(0)
    base = {"w.weight": torch.zeros(64, 64), "one.weight": torch.tensor([1.0])}
    a = torch.randn(64, 64)
    b = -0.05 * a + torch.randn(64, 64)  # a cosine a little below 0
    fts = [{"w.weight": a, "one.weight": torch.tensor([1.1])}, {"w.weight": b, "one.weight": torch.tensor([0.8])}]
    dirs = [write_hf_dir(tmp_path / n, s) for n, s in [("base", base), ("a", fts[0]), ("b", fts[1])]]
    for kernels in ("1", "0"):
        os.environ["TIESMERGE_KERNELS"] = kernels
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                out = tiesmerge.merge(str(dirs[0]), [str(d) for d in dirs[1:]], ModelStock(),
                                      output=str(tmp_path / f"o{kernels}"))
        finally:
            del os.environ["TIESMERGE_KERNELS"]
        text = [str(w.message) for w in caught]
        assert any("'w.weight'" in m and "are nearly orthogonal, at a slightly negative mean cosine" in m
                   for m in text), text
        assert any("'one.weight'" in m and "point exactly opposite ways" in m for m in text), text
        assert float(load_file(str(Path(out) / "model.safetensors"))["one.weight"]) == 1.0  # the base, as mergekit


def test_a_recipe_weight_past_float32_is_named_by_its_recipe_key(tmp_path, family, capsys):
    """N6: mergekit linear without base_model, weights 1e308: the first was reported as `base_weight`, an option of
    the translation the recipe does not have."""
    b, ms = family
    recipe = tmp_path / "lin.yml"
    recipe.write_text(f"merge_method: linear\nmodels:\n  - model: {b}\n    parameters: {{weight: 1e308}}\n"
                      f"  - model: {ms[0]}\n    parameters: {{weight: 1e308}}\n")
    rc, out, err = run_cli(["merge", str(recipe), "-o", str(tmp_path / "out")], capsys)
    assert rc == 2 and "models[0].parameters.weight: 1e+308 is past float32's range" in err, err
    assert "base_weight" not in err and not (tmp_path / "out").exists()


def test_sizes_in_petabytes_and_an_unknown_unit():
    """N7: `--shard-size 99999999PB` was "not a size": PB was no unit; an unknown unit is now named."""
    assert parse_size("2PB") == 2 * 1000**5 and parse_size("1PiB") == 1 << 50
    with pytest.raises(ValueError, match=re.escape("unknown unit 'xb'")):
        parse_size("2xb")


def test_float64_tensors_merged_in_float32_are_said_to_carry_float32_precision(tmp_path):
    """N5: a float64 tensor (1.0 base, 1.1 and 0.8 fine-tunes) was written as 0.9500000476837158 without a word."""
    base = {"d64.weight": torch.tensor([1.0], dtype=torch.float64), "w.weight": torch.zeros(4)}
    fts = [{"d64.weight": torch.tensor([v], dtype=torch.float64), "w.weight": torch.full((4,), v)} for v in (1.1, 0.8)]
    dirs = [write_hf_dir(tmp_path / n, s) for n, s in [("base", base), ("a", fts[0]), ("b", fts[1])]]
    with pytest.warns(MergeWarning, match=r"1 merged tensor\(s\) are stored as float64 \('d64.weight'\)"):
        tiesmerge.merge(str(dirs[0]), [str(d) for d in dirs[1:]], Average(), output=str(tmp_path / "o"))
    with warnings.catch_warnings():  # written as float32: what was computed, nothing to say
        warnings.simplefilter("error")
        tiesmerge.merge(str(dirs[0]), [str(d) for d in dirs[1:]], Average(), output=str(tmp_path / "o32"),
                        dtype="float32")
