"""What LoRA and (IA)³ adapters share: PEFT's file names and key layout, and binding keys to the
base model's tensor names. Pure metadata: nothing here reads a tensor or imports torch."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import CheckpointError, IncompatibleCheckpointsError
from ..limits import read_json
from ..paths import inside
from ..unicode_names import apart, normalization_twin
from .protocol import Checkpoint
from .safetensors_reader import SafetensorsCheckpoint

__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "PEFT_PREFIX", "yields_task_vector", "adapter_kind", "strip_key",
           "BaseNames", "bind_once", "one_key_per_module", "read_adapter_dir"]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


def yields_task_vector(ckpt: Checkpoint) -> bool:
    return bool(getattr(ckpt, "yields_task_vector", False))


def adapter_kind(models: list[Checkpoint]) -> str | None:
    """"lora", "ia3", "ia3-folded" or None (no adapters); mixing (IA)³ with anything else is an error."""
    kinds = {getattr(m, "adapter_kind", None) for m in models}
    if "ia3" in kinds and len(kinds) > 1:
        raise IncompatibleCheckpointsError(
            "(IA)³ adapters merge only with other (IA)³ adapters: their task vectors are scaling vectors, "
            "not weight changes",
            hint="merge the (IA)³ adapters on their own, or fold each into its base model first (PEFT's "
                 "merge_and_unload, and save that model), or list them as BASE+ADAPTER entries of a mergekit "
                 "recipe, which folds each into the base as mergekit does")
    # "ia3-folded": an (IA)³ adapter of a mergekit recipe, read as weight changes (io.ia3.Ia3Folded), like a LoRA's
    return "ia3" if "ia3" in kinds else "lora" if "lora" in kinds else "ia3-folded" if "ia3-folded" in kinds \
        else None


def strip_key(key: str, suffix: str) -> str:
    """The module path of an adapter key: ``suffix`` and PEFT's ``base_model.model.`` removed."""
    module = key[: -len(suffix)] if suffix and key.endswith(suffix) else key
    return module[len(PEFT_PREFIX):] if module.startswith(PEFT_PREFIX) else module


class BaseNames:
    """The base's tensor names, indexed once per binding to find the tensor behind each adapter module
    (an adapter may hold tens of thousands of modules, a mixture-of-experts base as many tensors: a
    lookup that copied or scanned the base's names per module was quadratic)."""

    def __init__(self, base: Checkpoint) -> None:
        self.base = base
        self.names = set(base.names())
        self._longest = max(map(len, self.names), default=0)
        self._tails: dict[str, list[str]] | None = None  # "a.b" -> base names ending in ".a.b"; built when needed
        # (the adapter's module, the base's tensor) bound by the name's ending: the adapter lacks a prefix the base's
        # names have, so PEFT, binding the loaded model's exact names, would load none of these
        self.rebound: list[tuple[str, str]] = []

    def resolve(self, module: str, suffix: str, label: str, key: str) -> str:
        """The base tensor name of ``module + suffix``: exact, else with leading module components
        dropped (an adapter trained on a task head wrapper, e.g. ``bert.``), else the one base name
        ending with it (a base saved under a wrapper prefix)."""
        whole = module + suffix
        # the name itself, then its tails after each dot, longest first; none longer than a base name can match
        # (a module path of thousands of characters costs only its last base-name length)
        first = max(0, len(whole) - self._longest)
        starts = [0] if first == 0 else []
        at = whole.find(".", max(0, first - 1), len(module))
        while at != -1:
            if at + 1 >= first:
                starts.append(at + 1)
            at = whole.find(".", at + 1, len(module))
        for start in starts:
            if whole[start:] in self.names:  # a prefix the base's file lacks: transformers adds it on loading,
                return whole[start:]  # so PEFT binds these too (hp53 c02)
        ending = self._ending(whole)
        if len(ending) == 1:
            self.rebound.append((module, ending[0]))
            return ending[0]
        self._refuse_tied_head(whole, label, key)
        shared = next((n for n in sorted(self.names) if n == "shared.weight" or n.endswith(".shared.weight")), None) \
            if not ending and whole.endswith("embed_tokens.weight") else None
        if shared is not None:  # hostile pass 32, C113
            raise IncompatibleCheckpointsError(
                f"{label}: adapter tensor {key!r} adapts {module!r}, which the base ({self.base.label}) stores as its "
                f"shared embedding {shared!r} (an encoder-decoder's encoder and decoder embed_tokens are tied to it): "
                "PEFT adapts each alias apart, and the encoder's and decoder's changes cannot be merged into the one "
                "tied matrix", hint="merge the adapter into its base with PEFT (merge_and_unload) and merge the full "
                                    "model, or adapt the shared embedding itself (target_modules: shared)")
        renamed = self._renamed(whole) if not ending else None
        twin = normalization_twin(whole, self.names) if not ending else None  # (hp74a c30)
        if twin is not None:
            raise IncompatibleCheckpointsError(
                f"{label}: adapter tensor {key!r} targets module {module!r}, but the base ({self.base.label}) has no "
                f"tensor {whole!r}: {apart(whole, twin)}",
                hint="save the adapter's module names in the base's form (NFC, as Python writes them)")
        raise IncompatibleCheckpointsError(
            f"{label}: adapter tensor {key!r} targets module {module!r}, but the base ({self.base.label}) has "
            + (f"{len(ending)} tensors ending in {whole!r}" if ending else f"no tensor {whole!r}")
            + (f"; it stores {renamed!r}, which ends as that module does" if renamed else ""),
            hint=("transformers 5 loads some models under module names other than their files' (Llava, Gemma 3, "
                  "ViT, ...) and an adapter trained on the loaded model names those: tiesmerge reads the names in "
                  "the files, so merge the adapter into its base with PEFT (merge_and_unload) and merge the full "
                  "model" if renamed else
                  "the adapter was trained on another base model (or on this one as transformers 5 loads it, under "
                  "module names other than its files', as for Llava, Gemma 3, ViT): pass the base it was trained "
                  "from, or merge the adapter into its base with PEFT (merge_and_unload) and merge the full model"))

    def _renamed(self, whole: str) -> str | None:
        """The one base name that ends with the last four components of ``whole`` (layers.0.self_attn.q_proj.weight)
        where the whole name is not found: the same module under another prefix, as transformers 5's conversion of
        some models' names gives (hostile pass 32, C04/C05); said, never bound (a vision tower has such layers too)."""
        parts = whole.split(".")
        if len(parts) < 5:
            return None
        found = [n for n in self._ending(".".join(parts[-4:])) if not n.endswith(whole)]
        # the candidate sharing the most components (a language model's layer beside a vision tower's same layer)
        shared = sorted(((len(set(parts) & set(n.split("."))), n) for n in found), reverse=True)
        return shared[0][1] if shared and (len(shared) == 1 or shared[0][0] > shared[1][0]) else None

    def _refuse_tied_head(self, whole: str, label: str, key: str) -> None:
        """An adapter on the output head of a base that stores none (its head is the input embedding, tied): PEFT
        trains such adapters, and merging one changes the shared matrix, the embedding too (hostile pass 29, N6)."""
        from .align import _EMBED_SUFFIXES, _HEAD_SUFFIXES, read_model_config, ties_word_embeddings

        if not whole.endswith(_HEAD_SUFFIXES) or not ties_word_embeddings(read_model_config(self.base)):
            return
        embedding = next((n for n in sorted(self.names) if n.endswith(_EMBED_SUFFIXES)), None)
        if embedding is not None:
            # an adapted layer's factors name target_modules; a whole copy of the head names modules_to_save (hp41
            # C30: the hint said target_modules of a head that was in modules_to_save)
            field = "target_modules" if any(f in key for f in ("lora_", "ia3_", "vera_", "hra_", "oft_")) \
                else "modules_to_save"
            raise IncompatibleCheckpointsError(
                f"{label}: adapter tensor {key!r} adapts the output head {whole!r}, which the base "
                f"({self.base.label}) does not store: it ties the head to its input embedding {embedding!r} "
                "(tie_word_embeddings), so the head's change would change the embedding too; tiesmerge does not "
                "merge an adapter on a tied head",
                hint="merge the adapter into its base with PEFT (merge_and_unload) and merge the full model, or "
                     f"train the adapter without lm_head in {field}")

    def _ending(self, whole: str) -> list[str]:
        if len(whole) >= self._longest:
            return []
        if self._tails is None:
            self._tails = {}
            for name in self.names:
                at = name.find(".")
                while at != -1:
                    self._tails.setdefault(name[at + 1:], []).append(name)
                    at = name.find(".", at + 1)
        return self._tails.get(whole, [])


def one_key_per_module(keys: dict[str, str], module: str, key: str, where: Path) -> None:
    """Record ``key`` as the adapter file's tensor for ``module``; two keys naming one module (``base_model.model.x``
    beside ``x``, a saved copy stored both ways) are refused: which one counted would depend on the file's order."""
    other = keys.setdefault(module, key)
    if other != key:
        raise CheckpointError(f"{where}: {other!r} and {key!r} are both the adapter's tensor for module {module!r}",
                              hint="the adapter file holds a module twice: remove the stray copy, or save the adapter "
                                   "again (PEFT's save_pretrained writes each module once)")


def bind_once(bound: dict[str, str], name: str, key: str, label: str) -> None:
    """Record that adapter tensor ``key`` binds to base tensor ``name``; a second tensor binding there is refused:
    the model has one module at that place, so one of the two paths names no module of the model (PEFT drops it as
    an unexpected key), and which one the merge kept would depend on the file's order (hostile pass 29, F1)."""
    other = bound.setdefault(name, key)
    if other != key:
        raise IncompatibleCheckpointsError(
            f"{label}: adapter tensors {other!r} and {key!r} both bind to the base tensor {name!r}; the model has one "
            "module there, so one of the two paths names no module of it (PEFT would drop that one)",
            hint="the adapter file holds a stray copy of a module under another path: remove it, or save the adapter "
                 "again (PEFT's save_pretrained writes each module once)")


# the adapter config's flags that change what an adapter's weights mean (PEFT LoRA and (IA)³)
_FLAGS = ("use_rslora", "fan_in_fan_out", "use_dora", "use_qalora", "inference_mode", "lora_bias")


def read_adapter_dir(path: Path, label: str) -> tuple[dict, SafetensorsCheckpoint]:
    """An adapter directory's config and its (opened, validated) weights file."""
    # the adapter's files must resolve inside its directory, as a model's weights must (paths.inside):
    # a link to ~/secret.safetensors is refused, not read
    inside(path / ADAPTER_CONFIG, path, "the adapter config")
    config = read_json(path / ADAPTER_CONFIG, "the adapter config", finite=True,  # written again (hp70a c46)
                       unique_keys=True)  # a key twice: which one PEFT would read is unclear (hp88a c76)
    if not isinstance(config, dict):
        raise CheckpointError(f"{path / ADAPTER_CONFIG}: holds a {type(config).__name__}, not a mapping")
    for key in _FLAGS:  # read as truth values: bool("no") and bool("false") would be True
        if config.get(key) is not None and not isinstance(config[key], bool):
            raise CheckpointError(f"{path / ADAPTER_CONFIG}: {key} is {str(config[key])[:80]!r} "
                                  f"({type(config[key]).__name__}), not true or false",
                                  hint="fix the adapter config (PEFT writes its flags as JSON true/false)")
    weights = path / ADAPTER_WEIGHTS
    if not os.path.lexists(weights):
        pickled = path / "adapter_model.bin"
        raise CheckpointError(
            f"{path}: no {ADAPTER_WEIGHTS}" + (" (only adapter_model.bin, a pickle)" if pickled.is_file() else ""),
            hint="save the adapter with safe_serialization=True (PEFT's default) or convert it to safetensors")
    inside(weights, path, "the adapter's weights")
    return config, SafetensorsCheckpoint(weights, [weights], {}, label)
