"""A merge's inputs by role (inputs.py): the reference model (TIES's sign_from) is a named input, read
against the real base, never aligned, trimmed or counted as a model — for adapters too — and
recorded under its own name; the base itself is refused as a reference."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from safetensors.torch import load_file

import tiesmerge
from helpers_adapters import LORA_MODULES, lora_delta, random_lora, write_lora_dir
from helpers_ckpt import make_base, sign_family, write_hf_dir
from tiesmerge.cli.main import main
from tiesmerge.errors import ConfigError, IncompatibleCheckpointsError, OutputError
from tiesmerge.methods import Ties

TARGETS = [m + ".weight" for m in LORA_MODULES]


@pytest.fixture()
def lora_and_reference(tmp_path):
    """A base, three LoRA adapters, their dense deltas, and a full reference model that changes
    every tensor of the base (so its raw weights and its task vector differ in sign often)."""
    base = make_base(0)
    write_hf_dir(tmp_path / "base", base)
    dirs, deltas = [], []
    for k, (rank, alpha) in enumerate([(2, 4.0), (4, 8.0), (3, 3.0)]):
        factors = random_lora(base, rank, seed=k)
        dirs.append(write_lora_dir(tmp_path / f"lora{k}", factors, alpha=alpha))
        deltas.append(lora_delta(factors, alpha))
    g = torch.Generator().manual_seed(7)
    reference = {n: v + 0.05 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
                 for n, v in base.items()}
    write_hf_dir(tmp_path / "reference", reference)
    return base, tmp_path / "base", dirs, deltas, reference, tmp_path / "reference"


def _ties_with_sign(deltas: list[dict], gamma: dict, density: float) -> dict[str, torch.Tensor]:
    """TIES over TARGETS (global trim, float64) with the elected sign replaced by ``gamma``."""
    flat = [torch.cat([d[n].double().reshape(-1) for n in TARGETS]).abs() for d in deltas]
    keep = math.floor(density * flat[0].numel())
    thresholds = [f.sort(descending=True).values[keep - 1] for f in flat]
    out = {}
    for name in TARGETS:
        tau = torch.stack([d[name].double() for d in deltas])  # (n, *S)
        trimmed = tau * (tau.abs() >= torch.stack(thresholds).view(-1, 1, 1))
        agree = (trimmed.sign() == gamma[name]) & (trimmed != 0)
        out[name] = ((trimmed * agree).sum(0) / agree.sum(0).clamp_min(1)).float()
    return out


def _adapter_delta(directory) -> dict[str, torch.Tensor]:
    config = json.loads((directory / "adapter_config.json").read_text())
    tensors = load_file(str(directory / "adapter_model.safetensors"))
    scale = config["lora_alpha"] / config["r"]
    return {m + ".weight": scale * tensors[f"base_model.model.{m}.lora_B.weight"].double()
            @ tensors[f"base_model.model.{m}.lora_A.weight"].double() for m in LORA_MODULES}


@pytest.mark.parametrize("output_format", ["adapter", "model"])
def test_lora_sign_from_takes_the_sign_of_the_reference_task_vector(lora_and_reference, tmp_path, output_format):
    """Regression: with a merged adapter out, the engine runs against a zero base, and the sign
    used to come from the reference's raw weights, not from theta_ref - theta_base."""
    base, base_dir, dirs, deltas, reference, reference_dir = lora_and_reference
    gamma = {n: (reference[n] - base[n]).sign() for n in TARGETS}
    raw_sign = {n: reference[n].sign() for n in TARGETS}
    assert sum(int((gamma[n] != raw_sign[n]).sum()) for n in TARGETS) > 100  # the two readings differ a lot
    expected = _ties_with_sign(deltas, gamma, 0.3)
    method = Ties(density=0.3, sign_from=reference_dir)
    full_rank = min(base[TARGETS[0]].shape) if output_format == "adapter" else None  # a rank only for an adapter
    out = tiesmerge.merge(base_dir, dirs, method, output=tmp_path / "out", output_format=output_format,
                          rank=full_rank)
    if output_format == "adapter":
        merged = _adapter_delta(out)
    else:
        merged = {n: load_file(str(f))[n].double() - base[n].double()
                  for f in out.glob("*.safetensors") for n in load_file(str(f)) if n in TARGETS}
    for name in TARGETS:
        torch.testing.assert_close(merged[name].float(), expected[name], atol=2e-5, rtol=1e-4)


def test_lora_sign_from_merges_only_the_adapted_tensors(lora_and_reference, tmp_path):
    """Regression: the reference (a full model) used to widen the merged set to every tensor of
    the base, change the adapters' global thresholds, and add a threshold of its own."""
    base, base_dir, dirs, deltas, reference, reference_dir = lora_and_reference
    out = tiesmerge.merge(base_dir, dirs, Ties(density=0.25, sign_from=reference_dir), output=tmp_path / "out",
                          output_format="adapter", rank=8)
    manifest = json.loads((out / "tiesmerge.json").read_text())
    assert len(manifest["thresholds"]) == len(dirs)  # one per model, none for the reference
    assert manifest["tensors"]["merged"] == len(TARGETS)
    keep = math.floor(0.25 * sum(base[n].numel() for n in TARGETS))
    base_ckpt = tiesmerge.open_checkpoint(base_dir)
    for k, threshold in enumerate(manifest["thresholds"]):  # thresholds over the adapted tensors only
        adapter = tiesmerge.open_checkpoint(dirs[k])
        adapter.bind(base_ckpt)
        values = torch.cat([adapter.read(n).reshape(-1) for n in TARGETS]).abs()  # delta W as the engine sees it
        assert int((values >= threshold).sum()) == keep
    # the reference is hashed under its own name, not as a model
    assert [m["label"] for m in manifest["inputs"]["models"]] == [str(d) for d in dirs]
    assert manifest["inputs"]["sign_from"]["label"].startswith(str(reference_dir))
    assert manifest["inputs"]["sign_from"]["files"][0]["sha256"]


def test_full_models_sign_from_equals_the_hand_merge(tmp_path):
    base = make_base(1)
    g = torch.Generator().manual_seed(3)
    models = [{n: v + 0.1 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
               for n, v in base.items()} for _ in range(2)]
    reference = {n: v + 0.1 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
                 for n, v in base.items()}
    for name, state in [("base", base), ("m0", models[0]), ("m1", models[1]), ("ref", reference)]:
        write_hf_dir(tmp_path / name, state)
    merged = tiesmerge.merge(tmp_path / "base", [tmp_path / "m0", tmp_path / "m1"],
                             Ties(density=0.5, scope="per_tensor", sign_from=tmp_path / "ref"))
    for name, value in base.items():
        if not value.is_floating_point():
            continue
        tau = torch.stack([m[name] - value for m in models]).double()  # (2, *S)
        flat = tau.reshape(2, -1).abs()
        keep = math.floor(0.5 * flat.shape[1])
        if keep == 0:
            expected = torch.zeros_like(value, dtype=torch.float64)
        else:
            thresholds = flat.sort(1, descending=True).values[:, keep - 1].view(2, *([1] * value.dim()))
            trimmed = tau * (tau.abs() >= thresholds)
            agree = (trimmed.sign() == (reference[name] - value).sign()) & (trimmed != 0)
            expected = (trimmed * agree).sum(0) / agree.sum(0).clamp_min(1)
        torch.testing.assert_close(merged[name].double(), value.double() + expected, atol=1e-6, rtol=1e-5)


def test_reference_errors(lora_and_reference, tmp_path):
    base, base_dir, dirs, _, _, reference_dir = lora_and_reference
    with pytest.raises(ConfigError, match="is the base itself"):
        tiesmerge.merge(base_dir, dirs, Ties(sign_from=base_dir))
    other = make_base(5)
    other["model.layers.0.mlp.up_proj.weight"] = torch.zeros(3, 3)
    write_hf_dir(tmp_path / "other", other)
    with pytest.raises(IncompatibleCheckpointsError, match="up_proj.weight") as info:
        tiesmerge.merge(base_dir, dirs, Ties(sign_from=tmp_path / "other"))
    assert "(3, 3)" in str(info.value)
    with pytest.raises(OutputError, match="the reference model"):
        tiesmerge.merge(base_dir, dirs, Ties(sign_from=reference_dir), output=reference_dir, force=True)
    assert (reference_dir / "config.json").is_file()  # the reference is untouched


def test_sign_from_cli_and_manifest(tmp_path):
    base, models, ref = sign_family(tmp_path)
    args = ["merge", "--base", str(base), "--model", str(models[0]), "--model", str(models[1]),
            "--density", "1", "--sign-from", str(ref), "-o", str(tmp_path / "out"), "--no-progress"]
    assert main(args) == 0
    manifest = json.loads((tmp_path / "out" / "tiesmerge.json").read_text())
    assert manifest["inputs"]["sign_from"]["label"].startswith(str(ref))
    assert len(manifest["inputs"]["models"]) == 2
    assert manifest["method"]["options"]["sign_from"] == str(ref)
    assert re.search(r"sign_from", (tmp_path / "out" / "README.md").read_text())


def test_sign_from_the_base_is_refused(tmp_path):
    base, models, _ = sign_family(tmp_path)
    with pytest.raises(ConfigError, match="base itself"):
        tiesmerge.merge(base, models, "ties", sign_from=str(base))
    with pytest.raises(ConfigError, match="sign_from"):
        tiesmerge.methods.Ties(sign_from=3)
