"""Merged adapters written out (io/adapter_writer.py): the SVD re-factoring of LoRA, its error, and
outputs PEFT loads."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import tiesmerge
from helpers_adapters import LORA_MODULES, TARGETS
from tiesmerge.io.adapter_writer import truncated_factors
from tiesmerge.methods import Ties


def test_svd_refactoring_at_full_rank_is_exact(lora_family, tmp_path):
    base, base_dir, dirs, deltas = lora_family
    method = Ties(density=0.3, scope="per_tensor")
    out = tiesmerge.merge(base_dir, dirs, method, output=tmp_path / "adapter", output_format="adapter", rank=8)
    tensors = load_file(str(out / "adapter_model.safetensors"))
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == 8 and config["peft_type"] == "LORA"
    reference = tiesmerge.merge({n: torch.zeros_like(base[n]) for n in TARGETS}, deltas, method)  # τ_m itself
    manifest = json.loads((out / "tiesmerge.json").read_text())
    for module in LORA_MODULES:
        a = tensors[f"base_model.model.{module}.lora_A.weight"]
        b = tensors[f"base_model.model.{module}.lora_B.weight"]
        torch.testing.assert_close(b @ a, reference[module + ".weight"], atol=1e-6, rtol=1e-5)
        assert manifest["adapters"]["relative_reconstruction_error"][module] < 1e-6


def test_truncated_rank_reports_the_eckart_young_error():
    g = torch.Generator().manual_seed(0)
    tau = torch.randn(12, 7, generator=g)
    f = truncated_factors(tau, 3)
    assert f.a.shape == (3, 7) and f.b.shape == (12, 3)
    measured = float(torch.linalg.norm(tau - f.b @ f.a) / torch.linalg.norm(tau))
    assert f.relative_error == pytest.approx(measured, rel=1e-5)
    assert 0 < f.relative_error < 1
    # a rank above min(out, in) pads with zeros and is exact
    padded = truncated_factors(tau, 9)
    assert padded.a.shape == (9, 7) and padded.relative_error == 0.0
    torch.testing.assert_close(padded.b @ padded.a, tau, atol=1e-5, rtol=1e-5)


def test_lora_with_peft_loads_and_matches(tmp_path):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                                   num_key_value_heads=2, vocab_size=40)
    torch.manual_seed(0)
    base_model = transformers.LlamaForCausalLM(cfg)
    base_model.save_pretrained(tmp_path / "base")
    dirs = []
    for k, rank in enumerate((2, 4)):
        model = peft.get_peft_model(transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base"),
                                    peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "up_proj"]))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.1, generator=torch.Generator().manual_seed(k))
        model.save_pretrained(tmp_path / f"lora{k}")
        dirs.append(tmp_path / f"lora{k}")
    method = Ties(density=0.4, scope="per_tensor")
    full = tiesmerge.merge(tmp_path / "base", dirs, method, output=tmp_path / "full")
    out = tiesmerge.merge(tmp_path / "base", dirs, method, output=tmp_path / "merged", output_format="adapter",
                          rank=16)
    loaded = peft.PeftModel.from_pretrained(transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base"), out)
    merged_by_peft = loaded.merge_and_unload().state_dict()
    ours = transformers.LlamaForCausalLM.from_pretrained(full).state_dict()
    for name, value in ours.items():
        torch.testing.assert_close(merged_by_peft[name], value, atol=1e-6, rtol=1e-5)


def test_ia3_adapter_output_loads_with_peft(tmp_path):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=2, vocab_size=40)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "base")
    dirs = []
    for k in range(2):
        model = peft.get_peft_model(transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base"),
                                    peft.IA3Config(target_modules=["k_proj", "down_proj"],
                                                   feedforward_modules=["down_proj"]))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "ia3_l" in name:
                    p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(k)))
        model.save_pretrained(tmp_path / f"ia3_{k}")
        dirs.append(tmp_path / f"ia3_{k}")
    out = tiesmerge.merge(tmp_path / "base", dirs, "task_arithmetic", lam=1.0, output=tmp_path / "merged",
                          output_format="adapter")
    loaded = peft.PeftModel.from_pretrained(transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base"), out)
    folded = loaded.merge_and_unload().state_dict()
    ours = transformers.LlamaForCausalLM.from_pretrained(
        tiesmerge.merge(tmp_path / "base", dirs, "task_arithmetic", lam=1.0, output=tmp_path / "full")).state_dict()
    for name, value in ours.items():
        torch.testing.assert_close(folded[name], value, atol=1e-6, rtol=1e-5)
