"""The wrong-base guard: a model that does not look fine-tuned from the base is an error before
anything merges (unless allow_distant), and the distances are in --dry-run, validate and the manifest."""

from __future__ import annotations

import json

import pytest
import torch

import tiesmerge
from helpers_ckpt import cli_flags, load_dir, run_cli, write_hf_dir
from tiesmerge import distance
from tiesmerge.errors import IncompatibleCheckpointsError

# 1.1 M parameters: above distance.MIN_PARAMETERS, so the models are judged
SHAPES = {"model.embed_tokens.weight": (512, 1024), "model.layers.0.mlp.up_proj.weight": (512, 1024),
          **{f"model.layers.{i}.self_attn.q_proj.weight": (64, 64) for i in range(8)},
          "model.layers.0.input_layernorm.weight": (1024,), "model.norm.weight": (1024,)}


def _random(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: (torch.ones(s) + 0.1 * torch.randn(s, generator=g)) if len(s) == 1
            else 0.05 * torch.randn(s, generator=g) for n, s in SHAPES.items()}


def _finetune(base: dict[str, torch.Tensor], seed: int, scale: float = 0.03) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: v + scale * v.std() * torch.randn(v.shape, generator=g) for n, v in base.items()}


@pytest.fixture
def family(tmp_path):
    base = _random(0)
    paths = {"base": write_hf_dir(tmp_path / "base", base),
             "ft0": write_hf_dir(tmp_path / "ft0", _finetune(base, 1)),
             "ft1": write_hf_dir(tmp_path / "ft1", _finetune(base, 2)),
             "other": write_hf_dir(tmp_path / "other", _random(7))}  # another "pretraining": unrelated weights
    return paths


def test_fine_tunes_pass_and_an_unrelated_model_is_an_error_that_says_why(family, tmp_path):
    ds = tiesmerge.base_distance(family["base"], [family["ft0"], family["other"]])
    assert ds[0].judged and not ds[0].distant and ds[0].relative_norm < 0.05
    assert ds[1].distant and ds[1].relative_norm > 1.0 and ds[1].share_barely_matching > 0.5
    with pytest.raises(IncompatibleCheckpointsError) as info:
        tiesmerge.merge(family["base"], [family["ft0"], family["other"]], "ties", output=tmp_path / "out")
    text = str(info.value)
    assert f"model 1 ({family['other']}) does not look fine-tuned from the base ({family['base']})" in text
    assert f"{ds[1].relative_norm:.3f} of the base's norm" in text and "barely match" in text
    assert "--allow-distant" in info.value.hint
    assert not (tmp_path / "out").exists()


def test_allow_distant_merges_and_the_manifest_records_the_distances(family, tmp_path):
    out = tiesmerge.merge(family["base"], [family["ft0"], family["other"]], "ties", output=tmp_path / "out",
                          allow_distant=True)
    man = json.loads((out / "tiesmerge.json").read_text())
    assert [d["distant"] for d in man["base_distance"]] == [False, True]
    assert man["recipe"]["allow_distant"] is True
    assert set(man["base_distance"][0]["per_tensor"]) == set(SHAPES)
    assert load_dir(out)["model.norm.weight"].shape == (1024,)


def test_the_share_rule_catches_tensors_swapped_in_with_the_norm_unchanged(family, tmp_path):
    base = _random(0)
    swapped = dict(base)
    for i in range(8):  # the small attention matrices from another model: the big tensors still match
        name = f"model.layers.{i}.self_attn.q_proj.weight"
        swapped[name] = _random(9)[name]
    d = tiesmerge.base_distance(family["base"], [write_hf_dir(tmp_path / "sw", swapped)])[0]
    assert d.relative_norm < distance.RELATIVE_NORM_LIMIT
    assert d.share_barely_matching > distance.SHARE_LIMIT and d.distant
    with pytest.raises(IncompatibleCheckpointsError, match="barely match"):
        distance.check_distances([d], "base", allow_distant=False)


def test_the_sample_is_small_next_to_the_model(family):
    d = tiesmerge.base_distance(family["base"], [family["ft0"]])[0]
    model_bytes = sum(4 * torch.Size(s).numel() for s in SHAPES.values())
    assert d.bytes_read < 0.06 * 2 * model_bytes  # the sample of the model and the base: a few percent
    assert d.parameters == model_bytes // 4


def test_toy_models_are_measured_but_not_judged(tmp_path):
    small = {"w": torch.zeros(4), "b": torch.ones(3)}
    other = {"w": torch.ones(4), "b": -torch.ones(3)}
    d = tiesmerge.base_distance(write_hf_dir(tmp_path / "b", small), [write_hf_dir(tmp_path / "o", other)])[0]
    assert not d.judged and not d.distant and "not judged" in d.line()


def test_the_cli_dry_run_and_validate_show_the_distances_and_refuse(family, tmp_path, capsys):
    flags = cli_flags(family["base"], [family["ft0"], family["ft1"]])
    code, out, err = run_cli(["merge", *flags, "--dry-run"], capsys)
    assert code == 0, err
    assert out.count("base distance") == 2 and "looks fine-tuned from the base" in out
    code, out, err = run_cli(["merge", *cli_flags(family["base"], [family["ft0"], family["other"]]),
                              "-o", tmp_path / "o"], capsys)
    assert code != 0 and "does not look fine-tuned from the base" in err and "--allow-distant" in err
    code, out, err = run_cli(["merge", *cli_flags(family["base"], [family["ft0"], family["other"]]),
                              "--allow-distant", "-o", tmp_path / "o"], capsys)
    assert code == 0, err
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"method: ties\nbase: {family['base']}\nmodels: [{family['ft0']}, {family['other']}]\n")
    code, out, err = run_cli(["validate", recipe], capsys)
    assert code != 0 and "base distance of model 1" in out and "DISTANT" in out
    recipe.write_text(recipe.read_text() + "allow_distant: true\n")
    code, out, err = run_cli(["validate", recipe], capsys)
    assert code == 0 and "DISTANT" in out


def test_files_and_state_dicts_sample_the_same_entries(tmp_path):
    """The sample read from files (stored bytes, rows read into one buffer, a small matrix's rows picked before
    widening) equals the one taken from torch tensors (state dicts), tensor by tensor, bit for bit."""
    from helpers_ckpt import make_family

    base, fts = make_family(2, shapes={"a.weight": (300, 2000), "b.weight": (40, 8), "c": (5,)}, with_int=False)
    in_memory = tiesmerge.base_distance(base, fts)
    b = write_hf_dir(tmp_path / "b", base)
    ms = [write_hf_dir(tmp_path / f"m{k}", ft) for k, ft in enumerate(fts)]
    on_disk = tiesmerge.base_distance(str(b), [str(m) for m in ms])
    for x, y in zip(in_memory, on_disk, strict=True):
        assert x.relative_norm == y.relative_norm
        assert [(t.name, t.relative_norm, t.cosine, t.sampled) for t in x.tensors] == \
               [(t.name, t.relative_norm, t.cosine, t.sampled) for t in y.tensors]
