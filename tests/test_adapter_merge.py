"""Adapter merges (adapter_merge.py): only the adapted tensors are merged and ranked, and merged
(IA)³ vectors fold into the base."""

from __future__ import annotations

import json
import math

import torch
from safetensors.torch import load_file

import tiesmerge
from helpers_adapters import IA3_MODULES, TARGETS, random_ia3, write_ia3_dir
from helpers_ckpt import make_base, write_hf_dir
from tiesmerge.methods import Ties


def test_global_trim_ranks_only_the_adapted_tensors(lora_family, tmp_path):
    base, base_dir, dirs, deltas = lora_family
    out = tiesmerge.merge(base_dir, dirs, Ties(density=0.25), output=tmp_path / "out")
    manifest = json.loads((out / "tiesmerge.json").read_text())
    adapted = sum(base[n].numel() for n in TARGETS)
    keep = math.floor(0.25 * adapted)
    base_ckpt = tiesmerge.open_checkpoint(base_dir)
    for k, threshold in enumerate(manifest["thresholds"]):
        adapter = tiesmerge.open_checkpoint(dirs[k])
        adapter.bind(base_ckpt)
        values = torch.cat([adapter.read(n).reshape(-1) for n in TARGETS]).abs()  # ΔW as the engine sees it
        torch.testing.assert_close(values, torch.cat([deltas[k][n].reshape(-1) for n in TARGETS]).abs())
        assert int((values >= threshold).sum()) == keep  # continuous values: no ties at the threshold
    assert manifest["adapters"]["inputs"] == "lora"
    assert manifest["tensors"]["merged"] == len(TARGETS)


def test_ia3_merges_l_minus_one_and_folds_into_the_base(tmp_path):
    base = make_base(2)
    write_hf_dir(tmp_path / "base", base)
    vectors = [random_ia3(base, seed=k) for k in range(3)]
    dirs = [write_ia3_dir(tmp_path / f"ia3_{k}", v) for k, v in enumerate(vectors)]
    method = Ties(density=0.5, scope="per_tensor")
    # the reference: TIES on τ = l − 1, hand-fed as dense vectors against an all-ones base
    ones = {m: torch.ones_like(v) for m, v in vectors[0].items()}
    l_merged = tiesmerge.merge(ones, [dict(v) for v in vectors], method)
    out = tiesmerge.merge(tmp_path / "base", dirs, method, output=tmp_path / "adapter", output_format="adapter")
    saved = load_file(str(out / "adapter_model.safetensors"))
    for module in IA3_MODULES:
        torch.testing.assert_close(saved[f"base_model.model.{module}.ia3_l"], l_merged[module], atol=1e-6, rtol=1e-6)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "IA3" and config["feedforward_modules"] == ["model.layers.0.mlp.up_proj"]
    # a full model: every scaled weight is W · l_m (rows or columns), everything else the base's
    full = tiesmerge.merge(tmp_path / "base", dirs, method)
    for name, value in base.items():
        module = name.removesuffix(".weight")
        expected = value * l_merged[module] if module in IA3_MODULES else value
        torch.testing.assert_close(full[name], expected, atol=1e-6, rtol=1e-6)
