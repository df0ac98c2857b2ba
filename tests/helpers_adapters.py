"""Builders of tiny PEFT adapter directories, written by hand (as PEFT saves them).

Module names follow the tiny "transformer" of helpers_ckpt.SHAPES, so an adapter of
``model.layers.0.self_attn.q_proj`` targets the base tensor ``model.layers.0.self_attn.q_proj.weight``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file

__all__ = ["LORA_MODULES", "TARGETS", "IA3_MODULES", "random_lora", "write_lora_dir", "lora_delta", "random_ia3",
           "write_ia3_dir", "peft_adapts", "tiesmerge_adapts"]

PREFIX = "base_model.model."
LORA_MODULES = ("model.layers.0.self_attn.q_proj", "model.layers.0.mlp.up_proj",
                "model.layers.1.self_attn.q_proj", "model.layers.1.mlp.up_proj")
TARGETS = [m + ".weight" for m in LORA_MODULES]  # the base tensors the LoRA adapters change
IA3_MODULES = {"model.layers.0.self_attn.q_proj": False, "model.layers.1.self_attn.q_proj": False,
               "model.layers.0.mlp.up_proj": True}  # True: feed-forward (inputs scaled)


def random_lora(base: Mapping[str, torch.Tensor], rank: int, seed: int, modules=LORA_MODULES
                ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module: (A (r, in), B (out, r))} with B non-zero (a trained adapter, not a fresh one)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for module in modules:
        rows, cols = base[module + ".weight"].shape
        out[module] = (torch.randn(rank, cols, generator=g) / math.sqrt(cols),
                       0.1 * torch.randn(rows, rank, generator=g))
    return out


def lora_delta(factors: dict[str, tuple[torch.Tensor, torch.Tensor]], alpha: float, *, rslora: bool = False
               ) -> dict[str, torch.Tensor]:
    """The dense ΔW = s · B · A of every module, keyed by base tensor name (the reference)."""
    out = {}
    for module, (a, b) in factors.items():
        r = a.shape[0]
        scale = alpha / (math.sqrt(r) if rslora else r)
        out[module + ".weight"] = scale * (b.double() @ a.double()).float()
    return out


def write_lora_dir(path: str | Path, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], *, alpha: float,
                   rslora: bool = False, extra: Mapping[str, torch.Tensor] | None = None,
                   config: Mapping | None = None) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for module, (a, b) in factors.items():
        tensors[f"{PREFIX}{module}.lora_A.weight"] = a.contiguous()
        tensors[f"{PREFIX}{module}.lora_B.weight"] = b.contiguous()
    for key, value in (extra or {}).items():
        tensors[PREFIX + key] = value.contiguous()
    save_file(tensors, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    rank = next(iter(factors.values()))[0].shape[0] if factors else 8
    cfg = {"peft_type": "LORA", "r": rank, "lora_alpha": alpha, "use_rslora": rslora, "fan_in_fan_out": False,
           "target_modules": sorted({m.rsplit(".", 1)[-1] for m in factors}), "bias": "none",
           "lora_dropout": 0.0, "rank_pattern": {}, "alpha_pattern": {}, "modules_to_save": None,
           "task_type": None, "base_model_name_or_path": None, "inference_mode": True, "use_dora": False}
    cfg.update(config or {})
    (path / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
    return path


def random_ia3(base: Mapping[str, torch.Tensor], seed: int, modules: Mapping[str, bool] = IA3_MODULES
               ) -> dict[str, torch.Tensor]:
    """{module: l} around 1: (out, 1) scales outputs, (1, in) a feed-forward module's inputs."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for module, feedforward in modules.items():
        rows, cols = base[module + ".weight"].shape
        shape = (1, cols) if feedforward else (rows, 1)
        out[module] = 1.0 + 0.2 * torch.randn(shape, generator=g)
    return out


def write_ia3_dir(path: str | Path, vectors: dict[str, torch.Tensor], modules: Mapping[str, bool] = IA3_MODULES
                  ) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file({f"{PREFIX}{m}.ia3_l": v.contiguous() for m, v in vectors.items()},
              str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    cfg = {"peft_type": "IA3", "target_modules": sorted({m.rsplit(".", 1)[-1] for m in vectors}),
           "feedforward_modules": sorted({m.rsplit(".", 1)[-1] for m in vectors if modules[m]}),
           "fan_in_fan_out": False, "inference_mode": True, "modules_to_save": None, "task_type": None,
           "base_model_name_or_path": None, "init_ia3_weights": True}
    (path / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
    return path


def peft_adapts(config: Mapping, module: str) -> bool:
    """Whether PEFT (check_target_module_exists) puts an adapter layer on ``module`` under ``config``, with the heads
    PeftModelForSequenceClassification adds to modules_to_save when it loads a SEQ_CLS adapter."""
    from types import SimpleNamespace

    from peft.tuners import tuners_utils

    saved = config.get("modules_to_save")
    if config.get("task_type") == "SEQ_CLS":
        saved = [*(saved or []), "classifier", "score"]
    cfg = SimpleNamespace(**{"exclude_modules": None, "target_parameters": None, "layers_to_transform": None,
                             "layers_pattern": None, **config, "modules_to_save": saved})
    found = tuners_utils.check_target_module_exists(cfg, module)
    return bool(found) and not isinstance(found, tuners_utils._ExcludedModule)


def tiesmerge_adapts(config: Mapping, module: str) -> bool:
    """Whether tiesmerge takes ``module``'s weights as ones PEFT loads (io.peft_targets.check_adapted)."""
    from tiesmerge.errors import IncompatibleCheckpointsError
    from tiesmerge.io.peft_targets import check_adapted

    try:
        check_adapted(dict(config), [module], "adapter_config.json")
    except IncompatibleCheckpointsError:
        return False
    return True


def model_plus_lora_recipe(tmp_path: Path) -> Path:
    """A mergekit task_arithmetic recipe (float32) of the one entry ``tmp_path/base+tmp_path/lora`` at weight 1."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"merge_method: task_arithmetic\nbase_model: {tmp_path / 'base'}\nmodels:\n"
                      f"  - {{model: {tmp_path / 'base'}+{tmp_path / 'lora'}, parameters: {{weight: 1.0}}}}\n"
                      "dtype: float32\n")
    return recipe


def merged_as_model_plus_lora(tmp_path: Path) -> dict[str, torch.Tensor]:
    """model_plus_lora_recipe merged by the command line, its output's tensors: what mergekit writes for a
    MODEL+LORA entry."""
    from helpers_ckpt import load_dir
    from tiesmerge.cli.main import main

    assert main(["merge", str(model_plus_lora_recipe(tmp_path)), "-o", str(tmp_path / "out"), "--no-progress"]) == 0
    return load_dir(tmp_path / "out")
