"""PEFT adapters in (LoRA ΔW = s·B·A, (IA)³ τ = l − 1) and merged adapters out."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

import tiesmerge
from helpers_adapters import (
    IA3_MODULES,
    LORA_MODULES,
    lora_delta,
    random_ia3,
    random_lora,
    write_ia3_dir,
    write_lora_dir,
)
from helpers_ckpt import make_base, write_hf_dir
from tiesmerge.errors import CheckpointError, ConfigError, IncompatibleCheckpointsError
from tiesmerge.io.adapter_writer import truncated_factors
from tiesmerge.io.adapters import ZeroBase, ia3_identity
from tiesmerge.methods import DareTies, TaskArithmetic, Ties

TARGETS = [m + ".weight" for m in LORA_MODULES]
METHODS = [Ties(density=0.3), Ties(density=0.3, scope="per_tensor", zero_sign="positive"),
           TaskArithmetic(lam=0.7), DareTies(drop_rate=0.5, seed=3)]


@pytest.fixture()
def lora_family(tmp_path):
    """A base directory, three LoRA adapters of ranks 2, 4, 3 (one rsLoRA), and their dense ΔW."""
    base = make_base(0)
    write_hf_dir(tmp_path / "base", base)
    specs = [(2, 4.0, False), (4, 16.0, True), (3, 3.0, False)]
    dirs, deltas = [], []
    for k, (rank, alpha, rs) in enumerate(specs):
        factors = random_lora(base, rank, seed=k)
        dirs.append(write_lora_dir(tmp_path / f"lora{k}", factors, alpha=alpha, rslora=rs))
        deltas.append(lora_delta(factors, alpha, rslora=rs))
    return base, tmp_path / "base", dirs, deltas


@pytest.mark.parametrize("method", METHODS, ids=lambda m: f"{m.name}-{getattr(m, 'scope', '')}")
def test_lora_merge_equals_dense_merge_of_the_same_deltas(lora_family, method):
    base, base_dir, dirs, deltas = lora_family
    merged = tiesmerge.merge(base_dir, dirs, method)
    # the reference: dense models base + ΔW over the adapted tensors (what the adapters change)
    dense_base = {n: base[n] for n in TARGETS}
    dense = [{n: base[n] + d[n] for n in TARGETS} for d in deltas]
    reference = tiesmerge.merge(dense_base, dense, method)
    for name in TARGETS:
        torch.testing.assert_close(merged[name], reference[name], atol=2e-6, rtol=1e-5)
    for name in base:  # every tensor no adapter targets is the base's, bit for bit
        if name not in TARGETS:
            assert torch.equal(merged[name], base[name]), name


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


def test_adapter_targeting_a_subset_and_modules_to_save(tmp_path):
    base = make_base(1)
    write_hf_dir(tmp_path / "base", base)
    f0 = random_lora(base, 2, seed=0, modules=LORA_MODULES[:2])
    f1 = random_lora(base, 2, seed=1, modules=LORA_MODULES[1:])
    head = base["lm_head.weight"] + 0.5
    a0 = write_lora_dir(tmp_path / "a0", f0, alpha=2.0, extra={"lm_head.modules_to_save.default.weight": head})
    a1 = write_lora_dir(tmp_path / "a1", f1, alpha=2.0)
    merged = tiesmerge.merge(tmp_path / "base", [a0, a1], TaskArithmetic(lam=1.0))
    d0, d1 = lora_delta(f0, 2.0), lora_delta(f1, 2.0)
    for name in TARGETS:
        expected = base[name] + d0.get(name, 0) + d1.get(name, 0)
        torch.testing.assert_close(merged[name], expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(merged["lm_head.weight"], head)


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
                                    peft.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]))
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


def test_adapter_errors(tmp_path):
    base = make_base(0)
    write_hf_dir(tmp_path / "base", base)
    good = write_lora_dir(tmp_path / "good", random_lora(base, 2, seed=1), alpha=2.0)
    dora = write_lora_dir(tmp_path / "dora", random_lora(base, 2, seed=2), alpha=2.0, config={"use_dora": True})
    with pytest.raises(CheckpointError, match="DoRA"):
        tiesmerge.merge(tmp_path / "base", [good, dora], "ties")
    ia3 = write_ia3_dir(tmp_path / "ia3", random_ia3(base, seed=0))
    with pytest.raises(IncompatibleCheckpointsError, match=r"\(IA\)³"):
        tiesmerge.merge(tmp_path / "base", [good, ia3], "ties")
    write_hf_dir(tmp_path / "full", {k: v + 0.1 if v.is_floating_point() else v for k, v in base.items()})
    with pytest.raises(ConfigError, match="adapter"):
        tiesmerge.merge(tmp_path / "base", [good, tmp_path / "full"], "ties", output=tmp_path / "o",
                        output_format="adapter")
    wrong = make_base(0, shapes={"model.layers.0.self_attn.q_proj.weight": (4, 8)}, with_int=False)
    write_hf_dir(tmp_path / "wrong", wrong)
    with pytest.raises(IncompatibleCheckpointsError, match="trained on another base"):
        tiesmerge.merge(tmp_path / "wrong", [good], "ties")


def test_cli_merges_adapters_into_an_adapter(lora_family, tmp_path, capsys):
    from tiesmerge.cli.main import main

    base, base_dir, dirs, deltas = lora_family
    argv = ["merge", "--base", str(base_dir), *[a for d in dirs for a in ("--model", str(d))], "--scope", "per_tensor",
            "--output-format", "adapter", "--rank", "2", "-o", str(tmp_path / "cli")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "LoRA adapter at rank 2: relative reconstruction error at most" in out
    manifest = json.loads((tmp_path / "cli" / "tiesmerge.json").read_text())
    assert manifest["recipe"]["output_format"] == "adapter" and manifest["recipe"]["rank"] == 2
    errors = manifest["adapters"]["relative_reconstruction_error"]
    assert set(errors) == set(LORA_MODULES) and all(0 < e < 1 for e in errors.values())
    # the dry run plans the merge of the adapters' ΔW (the adapted tensors only)
    assert main(["merge", "--base", str(base_dir), "--model", str(dirs[0]), "--model", str(dirs[1]), "--dry-run"]) == 0
    assert f"tensors          {len(TARGETS)} merged" in capsys.readouterr().out


def test_alpha_pattern_sets_a_module_scale(tmp_path):
    base = make_base(3)
    write_hf_dir(tmp_path / "base", base)
    factors = random_lora(base, 2, seed=5)
    adapter = write_lora_dir(tmp_path / "a", factors, alpha=2.0, config={"alpha_pattern": {"up_proj": 8.0}})
    merged = tiesmerge.merge(tmp_path / "base", [adapter], TaskArithmetic(lam=1.0))
    plain, boosted = lora_delta(factors, 2.0), lora_delta(factors, 8.0)
    for module in LORA_MODULES:
        name = module + ".weight"
        expected = base[name] + (boosted if module.endswith("up_proj") else plain)[name]
        torch.testing.assert_close(merged[name], expected, atol=1e-6, rtol=1e-5)


def test_embedding_lora_matches_peft(tmp_path):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=2, vocab_size=40, tie_word_embeddings=False)
    torch.manual_seed(1)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "base")
    model = peft.get_peft_model(transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base"),
                                peft.LoraConfig(r=3, lora_alpha=6, target_modules=["embed_tokens", "v_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_embedding_A" in name or "lora_B" in name:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(2))
    model.save_pretrained(tmp_path / "lora")
    reference = model.merge_and_unload().state_dict()
    ours = tiesmerge.merge(tmp_path / "base", [tmp_path / "lora"], TaskArithmetic(lam=1.0))
    for name in ("model.embed_tokens.weight", "model.layers.0.self_attn.v_proj.weight"):
        torch.testing.assert_close(ours[name], reference[name], atol=1e-6, rtol=1e-5)


def test_zero_base_and_ia3_identity_values(tmp_path):
    """The stand-in bases of adapter merges: zeros (as stored bytes too) and all-ones vectors."""
    base = make_base(0)
    base_ckpt = tiesmerge.open_checkpoint(write_hf_dir(tmp_path / "base", base))
    zero = ZeroBase(base_ckpt)
    name = "model.layers.0.mlp.up_proj.weight"
    assert zero.info(name) == base_ckpt.info(name) and torch.equal(zero.read(name, slice(2, 5)), torch.zeros(3, 8))
    out = bytearray(b"\xff" * 3 * 8 * 4)
    zero.read_into(name, slice(2, 5), memoryview(out))
    assert out == bytes(len(out))
    with pytest.raises(ValueError, match="buffer of 4 bytes"):
        zero.read_into(name, slice(2, 5), memoryview(bytearray(4)))

    adapter = tiesmerge.open_checkpoint(write_ia3_dir(tmp_path / "ia3", random_ia3(base, seed=1)))
    identity, (union,) = ia3_identity(base_ckpt, [adapter])
    assert sorted(identity.names()) == sorted(adapter.names()) == sorted(union.names())
    for n in identity.names():
        shape = adapter.info(n).shape
        assert identity.info(n) == adapter.info(n) and identity.info(n).dtype is torch.float32
        assert torch.equal(identity.read(n), torch.ones(shape)) and identity.storage_key(n) is None
        assert identity.read(n, slice(0, 1)).shape == (1, *shape[1:])
