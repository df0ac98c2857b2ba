"""PEFT (IA)³ adapters read as task vectors τ = l − 1 of their learned scaling vectors.

The vectors l start at 1, so τ = l − 1 (the paper's PEFT experiments merge these). Merging
happens in l-space against an all-ones "base" (``ia3_identity``); the merged vectors can be
written back as an adapter or folded into the base's weights. Binding and shapes need no
torch; the values (``read``) do.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..dtypes import FLOAT32
from ..errors import CheckpointError, IncompatibleCheckpointsError, InvalidTensorError
from .peft import ADAPTER_CONFIG, ADAPTER_WEIGHTS, BaseNames, bind_once, one_key_per_module, read_adapter_dir, strip_key
from .peft_targets import base_model_types, check_adapted, conv1d_layout, feedforward, warn_layout_unknown
from .protocol import Checkpoint, TensorInfo, rows_shape

if TYPE_CHECKING:
    import torch

__all__ = ["Ia3Checkpoint", "Ia3Folded", "Ia3Identity", "ia3_identity"]


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
        self.config, self._file = read_adapter_dir(path, label)
        if str(self.config.get("peft_type", "")).upper() != "IA3":
            self._file.close()
            raise CheckpointError(f"{path}: peft_type is {self.config.get('peft_type')!r}, expected IA3")
        self._vectors: dict[str, str] = {}  # module -> its vector's key
        for k in self._file.names():
            if k.endswith(".ia3_l"):
                try:
                    one_key_per_module(self._vectors, strip_key(k, ".ia3_l"), k, path / ADAPTER_WEIGHTS)
                except CheckpointError:
                    self._file.close()
                    raise
        other = [k for k in self._file.names() if not k.endswith(".ia3_l")]
        layer = next((k for k in other if ".base_layer." in k), None)
        if layer is not None:  # hostile pass 32, C140: PEFT saves a tied layer's base weight when it adapts one
            self._file.close()
            raise CheckpointError(f"{path / ADAPTER_WEIGHTS}: holds {layer!r}, the base weight PEFT saves beside an "
                                  "adapter on a tied layer (an output head tied to the input embedding): an (IA)³ "
                                  "vector there scales the shared matrix, the embedding too, which tiesmerge does not "
                                  "merge",
                                  hint="merge the adapter into its base with PEFT (merge_and_unload) and merge the "
                                       "full model, or train it without the tied head in target_modules")
        if other:
            self._file.close()
            raise CheckpointError(f"{path / ADAPTER_WEIGHTS}: holds {len(other)} tensor(s) that are not (IA)³ vectors, "
                                  f"first {other[0]!r} (modules_to_save are not supported for (IA)³)",
                                  hint="merge the adapter into its base with PEFT (merge_and_unload) and merge "
                                       "the full model, or save the adapter without those tensors")  # hp30 N4
        if not self._vectors:
            self._file.close()
            raise CheckpointError(f"{path / ADAPTER_WEIGHTS}: holds no (IA)³ vectors (keys ending in .ia3_l)")
        self.modules: dict[str, str] = {}  # base weight name -> module path, after bind
        self.transposed: set[str] = set()  # base weights stored (in, out) (Conv1D): the vector scales the other axis
        self._keys: dict[str, str] = {}  # base weight name -> adapter key
        self.bound = False

    def bind(self, base: Checkpoint) -> None:
        """Map every vector to the base weight it scales; check it broadcasts against the weight.

        Binding against an (IA)³ identity (names already the base's, shapes the vectors') only
        checks the shapes, so the same adapter can be aligned against either."""
        if self.bound:
            held = set(base.names())
            for name, key in self._keys.items():
                if name not in held or tuple(base.info(name).shape) != tuple(self._file.info(key).shape):
                    raise IncompatibleCheckpointsError(f"{self.label}: (IA)³ vector {key!r} does not fit {name!r}")
            return
        source = str(self.path / ADAPTER_CONFIG)
        # IA3Config has no layers_to_transform or layers_pattern: PEFT ignores them (a warning) and loads every
        # vector, so they select nothing here either (hostile pass 32, C54)
        check_adapted({k: v for k, v in self.config.items() if k not in ("layers_to_transform", "layers_pattern")},
                      list(self._vectors), source)
        if self.config.get("feedforward_modules") is None:  # hostile pass 31, C30/C46: PEFT fills it from its table
            raise IncompatibleCheckpointsError(
                f"{source}: feedforward_modules is not set, so PEFT takes its own default for the model type (from its "
                "table, e.g. down_proj of a Llama) to decide which vectors scale inputs and which outputs; "
                "tiesmerge does not guess that table", hint="set feedforward_modules in the adapter config (a list, "
                                                          "[] for none; PEFT writes it when it saves an adapter)")
        targets, inputs = self.config.get("target_modules"), self.config.get("feedforward_modules")
        if isinstance(targets, list) and isinstance(inputs, list) and not set(inputs) <= set(targets):
            raise IncompatibleCheckpointsError(  # IA3Config's own check (hostile pass 32, C66)
                f"{source}: feedforward_modules names {sorted(set(inputs) - set(targets))[0]!r}, which target_modules "
                "does not: PEFT requires feedforward_modules to be a subset of target_modules and refuses the config",
                hint="fix feedforward_modules (or target_modules) in the adapter config")
        is_feedforward = feedforward(self.config, source)
        model_types = base_model_types(base)
        fan_in_fan_out = bool(self.config.get("fan_in_fan_out", False))
        warn_layout_unknown(model_types, list(self._vectors), fan_in_fan_out, source)
        base_names, claimed = BaseNames(base), {}
        for module, key in self._vectors.items():
            name = base_names.resolve(module, ".weight", self.label, key)
            bind_once(claimed, name, key, self.label)
            weight = tuple(base.info(name).shape)
            shape = tuple(self._file.info(key).shape)
            # (out, in) of the module: a transformers Conv1D stores its weight as (in, out), and PEFT then scales the
            # weight's columns for outputs and its rows for inputs (hostile pass 31, C17/C18)
            in_out = len(weight) == 2 and conv1d_layout(model_types, module, fan_in_fan_out)
            rows, cols = (weight + (None, None))[:2]
            outs, ins = (cols, rows) if in_out else (rows, cols)
            fits = len(weight) == 2 and shape in ((outs, 1), (1, ins))
            if fits and is_feedforward is not None:  # PEFT builds the vector by the config, whatever the file holds
                inputs = is_feedforward(module)
                want = (1, ins) if inputs else (outs, 1)
                if shape != want:  # PEFT cannot load it; for a square weight the shape alone would not even tell
                    raise IncompatibleCheckpointsError(
                        f"{source}: feedforward_modules {'names' if inputs else 'does not name'} {module!r}, so PEFT "
                        f"builds its vector as {want} (scaling the module's {'inputs' if inputs else 'outputs'}), but "
                        f"the adapter file holds {key!r} as {shape}",
                        hint="the config does not describe these weights: fix feedforward_modules, or save the "
                             "adapter again")
            layout = " (a Conv1D: its weight is stored (in, out))" if in_out else ""
            if not fits and len(shape) == 1 and len(weight) == 2 and shape[0] in weight:
                raise CheckpointError(
                    f"{self.label}: (IA)³ vector {key!r} is 1-D {shape}; PEFT stores one as a column ({outs}, 1) "
                    f"that scales the outputs of {name!r} {weight}{layout}, or as a row (1, {ins}) that scales its "
                    "inputs", hint="the adapter file was not written by PEFT's IA3 (or was reshaped since): save it "
                                   "again with PEFT")
            if not fits:
                raise IncompatibleCheckpointsError(
                    f"{self.label}: (IA)³ vector {key!r} {shape} scales neither the outputs ({outs}, 1) nor the inputs "
                    f"(1, {ins}) of the base tensor {name!r} {weight}{layout}",
                    hint="the adapter was trained on another base model; pass the base it was trained from")
            if in_out:
                self.transposed.add(name)
            stored = _stored_values(self._file, key)  # a few KB, checked now (without torch: the IO layer's rule)
            if stored is not None:
                _check_vector(stored, str(self.path / ADAPTER_WEIGHTS), key)
            self.modules[name] = module
            self._keys[name] = key
        self.bound = True

    def names(self) -> list[str]:
        return list(self._keys)

    def info(self, name: str) -> TensorInfo:
        return TensorInfo(tuple(self._file.info(self._keys[name]).shape), FLOAT32)

    def read(self, name: str, rows: slice | None = None) -> torch.Tensor:
        if name not in self._keys:  # a vector another adapter has and this one lacks: l = 1
            raise KeyError(name)
        vector = self._file.read(self._keys[name], rows).float()
        _check_vector(vector.numpy(), self.location(name), self._keys[name])
        return vector.sub_(1.0)

    def scaling_vector(self, name: str) -> torch.Tensor:
        """l of ``name`` as stored (its file's dtype), checked: a fold multiplies by it, where l − 1 in float32
        would round l (−0.3 − 1 is not exact)."""
        vector = self._file.read(self._keys[name])
        _check_vector(vector.float().numpy(), self.location(name), self._keys[name])
        return vector

    def location(self, name: str) -> str:
        return str(self.path / ADAPTER_WEIGHTS)

    def files(self) -> list[Path]:
        return [self.path / ADAPTER_CONFIG, self.path / ADAPTER_WEIGHTS]

    def directory(self) -> Path | None:
        return self.path

    def close(self) -> None:
        self._file.close()


class _AdapterView:
    """A view of one (IA)³ adapter (``self.adapter``): its files are the adapter's."""

    adapter: Ia3Checkpoint

    def location(self, name: str) -> str:
        return self.adapter.location(name)

    def files(self) -> list[Path]:
        return self.adapter.files()

    def directory(self) -> Path | None:
        return self.adapter.directory()

    def close(self) -> None:
        self.adapter.close()


class Ia3Folded(_AdapterView):
    """An (IA)³ adapter read as mergekit reads a MODEL+ADAPTER entry: PEFT's ``merge_and_unload`` folds l into the
    base as transformers loads it (each weight in its load dtype, :class:`~tiesmerge.io.load_dtypes.LoadDtypes`), and
    the merge reads the folded model. So τ = float(W·l, rounded to the weight's dtype) − float(W) per weight entry,
    and b·l − b for the bias of a module whose outputs are scaled (PEFT scales it too), not l − 1 in l-space (hp57a
    c46: a third of the entries of every scaled tensor trimmed and elected otherwise than mergekit)."""

    yields_task_vector = True
    adapter_kind = "ia3-folded"  # weight changes like a LoRA's: merged against the real base (io.peft.adapter_kind)

    def __init__(self, adapter: Ia3Checkpoint) -> None:
        self.adapter, self.label, self.path = adapter, adapter.label, adapter.path
        self._base: Checkpoint | None = None
        self._scaled: dict[str, tuple[str, bool]] = {}  # base tensor -> (its weight's name, a bias)
        self._dtypes: Any = None
        self._vectors: dict[str, torch.Tensor] = {}  # weight -> l as stored: read once (a weight's row chunks and
        # its bias share it; a few KB each)

    def bind(self, base: Checkpoint) -> None:
        from .load_dtypes import LoadDtypes

        if self._base is not None:
            return
        self.adapter.bind(base)
        held = set(base.names())
        for name in self.adapter.names():
            self._scaled[name] = (name, False)
            bias = name.removesuffix(".weight") + ".bias"
            if tuple(self.adapter.info(name).shape)[1:] == (1,) and name.endswith(".weight") and bias in held:
                self._scaled[bias] = (name, True)  # PEFT: "if not is_feedforward and bias is not None: bias *= l"
        self._base, self._dtypes = base, LoadDtypes(base)

    def _bound(self) -> Checkpoint:
        if self._base is None:
            raise RuntimeError(f"{self.label}: bind(base) the adapter before reading it")
        return self._base

    def names(self) -> list[str]:
        self._bound()
        return list(self._scaled)

    def info(self, name: str) -> TensorInfo:
        return TensorInfo(tuple(self._bound().info(name).shape), FLOAT32)

    def _vector(self, name: str, rows: slice | None, total: int, wide: Any) -> torch.Tensor:
        """l of ``name``'s weight shaped to broadcast against ``name``'s rows: (rows, 1) for outputs, (1, in) for
        inputs, transposed for a Conv1D (PEFT's fan_in_fan_out), (rows,) for a bias; in PEFT's dtype ``wide``."""
        weight, is_bias = self._scaled[name]
        if weight not in self._vectors:
            self._vectors[weight] = self.adapter.scaling_vector(weight)
        vector = self._vectors[weight].to(wide)  # PEFT copies the file's l into its parameter
        if is_bias:
            vector = vector.reshape(-1)  # (out,)
        elif weight in self.adapter.transposed:
            vector = vector.T
        if rows is not None and vector.shape[0] == total and total > 1:
            vector = vector[rows]  # outputs follow the rows
        return vector

    def _load_dtype(self, name: str, stored_dtype: Any) -> Any:
        return self._dtypes.of(name, stored_dtype)

    def read(self, name: str, rows: slice | None = None) -> torch.Tensor:
        import torch

        base = self._bound()
        if name not in self._scaled:  # a tensor another entry changes (a LoRA's, a full model's): this one leaves it
            return torch.zeros(rows_shape(base.info(name).shape, rows), dtype=torch.float32)
        stored = base.read(name, rows)  # (rows, ...)
        w = stored.to(self._load_dtype(name, stored.dtype))  # the module's weight as transformers loads it
        # PEFT upcasts a half-precision adapter to float32 (float64 in a float64 model) and multiplies in that dtype:
        # torch.mul(W, l).to(W.dtype), so the product is rounded twice, as PEFT rounds it
        wide = torch.float64 if w.dtype == torch.float64 else torch.float32
        folded = torch.mul(w, self._vector(name, rows, base.info(name).shape[0], wide)).to(w.dtype)
        return folded.float() - stored.float()

    def explain_not_finite(self, name: str) -> None:
        """The fold overflowed the weight's dtype (|l| up to 1e6 times a float16 weight): said as mergekit's fold
        of this entry, with what to do, not as a damaged adapter."""

        from .load_dtypes import fold_overflow

        base = self._bound()
        if name not in self._scaled:  # zeros there: finite
            return
        stored = base.info(name).dtype_info.torch
        raise fold_overflow(str(self.adapter.path / ADAPTER_WEIGHTS), "folding the (IA)³ vector of module "
                            f"{self.adapter.modules[self._scaled[name][0]]!r}", name, stored,
                            self._load_dtype(name, stored), "MODEL+ADAPTER",
                            "which merges (IA)³ adapters' vectors in float32 where every model is an (IA)³ "
                            "adapter of the base")


class _Ia3Union(_AdapterView):
    """An (IA)³ adapter seen over the union of every adapter's vectors: a vector it lacks is
    l = 1, so τ = 0."""

    yields_task_vector = True
    adapter_kind = "ia3"

    def __init__(self, adapter: Ia3Checkpoint, shapes: dict[str, tuple[int, ...]]) -> None:
        self.adapter, self._shapes, self.label = adapter, shapes, adapter.label
        self._held = frozenset(adapter.names())  # bound already: its vectors' base names

    def bind(self, base: Checkpoint) -> None:
        pass  # bound when the identity was built

    def names(self) -> list[str]:
        return self.adapter.names()

    def info(self, name: str) -> TensorInfo:
        return TensorInfo(self._shapes[name], FLOAT32)

    def read(self, name: str, rows: slice | None = None) -> torch.Tensor:
        if name in self._held:
            return self.adapter.read(name, rows)
        import torch

        return torch.zeros(rows_shape(self._shapes[name], rows), dtype=torch.float32)


class Ia3Identity:
    """The l-space "base" of an (IA)³ merge: every vector of the union, all ones, in float32.

    Built from shapes alone, so aligning and planning an (IA)³ merge never import torch; the
    ones are made when the engine reads them. No two names share memory (no tied tensors)."""

    label = "(IA)³ identity (l = 1)"

    def __init__(self, shapes: dict[str, tuple[int, ...]]) -> None:
        self._shapes = dict(shapes)

    def names(self) -> list[str]:
        return list(self._shapes)

    def info(self, name: str) -> TensorInfo:
        return TensorInfo(self._shapes[name], FLOAT32)

    def read(self, name: str, rows: slice | None = None) -> torch.Tensor:
        import torch

        return torch.ones(rows_shape(self._shapes[name], rows), dtype=torch.float32)

    def storage_key(self, name: str) -> None:
        return None  # every vector is its own tensor: none is tied to another

    def location(self, name: str) -> str:
        return self.label

    def files(self) -> list[Path]:
        return []

    def directory(self) -> Path | None:
        return None

    def close(self) -> None:
        pass


def ia3_identity(base: Checkpoint, adapters: list[Ia3Checkpoint]) -> tuple[Ia3Identity, list[_Ia3Union]]:
    """The l-space "base" of an (IA)³ merge, all ones over the union of the adapters' vectors,
    and each adapter seen over that union. Merging against it gives l_m = 1 + λ·τ_m."""
    shapes: dict[str, tuple[int, ...]] = {}
    layouts: dict[str, tuple[bool, str]] = {}  # name -> (stored (in, out), the first adapter that said so)
    for adapter in adapters:
        adapter.bind(base)
        for name in adapter.names():
            shape = tuple(adapter.info(name).shape)
            if shapes.setdefault(name, shape) != shape:
                raise IncompatibleCheckpointsError(
                    f"(IA)³ vectors for {name!r} differ in shape: {shapes[name]} and {shape} ({adapter.label}); "
                    "one adapter scales the module's inputs, the other its outputs",
                    hint="list the module under feedforward_modules in both adapters' configs, or in neither")
            in_out, first = layouts.setdefault(name, (name in adapter.transposed, adapter.label))
            if in_out != (name in adapter.transposed):  # only where the base's architecture is unknown (a lone file)
                raise IncompatibleCheckpointsError(
                    f"(IA)³ adapters {first} and {adapter.label} read {name!r} in two layouts (fan_in_fan_out differs "
                    "in their configs), so the same vector would scale its rows in one and its columns in the "
                    "other", hint="pass the base as its model directory (with config.json), whose architecture "
                                  "decides the layout, or fix fan_in_fan_out in one adapter's config")
    return Ia3Identity(shapes), [_Ia3Union(a, shapes) for a in adapters]


# an (IA)³ vector multiplies a weight's rows or inputs, around 1 (PEFT initialises it to ones); a factor past this
# bound is no trained adapter (1e30 scaled the weights to 1e28 and beyond), as LoRA's scale is bounded
MAX_IA3_FACTOR = 1e6


def _stored_values(file: Any, key: str) -> np.ndarray | None:
    """A vector's stored values, widened with numpy (bfloat16 as the high half of a float32); None for a dtype the
    merge's own reading checks later."""
    if not hasattr(file, "read_into"):
        return None
    info = file.info(key)
    code = info.dtype_info.code
    if code not in ("BF16", "F16", "F32", "F64"):
        return None
    raw = np.empty(math.prod(info.shape) * info.dtype_info.itemsize, np.uint8)
    file.read_into(key, None, memoryview(raw))
    if code == "BF16":
        return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(info.shape)
    return raw.view(info.dtype_info.numpy).reshape(info.shape)


def _check_vector(vector: np.ndarray, where: str, key: str) -> None:
    """An (IA)³ vector's values: finite, and within :data:`MAX_IA3_FACTOR` (named by the vector's own key)."""
    if not np.isfinite(vector).all():
        kind = "NaN" if np.isnan(vector).any() else "Inf"
        raise InvalidTensorError(f"{where}: (IA)³ vector {key!r} {tuple(vector.shape)} holds {kind}",
                                 hint="the adapter is damaged or was saved after a diverged training step")
    largest = float(np.abs(vector).max()) if vector.size else 0.0
    if largest > MAX_IA3_FACTOR:
        raise CheckpointError(f"{where}: (IA)³ vector {key!r} scales the weights by up to {largest:.3g}, beyond any "
                              f"trained adapter (at most {MAX_IA3_FACTOR:g}; PEFT starts every factor at 1)",
                              hint="the adapter is damaged, or not an (IA)³ adapter: check how it was saved")
