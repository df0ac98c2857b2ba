"""Merged adapters out: LoRA re-factored by truncated SVD, (IA)³ vectors written back.

A merged LoRA task vector τ_m of one module is generally of full rank; the adapter written
keeps its best rank-r approximation (Eckart–Young): τ_m = U S Vᵀ, B = U_r √S_r, A = √S_r V_rᵀ,
with lora_alpha = r so PEFT's scale α/r is 1. The relative reconstruction error
‖τ_m − B A‖_F / ‖τ_m‖_F = √(Σ_{i>r} s_i²) / √(Σ s_i²) is recorded per module. Modules whose
matrices have fewer than r singular values get zero-padded factors, so one r fits all.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from ..dtypes import DType, as_dtype
from ..errors import InvalidTensorError, MergeWarning
from ..finite import check_finite
from ..paths import as_if_created
from .adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS, PEFT_PREFIX, LoraCheckpoint, LoraTarget
from .ia3 import MAX_IA3_FACTOR

__all__ = ["Factored", "truncated_factors", "LoraFactorSink", "write_lora_adapter", "write_ia3_adapter"]


@dataclass(frozen=True)
class Factored:
    a: torch.Tensor  # (r, in)
    b: torch.Tensor  # (out, r)
    relative_error: float  # ‖τ − B A‖_F / ‖τ‖_F (0 for τ = 0)
    singular_values: int  # how many the matrix has: min(out, in)
    norm: float = 0.0  # ‖τ‖_F: the error of the factors as written (a narrower dtype) is measured against it


def truncated_factors(tau: torch.Tensor, rank: int) -> Factored:
    """Best rank-``rank`` factors of ``tau`` (out, in) by SVD, in float64 for an exact full rank."""
    u, s, vh = torch.linalg.svd(tau.double(), full_matrices=False)  # (out, m), (m,), (m, in)
    keep = min(rank, s.numel())
    root = s[:keep].sqrt()
    b = torch.zeros(tau.shape[0], rank, dtype=torch.float64)
    a = torch.zeros(rank, tau.shape[1], dtype=torch.float64)
    b[:, :keep] = u[:, :keep] * root  # (out, keep)
    a[:keep] = root[:, None] * vh[:keep]  # (keep, in)
    total = float(s.square().sum())
    error = (float(s[keep:].square().sum()) / total) ** 0.5 if total > 0 else 0.0
    return Factored(a.float(), b.float(), error, int(s.numel()), total ** 0.5)


class LoraFactorSink:
    """Receives the merged task vector (the engine run against a zero base) tensor by tensor,
    factors each LoRA target once its last rows arrive, and keeps only the factors: one module's
    τ_m is held at a time. Tensors stored whole (modules_to_save) are kept as they are."""

    def __init__(self, targets: dict[str, LoraTarget], shapes: dict[str, tuple[int, ...]],
                 full_names: Iterable[str], rank: int) -> None:
        self.targets, self.rank = targets, rank
        self.full_names = set(full_names)
        self._shapes = shapes  # every target's and whole tensor's shape
        self.factors: dict[str, Factored] = {}
        self.full: dict[str, torch.Tensor] = {}  # merged τ of tensors stored whole
        self._held: dict[str, tuple[torch.Tensor, int]] = {}  # name -> (τ being filled (out, in), rows filled)

    def write(self, name: str, rows: slice | None, chunk: np.ndarray | torch.Tensor) -> None:
        if name not in self.targets and name not in self.full_names:
            return  # a tensor no adapter changes: not part of the adapter
        if isinstance(chunk, np.ndarray):
            if chunk.dtype.kind != "f":  # raw bits (bfloat16 as uint16) would be taken as numbers
                raise TypeError(f"{name}: the LoRA factor sink takes τ's values, not a {chunk.dtype} array of "
                                "stored bits; pass a float array or a torch tensor")
            chunk = torch.from_numpy(chunk)
        shape = self._shapes[name]
        held, filled = self._held.get(name) or (torch.empty(shape, dtype=torch.float32), 0)
        if rows is None or not shape:
            held.copy_(chunk)
            filled = shape[0] if shape else 1
        else:
            held[rows].copy_(chunk)
            filled += chunk.shape[0]
        if filled < (shape[0] if shape else 1):
            self._held[name] = (held, filled)
            return
        self._held.pop(name, None)
        check_finite(name, held, "F32")  # an overflowed τ (a huge lam or lora_alpha): an error, not an SVD failure
        if name in self.full_names:
            self.full[name] = held
            return
        target = self.targets[name]
        self.factors[name] = truncated_factors(held.T if target.transposed else held, self.rank)  # B A = τ or τᵀ

    def alias(self, name: str, source: str) -> None:
        pass  # tied tensors are not LoRA targets


def _atomic_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _merged_config(config: dict, base_label: str | None) -> dict:
    """A merged adapter's config from the first adapter's: it describes the base the merge used, not what that
    adapter named (another repo, a revision, an ``auto_mapping`` naming a package AutoPeftModel would import)."""
    out = dict(config)
    # None: a base held in memory (a state dict), which no path names: not its label "base state dict", which
    # AutoPeftModel would try as a hub id (hp73a c69), nor the first adapter's base, which the merge did not use
    out["base_model_name_or_path"] = base_label
    out["revision"] = None  # the base above is named as merged: a local folder or the cache snapshot read
    out.pop("auto_mapping", None)
    # the merged modules are named one by one in target_modules: the first adapter's own selection must not drop any
    # of them (hp56 c126, c165: its exclude_modules made PEFT skip another adapter's merged v_proj silently). Set to
    # None only where the first config has the key: an older PEFT's config class refuses keys it does not know
    for key in ("exclude_modules", "layers_to_transform", "layers_pattern"):
        if key in out:
            out[key] = None
    return out


def _product_past(b: torch.Tensor, a: torch.Tensor, dtype: torch.dtype) -> float | None:
    """max |B·A| of the factors B (out, r) and A (r, in) as written, where it is past ``dtype``'s range (float16,
    bfloat16), else None."""
    if dtype not in (torch.float16, torch.bfloat16):
        return None  # float32 and wider: the merged τ was checked finite in float32 already
    if not (bool(torch.isfinite(b).all()) and bool(torch.isfinite(a).all())):
        return None  # the factors themselves overflowed: the writer's check refuses them, with its own message
    largest = float((b.float() @ a.float()).abs().max()) if b.numel() and a.numel() else 0.0
    return None if not largest > float(torch.finfo(dtype).max) else largest  # (a NaN product: not said here)


def _warn_products_past(past: dict[str, float], dtype: torch.dtype, *, base: bool = False) -> None:
    """One warning for the tensors whose factors fit ``dtype`` but whose product does not: PEFT upcasts
    float16/bfloat16 adapters to float32 by default (autocast_adapter_dtype), so the adapter works on a float32
    model, but B·A formed in the narrow dtype (a float16 model, merge_and_unload) is Inf. ``base``: the factors
    are wider, and ``dtype`` is the base's own: merged into it, the update is Inf (hostile pass 29, N8)."""
    if not past:
        return
    name_of = str(dtype).removeprefix("torch.")
    worst = max(past, key=past.__getitem__)
    others = f" (and {len(past) - 1} other tensor(s))" if len(past) > 1 else ""
    said = (f"past the largest value of the base's {name_of} ({float(torch.finfo(dtype).max):.3g}): merged into "
            f"the {name_of} base (merge_and_unload), it is Inf; it works only on the base upcast to float32" if base
            else f"past {name_of}'s largest value {float(torch.finfo(dtype).max):.3g}: its {name_of} factors are "
            f"finite and work on a float32 model (PEFT upcasts them), but B·A formed in {name_of} (a {name_of} "
            "model, merge_and_unload) is Inf")
    warnings.warn(MergeWarning(
        f"the merged update of {worst!r}{others} reaches |B·A| = {past[worst]:.3g}, {said}; a smaller lam"
        + ("" if base else ", or --dtype float32,") + " avoids it"), stacklevel=3)


def write_lora_adapter(directory: Path, first: LoraCheckpoint, adapters: list[LoraCheckpoint],
                       sink: LoraFactorSink, base_values: dict[str, torch.Tensor],
                       dtype: DType | torch.dtype, base_label: str | None = None,
                       base_dtypes: dict[str, torch.dtype] | None = None) -> dict:
    """adapter_config.json + adapter_model.safetensors in ``directory``; returns the manifest part.
    ``base_dtypes``: the base's dtype of adapted tensors stored narrower than float32 (an update past it warns)."""
    out_dtype = as_dtype(dtype).torch
    tensors: dict[str, torch.Tensor] = {}
    modules: list[str] = []
    errors: dict[str, float] = {}
    rounding: dict[str, float] = {}  # modules whose error is mostly the output dtype's rounding of the factors
    past: dict[str, float] = {}  # tensors whose factors fit out_dtype but whose product does not
    past_base: dict[torch.dtype, dict[str, float]] = {}  # ... whose product does not fit the base's narrow dtype
    for name, factored in sink.factors.items():
        target = sink.targets[name]
        modules.append(target.module)
        key = PEFT_PREFIX + target.module
        a_suffix, b_suffix = (".lora_embedding_A", ".lora_embedding_B") if target.embedding else \
            (".lora_A.weight", ".lora_B.weight")
        tensors[key + a_suffix] = factored.a.to(out_dtype).contiguous()
        tensors[key + b_suffix] = factored.b.to(out_dtype).contiguous()
        largest = _product_past(tensors[key + b_suffix], tensors[key + a_suffix], out_dtype)
        if largest is not None:
            past[name] = largest
        elif name in (base_dtypes or {}):  # wider factors: the update must still fit the base it is merged into
            largest = _product_past(tensors[key + b_suffix], tensors[key + a_suffix], base_dtypes[name])
            if largest is not None:
                past_base.setdefault(base_dtypes[name], {})[name] = largest
        errors[target.module] = factored.relative_error
        if out_dtype != torch.float32 and factored.norm > 0:  # the factors as written, not as computed (hp38 C29):
            # ‖τ − B'A'‖ ≤ ‖τ − BA‖ + ‖BA − B'A'‖, the rounding of float16 factors (3e-4) past the truncation's 4e-8
            # in float64: factors of a huge lam (1e36) overflow float32 in the product's norm (hp39 C29: "inf")
            rounded = tensors[key + b_suffix].double() @ tensors[key + a_suffix].double()  # (out, in)
            if not bool(rounded.any()):  # every factor rounded to 0: the adapter changes nothing there, which no rank
                # helps (hp73a c15: lora_alpha 1e-30 in float16, said as "pass a larger --rank", exit 0)
                exact = factored.b.double() @ factored.a.double()
                raise InvalidTensorError(
                    f"{target.module}: the merged update (largest |ΔW| {float(exact.abs().max()):.2g}) underflows "
                    f"{as_dtype(dtype).name}: its LoRA factors round to 0 there, so the adapter would change nothing",
                    hint="write the adapter in float32 (--dtype float32), or check the adapters' lora_alpha and "
                         "factors (an update this small is no training)")
            drift = float(torch.linalg.matrix_norm(factored.b.double() @ factored.a.double() - rounded)) / factored.norm
            errors[target.module] = factored.relative_error + drift
            if drift > factored.relative_error:  # the dtype's rounding, not the rank, loses the most (hp74a c11, c12)
                rounding[target.module] = drift
    _warn_products_past(past, out_dtype)
    _warn_truncation({k: v for k, v in errors.items() if k not in rounding}, sink,
                     sum(max((t.rank for t in a.targets.values()), default=0) for a in adapters))
    _warn_rounding(rounding, dtype)
    for narrow, tensors_past in past_base.items():
        _warn_products_past(tensors_past, narrow, base=True)
    saved_whole: list[str] = []
    for name, tau in sink.full.items():
        key = next(k for a in adapters if (k := a.full_key(name)) is not None)
        tensors[key] = (base_values[name].float() + tau).to(out_dtype).contiguous()
        saved_whole.append(key)
    config = _merged_config(first.config, base_label)
    to_save = sorted({m for a in adapters for m in (a.config.get("modules_to_save") or [])})
    config.update({"r": sink.rank, "lora_alpha": sink.rank, "use_rslora": False, "rank_pattern": {},
                   "alpha_pattern": {}, "target_modules": sorted(modules), "modules_to_save": to_save or None,
                   "inference_mode": True, "fan_in_fan_out": any(sink.targets[n].transposed and not
                                                                 sink.targets[n].embedding for n in sink.factors)})
    for key, value in tensors.items():  # the output dtype may overflow where float32 did not
        check_finite(key, value, as_dtype(dtype).code or "")
    _save(tensors, directory / ADAPTER_WEIGHTS)
    as_if_created(directory / ADAPTER_WEIGHTS)  # safetensors writes 0600: the umask's mode, as the other files
    _atomic_json(directory / ADAPTER_CONFIG, config)
    return {"kind": "lora", "rank": sink.rank, "files": [ADAPTER_CONFIG, ADAPTER_WEIGHTS],
            "relative_reconstruction_error": dict(sorted(errors.items())),
            "max_relative_reconstruction_error": max(errors.values(), default=0.0),
            "saved_whole": sorted(saved_whole)}


# a merged adapter this far from the merge (‖τ − B·A‖ / ‖τ‖) is another model than the full-model output: said, with
# the rank that would hold it (hp37 C78: two rank-4 adapters at the default rank 4 lost 53% of a module, said in an
# info line only)
TRUNCATION_WARNING = 0.1


def _warn_truncation(errors: dict[str, float], sink: Any, summed: int = 0) -> None:
    # a non-finite error is an overflow, said by its own check, not a rank too small (hp55 c64: "relative error of
    # nan ... pass a larger --rank")
    errors = {k: v for k, v in errors.items() if math.isfinite(v)}
    worst = max(errors, key=errors.get, default=None)
    if worst is None or errors[worst] <= TRUNCATION_WARNING:
        return
    shapes = [tuple(sink._shapes[n][-2:]) for n in sink.factors if len(sink._shapes.get(n, ())) >= 2]
    most = max((min(s) for s in shapes), default=sink.rank)
    warnings.warn(MergeWarning(
        f"the merged LoRA adapter at rank {sink.rank} holds the merge of {worst!r} only to a relative error of "
        f"{errors[worst]:.2g} (‖ΔW − B·A‖ / ‖ΔW‖; {sum(e > TRUNCATION_WARNING for e in errors.values())} of "
        f"{len(errors)} modules above {TRUNCATION_WARNING:g}): a merge of several adapters has up to the sum of their "
        f"ranks ({summed} here; a sum of them is exact at that rank), and a trimmed one more; pass a larger --rank "
        f"(rank=..., at most {most}), or write a full model"),
        stacklevel=3)


def _warn_rounding(rounding: dict[str, float], dtype: DType | torch.dtype) -> None:
    """Modules whose merged update the output dtype's rounding of the factors loses more of than the rank does
    (factors in float16's subnormals: 0.33 of a module, said as "pass a larger --rank", which gave the same at the
    largest rank, hp74a c11, c12, c59)."""
    worst = max(rounding, key=rounding.get, default=None)
    if worst is None or rounding[worst] <= TRUNCATION_WARNING:
        return
    name = as_dtype(dtype).name
    warnings.warn(MergeWarning(
        f"the merged LoRA adapter holds {worst!r} only to a relative error of {rounding[worst]:.2g} of {name}'s "
        f"rounding ({sum(e > TRUNCATION_WARNING for e in rounding.values())} module(s) above {TRUNCATION_WARNING:g}): "
        f"its factors are too small for {name}'s precision (below its normal range), which no rank changes; write "
        "the adapter in float32 (--dtype float32)"), stacklevel=3)


def _save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """``save_file``, its OS errors (a full disk, a file-size limit: hp54 c24, "an unexpected SafetensorError") said
    as every output's are, naming the file."""
    import re

    from ..paths import write_error

    try:
        save_file(tensors, str(path), metadata={"format": "pt"})
    except Exception as exc:  # safetensors' own error type wraps the OS's: "... (os error 27)"
        found = re.search(r"os error (\d+)", str(exc))
        if found is None:
            raise
        code = int(found.group(1))
        raise write_error(path, OSError(code, os.strerror(code), str(path))) from None


def write_ia3_adapter(directory: Path, first_config: dict, vectors: dict[str, torch.Tensor],
                      modules: dict[str, str], dtype: DType | torch.dtype, base_label: str | None = None) -> dict:
    """The merged (IA)³ vectors l_m (names: base weights) under PEFT's keys; returns the manifest part."""
    out_dtype = as_dtype(dtype).torch
    tensors = {f"{PEFT_PREFIX}{modules[name]}.ia3_l": value.to(out_dtype).contiguous()
               for name, value in vectors.items()}
    feedforward = sorted(modules[n] for n, v in vectors.items() if v.shape[0] == 1)
    config = _merged_config(first_config, base_label)
    config.update({"target_modules": sorted(modules[n] for n in vectors), "feedforward_modules": feedforward,
                   "inference_mode": True})
    lost = [key for (name, exact), key in zip(vectors.items(), tensors)
            if out_dtype != torch.float32 and bool((exact.float() != 1).any()) and not bool((tensors[key] != 1).any())]
    if lost and len(lost) == len(tensors):  # every vector rounds to exactly 1: an adapter that changes nothing
        # (hp73a c61: l = 1 + 1e-4 in float16 and bfloat16, written as ones, exit 0)
        worst = max(float((vectors[name].float() - 1).abs().max()) for name in vectors)
        raise InvalidTensorError(
            f"the merged (IA)³ vectors differ from 1 by at most {worst:.2g}, below {as_dtype(dtype).name}'s spacing "
            f"at 1: every one rounds to exactly 1 there, so the adapter would change nothing (first {lost[0]!r})",
            hint="write the adapter in float32 (--dtype float32)")
    if out_dtype != torch.float32:
        _warn_ia3_rounding(vectors, tensors, dtype)
    for key, value in tensors.items():
        check_finite(key, value, as_dtype(dtype).code or "")
        largest = float(value.float().abs().max()) if value.numel() else 0.0
        if largest > MAX_IA3_FACTOR:  # an adapter tiesmerge (and any reader trusting trained factors) refuses back
            raise InvalidTensorError(  # (hp60a c37: written at 3.47e29 with --lam 1e30, refused as "damaged")
                f"the merged (IA)³ vector {key!r} scales the weights by up to {largest:.9g}, beyond any trained "
                f"adapter (at most {MAX_IA3_FACTOR:g}; tiesmerge refuses such an adapter as an input)",
                hint="bring --lam closer to 0 (the merged vector is 1 + λ·τ)")
    _save(tensors, directory / ADAPTER_WEIGHTS)
    as_if_created(directory / ADAPTER_WEIGHTS)  # safetensors writes 0600: the umask's mode, as the other files
    _atomic_json(directory / ADAPTER_CONFIG, config)
    return {"kind": "ia3", "files": [ADAPTER_CONFIG, ADAPTER_WEIGHTS], "vectors": len(tensors)}


def _warn_ia3_rounding(vectors: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor],
                       dtype: DType | torch.dtype) -> None:
    """(IA)³ vectors l = 1 + change whose change the output dtype's spacing at 1 (bfloat16: 0.0078) mostly rounds
    away: the adapter is another one than the merge (hp75a c24: seven of eight entries at 1.0015 written as 1.0 in
    bfloat16, exit 0). Said where the change of a vector is off by more than TRUNCATION_WARNING, as LoRA's rounding."""
    worst_key, worst, lost, changed = None, 0.0, 0, 0
    for exact, key in zip(vectors.values(), tensors):
        change = exact.double() - 1  # (d,)
        norm = float(torch.linalg.vector_norm(change))
        if norm == 0.0:
            continue
        written = tensors[key].double() - 1
        error = float(torch.linalg.vector_norm(written - change)) / norm
        moved = change != 0
        changed += int(moved.sum())
        lost += int((moved & (written == 0)).sum())
        if error > worst:
            worst_key, worst = key, error
    if worst_key is None or worst <= TRUNCATION_WARNING:
        return
    name = as_dtype(dtype).name
    spacing = float(torch.finfo(as_dtype(dtype).torch).eps)
    warnings.warn(MergeWarning(
        f"the merged (IA)³ adapter holds the change of {worst_key!r} only to a relative error of {worst:.2g} of "
        f"{name}'s rounding at 1 (spacing {spacing:.2g}); {lost} of the {changed} entries that change the weights "
        f"round to exactly 1 and change nothing; write the adapter in float32 (--dtype float32)"), stacklevel=3)
