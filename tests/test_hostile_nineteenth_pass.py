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
from helpers_ckpt import copy_model_dir, run_cli, write_family_dirs, write_hf_dir
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


def test_a_copy_of_the_base_under_a_mean_is_said_to_dilute_not_to_add_nothing(family, tmp_path):
    """F3: under average, a byte copy of the base was said to "add nothing" while it halves the other model's change;
    N11: a copy saved again (other bytes, the same values) was not warned at all."""
    from safetensors.torch import save_file

    b, ms = family
    copy = copy_model_dir(b, tmp_path / "copy")
    with pytest.warns(MergeWarning, match=r"byte for byte: a zero task vector, which average still counts among the "
                                          r"models \(in a mean over them it dilutes"):
        tiesmerge.merge(str(b), [str(copy), str(ms[0])], Average(), output=str(tmp_path / "avg"))
    with pytest.warns(MergeWarning, match=r"byte for byte: a zero task vector, which adds nothing to the merge"):
        tiesmerge.merge(str(b), [str(copy), str(ms[0])], "task_arithmetic", output=str(tmp_path / "ta"))
    resaved = tmp_path / "resaved"
    resaved.mkdir()
    for f in b.iterdir():
        if f.name != "model.safetensors":
            (resaved / f.name).write_bytes(f.read_bytes())
    save_file({k: v.clone() for k, v in load_file(str(b / "model.safetensors")).items()},
              str(resaved / "model.safetensors"), metadata={"saved": "again"})
    with pytest.warns(MergeWarning, match=r"equal the base on every row the distance check sampled \(a copy of the "
                                          r"base saved again\?\): a zero task vector, which average still counts"):
        tiesmerge.merge(str(b), [str(resaved), str(ms[0])], Average(), output=str(tmp_path / "avg2"))


@pytest.mark.parametrize("name", ["tokenizer.json", "generation_config.json"])
def test_a_truncated_or_still_written_side_file_is_refused_before_the_merge(family, tmp_path, capsys, name):
    """F4: a truncated tokenizer.json / generation_config.json (a download cut short, or still being written) was
    copied into an output that looked complete, exit status 0."""
    b, ms = family
    base = copy_model_dir(b, tmp_path / "b2")
    (base / name).write_text('{"version": "1.0", "added_tokens": [{"id": 0, "cont')
    rc, out, err = run_cli(["merge", "--base", base, "--model", ms[0], "--model", ms[1], "-o", tmp_path / "o"], capsys)
    assert rc != 0 and f"the base's {name} is damaged or incomplete" in err and "hint: restore" in err, err
    assert not (tmp_path / "o").exists()
    (base / name).write_text("{}")
    with open(base / name, "a"):  # another writer holds it open (this process counts: the lease is refused alike)
        rc, out, err = run_cli(["merge", "--base", base, "--model", ms[0], "--model", ms[1], "-o", tmp_path / "o"],
                               capsys)
    if "open for writing" not in err:
        pytest.skip("no read leases here (file system or kernel)")
    assert rc != 0 and not (tmp_path / "o").exists(), err


def test_data_rows_still_being_written_are_refused(tmp_path):
    """N12: adapt and stats learned from a data file another process was still appending to."""
    from tiesmerge.errors import ConfigError
    from tiesmerge.limits import read_json_lines

    data = tmp_path / "rows.jsonl"
    data.write_text('{"text": "a", "label": 0}\n')
    assert len(read_json_lines(data, "the data file", max_bytes=1 << 20, error=ConfigError)) == 1
    with open(data, "a"):
        try:
            read_json_lines(data, "the data file", max_bytes=1 << 20, error=ConfigError)
        except ConfigError as exc:
            assert "another process has this file open for writing" in str(exc)
        else:
            pytest.skip("no read leases here (file system or kernel)")


def test_search_refusals_that_no_range_can_fix_say_so():
    """F5: nuslerp with t fixed and weights searched ("give t or weights, not both") advised "narrow --range weights";
    F6: a search over slerp's t under a t_by_name with a '*' rule scored one merge again and again."""
    from tiesmerge.errors import ConfigError
    from tiesmerge.tuning.space import build_space

    with pytest.raises(ConfigError, match=r"searching weights with t=0\.5 fixed is refused whatever its values "
                                          r"\(nuslerp: give t or weights, not both\): drop the --set") as err:
        build_space("nuslerp", 2, axes=["weights"], ranges={"weights": (0.1, 1.0)}, fixed={"t": 0.5})
    assert "narrow --range" not in str(err.value)
    with pytest.raises(ConfigError, match=r"searching t changes nothing: t_by_name's '\*' rule sets every tensor's t"):
        build_space("slerp", 2, axes=["t"], fixed={"t_by_name": "*=0.5"})
    assert build_space("slerp", 2, axes=["t"], fixed={"t_by_name": "mlp=0.5"}).axes[0].name == "t"


def test_slerp_says_t_is_unused_where_t_by_name_sets_every_tensor():
    """F6: `--t 0.9 --t-by-name '*=0.1'` wrote the t = 0.1 merge without a word."""
    from tiesmerge.methods import Slerp
    from tiesmerge.methods.base import warn_unused

    names = ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.up_proj.weight"]
    with pytest.warns(MergeWarning, match=r"slerp: t = 0\.9 is not used: t_by_name's '\*' rule sets every tensor's t"):
        warn_unused(Slerp(t=0.9, t_by_name="*=0.1"))
    with pytest.warns(MergeWarning, match=r"t = 0\.9 is not used: t_by_name's filters match every tensor"):
        Slerp(t=0.9, t_by_name="self_attn=0.1;mlp=0.2").check_tensors(dict.fromkeys(names, (2, 2)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Slerp(t=0.9, t_by_name="self_attn=0.1").check_tensors(dict.fromkeys(names, (2, 2)))  # the mlp tensor takes t
        Slerp(t_by_name="*=0.1").check_tensors(dict.fromkeys(names, (2, 2)))  # t left at its default: nothing to say


def test_a_foreign_file_at_the_cache_path_is_left_as_it_is(family, tmp_path, monkeypatch):
    """N9: TIESMERGE_CACHE_DIR naming a folder of the user's replaced its digests.json / numerics.json."""
    b, ms = family
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "digests.json").write_text('["my", "precious", "list"]')
    (victim / "numerics.json").write_text("my notes")
    monkeypatch.setenv("TIESMERGE_CACHE_DIR", str(victim))
    with pytest.warns(MergeWarning, match=r"digests.json is not a cache file tiesmerge wrote"):
        tiesmerge.merge(str(b), [str(m) for m in ms], "slerp", output=str(tmp_path / "o"))
    assert (victim / "digests.json").read_text() == '["my", "precious", "list"]'
    assert (victim / "numerics.json").read_text() == "my notes"


def test_adapt_no_progress_silences_the_libraries_bars_too(classifiers, tmp_path, capsys):
    """N10: `adapt --no-progress` still printed transformers' "Loading weights" bars."""
    root, base, fts, data = classifiers
    files = [tmp_path / f"task{k}.jsonl" for k in range(2)]
    for f in files:
        f.write_text(data.read_text())
    before = os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS")
    rc, out, err = run_cli(["adapt", "--base", base, *sum((["--model", f] for f in fts), []),
                            *sum((["--data", f] for f in files), []), "--steps", "1", "--batch-size", "2",
                            "--no-progress", "-o", tmp_path / "out"], capsys)
    assert rc == 0, err
    assert "Loading weights" not in err and "it/s]" not in err, err
    assert os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS") == before  # set back for the rest of the process


def test_analysis_json_is_strict_json_where_a_model_keeps_nothing(family, tmp_path):
    """N13: `analyze --density 1e-300` wrote "thresholds": [Infinity, ...], which strict JSON readers refuse."""
    import json

    b, ms = family
    tiesmerge.analyze(str(b), [str(m) for m in ms], output=str(tmp_path / "a"), density=1e-300)
    text = (tmp_path / "a" / "analysis.json").read_text()
    data = json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in analysis.json"))
    assert data["thresholds"] == [None] * len(ms)
    assert "keeps nothing" in (tmp_path / "a" / "report.html").read_text()


@pytest.mark.parametrize("method, options, unused, said", [
    ("ties", {"density": 0.5, "densities": (0.2, 0.3)}, "density", "ties: density = 0.5 is not used: densities sets"),
    ("consensus", {"tall_lambda": 0.3, "tall_lambdas": (0.5, 0.6)}, "tall_lambda",
     "consensus: tall_lambda = 0.3 is not used"),
    ("breadcrumbs", {"density": 1.0, "gamma": 0.5}, "gamma", "breadcrumbs: gamma = 0.5 is not used: density 1 keeps"),
])
def test_an_option_another_one_overrides_is_said_unused(family, tmp_path, method, options, unused, said):
    """hp20 F6: `ties --density 0.5 --densities 0.2 0.3` (and consensus' tall_lambda beside tall_lambdas) dropped the
    first silently; a search over it scored one merge again and again."""
    from tiesmerge.errors import ConfigError
    from tiesmerge.registry import make_method
    from tiesmerge.tuning.space import build_space

    b, ms = family
    with pytest.warns(MergeWarning, match=re.escape(said)):
        tiesmerge.merge(str(b), [str(m) for m in ms], make_method(method, options), output=str(tmp_path / "o"))
    with pytest.raises(ConfigError, match=f"searching {unused} changes nothing"):
        build_space(method, 2, axes=[unused], grid={unused: (0.1, 0.3, 0.5)},
                    fixed={k: v for k, v in options.items() if k != unused})


def test_json_lines_split_at_newlines_only(tmp_path):
    """hp20 F1: a row whose text holds U+2028, U+0085 or a form feed (json.dumps(..., ensure_ascii=False) leaves them
    as they are) was split there by str.splitlines and refused as damaged JSON."""
    import json

    from tiesmerge.errors import ConfigError
    from tiesmerge.limits import read_json_lines

    texts = ["a\u2028b", "c\u0085d", "e\x0cf", "g\u2029h"]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"text": t, "label": 0}, ensure_ascii=False) + "\r\n" for t in texts),
                    encoding="utf-8")
    rows = read_json_lines(data, "the data file", max_bytes=1 << 20, error=ConfigError)
    assert [r["text"] for _, r in rows] == texts and [n for n, _ in rows] == [1, 2, 3, 4]


def test_adapt_no_progress_under_warnings_as_errors_ends_cleanly(classifiers, tmp_path, capsys):
    """hp20 F2: setting transformers' bars back at the end warned (huggingface_hub's "Cannot enable progress bars"):
    under PYTHONWARNINGS=error the complete output was followed by exit status 1."""
    import transformers.utils.logging as hf_logging

    root, base, fts, data = classifiers
    files = [tmp_path / f"task{k}.jsonl" for k in range(2)]
    for f in files:
        f.write_text(data.read_text())
    hf_logging.enable_progress_bar()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rc, out, err = run_cli(["adapt", "--base", base, *sum((["--model", f] for f in fts), []),
                                *sum((["--data", f] for f in files), []), "--steps", "1", "--batch-size", "2",
                                "--no-progress", "-o", tmp_path / "out"], capsys)
    assert rc == 0 and "warning" not in err.lower(), err
    assert hf_logging.is_progress_bar_enabled()  # set back as it was
