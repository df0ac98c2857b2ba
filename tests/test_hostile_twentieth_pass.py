"""Issue 13, the twentieth independent hostile pass (hp20): its findings, one case each (its first ones, F1-F4 and
part of F6, are tested in test_hostile_nineteenth_pass.py, test_adapt_hostile.py and test_tuning_space.py)."""

from __future__ import annotations

import re
import warnings

import pytest
import torch

import tiesmerge
from helpers_ckpt import copy_model_dir, write_family_dirs, write_hf_dir
from tiesmerge.errors import ConfigError, MergeWarning
from tiesmerge.methods import Fisher, ModelStock, Ties


@pytest.fixture
def family(tmp_path):
    return write_family_dirs(tmp_path)


class _Chunk:
    def __init__(self, statistics):
        self.statistics = statistics


def test_fisher_values_whose_sum_overflows_float32_still_weight_the_models():
    """F5: Fisher values of ~3e38 (finite) overflowed F_1 + F_2: every weight became 0 and the merge the base."""
    tau = torch.tensor([[1.0, 2.0, 3.0], [3.0, 4.0, 5.0]])
    huge = Fisher().merge(tau.clone(), _Chunk(torch.full((2, 3), 3e38)))
    assert torch.equal(huge, torch.tensor([2.0, 3.0, 4.0]))  # equal weights: the mean
    lopsided = Fisher().merge(tau.clone(), _Chunk(torch.tensor([[3e38] * 3, [1e38] * 3])))
    assert torch.allclose(lopsided, 0.75 * tau[0] + 0.25 * tau[1])
    small = tau / 100  # hp63b c03: F_t tau_t finite while sum F overflows: x / inf = 0 (the base) passed the check
    assert torch.allclose(Fisher().merge(small.clone(), _Chunk(torch.full((2, 3), 3e38))), small.mean(dim=0))
    plain = Fisher().merge(tau.clone(), _Chunk(torch.tensor([[1.0] * 3, [3.0] * 3])))
    assert torch.equal(plain, (tau[0] + 3 * tau[1]) / 4)  # the ordinary path, unchanged


def test_ties_elect_and_zero_sign_are_said_unused_under_sign_from(family, tmp_path):
    """F6: `--sign-from M --elect count` (or --zero-sign majority) changed nothing, silently."""
    from tiesmerge.methods.base import warn_unused

    b, ms = family
    with pytest.warns(MergeWarning, match=r"ties: elect = 'count' is not used: sign_from gives the sign"):
        warn_unused(Ties(sign_from=str(ms[0]), elect="count"))
    with pytest.warns(MergeWarning, match=r"ties: zero_sign = 'majority' is not used"):
        warn_unused(Ties(sign_from=str(ms[0]), zero_sign="majority"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_unused(Ties(sign_from=str(ms[0])))
        warn_unused(Ties(elect="count"))


def test_the_default_grid_of_a_count_fits_the_models_merged():
    """F7: `tune --method consensus` with two models was refused by consensus' own grid (k = 1, 2, 3)."""
    from tiesmerge.tuning.space import build_space

    assert build_space("consensus", 2, axes=["k"]).axes[0].values == (1, 2)
    assert build_space("consensus", 3, axes=["k"]).axes[0].values == (1, 2, 3)
    with pytest.raises(ConfigError, match="k=3 counts tasks"):  # given: refused up front (hp29 N11), not cut
        build_space("consensus", 2, axes=["k"], grid={"k": (1, 3)})


def test_model_stock_filter_wise_counts_the_rows_that_extrapolate(tmp_path):
    """F8: under filter_wise one row's t (cosine -0.49) was reported as the tensor's "mean cosine", for nearly every
    tensor."""
    torch.manual_seed(0)
    base = {"w.weight": torch.zeros(32, 16)}
    fts = [{"w.weight": torch.randn(32, 16)}, {"w.weight": torch.randn(32, 16)}]
    dirs = [write_hf_dir(tmp_path / n, s) for n, s in [("base", base), ("a", fts[0]), ("b", fts[1])]]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tiesmerge.merge(str(dirs[0]), [str(d) for d in dirs[1:]], ModelStock(filter_wise=True),
                        output=str(tmp_path / "o"))
    text = [str(w.message) for w in caught if "model_stock" in str(w.message)]
    assert len(text) == 1 and "model_stock (filter_wise): some rows get t outside [0, 1]" in text[0], text
    assert "nearly opposite" not in text[0]
    # hp21 N1: one message for the whole merge, whichever tensors have such rows (the command line prints it once)
    base = {f"w{i}.weight": torch.zeros(32, 16) for i in range(3)}
    fts = [{n: torch.randn(32, 16) for n in base}, {n: torch.randn(32, 16) for n in base}]
    dirs = [write_hf_dir(tmp_path / f"{n}3", s) for n, s in [("base", base), ("a", fts[0]), ("b", fts[1])]]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tiesmerge.merge(str(dirs[0]), [str(d) for d in dirs[1:]], ModelStock(filter_wise=True),
                        output=str(tmp_path / "o3"))
    assert len({str(w.message) for w in caught if "model_stock" in str(w.message)}) == 1


def test_a_side_json_file_that_is_not_an_object_is_refused(family, tmp_path):
    """N2: a tokenizer_config.json holding `null` (valid JSON) was copied; transformers cannot load it."""
    from tiesmerge.errors import CheckpointError

    b, ms = family
    base = copy_model_dir(b, tmp_path / "b2")
    (base / "tokenizer_config.json").write_text("null")
    with pytest.raises(CheckpointError, match=r"not an object .*tokenizer_config.json is damaged or incomplete"):
        tiesmerge.merge(str(base), [str(m) for m in ms], "ties", output=str(tmp_path / "o"))
    assert not (tmp_path / "o").exists()


def test_slerp_layers_without_a_gradient_is_said_unused():
    """N6: `slerp --t 0.3 --layers 5` (no gradient to spread) passed silently."""
    from tiesmerge.methods import Slerp
    from tiesmerge.methods.base import warn_unused

    with pytest.warns(MergeWarning, match=r"slerp: layers = 5 is not used: layers spreads a gradient"):
        warn_unused(Slerp(t=0.3, layers=5))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_unused(Slerp(t_by_name="self_attn=0,1;*=0.5", layers=5))


def test_a_limited_read_of_data_rows_stops_at_the_limit(tmp_path, monkeypatch):
    """N1: `stats --limit 2` read, decoded and split a 592 MB file whole (3 GB peak) for its first two rows."""
    from tiesmerge import limits
    from tiesmerge.errors import ConfigError

    data = tmp_path / "rows.jsonl"
    data.write_text('{"text": "a"}\n\n{"text": "b"}\n' + '{"text": "c"}\n' * 100_000 + "not json\n")
    read = []
    real = limits._first_lines

    def counting(f, rows, max_bytes):
        out = real(f, rows, max_bytes)
        read.append(len(out))
        return out

    monkeypatch.setattr(limits, "_first_lines", counting)
    rows = limits.read_json_lines(data, "the data file", max_bytes=1 << 30, error=ConfigError, limit=2)
    assert [(n, r["text"]) for n, r in rows] == [(1, "a"), (3, "b")] and read == [29]
    with pytest.raises(ConfigError, match="not valid JSON"):  # unlimited: the whole file, its broken last line too
        limits.read_json_lines(data, "the data file", max_bytes=1 << 30, error=ConfigError)


def test_tune_fits_the_paper_grid_of_a_count_to_the_models_merged(family):
    """hp21 F2 (pass 20 F7 again, by `tune`): consensus' k grid 1, 2, 3 refused the commonest case, two models."""
    from tiesmerge.errors import ConfigError

    b, ms = family
    result = tiesmerge.tune(str(b), [str(m) for m in ms], "consensus", lambda sd: 0.0,
                            grid={"k": (1, 2, 3), "tall_lambda": (0.4,), "lam": (0.4,)})
    assert sorted({p.options["k"] for p in result.points}) == [1, 2]
    with pytest.raises(ConfigError, match="k=3 counts tasks"):  # a grid of the user's own is refused as given
        tiesmerge.tune(str(b), [str(m) for m in ms], "consensus", lambda sd: 0.0,
                       grid={"k": (1, 3), "lam": (0.4,)})


@pytest.mark.parametrize("tiny", [1e-45, 1e-40])
def test_fisher_rms_normalisation_of_subnormal_statistics(tiny):
    """hp21 F1: Fisher values of 1e-45 / 1e-40 (subnormal, finite, nonzero) under normalize=rms: 1/rms (~1e45) is Inf
    in float32, and the scaled statistics were not finite."""
    from helpers_ckpt import make_family
    from helpers_merge import fisher_stats, float_names, merge

    base, models = make_family(2)
    names = float_names(base)
    stats = [fisher_stats({n: torch.full(base[n].shape, tiny * (k + 1)) for n in names}) for k in range(2)]
    merged = merge(base, models, Fisher(normalize="rms"), stats)
    for n in names:  # each model's statistics are constant: after the rms scaling both weigh 1, the mean
        torch.testing.assert_close(merged[n], (models[0][n] + models[1][n]) / 2, rtol=1e-5, atol=1e-6)


def test_a_checkpoint_at_a_symbolic_link_to_an_input_says_link(tmp_path):
    """hp21 N7: a symbolic link to a data file, named as the checkpoint, was called "a hard link to the same file"."""
    import os

    from tiesmerge.errors import OutputError
    from tiesmerge.paths import check_output_file

    data = tmp_path / "t.jsonl"
    data.write_text('{"text": "a"}\n')
    link = tmp_path / "ck.safetensors"
    os.symlink(data, link)
    with pytest.raises(OutputError, match=r"is data file 0 \(.*t\.jsonl\)(, reached through a link)?; writing") as err:
        check_output_file(link, True, [("data file 0", str(data))], "the checkpoint")
    assert "hard link" not in str(err.value)


def test_notes_of_the_twenty_first_pass(family, tmp_path):
    """hp21 N6: a search over slerp's layers (no t_by_name, nothing --set) was told to "drop that --set"; N8: a copy of
    the base under model_stock makes the merge the base, said only as "pulls the merge toward the base"."""
    from tiesmerge.errors import ConfigError
    from tiesmerge.tuning.space import build_space

    with pytest.raises(ConfigError, match=r"search another option \(or --set what makes it count\)") as err:
        build_space("slerp", 2, axes=["layers"], grid={"layers": (2, 3)})
    assert "drop that --set" not in str(err.value)
    b, ms = family
    copy = copy_model_dir(b, tmp_path / "copy")
    with pytest.warns(MergeWarning, match=r"Model Stock's t drops toward 0 \(with two models the merge is the base"):
        tiesmerge.merge(str(b), [str(copy), str(ms[0])], ModelStock(), output=str(tmp_path / "ms"))


@pytest.mark.parametrize("method", ["tsv_m", "iso_c", "iso_cts"])
def test_an_exclude_pattern_matching_no_matrix_or_every_matrix_is_said(method):
    """hp21 F6: `tsv_m --exclude embd` (a typo) changed nothing, silently; N12: `--exclude .` decomposed nothing;
    hp22 N1: the same where the pattern matches only 1-D tensors ('norm') or every 2-D one ('proj|embed')."""
    from tiesmerge.registry import make_method

    shapes = {"model.embed_tokens.weight": (8, 4), "model.layers.0.mlp.up_proj.weight": (4, 4),
              "model.norm.weight": (4,)}
    for pattern, said in [("embd", "matches no matrix"), ("norm", "matches no matrix"),
                          (".", "matches every matrix"), ("proj|embed", "matches every matrix")]:
        with pytest.warns(MergeWarning, match=f"{method}: exclude {re.escape(repr(pattern))} {said}"):
            make_method(method, {"exclude": pattern}).check_tensors(shapes)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make_method(method, {}).check_tensors(shapes)  # the default (CLIP's text_projection): no word
        make_method(method, {"exclude": "embed"}).check_tensors(shapes)


def test_notes_of_the_twenty_first_pass_continued(family, tmp_path):
    """hp21 N9: --dtype rewrote only config.json's top-level dtype, not text_config's / vision_config's; N10:
    --sign-from a copy of the base gave the base with a warning naming no sign_from; N2: int32 statistics of the right
    shape were blamed on their shape."""
    import json

    b, ms = family
    base = copy_model_dir(b, tmp_path / "composite")
    config = json.loads((base / "config.json").read_text())
    config.update(torch_dtype="float32", text_config={"torch_dtype": "float32", "dtype": "float32"},
                  vision_config={"dtype": "float32", "layers": {"torch_dtype": "float32"}})
    (base / "config.json").write_text(json.dumps(config))
    tiesmerge.merge(str(base), [str(m) for m in ms], "ties", output=str(tmp_path / "o"), dtype="bf16")
    written = json.loads((tmp_path / "o" / "config.json").read_text())
    assert written["torch_dtype"] == written["text_config"]["torch_dtype"] == written["text_config"]["dtype"] == \
        written["vision_config"]["dtype"] == written["vision_config"]["layers"]["torch_dtype"] == "bfloat16"
    copy = copy_model_dir(b, tmp_path / "copy")
    # said by the merge itself, as the cause, before any other warning (hp40b C51)
    with pytest.warns(MergeWarning, match=r"the reference model \(sign_from\) equals the base on every merged "
                                          r"tensor"):
        tiesmerge.merge(str(b), [str(m) for m in ms], Ties(sign_from=str(copy)), output=str(tmp_path / "sf"))


def test_statistics_of_an_integer_dtype_are_named_as_such(tmp_path):
    from helpers_ckpt import make_family
    from helpers_merge import fisher_stats, float_names, merge
    from tiesmerge.errors import IncompatibleCheckpointsError

    base, models = make_family(2)
    names = float_names(base)
    stats = [fisher_stats({n: torch.ones(base[n].shape, dtype=torch.int32) for n in names}) for _ in range(2)]
    with pytest.raises(IncompatibleCheckpointsError, match=r"is int32, but a fisher statistic is floating-point \(its "
                                                          r"shape .* is right\)"):
        merge(base, models, Fisher(), stats)
