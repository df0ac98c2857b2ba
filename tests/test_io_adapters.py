"""PEFT adapters read as task vectors (io/adapters.py): LoRA ΔW = s·B·A against dense merges and
PEFT, targeted subsets, alpha patterns, refusals, and the stand-in bases of adapter merges."""

from __future__ import annotations

import pytest
import torch

import tiesmerge
from helpers_adapters import (
    LORA_MODULES,
    TARGETS,
    lora_delta,
    random_ia3,
    random_lora,
    write_ia3_dir,
    write_lora_dir,
)
from helpers_ckpt import make_base, write_hf_dir
from tiesmerge.errors import CheckpointError, ConfigError, IncompatibleCheckpointsError
from tiesmerge.io.adapters import ZeroBase, ia3_identity
from tiesmerge.methods import DareTies, TaskArithmetic, Ties

METHODS = [Ties(density=0.3), Ties(density=0.3, scope="per_tensor", zero_sign="positive"),
           TaskArithmetic(lam=0.7), DareTies(drop_rate=0.5, seed=3)]


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


def test_adapter_targeting_a_subset_and_modules_to_save(tmp_path):
    base = make_base(1)
    write_hf_dir(tmp_path / "base", base)
    f0 = random_lora(base, 2, seed=0, modules=LORA_MODULES[:2])
    f1 = random_lora(base, 2, seed=1, modules=LORA_MODULES[1:])
    head = base["lm_head.weight"] + 0.5
    a0 = write_lora_dir(tmp_path / "a0", f0, alpha=2.0, extra={"lm_head.modules_to_save.default.weight": head},
                        config={"modules_to_save": ["lm_head"]})  # PEFT puts the saved copy back only where named
    a1 = write_lora_dir(tmp_path / "a1", f1, alpha=2.0)
    merged = tiesmerge.merge(tmp_path / "base", [a0, a1], TaskArithmetic(lam=1.0))
    d0, d1 = lora_delta(f0, 2.0), lora_delta(f1, 2.0)
    for name in TARGETS:
        expected = base[name] + d0.get(name, 0) + d1.get(name, 0)
        torch.testing.assert_close(merged[name], expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(merged["lm_head.weight"], head)


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
