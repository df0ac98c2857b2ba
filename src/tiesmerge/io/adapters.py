"""PEFT adapter directories read as task vectors: LoRA (ΔW = s · B · A) and (IA)³ (τ = l − 1).

An adapter is a checkpoint like any other, except that what it yields is already the task
vector: ``read(name, rows)`` returns τ's rows in float32, computed on the fly from the adapter's
factors (one module, one row chunk at a time; never the whole model). The engine takes these
rows as τ instead of subtracting the base (``yields_task_vector``).

Tensor names follow the base model's: an adapter is *bound* to the base (``bind``), which maps
PEFT's keys (``base_model.model.<module>.lora_A.weight``) to the base's tensor names and checks
every shape. A base tensor the adapter does not target has τ = 0.

- LoRA: per target module ΔW = s · B · A with s = α / r (rsLoRA: α / √r; ``alpha_pattern`` per
  module), r the module's own rank, so adapters of different ranks merge together. Embedding
  LoRA and ``fan_in_fan_out`` layers store the transpose: ΔW = s · (B · A)ᵀ. Full tensors saved
  beside the factors (``modules_to_save``, trained biases) give τ = saved − base.
- (IA)³: the learned scaling vectors l start at 1, so τ = l − 1 (the paper's PEFT experiments
  merge these). Merging happens in l-space against an all-ones "base" (``ia3_identity``);
  the merged vectors can be written back as an adapter or folded into the base's weights.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import CheckpointError, IncompatibleCheckpointsError
from .checkpoint import Checkpoint, SafetensorsCheckpoint, StateDictCheckpoint, TensorInfo

__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "PEFT_PREFIX", "is_adapter_dir", "open_adapter", "LoraCheckpoint",
           "Ia3Checkpoint", "LoraTarget", "ia3_identity", "ZeroBase", "yields_task_vector", "adapter_kind"]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
_UNSUPPORTED_LORA = {  # config keys whose non-default value changes what ΔW is
    "use_dora": "DoRA adds a learned magnitude vector, so ΔW is not s·B·A",
    "target_parameters": "LoRA on raw parameters (target_parameters) has no module weight to add to",
    "layer_replication": "layer replication changes the base model's layout",
    "use_qalora": "QA-LoRA pools the inputs, so ΔW is not s·B·A",
}


def is_adapter_dir(path: Path) -> bool:
    return path.is_dir() and (path / ADAPTER_CONFIG).is_file()


def yields_task_vector(ckpt: Checkpoint) -> bool:
    return bool(getattr(ckpt, "yields_task_vector", False))


def adapter_kind(models: list[Checkpoint]) -> str | None:
    """"lora", "ia3" or None (no adapters); mixing (IA)³ with anything else is an error."""
    kinds = {getattr(m, "adapter_kind", None) for m in models}
    if "ia3" in kinds and len(kinds) > 1:
        raise IncompatibleCheckpointsError(
            "(IA)³ adapters merge only with other (IA)³ adapters: their task vectors are scaling vectors, "
            "not weight changes",
            hint="merge the (IA)³ adapters on their own, or fold each into its base model first")
    return "ia3" if "ia3" in kinds else "lora" if "lora" in kinds else None


def _strip(key: str, suffix: str) -> str:
    module = key[: -len(suffix)] if suffix and key.endswith(suffix) else key
    return module[len(PEFT_PREFIX):] if module.startswith(PEFT_PREFIX) else module


def _resolve(module: str, suffix: str, base: Checkpoint, label: str, key: str) -> str:
    """The base tensor name of ``module + suffix``: exact, else with leading module components
    dropped (an adapter trained on a task head wrapper, e.g. ``bert.``), else the one base name
    ending with it (a base saved under a wrapper prefix)."""
    names = set(base.names())
    parts = module.split(".")
    for start in range(len(parts)):
        candidate = ".".join(parts[start:]) + suffix
        if candidate in names:
            return candidate
    ending = [n for n in names if n.endswith("." + module + suffix)]
    if len(ending) == 1:
        return ending[0]
    raise IncompatibleCheckpointsError(
        f"{label}: adapter tensor {key!r} targets module {module!r}, but the base ({base.label}) has "
        + (f"{len(ending)} tensors ending in {module + suffix!r}" if ending else f"no tensor {module + suffix!r}"),
        hint="the adapter was trained on another base model; pass the base it was trained from")


def _pattern_value(patterns: dict, module: str, default: float) -> float:
    """PEFT's rank/alpha pattern lookup: a key matches a module name ending with it (a regex)."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return float(value)
    return default


def _read_adapter_dir(path: Path, label: str) -> tuple[dict, SafetensorsCheckpoint]:
    try:
        config = json.loads((path / ADAPTER_CONFIG).read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path / ADAPTER_CONFIG}: not a readable JSON file ({exc})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path / ADAPTER_CONFIG}: holds a {type(config).__name__}, not a mapping")
    weights = path / ADAPTER_WEIGHTS
    if not weights.is_file():
        pickled = path / "adapter_model.bin"
        raise CheckpointError(
            f"{path}: no {ADAPTER_WEIGHTS}" + (" (only adapter_model.bin, a pickle)" if pickled.is_file() else ""),
            hint="save the adapter with safe_serialization=True (PEFT's default) or convert it to safetensors")
    return config, SafetensorsCheckpoint(weights, [weights], {}, label)


@dataclass(frozen=True)
class LoraTarget:
    """One LoRA-adapted module, bound to a base tensor."""

    module: str  # the module's path in the PEFT model, e.g. "model.layers.0.self_attn.q_proj"
    a_key: str
    b_key: str
    rank: int
    scale: float  # alpha / r, or alpha / sqrt(r) with rsLoRA
    transposed: bool  # embedding or fan_in_fan_out: ΔW = s (B A)^T
    embedding: bool


class LoraCheckpoint:
    """A PEFT LoRA adapter directory, read as the task vectors ΔW = s · B · A of its modules."""

    yields_task_vector = True
    adapter_kind = "lora"

    def __init__(self, path: Path, label: str) -> None:
        self.label = label
        self.path = path
        self.config, self._file = _read_adapter_dir(path, label)
        if str(self.config.get("peft_type", "")).upper() != "LORA":
            self._file.close()
            raise CheckpointError(f"{path}: peft_type is {self.config.get('peft_type')!r}, expected LORA")
        bad = [f"{k} ({why})" for k, why in _UNSUPPORTED_LORA.items() if self.config.get(k)]
        if bad:
            self._file.close()
            raise CheckpointError(f"{path}: this LoRA variant is not supported: {'; '.join(bad)}",
                                  hint="merge the adapter into its base model (PeftModel.merge_and_unload) and "
                                       "merge the full model instead")
        self._factors: dict[str, tuple[str, str, bool]] = {}  # module -> (A key, B key, embedding)
        self._full: dict[str, str] = {}  # module-less key -> saved full tensor key
        keys = self._file.names()
        for key in keys:
            for a_suffix, b_suffix, embedding in ((".lora_A.weight", ".lora_B.weight", False),
                                                  (".lora_embedding_A", ".lora_embedding_B", True)):
                if key.endswith(a_suffix):
                    module = _strip(key, a_suffix)
                    b_key = key[: -len(a_suffix)] + b_suffix
                    if b_key not in keys:
                        self._file.close()
                        raise CheckpointError(f"{path / ADAPTER_WEIGHTS}: {key!r} has no matching {b_key!r}")
                    self._factors[module] = (key, b_key, embedding)
            if ".lora_" not in key:
                # modules_to_save and trained biases are stored whole
                # (PEFT also saves an adapted embedding's own weight, as <module>.base_layer.weight)
                plain = key.replace(".modules_to_save.default", "").replace(".modules_to_save", "")
                self._full[plain.replace(".base_layer.", ".")] = key
        if not self._factors and not self._full:
            self._file.close()
            raise CheckpointError(f"{path / ADAPTER_WEIGHTS}: holds no LoRA factors")
        self.targets: dict[str, LoraTarget] = {}  # base tensor name -> target, after bind
        self._full_bound: dict[str, str] = {}  # base tensor name -> saved key
        self._base: Checkpoint | None = None

    # ------------------------------------------------------------------ binding to the base
    def bind(self, base: Checkpoint) -> None:
        """Map every adapted module to a base tensor and check the shapes (raises on mismatch)."""
        if self._base is not None:
            return  # bound once, to the real base (a zero base stands in for it in some merges)
        alpha = float(self.config.get("lora_alpha", 8))
        rs = bool(self.config.get("use_rslora", False))
        fan_in_fan_out = bool(self.config.get("fan_in_fan_out", False))
        targets: dict[str, LoraTarget] = {}
        for module, (a_key, b_key, embedding) in self._factors.items():
            name = _resolve(module, ".weight", base, self.label, a_key)
            a, b = self._file.info(a_key).shape, self._file.info(b_key).shape
            rank = a[0]
            if len(a) != 2 or len(b) != 2 or b[1] != rank:
                raise IncompatibleCheckpointsError(
                    f"{self.label}: LoRA factors of {module!r} have shapes A {tuple(a)} and B {tuple(b)}; "
                    "expected A (r, in) and B (out, r)")
            transposed = embedding or fan_in_fan_out
            full = (a[1], b[0]) if transposed else (b[0], a[1])
            if tuple(base.info(name).shape) != full:
                raise IncompatibleCheckpointsError(
                    f"{self.label}: LoRA of {module!r} has B·A of shape {(b[0], a[1])}, which does not fit the base "
                    f"tensor {name!r} {tuple(base.info(name).shape)}",
                    hint="the adapter was trained on another base model; pass the base it was trained from")
            module_alpha = _pattern_value(self.config.get("alpha_pattern"), module, alpha)
            scale = module_alpha / (math.sqrt(rank) if rs else rank)
            targets[name] = LoraTarget(module, a_key, b_key, rank, scale, transposed, embedding)
        full_bound: dict[str, str] = {}
        for plain, key in self._full.items():
            name = _resolve(_strip(plain, ""), "", base, self.label, key)
            if tuple(base.info(name).shape) != tuple(self._file.info(key).shape):
                raise IncompatibleCheckpointsError(
                    f"{self.label}: saved tensor {key!r} {tuple(self._file.info(key).shape)} does not fit the base "
                    f"tensor {name!r} {tuple(base.info(name).shape)}")
            full_bound[name] = key
        self.targets, self._full_bound, self._base = targets, full_bound, base

    def _require_bound(self) -> Checkpoint:
        if self._base is None:
            raise RuntimeError(f"{self.label}: bind(base) the adapter before reading it")
        return self._base

    # ------------------------------------------------------------------ the Checkpoint protocol
    def names(self) -> list[str]:
        self._require_bound()
        return [*self.targets, *(n for n in self._full_bound if n not in self.targets)]

    def info(self, name: str) -> TensorInfo:
        return TensorInfo(tuple(self._require_bound().info(name).shape), torch.float32)

    def read(self, name: str, rows: slice | None = None) -> torch.Tensor:
        """τ's rows in float32: s · B[rows] · A (or its transpose), saved − base, or zeros."""
        base = self._require_bound()
        target = self.targets.get(name)
        key = self._full_bound.get(name)
        saved = None if key is None else self._file.read(key, rows).float().sub_(base.read(name, rows).float())
        if target is not None:
            if target.transposed:  # ΔW = s (B A)^T: rows of ΔW are columns of A
                a = self._file.read(target.a_key).float()  # (r, rows_total)
                a = a if rows is None else a[:, rows]
                b = self._file.read(target.b_key).float()  # (cols, r)
                delta = (a.T @ b.T).mul_(target.scale)  # (rows, cols)
            else:
                b = self._file.read(target.b_key, rows).float()  # (rows, r)
                delta = (b @ self._file.read(target.a_key).float()).mul_(target.scale)  # (rows, in)
            # a saved copy of the adapted weight (an embedding's base_layer) adds its own change
            return delta if saved is None else delta.add_(saved)
        if saved is not None:
            return saved
        shape = list(base.info(name).shape)
        if rows is not None and shape:
            shape[0] = len(range(*rows.indices(shape[0])))
        return torch.zeros(shape, dtype=torch.float32)

    def location(self, name: str) -> str:
        return str(self.path / ADAPTER_WEIGHTS)

    def files(self) -> list[Path]:
        return [self.path / ADAPTER_CONFIG, self.path / ADAPTER_WEIGHTS]

    def directory(self) -> Path | None:
        return self.path

    def full_key(self, name: str) -> str | None:
        """The adapter's key of a tensor it stores whole (modules_to_save, biases), or None."""
        return self._full_bound.get(name)

    def close(self) -> None:
        self._file.close()


class Ia3Checkpoint:
    """A PEFT (IA)³ adapter directory, read as τ = l − 1 of its scaling vectors.

    Names are the base weights the vectors scale; shapes are the vectors' own: (out, 1) for a
    module whose output is scaled, (1, in) for a feed-forward module whose input is scaled.
    """

    yields_task_vector = True
    adapter_kind = "ia3"

    def __init__(self, path: Path, label: str) -> None:
        self.label = label
        self.path = path
        self.config, self._file = _read_adapter_dir(path, label)
        if str(self.config.get("peft_type", "")).upper() != "IA3":
            self._file.close()
            raise CheckpointError(f"{path}: peft_type is {self.config.get('peft_type')!r}, expected IA3")
        self._vectors = {_strip(k, ".ia3_l"): k for k in self._file.names() if k.endswith(".ia3_l")}
        other = [k for k in self._file.names() if not k.endswith(".ia3_l")]
        if other:
            self._file.close()
            raise CheckpointError(f"{path / ADAPTER_WEIGHTS}: holds {len(other)} tensor(s) that are not (IA)³ vectors, "
                                  f"first {other[0]!r} (modules_to_save are not supported for (IA)³)")
        if not self._vectors:
            self._file.close()
            raise CheckpointError(f"{path / ADAPTER_WEIGHTS}: holds no (IA)³ vectors (keys ending in .ia3_l)")
        self.modules: dict[str, str] = {}  # base weight name -> module path, after bind
        self._keys: dict[str, str] = {}  # base weight name -> adapter key
        self.bound = False

    def bind(self, base: Checkpoint) -> None:
        """Map every vector to the base weight it scales; check it broadcasts against the weight.

        Binding against an (IA)³ identity (names already the base's, shapes the vectors') only
        checks the shapes, so the same adapter can be aligned against either."""
        if self.bound:
            for name, key in self._keys.items():
                if name not in base.names() or tuple(base.info(name).shape) != tuple(self._file.info(key).shape):
                    raise IncompatibleCheckpointsError(f"{self.label}: (IA)³ vector {key!r} does not fit {name!r}")
            return
        for module, key in self._vectors.items():
            name = _resolve(module, ".weight", base, self.label, key)
            weight = tuple(base.info(name).shape)
            shape = tuple(self._file.info(key).shape)
            fits = len(weight) == 2 and shape in ((weight[0], 1), (1, weight[1]))
            if not fits:
                raise IncompatibleCheckpointsError(
                    f"{self.label}: (IA)³ vector {key!r} {shape} does not scale the rows or the columns of the base "
                    f"tensor {name!r} {weight}",
                    hint="the adapter was trained on another base model; pass the base it was trained from")
            self.modules[name] = module
            self._keys[name] = key
        self.bound = True

    def names(self) -> list[str]:
        return list(self._keys)

    def info(self, name: str) -> TensorInfo:
        return TensorInfo(tuple(self._file.info(self._keys[name]).shape), torch.float32)

    def read(self, name: str, rows: slice | None = None) -> torch.Tensor:
        if name not in self._keys:  # a vector another adapter has and this one lacks: l = 1
            raise KeyError(name)
        return self._file.read(self._keys[name], rows).float().sub_(1.0)

    def location(self, name: str) -> str:
        return str(self.path / ADAPTER_WEIGHTS)

    def files(self) -> list[Path]:
        return [self.path / ADAPTER_CONFIG, self.path / ADAPTER_WEIGHTS]

    def directory(self) -> Path | None:
        return self.path

    def is_feedforward(self, name: str) -> bool:
        return self._file.info(self._keys[name]).shape[0] == 1

    def close(self) -> None:
        self._file.close()


class _Ia3Union:
    """An (IA)³ adapter seen over the union of every adapter's vectors: a vector it lacks is
    l = 1, so τ = 0."""

    yields_task_vector = True
    adapter_kind = "ia3"

    def __init__(self, adapter: Ia3Checkpoint, shapes: dict[str, tuple[int, ...]]) -> None:
        self.adapter, self._shapes, self.label = adapter, shapes, adapter.label

    def bind(self, base: Checkpoint) -> None:
        pass  # bound when the identity was built

    def names(self) -> list[str]:
        return self.adapter.names()

    def info(self, name: str) -> TensorInfo:
        return TensorInfo(self._shapes[name], torch.float32)

    def read(self, name: str, rows: slice | None = None) -> torch.Tensor:
        if name in self.adapter.names():
            return self.adapter.read(name, rows)
        shape = list(self._shapes[name])
        if rows is not None:
            shape[0] = len(range(*rows.indices(shape[0])))
        return torch.zeros(shape, dtype=torch.float32)

    def location(self, name: str) -> str:
        return self.adapter.location(name)

    def files(self) -> list[Path]:
        return self.adapter.files()

    def directory(self) -> Path | None:
        return self.adapter.directory()

    def close(self) -> None:
        self.adapter.close()


def ia3_identity(base: Checkpoint, adapters: list[Ia3Checkpoint]) -> tuple[StateDictCheckpoint, list[_Ia3Union]]:
    """The l-space "base" of an (IA)³ merge, all ones over the union of the adapters' vectors,
    and each adapter seen over that union. Merging against it gives l_m = 1 + λ·τ_m."""
    shapes: dict[str, tuple[int, ...]] = {}
    for adapter in adapters:
        adapter.bind(base)
        for name in adapter.names():
            shape = tuple(adapter.info(name).shape)
            if shapes.setdefault(name, shape) != shape:
                raise IncompatibleCheckpointsError(
                    f"(IA)³ vectors for {name!r} differ in shape: {shapes[name]} and {shape} ({adapter.label}); "
                    "one adapter scales the module's inputs, the other its outputs",
                    hint="list the module under feedforward_modules in both adapters' configs, or in neither")
    ones = {name: torch.ones(shape, dtype=torch.float32) for name, shape in shapes.items()}
    return StateDictCheckpoint(ones, "(IA)³ identity (l = 1)"), [_Ia3Union(a, shapes) for a in adapters]


class ZeroBase:
    """The base's names, shapes and dtypes, with every value 0.

    Merging adapters (which yield τ directly) against it returns λ·τ_m itself rather than
    base + λ·τ_m: what a merged adapter is factored from, with no base added and subtracted."""

    def __init__(self, base: Checkpoint) -> None:
        self.base, self.label = base, base.label

    def names(self) -> list[str]:
        return self.base.names()

    def info(self, name: str) -> TensorInfo:
        return self.base.info(name)

    def read(self, name: str, rows: slice | None = None) -> torch.Tensor:
        info = self.base.info(name)
        shape = list(info.shape)
        if rows is not None and shape:
            shape[0] = len(range(*rows.indices(shape[0])))
        return torch.zeros(shape, dtype=info.dtype)

    def location(self, name: str) -> str:
        return self.base.location(name)

    def files(self) -> list[Path]:
        return self.base.files()

    def directory(self) -> Path | None:
        return self.base.directory()

    def close(self) -> None:
        pass


def open_adapter(path: Path, label: str) -> LoraCheckpoint | Ia3Checkpoint:
    """A PEFT adapter directory, by its ``peft_type``."""
    try:
        kind = str(json.loads((path / ADAPTER_CONFIG).read_text()).get("peft_type", "")).upper()
    except (OSError, ValueError, AttributeError) as exc:
        raise CheckpointError(f"{path / ADAPTER_CONFIG}: not a readable adapter config ({exc})") from None
    if kind == "LORA":
        return LoraCheckpoint(path, label)
    if kind == "IA3":
        return Ia3Checkpoint(path, label)
    raise CheckpointError(f"{path}: PEFT adapters of type {kind or '(none)'} are not supported",
                          hint="tiesmerge reads LoRA and (IA)³ adapters")
